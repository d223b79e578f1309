"""One large scene on a Dask cluster against the single-process run: time, peak RSS, bytes equal.

A synthetic tiled TIFF of ``--mpx`` megapixels (a few shapes on a textured background, coarse
mask at 1/16, as ``benchmarks/engine.py`` makes them) is refined twice with the same options,
each in its own subprocess so peak RSS is that run's alone:

* ``refine run IMG --mask M -o single.tif --uncertainty ...`` (one process);
* the same with ``--scheduler local:N`` (N worker processes; ``--scheduler tcp://HOST:PORT``
  for a running cluster: the scratch folder must then be shared with its workers).

It prints seconds, MPx/s, the client's peak RSS, the number of band tasks, and whether the mask
and uncertainty files are byte-identical. Timings are this machine's, not assertions.

    python benchmarks/cluster.py --mpx 16                       # guided, local:2
    python benchmarks/cluster.py --mpx 400 --workers 8 --method cascade --extra --streamed
    python benchmarks/cluster.py --mpx 64 --scheduler tcp://10.0.0.5:8786 --scratch /shared/tmp
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

from refine_cli.devtools.synthetic import random_scene, write_tiled

LAUNCH = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
          "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(rc)")


def make_input(folder: Path, mpx: float, seed: int = 7) -> tuple[Path, Path]:
    """A square synthetic scene of ``mpx`` MPx and its coarse mask at 1/16 (reused when present)."""
    side = int(round(math.sqrt(mpx * 1e6)))
    img, mask = folder / f"scene_{mpx:g}mpx.tif", folder / f"scene_{mpx:g}mpx_coarse.png"
    if not img.exists():
        scene = random_scene((side, side), 6, seed=seed, size=side / 16)
        write_tiled(scene, str(img))
        cv2.imwrite(str(mask), scene.coarse(16))
    return img, mask


def run(img: Path, mask: Path, out: Path, extra: list[str]) -> dict:
    """One ``refine run`` in a subprocess: its report, wall time and peak RSS (children included)."""
    rep = out.with_suffix(".json")
    args = [sys.executable, "-c", LAUNCH, sys.executable, "-m", "refine_cli", "run", str(img), "--mask",
            str(mask), "-o", str(out), "--uncertainty", str(out.with_suffix(".unc.tif")), "--report", str(rep),
            "--overwrite", "-q", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(args[3:])} failed:\n{proc.stderr}")
    report = json.loads(rep.read_text())
    return {"wall_s": wall, "peak_rss_mib": int(proc.stdout.split()[-1]) / 2**20, "report": report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mpx", type=float, default=16.0, help="scene size in megapixels")
    ap.add_argument("--method", default="guided")
    ap.add_argument("--workers", type=int, default=2, help="local:N worker processes")
    ap.add_argument("--scheduler", help="a running cluster instead of local:N")
    ap.add_argument("--band-rows", type=int, help="rows per band task")
    ap.add_argument("--scratch", help="folder for inputs and outputs (default: a temporary one)")
    ap.add_argument("--skip-single", action="store_true", help="only the distributed run")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `refine run` options")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="refine-cluster-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    img, mask = make_input(scratch, args.mpx)
    print(f"scene {img.name}: written in {time.perf_counter() - t0:.1f} s")
    opts = ["--method", args.method, *args.extra]
    sched = args.scheduler or f"local:{args.workers}"
    results: dict[str, dict] = {}
    if not args.skip_single:
        results["single"] = run(img, mask, scratch / "single.tif", opts)
    dist = [*opts, "--scheduler", sched, *(["--band-rows", str(args.band_rows)] if args.band_rows else [])]
    results["dask"] = run(img, mask, scratch / "dask.tif", dist)
    mpx = results["dask"]["report"]["megapixels"]
    for name, r in results.items():
        note = next((n for n in r["report"]["notes"] if n.startswith("dask:")), "")
        print(f"{name:6s} {r['wall_s']:8.1f} s  {mpx / r['wall_s']:6.2f} MPx/s  peak RSS {r['peak_rss_mib']:7.0f} MiB"
              f"  {note}")
    if "single" in results:
        same = all((scratch / f"single{s}").read_bytes() == (scratch / f"dask{s}").read_bytes()
                   for s in (".tif", ".unc.tif"))
        print(f"mask and uncertainty byte-identical: {same}")
        results["identical"] = {"value": same}
    if args.json:
        Path(args.json).write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "report"}
                                               for k, v in results.items()}, indent=1))
    if not args.scratch:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
