"""The guided filter helper and the edge snap (``refiners.classical``)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from refine_cli.devtools.synthetic import random_scene
from refine_cli.refiners.base import TileInput
from refine_cli.refiners.classical import EdgeSnapRefiner, guided_filter
from refine_cli.tiling.grid import Window


def reference_guided_filter(image, p, r, eps):
    """He et al.'s colour guided filter in float64 (guide in [0, 1], OpenCV's box borders)."""
    i = image.astype(np.float64) / 255
    p = p.astype(np.float64)

    def box(x):
        return cv2.boxFilter(x, -1, (2 * r + 1, 2 * r + 1), normalize=True, borderType=cv2.BORDER_REFLECT_101)

    mi = [box(i[..., c]) for c in range(3)]
    mp = box(p)
    cov = np.stack([box(i[..., c] * p) - mi[c] * mp for c in range(3)], -1)
    sigma = np.empty(i.shape[:2] + (3, 3))
    for a in range(3):
        for b in range(3):
            sigma[..., a, b] = box(i[..., a] * i[..., b]) - mi[a] * mi[b]
    coef = np.linalg.solve(sigma + eps * np.eye(3), cov[..., None])[..., 0]
    offset = mp - sum(coef[..., c] * mi[c] for c in range(3))
    return sum(box(coef[..., c]) * i[..., c] for c in range(3)) + box(offset)


@pytest.fixture(scope="module")
def scene():
    sc = random_scene((160, 200), 5, seed=3, size=40)
    image = sc.image(Window(0, 0, 160, 200))
    p = cv2.GaussianBlur(cv2.resize(sc.coarse(8), (200, 160)).astype(np.float32) / 255, (0, 0), 2)
    return image, p


@pytest.mark.parametrize("eps", [1e-2, 1e-3, 1e-4])
def test_guided_filter_matches_a_float64_reference(scene, eps):
    """OpenCV with a [0, 1] float guide is off by up to ~1 at eps 1e-3; the helper (guide in [0, 255],
    eps * 255^2) agrees with the float64 filter to 2e-4 down to eps 1e-4 (float32 inside OpenCV)."""
    image, p = scene
    ref = reference_guided_filter(image, p, 4, eps)
    got = guided_filter(image, p, 4, eps)
    assert got.dtype == np.float32 and got.shape == p.shape
    assert float(np.abs(got - ref).max()) < 2e-4


def test_edge_snap_moves_the_boundary_onto_the_colour_edge():
    """A soft boundary 3 px left of a colour step ends on the step (within half a pixel), row by row."""
    rng = np.random.default_rng(0)
    h, w, edge = 48, 96, 48
    image = np.empty((h, w, 3), np.uint8)
    image[:, :edge] = (40, 60, 200)
    image[:, edge:] = (190, 150, 30)
    image = np.clip(image + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8)
    x = np.arange(w, dtype=np.float32) + 0.5
    p = np.broadcast_to(1 / (1 + np.exp(-(x - (edge - 3)) / 1.5)), (h, w)).astype(np.float32)  # 0.5 at x = 45
    snap = EdgeSnapRefiner()
    q = snap.refine(TileInput(image=image, coarse=p, window=Window(0, 0, h, w))).prob
    assert q.shape == (h, w) and q.dtype == np.float32 and 0 <= q.min() and q.max() <= 1
    first_fg = (q >= 0.5).argmax(axis=1)
    assert ((p >= 0.5).argmax(axis=1) == edge - 3).all()
    assert (first_fg == edge).all(), np.unique(first_fg)
    assert snap.describe() == {"name": "snap", "radius": 8, "eps": 1e-4, "halo": 17}


def test_guided_radius_follows_an_upsampled_masks_scale_not_the_image_size():
    from refine_cli.refiners.classical import guided_radius

    assert guided_radius((20000, 20000), 8.0) == 8  # many small objects: the image size says nothing
    assert guided_radius((1024, 1024), 8.0) == 8
    assert guided_radius((20000, 20000), 1.0) == 40  # a full-size mask: about 0.2 % of the image
    assert guided_radius((1024, 1024), 1.0) == 2
    assert guided_radius((4000, 4000), 100.0) == 64
