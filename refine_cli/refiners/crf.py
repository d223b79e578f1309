"""Fully connected CRF refinement (Krähenbühl & Koltun 2011) through ``pydensecrf2``.

Per window, two labels (background, foreground):

* **Unary**: ``U_l = -log P_l`` with ``P_fg = 1/2 + (p - 1/2) (2 c - 1)``, ``P_bg = 1 - P_fg``,
  ``p`` the coarse probability and ``c`` (``confidence``) the trust in a hard
  coarse pixel: a pixel the coarse mask calls foreground for sure starts at
  ``P_fg = c``; soft (upsampled) coarse values are trusted proportionally less.
* **Pairwise**: Potts compatibility with two Gaussian kernels on pixel position
  ``x`` (px) and colour ``I`` (RGB, 0..255)::

      w_a exp(-|x_i - x_j|^2 / 2 s_xy^2 - |I_i - I_j|^2 / 2 s_rgb^2)   (appearance)
    + w_s exp(-|x_i - x_j|^2 / 2 s_s^2)                                (smoothness, off by default)

* **Inference**: ``iterations`` mean-field steps (permutohedral lattice); the
  result is ``Q_fg`` in ``[0, 1]``.

Resolution: the appearance range ``s_xy`` follows the boundary error it must
bridge, ``s_xy = clip(spatial_scale * r, 8, 80)`` px with ``r`` the guided
filter's default radius (:func:`~refine_cli.refiners.classical.guided_radius`:
the larger of the coarse mask's upsampling factor and 0.2 % of the image size).
The CRF is global in principle; a halo of ``2 s_xy`` keeps nearly all of a
pixel's appearance kernel inside its window, and the engine's feathered
blending hides what remains of the tile cut (tiled and whole-image results are
close, not equal). Uncertainty: the engine's default ``1 - |2 Q_fg - 1|``.

Defaults (``c = 0.6``, ``spatial_scale = 6``, ``s_rgb = 10``, ``w_a = 16``, ``w_s = 0``,
5 iterations) were chosen by a coordinate search of mean mBA on 20 runs (10 cases) of
``benchmarks/quality.py`` data (synthetic, shape and portrait composites, P3M;
``lowres`` and ``perturbed`` coarse masks): 0.812 against 0.795 for the
textbook ``w_a = 8, w_s = 3, c = 0.75`` and 0.721 for the coarse masks
(dropping the smoothness kernel alone: 0.806). ``s_rgb = 20`` helped the
synthetic scenes but hurt the real portraits.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from refine_cli.errors import DependencyError, UsageError
from refine_cli.refiners.base import Refiner, Scene, TileInput, TileResult
from refine_cli.refiners.classical import guided_radius

INSTALL_HINT = "pip install pydensecrf2 (or pip install 'refine-cli[crf]')"
"""What to run when the CRF backend is missing."""


def load_backend() -> Any:
    """Import ``pydensecrf.densecrf`` (shipped by the ``pydensecrf2`` package).

    Raises:
        DependencyError: the package is not installed or did not build.
    """
    try:
        return importlib.import_module("pydensecrf.densecrf")
    except ImportError as exc:
        raise DependencyError(f"--method densecrf needs the dense CRF library: {INSTALL_HINT} "
                              f"({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class CRFOptions:
    """Parameters of :class:`DenseCRFRefiner` (see the module docstring for the model).

    Attributes:
        confidence: ``c`` in ``(0.5, 1)``: unary probability of a hard coarse pixel's label.
        spatial_scale: ``s_xy = clip(spatial_scale * r, 8, 80)`` px.
        sxy: fixed appearance range, px; ``None`` derives it from the resolution.
        srgb: colour range ``s_rgb`` of the appearance kernel (0..255 units).
        appearance_weight: ``w_a``.
        smoothness_sxy: ``s_s``, px.
        smoothness_weight: ``w_s`` (0 = no smoothness kernel).
        iterations: mean-field steps (>= 1).
    """

    confidence: float = 0.6
    spatial_scale: float = 6.0
    sxy: float | None = None
    srgb: float = 10.0
    appearance_weight: float = 16.0
    smoothness_sxy: float = 2.0
    smoothness_weight: float = 0.0
    iterations: int = 5

    def __post_init__(self) -> None:
        if not 0.5 < self.confidence < 1.0:
            raise UsageError(f"CRF confidence {self.confidence} must be in (0.5, 1)")
        if self.iterations < 1:
            raise UsageError(f"CRF iterations {self.iterations} must be >= 1")
        for name in ("spatial_scale", "srgb", "appearance_weight", "smoothness_sxy"):
            if getattr(self, name) <= 0:
                raise UsageError(f"CRF {name} must be > 0")
        if self.sxy is not None and self.sxy <= 0:
            raise UsageError("CRF sxy must be > 0")
        if self.smoothness_weight < 0:
            raise UsageError("CRF smoothness_weight must be >= 0")


def crf_unary(coarse: np.ndarray, confidence: float) -> np.ndarray:
    """Unary energies of the two labels.

    Args:
        coarse: ``(h, w)`` float probability in ``[0, 1]``.
        confidence: ``c`` in ``(0.5, 1)``.

    Returns:
        ``(2, h * w)`` float32, C-contiguous: row 0 ``-log P_bg``, row 1 ``-log P_fg``.
    """
    p = np.clip(coarse.astype(np.float32, copy=False), 0.0, 1.0).reshape(-1)
    fg = np.float32(0.5) + (p - np.float32(0.5)) * np.float32(2.0 * confidence - 1.0)
    out = np.empty((2, p.size), np.float32)
    out[0] = -np.log(np.float32(1.0) - fg)
    out[1] = -np.log(fg)
    return out


class DenseCRFRefiner(Refiner):
    """Dense-CRF refinement of the coarse probability, guided by the image colours.

    Args:
        options: model parameters; ``None`` = :class:`CRFOptions` defaults.

    Raises:
        DependencyError: ``pydensecrf2`` is not installed.
    """

    name = "densecrf"
    preferred_tile = 1024

    def __init__(self, options: CRFOptions | None = None) -> None:
        self.options = options or CRFOptions()
        self._dcrf = load_backend()
        if self.options.sxy is not None:
            self.sxy = float(self.options.sxy)
        else:  # until prepare() knows the resolution: the smallest guided radius, 2 px
            self.sxy = float(np.clip(self.options.spatial_scale * 2.0, 8.0, 80.0))
        self._set_halo()

    def _set_halo(self) -> None:
        self.halo = int(np.ceil(2.0 * self.sxy))

    def prepare(self, scene: Scene) -> None:
        """Derive the appearance range from the image size and the coarse mask's resolution."""
        if self.options.sxy is None:
            r = guided_radius(scene.shape, scene.coarse_scale)
            self.sxy = float(np.clip(self.options.spatial_scale * r, 8.0, 80.0))
            self._set_halo()

    def refine(self, tile: TileInput) -> TileResult:
        """Run mean-field inference on one window; returns ``Q_fg``."""
        h, w = tile.coarse.shape
        o = self.options
        crf = self._dcrf.DenseCRF2D(w, h, 2)
        crf.setUnaryEnergy(crf_unary(tile.coarse, o.confidence))
        if o.smoothness_weight > 0:
            crf.addPairwiseGaussian(sxy=o.smoothness_sxy, compat=o.smoothness_weight)
        crf.addPairwiseBilateral(sxy=self.sxy, srgb=o.srgb, rgbim=np.ascontiguousarray(tile.image),
                                 compat=o.appearance_weight)
        q = np.asarray(crf.inference(o.iterations), dtype=np.float32)
        return TileResult(np.clip(q[1].reshape(h, w), 0.0, 1.0))

    def tile_memory(self, pixels: int) -> int:
        """Lattice, messages and unaries: about 600 bytes per pixel (measured peak on 1 MPx windows)."""
        return 600 * pixels

    def describe(self) -> dict[str, Any]:
        """Parameters and halo."""
        o = self.options
        return {"name": self.name, "sxy": self.sxy, "srgb": o.srgb, "appearance_weight": o.appearance_weight,
                "smoothness_sxy": o.smoothness_sxy, "smoothness_weight": o.smoothness_weight,
                "confidence": o.confidence, "iterations": o.iterations, "halo": self.halo}


def build_densecrf(config: Any = None, device: str = "cpu") -> Refiner:
    """Registry builder (``config`` and ``device`` are unused: default parameters, CPU only).

    Raises:
        DependencyError: ``pydensecrf2`` is not installed (the message gives the pip line).
    """
    return DenseCRFRefiner()
