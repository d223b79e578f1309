"""The data of a batch: items, jobs, decisions, summaries, its errors and constants, and small helpers.

**Shards** (SLURM array jobs): ``shard=(I, N)`` runs the inputs at positions ``I-1,
I-1+N, ...`` of the plan sorted by key (balanced to within one input, and the same on
every machine that sees the same files; :func:`shard_items`). Each shard appends to its
own journal file (:func:`journal_path`), so shards never share a file;
:func:`~refine_cli.batch.merge_journals` reads every ``refine-journal*.jsonl`` in OUTDIR and
keeps the latest record (by ``time``) of each key, so any later run, sharded or not,
resumes from the union.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refine_cli import hashing
from refine_cli.config import RefineConfig
from refine_cli.errors import OutputExistsError, RefineError, UsageError
from refine_cli.hashing import sha256_file

RECORD_VERSION = 1
JOURNAL_NAME = "refine-journal.jsonl"
JOURNAL_GLOB = "refine-journal*.jsonl"
STATUSES = ("done", "failed", "skipped")
IMAGE_EXTS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".jp2")
"""File name endings (any case) that folder and glob inputs pick up."""

METHODS_WITH_SEGMENTER = frozenset({"magnet-fast"})
"""Methods that make their own coarse mask when none is given."""

OUTPUT_MARKERS = (".refined", ".uncertainty", ".report")
"""Stem endings of files a batch writes; never taken as inputs."""


Record = dict[str, Any]


class BatchIncomplete(RefineError, RuntimeError):
    """Some inputs of a batch failed; the others were done (exit code 3)."""

    exit_code = 3


class ConfigChangedError(OutputExistsError):
    """Outputs a finished run made with another configuration would be replaced; nothing ran (exit code 2)."""


# ----------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class OutputOptions:
    """What each input writes besides the refined mask, and how.

    Attributes:
        uncertainty: also write ``<name>.uncertainty.<ext>`` (uint8, 255 = most uncertain).
        report: also write ``<name>.report.json`` (the run report).
        fmt: ``png`` | ``tiff`` | ``None`` (default: ``.tif`` outputs, or the ``out`` column's extension).
        cog: Cloud-Optimised GeoTIFFs.
        bands: 0-based image bands used as RGB, or ``None``.
        overwrite: replace existing files that no journal record of the same input wrote.
        vector_dir: also write each input's polygons as ``<vector_dir>/<name>.<ext>`` (absolute folder),
            or ``None``.
        vector_format: ``gpkg`` (default) | ``geojson`` | ``fgb`` | ``parquet``.
        simplify, min_area: polygon options (see ``refine_cli.io.vectorize.VectorSpec``).
    """

    uncertainty: bool = False
    report: bool = False
    fmt: str | None = None
    cog: bool = False
    bands: tuple[int, ...] | None = None
    overwrite: bool = False
    vector_dir: str | None = None
    vector_format: str | None = None
    simplify: str | None = None
    min_area: str | None = None

    @property
    def vector_extension(self) -> str:
        """Extension of the polygon files: ``.gpkg``, ``.geojson``, ``.fgb`` or ``.parquet``."""
        fmt = (self.vector_format or "gpkg").lower().lstrip(".")
        return "." + {"geoparquet": "parquet", "flatgeobuf": "fgb", "json": "geojson"}.get(fmt, fmt)

    @property
    def extension(self) -> str:
        """Extension of raster outputs named by the batch: ``.png`` for ``fmt='png'``, else ``.tif``."""
        return ".png" if (self.fmt or "").lower() == "png" else ".tif"

    def hashed(self) -> dict[str, Any]:
        """The options that change what is written (part of the config hash)."""
        vector = {"vector": {"format": self.vector_extension, "simplify": self.simplify,
                             "min_area": self.min_area}} if self.vector_dir else {}
        return {"uncertainty": self.uncertainty, "report": self.report,
                "fmt": (self.fmt or "").lower() or None, "cog": self.cog,
                "bands": list(self.bands) if self.bands is not None else None, **vector}


@dataclass(frozen=True)
class BatchItem:
    """One planned input.

    Attributes:
        key: the mask output's path relative to OUTDIR (posix); unique within a plan.
        image: absolute image path.
        mask: absolute coarse-mask path, or ``None`` (the method's segmenter makes one).
        mask_out: refined-mask output, relative to OUTDIR (same as ``key``).
        uncertainty_out: uncertainty-map output relative to OUTDIR, or ``None``.
        report_out: report output relative to OUTDIR, or ``None``.
        vector_out: polygon file relative to OUTDIR (absolute when ``--vector-dir`` is outside it), or
            ``None``.
        skip: why the input cannot run (no mask, no segmenter); it is recorded as ``skipped``.
        error: a planning problem; the input is recorded as ``failed`` without running.
    """

    key: str
    image: str
    mask: str | None
    mask_out: str
    uncertainty_out: str | None = None
    report_out: str | None = None
    vector_out: str | None = None
    skip: str | None = None
    error: str | None = None

    def outputs(self) -> dict[str, str]:
        """``{kind: path relative to OUTDIR}`` of the files this input writes."""
        out = {"mask": self.mask_out}
        if self.uncertainty_out:
            out["uncertainty"] = self.uncertainty_out
        if self.report_out:
            out["report"] = self.report_out
        if self.vector_out:
            out["vector"] = self.vector_out
        return out


@dataclass(frozen=True)
class BatchJob:
    """How to run a planned batch.

    Attributes:
        outdir: output folder (created if missing); holds the journal.
        config: what each run computes.
        outputs: extra outputs and write options.
        verify_inputs: record and compare the sha256 of images and masks, not only size and mtime.
        retry_failed: run inputs whose latest record is ``failed`` again.
        force: run every input again.
        fail_fast: stop at the first failure.
        shard: ``(I, N)``, 1-based: run only shard I of N (own journal file).
        gpus_per_worker: Dask only: CUDA devices each worker owns (0: no pinning).
    """

    outdir: Path
    config: RefineConfig = field(default_factory=RefineConfig)
    outputs: OutputOptions = field(default_factory=OutputOptions)
    verify_inputs: bool = False
    retry_failed: bool = False
    force: bool = False
    fail_fast: bool = False
    shard: tuple[int, int] | None = None
    gpus_per_worker: int = 0

    @property
    def journal(self) -> Path:
        """This run's journal file."""
        return journal_path(self.outdir, self.shard)


@dataclass(frozen=True)
class Decision:
    """Whether an input runs, and why (one line).

    Attributes:
        action: ``run`` | ``keep`` (latest record stands) | ``skip`` | ``fail`` (planning problem) |
            ``conflict`` (the configuration changed and a ``done`` run's outputs exist: the batch
            stops unless ``overwrite`` or ``force``).
        reason: why.
        previous: the latest journal record of the input, or ``None``.
        facts: ``{"image": facts, "mask": facts | None}`` of the inputs now (see :func:`file_facts`).
        owned: a record or claim line names the input, so its existing outputs were
            written by a batch and running may replace them (set by :func:`~refine_cli.batch.decide_all`).
    """

    action: str
    reason: str
    previous: Record | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    owned: bool = False


@dataclass
class BatchSummary:
    """What a batch did.

    Attributes:
        journal: the journal file appended to.
        records: the record of every input visited, in completion order (kept ones included).
        resumed: keys whose earlier record was kept.
        problems: ignored journal lines and other warnings.
        stopped: the batch stopped early (``fail_fast``).
    """

    journal: Path
    records: list[Record] = field(default_factory=list)
    resumed: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    stopped: bool = False

    def count(self, status: str) -> int:
        """Inputs whose (latest) record has ``status``."""
        return sum(1 for r in self.records if r.get("status") == status)

    @property
    def exit_code(self) -> int:
        """0 when nothing failed, else 3."""
        return 3 if self.count("failed") else 0

    def line(self) -> str:
        """One-line human summary."""
        return (f"{self.count('done')} done ({len(self.resumed & self._keys('done'))} already done), "
                f"{self.count('failed')} failed, {self.count('skipped')} skipped; journal {self.journal}")

    def _keys(self, status: str) -> set[str]:
        return {r["key"] for r in self.records if r.get("status") == status}


# -------------------------------------------------------------------------------------- small helpers


def method_has_segmenter(config: RefineConfig) -> bool:
    """True when ``config`` can make a coarse mask itself (``--segmenter`` or a method that has one)."""
    return config.segmenter is not None or config.method in METHODS_WITH_SEGMENTER


def config_hash(config: RefineConfig, outputs: OutputOptions) -> str:
    """sha256 (hex) of everything that decides an input's outputs.

    The thread count is left out (it changes speed, not results); ``overwrite`` too.
    """
    return hashing.config_hash(config.to_dict(), v=RECORD_VERSION, outputs=outputs.hashed())


def file_facts(path: str, *, content_hash: bool = False) -> dict[str, Any]:
    """``{"path", "size", "mtime_ns"}`` (+ ``"sha256"``) of a file, or ``{"path", "missing": True}``."""
    try:
        st = os.stat(path)
    except OSError:
        return {"path": path, "missing": True}
    facts: dict[str, Any] = {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if content_hash:
        try:
            facts["sha256"] = sha256_file(path)
        except OSError:
            facts["missing"] = True
    return facts


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (1-based) to ``(I, N)``.

    Raises:
        UsageError: not two integers with ``1 <= I <= N``.
    """
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise UsageError(f"--shard {text!r}: give I/N with 1 <= I <= N, e.g. --shard 2/8") from None
    if n < 1 or not 1 <= i <= n:
        raise UsageError(f"--shard {text!r}: give I/N with 1 <= I <= N, e.g. --shard 2/8")
    return i, n


def shard_items(items: Sequence[BatchItem], shard: tuple[int, int] | None) -> list[BatchItem]:
    """The items of shard ``(I, N)``: positions ``I-1, I-1+N, ...`` of the items sorted by key."""
    ordered = sorted(items, key=lambda it: it.key)
    if shard is None:
        return ordered
    i, n = shard
    return ordered[i - 1 :: n]


def journal_path(outdir: str | Path, shard: tuple[int, int] | None = None) -> Path:
    """``OUTDIR/refine-journal.jsonl``, or ``refine-journal.shard-I-of-N.jsonl`` for a shard."""
    name = JOURNAL_NAME if shard is None else f"refine-journal.shard-{shard[0]}-of-{shard[1]}.jsonl"
    return Path(outdir) / name


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, RefineError):
        text = f"{type(exc).__name__}: {text}"
    return text[:500]


def _now() -> tuple[float, str]:
    t = time.time()
    return t, _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
