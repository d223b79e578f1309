"""CascadePSP for images of any size: the global step on an overview, then local refinement level by level.

The official procedure (``refiners.cascadepsp``) keeps full-resolution planes of the
whole image; this one streams. Steps:

1. **Global step** on the streamed 'area' overview of the image at the official
   working size (``tiling.cascade_grid.global_resize``, long side L or L - 1) with
   the coarse mask binarised at full resolution and then area-averaged, as the
   official global step does: three cascade iterations give ``pred_224`` (OS1) and
   ``pred_56_2`` (OS4) at the overview size.
2. **Levels** from the overview to the full size, each at most ``max_ratio`` (5)
   times the previous (``tiling.levels.plan_levels``): a 4K image has one level
   (the full image, as the official local step), a 40,000 px image three. At each
   level the previous level's maps are resampled bilinearly per tile and, as in
   the official local step, ``seg = (up(pred_224) > 0.5)``, ``inter_s8 = 2 up(pred_56) - 1``
   feed two cascade iterations on ``L x L`` patches.
3. **Grid** (``grid``). ``official`` (default): the patches of the official local step
   (``tiling.cascade_grid.plan_cascade_patches``: step ``L // 2 - 32``, the last patch
   flush with the edge), each patch's result trimmed by 16 px on interior edges and
   overlaps averaged with flat weights — the engine streams this grid band by band,
   so on an image the exact path can hold the two agree to float rounding
   (``benchmarks/cascade_paths.py``: 4K, IoU 1.0, 0 px differ). ``feather``: fewer
   tiles of ``L - 2 * HALO`` px plus a halo, blended with feathered weights (faster,
   IoU 0.993 against the exact result on the same image).
4. **Skips** (``skip``). ``official`` (default): a patch under 10 % or over 90 %
   foreground of its binarised input is not run and carries no weight; where no
   refined patch lands the output is the binarised input (the official fallback).
   ``boundary``: a window is skipped only when its binarised input lies on one side
   of 0.5 everywhere (thin structures under 10 % are refined too).

5. **Anchor** (binary and soft masks). When the user's mask is finer than the overview and
   binarising its overview loses more than a quarter of its foreground (many objects
   a few overview pixels wide: an orthophoto's roofs at 1/31 scale), the global step could only
   erase them. The levels then start from the mask's own resolution instead, with the mask as the
   first level's input (``seg`` its binarised value, ``inter`` its soft value) and no global step.

Label maps are refined class by class (each class a binary cascade; classes absent
from a window cost nothing) and merged by argmax of the refined probabilities.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from refine_cli.models.cascadepsp import CascadeRefinementModule
from refine_cli.refiners.base import Refiner, Scene, TileInput, TileResult
from refine_cli.tiling.cascade_grid import PATCH_TRIM, global_resize, patch_step, plan_cascade_patches
from refine_cli.tiling.grid import GridPlan, Tile
from refine_cli.tiling.levels import plan_levels

log = logging.getLogger(__name__)

HALO = 32
"""Context px on each side of a local tile on the feathered grid."""

SKIP_LOW, SKIP_HIGH = 0.1, 0.9
"""The official local step skips patches under 10 % or over 90 % foreground."""

ANCHOR_LOST = 0.25
"""The levels start from the user's mask when the overview loses more than this share of its foreground ..."""

ANCHOR_DETAIL = 1.0
"""... and the mask's long side is more than this many times the overview's."""


def overview_loss(share: np.ndarray) -> float:
    """The share of a mask's foreground that binarising its overview gets wrong.

    Args:
        share: ``(h, w)`` float32 in ``[0, 1]``: the fraction of each overview pixel that is
            foreground (the binarised mask, area-averaged).

    Returns:
        ``sum(min(share, 1 - share)) / sum(share)`` in ``[0, 1]`` (0 for an empty mask): about
        ``1 / (2 r)`` for one round object of radius ``r`` overview px, near 1 for objects smaller
        than an overview pixel.
    """
    s = share.astype(np.float64, copy=False)
    total = float(s.sum())
    if total <= 0.0:
        return 0.0
    return float(np.minimum(s, 1.0 - s).sum() / total)


def _forward(model: CascadeRefinementModule, images: np.ndarray, seg: np.ndarray, inter: np.ndarray | None,
             precision: str) -> dict[str, np.ndarray]:
    """One padded forward pass on a batch.

    Args:
        model: the module (eval mode) on its device.
        images: ``(N, h, w, 3)`` float32 in [0, 255] or uint8.
        seg: ``(N, h, w)`` float32 in [-1, 1].
        inter: ``(N, h, w)`` float32 in [-1, 1], or ``None`` for the global step.
        precision: ``fp32`` | ``bf16`` | ``fp16``.

    Returns:
        ``pred_224`` and ``pred_56_2``: ``(N, h, w)`` float32 in [0, 1].
    """
    from refine_cli.refiners.cascadepsp import safe_forward

    dev = model.device
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if x.dtype != torch.uint8:
        x = x / 255.0
    im = model.normalize_image(x.to(dev))
    s = torch.from_numpy(np.ascontiguousarray(seg))[:, None].to(dev)
    i8 = None if inter is None else torch.from_numpy(np.ascontiguousarray(inter))[:, None].to(dev)
    out = safe_forward(model, im, s, i8, precision=precision)
    return {k: out[k][:, 0].cpu().numpy() for k in ("pred_224", "pred_56_2")}


def _channels(coarse: np.ndarray) -> np.ndarray:
    """A window's coarse input as ``(h, w, K)`` (a one-channel input may come as ``(h, w)``)."""
    return coarse if coarse.ndim == 3 else coarse[..., None]


class CascadeLevelRefiner(Refiner):
    """The local step of one level: two cascade iterations per ``L x L`` window.

    Coarse input channels: binary ``[pred_224, pred_56]`` of the previous level, or the user's
    soft mask alone on an anchored first level; label maps ``[pred_224 of class 0 .. C-1]``.
    Output: ``[pred_224, pred_56]``, or just ``pred_224`` on the final level of a binary mask;
    label maps the same layout as the input.
    """

    name = "cascade"
    skip_rule = "binary"
    uses_torch = True
    custom_skip = True
    custom_weights = True

    def __init__(self, model: CascadeRefinementModule, size: int, precision: str, labels: bool, final: bool,
                 bytes_per_pixel: int, grid: str = "official", skip: str = "official") -> None:
        if grid not in ("official", "feather") or skip not in ("boundary", "official"):
            raise ValueError(f"unknown grid {grid!r} or skip rule {skip!r}")
        self.model, self.size, self.precision = model, size, precision
        self.labels, self.final = labels, final
        self.grid, self.skip = grid, skip
        self.halo = 0 if grid == "official" else HALO
        self.fixed_tile = size if grid == "official" else size - 2 * HALO
        self.preferred_tile = self.fixed_tile
        self.skipped_tiles_weightless = grid == "official"
        self.size_flag = f"--cascade-size {size} (one network pass)"
        self._bpp = bytes_per_pixel

    def plan_grid(self, shape: tuple[int, int], tile_size: int, overlap: int) -> GridPlan | None:
        """The official local-step grid, or ``None`` for the feathered grid.

        ``L x L`` windows every ``L // 2 - 32`` px, the last one clamped to the border
        (``tiling.cascade_grid``).
        """
        if self.grid != "official":
            return None
        patches = plan_cascade_patches(shape, self.size)
        rows = tuple(sorted({p.window.row for p in patches}))
        cols = tuple(sorted({p.window.col for p in patches}))
        return GridPlan(shape=shape, tile_size=self.size, overlap=self.size - patch_step(self.size), halo=0,
                        row_starts=rows, col_starts=cols)

    def tile_weights(self, tile: Tile, plan: GridPlan) -> np.ndarray | None:
        """Official grid: weight 1, except 0 on the 16 px of each side that is not on the image border."""
        if self.grid != "official":
            return None
        w = np.ones(tile.window.shape, np.float32)
        t = PATCH_TRIM
        if tile.low_neighbours[0]:
            w[:t] = 0
        if tile.high_neighbours[0]:
            w[-t:] = 0
        if tile.low_neighbours[1]:
            w[:, :t] = 0
        if tile.high_neighbours[1]:
            w[:, -t:] = 0
        return w

    def skip_test(self, coarse: np.ndarray) -> bool | None:
        """Whether to skip the window, by the :attr:`skip` rule.

        ``boundary``: nothing to refine (channel 0 on one side of 0.5 everywhere); ``official``:
        under 10 % or over 90 % of the window is foreground (the official local-step rule).
        """
        fg = _channels(coarse)[..., 0] > 0.5
        if self.skip == "boundary":
            return bool(fg.all() or not fg.any())
        frac = float(np.float32(fg.sum()) / np.float32(fg.size))
        return frac < SKIP_LOW or frac > SKIP_HIGH

    def out_channels(self, in_channels: int) -> int:
        """Binary: 2 (``pred_224``, ``pred_56``), 1 on the final level; labels: C."""
        return in_channels if self.labels else (1 if self.final else 2)

    def skip_output(self, coarse: np.ndarray) -> np.ndarray:
        """The binarised input (the official fallback) and, between levels, the soft OS4 map."""
        coarse = _channels(coarse)
        binary = ((coarse[..., :1] > 0.5).astype(np.float32) if not self.labels
                  else (coarse > 0.5).astype(np.float32))
        if self.labels or self.final:
            return binary
        return np.concatenate([binary, coarse[..., -1:]], axis=-1)

    def refine(self, tile: TileInput) -> TileResult:
        """Refine one window (see :meth:`refine_batch`)."""
        return self.refine_batch([tile])[0]

    def refine_batch(self, tiles: Sequence[TileInput]) -> list[TileResult]:
        """Refine windows, batching those of equal size (binary) or classes of one window (labels)."""
        if self.labels:
            return [self._refine_classes(t) for t in tiles]
        results: list[TileResult | None] = [None] * len(tiles)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, t in enumerate(tiles):
            h, w = t.rgb().shape[:2]
            groups[(h, w)].append(i)
        for idx in groups.values():
            coarse = np.stack([_channels(tiles[i].coarse) for i in idx])
            seg = np.where(coarse[..., 0] > 0.5, 1.0, -1.0).astype(np.float32)
            inter = (2 * coarse[..., -1] - 1).astype(np.float32)  # pred_56, or the user's soft mask
            out = _forward(self.model, np.stack([tiles[i].rgb() for i in idx]), seg, inter, self.precision)
            for j, i in enumerate(idx):
                p224 = out["pred_224"][j]
                prob = p224 if self.final else np.stack([p224, out["pred_56_2"][j]], axis=-1)
                results[i] = TileResult(prob)
        return [r for r in results if r is not None]

    def _refine_classes(self, tile: TileInput) -> TileResult:
        coarse = _channels(tile.coarse)
        binary = coarse > 0.5
        out = binary.astype(np.float32)
        todo = [c for c in range(coarse.shape[-1]) if binary[..., c].any() and not binary[..., c].all()]
        for c in todo:
            seg = np.where(binary[..., c], 1.0, -1.0).astype(np.float32)[None]
            inter = (2 * coarse[..., c] - 1).astype(np.float32)[None]
            out[..., c] = _forward(self.model, tile.rgb()[None], seg, inter, self.precision)["pred_224"][0]
        return TileResult(out)

    def tile_memory(self, pixels: int) -> int:
        """Activation memory of one window (measured per model)."""
        return self._bpp * pixels

    def describe(self) -> dict[str, Any]:
        """Working size, halo, precision."""
        return {"name": self.name, "size": self.size, "halo": self.halo, "final": self.final,
                "precision": self.precision}


class CascadeStreamRefiner(Refiner):
    """CascadePSP over any image size (see the module docstring).

    Args:
        model: the refinement module, in eval mode, on its device.
        size: working size L.
        precision: ``fp32`` | ``bf16`` | ``fp16``.
        labels: the coarse input is a label map of ``classes`` classes.
        classes: number of classes (labels).
        max_ratio: largest upscale between levels.
        bytes_per_pixel: activation memory per window pixel of one forward pass.
        weights_info: name and sha256 of the weights, for the report.
    """

    name = "cascade"
    uses_torch = True

    def __init__(self, model: CascadeRefinementModule, size: int = 900, precision: str = "fp32",
                 labels: bool = False, classes: int = 1, max_ratio: float = 5.0, bytes_per_pixel: int = 5000,
                 weights_info: dict[str, Any] | None = None, fast: bool = False, grid: str = "official",
                 skip: str = "official") -> None:
        self.model, self.size, self.precision = model, size, precision
        self.labels, self.classes, self.max_ratio = labels, classes, max_ratio
        self.bytes_per_pixel = bytes_per_pixel
        self.weights_info = weights_info or {}
        self.fast = fast
        self.grid, self.skip = grid, skip
        self.halo = HALO
        self._top: np.ndarray | None = None
        self._levels: list[tuple[int, int]] = []
        self.anchor: dict[str, Any] | None = None
        """Set by :meth:`prepare` when the levels start from the user's mask: its size, the overview loss."""

    def prepare(self, scene: Scene) -> None:
        """The global step on the streamed overview (binarised mask, area-averaged), or the anchor."""
        plan = global_resize(scene.shape, self.size)
        if plan.mode != "down":
            raise ValueError("the streamed cascade is for images larger than the working size; "
                             "use the exact path")
        from refine_cli.refiners.cascadepsp import GLOBAL_STAGE

        if scene.progress is not None:
            scene.progress(GLOBAL_STAGE, 0, 1)
        image, coarse = scene.read_overview(plan.out_shape, True)
        coarse = coarse if coarse.ndim == 3 else coarse[..., None]
        start = self._anchor(scene, plan.out_shape, coarse)
        if start is not None:
            assert self.anchor is not None
            lost = self.anchor["overview_loss"]
            self._top = None
            self._levels = plan_levels(start, scene.shape, self.max_ratio)
            oh, ow = plan.out_shape
            scene.notes.append(
                f"cascade: binarising the coarse mask at the global step's {ow}x{oh} would lose "
                f"{100 * lost:.0f} % of its foreground (objects a few pixels wide there), so the levels "
                f"start from the mask at {start[1]}x{start[0]}, without the global step")
        elif scene.timer is not None:
            with scene.timer.stage("refine"):
                self._top = self._global(image, coarse)
        else:
            self._top = self._global(image, coarse)
        if scene.progress is not None:
            scene.progress(GLOBAL_STAGE, 1, 1)
        if start is None:
            self._levels = self.planned_shapes(scene.shape)
        log.info("cascade: %s at %dx%d, then levels %s", "global step" if start is None else "the mask",
                 *(plan.out_shape if start is None else start)[::-1],
                 ", ".join(f"{w}x{h}" for h, w in self._levels))

    def _anchor(self, scene: Scene, overview: tuple[int, int], coarse: np.ndarray) -> tuple[int, int] | None:
        """``(h, w)`` where the levels start from the user's mask, or ``None`` for the global step.

        Anchored: a binary or soft mask more than :data:`ANCHOR_DETAIL` times finer than the overview
        whose overview loses more than :data:`ANCHOR_LOST` of its foreground (:func:`overview_loss`).

        Args:
            scene: the image; ``coarse_scale`` gives the mask's own size.
            overview: ``(h, w)`` of the global step.
            coarse: ``(h, w, 1)`` float32 in ``[0, 1]``, the binarised mask area-averaged to ``overview``.
        """
        if self.labels or self.fast or not scene.has_mask:
            return None
        H, W = scene.shape
        s = scene.coarse_scale
        native = (min(H, max(1, round(H / s))), min(W, max(1, round(W / s))))
        if max(native) <= ANCHOR_DETAIL * max(overview):
            return None
        lost = overview_loss(coarse[..., 0])
        log.info("cascade: the overview loses %.1f %% of the coarse foreground", 100 * lost)
        if lost <= ANCHOR_LOST:
            return None
        self.anchor = {"mask_shape": list(native), "overview_loss": lost}
        return native

    def _global(self, image: np.ndarray, coarse: np.ndarray) -> np.ndarray:
        """``(h', w', K)`` global-step maps.

        Binary: ``[pred_224, pred_56_2]``; labels: ``pred_224`` per class.
        """
        if not self.labels:
            out = _forward(self.model, image[None], (2 * coarse[None, ..., 0] - 1).astype(np.float32), None,
                           self.precision)
            return np.stack([out["pred_224"][0], out["pred_56_2"][0]], axis=-1)
        result = np.zeros(coarse.shape, np.float32)
        for c in range(coarse.shape[-1]):
            share = coarse[..., c]
            if share.max() <= 0.0 or share.min() >= 1.0:
                result[..., c] = share
                continue
            out = _forward(self.model, image[None], (2 * share[None] - 1).astype(np.float32), None,
                           self.precision)
            result[..., c] = out["pred_224"][0]
        return result

    def planned_shapes(self, shape: tuple[int, int]) -> list[tuple[int, int]]:
        """``(h, w)`` of the levels on an image of ``shape``: from above the overview up to the image size."""
        if self.fast:
            return [shape]
        return plan_levels(global_resize(shape, self.size).out_shape, shape, self.max_ratio)

    def input_channels(self) -> int:
        """K of the global step's maps, the first level's input: 2 (binary), else one per class."""
        return self.classes if self.labels else 2

    def level_shapes(self, shape: tuple[int, int]) -> list[tuple[int, int]]:
        """The planned levels from above the overview up to the image size."""
        assert self._levels, "prepare() first"
        return list(self._levels)

    def initial_coarse(self) -> np.ndarray | None:
        """The global step's maps at the overview size (resampled per window by the first level)."""
        return self._top

    def for_level(self, index: int, final: bool) -> Refiner:
        """The local step of one level (with ``fast``: the global ``pred_224`` resampled, no local step)."""
        if self.fast:
            return _GlobalOnly(self.labels)
        return CascadeLevelRefiner(self.model, self.size, self.precision, self.labels, final,
                                   self.bytes_per_pixel, self.grid, self.skip)

    def refine(self, tile: TileInput) -> TileResult:
        """Not used: the work happens in the level refiners."""
        raise NotImplementedError("CascadeStreamRefiner runs through its levels (for_level)")

    def fixed_memory(self) -> int:
        """The weights, and what an ONNX Runtime / OpenVINO backend keeps between calls."""
        from refine_cli.models.runtime import held_bytes

        return sum(p.numel() * p.element_size() for p in self.model.parameters()) + held_bytes(self.model)

    def describe(self) -> dict[str, Any]:
        """Mode, working size, levels, weights."""
        return {"name": self.name, "mode": "streamed", "size": self.size, "precision": self.precision,
                "fast": self.fast, "grid": self.grid, "skip": self.skip,
                "anchor": self.anchor,
                "levels": [list(s) for s in self._levels], "halo": self.halo,
                **self.weights_info}


class _GlobalOnly(Refiner):
    """``--fast`` on the streamed path: the global step's ``pred_224`` resampled to full size.

    (The official fast mode brings a downscaled result back with ``align_corners=True``;
    the streamed path resamples with ``align_corners=False`` like every other level.)
    """

    name = "cascade-global"
    skip_rule = "uniform"
    needs_image = False

    def __init__(self, labels: bool) -> None:
        self.labels = labels

    def out_channels(self, in_channels: int) -> int:
        """``pred_224`` only (binary); all classes (labels)."""
        return in_channels if self.labels else 1

    def skip_output(self, coarse: Any) -> Any:
        """Channel 0 (binary)."""
        return coarse if self.labels else coarse[..., :1]

    def refine(self, tile: TileInput) -> TileResult:
        """The resampled global maps."""
        c = tile.coarse
        return TileResult(c if self.labels or c.ndim == 2 else c[..., 0])

    def tile_memory(self, pixels: int) -> int:
        """Nothing beyond the inputs."""
        return 8 * pixels

