"""Overviews of a COG built while its rows are written, in bounded memory.

GDAL's COG driver, given a plain TIFF, reads the whole image once more at the end to compute the
overviews. :class:`StreamedOverviews` reduces the rows as they arrive instead, each level from the
one above it, as GDAL does: ``nearest`` takes sample ``round(i * n_above / n)`` of the level above
in each direction (``2 i`` where a level halves exactly, GDAL's own sampling elsewhere);
``average`` takes the mean of each 2 x 2 block (rounded half up for integers, the nodata value
left out). Each level goes to its own tiled temporary TIFF. Level ``k`` (``k = 1 ..``) is
``floor(H / 2^k) x floor(W / 2^k)``, as the COG driver sizes them, down to the first level that
fits one block. :func:`overview_vrt` then describes the full-resolution file with these levels as
its overviews, so the COG driver copies them (``OVERVIEWS=FORCE_USE_EXISTING``) and computes
nothing.

Agreement with GDAL's own computation (tests): ``nearest`` gives GDAL's samples at any size;
``average`` gives GDAL's integers (float32 within 1e-4) and is streamed only where every level halves
exactly (:func:`halves_exactly`): elsewhere GDAL's averaging windows are slightly wider than 2 x 2,
and the writer leaves those overviews to GDAL's pass at commit.

Memory: one strip of ``block`` rows per level and one pending row per level, below twice the
bytes of one full-resolution strip, whatever the image height.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any
from xml.sax.saxutils import escape as xml_escape

import numpy as np

STREAMED = ("nearest", "average")
"""Overview resamplings computed while streaming (others are left to GDAL at the end)."""

_GDAL_TYPES = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
               "int32": "Int32", "float32": "Float32", "float64": "Float64"}


def level_shapes(shape: tuple[int, int], block: int) -> list[tuple[int, int]]:
    """``(h, w)`` of every overview level: halved (floor) until the level fits in one ``block`` tile.

    Args:
        shape: full-resolution ``(H, W)``.
        block: COG tile side, px.
    """
    out: list[tuple[int, int]] = []
    h, w = shape
    k = 1
    while max(h, w) > block:
        h, w = shape[0] >> k, shape[1] >> k
        if min(h, w) < 1:
            break
        out.append((h, w))
        k += 1
    return out


def halves_exactly(shape: tuple[int, int], block: int) -> bool:
    """Whether every overview level is exactly half the one above (``H`` and ``W`` multiples of ``2^levels``).

    Streamed ``average`` overviews need it: elsewhere GDAL averages over windows slightly wider than
    2 x 2 that drift across the level, and its own pass at commit is used instead.
    """
    n = len(level_shapes(shape, block))
    return shape[0] % (1 << n) == 0 and shape[1] % (1 << n) == 0


def nearest_index(size: int, above: int) -> np.ndarray:
    """Indices into a level of ``above`` samples that GDAL's nearest overview takes for ``size`` samples.

    ``round(i * above / size)`` (halves up), clipped to the last sample: ``2 i`` where the level
    halves exactly, and a slightly wider step where ``above`` is odd.
    """
    index: np.ndarray = np.floor(np.arange(size) * (above / size) + 0.5).astype(np.int64)
    np.minimum(index, above - 1, out=index)
    return index


def nearest_source(i: int, size: int, above: int) -> int:
    """Row ``i`` of a level of ``size`` rows takes row ``nearest_source(i)`` of the level above."""
    return min(int(np.floor(i * (above / size) + 0.5)), above - 1)


def reduce_pair(rows: np.ndarray, width: int, resampling: str, nodata: float | None = None) -> np.ndarray:
    """Two rows of a level to one row of the next.

    Args:
        rows: ``(2 m, W, bands)`` samples of a level.
        width: width of the next level (``W // 2``).
        resampling: ``nearest`` or ``average``.
        nodata: samples of this value are left out of an average and an average of data that
            rounds to it moves one step up (as GDAL does); a block of nothing else stays ``nodata``.

    Returns:
        ``(m, width, bands)`` of the same dtype, a new array (no view of ``rows``).
    """
    m = rows.shape[0] // 2
    if resampling == "nearest":  # a copy: a view would keep the whole strip alive while the level waits
        return np.ascontiguousarray(rows[0 : 2 * m : 2, 0 : 2 * width : 2])
    block = rows[: 2 * m, : 2 * width].reshape(m, 2, width, 2, rows.shape[2]).astype(np.float64)
    if nodata is None:
        mean = block.mean(axis=(1, 3))
    else:
        valid = ~np.isnan(block) if np.isnan(nodata) else block != nodata
        count = valid.sum(axis=(1, 3))
        total = np.where(valid, block, 0.0).sum(axis=(1, 3))
        mean = np.divide(total, count, out=np.full(total.shape, float(nodata)), where=count > 0)
    out: np.ndarray
    if rows.dtype.kind in "iu":
        info = np.iinfo(rows.dtype)
        out = np.clip(np.floor(mean + 0.5), info.min, info.max).astype(rows.dtype)
    else:
        out = mean.astype(rows.dtype)
    if nodata is not None and not np.isnan(nodata):  # an average of data is never nodata (GDAL's rule)
        clash = (count > 0) & (out == nodata)
        if clash.any():
            if rows.dtype.kind in "iu":
                out[clash] = nodata + 1 if nodata < np.iinfo(rows.dtype).max else nodata - 1
            else:
                out[clash] = np.nextafter(np.array(nodata, rows.dtype), np.array(np.inf, rows.dtype))
    return out


class _Level:
    """One overview level: a tiled temporary GeoTIFF written in strips of ``block`` rows."""

    def __init__(self, path: str, shape: tuple[int, int], bands: int, dtype: np.dtype,
                 options: Mapping[str, str], nodata: float | None, above: tuple[int, int]) -> None:
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning

        self.path, self.shape, self.bands, self.dtype = path, shape, bands, dtype
        self.above = above
        """``(h, w)`` of the level this one is reduced from."""
        self.cols = nearest_index(shape[1], above[1])
        self.seen = 0
        """Rows of the level above received so far."""
        self.block = int(options.get("BLOCKYSIZE", 512))
        with warnings.catch_warnings(), rasterio.Env():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            self.ds: Any = rasterio.open(path, "w", driver="GTiff", width=shape[1], height=shape[0],
                                         count=bands, dtype=dtype.name, nodata=nodata, **options)
        self.rows = 0
        self.pending: list[np.ndarray] = []
        self.carry: np.ndarray | None = None
        """A row of the level above waiting for its pair."""

    def made(self) -> int:
        """Rows of this level made so far (written or held)."""
        return self.rows + sum(int(p.shape[0]) for p in self.pending)

    def take_nearest(self, rows: np.ndarray) -> np.ndarray:
        """The rows of this level that the next rows of the level above hold (GDAL's nearest sampling).

        Args:
            rows: ``(n, W_above, bands)``, the rows that follow those already received.

        Returns:
            ``(m, w, bands)``, a new array (possibly empty), also written to this level.
        """
        start = self.seen
        self.seen += rows.shape[0]
        made = self.made()
        picks: list[int] = []
        while made + len(picks) < self.shape[0]:
            src = nearest_source(made + len(picks), self.shape[0], self.above[0])
            if src >= self.seen:
                break
            picks.append(src - start)
        out = rows[picks][:, self.cols]
        if picks:
            self.write(out)
        return out

    def write(self, block: np.ndarray) -> None:
        """Append rows ``(n, w, bands)``; full strips go to the file."""
        self.pending.append(block)
        held = sum(p.shape[0] for p in self.pending)
        if held >= self.block or self.rows + held == self.shape[0]:
            self.flush()

    def flush(self) -> None:
        """Write the rows held (a strip, or the last rows of the level)."""
        from rasterio.windows import Window as RWindow

        if not self.pending:
            return
        data = np.concatenate(self.pending, axis=0)
        self.pending = []
        import rasterio

        with rasterio.Env():
            self.ds.write(np.transpose(data, (2, 0, 1)),
                          window=RWindow(0, self.rows, self.shape[1], data.shape[0]))
        self.rows += data.shape[0]

    def close(self) -> None:
        """Write what is held and close the file."""
        import rasterio

        self.flush()
        with rasterio.Env():
            self.ds.close()


class StreamedOverviews:
    """Reduce full-resolution rows into the overview levels of a COG as they are written.

    Args:
        paths: one temporary file path per level (see :func:`level_shapes`).
        shape: full-resolution ``(H, W)``.
        bands: samples per pixel.
        dtype: sample type.
        block: tile side of the levels' files (the COG's ``BLOCKSIZE``).
        resampling: ``nearest`` or ``average``.
        options: GTiff creation options of the levels' files (fast, lossless).
        nodata: nodata tag, or ``None``.
    """

    def __init__(self, paths: list[str], shape: tuple[int, int], bands: int, dtype: np.dtype, block: int,
                 resampling: str, options: Mapping[str, str], nodata: float | None) -> None:
        if resampling not in STREAMED:
            raise ValueError(f"overviews by {resampling!r} are not streamed")
        self.resampling, self.nodata = resampling, nodata
        shapes = level_shapes(shape, block)
        if len(paths) != len(shapes):
            raise ValueError(f"{len(shapes)} level paths needed, got {len(paths)}")
        opts = {**options, "TILED": "YES", "BLOCKXSIZE": str(block), "BLOCKYSIZE": str(block)}
        self.levels: list[_Level] = []
        try:
            for p, s, above in zip(paths, shapes, [shape, *shapes], strict=False):
                self.levels.append(_Level(p, s, bands, np.dtype(dtype), opts, nodata, above))
        except BaseException:
            self.abort()
            raise

    def push(self, rows: np.ndarray) -> None:
        """Reduce the next full-resolution rows ``(n, W, bands)`` into every level."""
        for level in self.levels:
            if self.resampling == "nearest":
                rows = level.take_nearest(rows)
                if rows.shape[0] == 0:
                    return
                continue
            if level.carry is not None:
                rows = np.concatenate([level.carry, rows], axis=0)
                level.carry = None
            room = level.shape[0] - level.rows - sum(p.shape[0] for p in level.pending)
            m = min(rows.shape[0] // 2, room)
            if rows.shape[0] > 2 * m and m < room:
                level.carry = rows[2 * m : 2 * m + 1].copy()
            if m == 0:
                return
            rows = reduce_pair(rows[: 2 * m], level.shape[1], self.resampling, self.nodata)
            level.write(rows)

    def close(self) -> list[str]:
        """Finish every level's file.

        Returns:
            The level files, largest first.
        """
        for level in self.levels:
            level.close()
            if level.rows != level.shape[0]:
                raise ValueError(f"overview {level.path}: {level.rows} of {level.shape[0]} rows were made")
        return [lv.path for lv in self.levels]

    def abort(self) -> None:
        """Close and remove every level's file."""
        for level in self.levels:
            try:
                if not level.ds.closed:
                    level.ds.close()
            except Exception:  # noqa: BLE001 - best effort while failing
                pass
            try:
                os.unlink(level.path)
            except FileNotFoundError:
                pass


def overview_vrt(full: str, overviews: list[str], shape: tuple[int, int], bands: int, dtype: np.dtype,
                 georef: tuple[tuple[float, ...], str | None] | None, nodata: float | None) -> str:
    """The VRT text of ``full`` with ``overviews`` as its overview levels (GDAL's ``<Overview>`` elements).

    Args:
        full: full-resolution TIFF (absolute path).
        overviews: the level files, largest first (absolute paths).
        shape: ``(H, W)``.
        bands: samples per pixel.
        dtype: sample type.
        georef: ``(affine (a, b, c, d, e, f), CRS WKT or None)`` or ``None``.
        nodata: nodata tag, or ``None``.
    """
    gdal_type = _GDAL_TYPES[np.dtype(dtype).name]
    head = [f'<VRTDataset rasterXSize="{shape[1]}" rasterYSize="{shape[0]}">']
    if georef is not None:
        a, b, c, d, e, f = georef[0][:6]
        if georef[1]:
            head.append(f"  <SRS>{xml_escape(georef[1])}</SRS>")
        head.append(f"  <GeoTransform>{c!r}, {a!r}, {b!r}, {f!r}, {d!r}, {e!r}</GeoTransform>")
    for band in range(1, bands + 1):
        head.append(f'  <VRTRasterBand dataType="{gdal_type}" band="{band}">')
        if nodata is not None:
            head.append(f"    <NoDataValue>{nodata!r}</NoDataValue>")
        head.append(f"    <SimpleSource><SourceFilename>{xml_escape(full)}</SourceFilename>"
                    f"<SourceBand>{band}</SourceBand></SimpleSource>")
        for ovr in overviews:
            head.append(f"    <Overview><SourceFilename>{xml_escape(ovr)}</SourceFilename>"
                        f"<SourceBand>{band}</SourceBand></Overview>")
        head.append("  </VRTRasterBand>")
    head.append("</VRTDataset>")
    return "\n".join(head) + "\n"
