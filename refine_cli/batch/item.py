"""One input of a batch: refine it, and turn the outcome into its journal record.

Every output is written to a temporary file in its target directory, fsynced and
renamed (``refine_cli.io.writers``). On an interrupt or a failure, outputs this attempt
already renamed into place are removed again (:func:`run_item`), so OUTDIR only holds
outputs that a ``done`` record vouches for (or files that were there before).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from refine_cli import __version__
from refine_cli.batch.model import RECORD_VERSION, BatchItem, BatchJob, Record, _now, _one_line
from refine_cli.batch.plan import resolve_output
from refine_cli.config import RefineConfig
from refine_cli.errors import Interrupted, RefineError
from refine_cli.hashing import sha256_file

log = logging.getLogger(__name__)


def _target(outdir: Path, rel: str) -> Path:
    """The absolute path of an output (parents created).

    ``rel`` is inside OUTDIR (checked through symbolic links), or absolute: a polygon file in a
    ``--vector-dir`` outside OUTDIR.
    """
    if os.path.isabs(rel):
        Path(rel).parent.mkdir(parents=True, exist_ok=True)
        return Path(rel)
    return resolve_output(outdir, rel, create=True)


def _vector_spec(job: BatchJob, targets: dict[str, Path]) -> Any:
    """The ``VectorSpec`` of the input's polygon file, or ``None``."""
    if "vector" not in targets:
        return None
    from refine_cli.io.vectorize import VectorSpec

    o = job.outputs
    return VectorSpec(str(targets["vector"]), o.vector_format, o.simplify, o.min_area)


def _record(item: BatchItem, job: BatchJob, chash: str, status: str, *, facts: dict[str, Any] | None = None,
            outputs: dict[str, Any] | None = None, error: str | None = None, error_type: str | None = None,
            timings: dict[str, Any] | None = None, result: dict[str, Any] | None = None) -> Record:
    t, iso = _now()
    facts = facts or {}
    return {
        "v": RECORD_VERSION, "key": item.key, "status": status,
        "image": facts.get("image") or {"path": item.image},
        "mask": facts.get("mask") if facts else ({"path": item.mask} if item.mask else None),
        "config_hash": chash, "outputs": outputs or {}, "timings": timings or {}, "result": result,
        "error": error, "error_type": error_type, "time": t, "finished": iso,
        "host": socket.gethostname(), "pid": os.getpid(),
        "shard": f"{job.shard[0]}/{job.shard[1]}" if job.shard else None, "refine": __version__,
    }


def _snapshot(paths: Iterable[Path]) -> dict[Path, tuple[int, int, int] | None]:
    snap: dict[Path, tuple[int, int, int] | None] = {}
    for p in paths:
        try:
            st = os.lstat(p)
            snap[p] = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            snap[p] = None
    return snap


def _remove_new(before: dict[Path, tuple[int, int, int] | None]) -> None:
    """Remove outputs that this attempt renamed into place (they are not vouched for by a record)."""
    now = _snapshot(before)
    for p, st in now.items():
        if st is not None and st != before[p]:
            with contextlib.suppress(OSError):
                p.unlink()
                log.info("removed %s (its input did not finish)", p)


def run_item(item: BatchItem, job: BatchJob, chash: str, *, facts: dict[str, Any], owned: bool,
             progress: Callable[[str, int, int], None] | None = None,
             config: RefineConfig | None = None) -> Record:
    """Refine one input and return its record; failures become ``failed`` records.

    Args:
        item: the input.
        job: batch options.
        chash: config hash to record.
        facts: file facts of the inputs (from :func:`~refine_cli.batch.decide`).
        owned: a record or claim names this input, so its existing outputs may be replaced.
        progress: tile progress callback ``f(stage, done, total)``.
        config: configuration to run with (default ``job.config``; Dask pins the device here).

    Raises:
        Interrupted: SIGINT/SIGTERM; outputs of this attempt are removed first.
    """
    from refine_cli.api import refine_file

    t0 = time.perf_counter()
    targets: dict[str, Path] = {}
    before: dict[Path, tuple[int, int, int] | None] = {}
    try:
        for kind, rel in item.outputs().items():
            targets[kind] = _target(job.outdir, rel)
        before = _snapshot(targets.values())
        rep = refine_file(
            item.image, item.mask, str(targets["mask"]), config=config or job.config,
            uncertainty=str(targets["uncertainty"]) if "uncertainty" in targets else None,
            report=str(targets["report"]) if "report" in targets else None,
            overwrite=job.outputs.overwrite or owned, fmt=job.outputs.fmt, cog=job.outputs.cog,
            bands=job.outputs.bands, progress=progress, vector=_vector_spec(job, targets),
        )
        outputs = {kind: {"path": item.outputs()[kind], "sha256": sha256_file(p), "bytes": p.stat().st_size}
                   for kind, p in targets.items()}
    except (KeyboardInterrupt, Interrupted) as exc:
        _remove_new(before)
        if isinstance(exc, Interrupted):
            raise
        raise Interrupted("interrupted; the unfinished input's files were removed") from exc
    except Exception as exc:  # noqa: BLE001 - failure isolation: any error fails this input only
        _remove_new(before)
        if not isinstance(exc, RefineError):
            log.debug("%s failed with an internal error", item.image, exc_info=True)
        return _record(item, job, chash, "failed", facts=facts, error=_one_line(exc),
                       error_type=type(exc).__name__, timings={"wall_seconds": time.perf_counter() - t0})
    result = {"method": rep.method, "device": rep.device,
              "shape": [int(rep.image.get("height", 0)), int(rep.image.get("width", 0))], "tiles": rep.tiles}
    timings = {"wall_seconds": time.perf_counter() - t0, "stages": rep.stages}
    return _record(item, job, chash, "done", facts=facts, outputs=outputs, timings=timings, result=result)
