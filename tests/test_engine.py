"""The engine through the API: seams are invisible, uniform tiles are skipped, every output kind."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tifffile

from conftest import write_png
from refine_cli.api import refine_file
from refine_cli.config import GuidedOptions, RefineConfig
from refine_cli.devtools.synthetic import random_scene
from refine_cli.evaluate import evaluate_arrays
from refine_cli.tiling.grid import Window


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("scene")
    sc = random_scene((1500, 2000), 8, seed=5, size=220)
    img = sc.image(Window(0, 0, 1500, 2000))
    write_png(d / "img.png", img)
    cv2.imwrite(str(d / "coarse.png"), sc.coarse(8))
    np.save(d / "gt.npy", sc.gt(Window(0, 0, 1500, 2000)))
    return d


def run(d, name, **kw):
    cfg = RefineConfig(**kw)
    out = d / f"{name}.tif"
    rep = refine_file(str(d / "img.png"), str(d / "coarse.png"), str(out), config=cfg, overwrite=True)
    return tifffile.imread(out), rep


def test_tile_size_invariance(scene_files):
    d = scene_files
    whole, rw = run(d, "whole", tile_size=2048)
    assert rw.tiles["total"] == 1
    for size in (256, 1024):
        tiled, rep = run(d, f"t{size}", tile_size=size)
        assert rep.tiles["total"] > 1
        diff = float((tiled != whole).mean())
        assert diff <= 1e-4, f"tile {size}: {diff:.6%} of pixels differ from the whole-image result"


def test_refined_beats_upsampled_coarse(scene_files):
    d = scene_files
    gt = np.load(d / "gt.npy")
    refined, rep = run(d, "guided")
    coarse, _ = run(d, "coarse", method="coarse")
    m_ref = evaluate_arrays(refined > 127, gt)
    m_co = evaluate_arrays(coarse > 127, gt)
    assert m_ref.iou > m_co.iou + 0.005
    assert m_ref.mba > m_co.mba + 0.05


def test_skipping_uniform_tiles_changes_nothing(scene_files):
    d = scene_files
    skip, rs = run(d, "skip", tile_size=256)
    full, rf = run(d, "noskip", tile_size=256, skip_uniform=False)
    assert rs.tiles["skipped"] > 10 and rf.tiles["skipped"] == 0
    assert rs.tiles["refined"] + rs.tiles["skipped"] == rs.tiles["total"]
    assert float((skip != full).mean()) <= 1e-4


def test_soft_and_png_and_uncertainty_outputs(scene_files, tmp_path):
    d = scene_files
    cfg = RefineConfig(soft=True, guard="off")  # the guard marks held pixels 255 (tests/test_guard.py)
    rep = refine_file(str(d / "img.png"), str(d / "coarse.png"), str(tmp_path / "soft.tif"), config=cfg,
                      uncertainty=str(tmp_path / "unc.tif"), report=str(tmp_path / "rep.json"))
    soft = tifffile.imread(tmp_path / "soft.tif")
    unc = tifffile.imread(tmp_path / "unc.tif")
    assert soft.dtype == np.float32 and 0 <= soft.min() and soft.max() <= 1
    assert unc.dtype == np.uint8
    np.testing.assert_allclose(unc, np.round((1 - np.abs(2 * soft - 1)) * 255), atol=1)
    on_disk = json.loads((tmp_path / "rep.json").read_text())
    for key in ("read", "refine", "blend", "write"):
        assert key in on_disk["stages"]
    assert on_disk["tiles"] == rep.tiles and on_disk["peak_rss_bytes"] > 0
    assert on_disk["config"]["soft"] is True and on_disk["versions"]["refine"]
    refine_file(str(d / "img.png"), str(d / "coarse.png"), str(tmp_path / "soft.png"), config=cfg)
    png = cv2.imread(str(tmp_path / "soft.png"), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint8 and np.abs(png.astype(float) - soft * 255).max() <= 1


def test_label_map_refinement(tmp_path):
    sc = random_scene((600, 800), 6, seed=2, size=90)
    win = Window(0, 0, 600, 800)
    img = sc.image(win)
    labels = np.zeros((600, 800), np.uint8)
    for i, sh in enumerate(sc.shapes):
        y = np.arange(600)[:, None] + 0.5
        x = np.arange(800)[None, :] + 0.5
        labels[sh.sdf(y, x) < 0] = 1 + i % 3
    low = cv2.resize(labels, (200, 150), interpolation=cv2.INTER_NEAREST)
    write_png(tmp_path / "img.png", img)
    cv2.imwrite(str(tmp_path / "lab.png"), low)
    rep = refine_file(str(tmp_path / "img.png"), str(tmp_path / "lab.png"), str(tmp_path / "out.tif"),
                      config=RefineConfig(tile_size=256), uncertainty=str(tmp_path / "unc.png"))
    out = tifffile.imread(tmp_path / "out.tif")
    assert rep.mask["kind"] == "labels" and rep.mask["classes"] == 4
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1, 2, 3}
    up = cv2.resize(low, (800, 600), interpolation=cv2.INTER_NEAREST)
    assert (out == labels).mean() >= (up == labels).mean()
    assert rep.tiles["refiner_calls"] > rep.tiles["refined"]  # per class, only classes present


def test_stdin_to_stdout(scene_files, tmp_path):
    d = scene_files
    with open(d / "img.png", "rb") as fh:
        proc = subprocess.run([sys.executable, "-m", "refine_cli", "run", "-", "--mask", str(d / "coarse.png"),
                               "-o", "-", "-q"], stdin=fh, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout[:8] == b"\x89PNG\r\n\x1a\n"
    out = cv2.imdecode(np.frombuffer(proc.stdout, np.uint8), cv2.IMREAD_UNCHANGED)
    ref, _ = run(d, "ref")
    assert out.shape == (1500, 2000) and (out == ref).all()


def test_json_report_on_stdout(scene_files, tmp_path, cli):
    d = scene_files
    code, out, err = cli("run", d / "img.png", "--mask", d / "coarse.png", "-o", tmp_path / "o.tif", "--json",
                         "-q", "--radius", "6")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["refiner"]["radius"] == 6 and rep["outputs"]["mask"].endswith("o.tif")


def test_geotiff_round_trip(tmp_path):
    import rasterio
    from rasterio.transform import from_origin

    sc = random_scene((300, 400), 3, seed=1, size=60)
    img = sc.image(Window(0, 0, 300, 400))
    crs = rasterio.crs.CRS.from_epsg(32633)
    tr = from_origin(500000.0, 4100000.0, 0.25, 0.25)
    with rasterio.open(tmp_path / "geo.tif", "w", driver="GTiff", width=400, height=300, count=3, dtype="uint8",
                       crs=crs, transform=tr, tiled=True, blockxsize=128, blockysize=128) as ds:
        ds.write(np.moveaxis(img, -1, 0))
    cv2.imwrite(str(tmp_path / "coarse.png"), sc.coarse(4))
    for cog in (False, True):
        out = tmp_path / f"out{int(cog)}.tif"
        refine_file(str(tmp_path / "geo.tif"), str(tmp_path / "coarse.png"), str(out), cog=cog,
                    uncertainty=str(tmp_path / f"unc{int(cog)}.tif"),
                    config=RefineConfig(guided=GuidedOptions(radius=4)))
        for path in (out, tmp_path / f"unc{int(cog)}.tif"):
            with rasterio.open(path) as ds:
                assert ds.crs == crs and ds.transform == tr
                assert ds.profile["tiled"] and ds.block_shapes[0] == (512, 512)
                assert ds.width == 400 and ds.height == 300
                if cog and path == out:
                    assert ds.overviews(1) or max(ds.width, ds.height) <= 512


def test_output_is_tiled_bigtiff_with_deflate(scene_files, tmp_path):
    d = scene_files
    refine_file(str(d / "img.png"), str(d / "coarse.png"), str(tmp_path / "o.tif"))
    with tifffile.TiffFile(tmp_path / "o.tif") as tf:
        page = tf.pages[0]
        assert tf.is_bigtiff and page.is_tiled and page.tilewidth == 512
        assert page.compression == 8 and page.predictor == 2
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
