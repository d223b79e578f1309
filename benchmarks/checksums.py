"""Checksums of ``refine run`` outputs on the bundled samples, for every method and the main paths.

A refactor that must not change behaviour is checked by running this before and after it and diffing the
two JSON files. Each output file is decoded and its pixels hashed (sha256 of dtype, shape and bytes), so
that a changed timestamp or software tag in a TIFF header does not count; georeferencing is hashed too.

    python benchmarks/checksums.py --out before.json
    python benchmarks/checksums.py --out after.json --compare before.json   # exit 1 on any difference
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
CASES: dict[str, list[str]] = {
    # label: arguments after `refine run` (IMAGE and --mask are given per sample)
    "coarse": ["--method", "coarse"],
    "guided": ["--method", "guided"],
    "guided-guard-off": ["--method", "guided", "--guard", "off"],
    "guided-soft": ["--method", "guided", "--soft"],
    "guided-tiled": ["--method", "guided", "--tile-size", "256"],
    "fgs": ["--method", "fgs"],
    "densecrf": ["--method", "densecrf"],
    "cascade": ["--method", "cascade"],
    "cascade-torch": ["--method", "cascade", "--backend", "torch"],
    "cascade-tiled": ["--method", "cascade", "--tile-size", "384"],
    "cascade-v3": ["--method", "cascade", "--weights", "cascadepsp-lite-v3"],
    "cascade-guard-off": ["--method", "cascade", "--guard", "off"],
    "magnet-fast": ["--method", "magnet-fast", "--preset", "binary"],
    "magnet-fast-tiled": ["--method", "magnet-fast", "--preset", "binary", "--tiled"],
    "magnet-fast-guard-off": ["--method", "magnet-fast", "--preset", "binary", "--guard", "off"],
}
SAMPLE_INPUTS = {"scene": ("scene.jpg", "scene_coarse.png"), "ortho": ("ortho.tif", "ortho_coarse.png")}


def pixel_hash(path: Path) -> str:
    """sha256 over the decoded pixels (dtype, shape, bytes) and, for GeoTIFFs, the CRS and transform."""
    import rasterio

    warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)

    h = hashlib.sha256()
    with rasterio.open(path) as src:
        a = src.read()
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
        if src.crs is not None:
            h.update(str(src.crs).encode() + str(tuple(src.transform)).encode())
    return h.hexdigest()[:16]


def run_case(sample: str, label: str, args: list[str], tmp: Path) -> dict:
    """Run one case; return the hashes of its mask and uncertainty (or the error line)."""
    image, mask = SAMPLE_INPUTS[sample]
    out, unc = tmp / f"{sample}.{label}.tif", tmp / f"{sample}.{label}.unc.tif"
    cmd = [sys.executable, "-m", "refine_cli", "run", str(SAMPLES / image), "--mask", str(SAMPLES / mask),
           "-o", str(out), "--uncertainty", str(unc), "-q", *args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    rec: dict = {"seconds": round(time.perf_counter() - t0, 1), "rc": p.returncode}
    if p.returncode:
        rec["error"] = (p.stderr.strip().splitlines() or ["?"])[-1]
        return rec
    rec["mask"] = pixel_hash(out)
    rec["uncertainty"] = pixel_hash(unc) if unc.exists() else None
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file of the checksums")
    ap.add_argument("--compare", type=Path, help="an earlier JSON file: print differences, exit 1 on any")
    ap.add_argument("--only", help="comma-separated case labels")
    a = ap.parse_args()
    labels = a.only.split(",") if a.only else list(CASES)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        for sample in SAMPLE_INPUTS:
            for label in labels:
                key = f"{sample}/{label}"
                results[key] = run_case(sample, label, CASES[label], Path(d))
                r = results[key]
                print(f"{key:32s} {r.get('mask', r.get('error'))} {r.get('uncertainty') or ''} {r['seconds']} s",
                      flush=True)
    a.out.write_text(json.dumps(results, indent=1) + "\n")
    if not a.compare:
        return 0
    before = json.loads(a.compare.read_text())
    diff = [k for k in results if k in before and {f: results[k].get(f) for f in ("mask", "uncertainty", "rc")}
            != {f: before[k].get(f) for f in ("mask", "uncertainty", "rc")}]
    print("\n".join(f"DIFFERS {k}: {before[k]} -> {results[k]}" for k in diff) or "all outputs identical")
    return 1 if diff else 0


if __name__ == "__main__":
    raise SystemExit(main())
