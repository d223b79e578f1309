"""CascadePSP: the exact (official, whole-image) path against the streamed path on the same image.

Runs ``refine run --method cascade`` twice through the API — ``--exact`` and
``--streamed`` — and reports how far the streamed result is from the exact one
(IoU and mBA between the two masks, pixels that differ), the time and peak RSS of
each (each in its own subprocess), and how many tiles the streamed path skipped.
Default input: the official demo image (aeroplane, 3492 x 2328) from
``../shared/data/cascadepsp-samples``.

    python benchmarks/cascade_paths.py                         # default weights
    python benchmarks/cascade_paths.py --weights weights/cascadepsp-lite-v2.pt --size 900
    python benchmarks/cascade_paths.py --image big.tif --mask coarse.png --no-exact
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from refine_cli.evaluate import evaluate_arrays

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cascadepsp-samples"
LAUNCH = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
          "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(rc)")


def run_path(image: str, mask: str, out: Path, mode: str, args: argparse.Namespace) -> dict:
    rep = out.with_suffix(".json")
    cmd = [sys.executable, "-c", LAUNCH, sys.executable, "-m", "refine_cli", "run", image, "--mask", mask, "-o",
           str(out), "--method", "cascade", f"--{mode}", "--cascade-size", str(args.size), "--report", str(rep),
           "--max-memory", args.max_memory, "--overwrite", "-q", "--soft"]
    if args.weights:
        cmd += ["--weights", args.weights]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{mode} path failed: {proc.stderr.strip()}")
    report = json.loads(rep.read_text())
    return {"mode": mode, "seconds": round(time.perf_counter() - t0, 1), "wall_seconds": round(report["wall_seconds"], 1),
            "peak_rss_mib": round(int(proc.stdout.split()[-1]) / 2**20), "tiles": report["tiles"],
            "levels": report["levels"], "weights": report["refiner"].get("weights"),
            "refine_seconds": round(report["stages"].get("refine", 0.0), 1),
            "patches": report["refiner"].get("patches"), "patches_processed": report["refiner"].get("patches_processed")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default=str(SHARED / "aeroplane.jpg"))
    ap.add_argument("--mask", default=str(SHARED / "aeroplane_coarse.png"))
    ap.add_argument("--weights", default=None, help="checkpoint (default: the method's default weights)")
    ap.add_argument("--size", type=int, default=900, help="--cascade-size L")
    ap.add_argument("--max-memory", default="16G")
    ap.add_argument("--no-exact", action="store_true", help="only time the streamed path")
    ap.add_argument("--json", default="benchmarks/results/cascade_paths.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="refine-cascade-"))
    rows = []
    masks = {}
    for mode in (["streamed"] if args.no_exact else ["exact", "streamed"]):
        out = work / f"{mode}.tif"
        rows.append(run_path(args.image, args.mask, out, mode, args))
        import tifffile

        masks[mode] = tifffile.imread(out)
        print(f"{mode:>9}: {rows[-1]['wall_seconds']:>7.1f} s, peak RSS {rows[-1]['peak_rss_mib']} MiB, "
              f"tiles {rows[-1]['tiles']}", file=sys.stderr)
    agreement = {}
    if "exact" in masks:
        e, s = masks["exact"] >= 0.5, masks["streamed"] >= 0.5
        m = evaluate_arrays(s, e)
        agreement = {"iou": round(m.iou, 5), "mba": round(m.mba, 5), "boundary_f": round(m.boundary_f, 5),
                     "pixels_differ": int((e != s).sum()), "fraction_differ": float((e != s).mean()),
                     "max_abs_prob_diff": float(np.abs(masks["exact"] - masks["streamed"]).max())}
    result = {"image": args.image, "size": args.size, "rows": rows, "streamed_vs_exact": agreement,
              "machine": {"machine": platform.machine(), "python": platform.python_version()},
              "date": time.strftime("%Y-%m-%d")}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("| path | wall s | refine s | peak RSS | tiles refined/skipped | patches processed |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['wall_seconds']} | {r['refine_seconds']} | {r['peak_rss_mib']} MiB | "
              f"{r['tiles']['refined']}/{r['tiles']['skipped']} | {r['patches_processed'] or '-'} |")
    if agreement:
        print(f"\nstreamed vs exact: IoU {agreement['iou']:.4f}, mBA {agreement['mba']:.4f}, "
              f"{agreement['pixels_differ']} px differ ({agreement['fraction_differ']:.4%})")


if __name__ == "__main__":
    main()
