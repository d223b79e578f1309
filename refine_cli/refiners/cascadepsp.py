"""CascadePSP inference: the official global + local procedure, re-implemented exactly.

The official ``segmentation-refinement`` package (``process_high_res_im``) does::

    global step  resize the normalised image / +-1 mask to max side L ('area' down,
                 bicubic image + bilinear mask up, by scale_factor), safe_forward (3 cascade
                 iterations), keep pred_224 and pred_56_2
    local step   at full resolution: seg = (up(pred_224) > 0.5) * 2 - 1, inter = 2 up(pred_56_2) - 1;
                 for every patch of the official grid (tiling.cascade_grid) whose fraction of
                 seg > 0 lies in [0.1, 0.9]: safe_forward(patch, seg, inter_s8=inter) (2 iterations),
                 add pred_224 (16-px interior trims) and count; prob = sum / count, and the
                 binarised global prediction where no patch landed
    fast         global step only; pred_224 back to full size ('area' if the input was
                 upscaled, bilinear align_corners=True if it was downscaled)

``up`` is bilinear (``align_corners=False``) to the full size. Differences from the
official code, none of which change the result:

* per-pixel state: the official keeps ~15 full-resolution float planes (~60 B/px); here the
  full-resolution state is the float32 accumulator (which becomes the output) and a uint8
  count (5 B/px), plus one float plane at a time during the global resize. The two
  upsampled global maps are computed per patch (:func:`upsample_bilinear_window`).
* patches can be batched (``batch_size``); results then differ from batch size 1 only by
  float rounding inside the convolutions.

All functions take the model (:class:`~refine_cli.models.cascadepsp.CascadeRefinementModule`)
already on its device and in ``eval()`` mode; images are ``(H, W, 3)`` uint8 RGB numpy arrays
and coarse masks ``(H, W)`` float probabilities in [0, 1] (or uint8 0..255), see ``refine_cli.config``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from refine_cli import weights
from refine_cli.errors import InputError, ResourceError, UsageError
from refine_cli.models.cascadepsp import CascadeRefinementModule, cascadepsp_official
from refine_cli.refiners.base import Refiner, TileInput, TileResult, binary_uncertainty
from refine_cli.tiling.cascade_grid import (
    CascadePatch,
    GlobalResize,
    global_resize,
    padded_shape,
    patch_step,
    plan_cascade_patches,
)
from refine_cli.tiling.grid import Window

if TYPE_CHECKING:
    from refine_cli.config import CascadeOptions, CascadePad

logger = logging.getLogger(__name__)

SKIP_LOW = 0.1
"""A local patch is skipped when its foreground fraction is below this ..."""

SKIP_HIGH = 0.9
"""... or above this (official rule)."""

_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_BAND_ROWS = 512
"""Rows per band when the fallback fills uncovered pixels."""

ProgressFn = Callable[[int, int], None]
"""``progress(done, total)`` called after each batch of local patches."""

StageProgress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: ``cascade global step`` (0 of 1, then 1 of 1) and
``cascade local patches`` (patches visited of all)."""

GLOBAL_STAGE = "cascade global step"
LOCAL_STAGE = "cascade local patches"


# --------------------------------------------------------------------------------------------
# small building blocks


def with_model_defaults(options: CascadeOptions, model: CascadeRefinementModule) -> CascadeOptions:
    """``options`` with the working size, padding and edge snap a run uses.

    Each is the one given, else the model's own (``working_size``, ``pad_mode``, ``edge_snap``).
    Sets ``model.pad_mode`` to the padding chosen.
    """
    if options.pad != "auto":
        model.pad_mode = options.pad
    snap = options.snap if options.snap != "auto" else ("on" if model.edge_snap else "off")
    pad = cast("CascadePad", model.pad_mode)
    return replace(options, size=options.size or model.working_size, pad=pad, snap=snap)


def precision_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast context for ``fp32`` (none), ``bf16`` (CPU or CUDA) or ``fp16`` (CUDA only).

    Raises:
        UsageError: unknown precision, or fp16 on a non-CUDA device.
    """
    if precision not in _PRECISIONS:
        raise UsageError(f"--precision {precision!r}: use one of {', '.join(_PRECISIONS)}")
    dtype = _PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if dtype == torch.float16 and device.type != "cuda":
        raise UsageError(f"--precision fp16 needs a CUDA device (got {device.type}); use bf16 or fp32")
    return torch.autocast(device_type=device.type, dtype=dtype)


def safe_forward(
    model: CascadeRefinementModule,
    im: Tensor,
    seg: Tensor,
    inter_s8: Tensor | None = None,
    inter_s4: Tensor | None = None,
    *,
    precision: str = "fp32",
) -> dict[str, Tensor]:
    """Run the module on any size, padding as the official ``safe_forward`` does.

    When H or W is not a multiple of 8, both are padded at the bottom/right to
    ``(d // 8 + 1) * 8`` (see :func:`~refine_cli.tiling.cascade_grid.padded_shape`). With
    ``model.pad_mode == "official"`` the image is padded with 0 (the mean colour), ``seg``
    and the ``inter_*`` maps with -1 (background), as the official code; with ``replicate``
    every input repeats its last row/column.

    Args:
        model: the refinement module (eval mode).
        im: ``(N, 3, H, W)`` float32 normalised image on the model's device.
        seg: ``(N, 1, H, W)`` float32 in [-1, 1].
        inter_s8: optional ``(N, 1, H, W)`` feedback in [-1, 1] (local-step mode).
        inter_s4: optional ``(N, 1, H, W)`` feedback in [-1, 1].
        precision: ``fp32`` | ``bf16`` | ``fp16``.

    Returns:
        ``pred_224``, ``pred_28_3`` and ``pred_56_2``: ``(N, 1, H, W)`` float32 in [0, 1].
    """
    h, w = im.shape[-2:]
    ph, pw = padded_shape((h, w))
    if (ph, pw) != (h, w):
        pad = (0, pw - w, 0, ph - h)
        replicate = model.pad_mode == "replicate"

        def padded(t: Tensor, value: float) -> Tensor:
            return F.pad(t, pad, mode="replicate") if replicate else F.pad(t, pad, value=value)

        im, seg = padded(im, 0.0), padded(seg, -1.0)
        inter_s8 = None if inter_s8 is None else padded(inter_s8, -1.0)
        inter_s4 = None if inter_s4 is None else padded(inter_s4, -1.0)
    with torch.inference_mode(), precision_context(im.device, precision):
        out = model(im, seg, inter_s8, inter_s4)
    return {k: out[k][..., :h, :w].float() for k in ("pred_224", "pred_28_3", "pred_56_2")}


def _linear_axis(in_size: int, out_size: int, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Source indices and weights of torch's linear resampling along one axis (CPU kernel).

    ``scale = float32(in) / out``; ``src = max(scale * (d + 0.5) - 0.5, 0)`` (fused, float32);
    ``i0 = min(floor(src), in - 1)``, ``i1 = i0 + (i0 < in - 1)``, ``l1 = src - i0``, ``l0 = 1 - l1``.

    Returns:
        ``i0, i1`` int64 and ``l0, l1`` float32, each ``(stop - start,)``.
    """
    if in_size == out_size:
        idx = torch.arange(start, stop)
        return idx, idx, torch.ones(stop - start), torch.zeros(stop - start)
    scale = np.float32(in_size) / np.float32(out_size)
    d = np.arange(start, stop, dtype=np.float64) + 0.5
    src = np.maximum((np.float64(scale) * d - 0.5).astype(np.float32), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    l1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    return torch.from_numpy(i0), torch.from_numpy(i1), torch.from_numpy(1 - l1), torch.from_numpy(l1)


def _fused_lerp(a: Tensor, wa: Tensor, b: Tensor, wb: Tensor) -> Tensor:
    """``a * wa + b * wb`` rounded like the compiled kernel: ``fma(a, wa, round(b * wb))``."""
    return (a.double() * wa.double() + (b * wb).double()).float()


def _plain_lerp(a: Tensor, wa: Tensor, b: Tensor, wb: Tensor) -> Tensor:
    """``a * wa + b * wb`` in float32 (three roundings: within 2e-7 of :func:`_fused_lerp` on [0, 1])."""
    return a * wa + b * wb


_Axes = tuple[tuple[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]
"""The :func:`_linear_axis` of a window's rows and of its columns."""


def _window_axes(src_shape: tuple[int, int], out_shape: tuple[int, int], window: Window) -> _Axes:
    """The :func:`_linear_axis` of ``window``'s rows and columns, upsampling ``src_shape`` to ``out_shape``.

    Args:
        src_shape: ``(h, w)`` of the source map.
        out_shape: ``(H, W)`` of the full upsampled map.
        window: the part of the ``H x W`` output wanted (inside it).

    Returns:
        ``(ys, xs)``: each ``(i0, i1, l0, l1)``, ``(window.height,)`` and ``(window.width,)``.
    """
    return (_linear_axis(int(src_shape[0]), int(out_shape[0]), window.row, window.row_end),
            _linear_axis(int(src_shape[1]), int(out_shape[1]), window.col, window.col_end))


def upsample_bilinear_window(src: Tensor, out_shape: tuple[int, int], window: Window, *,
                             exact: bool = True, axes: _Axes | None = None) -> Tensor:
    """One window of ``F.interpolate(src, size=out_shape, mode='bilinear', align_corners=False)``.

    Computes only the requested output pixels, so a full-resolution upsampled plane is
    never stored. When the window is the whole output, or the output is tiny
    (``H + W <= 128``, where torch uses another kernel), it calls ``F.interpolate`` itself.
    Otherwise it reproduces torch's CPU kernel: bit-identical on x86 builds with FMA
    (checked by the tests), within 1 ulp elsewhere.

    Args:
        src: ``(N, C, h, w)`` float32 on the CPU.
        out_shape: ``(H, W)`` of the full upsampled map.
        window: the part of the ``H x W`` output wanted (inside it).
        exact: ``False`` rounds each weighted sum in float32 instead of as the fused kernel does (about
            twice as fast; within 5e-7 of the exact values for sources in [0, 1]).
        axes: :func:`_window_axes` of ``src``'s ``(h, w)``, ``out_shape`` and ``window``, when the caller
            has them already (computed here otherwise).

    Returns:
        ``(N, C, window.height, window.width)`` float32 on the CPU.
    """
    out_h, out_w = int(out_shape[0]), int(out_shape[1])
    if window == Window.full((out_h, out_w)) or out_h + out_w <= 128:
        full = F.interpolate(src, size=(out_h, out_w), mode="bilinear", align_corners=False)
        return full[(..., *window.slices)]
    if axes is None:
        axes = _window_axes((src.shape[-2], src.shape[-1]), (out_h, out_w), window)
    (y0, y1, wy0, wy1), (x0, x1, wx0, wx1) = axes
    # interpolate along x once per source row the window reads (an upsampling reads each several times)
    lerp = _fused_lerp if exact else _plain_lerp
    rows = torch.unique(torch.cat([y0, y1]))
    r = src[..., rows, :]
    across = lerp(r[..., x0], wx0, r[..., x1], wx1)
    at0, at1 = torch.searchsorted(rows, y0), torch.searchsorted(rows, y1)
    return lerp(across[..., at0, :], wy0[:, None], across[..., at1, :], wy1[:, None])


def _image_tensor(image_u8: np.ndarray) -> Tensor:
    """Validate an ``(H, W, 3)`` uint8 image and wrap it as a CPU tensor (no copy when contiguous)."""
    if image_u8.ndim != 3 or image_u8.shape[2] != 3 or image_u8.dtype != np.uint8:
        raise InputError(
            f"image must be (H, W, 3) uint8 RGB, got {image_u8.shape} {image_u8.dtype}; convert it first"
        )
    return torch.from_numpy(np.ascontiguousarray(image_u8))


def _as_inputs(image_u8: np.ndarray, coarse: np.ndarray) -> tuple[Tensor, Tensor]:
    """Validate and wrap the numpy inputs as CPU tensors (no copy)."""
    img = _image_tensor(image_u8)
    if coarse.ndim == 3 and coarse.shape[2] == 1:
        coarse = coarse[..., 0]
    if coarse.shape != image_u8.shape[:2]:
        raise InputError(
            f"coarse mask is {coarse.shape[0]}x{coarse.shape[1]} but the image is "
            f"{image_u8.shape[0]}x{image_u8.shape[1]}; resize the mask to the image size"
        )
    if coarse.dtype != np.uint8 and coarse.dtype != np.bool_:
        coarse = coarse.astype(np.float32, copy=False)
    return img, torch.from_numpy(np.ascontiguousarray(coarse))


# --------------------------------------------------------------------------------------------
# global step


@dataclass(frozen=True)
class GlobalStep:
    """Result of the global step.

    Attributes:
        resize: how the image was resized to max side L.
        im: ``(1, 3, h', w')`` float32 CPU: the normalised, resized image fed to the network
            (before padding).
        seg: ``(1, 1, h', w')`` float32 CPU in [-1, 1]: the resized mask fed to the network.
        pred_224: ``(1, 1, h', w')`` float32 CPU in [0, 1]: the OS1 output (refined mask).
        pred_56: ``(1, 1, h', w')`` float32 CPU in [0, 1]: the iteration-3 OS4 output
            (``pred_56_2``), the soft feedback of the local step.
    """

    resize: GlobalResize
    im: Tensor
    seg: Tensor
    pred_224: Tensor
    pred_56: Tensor

    @property
    def full_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the full-resolution image."""
        return self.resize.in_shape


def global_inputs(
    model: CascadeRefinementModule, image_u8: np.ndarray, coarse: np.ndarray, size: int
) -> tuple[Tensor, Tensor, GlobalResize]:
    """The global step's network inputs, exactly as the official code builds them.

    The image is normalised at full resolution and then resized ('area' down, bicubic up,
    by ``scale_factor``); the mask is binarised to {-1, +1} and resized ('area' down,
    bilinear up). Work is done on the CPU one channel at a time, so at most one float32
    full-resolution plane exists at once.

    Args:
        model: supplies the normalisation.
        image_u8: ``(H, W, 3)`` uint8 RGB.
        coarse: ``(H, W)`` float probability in [0, 1] (foreground ``>= 0.5``) or uint8
            0..255 (foreground ``> 127``); bool also works.
        size: working size L.

    Returns:
        ``im`` ``(1, 3, h', w')`` float32, ``seg`` ``(1, 1, h', w')`` float32 in [-1, 1], both on
        the CPU, and the resize plan.
    """
    img, mask = _as_inputs(image_u8, coarse)
    plan = global_resize((int(img.shape[0]), int(img.shape[1])), size)

    def resize(x: Tensor, up_mode: str) -> Tensor:
        if plan.mode == "none":
            return x
        if plan.mode == "down":
            out = F.interpolate(x, scale_factor=plan.scale, mode="area")
        else:
            out = F.interpolate(x, scale_factor=plan.scale, mode=up_mode, align_corners=False)
        if tuple(out.shape[-2:]) != plan.out_shape:
            raise RuntimeError(f"torch resized to {tuple(out.shape[-2:])}, expected {plan.out_shape}")
        return out

    with torch.inference_mode():
        if plan.mode == "up":  # small image: normalise all channels at once
            im = resize(model.normalize_image(img.permute(2, 0, 1)[None]), "bicubic")
        else:
            planes = [resize(model.normalize_image(img[None, None, :, :, c], slice(c, c + 1)), "bicubic")
                      for c in range(3)]
            im = torch.cat(planes, 1)
        seg = resize(model.mask_to_seg(mask[None, None]), "bilinear")
    return im, seg, plan


def global_step(
    model: CascadeRefinementModule,
    image_u8: np.ndarray,
    coarse: np.ndarray,
    size: int = 900,
    *,
    precision: str = "fp32",
) -> GlobalStep:
    """The official global step: resize to max side L and run all three cascade iterations.

    Args:
        model: the refinement module on its device, in eval mode.
        image_u8: ``(H, W, 3)`` uint8 RGB.
        coarse: ``(H, W)`` float probability in [0, 1] or uint8 0..255.
        size: working size L.
        precision: ``fp32`` | ``bf16`` | ``fp16``.

    Returns:
        The resized inputs and the outputs at ``(h', w')`` (see :class:`GlobalStep`).

    Raises:
        ResourceError: CUDA ran out of memory.
    """
    im, seg, plan = global_inputs(model, image_u8, coarse, size)
    dev = model.device
    try:
        out = safe_forward(model, im.to(dev), seg.to(dev), precision=precision)
    except torch.cuda.OutOfMemoryError as exc:
        raise ResourceError(
            f"out of memory on {dev} in the global step at --cascade-size {size}; "
            "use a smaller --cascade-size, --precision bf16/fp16 or --device cpu"
        ) from exc
    return GlobalStep(plan, im, seg, out["pred_224"].cpu(), out["pred_56_2"].cpu())


def fast_output(glob: GlobalStep) -> Tensor:
    """``fast=True`` result: the global ``pred_224`` brought back to full size.

    'area' when the image was upscaled, bilinear with ``align_corners=True`` when it was
    downscaled, nothing when it was used as is (``process_im_single_pass``).

    Returns:
        ``(1, 1, H, W)`` float32 CPU in [0, 1].
    """
    size = glob.full_shape
    if glob.resize.mode == "up":
        return F.interpolate(glob.pred_224, size=size, mode="area")
    if glob.resize.mode == "down":
        return F.interpolate(glob.pred_224, size=size, mode="bilinear", align_corners=True)
    return glob.pred_224


# --------------------------------------------------------------------------------------------
# local step


@dataclass(frozen=True)
class PatchOutcome:
    """What the local step did with one patch.

    Attributes:
        patch: the patch (window and trims).
        frac: float32 fraction of pixels with binarised global foreground in the window.
        processed: ``SKIP_LOW <= frac <= SKIP_HIGH``: the network ran on it.
    """

    patch: CascadePatch
    frac: float
    processed: bool


@dataclass(frozen=True)
class LocalStep:
    """Result of the local step.

    Attributes:
        prob: ``(H, W)`` float32 in [0, 1]: the refined probability (the official ``final``).
        weight: ``(H, W)`` uint8 (int32 when L < 80): how many patches contributed to each
            pixel (0 = fallback to the binarised global prediction).
        patches: every patch of the grid in the official order, with its outcome.
    """

    prob: np.ndarray
    weight: np.ndarray
    patches: tuple[PatchOutcome, ...]


def global_maps_window(glob: GlobalStep, window: Window) -> tuple[Tensor, Tensor]:
    """The local step's two guidance maps over one window of the full-resolution image.

    Returns:
        ``seg`` ``(1, 1, h, w)`` float32 in {-1, +1} (``up(pred_224) > 0.5``) and ``inter``
        ``(1, 1, h, w)`` float32 in [-1, 1] (``2 up(pred_56_2) - 1``), on the CPU.
    """
    return _binarised_global(glob, window), _feedback_window(glob, window)


def _feedback_window(glob: GlobalStep, window: Window) -> Tensor:
    """The soft feedback over a window: ``2 up(pred_56_2) - 1``, ``(1, 1, h, w)`` float32 in [-1, 1]."""
    soft = upsample_bilinear_window(glob.pred_56, glob.full_shape, window)
    return CascadeRefinementModule.prob_to_feedback(soft)


def _global_axes(glob: GlobalStep, window: Window) -> _Axes:
    """:func:`_window_axes` of ``pred_224`` upsampled to the full image, over ``window``."""
    src = glob.pred_224
    return _window_axes((src.shape[-2], src.shape[-1]), glob.full_shape, window)


_SIDE_CHECK = 1e-6
"""A plainly rounded upsampled value this close to 0.5 is recomputed exactly before it is thresholded."""


def _binarised_global(glob: GlobalStep, window: Window, axes: _Axes | None = None) -> Tensor:
    """``(up(pred_224) > 0.5) * 2 - 1`` over a window: ``(1, 1, h, w)`` float32 in {-1, +1}.

    The values are upsampled with plain float32 rounding; only when one lies within
    :data:`_SIDE_CHECK` of 0.5, where the rounding could decide the side, is the window upsampled
    exactly. The result is the exact upsampling's, thresholded. ``axes``: :func:`_global_axes` of the
    window, when the caller has them.
    """
    if axes is None:
        axes = _global_axes(glob, window)
    up = upsample_bilinear_window(glob.pred_224, glob.full_shape, window, exact=False, axes=axes)
    if bool(((up - 0.5).abs() <= _SIDE_CHECK).any()):
        up = upsample_bilinear_window(glob.pred_224, glob.full_shape, window, axes=axes)
    return (up > 0.5).to(torch.float32) * 2 - 1


_SIDE_MARGIN = 1e-4
"""How far from 0.5 every source value must be for :func:`_uniform_global` to decide (bilinear
weights are rounded to float32, so a weighted mean may overshoot its inputs by a few 1e-7)."""


def _uniform_global(glob: GlobalStep, window: Window, axes: _Axes | None = None) -> float | None:
    """The foreground fraction of ``up(pred_224) > 0.5`` over ``window`` when it is provably 0 or 1.

    Bilinear upsampling is a convex combination of the source pixels a window reads, so when all of
    them lie below ``0.5 - margin`` (above ``0.5 + margin``) every upsampled pixel does too, and the
    fraction is exactly 0.0 (1.0), as counting would find, without upsampling the window.

    Args:
        glob: the global step.
        window: part of the full-resolution image.
        axes: :func:`_global_axes` of the window, when the caller has them.

    Returns:
        ``0.0`` or ``1.0``, or ``None`` when the sources straddle 0.5 and the window must be counted.
    """
    src = glob.pred_224
    ys, xs = axes if axes is not None else _global_axes(glob, window)
    foot = src[..., int(ys[0].min()) : int(ys[1].max()) + 1, int(xs[0].min()) : int(xs[1].max()) + 1]
    if float(foot.max()) < 0.5 - _SIDE_MARGIN:
        return 0.0
    if float(foot.min()) > 0.5 + _SIDE_MARGIN:
        return 1.0
    return None


def _count_dtype(size: int) -> torch.dtype:
    """uint8 when no pixel can be covered by more than 255 patches: ``(ceil(L / step) + 1) ** 2 <= 255``."""
    step = patch_step(size)
    return torch.uint8 if (-(-size // step) + 1) ** 2 <= 255 else torch.int32


def _foreground_fraction(seg: Tensor) -> float:
    """float32 mean of ``seg > 0`` (as ``torch.mean`` computes it: exact count / n, rounded once)."""
    return float(np.float32((seg > 0).sum().item()) / np.float32(seg.numel()))


class _PatchBatcher:
    """Runs local patches through the network in batches, halving the batch on CUDA OOM."""

    def __init__(self, model: CascadeRefinementModule, batch_size: int, precision: str) -> None:
        if batch_size < 1:
            raise UsageError("--batch-size must be >= 1")
        self.model, self.batch_size, self.precision = model, batch_size, precision

    def run(
        self, ims: Sequence[Tensor], segs: Sequence[Tensor], inters: Sequence[Tensor]
    ) -> Iterator[Tensor]:
        """Yield ``pred_224`` ``(1, 1, h, w)`` float32 per patch, in input order."""
        i = 0
        while i < len(ims):
            n = min(self.batch_size, len(ims) - i)
            try:
                pred = safe_forward(
                    self.model,
                    torch.cat(list(ims[i : i + n])),
                    torch.cat(list(segs[i : i + n])),
                    torch.cat(list(inters[i : i + n])),
                    precision=self.precision,
                )["pred_224"]
            except torch.cuda.OutOfMemoryError as exc:
                if n == 1:
                    raise ResourceError(
                        f"out of memory on {self.model.device} for one local patch; use a smaller "
                        "--cascade-size, --precision bf16/fp16 or --device cpu"
                    ) from exc
                torch.cuda.empty_cache()
                self.batch_size = max(1, n // 2)
                logger.warning(
                    "CUDA out of memory with %d patches per batch; retrying with %d", n, self.batch_size
                )
                continue
            yield from pred.split(1)
            i += n


def _patch_outcome(glob: GlobalStep, patch: CascadePatch) -> tuple[PatchOutcome, Tensor | None]:
    """Whether a local patch runs (the official 10-90 % rule), and its binarised global map when it does.

    A patch whose global sources lie on one side of 0.5 is decided without upsampling its window.

    Returns:
        The outcome, and ``seg`` ``(1, 1, L, L)`` float32 in {-1, +1} for a patch that runs (else ``None``).
    """
    axes = _global_axes(glob, patch.window)
    uniform = _uniform_global(glob, patch.window, axes)
    if uniform is not None and not SKIP_LOW <= uniform <= SKIP_HIGH:
        return PatchOutcome(patch, uniform, False), None
    seg = _binarised_global(glob, patch.window, axes)
    frac = _foreground_fraction(seg)
    processed = SKIP_LOW <= frac <= SKIP_HIGH
    return PatchOutcome(patch, frac, processed), seg if processed else None


def local_step(
    model: CascadeRefinementModule,
    image_u8: np.ndarray,
    glob: GlobalStep,
    *,
    batch_size: int = 1,
    precision: str = "fp32",
    progress: ProgressFn | None = None,
) -> LocalStep:
    """The official local step at full resolution (``process_high_res_im`` after the global step).

    Args:
        model: the refinement module on its device, in eval mode.
        image_u8: ``(H, W, 3)`` uint8 RGB, the image of the global step.
        glob: the global step's result for this image.
        batch_size: patches per forward pass (1 reproduces the official numerics exactly).
        precision: ``fp32`` | ``bf16`` | ``fp16``.
        progress: called as ``progress(done, total)`` with counts of grid patches visited.

    Returns:
        The refined probability, the per-pixel patch count and the patch outcomes.
    """
    img = _image_tensor(image_u8)
    h, w = glob.full_shape
    if tuple(img.shape[:2]) != (h, w):
        raise InputError(f"image is {img.shape[0]}x{img.shape[1]} but the global step was run on {h}x{w}")
    dev = model.device
    acc = torch.zeros((h, w), dtype=torch.float32)
    count = torch.zeros((h, w), dtype=_count_dtype(glob.resize.size))
    batcher = _PatchBatcher(model, batch_size, precision)
    outcomes: list[PatchOutcome] = []
    pending: list[tuple[CascadePatch, Tensor, Tensor, Tensor]] = []

    def flush() -> None:
        preds = batcher.run([p[1] for p in pending], [p[2] for p in pending], [p[3] for p in pending])
        for (patch, *_), pred in zip(pending, preds, strict=True):
            acc[patch.dst.slices] += pred[0, 0][patch.src.slices].cpu()
            count[patch.dst.slices] += 1
        pending.clear()

    patches = plan_cascade_patches((h, w), glob.resize.size)
    for patch in patches:
        outcome, seg = _patch_outcome(glob, patch)
        outcomes.append(outcome)
        if seg is None:
            continue
        inter = _feedback_window(glob, patch.window)
        crop = img[patch.window.slices].permute(2, 0, 1)[None].to(dev)
        pending.append((patch, model.normalize_image(crop), seg.to(dev), inter.to(dev)))
        if len(pending) >= batcher.batch_size:
            flush()
            if progress is not None:
                progress(len(outcomes), len(patches))
    if pending:
        flush()
    if progress is not None:
        progress(len(outcomes), len(patches))

    # average where patches landed, the binarised global prediction elsewhere (row bands)
    for r0 in range(0, h, _BAND_ROWS):
        band = Window(r0, 0, min(_BAND_ROWS, h - r0), w)
        a, c = acc[band.slices], count[band.slices]
        if bool((c > 0).all()):
            a /= c
        else:
            axes = _global_axes(glob, band)
            uniform = _uniform_global(glob, band, axes)
            fallback = (torch.full_like(a, uniform) if uniform is not None
                        else _binarised_global(glob, band, axes)[0, 0] / 2 + 0.5)
            a.copy_(torch.where(c > 0, a / c, fallback))
    logger.debug(
        "local step: %d patches, %d processed, %d px uncovered",
        len(patches), sum(o.processed for o in outcomes), int((count == 0).sum()),
    )
    return LocalStep(acc.numpy(), count.numpy(), tuple(outcomes))


# --------------------------------------------------------------------------------------------
# whole-image entry points


def refine_exact(
    model: CascadeRefinementModule,
    image_u8: np.ndarray,
    coarse: np.ndarray,
    *,
    size: int = 900,
    fast: bool = False,
    batch_size: int = 1,
    precision: str = "fp32",
    progress: StageProgress | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Refine a whole image exactly as the official ``Refiner.refine`` (before its uint8 cast).

    Args:
        model: the refinement module on its device, in eval mode.
        image_u8: ``(H, W, 3)`` uint8 RGB.
        coarse: ``(H, W)`` float probability in [0, 1] (foreground ``>= 0.5``) or uint8 0..255.
        size: working size L (global max side and local patch side).
        fast: global step only.
        batch_size: local patches per forward pass.
        precision: ``fp32`` | ``bf16`` | ``fp16``.
        progress: ``progress(stage, done, total)`` of the global step and the local patches
            (:data:`StageProgress`).

    Returns:
        ``prob`` ``(H, W)`` float32 in [0, 1], and facts for the report (sizes, patch counts,
        seconds per step). The official package returns ``(prob * 255).astype(uint8)``.
    """
    t0 = time.perf_counter()
    if progress is not None:
        progress(GLOBAL_STAGE, 0, 1)
    glob = global_step(model, image_u8, coarse, size, precision=precision)
    if progress is not None:
        progress(GLOBAL_STAGE, 1, 1)
    t1 = time.perf_counter()
    info: dict[str, Any] = {
        "size": size, "fast": fast, "precision": precision, "global_shape": glob.resize.out_shape,
        "global_seconds": round(t1 - t0, 3),
    }
    if fast:
        return fast_output(glob)[0, 0].numpy(), info
    local = local_step(model, image_u8, glob, batch_size=batch_size, precision=precision,
                       progress=None if progress is None else lambda d, t: progress(LOCAL_STAGE, d, t))
    info.update(
        patches=len(local.patches),
        patches_processed=sum(o.processed for o in local.patches),
        pixels_fallback=int((local.weight == 0).sum()),
        local_seconds=round(time.perf_counter() - t1, 3),
    )
    return local.prob, info


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; other strings as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class CascadePSPRefiner(Refiner):
    """CascadePSP with the official whole-image procedure (global + local step, or ``fast``).

    Uncertainty: ``1 - |2p - 1|`` of the final probability (:func:`binary_uncertainty`).

    Args:
        model: the refinement module with weights loaded; moved to ``device`` and set to eval.
        size: working size L.
        fast: global step only.
        batch_size: local patches per forward pass.
        precision: ``fp32`` | ``bf16`` | ``fp16`` (CUDA only).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        weights_info: facts about the weights for :meth:`describe` (name, path, sha256).
        progress: ``progress(stage, done, total)`` of each whole-image pass (:data:`StageProgress`).
    """

    name = "cascade"
    halo = 0

    def __init__(
        self,
        model: CascadeRefinementModule,
        *,
        size: int = 900,
        fast: bool = False,
        batch_size: int = 1,
        precision: str = "fp32",
        device: str = "cpu",
        weights_info: dict[str, Any] | None = None,
        bytes_per_pixel: int = 5 * 1024,
        progress: StageProgress | None = None,
    ) -> None:
        dev = resolve_device(device)
        precision_context(dev, precision)  # validates early
        if batch_size < 1:
            raise UsageError("--batch-size must be >= 1")
        self.model = model.to(dev).eval()
        self.size, self.fast, self.batch_size, self.precision = size, fast, batch_size, precision
        self.weights_info = dict(weights_info or {})
        self.bytes_per_pixel = bytes_per_pixel
        self.progress = progress
        self.stats: dict[str, int] = {}

    @classmethod
    def from_options(
        cls, options: CascadeOptions, device: str = "cpu", download: bool = False
    ) -> CascadePSPRefiner:
        """Build the official model and load its weights (a file path or registry name).

        Args:
            options: ``RefineConfig.cascade``; ``weights=None`` means the ``cascadepsp`` record.
            device: torch device string or ``auto``.
            download: fetch a registry checkpoint that is not cached yet.
        """
        model = cascadepsp_official()
        resolved = weights.resolve_weights(options.weights or weights.DEFAULT_CASCADEPSP, download=download)
        model.load_state_dict(weights.load_state_dict(resolved.path, model), strict=True)
        info = {"weights": resolved.name or str(resolved.path), "weights_path": str(resolved.path)}
        if resolved.sha256:
            info["weights_sha256"] = resolved.sha256
        options = with_model_defaults(options, model)
        assert options.size is not None  # with_model_defaults gives the weights' own
        if options.snap == "on":
            raise UsageError("the edge snap (--cascade-snap on) is a step of --method cascade "
                             "(refine_cli.api), not of the official procedure alone")
        return cls(
            model, size=options.size, fast=options.fast, batch_size=options.batch_size,
            precision=options.precision, device=device, weights_info=info,
        )

    def refine_image(
        self, image_u8: np.ndarray, coarse_prob: np.ndarray
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Refine a whole image (see :func:`refine_exact`).

        Args:
            image_u8: ``(H, W, 3)`` uint8 RGB.
            coarse_prob: ``(H, W)`` float probability in [0, 1].

        Returns:
            ``(H, W)`` float32 probability in [0, 1] and report facts.
        """
        return refine_exact(
            self.model, image_u8, coarse_prob, size=self.size, fast=self.fast,
            batch_size=self.batch_size, precision=self.precision, progress=self.progress,
        )

    def refine(self, tile: TileInput) -> TileResult:
        """Refine one window as if it were the whole image (official procedure).

        Facts of each call (patches, processed, fallback pixels, seconds) add up in
        :attr:`stats` for the report.
        """
        prob, info = self.refine_image(tile.rgb(), tile.coarse)
        for key in ("patches", "patches_processed", "pixels_fallback"):
            if key in info:
                self.stats[key] = self.stats.get(key, 0) + int(info[key])
        return TileResult(prob, binary_uncertainty(prob))

    def tile_memory(self, pixels: int) -> int:
        """Bytes to refine a ``pixels``-px image: ~20 B/px of state plus one forward pass.

        The forward pass costs ``bytes_per_pixel`` of the working size: ~5 KB/px for the official model.
        """
        side = padded_shape((self.size, self.size))[0]
        return 20 * pixels + self.bytes_per_pixel * side * side * (1 if self.fast else self.batch_size)

    def fixed_memory(self) -> int:
        """Bytes held by the weights, and what an ONNX Runtime / OpenVINO backend keeps between calls."""
        from refine_cli.models.runtime import held_bytes

        weights = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        return int(weights) + held_bytes(self.model)

    def describe(self) -> dict[str, Any]:
        """Parameters and weights facts for the report."""
        return {
            **super().describe(), "size": self.size, "pad": self.model.pad_mode, "fast": self.fast,
            "batch_size": self.batch_size, "precision": self.precision, "device": str(self.model.device),
            **self.weights_info, **self.stats,
        }
