"""One image on a Dask cluster: ``refine run IMAGE --mask M -o OUT --scheduler local:N | tcp://HOST:PORT``.

Steps:

1. **Client, once.** The inputs are opened and checked, the refiner is built and ``prepare``-d
   (CascadePSP's global step on the streamed overview, the guided filter's radius ...), the
   output layout, the resume checkpoint (``engine.checkpoint``, always on here) and the guard
   are decided exactly as :func:`refine_cli.api.refine_file` decides them.
2. **Shipping, through shared storage.** The image and mask sources and the prepared refiner are
   pickled once (:func:`pack_context`) into ``context/<hash>.pkl`` in the parts folder, and every
   task names that file (a scattered copy would be lost with the worker that held it): readers of
   files travel as their path and are reopened on the worker, the refiner's network travels as a
   name and is rebuilt on the worker from the run's configuration (its weights from the worker's
   own cache, as on the client). What is written is small: decoded in-memory inputs (a PNG mask
   under ``--inline-limit``) and the refiner's prepared state (CascadePSP's global step maps at the
   working size), 30 to 200 KB in the runs of ``tests/test_cluster.py`` and ``benchmarks/cluster.py``.
3. **Levels, band by band.** Each level of the run (``engine.bands.level_steps``: the refiner's
   levels, then the guard's) is cut into row bands on segment boundaries of its output; one Dask
   task runs one band (``engine.bands.run_band``) and writes its rows as atomically renamed
   segments into the parts folder beside the output (``.<name>.refine-parts/``: ``mask/``,
   ``uncertainty/``, and ``levels/`` for inner levels). When a level's bands are done, the client
   joins an inner level's segments into the level file the next level reads, and for the last
   level assembles the outputs (TIFF or COG) and renames them into place, then writes the report.

Storage: the outputs' folder (and the inputs) must be reachable under the same paths from the
client and every worker (a shared filesystem). Each task plans its tiles for ``--max-memory``
as a single-process run does, so a worker process holds about one budget per thread.
Failures: Dask retries a task that raised (:data:`RETRIES`) and reschedules the tasks of a
worker that died; a band writes only whole segments, so a retry or a ``--resume`` redoes at most
the unfinished band. Resume: ``--resume`` keeps every complete segment and level file of the
same configuration and inputs and submits only the bands that miss one.

``magnet-fast`` is refused (``Refiner.cluster_ready``): each of its stages is a level whose pass B
reads the refined patches (R, scores, the top-k cut) that the client keeps in memory and in local
temporary files, which a worker on another machine cannot read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import logging
import os
import pickle
import threading
import time
import types
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from refine_cli.api import (
    Progress,
    _check_request,
    _checkpoint,
    _Inputs,
    _Layout,
    _layout,
    _open_inputs,
    _open_writer,
    _report,
    _Request,
    _Run,
    _scene,
    _utc_now,
    _write_report,
    default_output,
    resolve_device,
    set_threads,
)
from refine_cli.batch.dask import _import_distributed, open_client
from refine_cli.config import RefineConfig
from refine_cli.engine.bands import (
    LevelStep,
    band_rows,
    bands,
    level_steps,
    run_band,
    step_coarse,
    step_refiner,
)
from refine_cli.engine.checkpoint import RunCheckpoint, segment_rows_for
from refine_cli.engine.levels import LevelResult, LevelSettings, level_grid
from refine_cli.engine.outputs import OutputSpec, OutputWriter
from refine_cli.engine.runner import GridStats
from refine_cli.errors import Interrupted, RefineError, UsageError
from refine_cli.io.image import ImageSource, LevelImage, image_level
from refine_cli.io.masks import MaskSource
from refine_cli.io.readers import ArrayReader, Reader, TiffReader, open_raster
from refine_cli.io.writers import SegmentedSink, default_tmp_dir, output_format, write_bytes_atomic
from refine_cli.refiners import build_refiner, uses_torch
from refine_cli.refiners.base import Refiner
from refine_cli.refiners.guard import GuardParams, guard_params
from refine_cli.report.summary import RunReport
from refine_cli.report.timing import StageTimer

log = logging.getLogger(__name__)

RETRIES = 2
"""Times Dask reruns a band task that raised (a dead worker's tasks are rescheduled on their own)."""


# -- shipping the prepared state ---------------------------------------------------------------
_LOCKS = (type(threading.Lock()), type(threading.RLock()))


def _progress_hook(obj: Any) -> bool:
    """A progress callback of the client (a local function, a lambda, the command line's bars): dropped."""
    if isinstance(obj, types.FunctionType | types.MethodType):
        return "<lambda>" in obj.__qualname__ or "<locals>" in obj.__qualname__
    return type(obj).__module__.startswith(("refine_cli.commands", "rich."))


def pack_context(src: ImageSource, mask: MaskSource | None, refiner: Refiner) -> bytes:
    """Pickle the image and mask sources and the prepared refiner for the workers.

    File readers become their path (reopened by :func:`unpack_context`), the refiner's network
    (``refiner.model``) a name (rebuilt from the configuration), Python modules their name, locks
    new locks, the client's progress callbacks nothing; in-memory readers travel whole.

    Raises:
        UsageError: the refiner's prepared state cannot be pickled.
    """
    model = getattr(refiner, "model", None)

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            if model is not None and obj is model:
                return ("model",)
            if isinstance(obj, types.ModuleType):
                return ("module", obj.__name__)
            if isinstance(obj, Reader) and not isinstance(obj, ArrayReader):
                return ("reader", obj.path)
            if isinstance(obj, _LOCKS):
                return ("lock", isinstance(obj, _LOCKS[1]))
            if _progress_hook(obj):
                return ("none",)
            return None

    buf = io.BytesIO()
    try:
        _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump((src, mask, refiner))
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise UsageError(f"--method {refiner.name}: its prepared state cannot be sent to Dask workers "
                         f"({exc}); run without --scheduler") from None
    return buf.getvalue()


def unpack_context(data: bytes, config: RefineConfig, device: str) -> tuple[ImageSource, MaskSource | None,
                                                                             Refiner]:
    """Rebuild what :func:`pack_context` packed (on a worker): readers reopened, the network rebuilt."""
    fresh: list[Refiner] = []
    tmp_dir = default_tmp_dir()

    class _Unpickler(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            kind = pid[0]
            if kind == "model":
                if not fresh:
                    fresh.append(build_refiner(config, device))
                return fresh[0].model  # type: ignore[attr-defined]
            if kind == "module":
                return importlib.import_module(pid[1])
            if kind == "lock":
                return threading.RLock() if pid[1] else threading.Lock()
            if kind == "reader":
                return open_raster(pid[1], max_pixels=config.max_pixels, inline_limit=config.inline_limit,
                                   tmp_dir=tmp_dir)
            return None

    src, mask, refiner = _Unpickler(io.BytesIO(data)).load()
    return src, mask, refiner


_CONTEXTS: dict[tuple[str, int], tuple[ImageSource, MaskSource | None, Refiner]] = {}
_CONTEXT_LOCK = threading.Lock()


def _context(path: str, config: RefineConfig) -> tuple[ImageSource, MaskSource | None, Refiner]:
    """The unpacked context of a run, once per worker thread (readers are not shared across threads).

    Args:
        path: the packed context in the run's parts folder (its name holds its hash).
        config: the run's configuration.
    """
    key = (path, threading.get_ident())
    with _CONTEXT_LOCK:
        ctx = _CONTEXTS.get(key)
    if ctx is None:
        device = resolve_device(config.device, uses_torch(config.method))
        set_threads(config.threads)
        with open(path, "rb") as f:
            ctx = unpack_context(f.read(), config, device)
        with _CONTEXT_LOCK:
            for old in [k for k in _CONTEXTS if k[1] == key[1]]:
                _close_context(_CONTEXTS.pop(old))
            _CONTEXTS[key] = ctx
    return ctx


def _close_context(ctx: tuple[ImageSource, MaskSource | None, Refiner]) -> None:
    src, mask, _ = ctx
    src.reader.close()
    if mask is not None:
        mask.reader.close()


# -- one band on a worker -------------------------------------------------------------------
@dataclass
class LevelJob:
    """What every band of one level needs (pickled into each task; small).

    Attributes:
        config: the run's configuration.
        guard: the guard's parameters (or ``None``).
        step: the level.
        settings: budget, overlap, tile size, batch (the timer is replaced per task).
        previous: the previous level's float32 file, or ``None``.
        image: a level image built by the client (a TIFF path) when the level is neither the image
            size nor one of its pyramid levels, else ``None``.
        parts: ``{output: parts folder}``: ``mask`` / ``uncertainty`` on the final level,
            ``level`` for an inner level.
        shape_out: ``{output: (bands, dtype name)}``.
        segment_rows: rows per segment of this level's outputs.
        spec: the outputs (final level).
        labels: the outputs are a label map (final level).
        own_uncertainty: the last blended channel is the refiner's or the guard's uncertainty.
    """

    config: RefineConfig
    guard: GuardParams | None
    step: LevelStep
    settings: LevelSettings
    previous: str | None
    image: str | None
    parts: dict[str, str]
    shape_out: dict[str, tuple[int, str]]
    segment_rows: int
    spec: OutputSpec | None = None
    labels: bool = False
    own_uncertainty: bool = False

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the client's stage timer (a worker times its band with its own)."""
        kw = {f.name: getattr(self.settings, f.name) for f in fields(LevelSettings) if f.name != "timer"}
        return {**self.__dict__, "settings": kw}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """See :meth:`__getstate__`."""
        self.__dict__.update({**state, "settings": LevelSettings(timer=StageTimer(), **state["settings"])})


class _SinkRows:
    """``write(row0, block)`` into a sink's ``write_rows`` (an inner level's float32 band)."""

    def __init__(self, sink: SegmentedSink) -> None:
        self.sink = sink

    def write(self, row0: int, block: np.ndarray) -> None:
        """Write blended rows ``(n, W, K)``."""
        self.sink.write_rows(row0, block)


def _band_sinks(job: LevelJob, rows: tuple[int, int]) -> dict[str, SegmentedSink]:
    shape = job.step.shape
    return {name: SegmentedSink(os.path.join(folder, f"{name}.tif"), shape, job.shape_out[name][0],
                                job.shape_out[name][1], True, parts_dir=folder,
                                segment_rows=job.segment_rows, rows=rows)
            for name, folder in job.parts.items()}


def band_task(context: str, job: LevelJob, rows: tuple[int, int]) -> dict[str, Any]:
    """One band of one level on a Dask worker; returns its tile counts (and guard counts).

    ``context`` is the path of the packed image, mask and refiner (:func:`pack_context`).

    Must stay importable as ``refine_cli.cluster.band_task`` (Dask pickles it by reference).
    """
    import warnings

    warnings.filterwarnings("ignore", module="rasterio")  # as the CLI does
    t0 = time.perf_counter()
    src, mask, refiner = _context(context, job.config)
    step = job.step
    level_refiner = step_refiner(step, refiner, job.guard, src.shape)
    coarse = step_coarse(step, refiner, mask, job.previous)
    image, level_reader = _level_image(src, step.shape, job.image)
    sinks = _band_sinks(job, rows)
    writer: Any
    if step.final:
        assert job.spec is not None
        writer = OutputWriter(job.spec, job.labels, sinks["mask"], sinks.get("uncertainty"),
                              refiner_uncertainty=job.own_uncertainty)
    else:
        writer = _SinkRows(sinks["level"])
    timer = StageTimer()
    settings = dataclasses.replace(job.settings, timer=timer)
    try:
        stats = run_band(image, coarse, level_refiner, step, rows, writer, settings)
        for sink in sinks.values():
            sink.commit()
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    finally:
        if level_reader is not None:
            level_reader.close()
        if job.previous is not None:
            _close_coarse(coarse, mask)
    guard = level_refiner.describe() if step.guard else None
    return {"rows": rows, "stats": stats, "guard": guard, "seconds": time.perf_counter() - t0,
            "stages": timer.seconds(), "pid": os.getpid()}


def _level_image(src: ImageSource, shape: tuple[int, int],
                 built: str | None) -> tuple[LevelImage, Reader | None]:
    """The level's image: level 0, a pyramid level of the file, or the level the client built."""
    if built is None:
        return image_level(src, shape), None
    reader = TiffReader(built)
    return LevelImage(reader.read, shape, reader=None), reader


# -- the client --------------------------------------------------------------------------------
@dataclass
class _Cluster:
    """The client's view of a run: what it sends and what came back."""

    client: Any
    context: str
    retries: int
    progress: Progress | None
    band_rows: int | None
    reused: int = 0
    submitted: int = 0
    workers: set[int] = field(default_factory=set)
    seconds: float = 0.0
    context_bytes: int = 0
    slots: int = 1


def refine_on_cluster(
    image: str,
    mask: str | None = None,
    out: str | None = None,
    *,
    scheduler: str,
    config: RefineConfig | None = None,
    uncertainty: str | None = None,
    report: str | None = None,
    overwrite: bool = False,
    fmt: str | None = None,
    cog: bool = False,
    bands: tuple[int, ...] | None = None,
    progress: Progress | None = None,
    resume: bool = False,
    command: str | None = None,
    band_rows: int | None = None,
    retries: int = RETRIES,
) -> RunReport:
    """:func:`refine_cli.api.refine_file` with the row bands of every level run as Dask tasks.

    The outputs are bit for bit those of ``refine_file`` with the same arguments (see the module
    docstring for what runs where).

    Args:
        scheduler: ``local:N`` (N worker processes here) or ``tcp://HOST:PORT``.
        band_rows: rows per band (rounded up to a segment of the output); default: about two
            bands per worker thread (``engine.bands.band_rows``).
        retries: reruns of a band task that raised.
        image: image path (a file every worker can read).
        mask: coarse mask path (required here).
        out: refined mask path (``.tif``); default ``<stem>.refined.tif`` beside the image.
        config: what to compute, as for ``refine_file``.
        uncertainty: uncertainty map path (``.tif``), or ``None``.
        report: JSON report path, or ``None``.
        overwrite: replace existing outputs.
        fmt: output format (``tiff``).
        cog: write Cloud-Optimised GeoTIFFs.
        bands: 0-based image bands to use as RGB.
        progress: progress callback (``f(stage, bands done, bands)`` per level).
        resume: reuse the complete parts of an interrupted run of the same configuration and inputs.
        command: the command line that started the run, recorded in the report.

    Raises:
        RefineError: any problem a user can fix; ``UsageError`` for what ``--scheduler`` refuses
            (stdin/stdout, PNG outputs, no ``--mask``, ``magnet-fast``, ``--co``/``--nodata``/``--dtype``).
    """
    req = _Request(image, mask, out or default_output(image), config or RefineConfig(), uncertainty, report,
                   overwrite, fmt, cog, bands, progress, resume, None, command)
    _check_cluster_request(req)
    t_start, started, timer = time.perf_counter(), _utc_now(), StageTimer()
    _check_request(req)
    device = resolve_device(req.config.device, uses_torch(req.config.method))
    threads = set_threads(req.config.threads)
    refiner = build_refiner(req.config, device)
    if not refiner.cluster_ready:
        raise UsageError(f"--method {req.config.method} keeps each stage's refined patches in this process "
                         "between its levels: run it without --scheduler")
    inputs = _Inputs()
    try:
        with open_client(scheduler) as client:
            cl = _Cluster(client, "", retries, progress, band_rows)
            workers = client.scheduler_info().get("workers", {}).values()
            cl.slots = max(1, sum(int(w.get("nthreads", 1)) for w in workers))
            scene, run = _execute(req, refiner, inputs, cl, device, timer)
    finally:
        inputs.close()
    wall = time.perf_counter() - t_start
    rep = _report(req, refiner, inputs, scene, run, device, timer, threads, started, wall)
    rep.notes.append(f"dask: {cl.submitted} band tasks on {scheduler} ({len(cl.workers)} worker processes, "
                     f"{cl.seconds:.1f} s of task time, {cl.context_bytes} bytes of prepared state "
                     "on shared storage), "
                     f"{cl.reused} bands reused from an interrupted run")
    if req.report:
        _write_report(req, rep, run.writer)
    return rep


def _check_cluster_request(req: _Request) -> None:
    """What ``--scheduler`` refuses, each in one line."""
    if "-" in (req.image, req.mask, req.out):
        raise UsageError("--scheduler reads and writes files that every worker can reach: no - for "
                         "stdin/stdout")
    if req.mask is None:
        raise UsageError("--scheduler needs --mask (make a coarse mask first with `refine segment`)")
    for path, fmt in ((req.out, req.fmt), (req.uncertainty, None)):
        if path and output_format(path, fmt) != "tiff":
            raise UsageError(f"--scheduler writes tiled TIFFs assembled from parts: give {path} a .tif name")
    if not req.config.encoding.is_default:
        raise UsageError("--scheduler writes its parts with the default encoding: leave out --co, --nodata "
                         "and --dtype, or run without --scheduler")


def _execute(req: _Request, refiner: Refiner, inputs: _Inputs, cl: _Cluster, device: str,
             timer: StageTimer) -> tuple[Any, _Run]:
    """Prepare on the client, run every level's bands on the cluster, assemble and commit the outputs."""
    cfg = req.config
    src, msk = _open_inputs(req, inputs, timer, default_tmp_dir())
    scene = _scene(req, src, msk, inputs, device, timer)
    refiner.prepare(scene)
    layout = _layout(req, refiner, msk, src.shape[1])
    checkpoint = _checkpoint(req, src, layout, False, always=True)
    assert checkpoint is not None
    guard = guard_params(cfg, refiner, msk, src.shape)
    own_unc = guard is not None or refiner.provides_uncertainty
    settings = LevelSettings(StageTimer(), cfg.max_memory, layout.bytes_out, cfg.overlap, cfg.tile_size,
                             cfg.cascade.batch_size if refiner.uses_torch else 1, cfg.skip_uniform, None, 0,
                             scene.resident_bytes)
    steps = level_steps(refiner, src.shape, None if msk is None else msk.is_labels, guard)
    packed = pack_context(src, msk, refiner)
    cl.context_bytes = len(packed)
    cl.context = os.path.join(checkpoint.path("context"), f"{hashlib.sha256(packed).hexdigest()[:16]}.pkl")
    write_bytes_atomic(cl.context, packed)
    writer: OutputWriter | None = None
    try:
        levels, previous = [], None
        for step in steps:
            job = LevelJob(cfg, guard, step, settings, previous, None, {}, {}, 0, layout.spec, layout.labels,
                           own_unc)
            level, previous = _run_level(cl, job, refiner, msk, src, checkpoint, req.uncertainty, layout,
                                         timer)
            levels.append(level)
        writer, start_row = _open_writer(req, src, layout, checkpoint, own_unc)
        if start_row != src.shape[0]:
            raise RuntimeError(f"the bands left rows from {start_row} unwritten")
        with timer.stage("write"):
            writer.commit()
        checkpoint.finish()
    except KeyboardInterrupt as exc:
        if writer is not None:
            writer.abort()
        raise Interrupted(f"interrupted; finished bands are kept in {checkpoint.dir}: rerun the same command "
                          "with --resume to continue") from exc
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return scene, _Run(levels, writer, guard)


def _outputs(job: LevelJob, checkpoint: RunCheckpoint, uncertainty: str | None, layout: _Layout,
             channels: int) -> None:
    """Fill in the level's outputs: their parts folders, bands and dtypes, and rows per segment."""
    step = job.step
    if step.final:
        job.parts = {"mask": checkpoint.path("mask")}
        job.shape_out = {"mask": (layout.bands, layout.dtype.name)}
        if uncertainty:
            job.parts["uncertainty"] = checkpoint.path("uncertainty")
            job.shape_out["uncertainty"] = (1, "uint8")
        job.segment_rows = layout.segment_rows
        return
    h, w = step.shape
    job.parts = {"level": checkpoint.path(f"levels/level{step.index}_{h}x{w}")}
    job.shape_out = {"level": (channels, "float32")}
    job.segment_rows = segment_rows_for(w, 4 * channels)


def _run_level(cl: _Cluster, job: LevelJob, refiner: Refiner, mask: MaskSource | None, src: ImageSource,
               checkpoint: RunCheckpoint, uncertainty: str | None, layout: _Layout,
               timer: StageTimer) -> tuple[LevelResult, str | None]:
    """Run one level's missing bands on the cluster; the level's result and, if inner, its file."""
    step = job.step
    level_refiner = step_refiner(step, refiner, job.guard, src.shape)
    coarse = step_coarse(step, refiner, mask, job.previous)
    built: LevelImage | None = None
    try:
        channels, mplan, grid = level_grid(step.shape, level_refiner, coarse, step.carries_uncertainty and
                                           not step.final, step.final, job.settings)
        _outputs(job, checkpoint, uncertainty, layout, channels)
        h, w = step.shape
        level_file = None if step.final else os.path.join(checkpoint.path("levels"),
                                                          f"level{step.index}_{h}x{w}.tif")
        todo = [] if level_file is not None and _whole(level_file, step.shape, channels) else \
            bands(h, band_rows(grid, job.segment_rows, cl.band_rows, cl.slots))
        missing = [b for b in todo if not _band_done(job, b)]
        cl.reused += len(todo) - len(missing)
        if missing and step.shape != src.shape and tuple(step.shape) not in map(tuple, src.level_shapes):
            with timer.stage("read"):
                built = image_level(src, step.shape, tmp_dir=checkpoint.path("images"))
            assert built.reader is not None
            job.image = built.reader.path
        stats = _submit(cl, job, missing, timer)
        stats.tiles_total = len(grid)
        if level_file is not None and todo:
            with timer.stage("write"):
                SegmentedSink(level_file, step.shape, channels, "float32", True, parts_dir=job.parts["level"],
                              segment_rows=job.segment_rows).commit()
    finally:
        if built is not None:
            built.close()
        _close_coarse(coarse, mask)
    return LevelResult(step.shape, stats, mplan, grid), level_file


def _close_coarse(coarse: Any, mask: MaskSource | None) -> None:
    """Close the level files a level's coarse input opened (not the user's mask)."""
    for part in getattr(coarse, "parts", (coarse,)):
        if part is not mask and part is not None and not isinstance(part.reader, ArrayReader):
            part.reader.close()


def _whole(path: str, shape: tuple[int, int], channels: int) -> bool:
    """Whether a level file of the right size is already there (renamed in when whole)."""
    from refine_cli.engine.levels import _complete

    return _complete(path, shape, channels)


def _band_done(job: LevelJob, rows: tuple[int, int]) -> bool:
    """Whether every output segment of the band is already complete (written by an earlier run)."""
    seg = job.segment_rows
    for name, folder in job.parts.items():
        sink = SegmentedSink(os.path.join(folder, f"{name}.tif"), job.step.shape, job.shape_out[name][0],
                             job.shape_out[name][1], True, parts_dir=folder, segment_rows=seg, rows=rows)
        if not all(sink.segment_complete(i) for i in range(rows[0] // seg, -(-rows[1] // seg))):
            return False
    return True


def _submit(cl: _Cluster, job: LevelJob, todo: list[tuple[int, int]], timer: StageTimer) -> GridStats:
    """Run the bands ``todo`` as Dask tasks; their summed counts (guard counts in ``extra``)."""
    distributed = _import_distributed()
    step = job.step
    total = GridStats(pixels=step.shape[0] * step.shape[1])
    name = f"level {step.index + 1} bands" + (" (guard)" if step.guard else "")
    futures = [cl.client.submit(band_task, cl.context, job, rows, pure=False, retries=cl.retries,
                                key=f"refine-band-{step.index}-{rows[0]}-{time.time_ns()}") for rows in todo]
    done = 0
    if cl.progress is not None:
        cl.progress(name, 0, len(todo))
    try:
        with timer.stage("refine"):
            for fut in distributed.as_completed(futures):
                res = _result(fut, step, job)
                _add(total, res)
                cl.workers.add(res["pid"])
                cl.seconds += res["seconds"]
                done += 1
                if cl.progress is not None:
                    cl.progress(name, done, len(todo))
    finally:
        cl.client.cancel([f for f in futures if not f.done()])
    cl.submitted += len(todo)
    return total


def _result(fut: Any, step: LevelStep, job: LevelJob) -> dict[str, Any]:
    """A band's result, or one line that says which band failed and that ``--resume`` continues."""
    try:
        res: dict[str, Any] = fut.result()
    except RefineError:
        raise
    except Exception as exc:  # noqa: BLE001 - a worker died too often, or a bug on a worker
        folder = next(iter(job.parts.values()))
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise RefineError(f"level {step.index + 1}: a band task failed on the Dask cluster "
                          f"({type(exc).__name__}: {first}); finished bands are kept in "
                          f"{os.path.dirname(folder)}: rerun with --resume") from exc
    return res


def _add(total: GridStats, res: dict[str, Any]) -> None:
    """Add one band's counts to the level's (tiles at band edges run, and count, in both bands)."""
    s: GridStats = res["stats"]
    total.tiles_refined += s.tiles_refined
    total.tiles_skipped += s.tiles_skipped
    total.refiner_calls += s.refiner_calls
    if res["guard"] is not None:
        g = total.extra.setdefault("guard", {})
        params = {f.name for f in fields(GuardParams)}
        for k, v in res["guard"].items():
            if k not in params and isinstance(v, int | float) and not isinstance(v, bool):
                g[k] = g.get(k, 0) + v
            else:
                g.setdefault(k, v)
