"""Coarse masks: kind detection and per-window resampling to the image grid.

Kinds (``--mask-kind``; see ``refine_cli.config`` for the value conventions):

* ``binary``: non-zero is foreground (probability 1). Detected for values ``{0, 1}``,
  ``{0, 255}``, ``{0, 65535}`` (uint16), one non-zero value above :data:`MAX_AUTO_LABEL`, or bool.
* ``soft``: probabilities at the dtype scale: uint8 (and signed integers) ``v/255``, uint16
  ``v/65535``, float as is (in ``[0, 1]``).
* ``labels``: class indices ``0 .. C-1`` refined per class (C from ``--classes``, else max + 1).
  Palette masks and colour-coded RGB masks (classes in sorted colour order, black first) are label maps.
* ``instances``: object ids (0 = background) refined as one foreground: id > 0 is probability 1.

``--classes C`` alone means ``labels`` with C classes; it contradicts ``binary``, ``soft`` and
``instances``. ``auto`` (the default) decides an integer mask that is not binary from its values,
in one streamed pass (blocks of :data:`SCAN_BLOCK` px; bounded memory):

1. Values up to :data:`MAX_AUTO_LABEL`: a label map, unless it holds at least
   :data:`MIN_AUTO_INSTANCES` ids that are compact objects: then instances.
2. Larger values are probabilities or ids. Per value, over a sample of at most
   :data:`SHAPE_SAMPLE_PIXELS` px (the centre of every block), the pass measures

   * *flatness*: the fraction of its pixels whose 4 neighbours hold the same value. Ids are
     plateaus (0.7-0.97 on instance maps); a probability changes across its level sets, which
     are thin bands (< 0.01 on upsampled and blurred probabilities). ``flat`` is the median
     over the values strictly between 0 and the largest.
   * *compactness*: ``n / (2 pi (var_y + var_x + 1/6))`` of its ``n`` pixel positions: about 1 for
     one disc or square, near 0 for a band or a value spread over many places. ``compact`` is the
     median over the non-zero values seen on at least :data:`MIN_SHAPE_PIXELS` px.

   A mask is a ramp when ``flat <= RAMP_FLAT`` and ``compact < OBJECT_COMPACTNESS``, plateaus
   when ``flat >= PLATEAU_FLAT``. Ramps are soft. If the largest value reaches
   ``threshold * scale``, plateaus of at least :data:`MIN_AUTO_INSTANCES` values are ids and
   anything else is soft with a warning (ambiguous: e.g. a few plateau levels, or small compact
   blobs). If it can never reach it (e.g. uint16 ids up to 999), a probability reading would be
   empty, so all but ramps are ids (a ramp stays soft, with a warning that the result is empty).
3. Ids above :data:`MAX_AUTO_LABEL` are instances (one info line); a warning names
   ``--mask-kind labels`` when they are not compact objects (``compact < OBJECT_COMPACTNESS``).

Multi-band masks: a constant alpha band is ignored; a varying alpha over a constant colour (each
colour channel constant over the pixels whose alpha > 0, whatever it is where alpha = 0) is the
mask; equal R, G, B bands are one grey band.

**Resolution.** A mask may be smaller than the image if the aspect ratios agree
within one mask pixel. It is resampled per window, never whole: image pixel
``(y, x)`` reads the mask bilinearly at ``((y + 1/2) * mh/H - 1/2, (x + 1/2) * mw/W - 1/2)``
(``align_corners=False``, clamped at the edges), computed from global
coordinates so every tile gets identical values. Binary and instance masks are
resampled as their 0/1 foreground, label maps as one-hot probabilities per
class, only for the classes present in the window.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from refine_cli.config import DEFAULT_THRESHOLD, check_mask_kind
from refine_cli.errors import InputError
from refine_cli.io.readers import ArrayReader, Reader
from refine_cli.tiling.grid import Window, blocks

log = logging.getLogger(__name__)

MAX_AUTO_LABEL = 63
"""Integer masks with values up to this (and not binary) are read as label maps (or instances, see above)."""

MIN_AUTO_INSTANCES = 16
"""Ids needed to call a mask with values up to :data:`MAX_AUTO_LABEL` (compact ids) or one whose values
reach the threshold (plateaus) an id map."""

PLATEAU_FLAT = 0.5
"""``flat`` at or above this: the values are plateaus (ids)."""

RAMP_FLAT = 0.2
"""``flat`` at or below this (and not compact objects): the values are ramps (probabilities)."""

OBJECT_COMPACTNESS = 0.5
"""``compact`` at or above this: each id is one compact object."""

MIN_SHAPE_PIXELS = 4
"""Values seen on fewer sampled pixels than this do not count towards ``compact`` (no shape to measure)."""

SHAPE_SAMPLE_PIXELS = 1 << 22
"""Pixels (at most, about) that flatness and compactness are measured on."""

SCAN_BLOCK = 2048
"""Side of the blocks the detection pass reads."""

MAX_SCAN_VALUES = 70_000
"""The detection pass stops counting distinct values beyond this (an instance map)."""


@dataclass(frozen=True)
class MaskKind:
    """How raw mask values become probabilities.

    Attributes:
        kind: ``binary`` | ``soft`` | ``labels`` | ``instances``.
        scale: raw value of probability 1 (soft; for binary masks the detected full value,
            1 for instances); unused for labels.
        classes: number of classes (labels), 1 otherwise.
        ids: distinct non-zero ids (instances; a lower bound past :data:`MAX_SCAN_VALUES`), 0 otherwise.
    """

    kind: str
    scale: float = 1.0
    classes: int = 1
    ids: int = 0


@dataclass(frozen=True)
class MaskStats:
    """What the detection pass found in an integer mask.

    Attributes:
        values: ``(k,)`` int64 sorted distinct values (the first ones seen when ``truncated``).
        truncated: the pass stopped after :data:`MAX_SCAN_VALUES` distinct values.
        flat: median flatness in ``[0, 1]`` (see the module docstring), ``None`` when not measured.
        compact: median compactness in ``(0, ~1]``, ``None`` when not measured.
    """

    values: np.ndarray
    truncated: bool = False
    flat: float | None = None
    compact: float | None = None

    @property
    def vmax(self) -> int:
        """The largest value (0 for an empty mask)."""
        return int(self.values[-1]) if self.values.size else 0

    @property
    def ids(self) -> int:
        """Distinct non-zero values."""
        return int(np.count_nonzero(self.values))


def shape_rows(part: np.ndarray, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct value of a block: the sums behind flatness and compactness.

    Args:
        part: ``(h, w)`` integer block whose top-left pixel is ``(row, col)`` of the mask.
        row: the mask row of the block's top-left pixel.
        col: the mask column of the block's top-left pixel.

    Returns:
        ``(values, sums)``: ``(k,)`` sorted values and ``(k, 7)`` float64 sums per value: interior
        pixels (not on the block's edge), interior pixels whose 4 neighbours equal them, pixels,
        and the sums of ``y``, ``x``, ``y**2``, ``x**2`` of their mask coordinates.
    """
    if part.dtype.kind == "u" and part.dtype.itemsize <= 2:  # the values are their own codes: no sort
        codes = part.astype(np.intp)
        values = np.arange(int(part.max()) + 1)
    else:
        values, inverse = np.unique(part, return_inverse=True)
        codes = inverse.reshape(part.shape)
    k, (h, w) = len(values), part.shape
    sums = np.zeros((k, 7), np.float64)
    if h > 2 and w > 2:
        mid = codes[1:-1, 1:-1]
        flat = (mid == codes[:-2, 1:-1]) & (mid == codes[2:, 1:-1]) & (mid == codes[1:-1, :-2]) & (
            mid == codes[1:-1, 2:])
        sums[:, 0] = np.bincount(mid.ravel(), minlength=k)
        sums[:, 1] = np.bincount(mid[flat], minlength=k)
    ys = np.repeat(np.arange(row, row + h, dtype=np.float64), w)
    xs = np.tile(np.arange(col, col + w, dtype=np.float64), h)
    flat_codes = codes.ravel()
    sums[:, 2] = np.bincount(flat_codes, minlength=k)
    for j, weight in enumerate((ys, xs, ys * ys, xs * xs)):
        sums[:, 3 + j] = np.bincount(flat_codes, weight, minlength=k)
    keep = sums[:, 2] > 0
    return values[keep].astype(np.int64), sums[keep]


def shape_medians(values: np.ndarray, sums: np.ndarray) -> tuple[float | None, float | None]:
    """``(flat, compact)`` medians from the merged :func:`shape_rows` of a mask (see the module docstring)."""
    if not values.size:
        return None, None
    inner, flat, n = sums[:, 0], sums[:, 1], sums[:, 2]
    vmax = values[-1]
    pick = (values > 0) & (values < vmax) & (inner > 0)
    if not pick.any():
        pick = (values > 0) & (inner > 0)
    flat_med = float(np.median(flat[pick] / inner[pick])) if pick.any() else None
    nz = (values > 0) & (n >= MIN_SHAPE_PIXELS)
    if not nz.any():
        return flat_med, None
    n, sy, sx, syy, sxx = (sums[nz, j] for j in range(2, 7))
    var = np.maximum(syy / n - (sy / n) ** 2, 0.0) + np.maximum(sxx / n - (sx / n) ** 2, 0.0)
    return flat_med, float(np.median(n / (2 * np.pi * (var + 1 / 6))))


def check_mask_shape(mask_shape: tuple[int, int], image_shape: tuple[int, int], path: str) -> None:
    """Accept a mask of the image's size, or smaller with the same aspect ratio within a pixel."""
    mh, mw = mask_shape
    h, w = image_shape
    if (mh, mw) == (h, w):
        return
    if mh > h or mw > w:
        raise InputError(f"mask {path} is {mw}x{mh} but the image is {w}x{h}: a mask must not be larger "
                         "than the image; resize it to the image size or below")
    if abs(mw - w * mh / h) > 1.0 or abs(mh - h * mw / w) > 1.0:
        raise InputError(
            f"mask {path} is {mw}x{mh} but the image is {w}x{h}: the aspect ratios differ; "
            "give a mask covering the same area (any lower resolution with the same aspect ratio)"
        )


class Resampler:
    """Bilinear resampling (``align_corners=False``) from a native grid to a larger target grid, per window.

    Target pixel ``(y, x)`` reads the native grid at ``((y + 1/2) * nh/H - 1/2, (x + 1/2) * nw/W - 1/2)``,
    clamped to the edges. Positions come from global coordinates, so every window
    gets bit-identical values to the whole-image computation.

    Args:
        native_shape: ``(nh, nw)`` of the source grid.
        shape: ``(H, W)`` of the target grid (>= the native size).
    """

    def __init__(self, native_shape: tuple[int, int], shape: tuple[int, int]) -> None:
        self.native_shape = (int(native_shape[0]), int(native_shape[1]))
        self.shape = (int(shape[0]), int(shape[1]))
        self.identity = self.native_shape == self.shape
        self.scale_rows = self.native_shape[0] / self.shape[0]
        self.scale_cols = self.native_shape[1] / self.shape[1]

    @staticmethod
    def _coords(start: int, n: int, scale: float, n_native: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(start, start + n, dtype=np.float64) + 0.5) * scale - 0.5
        pos = np.clip(pos, 0.0, n_native - 1)
        i0 = np.floor(pos).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_native - 1)
        return i0, i1, (pos - i0).astype(np.float32)

    def native_window(self, window: Window) -> Window:
        """The native window that resampling ``window`` reads."""
        if self.identity:
            return window
        mh, mw = self.native_shape
        r0, r1, _ = self._coords(window.row, window.height, self.scale_rows, mh)
        c0, c1, _ = self._coords(window.col, window.width, self.scale_cols, mw)
        top, left = int(r0[0]), int(c0[0])
        return Window(top, left, int(r1[-1]) + 1 - top, int(c1[-1]) + 1 - left)

    def resample(self, raw: np.ndarray, window: Window, nwin: Window) -> np.ndarray:
        """Resample a float block read over ``nwin`` (``(nh', nw')`` or ``(nh', nw', K)``) to ``window``."""
        if self.identity:
            return raw
        mh, mw = self.native_shape
        r0, r1, fy = self._coords(window.row, window.height, self.scale_rows, mh)
        c0, c1, fx = self._coords(window.col, window.width, self.scale_cols, mw)
        r0, r1 = r0 - nwin.row, r1 - nwin.row
        c0, c1 = c0 - nwin.col, c1 - nwin.col
        extra = (None,) * (raw.ndim - 2)
        wy1 = fy[(slice(None), None, *extra)]
        wx1 = fx[(None, slice(None), *extra)]
        rows = raw[r0] * (1 - wy1) + raw[r1] * wy1
        out: np.ndarray = rows[:, c0] * (1 - wx1) + rows[:, c1] * wx1
        return out


class MaskSource:
    """Probability windows of a coarse mask on the image's pixel grid.

    Args:
        reader: the opened mask raster.
        image_shape: ``(H, W)`` of the image (level 0).
        classes: force a label map with this many classes.
        kind: ``auto`` | ``binary`` | ``soft`` | ``labels`` | ``instances`` (``--mask-kind``, see the
            module docstring).
        threshold: the run's foreground threshold: ``auto`` reads integer values that can never reach
            it as ids, and a soft mask that never reaches it gets a warning; ``None`` (other callers)
            detects with the default threshold and warns about nothing.
    """

    def __init__(self, reader: Reader, image_shape: tuple[int, int], classes: int | None = None,
                 kind: str = "auto", threshold: float | None = None) -> None:
        check_mask_kind(kind, classes)
        self.reader = reader
        self.path = reader.path
        self.native_shape = reader.shape
        self.shape = (int(image_shape[0]), int(image_shape[1]))
        check_mask_shape(self.native_shape, self.shape, self.path)
        self._band, self._colours = self._pick_band(kind)
        self.stats: MaskStats | None = None
        """What the detection pass found (integer masks that are not colour-coded)."""
        self.kind = self._detect(classes, kind, threshold)
        self.classes = self.kind.classes
        self.resampler = Resampler(self.native_shape, self.shape)

    def at(self, shape: tuple[int, int]) -> MaskSource:
        """The same mask on another grid of at least its native size (a pyramid level of the image).

        Shares the reader and the detected kind; windows are then in ``shape``'s coordinates.
        """
        shape = (int(shape[0]), int(shape[1]))
        (mh, mw), (h, w) = self.native_shape, shape
        if mh > h or mw > w:  # the aspect ratio is the image's, rounded per axis on each level
            raise InputError(f"mask {self.path} is {mw}x{mh}: it must not be larger than the {w}x{h} level "
                             "it is read on")
        view = copy.copy(self)
        view.shape = shape
        view.resampler = Resampler(self.native_shape, shape)
        return view

    # -- setup --------------------------------------------------------------
    def _blocks(self, block: int = SCAN_BLOCK) -> Iterator[Window]:
        return blocks(self.native_shape, block)

    def _pick_band(self, kind: str) -> tuple[int | None, np.ndarray | None]:
        """Which band holds the mask; for colour-coded masks the colour table (read in blocks, one pass)."""
        r = self.reader
        if r.bands == 1:
            return 0, None
        in_memory = isinstance(r, ArrayReader)
        alpha = r.alpha_band if r.bands in (2, 4) and r.alpha_band == r.bands - 1 else None
        if not in_memory:
            if alpha is None:
                raise InputError(f"mask {self.path} has {r.bands} bands; give a single-band mask (grey, "
                                 "probability or label map)")
        ncol = 1 if r.bands <= 2 else 3
        a_lo, a_hi = np.inf, -np.inf
        c_lo, c_hi = np.full(ncol, np.inf), np.full(ncol, -np.inf)  # colour where alpha > 0
        grey = ncol == 3
        for win in self._blocks():
            px = r.read(win)
            colour = px[..., :ncol]
            if grey:
                grey = bool((colour[..., :1] == colour[..., 1:]).all())
            if alpha is not None:
                a = px[..., alpha]
                a_lo, a_hi = min(a_lo, float(a.min())), max(a_hi, float(a.max()))
                shown = colour[a > 0]
                if shown.size:
                    c_lo, c_hi = np.minimum(c_lo, shown.min(axis=0)), np.maximum(c_hi, shown.max(axis=0))
        if alpha is not None and a_lo != a_hi and (c_lo == c_hi).all():
            return alpha, None
        if ncol == 1 or grey:
            return 0, None
        if not isinstance(r, ArrayReader):
            raise InputError(f"mask {self.path} has {r.bands} bands; give a single-band mask (grey, "
                             "probability or label map)")
        return 0, self._colour_labels(r, kind)

    def _colour_labels(self, reader: ArrayReader, kind: str) -> np.ndarray:
        """Number a colour-coded mask's colours (black first) and read their indices from now on."""
        colour = reader.array[..., :3]
        colours, inverse = np.unique(colour.reshape(-1, 3), axis=0, return_inverse=True)
        as_foreground = kind in ("binary", "instances")
        if len(colours) > (65535 if as_foreground else 256):
            raise InputError(f"mask {self.path} is a colour image with {len(colours)} colours; give a "
                             "single-band mask or a label map")
        # np.unique sorts lexicographically, so black, when present, is already first
        inverse = inverse.reshape(colour.shape[:2])
        if as_foreground and colours[0].any():  # no black: every pixel is foreground
            colours, inverse = np.vstack([np.zeros((1, 3), colours.dtype), colours]), inverse + 1
        self.reader = ArrayReader(self.path, inverse.astype(np.uint16 if len(colours) > 255 else np.uint8))
        return colours

    def _detect(self, classes: int | None, kind: str, threshold: float | None) -> MaskKind:
        dtype = self.reader.dtype
        if self._colours is not None:
            return self._detect_colours(self._colours, classes, kind)
        if dtype == np.bool_:
            if kind == "soft":
                return MaskKind("soft", 1.0)
            if kind == "instances":
                return MaskKind("instances", 1.0, ids=1)
            if kind == "labels" or classes:
                return MaskKind("labels", classes=classes or 2)
            return MaskKind("binary", 1.0)
        if dtype.kind == "f":
            return self._detect_float(classes, kind, threshold)
        if dtype.kind not in "ui":
            raise InputError(f"mask {self.path} has unsupported dtype {dtype}")
        palette = self.reader.palette is not None
        self.stats = stats = self._scan(shape_stats=kind == "auto" and classes is None and not palette)
        if stats.values.size and int(stats.values[0]) < 0:
            raise InputError(f"mask {self.path} has negative values; masks are probabilities, class indices "
                             "or ids")
        vmax = stats.vmax
        full = float(np.iinfo(dtype).max) if dtype.kind == "u" else 255.0
        scale = 255.0 if dtype.itemsize == 1 else full
        if kind == "soft":
            return self._soft(scale, vmax, threshold)
        if kind == "binary":
            return MaskKind("binary", 1.0)
        if kind == "instances":
            return MaskKind("instances", 1.0, ids=stats.ids)
        if kind == "labels" or classes is not None or (palette and vmax >= 2):
            n = classes or max(vmax + 1, 2)
            if vmax >= n:
                raise InputError(f"mask {self.path} has label {vmax} but --classes {classes}: labels must be "
                                 f"0..{n - 1}")
            if n > 65535:
                raise InputError(f"mask {self.path} has values up to {vmax}: too many classes for a label "
                                 "map (at most 65535); pass --mask-kind instances")
            return MaskKind("labels", classes=n)
        vs = set(stats.values.tolist()) if stats.values.size <= 2 else {-1}
        for top in (1.0, 255.0, full):
            if vs <= {0, int(top)}:
                return MaskKind("binary", top)
        return self._detect_auto(stats, scale, threshold)

    def _detect_auto(self, stats: MaskStats, scale: float, threshold: float | None) -> MaskKind:
        """``--mask-kind auto`` for an integer mask that is not binary (the rule of the module docstring)."""
        vmax, ids = stats.vmax, stats.ids
        objects = stats.compact is not None and stats.compact >= OBJECT_COMPACTNESS
        if vmax <= MAX_AUTO_LABEL:
            if ids >= MIN_AUTO_INSTANCES and objects:
                return self._instances(stats)
            log.info("mask %s: integer values 0..%d read as a label map with %d classes (--mask-kind soft or "
                     "instances reads it otherwise)", self.path, vmax, max(vmax + 1, 2))
            return MaskKind("labels", classes=max(vmax + 1, 2))
        if ids == 1:  # {0, v}: one foreground value
            return MaskKind("binary", float(vmax))
        flat = stats.flat
        ramp = flat is not None and flat <= RAMP_FLAT and not objects
        plateaus = flat is not None and flat >= PLATEAU_FLAT
        reaches = vmax >= (DEFAULT_THRESHOLD if threshold is None else threshold) * scale
        if ramp:
            return self._soft(scale, vmax, threshold)
        if reaches and not (plateaus and ids >= MIN_AUTO_INSTANCES):
            log.warning("mask %s: values up to %d read as probabilities (v/%d) but they look partly like "
                        "ids; pass --mask-kind soft, instances or labels to settle it", self.path, vmax,
                        scale)
            return self._soft(scale, vmax, threshold)
        if not objects:
            log.warning("mask %s: %d ids up to %d read as instances (id > 0 is foreground) but they are not "
                        "compact objects; pass --mask-kind labels or soft if they are not", self.path, ids,
                        vmax)
            return MaskKind("instances", 1.0, ids=ids)
        return self._instances(stats)

    def _instances(self, stats: MaskStats) -> MaskKind:
        log.info("mask %s: %s%d instance ids (values up to %d) refined as one foreground, id > 0; pass "
                 "--classes N or --mask-kind labels to refine each id as a class", self.path,
                 "at least " if stats.truncated else "", stats.ids, stats.vmax)
        return MaskKind("instances", 1.0, ids=stats.ids)

    def _soft(self, scale: float, top: float, threshold: float | None) -> MaskKind:
        """A soft mask; warns when its largest value ``top`` (raw) never reaches ``threshold``."""
        if threshold is not None and 0 < top < threshold * scale:
            log.warning("mask %s: as probabilities (v/%g) its largest value %g stays below --threshold %g, "
                        "so the refined mask is empty; if the values are ids pass --mask-kind instances",
                        self.path, scale, top, threshold)
        return MaskKind("soft", scale)

    def _detect_colours(self, colours: np.ndarray, classes: int | None, kind: str) -> MaskKind:
        n = len(colours)
        if kind == "soft":
            raise InputError(f"mask {self.path} is a colour-coded mask ({n} colours); --mask-kind soft needs "
                             "a single-band mask")
        if kind == "binary":
            return MaskKind("binary", 1.0)
        if kind == "instances":
            return MaskKind("instances", 1.0, ids=n - 1)
        if classes is not None and classes < n:
            raise InputError(f"mask {self.path} has {n} colours but --classes {classes}")
        return MaskKind("labels", classes=classes or max(n, 2))

    def _detect_float(self, classes: int | None, kind: str, threshold: float | None) -> MaskKind:
        lo, hi, nan = self._float_range()
        if nan:
            raise InputError(f"mask {self.path} contains NaN values; fill them (e.g. with 0) first")
        if classes:
            raise InputError(f"--classes needs an integer label map, but {self.path} is a float mask")
        if kind in ("labels", "instances"):
            raise InputError(f"--mask-kind {kind} needs an integer mask, but {self.path} is a float mask")
        if kind == "binary":
            return MaskKind("binary", 1.0)
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise InputError(f"float mask {self.path} has values in [{lo:g}, {hi:g}]; float masks must be "
                             "probabilities in [0, 1] (or save it as an integer label map)")
        return self._soft(1.0, hi, threshold)

    def _scan(self, shape_stats: bool) -> MaskStats:
        """One streamed pass over an integer mask: its distinct values, optionally flatness and compactness.

        Shape sums come from the centre of every block holding two values or more, at most about
        :data:`SHAPE_SAMPLE_PIXELS` px in all (the whole mask when it is that small).
        """
        h, w = self.native_shape
        n_blocks = math.ceil(h / SCAN_BLOCK) * math.ceil(w / SCAN_BLOCK)
        side = int(min(SCAN_BLOCK, max(64, math.sqrt(SHAPE_SAMPLE_PIXELS / max(n_blocks, 1)))))
        small = self.reader.dtype.kind == "u" and self.reader.dtype.itemsize <= 2
        seen_small = np.zeros(1 << (8 * self.reader.dtype.itemsize) if small else 0, bool)
        seen: set[int] = set()
        shape_values, shape_sums = [], []
        truncated = False
        for win in self._blocks():
            part = self.reader.read(win)[..., self._band]
            if small:
                present = np.flatnonzero(np.bincount(part.ravel(), minlength=1))
                seen_small[present] = True
                count = int(np.count_nonzero(seen_small))
            else:
                present = np.unique(part)
                seen.update(present.tolist())
                count = len(seen)
            if count > MAX_SCAN_VALUES:
                truncated = True
                break
            if shape_stats and len(present) > 1:
                ch, cw = min(side, win.height), min(side, win.width)
                r0, c0 = (win.height - ch) // 2, (win.width - cw) // 2
                v, s = shape_rows(part[r0:r0 + ch, c0:c0 + cw], win.row + r0, win.col + c0)
                shape_values.append(v)
                shape_sums.append(s)
        values = np.flatnonzero(seen_small).astype(np.int64) if small else np.array(sorted(seen), np.int64)
        if not shape_values:
            return MaskStats(values, truncated)
        v = np.concatenate(shape_values)
        order = np.argsort(v, kind="stable")
        v, s = v[order], np.concatenate(shape_sums)[order]
        uniq, first = np.unique(v, return_index=True)
        flat, compact = shape_medians(uniq, np.add.reduceat(s, first, axis=0))
        return MaskStats(values, truncated, flat, compact)

    def _iter_native(self, block: int = SCAN_BLOCK) -> Iterator[np.ndarray]:
        for win in self._blocks(block):
            yield self.reader.read(win)[..., self._band]

    def _float_range(self) -> tuple[float, float, bool]:
        lo, hi, nan = np.inf, -np.inf, False
        for part in self._iter_native():
            finite = np.isfinite(part)
            if not finite.all():
                nan = True
                break
            lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
        return lo, hi, nan

    # -- reading ----------------------------------------------------------
    @property
    def is_labels(self) -> bool:
        """Whether the mask is a label map."""
        return self.kind.kind == "labels"

    @property
    def is_foreground(self) -> bool:
        """Whether the mask reads as ``raw != 0`` (binary and instance masks)."""
        return self.kind.kind in ("binary", "instances")

    @property
    def same_resolution(self) -> bool:
        """Whether the mask has the image's size (no resampling)."""
        return self.native_shape == self.shape

    def native_window(self, window: Window) -> Window:
        """The mask-resolution window that bilinear sampling of ``window`` reads."""
        return self.resampler.native_window(window)

    def read_native(self, window: Window) -> np.ndarray:
        """Raw mask values (one band) over the native window serving image ``window``."""
        return self.reader.read(self.native_window(window))[..., self._band]

    def uniform_value(self, window: Window) -> float | None:
        """The probability if the mask is constant over ``window`` (image grid), else ``None``.

        For label maps the constant class index is returned; binary and instance masks are
        uniform where all of it is foreground (any ids) or all background.
        """
        raw = self.read_native(window)
        if self.is_foreground:
            fg = raw != 0
            return 1.0 if fg.all() else 0.0 if not fg.any() else None
        first = raw.flat[0]
        if not (raw == first).all():
            return None
        if self.is_labels:
            return float(first)
        return float(first) / self.kind.scale

    def _resample(self, raw: np.ndarray, window: Window, nwin: Window) -> np.ndarray:
        return self.resampler.resample(raw, window, nwin)

    # -- the coarse-source protocol used by the engine --------------------------
    @property
    def channels(self) -> int:
        """Channels of :meth:`read_k`: 1 for binary/soft/instance masks, C for label maps."""
        return self.classes if self.is_labels else 1

    def constant(self, window: Window) -> np.ndarray | None:
        """The ``(K,)`` float32 values if the mask is constant over ``window``, else ``None``."""
        value = self.uniform_value(window)
        if value is None:
            return None
        if self.is_labels:
            out = np.zeros(self.classes, np.float32)
            out[int(value)] = 1.0
            return out
        return np.array([min(max(value, 0.0), 1.0)], np.float32)

    def binary_uniform(self, window: Window, threshold: float = 0.5) -> bool:
        """Whether every probability that resampling ``window`` reads lies on one side of ``threshold``."""
        if self.is_labels:
            return self.uniform_value(window) is not None
        raw = self.read_native(window)
        if self.is_foreground:
            fg = raw != 0
        else:
            fg = raw >= threshold * self.kind.scale if raw.dtype.kind != "f" else raw >= threshold
        return bool(fg.all() or not fg.any())

    def read_k(self, window: Window) -> np.ndarray:
        """The mask over ``window`` as probabilities.

        ``(h, w, 1)`` float32 probability (binary/soft/instance masks), ``(h, w, C)`` one-hot
        probabilities (label maps; memory grows with C).
        """
        if self.is_labels:
            lw = self.read_labels(window)
            out = np.zeros((window.height, window.width, self.classes), np.float32)
            for c in lw.present:
                out[..., c] = lw.prob(c)
            return out
        return self.read(window)[:, :, None]

    def read(self, window: Window) -> np.ndarray:
        """Foreground probability over ``window`` (binary/soft/instance masks).

        Binary and instance masks are 1 where the raw value is non-zero, soft masks ``raw / scale``
        (float: as is), then resampled bilinearly.

        Returns:
            ``(h, w)`` float32 in ``[0, 1]``.
        """
        if self.is_labels:
            raise TypeError("read() is for binary/soft masks; use read_labels() for label maps")
        nwin = self.native_window(window)
        raw = self.reader.read(nwin)[..., self._band]
        if raw.dtype.kind == "f" and not np.isfinite(raw).all():
            raise InputError(f"mask {self.path} contains NaN values near rows {nwin.row}-{nwin.row_end}; "
                             "fill them (e.g. with 0) first")
        if self.is_foreground:
            prob = (raw != 0).astype(np.float32)
        elif raw.dtype.kind == "f":
            prob = np.clip(raw.astype(np.float32), 0.0, 1.0)
        else:
            prob = raw.astype(np.float32) * np.float32(1.0 / self.kind.scale)
        out: np.ndarray = np.clip(self._resample(prob, window, nwin), 0.0, 1.0).astype(np.float32, copy=False)
        return out

    def read_labels(self, window: Window) -> LabelWindow:
        """Class probabilities over ``window`` of a label map, computed per class on demand."""
        nwin = self.native_window(window)
        raw = self.reader.read(nwin)[..., self._band]
        if int(raw.max()) >= self.classes:
            raise InputError(f"mask {self.path} has label {int(raw.max())} but only {self.classes} classes")
        return LabelWindow(self, window, nwin, raw)


class LabelWindow:
    """One window of a label map: the classes present and their resampled one-hot probabilities."""

    def __init__(self, source: MaskSource, window: Window, nwin: Window, raw: np.ndarray) -> None:
        self._src, self.window, self._nwin, self._raw = source, window, nwin, raw
        self.present: list[int] = np.flatnonzero(np.bincount(raw.ravel().astype(np.int64))).tolist()

    def prob(self, cls: int) -> np.ndarray:
        """``(h, w)`` float32 probability of class ``cls`` (bilinear of its indicator)."""
        onehot = (self._raw == cls).astype(np.float32)
        return self._src._resample(onehot, self.window, self._nwin).astype(np.float32, copy=False)

    def labels(self) -> np.ndarray:
        """``(h, w)`` int class index of the largest resampled probability (ties: lowest class)."""
        if len(self.present) == 1:
            return np.full(self.window.shape, self.present[0], np.int32)
        best = np.full(self.window.shape, -1.0, np.float32)
        out = np.zeros(self.window.shape, np.int32)
        for c in self.present:
            p = self.prob(c)
            better = p > best
            out[better] = c
            best[better] = p[better]
        return out


class ProbSource:
    """K-channel probabilities on a coarser grid (a previous level's output), resampled per window.

    Args:
        source: ``(nh, nw, K)`` float array in [0, 1], or a :class:`Reader` of a K-band float raster.
        shape: ``(H, W)`` target grid (>= the source size).
        path: name used in messages.
    """

    is_labels = False

    def __init__(self, source: np.ndarray | Reader, shape: tuple[int, int], path: str = "level") -> None:
        if isinstance(source, np.ndarray):
            arr = source if source.ndim == 3 else source[:, :, None]
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            self.reader: Reader = ArrayReader(path, arr, alpha_band=None)
        else:
            self.reader = source
        self.path = path
        self.native_shape = self.reader.shape
        self.shape = (int(shape[0]), int(shape[1]))
        self.channels = self.reader.bands
        self.resampler = Resampler(self.native_shape, self.shape)

    def _native(self, window: Window) -> tuple[np.ndarray, Window]:
        nwin = self.resampler.native_window(window)
        return self.reader.read(nwin).astype(np.float32, copy=False), nwin

    def constant(self, window: Window) -> np.ndarray | None:
        """The ``(K,)`` values if every channel is constant over ``window``, else ``None``."""
        raw, _ = self._native(window)
        first = raw[:1, :1].reshape(-1)
        if (raw == first).all():
            return first.astype(np.float32)
        return None

    def binary_uniform(self, window: Window, threshold: float = 0.5) -> bool:
        """Whether channel 0 lies on one side of ``threshold`` everywhere ``window`` reads."""
        raw, _ = self._native(window)
        fg = raw[..., 0] >= threshold
        return bool(fg.all() or not fg.any())

    def read_k(self, window: Window) -> np.ndarray:
        """``(h, w, K)`` float32 over ``window`` of the target grid."""
        raw, nwin = self._native(window)
        out: np.ndarray = np.clip(self.resampler.resample(raw, window, nwin), 0.0, 1.0)
        return out.astype(np.float32, copy=False)

    def read(self, window: Window) -> np.ndarray:
        """``(h, w)`` float32 channel 0 over ``window``."""
        return self.read_k(window)[..., 0]

    def read_labels(self, window: Window) -> LabelWindow:
        """Not a label map: raises ``TypeError`` (the engine reads probabilities with :meth:`read_k`)."""
        raise TypeError(f"{type(self).__name__} holds probabilities, not a label map")

    def close(self) -> None:
        """Release the underlying raster."""
        self.reader.close()


class StackedSource:
    """Several coarse sources on one grid read as one, their channels side by side.

    The guard level reads the refiner's result and the user's mask through it.

    Args:
        parts: sources with the same ``shape`` (none of them a label map).
    """

    is_labels = False

    def __init__(self, *parts: Any) -> None:
        if not parts or any(p.is_labels for p in parts) or len({tuple(p.shape) for p in parts}) != 1:
            raise ValueError("stacked sources must be non-label sources of one shape")
        self.parts = parts
        self.shape = tuple(parts[0].shape)
        self.channels = sum(int(p.channels) for p in parts)

    def constant(self, window: Window) -> np.ndarray | None:
        """The ``(K,)`` values if every part is constant over ``window``, else ``None``.

        Constant also requires channel 0 of every part to lie on the same side of 0.5.
        """
        values = []
        for p in self.parts:
            v = p.constant(window)
            if v is None:
                return None
            values.append(v)
        sides = {bool(v[0] >= 0.5) for v in values}
        return np.concatenate(values).astype(np.float32) if len(sides) == 1 else None

    def binary_uniform(self, window: Window, threshold: float = 0.5) -> bool:
        """Whether channel 0 of every part lies on one and the same side of ``threshold`` over ``window``."""
        sides = set()
        for p in self.parts:
            if not p.binary_uniform(window, threshold):
                return False
            sides.add(bool(p.read_k(Window(window.row, window.col, 1, 1))[0, 0, 0] >= threshold))
        return len(sides) == 1

    def read_labels(self, window: Window) -> LabelWindow:
        """Not a label map: raises ``TypeError`` (the engine reads probabilities with :meth:`read_k`)."""
        raise TypeError(f"{type(self).__name__} holds probabilities, not a label map")

    def read_k(self, window: Window) -> np.ndarray:
        """``(h, w, K)`` float32: the parts' channels in order."""
        return np.concatenate([p.read_k(window) for p in self.parts], axis=-1)

    def read(self, window: Window) -> np.ndarray:
        """``(h, w)`` float32 channel 0."""
        return self.read_k(window)[..., 0]
