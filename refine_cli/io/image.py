"""Images as refiners see them: ``(h, w, 3)`` uint8 RGB windows, plus streamed overviews.

Conversion rules (applied identically to every window, so tiles agree):

* 1 band: grey, repeated to 3 channels. 2 bands: grey + alpha, alpha dropped.
  3 bands: RGB. 4 bands: RGB + alpha, alpha dropped. More bands: the first
  three, unless ``bands`` picks others. Palette images: expanded through the palette.
* uint8 passes unchanged; bool becomes 0/255. Other dtypes (uint16, int,
  float) are stretched linearly to 0..255 between the 0.1 and 99.9 percentiles
  of a sample of the image taken once (64 windows spread over the image, or the
  smallest pyramid level); a float image already in [0, 1] maps 0 -> 0 and 1 -> 255.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from refine_cli.errors import UsageError
from refine_cli.io.readers import Georef, Reader
from refine_cli.tiling.grid import Window

log = logging.getLogger(__name__)


class ImageSource:
    """uint8 RGB view of a :class:`Reader`.

    Args:
        reader: the opened raster.
        bands: 0-based band indices to use as R, G, B (or one band for grey).
    """

    def __init__(self, reader: Reader, bands: tuple[int, ...] | None = None) -> None:
        self.reader = reader
        self.shape = reader.shape
        if bands is not None:
            if max(bands) >= reader.bands:
                raise UsageError(
                    f"--bands asks for band {max(bands) + 1} but {reader.path} has {reader.bands}"
                )
            self._bands = bands
        elif reader.bands >= 3:
            self._bands = (0, 1, 2)
        else:
            self._bands = (0,)
        if reader.bands > 4 and bands is None:
            log.warning("%s has %d bands; using bands 1-3 as RGB (choose others with --bands)",
                        reader.path, reader.bands)
        self._scale: tuple[float, float] | None = None
        if reader.dtype != np.uint8 and reader.dtype != np.bool_ and reader.palette is None:
            self._scale = self._stretch()

    @property
    def georef(self) -> Georef | None:
        """Georeferencing of level 0."""
        return self.reader.georef

    @property
    def has_alpha(self) -> bool:
        """The image has an alpha band (its pixels of alpha 0 hold no data)."""
        return self.reader.alpha_band is not None

    def empty_rows(self, row0: int, n: int, chunk: int = 256) -> np.ndarray:
        """Where rows ``row0 .. row0 + n`` hold no data: ``(n, W)`` bool, True where alpha is 0.

        Read ``chunk`` rows at a time (all False without an alpha band).
        """
        out = np.zeros((n, self.shape[1]), bool)
        band = self.reader.alpha_band
        if band is None:
            return out
        for r in range(0, n, chunk):
            k = min(chunk, n - r)
            out[r : r + k] = self.reader.read(Window(row0 + r, 0, k, self.shape[1]))[..., band] == 0
        return out

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        """Pyramid level sizes, level 0 first."""
        return self.reader.level_shapes

    def _stretch(self) -> tuple[float, float]:
        """Low and high values mapped to 0 and 255 (see module docstring)."""
        sample = self._sample().astype(np.float64)
        finite = sample[np.isfinite(sample)]
        if finite.size == 0:
            return (0.0, 1.0)
        if self.reader.dtype.kind == "f" and finite.min() >= 0.0 and finite.max() <= 1.0:
            return (0.0, 1.0)
        lo, hi = np.percentile(finite, [0.1, 99.9])
        if hi <= lo:
            hi = lo + 1.0
        log.info("%s: %s data stretched from [%g, %g] to 0..255", self.reader.path, self.reader.dtype, lo, hi)
        return (float(lo), float(hi))

    def _sample(self) -> np.ndarray:
        h, w = self.reader.level_shapes[-1]
        if h * w <= 4_000_000:
            top = len(self.reader.level_shapes) - 1
            return self.reader.read(Window(0, 0, h, w), level=top)[..., self._bands]
        h, w = self.shape
        side = 256
        parts = []
        for i in range(8):
            for j in range(8):
                r = min(h - min(side, h), int((i + 0.5) * h / 8) - side // 2)
                c = min(w - min(side, w), int((j + 0.5) * w / 8) - side // 2)
                win = Window(max(r, 0), max(c, 0), min(side, h), min(side, w))
                parts.append(self.reader.read(win)[..., self._bands].reshape(-1, len(self._bands)))
        return np.concatenate(parts)

    def to_rgb8(self, raw: np.ndarray) -> np.ndarray:
        """Convert a raw ``(h, w, bands)`` window to ``(h, w, 3)`` uint8 RGB."""
        pal = self.reader.palette
        if pal is not None:
            idx = raw[..., 0].astype(np.intp)
            return pal[np.clip(idx, 0, len(pal) - 1)]
        x = raw[..., self._bands]
        if self._scale is not None:
            lo, hi = self._scale
            xf = (x.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
            x = np.clip(np.nan_to_num(xf, nan=0.0), 0, 255).round().astype(np.uint8)
        elif x.dtype == np.bool_:
            x = x.astype(np.uint8) * 255
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        return np.ascontiguousarray(x)

    def read(self, window: Window, level: int = 0) -> np.ndarray:
        """Read a window as ``(h, w, 3)`` uint8 RGB."""
        return self.to_rgb8(self.reader.read(window, level))

    def overview(self, out_shape: tuple[int, int], band_rows: int = 512) -> np.ndarray:
        """Area-downscale the whole image to ``out_shape``, streaming row bands.

        'Area' means adaptive average pooling: output pixel ``(i, j)`` is the mean
        of input rows ``[floor(i*H/h), ceil((i+1)*H/h))`` and the same for columns,
        as torch's ``interpolate(mode='area')``. A pyramid level at least as large
        as the target is used instead of level 0 when the file has one.

        Returns:
            ``(h, w, 3)`` float32 in ``[0, 255]`` (not rounded).
        """
        level = choose_level(self.level_shapes, out_shape)
        return area_downscale(lambda win: self.read(win, level).astype(np.float32),
                              self.level_shapes[level], out_shape, band_rows=band_rows)


def choose_level(level_shapes: list[tuple[int, int]], out_shape: tuple[int, int]) -> int:
    """The smallest pyramid level still at least ``out_shape`` in both axes (0 if none)."""
    best = 0
    for i, (h, w) in enumerate(level_shapes):
        if h >= out_shape[0] and w >= out_shape[1]:
            best = i
    return best


def pool_bounds(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive-pooling input ranges ``[start_i, end_i)`` for each output index ``i``.

    ``start_i = floor(i * n_in / n_out)``, ``end_i = ceil((i + 1) * n_in / n_out)``.
    """
    i = np.arange(n_out, dtype=np.int64)
    return (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)


@dataclass(frozen=True)
class PoolBlock:
    """One input window of an area downscale and the pooling ranges inside it.

    Output columns ``[j0, j1)`` of the band come from ``window``; output row ``k`` of the
    band pools window rows ``[top[k], bottom[k])`` and output column ``j0 + m`` pools window
    columns ``[left[m], right[m])``.
    """

    j0: int
    j1: int
    window: Window
    top: np.ndarray
    bottom: np.ndarray
    left: np.ndarray
    right: np.ndarray


def pool_plan(in_shape: tuple[int, int], out_shape: tuple[int, int], band_rows: int,
              band_cols: int) -> Iterator[tuple[int, int, list[PoolBlock]]]:
    """The windows of an adaptive average pooling from ``in_shape`` to ``out_shape``, band by band.

    Yields:
        ``(i0, i1, blocks)``: output rows ``[i0, i1)`` and the :class:`PoolBlock` windows (about
        ``band_rows x band_cols`` input px each) that cover them left to right.

    Raises:
        ValueError: ``out_shape`` is not a reduction of ``in_shape``.
    """
    H, W = in_shape
    oh, ow = out_shape
    if oh > H or ow > W or oh < 1 or ow < 1:
        raise ValueError(f"area downscale from {in_shape} to {out_shape} is not a reduction")
    rs, re_ = pool_bounds(H, oh)
    cs, ce = pool_bounds(W, ow)
    per_row = max(1, int(band_rows * oh / H))
    per_col = max(1, int(band_cols * ow / W))
    for i0 in range(0, oh, per_row):
        i1 = min(oh, i0 + per_row)
        r0, r1 = int(rs[i0]), int(re_[i1 - 1])
        blocks = []
        for j0 in range(0, ow, per_col):
            j1 = min(ow, j0 + per_col)
            c0, c1 = int(cs[j0]), int(ce[j1 - 1])
            blocks.append(PoolBlock(j0, j1, Window(r0, c0, r1 - r0, c1 - c0), rs[i0:i1] - r0, re_[i0:i1] - r0,
                                    cs[j0:j1] - c0, ce[j0:j1] - c0))
        yield i0, i1, blocks


def area_downscale_bands(read: object, in_shape: tuple[int, int], out_shape: tuple[int, int],
                         band_rows: int = 512, band_cols: int = 2048) -> Iterator[tuple[int, np.ndarray]]:
    """Adaptive average pooling of a raster, produced as bands of output rows.

    Output pixel ``(i, j)`` is the mean of input rows ``[floor(i*H/h), ceil((i+1)*H/h))``
    and the same for columns (torch's ``interpolate(mode='area')``). Input is read
    in windows of about ``band_rows x band_cols`` px, so memory stays bounded.

    Args:
        read: ``f(Window) -> (h, w, C)`` array over the input grid.
        in_shape: ``(H, W)`` input size.
        out_shape: ``(h, w)`` output size, each <= the input size.
        band_rows: approximate input rows read at once.
        band_cols: approximate input columns read at once.

    Yields:
        ``(first_output_row, block)`` with ``block`` of shape ``(n, w, C)`` float32, in order.
    """
    for i0, i1, blocks in pool_plan(in_shape, out_shape, band_rows, band_cols):
        out: np.ndarray | None = None
        for b in blocks:
            block = np.asarray(read(b.window), dtype=np.float64)  # type: ignore[operator]
            if block.ndim == 2:
                block = block[:, :, None]
            nc = block.shape[2]
            if out is None:
                out = np.empty((i1 - i0, out_shape[1], nc), np.float32)
            cum = np.zeros((b.window.height + 1, b.window.width, nc))
            np.cumsum(block, axis=0, out=cum[1:])
            rows = cum[b.bottom] - cum[b.top]
            cum = np.zeros((i1 - i0, b.window.width + 1, nc))
            np.cumsum(rows, axis=1, out=cum[:, 1:])
            sums = cum[:, b.right] - cum[:, b.left]
            counts = (b.bottom - b.top)[:, None, None] * (b.right - b.left)[None, :, None]
            out[:, b.j0:b.j1] = (sums / counts).astype(np.float32)
        assert out is not None
        yield i0, out


def area_downscale(read: object, in_shape: tuple[int, int], out_shape: tuple[int, int],
                   band_rows: int = 512, band_cols: int = 2048) -> np.ndarray:
    """Adaptive average pooling into one array (see :func:`area_downscale_bands`).

    Returns:
        ``(h, w, C)`` float32.
    """
    blocks = [b for _, b in area_downscale_bands(read, in_shape, out_shape, band_rows, band_cols)]
    return np.concatenate(blocks, axis=0)


class LevelImage:
    """One pyramid level of an image as uint8 RGB windows (the same interface as :class:`ImageSource`).

    Attributes:
        shape: ``(h, w)`` of the level.
    """

    def __init__(self, read: Callable[[Window], np.ndarray], shape: tuple[int, int],
                 georef: Georef | None = None, reader: Reader | None = None) -> None:
        self._read = read
        self.shape = (int(shape[0]), int(shape[1]))
        self.georef = georef
        self.reader = reader

    def read(self, window: Window) -> np.ndarray:
        """``(h, w, 3)`` uint8 RGB over ``window`` of this level."""
        return self._read(window)

    def close(self) -> None:
        """Release a temporary level file."""
        if self.reader is not None:
            self.reader.close()


def area_downscale_bands_u8(read: Callable[[Window], np.ndarray], in_shape: tuple[int, int],
                            out_shape: tuple[int, int], band_rows: int = 512,
                            band_cols: int = 2048) -> Iterator[tuple[int, np.ndarray]]:
    """:func:`area_downscale_bands` of a uint8 image, rounded to uint8, with integral images.

    Output pixel ``(i, j)`` is the mean of input rows ``[floor(i H / h), ceil((i + 1) H / h))``
    and the same for columns (adaptive average pooling); sums are exact integers (OpenCV's
    ``integral``, about 30x faster than float64 cumulative sums), so the values equal
    ``round(area_downscale(...))``.

    Args:
        read: ``f(Window) -> (h, w, 3)`` uint8 over the input.
        in_shape: ``(H, W)``.
        out_shape: ``(h, w)``, each at most the input's.
        band_rows: approximate input rows read at once.
        band_cols: approximate input columns read at once.

    Yields:
        ``(first_output_row, (n, w, 3) uint8 block)`` in order.
    """
    import cv2

    for i0, i1, blocks in pool_plan(in_shape, out_shape, band_rows, band_cols):
        out = np.empty((i1 - i0, out_shape[1], 3), np.uint8)
        for b in blocks:
            block = np.ascontiguousarray(read(b.window)[..., :3])
            integral = cv2.integral(block, sdepth=cv2.CV_32S).astype(np.int64)
            integral = integral.reshape(b.window.height + 1, b.window.width + 1, 3)
            top, bottom, left, right = b.top, b.bottom, b.left, b.right
            sums = (integral[bottom][:, right] - integral[top][:, right]
                    - integral[bottom][:, left] + integral[top][:, left])
            counts = (bottom - top)[:, None, None] * (right - left)[None, :, None]
            out[:, b.j0:b.j1] = np.clip(np.round((sums / counts).astype(np.float32)), 0, 255).astype(np.uint8)
        yield i0, out


def write_level_tiff(bands: Iterator[tuple[int, np.ndarray]], shape: tuple[int, int],
                     tmp_dir: str | None = None) -> Reader:
    """Stream uint8 RGB row bands (in order) into a temporary tiled TIFF.

    Args:
        bands: ``(first_row, (n, w, 3) uint8)`` blocks covering ``shape`` top to bottom.
        shape: ``(h, w)`` of the level.
        tmp_dir: parent of the temporary folder (default: the system temp dir).

    Returns:
        A reader of the file; closing it deletes the folder.
    """
    import shutil
    import tempfile

    import tifffile

    from refine_cli.io.readers import TiffReader

    folder = tempfile.mkdtemp(prefix="refine-level-", dir=tmp_dir)
    path = f"{folder}/level.tif"
    tile = 256
    h, w = shape

    def tiles() -> Iterator[np.ndarray]:
        pending = np.zeros((0, w, 3), np.uint8)
        for _, block in bands:
            pending = np.concatenate([pending, block], axis=0)
            while pending.shape[0] >= tile:
                yield from _row_tiles(pending[:tile], tile)
                pending = pending[tile:]
        if pending.shape[0]:
            yield from _row_tiles(pending, tile)

    try:
        tifffile.imwrite(path, data=tiles(), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile),
                         compression="zlib", compressionargs={"level": 1}, photometric="rgb", bigtiff=True,
                         metadata=None)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return TiffReader(path, cleanup_dir=folder)


def image_level(src: ImageSource, shape: tuple[int, int], tmp_dir: str | None = None) -> LevelImage:
    """The image at ``shape``.

    Level 0, a pyramid level of the file of exactly that size, or a temporary tiled TIFF built once
    by streaming an 'area' downscale (rounded to uint8) of the nearest larger level.

    Args:
        src: the image.
        shape: ``(h, w)``, at most the image size.
        tmp_dir: folder for a built level (default: the system temp dir).
    """
    shape = (int(shape[0]), int(shape[1]))
    if shape == src.shape:
        return LevelImage(src.read, shape, src.georef)
    for i, lvl in enumerate(src.level_shapes):
        if tuple(lvl) == shape:
            return LevelImage(functools.partial(src.read, level=i), shape)
    level = choose_level(src.level_shapes, shape)
    bands = area_downscale_bands_u8(
        lambda win: src.read(win, level), src.level_shapes[level], shape, band_rows=1024
    )
    reader = write_level_tiff(bands, shape, tmp_dir)
    return LevelImage(lambda win: reader.read(win), shape, reader=reader)


def _row_tiles(rows: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Cut a strip of at most ``tile`` rows into padded ``tile x tile`` tiles, left to right."""
    n, w = rows.shape[:2]
    for c in range(0, w, tile):
        out = np.zeros((tile, tile) + rows.shape[2:], rows.dtype)
        part = rows[:, c:c + tile]
        out[:n, : part.shape[1]] = part
        yield out


def fit_within(shape: tuple[int, int], max_side: int) -> tuple[int, int]:
    """Size with the long side at most ``max_side``, keeping the aspect ratio (floor, >= 1)."""
    h, w = shape
    s = min(1.0, max_side / max(h, w))
    return (max(1, math.floor(h * s)), max(1, math.floor(w * s)))
