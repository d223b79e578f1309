"""Raster readers behind one protocol: shape, bands, dtype, georeferencing, ``read(window, level)``.

Backends:

* :class:`TiffReader` — tiled (or finely stripped) TIFF / BigTIFF / OME-TIFF
  through tifffile + zarr. A window decodes only the chunks it touches; decoded
  chunks are kept in a small LRU cache so the halos of neighbouring tiles are
  not decoded twice. Pyramid levels (SubIFDs, OME levels) are exposed.
* :class:`RasterioReader` — GeoTIFF / COG and other GDAL formats; CRS and
  transform are carried to the outputs, overviews are the pyramid levels.
* :class:`ArrayReader` — formats without windowed access (PNG, JPEG, WebP, BMP,
  TIFFs stored as a few huge strips, stdin bytes): decoded once. Above the inline
  limit the decoded image is written once to a tiled temporary TIFF and read
  from there (:func:`open_raster` does this), so the rest of the run streams.

``read`` returns ``(h, w, bands)`` arrays in the file's own dtype; conversion to
the refiners' uint8 RGB happens in ``io.image``. No torch here.
"""

from __future__ import annotations

import io as _io
import logging
import os
import re
import shutil
import stat
import struct
import sys
import tempfile
import threading
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import cv2
import numpy as np

from refine_cli.errors import InputError, ReadError, ResourceError, UsageError, exception_chain
from refine_cli.io.sniff import exif_orientation, sniff
from refine_cli.tiling.grid import Window

if TYPE_CHECKING:
    import tifffile

log = logging.getLogger(__name__)

GEOTIFF_TAGS = (33550, 33922, 34264, 34735)
"""ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory."""

MAX_STREAM_CHUNK_BYTES = 32 * 1024**2
"""TIFF chunks (tiles or strips) larger than this are not streamed: the file is decoded once."""


@dataclass(frozen=True)
class Georef:
    """Georeferencing carried from input to outputs.

    Attributes:
        crs_wkt: coordinate reference system as WKT, or ``None``.
        transform: affine ``(a, b, c, d, e, f)``: ``x = a*col + b*row + c``, ``y = d*col + e*row + f``.
    """

    crs_wkt: str | None
    transform: tuple[float, float, float, float, float, float]

    def scaled(self, factor_rows: float, factor_cols: float) -> Georef:
        """The georeferencing of the same area sampled ``factor`` times more densely (0.5 = half)."""
        a, b, c, d, e, f = self.transform
        return Georef(
            self.crs_wkt, (a / factor_cols, b / factor_rows, c, d / factor_cols, e / factor_rows, f)
        )


class Reader:
    """Base class of all readers.

    Attributes:
        path: source path (``-`` for stdin), used in messages.
        shape: ``(H, W)`` of level 0.
        bands: samples per pixel.
        dtype: numpy dtype of the samples.
        georef: georeferencing or ``None``.
        level_shapes: ``(h, w)`` of every pyramid level, level 0 first.
        chunk_shape: ``(rows, cols)`` of the natural read unit, or ``None`` (in memory).
        color_order: ``RGB`` or ``BGR`` order of 3/4-band data.
        alpha_band: index of an alpha band, or ``None``.
        palette: ``(N, 3)`` uint8 colour table of a palette image, or ``None``.
    """

    backend = "base"

    def __init__(self, path: str) -> None:
        self.path = path
        self.shape: tuple[int, int] = (0, 0)
        self.bands = 1
        self.dtype = np.dtype(np.uint8)
        self.georef: Georef | None = None
        self.level_shapes: list[tuple[int, int]] = []
        self.chunk_shape: tuple[int, int] | None = None
        self.color_order = "RGB"
        self.alpha_band: int | None = None
        self.palette: np.ndarray | None = None
        self._lock = threading.Lock()

    # -- protocol ---------------------------------------------------------
    def read(self, window: Window, level: int = 0) -> np.ndarray:
        """Read a window of a pyramid level.

        Args:
            window: pixel window in that level's grid; must lie inside it.
            level: pyramid level (0 = full resolution).

        Returns:
            ``(h, w, bands)`` array of ``dtype``.
        """
        shape = self.level_shapes[level]
        if window.row < 0 or window.col < 0 or window.row_end > shape[0] or window.col_end > shape[1]:
            raise ValueError(f"{window} is outside level {level} of {self.path} ({shape[0]}x{shape[1]})")
        with self._lock:
            try:
                out = self._read(window, level)
            except InputError:
                raise
            except (MemoryError, KeyboardInterrupt):
                raise
            except OSError as exc:  # the storage failed, not the data
                raise ReadError(
                    f"{self.path}: read error at rows {window.row}-{window.row_end} ({exc.strerror or exc}); "
                    "check the disk or network share and run again (add --resume to keep finished rows)"
                ) from exc
            except Exception as exc:  # decoder errors of all kinds: corrupt data
                raise InputError(
                    f"{self.path}: cannot decode rows {window.row}-{window.row_end}, cols "
                    f"{window.col}-{window.col_end} ({type(exc).__name__}: {_short(exc)}); the file is "
                    "corrupt or truncated: re-export it"
                ) from exc
        return out

    def _read(self, window: Window, level: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release files and temporary data."""

    def set_cache_bytes(self, nbytes: int) -> None:  # noqa: B027 - optional
        """Bound the decoded-chunk cache (backends without one ignore this)."""

    def describe(self) -> dict[str, Any]:
        """Facts for ``refine info``."""
        return {
            "path": self.path,
            "backend": self.backend,
            "height": self.shape[0],
            "width": self.shape[1],
            "bands": self.bands,
            "dtype": str(self.dtype),
            "chunks": list(self.chunk_shape) if self.chunk_shape else None,
            "levels": [list(s) for s in self.level_shapes],
            "alpha_band": self.alpha_band,
            "palette": self.palette is not None,
            "crs": self.georef.crs_wkt if self.georef else None,
            "transform": list(self.georef.transform) if self.georef else None,
        }

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _short(exc: BaseException | str, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------
# In-memory arrays
# ---------------------------------------------------------------------------


LAST_BAND_ALPHA = -1
"""``ArrayReader(alpha_band=...)`` default: the last of 2 or 4 bands is alpha (grey+alpha, RGBA arrays);
decoders that know better pass the band or ``None``."""


class ArrayReader(Reader):
    """A decoded image held in memory: ``(H, W, bands)``.

    Args:
        alpha_band: the alpha band, ``None`` for none, or :data:`LAST_BAND_ALPHA` (the last of 2 or
            4 bands, none otherwise).
    """

    backend = "memory"

    def __init__(self, path: str, array: np.ndarray, *, color_order: str = "RGB",
                 alpha_band: int | None = LAST_BAND_ALPHA, palette: np.ndarray | None = None,
                 georef: Georef | None = None) -> None:
        super().__init__(path)
        if array.ndim == 2:
            array = array[:, :, None]
        self.array = array
        self.shape = (array.shape[0], array.shape[1])
        self.bands = array.shape[2]
        self.dtype = array.dtype
        self.level_shapes = [self.shape]
        self.color_order = color_order
        if alpha_band == LAST_BAND_ALPHA:
            alpha_band = self.bands - 1 if self.bands in (2, 4) else None
        self.alpha_band = alpha_band
        self.palette = palette
        self.georef = georef

    def _read(self, window: Window, level: int) -> np.ndarray:
        return self.array[window.slices]

    def close(self) -> None:
        """Drop the array."""
        self.array = np.zeros((0, 0, self.bands), self.dtype)


# ---------------------------------------------------------------------------
# tifffile + zarr
# ---------------------------------------------------------------------------


class TiffReader(Reader):
    """Tiled or finely stripped TIFF / BigTIFF / OME-TIFF read window by window.

    Args:
        path: the TIFF file.
        cache_bytes: bound of the decoded-chunk LRU cache.
        cleanup_dir: a temporary directory to delete on close (for converted caches).
    """

    backend = "tifffile"

    def __init__(self, path: str, cache_bytes: int = 64 * 1024**2, cleanup_dir: str | None = None) -> None:
        import tifffile
        import zarr

        super().__init__(path)
        self._cleanup_dir = cleanup_dir
        self._tf = tifffile.TiffFile(path)
        try:
            series = self._tf.series[0]
            page = series.pages[0] if series.pages else self._tf.pages[0]
            self._axes_perm, self._squeeze = _axes_to_yxc(series.axes, series.shape, path)
            self._arrays = []
            for i, lvl in enumerate(series.levels):
                store = lvl.aszarr() if len(series.levels) == 1 else series.aszarr(level=i)
                self._arrays.append(zarr.open_array(store, mode="r"))
            lvl0 = series.levels[0]
            yx = [lvl0.axes.index("Y"), lvl0.axes.index("X")]
            self.shape = (int(lvl0.shape[yx[0]]), int(lvl0.shape[yx[1]]))
            self.level_shapes = []
            for lvl in series.levels:
                ly, lx = lvl.axes.index("Y"), lvl.axes.index("X")
                self.level_shapes.append((int(lvl.shape[ly]), int(lvl.shape[lx])))
            self.dtype = np.dtype(series.dtype)
            self.bands = _bands_of(series.axes, series.shape)
            chunks = self._arrays[0].chunks
            self.chunk_shape = (int(chunks[yx[0]]), int(chunks[yx[1]]))
            self._yx_axes = yx
            self.palette = _tiff_palette(page)
            self.alpha_band = _tiff_alpha_band(page, self.bands)
            _check_tiff_layout(self._tf, path)
        except InputError:
            self._tf.close()
            raise
        except Exception as exc:
            self._tf.close()
            raise InputError(f"{path}: unsupported TIFF layout ({_short(exc)}); convert it to a plain "
                             "RGB or grey tiled TIFF") from exc
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit = cache_bytes

    @property
    def tiled(self) -> bool:
        """Whether level 0 is stored in tiles (else strips)."""
        return bool(_first_page(self._tf).is_tiled)

    def set_cache_bytes(self, nbytes: int) -> None:
        """Bound the decoded-chunk cache."""
        with self._lock:
            self._cache_limit = int(nbytes)
            self._evict()

    def _evict(self) -> None:
        while self._cache_bytes > self._cache_limit and self._cache:
            _, arr = self._cache.popitem(last=False)
            self._cache_bytes -= arr.nbytes

    def _chunk(self, level: int, cy: int, cx: int) -> np.ndarray:
        key = (level, cy, cx)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        z = self._arrays[level]
        chunks = z.chunks
        ch, cw = chunks[self._yx_axes[0]], chunks[self._yx_axes[1]]
        sel: list[Any] = [slice(None)] * z.ndim
        sel[self._yx_axes[0]] = slice(cy * ch, (cy + 1) * ch)
        sel[self._yx_axes[1]] = slice(cx * cw, (cx + 1) * cw)
        for ax in self._squeeze:
            sel[ax] = 0
        raw = np.asarray(z[tuple(sel)])
        arr = np.ascontiguousarray(np.transpose(raw, self._axes_perm)) if raw.ndim == 3 else raw[:, :, None]
        if arr.nbytes <= self._cache_limit:
            self._cache[key] = arr
            self._cache_bytes += arr.nbytes
            self._evict()
        return arr

    def _read(self, window: Window, level: int) -> np.ndarray:
        z = self._arrays[level]
        ch, cw = z.chunks[self._yx_axes[0]], z.chunks[self._yx_axes[1]]
        out = np.empty((window.height, window.width, self.bands), self.dtype)
        for cy in range(window.row // ch, (window.row_end - 1) // ch + 1):
            for cx in range(window.col // cw, (window.col_end - 1) // cw + 1):
                chunk = self._chunk(level, cy, cx)
                cwin = Window(cy * ch, cx * cw, chunk.shape[0], chunk.shape[1])
                inter = cwin.intersection(window)
                if inter is None:
                    continue
                src = inter.relative_to(cwin)
                dst = inter.relative_to(window)
                out[dst.slices] = chunk[src.slices]
        return out

    def close(self) -> None:
        """Close the file and delete a temporary cache directory."""
        self._tf.close()
        self._cache.clear()
        if self._cleanup_dir:
            shutil.rmtree(self._cleanup_dir, ignore_errors=True)
            self._cleanup_dir = None


def _axes_to_yxc(axes: str, shape: tuple[int, ...], path: str) -> tuple[tuple[int, ...], list[int]]:
    """Permutation taking a chunk (after squeezing) to (Y, X, C), and the axes to squeeze."""
    if "Y" not in axes or "X" not in axes:
        raise InputError(f"{path}: TIFF series has axes {axes!r} without Y and X; not an image")
    sample_axes = [i for i, a in enumerate(axes) if a in "SC" and shape[i] > 1]
    others = [i for i, a in enumerate(axes) if a not in "YX" and i not in sample_axes]
    big = [axes[i] for i in others if shape[i] > 1]
    if big:
        log.warning("%s: TIFF axes %s: using the first plane of %s", path, axes, "".join(big))
    if len(sample_axes) > 1:
        raise InputError(f"{path}: TIFF has two channel axes ({axes}); export a single RGB or grey image")
    kept = [i for i, a in enumerate(axes) if a in "YX" or i in sample_axes]
    order = {axes[i] if i not in sample_axes else "C": n for n, i in enumerate(kept)}
    if "C" in order:
        return (order["Y"], order["X"], order["C"]), others
    return (order["Y"], order["X"]), others


def _as_yxc(arr: np.ndarray, perm: tuple[int, ...], squeeze: list[int]) -> np.ndarray:
    """A whole decoded TIFF series as ``(H, W)`` or ``(H, W, C)``.

    Takes the first plane of each axis in ``squeeze``, then the axes in the order ``perm`` (both from
    :func:`_axes_to_yxc`).
    """
    for ax in sorted(squeeze, reverse=True):
        arr = np.take(arr, 0, axis=ax)
    return np.transpose(arr, perm) if arr.ndim == 3 else arr


def _bands_of(axes: str, shape: tuple[int, ...]) -> int:
    for a, n in zip(axes, shape, strict=True):
        if a in "SC" and n > 1:
            return int(n)
    return 1


def _first_page(tf: tifffile.TiffFile) -> tifffile.TiffPage:
    """The first page of ``tf``: tifffile always loads it as a full ``TiffPage``, never a ``TiffFrame``."""
    return cast("tifffile.TiffPage", tf.pages[0])


def _tiff_palette(page: Any) -> np.ndarray | None:
    if int(getattr(page, "photometric", 0)) != 3:
        return None
    cmap = page.colormap
    if cmap is None:
        return None
    cmap = np.asarray(cmap)
    scale = 257 if cmap.max() > 255 else 1
    return (cmap.T // scale).astype(np.uint8)


def _tiff_alpha_band(page: Any, bands: int) -> int | None:
    """Index of the alpha band of a TIFF page, or ``None``.

    The last band is alpha only when the ExtraSamples tag says associated (1) or unassociated (2)
    alpha; an unspecified extra sample (0), or none declared, is a data band (GDAL's colour
    interpretation agrees: ``undefined``, not ``alpha``).
    """
    extra: Sequence[int] = getattr(page, "extrasamples", ()) or ()
    if bands in (2, 4) and len(extra) > 0 and int(extra[-1]) in (1, 2):
        return bands - 1
    return None


_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4,
                    16: 8, 17: 8, 18: 8}
"""Bytes per value of the TIFF field types (BYTE ... IFD8)."""

_TRUNCATED = "copy or export it again"


def _tiff_pages(tf: Any) -> list[Any]:
    """Every IFD whose pixels may be read: the main pages and the pyramid levels of the first series."""
    pages = list(tf.pages)
    seen = {id(p) for p in pages}
    try:
        levels = tf.series[0].levels[1:] if tf.series else []
    except Exception:  # noqa: BLE001 - a damaged series: the main pages are checked anyway
        levels = []
    for lvl in levels:
        for p in lvl.pages:
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                pages.append(p)
    return pages


def _ifd_value_past_end(tf: Any, page: Any, size: int) -> str | None:
    """Name of the first tag of ``page``'s IFD whose value lies (partly) past ``size``, or ``None``.

    tifffile drops such tags with a log line ("invalid value offset") and goes on with defaults:
    the page then reads as something else (no tile offsets: all zeros; no BitsPerSample: bits).
    The IFD entries are read raw here to see every declared tag.
    """
    offset = getattr(page, "offset", None)
    if not offset or getattr(tf, "is_ndpi", False):
        return None
    big = bool(tf.is_bigtiff)
    order = tf.byteorder
    # IFD: entry count, then entries of (code H, type H, count, value or offset); count and value are
    # 4 bytes in classic TIFF, 8 in BigTIFF
    count_fmt, entry_size, value_fmt, inline = (("Q", 20, "Q", 8) if big else ("H", 12, "I", 4))
    fh = tf.filehandle
    with fh.lock:
        pos = fh.tell()
        try:
            fh.seek(offset)
            raw = fh.read(8 if big else 2)
            if len(raw) < (8 if big else 2):
                return "IFD"
            (n,) = struct.unpack(order + count_fmt, raw)
            if n > 100_000:
                return None  # not a plausible IFD: tifffile has judged it already
            table = fh.read(n * entry_size)
        finally:
            fh.seek(pos)
    if len(table) < n * entry_size:
        return "IFD"
    for i in range(n):
        entry = table[i * entry_size : (i + 1) * entry_size]
        code, typ = struct.unpack(order + "HH", entry[:4])
        (count,) = struct.unpack(order + value_fmt, entry[4 : 4 + inline])
        nbytes = _TIFF_TYPE_SIZES.get(typ, 0) * count
        if nbytes <= inline:
            continue
        (where,) = struct.unpack(order + value_fmt, entry[4 + inline : 4 + 2 * inline])
        if where + nbytes > size:
            try:
                import tifffile

                return str(tifffile.TIFF.TAGS.get(code, code))
            except Exception:  # noqa: BLE001 - only for the message
                return str(code)
    return None


def _check_tiff_layout(tf: Any, path: str) -> None:
    """Fail on a truncated or damaged TIFF before anything reads it as zeros.

    A cut file loses the values of its last tags and its last chunks. tifffile and GDAL both go
    on with what is left (missing tile offsets become empty chunks read as zeros), so every
    page is checked here: every IFD entry's value lies inside the file, the TileOffsets /
    StripOffsets and byte-count tags are present and list exactly the number of chunks the
    page's size and tiling or strip layout need (tiles across x down x planes, or strips x
    planes), and every chunk's byte range lies inside the file.

    Raises:
        InputError: ``TIFF is truncated ...; copy or export it again``.
    """
    size = int(tf.filehandle.size)
    for index, page in enumerate(_tiff_pages(tf)):
        where = f"page {index}" if index else "the image"
        key = getattr(page, "keyframe", None) or page
        tags = getattr(page, "tags", None)  # None for a TiffFrame (a page sharing its keyframe's tags)
        cut = _ifd_value_past_end(tf, page, size)
        if cut is not None:
            raise InputError(f"{path}: TIFF is truncated (the {cut} tag of {where} ends past the end of "
                             f"the file, {size} bytes); {_TRUNCATED}")
        if getattr(tf, "is_lsm", False) or getattr(key, "is_lsm", False):
            continue  # LSM strip tags are known to be off; tifffile repairs them
        tiled = bool(key.is_tiled)
        unit = "tile" if tiled else "strip"
        if tags is not None:
            off_code, cnt_code = (324, 325) if tiled else (273, 279)
            if off_code not in tags and not tiled and 513 in tags:
                continue  # old-style JPEG: one JPEGInterchangeFormat stream, not chunks
            if off_code not in tags or cnt_code not in tags:
                name = "TileOffsets/TileByteCounts" if tiled else "StripOffsets/StripByteCounts"
                raise InputError(f"{path}: TIFF is truncated or damaged ({where} has no {name} tags, so its "
                                 f"pixels cannot be found); {_TRUNCATED}")
            if not tiled and 324 in tags:
                raise InputError(f"{path}: TIFF is truncated or damaged ({where} lists tile offsets but no "
                                 f"tile size); {_TRUNCATED}")
            declared = (int(tags[off_code].count), int(tags[cnt_code].count))
        else:
            declared = (len(page.dataoffsets), len(page.databytecounts))
        try:
            expected = int(np.prod(key.chunked))
        except Exception as exc:  # noqa: BLE001 - e.g. RowsPerStrip 0
            raise InputError(f"{path}: TIFF is damaged ({_short(exc)}); {_TRUNCATED}") from exc
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        if declared != (expected, expected) or offsets.size != expected or counts.size != expected:
            h, w = int(key.imagelength), int(key.imagewidth)
            layout = (f"{int(key.tilewidth)}x{int(key.tilelength)} tiles" if tiled else
                      f"strips of {int(key.rowsperstrip)} rows")
            planes = int(key.samplesperpixel) if int(key.planarconfig) == 2 and key.samplesperpixel > 1 else 1
            need = f"{expected} ({planes} planes)" if planes > 1 else str(expected)
            raise InputError(f"{path}: TIFF is truncated or damaged ({where} lists {min(declared)} {unit} "
                             f"offsets; its {w}x{h} px in {layout} need {need}); {_TRUNCATED}")
        if offsets.size and int((offsets + counts).max()) > size:
            raise InputError(f"{path}: TIFF is truncated (image data ends past the end of the file, "
                             f"{size} bytes); {_TRUNCATED}")
        if offsets.size and (counts == 0).any() and page.compression != 1:
            raise InputError(f"{path}: TIFF has empty data chunks; the file is incomplete: export it again")


def tiff_is_georeferenced(path: str) -> bool:
    """Whether a TIFF carries GeoTIFF tags (then rasterio reads it)."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        tags = _first_page(tf).tags
        return any(t in tags for t in GEOTIFF_TAGS)


# ---------------------------------------------------------------------------
# rasterio / GDAL
# ---------------------------------------------------------------------------


class RasterioReader(Reader):
    """GeoTIFF / COG and other GDAL rasters, window by window, overviews as levels."""

    backend = "rasterio"

    def __init__(self, path: str) -> None:
        import rasterio
        from rasterio.enums import ColorInterp

        super().__init__(path)
        route_libtiff_messages()
        try:
            with gdal_env():
                self._ds = rasterio.open(path)
        except Exception as exc:
            raise InputError(f"{path}: cannot open ({_short(exc)}); check that it is a valid raster") from exc
        ds = self._ds
        self.shape = (ds.height, ds.width)
        self.bands = ds.count
        self.dtype = np.dtype(ds.dtypes[0])
        if ds.crs is not None or not ds.transform.is_identity:
            t = ds.transform
            self.georef = Georef(ds.crs.to_wkt() if ds.crs else None, (t.a, t.b, t.c, t.d, t.e, t.f))
        ovr = ds.overviews(1) if ds.count else []
        self.level_shapes = [self.shape] + [(-(-ds.height // f), -(-ds.width // f)) for f in ovr]
        self._levels: dict[int, Any] = {0: ds}
        bh, bw = ds.block_shapes[0] if ds.block_shapes else (ds.height, ds.width)
        self.chunk_shape = (int(bh), int(bw))
        interp = list(ds.colorinterp)
        if ColorInterp.alpha in interp:
            self.alpha_band = interp.index(ColorInterp.alpha)
        if ColorInterp.palette in interp[:1]:
            try:
                cmap = ds.colormap(1)
                n = max(cmap) + 1
                pal = np.zeros((n, 3), np.uint8)
                for k, v in cmap.items():
                    pal[k] = v[:3]
                self.palette = pal
            except ValueError:
                self.palette = None

    def _dataset(self, level: int) -> Any:
        import rasterio

        ds = self._levels.get(level)
        if ds is None:
            with gdal_env():
                ds = rasterio.open(self.path, overview_level=level - 1)
            self._levels[level] = ds
        return ds

    def _read(self, window: Window, level: int) -> np.ndarray:
        from rasterio.errors import RasterioIOError
        from rasterio.windows import Window as RWindow

        ds = self._dataset(level)
        try:
            # inside a rasterio environment GDAL's messages go to the ``rasterio`` loggers, not bare on stderr
            with gdal_env():
                data = ds.read(window=RWindow(window.col, window.row, window.width, window.height))
        except RasterioIOError as exc:
            raise _gdal_read_error(exc) from exc
        return np.ascontiguousarray(np.transpose(data, (1, 2, 0)))

    def close(self) -> None:
        """Close every opened level."""
        with gdal_env():
            for ds in self._levels.values():
                ds.close()
        self._levels.clear()


def gdal_env() -> Any:
    """A rasterio environment unless one is active (``rasterio.env.env_ctx_if_needed``).

    GDAL reports problems through its error handler; outside a rasterio environment that is GDAL's
    default one, which prints ``Warning 1: ...`` / ``ERROR 1: ...`` bare on stderr. Inside one the
    messages go to the ``rasterio`` loggers (shown with ``-v``) and errors become exceptions.
    """
    from rasterio.env import env_ctx_if_needed

    return env_ctx_if_needed()


def gdal_message(exc: BaseException) -> str:
    """The most specific text of a rasterio exception chain (GDAL's own message, not "see previous")."""
    texts = [_short(e) for e in exception_chain(exc) if str(e).strip()]
    useful = [t for t in texts if "See previous exception" not in t]
    return (useful or texts or [type(exc).__name__])[-1]


def _gdal_read_error(exc: BaseException) -> Exception:
    """A failed GDAL read as the error :meth:`Reader.read` reports: storage (``OSError``) or data."""
    text = gdal_message(exc)
    if any(type(e).__name__ == "CPLE_FileIOError" for e in exception_chain(exc)):
        return OSError(text)
    return ValueError(text)


_LIBTIFF: dict[str, Any] = {}
LIBTIFF_MESSAGES: deque[tuple[int, str]] = deque(maxlen=64)
"""``(sequence number, text)`` of the latest errors libtiff reported outside GDAL's handler
(``_tiffWriteProc: No space left on device``)."""
_LIBTIFF_SEQ = [0]


def libtiff_seq() -> int:
    """Sequence number of the latest libtiff error (take it before an operation)."""
    return _LIBTIFF_SEQ[0]


def libtiff_messages_since(seq: int) -> list[str]:
    """Libtiff's error texts after :func:`libtiff_seq` returned ``seq`` (any thread)."""
    return [text for n, text in list(LIBTIFF_MESSAGES) if n > seq]


def route_libtiff_messages() -> None:
    """Route what GDAL's libtiff prints straight to stderr through logging (once per process).

    GDAL's file-access callbacks (``_tiffWriteProc``, ``_tiffSeekProc``) report I/O failures through
    libtiff's process-wide handler, whose default prints ``_tiffWriteProc: No space left on device.``
    on file descriptor 2, beside refine's one-line error. The handler is replaced by one that logs
    to ``rasterio.libtiff`` (shown with ``-v``) and keeps the text in :data:`LIBTIFF_MESSAGES`, so
    an error can name the cause. Best effort: without a findable libtiff nothing changes. Only on
    Linux x86-64, where a C ``va_list`` argument is passed as a pointer (the handler hands it to
    ``vsnprintf`` as one); elsewhere libtiff's lines stay as they are.
    """
    if _LIBTIFF:
        return
    _LIBTIFF["tried"] = True
    import platform

    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return
    try:
        import ctypes

        import rasterio  # noqa: F401 - loads GDAL and its libtiff

        libs = _loaded_libtiffs()
        if not libs:
            return
        libc = ctypes.CDLL(None)
        vsnprintf = libc.vsnprintf
        vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
        handler_t = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)
        tiff_log = logging.getLogger("rasterio.libtiff")

        def make(level: int, keep: bool) -> Any:
            def handler(module: bytes | None, fmt: bytes | None, args: int | None) -> None:
                try:
                    buf = ctypes.create_string_buffer(2048)
                    vsnprintf(buf, len(buf), fmt or b"", args)
                    text = buf.value.decode("utf-8", "replace")
                    if module:
                        text = f"{module.decode('utf-8', 'replace')}: {text}"
                    if keep:
                        _LIBTIFF_SEQ[0] += 1
                        LIBTIFF_MESSAGES.append((_LIBTIFF_SEQ[0], text))
                    tiff_log.log(level, "%s", text)
                except Exception:  # noqa: BLE001,S110 - never raise into C
                    pass

            return handler_t(handler)

        on_error, on_warning = make(logging.WARNING, True), make(logging.DEBUG, False)
        _LIBTIFF["callbacks"] = (on_error, on_warning)  # keep them alive
        _LIBTIFF["libs"] = []
        for path in libs:
            lib = ctypes.CDLL(path)
            lib.TIFFSetErrorHandler.restype = ctypes.c_void_p
            lib.TIFFSetErrorHandler.argtypes = [ctypes.c_void_p]
            lib.TIFFSetWarningHandler.restype = ctypes.c_void_p
            lib.TIFFSetWarningHandler.argtypes = [ctypes.c_void_p]
            lib.TIFFSetErrorHandler(ctypes.cast(on_error, ctypes.c_void_p))
            lib.TIFFSetWarningHandler(ctypes.cast(on_warning, ctypes.c_void_p))
            _LIBTIFF["libs"].append(lib)
        import atexit

        atexit.register(_silence_libtiff)
    except Exception as exc:  # noqa: BLE001 - cosmetic: stderr lines stay as they are
        log.debug("libtiff messages not routed (%s)", exc)


def _silence_libtiff() -> None:
    """At exit, before the Python callbacks go away: no handler (libtiff then prints nothing)."""
    for lib in _LIBTIFF.get("libs", []):
        try:
            lib.TIFFSetErrorHandler(None)
            lib.TIFFSetWarningHandler(None)
        except Exception:  # noqa: BLE001,S110 - best effort at exit
            pass


def _loaded_libtiffs() -> list[str]:
    """Paths of the libtiff shared libraries mapped into this process (Linux), or rasterio's bundled one."""
    found: list[str] = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                path = line.rsplit(None, 1)[-1] if "/" in line else ""
                name = os.path.basename(path)
                if name.startswith("libtiff") and ".so" in name and path not in found:
                    found.append(path)
    except OSError:
        import glob

        import rasterio

        base = os.path.dirname(os.path.dirname(rasterio.__file__))
        for pattern in ("rasterio.libs/libtiff*", "rasterio/.dylibs/libtiff*"):
            found.extend(glob.glob(os.path.join(base, pattern)))
    return found


# ---------------------------------------------------------------------------
# Opening
# ---------------------------------------------------------------------------


def check_readable(path: str | Path, what: str = "image", flag: str | None = None) -> Path:
    """Fail with a clear message when ``path`` cannot be opened as a file.

    Args:
        path: the file.
        what: what it is, for messages (``image``, ``mask``, ``ground truth`` ...).
        flag: the option or argument that gave it (default ``--mask`` for masks, else ``what``).

    Returns:
        The path.
    """
    p = Path(path)
    flag = flag or ("--mask" if what == "mask" else what)
    if not p.exists():
        raise InputError(f"{what} not found: {p} (check the path given as {flag})")
    if p.is_dir():
        hint = f"refine batch IMAGES --mask-dir {p}" if what == "mask" else f"refine batch {p}"
        raise InputError(f"{what} {p} is a directory, not a file; for many files use `{hint}`")
    if not stat.S_ISREG(p.stat().st_mode):
        raise InputError(f"{what} {p} is not a regular file")
    if not os.access(p, os.R_OK):
        raise InputError(f"{what} {p} is not readable: check its permissions (chmod +r)")
    if p.stat().st_size == 0:
        raise InputError(f"{what} {p} is empty (0 bytes)")
    return p


def check_pixels(path: str, size: tuple[int, int], max_pixels: int) -> None:
    """Reject images declaring more than ``max_pixels`` before anything is allocated."""
    h, w = size
    if h <= 0 or w <= 0:
        raise InputError(f"{path}: declares an empty image ({h}x{w})")
    if h * w > max_pixels:
        raise InputError(
            f"{path}: declares {w}x{h} = {h * w / 1e9:.1f} gigapixels, above the limit of "
            f"{max_pixels / 1e9:.1f} (decompression-bomb guard); if this is intended, raise --max-pixels"
        )


def open_raster(source: str | Path | bytes, *, max_pixels: int, inline_limit: int,
                tmp_dir: str | None = None, what: str = "image", memory_limit: int | None = None,
                flag: str | None = None) -> Reader:
    """Open an image or mask with the backend that fits it.

    Args:
        source: a path, or the file's bytes (e.g. read from stdin), or ``-``.
        max_pixels: decompression-bomb limit on declared pixels.
        inline_limit: formats without windowed reads are kept in memory up to
            this many pixels, above it converted once to a tiled temporary TIFF.
        tmp_dir: where such temporary files go (default: the system temp dir).
        what: ``image`` or ``mask``, for messages.
        memory_limit: bytes a TIFF that must be decoded at once (a few huge strips) may take;
            ``None``: the memory available when it is opened.
        flag: the option or argument that named ``source``, for messages (see :func:`check_readable`).

    Returns:
        An open :class:`Reader` (close it, or use it as a context manager).

    Raises:
        InputError: missing, unreadable, truncated or damaged file.
        ResourceError: a TIFF in huge strips that does not fit ``memory_limit`` decoded.
    """
    if isinstance(source, str | Path) and str(source) == "-":
        source = sys.stdin.buffer.read()
        if not source:
            raise InputError(f"no {what} data on stdin")
    if isinstance(source, bytes):
        reader = _open_bytes(source, max_pixels=max_pixels, inline_limit=inline_limit, tmp_dir=tmp_dir,
                             what=what, memory_limit=memory_limit)
        _note_extra_band(reader, what)
        return reader
    if isinstance(source, str) and source.startswith("file://"):
        source = source[len("file://"):]
    if isinstance(source, str) and is_remote(source):
        return _open_remote(source, max_pixels, what)
    path = check_readable(source, what, flag)
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    kind = sniff(head)
    name = str(path)
    if kind.kind == "tiff":
        reader = _open_tiff(name, max_pixels=max_pixels, inline_limit=inline_limit, tmp_dir=tmp_dir,
                            memory_limit=memory_limit)
        _note_extra_band(reader, what)
        return reader
    if kind.kind in ("png", "jpeg", "webp", "bmp"):
        if kind.size is None:
            raise InputError(
                f"{name}: {kind.kind.upper()} header is damaged (no image size); export it again"
            )
        check_pixels(name, kind.size, max_pixels)
        arr, palette = _decode(name, kind.kind, path=name, head=head)
        return _inline_or_cache(name, arr, inline_limit=inline_limit, tmp_dir=tmp_dir, palette=palette,
                                alpha_band=_decoded_alpha(arr, palette))
    # Anything else: let GDAL try (JPEG 2000, VRT, ...).
    try:
        reader = RasterioReader(name)
    except InputError:
        raise InputError(
            f"{name}: not a recognised image format (TIFF, PNG, JPEG, WebP or a GDAL raster)"
        ) from None
    check_pixels(name, reader.shape, max_pixels)
    _note_extra_band(reader, what)
    return reader


def is_remote(path: str) -> bool:
    """Whether GDAL opens ``path`` itself.

    A ``/vsi...`` path, or a URL (``s3://``, ``https://``, ``zip+file://`` ...) other than ``file://``.
    """
    return path.startswith("/vsi") or bool(re.match(r"^[a-z][a-z0-9+.\-]*://", path)) and \
        not path.startswith("file://")


def _open_remote(path: str, max_pixels: int, what: str) -> Reader:
    """A GDAL path or URL through rasterio (windowed reads; GDAL fetches only the blocks it needs)."""
    try:
        reader = RasterioReader(path)
    except InputError as exc:
        raise InputError(f"{what} {path}: GDAL cannot open it ({exc}); check the URL and its credentials "
                         "(AWS_*, GDAL_HTTP_* environment variables)") from None
    check_pixels(path, reader.shape, max_pixels)
    _note_extra_band(reader, what)
    return reader


def _note_extra_band(reader: Reader, what: str) -> None:
    """One info line for an image whose 2nd or 4th band is data, not alpha (it is not used)."""
    if what == "image" and reader.bands in (2, 4) and reader.alpha_band is None and reader.palette is None:
        used = "band 1 as grey" if reader.bands == 2 else "bands 1-3 as RGB"
        log.info("%s: band %d is not marked as alpha; using %s, band %d is ignored (choose others with "
                 "--bands)", reader.path, reader.bands, used, reader.bands)


def _decoded_alpha(arr: np.ndarray, palette: np.ndarray | None) -> int | None:
    """OpenCV returns 2 or 4 channels only for grey+alpha / RGBA files: the last one is alpha."""
    if palette is None and arr.ndim == 3 and arr.shape[2] in (2, 4):
        return int(arr.shape[2]) - 1
    return None


def available_memory() -> int | None:
    """Bytes of memory available to this process now (``None`` when unknown)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported platform
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB`` (binary units)."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _too_big_to_decode(path: str, size: tuple[int, int], n_chunks: int, need: int,
                       limit: int | None) -> ResourceError:
    stem = Path(path).stem if path != "-" else "image"
    have = f"{human_bytes(limit)} available" if limit is not None else "more than is available"
    return ResourceError(
        f"{path}: too big to decode at once ({size[1]}x{size[0]} px stored in {n_chunks} "
        f"strip{'s' if n_chunks != 1 else ''}; decoding needs {human_bytes(need)}, {have}): re-tile it and "
        f"run on the copy: gdal_translate -co TILED=YES -co COMPRESS=DEFLATE {path} {stem}.tiled.tif"
    )


def _says_too_big(exc: BaseException) -> bool:
    """An error that is about the size (``array is too big``), not about damaged data."""
    text = str(exc).lower()
    return isinstance(exc, (ValueError, OverflowError)) and ("too big" in text or "too large" in text)


def _open_tiff(path: str, *, max_pixels: int, inline_limit: int, tmp_dir: str | None,
               memory_limit: int | None = None) -> Reader:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            if not tf.series or not tf.pages:
                raise InputError(f"{path}: TIFF holds no image")
            series = tf.series[0]
            axes = series.axes
            if "Y" not in axes or "X" not in axes:
                raise InputError(f"{path}: TIFF series has axes {axes!r}; not an image")
            size = (int(series.shape[axes.index("Y")]), int(series.shape[axes.index("X")]))
            page = _first_page(tf)
            check_pixels(path, size, max_pixels)
            # every path below (tifffile, GDAL, decode once) would read missing chunks as zeros
            _check_tiff_layout(tf, path)
            georef = any(t in page.tags for t in GEOTIFF_TAGS)
            chunk_bytes = _largest_chunk_bytes(page)
            decoded_bytes = int(np.prod(series.shape, dtype=np.int64)) * np.dtype(series.dtype).itemsize
            n_chunks = len(page.dataoffsets)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"{path}: not a readable TIFF ({_short(exc)}); the file is corrupt or truncated"
        ) from exc
    if georef:
        return RasterioReader(path)
    if chunk_bytes <= MAX_STREAM_CHUNK_BYTES:
        return TiffReader(path)
    # A TIFF stored as a few huge strips: decode once, if that fits.
    limit = memory_limit if memory_limit is not None else available_memory()
    need = decoded_bytes + chunk_bytes
    if limit is not None and need > limit:
        raise _too_big_to_decode(path, size, n_chunks, need, limit)
    log.info("%s: stored in %.0f MB strips; decoding it once", path, chunk_bytes / 1e6)
    try:
        arr = tifffile.imread(path)
    except MemoryError:
        raise _too_big_to_decode(path, size, n_chunks, need, limit) from None
    except Exception as exc:
        if _says_too_big(exc):  # numpy / the codec refusing the size, not damaged data
            raise _too_big_to_decode(path, size, n_chunks, need, limit) from exc
        raise InputError(
            f"{path}: cannot decode TIFF ({_short(exc)}); the file is corrupt or truncated"
        ) from exc
    reader = TiffReader(path)  # for the metadata only
    perm, squeeze = reader._axes_perm, reader._squeeze
    palette, alpha = reader.palette, reader.alpha_band
    reader.close()
    arr = _as_yxc(np.asarray(arr), perm, squeeze)
    return _inline_or_cache(path, arr, inline_limit=inline_limit, tmp_dir=tmp_dir, palette=palette,
                            alpha_band=alpha)


def _largest_chunk_bytes(page: Any) -> int:
    if page.is_tiled:
        rows, cols = page.tilelength, page.tilewidth
    else:
        rows, cols = min(page.rowsperstrip or page.imagelength, page.imagelength), page.imagewidth
    return int(rows) * int(cols) * int(page.samplesperpixel) * int(np.dtype(page.dtype).itemsize)


_FD2_LOCK = threading.Lock()


@contextmanager
def _native_stderr() -> Iterator[list[str]]:
    """Collect what C libraries print on file descriptor 2 during the block.

    libpng and libjpeg report damaged data by printing to stderr (``libpng error: ...``,
    ``Premature end of JPEG file``), which would add lines to refine's one-line errors. The
    lines are in the yielded list after the block. Output of other threads in that window is
    collected too, so callers that do not turn the lines into an error write them back.
    """
    lines: list[str] = []
    with _FD2_LOCK, tempfile.TemporaryFile() as tmp:
        if sys.stderr is not None:
            sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(ln for ln in tmp.read().decode("utf-8", "replace").splitlines() if ln.strip())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png_index_stream(data: bytes) -> tuple[np.ndarray, bytes] | None:
    """For a palette PNG (colour type 3): its colour table and a stream that decodes to the indices.

    OpenCV always expands palettes to colours. The returned stream keeps IHDR and IDAT and
    replaces PLTE by entry ``i`` = ``(i, 0, 0)`` (other chunks, tRNS included, are dropped), so
    its red channel is the exact index of every pixel.

    Returns:
        ``((N, 3) uint8 palette, PNG bytes)``, or ``None`` when not a well-formed palette PNG.
    """
    if len(data) < 33 or data[12:16] != b"IHDR" or data[25] != 3:
        return None
    pos, keep, palette = 8, [data[:8]], None
    while pos + 12 <= len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if len(body) < n:
            return None
        if kind == b"PLTE":
            if n % 3 or n == 0:
                return None
            palette = np.frombuffer(body, np.uint8).reshape(-1, 3).copy()
            keep.append(_png_chunk(b"PLTE", bytes(v for i in range(n // 3) for v in (i, 0, 0))))
        elif kind in (b"IHDR", b"IDAT", b"IEND"):
            keep.append(data[pos:pos + 12 + n])
        pos += 12 + n
        if kind == b"IEND":
            break
    return None if palette is None else (palette, b"".join(keep))


def _decode(name: str, kind: str, *, path: str | None = None, head: bytes = b"", data: bytes | None = None,
            indices: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode a PNG/JPEG/WebP/BMP file (``path``) or its bytes (``data``) as image viewers show it.

    The pixels are decoded as stored (:func:`_decode_pixels`), then turned by the file's EXIF
    orientation (tags 1-8 of a JPEG APP1 segment, a PNG ``eXIf`` chunk or a WebP ``EXIF`` chunk),
    as viewers do: a phone photo stored sideways comes out upright, with the size it is shown at.

    Returns:
        ``(array, palette)`` as :func:`_decode_pixels`, oriented.
    """
    arr, palette = _decode_pixels(name, kind, path=path, head=head, data=data, indices=indices)
    try:
        if data is not None:
            orientation = exif_orientation(kind, _io.BytesIO(data))
        else:
            with open(str(path), "rb") as fh:
                orientation = exif_orientation(kind, fh)
    except OSError:
        orientation = 1
    if orientation != 1:
        stored = arr.shape
        arr = apply_orientation(arr, orientation)
        log.info("%s: EXIF orientation %d applied (%s): stored %dx%d, used as shown, %dx%d", name,
                 orientation, ORIENTATIONS[orientation], stored[1], stored[0], arr.shape[1], arr.shape[0])
    return arr, palette


ORIENTATIONS = {1: "as stored", 2: "mirrored left-right", 3: "rotated 180 degrees", 4: "mirrored top-bottom",
                5: "transposed", 6: "rotated 90 degrees clockwise", 7: "transversed",
                8: "rotated 90 degrees counter-clockwise"}
"""What EXIF orientation ``n`` does to the stored pixels to show them."""


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels as EXIF ``orientation`` (1-8) says viewers show them.

    Args:
        arr: ``(H, W)`` or ``(H, W, C)`` pixels as stored, any dtype.
        orientation: EXIF Orientation value; anything outside 2-8 leaves ``arr`` unchanged.

    Returns:
        The shown pixels, C-contiguous: ``(H, W[, C])`` for 1-4, ``(W, H[, C])`` for 5-8.
    """
    if orientation == 2:
        out = arr[:, ::-1]
    elif orientation == 3:
        out = arr[::-1, ::-1]
    elif orientation == 4:
        out = arr[::-1]
    elif orientation == 5:
        out = arr.swapaxes(0, 1)
    elif orientation == 6:
        out = arr.swapaxes(0, 1)[:, ::-1]
    elif orientation == 7:
        out = arr[::-1, ::-1].swapaxes(0, 1)
    elif orientation == 8:
        out = arr.swapaxes(0, 1)[::-1]
    else:
        return arr
    return np.ascontiguousarray(out)


def _decode_pixels(name: str, kind: str, *, path: str | None = None, head: bytes = b"",
                   data: bytes | None = None, indices: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode a PNG/JPEG/WebP/BMP file (``path``) or its bytes (``data``) with OpenCV, as stored.

    Damaged data (what the decoder reports, including a JPEG that ends early, which OpenCV
    would return grey-filled) raises one :class:`InputError`; the decoder's own stderr lines
    go into its message.

    Returns:
        ``(array, palette)``: ``(H, W)``, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA in the file's
        dtype and ``None``; for a palette PNG the ``(H, W)`` uint8 indices and the ``(N, 3)``
        uint8 colour table.
    """
    indexed = None
    if indices and kind == "png" and (data or head)[25:26] == b"\x03":
        if data is None:
            data = Path(str(path)).read_bytes()
        indexed = _png_index_stream(data)
    source = indexed[1] if indexed is not None else data
    error = None
    with _native_stderr() as said:
        try:
            if source is None:
                arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            else:
                arr = cv2.imdecode(np.frombuffer(source, np.uint8), cv2.IMREAD_UNCHANGED)
        except cv2.error as exc:
            arr, error = None, _short(exc)
    if arr is None or any("Premature end" in ln for ln in said):
        detail = error or "; ".join(said)
        because = f" ({_short(detail)})" if detail else ""
        raise InputError(f"{name}: cannot decode {kind.upper()}{because}; the file is corrupt or truncated: "
                         "export it again")
    if said:  # warnings of a good decode: pass them on as the decoder printed them
        os.write(2, ("\n".join(said) + "\n").encode())
    if indexed is not None:
        if arr.ndim == 3 and arr.shape[2] == 3 and not arr[..., :2].any():
            return np.ascontiguousarray(arr[..., 2]), indexed[0]
        log.debug("%s: palette indices not recovered; using the colours", name)
        return _decode_pixels(name, kind, data=data, indices=False)
    return _cv2_to_rgb(arr), None


def _cv2_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 3:
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    if arr.ndim == 3 and arr.shape[2] == 4:
        return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA)
    return arr


def _open_bytes(data: bytes, *, max_pixels: int, inline_limit: int, tmp_dir: str | None, what: str,
                memory_limit: int | None = None) -> Reader:
    kind = sniff(data[: 1 << 16])
    if kind.kind == "tiff":
        import tifffile

        try:
            with tifffile.TiffFile(_io.BytesIO(data)) as tf:
                s = tf.series[0]
                size = (int(s.shape[s.axes.index("Y")]), int(s.shape[s.axes.index("X")]))
                check_pixels("-", size, max_pixels)
                _check_tiff_layout(tf, "stdin")
                page = tf.pages[0]
                palette = _tiff_palette(page)
                need = int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
                limit = memory_limit if memory_limit is not None else available_memory()
                if limit is not None and need > limit:
                    raise _too_big_to_decode("stdin", size, len(page.dataoffsets), need, limit)
                try:
                    arr = np.asarray(s.asarray())
                except MemoryError:
                    raise _too_big_to_decode("stdin", size, len(page.dataoffsets), need, limit) from None
                axes = s.axes
                alpha = _tiff_alpha_band(page, _bands_of(axes, s.shape))
        except (InputError, ResourceError):
            raise
        except Exception as exc:
            raise InputError(f"stdin: not a readable TIFF ({_short(exc)}); the data is corrupt or "
                             "truncated") from exc
        arr = _as_yxc(arr, *_axes_to_yxc(axes, arr.shape, "stdin"))
        return _inline_or_cache("-", arr, inline_limit=inline_limit, tmp_dir=tmp_dir, palette=palette,
                                alpha_band=alpha)
    if kind.kind in ("png", "jpeg", "webp", "bmp"):
        if kind.size is None:
            raise InputError(f"stdin: {kind.kind.upper()} header is damaged (no image size)")
        check_pixels("-", kind.size, max_pixels)
        arr, palette = _decode("stdin", kind.kind, data=data)
        return _inline_or_cache("-", arr, inline_limit=inline_limit, tmp_dir=tmp_dir, palette=palette,
                                alpha_band=_decoded_alpha(arr, palette))
    raise InputError(f"stdin: unrecognised {what} data; pipe PNG, JPEG, WebP or TIFF bytes")


def _inline_or_cache(path: str, arr: np.ndarray, *, inline_limit: int, tmp_dir: str | None,
                     palette: np.ndarray | None = None, alpha_band: int | None = None) -> Reader:
    """Keep a decoded image in memory, or spill it once to a tiled temporary TIFF.

    Args:
        path: the image's name (for the reader and the log).
        arr: ``(H, W)`` or ``(H, W, bands)`` decoded samples.
        inline_limit: the most pixels kept in memory; a larger image is cached.
        tmp_dir: folder for the cached TIFF (default: the system temp dir).
        palette: ``(N, 3)`` uint8 colour table of a palette image.
        alpha_band: index of the alpha band, or ``None`` (set on the reader either way).
    """
    h, w = arr.shape[:2]
    if h * w <= inline_limit:
        return ArrayReader(path, arr, palette=palette, alpha_band=alpha_band)
    import tifffile

    tmp = tempfile.mkdtemp(prefix="refine-cache-", dir=tmp_dir)
    dst = os.path.join(tmp, "image.tif")
    log.info("%s: %dx%d px exceeds the inline limit; caching it as a tiled TIFF in %s", path, w, h, tmp)
    try:
        tifffile.imwrite(dst, arr, tile=(512, 512), compression="zlib", compressionargs={"level": 1},
                         bigtiff=True, photometric="rgb" if arr.ndim == 3 and arr.shape[2] in (3, 4) else
                         "minisblack", planarconfig="contig" if arr.ndim == 3 else None, metadata=None)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    del arr
    reader = TiffReader(dst, cleanup_dir=tmp)
    reader.palette = palette
    reader.alpha_band = alpha_band
    return reader


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """Parse ``--bands 1,2,3`` (1-based) into 0-based indices."""
    if not text:
        return None
    try:
        idx = tuple(int(t) - 1 for t in text.split(","))
    except ValueError:
        raise UsageError(f"--bands {text!r}: give 1-based band numbers like 1,2,3") from None
    if len(idx) not in (1, 3) or min(idx) < 0:
        raise UsageError(f"--bands {text!r}: give one or three 1-based band numbers")
    return idx
