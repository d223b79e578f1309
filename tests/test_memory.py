"""Bounded memory: a 20,000 x 20,000 image refines in a subprocess under 1.5 GB of peak RSS.

The image is a compressed tiled TIFF written tile by tile (a few shapes, so most
tiles are uniform), the coarse mask is at 1/16 resolution, and the ground truth
is analytic, so the result is also checked for quality without ever holding the
image in memory.
"""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tifffile
from conftest import session_folder

from refine_cli.devtools.synthetic import random_scene, write_tiled
from refine_cli.evaluate import EvalOptions, evaluate_streamed
from refine_cli.io.masks import MaskSource
from refine_cli.io.readers import open_raster
from refine_cli.tiling.grid import Window

SIDE = 20_000
LIMIT = 1.5 * 1024**3
# The launcher reports the child's own peak RSS (RUSAGE_CHILDREN of a process that ran only it).
LAUNCH = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
          "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(rc)")


def _scene_folder(tmp_path_factory, name: str, scene):
    """The scene's tiled TIFF and 1/16 coarse mask, written once per session (shared by the workers)."""

    def make(d):
        write_tiled(scene, str(d / "big.tif"))
        cv2.imwrite(str(d / "coarse.png"), scene.coarse(16))

    return session_folder(tmp_path_factory, name, make), scene


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return _scene_folder(tmp_path_factory, "big", random_scene((SIDE, SIDE), 6, seed=3, size=1200))


def run_measured(args: list[str]) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-c", LAUNCH, sys.executable, "-m", "refine_cli", *args],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.parametrize("method", ["guided"])
def test_gigapixel_class_run_is_memory_bounded_and_better_than_coarse(big, tmp_path, method):
    d, scene = big
    out, rep_path = tmp_path / "out.tif", tmp_path / "rep.json"
    rss, _ = run_measured(["run", str(d / "big.tif"), "--mask", str(d / "coarse.png"), "-o", str(out),
                           "--method", method, "--report", str(rep_path), "-q"])
    rep = json.loads(rep_path.read_text())
    assert rss < LIMIT, f"peak RSS {rss / 2**20:.0f} MiB"
    assert rep["peak_rss_bytes"] < LIMIT
    assert rep["tiles"]["skipped"] > rep["tiles"]["refined"] > 0  # boundary-only processing
    with tifffile.TiffFile(out) as tf:
        page = tf.pages[0]
        assert (page.imagelength, page.imagewidth) == (SIDE, SIDE)
        assert page.is_tiled and tf.is_bigtiff

    opts = EvalOptions(radii=(1, 3, 6, 12, 24))
    with open_raster(out, max_pixels=10**12, inline_limit=1) as r_out, \
            open_raster(d / "coarse.png", max_pixels=10**12, inline_limit=10**12) as r_co:
        coarse = MaskSource(r_co, (SIDE, SIDE))
        refined_m = evaluate_streamed(lambda w: r_out.read(w)[..., 0], scene.gt, (SIDE, SIDE), 4096, opts)
        coarse_m = evaluate_streamed(lambda w: coarse.read(w) >= 0.5, scene.gt, (SIDE, SIDE), 4096, opts)
    assert refined_m.iou > coarse_m.iou
    assert refined_m.mba > coarse_m.mba + 0.05


def test_gigapixel_magnet_fast_runs_tiled_in_bounded_memory(big, tmp_path):
    """``--method magnet-fast`` on the 20k x 20k image: the tiled pipeline (no mask: the segmenter makes
    stage-1 Y), a tiny TorchScript segmenter and fill-rule 2-class refinement weights. One torch
    thread: on shared CPUs two threads spend most of their time waiting for each other."""
    from magnet_fixtures import write_fill_checkpoint, write_torchscript_segmenter

    d, _ = big
    seg = write_torchscript_segmenter(tmp_path, classes=2, size=(256, 256))
    weights = write_fill_checkpoint(tmp_path / "refine_c2.pth", classes=2)
    out, rep_path = tmp_path / "out.tif", tmp_path / "rep.json"
    rss, _ = run_measured(["run", str(d / "big.tif"), "-o", str(out), "--method", "magnet-fast",
                           "--segmenter", str(seg), "--weights", str(weights), "--report", str(rep_path),
                           "--threads", "1", "--max-memory", "1536M", "-q"])
    rep = json.loads(rep_path.read_text())
    assert rss < LIMIT, f"peak RSS {rss / 2**20:.0f} MiB"
    assert rep["peak_rss_bytes"] < LIMIT
    magnet = rep["refiner"]["magnet"]
    assert rep["refiner"]["tiled"] and magnet["tiled"]["store_dtype"] == "float32"
    scales = [tuple(s["scale"]) for s in magnet["stages"]]
    assert scales[0] == (256, 256) and scales[-1] == (SIDE, SIDE) and len(scales) == 8
    refined = magnet["stages"][1:]
    assert all(len(s["patches"]) == 3 and s["points"] <= s["k"] == 2**16 for s in refined)  # Q > 0 only
    assert "level" in magnet["tiled"]["stage_images"].values()  # the coarsest scales come from a built level
    with tifffile.TiffFile(out) as tf:
        page = tf.pages[0]
        assert (page.imagelength, page.imagewidth) == (SIDE, SIDE)
        assert page.is_tiled and tf.is_bigtiff
    with open_raster(out, max_pixels=10**12, inline_limit=1) as r_out:
        values = np.unique(np.concatenate([r_out.read(Window(r, c, 512, 512)).ravel()
                                           for r in range(0, SIDE, 4000) for c in range(0, SIDE, 4000)]))
    assert set(values.tolist()) <= {0, 255}


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    """An 8,000 x 8,000 scene: the exact cascade would need ~2.5 GB (40 B/px), the streamed one must not."""
    return _scene_folder(tmp_path_factory, "mid", random_scene((8000, 8000), 6, seed=3, size=480))


@pytest.mark.parametrize("side", [8000, pytest.param(SIDE, marks=pytest.mark.slow)])
def test_streamed_cascade_is_memory_bounded(request, side, tmp_path):
    """``--method cascade --streamed``: global step on an overview, then the pyramid levels tile by
    tile on the official patch grid. A minute lite model (random weights) keeps the forward passes
    cheap: the test is about the streaming, not the network. CI runs 8k (~1 min); 20k is ``-m slow``
    (~7 min on 2 loaded cores; passed under the same limit)."""
    import torch

    from refine_cli.train import trainer as T

    torch.manual_seed(0)
    model = T.build_model("cascadepsp-lite", T.TINY["arch_params"])
    weights = tmp_path / "tiny.pt"
    T.export_weights(model, weights, {"arch": "cascadepsp-lite", "arch_params": T.TINY["arch_params"]})
    d, _ = request.getfixturevalue("mid" if side == 8000 else "big")
    out, rep_path = tmp_path / "out.tif", tmp_path / "rep.json"
    rss, _ = run_measured(["run", str(d / "big.tif"), "--mask", str(d / "coarse.png"), "-o", str(out),
                           "--method", "cascade", "--streamed", "--weights", str(weights), "--cascade-size", "512",
                           "--report", str(rep_path), "--threads", "1", "-q"])
    rep = json.loads(rep_path.read_text())
    assert rss < LIMIT, f"peak RSS {rss / 2**20:.0f} MiB"
    levels = rep["levels"]
    assert len(levels) >= 2 and (levels[-1]["height"], levels[-1]["width"]) == (side, side)
    assert levels[-1]["skipped"] > levels[-1]["refined"] > 0  # only boundary patches run at full resolution
    with tifffile.TiffFile(out) as tf:
        page = tf.pages[0]
        assert (page.imagelength, page.imagewidth) == (side, side)
        assert page.is_tiled and tf.is_bigtiff
