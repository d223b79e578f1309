"""Engine throughput and memory: megapixels/s and peak RSS against image size.

Synthetic tiled TIFFs (a few shapes on a textured background, coarse mask at
1/16) of 4, 64 and 400 MPx are written to a scratch folder; each method runs
in its own ``refine run`` subprocess so peak RSS is that run's alone. Methods:
``guided`` and ``coarse`` (no refinement: pure I/O, resampling, blending and
writing). Prints a table and writes JSON. Timings are this machine's, not
assertions.

    python benchmarks/engine.py                # 4, 64, 400 MPx
    python benchmarks/engine.py --quick        # 1 and 4 MPx, seconds
    python benchmarks/engine.py --sizes 4 64 --methods guided coarse --no-skip
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
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
    side = int(round(math.sqrt(mpx * 1e6)))
    img, mask = folder / f"scene_{mpx:g}mpx.tif", folder / f"scene_{mpx:g}mpx_coarse.png"
    if not img.exists():
        scene = random_scene((side, side), 6, seed=seed, size=side / 16)
        write_tiled(scene, str(img))
        cv2.imwrite(str(mask), scene.coarse(16))
    return img, mask


def run_one(img: Path, mask: Path, method: str, out_dir: Path, skip: bool) -> dict:
    out, rep = out_dir / f"{img.stem}.{method}.tif", out_dir / f"{img.stem}.{method}.json"
    args = [sys.executable, "-c", LAUNCH, sys.executable, "-m", "refine_cli", "run", str(img), "--mask", str(mask),
            "-o", str(out), "--method", method, "--report", str(rep), "--overwrite", "-q"]
    if not skip:
        args.append("--no-skip")
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    report = json.loads(rep.read_text())
    out.unlink(missing_ok=True)
    return {
        "process_seconds": round(wall, 2),
        "wall_seconds": round(report["wall_seconds"], 2),
        "megapixels": round(report["megapixels"], 1),
        "megapixels_per_second": round(report["megapixels_per_second"], 2),
        "peak_rss_mib": round(int(proc.stdout.strip().splitlines()[-1]) / 2**20),
        "tiles": report["tiles"],
        "stages": {k: round(v, 2) for k, v in report["stages"].items()},
        "tile_size": report["memory_plan"]["tile_size"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[4, 64, 400], help="image sizes in MPx")
    ap.add_argument("--methods", nargs="+", default=["guided", "coarse"])
    ap.add_argument("--quick", action="store_true", help="1 and 4 MPx only")
    ap.add_argument("--no-skip", action="store_true", help="also measure without boundary-only skipping")
    ap.add_argument("--scratch", default=None, help="folder for the synthetic inputs (default: a temp dir)")
    ap.add_argument("--json", default="benchmarks/results/engine.json", help="where to write the results")
    args = ap.parse_args()
    sizes = [1, 4] if args.quick else args.sizes
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="refine-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for mpx in sizes:
            img, mask = make_input(scratch, mpx)
            for method in args.methods:
                for skip in ([True, False] if args.no_skip else [True]):
                    r = run_one(img, mask, method, scratch, skip)
                    r.update(method=method, size_mpx=mpx, skip_uniform=skip)
                    rows.append(r)
                    print(f"  {mpx:>6g} MPx  {method:<8} skip={skip!s:<5} "
                          + (r.get("error") or f"{r['megapixels_per_second']:>7.2f} MPx/s  "
                             f"{r['peak_rss_mib']:>5} MiB  {r['wall_seconds']:>7.1f} s"), file=sys.stderr)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("| size | method | skip | MPx/s | peak RSS | wall | tiles refined/total |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['size_mpx']:g} MPx | {r['method']} | {r['skip_uniform']} | error: {r['error']} | | | |")
            continue
        print(f"| {r['size_mpx']:g} MPx | {r['method']} | {r['skip_uniform']} | {r['megapixels_per_second']:.2f} | "
              f"{r['peak_rss_mib']} MiB | {r['wall_seconds']:.1f} s | "
              f"{r['tiles']['refined']}/{r['tiles']['total']} |")
    print(f"\nwritten {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
