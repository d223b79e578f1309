"""The dense-CRF refiner (needs pydensecrf2; the missing-package message is tested without it)."""

from __future__ import annotations

import importlib
import importlib.util

import cv2
import numpy as np
import pytest

from refine_cli.errors import DependencyError, UsageError
from refine_cli.refiners.base import TileInput
from refine_cli.refiners.crf import CRFOptions, crf_unary
from refine_cli.tiling.grid import Window


def test_missing_backend_names_the_pip_line(monkeypatch):
    from refine_cli.refiners import crf

    real = importlib.import_module

    def fake(name, *a, **k):
        if name.startswith("pydensecrf"):
            raise ImportError("No module named 'pydensecrf'")
        return real(name, *a, **k)

    monkeypatch.setattr(crf.importlib, "import_module", fake)
    with pytest.raises(DependencyError, match=r"pip install pydensecrf2") as info:
        crf.DenseCRFRefiner()
    assert isinstance(info.value, ImportError) and info.value.exit_code == 2


def test_unary_energies():
    u = crf_unary(np.array([[0.0, 0.5, 1.0]], np.float32), confidence=0.8)
    assert u.shape == (2, 3) and u.dtype == np.float32 and u.flags.c_contiguous
    np.testing.assert_allclose(u[:, 1], [np.log(2), np.log(2)], rtol=1e-6)
    np.testing.assert_allclose(u[:, 2], [-np.log(0.2), -np.log(0.8)], rtol=1e-6)  # hard foreground
    np.testing.assert_allclose(u[:, 0], [-np.log(0.8), -np.log(0.2)], rtol=1e-6)


@pytest.mark.parametrize("bad", [{"confidence": 0.5}, {"confidence": 1.0}, {"iterations": 0}, {"srgb": 0},
                                 {"sxy": -1.0}, {"smoothness_weight": -1}])
def test_options_validation(bad):
    with pytest.raises(UsageError):
        CRFOptions(**bad)


needs_backend = pytest.mark.skipif(importlib.util.find_spec("pydensecrf") is None,
                                   reason="pydensecrf2 is not installed (pip install pydensecrf2)")


def two_tone(shape=(160, 200), seed=0):
    """A textured two-colour image with an irregular object, its GT and a blocky 1/8 coarse mask."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    gt = ((yy - h / 2) ** 2 / (h / 3.2) ** 2 + (xx - w / 2) ** 2 / (w / 3.0) ** 2
          + 0.15 * np.sin(xx / 5.0) < 1.0)
    img = np.where(gt[..., None], np.array([190, 90, 70]), np.array([60, 110, 170])).astype(np.float32)
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    low = cv2.resize(gt.astype(np.float32), (w // 8, h // 8), interpolation=cv2.INTER_AREA)
    coarse = cv2.resize((low >= 0.5).astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST)
    return img, gt, coarse


@needs_backend
def test_crf_snaps_a_blocky_mask_to_the_colour_edge():
    from refine_cli.refiners.crf import DenseCRFRefiner

    img, gt, coarse = two_tone()
    ref = DenseCRFRefiner()
    out = ref.refine(TileInput(img, coarse, Window.full(gt.shape)))
    assert out.prob.shape == gt.shape and out.prob.dtype == np.float32
    assert 0.0 <= out.prob.min() and out.prob.max() <= 1.0
    err_coarse = np.count_nonzero((coarse >= 0.5) != gt)
    err_crf = np.count_nonzero((out.prob >= 0.5) != gt)
    assert err_crf < 0.5 * err_coarse, (err_crf, err_coarse)


@needs_backend
def test_uniform_window_stays_uniform():
    from refine_cli.refiners.crf import DenseCRFRefiner

    img = np.full((64, 80, 3), 128, np.uint8)
    for value in (0.0, 1.0):
        coarse = np.full((64, 80), value, np.float32)
        out = DenseCRFRefiner().refine(TileInput(img, coarse, Window(0, 0, 64, 80)))
        assert ((out.prob >= 0.5) == bool(value)).all()


@needs_backend
def test_prepare_scales_range_with_resolution():
    from refine_cli.refiners.base import Scene
    from refine_cli.refiners.crf import DenseCRFRefiner

    small, big = DenseCRFRefiner(), DenseCRFRefiner()
    small.prepare(Scene(shape=(1000, 1000), read_overview=lambda s: (None, None), coarse_scale=1.0))
    big.prepare(Scene(shape=(1000, 1000), read_overview=lambda s: (None, None), coarse_scale=8.0))
    assert big.sxy > small.sxy and big.halo >= 2 * big.sxy
    fixed = DenseCRFRefiner(CRFOptions(sxy=33.0))
    fixed.prepare(Scene(shape=(1000, 1000), read_overview=lambda s: (None, None), coarse_scale=8.0))
    assert fixed.sxy == 33.0


@needs_backend
def test_through_refine_file_tiled_close_to_whole(tmp_path, monkeypatch):
    from conftest import write_png
    from refine_cli.api import refine_file
    from refine_cli.config import RefineConfig
    from refine_cli.refiners import BUILDERS
    from refine_cli.refiners.crf import build_densecrf

    if "densecrf" not in BUILDERS:  # until the registry lists it: an entry shaped like the others
        entry = (build_densecrf, "dense CRF", False)
        monkeypatch.setitem(BUILDERS, "densecrf", entry[: len(next(iter(BUILDERS.values())))])
    img, gt, coarse = two_tone((300, 360), seed=1)
    write_png(tmp_path / "img.png", img)
    low = cv2.resize(coarse, (45, 37), interpolation=cv2.INTER_AREA)
    write_png(tmp_path / "coarse.png", np.rint(low * 255).astype(np.uint8))
    outs = {}
    for tile in (None, 128):
        out = tmp_path / f"out_{tile}.png"
        rep = refine_file(str(tmp_path / "img.png"), str(tmp_path / "coarse.png"), str(out),
                          config=RefineConfig(method="densecrf", tile_size=tile, overlap=16))
        assert rep.method == "densecrf" and rep.refiner["sxy"] > 0
        outs[tile] = cv2.imread(str(out), cv2.IMREAD_GRAYSCALE) > 127
        if tile:
            assert rep.tiles["total"] > 1
    assert np.mean(outs[None] == outs[128]) > 0.995
    assert np.mean(outs[None] == gt) > np.mean((coarse >= 0.5) == gt)
