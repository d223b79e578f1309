"""The do-no-harm guard: each rule on a constructed case, tile-cut independence, and the engine level."""

from __future__ import annotations

import numpy as np
import pytest

from refine_cli.refiners.guard import (
    ALL_CUT,
    GuardParams,
    boundary_distance,
    colour_level,
    colour_level_near,
    default_band,
    guard_window,
    nearest_components,
)
from refine_cli.tiling.grid import plan_grid


def disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.float32)


def test_boundary_distance_is_one_next_to_the_boundary_on_both_sides():
    fg = np.zeros((9, 9), bool)
    fg[:, 4:] = True
    d = boundary_distance(fg)
    assert d[0, 3] == 1 and d[0, 4] == 1
    assert d[0, 0] == pytest.approx(4, abs=0.1) and d[0, 8] == pytest.approx(5, abs=0.1)
    assert np.isinf(boundary_distance(np.ones((4, 4), bool))).all()


def test_a_boundary_shift_inside_the_band_is_kept_and_one_beyond_it_is_clipped():
    coarse = disc((200, 200), 100, 100, 30)   # a small object (bounding box under 96 px)
    inside = disc((200, 200), 100, 100, 40)   # 10 px out: within the 16 px band
    res = guard_window(inside, coarse, GuardParams(band=16))
    assert (res.prob == inside).all() and res.stats.pixels_held == 0
    assert res.stats.pixels_changed == int((inside != coarse).sum())
    wide = disc((200, 200), 100, 100, 70)     # 40 px out: pixels beyond 16 px are held back
    res = guard_window(wide, coarse, GuardParams(band=16))
    out = res.prob >= 0.5
    assert out.sum() == pytest.approx(disc((200, 200), 100, 100, 46).sum(), rel=0.03)
    assert res.stats.far == res.stats.pixels_held > 0
    big = disc((300, 300), 150, 150, 60)      # a large object may move twice as far (32 px)
    res = guard_window(disc((300, 300), 150, 150, 100), big, GuardParams(band=16))
    assert (res.prob >= 0.5).sum() == pytest.approx(disc((300, 300), 150, 150, 92).sum(), rel=0.03)


def test_a_hole_punched_into_the_interior_is_held_back_even_inside_the_band():
    coarse = disc((300, 300), 150, 150, 120)
    refined = coarse.copy()
    refined[140:150, 140:150] = 0           # a detached hole 100 px from the boundary
    refined[148:152, 40:44] = 0             # a small one 6-10 px inside: within a 16 px band, yet detached
    res = guard_window(refined, coarse, GuardParams(band=16))
    assert (res.prob == coarse).all()
    assert res.stats.pixels_held == 116 and res.stats.regions_detached >= 1
    assert res.stats.far + res.stats.detached == 116


def test_an_island_painted_into_the_background_is_held_back():
    coarse = disc((200, 200), 60, 60, 30)
    refined = coarse + disc((200, 200), 150, 150, 12)  # a "tree crown" far from the object
    res = guard_window(refined, coarse, GuardParams(band=200))  # inside the band, but detached
    assert (res.prob == coarse).all() and res.stats.regions_detached == 1


def test_a_deleted_small_object_is_restored_whole_and_a_large_one_is_not_judged():
    coarse = disc((200, 300), 60, 60, 15) + disc((200, 300), 100, 200, 80)
    refined = disc((200, 300), 100, 200, 80)  # the small object wiped out
    res = guard_window(refined, coarse, GuardParams(band=16, component=64))
    assert (res.prob == coarse).all()
    assert res.stats.components_restored == 1
    assert res.stats.restored == int(disc((200, 300), 60, 60, 15).sum())
    shrunk = disc((200, 300), 60, 60, 12) + disc((200, 300), 100, 200, 80)  # kept most of it: allowed
    assert (guard_window(shrunk, coarse, GuardParams(band=16, component=64)).prob == shrunk).all()


def test_a_filled_small_hole_of_the_coarse_mask_is_restored():
    coarse = disc((200, 200), 100, 100, 80) - disc((200, 200), 100, 100, 10)
    refined = disc((200, 200), 100, 100, 80)
    res = guard_window(refined, coarse, GuardParams(band=16, component=64))
    assert (res.prob == coarse).all() and res.stats.components_restored == 1


def test_changes_where_the_coarse_mask_is_unsure_are_allowed_at_any_distance():
    coarse = disc((200, 200), 100, 100, 40)
    coarse[150:190, 150:190] = 0.3           # a faint blob the low-res mask hints at
    refined = coarse.copy()
    refined[150:190, 150:190] = 1.0
    res = guard_window(refined, coarse, GuardParams(band=16))
    assert (res.prob == refined).all() and res.stats.pixels_held == 0


def blobs_image(noise: float, contrast: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A grey image of 12 discs of radius 8 (level ``contrast`` over 0.2) blurred by 1.5 px, with
    Gaussian noise of ``noise``: ``(image (256, 256, 3) uint8, exact mask (256, 256) float32)``."""
    import cv2

    mask = np.zeros((256, 256), np.float32)
    for i in range(12):
        mask = np.maximum(mask, disc((256, 256), 40 + 60 * (i // 4), 30 + 64 * (i % 4), 8))
    v = 0.2 + contrast * cv2.GaussianBlur(mask, (0, 0), 1.5)
    v = v + np.random.default_rng(seed).normal(0, noise, v.shape)
    return (np.clip(v, 0, 1)[..., None].repeat(3, -1) * 255).astype(np.uint8), mask


def test_noise_alone_is_no_evidence_for_moving_an_exact_boundary():
    import cv2

    image, exact = blobs_image(noise=0.06, contrast=0.12)  # dim blobs: noise half their contrast
    eroded = cv2.erode(exact, np.ones((3, 3), np.uint8)).astype(np.float32)  # a 1 px shrink
    res = guard_window(eroded, exact, GuardParams(band=16, fit=0.0), image=image)  # the noise rule alone
    assert res.stats.pixels_held >= 0.8 * res.stats.pixels_changed
    lax = guard_window(eroded, exact, GuardParams(band=16, noise=0.0, fit=0.0), image=image)
    assert lax.stats.pixels_held < 0.75 * res.stats.pixels_held  # the noise rule holds the difference


def test_a_boundary_moved_onto_a_clear_edge_passes_the_noise_rule():
    import cv2

    image, exact = blobs_image(noise=0.02, contrast=0.5)
    grown = cv2.dilate(exact, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))).astype(np.float32)
    res = guard_window(exact, grown, GuardParams(band=16), image=image)  # the coarse mask 2 px too wide
    assert res.stats.pixels_held <= 0.05 * res.stats.pixels_changed


def test_decisions_do_not_depend_on_the_tile_cut():
    rng = np.random.default_rng(3)
    shape = (700, 900)
    coarse = np.zeros(shape, np.float32)
    refined = np.zeros(shape, np.float32)
    for _ in range(60):  # objects the refiner shifts, deletes, or paints next to
        cy, cx, r = rng.uniform(0, 700), rng.uniform(0, 900), rng.uniform(4, 60)
        coarse = np.maximum(coarse, disc(shape, cy, cx, r))
        kind = rng.integers(4)
        if kind == 0:
            refined = np.maximum(refined, disc(shape, cy + rng.uniform(-8, 8), cx, r * rng.uniform(0.8, 1.3)))
        elif kind == 1:
            refined = np.maximum(refined, disc(shape, cy, cx + 2 * r + 10, r / 2))
        elif kind == 2:
            refined = np.maximum(refined, disc(shape, cy, cx, r * 2.5))
    params = GuardParams(band=12, component=48)
    whole = guard_window(refined, coarse, params, cut=(False, False, False, False))
    assert whole.stats.pixels_held > 1000 and whole.stats.components_restored > 3
    plan = plan_grid(shape, 256, 16, params.halo)
    out = np.full(shape, -1.0, np.float32)
    total = 0
    for tile in plan.tiles():
        rs = tile.read.slices
        core = plan.owned(tile).relative_to(tile.read)
        w = tile.read
        cut = (w.row > 0, w.row_end < shape[0], w.col > 0, w.col_end < shape[1])
        res = guard_window(refined[rs], coarse[rs], params, core.slices, cut=cut)
        total += res.stats.pixels_held
        out[plan.owned(tile).slices] = res.prob[core.slices]
    assert (out == whole.prob).all()
    assert total == whole.stats.pixels_held


def test_default_band_follows_the_mask_resolution():
    assert default_band(1) == 16
    assert default_band(8) == 16
    assert default_band(32) == 50


def test_aeroplane_keeps_its_interior_with_the_default_cascade(shared, tmp_path):
    """The bundled weights punch holes into the fuselage lettering and roundels; the guard keeps
    fewer than 0.1 % of the coarse interior pixels farther than 32 px from its boundary flipped."""
    import cv2

    from refine_cli.api import refine_file
    from refine_cli.config import RefineConfig
    from refine_cli.refiners.guard import boundary_distance

    img = shared / "data" / "cascadepsp-samples" / "aeroplane.jpg"
    msk = shared / "data" / "cascadepsp-samples" / "aeroplane_coarse.png"
    rep = refine_file(str(img), str(msk), str(tmp_path / "out.png"), config=RefineConfig(method="cascade"))
    coarse = cv2.imread(str(msk), cv2.IMREAD_GRAYSCALE) >= 128
    out = cv2.imread(str(tmp_path / "out.png"), cv2.IMREAD_GRAYSCALE) >= 128
    deep = coarse & (boundary_distance(coarse) > 32)
    flipped = (deep & ~out).sum() / deep.sum()
    assert flipped < 0.001, f"{100 * flipped:.3f} % of the deep interior flipped"
    g = rep.guard
    assert g["state"] == "on" and g["pixels_changed"] > g["pixels_held"] > 0
    assert (out != coarse).sum() > 10_000  # it still refines the boundary
    assert any(n.startswith("guard: kept the coarse mask") for n in rep.notes)


def test_the_engine_guard_equals_the_rules_on_the_whole_image(tmp_path):
    """Known answer: a guarded run, tiled, equals :func:`guard_window` applied to the unguarded run's
    probability over the whole image; the uncertainty is 255 exactly where a change was held back, and
    the report counts them."""
    import cv2
    import tifffile
    from conftest import write_png

    from refine_cli.api import refine_file
    from refine_cli.config import GuidedOptions, RefineConfig
    from refine_cli.devtools.synthetic import random_scene
    from refine_cli.tiling.grid import Window

    shape = (700, 900)
    sc = random_scene(shape, 9, seed=21, size=120)
    image = sc.image(Window(0, 0, *shape))
    write_png(tmp_path / "img.png", image)
    gt = sc.gt(Window(0, 0, *shape)).astype(np.float32)
    coarse = gt.copy()
    coarse[300:340, 420:470] = 1.0 - coarse[300:340, 420:470]  # a wrong block the refiner may fix
    cv2.imwrite(str(tmp_path / "coarse.png"), np.round(coarse * 255).astype(np.uint8))
    kw = dict(soft=True, tile_size=256, guided=GuidedOptions(radius=24))
    refine_file(str(tmp_path / "img.png"), str(tmp_path / "coarse.png"), str(tmp_path / "raw.tif"),
                config=RefineConfig(guard="off", **kw))
    rep = refine_file(str(tmp_path / "img.png"), str(tmp_path / "coarse.png"), str(tmp_path / "g.tif"),
                      config=RefineConfig(**kw), uncertainty=str(tmp_path / "unc.tif"))
    raw = tifffile.imread(tmp_path / "raw.tif")
    guarded = tifffile.imread(tmp_path / "g.tif")
    unc = tifffile.imread(tmp_path / "unc.tif")
    c = cv2.imread(str(tmp_path / "coarse.png"), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
    want = guard_window(raw, c, GuardParams(band=16), image=image, cut=(False, False, False, False))
    assert want.stats.pixels_held > 0
    np.testing.assert_array_equal(guarded >= 0.5, want.prob >= 0.5)
    assert (unc[want.held] == 255).all()
    g = rep.guard
    assert g["state"] == "on" and g["tiles"] > 1
    assert g["pixels_held"] == want.stats.pixels_held and g["pixels_changed"] == want.stats.pixels_changed


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_objects", [False, True])
def test_colour_evidence_near_the_changes_equals_the_whole_window(seed, with_objects):
    """The cropped computation gives colour_level's level and known within the radius of every change and its
    spread at the changes (exactly in float32; the float64 spread of the small-object path within 1e-12)."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w, radius = 300 + 37 * seed, 410 - 21 * seed, 6 + 5 * seed
    image = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)
    c_fg = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 12) > 0.5
    ring = cv2.dilate(c_fg.astype(np.uint8), np.ones((7, 7), np.uint8)) != cv2.erode(
        c_fg.astype(np.uint8), np.ones((7, 7), np.uint8))
    changed = ring & (rng.random((h, w)) < 0.4)
    changed[rng.integers(0, h, 20), rng.integers(0, w, 20)] = True  # a few far away, in other strips
    objects = None
    if with_objects:
        comp, large = nearest_components(c_fg, 40, ALL_CUT)
        objects = (comp, ~large)
    full = colour_level(image, c_fg, changed, radius, objects)
    near = colour_level_near(image, c_fg, changed, radius, objects)
    reach = cv2.dilate(changed.astype(np.uint8), np.ones((2 * radius + 1,) * 2, np.uint8)).astype(bool)
    assert np.array_equal(full[0][reach], near[0][reach])
    assert np.array_equal(full[1][reach], near[1][reach])
    assert near[2].dtype == full[2].dtype
    if with_objects:
        np.testing.assert_allclose(near[2][changed], full[2][changed], rtol=1e-12, atol=1e-15)
    else:
        assert np.array_equal(full[2][changed], near[2][changed])
    nothing = colour_level_near(image, c_fg, np.zeros_like(changed), radius, objects)
    assert not nothing[1].any() and (nothing[0] == 0.5).all()


def test_all_large_components_skip_the_nearest_labels_with_the_same_result():
    """When every coarse component is large, the band map and the colour levels equal those computed from
    the true nearest-component labels (the shortcut only skips the distance transform)."""
    import cv2

    from refine_cli.refiners.guard import band_map, nearest_labels

    rng = np.random.default_rng(3)
    h, w = 260, 330
    image = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)
    c_fg = np.zeros((h, w), bool)
    c_fg[20:200, 30:140] = True  # two large objects
    c_fg[60:240, 180:320] = True
    c_fg[100:120, 60:100] = False  # with a hole
    changed = (cv2.dilate(c_fg.astype(np.uint8), np.ones((7, 7), np.uint8)) != cv2.erode(
        c_fg.astype(np.uint8), np.ones((7, 7), np.uint8))) & (rng.random((h, w)) < 0.4)
    params = GuardParams(band=6.0, component=40)
    comp, large = nearest_components(c_fg, 40, ALL_CUT)
    assert (comp == 1).all() and large[1:].all()
    _, labels = cv2.connectedComponents(c_fg.astype(np.uint8), connectivity=8)
    true = nearest_labels(c_fg, labels.astype(np.int32))
    assert np.array_equal(band_map(c_fg, params, ALL_CUT, (comp, large)),
                          band_map(c_fg, params, ALL_CUT, (true, large)))
    fast = colour_level_near(image, c_fg, changed, 6, (comp, ~large))
    slow = colour_level_near(image, c_fg, changed, 6, (true, ~large))
    for a, b in zip(fast, slow, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_a_boundary_moved_off_the_edge_fits_worse_and_is_held_back():
    """The worse-fit rule on its own: a 1 px shift of an exact boundary onto weaker steps, either way."""
    import cv2

    from refine_cli.refiners.guard import worse_fit

    image, exact = blobs_image(noise=0.03, contrast=0.4)
    c_fg = exact >= 0.5
    k = np.ones((3, 3), np.uint8)
    for moved in (cv2.erode(exact, k), cv2.dilate(exact, k)):
        changed = (moved >= 0.5) != c_fg
        held = worse_fit(image, c_fg, changed, fit=1.3, cell=32)
        assert held.sum() >= 0.95 * changed.sum()
    # the other way round, the coarse boundary 2 px off and the change onto the edge, it passes
    grown = cv2.dilate(exact, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))) >= 0.5
    changed = grown != c_fg
    assert worse_fit(image, grown, changed, fit=1.3, cell=32).sum() <= 0.05 * changed.sum()
    # through the guard (the colour rules relaxed so that they let it pass), counted as misfit; fit 0
    # turns the rule off
    eroded = cv2.erode(exact, k).astype(np.float32)
    lax = {"band": 16, "noise": 0.0, "margin": 1.0, "aligned": 2.0, "thin": 0.0}
    res = guard_window(eroded, exact, GuardParams(**lax), image=image)
    assert res.stats.unsupported == 0 and res.stats.misfit >= 0.95 * res.stats.pixels_changed
    off = guard_window(eroded, exact, GuardParams(**lax, fit=0.0), image=image)
    assert off.stats.misfit == 0 and off.stats.pixels_held == 0


def test_decisions_with_the_image_do_not_depend_on_the_tile_cut():
    import cv2

    image, exact = blobs_image(noise=0.05, contrast=0.3, seed=4)
    image = np.tile(image, (3, 4, 1))[:700, :900]
    coarse = np.tile(exact, (3, 4))[:700, :900]
    rng = np.random.default_rng(5)
    wobble = rng.random(coarse.shape) < 0.5  # each boundary pixel moved in or out at random
    grown = cv2.dilate(coarse, np.ones((3, 3), np.uint8))
    shrunk = cv2.erode(coarse, np.ones((3, 3), np.uint8))
    refined = np.where(wobble, grown, shrunk).astype(np.float32)
    params = GuardParams(band=8, component=40, fit=1.3, fit_cell=24)
    whole = guard_window(refined, coarse, params, image=image, cut=(False, False, False, False))
    assert whole.stats.misfit > 100
    plan = plan_grid(coarse.shape, 200, 16, params.halo)
    out = np.full(coarse.shape, -1.0, np.float32)
    for tile in plan.tiles():
        rs, w = tile.read.slices, tile.read
        core = plan.owned(tile).relative_to(tile.read)
        cut = (w.row > 0, w.row_end < 700, w.col > 0, w.col_end < 900)
        res = guard_window(refined[rs], coarse[rs], params, core.slices, image=image[rs], cut=cut,
                           origin=(w.row, w.col))
        out[plan.owned(tile).slices] = res.prob[core.slices]
    assert (out == whole.prob).all()
