"""The run report: a plain record, its JSON form and its Rich table. Computes nothing."""

from __future__ import annotations

import json
import platform
import resource
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from refine_cli import __version__


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the result (only those already imported)."""
    out = {"refine": __version__, "python": platform.python_version()}
    for name in ("numpy", "cv2", "tifffile", "rasterio", "zarr", "torch"):
        mod = sys.modules.get(name)
        if mod is not None:
            out["opencv" if name == "cv2" else name] = str(getattr(mod, "__version__", "?"))
    return out


@dataclass
class RunReport:
    """What a run did and what it cost.

    Attributes:
        image: facts about the input image (path, size, bands, dtype, backend, georeferenced).
        mask: facts about the coarse mask (path, kind, classes, native size) or the segmenter used.
        outputs: paths written (``mask``, ``uncertainty``, ``report``, ``vector``) and, with ``vector``,
            the number of ``polygons``.
        method: refiner name.
        refiner: the refiner's own description (parameters, weights name and sha256).
        device: device the refiner ran on.
        tiles: ``total``, ``refined``, ``skipped``, ``refiner_calls``.
        stages: seconds per stage (``read``, ``segment``, ``refine``, ``blend``, ``write`` ...);
            stages overlap in threads, so they can sum to more than ``wall_seconds``.
        wall_seconds: elapsed time of the whole run.
        megapixels: image size in MPx.
        megapixels_per_second: ``megapixels / wall_seconds``.
        peak_rss_bytes: peak resident memory of the process.
        peak_gpu_bytes: peak CUDA memory allocated by torch (0 on the CPU).
        memory_plan: tile size, queue depth, estimate and budget (of the last level; the
            estimate is the largest over levels).
        levels: per pyramid level: size, tiles, refined, skipped, tile size (one entry for
            single-level methods).
        versions: library versions.
        config: the full configuration.
        notes: one-line remarks (which weights ran, fallbacks taken ...).
        started: when the run started, ISO 8601 UTC (``2026-12-06T21:49:43Z``).
        finished: when it finished, the same format.
        command: the command line that ran it (shell-quoted), or ``None`` for a library call.
        guard: what the do-no-harm guard did (``refine_cli.refiners.guard``): ``state`` (``on``,
            ``off`` or why it did not run), its parameters (the fields of ``GuardParams``), and the counts
            ``pixels_changed`` (by the refiner), ``pixels_held`` (of those, kept as in the coarse mask),
            ``far`` / ``detached`` / ``unsupported`` / ``restored`` (held pixels per rule),
            ``components_restored`` and ``regions_detached``.
        workdir: the working directory of the run (relative paths above are relative to it).
        tile_map: what happened to each tile of the full-resolution grids, one character per tile
            (``refine_cli.report.tiles``): ``refine`` (the refiner's last level) and ``guard`` (the
            guard's level, when it ran); ``{}`` when no grid ran (a reused level).
    """

    image: dict[str, Any] = field(default_factory=dict)
    mask: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str | int | None] = field(default_factory=dict)
    method: str = ""
    refiner: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    tiles: dict[str, int] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    megapixels: float = 0.0
    megapixels_per_second: float = 0.0
    peak_rss_bytes: int = 0
    peak_gpu_bytes: int = 0
    memory_plan: dict[str, Any] = field(default_factory=dict)
    levels: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: str = ""
    finished: str = ""
    command: str | None = None
    guard: dict[str, Any] = field(default_factory=dict)
    workdir: str = ""
    tile_map: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text."""
        return json.dumps(self.to_dict(), indent=indent, default=str)


def _mib(n: int) -> str:
    return f"{n / 1024**2:,.0f} MiB"


def render_table(report: RunReport) -> Any:
    """A Rich table summarising the report (for stderr)."""
    from rich.table import Table

    t = Table(title=f"refine {report.method}", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    img = report.image
    t.add_row("image", f"{img.get('path')}  {img.get('width')}x{img.get('height')}  "
              f"{img.get('bands')} band(s) {img.get('dtype')}")
    made_by = report.mask.get("made_by")
    if made_by:
        m = report.mask
        saved = f"  saved as {m['path']}" if m.get("path") else ""
        t.add_row("coarse mask", f"made by --segmenter {made_by.get('segmenter')}  {m.get('kind')}  "
                  f"{m.get('width')}x{m.get('height')}{saved}")
    elif report.mask.get("kind") == "segmenter":
        segmenter = report.refiner.get("segmenter", report.mask.get("segmenter"))
        t.add_row("coarse mask", f"made by the segmenter ({segmenter})")
    elif report.mask:
        m = report.mask
        t.add_row("coarse mask", f"{m.get('path')}  {m.get('kind')}"
                  + (f" ({m.get('classes')} classes)" if m.get("kind") == "labels" else "")
                  + (f"  {m.get('width')}x{m.get('height')}" if m.get("width") else ""))
    tiles = report.tiles
    t.add_row("tiles", f"{tiles.get('total', 0)} total, {tiles.get('refined', 0)} refined, "
              f"{tiles.get('skipped', 0)} skipped (uniform)")
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in report.stages.items() if v > 0)
    t.add_row("time", f"{report.wall_seconds:.2f}s wall  ({stages})")
    t.add_row("speed", f"{report.megapixels_per_second:.2f} MPx/s on {report.device}")
    mem = f"peak RSS {_mib(report.peak_rss_bytes)}"
    if report.peak_gpu_bytes:
        mem += f", peak GPU {_mib(report.peak_gpu_bytes)}"
    if report.memory_plan:
        plan = report.memory_plan
        mem += f"  (tile {plan.get('tile_size')} px, budget {_mib(plan.get('budget', 0))})"
    t.add_row("memory", mem)
    for k, v in report.outputs.items():
        if v:
            t.add_row(k, str(v))
    for note in report.notes:
        t.add_row("note", note)
    return t
