"""Batch runs: many images into one folder, with a journal, resume by default and isolated failures.

What :func:`run_batch` does, in order:

1. **Plan** (:func:`plan_batch`): list the images (a folder, a glob or a ``pairs.csv``), pair
   each with its coarse mask by one rule, and name its outputs inside OUTDIR. An image
   without a mask runs the method's segmenter when it has one, else it is ``skipped``
   with the reason. Problems found while planning (two masks match, an output name that
   escapes OUTDIR, two inputs that would write the same file) become ``failed`` records;
   the rest of the batch still runs.
2. **Decide** (:func:`decide`): the latest journal record of each input says whether it
   must run again (see *Resume* below).
3. **Run** each input through :func:`refine_cli.api.refine_file`, locally one after the
   other (:func:`run_batch`) or as one task per file on a Dask cluster
   (``scheduler=``). Each finished input appends one record to the journal at once.

**Journal.** ``OUTDIR/refine-journal.jsonl`` (``refine-journal.shard-I-of-N.jsonl`` for a
shard) is append-only JSON Lines, one record per input and attempt, each line written
with one ``write`` and fsynced before the next input starts. Record fields (version 1)::

    v            1
    key          the mask output's path relative to OUTDIR (posix); identifies the input
    status       "done" | "failed" | "skipped"
    image, mask  {"path": absolute, "size": bytes, "mtime_ns": int, "sha256": hex | absent}
                 (mask is null when the segmenter made it; sha256 only with --verify-inputs)
    config_hash  sha256 of the configuration and output options (:func:`config_hash`)
    outputs      {"mask" | "uncertainty" | "report": {"path": relative, "sha256": hex, "bytes": int}}
    timings      {"wall_seconds": float, "stages": {stage: seconds}}
    result       {"method", "device", "shape": [H, W], "tiles": {...}} (done only)
    error        one-line reason (failed/skipped), else null; error_type: exception class
    time         unix seconds when the record was made; finished: the same as ISO 8601 UTC
    host, pid, shard, refine   where and by which version it ran

Before it runs anything, a run appends one *claim line* ``{"v": 1, "claim": [keys], "time",
"finished", "host", "pid", "shard"}`` naming the inputs it is about to run (it has no
``status`` and is not an input record). A line that does not parse (a run killed
mid-write, a disk error) is reported and ignored: the input it described runs again.

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
:func:`config_hash`) never silently replaces finished work: when the latest record of an
input is ``done`` with another config hash and an output it lists is still in OUTDIR,
the input's decision is ``conflict`` and the whole batch stops before it runs or records
anything (:class:`ConfigChangedError`, exit code 2, naming the old and new method) unless
``overwrite`` (replace them) or ``force`` (redo everything) is given; another OUTDIR
keeps both. Inputs that only failed, were skipped or were claimed by a killed run (no
``done`` record) rerun under the new configuration as before. The check uses the merged
journals, so it holds across shards.

**Shards** (SLURM array jobs): ``shard=(I, N)`` runs the inputs at positions ``I-1,
I-1+N, ...`` of the plan sorted by key (balanced to within one input, and the same on
every machine that sees the same files). Each shard appends to its own journal file,
so shards never share a file; :func:`merge_journals` reads every ``refine-journal*.jsonl``
in OUTDIR and keeps the latest record (by ``time``) of each key, so any later run,
sharded or not, resumes from the union.

**Dask** (``scheduler="tcp://HOST:PORT"`` or ``"local:N"``; optional extra
``refine-cli[distributed]``): each input that must run becomes one task; workers run
:func:`refine_cli.api.refine_file` exactly as the local loop does and return the record,
and this (client) process appends records as tasks complete. Workers must see the same
paths as the client (shared filesystem) and have ``refine-cli`` installed. With
``gpus_per_worker=K`` each worker gets its own K device ids (by its rank among the
workers on the same host, or ``0..K-1`` of its ``CUDA_VISIBLE_DEVICES`` when that is
set) and every task borrows one of them as ``cuda:<id>``.

**Atomicity.** Every output is written to a temporary file in its target directory,
fsynced and renamed (``refine_cli.io.writers``). On an interrupt or a failure, outputs
this attempt already renamed into place are removed again, so after a local run OUTDIR
only holds outputs that a ``done`` record vouches for (or files that were there before);
SIGTERM is handled like SIGINT. Temporary files of killed runs are removed at the next
start (by a shard: only those of its own outputs, since other hosts may be writing).

**Security.** Output names from ``pairs.csv`` must be relative paths inside OUTDIR:
absolute paths, ``..``, hidden names, backslashes and paths through symbolic links
that leave OUTDIR are refused (the input is recorded as failed).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from refine_cli import __version__, hashing
from refine_cli.config import RefineConfig
from refine_cli.errors import (
    DependencyError,
    InputError,
    Interrupted,
    OutputExistsError,
    RefineError,
    UsageError,
)
from refine_cli.hashing import sha256_file

if TYPE_CHECKING:
    from refine_cli.refiners.base import Refiner
    from refine_cli.tiling.budget import MemoryPlan

log = logging.getLogger(__name__)

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
    """

    uncertainty: bool = False
    report: bool = False
    fmt: str | None = None
    cog: bool = False
    bands: tuple[int, ...] | None = None
    overwrite: bool = False

    @property
    def extension(self) -> str:
        """Extension of raster outputs named by the batch: ``.png`` for ``fmt='png'``, else ``.tif``."""
        return ".png" if (self.fmt or "").lower() == "png" else ".tif"

    def hashed(self) -> dict[str, Any]:
        """The options that change what is written (part of the config hash)."""
        return {"uncertainty": self.uncertainty, "report": self.report,
                "fmt": (self.fmt or "").lower() or None, "cog": self.cog,
                "bands": list(self.bands) if self.bands is not None else None}


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
        skip: why the input cannot run (no mask, no segmenter); it is recorded as ``skipped``.
        error: a planning problem; the input is recorded as ``failed`` without running.
    """

    key: str
    image: str
    mask: str | None
    mask_out: str
    uncertainty_out: str | None = None
    report_out: str | None = None
    skip: str | None = None
    error: str | None = None

    def outputs(self) -> dict[str, str]:
        """``{kind: path relative to OUTDIR}`` of the files this input writes."""
        out = {"mask": self.mask_out}
        if self.uncertainty_out:
            out["uncertainty"] = self.uncertainty_out
        if self.report_out:
            out["report"] = self.report_out
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
            written by a batch and running may replace them (set by :func:`decide_all`).
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


# ------------------------------------------------------------------------------------------ planning


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS) and not name.startswith(".")


def _is_output_name(path: Path) -> bool:
    return path.stem.endswith(OUTPUT_MARKERS)


def _glob_root(pattern: str) -> Path:
    """The leading folders of a glob pattern that hold no wildcard."""
    parts = Path(pattern).parts
    root: list[str] = []
    for part in parts[:-1]:
        if any(c in part for c in "*?["):
            break
        root.append(part)
    return Path(*root) if root else Path(".")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def list_images(source: str, *, exclude: Iterable[str | Path] = ()) -> tuple[Path, list[Path]]:
    """The images a folder, glob pattern or single file names.

    A folder gives its image files (non-recursive); a pattern is expanded with ``**``
    support. Hidden files, files the batch writes (``*.refined.*``, ...) and files under
    ``exclude`` folders (OUTDIR, the mask folder) are left out.

    Args:
        source: folder, glob pattern (quote it in the shell) or one image.
        exclude: folders whose files are never inputs.

    Returns:
        ``(root, images)``: the folder output names are taken relative to, and the sorted
        absolute image paths.

    Raises:
        UsageError: nothing matches.
    """
    import glob

    excl = [Path(os.path.abspath(e)) for e in exclude]
    src = Path(source)
    if src.is_dir():
        root = src
        found = [p for p in src.iterdir() if p.is_file() and _is_image_name(p.name)]
    elif src.is_file():
        root, found = src.parent, [src]
    elif any(c in source for c in "*?["):
        root = _glob_root(source)
        found = [Path(p) for p in glob.glob(source, recursive=True)
                 if os.path.isfile(p) and _is_image_name(os.path.basename(p))]
    else:
        raise UsageError(f"{source} does not exist: give a folder, an image or a quoted glob such as "
                         "'tiles/*.tif'")
    root = Path(os.path.abspath(root))
    images = sorted({Path(os.path.abspath(p)) for p in found})
    images = [p for p in images if not _is_output_name(p)
              and not any(_inside(p, e) and e != root for e in excl)]
    if not images:
        raise UsageError(f"no images found in {source} (looked for {', '.join(IMAGE_EXTS)})")
    return root, images


class _MaskFinder:
    """Finds ``<mask dir>/<image stem><suffix>.<ext>``, listing each folder once."""

    def __init__(self, mask_dir: Path | None, suffix: str) -> None:
        self.mask_dir = mask_dir
        self.suffix = suffix
        self._index: dict[Path, dict[str, list[Path]]] = {}

    def _stems(self, folder: Path) -> dict[str, list[Path]]:
        if folder not in self._index:
            index: dict[str, list[Path]] = {}
            if folder.is_dir():
                for p in folder.iterdir():
                    if _is_image_name(p.name) and p.is_file():
                        index.setdefault(p.stem, []).append(p)
            self._index[folder] = index
        return self._index[folder]

    def where(self, image: Path) -> str:
        """The pattern searched for ``image``, for messages."""
        folder = self.mask_dir or image.parent
        return str(folder / f"{image.stem}{self.suffix}.*")

    def find(self, image: Path) -> tuple[Path | None, str | None]:
        """``(mask, None)``, ``(None, None)`` when there is none, or ``(None, problem)`` when ambiguous."""
        folder = self.mask_dir or image.parent
        cands = sorted(p for p in self._stems(folder).get(image.stem + self.suffix, []) if p != image)
        if not cands:
            return None, None
        same = [p for p in cands if p.suffix.lower() == image.suffix.lower()]
        if len(same) == 1:
            return same[0], None
        if len(cands) == 1:
            return cands[0], None
        names = ", ".join(p.name for p in cands)
        return None, f"several masks match {image.name}: {names}; keep one or pair them with --pairs"


def read_pairs(csv_path: str | Path) -> list[tuple[str, str | None, str | None]]:
    """Rows of a ``pairs.csv``: ``image,mask[,out]``.

    A header row ``image,mask[,out]`` is optional; blank lines and lines starting with
    ``#`` are ignored; an empty mask cell means "no mask". Relative image and mask
    paths are taken relative to the CSV's folder; ``out`` stays relative to OUTDIR.

    Returns:
        ``[(image, mask | None, out | None)]`` with absolute image and mask paths.

    Raises:
        UsageError: unreadable file or a row with more than three columns.
    """
    path = Path(csv_path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--pairs {path}: cannot read it ({exc})") from None
    base = Path(os.path.abspath(path.parent))
    rows: list[tuple[str, str | None, str | None]] = []
    for lineno, row in enumerate(csv.reader(text.splitlines()), 1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if not rows and [c.lower() for c in cells[:3]] in (["image", "mask"], ["image", "mask", "out"]):
            continue
        if len(cells) > 3 or not cells[0]:
            raise UsageError(f"--pairs {path} line {lineno}: expected image,mask[,out], got {len(cells)} "
                             "cells")
        image = str(base / cells[0]) if not os.path.isabs(cells[0]) else cells[0]
        mask_cell = cells[1] if len(cells) > 1 else ""
        mask = (str(base / mask_cell) if not os.path.isabs(mask_cell) else mask_cell) if mask_cell else None
        out = cells[2] if len(cells) > 2 and cells[2] else None
        rows.append((os.path.abspath(image), os.path.abspath(mask) if mask else None, out))
    if not rows:
        raise UsageError(f"--pairs {path}: no rows")
    return rows


def check_relative_output(name: str) -> str:
    r"""Validate an output name relative to OUTDIR; returns it in posix form.

    Raises:
        UsageError: empty, absolute, with ``..``, ``\``, NUL, or a hidden component
            (those are reserved for temporary files and the journal).
    """
    if not name or "\x00" in name or "\\" in name:
        raise UsageError(f"output name {name!r} is not allowed: use a plain relative path such as "
                         "sub/name.tif")
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith("~"):
        raise UsageError(f"output name {name!r} is absolute: outputs must stay inside OUTDIR; give a "
                         "relative path")
    if any(part in ("..", "") for part in p.parts) or ".." in name.split("/"):
        raise UsageError(f"output name {name!r} leaves OUTDIR ('..'); give a path inside it")
    if any(part.startswith(".") for part in p.parts):
        raise UsageError(f"output name {name!r} has a hidden component; hidden names are reserved in OUTDIR")
    if p.name.startswith("refine-journal"):
        raise UsageError(f"output name {name!r} clashes with the journal; choose another name")
    return str(p)


def _within(path: str | Path, folder: str | Path) -> bool:
    """``path`` is ``folder`` or below it, after resolving symbolic links."""
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real == top or real.startswith(top + os.sep)


def resolve_output(outdir: Path, rel: str, *, create: bool = False) -> Path:
    """The absolute path of output ``rel``, checked to stay inside ``outdir`` through symlinks.

    Args:
        outdir: the output folder.
        rel: name from :func:`check_relative_output`.
        create: create missing parent folders (one by one, after checking each).

    Raises:
        UsageError: a parent is a symbolic link leading out of OUTDIR, a parent is not a
            folder, or the output itself is a symbolic link.
    """
    cur = Path(outdir)
    for part in PurePosixPath(rel).parts[:-1]:
        cur = cur / part
        if cur.is_symlink() or cur.exists():
            if not _within(cur, outdir):
                raise UsageError(f"output {rel!r}: {cur} leads out of OUTDIR (symbolic link); refused")
            if not os.path.isdir(cur):
                raise UsageError(f"output {rel!r}: {cur} is not a folder")
        elif create:
            cur.mkdir()
        else:
            return Path(outdir) / rel
    target = Path(outdir) / rel
    if target.is_symlink():
        raise UsageError(f"output {rel!r} is a symbolic link in OUTDIR; refused (remove it)")
    return target


def _names(base: str, mask_suffix: str, outputs: OutputOptions) -> tuple[str, str | None, str | None]:
    """Mask, uncertainty and report names for ``base`` (relative, without extension)."""
    ext = mask_suffix if mask_suffix.lower() in (".tif", ".tiff", ".png") else outputs.extension
    unc = f"{base}.uncertainty{ext}" if outputs.uncertainty else None
    rep = f"{base}.report.json" if outputs.report else None
    return f"{base}{mask_suffix}", unc, rep


def plan_batch(
    source: str | None,
    outdir: str | Path,
    *,
    config: RefineConfig,
    outputs: OutputOptions,
    mask_dir: str | Path | None = None,
    mask_suffix: str | None = None,
    pairs: str | Path | None = None,
) -> list[BatchItem]:
    """Pair every image with its mask and name its outputs.

    Exactly one source of images: ``source`` (folder or glob), with masks by
    ``mask_dir`` (same stem, plus ``mask_suffix`` if given) or ``mask_suffix`` (beside
    the image), or ``pairs`` (a CSV, see :func:`read_pairs`). Default output names
    mirror the image's path below the folder (or the glob's fixed prefix):
    ``<rel stem>.refined.tif``, ``<rel stem>.uncertainty.tif``, ``<rel stem>.report.json``.

    Returns:
        Items sorted by key. Items that cannot run carry ``skip`` or ``error``.

    Raises:
        UsageError: conflicting or missing rules, nothing to do.
    """
    outdir = Path(os.path.abspath(outdir))
    has_segmenter = method_has_segmenter(config)
    if pairs is not None and (source is not None or mask_dir is not None or mask_suffix is not None):
        raise UsageError("--pairs lists images and masks itself: drop DIR_OR_GLOB, --mask-dir and "
                         "--mask-suffix")
    if pairs is None and source is None:
        raise UsageError("give a folder or glob of images (DIR_OR_GLOB) or --pairs pairs.csv")
    if pairs is None and mask_dir is None and mask_suffix is None and not has_segmenter:
        raise UsageError(f"method {config.method!r} needs coarse masks: give --mask-dir DIR, --mask-suffix "
                         "SUFFIX or --pairs pairs.csv")
    if pairs is not None:
        rows = [_Row(image, mask, None, out, Path(image).stem) for image, mask, out in read_pairs(pairs)]
        no_mask_hint = f"no mask in {pairs}"
    else:
        assert source is not None
        rows, no_mask_hint = _discover(source, outdir, mask_dir, mask_suffix)
    no_mask = None if has_segmenter else f"({no_mask_hint}) and method {config.method!r} has no segmenter"
    items = _distinct_keys(_mark_clashes([_item(row, outdir, outputs, no_mask) for row in rows]))
    return sorted(items, key=lambda it: it.key)


@dataclass(frozen=True)
class _Row:
    """One input found: image, mask or ``None``, why the mask is unusable, an explicit output, a base name."""

    image: str
    mask: str | None
    problem: str | None
    out: str | None
    base: str


def _discover(source: str, outdir: Path, mask_dir: str | Path | None,
              mask_suffix: str | None) -> tuple[list[_Row], str]:
    """The images of a folder or glob with their masks, and the hint for an image without one."""
    mdir = Path(os.path.abspath(mask_dir)) if mask_dir is not None else None
    if mdir is not None and not mdir.is_dir():
        raise UsageError(f"--mask-dir {mask_dir} is not a folder")
    suffix = mask_suffix or ""
    root, images = list_images(source, exclude=[outdir] + ([mdir] if mdir else []))
    if mdir is not None and not suffix and mdir == root:
        raise UsageError("--mask-dir is the image folder: masks there need a --mask-suffix such as _mask")
    finder = _MaskFinder(mdir, suffix) if (mdir is not None or suffix) else None
    rows = []
    for image in images:
        if suffix and image.stem.endswith(suffix) and (mdir is None or mdir == image.parent):
            continue  # a mask beside the images, not an image
        rel = image.relative_to(root) if _inside(image, root) else Path(image.name)
        base = str(PurePosixPath(*rel.parts).with_suffix(""))
        mask, problem = finder.find(image) if finder else (None, None)
        rows.append(_Row(str(image), str(mask) if mask else None, problem, None, base))
    return rows, f"no mask matches {finder.where(Path('<stem>'))}" if finder else "no mask rule given"


def _item(row: _Row, outdir: Path, outputs: OutputOptions, no_mask: str | None) -> BatchItem:
    """The item of one row: its output names, and why it cannot run.

    ``no_mask`` is the reason when the row has no mask and the method cannot make one; ``None`` when
    it can.
    """
    error = row.problem
    if row.out is not None:
        try:
            mask_out = check_relative_output(row.out)
            resolve_output(outdir, mask_out)
        except UsageError as exc:
            error = error or str(exc)
            mask_out = f"{row.base}.refined{outputs.extension}"  # a key for the record only
        suffix = PurePosixPath(mask_out).suffix
        names = _names(str(PurePosixPath(mask_out).with_suffix("")), suffix, outputs)
    else:
        names = _names(row.base, f".refined{outputs.extension}", outputs)
    skip = None
    if row.mask is None and no_mask is not None and error is None:
        skip = f"no coarse mask for {Path(row.image).name} {no_mask}"
    return BatchItem(key=names[0], image=row.image, mask=row.mask, mask_out=names[0],
                     uncertainty_out=names[1], report_out=names[2], skip=skip, error=error)


def _mark_clashes(items: list[BatchItem]) -> list[BatchItem]:
    """Items whose outputs another item would also write get an error naming the others."""
    owners: dict[str, list[int]] = {}
    for idx, it in enumerate(items):
        for name in it.outputs().values():
            owners.setdefault(name, []).append(idx)
    clash = {i for idxs in owners.values() if len(idxs) > 1 for i in idxs}
    for idx in clash:
        it = items[idx]
        others = sorted({items[j].image for n in it.outputs().values() for j in owners[n] if j != idx})
        clash_msg = (f"output {it.mask_out} would also be written for {', '.join(others)}; rename one or "
                     "use --pairs with an out column")
        items[idx] = replace(it, error=it.error or clash_msg)
    return items


def _distinct_keys(items: list[BatchItem]) -> list[BatchItem]:
    """Colliding keys get ``#1``, ``#2`` ... so that the journal keeps the items apart."""
    keys: dict[str, int] = {}
    for idx, it in enumerate(items):
        n = keys.get(it.key, 0)
        keys[it.key] = n + 1
        if n:
            items[idx] = replace(it, key=f"{it.key}#{n}")
    return items


# ------------------------------------------------------------------------------------------- journal


_KEY_RE = re.compile(rb'"key":\s*("(?:[^"\\]|\\.)*")')


def read_journal(path: str | Path) -> tuple[list[Record], list[str], set[str]]:
    """Parse a journal file; bad lines are reported, never fatal.

    Returns:
        ``(records in file order, problems, claimed keys)``: each problem is one line
        naming the file and line number of a line that was ignored; claimed keys are those
        of claim lines and those still legible in unreadable lines (a batch wrote or was
        about to write their outputs, so a rerun may replace them).
    """
    records: list[Record] = []
    problems: list[str] = []
    claimed: set[str] = set()
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return records, problems, claimed
    except OSError as exc:
        return records, [f"{path}: cannot read the journal ({exc}); its inputs will run again"], claimed
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        last = lineno == len(lines)
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            what = "truncated" if last else "corrupt"
            problems.append(f"{path} line {lineno}: {what} record ignored (its input runs again)")
            m = _KEY_RE.search(raw)
            if m:
                with contextlib.suppress(UnicodeDecodeError, json.JSONDecodeError):
                    claimed.add(json.loads(m.group(1).decode("utf-8")))
            continue
        if isinstance(rec, dict) and isinstance(rec.get("claim"), list):
            claimed.update(k for k in rec["claim"] if isinstance(k, str))
            continue
        if (not isinstance(rec, dict) or not isinstance(rec.get("key"), str)
                or rec.get("status") not in STATUSES or not isinstance(rec.get("time"), int | float)):
            problems.append(f"{path} line {lineno}: not a batch record; ignored")
            continue
        records.append(rec)
    return records, problems, claimed


@dataclass
class JournalState:
    """All journals of an OUTDIR, merged.

    Attributes:
        latest: the latest record of every key.
        problems: lines that were ignored (one message each).
        claimed: keys whose outputs a batch wrote or set out to write (claim lines, and
            keys legible in unreadable lines); such outputs may be replaced.
    """

    latest: dict[str, Record] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    claimed: set[str] = field(default_factory=set)


def merge_journals(outdir: str | Path) -> JournalState:
    """The latest record of every key over all journals in ``outdir`` (all shards included).

    Records are ordered by their ``time``; between equal times a later line in the same
    file wins.
    """
    order_of: dict[str, tuple[float, int, int]] = {}
    state = JournalState()
    for fi, path in enumerate(sorted(Path(outdir).glob(JOURNAL_GLOB))):
        records, bad, claimed = read_journal(path)
        state.problems += bad
        state.claimed |= claimed
        for li, rec in enumerate(records):
            order = (float(rec["time"]), fi, li)
            if rec["key"] not in order_of or order > order_of[rec["key"]]:
                order_of[rec["key"]] = order
                state.latest[rec["key"]] = rec
    return state


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while a journal line is written (main thread only)."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Journal:
    """An append-only JSON Lines journal, one fsynced line per record, locked against a second writer.

    Args:
        path: journal file (created if missing).

    Raises:
        UsageError: another process holds the journal (a second batch into the same OUTDIR and shard).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            self._lock()
            if created:
                from refine_cli.io.writers import fsync_dir

                fsync_dir(self.path.parent)
            self._end_line()
        except BaseException:
            os.close(self._fd)
            raise

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UsageError(f"{self.path} is in use by another refine batch; wait for it or give "
                                 "another OUTDIR or --shard") from None
            raise

    def _end_line(self) -> None:
        """Terminate a line a killed writer left without its newline, so the next record starts clean."""
        size = os.fstat(self._fd).st_size
        if size:
            with open(self.path, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    self._write(b"\n")

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)

    def append(self, record: Record) -> None:
        """Write one record as one line and fsync it (interrupts wait until it is on disk)."""
        data = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
        with _signals_deferred():
            self._write(data)

    def claim(self, keys: Sequence[str], shard: tuple[int, int] | None = None) -> None:
        """Record that this run is about to write the outputs of ``keys`` (a claim line, not an input record).

        A run killed between writing an output and appending its record (SIGKILL, power
        loss, an interrupted Dask run whose tasks still finish) leaves outputs that no
        record names; the claim lets the next run replace them instead of refusing them.
        """
        t, iso = _now()
        self.append({"v": RECORD_VERSION, "claim": list(keys), "time": t, "finished": iso,
                     "host": socket.gethostname(), "pid": os.getpid(),
                     "shard": f"{shard[0]}/{shard[1]}" if shard else None})

    def close(self) -> None:
        """Release the lock and the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -------------------------------------------------------------------------------------------- resume


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
        chash: :func:`config_hash` of this run.
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


# ----------------------------------------------------------------------------------------- one input


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
        facts: file facts of the inputs (from :func:`decide`).
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
            targets[kind] = resolve_output(job.outdir, rel, create=True)
        before = _snapshot(targets.values())
        rep = refine_file(
            item.image, item.mask, str(targets["mask"]), config=config or job.config,
            uncertainty=str(targets["uncertainty"]) if "uncertainty" in targets else None,
            report=str(targets["report"]) if "report" in targets else None,
            overwrite=job.outputs.overwrite or owned, fmt=job.outputs.fmt, cog=job.outputs.cog,
            bands=job.outputs.bands, progress=progress,
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


# ---------------------------------------------------------------------------------------- batch loop


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
        items: planned inputs (already sharded, see :func:`shard_items`).
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
        UsageError: the journal is held by another batch.
        ConfigChangedError: the configuration changed and finished outputs would be replaced
            (neither ``overwrite`` nor ``force``); nothing was run or recorded.
        DependencyError: ``scheduler`` given but Dask distributed is not installed.
    """
    if scheduler is not None:
        _import_distributed()
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


# ---------------------------------------------------------------------------------------------- Dask


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise DependencyError('--scheduler needs Dask distributed: pip install "refine-cli[distributed]"'
                              ) from None
    return distributed


def assign_gpus(addresses: Iterable[str], per_worker: int) -> dict[str, list[int]]:
    """Device ids for each Dask worker: the r-th worker of a host gets ``r*K .. r*K+K-1``.

    Args:
        addresses: worker addresses such as ``tcp://10.0.0.5:40331``.
        per_worker: K, devices per worker.

    Returns:
        ``{address: [device ids]}`` (ranks follow sorted addresses within each host).
    """
    by_host: dict[str, list[str]] = {}
    for addr in addresses:
        host = addr.split("://", 1)[-1].rsplit(":", 1)[0]
        by_host.setdefault(host, []).append(addr)
    out: dict[str, list[int]] = {}
    for addrs in by_host.values():
        for rank, addr in enumerate(sorted(addrs)):
            out[addr] = list(range(rank * per_worker, (rank + 1) * per_worker))
    return out


_GPU_POOLS: dict[str, Any] = {}
_GPU_LOCK = threading.Lock()


def _pin_worker(ids: list[int], dask_worker: Any = None) -> list[int]:
    """Runs on a worker (``client.run``): give it a pool of device ids; returns the pool.

    When ``CUDA_VISIBLE_DEVICES`` is set for the worker (dask-cuda, a job script), its
    visible devices are used as ``0..K-1`` instead of the host-wide ids. A worker without
    CUDA gets no pool (``--device auto`` then runs on its CPU).
    """
    import queue

    try:
        import torch

        count = int(torch.cuda.device_count())
    except ImportError:
        count = 0
    if count == 0:
        log.info("worker %s sees no CUDA device; its tasks run with --device as given", dask_worker.address)
        return []
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        ids = list(range(min(len(ids), count)))
    elif max(ids) >= count:
        log.warning("worker %s: devices %s exceed the %d on its host; sharing them", dask_worker.address, ids,
                    count)
        ids = sorted({i % count for i in ids})
    pool: queue.Queue[int] = queue.Queue()
    for i in ids:
        pool.put(i)
    with _GPU_LOCK:
        _GPU_POOLS[dask_worker.address] = pool
    return ids


def _dask_task(item: BatchItem, job: BatchJob, chash: str, facts: dict[str, Any], owned: bool) -> Record:
    """One input on a Dask worker, on a borrowed device when the worker has a pool."""
    import warnings

    from distributed import get_worker

    warnings.filterwarnings("ignore", module="rasterio")  # as the CLI does: "not georeferenced" is expected

    try:
        address = get_worker().address
    except ValueError:
        address = ""
    with _GPU_LOCK:
        pool = _GPU_POOLS.get(address)
    if pool is None or job.config.device not in ("auto", "cuda"):
        return run_item(item, job, chash, facts=facts, owned=owned)
    gid = pool.get()
    try:
        config = job.config.replace(device=f"cuda:{gid}")
        return run_item(item, job, chash, facts=facts, owned=owned, config=config)
    finally:
        pool.put(gid)


@contextlib.contextmanager
def open_client(scheduler: str, gpus_per_worker: int = 0) -> Iterator[Any]:
    """A Dask client for ``tcp://HOST:PORT`` (any ``scheme://``) or ``local:N``.

    ``local:N`` starts N worker processes here, each with ``max(1, K)`` threads and the
    resource ``GPU=K`` when ``gpus_per_worker=K``.

    Raises:
        DependencyError: Dask distributed is missing.
        UsageError: a malformed spec or an unreachable scheduler.
    """
    distributed = _import_distributed()
    cluster = None
    if scheduler.startswith("local:"):
        try:
            n = int(scheduler.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise UsageError(f"--scheduler {scheduler!r}: give local:N with N >= 1 workers")
        cluster = distributed.LocalCluster(
            n_workers=n, threads_per_worker=max(1, gpus_per_worker), processes=True, dashboard_address=None,
            resources={"GPU": gpus_per_worker} if gpus_per_worker else None, silence_logs=logging.CRITICAL)
        client = distributed.Client(cluster)
    elif "://" in scheduler:
        try:
            client = distributed.Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise UsageError(f"--scheduler {scheduler}: cannot reach the Dask scheduler ({exc}); check the "
                             "address and that `dask scheduler` runs") from None
    else:
        raise UsageError(f"--scheduler {scheduler!r}: use tcp://HOST:PORT or local:N")
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _run_dask(pending: Sequence[tuple[BatchItem, Decision]], job: BatchJob, chash: str,
              emit: Callable[[Record, bool, bool], None], summary: BatchSummary, scheduler: str) -> None:
    distributed = _import_distributed()
    if not pending:
        return
    with open_client(scheduler, job.gpus_per_worker) as client:
        workers = client.scheduler_info().get("workers", {})
        resources = None
        if job.gpus_per_worker:
            for addr, ids in assign_gpus(workers, job.gpus_per_worker).items():
                got = client.run(_pin_worker, ids, workers=[addr])
                log.info("worker %s: devices %s", addr, got.get(addr))
            if workers and all("GPU" in (w.get("resources") or {}) for w in workers.values()):
                resources = {"GPU": 1}
        futures = {}
        for item, dec in pending:
            task_key = f"refine-{hashlib.sha256(item.key.encode()).hexdigest()[:16]}-{time.time_ns()}"
            fut = client.submit(_dask_task, item, job, chash, dec.facts, dec.owned, key=task_key, pure=False,
                                resources=resources)
            futures[fut] = item
        recorded: set[Any] = set()
        try:
            for fut in distributed.as_completed(list(futures)):
                item = futures[fut]
                try:
                    rec = fut.result()
                except Exception as exc:  # noqa: BLE001 - a worker died or the task could not run
                    rec = _record(item, job, chash, "failed", error=f"Dask task failed: {_one_line(exc)}",
                                  error_type=type(exc).__name__)
                emit(rec, False, True)
                recorded.add(fut)
                if job.fail_fast and rec["status"] == "failed":
                    summary.stopped = True
                    break
        except KeyboardInterrupt:
            client.cancel([f for f in futures if not f.done()])
            for fut in futures:  # keep the work that finished meanwhile
                if fut not in recorded and fut.status == "finished":
                    with contextlib.suppress(Exception):
                        emit(fut.result(timeout=5), False, True)
            raise
        finally:
            client.cancel([f for f in futures if not f.done()])


# --------------------------------------------------------------------------------------- dry run


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


def plan_file_memory(image: str, config: RefineConfig, outputs: OutputOptions, *,
                     refiner: Refiner | None = None) -> MemoryPlan:
    """The memory plan ``refine run`` would choose for ``image``, from its header only.

    Assumes a binary mask unless ``config.classes`` is set (label maps need more).

    Args:
        image: image path.
        config: run configuration.
        outputs: output options (the uncertainty map adds a byte per pixel).
        refiner: a refiner built from ``config`` to reuse (built when ``None``).

    Raises:
        InputError: unreadable header.
        ResourceError: nothing fits ``config.max_memory``.
    """
    from refine_cli.engine.levels import plan_level
    from refine_cli.engine.outputs import OutputSpec, bytes_per_pixel
    from refine_cli.refiners import build_refiner

    shape = image_shape(image, max_pixels=config.max_pixels)
    refiner = refiner or build_refiner(config)
    labels = config.classes is not None
    channels = config.classes or 1
    spec = OutputSpec(mask=f"out{outputs.extension}", uncertainty="u.tif" if outputs.uncertainty else None,
                      soft=config.soft, threshold=config.threshold, fmt=outputs.fmt)
    batch = config.cascade.batch_size if refiner.uses_torch else 1
    return plan_level(shape, refiner, channels=channels, bytes_out=bytes_per_pixel(spec, channels, labels),
                      budget=config.max_memory, batch_size=batch, tile_size=config.tile_size)


def dry_run(items: Sequence[BatchItem], job: BatchJob) -> tuple[list[Record], list[str]]:
    """The plan of a batch without running it: per input its action, reason and memory estimate.

    Returns:
        ``([{"action", "reason", "previous", "previous_method", "key", "image", "mask", "outputs",
        "memory"}], problems)``: ``action`` is the :class:`Decision`'s, except that an input
        that would run but whose header or memory plan fails is ``fail`` (it would fail when
        run); ``previous`` is the status of the latest record or ``None`` and
        ``previous_method`` its method (:func:`recorded_method`); ``memory`` is
        ``{"estimate_bytes", "budget", "tile_size", "queue_depth", "shape"}`` for inputs that
        would run (or ``conflict``), ``{"error": ...}`` when they cannot be planned, else ``None``.
        A plan with ``conflict`` rows would stop: see :func:`conflict_error`.
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
                plan = plan_file_memory(item.image, job.config, job.outputs, refiner=refiner)
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
