"""Batch runs: many images into one folder, with a journal, resume by default and isolated failures.

A batch plans every input (:func:`plan_batch`: each image, its coarse mask by one rule and
its output names inside OUTDIR), decides from the journal which inputs must run
(:func:`~refine_cli.batch.resume.decide`), and runs those through
:func:`refine_cli.api.refine_file`, here one after the other or as one task per file on a
Dask cluster (:func:`run_batch`). An input that fails is recorded as ``failed``; the
others still run.

**Journal.** ``OUTDIR/refine-journal.jsonl`` (``refine-journal.shard-I-of-N.jsonl`` for a
shard) is append-only JSON Lines: one fsynced record per input and attempt, and a claim
line before a run starts (fields: :mod:`refine_cli.batch.journal`). :func:`merge_journals`
keeps the latest record of each input over every shard's journal.

**Resume** is the default: an input whose latest record is ``done`` with the same
configuration hash, unchanged inputs and intact outputs is kept, not run; ``failed``
inputs wait for ``retry_failed``; ``force`` reruns everything. A changed configuration
never silently replaces finished outputs (:class:`ConfigChangedError`). The rules:
:mod:`refine_cli.batch.resume`.

**Exit codes** (:attr:`BatchSummary.exit_code` and the errors' ``exit_code``): 0 every
input done or skipped; 3 some failed (:class:`BatchIncomplete`); 2 a changed
configuration would replace finished outputs and nothing ran; 130 interrupted (the
journal is up to date and temporary files are removed: rerun to resume).

The modules, each importing only those before it: :mod:`~refine_cli.batch.model` (data,
errors, constants, small helpers), :mod:`~refine_cli.batch.plan` (discovery, pairing,
output names), :mod:`~refine_cli.batch.journal`, :mod:`~refine_cli.batch.resume`,
:mod:`~refine_cli.batch.item` (one input), :mod:`~refine_cli.batch.dask` and
:mod:`~refine_cli.batch.run` (the batch loop and the dry run).
"""

from refine_cli.batch.dask import assign_gpus, open_client
from refine_cli.batch.item import run_item
from refine_cli.batch.journal import Journal, JournalState, merge_journals, read_journal
from refine_cli.batch.model import (
    IMAGE_EXTS,
    JOURNAL_GLOB,
    JOURNAL_NAME,
    METHODS_WITH_SEGMENTER,
    OUTPUT_MARKERS,
    RECORD_VERSION,
    STATUSES,
    BatchIncomplete,
    BatchItem,
    BatchJob,
    BatchSummary,
    ConfigChangedError,
    Decision,
    OutputOptions,
    Record,
    config_hash,
    file_facts,
    journal_path,
    method_has_segmenter,
    parse_shard,
    shard_items,
)
from refine_cli.batch.plan import check_relative_output, list_images, plan_batch, read_pairs, resolve_output
from refine_cli.batch.resume import conflict_error, decide, decide_all, recorded_method
from refine_cli.batch.run import (
    check_encoding,
    clean_temps,
    dry_run,
    image_shape,
    plan_file_memory,
    run_batch,
)

__all__ = [
    # model
    "IMAGE_EXTS", "JOURNAL_GLOB", "JOURNAL_NAME", "METHODS_WITH_SEGMENTER", "OUTPUT_MARKERS",
    "RECORD_VERSION", "STATUSES", "Record", "OutputOptions",
    "BatchIncomplete", "BatchItem", "BatchJob", "BatchSummary", "ConfigChangedError", "Decision",
    "config_hash", "file_facts", "journal_path", "method_has_segmenter", "parse_shard", "shard_items",
    # plan
    "check_relative_output", "list_images", "plan_batch", "read_pairs", "resolve_output",
    # journal
    "Journal", "JournalState", "merge_journals", "read_journal",
    # resume
    "conflict_error", "decide", "decide_all", "recorded_method",
    # item
    "run_item",
    # dask
    "assign_gpus", "open_client",
    # run
    "check_encoding", "clean_temps", "dry_run", "image_shape", "plan_file_memory", "run_batch",
]
