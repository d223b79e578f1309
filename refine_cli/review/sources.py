"""Which runs a review shows: run reports (``refine run --report``) and ``refine batch`` output folders.

A run report names its inputs and outputs (paths as given on the command line, relative to the
report's ``workdir``). A batch folder holds journals (``refine-journal*.jsonl``) whose latest record
per input names the image, the coarse mask and the outputs (relative to the folder), and, with
``refine batch --report``, each input's run report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from refine_cli.batch.journal import merge_journals, read_journal
from refine_cli.batch.model import JOURNAL_GLOB
from refine_cli.errors import InputError


@dataclass
class RunEntry:
    """One image of a review and the files of its run.

    Attributes:
        name: a short label (a batch input's key without its ``.refined.*`` ending, or the image's file
            name).
        status: ``done``, ``failed`` or ``skipped`` (a batch record's), ``done`` for a run report.
        image: the image's path, or ``None`` when unknown.
        coarse: the coarse mask's path, or ``None`` (made by a segmenter and not kept).
        refined: the refined mask's path, or ``None`` (written to stdout, or not written).
        uncertainty: the uncertainty map's path, or ``None``.
        report: the run report (its JSON), or ``None`` (a batch run without ``--report``).
        record: the batch journal's record, or ``None``.
        error: why the input failed (batch), or ``None``.
        notes: one-line remarks about missing files.
    """

    name: str
    status: str = "done"
    image: str | None = None
    coarse: str | None = None
    refined: str | None = None
    uncertainty: str | None = None
    report: dict[str, Any] | None = None
    record: dict[str, Any] | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        """The run's configuration (from its report), ``{}`` when unknown."""
        return dict((self.report or {}).get("config") or {})

    @property
    def wall_seconds(self) -> float | None:
        """Elapsed seconds of the run, from the report or the journal."""
        if self.report is not None:
            return float(self.report.get("wall_seconds", 0.0))
        t = (self.record or {}).get("timings") or {}
        return float(t["wall_seconds"]) if "wall_seconds" in t else None

    @property
    def stages(self) -> dict[str, float]:
        """Seconds per stage (``read``, ``refine`` ...), from the report or the journal."""
        if self.report is not None:
            return {k: float(v) for k, v in (self.report.get("stages") or {}).items()}
        timings = (self.record or {}).get("timings") or {}
        return {k: float(v) for k, v in (timings.get("stages") or {}).items()}


def _resolve(path: str | None, *bases: Path | None) -> str | None:
    """An existing file for ``path`` (absolute, or relative to the first base holding it), else ``None``."""
    if not path or path == "-":
        return None
    p = Path(path)
    if p.is_absolute():
        return str(p) if p.exists() else None
    for base in bases:
        if base is not None and (base / p).exists():
            return str(base / p)
    return str(p) if p.exists() else None


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read the run report {path} ({exc}); give the JSON that `refine run "
                         "--report` wrote") from exc
    if not isinstance(data, dict) or "outputs" not in data or "image" not in data:
        raise InputError(f"{path} is not a run report: give the JSON that `refine run --report` wrote, "
                         "or a `refine batch` output folder")
    return data


def entry_from_report(report: dict[str, Any], where: Path, name: str | None = None,
                      outdir: Path | None = None) -> RunEntry:
    """The files a run report names, found relative to the run's ``workdir``, ``outdir`` or ``where``."""
    bases = (Path(report["workdir"]) if report.get("workdir") else None, outdir, where)
    outputs = report.get("outputs") or {}
    image = (report.get("image") or {}).get("path")
    coarse = (report.get("mask") or {}).get("path")
    entry = RunEntry(name or Path(str(image or where)).name, image=_resolve(image, *bases),
                     coarse=_resolve(coarse, *bases), refined=_resolve(outputs.get("mask"), *bases),
                     uncertainty=_resolve(outputs.get("uncertainty"), *bases), report=report)
    for what, given, found in (("image", image, entry.image),
                               ("refined mask", outputs.get("mask"), entry.refined),
                               ("coarse mask", coarse, entry.coarse),
                               ("uncertainty map", outputs.get("uncertainty"), entry.uncertainty)):
        if given and given != "-" and found is None:
            entry.notes.append(f"{what} {given} not found")
    return entry


def _batch_entries(outdir: Path, journal: Path | None = None) -> list[RunEntry]:
    """The latest record of every input of a batch folder (or of one journal), in key order."""
    if journal is not None:
        records = {r["key"]: r for r in read_journal(journal)[0]}  # the file order: later lines win
    else:
        records = merge_journals(outdir).latest
    entries = []
    for key in sorted(records):
        rec = records[key]
        name = key.rsplit(".refined", 1)[0] if ".refined" in key else key  # the image's stem, in its folder
        outs = {k: str(v.get("path")) for k, v in (rec.get("outputs") or {}).items() if isinstance(v, dict)}
        report_path = _resolve(outs.get("report"), outdir)
        if report_path is not None and rec.get("status") == "done":
            entry = entry_from_report(_load_json(Path(report_path)), Path(report_path).parent, name, outdir)
        else:
            mask = rec.get("mask") or {}
            entry = RunEntry(name, image=_resolve((rec.get("image") or {}).get("path")),
                             coarse=_resolve(mask.get("path") if isinstance(mask, dict) else None),
                             refined=_resolve(outs.get("mask"), outdir),
                             uncertainty=_resolve(outs.get("uncertainty"), outdir))
        entry.record, entry.status, entry.error = rec, str(rec.get("status")), rec.get("error")
        entries.append(entry)
    return entries


def find_runs(sources: list[str]) -> tuple[list[RunEntry], bool]:
    """The runs that ``sources`` name, and whether any came from a batch.

    Args:
        sources: run report JSON files, ``refine batch`` output folders, or journal files.

    Raises:
        InputError: a source is missing or of another kind, or no run is found.
    """
    entries: list[RunEntry] = []
    batch = False
    for src in sources:
        p = Path(src)
        if p.is_dir():
            if not any(p.glob(JOURNAL_GLOB)):
                raise InputError(f"{src} holds no batch journal ({JOURNAL_GLOB}): give a `refine batch` "
                                 "output folder or a run report (`refine run --report`)")
            entries += _batch_entries(p)
            batch = True
        elif p.suffix == ".jsonl" and p.is_file():
            entries += _batch_entries(p.parent, p)
            batch = True
        elif p.is_file():
            entries.append(entry_from_report(_load_json(p), p.parent))
        else:
            raise InputError(f"{src} not found: give run reports (`refine run --report`) or `refine batch` "
                             "output folders")
    if not entries:
        raise InputError(f"no run found in {', '.join(sources)}: the batch journals hold no finished input")
    return entries, batch
