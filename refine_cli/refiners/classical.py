"""Refiners that need no weights.

The null refiner, the guided filter, the fast global smoother, and the edge snap that ends
``--method cascade`` with the bundled weights.

Uncertainty for all: ``1 - |2p - 1|`` of the output probability (the engine's default).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from refine_cli.config import GuidedOptions
from refine_cli.refiners.base import FULL_RESOLUTION_SCALE, Refiner, Scene, TileInput, TileResult


class CoarseRefiner(Refiner):
    """The null refiner: returns the (resampled) coarse probability unchanged.

    Used as the baseline of the benchmarks and to time pure I/O.
    """

    name = "coarse"
    guarded = False
    halo = 0
    needs_image = False

    def refine(self, tile: TileInput) -> TileResult:
        """Return the coarse probability."""
        return TileResult(tile.coarse)

    def tile_memory(self, pixels: int) -> int:
        """Nothing beyond the inputs."""
        return 4 * pixels


def guided_filter(image: np.ndarray, p: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """Colour guided filter (He et al. 2010) of ``p`` guided by an RGB image.

    OpenCV's ``ximgproc.guidedFilter`` with a float guide in [0, 1] is wrong for eps below
    about 1e-2 (outputs off by up to 1.0 at eps 1e-3 against a float64 implementation);
    with the guide in [0, 255] and ``eps * 255**2`` it agrees to 2e-4 down to eps 1e-4
    (``tests/test_classical.py``), so the filter is always called that way.

    Args:
        image: ``(h, w, 3)`` uint8 RGB (or float in [0, 255]).
        p: ``(h, w)`` float32 to filter.
        radius: box radius in px, >= 1.
        eps: regularisation in units of the guide scaled to [0, 1] (variance of a colour step
            that the filter still follows).

    Returns:
        ``(h, w)`` float32, not clipped (the filter can overshoot [0, 1] slightly).
    """
    guide = image.astype(np.float32, copy=False)
    # opencv-contrib's stubs type guidedFilter's radius and eps as the wrong overload
    q: np.ndarray = cv2.ximgproc.guidedFilter(  # type: ignore[call-overload]
        guide, p.astype(np.float32, copy=False), radius, eps * 255.0**2, -1)
    return q


def guided_radius(shape: tuple[int, int], coarse_scale: float) -> int:
    """Default guided-filter radius at full resolution.

    ``r = clip(round(s), 2, 64)`` for an upsampled mask, with ``s`` the image pixels per
    coarse-mask pixel: the filter must reach across the mask's blur, about ``s`` px (chosen on
    synthetic scenes and portraits, ``benchmarks/quality.py``: radius ``s`` beat ``s/2`` and
    ``2 s``). A full-resolution mask (``s`` at most ``FULL_RESOLUTION_SCALE``, 1.5) says nothing
    of its error scale; its radius is ``clip(round(max(H, W) / 500), 2, 64)``, the typical
    boundary error of a full-size mask (about 0.2 % of the image size). The size term is not
    applied to upsampled masks: on a 105 MPx aerial scene with a 1/8 mask it made the radius 20
    instead of 8 and smeared roofs of 8-60 px (IoU 0.823 -> 0.812 instead of -> 0.850).
    """
    r = coarse_scale if coarse_scale > FULL_RESOLUTION_SCALE else max(coarse_scale, max(shape) / 500.0)
    return int(min(64, max(2, round(r))))


class GuidedRefiner(Refiner):
    """Edge-aware refinement with a colour guided filter (He et al. 2010), in two passes.

    Pass 1 filters the coarse probability with radius ``r`` (it snaps the boundary
    to nearby image edges); pass 2 filters the binarised result (``q1 >= 1/2``)
    again with radius ``r2 = max(2, r // 2)``, which removes the soft halo pass 1
    leaves in low-contrast regions. The guide is the RGB image in [0, 1]; ``eps``
    (default 1e-2) sits between the variance of fine texture and of real edges.
    Each output pixel depends on pixels within ``2 r + 2 r2`` of it, so with that
    halo tiled and whole-image results agree up to float rounding.

    Args:
        options: radius (``None`` = :func:`guided_radius`) and eps.
    """

    name = "guided"

    def __init__(self, options: GuidedOptions | None = None) -> None:
        self.options = options or GuidedOptions()
        self.radius = self.options.radius or 8
        self._set_halo()

    @property
    def radius2(self) -> int:
        """Radius of the second pass."""
        return max(2, self.radius // 2)

    def _set_halo(self) -> None:
        self.halo = 2 * self.radius + 2 * self.radius2 + 1

    def prepare(self, scene: Scene) -> None:
        """Derive the radius from the image size and the coarse mask's resolution."""
        if self.options.radius is None:
            self.radius = guided_radius(scene.shape, scene.coarse_scale)
            self._set_halo()

    def refine(self, tile: TileInput) -> TileResult:
        """Filter the coarse probability of one window."""
        guide = tile.rgb().astype(np.float32)  # converted once for both passes
        eps = float(self.options.eps)
        q = guided_filter(guide, tile.coarse, self.radius, eps)
        q = guided_filter(guide, (q >= 0.5).astype(np.float32), self.radius2, eps)
        return TileResult(np.clip(q, 0.0, 1.0).astype(np.float32, copy=False))

    def tile_memory(self, pixels: int) -> int:
        """OpenCV's guided filter keeps about 25 float planes."""
        return 110 * pixels

    def describe(self) -> dict[str, Any]:
        """Radii, eps, halo."""
        return {"name": self.name, "radius": self.radius, "radius2": self.radius2, "eps": self.options.eps,
                "halo": self.halo}


class FGSRefiner(Refiner):
    """Fast global smoother (Min et al. 2014) of the coarse probability, guided by the image.

    ``lambda`` grows with the radius the guided filter would use (``lambda = r^2``),
    ``sigma_color = 8`` (in 0..255 units). The smoother is global in principle but
    its influence decays quickly; a halo of ``4 r`` keeps tile seams below
    the blending's reach.
    """

    name = "fgs"

    def __init__(self, options: GuidedOptions | None = None) -> None:
        self.options = options or GuidedOptions()
        self.radius = self.options.radius or 8
        self.halo = 4 * self.radius

    def prepare(self, scene: Scene) -> None:
        """Derive the smoothing strength from the image size and the coarse mask's resolution."""
        if self.options.radius is None:
            self.radius = guided_radius(scene.shape, scene.coarse_scale)
            self.halo = 4 * self.radius

    def refine(self, tile: TileInput) -> TileResult:
        """Smooth the coarse probability of one window."""
        lam = float(self.radius) ** 2
        q = cv2.ximgproc.fastGlobalSmootherFilter(tile.rgb(), tile.coarse.astype(np.float32), lam, 8.0)
        q = np.clip(q, 0.0, 1.0)
        # Sharpen the smoothed transition back to a probability around 0.5.
        q = 1.0 / (1.0 + np.exp(-8.0 * (q - 0.5)))
        return TileResult(q.astype(np.float32))

    def tile_memory(self, pixels: int) -> int:
        """About 20 float planes."""
        return 90 * pixels

    def describe(self) -> dict[str, Any]:
        """Strength and halo."""
        return {"name": self.name, "lambda": float(self.radius) ** 2, "sigma_color": 8.0, "halo": self.halo,
                "sharpening": "logistic(8 (q - 0.5))", "radius": self.radius}


class EdgeSnapRefiner(Refiner):
    """Moves a refined probability onto the image's colour edges: one guided filter, small radius and eps.

    The last step of ``--method cascade`` with the bundled lite weights (``--cascade-snap``):
    their boundaries land within a few px of the true edge, and a guided filter of radius 8
    with eps 1e-4 (it follows any colour step of more than about 1 % of the range) pulls the
    0.5 crossing onto the edge. Chosen on a tuning set of composites kept apart from the
    benchmark (``benchmarks/make_composites.py --seed 4242``); see the model card.

    Input: the previous level's channel 0, ``(h, w)`` or ``(h, w, K)`` float32 in [0, 1].
    Output: ``(h, w)`` float32 in [0, 1]. Each output pixel depends on pixels within
    ``2 radius`` of it, so with that halo tiled and whole-image results agree.

    Args:
        radius: box radius in px (default: the tuned 8).
        eps: regularisation (guide in [0, 1] units; default: the tuned 1e-4).
    """

    name = "snap"
    skip_rule = "binary"

    def __init__(self, radius: int = 8, eps: float = 1e-4) -> None:
        self.radius, self.eps = radius, eps
        self.halo = 2 * radius + 1

    def out_channels(self, in_channels: int) -> int:
        """One probability."""
        return 1

    def skip_output(self, coarse: np.ndarray) -> np.ndarray:
        """No boundary in reach: the input unchanged."""
        return coarse[..., :1]

    def refine(self, tile: TileInput) -> TileResult:
        """Filter one window of the refined probability."""
        p = tile.coarse[..., 0] if tile.coarse.ndim == 3 else tile.coarse
        return TileResult(np.clip(guided_filter(tile.rgb(), p, self.radius, self.eps), 0.0, 1.0))

    def tile_memory(self, pixels: int) -> int:
        """OpenCV's guided filter keeps about 25 float planes."""
        return 110 * pixels

    def describe(self) -> dict[str, Any]:
        """Radius, eps, halo."""
        return {"name": self.name, "radius": self.radius, "eps": self.eps, "halo": self.halo}
