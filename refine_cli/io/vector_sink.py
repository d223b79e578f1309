"""Polygon outputs (GeoPackage, GeoJSON, FlatGeobuf, GeoParquet), written as a stream, atomically.

:class:`VectorSink` receives finished polygons in batches and writes each batch to the file at once
(nothing is collected in memory): GeoPackage, GeoJSON and FlatGeobuf through ``pyogrio.write_arrow``
reading an Arrow stream that a background thread feeds from a small queue; GeoParquet through
``pyarrow.parquet.ParquetWriter`` (the GDAL in pyogrio's wheels has no Parquet driver) with the
GeoParquet 1.1 ``geo`` metadata (WKB encoding, the CRS as PROJJSON, ``null`` without one).

The file is written in a temporary folder beside the target (named like the raster sinks' temporaries,
so :func:`~refine_cli.io.writers.clean_stale_temps` removes what a killed run left; inside it the file
keeps its extension, which GDAL's GeoPackage and FlatGeobuf drivers need) and renamed by
:meth:`VectorSink.publish`;
it commits in two phases like the raster sinks of :mod:`refine_cli.io.writers`, so it joins the unit of a
run's outputs. Needs the ``vector`` extra (``pip install 'refine-cli[vector]'``).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refine_cli.errors import DependencyError, OutputError, UsageError
from refine_cli.io.commit import TwoPhaseOutput, refuse_appeared
from refine_cli.io.writers import check_output, fsync_dir, temp_path_for, write_error

FORMATS = {"gpkg": "GPKG", "geojson": "GeoJSON", "fgb": "FlatGeobuf", "parquet": "Parquet"}
"""``--vector-format`` → GDAL driver (``Parquet`` is written with pyarrow)."""

EXTENSIONS = {".gpkg": "gpkg", ".geojson": "geojson", ".json": "geojson", ".fgb": "fgb",
              ".parquet": "parquet", ".geoparquet": "parquet"}

LAYER = "polygons"
BATCH = 4096
"""Polygons per Arrow record batch."""


def vector_format(path: str, fmt: str | None = None) -> str:
    """``gpkg`` | ``geojson`` | ``fgb`` | ``parquet`` from ``fmt`` or the extension of ``path``.

    Raises:
        UsageError: unknown format or extension, or stdout.
    """
    if path == "-":
        raise UsageError("--vector -: polygons cannot go to stdout; give a file (.gpkg, .geojson, .fgb, "
                         ".parquet)")
    if fmt:
        f = fmt.lower().lstrip(".")
        f = {"geoparquet": "parquet", "flatgeobuf": "fgb", "json": "geojson"}.get(f, f)
        if f not in FORMATS:
            raise UsageError(f"--vector-format {fmt!r}: use one of {', '.join(FORMATS)}")
        return f
    ext = Path(path).suffix.lower()
    if ext not in EXTENSIONS:
        raise UsageError(f"cannot write polygons to {path}: use .gpkg, .geojson, .fgb or .parquet, or "
                         "give --vector-format")
    return EXTENSIONS[ext]


def require_vector() -> None:
    """Raise a one-line :class:`DependencyError` when the ``vector`` extra is not installed."""
    import importlib.util

    missing = [m for m in ("pyogrio", "shapely", "pyarrow") if importlib.util.find_spec(m) is None]
    if missing:
        raise DependencyError(f"polygon output needs {', '.join(missing)}: pip install 'refine-cli[vector]'")


@dataclass(frozen=True)
class Field:
    """One attribute column: ``name`` and numpy ``dtype`` (``int32``, ``int64``, ``float32``)."""

    name: str
    dtype: str


def _schema(fields: list[Field], geo: dict[str, Any] | None = None) -> Any:
    import pyarrow as pa

    cols = [pa.field("geometry", pa.binary())] + [pa.field(f.name, pa.from_numpy_dtype(np.dtype(f.dtype)))
                                                  for f in fields]
    return pa.schema(cols, metadata={"geo": json.dumps(geo)} if geo is not None else None)


def geoparquet_metadata(crs_wkt: str | None) -> dict[str, Any]:
    """The GeoParquet 1.1 ``geo`` metadata of a WKB polygon column (CRS as PROJJSON, ``None`` without one)."""
    crs: Any = None
    if crs_wkt:
        from rasterio.crs import CRS

        crs = CRS.from_wkt(crs_wkt).to_dict(projjson=True)
    return {"version": "1.1.0", "primary_column": "geometry",
            "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": crs,
                                     "orientation": "counterclockwise"}}}


_END, _ABORT = object(), object()


class _Aborted(Exception):
    pass


class _OgrStream:
    """``pyogrio.write_arrow`` in a thread, reading record batches from a bounded queue."""

    def __init__(self, path: str, driver: str, schema: Any, crs_wkt: str | None) -> None:
        self.schema = schema
        self.error: BaseException | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=4)
        self._thread = threading.Thread(target=self._run, args=(path, driver, crs_wkt), daemon=True,
                                        name="refine-vector-writer")
        self._thread.start()

    def _batches(self) -> Any:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if item is _ABORT:
                raise _Aborted
            yield item

    def _run(self, path: str, driver: str, crs_wkt: str | None) -> None:
        import pyarrow as pa
        import pyogrio

        try:
            reader = pa.RecordBatchReader.from_batches(self.schema, self._batches())
            pyogrio.write_arrow(reader, path, layer=LAYER, driver=driver, geometry_name="geometry",
                                geometry_type="Polygon", crs=crs_wkt)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            self.error = exc

    def put(self, item: Any) -> None:
        """Queue a batch (or the end); raise the writer's error if it stopped."""
        while True:
            if not self._thread.is_alive():
                raise self.error or OutputError("the polygon writer stopped")
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write the end of the stream and wait for the file to be finished."""
        self.put(_END)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Stop the writer (its file is removed by the caller)."""
        while self._thread.is_alive():
            try:
                self._queue.put(_ABORT, timeout=0.2)
                break
            except queue.Full:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
        self._thread.join(timeout=60)


class _ParquetStream:
    """GeoParquet through pyarrow: one row group per written batch."""

    def __init__(self, path: str, schema: Any) -> None:
        import pyarrow.parquet as pq

        self.schema = schema
        self._writer = pq.ParquetWriter(path, schema, compression="zstd")

    def put(self, item: Any) -> None:
        """Write a batch (or finish at the end)."""
        if item is not _END:
            self._writer.write_batch(item)

    def close(self) -> None:
        """Write the footer."""
        self._writer.close()

    def abort(self) -> None:
        """Close without caring about the file (removed by the caller)."""
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - the file is dropped anyway
            pass


class VectorSink(TwoPhaseOutput):
    """Streams polygons with attributes into one vector file, atomically.

    Args:
        path: final path (not ``-``).
        fields: the attribute columns, in order.
        crs_wkt: CRS of the coordinates as WKT, or ``None`` (pixel coordinates, no CRS).
        fmt: ``gpkg`` | ``geojson`` | ``fgb`` | ``parquet``, default from the extension.
        overwrite: replace an existing file.
    """

    def __init__(self, path: str, fields: list[Field], crs_wkt: str | None, fmt: str | None = None,
                 overwrite: bool = False) -> None:
        require_vector()
        self.path = path
        self.fmt = vector_format(path, fmt)
        self.fields = fields
        self.overwrite = overwrite
        self.closed = False
        self.count = 0
        check_output(path, overwrite)
        self._staged = False
        self._published = False
        self._pending: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        self._pending_n = 0
        warnings.filterwarnings("ignore", message=".*'crs' was not provided.*")
        self._tmp_dir = temp_path_for(path)
        self._tmp = os.path.join(self._tmp_dir, f"polygons.{self.fmt}")
        try:
            os.mkdir(self._tmp_dir)
            if self.fmt == "parquet":
                self._stream: _OgrStream | _ParquetStream = _ParquetStream(
                    self._tmp, _schema(fields, geoparquet_metadata(crs_wkt)))
            else:
                self._stream = _OgrStream(self._tmp, FORMATS[self.fmt], _schema(fields), crs_wkt)
        except OSError as exc:
            self._remove_tmp()
            raise write_error(path, exc) from exc

    def _remove_tmp(self) -> None:
        shutil.rmtree(self._tmp_dir, ignore_errors=True)

    def write(self, geoms: np.ndarray, attrs: dict[str, np.ndarray]) -> None:
        """Write polygons: ``(n,)`` object array of shapely polygons and ``(n,)`` attribute columns."""
        if not len(geoms):
            return
        self._pending.append((geoms, attrs))
        self._pending_n += len(geoms)
        if self._pending_n >= BATCH:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import shapely

        if not self._pending:
            return
        geoms = np.concatenate([g for g, _ in self._pending])
        cols = [pa.array(shapely.to_wkb(geoms), pa.binary())]
        for f in self.fields:
            cols.append(pa.array(np.concatenate([a[f.name] for _, a in self._pending]).astype(f.dtype)))
        self._pending, self._pending_n = [], 0
        batch = pa.record_batch(cols, schema=self._stream.schema)
        self.count += len(geoms)
        try:
            self._stream.put(batch)
        except Exception as exc:
            raise self._error(exc) from exc

    def _error(self, exc: BaseException) -> OutputError:
        return write_error(self.path, exc if isinstance(exc, OSError) else OSError(str(exc)))

    def prepare(self) -> None:
        """Phase 1: finish the file under its temporary name (fsynced)."""
        try:
            self._flush()
            self._stream.close()
            with open(self._tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        except OutputError:
            raise
        except Exception as exc:
            raise self._error(exc) from exc
        self._staged = True

    def check_publishable(self) -> None:
        """Refuse before any rename when the target appeared meanwhile and ``overwrite`` is false."""
        refuse_appeared(self.path, self.overwrite)

    def publish(self) -> None:
        """Phase 2: rename the finished file into place."""
        self.check_publishable()
        os.replace(self._tmp, self.path)
        self._staged, self._published, self.closed = False, True, True
        self._remove_tmp()
        fsync_dir(Path(self.path).parent)

    def rollback(self) -> None:
        """Remove the temporary file, or the published one."""
        if not self.closed:
            self.abort()
        self._remove_tmp()
        if self._published:
            Path(self.path).unlink(missing_ok=True)
            self._published = False
        self.closed = True

    def abort(self) -> None:
        """Stop writing and remove the temporary file."""
        if not self._staged:
            self._stream.abort()
        self._remove_tmp()
        self._pending = []
        self.closed = True
