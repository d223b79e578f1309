"""COG output: overviews streamed while writing vs. GDAL's second pass at commit.

Writes a synthetic ``H x W`` uint8 mask (blobs from a coarse random field, 0/255) through
``refine_cli.io.writers.TiffSink(cog=True)`` in 512-row strips, once with the overviews reduced
while the rows stream (``stream``, the default of ``refine run --cog``) and once the way it was
done before (``gdal``: a plain tiled TIFF, then GDAL's COG driver computes the overviews by
reading it again; ``before``: the writer of an older checkout given by ``--before``, whose
temporary TIFF was also deflate level 6). Each run is a child process: wall and CPU seconds
(first row to the renamed file), peak RSS, file size. Then the ``stream`` and ``gdal`` outputs are
checked: ``LAYOUT=COG`` in GDAL's metadata, the same full-resolution pixels, and the share of
equal overview pixels per level (1.0: the streamed levels are GDAL's own samples).

Usage::

    python benchmarks/cog_overviews.py [--sizes 10000,20000,40000x20000] [--before DIR]
        [--out benchmarks/results]

Prints a table and writes ``cog_overviews.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STRIP = 512


def _strip(r0: int, n: int, width: int, field: np.ndarray, cell: int) -> np.ndarray:
    """Rows ``r0 .. r0 + n`` of the synthetic mask: 0/255 blobs of a coarse random field (uint8)."""
    rows = np.arange(r0, r0 + n) // cell
    cols = np.arange(width) // cell
    return np.where(field[rows][:, cols] > 0.5, 255, 0).astype(np.uint8)


def _vm_hwm() -> int:
    """Peak RSS of this process in KiB (``VmHWM``; ``ru_maxrss`` would carry the parent's over ``exec``)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(mode: str, height: int, width: int, out: str, code: str) -> dict[str, Any]:
    """Write the mask as a COG in this process; wall and CPU seconds, peak RSS."""
    sys.path.insert(0, code)
    from refine_cli.io.writers import TiffSink

    cell = 97
    field = np.random.default_rng(0).random((height // cell + 1, width // cell + 1))
    t0, c0 = time.perf_counter(), time.process_time()
    extra = {} if mode == "before" else {"stream_overviews": mode == "stream"}
    sink = TiffSink(out, (height, width), 1, np.uint8, True, cog=True, resampling="nearest", **extra)
    for r in range(0, height, STRIP):
        n = min(STRIP, height - r)
        sink.write_rows(r, _strip(r, n, width, field, cell))
    t_rows = time.perf_counter() - t0
    sink.commit()
    wall = time.perf_counter() - t0
    return {"mode": mode, "height": height, "width": width, "wall_s": round(wall, 2),
            "cpu_s": round(time.process_time() - c0, 2),
            "rows_s": round(t_rows, 2), "commit_s": round(wall - t_rows, 2),
            "peak_rss_mib": round(_vm_hwm() / 1024, 1),
            "bytes": Path(out).stat().st_size}


def compare(streamed: str, gdal: str) -> dict[str, Any]:
    """``LAYOUT`` of both, equal full resolution, share of equal pixels per overview level."""
    import rasterio

    facts: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(streamed) as a, rasterio.open(gdal) as b:
            facts["layout"] = [d.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") for d in (a, b)]
            facts["overviews"] = [a.overviews(1), b.overviews(1)]
            same = True
            for _, win in a.block_windows(1):
                if not np.array_equal(a.read(1, window=win), b.read(1, window=win)):
                    same = False
                    break
            facts["full_resolution_equal"] = same
        equal = []
        for k in range(len(facts["overviews"][0])):
            with rasterio.open(streamed, overview_level=k) as a, rasterio.open(gdal, overview_level=k) as b:
                x, y = a.read(1), b.read(1)
                equal.append(round(float((x == y).mean()), 6) if x.shape == y.shape else None)
        facts["overview_equal_share"] = equal
    return facts


def main() -> None:
    """Run both modes per size in child processes; print the table and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20000", help="HxW or square sides: 20000,40000x20000")
    ap.add_argument("--before", default=None, help="a checkout of refine_cli from before streamed overviews "
                    "(`git archive 8f01234 refine_cli | tar -x -C DIR`): also time its TiffSink ('before')")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--child", nargs=5, metavar=("MODE", "H", "W", "OUT", "CODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, h, w, out, code = args.child
        print(json.dumps(child(mode, int(h), int(w), out, code)))
        return
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cog-bench-", dir=str(REPO.parent)) as tmp:
        for size in args.sizes.split(","):
            h, _, w = size.partition("x")
            paths = {}
            modes = {"gdal": str(REPO), "stream": str(REPO)}
            if args.before:
                modes["before"] = args.before
            for mode in sorted(modes):
                paths[mode] = str(Path(tmp) / f"{mode}_{size}.tif")
                proc = subprocess.run([sys.executable, __file__, "--child", mode, h, w or h, paths[mode],
                                       modes[mode]], capture_output=True, text=True, check=True)
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            rows[-1]["check"] = compare(paths["stream"], paths["gdal"])
            for p in paths.values():
                Path(p).unlink()
    print(f"{'H x W':>12} {'mode':>7} {'wall s':>7} {'cpu s':>7} {'rows s':>7} {'commit s':>8} "
          f"{'peak RSS MiB':>12} {'MB':>7}")
    for r in rows:
        print(f"{r['height']:>6}x{r['width']:<5} {r['mode']:>7} {r['wall_s']:>7} {r['cpu_s']:>7} "
              f"{r['rows_s']:>7} {r['commit_s']:>8} {r['peak_rss_mib']:>12} {r['bytes'] / 1e6:>7.1f}")
    for r in rows:
        if "check" in r:
            print(f"{r['height']}x{r['width']}: {json.dumps(r['check'])}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cog_overviews.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
