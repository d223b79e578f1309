"""``refine review`` time and peak RSS against image size.

For each size, a synthetic tiled TIFF (a few shapes on a textured background, coarse mask at
1/16) is refined once with ``refine run --uncertainty --report`` (method ``coarse`` by default:
pure I/O, so that large sizes stay quick), then ``refine review`` runs on the report in its own
subprocess, so peak RSS is the review's alone. Prints a table and writes JSON. Timings are this
machine's, not assertions.

    python benchmarks/review.py                 # 4, 64 and 256 MPx
    python benchmarks/review.py --quick         # 1 and 4 MPx, seconds
    python benchmarks/review.py --sizes 4 16 64 --method guided
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


def measured(args: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``python -m refine_cli ARGS`` in a child process."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCH, sys.executable, "-m", "refine_cli", *args],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"refine {' '.join(args[:2])} failed: {proc.stderr.strip()[-500:]}")
    return wall, int(proc.stdout.strip().splitlines()[-1])


def one_size(folder: Path, mpx: float, method: str, top: int, crop: int) -> dict:
    side = int(round(math.sqrt(mpx * 1e6)))
    img, mask = folder / f"scene_{mpx:g}.tif", folder / f"scene_{mpx:g}_coarse.png"
    scene = random_scene((side, side), 8, seed=3, size=side / 12)
    write_tiled(scene, str(img))
    cv2.imwrite(str(mask), scene.coarse(16))
    rep = folder / f"scene_{mpx:g}.json"
    name = folder / f"scene_{mpx:g}"
    run_s, run_rss = measured(["run", str(img), "--mask", str(mask), "-o", f"{name}.out.tif", "--uncertainty",
                               f"{name}.unc.tif", "--report", str(rep), "--method", method, "--overwrite",
                               "-q"])
    page = folder / f"scene_{mpx:g}.html"
    review_s, review_rss = measured(["review", str(rep), "-o", str(page), "--top", str(top), "--crop",
                                     str(crop), "--overwrite", "-q"])
    tiles = json.loads(rep.read_text())["tile_map"]["refine"]["states"]
    return {"mpx": side * side / 1e6, "side": side, "method": method, "run_s": round(run_s, 2),
            "run_peak_rss_mib": round(run_rss / 2**20), "review_s": round(review_s, 2),
            "review_peak_rss_mib": round(review_rss / 2**20),
            "page_mib": round(page.stat().st_size / 2**20, 2),
            "tiles": sum(len(r) for r in tiles)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[4, 64, 256], help="image sizes, MPx")
    ap.add_argument("--quick", action="store_true", help="1 and 4 MPx")
    ap.add_argument("--method", default="coarse", help="refine run --method")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--crop", type=int, default=384)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=Path("review_bench.json"), help="JSON results")
    args = ap.parse_args()
    sizes = [1, 4] if args.quick else args.sizes
    work = args.work or Path(tempfile.mkdtemp(prefix="refine-review-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for mpx in sizes:
            rows.append(one_size(work, mpx, args.method, args.top, args.crop))
            r = rows[-1]
            print(f"{r['mpx']:8.1f} MPx  run {r['run_s']:7.2f} s  review {r['review_s']:7.2f} s  "
                  f"review peak RSS {r['review_peak_rss_mib']:5d} MiB  page {r['page_mib']:.2f} MiB  "
                  f"{r['tiles']} tiles", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
