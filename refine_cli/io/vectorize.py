"""Polygons of a mask into a vector file: the streamed polygonizer joined to its sink.

:class:`PolygonWriter` is what a run hands its finished rows to (``refine run --vector``);
:func:`vectorize_file` polygonizes an existing mask raster by bands (``refine vectorize``). Both keep
memory bounded (see :mod:`refine_cli.io.vector`) and write the file atomically
(:mod:`refine_cli.io.vector_sink`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from refine_cli.config import MASK_FG
from refine_cli.errors import InputError, UsageError
from refine_cli.io.commit import TwoPhaseOutput
from refine_cli.io.readers import Georef, open_raster
from refine_cli.io.vector import BandPolygonizer, PolygonOptions, parse_measure
from refine_cli.io.vector_sink import Field, VectorSink, vector_format
from refine_cli.tiling.grid import Window

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VectorSpec:
    """Where and how to write polygons.

    Attributes:
        path: the vector file (.gpkg, .geojson, .fgb, .parquet).
        fmt: ``gpkg`` | ``geojson`` | ``fgb`` | ``parquet``, default from the extension.
        simplify: tolerance ``"2"`` (map units) or ``"2px"`` (pixels), or ``None``.
        min_area: smallest area kept, ``"100"`` (map units²) or ``"50px"`` (pixels), or ``None``.
    """

    path: str
    fmt: str | None = None
    simplify: str | None = None
    min_area: str | None = None

    def check(self) -> None:
        """Validate the format and measures before any work.

        Raises:
            UsageError: bad extension, format, tolerance or area.
        """
        vector_format(self.path, self.fmt)
        parse_measure(self.simplify, "--simplify")
        parse_measure(self.min_area, "--min-area")

    def options(self, georef: Georef | None) -> PolygonOptions:
        """The polygon options in the coordinates of ``georef`` (pixel coordinates without it)."""
        simplify = parse_measure(self.simplify, "--simplify")
        min_area = parse_measure(self.min_area, "--min-area")
        if georef is None:
            if any(m is not None and not m.pixels for m in (simplify, min_area)):
                log.info("no georeferencing: --simplify and --min-area are in pixels")
            return PolygonOptions(simplify=simplify, min_area=min_area)
        return PolygonOptions(transform=tuple(float(v) for v in georef.transform),  # type: ignore[arg-type]
                              simplify=simplify, min_area=min_area)


class PolygonWriter(TwoPhaseOutput):
    """Rows of a class map in, polygons out to a vector file, atomically.

    Has the two-phase commit of the raster sinks (:class:`~refine_cli.io.commit.TwoPhaseOutput`), so it
    commits with the run's other outputs.

    Args:
        spec: the file and the polygon options.
        shape: ``(H, W)`` of the map.
        georef: georeferencing of the map, or ``None`` (pixel coordinates, no CRS).
        stats: rows come with probabilities and uncertainties (attributes ``prob_mean``, ``unc_mean``).
        overwrite: replace an existing file.
        band_rows: rows per polygonized band (default: about 4 MPx).
    """

    def __init__(self, spec: VectorSpec, shape: tuple[int, int], georef: Georef | None, *, stats: bool,
                 overwrite: bool, band_rows: int | None = None) -> None:
        fields = [Field("class", "int32"), Field("pixels", "int64")]
        if stats:
            fields += [Field("prob_mean", "float32"), Field("unc_mean", "float32")]
        self.path = spec.path
        if georef is None and vector_format(spec.path, spec.fmt) == "geojson":
            log.warning("%s: no georeferencing, so the coordinates are pixels (x = column, y = row down); "
                        "GeoJSON readers take them as WGS 84 longitude and latitude: prefer .gpkg or .fgb",
                        spec.path)
        self.sink = VectorSink(spec.path, fields, georef.crs_wkt if georef else None, spec.fmt, overwrite)
        self.polygonizer = BandPolygonizer(shape, self.sink.write, spec.options(georef), stats=stats,
                                           band_rows=band_rows)

    @property
    def closed(self) -> bool:
        """The file is published or dropped."""
        return self.sink.closed

    @property
    def count(self) -> int:
        """Polygons written so far."""
        return self.polygonizer.count

    def add(self, row0: int, cls: np.ndarray, prob: np.ndarray | None = None,
            unc: np.ndarray | None = None) -> None:
        """Rows ``[row0, row0 + n)``: ``(n, W)`` class map (0 = background), probability and uncertainty."""
        self.polygonizer.add(row0, cls, prob, unc)

    def prepare(self) -> None:
        """Emit the objects still held and finish the file under its temporary name."""
        self.polygonizer.finish()
        self.sink.prepare()

    def check_publishable(self) -> None:
        """See :meth:`VectorSink.check_publishable`."""
        self.sink.check_publishable()

    def publish(self) -> None:
        """Rename the file into place."""
        self.sink.publish()

    def rollback(self) -> None:
        """Remove the temporary or published file."""
        self.sink.rollback()

    def abort(self) -> None:
        """Drop the file."""
        self.sink.abort()


def mask_classes(block: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray | None]:
    """A mask block's class map, and its probabilities when the mask is soft.

    Args:
        block: ``(n, W)`` mask samples: integers are classes (0 = background, a binary mask's
            foreground keeps its value, e.g. 255); floats are probabilities in ``[0, 1]``.
        threshold: foreground threshold of a soft (float) mask.

    Returns:
        ``(n, W)`` uint8/uint16 class map (a soft mask's foreground is 255) and, for a soft mask,
        ``(n, W)`` float32 probabilities.
    """
    if np.issubdtype(block.dtype, np.floating):
        prob = np.clip(np.nan_to_num(block.astype(np.float32)), 0, 1)
        return np.where(prob >= threshold, MASK_FG, 0).astype(np.uint8), prob
    if block.dtype == np.bool_:
        return block.astype(np.uint8) * MASK_FG, None
    if block.size and (block.min() < 0 or block.max() > 65535):
        raise InputError("mask values must be 0 .. 65535 to be read as classes; give a label map")
    return block.astype(np.uint8 if block.dtype.itemsize == 1 else np.uint16, copy=False), None


def vectorize_file(mask: str, spec: VectorSpec, *, overwrite: bool = False, threshold: float = 0.5,
                   band_rows: int | None = None, max_pixels: int = 50_000_000_000) -> dict[str, Any]:
    """Polygonize a mask raster by row bands into ``spec.path``.

    Integer masks: every non-zero value is a class (``class`` attribute). Float masks are probabilities:
    foreground where ``>= threshold`` (class 255), with ``prob_mean`` and ``unc_mean`` (``1 - |2p - 1|``).

    Args:
        mask: a one-band mask (TIFF/GeoTIFF/PNG); its georeferencing is carried.
        spec: output file and polygon options.
        overwrite: replace an existing output.
        threshold: foreground threshold of float masks.
        band_rows: rows per band (default: about 4 MPx).
        max_pixels: decompression-bomb limit.

    Returns:
        ``{"path", "polygons", "height", "width", "georeferenced"}``.

    Raises:
        RefineError: unreadable mask, existing output, bad options.
    """
    spec.check()
    from pathlib import Path

    from refine_cli.io.paths import check_distinct
    from refine_cli.io.writers import clean_stale_temps

    check_distinct({"MASK": mask}, {"-o": spec.path})
    for stale in clean_stale_temps(Path(spec.path).parent, Path(spec.path).name):
        log.info("removed %s, left by a killed run", stale)
    with open_raster(mask, max_pixels=max_pixels, inline_limit=1 << 28, what="mask") as reader:
        if reader.bands != 1:
            raise UsageError(f"{mask} has {reader.bands} bands: vectorize takes a one-band mask")
        H, W = reader.shape
        soft = np.issubdtype(reader.dtype, np.floating)
        writer = PolygonWriter(spec, (H, W), reader.georef, stats=soft, overwrite=overwrite,
                               band_rows=band_rows)
        try:
            step = writer.polygonizer.band_rows
            for r in range(0, H, step):
                block = reader.read(Window(r, 0, min(step, H - r), W))[..., 0]
                cls, prob = mask_classes(block, threshold)
                unc = None if prob is None else 1 - np.abs(2 * prob - 1)
                writer.add(r, cls, prob, unc)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
    return {"path": spec.path, "polygons": writer.count, "height": H, "width": W,
            "georeferenced": reader.georef is not None}
