"""Refine many images into one folder; a journal makes reruns resume and records every failure.

``refine batch`` is a translator over :mod:`refine_cli.batch`: options become a plan
and a :class:`~refine_cli.batch.BatchJob`, one library call runs it, and the records are
rendered. Records (``--json``), ``--list`` and ``--dry-run`` go to stdout, one line per
input; progress, logs and the summary go to stderr. Exit codes: 0 every input done or
skipped, 3 some failed, 2 usage errors (also: a changed configuration would replace
finished outputs, see :class:`~refine_cli.batch.ConfigChangedError`), 130 interrupted
(journal flushed, temporary files removed; rerun to resume). ``--dry-run`` exits as the
real run would end: 2 when it would stop at such a conflict, 3 when inputs would fail
(planning errors, unreadable headers, earlier failures kept), else 0.

Mount with :func:`register` (a plain command: ``app.add_typer`` would make it a group
that expects a sub-command name).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from refine_cli.commands.console import Debug, ProgressBars, Quiet, Verbose, configure_logging, err_console
from refine_cli.commands.options import MinAreaOpt, RunOptions, SimplifyOpt, VectorFormatOpt, run_options
from refine_cli.errors import Interrupted, UsageError

if TYPE_CHECKING:
    from rich.console import Console

    from refine_cli.batch import BatchItem, BatchJob

EPILOG = (
    "Pairing: --mask-dir D (same stem), --mask-suffix _mask (beside the image), or --pairs pairs.csv "
    "(image,mask[,out]). Resume is the default: inputs recorded as done with unchanged inputs, settings "
    "and outputs are not run again; another method or other settings stop the run while finished outputs "
    "exist (--overwrite replaces them). Shards (--shard I/N) write refine-journal.shard-I-of-N.jsonl; every "
    "run reads all journals in OUTDIR, latest record per input wins."
)


class _BatchProgress:
    """One bar for the files and one for the current file's stage, on a terminal's stderr."""

    def __init__(self, bars: ProgressBars, total: int) -> None:
        self.bars = bars
        self.total = total
        self._name = ""
        bars("files", 0, total)

    def start(self, item: BatchItem, index: int, total: int) -> None:
        """A new input begins: reset the stage bar."""
        self._name = Path(item.image).name
        self.bars.reset("tiles", f"  {self._name}")

    def tiles(self, stage: str, done: int, total: int) -> None:
        """Progress of the current input's stage (tiles, patches, segmenter; ``total = 0``: unknown)."""
        self.bars("tiles", done, total, description=f"  {self._name} {stage}")

    def record(self) -> None:
        """One input finished (or was kept)."""
        self.bars.advance("files", self.total)


def _outputs(opts: RunOptions, uncertainty: bool, report: bool, vector_dir: Path | None,
             vector_format: str | None, simplify: str | None, min_area: str | None) -> Any:
    """The batch's ``OutputOptions`` (the polygon options checked before anything runs)."""
    import os

    from refine_cli import batch as lib

    if vector_dir is None and (vector_format or simplify or min_area):
        raise UsageError("--vector-format, --simplify and --min-area shape the polygons of --vector-dir: add "
                         "--vector-dir DIR")
    if vector_dir is not None:
        from refine_cli.io.vectorize import VectorSpec

        VectorSpec(f"x.{vector_format or 'gpkg'}", vector_format, simplify, min_area).check()
        if vector_dir.exists() and not vector_dir.is_dir():
            raise UsageError(f"--vector-dir {vector_dir} is not a folder")
    return lib.OutputOptions(uncertainty=uncertainty, report=report, fmt=opts.fmt, cog=opts.cog,
                             bands=opts.band_indices(), overwrite=opts.overwrite,
                             vector_dir=os.path.abspath(vector_dir) if vector_dir else None,
                             vector_format=vector_format, simplify=simplify, min_area=min_area)


def _size(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


@run_options
def batch_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (created if missing); holds the "
                                      "journal.")],
    source: Annotated[str | None, typer.Argument(
        metavar="DIR_OR_GLOB", help="Folder of images, an image, or a quoted glob ('tiles/**/*.tif').")]
    = None,
    mask_dir: Annotated[Path | None, typer.Option(
        "--mask-dir", help="Folder of coarse masks named like the images (same stem).")] = None,
    mask_suffix: Annotated[str | None, typer.Option(
        "--mask-suffix", help="Masks are <stem><SUFFIX>.* beside the image (or in --mask-dir), e.g. _mask.")]
    = None,
    pairs: Annotated[Path | None, typer.Option(
        "--pairs", help="CSV of image,mask[,out]; out is relative to OUTDIR.")] = None,
    uncertainty: Annotated[bool, typer.Option(
        "--uncertainty", help="Also write <name>.uncertainty.tif per input.")] = False,
    report: Annotated[bool, typer.Option("--report", help="Also write <name>.report.json per input.")]
    = False,
    vector_dir: Annotated[Path | None, typer.Option(
        "--vector-dir", help="Also write each input's polygons as DIR/<name>.gpkg (or --vector-format).")]
    = None,
    vector_format: VectorFormatOpt = None,
    simplify: SimplifyOpt = None,
    min_area: MinAreaOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON record per input on stdout (NDJSON).")]
    = False,
    list_only: Annotated[bool, typer.Option(
        "--list", help="Print the planned pairs (image, mask, output) and exit.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print what would run, why, and its memory estimate; run nothing.")] = False,
    verify_inputs: Annotated[bool, typer.Option(
        "--verify-inputs", help="Also compare input checksums (sha256) when resuming.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Run inputs that failed before again.")]
    = False,
    force: Annotated[bool, typer.Option("--force", help="Run every input again, ignoring the journal.")]
    = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first failed input.")] = False,
    shard: Annotated[str | None, typer.Option(
        "--shard", help="Run shard I of N (1-based), e.g. $SLURM_ARRAY_TASK_ID/8.")] = None,
    scheduler: Annotated[str | None, typer.Option(
        "--scheduler", help="Run on Dask: tcp://HOST:PORT or local:N (needs the distributed extra).")] = None,
    gpus_per_worker: Annotated[int, typer.Option(
        "--gpus-per-worker", help="With --scheduler: CUDA devices each worker owns; each task uses one.")]
    = 0,
    opts: RunOptions = RunOptions(),
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Refine every image of DIR_OR_GLOB (or --pairs) into OUTDIR; reruns resume from the journal."""
    from refine_cli import batch as lib

    configure_logging(verbose, quiet)
    with _exit_on_interrupt(err_console):
        if list_only and dry_run:
            raise UsageError("--list and --dry-run both print the plan; give one")
        if gpus_per_worker < 0 or (gpus_per_worker and not scheduler):
            raise UsageError("--gpus-per-worker N (N >= 0) applies to Dask workers: add --scheduler, or use "
                             "--device cuda:N")
        config = opts.config()
        outputs = _outputs(opts, uncertainty, report, vector_dir, vector_format, simplify, min_area)
        lib.check_encoding(config, outputs)
        shard_t = lib.parse_shard(shard) if shard else None
        job = lib.BatchJob(outdir=out, config=config, outputs=outputs, verify_inputs=verify_inputs,
                           retry_failed=retry_failed, force=force, fail_fast=fail_fast, shard=shard_t,
                           gpus_per_worker=gpus_per_worker)
        planned = lib.plan_batch(source, out, config=config, outputs=outputs, mask_dir=mask_dir,
                                 mask_suffix=mask_suffix, pairs=pairs)
        items = lib.shard_items(planned, shard_t)
        where = f" (shard {shard_t[0]}/{shard_t[1]} of {len(planned)})" if shard_t else ""
        if list_only:
            _print_list(items, out, json_out)
            if not quiet:
                err_console.print(f"{len(items)} inputs{where}", highlight=False)
        elif dry_run:
            _print_plan(lib.dry_run(items, job)[0], job, json_out, None if quiet else err_console, where,
                        len(items))
        else:
            _run(items, job, scheduler, json_out, err_console, quiet, where)


@contextlib.contextmanager
def _exit_on_interrupt(console: Console) -> Iterator[None]:
    """Print the interrupt as one line and exit 130 here.

    Typer turns a ``KeyboardInterrupt`` escaping a command into a bare return code, which
    loses the message (and, in ``standalone_mode=False``, the exit status).
    """
    try:
        yield
    except KeyboardInterrupt as exc:
        from rich.markup import escape

        text = str(exc) if isinstance(exc, Interrupted) and str(exc) else "interrupted"
        console.print(f"[red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
        raise SystemExit(Interrupted.exit_code) from None


def _print_list(items: Sequence[BatchItem], out: Path, json_out: bool) -> None:
    """``--list``: image, mask (``-`` for none), output and a note per line (tab-separated), or NDJSON."""
    for it in items:
        if json_out:
            typer.echo(json.dumps({"key": it.key, "image": it.image, "mask": it.mask, "outputs": it.outputs(),
                                   "skip": it.skip, "error": it.error}))
            continue
        note = f"error: {it.error}" if it.error else f"skip: {it.skip}" if it.skip else ""
        typer.echo("\t".join([it.image, it.mask or "-", str(out / it.mask_out), note]).rstrip("\t"))


def _print_plan(rows: list[dict[str, Any]], job: BatchJob, json_out: bool, console: Console | None,
                where: str, total: int) -> None:
    """``--dry-run``: action, image, output, memory, reason per line (or NDJSON); totals on stderr.

    Raises:
        ConfigChangedError: the real run would stop (a changed configuration, finished outputs exist).
        BatchIncomplete: the real run would end with failed inputs (exit code 3).
    """
    from refine_cli import batch as lib

    peak = 0
    for row in rows:
        mem = row["memory"] or {}
        peak = max(peak, int(mem.get("estimate_bytes", 0)))
        if json_out:
            typer.echo(json.dumps(row))
            continue
        est = (f"{_size(mem['estimate_bytes'])} tile {mem['tile_size']}" if "estimate_bytes" in mem
               else f"error: {mem['error']}" if "error" in mem else "-")
        typer.echo("\t".join([row["action"], row["image"], str(job.outdir / row["outputs"]["mask"]), est,
                              row["reason"]]))
    n = {a: sum(1 for r in rows if r["action"] == a) for a in ("run", "keep", "skip", "fail", "conflict")}
    n["kept_failed"] = sum(1 for r in rows if r["action"] == "keep" and r["previous"] == "failed")
    if console is not None:
        blocked = f"{n['conflict']} would replace earlier outputs, " if n["conflict"] else ""
        console.print(f"plan{where}: {n['run']} to run, {blocked}{n['keep']} kept from the journal "
                      f"({n['kept_failed']} of them failed), {n['skip']} skipped, {n['fail']} failing; "
                      f"peak estimate {_size(peak)} of --max-memory {_size(job.config.max_memory)}",
                      highlight=False, soft_wrap=True)
    if n["conflict"]:
        conflicts = [(r["key"], r["previous_method"]) for r in rows if r["action"] == "conflict"]
        raise lib.conflict_error(conflicts, job.config.method, total, job.outdir)
    failing = n["fail"] + n["kept_failed"]
    if failing:
        counts = ((n["fail"], "failing"), (n["kept_failed"], "failed before"))
        parts = ", ".join(f"{k} {what}" for k, what in counts if k)
        retry = " and rerun with --retry-failed" if n["kept_failed"] else ""
        raise lib.BatchIncomplete(f"dry run: {failing} of {total} inputs would end failed ({parts}); fix them"
                                  f"{retry} (reasons on the plan lines)")


def _run(items: Sequence[BatchItem], job: BatchJob, scheduler: str | None, json_out: bool, console: Console,
         quiet: bool, where: str) -> None:
    """Run the batch with progress bars; records on stdout with ``--json``; exit 3 when any input failed."""
    from refine_cli import batch as lib

    with ProgressBars(enabled=not quiet) as bars:
        bar = _BatchProgress(bars, len(items))

        def on_record(rec: dict[str, Any], resumed: bool) -> None:
            bar.record()
            if json_out:
                sys.stdout.write(json.dumps({**rec, "resumed": resumed}, default=str) + "\n")
                sys.stdout.flush()

        summary = lib.run_batch(items, job, scheduler=scheduler, on_start=bar.start, on_tiles=bar.tiles,
                                on_record=on_record)
    if not quiet:
        console.print(f"batch{where}: {summary.line()}", highlight=False, soft_wrap=True)
    if summary.exit_code:
        stop = "stopped at the first failure (--fail-fast); " if summary.stopped else ""
        failed = summary.count("failed")
        raise lib.BatchIncomplete(f"{stop}{failed} of {len(items)} inputs failed (reasons in "
                                  f"{summary.journal}); fix them and rerun with --retry-failed")


def register(parent: typer.Typer, name: str = "batch") -> None:
    """Add ``refine batch`` to ``parent`` as a plain command (not a group)."""
    if any(c.name == name for c in parent.registered_commands):
        return
    parent.command(name, epilog=EPILOG)(batch_cmd)
