"""Raster outputs written row band by row band, atomically.

Every sink writes into a temporary file in the target directory and renames it
over the final name only in :meth:`RasterSink.commit` (after fsync), so an
interrupted run never leaves a half-written file under a final name. Existing
outputs are refused unless ``overwrite`` is set.

* ``.tif`` / ``.tiff``: tiled BigTIFF (512 px tiles, deflate + predictor),
  written through rasterio/GDAL with a small block cache, so memory does not
  grow with the image. Georeferencing of the input is copied. ``cog=True``
  rewrites the finished file as a Cloud-Optimised GeoTIFF with overviews.
* ``.png``: for outputs up to the inline limit; kept in memory and encoded at the end.
* ``-``: PNG (or TIFF) bytes on stdout, same limit.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from refine_cli.errors import OutputError, OutputExistsError, UsageError
from refine_cli.io.readers import Georef

log = logging.getLogger(__name__)

TILE = 512
TMP_SUFFIX = ".refine-tmp"
"""Every temporary output ends with this, so leftovers of killed runs can be found and removed."""

TIFF_EXTS = (".tif", ".tiff")
PNG_EXTS = (".png",)


def output_format(path: str, fmt: str | None = None) -> str:
    """``tiff`` or ``png`` from ``--format`` or the file extension (``-`` defaults to PNG)."""
    if fmt:
        f = fmt.lower()
        if f in ("tif", "tiff", "geotiff", "cog"):
            return "tiff"
        if f == "png":
            return "png"
        raise UsageError(f"--format {fmt!r}: use png or tiff")
    if path == "-":
        return "png"
    ext = Path(path).suffix.lower()
    if ext in TIFF_EXTS:
        return "tiff"
    if ext in PNG_EXTS:
        return "png"
    raise UsageError(f"cannot write {path}: masks are written as .tif/.tiff or .png (lossless); "
                     "change the extension")


def check_output(path: str, overwrite: bool) -> None:
    """Refuse an existing output without ``overwrite``, and a missing directory."""
    if path == "-":
        return
    p = Path(path)
    if p.exists() and p.is_dir():
        raise UsageError(f"output {p} is a directory; give a file name")
    if p.exists() and not overwrite:
        raise OutputExistsError(f"output {p} exists; pass --overwrite to replace it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write to {parent}: permission denied")


def temp_path_for(path: str) -> str:
    """A unique temporary name beside ``path`` (same filesystem, so rename is atomic)."""
    p = Path(path)
    return str(p.parent / f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename in it is durable (no-op where unsupported)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_replace(tmp: str, final: str, overwrite: bool) -> None:
    """fsync ``tmp``, rename it to ``final`` and fsync the directory."""
    if not overwrite and os.path.exists(final):
        raise OutputExistsError(f"output {final} appeared while running; pass --overwrite to replace it")
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def write_bytes_atomic(path: str, data: bytes, overwrite: bool = True) -> None:
    """Write a small file atomically (temp + fsync + rename)."""
    check_output(path, overwrite)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        atomic_replace(tmp, path, overwrite)
    except BaseException:
        _unlink(tmp)
        raise


def clean_stale_temps(directory: str | Path, name: str | None = None) -> list[str]:
    """Remove temporary outputs left by killed runs in ``directory``.

    Only files named by :func:`temp_path_for` whose process no longer runs (on this
    host) are removed; with ``name``, only the temporaries of that output file name.

    Returns:
        The removed paths.
    """
    removed: list[str] = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for p in d.glob(f".{glob.escape(name)}.*{TMP_SUFFIX}" if name else f".*{TMP_SUFFIX}"):
        parts = p.name.rsplit(".", 3)
        try:
            pid = int(parts[-3])
        except (ValueError, IndexError):
            continue
        if pid_alive(pid):
            continue
        _unlink(str(p))
        removed.append(str(p))
    return removed


def pid_alive(pid: int) -> bool:
    """Whether another process ``pid`` runs on this host (this process counts as not running)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class RasterSink:
    """Receives an image as consecutive full-width row blocks.

    Args:
        path: final output path (``-`` for stdout).
        shape: ``(H, W)``.
        bands: samples per pixel.
        dtype: numpy dtype of the samples.
        overwrite: replace an existing file.
    """

    def __init__(self, path: str, shape: tuple[int, int], bands: int, dtype: Any, overwrite: bool) -> None:
        self.path = path
        self.shape = (int(shape[0]), int(shape[1]))
        self.bands = int(bands)
        self.dtype = np.dtype(dtype)
        self.overwrite = overwrite
        self.next_row = 0
        self.closed = False

    def _check_block(self, row0: int, block: np.ndarray) -> np.ndarray:
        if row0 != self.next_row:
            raise ValueError(f"rows must arrive in order: expected row {self.next_row}, got {row0}")
        if block.ndim == 2:
            block = block[:, :, None]
        if block.shape[1] != self.shape[1] or block.shape[2] != self.bands:
            raise ValueError(f"block of shape {block.shape} does not fit {self.shape} x {self.bands}")
        self.next_row += block.shape[0]
        return block.astype(self.dtype, copy=False)

    def write_rows(self, row0: int, block: np.ndarray) -> None:
        """Write rows ``row0 .. row0 + n`` (``(n, W)`` or ``(n, W, bands)``)."""
        raise NotImplementedError

    def commit(self) -> None:
        """Finish the file and move it to its final name."""
        raise NotImplementedError

    def abort(self) -> None:
        """Drop everything written; no file remains."""
        raise NotImplementedError


class TiffSink(RasterSink):
    """Tiled (Geo)TIFF through rasterio, written in block-aligned row strips.

    Args:
        georef: georeferencing to copy, or ``None``.
        cog: rewrite as a Cloud-Optimised GeoTIFF with overviews at commit.
        resampling: overview resampling for COG (``nearest`` for masks, ``average`` for soft maps).
    """

    def __init__(self, path: str, shape: tuple[int, int], bands: int, dtype: Any, overwrite: bool,
                 georef: Georef | None = None, cog: bool = False, resampling: str = "nearest") -> None:
        import rasterio
        from rasterio.transform import Affine

        super().__init__(path, shape, bands, dtype, overwrite)
        self.cog = cog
        self.resampling = resampling
        self.tmp = temp_path_for(path)
        profile: dict[str, Any] = dict(
            driver="GTiff", width=self.shape[1], height=self.shape[0], count=self.bands, dtype=self.dtype.name,
            tiled=True, blockxsize=TILE, blockysize=TILE, compress="deflate", zlevel=6,
            predictor=3 if self.dtype.kind == "f" else 2, bigtiff="YES", interleave="pixel",
        )
        if georef is not None:
            profile["transform"] = Affine(*georef.transform)
            if georef.crs_wkt:
                profile["crs"] = rasterio.crs.CRS.from_wkt(georef.crs_wkt)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                self._ds = rasterio.open(self.tmp, "w", **profile)
        except Exception as exc:
            _unlink(self.tmp)
            raise OutputError(f"cannot create {path} ({exc})") from exc
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._pending_start = 0

    def write_rows(self, row0: int, block: np.ndarray) -> None:
        """Buffer rows and write whole 512-row strips (the last strip may be shorter)."""
        block = self._check_block(row0, block)
        if not self._pending:
            self._pending_start = row0
        self._pending.append(block)
        self._pending_rows += block.shape[0]
        end = self._pending_start + self._pending_rows
        aligned = (end // TILE) * TILE if end < self.shape[0] else end
        if aligned > self._pending_start:
            self._flush(aligned)

    def _flush(self, until: int) -> None:
        from rasterio.windows import Window as RWindow

        data = np.concatenate(self._pending, axis=0) if len(self._pending) > 1 else self._pending[0]
        n = until - self._pending_start
        try:
            self._ds.write(np.transpose(data[:n], (2, 0, 1)),
                           window=RWindow(0, self._pending_start, self.shape[1], n))
        except Exception as exc:
            raise OutputError(f"writing {self.path} failed ({exc}); check free disk space") from exc
        rest = data[n:]
        self._pending = [rest] if rest.shape[0] else []
        self._pending_rows = rest.shape[0]
        self._pending_start = until

    def commit(self) -> None:
        """Close, optionally convert to COG, and rename into place."""
        if self.next_row != self.shape[0]:
            raise ValueError(f"{self.path}: only {self.next_row} of {self.shape[0]} rows were written")
        try:
            if self._pending:
                self._flush(self._pending_start + self._pending_rows)
            self._ds.close()
            src = self.tmp
            if self.cog:
                src = self._to_cog()
            atomic_replace(src, self.path, self.overwrite)
        except OSError as exc:
            self.abort()
            if isinstance(exc, OutputExistsError):
                raise
            raise OutputError(f"writing {self.path} failed ({exc}); check free disk space") from exc
        except Exception as exc:
            self.abort()
            raise OutputError(f"writing {self.path} failed ({exc}); check free disk space") from exc
        self.closed = True

    def _to_cog(self) -> str:
        from rasterio.shutil import copy as rio_copy

        cog_tmp = temp_path_for(self.path)
        self._cog_tmp = cog_tmp
        rio_copy(self.tmp, cog_tmp, driver="COG", COMPRESS="DEFLATE", PREDICTOR="YES", BLOCKSIZE=TILE,
                 BIGTIFF="YES", OVERVIEW_RESAMPLING=self.resampling.upper(), NUM_THREADS=1)
        _unlink(self.tmp)
        return cog_tmp

    def abort(self) -> None:
        """Close and delete the temporary file(s)."""
        try:
            if not self._ds.closed:
                self._ds.close()
        except Exception:  # noqa: BLE001 - best effort while failing
            pass
        _unlink(self.tmp)
        if getattr(self, "_cog_tmp", None):
            _unlink(self._cog_tmp)
        self.closed = True


class PngSink(RasterSink):
    """An in-memory image encoded as PNG (or TIFF bytes for ``-`` with ``fmt='tiff'``) at commit."""

    def __init__(self, path: str, shape: tuple[int, int], bands: int, dtype: Any, overwrite: bool,
                 fmt: str = "png") -> None:
        super().__init__(path, shape, bands, dtype, overwrite)
        if fmt == "png" and (self.dtype not in (np.uint8, np.uint16) or self.bands not in (1, 3, 4)):
            raise UsageError(f"cannot store {self.bands}-band {self.dtype} data in PNG {path}; write a .tif")
        self.fmt = fmt
        self.array = np.zeros((self.shape[0], self.shape[1], self.bands), self.dtype)

    def write_rows(self, row0: int, block: np.ndarray) -> None:
        """Copy rows into the buffer."""
        block = self._check_block(row0, block)
        self.array[row0 : row0 + block.shape[0]] = block

    def encode(self) -> bytes:
        """The file's bytes."""
        if self.fmt == "tiff":
            import io

            import tifffile

            buf = io.BytesIO()
            tifffile.imwrite(buf, self.array[..., 0] if self.bands == 1 else self.array, compression="zlib")
            return buf.getvalue()
        import cv2

        arr = self.array[..., 0] if self.bands == 1 else self.array
        if self.bands == 3:
            arr = arr[..., ::-1]
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr))
        if not ok:
            raise OutputError(f"PNG encoding of {self.path} failed")
        return buf.tobytes()

    def commit(self) -> None:
        """Encode and write (atomically, or to stdout)."""
        if self.next_row != self.shape[0]:
            raise ValueError(f"{self.path}: only {self.next_row} of {self.shape[0]} rows were written")
        data = self.encode()
        if self.path == "-":
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        else:
            try:
                write_bytes_atomic(self.path, data, overwrite=self.overwrite)
            except OSError as exc:
                if isinstance(exc, OutputExistsError):
                    raise
                raise OutputError(f"writing {self.path} failed ({exc}); check free disk space") from exc
        self.closed = True

    def abort(self) -> None:
        """Drop the buffer."""
        self.array = np.zeros((0, 0, self.bands), self.dtype)
        self.closed = True


class SegmentedSink(RasterSink):
    """A resumable TIFF output: rows are committed in atomically written segments.

    Rows go to segment files of ``segment_rows`` rows (a multiple of 512) in
    ``parts_dir``, each written to a temporary name and renamed when complete, so a
    killed run leaves only whole segments. :meth:`commit` streams the segments, in
    order, into the final tiled TIFF (written atomically like any output) and removes
    the parts. Reopening with the same ``parts_dir`` continues after the last
    complete segment: :attr:`next_row` tells the engine where to start.

    Args:
        parts_dir: folder of the segments (created; one folder per output).
        segment_rows: rows per segment.
        georef, cog, resampling: passed to the final :class:`TiffSink`.
    """

    def __init__(self, path: str, shape: tuple[int, int], bands: int, dtype: Any, overwrite: bool, *,
                 parts_dir: str, segment_rows: int = 4096, georef: Georef | None = None, cog: bool = False,
                 resampling: str = "nearest") -> None:
        super().__init__(path, shape, bands, dtype, overwrite)
        if segment_rows % TILE:
            raise ValueError(f"segment_rows must be a multiple of {TILE}")
        self.parts_dir = Path(parts_dir)
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self.segment_rows = segment_rows
        self.georef, self.cog, self.resampling = georef, cog, resampling
        self._current: TiffSink | None = None
        self.next_row = self._resume_point()

    def _segment_path(self, index: int) -> str:
        return str(self.parts_dir / f"segment_{index:06d}.tif")

    def _segment_rows(self, index: int) -> int:
        return min(self.segment_rows, self.shape[0] - index * self.segment_rows)

    def _resume_point(self) -> int:
        """First row not covered by complete, readable segments (later segments are removed)."""
        import tifffile

        index = 0
        while index * self.segment_rows < self.shape[0]:
            p = self._segment_path(index)
            try:
                with tifffile.TiffFile(p) as tf:
                    page = tf.pages[0]
                    ok = (page.imagelength, page.imagewidth) == (self._segment_rows(index), self.shape[1]) and \
                        page.samplesperpixel == self.bands and np.dtype(page.dtype) == self.dtype
            except Exception:  # noqa: BLE001 - missing or unreadable: stop here
                ok = False
            if not ok:
                break
            index += 1
        for stale in self.parts_dir.glob("segment_*.tif"):
            if int(stale.stem.split("_")[1]) >= index:
                _unlink(str(stale))
        clean_stale_temps(self.parts_dir)
        return index * self.segment_rows

    def rewind(self, row: int) -> None:
        """Start again at ``row`` (a segment boundary), dropping later segments."""
        if row % self.segment_rows:
            raise ValueError(f"{row} is not a segment boundary")
        for stale in self.parts_dir.glob("segment_*.tif"):
            if int(stale.stem.split("_")[1]) >= row // self.segment_rows:
                _unlink(str(stale))
        self.next_row = row

    def write_rows(self, row0: int, block: np.ndarray) -> None:
        """Write rows; a segment is committed as soon as its last row arrives."""
        block = self._check_block(row0, block)
        while block.shape[0]:
            index = row0 // self.segment_rows
            if self._current is None:
                self._current = TiffSink(self._segment_path(index), (self._segment_rows(index), self.shape[1]),
                                         self.bands, self.dtype, overwrite=True)
            seg_start = index * self.segment_rows
            n = min(block.shape[0], seg_start + self._segment_rows(index) - row0)
            self._current.write_rows(row0 - seg_start, block[:n])
            if self._current.next_row == self._current.shape[0]:
                self._current.commit()
                self._current = None
            block, row0 = block[n:], row0 + n

    def commit(self) -> None:
        """Assemble the segments into the final file, then remove the parts."""
        import shutil

        from refine_cli.io.readers import TiffReader
        from refine_cli.tiling.grid import Window

        if self.next_row != self.shape[0]:
            raise ValueError(f"{self.path}: only {self.next_row} of {self.shape[0]} rows were written")
        final = TiffSink(self.path, self.shape, self.bands, self.dtype, self.overwrite, georef=self.georef,
                         cog=self.cog, resampling=self.resampling)
        try:
            for index in range(-(-self.shape[0] // self.segment_rows)):
                with TiffReader(self._segment_path(index), cache_bytes=0) as seg:
                    for r in range(0, seg.shape[0], TILE):
                        part = seg.read(Window(r, 0, min(TILE, seg.shape[0] - r), self.shape[1]))
                        final.write_rows(index * self.segment_rows + r, part)
        except BaseException:
            final.abort()
            raise
        final.commit()
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        self.closed = True

    def abort(self) -> None:
        """Stop writing but keep the complete segments (the run can be resumed)."""
        if self._current is not None:
            self._current.abort()
            self._current = None
        self.closed = True

    def discard(self) -> None:
        """Remove every segment."""
        import shutil

        self.abort()
        shutil.rmtree(self.parts_dir, ignore_errors=True)


def open_sink(path: str, shape: tuple[int, int], bands: int, dtype: Any, *, overwrite: bool,
              georef: Georef | None = None, fmt: str | None = None, cog: bool = False,
              inline_limit: int = 64_000_000, resampling: str = "nearest") -> RasterSink:
    """Open the sink that fits ``path`` (see the module docstring).

    Raises:
        UsageError: PNG/stdout output over the inline limit, or an unknown extension.
        OutputExistsError: the file exists and ``overwrite`` is false.
    """
    kind = output_format(path, fmt)
    check_output(path, overwrite)
    if path == "-" or kind == "png":
        if shape[0] * shape[1] > inline_limit:
            raise UsageError(f"{path}: a {shape[1]}x{shape[0]} output is above the in-memory limit "
                             f"({inline_limit} px) for PNG/stdout; write a .tif instead")
        return PngSink(path, shape, bands, dtype, overwrite, fmt="tiff" if (path == "-" and kind == "tiff") else "png")
    if georef is None and cog:
        log.info("--cog without georeferencing: writing a plain tiled TIFF with overviews")
    return TiffSink(path, shape, bands, dtype, overwrite, georef=georef, cog=cog, resampling=resampling)


def default_tmp_dir() -> str:
    """Directory for temporary caches (``REFINE_TMPDIR`` or the system default)."""
    return os.environ.get("REFINE_TMPDIR") or tempfile.gettempdir()
