"""``refine eval`` and ``refine overlay`` through the CLI, and the benchmarks' ``--quick`` modes.

Expected numbers come from ``refine_cli.evaluate.evaluate_arrays`` on arrays
held in memory (itself tested against hand-computed cases in test_evaluate.py),
so these tests check the file layer: value scales, resampling, pairing, streaming.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from conftest import write_png

from refine_cli.evaluate import EvalOptions, evaluate_arrays

REPO = Path(__file__).resolve().parents[1]
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None  # the charts need refine-cli[plot]
rng = np.random.default_rng(11)


def blob(shape, cy, cx, r, value=255, dtype=np.uint8):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (((yy - cy) ** 2 + ((xx - cx) * 0.8) ** 2) < r**2).astype(dtype) * dtype(value)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 120 x 160 GT (0/255), a shifted prediction (0/1 uint8) and a 30 x 40 coarse mask."""
    d = tmp_path_factory.mktemp("pair")
    gt = blob((120, 160), 60, 80, 40)
    pred = blob((120, 160), 63, 84, 38, value=1)
    write_png(d / "gt.png", gt)
    write_png(d / "pred.png", pred)
    write_png(d / "coarse.png", cv2.resize(gt, (40, 30), interpolation=cv2.INTER_AREA))
    return d, gt, pred


def run_json(cli, *args):
    code, out, err = cli("eval", *args, "--json", "-q")
    assert code == 0, err
    return json.loads(out)


def test_single_pair_matches_in_memory(pair, cli):
    d, gt, pred = pair
    res = run_json(cli, d / "pred.png", d / "gt.png")
    expected = evaluate_arrays(pred.astype(bool), gt > 127)
    got = res["images"][0]["metrics"]
    # 0/1 uint8 prediction read with scale 1 (not as "all below 127.5")
    assert got["counts"] == expected.counts.to_dict()
    assert got["iou"] == pytest.approx(expected.iou)
    assert 0.5 < got["iou"] < 0.99
    assert res["mean"]["mba"] == pytest.approx(expected.mba)
    assert res["images"][0]["files"]["pred"]["scale"] == 1.0
    assert res["images"][0]["gain"] is None


def test_table_on_stderr_and_json_on_stdout(pair, cli):
    d, _, _ = pair
    code, out, err = cli("eval", d / "pred.png", d / "gt.png")
    assert code == 0 and out == ""
    assert "IoU" in err and "mBA" in err and "BF@2" in err
    code, out, err = cli("eval", d / "pred.png", d / "gt.png", "--json", "--tolerance", "0")
    assert code == 0 and json.loads(out)["images"][0]["metrics"]["tolerance"] == 0
    assert "BF@0" in err


def test_soft_prediction_threshold(tmp_path, cli):
    gt = blob((80, 100), 40, 50, 25)
    yy, xx = np.mgrid[:80, :100]
    soft = np.clip(1.0 - np.hypot(yy - 40, (xx - 50) * 0.8) / 50.0, 0, 1).astype(np.float32)
    write_png(tmp_path / "gt.png", gt)
    tifffile.imwrite(tmp_path / "soft.tif", soft)
    for t in (0.3, 0.5, 0.7):
        res = run_json(cli, tmp_path / "soft.tif", tmp_path / "gt.png", "--threshold", t)
        expected = evaluate_arrays(soft >= t, gt > 127)
        assert res["images"][0]["metrics"]["counts"] == expected.counts.to_dict(), t
    ious = [run_json(cli, tmp_path / "soft.tif", tmp_path / "gt.png", "--threshold", t)["mean"]["iou"]
            for t in (0.3, 0.7)]
    assert ious[0] != ious[1]


def test_coarse_gain_equals_null_refiner(pair, cli, tmp_path):
    d, gt, _ = pair
    res = run_json(cli, d / "pred.png", d / "gt.png", "--coarse", d / "coarse.png")
    img = res["images"][0]
    assert img["files"]["coarse"]["resampled"] is True
    for k in ("iou", "mba", "boundary_f", "accuracy"):
        assert img["gain"][k] == pytest.approx(img["metrics"][k] - img["coarse_metrics"][k])
    assert res["mean_gain"]["iou"] == pytest.approx(img["metrics"]["iou"] - img["coarse_metrics"]["iou"])
    # The coarse mask's metrics are those of `refine run --method coarse` (the same resampling).
    write_png(tmp_path / "image.png", np.dstack([gt] * 3))
    code, _, err = cli("run", tmp_path / "image.png", "--mask", d / "coarse.png", "--method", "coarse", "-o",
                       tmp_path / "null.png", "-q")
    assert code == 0, err
    null = run_json(cli, tmp_path / "null.png", d / "gt.png")
    assert null["images"][0]["metrics"]["counts"] == img["coarse_metrics"]["counts"]


def test_label_maps(tmp_path, cli):
    gt = np.zeros((60, 80), np.uint8)
    gt[10:30, 10:40] = 1
    gt[35:55, 40:75] = 2
    gt[0:5, :] = 9  # ignored with --ignore-index 9
    pred = gt.copy()
    pred[0:5, :] = 0
    pred[10:30, 35:40] = 2  # 100 px of class 1 called class 2
    write_png(tmp_path / "gt.png", gt)
    write_png(tmp_path / "pred.png", pred)
    res = run_json(cli, tmp_path / "pred.png", tmp_path / "gt.png", "--labels", "--ignore-index", "9")
    m = res["images"][0]["metrics"]
    expected = evaluate_arrays(pred, gt, EvalOptions(labels=True, ignore_index=9))
    assert m["class_iou"] == {str(k): pytest.approx(v) for k, v in expected.class_iou.items()}
    # class 1: 500 px of 600 right; class 2: 700 / 800
    assert m["class_iou"]["1"] == pytest.approx(500 / 600)
    assert m["class_iou"]["2"] == pytest.approx(700 / 800)
    assert "9" not in m["class_iou"]
    assert m["miou"] == pytest.approx(expected.miou)
    code, _, err = cli("eval", tmp_path / "pred.png", tmp_path / "gt.png", "--classes", "10")
    assert code == 0 and "per-class IoU" in err


def test_mismatched_size_is_one_clear_error(pair, cli, tmp_path):
    d, gt, _ = pair
    write_png(tmp_path / "small.png", cv2.resize(gt, (80, 60), interpolation=cv2.INTER_NEAREST))
    code, out, err = cli("eval", tmp_path / "small.png", d / "gt.png")
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "80x60" in err and "160x120" in err and "resolution" in err


def test_label_map_in_binary_mode_and_empty_gt_warning(tmp_path, caplog, monkeypatch):
    from refine_cli.evaluation_io import evaluate_pair

    monkeypatch.setattr(logging.getLogger("refine_cli"), "propagate", True)  # the CLI tests turn it off

    labels = np.zeros((64, 64), np.uint8)
    labels[10:30, 10:30] = 3
    labels[40:60, 35:60] = 5
    write_png(tmp_path / "labels.png", labels)
    write_png(tmp_path / "fg.png", (labels > 0).astype(np.uint8) * 255)
    res = evaluate_pair(tmp_path / "labels.png", tmp_path / "fg.png")  # label map as a prediction
    assert res.files["pred"]["kind"] == "labels" and res.metrics.iou == 1.0
    # 16-bit instance ids {77, 183} are objects (id > 0 is foreground), not probabilities below 0.5
    inst = np.zeros((64, 64), np.uint16)
    inst[5:20, 5:20] = 183
    inst[30:50, 30:50] = 77
    tifffile.imwrite(tmp_path / "inst.tif", inst)
    write_png(tmp_path / "inst_fg.png", (inst > 0).astype(np.uint8) * 255)
    res = evaluate_pair(tmp_path / "inst_fg.png", tmp_path / "inst.tif")
    assert res.files["gt"]["kind"] == "instances" and res.metrics.iou == 1.0


@pytest.mark.parametrize(
    ("args", "text"),
    [
        ([], "nothing to evaluate"),
        (["{d}/pred.png"], "both PRED and GT"),
        (["{d}/pred.png", "{d}/gt.png", "--pred-dir", "{d}"], "not both"),
        (["--pred-dir", "{d}"], "go together"),
        (["{d}/pred.png", "{d}/gt.png", "--coarse-dir", "{d}"], "--coarse-dir"),
        (["{d}/pred.png", "{d}/gt.png", "--threshold", "1.5"], "threshold"),
        (["{d}/pred.png", "{d}/gt.png", "--ignore-index", "3"], "label maps"),
        (["{d}/missing.png", "{d}/gt.png"], "not found"),
    ],
)
def test_usage_errors(pair, cli, args, text):
    d, _, _ = pair
    code, out, err = cli("eval", *[a.format(d=d) for a in args])
    assert code == 2 and out == "", err
    assert text in err


def test_directories_pair_by_stem(tmp_path, cli):
    preds, gts, coarses = (tmp_path / n for n in ("pred", "gt", "coarse"))
    for p in (preds, gts, coarses):
        p.mkdir()
    expected = {}
    for i, name in enumerate(("a", "b")):
        gt = blob((90, 120), 45, 60, 25 + 5 * i)
        pred = blob((90, 120), 47, 62 - 3 * i, 26 + 5 * i)
        write_png(gts / f"{name}.png", gt)
        write_png(coarses / f"{name}.png", cv2.resize(gt, (30, 22), interpolation=cv2.INTER_AREA))
        expected[name] = evaluate_arrays(pred > 0, gt > 127)
        if name == "a":
            tifffile.imwrite(preds / "a.refined.tif", pred, tile=(32, 32))  # refine run's default name
        else:
            write_png(preds / "b.png", pred)
    write_png(gts / "c.png", blob((90, 120), 40, 40, 10))  # no prediction
    (preds / "report.json").write_text("{}")  # not a mask: ignored
    res = run_json(cli, "--pred-dir", preds, "--gt-dir", gts, "--coarse-dir", coarses)
    assert [r["name"] for r in res["images"]] == ["a", "b"]
    for r in res["images"]:
        assert r["metrics"]["counts"] == expected[r["name"]].counts.to_dict()
        assert r["gain"] is not None
    assert res["mean"]["iou"] == pytest.approx((expected["a"].iou + expected["b"].iou) / 2)
    assert res["unpaired"]["gt"] == [str(gts / "c.png")]
    code, _, err = cli("eval", "--pred-dir", preds, "--gt-dir", gts)
    assert code == 0 and "mean" in err
    (coarses / "b.png").unlink()
    code, _, err = cli("eval", "--pred-dir", preds, "--gt-dir", gts, "--coarse-dir", coarses)
    assert code == 2 and "no coarse mask for b" in err
    code, _, err = cli("eval", "--pred-dir", preds, "--gt-dir", coarses / "..")
    assert code == 2 and "pair by name" in err


def test_streamed_equals_whole_on_tiled_tiff(tmp_path, cli):
    h, w = 700, 900
    yy, xx = np.mgrid[:h, :w]
    gt = ((np.sin(xx / 37.0) + np.cos(yy / 23.0)) > 0.3).astype(np.uint8) * 255
    noise = rng.random((h, w)) < 0.02
    pred = np.where(noise, 255 - gt, np.roll(gt, 2, axis=1)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "gt.tif", gt, tile=(64, 64), compression="zlib")
    tifffile.imwrite(tmp_path / "pred.tif", pred, tile=(64, 64), compression="zlib")
    whole = evaluate_arrays(pred, gt, EvalOptions(tolerance=3))
    assert whole.radii[-1] > 1  # several band radii, so the halo matters
    for window in (97, 256, 4096):
        res = run_json(cli, tmp_path / "pred.tif", tmp_path / "gt.tif", "--window", window, "--tolerance", 3)
        assert res["images"][0]["metrics"]["counts"] == whole.counts.to_dict(), window
        assert res["options"]["window"] == window


# --------------------------------------------------------------------------------------------- overlay


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A 300 x 400 image with a disc, a refined mask and a coarse mask that differs at one spot."""
    d = tmp_path_factory.mktemp("overlay")
    yy, xx = np.mgrid[:300, :400]
    disc = (yy - 150) ** 2 + (xx - 200) ** 2 < 80**2
    img = np.where(disc[..., None], np.array([200, 120, 90], np.uint8), np.array([60, 100, 60], np.uint8))
    write_png(d / "image.png", img.astype(np.uint8))
    write_png(d / "refined.png", disc.astype(np.uint8) * 255)
    coarse = disc.copy()
    coarse[60:100, 250:330] = True  # a wrong bump to the upper right
    write_png(d / "coarse.png", coarse.astype(np.uint8) * 255)
    unc = np.zeros((150, 200), np.uint8)
    unc[20:40, 150:170] = 255
    write_png(d / "unc.png", unc)
    return d


def test_overlay_size_and_crop(scene, tmp_path, cli):
    out = tmp_path / "o.png"
    code, _, err = cli("overlay", scene / "image.png", scene / "refined.png", "--compare",
                       scene / "coarse.png", "--max-side", 200, "--crop", 64, "-o", out)
    assert code == 0, err
    pic = cv2.imread(str(out))
    # overview 150 x 200, gap 8, crop 64 wide shown 1:1 and as tall as the overview (the panel is full)
    assert pic.shape == (150, 200 + 8 + 64, 3)
    assert "crop 64x150" in err
    bottom = pic[-40:, 208:].reshape(-1, 3).astype(int)  # below where a 64 px square crop would end
    assert (np.abs(bottom - [32, 32, 32]).sum(axis=1) > 0).all()  # image there, not bare background
    x, y = (int(v) for v in re.search(r"at x=(\d+), y=(\d+)", err).groups())
    # the crop covers the bump (rows 60-100, cols 250-330)
    assert 250 - 64 < x < 330 and 60 - 64 < y < 100
    # magenta (compare) contour drawn in the overview around the bump: BGR (220, 40, 255)
    bump = pic[25:55, 120:170].reshape(-1, 3).astype(int)
    assert (np.abs(bump - [220, 40, 255]).sum(axis=1) < 60).any()


def test_overlay_uncertainty_panel_and_no_overwrite(scene, tmp_path, cli):
    out = tmp_path / "u.png"
    code, _, err = cli("overlay", scene / "image.png", scene / "refined.png", "--uncertainty",
                       scene / "unc.png", "--max-side", 200, "--crop", 0, "-o", out)
    assert code == 0, err
    pic = cv2.imread(str(out))
    assert pic.shape == (150, 200 + 8 + 200, 3)
    heat = pic[:, 208:]
    hot = heat[20:40, 150:170].astype(int).sum()
    cold = heat[100:120, 20:40].astype(int).sum()
    assert hot > 2 * cold
    code, _, err = cli("overlay", scene / "image.png", scene / "refined.png", "-o", out)
    assert code == 2 and "--overwrite" in err
    code, _, err = cli("overlay", scene / "image.png", scene / "refined.png", "-o", tmp_path / "x.gif")
    assert code == 2 and ".png" in err


def test_choose_crop_edge_cases():
    from refine_cli.overlay import choose_crop, most_changed_window

    score = np.zeros((50, 80), np.float32)
    assert choose_crop(score, (500, 800), (50, 80), 100) is None  # nothing changed
    score[40:45, 70:78] = 1.0  # near the bottom-right corner
    assert most_changed_window(score, (10, 10)) == (35, 68)
    win = choose_crop(score, (500, 800), (50, 80), 100)
    # centred on the changed block, clipped to the image
    assert (win.height, win.width) == (100, 100) and win.row_end <= 500 and win.col_end <= 800
    assert win.row <= 400 < win.row_end and win.col <= 740 < win.col_end
    assert choose_crop(score, (50, 80), (50, 80), 100) is None  # overview already 1:1
    assert choose_crop(score, (500, 800), (50, 80), 5000).shape == (500, 800)


def test_overlay_crop_without_compare_lands_on_the_mask(tmp_path):
    """Without --compare, the crop goes where MASK's boundary is (and fills the panel's height)."""
    from refine_cli.overlay import render_overlay

    yy, xx = np.mgrid[:600, :800]
    disc = (yy - 450) ** 2 + (xx - 650) ** 2 < 60**2  # one object, bottom right
    write_png(tmp_path / "image.png", np.where(disc[..., None], 200, 60).astype(np.uint8).repeat(3, axis=2))
    write_png(tmp_path / "mask.png", disc.astype(np.uint8) * 255)
    ov = render_overlay(str(tmp_path / "image.png"), str(tmp_path / "mask.png"), max_side=200, crop=128)
    win = ov.crop_window
    assert win is not None and win.shape == (150, 128)  # overview 150 x 200: the crop is 150 tall
    assert disc[win.slices].any() and not disc[win.slices].all()  # the boundary is in the crop
    assert ov.rgb.shape == (150, 200 + 8 + 128, 3)


def test_overlay_crop_with_uncertainty_prefers_the_mask_boundary(tmp_path):
    """Uncertainty far from MASK (noise in the background) does not pull the crop off the mask."""
    from refine_cli.overlay import render_overlay

    yy, xx = np.mgrid[:600, :800]
    disc = (yy - 450) ** 2 + (xx - 650) ** 2 < 60**2
    write_png(tmp_path / "image.png", np.where(disc[..., None], 200, 60).astype(np.uint8).repeat(3, axis=2))
    write_png(tmp_path / "mask.png", disc.astype(np.uint8) * 255)
    unc = np.zeros((600, 800), np.uint8)
    unc[50:200, 50:200] = 255  # a hot patch with no mask near it
    ring = (np.abs(np.sqrt((yy - 450.0) ** 2 + (xx - 650.0) ** 2) - 60) < 3)
    unc[ring] = 120  # the boundary is less uncertain than the patch
    write_png(tmp_path / "unc.png", unc)
    ov = render_overlay(str(tmp_path / "image.png"), str(tmp_path / "mask.png"),
                        uncertainty=str(tmp_path / "unc.png"), max_side=200, crop=128)
    win = ov.crop_window
    assert win is not None and disc[win.slices].any() and not disc[win.slices].all()
    # nothing uncertain near the mask: the crop still goes to the mask's boundary, not the patch
    unc[ring] = 0
    write_png(tmp_path / "unc.png", unc)
    ov = render_overlay(str(tmp_path / "image.png"), str(tmp_path / "mask.png"),
                        uncertainty=str(tmp_path / "unc.png"), max_side=200, crop=128)
    assert ov.crop_window is not None and disc[ov.crop_window.slices].any()


def test_overlay_of_tiled_tiff_streams(tmp_path):
    from refine_cli.devtools.synthetic import random_scene, write_tiled
    from refine_cli.overlay import render_overlay

    sc = random_scene((1024, 1536), 4, seed=3)
    write_tiled(sc, str(tmp_path / "img.tif"), tile=256)
    write_png(tmp_path / "coarse.png", sc.coarse(8))
    from refine_cli.tiling.grid import Window

    write_png(tmp_path / "gt.png", sc.gt(Window.full((1024, 1536))).astype(np.uint8) * 255)
    ov = render_overlay(str(tmp_path / "img.tif"), str(tmp_path / "gt.png"), str(tmp_path / "coarse.png"),
                        max_side=300, crop=128)
    assert ov.overview_shape == (200, 300)
    assert ov.rgb.shape == (200, 300 + 8 + 128, 3)
    assert ov.crop_window is not None and ov.crop_window.shape == (200, 128)  # as tall as the overview
    assert 0 < ov.changed_fraction < 0.2


# ------------------------------------------------------------------------------------------ benchmarks


def load_quality():
    """``benchmarks/quality.py`` as a module (it is a script, not part of the package)."""
    if "quality_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("quality_bench", REPO / "benchmarks" / "quality.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["quality_bench"] = mod  # its dataclasses look their module up
        spec.loader.exec_module(mod)
    return sys.modules["quality_bench"]


def test_quality_benchmark_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality.py"), "--quick", "--methods",
                           "coarse,guided", "--variant", "tight=guided,guided.eps=0.0001", "--keep-outputs",
                           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert res["mode"] == "quick"
    for r in res["runs"]:  # --keep-outputs: every refined mask kept under its name, every input recorded
        assert Path(r["output"]) == tmp_path / "work" / "outputs" / r["method"] / \
            f"{r['dataset']}__{r['case']}__{r['coarse']}.png"
        assert Path(r["output"]).is_file()
        assert all(Path(r[k]).is_file() for k in ("image", "gt", "coarse_path"))
    assert res["methods"] == {m: {"status": "ok"} for m in ("coarse", "guided", "tight")}
    assert res["variants"] == {"tight": "guided,guided.eps=0.0001"}
    by_method = {(r["method"], r["dataset"], r["case"], r["coarse"]): r["mba"] for r in res["runs"]}
    tight = {k[1:]: v for k, v in by_method.items() if k[0] == "tight"}
    guided = {k[1:]: v for k, v in by_method.items() if k[0] == "guided"}
    assert tight.keys() == guided.keys() and tight != guided  # the variant really ran with its own option
    rows = {(r["method"], r["dataset"]): r for r in res["summary"]}
    assert ("coarse", "synthetic") in rows and ("guided", "synthetic") in rows
    for r in res["summary"]:
        assert 0.0 <= r["mba"] <= 1.0 and r["s_per_mpx"] > 0 and r["n"] > 0
    assert rows[("coarse", "synthetic")]["gain_mba"] == 0.0
    composite_runs = [r for r in res["runs"] if r["dataset"] in ("shapes", "portrait-comp")]
    assert len(res["composites"]) == len({(r["method"], r["coarse"]) for r in composite_runs})
    for p in res["composites"]:  # pooled over the composite cases: the "composites benchmark"
        runs = [r for r in composite_runs if (r["method"], r["coarse"]) == (p["method"], p["coarse"])]
        assert p["n"] == len(runs) and p["mba"] == pytest.approx(np.mean([r["mba"] for r in runs]))
        base = next(b for b in res["composites"] if (b["method"], b["coarse"]) == ("coarse", p["coarse"]))
        assert p["gain_iou"] == pytest.approx(p["iou"] - base["iou"])
    # harm: a run whose IoU is more than 0.5 points below its coarse mask's, counted per group
    coarse_iou = {(r["dataset"], r["case"], r["coarse"]): r["iou"] for r in res["runs"]
                  if r["method"] == "coarse"}
    for r in res["by_coarse"]:
        group = (r["method"], r["dataset"], r["coarse"])
        runs = [x for x in res["runs"] if (x["method"], x["dataset"], x["coarse"]) == group]
        deltas = [x["iou"] - coarse_iou[(x["dataset"], x["case"], x["coarse"])] for x in runs]
        assert r["harm"] == sum(d < -0.005 for d in deltas)
        assert r["worst_delta_iou"] == pytest.approx(min(deltas))
        assert r["worst_iou"] == min(x["iou"] for x in runs)
    assert all(r["harm"] == 0 for r in res["summary"] if r["method"] == "coarse")
    if HAVE_MPL:
        assert (tmp_path / "out" / "quality.png").stat().st_size > 0
    md = (tmp_path / "out" / "quality.md").read_text()
    assert "| synthetic | guided |" in md and "| harm | worst IoU | worst ΔIoU |" in md
    assert "| synthetic | lowres | guided |" in md  # per data set x coarse kind x method, with the harm
    if importlib.util.find_spec("refine_cli.train.scenes") is not None:  # a tiny many-object scene
        kinds = {r["coarse"] for r in res["runs"] if r["dataset"] == "aerial"}
        assert kinds == {"lowres", "perturbed", "detector"}
    datasets = [r["dataset"] for r in res["summary"]]  # grouped by data set
    assert datasets == sorted(datasets, key=datasets.index) and res["datasets"]["synthetic"]["size"] == "384²"


class StubScenes:
    """A stand-in for ``refine_cli.train.scenes``: an anti-aliased disc whose windows are computed from
    global coordinates (so a window equals the crop of the whole render), counting its render calls."""

    FAMILIES = ("aerial", "cells", "thin")
    __file__ = __file__
    windows: list = []

    class SceneGenerator:
        def __init__(self, family, shape, seed, photos=None, density=1.0):
            self.family, self.shape, self.seed = family, tuple(shape), seed

        def render(self, window):
            from types import SimpleNamespace

            StubScenes.windows.append(window)
            yy, xx = np.mgrid[window.row : window.row_end, window.col : window.col_end].astype(np.float32)
            h, w = self.shape
            d = 0.3 * min(h, w) - np.hypot(yy - 0.5 * h, xx - 0.4 * w - self.seed % 7)
            gt = np.clip(d + 0.5, 0, 1).astype(np.float32)
            image = np.stack([(yy * 3 + xx) % 256, (xx * 5) % 256, 40 + 150 * gt], -1).astype(np.uint8)
            return SimpleNamespace(image=image, gt=gt, detector=np.clip((d + 4) / 8, 0, 1).astype(np.float32))

        def count(self):
            return 1


def test_quality_scene_sets_stream_and_score(tmp_path, monkeypatch):
    """The scene sets against a stub generator: the 1024-style cases (PNG, detector kind) and the huge
    one written band by band as tiled TIFF equal to the whole render; both run and score."""
    from refine_cli.tiling.grid import Window
    from refine_cli.train.data import block_mean

    q = load_quality()
    monkeypatch.setattr(q, "load_scenes", lambda: (StubScenes, ""))
    StubScenes.windows.clear()
    (aerial,) = q.scene_sets(tmp_path, ["aerial"], 2, 64)
    assert [c.name for c in aerial.cases] == ["aerial_00", "aerial_01"]
    assert set(aerial.cases[0].coarse) == {"lowres", "perturbed", "detector"}
    low = cv2.imread(str(aerial.cases[0].coarse["lowres"]), cv2.IMREAD_GRAYSCALE)
    assert low.shape == (8, 8)  # 1/8, stored small
    side, band = 203, 64  # not a multiple of the band nor of the lowres factor
    huge = q.huge_set(tmp_path, side, band=band, child=False)  # the stub lives in this process
    assert all(w.height <= band and w.width == side for w in StubScenes.windows[2:])  # bounded
    gen = StubScenes.SceneGenerator("aerial", (side, side), q.SCENE_SEED + 1000)
    full = gen.render(Window.full((side, side)))
    case = huge.cases[0]
    assert set(case.coarse) == {"lowres", "detector"} and "perturbed" in huge.skipped
    with tifffile.TiffFile(case.image) as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == 512 and page.compression == 8  # deflate
        assert np.array_equal(page.asarray(), full.image)
    assert np.array_equal(tifffile.imread(case.gt), np.where(full.gt >= 0.5, 255, 0).astype(np.uint8))
    assert np.array_equal(tifffile.imread(case.coarse["detector"]), q.to_u8(full.detector))
    low = cv2.imread(str(case.coarse["lowres"]), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(low, q.to_u8(block_mean(full.gt, 8)))
    n = len(StubScenes.windows)
    q.huge_set(tmp_path, side, band=band, child=False)
    q.scene_sets(tmp_path, ["aerial"], 2, 64)
    assert len(StubScenes.windows) == n  # cached: nothing rendered again
    jobs = q.interleave([aerial, huge], q.COARSE_KINDS)
    recs, complete = q.run_method("coarse", jobs, tmp_path / "outputs" / "coarse", 1e9, keep=True)
    assert complete and not [r for r in recs if "error" in r]
    assert {(r["dataset"], r["coarse"]) for r in recs} == {("aerial", "lowres"), ("aerial", "perturbed"),
                                                           ("aerial", "detector"), ("aerial-huge", "lowres"),
                                                           ("aerial-huge", "detector")}
    for r in recs:
        assert r["output"].endswith(".tif" if r["dataset"] == "aerial-huge" else ".png")
        assert r["iou"] > 0.8 and r["shape"] == ([side, side] if r["dataset"] == "aerial-huge" else [64, 64])


def test_quality_interleave_covers_every_set_then_evens_pixels():
    q = load_quality()

    def dataset(name, n, mpx):
        ds = q.DataSet(name)
        for i in range(n):
            ds.cases.append(q.Case(name, f"c{i}", Path("i"), Path("g"), {"lowres": Path("l")}, mpx))
        return ds

    jobs = q.interleave([dataset("small", 6, 1.0), dataset("large", 3, 4.0), dataset("huge", 2, 100.0)],
                        ["lowres"])
    names = [c.dataset for c, _ in jobs]
    assert names[:3] == ["small", "large", "huge"]  # one job of each first
    assert names[3:] == ["small"] * 4 + ["large", "small", "large", "huge"]  # then the fewest MPx run so far


def test_quality_large_composites_relative_coarse(tmp_path, shared):
    """make_composites.py with HxW sizes and --reference-side: the lowres mask is stored small, with
    the factor scaled to the long side, and refine accepts its aspect ratio."""
    from refine_cli.io.masks import check_mask_shape

    if not (shared / "data" / "photos").is_dir():
        pytest.skip("../shared/data/photos not found")
    out = tmp_path / "large"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_composites.py"), str(out),
                           "--n-shapes", "2", "--n-portraits", "0", "--size", "96x160", "200x120",
                           "--reference-side", "64", "--supersample", "2", "--cache-side", "256"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["args"]["sizes"] == [[96, 160], [200, 120]] and manifest["args"]["supersample"] == 2
    for case, (h, w) in zip(manifest["cases"], [(96, 160), (200, 120)], strict=True):
        assert case["size"] == [h, w]
        assert cv2.imread(str(out / case["case"] / "image.png")).shape == (h, w, 3)
        low = case["coarse"]["lowres"]
        assert low["factor"] == pytest.approx(low["relative_factor"] * max(h, w) / 64)
        small = cv2.imread(str(out / case["case"] / low["file"]), cv2.IMREAD_GRAYSCALE)
        assert list(small.shape) == low["stored_size"] and small.shape[0] < h
        check_mask_shape(small.shape, (h, w), "lowres")
        pert = out / case["case"] / case["coarse"]["cascadepsp"]["file"]
        assert cv2.imread(str(pert), cv2.IMREAD_GRAYSCALE).shape == (h, w)


def test_speed_benchmark_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed.py"), "--quick", "--sizes",
                           "0.25", "--methods", "coarse,guided", "--out", str(tmp_path / "out"), "--work",
                           str(tmp_path / "work")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "out" / "speed.json").read_text())
    assert res["mode"] == "quick"
    assert {(r["method"], r["skip"]) for r in res["runs"]} == {("coarse", True), ("coarse", False),
                                                               ("guided", True), ("guided", False)}
    for r in res["runs"]:
        assert r["status"] == "ok", r
        assert r["side"] == 512 and r["mpx_per_s"] > 0 and r["peak_rss_bytes"] > 50 * 2**20
        assert r["tiles"]["total"] >= 1
    no_skip = [r for r in res["runs"] if not r["skip"]]
    assert all(r["tiles"]["skipped"] == 0 for r in no_skip)
    assert not list((tmp_path / "work").glob("scene_*"))  # big inputs deleted
    if HAVE_MPL:
        assert (tmp_path / "out" / "speed.png").stat().st_size > 0
