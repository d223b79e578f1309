"""The library entry point: :func:`refine_file` does what ``refine run`` does.

Data flow: open the image and the coarse mask through ``io`` readers → build
the refiner and let it look at an overview (``prepare``) → plan the memory
budget and the tile grid → stream tiles through the engine into atomic
writers → return a :class:`~refine_cli.report.summary.RunReport` (also written
as JSON when asked).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refine_cli.config import RefineConfig
from refine_cli.engine.checkpoint import RunCheckpoint, file_identity, segment_rows_for
from refine_cli.engine.levels import LevelResult, run_levels
from refine_cli.engine.outputs import (
    OutputSpec,
    OutputWriter,
    bytes_per_pixel,
    mask_layout,
    uncertainty_dtype,
)
from refine_cli.errors import Interrupted, UsageError
from refine_cli.hashing import config_hash
from refine_cli.io.image import ImageSource, area_downscale
from refine_cli.io.masks import MaskSource
from refine_cli.io.paths import check_distinct
from refine_cli.io.readers import ArrayReader, Reader, open_raster
from refine_cli.io.vector import band_memory
from refine_cli.io.vector_sink import require_vector
from refine_cli.io.vectorize import PolygonWriter, VectorSpec
from refine_cli.io.writers import (
    RasterSink,
    SegmentedSink,
    check_creation,
    check_output,
    clean_stale_temps,
    default_tmp_dir,
    open_sink,
    output_format,
    write_bytes_atomic,
)
from refine_cli.refiners import build_refiner, uses_torch
from refine_cli.refiners.base import Refiner, Scene
from refine_cli.refiners.guard import GuardParams, guard_notes, guard_params, guard_report
from refine_cli.report.summary import RunReport, library_versions, peak_rss_bytes
from refine_cli.report.tiles import tile_map_entry
from refine_cli.report.timing import StageTimer
from refine_cli.segment import segment_file

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""``f(stage, done, total)``: progress callback."""


def default_output(image: str) -> str:
    """``<dir>/<stem>.refined.tif`` beside the input (stdout for ``-``)."""
    if image == "-":
        return "-"
    p = Path(image)
    return str(p.with_name(f"{p.stem}.refined.tif"))


def resolve_device(spec: str, needs_torch: bool) -> str:
    """Turn ``auto`` / ``cuda`` / ``cuda:N`` / ``cpu`` into a concrete device string.

    Raises:
        UsageError: CUDA asked for but not available.
    """
    if not needs_torch and not spec.startswith("cuda"):
        return "cpu"
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: no CUDA device is available here; use --device cpu")
        if ":" in spec and int(spec.split(":")[1]) >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        if not needs_torch:
            log.warning("this method runs on the CPU (OpenCV); --device %s has no effect", spec)
            return "cpu"
    return spec


def default_threads() -> int:
    """CPU threads of a run without ``--threads``.

    ``$REFINE_THREADS`` when it is a positive integer, else the cores this process may run on (its CPU
    affinity: ``taskset``, a container's cpuset), else all cores.
    """
    env = os.environ.get("REFINE_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    """Give OpenCV (and torch, if loaded) ``threads`` CPU threads (default: :func:`default_threads`)."""
    import sys

    import cv2

    n = threads or default_threads()
    cv2.setNumThreads(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    return n


def _mask_facts(mask: MaskSource) -> dict[str, Any]:
    return {"path": mask.path, "kind": mask.kind.kind, "classes": mask.classes,
            "height": mask.native_shape[0], "width": mask.native_shape[1],
            "resampled": not mask.same_resolution,
            **({"instance_ids": mask.kind.ids} if mask.kind.kind == "instances" else {})}


def _coarse_facts(mask: MaskSource | None, seg_facts: dict[str, Any] | None, save_coarse: str | None,
                  config: RefineConfig) -> dict[str, Any]:
    """The report's ``mask`` entry: the user's mask, the mask ``--segmenter`` made, or the method's own."""
    if mask is None:
        return {"path": None, "kind": "segmenter", "segmenter": config.segmenter or "preset default"}
    facts = _mask_facts(mask)
    if seg_facts is not None:
        facts.update(path=save_coarse, made_by=seg_facts)
    return facts


def _decoded_bytes(readers: list[Reader]) -> int:
    """Bytes that decoded inputs hold for the whole run.

    PNG/JPEG below ``--inline-limit`` are decoded whole: an item of every memory plan, so
    ``--max-memory`` bounds the process, not only the work.
    """
    unique = {id(r): r for r in readers}.values()
    return sum(int(r.array.nbytes) for r in unique if isinstance(r, ArrayReader))


def _utc_now() -> str:
    """The current time as ISO 8601 UTC with seconds (``2026-12-06T21:49:43Z``)."""
    import datetime as dt

    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Request:
    """The arguments of one :func:`refine_file` call (``out`` resolved, ``mask`` set once made)."""

    image: str
    mask: str | None
    out: str
    config: RefineConfig
    uncertainty: str | None
    report: str | None
    overwrite: bool
    fmt: str | None
    cog: bool
    bands: tuple[int, ...] | None
    progress: Progress | None
    resume: bool
    save_coarse: str | None
    command: str | None
    vector: VectorSpec | None = None


@dataclass
class _Inputs:
    """The opened inputs of a run (readers closed by :meth:`close`)."""

    readers: list[Reader] = field(default_factory=list)
    src: ImageSource | None = None
    mask: MaskSource | None = None
    seg_facts: dict[str, Any] | None = None
    seg_dir: str | None = None

    def close(self) -> None:
        """Close the readers and remove the folder of a coarse mask made by ``--segmenter``."""
        for r in self.readers:
            r.close()
        if self.seg_dir is not None:
            shutil.rmtree(self.seg_dir, ignore_errors=True)


@dataclass
class _Layout:
    """What the outputs hold: label map or probability, bands per pixel and the bytes they cost.

    ``segment_rows`` is the height of one segment of a resumable TIFF of that layout.
    """

    labels: bool
    channels: int
    bands: int
    dtype: np.dtype
    bytes_out: int
    spec: OutputSpec
    segment_rows: int


def refine_file(
    image: str,
    mask: str | None = None,
    out: str | None = None,
    *,
    config: RefineConfig | None = None,
    uncertainty: str | None = None,
    report: str | None = None,
    overwrite: bool = False,
    fmt: str | None = None,
    cog: bool = False,
    bands: tuple[int, ...] | None = None,
    progress: Progress | None = None,
    resume: bool = False,
    save_coarse: str | None = None,
    command: str | None = None,
    vector: VectorSpec | None = None,
) -> RunReport:
    """Refine the coarse mask of one image and write the results: open inputs, plan, run the engine, report.

    Args:
        image: image path, or ``-`` for bytes on stdin.
        mask: coarse mask path (``-`` for stdin); ``None`` makes it with ``config.segmenter`` (or
            the method's own segmenter, for magnet-fast).
        out: refined mask path (``-`` for stdout); default ``<stem>.refined.tif`` beside the image.
        config: what to compute (method, device, memory budget ...).
        uncertainty: uncertainty map path (uint8, 255 = most uncertain), or ``None``.
        report: JSON report path, or ``None``.
        overwrite: replace existing outputs.
        fmt: output format (``png`` | ``tiff``), default from the extension.
        cog: write Cloud-Optimised GeoTIFFs.
        bands: 0-based image bands to use as RGB.
        progress: progress callback.
        resume: continue an interrupted run from the parts it left beside ``out`` (TIFF
            outputs taller than one segment are always written resumably; see
            ``engine.checkpoint``).
        save_coarse: also keep the coarse mask that ``config.segmenter`` made at this path
            (low resolution, see ``refine_cli.segment``); only without ``mask``.
        command: the command line that started the run, recorded in the report.
        vector: also write the polygons of the refined hard mask (streamed by row band, see
            ``refine_cli.io.vectorize``; a resumed run starts again at row 0), or ``None``.

    Returns:
        The run report.

    Raises:
        RefineError: any problem a user can fix (bad input, existing output, missing weights ...).
    """
    req = _Request(image, mask, out or default_output(image), config or RefineConfig(), uncertainty, report,
                   overwrite, fmt, cog, bands, progress, resume, save_coarse, command, vector)
    t_start, started, timer = time.perf_counter(), _utc_now(), StageTimer()
    _check_request(req)
    device = resolve_device(req.config.device, uses_torch(req.config.method))
    threads = set_threads(req.config.threads)
    refiner = build_refiner(req.config, device)
    segment_first = _segment_first(req, refiner)
    inputs = _Inputs()
    try:
        scene, run = _execute(req, refiner, inputs, device, timer, segment_first)
    finally:
        inputs.close()
    wall = time.perf_counter() - t_start
    rep = _report(req, refiner, inputs, scene, run, device, timer, threads, started, wall)
    if req.report:
        _write_report(req, rep, run.writer)
    return rep


def _check_request(req: _Request) -> None:
    """Refuse clashing or existing outputs before any work; remove temporaries a killed run left."""
    if req.image == "-" and req.mask == "-":
        raise UsageError("only one of IMAGE and --mask can be read from stdin")
    vector = req.vector.path if req.vector else None
    check_distinct({"image": req.image, "--mask": req.mask},
                   {"-o": req.out, "--uncertainty": req.uncertainty, "--vector": vector,
                    "--report": req.report, "--save-coarse": req.save_coarse})
    if req.vector is not None:
        req.vector.check()
        require_vector()
    for path in (req.out, req.uncertainty, vector, req.report, req.save_coarse):
        if path:
            check_output(path, req.overwrite)
            if path != "-":
                for stale in clean_stale_temps(Path(path).parent, Path(path).name):
                    log.info("removed %s, left by a killed run", stale)
    _check_encoding(req)


def _check_encoding(req: _Request) -> None:
    """Refuse ``--co`` / ``--nodata`` / ``--dtype`` values the outputs cannot take, before any work.

    The mask's sample type is that of a binary mask here (the sinks check again with the exact one).
    """
    spec = _spec(req)
    creation = dict(req.config.encoding.creation)
    nodata = req.config.encoding.nodata
    _, mask_dtype = mask_layout(spec, 2, False)
    check_creation(req.out, creation, mask_dtype, 1, cog=req.cog, nodata=nodata, fmt=req.fmt,
                   resampling="average" if req.config.soft else "nearest")
    if req.uncertainty:
        check_creation(req.uncertainty, creation, uncertainty_dtype(spec), 1, cog=req.cog, nodata=nodata,
                       resampling="average")
    if nodata is not None and not req.config.soft and nodata in (0, 255):
        log.warning("--nodata %g is also a value of the hard mask (0 background, 255 foreground): GDAL-based "
                    "readers will treat those pixels as empty; choose another value, e.g. --nodata 1", nodata)


def _segment_first(req: _Request, refiner: Refiner) -> bool:
    """Whether ``--segmenter`` must make the coarse mask before the run (no ``--mask``, a plain refiner)."""
    own_segmenter = refiner.makes_coarse
    segment_first = req.mask is None and not own_segmenter
    if req.save_coarse and not segment_first:
        raise UsageError("--save-coarse keeps the mask that --segmenter makes: use it without --mask"
                         + (" (magnet-fast uses its segmenter's output inside; `refine segment` saves it)"
                            if own_segmenter else ""))
    if segment_first and not req.config.segmenter:
        raise UsageError(f"no --mask given: method {req.config.method!r} needs a coarse mask; pass --mask "
                         "MASK, or --segmenter NAME|FILE to make one in the same run (e.g. --segmenter "
                         "mediapipe-selfie for people)")
    if segment_first and req.image == "-":
        raise UsageError("--segmenter reads the image twice: save it to a file instead of piping it on stdin")
    return segment_first


@dataclass
class _Run:
    """What the engine did, for the report: its levels and the writer that holds the outputs."""

    levels: list[LevelResult]
    writer: OutputWriter
    guard: GuardParams | None


def _execute(req: _Request, refiner: Refiner, inputs: _Inputs, device: str, timer: StageTimer,
             segment_first: bool) -> tuple[Scene, _Run]:
    """Open the inputs, let the refiner prepare, open the outputs and stream every level through them.

    Outputs are removed when anything fails; an interrupted checkpointed run keeps its finished rows.
    """
    cfg = req.config
    tmp_dir = default_tmp_dir()
    writer: OutputWriter | None = None
    checkpoint: RunCheckpoint | None = None
    try:
        if segment_first:
            _segment(req, inputs, device, timer, tmp_dir)
        src, msk = _open_inputs(req, inputs, timer, tmp_dir)
        scene = _scene(req, src, msk, inputs, device, timer)
        refiner.prepare(scene)
        layout = _layout(req, refiner, msk, src.shape[1])
        checkpoint = _checkpoint(req, src, layout, segment_first)
        guard = guard_params(cfg, refiner, msk, src.shape)
        own_unc = guard is not None or refiner.provides_uncertainty
        writer, start_row = _open_writer(req, src, layout, checkpoint, own_unc)
        levels = run_levels(
            src, msk, refiner, writer, timer=timer, budget=cfg.max_memory,
            resident=scene.resident_bytes + (band_memory(src.shape[1]) if req.vector else 0),
            bytes_out=layout.bytes_out, overlap=cfg.overlap, tile_size=cfg.tile_size,
            batch_size=cfg.cascade.batch_size if refiner.uses_torch else 1, skip_uniform=cfg.skip_uniform,
            tmp_dir=tmp_dir, progress=req.progress, start_row=start_row, guard=guard,
            work_dir=checkpoint.path("levels") if checkpoint else None,
        )
        with timer.stage("write"):
            writer.commit()
        if checkpoint is not None:
            checkpoint.finish()
    except KeyboardInterrupt as exc:
        if writer is not None:
            writer.abort()
        if checkpoint is not None:
            raise Interrupted(f"interrupted; finished rows are kept in {checkpoint.dir}: rerun the same "
                              "command with --resume to continue") from exc
        raise Interrupted("interrupted; no output was written (temporary files removed)") from exc
    except BaseException:
        if writer is not None:
            writer.abort()
        if req.save_coarse and inputs.seg_facts is not None:  # the run's outputs are one unit: all or none
            Path(req.save_coarse).unlink(missing_ok=True)
        raise
    return scene, _Run(levels, writer, guard)


def _segment(req: _Request, inputs: _Inputs, device: str, timer: StageTimer, tmp_dir: str | None) -> None:
    """Make the coarse mask with ``--segmenter`` (kept at ``--save-coarse``, else in a temporary folder)."""
    inputs.seg_dir = tempfile.mkdtemp(prefix="refine-coarse-", dir=tmp_dir)
    req.mask = req.save_coarse or os.path.join(inputs.seg_dir, "coarse.tif")
    cfg = req.config
    with timer.stage("segment"):
        inputs.seg_facts = segment_file(req.image, req.mask, segmenter=str(cfg.segmenter), device=device,
                                        soft=None, overwrite=req.overwrite, bands=req.bands,
                                        max_pixels=cfg.max_pixels, inline_limit=cfg.inline_limit,
                                        progress=req.progress)


def _open_inputs(req: _Request, inputs: _Inputs, timer: StageTimer,
                 tmp_dir: str | None) -> tuple[ImageSource, MaskSource | None]:
    """Open the image and the coarse mask (its kind detected and checked against the image)."""
    cfg = req.config
    with timer.stage("read"):
        img_reader = open_raster(req.image, max_pixels=cfg.max_pixels, inline_limit=cfg.inline_limit,
                                 tmp_dir=tmp_dir, what="image")
        inputs.readers.append(img_reader)
        inputs.src = src = ImageSource(img_reader, req.bands)
        if req.mask is not None:
            mask_reader = open_raster(req.mask, max_pixels=cfg.max_pixels, inline_limit=cfg.inline_limit,
                                      tmp_dir=tmp_dir, what="mask")
            inputs.readers.append(mask_reader)
            inputs.mask = MaskSource(mask_reader, src.shape, classes=cfg.classes, kind=cfg.mask_kind,
                                     threshold=cfg.threshold)
    return src, inputs.mask


def _scene(req: _Request, src: ImageSource, msk: MaskSource | None, inputs: _Inputs, device: str,
           timer: StageTimer) -> Scene:
    """The whole-image context that the refiner's ``prepare`` sees: an overview, the budget, the mask."""
    cfg = req.config
    H, W = src.shape

    def read_overview(shape: tuple[int, int], binarize: bool = False) -> tuple[Any, Any]:
        def coarse_k(win: Any) -> Any:
            assert msk is not None
            k = msk.read_k(win)
            return (k >= cfg.threshold).astype("float32") if binarize and not msk.is_labels else k

        with timer.stage("read"):
            img = src.overview(shape)
            if msk is None:
                return img, None
            coarse = area_downscale(coarse_k, (H, W), shape)
        return img, coarse if msk.is_labels else coarse[..., 0]

    held = _decoded_bytes([*inputs.readers, *([msk.reader] if msk is not None else [])])
    scene = Scene(shape=(H, W), read_overview=read_overview, device=device, timer=timer,
                  progress=req.progress, image_source=src, has_mask=msk is not None,
                  max_memory=cfg.max_memory, resident_bytes=held)
    if msk is not None:
        scene.coarse_scale, scene.labels, scene.classes = H / msk.native_shape[0], msk.is_labels, msk.classes
        scene.bytes_out = bytes_per_pixel(_spec(req), msk.channels, msk.is_labels)
    return scene


def _spec(req: _Request) -> OutputSpec:
    return OutputSpec(mask=req.out, uncertainty=req.uncertainty, soft=req.config.soft,
                      threshold=req.config.threshold, fmt=req.fmt, cog=req.cog, overwrite=req.overwrite,
                      encoding=req.config.encoding)


def _layout(req: _Request, refiner: Refiner, msk: MaskSource | None, width: int) -> _Layout:
    """The outputs' layout.

    A method with its own label space (MagNet's segmenter) decides it; otherwise the user's mask does.
    """
    n_out = refiner.num_classes
    assert n_out or msk is not None
    labels = n_out > 2 if n_out else bool(msk and msk.is_labels)
    channels = (n_out or (msk.classes if msk else 1)) if labels else 1
    spec = _spec(req)
    bands_out, dtype_out = mask_layout(spec, channels, labels)
    return _Layout(labels, channels, bands_out, dtype_out, bytes_per_pixel(spec, channels, labels), spec,
                   segment_rows_for(width, bands_out * dtype_out.itemsize))


def _checkpoint(req: _Request, src: ImageSource, layout: _Layout,
                segment_first: bool, always: bool = False) -> RunCheckpoint | None:
    """The resume checkpoint of a TIFF output taller than one segment (files only, not stdin/stdout).

    ``always``: also for an output of one segment (a distributed run writes every output as parts).
    """
    H, W = src.shape
    one_segment = H <= layout.segment_rows and not always
    if req.out == "-" or output_format(req.out, req.fmt) != "tiff" or one_segment:
        return None
    if "-" in (req.image, req.mask):
        return None
    mask_id = (None if segment_first else file_identity(req.mask)) if req.mask else None
    return RunCheckpoint(req.out, {
        "config": config_hash(req.config.to_dict()), "image": file_identity(req.image), "mask": mask_id,
        "shape": [H, W],
        "outputs": {"uncertainty": bool(req.uncertainty), "cog": req.cog, "bands": req.bands},
    }, req.resume)


def _open_writer(req: _Request, src: ImageSource, layout: _Layout, checkpoint: RunCheckpoint | None,
                 refiner_uncertainty: bool) -> tuple[OutputWriter, int]:
    """The output writer and the first row still to write (0, or where an interrupted run stopped)."""
    H, W = src.shape
    seg_rows = layout.segment_rows
    resampling = "average" if req.config.soft else "nearest"
    mask_sink = _sink(req, req.out, (H, W), layout.bands, layout.dtype, src.georef, req.fmt, resampling,
                      checkpoint, "mask", seg_rows)
    unc_sink = None
    if req.uncertainty:
        unc_sink = _sink(req, req.uncertainty, (H, W), 1, uncertainty_dtype(layout.spec), src.georef, None,
                         "average", checkpoint, "uncertainty", seg_rows)
    start_row = min(getattr(k, "next_row", 0) for k in (mask_sink, unc_sink) if k is not None)
    if req.vector is not None and start_row:
        log.info("--vector: the polygons are made from the rows as they are refined; starting again at row 0")
        start_row = 0
    for k in (mask_sink, unc_sink):
        if isinstance(k, SegmentedSink) and k.next_row > start_row:
            k.rewind(start_row)
    vector = None
    if req.vector is not None:
        try:
            vector = PolygonWriter(req.vector, (H, W), src.georef, stats=True, overwrite=req.overwrite)
        except BaseException:
            for k in (mask_sink, unc_sink):
                if k is not None:
                    k.abort()
            raise
    empty = src.empty_rows if src.has_alpha else None
    return OutputWriter(layout.spec, layout.labels, mask_sink, unc_sink,
                        refiner_uncertainty=refiner_uncertainty, empty=empty, vector=vector), start_row


def _report(req: _Request, refiner: Refiner, inputs: _Inputs, scene: Scene, run: _Run, device: str,
            timer: StageTimer, threads: int, started: str, wall: float) -> RunReport:
    """The run report: inputs, method, tile counts, stage times, memory plan, guard counts, notes."""
    levels = run.levels
    assert inputs.src is not None
    cfg, (H, W) = req.config, inputs.src.shape
    resumed = int(levels[-1].stats.extra.get("resumed_from_row", 0))
    guard_level = levels[-1] if "guard" in levels[-1].stats.extra else None
    ran = list(levels)
    if guard_level is not None:  # the report's tiles and levels are the refiner's; the guard's go to `guard`
        levels = levels[:-1]
    guard_facts = guard_report(cfg, refiner, inputs.mask, run.guard,
                               None if guard_level is None else _guard_level_facts(guard_level))
    return RunReport(
        image={**{k: v for k, v in inputs.readers[0].describe().items() if k != "levels"},  # image reader
               "georeferenced": inputs.src.georef is not None,
               "rgb_bands": list(req.bands) if req.bands is not None else None},
        mask=_coarse_facts(inputs.mask, inputs.seg_facts, req.save_coarse, cfg),
        outputs={"mask": req.out, "uncertainty": req.uncertainty, "report": req.report,
                 "coarse": req.save_coarse,
                 **({"vector": req.vector.path, "polygons": run.writer.vector.count}
                    if req.vector is not None and run.writer.vector is not None else {})},
        method=refiner.name, refiner=refiner.describe(), device=device,
        tiles={"total": sum(lv.stats.tiles_total for lv in levels),
               "refined": sum(lv.stats.tiles_refined for lv in levels),
               "skipped": sum(lv.stats.tiles_skipped for lv in levels),
               "refiner_calls": sum(lv.stats.refiner_calls for lv in levels),
               "resumed_from_row": resumed},
        stages=timer.seconds(), wall_seconds=wall, megapixels=H * W / 1e6,
        megapixels_per_second=H * W / 1e6 / wall if wall > 0 else 0.0,
        peak_rss_bytes=peak_rss_bytes(), peak_gpu_bytes=_peak_gpu(device),
        memory_plan={"tile_size": levels[-1].grid.tile_size, "overlap": levels[-1].grid.overlap,
                     "halo": levels[-1].grid.halo, "queue_depth": levels[-1].memory.queue_depth,
                     "estimate_bytes": max(lv.memory.total for lv in ran), "budget": cfg.max_memory,
                     "items": levels[-1].memory.estimate},
        levels=[lv.to_dict() for lv in levels], versions=library_versions(),
        config={**cfg.to_dict(), "threads_used": threads},
        notes=list(scene.notes) + guard_notes(guard_facts), guard=guard_facts,
        started=started, finished=_utc_now(), command=req.command, workdir=os.getcwd(),
        tile_map=_tile_maps(levels[-1], guard_level),
    )


def _tile_maps(last: LevelResult, guard_level: LevelResult | None) -> dict[str, Any]:
    """The report's ``tile_map``: the refiner's full-resolution grid and the guard's, one byte per tile."""
    out: dict[str, Any] = {}
    for name, level in (("refine", last), ("guard", guard_level)):
        if level is None or level.stats.states is None:
            continue
        g = level.grid
        out[name] = tile_map_entry(g.shape, (g.tile_height, g.tile_width), g.row_starts, g.col_starts,
                                   level.stats.states)
    return out


def _guard_level_facts(level: LevelResult) -> dict[str, Any]:
    """The guard level's counts and plan, for the report's ``guard`` entry."""
    return {**level.stats.extra["guard"], "tiles": level.stats.tiles_total,
            "tiles_checked": level.stats.tiles_refined, "tile_size": level.grid.tile_size,
            "halo": level.grid.halo, "estimate_bytes": level.memory.total}


def _write_report(req: _Request, rep: RunReport, writer: OutputWriter) -> None:
    """Write the JSON report atomically; without it, none of the run's outputs stay."""
    assert req.report is not None
    try:
        write_bytes_atomic(req.report, rep.to_json().encode(), overwrite=req.overwrite)
    except BaseException:  # the run's outputs are one unit: without its report, none of them
        writer.take_back()
        if req.save_coarse:
            Path(req.save_coarse).unlink(missing_ok=True)
        raise


def _sink(req: _Request, path: str, shape: tuple[int, int], bands: int, dtype: np.dtype, georef: Any,
          fmt: str | None, resampling: str, checkpoint: RunCheckpoint | None, name: str,
          segment_rows: int) -> RasterSink:
    """A resumable segmented sink when the run is checkpointed and ``path`` is a TIFF, else the plain sink.

    A PNG beside a resumable TIFF is written whole; a resume then starts at row 0. Every sink gets the
    run's creation options and nodata tag (``config.encoding``).
    """
    enc = req.config.encoding
    creation, nodata = dict(enc.creation), enc.nodata
    if checkpoint is None or output_format(path, fmt) != "tiff":
        return open_sink(path, shape, bands, dtype, overwrite=req.overwrite, georef=georef, fmt=fmt,
                         cog=req.cog, inline_limit=req.config.inline_limit, resampling=resampling,
                         creation=creation, nodata=nodata)
    check_output(path, req.overwrite)
    return SegmentedSink(path, shape, bands, dtype, req.overwrite, parts_dir=checkpoint.path(name),
                         segment_rows=segment_rows, georef=georef, cog=req.cog, resampling=resampling,
                         creation=creation, nodata=nodata)


def _peak_gpu(device: str) -> int:
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not device.startswith("cuda"):
        return 0
    return int(torch.cuda.max_memory_allocated())


def describe_image(path: str, max_pixels: int = 50_000_000_000) -> dict[str, Any]:
    """Facts about an image for ``refine info``: size, bands, dtype, tiling, levels, georeferencing.

    A TIFF adds its encoding: compression, predictor, block ``[h, w]``, nodata, COG layout and
    overview factors (``io.creation.tiff_encoding``).
    """
    with open_raster(path, max_pixels=max_pixels, inline_limit=1 << 62, what="image") as r:
        facts = r.describe()
        tiled = getattr(r, "tiled", None)
        if tiled is not None:
            facts["tiled"] = tiled
    if path != "-" and Path(path).suffix.lower() in (".tif", ".tiff"):
        from refine_cli.io.creation import tiff_encoding

        facts.update(tiff_encoding(path))
    return facts

