"""--method cascade end to end: weights resolution, exact vs streamed paths, levels, label maps, budget."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import tifffile

from cascade_fixtures import tiny_cascade_weights
from conftest import write_png
from refine_cli.api import refine_file
from refine_cli.config import CascadeOptions, RefineConfig
from refine_cli.devtools.synthetic import random_scene
from refine_cli.errors import BudgetError, UsageError, WeightsError
from refine_cli.tiling.grid import Window


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_cascade_weights(tmp_path_factory.mktemp("w"))


def make_scene(d, shape, seed):
    sc = random_scene(shape, 6, seed=seed, size=min(shape) / 7)
    write_png(d / "img.png", sc.image(Window(0, 0, *shape)))
    cv2.imwrite(str(d / "coarse.png"), sc.coarse(8))
    return d


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """900 x 1200: at L = 200 the streamed path has two levels."""
    return make_scene(tmp_path_factory.mktemp("cscene"), (900, 1200), 8)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """450 x 600: at L = 400 the exact path needs only a few local patches (fast on a CPU)."""
    return make_scene(tmp_path_factory.mktemp("csmall"), (450, 600), 9)


def run(d, tmp_path, tiny, name, soft=False, max_memory=None, guard="on", **cascade):
    cfg = RefineConfig(method="cascade", max_memory=max_memory or 4 << 30, soft=soft, guard=guard,
                       cascade=CascadeOptions(weights=str(tiny), **{"size": 200, "snap": "off", **cascade}))
    out = tmp_path / f"{name}.tif"
    rep = refine_file(str(d / "img.png"), str(d / "coarse.png"), str(out), config=cfg,
                      report=str(tmp_path / f"{name}.json"))
    return tifffile.imread(out), rep


def test_exact_and_streamed_paths(scene, small, tmp_path, tiny):
    exact, rex = run(small, tmp_path, tiny, "exact", exact=True, size=400)
    streamed, rst = run(scene, tmp_path, tiny, "streamed", exact=False)
    assert rex.refiner["mode"] == "exact" and rst.refiner["mode"] == "streamed"
    assert exact.shape == (450, 600) and streamed.shape == (900, 1200)
    assert set(np.unique(exact)) <= {0, 255} and set(np.unique(streamed)) <= {0, 255}
    assert rex.refiner["patches"] >= rex.refiner["patches_processed"] > 0
    # 200 -> 1200 is a 6x upscale: two levels of at most 5x each
    assert [lv["width"] for lv in rst.levels] == [490, 1200]
    assert rst.tiles["skipped"] > 0 and rst.tiles["refined"] > 0
    assert rex.refiner["weights_sha256"] == json.loads(tiny.with_suffix(".json").read_text())["sha256"]
    assert any("exact path" in n for n in rex.notes) and any("streamed path" in n for n in rst.notes)


def test_fast_streamed_and_auto_choice(scene, small, tmp_path, tiny):
    fast, rep = run(scene, tmp_path, tiny, "fast", exact=False, fast=True)
    assert rep.refiner["fast"] is True and len(rep.levels) == 1
    _, auto = run(small, tmp_path, tiny, "auto", size=400, fast=True)
    assert auto.refiner["mode"] == "exact"  # a small image fits 4 GiB


def test_small_image_always_takes_the_exact_path(tmp_path, tiny):
    sc = random_scene((150, 180), 2, seed=1, size=30)
    write_png(tmp_path / "img.png", sc.image(Window(0, 0, 150, 180)))
    cv2.imwrite(str(tmp_path / "coarse.png"), sc.coarse(2))
    _, rep = run(tmp_path, tmp_path, tiny, "small", exact=False)
    assert rep.refiner["mode"] == "exact"


def test_label_map_through_both_paths(tmp_path, tiny):
    sc = random_scene((450, 600), 6, seed=2, size=70)
    labels = np.zeros((450, 600), np.uint8)
    y, x = np.arange(450)[:, None] + 0.5, np.arange(600)[None, :] + 0.5
    for i, sh in enumerate(sc.shapes):
        labels[sh.sdf(y, x) < 0] = 1 + i % 3
    write_png(tmp_path / "img.png", sc.image(Window(0, 0, 450, 600)))
    cv2.imwrite(str(tmp_path / "coarse.png"), cv2.resize(labels, (150, 113), interpolation=cv2.INTER_NEAREST))
    for exact in (True, False):
        out, rep = run(tmp_path, tmp_path, tiny, f"lab{exact}", exact=exact, size=400 if exact else 200)
        assert rep.mask["kind"] == "labels" and set(np.unique(out)) <= {0, 1, 2, 3}
        assert rep.tiles["refiner_calls"] >= 1


def test_budget_too_small_names_the_flags(scene, tmp_path, tiny):
    cfg = RefineConfig(method="cascade", max_memory=512 << 20,
                       cascade=CascadeOptions(weights=str(tiny), size=900, exact=True))
    with pytest.raises(BudgetError, match="--cascade-size 900.*--max-memory"):
        refine_file(str(scene / "img.png"), str(scene / "coarse.png"), str(tmp_path / "o.tif"), config=cfg)


def test_missing_weights_file(scene, tmp_path):
    cfg = RefineConfig(method="cascade", cascade=CascadeOptions(weights=str(tmp_path / "nope.pt")))
    with pytest.raises(WeightsError, match="not found"):
        refine_file(str(scene / "img.png"), str(scene / "coarse.png"), str(tmp_path / "o.tif"), config=cfg)


def test_streamed_official_grid_equals_the_exact_path(small, tmp_path, tiny):
    """The streamed cascade on the official grid and skip rule (the defaults) reproduces the exact
    (whole-image) procedure: same global step, same patches, same trims and averaging."""
    exact, rex = run(small, tmp_path, tiny, "ex", exact=True, size=400, soft=True)
    streamed, rst = run(small, tmp_path, tiny, "st", exact=False, size=400, soft=True)
    assert rex.refiner["mode"] == "exact" and rst.refiner["mode"] == "streamed"
    assert rex.refiner["patches_processed"] > 0
    assert exact.dtype == np.float32 and 0.01 < float(exact.mean()) < 0.99
    # equal to float rounding, except isolated pixels where a binarised input (seg = up(pred) > 0.5)
    # sits at 0.5 and the two paths' resampling rounds it to different sides
    off = np.abs(streamed - exact) > 1e-4
    assert int(off.sum()) <= exact.size * 1e-4, np.argwhere(off)[:10].tolist()
    assert float(np.abs(streamed - exact).mean()) < 1e-4


def test_cascade_pad_follows_the_weights_unless_forced(small, tmp_path, tiny):
    """``--cascade-pad auto`` takes the architecture's convention (lite: replicate), the flag forces
    one, and the report says which ran (``safe_forward`` tests check what each mode feeds the network)."""
    _, rep = run(small, tmp_path, tiny, "pad_auto", exact=True, size=404, fast=True)
    assert rep.refiner["size"] == 404  # an explicit --cascade-size wins over the weights' own
    _, rep_o = run(small, tmp_path, tiny, "pad_off", exact=False, fast=True, pad="official")
    assert rep.refiner["pad"] == "replicate" and rep_o.refiner["pad"] == "official"
    with pytest.raises(UsageError, match="--cascade-pad 'zero'"):
        RefineConfig(method="cascade", cascade=CascadeOptions(pad="zero"))


def test_edge_snap_is_a_tiled_last_level(scene, tmp_path, tiny):
    """``--cascade-snap auto`` is on for the lite architecture: one more full-resolution level whose
    tiles (halo 17 px) give the guided filter of the cascade's own result; ``off`` and label maps
    have no such level, and the report says which ran."""
    from refine_cli.refiners.classical import guided_filter

    plain, rep_off = run(scene, tmp_path, tiny, "snap_off", exact=True, size=400, soft=True, guard="off")
    snapped, rep_on = run(scene, tmp_path, tiny, "snap_on", exact=True, size=400, soft=True, snap="auto",
                          guard="off")
    assert rep_off.refiner["snap"] == "off" and len(rep_off.levels) == 1
    assert rep_on.refiner["snap"] == {"radius": 8, "eps": 1e-4, "halo": 17}
    assert [lv["width"] for lv in rep_on.levels] == [1200, 1200] and rep_on.levels[1]["tiles"] > 1
    image = cv2.cvtColor(cv2.imread(str(scene / "img.png")), cv2.COLOR_BGR2RGB)
    direct = np.clip(guided_filter(image, plain, 8, 1e-4), 0, 1)
    # tiles whose input lies on one side of 0.5 (with their halo) are copied, not filtered: the
    # masks agree everywhere, the probabilities wherever the filter ran
    assert ((snapped >= 0.5) == (direct >= 0.5)).all()
    filtered = snapped != plain
    assert filtered.mean() > 0.05
    assert float(np.abs(snapped - direct)[filtered].max()) < 1e-5
    with pytest.raises(UsageError, match="--cascade-snap 'yes'"):
        RefineConfig(method="cascade", cascade=CascadeOptions(snap="yes"))


@pytest.fixture(scope="module")
def jpeg_scene(tmp_path_factory):
    """A 700 x 1100 JPEG (decoded whole into memory) with a 1/8 coarse mask: at a 512 MiB budget the
    old estimate of the exact path (40 B/px) accepted it, the engine's plan (the whole image as one
    square tile) does not."""
    d = tmp_path_factory.mktemp("cjpeg")
    sc = random_scene((700, 1100), 5, seed=11, size=100)
    cv2.imwrite(str(d / "img.jpg"), cv2.cvtColor(sc.image(Window(0, 0, 700, 1100)), cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(d / "coarse.png"), sc.coarse(8))
    return d


@pytest.mark.parametrize(("budget", "mode"), [(512 << 20, "streamed"), (4 << 30, "exact")])
def test_automatic_path_fits_the_budget_for_a_decoded_jpeg(jpeg_scene, tmp_path, tiny, budget, mode):
    """Without --exact/--streamed the path follows the engine's own memory plan: the exact path only
    when the engine accepts the whole image as one tile, else the streamed one, and the report says
    which ran and why (a 6000 x 4000 JPEG at the default budget used to stop with 'raise --max-memory')."""
    cfg = RefineConfig(method="cascade", max_memory=budget,
                       cascade=CascadeOptions(weights=str(tiny), size=200, snap="off", fast=True))
    rep = refine_file(str(jpeg_scene / "img.jpg"), str(jpeg_scene / "coarse.png"), str(tmp_path / "o.tif"),
                      config=cfg)
    assert rep.refiner["mode"] == mode
    note = next(n for n in rep.notes if n.startswith("cascade:"))
    assert f"{mode} path" in note
    assert ("above --max-memory" if mode == "streamed" else "of --max-memory") in note
    assert rep.memory_plan["estimate_bytes"] <= budget
    # known answer: the mask equals the one of the path forced by flag
    forced = RefineConfig(method="cascade", max_memory=4 << 30,
                          cascade=CascadeOptions(weights=str(tiny), size=200, snap="off", fast=True,
                                                 exact=mode == "exact"))
    refine_file(str(jpeg_scene / "img.jpg"), str(jpeg_scene / "coarse.png"), str(tmp_path / "f.tif"),
                config=forced)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "o.tif"), tifffile.imread(tmp_path / "f.tif"))


@pytest.mark.parametrize("exact", [True, False])
def test_every_long_step_reports_progress(small, scene, tmp_path, tiny, exact):
    """The global step, the local patches of the exact path, every level's tiles, the edge snap and
    the guard each report progress (the exact path used to show one tile for its whole run)."""
    seen: list[tuple[str, int, int]] = []
    d = small if exact else scene
    cfg = RefineConfig(method="cascade", cascade=CascadeOptions(weights=str(tiny), size=400 if exact else 200,
                                                                snap="on", exact=exact, fast=not exact))
    refine_file(str(d / "img.png"), str(d / "coarse.png"), str(tmp_path / "o.tif"), config=cfg,
                progress=lambda *a: seen.append(a))
    stages = list(dict.fromkeys(s for s, _, _ in seen))
    assert stages[0] == "cascade global step"
    assert ("cascade global step", 1, 1) in seen
    if exact:
        local = [(d, t) for s, d, t in seen if s == "cascade local patches"]
        assert len(local) >= 2 and local[-1][0] == local[-1][1] > 0
    last = stages[-1]
    n_levels = len([s for s in stages if "tiles" in s])
    assert last.endswith("guard tiles") and last.startswith(f"level {n_levels}/")
    assert stages[-2].endswith("snap tiles")
    done = [(d, t) for s, d, t in seen if s == last]
    assert done[-1][0] == done[-1][1] > 0


@pytest.mark.parametrize(("budget", "snap"), [(512 << 20, "off"), (4 << 30, "off"), (512 << 20, "on")])
def test_dry_run_plans_the_path_and_levels_the_run_takes(jpeg_scene, tmp_path, tiny, budget, snap):
    """``refine batch --dry-run`` foresees the path (exact or streamed, chosen by the budget), every level
    and the edge snap without running the network: its estimate is the run's own, byte for byte."""
    from refine_cli.batch import OutputOptions, plan_file_memory

    cfg = RefineConfig(method="cascade", max_memory=budget,
                       cascade=CascadeOptions(weights=str(tiny), size=200, snap=snap, fast=False))
    img, mask = str(jpeg_scene / "img.jpg"), str(jpeg_scene / "coarse.png")
    planned = plan_file_memory(img, cfg, OutputOptions(), mask=mask)
    rep = refine_file(img, mask, str(tmp_path / "o.tif"), config=cfg)
    assert len(rep.levels) > (1 if budget < 1 << 30 else 0)
    assert planned.total == rep.memory_plan["estimate_bytes"] <= budget


def test_overview_loss_tells_small_objects_from_large_ones():
    from refine_cli.refiners.cascade_stream import overview_loss

    yy, xx = np.mgrid[:640, :640]
    disk = ((yy - 320) ** 2 + (xx - 320) ** 2 < 200 ** 2).astype(np.float32)
    dots = np.zeros((640, 640), np.float32)
    dots[::8, ::8] = 0.2  # objects a fifth of an overview pixel in area
    assert overview_loss(disk) == 0.0  # already binary at the overview
    assert overview_loss(cv2.blur(disk, (3, 3))) < 0.01
    assert overview_loss(dots) == pytest.approx(1.0)
    assert overview_loss(np.zeros((8, 8), np.float32)) == 0.0


def many_objects(d, shape, mask_shape, seed=4):
    """Dark image with ~600 bright dots of 4-7 px radius; the mask is the dots at ``mask_shape``."""
    rng = np.random.default_rng(seed)
    img = rng.integers(20, 60, (*shape, 3)).astype(np.uint8)
    fg = np.zeros(shape, np.uint8)
    for _ in range(600):
        y, x, r = int(rng.integers(8, shape[0] - 8)), int(rng.integers(8, shape[1] - 8)), int(rng.integers(4, 8))
        cv2.circle(fg, (x, y), r, 255, -1)
    img[fg > 0] = (200, 190, 180)
    write_png(d / "img.png", img)
    cv2.imwrite(str(d / "coarse.png"), cv2.resize(fg, mask_shape[::-1], interpolation=cv2.INTER_AREA))
    return d


@pytest.mark.parametrize("mask_shape, levels", [((1200, 1600), [1600]), ((600, 800), [1600])])
def test_streamed_levels_start_from_a_mask_the_overview_cannot_show(tmp_path, tiny, mask_shape, levels):
    d = many_objects(tmp_path, (1200, 1600), mask_shape)
    out, rep = run(d, tmp_path, tiny, "anchored", exact=False, skip="boundary")
    anchor = rep.refiner["anchor"]
    assert anchor["mask_shape"] == list(mask_shape) and anchor["overview_loss"] > 0.5
    assert [lv["width"] for lv in rep.levels][:len(levels)] == levels
    assert rep.levels[0]["refined"] > 0
    assert any("levels start from the mask" in n for n in rep.notes)
    # the guard keeps the objects the random tiny network may lose: most of the mask survives
    mask = cv2.resize(cv2.imread(str(d / "coarse.png"), 0), (1600, 1200), interpolation=cv2.INTER_LINEAR) >= 128
    got = out >= 128
    assert (got & mask).sum() / max(1, (got | mask).sum()) > 0.7


def test_streamed_levels_keep_the_global_step_for_large_objects(scene, tmp_path, tiny):
    _, rep = run(scene, tmp_path, tiny, "global", exact=False)
    assert rep.refiner["anchor"] is None
    assert not any("levels start from the mask" in n for n in rep.notes)
