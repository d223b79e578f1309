"""Raster outputs written row band by row band, atomically.

Every sink writes into a temporary file in the target directory and renames it
over the final name only when committed (after fsync), so an interrupted run
never leaves a half-written file under a final name. Existing outputs are
refused unless ``overwrite`` is set.

Committing is two-phase so that the files of one run are one unit
(:class:`~refine_cli.engine.outputs.OutputWriter`): :meth:`RasterSink.prepare`
finishes every file (and its sidecars) under temporary names, :meth:`RasterSink.publish`
renames them into place, :meth:`RasterSink.rollback` removes the temporaries and
whatever this unit already renamed.

* ``.tif`` / ``.tiff``: tiled BigTIFF (512 px tiles, deflate + predictor, or the user's GDAL
  creation options, ``io.creation``), written through rasterio/GDAL with a small block cache, so
  memory does not grow with the image. Georeferencing of the input is copied. ``cog=True`` writes a
  Cloud-Optimised GeoTIFF: overviews reduced while the rows stream (``io.overviews``), copied with
  the full-resolution tiles into the COG layout by GDAL's COG driver at commit.
* ``.png``: for outputs up to the inline limit; kept in memory and encoded at the end.
  Georeferencing goes into GDAL's sidecars: a world file ``<stem>.pgw`` and
  ``<name>.aux.xml`` with the CRS.
* ``-``: PNG (or TIFF) bytes on stdout, same limit (no georeferencing: a warning says so).

GDAL's and libtiff's own messages (``_tiffWriteProc: No space left on device``) go to the
``rasterio`` loggers, never bare on stderr; a failure becomes one :class:`OutputError`.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import shutil
import sys
import tempfile
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast
from xml.sax.saxutils import escape as xml_escape

import numpy as np

from refine_cli.errors import OutputError, OutputExistsError, UsageError, exception_chain
from refine_cli.io.commit import TwoPhaseOutput, refuse_appeared
from refine_cli.io.creation import block_rows, intermediate_options, streamable
from refine_cli.io.creation import merged as creation_merged
from refine_cli.io.overviews import StreamedOverviews, halves_exactly, level_shapes, overview_vrt
from refine_cli.io.readers import (
    Georef,
    gdal_env,
    gdal_message,
    human_bytes,
    libtiff_messages_since,
    libtiff_seq,
    route_libtiff_messages,
)

log = logging.getLogger(__name__)

TILE = 512
TMP_SUFFIX = ".refine-tmp"
"""Every temporary output ends with this, so leftovers of killed runs can be found and removed."""

PARTS_SUFFIX = ".refine-parts"
"""Name ending of the hidden folder of a resumable run's finished parts (``engine.checkpoint``)."""

RAW_LEVELS_BYTES = 2 * 1024**3
"""A COG's streamed overview levels are kept uncompressed on disk up to this size (a third of the
uncompressed output): compressing them costs more CPU than GDAL's whole overview pass saves;
above it they are compressed like the temporary full-resolution file (ZSTD level 1). The engine's
temporary level files (``engine.levels.LevelWriter``) follow the same rule by their own size."""

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
    """Fsync a directory so a rename in it is durable (no-op where unsupported)."""
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
    """Fsync ``tmp``, rename it to ``final`` and fsync the directory."""
    if not overwrite and os.path.exists(final):
        raise OutputExistsError(f"output {final} appeared while running; pass --overwrite to replace it")
    _fsync_file(tmp)
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
        if p.is_dir() and not p.is_symlink():  # a polygon file's temporary folder (io.vector_sink)
            shutil.rmtree(p, ignore_errors=True)
        else:
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


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def dir_bytes(path: str | Path) -> int:
    """Bytes of all files under ``path`` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def parts_root(path: str | Path) -> Path | None:
    """The resumable-parts folder (``.<name>.refine-parts``) that ``path`` lies in, or ``None``."""
    for parent in (Path(path), *Path(path).parents):
        if parent.name.startswith(".") and parent.name.endswith(PARTS_SUFFIX):
            return parent
    return None


_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "disk full")


def is_disk_full(exc: BaseException, native: list[str] | None = None, where: str | None = None) -> bool:
    """Whether a write failed because the disk (or the quota) is full.

    Looks at the exception chain (``errno`` ENOSPC/EDQUOT or the text), libtiff's messages of the
    failed operation (GDAL's own error only says ``Write error at scanline 0``), and, for a GDAL
    write error without a cause, the free space left in ``where``.
    """
    for e in exception_chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if getattr(e, "disk_full", False) or any(t in str(e).lower() for t in _FULL_TEXTS):
            return True
    if any(t in m.lower() for m in native or [] for t in _FULL_TEXTS):
        return True
    if where is not None and any(type(e).__module__.startswith("rasterio") for e in exception_chain(exc)):
        try:
            st = os.statvfs(where)
            return st.f_bavail * st.f_frsize < 1024**2
        except (OSError, AttributeError):
            return False
    return False


def _reason(exc: BaseException, full: bool) -> str:
    if full:
        return "No space left on device"
    for e in exception_chain(exc):
        if isinstance(e, OSError) and e.strerror:
            return str(e.strerror)
    return gdal_message(exc)


def resumable_error(out: str, parts: Path, exc: BaseException, full: bool | None = None) -> OutputError:
    """The one-line error of a failed resumable run: what failed, and the finished rows kept in ``parts``.

    Args:
        out: the output being written.
        parts: the folder of finished parts, kept for ``--resume``.
        exc: the failure.
        full: the disk is full (``None``: decide from ``exc``).
    """
    if getattr(exc, "kept", None) is not None and isinstance(exc, OutputError):
        return exc
    full = is_disk_full(exc) if full is None else full
    size = human_bytes(dir_bytes(parts))
    keep = (f"{size} of finished rows are kept in {parts}: {{fix}} and rerun the same command with --resume "
            f"to continue (a run without --resume deletes them and starts over), or delete {parts}")
    if full:
        err = OutputError(f"disk full writing {out} (No space left on device); "
                          + keep.format(fix="free disk space"))
    else:
        err = OutputError(f"writing {out} failed ({_reason(exc, False)}); " + keep.format(fix="fix that"))
    err.disk_full = full  # type: ignore[attr-defined]
    err.kept = str(parts)  # type: ignore[attr-defined]
    if full:
        err.errno = errno.ENOSPC
    return err


def write_error(path: str, exc: BaseException, native: list[str] | None = None) -> OutputError:
    """The one-line error of a failed write of ``path`` (no resumable parts)."""
    if isinstance(exc, OutputError):
        return exc
    where = str(Path(path).parent) if path != "-" else None
    full = is_disk_full(exc, native, where)
    if full:
        err = OutputError(f"writing {path} failed (No space left on device); check free disk space")
        err.errno = errno.ENOSPC
    else:
        err = OutputError(f"writing {path} failed ({_reason(exc, False)}); check free disk space and "
                          "permissions")
    err.disk_full = full  # type: ignore[attr-defined]
    return err


class RasterSink(TwoPhaseOutput):
    """Receives an image as consecutive full-width row blocks.

    Finishing is two-phase (see the module docstring): :meth:`prepare` writes every file under a
    temporary name, :meth:`publish` renames them, :meth:`rollback` undoes both, :meth:`cleanup`
    drops what is no longer needed once the whole unit is published. :meth:`commit` does all
    three for a sink on its own.

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
        self._staged: list[tuple[str, str, bool]] = []
        """(temporary, final, is_sidecar) files prepared and fsynced, not yet renamed."""
        self._published: list[str] = []

    def _check_block(self, row0: int, block: np.ndarray) -> np.ndarray:
        if row0 != self.next_row:
            raise ValueError(f"rows must arrive in order: expected row {self.next_row}, got {row0}")
        if block.ndim == 2:
            block = block[:, :, None]
        if block.shape[1] != self.shape[1] or block.shape[2] != self.bands:
            raise ValueError(f"block of shape {block.shape} does not fit {self.shape} x {self.bands}")
        self.next_row += block.shape[0]
        return block.astype(self.dtype, copy=False)

    def _check_complete(self) -> None:
        if self.next_row != self.shape[0]:
            raise ValueError(f"{self.path}: only {self.next_row} of {self.shape[0]} rows were written")

    def write_rows(self, row0: int, block: np.ndarray) -> None:
        """Write rows ``row0 .. row0 + n`` (``(n, W)`` or ``(n, W, bands)``)."""
        raise NotImplementedError

    def check_publishable(self) -> None:
        """Refuse before any rename when a final name exists and ``overwrite`` is false."""
        for _, final, sidecar in self._staged:
            if not sidecar:
                refuse_appeared(final, self.overwrite)

    def publish(self) -> None:
        """Phase 2: rename the prepared files to their final names (main file last)."""
        self.check_publishable()
        dirs = set()
        for entry in sorted(self._staged, key=lambda e: not e[2]):  # sidecars first: the image is the commit
            tmp, final, _ = entry
            os.replace(tmp, final)
            self._staged.remove(entry)
            self._published.append(final)
            dirs.add(str(Path(final).parent))
        for d in dirs:
            fsync_dir(d)
        self.closed = True

    def rollback(self) -> None:
        """Remove the prepared temporaries and the files this sink already published."""
        if not self.closed:
            self.abort()
        for tmp, _, _ in self._staged:
            _unlink(tmp)
        self._staged.clear()
        for final in self._published:
            _unlink(final)
        self._published.clear()
        self.closed = True


class TiffSink(RasterSink):
    """Tiled (Geo)TIFF through rasterio, written in block-aligned row strips.

    Args:
        georef: georeferencing to copy, or ``None``.
        cog: write a Cloud-Optimised GeoTIFF: the rows go to a temporary tiled TIFF while their
            overviews are reduced as they arrive (``io.overviews``: ``nearest`` always, ``average``
            where every level halves exactly), and GDAL's COG driver copies both into the final
            layout at commit (otherwise GDAL computes the overviews then).
        resampling: overview resampling for COG (``nearest`` for masks, ``average`` for soft maps).
        resume_target: ``(output, parts folder)`` when this file is part of a resumable run, so a
            failure says which output failed and where its finished rows are kept; by default
            found from the path (a file inside a ``.<name>.refine-parts`` folder: that output).
        creation: the user's GDAL creation options (``{KEY: value}``, checked by
            :func:`check_creation`), over the defaults of ``io.creation``.
        nodata: the nodata tag of the file, or ``None``.
        stream_overviews: build a COG's overviews while writing (``False``: GDAL at commit).
    """

    def __init__(self, path: str, shape: tuple[int, int], bands: int, dtype: Any, overwrite: bool,
                 georef: Georef | None = None, cog: bool = False, resampling: str = "nearest",
                 resume_target: tuple[str, Path] | None = None, creation: Mapping[str, str] | None = None,
                 nodata: float | None = None, stream_overviews: bool = True) -> None:
        super().__init__(path, shape, bands, dtype, overwrite)
        route_libtiff_messages()
        self.cog = cog
        self.georef, self.nodata = georef, nodata
        self.options = creation_merged(creation or {}, self.dtype, cog, resampling)
        """The final file's creation options (the COG driver's with ``cog``)."""
        self.resampling = self.options.get("OVERVIEW_RESAMPLING", resampling).lower() if cog else resampling
        gtiff = intermediate_options(self.options, self.dtype) if cog else self.options
        self.strip = block_rows(gtiff)
        self.tmp = temp_path_for(path)
        root = parts_root(path)
        if resume_target is None and root is not None:
            resume_target = (str(root.parent / root.name[1 : -len(PARTS_SUFFIX)]), root)
        self.resume_target = resume_target
        self._ovr: StreamedOverviews | None = None
        self._ds = self._create(gtiff)
        block = int(self.options.get("BLOCKSIZE", TILE)) if cog else TILE
        if cog and stream_overviews and streamable(self.options) and \
                (self.resampling == "nearest" or halves_exactly(self.shape, block)):
            paths = [temp_path_for(f"{path}.ovr{k + 1}") for k in range(len(level_shapes(self.shape, block)))]
            fast = intermediate_options(self.options, self.dtype)
            if self.shape[0] * self.shape[1] * self.bands * self.dtype.itemsize // 3 <= RAW_LEVELS_BYTES:
                fast = {"COMPRESS": "NONE", "BIGTIFF": "YES", "INTERLEAVE": "PIXEL"}
            try:
                self._ovr = StreamedOverviews(paths, self.shape, self.bands, self.dtype, block,
                                              self.resampling, fast, nodata)
            except Exception as exc:
                raise self._error(exc) from exc
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._pending_start = 0

    def _create(self, options: Mapping[str, str]) -> Any:
        """Open the temporary file for writing with ``options`` (GTiff creation options)."""
        import rasterio
        from rasterio.transform import Affine

        profile: dict[str, Any] = dict(driver="GTiff", width=self.shape[1], height=self.shape[0],
                                       count=self.bands, dtype=self.dtype.name, **options)
        if self.nodata is not None:
            profile["nodata"] = self.nodata
        if self.georef is not None:
            profile["transform"] = Affine(*self.georef.transform)
            if self.georef.crs_wkt:
                profile["crs"] = rasterio.crs.CRS.from_wkt(self.georef.crs_wkt)
        seq = libtiff_seq()
        try:
            with warnings.catch_warnings(), gdal_env():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                return rasterio.open(self.tmp, "w", **profile)
        except Exception as exc:
            _unlink(self.tmp)
            native = libtiff_messages_since(seq)
            if is_disk_full(exc, native, str(Path(self.path).parent)):
                raise self._error(exc, native) from exc
            raise OutputError(f"cannot create {self.path} ({gdal_message(exc)})") from exc

    def _error(self, exc: BaseException, native: list[str] | None = None) -> OutputError:
        """Abort, then the one-line error of ``exc`` (naming the kept parts of a resumable run)."""
        self.abort()
        if isinstance(exc, OutputError):
            return exc
        if self.resume_target is not None:
            full = is_disk_full(exc, native, str(Path(self.path).parent))
            return resumable_error(self.resume_target[0], self.resume_target[1], exc, full)
        return write_error(self.path, exc, native)

    def write_rows(self, row0: int, block: np.ndarray) -> None:
        """Buffer rows and write whole 512-row strips (the last strip may be shorter)."""
        block = self._check_block(row0, block)
        if not self._pending:
            self._pending_start = row0
        self._pending.append(block)
        self._pending_rows += block.shape[0]
        end = self._pending_start + self._pending_rows
        aligned = (end // self.strip) * self.strip if end < self.shape[0] else end
        if aligned > self._pending_start:
            self._flush(aligned)

    def _flush(self, until: int) -> None:
        from rasterio.windows import Window as RWindow

        data = np.concatenate(self._pending, axis=0) if len(self._pending) > 1 else self._pending[0]
        n = until - self._pending_start
        seq = libtiff_seq()
        try:
            with gdal_env():
                self._ds.write(np.transpose(data[:n], (2, 0, 1)),
                               window=RWindow(0, self._pending_start, self.shape[1], n))
                if self._ovr is not None:
                    self._ovr.push(data[:n])
        except Exception as exc:
            raise self._error(exc, libtiff_messages_since(seq)) from exc
        rest = data[n:]
        self._pending = [rest] if rest.shape[0] else []
        self._pending_rows = rest.shape[0]
        self._pending_start = until

    def prepare(self) -> None:
        """Write the last rows, close, optionally convert to COG and fsync, under the temporary name."""
        self._check_complete()
        seq = libtiff_seq()
        try:
            if self._pending:
                self._flush(self._pending_start + self._pending_rows)
            with gdal_env():
                self._ds.close()
                src = self.tmp
                if self.cog:
                    src = self._to_cog()
            _fsync_file(src)
        except OutputError:
            raise
        except Exception as exc:
            raise self._error(exc, libtiff_messages_since(seq)) from exc
        except BaseException:
            self.abort()
            raise
        self._staged = [(src, self.path, False)]

    def _to_cog(self) -> str:
        """Copy the temporary TIFF (with its streamed overviews, if any) into a COG; its temporary name."""
        from rasterio.shutil import copy as rio_copy

        cog_tmp = temp_path_for(self.path)
        self._cog_tmp = cog_tmp
        options = dict(self.options)
        src = self.tmp
        if self._ovr is not None:
            levels = self._ovr.close()
            georef = None if self.georef is None else (tuple(self.georef.transform), self.georef.crs_wkt)
            src = self._vrt = temp_path_for(f"{self.path}.vrt")
            with open(src, "w", encoding="utf-8") as fh:
                fh.write(overview_vrt(os.path.abspath(self.tmp), [os.path.abspath(p) for p in levels],
                                      self.shape, self.bands, self.dtype, georef, self.nodata))
            options["OVERVIEWS"] = "FORCE_USE_EXISTING"
        rio_copy(src, cog_tmp, driver="COG", **options)
        self._drop_intermediates()
        return cog_tmp

    def _drop_intermediates(self) -> None:
        """Remove the temporary full-resolution TIFF, the overview levels and their VRT."""
        _unlink(self.tmp)
        if self._ovr is not None:
            self._ovr.abort()
        if getattr(self, "_vrt", None):
            _unlink(self._vrt)

    def abort(self) -> None:
        """Close and delete the temporary file(s)."""
        try:
            if not self._ds.closed:
                with gdal_env():
                    self._ds.close()
        except Exception:  # noqa: BLE001 - best effort while failing
            pass
        self._drop_intermediates()
        if getattr(self, "_cog_tmp", None):
            _unlink(self._cog_tmp)
        self.closed = True


def world_file_path(path: str) -> str:
    """``<dir>/<stem>.pgw``: the world file GDAL reads beside a PNG."""
    return str(Path(path).with_suffix(".pgw"))


def aux_xml_path(path: str) -> str:
    """``<path>.aux.xml``: GDAL's PAM sidecar (here: the CRS)."""
    return f"{path}.aux.xml"


def world_file_text(transform: tuple[float, float, float, float, float, float]) -> str:
    """The six lines of a world file for the affine ``(a, b, c, d, e, f)`` of the pixel corner.

    World files give A, D, B, E and the centre of the top-left pixel: ``c + a/2 + b/2``, ``f + d/2 + e/2``.
    """
    a, b, c, d, e, f = (float(v) for v in transform)
    return "\n".join(repr(v) for v in (a, d, b, e, c + a / 2 + b / 2, f + d / 2 + e / 2)) + "\n"


def aux_xml_text(crs_wkt: str) -> str:
    """GDAL's PAM document holding the CRS: ``<PAMDataset><SRS>WKT</SRS></PAMDataset>``."""
    return f"<PAMDataset>\n  <SRS>{xml_escape(crs_wkt)}</SRS>\n</PAMDataset>\n"


class PngSink(RasterSink):
    """An in-memory image encoded as PNG (or TIFF bytes for ``-`` with ``fmt='tiff'``) at commit.

    Args:
        georef: georeferencing of the input; written as GDAL sidecars beside a PNG file (world
            file ``<stem>.pgw`` and ``<name>.aux.xml`` with the CRS), published with the PNG.
    """

    def __init__(self, path: str, shape: tuple[int, int], bands: int, dtype: Any, overwrite: bool,
                 fmt: str = "png", georef: Georef | None = None) -> None:
        super().__init__(path, shape, bands, dtype, overwrite)
        if fmt == "png" and (self.dtype not in (np.uint8, np.uint16) or self.bands not in (1, 3, 4)):
            raise UsageError(f"cannot store {self.bands}-band {self.dtype} data in PNG {path}; write a .tif")
        self.fmt = fmt
        self.georef = georef
        self.array = np.zeros((self.shape[0], self.shape[1], self.bands), self.dtype)
        self._stdout: bytes | None = None

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
        ok, encoded = cv2.imencode(".png", np.ascontiguousarray(arr))
        if not ok:
            raise OutputError(f"PNG encoding of {self.path} failed")
        return encoded.tobytes()

    def sidecars(self) -> dict[str, bytes]:
        """``{final path: bytes}`` of the georeferencing sidecars (empty without georeferencing)."""
        if self.georef is None or self.path == "-":
            return {}
        files = {world_file_path(self.path): world_file_text(self.georef.transform).encode()}
        if self.georef.crs_wkt:
            files[aux_xml_path(self.path)] = aux_xml_text(self.georef.crs_wkt).encode()
        return files

    def _stage(self, final: str, data: bytes, sidecar: bool) -> None:
        tmp = temp_path_for(final)
        self._staged.append((tmp, final, sidecar))
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def prepare(self) -> None:
        """Encode; write the PNG and its sidecars under temporary names (stdout: keep the bytes)."""
        self._check_complete()
        data = self.encode()
        if self.path == "-":
            self._stdout = data
            return
        try:
            self._stage(self.path, data, False)
            del data
            for final, side in self.sidecars().items():
                self._stage(final, side, True)
        except OSError as exc:
            for tmp, _, _ in self._staged:
                _unlink(tmp)
            self._staged.clear()
            raise write_error(self.path, exc) from exc

    def publish(self) -> None:
        """Rename the PNG and its sidecars into place, or write the bytes to stdout."""
        if self.path == "-":
            assert self._stdout is not None
            sys.stdout.buffer.write(self._stdout)
            sys.stdout.buffer.flush()
            self._stdout = None
            self.closed = True
            return
        if self.georef is None:
            for stale in (world_file_path(self.path), aux_xml_path(self.path)):
                if os.path.exists(stale):
                    log.info("removing %s: georeferencing of an earlier %s, not of this one", stale,
                             self.path)
                    _unlink(stale)
        try:
            super().publish()
        except OSError as exc:
            if isinstance(exc, OutputExistsError):
                raise
            raise write_error(self.path, exc) from exc

    def abort(self) -> None:
        """Drop the buffer."""
        self.array = np.zeros((0, 0, self.bands), self.dtype)
        self._stdout = None
        self.closed = True


class SegmentedSink(RasterSink):
    """A resumable TIFF output: rows are committed in atomically written segments.

    Rows go to segment files of ``segment_rows`` rows (a multiple of 512) in
    ``parts_dir``, each written to a temporary name and renamed when complete, so a
    killed run leaves only whole segments. :meth:`prepare` streams the segments, in
    order, into the final tiled TIFF (under a temporary name), :meth:`publish` renames
    it, :meth:`cleanup` removes the parts. Reopening with the same ``parts_dir``
    continues after the last complete segment: :attr:`next_row` tells the engine where
    to start. A failure (a full disk ...) keeps the complete segments and says where
    they are and how much they hold (:func:`resumable_error`).

    With ``rows=(r0, r1)`` the sink writes only that row band of the output (one task of a
    distributed run, ``r0`` on a segment boundary): it starts at ``r0`` without looking at other
    segments (other bands write them meanwhile), and committing it only checks that every row of
    the band arrived; the band's segments stay in ``parts_dir`` for the sink that assembles them.

    Args:
        parts_dir: folder of the segments (created; one folder per output).
        segment_rows: rows per segment.
        georef, cog, resampling, creation, nodata: passed to the final :class:`TiffSink` (the
            segments are plain tiled TIFFs; ``creation`` is checked here, before any row is written).
        rows: ``(r0, r1)``: write only this band (see above); ``None``: the whole output.
    """

    def __init__(self, path: str, shape: tuple[int, int], bands: int, dtype: Any, overwrite: bool, *,
                 parts_dir: str, segment_rows: int = 4096, georef: Georef | None = None, cog: bool = False,
                 resampling: str = "nearest", creation: Mapping[str, str] | None = None,
                 nodata: float | None = None, rows: tuple[int, int] | None = None) -> None:
        super().__init__(path, shape, bands, dtype, overwrite)
        check_creation(path, creation, self.dtype, self.bands, cog=cog, resampling=resampling, nodata=nodata)
        self.creation, self.nodata = dict(creation or {}), nodata
        if segment_rows % TILE:
            raise ValueError(f"segment_rows must be a multiple of {TILE}")
        if rows is not None and (rows[0] % segment_rows or not 0 <= rows[0] < rows[1] <= self.shape[0]):
            raise ValueError(f"band {rows} does not start on a segment boundary of {segment_rows} rows")
        self.rows = rows
        self.parts_dir = Path(parts_dir)
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self.resume_dir = parts_root(self.parts_dir) or self.parts_dir
        """The folder a failure reports as kept (the run's whole parts folder)."""
        self.segment_rows = segment_rows
        self.georef, self.cog, self.resampling = georef, cog, resampling
        self._current: TiffSink | None = None
        self._final: TiffSink | None = None
        self.next_row = self._resume_point() if rows is None else rows[0]

    def _segment_path(self, index: int) -> str:
        return str(self.parts_dir / f"segment_{index:06d}.tif")

    def _segment_rows(self, index: int) -> int:
        return min(self.segment_rows, self.shape[0] - index * self.segment_rows)

    def segment_complete(self, index: int) -> bool:
        """Whether segment ``index`` is there, readable and of the right size, bands and dtype."""
        import tifffile

        try:
            with tifffile.TiffFile(self._segment_path(index)) as tf:
                page = cast(tifffile.TiffPage, tf.pages[0])  # the first page is always a full TiffPage
                size = (self._segment_rows(index), self.shape[1])
                return bool((page.imagelength, page.imagewidth) == size and
                            page.samplesperpixel == self.bands and np.dtype(page.dtype) == self.dtype)
        except Exception:  # noqa: BLE001 - missing or unreadable
            return False

    def _resume_point(self) -> int:
        """First row not covered by complete, readable segments (later segments are removed)."""
        index = 0
        while index * self.segment_rows < self.shape[0] and self.segment_complete(index):
            index += 1
        for stale in self.parts_dir.glob("segment_*.tif"):
            if int(stale.stem.split("_")[1]) >= index:
                _unlink(str(stale))
        clean_stale_temps(self.parts_dir)
        return min(index * self.segment_rows, self.shape[0])

    def rewind(self, row: int) -> None:
        """Start again at ``row`` (a segment boundary), dropping later segments."""
        if row % self.segment_rows:
            raise ValueError(f"{row} is not a segment boundary")
        for stale in self.parts_dir.glob("segment_*.tif"):
            if int(stale.stem.split("_")[1]) >= row // self.segment_rows:
                _unlink(str(stale))
        self.next_row = row

    def _failed(self, exc: BaseException) -> OutputError:
        """Drop the unfinished segment, then the error naming the kept parts and their size."""
        if self._current is not None:
            self._current.abort()
            self._current = None
        return resumable_error(self.path, self.resume_dir, exc)

    def write_rows(self, row0: int, block: np.ndarray) -> None:
        """Write rows; a segment is committed as soon as its last row arrives."""
        block = self._check_block(row0, block)
        try:
            while block.shape[0]:
                index = row0 // self.segment_rows
                if self._current is None:
                    rows = (self._segment_rows(index), self.shape[1])
                    self._current = TiffSink(self._segment_path(index), rows, self.bands, self.dtype,
                                             overwrite=True, resume_target=(self.path, self.resume_dir))
                seg_start = index * self.segment_rows
                n = min(block.shape[0], seg_start + self._segment_rows(index) - row0)
                self._current.write_rows(row0 - seg_start, block[:n])
                if self._current.next_row == self._current.shape[0]:
                    self._current.commit()
                    self._current = None
                block, row0 = block[n:], row0 + n
        except OSError as exc:
            raise self._failed(exc) from exc

    def _check_complete(self) -> None:
        if self.rows is None:
            super()._check_complete()
        elif self.next_row != self.rows[1]:
            raise ValueError(f"{self.path}: band {self.rows} stopped at row {self.next_row}")

    def prepare(self) -> None:
        """Assemble the segments into the final file, under a temporary name (the parts stay).

        A band sink (``rows``) has nothing to assemble: its segments are already committed.
        """
        from refine_cli.io.readers import TiffReader
        from refine_cli.tiling.grid import Window

        self._check_complete()
        if self.rows is not None:
            return
        try:
            final = TiffSink(self.path, self.shape, self.bands, self.dtype, self.overwrite,
                             georef=self.georef, cog=self.cog, resampling=self.resampling,
                             resume_target=(self.path, self.resume_dir), creation=self.creation,
                             nodata=self.nodata)
        except OSError as exc:
            raise self._failed(exc) from exc
        self._final = final
        try:
            for index in range(-(-self.shape[0] // self.segment_rows)):
                with TiffReader(self._segment_path(index), cache_bytes=0) as seg:
                    for r in range(0, seg.shape[0], TILE):
                        part = seg.read(Window(r, 0, min(TILE, seg.shape[0] - r), self.shape[1]))
                        final.write_rows(index * self.segment_rows + r, part)
            final.prepare()
        except OutputError as exc:
            final.abort()
            raise self._failed(exc) from exc
        except BaseException:
            final.abort()
            raise

    def check_publishable(self) -> None:
        """See :meth:`RasterSink.check_publishable`."""
        if self._final is not None:
            self._final.check_publishable()

    def publish(self) -> None:
        """Rename the assembled file into place (a band sink: nothing to rename)."""
        if self.rows is not None:
            self.closed = True
            return
        assert self._final is not None
        self._final.publish()
        self.closed = True

    def rollback(self) -> None:
        """Remove the assembled file (temporary or published); the parts stay for ``--resume``."""
        if self._final is not None:
            self._final.rollback()
        self.abort()

    def cleanup(self) -> None:
        """Remove the parts (the output is in place); a band sink keeps them for the assembly."""
        if self.rows is not None:
            return
        shutil.rmtree(self.parts_dir, ignore_errors=True)

    def abort(self) -> None:
        """Stop writing but keep the complete segments (the run can be resumed)."""
        if self._current is not None:
            self._current.abort()
            self._current = None
        self.closed = True

    def discard(self) -> None:
        """Remove every segment."""
        self.abort()
        shutil.rmtree(self.parts_dir, ignore_errors=True)


def check_creation(path: str, creation: Mapping[str, str] | None, dtype: Any, bands: int, *,
                   cog: bool = False, resampling: str = "nearest", nodata: float | None = None,
                   fmt: str | None = None) -> None:
    """Refuse ``--co`` options and a ``--nodata`` value that ``path``'s output cannot take, before any work.

    Args:
        path: the output (``-`` for stdout).
        creation: the user's creation options ``{KEY: value}`` (keys upper-case), or ``None``.
        dtype: sample type of the output.
        bands: samples per pixel.
        cog: the output is a COG (the COG driver's options apply).
        resampling: default overview resampling of a COG.
        nodata: the nodata tag, or ``None``.
        fmt: ``--format``.

    Raises:
        UsageError: options on a PNG or stdout output, an unknown key or value (naming the valid
            ones), a combination GDAL refuses, or a nodata value outside the sample type.
    """
    dt = np.dtype(dtype)
    if nodata is not None and dt.kind in "iu":
        info = np.iinfo(dt)
        if not (float(nodata).is_integer() and info.min <= nodata <= info.max):
            raise UsageError(f"--nodata {nodata:g} does not fit {path}'s {dt.name} samples; give an integer "
                             f"in {info.min}..{info.max}")
    if not creation:
        return
    if path == "-" or output_format(path, fmt) == "png":
        raise UsageError(f"--co applies to TIFF outputs; {path} is written as PNG: give it a .tif name or "
                         "leave out --co")
    from refine_cli.io.creation import check_options, probe

    check_options(creation, "COG" if cog else "GTiff")
    probe(creation_merged(creation, dt, cog, resampling), dt, bands, nodata, path, cog=cog, given=creation)


def open_sink(path: str, shape: tuple[int, int], bands: int, dtype: Any, *, overwrite: bool,
              georef: Georef | None = None, fmt: str | None = None, cog: bool = False,
              inline_limit: int = 64_000_000, resampling: str = "nearest",
              creation: Mapping[str, str] | None = None, nodata: float | None = None) -> RasterSink:
    """Open the sink that fits ``path`` (see the module docstring).

    Raises:
        UsageError: PNG/stdout output over the inline limit, an unknown extension, or creation
            options / a nodata value the output cannot take (:func:`check_creation`).
        OutputExistsError: the file exists and ``overwrite`` is false.
    """
    kind = output_format(path, fmt)
    check_output(path, overwrite)
    check_creation(path, creation, dtype, bands, cog=cog, resampling=resampling, nodata=nodata, fmt=fmt)
    if path == "-" or kind == "png":
        if shape[0] * shape[1] > inline_limit:
            raise UsageError(f"{path}: a {shape[1]}x{shape[0]} output is above the in-memory limit "
                             f"({inline_limit} px) for PNG/stdout; write a .tif instead")
        if path == "-" and georef is not None:
            log.warning("stdout output: the georeferencing is dropped; write a .tif to keep it")
        if nodata is not None:
            log.warning("%s: PNG has no nodata tag; --nodata is not written there", path)
        return PngSink(path, shape, bands, dtype, overwrite,
                       fmt="tiff" if (path == "-" and kind == "tiff") else "png", georef=georef)
    if georef is None and cog:
        log.info("--cog without georeferencing: writing a plain tiled TIFF with overviews")
    return TiffSink(path, shape, bands, dtype, overwrite, georef=georef, cog=cog, resampling=resampling,
                    creation=creation, nodata=nodata)


def default_tmp_dir() -> str:
    """Directory for temporary caches (``REFINE_TMPDIR`` or the system default)."""
    return os.environ.get("REFINE_TMPDIR") or tempfile.gettempdir()
