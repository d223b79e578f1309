"""Scene families (aerial, cells, thin): window exactness, ground truth, detector masks, samples (CPU)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from refine_cli.errors import UsageError
from refine_cli.tiling.grid import Window
from refine_cli.train import data as D
from refine_cli.train.scenes import FAMILIES, SceneGenerator, SceneWindow

WINDOWS = [
    Window(0, 0, 1, 1),
    Window(37, 101, 129, 257),
    Window(300, 500, 212, 268),
    Window(511, 0, 1, 768),
    Window(3, 700, 500, 67),
    Window(200, 333, 77, 5),
]


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small synthetic 'photos' (smooth colour noise), so no shared data is needed."""
    root = tmp_path_factory.mktemp("scene-photos")
    rng = np.random.default_rng(5)
    for i, (h, w) in enumerate([(240, 320), (300, 200), (256, 256)]):
        small = rng.uniform(0, 255, (h // 12 + 2, w // 12 + 2, 3)).astype(np.float32)
        im = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 10, (h, w, 3))
        cv2.imwrite(str(root / f"p{i}.png"), np.clip(im, 0, 255).astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def bank(photo_dir: Path) -> D.PhotoBank:
    return D.PhotoBank(photo_dir, cache_side=256)


class _Big(dict):
    """One whole 1024 x 1024 scene per family (procedural textures, debug layers), rendered on first use."""

    def __missing__(self, family: str) -> SceneWindow:
        self[family] = SceneGenerator(family, (1024, 1024), 11).render(Window(0, 0, 1024, 1024), layers=True)
        return self[family]


@pytest.fixture(scope="module")
def big() -> dict[str, SceneWindow]:
    return _Big()


def _check_window(sw: SceneWindow, shape: tuple[int, int]) -> None:
    assert sw.image.shape == (*shape, 3) and sw.image.dtype == np.uint8
    for m in (sw.gt, sw.detector):
        assert m.shape == shape and m.dtype == np.float32
        assert np.isfinite(m).all() and m.min() >= 0.0 and m.max() <= 1.0


# ------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("with_photos", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_window_equals_crop_of_full_render(family: str, with_photos: bool, bank: D.PhotoBank) -> None:
    photos = bank if with_photos else None
    full = SceneGenerator(family, (512, 768), 5, photos).render(Window.full((512, 768)), layers=True)
    _check_window(full, (512, 768))
    assert (full.gt >= 0.5).any() and (full.detector >= 0.5).any()
    fresh = SceneGenerator(family, (512, 768), 5, photos)  # nothing cached from the full render
    for win in WINDOWS:
        sw = fresh.render(win, layers=True)
        _check_window(sw, win.shape)
        assert np.array_equal(sw.image, full.image[win.slices]), win
        assert np.array_equal(sw.gt, full.gt[win.slices]), win
        assert np.array_equal(sw.detector, full.detector[win.slices]), win
        assert sw.layers.keys() == full.layers.keys()
        for name, layer in sw.layers.items():
            assert np.array_equal(layer, full.layers[name][win.slices]), (name, win)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiles_assemble_to_the_full_render(family: str) -> None:
    full = SceneGenerator(family, (300, 420), 2).render(Window.full((300, 420)))
    gen = SceneGenerator(family, (300, 420), 2)  # one generator for all tiles, as a writer would use
    image = np.zeros_like(full.image)
    gt = np.zeros_like(full.gt)
    for r in range(0, 300, 128):
        for c in range(0, 420, 128):
            win = Window(r, c, min(128, 300 - r), min(128, 420 - c))
            sw = gen.render(win)
            image[win.slices], gt[win.slices] = sw.image, sw.gt
    assert np.array_equal(image, full.image) and np.array_equal(gt, full.gt)


# ---------------------------------------------------------------------- determinism


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_scene_other_seed_other_scene(family: str) -> None:
    win = Window(64, 96, 200, 240)
    a = SceneGenerator(family, (400, 500), 3).render(win)
    b = SceneGenerator(family, (400, 500), 3).render(win)
    c = SceneGenerator(family, (400, 500), 4).render(win)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.gt, b.gt)
    assert np.array_equal(a.detector, b.detector)
    assert not np.array_equal(a.image, c.image)


def test_photos_change_textures_not_geometry(bank: D.PhotoBank) -> None:
    win = Window(0, 0, 256, 256)
    plain = SceneGenerator("aerial", (256, 256), 8).render(win)
    photo = SceneGenerator("aerial", (256, 256), 8, bank).render(win)
    assert np.array_equal(plain.gt, photo.gt) and np.array_equal(plain.detector, photo.detector)
    assert not np.array_equal(plain.image, photo.image)


# ------------------------------------------------------------- ground truth, detector


@pytest.mark.parametrize(
    ("family", "lo", "hi"), [("aerial", 0.05, 0.40), ("cells", 0.05, 0.50), ("thin", 0.01, 0.30)]
)
def test_foreground_fraction_is_sane(big: dict[str, SceneWindow], family: str, lo: float, hi: float) -> None:
    sw = big[family]
    _check_window(sw, (1024, 1024))
    assert lo <= float(np.mean(sw.gt >= 0.5)) <= hi


@pytest.mark.parametrize("family", FAMILIES)
def test_detector_iou_in_range(big: dict[str, SceneWindow], family: str) -> None:
    sw = big[family]
    assert 0.6 <= D.iou(sw.detector >= 0.5, sw.gt >= 0.5) <= 0.95
    soft = (sw.detector > 0.02) & (sw.detector < 0.98)
    assert soft.any()  # blurred edges


@pytest.mark.parametrize("family", FAMILIES)
def test_gt_soft_only_at_edges(big: dict[str, SceneWindow], family: str) -> None:
    gt = big[family].gt
    soft = (gt > 0) & (gt < 1)
    assert soft.any()
    # every soft pixel touches a pixel on the other side of 0.5 or is itself a thin part
    hard = (gt >= 0.5).astype(np.uint8)
    edge = cv2.dilate(hard, np.ones((3, 3), np.uint8)) != cv2.erode(hard, np.ones((3, 3), np.uint8))
    thin = soft & ~edge
    assert np.count_nonzero(thin) <= 0.2 * np.count_nonzero(soft)


def test_aerial_distractors_are_background(big: dict[str, SceneWindow]) -> None:
    sw = big["aerial"]
    assert set(sw.layers) == {"water", "road", "roof", "tree"}
    assert np.array_equal(sw.layers["roof"], sw.gt)
    for name in ("road", "tree"):
        layer = sw.layers[name]
        assert np.count_nonzero(layer > 0.99) > 500, name
        assert float(sw.gt[layer > 0.99].max()) <= 0.01, name
        assert float(sw.gt[layer > 0.5].mean()) < 0.05, name
    total = sum(sw.layers.values())
    assert float(total.max()) <= 1.0 + 1e-5


def test_cells_layers_and_dim_nuclei(big: dict[str, SceneWindow]) -> None:
    sw = big["cells"]
    assert set(sw.layers) == {"haze", "speck"}
    assert all((v >= 0).all() for v in sw.layers.values())
    grey = sw.image.astype(np.float32).max(axis=2)
    inside, outside = grey[sw.gt >= 0.99], grey[sw.gt <= 0.01]
    assert np.median(inside) > np.median(outside) + 10


def test_thin_structures_are_thin(big: dict[str, SceneWindow]) -> None:
    hard = (big["thin"].gt >= 0.5).astype(np.uint8)
    opened = cv2.morphologyEx(hard, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    assert np.count_nonzero(hard & (1 - opened)) > 0.5 * np.count_nonzero(hard)


# ----------------------------------------------------------------- api, count, errors


@pytest.mark.parametrize("family", FAMILIES)
def test_count_positive_and_grows_with_density(family: str) -> None:
    sparse = SceneGenerator(family, (1024, 1024), 1, density=0.5).count()
    dense = SceneGenerator(family, (1024, 1024), 1, density=2.0).count()
    assert 0 < sparse < dense
    assert SceneGenerator(family, (1024, 1024), 1, density=2.0).count() == dense


def test_count_estimate_for_big_scenes() -> None:
    gen = SceneGenerator("cells", (4200, 4200), 0, density=0.3)  # 33 x 33 cells: estimated from 256
    est = gen.count()
    assert est > 0
    per_cell = sum(gen._plan(cy, cx).n_fg for cy in range(8) for cx in range(8)) / 64
    assert 0.4 * per_cell * 33 * 33 <= est <= 2.5 * per_cell * 33 * 33


def test_bad_arguments() -> None:
    with pytest.raises(UsageError, match="family"):
        SceneGenerator("forest", (64, 64), 0)
    with pytest.raises(UsageError, match="density"):
        SceneGenerator("cells", (64, 64), 0, density=0.0)
    gen = SceneGenerator("cells", (64, 64), 0)
    with pytest.raises(UsageError, match="outside"):
        gen.render(Window(0, 0, 65, 10))
    assert gen.shape == (64, 64)


# --------------------------------------------------------------------- make_sample


@pytest.mark.parametrize("kind", D.SCENE_KINDS)
def test_make_sample_scene_kinds(photo_dir: Path, kind: str) -> None:
    spec = D.SampleSpec(
        size=(96, 128), seed=3, photos=photo_dir, kinds={kind: 1.0}, perturbations={"detector": 1.0}
    )
    s = D.make_sample(0, spec)
    assert s.kind == kind and s.meta["kind"] == kind
    assert s.image.shape == (96, 128, 3) and s.image.dtype == np.uint8
    for m in (s.gt, s.coarse):
        assert m.shape == (96, 128) and m.dtype == np.float32
        assert np.isfinite(m).all() and m.min() >= 0.0 and m.max() <= 1.0
    scene = s.meta["scene"]
    assert scene["family"] == kind
    sh, sw = scene["shape"]
    assert 2 * 96 - 1 <= sh <= 8 * 96 + 1 and 2 * 128 - 1 <= sw <= 8 * 128 + 1
    y0, x0, h, w = scene["window"]
    assert (h, w) == (96, 128) and 0 <= y0 <= sh - h and 0 <= x0 <= sw - w
    assert s.meta["perturbation"] == "detector"
    assert s.meta["coarse_iou"] == D.iou(s.coarse >= 0.5, s.hard)
    # the sample is that window of that scene, and its coarse mask the scene's detector
    direct = SceneGenerator(kind, (sh, sw), scene["seed"], D.sources(spec).photos, scene["density"]).render(
        Window(y0, x0, h, w)
    )
    assert np.array_equal(direct.image, s.image) and np.array_equal(direct.gt, s.gt)
    assert np.array_equal(direct.detector, s.coarse)
    again = D.make_sample(0, spec)
    assert np.array_equal(again.image, s.image) and again.meta == s.meta


@pytest.mark.parametrize("pert", D.PERTURBATIONS)
def test_scene_kinds_take_mask_perturbations_too(photo_dir: Path, pert: str) -> None:
    spec = D.SampleSpec(size=64, seed=1, photos=photo_dir, kinds={"aerial": 1.0})
    s = D.make_sample(2, spec, perturbation=pert)
    d = D.make_sample(2, spec, perturbation="detector")
    assert s.meta["perturbation"] == pert and np.array_equal(s.image, d.image)
    assert s.coarse.shape == (64, 64) and 0.0 <= s.meta["coarse_iou"] <= 1.0


def test_detector_falls_back_to_cascadepsp_for_composites(photo_dir: Path) -> None:
    spec = D.SampleSpec(size=64, seed=2, photos=photo_dir, kinds={"shapes": 1.0})
    fell = D.make_sample(1, spec, perturbation="detector")
    ref = D.make_sample(1, spec, perturbation="cascadepsp")
    assert fell.meta["perturbation"] == "cascadepsp" and fell.meta["requested"] == "detector"
    assert np.array_equal(fell.coarse, ref.coarse)


def test_spec_names_and_defaults() -> None:
    assert D.KINDS == ("shapes", "portraits", "pairs", "aerial", "cells", "thin")
    assert D.PERTURBATIONS == ("cascadepsp", "lowres", "blobs")
    assert "detector" in D.COARSE_METHODS
    default = D.SampleSpec(portraits=Path("/nonexistent-portraits"))
    assert not any(k in D.SCENE_KINDS for k, _ in default.kinds)
    assert dict(default.perturbations) == {"blobs": 0.25, "cascadepsp": 0.5, "lowres": 0.25}
    with pytest.raises(UsageError, match="--perturbations"):
        D.SampleSpec(perturbations={"sketch": 1.0})
