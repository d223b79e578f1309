"""Masks: kind detection, per-window resampling equal to whole-image bilinear, shape checks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import tifffile
import torch

from conftest import write_png
from refine_cli.errors import InputError
from refine_cli.io.masks import MaskSource, check_mask_shape
from refine_cli.io.readers import ArrayReader, open_raster
from refine_cli.tiling.grid import Window

BIG = 10**12


def src(arr, shape=None, classes=None):
    return MaskSource(ArrayReader("m", arr), shape or arr.shape[:2], classes=classes)


@pytest.mark.parametrize(("arr", "kind", "scale"), [
    (np.array([[0, 1], [1, 0]], np.uint8), "binary", 1),
    (np.array([[0, 255], [255, 0]], np.uint8), "binary", 255),
    (np.array([[0, 255], [255, 0]], np.uint16), "binary", 255),
    (np.array([[0, 65535], [0, 0]], np.uint16), "binary", 65535),
    (np.array([[True, False], [False, False]]), "binary", 1),
    (np.array([[0, 200], [255, 17]], np.uint8), "soft", 255),
    (np.array([[0, 30000], [65535, 0]], np.uint16), "soft", 65535),
    (np.array([[0, 0.25], [1.0, 0.5]], np.float32), "soft", 1),
    (np.array([[0, 1], [2, 3]], np.uint8), "labels", None),
])
def test_kind_detection(arr, kind, scale):
    m = src(arr)
    assert m.kind.kind == kind
    if scale is not None:
        assert m.kind.scale == scale
    if kind != "labels":
        p = m.read(Window(0, 0, 2, 2))
        assert p.dtype == np.float32 and p.min() >= 0 and p.max() <= 1
    else:
        assert m.classes == 4


def test_bad_float_masks():
    with pytest.raises(InputError, match="NaN"):
        src(np.array([[0, np.nan]], np.float32))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        src(np.array([[0, 3.0]], np.float32))
    with pytest.raises(InputError, match="label"):
        src(np.array([[0, 5]], np.uint8), classes=3)


def test_colour_and_alpha_masks():
    grey = np.array([[0, 128], [255, 64]], np.uint8)
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    m = src(rgba)  # constant alpha, equal RGB: one grey band, a soft mask
    np.testing.assert_allclose(m.read(Window(0, 0, 2, 2)), grey / 255, rtol=1e-6)
    alpha_only = np.dstack([np.zeros_like(grey)] * 3 + [grey])
    np.testing.assert_allclose(src(alpha_only).read(Window(0, 0, 2, 2)), grey / 255, rtol=1e-6)
    colours = np.zeros((2, 3, 3), np.uint8)
    colours[0, 1] = (255, 0, 0)
    colours[1, 2] = (0, 0, 255)
    m = src(colours)
    assert m.is_labels and m.classes == 3
    assert m.read_labels(Window(0, 0, 2, 3)).labels().tolist() == [[0, 2, 0], [0, 0, 1]]


def test_lowres_resampling_is_bilinear_and_window_independent():
    rng = np.random.default_rng(1)
    low = (rng.random((25, 40)) * 255).astype(np.uint8)
    low[low < 128] = 0
    H, W = 200, 320
    m = src(low, (H, W))
    whole = m.read(Window(0, 0, H, W))
    ref = torch.nn.functional.interpolate(torch.from_numpy(low.astype(np.float32) / 255)[None, None], size=(H, W),
                                          mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(whole, ref, atol=2e-6)
    for win in [Window(0, 0, 7, 9), Window(13, 101, 50, 77), Window(199, 319, 1, 1), Window(57, 0, 60, 320)]:
        np.testing.assert_array_equal(m.read(win), whole[win.slices])  # bit-identical per window


def test_lowres_label_map_per_class():
    low = np.zeros((10, 16), np.uint8)
    low[2:6, 3:9] = 1
    low[6:9, 10:15] = 2
    m = src(low, (40, 64))
    lw = m.read_labels(Window(0, 0, 40, 64))
    assert lw.present == [0, 1, 2]
    total = sum(lw.prob(c) for c in lw.present)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)  # one-hot probabilities stay a partition
    nearest = cv2.resize(low, (64, 40), interpolation=cv2.INTER_NEAREST)
    assert (lw.labels() == nearest).mean() > 0.95


def test_uniform_value_checks_the_native_window():
    low = np.zeros((10, 10), np.uint8)
    low[8:, 8:] = 255
    m = src(low, (100, 100))
    assert m.uniform_value(Window(0, 0, 60, 60)) == 0.0
    assert m.uniform_value(Window(0, 0, 85, 85)) is None  # bilinear reach touches the object
    assert m.uniform_value(Window(85, 85, 15, 15)) == 1.0


@pytest.mark.parametrize(("mask", "image", "ok"), [
    ((100, 200), (100, 200), True),
    ((25, 50), (100, 200), True),
    ((33, 67), (100, 200), True),   # 67 vs 66.7: within a pixel
    ((25, 53), (100, 200), False),  # another aspect ratio
    ((200, 400), (100, 200), False),  # larger than the image
])
def test_mask_shape_rule(mask, image, ok):
    if ok:
        check_mask_shape(mask, image, "m")
    else:
        with pytest.raises(InputError):
            check_mask_shape(mask, image, "m")


def test_mask_files_through_open_raster(tmp_path):
    m8 = np.zeros((30, 40), np.uint8)
    m8[5:20, 10:30] = 255
    write_png(tmp_path / "m.png", m8)
    tifffile.imwrite(tmp_path / "lab.tif", (m8 // 255).astype(np.uint16) * 3, tile=(16, 16))
    with open_raster(tmp_path / "m.png", max_pixels=BIG, inline_limit=BIG, what="mask") as r:
        ms = MaskSource(r, (60, 80))
        assert ms.kind.kind == "binary" and not ms.same_resolution
    with open_raster(tmp_path / "lab.tif", max_pixels=BIG, inline_limit=BIG, what="mask") as r:
        ms = MaskSource(r, (30, 40))
        assert ms.is_labels and ms.classes == 4
        assert ms.read_labels(Window(0, 0, 30, 40)).present == [0, 3]
