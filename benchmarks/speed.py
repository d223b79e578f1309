"""Speed benchmark: megapixels per second and peak memory of every refiner at 4 MPx, 64 MPx and 1 GPx.

For each size a synthetic scene (``refine_cli.devtools.synthetic``) is written
to disk as a tiled BigTIFF, tile by tile, with its coarse mask at 1/16
resolution (a soft PNG). Every method of the refiner registry then runs on it
in a child process (``refine run ... --report``), once with boundary-only tile
skipping (the default) and once with ``--no-skip``. Measured per run:

* ``MPx/s``: image megapixels over the run's own wall time (from its report:
  opening, refining, writing; not the interpreter start);
* ``peak RSS``: the child's ``ru_maxrss``, taken by a minimal launcher process
  (:data:`LAUNCHER`) so runs never pollute each other's numbers; it includes
  the interpreter and libraries;
* ``peak GPU``: ``torch.cuda.max_memory_allocated`` from the report (CUDA only);
* tiles refined / skipped.

A run projected to exceed ``--timeout`` is not started and is reported as
skipped; one that exceeds it is killed. The projection scales the same method's
time at the previous size by the area ratio ``a`` without skipping; with
skipping only the null refiner's time (I/O) scales with ``a`` and the rest with
``sqrt(a)`` (refined tiles follow the boundaries' length; see
:func:`projected_seconds`). Nothing is asserted. Outputs: a table on stdout, ``speed.json`` and
``speed.png`` (log-log time and memory against image size). The big files are
deleted at the end unless ``--keep``.

Usage::

    python benchmarks/speed.py [--quick] [--sizes 4,64,1024] [--methods a,b] [--work DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import load_pyplot, machine_info, probe, select_methods  # noqa: E402

log = logging.getLogger("speed")

REPO = Path(__file__).resolve().parents[1]
COARSE_FACTOR = 16
TILE = 512


def side_for(megapixels: float) -> int:
    """Square side for a size in MPx, rounded to the 512-px tile (4 -> 2048, 64 -> 8192, 1024 -> 31744)."""
    return max(TILE, int(round(math.sqrt(megapixels * 1e6) / TILE)) * TILE)


def make_input(work: Path, side: int, seed: int = 7) -> tuple[Path, Path, float]:
    """Write (once) the scene image as a tiled TIFF and its 1/16 coarse mask as PNG.

    Returns:
        ``(image, coarse, seconds spent generating)``.
    """
    from refine_cli.devtools.synthetic import random_scene, write_tiled

    image, coarse = work / f"scene_{side}.tif", work / f"scene_{side}_coarse.png"
    t0 = time.perf_counter()
    if not (image.is_file() and coarse.is_file()):
        need = side * side * 3 * 1.1 + 64 * 1024**2
        free = shutil.disk_usage(work).free
        if free < need * 1.5:
            raise SystemExit(f"not enough disk in {work}: {free / 1e9:.1f} GB free, about "
                             f"{need * 1.5 / 1e9:.1f} GB needed for the image and the outputs (use --work "
                             "elsewhere or drop the size)")
        scene = random_scene((side, side), 12, seed=seed, size=side / 10)
        log.info("writing %dx%d scene to %s", side, side, image)
        tmp = image.with_suffix(".tmp.tif")
        write_tiled(scene, str(tmp), tile=TILE)
        os.replace(tmp, image)
        if not cv2.imwrite(str(coarse), scene.coarse(COARSE_FACTOR)):
            raise OSError(f"cannot write {coarse}")
    return image, coarse, time.perf_counter() - t0


LAUNCHER = """
import json, os, subprocess, sys, time
timeout, cmd = float(sys.argv[1]), sys.argv[2:]
t0 = time.perf_counter()
proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
while True:
    pid, raw, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid:
        status = os.waitstatus_to_exitcode(raw)
        break
    if time.perf_counter() - t0 > timeout:
        proc.kill()
        _, raw, usage = os.wait4(proc.pid, 0)
        status = -9
        break
    time.sleep(0.05)
proc.returncode = status
print(json.dumps({"status": status, "wall": time.perf_counter() - t0, "maxrss": usage.ru_maxrss}))
"""
"""A minimal launcher (``python -c``): runs the measured command, kills it after the timeout and prints
its exit status, wall time and ``ru_maxrss`` as JSON. It exists because Linux hands a child the
peak RSS of the process it was spawned from (``maxrss`` survives ``fork`` + ``execve``), so
measuring straight from this script would report at least this script's own peak (~300 MiB once
torch is loaded by a probe); the launcher's floor is a bare interpreter's, about 10 MiB."""


def child_run(args: list[str], timeout: float) -> tuple[int, float, int, str]:
    """Run ``python speed.py _run ARGS`` (``refine`` with pending refiners registered) through the launcher.

    Returns:
        ``(exit status, wall seconds, peak RSS bytes, stderr tail)``; status -9 when killed on timeout.
    """
    return launch([sys.executable, str(Path(__file__).resolve()), "_run", *args], timeout)


def launch(cmd: list[str], timeout: float) -> tuple[int, float, int, str]:
    """Run any command through :data:`LAUNCHER`; the same result as :func:`child_run`."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.run([sys.executable, "-c", LAUNCHER, str(timeout), *cmd], stdout=subprocess.PIPE,
                              stderr=err, timeout=timeout + 120, check=False)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-600:]
    try:
        res = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        return proc.returncode or 1, 0.0, 0, tail or "launcher failed"
    rss = int(res["maxrss"]) * (1 if sys.platform == "darwin" else 1024)
    return int(res["status"]), float(res["wall"]), rss, tail


def projected_seconds(prev: dict, ratio: float, io_prev: float | None) -> float:
    """Time a run should take at ``ratio`` times the pixels of a measured run ``prev``.

    Args:
        prev: the measured run (``process_seconds``, ``skip``).
        ratio: area ratio of the new size to the old one.
        io_prev: the null refiner's ``process_seconds`` at the old size, same skip mode, if known.

    Returns:
        ``t * ratio`` without skipping; ``io * ratio + (t - io) * sqrt(ratio)`` with it.
    """
    t = float(prev["process_seconds"])
    if not prev["skip"]:
        return t * ratio
    io = min(t, io_prev) if io_prev is not None else 0.0
    return io * ratio + (t - io) * math.sqrt(ratio)


def bench(methods: list[str], sizes: list[float], work: Path, timeout: float, max_memory: str,
          skip_modes: tuple[bool, ...]) -> tuple[list[dict], dict]:
    """Every method x size x skip mode; see the module docstring."""
    runs: list[dict] = []
    gen: dict[str, float] = {}
    last: dict[tuple[str, bool], dict] = {}  # the last run of each method and mode
    refs: dict[tuple[str, bool], Path] = {}  # torch's output of a method at this size, per skip mode
    done: dict[tuple[str, bool, int], dict] = {}  # every run by (method, skip, side)
    for mpx in sizes:
        side = side_for(mpx)
        image, coarse, secs = make_input(work, side)
        gen[str(side)] = secs
        real_mpx = side * side / 1e6
        for method in methods:
            for skip in skip_modes:
                rec: dict[str, Any] = {"method": method, "skip": skip, "side": side, "megapixels": real_mpx}
                prev = last.get((method, skip))
                io = done.get(("coarse", skip, prev["side"]), {}).get("process_seconds") if prev else None
                guess = projected_seconds(prev, real_mpx / prev["megapixels"], io) if prev else 0.0
                if guess > timeout:
                    rec["status"] = f"skipped: projected {guess:.0f} s > --timeout {timeout:.0f} s"
                    log.warning("%s %s at %d px: %s", method, "skip" if skip else "no-skip", side,
                                rec["status"])
                    runs.append(rec)
                    continue
                out = work / f"out_{method}_{side}_{int(skip)}.tif"
                report = work / f"report_{method}_{side}_{int(skip)}.json"
                name, _, backend = method.partition("@")  # cascade@onnx: the method on one backend
                args = ["run", str(image), "--mask", str(coarse), "-o", str(out), "--method", name,
                        "--report", str(report), "--overwrite", "-q", "--max-memory", max_memory]
                if backend:
                    args += ["--backend", backend]
                if not skip:
                    args.append("--no-skip")
                status, wall, rss, tail = child_run(args, timeout)
                rec.update(process_seconds=wall, peak_rss_bytes=rss)
                if status == 0 and report.is_file():
                    rep = json.loads(report.read_text())
                    rec.update(status="ok", seconds=rep["wall_seconds"],
                               mpx_per_s=rep["megapixels_per_second"],
                               peak_gpu_bytes=rep.get("peak_gpu_bytes", 0), tiles=rep["tiles"],
                               tile_size=rep["memory_plan"]["tile_size"], device=rep.get("device"))
                    last[(method, skip)] = done[(method, skip, side)] = rec
                else:
                    why = "timeout" if status == -9 else f"exit {status}"
                    lines = [ln for ln in tail.strip().splitlines() if ln.strip()]
                    rec["status"] = f"failed ({why}): {lines[-1][:160] if lines else ''}"
                    if status == -9:  # at least this slow
                        last[(method, skip)] = done[(method, skip, side)] = rec
                log.info("%s %s %d px: %s", method, "skip" if skip else "no-skip", side,
                         rec.get("status") if rec.get("status") != "ok" else
                         f"{rec['seconds']:.1f} s, {rec['mpx_per_s']:.2f} MPx/s, RSS {rss / 2**20:.0f} MiB")
                runs.append(rec)
                report.unlink(missing_ok=True)
                ref = refs.get((name, skip))
                if backend == "torch" and rec.get("status") == "ok":
                    refs[(name, skip)] = out  # the others' agreement is measured against it
                    continue
                if backend and ref is not None and rec.get("status") == "ok":
                    rec["iou_vs_torch"] = tiff_iou(out, ref)
                out.unlink(missing_ok=True)
        for ref in refs.values():
            ref.unlink(missing_ok=True)
        refs.clear()
    return runs, gen


def tiff_iou(a: Path, b: Path, rows: int = 1024) -> float:
    """Foreground IoU (>= 128, or >= 0.5 for float masks) of two same-size rasters, read by row band."""
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    inter = union = 0
    with rasterio.open(a) as fa, rasterio.open(b) as fb:
        cut = 0.5 if np.dtype(fa.dtypes[0]).kind == "f" else 128
        for r0 in range(0, fa.height, rows):
            win = Window(0, r0, fa.width, min(rows, fa.height - r0))
            x, y = fa.read(1, window=win) >= cut, fb.read(1, window=win) >= cut
            inter += int((x & y).sum())
            union += int((x | y).sum())
    return inter / union if union else 1.0


def ordered_runs(result: dict) -> list[dict]:
    """Runs grouped by method (in run order), then by size, skip mode first."""
    order = list(dict.fromkeys(r["method"] for r in result["runs"]))
    return sorted(result["runs"], key=lambda r: (order.index(r["method"]), r["side"], not r["skip"]))


def print_table(result: dict) -> None:
    """The table on stdout."""
    from rich.console import Console
    from rich.table import Table

    mach = result["machine"]
    load = mach.get("load_average_at_start", [0.0])[0], mach.get("load_average", [0.0])[0]
    t = Table(title=f"refine speed ({result['mode']}, {mach['cores']} cores, {mach['cpu']}, load "
              f"{load[0]:.1f} -> {load[1]:.1f}; --max-memory {result['max_memory']})", title_justify="left")
    for col in ("method", "size", "skip", "s", "MPx/s", "peak RSS", "peak GPU", "tiles refined/total",
                "IoU vs torch"):
        t.add_column(col, justify="left" if col in ("method", "skip") else "right")
    last = None
    for r in ordered_runs(result):
        if last is not None and r["method"] != last:
            t.add_section()
        last = r["method"]
        size = f"{r['side']}² ({r['megapixels']:.0f} MPx)"
        if r.get("status") != "ok":
            t.add_row(r["method"], size, "yes" if r["skip"] else "no", r.get("status", "")[:60], "", "", "",
                      "", "")
            continue
        gpu = f"{r['peak_gpu_bytes'] / 2**20:.0f} MiB" if r.get("peak_gpu_bytes") else "-"
        tiles = r["tiles"]
        t.add_row(r["method"], size, "yes" if r["skip"] else "no", f"{r['seconds']:.1f}",
                  f"{r['mpx_per_s']:.2f}",
                  f"{r['peak_rss_bytes'] / 2**20:.0f} MiB", gpu, f"{tiles['refined']}/{tiles['total']}",
                  _iou_text(r))
    con = Console(width=None if sys.stdout.isatty() else 150)
    con.print(t)
    for name, st in result["methods"].items():
        if st != "ok":
            con.print(f"{name}: {st}", highlight=False)


def _iou_text(run: dict) -> str:
    """The run's mask IoU against the torch backend's (``cascade@BACKEND`` runs), or blank."""
    return f"{run['iou_vs_torch']:.5f}" if "iou_vs_torch" in run else ""


def markdown(result: dict) -> str:
    """The table as Markdown."""
    lines = ["| method | size | skip | s | MPx/s | peak RSS (MiB) | tiles refined/total | IoU vs torch |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in ordered_runs(result):
        size = f"{r['side']}² ({r['megapixels']:.0f} MPx)"
        skip = "yes" if r["skip"] else "no"
        if r.get("status") != "ok":
            lines.append(f"| {r['method']} | {size} | {skip} | *{r.get('status', '')}* | | | | |")
            continue
        lines.append(f"| {r['method']} | {size} | {skip} | {r['seconds']:.1f} | {r['mpx_per_s']:.2f} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['tiles']['refined']}/{r['tiles']['total']} | "
                     f"{_iou_text(r)} |")
    lines += [f"\n{name}: {st}" for name, st in result["methods"].items() if st != "ok"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    """Log-log time and peak RSS against image size, a line per method and mode (``False``: no matplotlib)."""
    plt = load_pyplot()
    if plt is None:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = list(dict.fromkeys((r["method"], r["skip"]) for r in result["runs"]))
    methods = list(dict.fromkeys(m for m, _ in keys))
    for method, skip in keys:
        colour = f"C{methods.index(method) % 10}"
        rows = [r for r in result["runs"]
                if (r["method"], r["skip"]) == (method, skip) and r.get("status") == "ok"]
        if not rows:
            continue
        x = [r["megapixels"] for r in rows]
        style = "-o" if skip else "--s"
        label = f"{method}{'' if skip else ' (no skip)'}"
        a1.plot(x, [r["seconds"] for r in rows], style, color=colour, label=label)
        a2.plot(x, [r["peak_rss_bytes"] / 2**20 for r in rows], style, color=colour, label=label)
    for ax, title, unit in ((a1, "wall time", "s"), (a2, "peak RSS", "MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("image size (MPx)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    a1.legend(fontsize=7)
    fig.suptitle(f"refine speed ({result['mode']}, {result['machine']['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _child(argv: list[str]) -> int:
    """``speed.py _run ...``: ``refine`` in the measured child."""
    from refine_cli.cli import main as refine_main

    try:
        refine_main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_run"]:
        return _child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 MPx only (CI, seconds)")
    parser.add_argument("--sizes", default=None, help="comma-separated sizes in MPx (default 4,64,1024)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the registry's methods")
    parser.add_argument("--backends", default=None,
                        help="comma-separated --backend values: cascade runs once per backend, labelled "
                        "cascade@BACKEND, with its mask's IoU against cascade@torch (list torch first)")
    parser.add_argument("--work", type=Path, default=None,
                        help="where the big files go (default <tmp>/refine-speed)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="where speed.json/.md/.png go (default benchmarks/results)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="per-run limit in s (default 900, quick 120)")
    parser.add_argument("--max-memory", default="2G", help="refine run --max-memory (default 2G)")
    parser.add_argument("--keep", action="store_true", help="keep the generated images")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    log.setLevel(logging.INFO)
    logging.getLogger("refine_cli").setLevel(logging.WARNING)  # the probes' own log lines
    t0 = time.perf_counter()
    load_start = list(os.getloadavg())
    methods = select_methods(args.methods)  # the baseline (pure I/O) first
    if methods is None:
        return 2
    sizes = [1.0] if args.quick else [4.0, 64.0, 1024.0]
    if args.sizes:
        sizes = [float(s) for s in args.sizes.split(",")]
    timeout = args.timeout or (120.0 if args.quick else 900.0)
    work = args.work or Path(tempfile.gettempdir()) / "refine-speed"
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    status: dict[str, str] = {}
    runnable = []
    for m in methods:
        reason = probe(m, work)
        status[m] = "ok" if reason is None else f"unavailable: {reason}"
        if reason is None:
            runnable.append(m)
        else:
            log.warning("%s unavailable: %s", m, reason)
    try:
        if args.backends:
            wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
            runnable = [lab for m in runnable
                        for lab in ([f"{m}@{b}" for b in wanted] if m == "cascade" else [m])]
        runs, gen = bench(runnable, sizes, work, timeout, args.max_memory, (True, False))
    finally:
        if not args.keep:
            for p in work.glob("scene_*"):
                p.unlink(missing_ok=True)
    result = {"benchmark": "speed", "mode": "quick" if args.quick else "full",
              "machine": {**machine_info(), "load_average_at_start": load_start},
              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": time.perf_counter() - t0,
              "max_memory": args.max_memory, "timeout": timeout, "coarse_factor": COARSE_FACTOR,
              "methods": status, "generation_seconds": gen, "runs": runs}
    (args.out / "speed.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "speed.md").write_text(markdown(result))
    measured = any(r.get("status") == "ok" for r in runs)
    plotted = not args.no_plot and measured and plot(result, args.out / "speed.png")
    print_table(result)
    print(f"wrote {args.out / 'speed.json'}, speed.md" + (", speed.png" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
