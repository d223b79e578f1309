"""Turn blended probabilities into the files a run writes.

* binary, hard (default): uint8 ``{0, 255}``, foreground where ``p >= threshold``.
* binary, ``soft``: float32 ``p`` in TIFF, uint8 ``round(255 p)`` in PNG.
* labels, hard: uint8 (uint16 above 256 classes) argmax of the class probabilities.
* labels, ``soft``: the C class probabilities as float32 bands (TIFF only).
* uncertainty: uint8 ``round(255 u)`` (255 = most uncertain) with
  ``u = 1 - |2p - 1|`` (binary) or ``u = 1 - (top1 - top2)`` of the class
  probabilities normalised to sum 1 (labels), unless the refiner supplies its own.
* ``--nodata VAL`` tags every TIFF output with VAL, and writes VAL where the image holds no data
  (its alpha band is 0); everywhere else, and in images without alpha, every pixel is computed.
* ``--dtype uint8|uint16|float32`` sets the sample type of the soft outputs (soft mask and
  uncertainty map) instead: ``round(255 v)``, ``round(65535 v)`` or ``v`` itself
  (:data:`~refine_cli.config.SOFT_SCALE`); PNG takes uint8 and uint16 only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from refine_cli.config import MASK_FG, SOFT_SCALE, EncodingOptions
from refine_cli.errors import OutputError, UsageError
from refine_cli.io.vectorize import PolygonWriter
from refine_cli.io.writers import RasterSink, SegmentedSink, output_format, resumable_error
from refine_cli.refiners.base import binary_uncertainty, margin_uncertainty


@dataclass
class OutputSpec:
    """What to write.

    Attributes:
        mask: output path (``-`` for stdout) or ``None``.
        uncertainty: uncertainty map path or ``None``.
        soft: probabilities instead of a hard mask.
        threshold: foreground threshold of the hard mask.
        fmt: ``png`` | ``tiff`` | ``None`` (from the extension).
        cog: write Cloud-Optimised GeoTIFFs.
        overwrite: replace existing files.
        encoding: creation options, nodata tag and soft sample type (``--co``, ``--nodata``, ``--dtype``).
    """

    mask: str | None
    uncertainty: str | None = None
    soft: bool = False
    threshold: float = 0.5
    fmt: str | None = None
    cog: bool = False
    overwrite: bool = False
    encoding: EncodingOptions = EncodingOptions()


def _soft_dtype(spec: OutputSpec, path: str, fmt: str | None, default: str) -> np.dtype:
    """Sample type of a soft output at ``path``: ``--dtype``, else ``default`` (float32: uint8 in PNG)."""
    png = output_format(path, fmt) == "png"
    chosen = spec.encoding.soft_dtype
    if chosen is None:
        return np.dtype(np.uint8 if png and default == "float32" else default)
    if png and chosen == "float32":
        raise UsageError(f"--dtype float32 cannot be stored in PNG {path}; use --dtype uint8 or uint16, "
                         "or a .tif")
    return np.dtype(chosen)


def mask_layout(spec: OutputSpec, classes: int, labels: bool) -> tuple[int, np.dtype]:
    """Bands and dtype of the mask output."""
    path = spec.mask or "out.tif"
    if labels:
        if spec.soft:
            return classes, _soft_dtype(spec, path, spec.fmt, "float32")
        return 1, np.dtype(np.uint8 if classes <= 256 else np.uint16)
    if spec.soft:
        return 1, _soft_dtype(spec, path, spec.fmt, "float32")
    return 1, np.dtype(np.uint8)


def uncertainty_dtype(spec: OutputSpec) -> np.dtype:
    """Sample type of the uncertainty map: ``--dtype``, else uint8."""
    return _soft_dtype(spec, spec.uncertainty or "u.tif", None, "uint8")


def encode_soft(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Probabilities or uncertainties in ``[0, 1]`` (float, any shape) as samples of ``dtype``.

    Returns:
        ``round(v * SOFT_SCALE)`` for uint8/uint16 (0..255 / 0..65535 = 0..1), ``v`` clipped as float32.
    """
    v = np.clip(values, 0, 1)
    out: np.ndarray
    if np.dtype(dtype).kind == "f":
        out = v.astype(np.float32)
    else:
        out = np.round(v * SOFT_SCALE[np.dtype(dtype).name]).astype(dtype)
    return out


def bytes_per_pixel(spec: OutputSpec, classes: int, labels: bool) -> int:
    """Bytes per pixel of all outputs together (for the memory budget)."""
    bands, dtype = mask_layout(spec, classes, labels)
    return bands * dtype.itemsize + (uncertainty_dtype(spec).itemsize if spec.uncertainty else 0)


class OutputWriter:
    """Converts blended row blocks and hands them to the sinks.

    Args:
        spec: what to write.
        labels: the probabilities are C class channels (else one foreground channel).
        mask_sink: sink of the mask, or ``None``.
        unc_sink: sink of the uncertainty map, or ``None``.
        refiner_uncertainty: the last blended channel is the refiner's own uncertainty.
        empty: ``f(row0, n) -> (n, W) bool``, True where the image holds no data (alpha 0); those
            pixels get ``spec.encoding.nodata`` in every output. ``None``: every pixel is computed.
        vector: polygons of the hard mask (``--vector``), or ``None``; each polygon's ``prob_mean`` is
            the mean probability of its class and ``unc_mean`` the mean of the uncertainty map's ``u``.
    """

    def __init__(self, spec: OutputSpec, labels: bool, mask_sink: RasterSink | None,
                 unc_sink: RasterSink | None, refiner_uncertainty: bool = False,
                 empty: Callable[[int, int], np.ndarray] | None = None,
                 vector: PolygonWriter | None = None) -> None:
        self.spec = spec
        self.labels = labels
        self.mask_sink = mask_sink
        self.unc_sink = unc_sink
        self.refiner_uncertainty = refiner_uncertainty
        self.empty = empty if spec.encoding.nodata is not None else None
        self.vector = vector

    @property
    def _sinks(self) -> list[RasterSink | PolygonWriter]:
        return [s for s in (self.mask_sink, self.unc_sink, self.vector) if s is not None]

    def write(self, row0: int, block: np.ndarray) -> None:
        """Write blended rows.

        Args:
            row0: first image row of the block.
            block: ``(n, W, C[+1])`` float32 blended channels.
        """
        probs = block[..., :-1] if self.refiner_uncertainty else block
        hole = self.empty(row0, block.shape[0]) if self.empty is not None else None
        if hole is not None and not hole.any():
            hole = None
        nodata = self.spec.encoding.nodata
        if self.mask_sink is not None:
            samples = self.convert_mask(probs)
            if hole is not None:
                samples[hole] = nodata
            self.mask_sink.write_rows(row0, samples)
        unc = None
        if self.unc_sink is not None:
            unc = np.clip(block[..., -1] if self.refiner_uncertainty else self.uncertainty(probs), 0, 1)
            samples = encode_soft(unc, self.unc_sink.dtype)
            if hole is not None:
                samples[hole] = nodata
            self.unc_sink.write_rows(row0, samples)
        if self.vector is not None:
            self._polygons(row0, block, unc)

    def _polygons(self, row0: int, block: np.ndarray, unc: np.ndarray | None) -> None:
        """Hand the rows to the polygon writer in chunks of about 1 MPx (bounded temporaries).

        ``unc``: the block's ``(n, W)`` uncertainty when already computed, else ``None``.
        """
        assert self.vector is not None
        step = max(1, (1 << 20) // max(1, block.shape[1]))
        for r in range(0, block.shape[0], step):
            part = block[r:r + step]
            probs = part[..., :-1] if self.refiner_uncertainty else part
            if unc is not None:
                u = unc[r:r + step]
            else:
                u = np.clip(part[..., -1] if self.refiner_uncertainty else self.uncertainty(probs), 0, 1)
            cls, prob = self.classes(probs)
            self.vector.add(row0 + r, cls, prob, u)

    def classes(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The hard class map of ``(n, W, C)`` probabilities and each pixel's probability of its class.

        Returns:
            ``(n, W)`` uint8/uint16 classes (binary: 255 = foreground, labels: the argmax) and ``(n, W)``
            float32 in ``[0, 1]`` (binary: ``p``; labels: the class's share of the probabilities' sum).
        """
        if not self.labels:
            p = np.clip(probs[..., 0], 0, 1).astype(np.float32)
            return np.where(p >= self.spec.threshold, MASK_FG, 0).astype(np.uint8), p
        top = np.argmax(probs, axis=-1)
        total = probs.sum(axis=-1)
        share = np.take_along_axis(probs, top[..., None], axis=-1)[..., 0]
        prob = np.divide(share, total, out=np.zeros_like(share), where=total > 0).astype(np.float32)
        return top.astype(np.uint8 if probs.shape[-1] <= 256 else np.uint16), prob

    def convert_mask(self, probs: np.ndarray) -> np.ndarray:
        """``(n, W, C)`` probabilities to the mask sink's samples."""
        assert self.mask_sink is not None
        dtype = self.mask_sink.dtype
        out: np.ndarray
        if self.labels:
            out = encode_soft(probs, dtype) if self.spec.soft else np.argmax(probs, axis=-1).astype(dtype)
            return out
        p = probs[..., 0]
        if self.spec.soft:
            out = encode_soft(p, dtype)
        else:
            out = np.where(p >= self.spec.threshold, MASK_FG, 0).astype(np.uint8)
        return out

    def uncertainty(self, probs: np.ndarray) -> np.ndarray:
        """Default uncertainty of blended probabilities, ``(n, W)`` float32 in [0, 1]."""
        if not self.labels:
            return binary_uncertainty(probs[..., 0])
        total = probs.sum(axis=-1, keepdims=True)
        norm = np.divide(probs, total, out=np.zeros_like(probs), where=total > 0)
        return margin_uncertainty(norm)

    def commit(self) -> None:
        """Finish the outputs as one unit: all of them (with their sidecars) exist afterwards, or none.

        Phase 1 prepares every file under its temporary name (encoding, assembling segments,
        fsync); phase 2 renames them, stdout last (it cannot be taken back). If any step fails,
        every temporary and every file of this unit already renamed is removed (the parts of a
        resumable run stay), and the error is raised.
        """
        sinks = self._sinks
        current: RasterSink | PolygonWriter | None = None
        try:
            for current in sinks:
                current.prepare()
            for current in sinks:
                current.check_publishable()
            for current in sorted(sinks, key=lambda k: k.path == "-"):
                current.publish()
        except BaseException as exc:
            for sink in sinks:
                sink.rollback()
            kept = next((s.resume_dir for s in sinks if isinstance(s, SegmentedSink)), None)
            if kept is not None and current is not None and isinstance(exc, OutputError) and \
                    getattr(exc, "kept", None) is None:
                # e.g. a PNG uncertainty map beside a resumable TIFF mask: say that the parts are kept
                raise resumable_error(current.path, kept, exc) from exc
            raise
        for sink in sinks:
            sink.cleanup()

    def take_back(self) -> None:
        """Remove the outputs :meth:`commit` published; bytes sent to stdout stay sent.

        Used when a later file of the run, such as the report, could not be written: the run's
        outputs are one unit.
        """
        for sink in self._sinks:
            if sink.path != "-":
                sink.rollback()

    def abort(self) -> None:
        """Remove partial files."""
        for sink in self._sinks:
            if not sink.closed:
                sink.abort()
