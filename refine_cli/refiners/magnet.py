"""MagNet and MagNet-Fast on a whole image, as separable stage functions (Huynh et al., CVPR 2021).

Written from the paper (arXiv 2104.03778 §3.2-3.3, §4.2) and from notes on how the official code
behaves; no official code. Y is the accumulated prediction, O the segmenter's prediction on a
patch, R the refinement module's output (paper notation). One run::

    stage 1       the image resized to the first scale, cut into crop-size patches (one for the presets),
                  each resized to the segmenter input: Y = O (softmax), at the input size
    stage s > 1   Y  <- bilinear(Y, scale_s)                               upsample_y
                  Yu <- 1 - (top1(Y) - top2(Y))                             uncertainty
                  patches of crop size cover the stage exactly; MagNet-Fast keeps the n with the
                  highest mean Yu (descending), full MagNet keeps all       select_patches
                  O  <- segmenter(patch of the image resized to scale_s)    predict_patches
                  R  <- softmax(refine(O, crop(Y)))   (official test order) refine_patches
                  R patches are averaged into a stage map                   assemble
                  Q  <- up(median_k(down(Yu * (1 - Ru))))                   point_scores
                  the k pixels with the largest Q > 0 inside the refined patches (canonical ties)
                                                                            select_points
                  Y[:, those] <- R[:, those]                                replace
                  (preset rule ``confident``: only where R is more certain than Y)
    end           Y resized to the image (when the last scale is not the image size);
                  labels = argmax, uncertainty = 1 - (top1 - top2) of Y
    snap          2 classes with the preset's snap (``--preset binary``): the engine's one level
                  runs the edge snap on the class-1 probability of Y (``MagnetRefiner``), and
                  the uncertainty map is 1 - |2p - 1| of the snapped probability

Each step is a function on tensors (numpy only at the edges: image in, result out), so
a tiled version can reuse them (``magnet_points`` holds the tile-able score/top-k/replace
primitives, e.g. :class:`~refine_cli.refiners.magnet_points.StreamingTopK`).

**Differences from the official code**, all following the paper:

1. Patches are ranked by mean Yu **descending** (the paper's "most uncertain"); the official
   code sorts ascending since commit ``47043fc`` and refines the *least* uncertain patches.
2. Points are the top-k of Q **inside** the refined patches; the official code zeroes the
   score inside them (a mask that should have been inverted) and then keeps only points
   inside, so its replaced points come from median spill-over near patch borders and from
   ``torch.topk`` tie-breaking among zeros (backend dependent).
3. MagNet-Fast follows the paper's schedules (Cityscapes 256x128 -> 512 -> 2048, DeepGlobe
   612 -> 1224 -> 2448, 3 patches per scale); the official fast script keeps all four
   Cityscapes scales with 4 patches.
4. k is the paper's 2**16 points per scale (the scripts use 2**15 / 75 % / 90 % of the area).
5. Exact geometry: patches cover the stage exactly and overlaps are averaged; Y crops are
   exact bilinear crops and patch means exact box means (the official code uses
   ``roi_align(aligned=False)`` with a half-pixel shift); ties in top-k go to the lowest
   flat index.
6. Points with a zero score Q are never replaced, so k is an upper bound. Nothing says R is
   better there, and the tie-break among zeros would take the top rows of the refined
   patches: rectangles in Y that have nothing to do with the image.
7. ``MagnetPreset.replace="confident"`` (``--preset binary``): a selected point takes R only
   where R is more certain than Y. The project-trained binary module hedges (R ~ 0.22 where
   the segmenter and Y agree on background), and the paper's rule copied that hedge into
   most of every refined patch.

:func:`run_magnet` with ``selection="official"`` reproduces defects 1 and 2 (ascending
patch order; score zeroed inside a 10-px-inset mask of the refined patches, then only
points inside it kept). It exists **only** to compare the official choice with the
paper's; never use it for results.

Shapes: images ``(H, W, 3)`` uint8 RGB; probability tensors ``(1, C, h, w)`` float32;
single-channel maps ``(1, 1, h, w)``; flat indices ``y * W + x`` over one stage map.
Sizes are written ``(w, h)`` / ``(W, H)`` where OpenCV-style, ``hw`` where rows come first.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from refine_cli.errors import InputError, UsageError
from refine_cli.refiners.magnet_points import (
    PointScore,
    canonical_topk,
    certainty,
    check_replace_rule,
    confident_mask,
    covered_area,
    crop_resize,
    ensemble_patches,
    error_score,
    patch_grid,
    patch_mean,
    rank_patches,
    replace_points,
    score_map,
    stage_points,
    uncertainty,
)
from refine_cli.report.timing import StageTimer
from refine_cli.segmenters.base import Segmenter, resize_probs
from refine_cli.tiling.grid import Window

if TYPE_CHECKING:
    from refine_cli.models.magnet import RefinementMagNet

logger = logging.getLogger(__name__)

StageProgress = Callable[[str, int, int], None]
"""``progress(stage, done, total)`` of a MagNet run (``total = 0``: amount unknown)."""

SEGMENTER_STAGE = "magnet segmenter"
SCALES_STAGE = "magnet scales"

PAPER_POINTS = 2**16
"""Points replaced per scale in the paper (§4.2.3, Table 6, Fig. 7; DeepGlobe §4.3)."""

OFFICIAL_INSET = 10
"""Inset in px of the official code's refined-patch mask (selection="official" only)."""

SELECTIONS = ("paper", "official")
"""Patch/point selection rules: the paper's, or the official code's defects (comparison only)."""

SNAP_MODES = ("auto", "on", "off")
"""Values of the edge snap setting of :class:`MagnetRefiner`."""

SNAP_RADIUS = 16
"""Radius in px of MagNet's edge snap (eps :data:`SNAP_EPS`). Chosen on 48 tuning composites of the held-out
portraits (seeds 4 000 037 and 4 000 039, never the benchmark's): mBA after the binary preset rose
monotonically with the radius (8: 0.701, 16: 0.724, 32: 0.740); 16 keeps the filter's support (2 r) within
the 32 px beyond which background must stay certain, and limits how far the boundary can be pulled to an
unrelated edge in real photos (``weights/README.md``, magnet-binary-refine-v1)."""

SNAP_EPS = 1e-4
"""Regularisation of MagNet's edge snap (the lite cascade's; 1e-3 was slightly worse on the tuning
composites)."""

STAGE_MODES = ("all", "none")
"""Values of the ``stages`` setting of :class:`MagnetRefiner`: the schedule's refinement stages, or none
(the segmenter's first pass upsampled to the image, then the snap if on; for comparisons)."""

Size = tuple[int, int]


# --------------------------------------------------------------------------- presets and schedules


@dataclass(frozen=True)
class MagnetPreset:
    """One MagNet setting: segmenter, scales, patches, points, smoothing, checkpoints.

    Attributes:
        name: ``--preset`` value.
        segmenter: segmenter name (``refine_cli.segmenters``) or model path.
        num_classes: C of the segmenter and of the refinement modules.
        input_size: ``(w, h)`` segmenter input.
        crop_size: ``(w, h)`` patch size at the stage scale; ``None`` = ``input_size``.
        scales: ``(W, H)`` of every stage of full MagNet, first (coarse) stage included;
            ``None`` derives them from the image size (:func:`generic_scales`).
        fast_scales: the MagNet-Fast subset of ``scales`` (``None``: all of them).
        n_patches: patches refined per stage by MagNet-Fast.
        n_points: points replaced per stage: a count (> 1) or a fraction of the candidate area.
        kernel: median window side of the score Q.
        refinement: checkpoint names (or paths), one per refinement stage of ``scales``
            (``scales[1:]``), or a single one shared by every stage.
        description: one line for listings.
        replace: which selected points take R: ``all`` (the paper) or ``confident`` (only where R
            is more certain than Y; :func:`~refine_cli.refiners.magnet_points.confident_mask`).
        snap: end 2-class runs with the edge snap (``refiners.classical.EdgeSnapRefiner``) by default.
    """

    name: str
    segmenter: str
    num_classes: int
    input_size: Size
    crop_size: Size | None
    scales: tuple[Size, ...] | None
    fast_scales: tuple[Size, ...] | None
    n_patches: int
    n_points: float
    kernel: int
    refinement: tuple[str, ...]
    description: str = ""
    replace: str = "all"
    snap: bool = False

    def __post_init__(self) -> None:
        check_replace_rule(self.replace)
        if self.scales is not None:
            if len(self.scales) < 2:
                raise ValueError(f"preset {self.name}: needs a coarse scale and at least one refinement "
                                 "scale")
            if len(self.refinement) not in (1, len(self.scales) - 1):
                raise ValueError(f"preset {self.name}: give 1 or {len(self.scales) - 1} refinement "
                                 "checkpoints")
            if self.fast_scales is not None and not set(self.fast_scales) <= set(self.scales):
                raise ValueError(f"preset {self.name}: fast_scales must be a subset of scales")
        elif len(self.refinement) != 1:
            raise ValueError(f"preset {self.name}: a generic schedule takes one shared refinement checkpoint")

    def schedule(
        self, image_hw: Size, *, fast: bool = True, n_patches: int | None = None,
        n_points: float | None = None,
    ) -> Schedule:
        """The stages to run on an image of ``image_hw``.

        Args:
            image_hw: ``(H, W)`` of the image.
            fast: MagNet-Fast (``fast_scales``, ``n_patches`` per stage) instead of full MagNet
                (``scales``, every patch).
            n_patches: override of :attr:`n_patches` (MagNet-Fast only).
            n_points: override of :attr:`n_points`.

        Returns:
            The :class:`Schedule`.
        """
        crop = self.crop_size or self.input_size
        if self.scales is None:
            chosen = generic_scales(image_hw, self.input_size)
            ckpt = [-1] + [0] * (len(chosen) - 1)
        else:
            scales = list(self.scales)
            chosen = list(self.fast_scales or scales) if fast else scales
            chosen = [scales[0]] + [s for s in chosen if s != scales[0]]
            shared = len(self.refinement) == 1
            ckpt = [-1] + [0 if shared else scales.index(s) - 1 for s in chosen[1:]]
        patches = (n_patches if n_patches is not None else self.n_patches) if fast else None
        if patches is not None and patches < 1:
            raise UsageError(f"--n-patches {patches} must be >= 1")
        points = float(n_points if n_points is not None else self.n_points)
        stage_points(points, 1)  # validates
        stages = [
            StagePlan(index=i + 1, scale=s, crop=crop, n_patches=None if i == 0 else patches, n_points=points,
                      refinement=ckpt[i])
            for i, s in enumerate(chosen)
        ]
        return Schedule(
            preset=self.name, image_hw=(int(image_hw[0]), int(image_hw[1])), input_size=self.input_size,
            kernel=self.kernel, fast=fast, stages=tuple(stages), replace=self.replace,
        )


@dataclass(frozen=True)
class StagePlan:
    """One stage of a schedule.

    Attributes:
        index: 1-based stage number (1 = the coarse pass, no refinement).
        scale: ``(W, H)`` the image is resized to.
        crop: ``(w, h)`` patch size at that scale.
        n_patches: patches to refine (``None``: all).
        n_points: points to replace (count > 1 or fraction of the candidate area).
        refinement: index of the refinement module (-1 for stage 1).
    """

    index: int
    scale: Size
    crop: Size
    n_patches: int | None
    n_points: float
    refinement: int

    @property
    def hw(self) -> Size:
        """``(H, W)`` of the stage."""
        return (self.scale[1], self.scale[0])


@dataclass(frozen=True)
class Schedule:
    """The resolved stages of one run.

    Attributes:
        preset: preset name.
        image_hw: ``(H, W)`` of the image.
        input_size: ``(w, h)`` of the segmenter.
        kernel: median window side of Q.
        fast: MagNet-Fast or full MagNet.
        stages: stage 1 (coarse) first.
        replace: ``all`` | ``confident`` (see :class:`MagnetPreset`).
    """

    preset: str
    image_hw: Size
    input_size: Size
    kernel: int
    fast: bool
    stages: tuple[StagePlan, ...]
    replace: str = "all"

    @property
    def input_hw(self) -> Size:
        """``(h, w)`` of the segmenter input."""
        return (self.input_size[1], self.input_size[0])


def generic_scales(image_hw: Size, input_size: Size) -> list[Size]:
    """Stage sizes for any image, derived from the segmenter's input size.

    With ``r = max(W / w_in, H / h_in)`` (how much larger the image is than the input)
    and ``n = max(1, ceil(log2 r))`` refinement stages, the stages are::

        stage 1       (w_in, h_in)                   the whole image at the input size
        stage 1 + j   (round(W / 2^(n-j)), round(H / 2^(n-j)))   j = 1 .. n; the last is (W, H)

    so each refinement stage doubles the resolution and the last works at full
    resolution. Cityscapes (2048x1024, input 256x128) gives 256x128, 512x256, 1024x512,
    2048x1024, the official schedule.

    Args:
        image_hw: ``(H, W)`` px.
        input_size: ``(w, h)`` segmenter input.

    Returns:
        ``(W, H)`` per stage.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    wi, hi = int(input_size[0]), int(input_size[1])
    ratio = max(w / wi, h / hi)
    n = max(1, math.ceil(math.log2(ratio) - 1e-9)) if ratio > 1 else 1
    scales = [(wi, hi)]
    for j in range(1, n + 1):
        f = 2 ** (n - j)
        scales.append((max(1, round(w / f)), max(1, round(h / f))))
    return scales


PRESETS: dict[str, MagnetPreset] = {
    "cityscapes": MagnetPreset(
        name="cityscapes", segmenter="magnet-cityscapes-hrnet", num_classes=19, input_size=(256, 128),
        crop_size=(256, 128), scales=((256, 128), (512, 256), (1024, 512), (2048, 1024)),
        fast_scales=((256, 128), (512, 256), (2048, 1024)), n_patches=3, n_points=PAPER_POINTS, kernel=5,
        refinement=(
            "magnet-cityscapes-refine-512", "magnet-cityscapes-refine-1024", "magnet-cityscapes-refine-2048",
        ),
        description="Cityscapes street scenes (19 classes), HRNet-W18-small+OCR, 2048x1024 geometry",
    ),
    "deepglobe": MagnetPreset(
        name="deepglobe", segmenter="magnet-deepglobe-fpn", num_classes=7, input_size=(508, 508),
        crop_size=(612, 612), scales=((612, 612), (1224, 1224), (2448, 2448)), fast_scales=None, n_patches=3,
        n_points=PAPER_POINTS, kernel=11, refinement=("magnet-deepglobe-refine",),
        description="DeepGlobe land cover (7 classes), ResNet-50 FPN, 2448x2448 geometry",
    ),
    "binary": MagnetPreset(
        name="binary", segmenter="mediapipe-selfie", num_classes=2, input_size=(256, 256), crop_size=None,
        scales=None, fast_scales=None, n_patches=3, n_points=PAPER_POINTS, kernel=5,
        refinement=("magnet-binary-refine",),
        description="person/background with the MediaPipe selfie segmenter; generic schedule for any size, "
                    "then the edge snap",
        replace="confident", snap=True,
    ),
}
"""``--preset`` values. Cityscapes/DeepGlobe scales are absolute (the datasets' image sizes): other
image sizes are resized to them and the result back, as the official code does. ``binary`` replaces
only where R is more certain than Y (its module hedges at ~0.22 on certain background; with the paper's
rule that hedge filled the refined patches) and ends with the edge snap; both were chosen on tuning
composites (``benchmarks/magnet_binary.py --split tune``, see ``weights/README.md``)."""


def custom_preset(segmenter: Segmenter, refinement: str, *, kernel: int = 5) -> MagnetPreset:
    """A generic-schedule preset for any segmenter and a matching refinement checkpoint.

    Args:
        segmenter: the loaded segmenter (its input size and class count are used).
        refinement: checkpoint path or registry name of a C-class refinement module.
        kernel: median window side of Q.
    """
    return MagnetPreset(
        name="custom", segmenter=segmenter.name, num_classes=segmenter.num_classes,
        input_size=segmenter.input_size, crop_size=None, scales=None, fast_scales=None, n_patches=3,
        n_points=PAPER_POINTS, kernel=kernel, refinement=(refinement,),
        description=f"generic schedule for {segmenter.name}",
    )


def get_preset(name: str) -> MagnetPreset:
    """The preset called ``name``.

    Raises:
        UsageError: unknown name (lists the valid ones).
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown --preset {name!r}: use one of {', '.join(PRESETS)}") from None


# --------------------------------------------------------------------------- coarse masks


def coarse_to_probs(
    mask: np.ndarray, num_classes: int, classes: Sequence[str] | None = None, *,
    labels: bool | None = None, source: str = "--mask",
) -> np.ndarray:
    """Turn a user's coarse mask into C-class probabilities (the first-stage Y).

    * ``(h, w, C)`` float: probabilities, taken as they are (checked to lie in [0, 1]);
    * ``(h, w)`` integer label map with values ``0 .. C-1`` (or ``labels=True``): one-hot;
    * ``(h, w)`` bool, float in [0, 1], or integer ``{0, max}`` (``{0, 255}`` ...): the
      foreground probability p of a binary mask, ``[1 - p, p]``; only for C = 2.

    Args:
        mask: the mask at any resolution (the pipeline resamples it).
        num_classes: C of the segmenter / refinement modules.
        classes: their class names (for messages).
        labels: force (True) or forbid (False) reading an integer mask as labels.
        source: what to call the mask in messages.

    Returns:
        ``(h, w, C)`` float32 probabilities.

    Raises:
        InputError: the mask is not in the segmenter's label space (the message says how to fix it).
    """
    arr = np.asarray(mask)
    names = list(classes) if classes else [str(i) for i in range(num_classes)]
    space = f"{num_classes} classes (" + ", ".join(f"{i} {n}" for i, n in enumerate(names[:8]))
    space += ", ...)" if num_classes > 8 else ")"
    if arr.ndim == 3:
        if arr.shape[2] != num_classes:
            raise InputError(
                f"{source} has {arr.shape[2]} probability channels but the segmenter has {space}"
            )
        probs = arr.astype(np.float32, copy=False)
        if not np.isfinite(probs).all() or probs.min() < -1e-4 or probs.max() > 1 + 1e-4:
            raise InputError(f"{source}: class probabilities must lie in [0, 1]")
        return np.clip(probs, 0.0, 1.0)
    if arr.ndim != 2:
        raise InputError(
            f"{source} must be a (h, w) mask or label map, or (h, w, C) probabilities; got {arr.shape}"
        )
    binary: np.ndarray | None = None
    if arr.dtype == np.bool_:
        binary = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            raise InputError(f"{source} has negative values; labels are class indices 0..{num_classes - 1}")
        top = int(np.iinfo(arr.dtype).max)
        two_level = set(np.unique(arr).tolist()) <= {0, top}
        if labels is False or (labels is None and hi >= num_classes and two_level):
            binary = arr.astype(np.float32) / np.float32(top)
        elif hi >= num_classes:
            raise InputError(
                f"{source} holds labels up to {hi} but the segmenter has {space}; a label map must use the "
                f"segmenter's label space 0..{num_classes - 1} (e.g. Cityscapes train ids, not label ids)"
            )
        else:
            onehot = np.zeros((*arr.shape, num_classes), np.float32)
            np.put_along_axis(onehot, arr.astype(np.intp)[..., None], 1.0, axis=2)
            return onehot
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise InputError(f"{source}: a float mask must hold probabilities in [0, 1]")
        binary = arr.astype(np.float32)
    else:
        raise InputError(f"{source} has unsupported dtype {arr.dtype}")
    if num_classes != 2:
        raise InputError(
            f"{source} is a binary mask but the segmenter has {space}; give a label map in that label space, "
            "or use --preset binary for foreground/background masks"
        )
    return np.stack([1.0 - binary, binary], axis=-1).astype(np.float32)


# --------------------------------------------------------------------------- stage steps


@dataclass(frozen=True)
class LinearTaps:
    """Bilinear taps along one axis (``align_corners=False``) for a run of output indices.

    Output index ``d`` reads ``w0[d] * x[i0[d]] + w1[d] * x[i1[d]]``. Positions and
    weights follow PyTorch's CPU kernel: ``s = float32(n_in) / n_out``,
    ``p = float32(s * (d + 1/2) - 1/2)`` rounded once (fused), clamped at 0,
    ``i0 = min(floor(p), n_in - 1)``, ``i1 = i0 + 1`` inside the axis (else ``i0``),
    ``w1 = clamp(p - i0, 0, 1)``, ``w0 = 1 - w1``; equal lengths are the identity.

    Attributes:
        i0: ``(n,)`` int64 first source index.
        i1: ``(n,)`` int64 second source index.
        w0: ``(n,)`` float32 weight of ``i0``.
        w1: ``(n,)`` float32 weight of ``i1``.
        identity: the axis is not resized (``i0 == i1 == d``, ``w0 = 1``, ``w1 = 0``).
    """

    i0: torch.Tensor
    i1: torch.Tensor
    w0: torch.Tensor
    w1: torch.Tensor
    identity: bool


def linear_taps(n_in: int, n_out: int, start: int = 0, stop: int | None = None) -> LinearTaps:
    """:class:`LinearTaps` of output indices ``start .. stop - 1`` when resizing ``n_in`` to ``n_out``.

    The taps of an index depend only on ``(n_in, n_out, d)``, so any run of
    output indices (a tile) gets the same values as the whole axis.

    Args:
        n_in: source length (>= 1).
        n_out: output length (>= 1).
        start: first output index.
        stop: one past the last (default ``n_out``).
    """
    stop = n_out if stop is None else stop
    d = torch.arange(start, stop, dtype=torch.int64)
    if n_in == n_out:
        n = d.numel()
        return LinearTaps(d, d, torch.ones(n), torch.zeros(n), identity=True)
    scale = float(torch.tensor(float(n_in)) / torch.tensor(float(n_out)))  # float32 division, as ATen
    # s * (d + 1/2) is exact in float64 (24-bit factors), so one rounding to float32 = a fused multiply-add
    pos = (scale * (d.to(torch.float64) + 0.5) - 0.5).to(torch.float32).clamp_min(0.0)
    i0 = pos.to(torch.int64).clamp_max(n_in - 1)
    w1 = (pos - i0.to(torch.float32)).clamp(0.0, 1.0)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    return LinearTaps(i0, i1, 1.0 - w1, w1, identity=False)


def upsample_window(
    read: Callable[[Window], torch.Tensor], src_hw: Size, out_hw: Size, window: Window | None = None
) -> torch.Tensor:
    """A window of the bilinear enlargement (``align_corners=False``) of a map, reading only what it needs.

    Separable: ``h = w0 * x[:, c0] + w1 * x[:, c1]`` along columns, then the same
    along rows, each as one fused multiply-add (``torch.addcmul``) after one product,
    the rounding PyTorch's CPU ``interpolate`` kernel shows. Every output pixel is
    computed from global indices only, so tiles agree bit for bit with the whole map.

    Args:
        read: ``f(Window) -> (N, C, h, w)`` float32 source values over a window of ``src_hw``.
        src_hw: ``(h, w)`` of the source.
        out_hw: ``(H, W)`` of the enlarged map; each side >= the source's.
        window: the output window (default: all of it).

    Returns:
        ``(N, C, window.height, window.width)`` float32.
    """
    if out_hw[0] < src_hw[0] or out_hw[1] < src_hw[1]:
        raise ValueError(f"upsample_window enlarges; {src_hw} -> {out_hw} shrinks")
    window = window or Window.full(out_hw)
    rows = linear_taps(src_hw[0], out_hw[0], window.row, window.row_end)
    cols = linear_taps(src_hw[1], out_hw[1], window.col, window.col_end)
    r_lo, r_hi = int(rows.i0[0]), int(rows.i1[-1]) + 1
    c_lo, c_hi = int(cols.i0[0]), int(cols.i1[-1]) + 1
    x = read(Window(r_lo, c_lo, r_hi - r_lo, c_hi - c_lo))
    if not cols.identity:
        a, b = _take(x, cols.i0 - c_lo, -1), _take(x, cols.i1 - c_lo, -1)
        x = torch.addcmul(b * cols.w1, a, cols.w0)
    if not rows.identity:
        a, b = _take(x, rows.i0 - r_lo, -2), _take(x, rows.i1 - r_lo, -2)
        x = torch.addcmul(b * rows.w1[:, None], a, rows.w0[:, None])
    return x


def _take(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.index_select(dim, index)`` for CPU tensors through numpy (10x faster along the last axis)."""
    if x.device.type != "cpu":
        return x.index_select(dim, index.to(x.device))
    return torch.from_numpy(np.take(x.detach().numpy(), index.numpy(), axis=dim))


def upsample_y(y: torch.Tensor, scale: Size) -> torch.Tensor:
    """Y at the next stage's size: bilinear, ``align_corners=False`` (antialiased if it shrinks).

    Enlargement goes through :func:`upsample_window`, which the tiled pipeline
    (:mod:`~refine_cli.refiners.magnet_tiled`) also uses, so both agree bit for bit;
    it equals PyTorch's ``interpolate`` on CPUs with fused multiply-add.

    Args:
        y: ``(1, C, h, w)`` probabilities.
        scale: ``(W, H)`` of the stage.

    Returns:
        ``(1, C, H, W)``.
    """
    return resize_y(y, (scale[1], scale[0]))


def resize_y(y: torch.Tensor, size_hw: Size) -> torch.Tensor:
    """``y`` at ``size_hw``: itself, :func:`upsample_window` to enlarge, else antialiased ``resize_probs``.

    Args:
        y: ``(N, C, h, w)`` float32.
        size_hw: ``(H, W)``.
    """
    src_hw = (int(y.shape[-2]), int(y.shape[-1]))
    dst_hw = (int(size_hw[0]), int(size_hw[1]))
    if src_hw == dst_hw:
        return y
    if dst_hw[0] >= src_hw[0] and dst_hw[1] >= src_hw[1] and y.device.type == "cpu":
        return upsample_window(lambda w: y[..., w.row : w.row_end, w.col : w.col_end], src_hw, dst_hw)
    return resize_probs(y, dst_hw)


def stage_image(image: np.ndarray, scale: Size, segmenter: Segmenter) -> np.ndarray:
    """The image at a stage's scale, resized the segmenter's way (official: OpenCV bilinear).

    Returns:
        ``(H, W, 3)`` uint8 (the image itself when the size already matches).
    """
    if image.shape[1] == scale[0] and image.shape[0] == scale[1]:
        return image
    return segmenter.resize(image, scale)


def predict_patches(
    segmenter: Segmenter, image: np.ndarray, boxes: Sequence[Window], batch_size: int = 1,
    device: torch.device | None = None,
) -> torch.Tensor:
    """O: the segmenter on each patch, resized to its input size.

    Args:
        segmenter: the coarse segmenter.
        image: ``(H, W, 3)`` uint8 RGB at the stage scale.
        boxes: patch windows in the stage's pixels.
        batch_size: patches per call.
        device: where to put the result (default: the segmenter's).

    Returns:
        ``(P, C, h, w)`` float32 probabilities at the input size.
    """
    return predict_crops(segmenter, [image[b.slices] for b in boxes], batch_size, device)


def predict_crops(
    segmenter: Segmenter, crops: Sequence[np.ndarray], batch_size: int = 1, device: torch.device | None = None
) -> torch.Tensor:
    """O of patches given as stage-image crops (``(h, w, 3)`` uint8 each); see :func:`predict_patches`.

    Returns:
        ``(P, C, h_in, w_in)`` float32.
    """
    inputs = np.stack([segmenter.resize(c, segmenter.input_size) for c in crops])
    parts = [segmenter.predict_torch(torch.from_numpy(inputs[i : i + batch_size]))
             for i in range(0, len(inputs), max(1, batch_size))]
    out = torch.cat(parts).float()
    return out.to(device) if device is not None else out


def select_patches(
    yu: torch.Tensor, boxes: Sequence[Window], n_patches: int | None, selection: str = "paper"
) -> tuple[list[int], torch.Tensor]:
    """Which patches to refine, and the mean Yu of every patch.

    Args:
        yu: ``(1, 1, H, W)`` uncertainty of Y at the stage size.
        boxes: the stage's patches.
        n_patches: how many (``None``: all, in index order).
        selection: ``paper`` (highest mean Yu first) or ``official`` (lowest first: the
            official code's defect, for comparison only).

    Returns:
        ``(indices, means)``: patch indices in selection order, ``(P,)`` float32 means.
    """
    means = patch_mean(yu, boxes)
    if n_patches is None or n_patches >= len(boxes):
        return list(range(len(boxes))), means
    if selection == "official":
        values = means.tolist()
        order = sorted(range(len(values)), key=lambda i: (values[i], i))
        return order[:n_patches], means
    return rank_patches(means, n_patches), means


@torch.inference_mode()
def refine_patches(
    module: RefinementMagNet, o: torch.Tensor, y: torch.Tensor, boxes: Sequence[Window], batch_size: int = 1
) -> torch.Tensor:
    """R on each patch: ``softmax(refine(O, crop(Y)))`` in the official test order (O first).

    Args:
        module: the refinement module (eval mode).
        o: ``(P, C, h, w)`` segmenter probabilities on the patches.
        y: ``(1, C, H, W)`` Y at the stage size.
        boxes: the P patch windows in the stage's pixels.
        batch_size: patches per forward pass.

    Returns:
        ``(P, C, h, w)`` float32 probabilities.
    """
    size = (o.shape[-2], o.shape[-1])
    return refine_crops(module, o, torch.cat([crop_resize(y, b, size) for b in boxes]), batch_size)


@torch.inference_mode()
def refine_crops(
    module: RefinementMagNet, o: torch.Tensor, y_crops: torch.Tensor, batch_size: int = 1
) -> torch.Tensor:
    """R from O and the Y crops already resized to the input size (``(P, C, h, w)`` each).

    Returns:
        ``(P, C, h, w)`` float32 probabilities.
    """
    outs = [torch.softmax(module(o[i : i + batch_size], y_crops[i : i + batch_size]), dim=1)
            for i in range(0, len(o), max(1, batch_size))]
    return torch.cat(outs)


def assemble(r: torch.Tensor, boxes: Sequence[Window], stage_hw: Size) -> tuple[torch.Tensor, torch.Tensor]:
    """R patches resized into a stage map, overlaps averaged.

    Returns:
        ``(R, covered)``: ``(1, C, H, W)`` (0 where no patch lies) and ``(H, W)`` bool.
    """
    return ensemble_patches([r[i : i + 1] for i in range(len(boxes))], boxes, stage_hw)


def official_mask(boxes: Sequence[Window], stage_hw: Size, inset: int = OFFICIAL_INSET) -> torch.Tensor:
    """The official code's refined-patch mask: each patch shrunk by ``inset`` px (comparison only).

    Returns:
        ``(H, W)`` bool.
    """
    mask = torch.zeros(stage_hw, dtype=torch.bool)
    for b in boxes:
        r0, c0 = b.row + inset, b.col + inset
        r1, c1 = b.row_end - inset, b.col_end - inset
        if r1 > r0 and c1 > c0:
            mask[r0:r1, c0:c1] = True
    return mask


def point_scores(
    yu: torch.Tensor, r: torch.Tensor, input_hw: Size, kernel: int, zero_inside: torch.Tensor | None = None
) -> tuple[torch.Tensor, PointScore]:
    """E = Yu * (1 - Ru) and Q = F(E) (nearest down to the input size, median, nearest up).

    Args:
        yu: ``(1, 1, H, W)`` uncertainty of Y.
        r: ``(1, C, H, W)`` assembled R (0 outside the refined patches, so E = 0 there).
        input_hw: ``(h, w)`` segmenter input: where the median runs (official geometry).
        kernel: odd median window side.
        zero_inside: ``(H, W)`` bool where E is zeroed first (the official defect; comparison only).

    Returns:
        ``(E, scores)`` with E ``(1, 1, H, W)`` and :class:`PointScore` (Q at ``scores.q``).
    """
    e = error_score(yu, certainty(r))
    if zero_inside is not None:
        e = e.masked_fill(zero_inside.to(e.device), 0.0)
    return e, score_map(e, input_hw, kernel)


def select_points(q: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The k pixels with the largest Q among ``valid`` (ties: lowest flat index).

    Returns:
        ``(k',)`` int64 flat indices, ascending (``k' = min(k, candidates)``).
    """
    return canonical_topk(q, k, valid)


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class StageStats:
    """What one stage did.

    Attributes:
        stage: 1-based stage number.
        scale: ``(W, H)``.
        patches_total: patches covering the stage.
        patches: refined patch indices (row-major over the stage's grid), in selection order.
        patch_uncertainty: mean Yu of those patches, same order.
        candidates: pixels eligible for replacement: those of the refined patches' union with a
            positive score Q (``selection="official"``: the official inset mask).
        k: points asked for.
        points: points selected by the top-k cut (``min(k, candidates)``); with ``replace="confident"``
            only those where R is more certain than Y take R.
        seconds: wall time per step (``upsample``, ``uncertainty``, ``select``, ``segment``,
            ``refine``, ``assemble``, ``score``, ``topk``, ``replace``).
    """

    stage: int
    scale: Size
    patches_total: int
    patches: tuple[int, ...]
    patch_uncertainty: tuple[float, ...]
    candidates: int
    k: int
    points: int
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view."""
        return {
            "stage": self.stage, "scale": list(self.scale), "patches_total": self.patches_total,
            "patches": list(self.patches), "patch_uncertainty": [round(v, 6) for v in self.patch_uncertainty],
            "candidates": self.candidates, "k": self.k, "points": self.points,
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "total_seconds": round(self.total, 4),
        }

    @property
    def total(self) -> float:
        """Seconds over all steps."""
        return float(sum(self.seconds.values()))


@dataclass
class StageTrace:
    """Intermediate tensors of one refinement stage (CPU copies; for tests and comparisons).

    Attributes:
        y: ``(1, C, H, W)`` Y after upsampling, before replacement.
        yu: ``(1, 1, H, W)`` its uncertainty.
        boxes: all patches of the stage.
        patch_means: ``(P,)`` mean Yu per patch.
        chosen: refined patch indices in selection order.
        r: ``(1, C, H, W)`` assembled R.
        covered: ``(H, W)`` bool, the refined patches' union.
        e: ``(1, 1, H, W)`` E.
        score: the :class:`PointScore` (Q at ``score.q``).
        indices: selected flat indices (the top-k cut), ascending.
        y_out: Y after replacement.
        replaced: the selected indices that took R (all of them, or with ``replace="confident"`` those
            where R is more certain than Y), ascending.
    """

    y: torch.Tensor
    yu: torch.Tensor
    boxes: list[Window]
    patch_means: torch.Tensor
    chosen: list[int]
    r: torch.Tensor
    covered: torch.Tensor
    e: torch.Tensor
    score: PointScore
    indices: torch.Tensor
    y_out: torch.Tensor
    replaced: torch.Tensor


@dataclass
class MagnetResult:
    """The output of :func:`run_magnet`.

    Attributes:
        probs: ``(H, W, C)`` float32 final Y at the image size (HWC).
        labels: ``(H, W)`` uint8 (uint16 when C > 256) argmax of ``probs`` (ties: lowest class).
        uncertainty: ``(H, W)`` float32 ``1 - (top1 - top2)`` of ``probs``, in [0, 1].
        stages: per-stage statistics, stage 1 first.
        schedule: what was run.
        classes: class names.
        trace: per refinement stage intermediates when asked for (else empty).
    """

    probs: np.ndarray
    labels: np.ndarray
    uncertainty: np.ndarray
    stages: list[StageStats]
    schedule: Schedule
    classes: tuple[str, ...]
    trace: list[StageTrace] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        """Plain-JSON facts: schedule and per-stage stats."""
        return {
            "preset": self.schedule.preset, "mode": "magnet-fast" if self.schedule.fast else "magnet",
            "input_size": list(self.schedule.input_size), "kernel": self.schedule.kernel,
            "replace": self.schedule.replace, "stages": [s.to_dict() for s in self.stages],
            "patches": sum(len(s.patches) for s in self.stages), "points": sum(s.points for s in self.stages),
        }


def _clock(device: torch.device) -> StageTimer:
    """A lap timer of a stage's steps; on CUDA each lap waits for the device's queued work."""
    return StageTimer((), sync=torch.cuda.synchronize if device.type == "cuda" else None)


def _module_classes(module: torch.nn.Module) -> int:
    return int(getattr(module, "n_classes", -1))


def first_stage(
    image: np.ndarray, segmenter: Segmenter, plan: StagePlan, batch_size: int = 1,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, StageStats]:
    """Stage 1: the segmenter on the image at the first scale.

    With one patch covering the scale (the presets), Y is O at the segmenter's input
    size, as in the official pipeline; with several, the patches are assembled at the scale.

    Returns:
        ``(Y, stats)`` with Y ``(1, C, h, w)``.
    """
    clock = _clock(device or segmenter.device)
    img = stage_image(image, plan.scale, segmenter)
    boxes = patch_grid(plan.hw, (plan.crop[1], plan.crop[0]))
    o = predict_patches(segmenter, img, boxes, batch_size, device)
    y = o if len(boxes) == 1 and boxes[0].shape == plan.hw else assemble(o, boxes, plan.hw)[0]
    clock.lap("segment")
    stats = StageStats(
        plan.index, plan.scale, len(boxes), tuple(range(len(boxes))), (), 0, 0, 0, clock.seconds()
    )
    return y, stats


def refinement_stage(
    image: np.ndarray, y: torch.Tensor, segmenter: Segmenter, module: RefinementMagNet, plan: StagePlan,
    schedule: Schedule, *, selection: str = "paper", batch_size: int = 1, trace: bool = False,
) -> tuple[torch.Tensor, StageStats, StageTrace | None]:
    """One refinement stage (see the module docstring).

    Args:
        image: ``(H0, W0, 3)`` uint8 RGB, the whole image.
        y: ``(1, C, h, w)`` Y of the previous stage.
        segmenter: gives O.
        module: gives R (eval mode, on Y's device).
        plan: this stage.
        schedule: the run's schedule (input size, kernel).
        selection: ``paper`` | ``official`` (comparison only).
        batch_size: patches per forward pass.
        trace: also return the intermediates.

    Returns:
        ``(Y, stats, trace or None)``, Y ``(1, C, H, W)`` at the stage scale.
    """
    if selection not in SELECTIONS:
        raise UsageError(f"selection {selection!r}: use one of {SELECTIONS}")
    device = y.device
    clock = _clock(device)
    stage_hw = plan.hw
    y = upsample_y(y, plan.scale)
    clock.lap("upsample")
    yu = uncertainty(y)
    clock.lap("uncertainty")
    boxes = patch_grid(stage_hw, (plan.crop[1], plan.crop[0]))
    chosen, means = select_patches(yu, boxes, plan.n_patches, selection)
    sel_boxes = [boxes[i] for i in chosen]
    clock.lap("select")
    img = stage_image(image, plan.scale, segmenter)
    o = predict_patches(segmenter, img, sel_boxes, batch_size, device)
    clock.lap("segment")
    r_patches = refine_patches(module, o, y, sel_boxes, batch_size)
    clock.lap("refine")
    r, covered = assemble(r_patches, sel_boxes, stage_hw)
    clock.lap("assemble")
    full = bool(covered.all())
    zero_inside = official_mask(sel_boxes, stage_hw) if selection == "official" else None
    e, score = point_scores(yu, r, schedule.input_hw, schedule.kernel, zero_inside)
    clock.lap("score")
    k = stage_points(plan.n_points, covered_area(sel_boxes, stage_hw))
    if zero_inside is not None:  # selection == "official"
        candidates = int(zero_inside.sum())
        picked = select_points(score.q, k)
        idx = picked[zero_inside.reshape(-1).to(picked.device)[picked]]
        replaced = idx
    else:
        positive = score.q[0, 0] > 0  # zero scores are never replaced (magnet_points docstring)
        valid = positive if full else positive & covered.to(positive.device)
        candidates = int(valid.sum())
        idx = select_points(score.q, k, valid)
        replaced = idx
        if schedule.replace == "confident" and idx.numel():  # tested at the selected points only
            c = y.shape[1]
            at = idx.to(y.device)
            yv, rv = (t.reshape(c, -1)[:, at].reshape(1, c, 1, -1) for t in (y, r))
            replaced = idx[confident_mask(yv, rv).reshape(-1).to(idx.device)]
    clock.lap("topk")
    y_out = replace_points(y, r, replaced)
    clock.lap("replace")
    stats = StageStats(
        plan.index, plan.scale, len(boxes), tuple(chosen), tuple(float(means[i]) for i in chosen),
        candidates, k, int(idx.numel()), clock.seconds(),
    )
    record = None
    if trace:
        record = StageTrace(
            y=y.cpu(), yu=yu.cpu(), boxes=list(boxes), patch_means=means.cpu(), chosen=list(chosen),
            r=r.cpu(), covered=covered.cpu(), e=e.cpu(), score=PointScore(*(t.cpu() for t in score)),
            indices=idx.cpu(), y_out=y_out.cpu(), replaced=replaced.cpu(),
        )
    return y_out, stats, record


def finish(y: torch.Tensor, image_hw: Size) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Final Y at the image size, its argmax and its uncertainty.

    Args:
        y: ``(1, C, h, w)`` the last stage's Y.
        image_hw: ``(H, W)``.

    Returns:
        ``(probs (H, W, C) float32, labels (H, W) uint8|uint16, uncertainty (H, W) float32)``.
    """
    y = resize_y(y, image_hw)
    labels = y.argmax(dim=1)[0]
    unc = uncertainty(y)[0, 0]
    dtype = np.uint8 if y.shape[1] <= 256 else np.uint16
    probs = y[0].permute(1, 2, 0).contiguous().cpu().numpy().astype(np.float32, copy=False)
    return probs, labels.cpu().numpy().astype(dtype), unc.cpu().numpy().astype(np.float32, copy=False)


def check_pipeline(segmenter: Segmenter, modules: Sequence[RefinementMagNet], schedule: Schedule) -> None:
    """Check that the segmenter, the refinement modules and the schedule fit together.

    Raises:
        UsageError: no module, a module with another class count than the segmenter, a segmenter
            input size other than the schedule's, or fewer modules than the schedule's stages name.
    """
    if not modules:
        raise UsageError("MagNet needs at least one refinement module")
    c = segmenter.num_classes
    for m in modules:
        if _module_classes(m) != c:
            raise UsageError(
                f"refinement module has {_module_classes(m)} classes but segmenter {segmenter.name} has {c}; "
                "use the checkpoint trained for this segmenter"
            )
    if tuple(segmenter.input_size) != tuple(schedule.input_size):
        raise UsageError(f"segmenter {segmenter.name} takes {segmenter.input_size} but the schedule expects "
                         f"{schedule.input_size}; pick the preset that matches the segmenter")
    needed = max(p.refinement for p in schedule.stages)
    if needed >= len(modules) and len(modules) != 1:
        raise UsageError(f"schedule needs {needed + 1} refinement modules, got {len(modules)}")


def _stage_one(image_u8: np.ndarray, coarse_probs: np.ndarray | None, segmenter: Segmenter,
               schedule: Schedule, batch_size: int, device: torch.device,
               progress: StageProgress | None) -> tuple[torch.Tensor, StageStats]:
    """Stage-1 Y ``(1, C, h, w)``: the segmenter's prediction, or the coarse probabilities ``(h, w, C)``."""
    if coarse_probs is None:
        if progress is not None:
            progress(SEGMENTER_STAGE, 0, 0)
        y, s1 = first_stage(image_u8, segmenter, schedule.stages[0], batch_size, device)
        if progress is not None:
            progress(SEGMENTER_STAGE, 1, 1)
        return y, s1
    t0 = time.perf_counter()
    c = segmenter.num_classes
    probs = np.asarray(coarse_probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[2] != c:
        raise InputError(f"coarse probabilities must be (h, w, {c}) for segmenter {segmenter.name}, "
                         f"got {probs.shape}; convert the mask with coarse_to_probs")
    y = torch.from_numpy(np.ascontiguousarray(probs.transpose(2, 0, 1)))[None].to(device)
    return y, StageStats(1, (probs.shape[1], probs.shape[0]), 0, (), (), 0, 0, 0,
                         {"coarse": time.perf_counter() - t0})


def run_magnet(
    image_u8: np.ndarray,
    segmenter: Segmenter,
    refinement_modules: Sequence[RefinementMagNet],
    preset: MagnetPreset | Schedule,
    coarse_probs: np.ndarray | None = None,
    *,
    fast: bool = True,
    n_patches: int | None = None,
    n_points: float | None = None,
    selection: str = "paper",
    batch_size: int = 1,
    trace: bool = False,
    progress: StageProgress | None = None,
) -> MagnetResult:
    """MagNet(-Fast) on a whole image.

    Args:
        image_u8: ``(H, W, 3)`` uint8 RGB.
        segmenter: the coarse segmenter (stage 1 and O).
        refinement_modules: one per checkpoint of the preset (or one shared), eval mode,
            all on the device where the run happens; their C must equal the segmenter's.
        preset: a preset (its schedule is resolved for this image) or a ready :class:`Schedule`.
        coarse_probs: ``(h, w, C)`` float32 first-stage Y at any resolution
            (:func:`coarse_to_probs` of a user mask); ``None`` runs the segmenter.
        fast: MagNet-Fast (default) or full MagNet (every patch at every scale).
        n_patches: patches per stage override (MagNet-Fast).
        n_points: points per stage override.
        selection: ``paper`` (default) or ``official`` (reproduces the official defects; comparison only).
        batch_size: patches per forward pass.
        trace: keep the intermediates of every refinement stage in ``result.trace``.
        progress: ``progress(stage, done, total)``: :data:`SEGMENTER_STAGE` (0 of 0, then 1 of 1)
            and :data:`SCALES_STAGE` (refinement scales done of all).

    Returns:
        :class:`MagnetResult`.

    Raises:
        InputError: bad image or coarse probabilities (wrong class count ...).
        UsageError: inconsistent segmenter / modules / preset.
    """
    if image_u8.ndim != 3 or image_u8.shape[2] != 3 or image_u8.dtype != np.uint8:
        raise InputError(f"MagNet takes an (H, W, 3) uint8 RGB image, got {image_u8.shape} {image_u8.dtype}")
    image_hw = (int(image_u8.shape[0]), int(image_u8.shape[1]))
    schedule = preset if isinstance(preset, Schedule) else preset.schedule(
        image_hw, fast=fast, n_patches=n_patches, n_points=n_points
    )
    check_pipeline(segmenter, refinement_modules, schedule)
    device = next(refinement_modules[0].parameters()).device
    stats: list[StageStats] = []
    traces: list[StageTrace] = []
    with torch.inference_mode():
        y, s1 = _stage_one(image_u8, coarse_probs, segmenter, schedule, batch_size, device, progress)
        stats.append(s1)
        n_scales = len(schedule.stages) - 1
        for i, plan in enumerate(schedule.stages[1:]):
            if progress is not None:
                progress(SCALES_STAGE, i, n_scales)
            module = refinement_modules[plan.refinement if len(refinement_modules) > 1 else 0]
            y, st, tr = refinement_stage(
                image_u8, y, segmenter, module, plan, schedule, selection=selection, batch_size=batch_size,
                trace=trace,
            )
            if progress is not None:
                progress(SCALES_STAGE, i + 1, n_scales)
            stats.append(st)
            if tr is not None:
                traces.append(tr)
            logger.debug("MagNet stage %d %dx%d: %d/%d patches, %d points in %.2fs", st.stage, *st.scale,
                         len(st.patches), st.patches_total, st.points, st.total)
        t0 = time.perf_counter()
        probs, labels, unc = finish(y, image_hw)
        stats[-1].seconds["finish"] = time.perf_counter() - t0
    return MagnetResult(probs, labels, unc, stats, schedule, tuple(segmenter.classes), traces)
