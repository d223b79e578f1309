"""The batch loop (:func:`run_batch`) and its dry run (:func:`dry_run`).

What :func:`run_batch` does, in order:

1. **Plan** (done before, :func:`~refine_cli.batch.plan_batch`): the inputs, their masks
   and output names; planning problems are ``failed`` or ``skipped`` items.
2. **Decide** (:func:`~refine_cli.batch.resume.decide`): the latest journal record of each
   input says whether it must run again (see :mod:`refine_cli.batch.resume`).
3. **Run** each input through :func:`refine_cli.api.refine_file`, locally one after the
   other or as one task per file on a Dask cluster (``scheduler=``,
   :mod:`refine_cli.batch.dask`). Each finished input appends one record to the journal
   at once.

**Atomicity.** Every output is written to a temporary file in its target directory,
fsynced and renamed (``refine_cli.io.writers``). On an interrupt or a failure, outputs
this attempt already renamed into place are removed again, so after a local run OUTDIR
only holds outputs that a ``done`` record vouches for (or files that were there before);
SIGTERM is handled like SIGINT. Temporary files of killed runs are removed at the next
start (by a shard: only those of its own outputs, since other hosts may be writing).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refine_cli.batch.dask import _import_distributed, _run_dask
from refine_cli.batch.item import _record, run_item
from refine_cli.batch.journal import Journal, _signals_deferred
from refine_cli.batch.model import (
    BatchItem,
    BatchJob,
    BatchSummary,
    Decision,
    OutputOptions,
    Record,
    _one_line,
    config_hash,
)
from refine_cli.batch.plan import _within
from refine_cli.batch.resume import conflict_error, decide_all, recorded_method
from refine_cli.config import RefineConfig
from refine_cli.errors import InputError, Interrupted, RefineError

if TYPE_CHECKING:
    from refine_cli.refiners.base import Refiner
    from refine_cli.tiling.budget import MemoryPlan

log = logging.getLogger(__name__)


def clean_temps(outdir: Path, items: Sequence[BatchItem], *, whole: bool) -> list[str]:
    """Remove temporary files of killed runs.

    Args:
        outdir: the output folder.
        items: the planned inputs (their output folders are cleaned too).
        whole: clean every stale temporary file in the folders
            (:func:`refine_cli.io.writers.clean_stale_temps`); ``False`` (shards, which
            may share OUTDIR with other hosts) removes only those of this run's outputs.

    Returns:
        Removed paths.
    """
    import glob

    from refine_cli.io.writers import TMP_SUFFIX, clean_stale_temps, pid_alive

    removed: list[str] = []
    if whole:
        folders = {outdir} | {(outdir / rel).parent for it in items for rel in it.outputs().values()}
        for folder in sorted(folders):
            if _within(folder, outdir):
                removed += clean_stale_temps(folder)
        return removed
    for it in items:
        for rel in it.outputs().values():
            target = outdir / rel
            if not target.parent.is_dir():
                continue
            for p in target.parent.glob(f".{glob.escape(target.name)}.*{TMP_SUFFIX}"):
                try:
                    pid = int(p.name[len(target.name) + 2 :].split(".")[0])
                except ValueError:
                    continue
                if not pid_alive(pid):
                    if p.is_dir() and not p.is_symlink():  # a polygon file's temporary folder
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            p.unlink()
                    removed.append(str(p))
    return removed


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (SLURM time limit, ``kill``) like Ctrl-C while the batch runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _plan_record(item: BatchItem, decision: Decision, job: BatchJob, chash: str) -> Record | None:
    """The record of an input that fails or is skipped at planning (None when the journal already says so)."""
    status = "failed" if decision.action == "fail" else "skipped"
    prev = decision.previous
    if prev is not None and prev.get("status") == status and prev.get("error") == decision.reason \
            and prev.get("config_hash") == chash:
        return None
    return _record(item, job, chash, status, error=decision.reason,
                   error_type="PlanError" if status == "failed" else None)


def run_batch(
    items: Sequence[BatchItem],
    job: BatchJob,
    *,
    scheduler: str | None = None,
    on_start: Callable[[BatchItem, int, int], None] | None = None,
    on_tiles: Callable[[str, int, int], None] | None = None,
    on_record: Callable[[Record, bool], None] | None = None,
) -> BatchSummary:
    """Run a planned batch with the journal, resume, failure isolation and clean interrupts.

    Args:
        items: planned inputs (already sharded, see :func:`~refine_cli.batch.shard_items`).
        job: options.
        scheduler: ``None`` (run here, one input after the other), ``tcp://HOST:PORT`` (a
            Dask scheduler) or ``local:N`` (a local Dask cluster of N worker processes).
        on_start: ``f(item, index, total)`` before an input runs (local runs only).
        on_tiles: tile progress ``f(stage, done, total)`` of the current input (local runs only).
        on_record: ``f(record, resumed)`` for every input: new records, and kept earlier
            ones with ``resumed=True``.

    Returns:
        The summary; ``summary.exit_code`` is 3 when any input failed.

    Raises:
        Interrupted: SIGINT or SIGTERM. Every finished input is in the journal, the
            unfinished one's files and temporary files are removed; rerunning resumes.
        UsageError: the journal is held by another batch, or ``--co``/``--nodata``/``--dtype`` values
            the outputs cannot take (:func:`check_encoding`).
        ConfigChangedError: the configuration changed and finished outputs would be replaced
            (neither ``overwrite`` nor ``force``); nothing was run or recorded.
        DependencyError: ``scheduler`` given but Dask distributed is not installed.
    """
    if scheduler is not None:
        _import_distributed()
    check_encoding(job.config, job.outputs)
    outdir = Path(job.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    job = replace(job, outdir=Path(os.path.abspath(outdir)))
    for p in clean_temps(job.outdir, items, whole=job.shard is None):
        log.info("removed stale temporary file %s", p)
    chash = config_hash(job.config, job.outputs)
    summary = BatchSummary(journal=job.journal)
    fresh = not job.journal.exists()
    with Journal(job.journal) as journal, _sigterm_as_interrupt():
        decisions, problems = decide_all(items, job)
        summary.problems += problems
        conflicts = [(it.key, recorded_method(d.previous)) for it, d in decisions if d.action == "conflict"]
        if conflicts:
            if fresh:  # leave OUTDIR as it was: drop the journal file this call created
                with contextlib.suppress(OSError):
                    job.journal.unlink()
            raise conflict_error(conflicts, job.config.method, len(items), job.outdir)
        emit = _Emitter(journal, summary, on_record)
        try:
            pending = _settle(decisions, job, chash, emit, summary)
            if pending is None:
                return summary
            if pending:
                journal.claim([item.key for item, _ in pending], job.shard)
            if scheduler is None:
                _run_local(pending, job, chash, emit, summary, on_start, on_tiles)
            else:
                _run_dask(pending, job, chash, emit, summary, scheduler)
        except (KeyboardInterrupt, Interrupted) as exc:
            for p in clean_temps(job.outdir, items, whole=job.shard is None):
                log.info("removed temporary file %s", p)
            done = len(summary.records)
            raise Interrupted(f"interrupted after {done} of {len(items)} inputs; {job.journal} is up to date "
                              "and temporary files were removed; run the same command again to resume"
                              ) from exc
    return summary


class _Emitter:
    """Records one input's outcome: in the journal (when new), the summary, the log and ``on_record``."""

    def __init__(self, journal: Journal, summary: BatchSummary,
                 on_record: Callable[[Record, bool], None] | None) -> None:
        self.journal, self.summary, self.on_record = journal, summary, on_record

    def __call__(self, rec: Record, resumed: bool, new: bool) -> None:
        """``resumed``: a record kept from an earlier run; ``new``: append it to the journal."""
        with _signals_deferred():  # the journal and the summary agree even when interrupted here
            if new:
                self.journal.append(rec)
            self.summary.records.append(rec)
        if resumed:
            self.summary.resumed.add(rec["key"])
        if rec["status"] == "failed":
            log.warning("%s: %s: %s", "failed earlier" if resumed else "failed",
                        Path(rec["image"]["path"]).name, rec.get("error"))
        elif rec["status"] == "skipped":
            log.info("skipped: %s: %s", Path(rec["image"]["path"]).name, rec.get("error"))
        if self.on_record is not None:
            self.on_record(rec, resumed)


def _settle(decisions: Sequence[tuple[BatchItem, Decision]], job: BatchJob, chash: str,
            emit: Callable[[Record, bool, bool], None],
            summary: BatchSummary) -> list[tuple[BatchItem, Decision]] | None:
    """Record the inputs that need no run (kept, skipped, failed in planning); the rest to run.

    Returns ``None`` when ``--fail-fast`` stops at a planning failure.
    """
    pending: list[tuple[BatchItem, Decision]] = []
    for item, dec in decisions:
        if dec.action == "keep":
            assert dec.previous is not None
            emit(dec.previous, True, False)
        elif dec.action in ("fail", "skip"):
            rec = _plan_record(item, dec, job, chash)
            emit(rec or dict(dec.previous or {}), rec is None, rec is not None)
        else:
            pending.append((item, dec))
        if job.fail_fast and summary.count("failed") and dec.action == "fail":
            summary.stopped = True
            return None
    return pending


def _run_local(pending: Sequence[tuple[BatchItem, Decision]], job: BatchJob, chash: str,
               emit: Callable[[Record, bool, bool], None], summary: BatchSummary,
               on_start: Callable[[BatchItem, int, int], None] | None,
               on_tiles: Callable[[str, int, int], None] | None) -> None:
    for i, (item, dec) in enumerate(pending):
        if on_start is not None:
            on_start(item, i, len(pending))
        log.info("%s (%s)", Path(item.image).name, dec.reason)
        rec = run_item(item, job, chash, facts=dec.facts, owned=dec.owned, progress=on_tiles)
        emit(rec, False, True)
        if job.fail_fast and rec["status"] == "failed":
            summary.stopped = True
            return


# --------------------------------------------------------------------------------------- dry run


def check_encoding(config: RefineConfig, outputs: OutputOptions) -> None:
    """Refuse creation options, a nodata value or a soft sample type the batch's outputs cannot take.

    Checked once, before any input runs, on the outputs' format (``.tif``, or ``.png`` with
    ``--format png``) with the sample type of a binary mask (each input checks its own again).

    Raises:
        UsageError: one line (see ``io.writers.check_creation``).
    """
    from refine_cli.engine.outputs import OutputSpec, mask_layout, uncertainty_dtype
    from refine_cli.io.writers import check_creation

    unc = f"u{outputs.extension}" if outputs.uncertainty else None
    spec = OutputSpec(mask=f"out{outputs.extension}", uncertainty=unc, soft=config.soft, fmt=outputs.fmt,
                      cog=outputs.cog, encoding=config.encoding)
    enc = config.encoding
    _, dtype = mask_layout(spec, 2, False)
    check_creation(f"out{outputs.extension}", dict(enc.creation), dtype, 1, cog=outputs.cog,
                   nodata=enc.nodata, fmt=outputs.fmt, resampling="average" if config.soft else "nearest")
    if spec.uncertainty:
        check_creation(spec.uncertainty, dict(enc.creation), uncertainty_dtype(spec), 1, cog=outputs.cog,
                       nodata=enc.nodata, fmt=outputs.fmt, resampling="average")


def image_shape(path: str, *, max_pixels: int = 50_000_000_000) -> tuple[int, int]:
    """``(H, W)`` of an image from its header only (no pixel is decoded).

    Raises:
        InputError: missing, unreadable or unrecognised file, or above ``max_pixels``.
    """
    from refine_cli.io.readers import RasterioReader, check_pixels, check_readable
    from refine_cli.io.sniff import sniff

    p = check_readable(path, "image")
    with open(p, "rb") as fh:
        kind = sniff(fh.read(1 << 16))
    if kind.kind == "tiff":
        import tifffile

        try:
            with tifffile.TiffFile(p) as tf:
                series = tf.series[0]
                axes = series.axes
                size = (int(series.shape[axes.index("Y")]), int(series.shape[axes.index("X")]))
        except Exception as exc:  # noqa: BLE001 - any parse failure is a bad input
            raise InputError(f"{p}: not a readable TIFF ({exc})") from None
    elif kind.size is not None:
        size = kind.size
    else:
        reader = RasterioReader(str(p))
        try:
            size = reader.shape
        finally:
            reader.close()
    check_pixels(str(p), size, max_pixels)
    return size


def decoded_bytes_estimate(path: str, *, inline_limit: int, samples: int) -> int:
    """Bytes a run holds decoded for all its length when it opens ``path``, from the header only.

    PNG, JPEG, WebP and BMP files of at most ``inline_limit`` pixels are decoded whole (a run
    keeps them in memory); TIFFs are read by window, and larger files are cached as tiled TIFFs.
    ``samples`` is the bytes per pixel assumed (3 for an RGB image, 1 for a mask).

    Raises:
        InputError: unreadable header.
    """
    from refine_cli.io.sniff import sniff

    with open(path, "rb") as fh:
        kind = sniff(fh.read(1 << 16)).kind
    if kind == "tiff":
        return 0
    h, w = image_shape(path)
    return h * w * samples if h * w <= inline_limit else 0


def plan_file_memory(image: str, config: RefineConfig, outputs: OutputOptions, *,
                     refiner: Refiner | None = None, mask: str | None = None) -> MemoryPlan:
    """The memory plan ``refine run`` would choose for ``image``, from its header only.

    The levels are the ones the run will have (``Refiner.plan_levels``: CascadePSP's exact or
    streamed path, MagNet's stages), each planned as the run plans it; the largest plan is returned.
    Assumes a binary mask unless ``config.classes`` is set (label maps need more). Inputs that a
    run keeps decoded (small PNG/JPEG images and masks) count as resident bytes, as in a run.

    Args:
        image: image path.
        config: run configuration.
        outputs: output options (the uncertainty map adds a byte per pixel).
        refiner: a refiner built from ``config`` to reuse (built when ``None``).
        mask: the coarse mask's path, when there is one.

    Raises:
        InputError: unreadable header.
        ResourceError: nothing fits ``config.max_memory``.
    """
    from refine_cli.engine.levels import level_channels, plan_level
    from refine_cli.engine.outputs import OutputSpec, bytes_per_pixel
    from refine_cli.refiners import build_refiner
    from refine_cli.refiners.base import Scene
    from refine_cli.refiners.guard import GuardRefiner, band_guard

    shape = image_shape(image, max_pixels=config.max_pixels)
    refiner = refiner or build_refiner(config)
    labels = config.classes is not None
    channels = config.classes or 1
    spec = OutputSpec(mask=f"out{outputs.extension}", uncertainty="u.tif" if outputs.uncertainty else None,
                      soft=config.soft, threshold=config.threshold, fmt=outputs.fmt, encoding=config.encoding)
    batch = config.cascade.batch_size if refiner.uses_torch else 1
    resident = decoded_bytes_estimate(image, inline_limit=config.inline_limit, samples=3)
    mask_shape = image_shape(mask, max_pixels=config.max_pixels) if mask is not None else None
    if mask is not None:
        resident += decoded_bytes_estimate(mask, inline_limit=config.inline_limit, samples=1)
    final_bytes = bytes_per_pixel(spec, channels, labels)
    scene = Scene(shape=shape, read_overview=_no_overview, has_mask=mask is not None, labels=labels,
                  classes=channels, bytes_out=final_bytes if mask is not None else Scene.bytes_out,
                  max_memory=config.max_memory, resident_bytes=resident,
                  coarse_scale=shape[0] / mask_shape[0] if mask_shape else 1.0)

    def plan(level_shape: tuple[int, int], level_refiner: Refiner, k: int, bytes_out: int) -> MemoryPlan:
        return plan_level(level_shape, level_refiner, channels=k, bytes_out=bytes_out,
                          budget=config.max_memory, batch_size=batch, tile_size=config.tile_size,
                          resident=resident)

    # as run_levels: the refiner's levels, each reading the level before it (the first the mask), then the
    # guard (binary and soft masks; its band from the header: a full-size soft mask's ramps are not read)
    guard = band_guard(config, refiner, mask_shape, shape) if mask_shape is not None and not labels else None
    plans, k = [], channels
    levels = refiner.plan_levels(scene)
    for i, level in enumerate(levels):
        last = i == len(levels) - 1
        pass_unc = guard is not None and last and level.refiner.provides_uncertainty
        k_in, reads_labels = (k, labels and i == 0) if level.in_channels is None \
            else (level.in_channels, False)
        k = level_channels(level.refiner, k_in, reads_labels, pass_uncertainty=pass_unc)
        plans.append(plan(level.shape, level.refiner, k, final_bytes if last and guard is None else 4 * k))
    if guard is not None:
        guard_refiner = GuardRefiner(guard, shape, inner_uncertainty=levels[-1].refiner.provides_uncertainty)
        k_guard = level_channels(guard_refiner, k + channels, False)
        plans.append(plan(shape, guard_refiner, k_guard, final_bytes))
    return max(plans, key=lambda p: p.total)


def _no_overview(shape: tuple[int, int], binarize: bool = False) -> tuple[Any, Any]:
    """A dry run reads no pixels: ``Refiner.plan_levels`` must not ask for an overview."""
    raise RuntimeError("a dry run plans from headers; plan_levels must not read the overview")


def dry_run(items: Sequence[BatchItem], job: BatchJob) -> tuple[list[Record], list[str]]:
    """The plan of a batch without running it: per input its action, reason and memory estimate.

    Returns:
        ``([{"action", "reason", "previous", "previous_method", "key", "image", "mask", "outputs",
        "memory"}], problems)``: ``action`` is the :class:`~refine_cli.batch.Decision`'s, except that an input
        that would run but whose header or memory plan fails is ``fail`` (it would fail when
        run); ``previous`` is the status of the latest record or ``None`` and
        ``previous_method`` its method (:func:`~refine_cli.batch.recorded_method`); ``memory`` is
        ``{"estimate_bytes", "budget", "tile_size", "queue_depth", "shape"}`` for inputs that
        would run (or ``conflict``), ``{"error": ...}`` when they cannot be planned, else ``None``.
        A plan with ``conflict`` rows would stop: see :func:`~refine_cli.batch.conflict_error`.
    """
    from refine_cli.refiners import build_refiner

    decisions, problems = decide_all(items, replace(job, outdir=Path(os.path.abspath(job.outdir))))
    runs = any(d.action in ("run", "conflict") for _, d in decisions)
    refiner = build_refiner(job.config) if runs else None
    rows: list[Record] = []
    for item, dec in decisions:
        memory: dict[str, Any] | None = None
        action = dec.action
        if action in ("run", "conflict"):
            try:
                plan = plan_file_memory(item.image, job.config, job.outputs, refiner=refiner,
                                        mask=item.mask)
                memory = {"estimate_bytes": plan.total, "budget": plan.budget, "tile_size": plan.tile_size,
                          "queue_depth": plan.queue_depth,
                          "shape": list(image_shape(item.image, max_pixels=job.config.max_pixels))}
            except RefineError as exc:
                memory = {"error": _one_line(exc)}
                action = "fail" if action == "run" else action
        rows.append({"action": action, "reason": dec.reason,
                     "previous": dec.previous.get("status") if dec.previous else None,
                     "previous_method": recorded_method(dec.previous), "key": item.key,
                     "image": item.image, "mask": item.mask, "outputs": item.outputs(), "memory": memory})
    return rows, problems
