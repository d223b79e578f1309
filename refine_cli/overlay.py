"""Visual check of a refinement: mask contours over a downscaled image, a 1:1 crop, an uncertainty heat map.

Nothing here loads a large image whole. The image is area-downscaled while
streaming (:meth:`~refine_cli.io.image.ImageSource.overview`); masks are read
through :class:`~refine_cli.io.masks.MaskSource` (any resolution with the
image's aspect ratio, as in ``refine run``) and downscaled the same way; the
full-resolution crop reads only its own window.

Layout of the picture (RGB, uint8), panels left to right on a dark background,
separated by :data:`GAP` px, top-aligned::

    [ overview (oh x ow) ] [ uncertainty (oh x ow), with --uncertainty ] [ crop (ch x cw), when there is one ]

    (oh, ow) = fit_within((H, W), max_side)           the image downscaled, aspect kept
    (ch, cw) = (min(max(crop, oh), H), min(crop, W))  shown 1:1 (full resolution), as tall as the overview
    height   = max(oh, ch)
    width    = ow + [GAP + ow] + [GAP + cw]

* **Overview**: the image with the contour of MASK (:data:`MASK_COLOUR`) and of
  the compared mask (:data:`COMPARE_COLOUR`), drawn on the downscaled
  probabilities thresholded at ``threshold``; label maps draw the boundaries
  between classes of a nearest-neighbour downscale. The crop's place is framed
  (:data:`CROP_COLOUR`).
* **Crop**: ``ch x cw`` px at full resolution, filling the picture's height, centred
  on the window of that size (in overview px: ``round(ch * oh / H) x round(cw * ow / W)``,
  at least 1) with the largest sum of a score on the overview grid, the first of
  these that is not 0 everywhere: ``|p_mask - p_compare|`` (label maps: differing
  labels), where the refinement changed the coarse mask; the uncertainty near
  MASK's boundary (within a quarter of the window); MASK's boundary pixels; the
  uncertainty anywhere (a mask without a boundary). No crop when the overview is already at full resolution,
  when every score is 0 everywhere, or with ``crop=0``.
* **Uncertainty**: the map (uint8 ``v/255``, uint16 ``v/65535`` or float in
  ``[0, 1]``; 1 = most uncertain), area-downscaled like the image, through the
  *inferno* colour map (OpenCV's table), blended ``0.35 * grey image + 0.65 * heat``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from refine_cli.config import RefineConfig
from refine_cli.errors import InputError, UsageError
from refine_cli.io.image import ImageSource, area_downscale, fit_within
from refine_cli.io.masks import MaskSource, check_mask_shape
from refine_cli.io.readers import Reader, open_raster
from refine_cli.io.writers import check_output, default_tmp_dir, write_bytes_atomic
from refine_cli.tiling.grid import Window

log = logging.getLogger(__name__)

GAP = 8
"""Space between panels, px."""

BACKGROUND = (32, 32, 32)
"""Canvas colour (RGB)."""

MASK_COLOUR = (60, 230, 60)
"""Contour of MASK (RGB, lime)."""

COMPARE_COLOUR = (255, 40, 220)
"""Contour of the compared mask (RGB, magenta)."""

CROP_COLOUR = (0, 200, 255)
"""Frame of the crop's place on the overview (RGB, azure)."""

DEFAULT_MAX_SIDE = 1600
"""Default long side of the overview, px."""

DEFAULT_CROP = 512
"""Default side of the full-resolution crop, px."""

_SMALL_NATIVE = 16
"""Masks with at most this many times the overview's pixels are read whole and resized."""


@dataclass
class Overlay:
    """A rendered overlay.

    Attributes:
        rgb: ``(height, width, 3)`` uint8 RGB picture (layout in the module docstring).
        image_shape: ``(H, W)`` of the full-resolution image.
        overview_shape: ``(oh, ow)`` of the downscaled panels.
        crop_window: the crop's window in image pixels, or ``None``.
        panels: where each panel lies in ``rgb`` (``overview``, ``uncertainty``, ``crop``).
        changed_fraction: mean ``|p_mask - p_compare|`` over the overview (``None`` without a
            compared mask).
    """

    rgb: np.ndarray
    image_shape: tuple[int, int]
    overview_shape: tuple[int, int]
    crop_window: Window | None = None
    panels: dict[str, Window] = field(default_factory=dict)
    changed_fraction: float | None = None


@dataclass
class _Layer:
    """A mask opened on the image grid, with its overview."""

    name: str
    src: MaskSource
    overview: np.ndarray  # (oh, ow): float32 prob, or int32 labels


def _open(path: str, what: str, cfg: RefineConfig, flag: str) -> Reader:
    return open_raster(path, max_pixels=cfg.max_pixels, inline_limit=cfg.inline_limit,
                       tmp_dir=default_tmp_dir(), what=what, flag=flag)


def _resize(arr: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """Resize a small float32 ``(h, w)`` array: area when shrinking, bilinear when growing."""
    if arr.shape == out_shape:
        return arr
    shrink = arr.shape[0] >= out_shape[0] and arr.shape[1] >= out_shape[1]
    return cv2.resize(arr, (out_shape[1], out_shape[0]),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def mask_overview(src: MaskSource, out_shape: tuple[int, int]) -> np.ndarray:
    """Foreground probability of a binary/soft mask downscaled to ``out_shape``.

    Small masks (at most ``16 x`` the output's pixels) are read whole at their
    own resolution and resized; larger ones are read on the image grid and
    area-downscaled while streaming.

    Returns:
        ``out_shape`` float32 in ``[0, 1]``.
    """
    nh, nw = src.native_shape
    if nh * nw <= _SMALL_NATIVE * out_shape[0] * out_shape[1]:
        raw = src.read_native(Window.full(src.shape))
        if raw.dtype.kind == "f":
            prob = np.clip(np.nan_to_num(raw.astype(np.float32)), 0.0, 1.0)
        else:
            prob = raw.astype(np.float32) * np.float32(1.0 / src.kind.scale)
        result: np.ndarray = np.clip(_resize(prob, out_shape), 0.0, 1.0)
        return result
    out = area_downscale(lambda w: src.read(w)[..., None], src.shape, out_shape)
    return out[..., 0]


def label_overview(src: MaskSource, out_shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour downscale of a label map, reading one image row per output row.

    Output ``(i, j)`` is the label at image pixel ``(floor((i + 1/2) H / oh), floor((j + 1/2) W / ow))``.

    Returns:
        ``out_shape`` int32 class indices.
    """
    H, W = src.shape
    oh, ow = out_shape
    rows = ((np.arange(oh) + 0.5) * H / oh).astype(np.int64)
    cols = ((np.arange(ow) + 0.5) * W / ow).astype(np.int64)
    out = np.empty(out_shape, np.int32)
    for i, r in enumerate(rows):
        out[i] = src.read_labels(Window(int(r), 0, 1, W)).labels()[0, cols]
    return out


def unit_reader(reader: Reader) -> Callable[[Window], np.ndarray]:
    """Read band 1 of an uncertainty map as values in ``[0, 1]``, window by window.

    Args:
        reader: the opened map: uint8 (``v/255``), uint16 (``v/65535``), float in ``[0, 1]`` or bool.

    Returns:
        ``f(window) -> (h, w, 1)`` float32 in ``[0, 1]``, 1 = most uncertain.

    Raises:
        InputError: another dtype.
    """
    dt = reader.dtype
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(dt, 1.0)
    if dt.kind not in "uifb":
        raise InputError(f"uncertainty map {reader.path} has unsupported dtype {dt}")

    def read(win: Window) -> np.ndarray:
        v = reader.read(win)[..., :1].astype(np.float32)
        result: np.ndarray = np.clip(np.nan_to_num(v) * np.float32(1.0 / scale), 0.0, 1.0)
        return result

    return read


def uncertainty_overview(
    reader: Reader, image_shape: tuple[int, int], out_shape: tuple[int, int]
) -> np.ndarray:
    """An uncertainty map (band 1) downscaled to ``out_shape``.

    Args:
        reader: the opened map: uint8 (``v/255``), uint16 (``v/65535``), float in ``[0, 1]`` or bool.
        image_shape: ``(H, W)`` of the image; the map must have its aspect ratio.
        out_shape: ``(oh, ow)``.

    Returns:
        ``out_shape`` float32 in ``[0, 1]``, 1 = most uncertain.
    """
    check_mask_shape(reader.shape, image_shape, reader.path)
    read = unit_reader(reader)
    nh, nw = reader.shape
    if nh * nw <= _SMALL_NATIVE * out_shape[0] * out_shape[1]:
        result: np.ndarray = np.clip(_resize(read(Window.full(reader.shape))[..., 0], out_shape), 0.0, 1.0)
        return result
    return area_downscale(read, reader.shape, out_shape)[..., 0]


def most_changed_window(score: np.ndarray, box: tuple[int, int]) -> tuple[int, int] | None:
    """Top-left corner of the ``box`` window (inside ``score``) with the largest sum of ``score``.

    Args:
        score: ``(h, w)`` float, >= 0.
        box: ``(bh, bw)`` window size, clipped to ``score``'s size.

    Returns:
        ``(row, col)`` of the first (row-major) best window, or ``None`` when every sum is 0.
    """
    h, w = score.shape
    bh, bw = min(box[0], h), min(box[1], w)
    s = cv2.integral(score.astype(np.float64))  # (h+1, w+1)
    sums = s[bh:, bw:] - s[:-bh, bw:] - s[bh:, :-bw] + s[:-bh, :-bw]
    best = int(np.argmax(sums))
    r, c = divmod(best, sums.shape[1])
    if sums[r, c] <= 0:
        return None
    return r, c


def choose_crop(score: np.ndarray, image_shape: tuple[int, int], overview_shape: tuple[int, int],
                crop: int) -> Window | None:
    """The full-resolution crop centred on the ``crop x crop`` region of largest ``score``.

    Args:
        score: ``overview_shape`` float >= 0 (mask difference or uncertainty on the overview grid).
        image_shape: ``(H, W)`` of the image.
        overview_shape: ``(oh, ow)`` of the overview.
        crop: crop side at full resolution, px (>= 1).

    Returns:
        A ``min(max(crop, oh), H) x min(crop, W)`` window inside the image (as tall as the
        overview, so that the crop panel is full), or ``None`` when the overview is at full
        resolution already or ``score`` is 0 everywhere.
    """
    (H, W), (oh, ow) = image_shape, overview_shape
    if (oh, ow) == (H, W):
        log.info("the image fits the overview at full resolution; no separate crop")
        return None
    ch, cw = min(max(crop, oh), H), min(crop, W)
    box = (max(1, round(ch * oh / H)), max(1, round(cw * ow / W)))
    corner = most_changed_window(score, box)
    if corner is None:
        log.info("nothing differs (or is uncertain) at overview resolution; no crop")
        return None
    cy = (corner[0] + box[0] / 2) * H / oh
    cx = (corner[1] + box[1] / 2) * W / ow
    top = int(min(max(0, round(cy - ch / 2)), H - ch))
    left = int(min(max(0, round(cx - cw / 2)), W - cw))
    return Window(top, left, ch, cw)


def _contours(canvas: np.ndarray, prob: np.ndarray, threshold: float, colour: tuple[int, int, int],
              thickness: int) -> None:
    """Draw the outlines of ``prob >= threshold`` on ``canvas`` (in place)."""
    fg = cv2.copyMakeBorder((prob >= threshold).astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_REPLICATE)
    # Replicated border: a mask running off the canvas gets no outline along the canvas edge.
    contours, _ = cv2.findContours(fg, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE, offset=(-1, -1))
    if contours:
        cv2.drawContours(canvas, contours, -1, colour, thickness, cv2.LINE_AA)


def _label_edges(canvas: np.ndarray, labels: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Paint pixels whose label differs from the pixel below or to the right (in place)."""
    edge = np.zeros(labels.shape, bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    canvas[edge] = colour


def draw_values(canvas: np.ndarray, layer_values: np.ndarray, labels: bool, threshold: float,
                colour: tuple[int, int, int], thickness: int) -> None:
    """Draw a mask's contours (``(h, w)`` float probabilities) or a label map's edges (int) on ``canvas``."""
    if labels:
        _label_edges(canvas, layer_values, colour)
    else:
        _contours(canvas, layer_values, threshold, colour, thickness)


def draw_text(canvas: np.ndarray, lines: list[tuple[str, tuple[int, int, int]]]) -> None:
    """Write a small legend in the top-left corner (in place), on a dark box."""
    font, fs, th = cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1
    y = 4
    for text, colour in lines:
        (tw, tht), base = cv2.getTextSize(text, font, fs, th)
        cv2.rectangle(canvas, (2, y), (min(canvas.shape[1] - 1, 8 + tw), y + tht + base + 4), (0, 0, 0), -1)
        cv2.putText(canvas, text, (5, y + tht + 2), font, fs, colour, th, cv2.LINE_AA)
        y += tht + base + 6


def heat_map(uncertainty: np.ndarray, grey: np.ndarray) -> np.ndarray:
    """Blend an inferno heat map of ``uncertainty`` over a grey image.

    Args:
        uncertainty: ``(h, w)`` float in ``[0, 1]``.
        grey: ``(h, w)`` uint8 luminance of the image.

    Returns:
        ``(h, w, 3)`` uint8 RGB, ``0.35 * grey + 0.65 * inferno(u)``.
    """
    u8 = np.clip(np.rint(uncertainty * 255.0), 0, 255).astype(np.uint8)
    heat = cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB).astype(np.float32)
    out = 0.35 * grey.astype(np.float32)[..., None] + 0.65 * heat
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_overlay(
    image: str,
    mask: str,
    compare: str | None = None,
    uncertainty: str | None = None,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    crop: int = DEFAULT_CROP,
    threshold: float = 0.5,
    classes: int | None = None,
    bands: tuple[int, ...] | None = None,
    config: RefineConfig | None = None,
) -> Overlay:
    """Draw MASK (and a compared mask) over a downscaled IMAGE; see the module docstring for the layout.

    Args:
        image: the image (any format ``refine run`` reads).
        mask: the mask to show, e.g. the refined one (any resolution with the image's aspect ratio).
        compare: a second mask, e.g. the coarse one, or ``None``.
        uncertainty: an uncertainty map (``refine run --uncertainty``), or ``None``.
        max_side: long side of the overview, px (>= 16).
        crop: side of the full-resolution crop, px; 0 = no crop.
        threshold: probability at or above which a pixel is foreground, in (0, 1).
        classes: read the masks as label maps with this many classes.
        bands: 0-based image bands to use as RGB.
        config: reader limits (``max_pixels``, ``inline_limit``); default :class:`RefineConfig`.

    Returns:
        The picture and where its parts are.
    """
    if max_side < 16:
        raise UsageError(f"--max-side {max_side} is too small: use 16 px or more")
    if crop < 0:
        raise UsageError(f"--crop {crop} must be >= 0 (0 = no crop)")
    if not 0.0 < threshold < 1.0:
        raise UsageError(f"--threshold {threshold} must be strictly between 0 and 1")
    cfg = config or RefineConfig()
    readers: list[Reader] = []
    try:
        inp = _load(image, mask, compare, uncertainty, max_side, classes, bands, cfg, readers)
        H, W = inp.src.shape
        changed = _changed_fraction(inp)
        crop_window = None
        for score in _crop_scores(inp, threshold, crop) if crop else []:
            crop_window = choose_crop(score, (H, W), inp.oshape, crop)
            if crop_window is not None:
                break
        panels = [("overview", _overview_panel(inp, threshold, crop_window))]
        if inp.unc is not None:
            grey = cv2.cvtColor(inp.view, cv2.COLOR_RGB2GRAY)
            hm = heat_map(inp.unc, grey)
            draw_text(hm, [(f"uncertainty {Path(uncertainty or '').name}", (255, 255, 255))])
            panels.append(("uncertainty", hm))
        if crop_window is not None:
            panels.append(("crop", _crop_panel(inp, threshold, crop_window)))
    finally:
        for r in readers:
            r.close()
    canvas, where = _compose(panels)
    return Overlay(canvas, (H, W), inp.oshape, crop_window, where, changed)


@dataclass
class _Inputs:
    """The opened inputs of an overlay and their overviews.

    Attributes:
        src: the image.
        oshape: ``(oh, ow)`` of the overview.
        layers: MASK, then the compared mask when given.
        labels: whether the layers are label maps.
        unc: the uncertainty overview, or ``None``.
        view: ``(oh, ow, 3)`` uint8 overview of the image.
    """

    src: ImageSource
    oshape: tuple[int, int]
    layers: list[_Layer]
    labels: bool
    unc: np.ndarray | None
    view: np.ndarray


def _load(
    image: str, mask: str, compare: str | None, uncertainty: str | None, max_side: int, classes: int | None,
    bands: tuple[int, ...] | None, cfg: RefineConfig, readers: list[Reader],
) -> _Inputs:
    """Open the image, the masks and the uncertainty map (appended to ``readers``) and downscale them.

    Raises:
        InputError: one mask is a label map and the other is not.
    """
    img_reader = _open(image, "image", cfg, "IMAGE")
    readers.append(img_reader)
    src = ImageSource(img_reader, bands)
    H, W = src.shape
    oshape = fit_within((H, W), max_side)
    layers: list[_Layer] = []
    for path, flag in ((mask, "MASK"), (compare, "--compare")):
        if path is None:
            continue
        r = _open(path, "mask", cfg, flag)
        readers.append(r)
        ms = MaskSource(r, (H, W), classes=classes)
        layers.append(_Layer(Path(path).name, ms, label_overview(ms, oshape) if ms.is_labels
                             else mask_overview(ms, oshape)))
    labels = any(layer.src.is_labels for layer in layers)
    if labels and not all(layer.src.is_labels for layer in layers):
        raise InputError(f"{mask} and {compare}: one is a label map and the other a mask; compare "
                         "like with like (force label maps with --classes)")
    unc = None
    if uncertainty is not None:
        ur = _open(uncertainty, "mask", cfg, "--uncertainty")
        readers.append(ur)
        unc = uncertainty_overview(ur, (H, W), oshape)
    view = np.clip(np.rint(src.overview(oshape)), 0, 255).astype(np.uint8)
    return _Inputs(src, oshape, layers, labels, unc, view)


def _difference(inp: _Inputs) -> np.ndarray | None:
    """``(oh, ow)`` float32 ``|p_mask - p_compare|`` (label maps: 1 where they differ); ``None``: one mask."""
    if len(inp.layers) < 2:
        return None
    a, b = inp.layers[0].overview, inp.layers[1].overview
    diff: np.ndarray = (a != b).astype(np.float32) if inp.labels else np.abs(a - b).astype(np.float32)
    return diff


def _changed_fraction(inp: _Inputs) -> float | None:
    """Mean difference of the two masks over the overview (``None`` with one mask)."""
    diff = _difference(inp)
    return None if diff is None else float(diff.mean())


def boundary_pixels(values: np.ndarray, labels: bool, threshold: float) -> np.ndarray:
    """Pixels on either side of a class boundary.

    Args:
        values: ``(h, w)`` float probabilities in ``[0, 1]``, or int class indices when ``labels``.
        labels: ``values`` are class indices.
        threshold: foreground at or above it (probabilities).

    Returns:
        ``(h, w)`` bool.
    """
    cls = values if labels else values >= threshold
    edge = np.zeros(cls.shape, bool)
    rows = cls[:-1] != cls[1:]
    edge[:-1] |= rows
    edge[1:] |= rows
    cols = cls[:, :-1] != cls[:, 1:]
    edge[:, :-1] |= cols
    edge[:, 1:] |= cols
    return edge


def _crop_scores(inp: _Inputs, threshold: float, crop: int) -> list[np.ndarray]:
    """Where to crop, in order of preference (see the module docstring), on the overview grid.

    Each ``(oh, ow)`` float32 >= 0; the caller takes the first that is not 0 everywhere.
    """
    scores: list[np.ndarray] = []
    diff = _difference(inp)
    if diff is not None:
        scores.append(diff)
    edge = boundary_pixels(inp.layers[0].overview, inp.labels, threshold)
    if inp.unc is not None:
        H, W = inp.src.shape
        r = max(1, round(min(crop * inp.oshape[0] / H, crop * inp.oshape[1] / W) / 4))
        near = cv2.dilate(edge.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0
        scores.append(inp.unc * near)
    scores.append(edge.astype(np.float32))
    if inp.unc is not None:  # a mask without a boundary: the uncertainty anywhere
        scores.append(inp.unc)
    return scores


_COLOURS = (MASK_COLOUR, COMPARE_COLOUR)


def _overview_panel(inp: _Inputs, threshold: float, crop_window: Window | None) -> np.ndarray:
    """The overview with the masks' contours, the crop's frame and the legend."""
    layers = inp.layers
    legend = [(f"{layers[0].name}", MASK_COLOUR)]
    if len(layers) == 2:
        legend.append((f"{layers[1].name}", COMPARE_COLOUR))
    over = inp.view.copy()
    for layer, colour in zip(reversed(layers), reversed(_COLOURS[: len(layers)]), strict=True):
        draw_values(over, layer.overview, inp.labels, threshold, colour, 1)
    if crop_window is not None:
        H, W = inp.src.shape
        sy, sx = inp.oshape[0] / H, inp.oshape[1] / W
        p0 = (int(crop_window.col * sx), int(crop_window.row * sy))
        p1 = (int(np.ceil(crop_window.col_end * sx)) - 1, int(np.ceil(crop_window.row_end * sy)) - 1)
        cv2.rectangle(over, p0, p1, CROP_COLOUR, 1)
    draw_text(over, legend)
    return over


def crop_picture(src: ImageSource, masks: Sequence[tuple[MaskSource, tuple[int, int, int]]], window: Window,
                 *, labels: bool, threshold: float, caption: str | None = None) -> np.ndarray:
    """One window of the image at full resolution with the masks' contours (label maps: their edges).

    Reads only ``window`` (image and masks).

    Args:
        src: the image.
        masks: ``(mask on the image grid, RGB colour)`` pairs; the first is drawn last (on top).
        window: the window, in image px.
        labels: the masks are label maps.
        threshold: probability at or above which a pixel is foreground, in (0, 1).
        caption: a line written in the top-left corner, or ``None``.

    Returns:
        ``(window.height, window.width, 3)`` uint8 RGB.
    """
    cimg = src.read(window)
    for mask, colour in reversed(masks):
        vals = mask.read_labels(window).labels() if labels else mask.read(window)
        draw_values(cimg, vals, labels, threshold, colour, 1)
    if caption:
        draw_text(cimg, [(caption, (255, 255, 255))])
    return cimg


def _crop_panel(inp: _Inputs, threshold: float, crop_window: Window) -> np.ndarray:
    """The full-resolution crop with the masks' contours (or label edges) and its place."""
    masks = [(layer.src, colour) for layer, colour in zip(inp.layers, _COLOURS, strict=False)]
    return crop_picture(inp.src, masks, crop_window, labels=inp.labels, threshold=threshold,
                        caption=f"1:1 at x={crop_window.col}, y={crop_window.row}")


def _compose(panels: list[tuple[str, np.ndarray]]) -> tuple[np.ndarray, dict[str, Window]]:
    """The panels side by side, top-aligned, :data:`GAP` px apart; the picture and each panel's place."""
    height = max(p.shape[0] for _, p in panels)
    width = sum(p.shape[1] for _, p in panels) + GAP * (len(panels) - 1)
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = BACKGROUND
    where: dict[str, Window] = {}
    x = 0
    for name, p in panels:
        canvas[: p.shape[0], x: x + p.shape[1]] = p
        where[name] = Window(0, x, p.shape[0], p.shape[1])
        x += p.shape[1] + GAP
    return canvas, where


def encode_overlay(overlay: Overlay, path: str) -> bytes:
    """PNG (or JPEG, by the extension of ``path``) bytes of the picture."""
    ext = Path(path).suffix.lower()
    if ext not in (".png", ".jpg", ".jpeg"):
        raise UsageError(f"cannot write {path}: overlays are written as .png (or .jpg); change the extension")
    ok, buf = cv2.imencode(ext, cv2.cvtColor(overlay.rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise UsageError(f"cannot encode the overlay as {ext}")
    return buf.tobytes()


def write_overlay(overlay: Overlay, path: str, overwrite: bool = False) -> None:
    """Write the picture atomically (temporary file + rename); an existing file only with ``overwrite``."""
    check_output(path, overwrite)
    write_bytes_atomic(path, encode_overlay(overlay, path), overwrite=overwrite)
