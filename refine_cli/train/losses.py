"""Training losses: CascadePSP's multi-output loss and MagNet's OHEM cross-entropy.

CascadePSP's training loss (its ``train.py``). The model's forward returns a dict of logits ``out_*``
and probabilities ``pred_* = sigmoid(out_*)``, all ``(N, 1, H, W)`` at input
resolution, for the outputs ``224`` (OS1, final), ``28``, ``28_2``, ``28_3``
(OS8) and ``56``, ``56_2`` (OS4). With ``g`` the soft ground truth in
``[0, 1]`` and ``b = g > 0.5``::

    loss = sum_k  ce_k * BCEWithLogits(out_k, b)
                + l1_k * mean|pred_k - g| + l2_k * mean (pred_k - g)^2
         + grad * mean|sobel(g) - sobel(pred_224)|

with, in the order ``[224, 28, 56, 28_2, 28_3, 56_2]``, ``ce = [0, 1, .5, 1, 1, .5]``,
``l1 = l2 = [1, 0, .25, 0, 0, .25]`` and ``grad = 5``; ``sobel(x)`` is the
gradient magnitude ``sqrt(gx^2 + gy^2 + 1e-4)`` of a 3x3 average-pooled ``x``
with Sobel kernels divided by 4.

MagNet's training loss (its ``OhemCrossEntropy``, threshold 0.7, ``min_kept`` 100 000 in the
official recipe): :func:`ohem_cross_entropy` keeps the pixels whose
probability of the true class is below ``max(threshold, p_(min_kept))`` and
averages their cross-entropy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OUTPUTS = ("224", "28", "56", "28_2", "28_3", "56_2")
"""CascadePSP output names, in the order of the weight vectors."""


@dataclass(frozen=True)
class CascadeLossWeights:
    """Per-output weights of :func:`cascadepsp_loss` (order of :data:`OUTPUTS`).

    Attributes:
        ce: BCE-with-logits against ``gt > 0.5``.
        l1: L1 of ``pred_*`` against the soft GT.
        l2: squared error of ``pred_*`` against the soft GT.
        grad: weight of the Sobel gradient loss on ``pred_224``.
    """

    ce: tuple[float, ...] = (0.0, 1.0, 0.5, 1.0, 1.0, 0.5)
    l1: tuple[float, ...] = (1.0, 0.0, 0.25, 0.0, 0.0, 0.25)
    l2: tuple[float, ...] = (1.0, 0.0, 0.25, 0.0, 0.0, 0.25)
    grad: float = 5.0

    def __post_init__(self) -> None:
        for name in ("ce", "l1", "l2"):
            if len(getattr(self, name)) != len(OUTPUTS):
                raise ValueError(f"{name} needs {len(OUTPUTS)} weights ({', '.join(OUTPUTS)})")


CASCADEPSP_WEIGHTS = CascadeLossWeights()
"""The official weights."""


def sobel_magnitude(x: Tensor, eps: float = 1e-4) -> Tensor:
    """Gradient magnitude as in CascadePSP's gradient loss.

    Args:
        x: ``(N, 1, H, W)`` float.
        eps: added under the square root.

    Returns:
        ``(N, 1, H, W)``: ``sqrt(gx^2 + gy^2 + eps)`` of ``avg_pool3x3(x)``
        (zero padding, padded zeros counted), Sobel kernels / 4, zero padding 1.
    """
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=x.dtype, device=x.device)
    kx = kx / 4
    kernels = torch.stack([kx, kx.t()])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    smooth = F.avg_pool2d(x, 3, stride=1, padding=1)
    g = F.conv2d(smooth, kernels, padding=1)
    return torch.sqrt(g[:, :1] ** 2 + g[:, 1:] ** 2 + eps)


def cascadepsp_loss(
    outputs: Mapping[str, Tensor], gt: Tensor, weights: CascadeLossWeights = CASCADEPSP_WEIGHTS
) -> tuple[Tensor, dict[str, Tensor]]:
    """CascadePSP's training loss.

    Args:
        outputs: the model's forward dict; needs ``out_k`` for every output with
            a nonzero CE weight and ``pred_k`` for every nonzero L1/L2 weight
            (``pred_224`` when ``grad > 0``), each ``(N, 1, H, W)`` float.
        gt: ``(N, 1, H, W)`` float soft ground truth in ``[0, 1]``.
        weights: per-output weights (default: the official ones).

    Returns:
        ``(total, parts)``: the scalar loss and a dict of detached scalar terms
        ``ce_k`` / ``l1_k`` / ``l2_k`` / ``grad`` (unweighted) for logging.

    Raises:
        KeyError: an output with a nonzero weight is missing (e.g. ``out_28`` in
            local mode); the message lists what is missing.
        ValueError: a map's shape differs from ``gt``'s.
    """
    need = [f"out_{k}" for k, w in zip(OUTPUTS, weights.ce, strict=True) if w]
    need += [f"pred_{k}" for k, a, b in zip(OUTPUTS, weights.l1, weights.l2, strict=True) if a or b]
    if weights.grad:
        need.append("pred_224")
    missing = sorted({k for k in need if k not in outputs})
    if missing:
        raise KeyError(f"model outputs lack {', '.join(missing)}: train in global mode (all 3 iterations)")
    for k in need:
        if outputs[k].shape != gt.shape:
            raise ValueError(f"{k} has shape {tuple(outputs[k].shape)}, ground truth {tuple(gt.shape)}")
    hard = (gt > 0.5).to(gt.dtype)
    total = gt.new_zeros(())
    parts: dict[str, Tensor] = {}
    for k, wc, w1, w2 in zip(OUTPUTS, weights.ce, weights.l1, weights.l2, strict=True):
        if wc:
            ce = F.binary_cross_entropy_with_logits(outputs[f"out_{k}"], hard)
            total = total + wc * ce
            parts[f"ce_{k}"] = ce.detach()
        if w1 or w2:
            diff = outputs[f"pred_{k}"] - gt
            l1, l2 = diff.abs().mean(), (diff * diff).mean()
            total = total + w1 * l1 + w2 * l2
            parts[f"l1_{k}"], parts[f"l2_{k}"] = l1.detach(), l2.detach()
    if weights.grad:
        grad = (sobel_magnitude(gt) - sobel_magnitude(outputs["pred_224"])).abs().mean()
        total = total + weights.grad * grad
        parts["grad"] = grad.detach()
    return total, parts


class CascadePSPLoss(nn.Module):
    """:func:`cascadepsp_loss` as a module; ``forward(outputs, gt) -> (total, parts)``."""

    def __init__(self, weights: CascadeLossWeights = CASCADEPSP_WEIGHTS) -> None:
        super().__init__()
        self.weights = weights

    def forward(self, outputs: Mapping[str, Tensor], gt: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """See :func:`cascadepsp_loss`."""
        return cascadepsp_loss(outputs, gt, self.weights)


def ohem_cross_entropy(
    logits: Tensor,
    target: Tensor,
    threshold: float = 0.7,
    min_kept: int = 100_000,
    ignore_index: int = 255,
    class_weight: Tensor | None = None,
) -> Tensor:
    """Online hard-example-mining cross-entropy (MagNet's refinement-module loss).

    Among pixels whose label is not ``ignore_index``, let ``p`` be the softmax
    probability of the true class. Pixels with ``p < max(threshold, p_(k))``
    are kept, where ``p_(k)`` is the ``k``-th smallest ``p`` (0-based) and
    ``k = min(min_kept, n_valid - 1)``: the hard pixels, or the ``min_kept``
    least confident ones (exactly, without ties) when fewer are hard. The loss
    is the mean cross-entropy of the kept pixels (0, with a graph, when none is kept).

    Args:
        logits: ``(N, C, H, W)`` float, C >= 2.
        target: ``(N, H, W)`` int64 class indices in ``[0, C)`` or ``ignore_index``.
        threshold: probability below which a pixel counts as hard.
        min_kept: minimum number of pixels kept (0 keeps only the hard ones).
        ignore_index: label of pixels to skip.
        class_weight: optional ``(C,)`` weights of the per-pixel cross-entropy.

    Returns:
        Scalar tensor.
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match (N,C,H,W)/(N,H,W)"
        )
    target = target.long()
    pixel_loss = F.cross_entropy(
        logits, target, weight=class_weight, ignore_index=ignore_index, reduction="none"
    )
    valid = target != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    with torch.no_grad():
        prob = F.softmax(logits, dim=1)
        safe = torch.where(valid, target, torch.zeros_like(target))
        p_true = prob.gather(1, safe[:, None])[:, 0][valid]
        k = min(min_kept, p_true.numel() - 1)
        cut = max(threshold, float(torch.kthvalue(p_true, k + 1).values)) if min_kept > 0 else threshold
        keep = p_true < cut
    kept = pixel_loss[valid][keep]
    if kept.numel() == 0:
        return logits.sum() * 0.0
    return kept.mean()


class OhemCrossEntropy(nn.Module):
    """:func:`ohem_cross_entropy` as a module with fixed settings (threshold 0.7, min_kept 100 000)."""

    def __init__(
        self,
        threshold: float = 0.7,
        min_kept: int = 100_000,
        ignore_index: int = 255,
        class_weight: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.threshold, self.min_kept, self.ignore_index = threshold, min_kept, ignore_index
        self.class_weight = class_weight

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """See :func:`ohem_cross_entropy`."""
        return ohem_cross_entropy(
            logits, target, self.threshold, self.min_kept, self.ignore_index, self.class_weight
        )
