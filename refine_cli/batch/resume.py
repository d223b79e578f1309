"""Resume decisions: whether each planned input runs now, from its latest journal record.

**Resume** is the default. An input is *kept* (not run) when its latest record is
``done``, its config hash is unchanged, the image and mask have the same path, size and
mtime (and sha256 with ``verify_inputs``; a record without one then counts as changed),
and every recorded output exists with its recorded checksum. A ``failed`` input stays
failed until ``retry_failed``, until its inputs or the config change, or (when it failed
because an output existed) until ``overwrite`` is given; ``force`` runs everything
again. An existing output may be replaced when a record or a claim line names its key
(also a damaged record whose key is still legible), so outputs of a run killed between
writing a file and its record are redone; any other existing file needs ``overwrite``.
A *changed configuration* (another method, other settings or output options, see
:func:`~refine_cli.batch.config_hash`) never silently replaces finished work: when the
latest record of an input is ``done`` with another config hash and an output it lists is
still in OUTDIR, the input's decision is ``conflict`` and the whole batch stops before it
runs or records anything (:class:`~refine_cli.batch.ConfigChangedError`, exit code 2,
naming the old and new method) unless ``overwrite`` (replace them) or ``force`` (redo
everything) is given; another OUTDIR keeps both. Inputs that only failed, were skipped or
were claimed by a killed run (no ``done`` record) rerun under the new configuration as
before. The check uses the merged journals, so it holds across shards.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from refine_cli.batch.journal import merge_journals
from refine_cli.batch.model import (
    BatchItem,
    BatchJob,
    ConfigChangedError,
    Decision,
    Record,
    config_hash,
    file_facts,
)
from refine_cli.hashing import sha256_file

log = logging.getLogger(__name__)


def _same_input(before: Record | None, now: dict[str, Any] | None, verify: bool) -> str | None:
    """None when the recorded file facts still hold, else what changed."""
    if before is None and now is None:
        return None
    if before is None or now is None:
        return "mask added or removed"
    name = Path(str(now.get("path"))).name
    if before.get("path") != now.get("path"):
        return f"{name}: path changed"
    if now.get("missing"):
        return f"{name}: missing"
    if before.get("size") != now.get("size") or before.get("mtime_ns") != now.get("mtime_ns"):
        return f"{name}: size or mtime changed"
    if verify and before.get("sha256") != now.get("sha256"):
        return f"{name}: content changed" if before.get("sha256") else f"{name}: no recorded checksum"
    return None


def _outputs_intact(outdir: Path, item: BatchItem, recorded: dict[str, Any]) -> str | None:
    """None when every planned output exists with its recorded checksum, else the first problem."""
    planned = item.outputs()
    if set(recorded) != set(planned) or any(recorded[k].get("path") != planned[k] for k in planned):
        return "planned outputs differ from the recorded ones"
    for kind, rel in planned.items():
        path = Path(outdir) / rel
        rec = recorded[kind]
        if path.is_symlink() or not path.is_file():
            return f"output {rel} is missing"
        if path.stat().st_size != rec.get("bytes") or sha256_file(path) != rec.get("sha256"):
            return f"output {rel} was modified"
    return None


def _earlier_outputs(outdir: Path, item: BatchItem, previous: Record) -> list[str]:
    """Outputs (relative) listed by ``previous`` that this run would write again and that exist."""
    planned = set(item.outputs().values())
    recorded = [o.get("path") for o in (previous.get("outputs") or {}).values() if isinstance(o, dict)]
    return [rel for rel in recorded if rel in planned and os.path.lexists(Path(outdir) / rel)]


def recorded_method(record: Record | None) -> str | None:
    """The method a ``done`` record ran (``result.method``), or ``None``."""
    result = (record or {}).get("result")
    method = result.get("method") if isinstance(result, dict) else None
    return method if isinstance(method, str) else None


def conflict_error(conflicts: Sequence[tuple[str, str | None]], method: str, total: int,
                   outdir: str | Path) -> ConfigChangedError:
    """The one-line error for inputs whose finished outputs a changed configuration would replace.

    Args:
        conflicts: ``(key, method of its done record or None)`` of each such input.
        method: the method of this run.
        total: inputs in this run.
        outdir: the output folder.
    """
    keys = sorted(key for key, _ in conflicts)
    old = sorted({m for _, m in conflicts if m})
    if not old:
        what = "another configuration"
    elif old == [method]:
        what = f"other settings of method {method}"
    else:
        what = f"method {'/'.join(old)}, not {method},"
    n = len(keys)
    were, their, first = ("was", "its", "") if n == 1 else ("were", "their", "first: ")
    return ConfigChangedError(
        f"{n} of {total} input{'s' if total != 1 else ''} {were} done with {what} and {their} outputs are "
        f"still in {outdir} ({first}{keys[0]}); nothing was run: add --overwrite to replace them "
        "(--force also redoes every input), or give another -o OUTDIR")


def decide(item: BatchItem, previous: Record | None, job: BatchJob, chash: str) -> Decision:
    """Whether ``item`` runs now, given its latest journal record (see the module docstring).

    Args:
        item: the planned input.
        previous: its latest record, or ``None``.
        job: the batch options (``force``, ``retry_failed``, ``verify_inputs``, ``outdir``, ``overwrite``).
        chash: :func:`~refine_cli.batch.config_hash` of this run.
    """
    if item.error:
        return Decision("fail", item.error, previous)
    if item.skip:
        return Decision("skip", item.skip, previous)
    facts = {"image": file_facts(item.image, content_hash=job.verify_inputs),
             "mask": file_facts(item.mask, content_hash=job.verify_inputs) if item.mask else None}
    if previous is None:
        return Decision("run", "new", previous, facts)
    if job.force:
        return Decision("run", "--force", previous, facts)
    status = previous.get("status")
    if status == "skipped":
        return Decision("run", "skipped before, can run now", previous, facts)
    if previous.get("config_hash") != chash:
        existing = [] if job.outputs.overwrite or status != "done" else \
            _earlier_outputs(job.outdir, item, previous)
        if existing:
            old = recorded_method(previous)
            was = f" (was method {old})" if old and old != job.config.method else ""
            return Decision("conflict", f"configuration changed{was} and {existing[0]} exists; --overwrite "
                            "replaces it", previous, facts)
        return Decision("run", "configuration changed", previous, facts)
    changed = (_same_input(previous.get("image"), facts["image"], job.verify_inputs)
               or _same_input(previous.get("mask"), facts["mask"], job.verify_inputs))
    if changed:
        return Decision("run", changed, previous, facts)
    if status == "failed":
        if job.retry_failed:
            return Decision("run", "--retry-failed", previous, facts)
        if job.outputs.overwrite and previous.get("error_type") == "OutputExistsError":
            return Decision("run", "--overwrite given for an output that existed", previous, facts)
        return Decision("keep", f"failed before: {previous.get('error')} (fix it, then --retry-failed)",
                        previous, facts)
    problem = _outputs_intact(job.outdir, item, previous.get("outputs") or {})
    if problem:
        return Decision("run", problem, previous, facts)
    return Decision("keep", "done, unchanged", previous, facts)


def decide_all(items: Sequence[BatchItem], job: BatchJob
               ) -> tuple[list[tuple[BatchItem, Decision]], list[str]]:
    """Read the journals of ``job.outdir`` and decide every item; ignored journal lines are logged.

    Returns:
        ``([(item, decision)], problems)``.
    """
    state = merge_journals(job.outdir)
    for problem in state.problems:
        log.warning("%s", problem)
    chash = config_hash(job.config, job.outputs)
    out = []
    for it in items:
        dec = decide(it, state.latest.get(it.key), job, chash)
        out.append((it, replace(dec, owned=it.key in state.latest or it.key in state.claimed)))
    return out, state.problems
