"""Polygon output: exactness on a 4K mask, and peak memory on a 20000 x 20000 mask with thousands of objects.

Each case runs in its own subprocess, so its peak RSS (``ru_maxrss``) is its own:

* ``4k``: 4096 x 4096 GeoTIFF of random blobs with holes; ``refine_cli.io.vectorize.vectorize_file``
  into a GeoPackage. Checks: polygon count against ``rasterio.features.shapes`` on the whole image
  (4-connectivity) and the total polygon area against the foreground pixels (relative difference).
  Also once with ``--simplify 2px`` (count and area after simplification).
* ``4k-run``: ``refine run --method coarse --vector`` on a 4096 x 4096 image with that mask (the run
  path: rows from the engine to the polygonizer), compared with ``shapes`` on the refined mask.
* ``20k-stream``: a 20000 x 20000 seam scene (``refine_cli.devtools.seam_scene``: bars, rings whose
  holes cross seams, U shapes whose arms meet below a seam ...; the seams are the polygonizer's band
  edges) generated band by band and streamed into ``PolygonWriter`` (GeoPackage); the object count is
  known.
* ``20k-file``: the same scene written as a tiled GeoTIFF (streamed), then ``refine vectorize`` on it.
* ``20k-run`` (not in the default set: ~10 min on 2 cores): ``refine run --method coarse --vector`` on a
  20000 x 20000 RGB GeoTIFF of that scene with the mask as its coarse input.

Prints a table and writes JSON (``--out``, default ``benchmarks/results/vector.json``).

    python benchmarks/vector.py                      # all cases
    python benchmarks/vector.py --cases 4k 20k-stream
    python benchmarks/vector.py --quick              # 1024 and 4000 px sides, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CASES = ("4k", "4k-run", "20k-stream", "20k-file", "20k-run")
DEFAULT = CASES[:4]


def _blobs(side: int, seed: int = 0) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    small = ndimage.gaussian_filter(rng.random((side // 4, side // 4)), 2.5) > 0.515
    return (np.kron(small, np.ones((4, 4), bool)) * 255).astype(np.uint8)


def _geotiff(path: Path, array: np.ndarray) -> None:
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(path, "w", driver="GTiff", height=array.shape[-2], width=array.shape[-1],
                       count=1 if array.ndim == 2 else array.shape[0], dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000, 4000000, 0.5, 0.5), tiled=True,
                       compress="deflate") as dst:
        dst.write(array if array.ndim == 3 else array[None])


def _shapes_count(mask: np.ndarray) -> int:
    from rasterio.features import shapes

    return sum(1 for _ in shapes(mask, mask=mask > 0, connectivity=4))


def _read_stats(path: Path) -> tuple[int, float]:
    return _read_stats3(path)[:2]  # type: ignore[return-value]


def _read_stats3(path: Path) -> tuple[int, float, int]:
    """Polygons, total area and vertices of a vector file."""
    import pyogrio
    import shapely

    _, _, geoms, _ = pyogrio.raw.read(path)
    g = shapely.from_wkb(geoms)
    return len(g), float(shapely.area(g).sum()), int(shapely.get_num_coordinates(g).sum())


def case_4k(side: int, work: Path) -> dict:
    from refine_cli.io.vectorize import VectorSpec, vectorize_file

    mask = _blobs(side)
    _geotiff(work / "mask4k.tif", mask)
    t0 = time.perf_counter()
    res = vectorize_file(str(work / "mask4k.tif"), VectorSpec(str(work / "p4k.gpkg")), overwrite=True)
    wall = time.perf_counter() - t0
    n, area, vertices = _read_stats3(work / "p4k.gpkg")
    fg_area = np.count_nonzero(mask) * 0.25
    ref = _shapes_count(mask)
    vectorize_file(str(work / "mask4k.tif"), VectorSpec(str(work / "p4k_s.gpkg"), simplify="2px"),
                   overwrite=True)
    ns, area_s, vertices_s = _read_stats3(work / "p4k_s.gpkg")
    return {"size": f"{side}x{side}", "polygons": n, "shapes_polygons": ref, "count_equal": n == ref,
            "reported": res["polygons"], "area_rel_diff": abs(area - fg_area) / fg_area, "wall_s": wall,
            "vertices": vertices, "simplified_polygons": ns, "simplified_vertices": vertices_s,
            "simplified_area_rel_diff": abs(area_s - fg_area) / fg_area}


def case_4k_run(side: int, work: Path) -> dict:
    import rasterio

    mask = _blobs(side, seed=1)
    img = np.stack([mask, 255 - mask, mask // 2])
    _geotiff(work / "img4k.tif", img)
    _geotiff(work / "mask4k_run.tif", mask)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "refine_cli", "run", str(work / "img4k.tif"), "-m",
                           str(work / "mask4k_run.tif"), "-o", str(work / "run4k.tif"), "--method", "coarse",
                           "--vector", str(work / "run4k.gpkg"), "--overwrite", "-q", "--json"],
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        return {"error": proc.stderr.strip()[-300:]}
    rep = json.loads(proc.stdout)
    with rasterio.open(work / "run4k.tif") as src:
        refined = src.read(1)
    n, area = _read_stats(work / "run4k.gpkg")
    fg = np.count_nonzero(refined) * 0.25
    ref = _shapes_count(refined)
    return {"size": f"{side}x{side}", "polygons": n, "shapes_polygons": ref, "count_equal": n == ref,
            "area_rel_diff": abs(area - fg) / fg, "wall_s": wall,
            "run_peak_rss_mb": rep["peak_rss_bytes"] / 2**20}


def _band(side: int) -> int:
    """The polygonizer's default band height for this width (128 rows below 8000 px: the scene has cells)."""
    from refine_cli.io.vector import BandPolygonizer

    return BandPolygonizer((side, side), lambda g, a: None).band_rows if side >= 8000 else 128


def case_20k_stream(side: int, work: Path) -> dict:
    from refine_cli.devtools.seam_scene import SeamScene
    from refine_cli.io.vectorize import PolygonWriter, VectorSpec

    band = _band(side)
    scene = SeamScene(side, side, band, cell_width=100)
    out = work / "p20k.gpkg"
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    w = PolygonWriter(VectorSpec(str(out)), (side, side), None, stats=False, overwrite=True, band_rows=band)
    fg = 0
    for r in range(0, side, 512):
        rows = scene.rows(r, min(side, r + 512))
        fg += int(np.count_nonzero(rows))
        w.add(r, rows)
    w.commit()
    wall = time.perf_counter() - t0
    n, area = _read_stats(out)
    return {"size": f"{side}x{side}", "band_rows": band, "objects": scene.count, "polygons": n,
            "count_equal": n == scene.count, "area_rel_diff": abs(area - fg) / fg, "wall_s": wall}


def case_20k_file(side: int, work: Path) -> dict:
    from refine_cli.devtools.seam_scene import SeamScene

    scene = SeamScene(side, side, _band(side), cell_width=100)
    _, tif = _scene_tiffs(side, work, image=False)
    out = work / "p20k_file.fgb"
    t0 = time.perf_counter()
    # the file is read in the polygonizer's default bands, which are the scene's at this width (209 rows)
    proc = subprocess.run([sys.executable, "-m", "refine_cli", "vectorize", str(tif), "-o", str(out),
                           "--overwrite", "--json", "-q"], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        return {"error": proc.stderr.strip()[-300:]}
    usage = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    n, _ = _read_stats(out)
    return {"size": f"{side}x{side}", "objects": scene.count, "polygons": n, "count_equal": n == scene.count,
            "wall_s": wall, "vectorize_peak_rss_mb": usage / 2**20}


def _scene_tiffs(side: int, work: Path, image: bool = True) -> tuple[Path, Path]:
    """The seam scene as a one-band mask GeoTIFF and a three-band image GeoTIFF, written by row blocks."""
    from rasterio.crs import CRS

    from refine_cli.devtools.seam_scene import SeamScene
    from refine_cli.io.readers import Georef
    from refine_cli.io.writers import TiffSink

    scene = SeamScene(side, side, _band(side), cell_width=100)
    georef = Georef(CRS.from_epsg(32633).to_wkt(), (0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0))
    mask, img = work / f"mask{side}.tif", work / f"img{side}.tif"
    for path, bands in ((mask, 1), (img, 3)):
        if path.exists() or (bands == 3 and not image):
            continue
        sink = TiffSink(str(path), (side, side), bands, np.uint8, overwrite=True, georef=georef)
        for r in range(0, side, 512):
            rows = scene.rows(r, min(side, r + 512))
            sink.write_rows(r, rows if bands == 1 else np.stack([rows, 255 - rows, rows // 2], -1))
        sink.commit()
    return img, mask


def case_20k_run(side: int, work: Path) -> dict:
    img, mask = _scene_tiffs(side, work)
    out, vec = work / "run20k.tif", work / "run20k.gpkg"
    t0 = time.perf_counter()
    args = ["run", str(img), "-m", str(mask), "-o", str(out), "--method", "coarse", "--vector", str(vec),
            "--overwrite", "-q", "--json"]
    proc = subprocess.run([sys.executable, "-m", "refine_cli", *args], capture_output=True, text=True,
                          cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        return {"error": proc.stderr.strip()[-300:]}
    rep = json.loads(proc.stdout)
    n, area = _read_stats(vec)
    from refine_cli.devtools.seam_scene import SeamScene

    scene = SeamScene(side, side, _band(side), cell_width=100)
    return {"size": f"{side}x{side}", "objects": scene.count, "polygons": n, "count_equal": n == scene.count,
            "wall_s": wall, "run_peak_rss_mb": rep["peak_rss_bytes"] / 2**20}


def run_case(name: str, quick: bool, work: Path) -> dict:
    """Run one case in this process (called in a child); adds this process's peak RSS."""
    small, large = (1024, 4000) if quick else (4096, 20000)
    fn = {"4k": case_4k, "4k-run": case_4k_run, "20k-stream": case_20k_stream,
          "20k-file": case_20k_file, "20k-run": case_20k_run}[name]
    res = fn(small if name.startswith("4k") else large, work)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(DEFAULT))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vector.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child, args.quick, args.work)))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="refine-vector-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.cases:
        cmd = [sys.executable, __file__, "--child", name, "--work", str(work)]
        cmd += ["--quick"] if args.quick else []
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else \
            {"error": proc.stderr.strip()[-400:]}
        print(f"{name:11s} " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in results[name].items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                                    "quick": args.quick, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
