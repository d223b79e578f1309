"""MagNet's per-stage point step and patch geometry, as pure functions.

Written from the paper (arXiv 2104.03778, §3.2-3.3) and from notes on how the official code
behaves; no official code. Names follow the paper: Y is the accumulated prediction, R the
refinement module's output assembled at the stage scale, O the backbone's.

One stage of MagNet, at stage size ``H x W`` with backbone input size ``h x w``::

    Yu = 1 - (top1(Y) - top2(Y))                 uncertainty of Y         (uncertainty)
    E  = Yu * (top1(R) - top2(R))                = Yu * (1 - Ru)          (error_score)
    Q  = up(median_k(down(E)))                   nearest down to h x w, k x k median with zero
                                                 padding, nearest back up to H x W  (score_map)
    S  = the k flat indices with the largest Q   canonical ties, only pixels with Q > 0
                                                                            (canonical_topk / StreamingTopK)
    Y[:, S] = R[:, S]                            exact copy, no blending    (replace_points)
                                                 rule ``confident``: only where R is more certain
                                                 than Y                     (confident_mask)

**Zero scores are never replaced.** Where Q = 0 (Y certain, or R a tie) nothing says R is
better, and the canonical tie-break would fill the rest of k with the lowest flat indices:
the top rows of the refined patches, rectangles unrelated to the image. So the candidates
are the refined pixels with Q > 0 and k is an upper bound (the paper's fixed k assumes more
uncertain pixels than k). ``selection="official"`` keeps the official tie behaviour.

Shapes: probability maps are ``(N, C, H, W)`` float32 in ``[0, 1]`` (N = 1 in the
pipeline); single-channel maps (Yu, E, Q) are ``(N, 1, H, W)``. Flat indices are
row-major over one ``H x W`` map: ``index = y * W + x``.

**Canonical ties.** Q is piecewise constant (nearest resampling, median), so the
k-th largest value is usually tied. The canonical set orders pixels by Q
descending, then flat index ascending, and takes the first k: every pixel with
``Q > t`` plus the tied pixels (``Q == t``) with the smallest flat indices, where
``t`` is the k-th largest value. ``-0.0`` counts as ``0.0``; NaN is rejected.
The official code uses ``torch.topk``, whose choice among ties depends on the
backend; its set is valid (same ``Q > t`` part) but not reproducible.

**Patches.** The stage is cut into ``ceil(H / crop_h) x ceil(W / crop_w)`` patches
that cover it exactly (:func:`patch_grid`); where they overlap, R is averaged
(:func:`ensemble_patches`). This fixes two official defects for sizes that do not
divide evenly: truncated steps that leave the last columns
uncovered, and overlaps divided by a coverage count taken on a 10-px inset.

**MagNet-Fast** (:func:`rank_patches`): refine only the patches with the highest
mean Yu, as the paper says. The official code sorts ascending (refining the
*least* uncertain patches) and zeroes the score inside the refined patches, so
its replaced points come from ``topk`` tie-breaking among zeros (backend dependent);
neither is reproduced here. Points are chosen among the pixels of the refined
patches only (pass their union as ``valid``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from refine_cli.errors import UsageError
from refine_cli.tiling.grid import Window, axis_starts

# --------------------------------------------------------------------------- uncertainty


def certainty(probs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Margin between the two largest class probabilities, ``top1 - top2``.

    Args:
        probs: ``(N, C, H, W)`` float class probabilities in ``[0, 1]``, C >= 2
            (any shape with the class axis at ``dim``).
        dim: the class axis of ``probs`` (default 1, the ``C`` of ``(N, C, H, W)``); the result
            keeps it with size 1.

    Returns:
        ``(N, 1, H, W)`` (the class axis kept with size 1), same dtype, in ``[0, 1]``.
    """
    top = probs.topk(2, dim=dim).values
    return top.narrow(dim, 0, 1) - top.narrow(dim, 1, 1)


def uncertainty(probs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``1 - (top1 - top2)``: 1 where the two best classes tie, 0 where one class is certain.

    Args:
        probs: ``(N, C, H, W)`` float class probabilities in ``[0, 1]``.
        dim: the class axis of ``probs`` (default 1, the ``C`` of ``(N, C, H, W)``); the result
            keeps it with size 1.

    Returns:
        ``(N, 1, H, W)``, same dtype, in ``[0, 1]``.
    """
    return 1 - certainty(probs, dim)


def error_score(y_uncertainty: torch.Tensor, r_certainty: torch.Tensor) -> torch.Tensor:
    """``E = Yu * (1 - Ru)``: high where Y is unsure and R is sure (paper eq. for Q before F).

    Args:
        y_uncertainty: ``(N, 1, H, W)`` Yu in ``[0, 1]`` (:func:`uncertainty` of Y).
        r_certainty: ``(N, 1, H, W)`` ``1 - Ru`` in ``[0, 1]`` (:func:`certainty` of R).

    Returns:
        ``(N, 1, H, W)`` in ``[0, 1]``.
    """
    return r_certainty * y_uncertainty


# --------------------------------------------------------------------------- resampling


def nearest_indices(n_in: int, n_out: int) -> torch.Tensor:
    """Source indices of legacy nearest resampling: ``floor(d * n_in / n_out)``, exactly.

    Integer arithmetic, so tiles and devices agree. PyTorch's ``interpolate(mode='nearest')``
    computes ``floor(d * float32(n_in / n_out))``, which differs by one at isolated
    positions for about 2 % of size pairs (e.g. 2 -> 82); the two agree on every size
    pair MagNet uses (2048/1024/512/256/128 and 2448/1224/612/508) and on integer factors.

    Args:
        n_in: input length (>= 1).
        n_out: output length (>= 1).

    Returns:
        ``(n_out,)`` int64 in ``[0, n_in)``, non-decreasing.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"lengths must be >= 1, got {n_in} -> {n_out}")
    return torch.div(torch.arange(n_out, dtype=torch.int64) * n_in, n_out, rounding_mode="floor")


def resize_nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Legacy nearest resize of the last two axes with :func:`nearest_indices` (values copied).

    Args:
        x: ``(..., H, W)`` any dtype.
        size: ``(h, w)`` output size.

    Returns:
        ``(..., h, w)``, same dtype and device.
    """
    rows = nearest_indices(x.shape[-2], size[0]).to(x.device)
    cols = nearest_indices(x.shape[-1], size[1]).to(x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def median_filter(x: torch.Tensor, kernel: int, max_elements: int = 1 << 24) -> torch.Tensor:
    """``kernel x kernel`` median with zero padding; output the size of the input.

    Every window holds ``kernel**2`` values (an odd count), padded with zeros beyond
    the border, and the result is its exact middle value.

    Args:
        x: ``(..., H, W)`` float.
        kernel: odd window side (MagNet's scripts: 5 for Cityscapes, 11 for DeepGlobe).
        max_elements: bound on the temporary window buffer (rows are processed in chunks).

    Returns:
        ``(..., H, W)``, same dtype and device.
    """
    if kernel < 1 or kernel % 2 == 0:
        raise UsageError(f"median kernel {kernel} must be an odd number >= 1 (MagNet uses 5 or 11)")
    if kernel == 1:
        return x.clone()
    pad = kernel // 2
    h, w = x.shape[-2:]
    lead = x.shape[:-2]
    xp = F.pad(x.reshape(-1, 1, h, w), (pad, pad, pad, pad), mode="constant", value=0.0)
    n = xp.shape[0]
    rows_per_chunk = max(1, max_elements // max(1, n * w * kernel * kernel))
    out = torch.empty((n, 1, h, w), dtype=x.dtype, device=x.device)
    for r0 in range(0, h, rows_per_chunk):
        r1 = min(h, r0 + rows_per_chunk)
        band = xp[:, :, r0 : r1 + 2 * pad, :]
        windows = band.unfold(2, kernel, 1).unfold(3, kernel, 1)  # n, 1, r1-r0, w, k, k
        out[:, :, r0:r1, :] = windows.reshape(n, 1, r1 - r0, w, kernel * kernel).median(dim=-1).values
    return out.reshape(*lead, h, w)


class PointScore(NamedTuple):
    """The score maps of one stage.

    Attributes:
        e_small: ``(N, 1, h, w)`` E nearest-resized to the backbone input size.
        q_small: ``(N, 1, h, w)`` its median filter.
        q: ``(N, 1, H, W)`` the score Q at the stage size.
    """

    e_small: torch.Tensor
    q_small: torch.Tensor
    q: torch.Tensor


def score_map(e: torch.Tensor, input_size: tuple[int, int], kernel: int) -> PointScore:
    """``Q = F(E)``: nearest down to the backbone input size, median, nearest back up.

    At Cityscapes' last stage (2048x1024 -> 256x128) Q is constant on 8x8 blocks and
    reads one E value per block; a tiled pipeline therefore only needs E at the
    pixels :func:`nearest_indices` samples.

    Args:
        e: ``(N, 1, H, W)`` E at the stage size (:func:`error_score`).
        input_size: ``(h, w)`` backbone input size (rows, cols), e.g. ``(128, 256)``.
        kernel: odd median window side.

    Returns:
        :class:`PointScore` (float32 like ``e``; values in ``[0, 1]``).
    """
    e_small = resize_nearest(e, input_size)
    q_small = median_filter(e_small, kernel)
    return PointScore(e_small, q_small, resize_nearest(q_small, (e.shape[-2], e.shape[-1])))


# --------------------------------------------------------------------------- top-k


def _as_map(q: torch.Tensor) -> torch.Tensor:
    """A score given as ``(H, W)`` or ``(1, ..., 1, H, W)``, viewed as ``(H, W)``."""
    if q.dim() < 2 or math.prod(q.shape[:-2]) != 1:
        raise ValueError(f"expected one score map (H, W) or (1, 1, H, W), got shape {tuple(q.shape)}")
    return q.reshape(q.shape[-2], q.shape[-1])


def _check_scores(q: torch.Tensor) -> torch.Tensor:
    """Upcast a half-precision score to float32 (exact); reject other dtypes and NaN."""
    if q.dtype in (torch.float16, torch.bfloat16):
        q = q.float()
    if q.dtype != torch.float32:
        raise ValueError(f"scores must be float32 (or float16/bfloat16), got {q.dtype}")
    if bool(torch.isnan(q).any()):
        raise ValueError("scores contain NaN")
    return q


@dataclass(frozen=True)
class TopKCut:
    """The canonical top-k set of a score map, as a rule any tile can apply.

    A pixel with flat index ``i`` and score ``q`` (and inside ``valid``) is selected when
    ``select_all``, or ``q > threshold``, or ``q == threshold and i < index_cutoff``.

    Attributes:
        k: number of selected pixels (after clipping to the candidate count).
        n_candidates: pixels considered (inside ``valid``).
        threshold: the k-th largest score (``inf`` when ``k == 0``, ``-inf`` when ``select_all``).
        n_greater: candidates with ``q > threshold``.
        n_equal: candidates with ``q == threshold``.
        index_cutoff: tied candidates with a flat index below this are selected
            (exactly ``k - n_greater`` of them; ``H * W`` when every tie is taken).
        select_all: every candidate is selected (``k == n_candidates``).
        width: width W of the map the flat indices refer to.
    """

    k: int
    n_candidates: int
    threshold: float
    n_greater: int
    n_equal: int
    index_cutoff: int
    select_all: bool
    width: int

    @property
    def n_tied_taken(self) -> int:
        """How many of the tied pixels are selected."""
        return self.k - self.n_greater if not self.select_all and self.k else 0

    def mask(
        self, q: torch.Tensor, row: int = 0, col: int = 0, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The selected pixels of one tile.

        Args:
            q: ``(h, w)`` (or ``(1, 1, h, w)``) float32 scores of the tile, the same
                values as when the cut was computed.
            row: top row of the tile in the map.
            col: left column of the tile in the map.
            valid: ``(h, w)`` bool candidates (default: all).

        Returns:
            ``(h, w)`` bool, True where the pixel is replaced.
        """
        q = _as_map(_check_scores(q))
        cand = torch.ones_like(q, dtype=torch.bool) if valid is None else _as_map(valid).to(torch.bool)
        if self.k == 0:
            return torch.zeros_like(cand)
        if self.select_all:
            return cand
        t = torch.tensor(self.threshold, dtype=torch.float32, device=q.device)
        sel = q > t
        if self.n_tied_taken:
            h, w = q.shape
            rows = torch.arange(row, row + h, device=q.device, dtype=torch.int64).view(-1, 1)
            cols = torch.arange(col, col + w, device=q.device, dtype=torch.int64).view(1, -1)
            sel |= (q == t) & (rows * self.width + cols < self.index_cutoff)
        return sel & cand


def _trivial_cut(k: int, n: int, width: int) -> TopKCut:
    """The cut selecting nothing (``k == 0``) or every candidate (``k == n``)."""
    if k == 0:
        return TopKCut(0, n, math.inf, 0, 0, 0, select_all=False, width=width)
    return TopKCut(k, n, -math.inf, n, 0, 0, select_all=True, width=width)


def topk_cut(q: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> TopKCut:
    """The canonical top-k rule of a whole in-memory score map (O(H W), no full sort).

    Args:
        q: ``(H, W)`` or ``(1, 1, H, W)`` float32 scores.
        k: number of pixels to select (>= 0; clipped to the candidate count).
        valid: ``(H, W)`` bool candidates (default: all pixels).

    Returns:
        The :class:`TopKCut`.
    """
    q = _as_map(_check_scores(q))
    h, w = q.shape
    flat = q.reshape(-1)
    cand = None if valid is None else _as_map(valid).to(torch.bool).reshape(-1)
    vals = flat if cand is None else flat[cand]
    n = int(vals.numel())
    k = max(0, min(int(k), n))
    if k == 0 or k == n:
        return _trivial_cut(k, n, w)
    t = vals.kthvalue(n - k + 1).values
    greater = flat > t
    equal = flat == t
    if cand is not None:
        greater &= cand
        equal &= cand
    n_greater = int(greater.sum())
    tied = torch.nonzero(equal).squeeze(1)
    need = k - n_greater
    cutoff = h * w if need == tied.numel() else int(tied[need - 1]) + 1
    return TopKCut(k, n, float(t), n_greater, int(tied.numel()), cutoff, select_all=False, width=w)


def canonical_topk(q: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The k flat indices with the largest Q, ties to the smallest flat index.

    Equivalent to sorting by (Q descending, index ascending) and taking the first k,
    but O(H W) (one ``kthvalue``). ``k`` larger than the candidate count selects all.

    Args:
        q: ``(H, W)`` or ``(1, 1, H, W)`` float32 scores.
        k: number of points (>= 0).
        valid: ``(H, W)`` bool candidates (MagNet-Fast: the refined patches).

    Returns:
        ``(min(k, n),)`` int64 flat indices ``y * W + x``, **ascending**.
    """
    cut = topk_cut(q, k, valid)
    return torch.nonzero(cut.mask(q, valid=valid).reshape(-1)).squeeze(1)


def _float_keys(q: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 keys in ``[0, 2**32)`` of float32 values (``-0.0`` as ``0.0``)."""
    bits = (q + 0.0).contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, ~bits, bits + (1 << 31))


def _key_to_float(key: int) -> float:
    """Inverse of :func:`_float_keys` for one key."""
    bits = key - (1 << 31) if key >= (1 << 31) else ~key
    return float(torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32))


class StreamingTopK:
    """The canonical top-k of a score map seen tile by tile, in bounded memory.

    Radix selection with histograms instead of a sort. Each pass visits every tile
    once; memory is ``2**bits`` counters plus one tile. Passes:

    1. histogram of the high ``bits`` of every score's order-preserving 32-bit key
       (and the candidate count);
    2. the next ``bits`` among scores in the bucket holding the k-th largest, and so on
       until the threshold ``t`` is exact (2 passes with ``bits=16``);
    3. only when some, but not all, of the ties at ``t`` are needed: the same radix
       selection over the flat indices of the tied pixels, to find the canonical
       index cutoff (``ceil(log2(H W) / bits)`` passes).

    Usage::

        sel = StreamingTopK(k, (H, W))
        while not sel.done:
            for q_tile, row, col in tiles():        # a partition of the map, same values every pass
                sel.update(q_tile, row, col)
            sel.end_pass()
        cut = sel.result()                          # then cut.mask(q_tile, row, col) per tile

    Tiles must not overlap (give each tile's own core, not its halo) and must
    reproduce the same scores in every pass; a change is detected and raises.

    Args:
        k: number of pixels to select (>= 0; clipped to the candidate count).
        shape: ``(H, W)`` of the whole map.
        bits: radix digit width (1..24); 16 gives 64 Ki counters.
    """

    def __init__(self, k: int, shape: tuple[int, int], bits: int = 16) -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if not 1 <= bits <= 24:
            raise ValueError(f"bits must be in 1..24, got {bits}")
        self.k = int(k)
        self.shape = (int(shape[0]), int(shape[1]))
        self.bits = bits
        self._phase = "key"  # "key": locate the threshold; "index": locate the tie cutoff
        self._total = 32  # bit width of the quantity being selected (key, then flat index)
        self._lo = 32  # bits [lo, total) are resolved and equal to _prefix
        self._prefix = 0
        self._need = 0  # rank still to locate inside the current bucket
        self._expected = -1  # elements expected in the current bucket (-1: first pass)
        self._n_candidates = 0
        self._n_greater = 0
        self._n_equal = 0
        self._threshold_key = 0
        self._hist = torch.zeros(1 << bits, dtype=torch.int64)
        self._seen = 0
        self._result: TopKCut | None = None

    @property
    def done(self) -> bool:
        """No more passes are needed; :meth:`result` is ready."""
        return self._result is not None

    def _digit_span(self) -> tuple[int, int]:
        """``(shift, span)`` of the digit counted in this pass."""
        span = min(self.bits, self._lo)
        return self._lo - span, span

    def update(self, q: torch.Tensor, row: int = 0, col: int = 0, valid: torch.Tensor | None = None) -> None:
        """Count one tile in the current pass.

        Args:
            q: ``(h, w)`` (or ``(1, 1, h, w)``) float32 scores of the tile.
            row: top row of the tile in the map.
            col: left column of the tile in the map.
            valid: ``(h, w)`` bool candidates (default: all).
        """
        if self.done:
            raise RuntimeError("StreamingTopK is done; call result()")
        q = _as_map(_check_scores(q))
        h, w = q.shape
        if row < 0 or col < 0 or row + h > self.shape[0] or col + w > self.shape[1]:
            raise ValueError(f"tile ({row}, {col}, {h}x{w}) is outside the {self.shape} map")
        keep = None if valid is None else _as_map(valid).to(torch.bool).reshape(-1)
        keys = _float_keys(q).reshape(-1)
        if keep is not None:
            keys = keys[keep]
        self._seen += int(keys.numel())
        if self._phase == "key":
            values = keys
        else:
            flat = self._flat_indices(row, col, h, w, q.device)
            values = (flat if keep is None else flat[keep])[keys == self._threshold_key]
        if self._lo < self._total:
            values = values[(values >> self._lo) == self._prefix]
        shift, span = self._digit_span()
        if values.numel():
            digits = (values >> shift) & ((1 << span) - 1)
            self._hist += torch.bincount(digits, minlength=1 << self.bits).cpu()

    def _flat_indices(self, row: int, col: int, h: int, w: int, device: torch.device) -> torch.Tensor:
        """Row-major indices of a tile's pixels in the whole map, ``(h * w,)`` int64."""
        rows = torch.arange(row, row + h, device=device, dtype=torch.int64).view(-1, 1)
        cols = torch.arange(col, col + w, device=device, dtype=torch.int64).view(1, -1)
        return (rows * self.shape[1] + cols).reshape(-1)

    def end_pass(self) -> None:
        """Close the current pass: narrow the bucket, or finish."""
        if self.done:
            raise RuntimeError("StreamingTopK is done; call result()")
        hist = self._hist.tolist()
        self._hist.zero_()
        seen, self._seen = self._seen, 0
        if self._expected < 0:  # first pass: now the candidate count is known
            self._n_candidates = seen
            self.k = min(self.k, seen)
            self._need = self.k
            if self.k in (0, seen):
                self._result = _trivial_cut(self.k, seen, self.shape[1])
                return
        elif seen != self._n_candidates or sum(hist) != self._expected:
            raise RuntimeError(
                "scores changed between passes of StreamingTopK; give every tile once per pass, "
                "with the same values"
            )
        shift, span = self._digit_span()
        if self._phase == "key":  # the need-th largest: walk digits from the top
            digit, before = len(hist) - 1, 0
            while before + hist[digit] < self._need:
                before += hist[digit]
                digit -= 1
            self._n_greater += before
        else:  # the need-th smallest tied index: walk digits from the bottom
            digit, before = 0, 0
            while before + hist[digit] < self._need:
                before += hist[digit]
                digit += 1
        self._need -= before
        self._prefix = (self._prefix << span) | digit
        self._lo = shift
        self._expected = hist[digit]
        if self._lo > 0:
            return
        if self._phase == "key":
            self._threshold_key = self._prefix
            self._n_equal = hist[digit]
            if self._need == self._n_equal:  # every tie is taken
                self._finish_cut(self.shape[0] * self.shape[1])
                return
            self._phase = "index"
            self._total = max(1, (self.shape[0] * self.shape[1] - 1).bit_length())
            self._lo = self._total
            self._prefix = 0
        else:
            self._finish_cut(self._prefix + 1)

    def _finish_cut(self, index_cutoff: int) -> None:
        """Build the result once the threshold (and the index cutoff) are known."""
        self._result = TopKCut(
            self.k, self._n_candidates, _key_to_float(self._threshold_key), self._n_greater,
            self._n_equal, index_cutoff, select_all=False, width=self.shape[1],
        )

    def result(self) -> TopKCut:
        """The canonical cut (same as :func:`topk_cut` on the assembled map)."""
        if self._result is None:
            raise RuntimeError("StreamingTopK needs more passes; loop while not sel.done")
        return self._result


# --------------------------------------------------------------------------- replacement


def replace_points(y: torch.Tensor, r: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Copy all C values of R into Y at the selected pixels (no blending).

    Args:
        y: ``(..., C, H, W)`` accumulated prediction.
        r: same shape, the refined prediction at the stage size.
        indices: ``(k,)`` int64 flat indices ``y * W + x`` (same for every leading index).

    Returns:
        A new tensor, ``y`` with the selected pixels taken from ``r``.
    """
    if y.shape != r.shape:
        raise ValueError(f"Y {tuple(y.shape)} and R {tuple(r.shape)} differ in shape")
    h, w = y.shape[-2:]
    out = y.clone()
    idx = indices.to(device=y.device, dtype=torch.int64)
    out.view(-1, h * w)[:, idx] = r.reshape(-1, h * w)[:, idx]
    return out


REPLACE_RULES = ("all", "confident")
"""Which selected points take R: ``all`` (the paper) or ``confident`` (only where R is more certain
than Y)."""


def confident_mask(y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Where R is strictly more certain than Y: ``top1(R) - top2(R) > top1(Y) - top2(Y)``.

    The ``confident`` replacement rule: a selected point takes R only there, so a stage never
    makes a pixel less certain than Y already was. A refinement module that hedges where the
    segmenter is sure (the binary module answers ~0.22 on certain background) then cannot paint
    its hedge into the refined patches, which would show as patch-shaped plateaus in the
    probabilities and the uncertainty map. Pointwise, so tiles agree with the whole map.

    Args:
        y: ``(N, C, H, W)`` accumulated prediction.
        r: same shape, the refined prediction (0 outside the refined patches: never confident there).

    Returns:
        ``(H, W)`` bool for N = 1, else ``(N, 1, H, W)``.
    """
    if y.shape != r.shape:
        raise ValueError(f"Y {tuple(y.shape)} and R {tuple(r.shape)} differ in shape")
    if y.shape[1] == 2:  # top1 - top2 = |p0 - p1| exactly for two classes (no topk)
        gain = (r[:, 0:1] - r[:, 1:2]).abs() > (y[:, 0:1] - y[:, 1:2]).abs()
    else:
        gain = certainty(r) > certainty(y)
    return gain[0, 0] if gain.shape[0] == 1 else gain


def check_replace_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`REPLACE_RULES`.

    Raises:
        UsageError: unknown rule.
    """
    if rule not in REPLACE_RULES:
        raise UsageError(f"replacement rule {rule!r}: use one of {', '.join(REPLACE_RULES)}")
    return rule


def replace_where(y: torch.Tensor, r: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Tile form of :func:`replace_points`: take R where ``mask`` (e.g. :meth:`TopKCut.mask`).

    Args:
        y: ``(..., C, h, w)`` accumulated prediction of a tile.
        r: same shape, refined prediction.
        mask: ``(h, w)`` bool.

    Returns:
        ``(..., C, h, w)`` new tensor.
    """
    return torch.where(mask.to(y.device), r, y)


# --------------------------------------------------------------------------- point budget


@dataclass(frozen=True)
class PointPreset:
    """Per-stage point budget and median kernel of one official setting.

    ``n_points > 1`` is a count, ``n_points <= 1`` a fraction of the candidate area
    (see :func:`stage_points`).

    Attributes:
        full_points: MagNet (all patches).
        fast_points: MagNet-Fast (fraction of the refined patches' area).
        fast_patches: patches refined per stage by MagNet-Fast.
        kernel: median window side of Q.
    """

    full_points: float
    fast_points: float
    fast_patches: int
    kernel: int


POINT_PRESETS: dict[str, PointPreset] = {
    # Scripts: 2**15 points per stage (the paper's Table 6 / Fig. 7 use 2**16; the README
    # numbers of the released weights were measured with 2**15). MagNet-Fast: the paper refines
    # 3 patches per scale (256 -> 512 -> 2048); the official fast script uses 4 over all 4 scales.
    "cityscapes": PointPreset(full_points=32768, fast_points=0.9, fast_patches=3, kernel=5),
    # Scripts: 75 % of the stage pixels (the paper says 2**16 points per scale).
    "deepglobe": PointPreset(full_points=0.75, fast_points=0.9, fast_patches=3, kernel=11),
}
"""Official settings by dataset, as the official test scripts (``scripts/*/test_magnet*.sh``) set them."""


def stage_points(n_points: float, area: int) -> int:
    """Points to replace in one stage: ``k = min(n_points, area)`` or ``floor(n_points * area)``.

    Args:
        n_points: a count (> 1, an integer) or a fraction (in ``(0, 1]``).
        area: candidate pixels: the stage area (MagNet) or the union of the refined
            patches (MagNet-Fast; :func:`covered_area`).

    Returns:
        k, an int in ``[0, area]`` (the official code can return a float, which ``topk`` rejects).
    """
    if n_points <= 0:
        raise UsageError(f"--n-points {n_points} must be > 0 (a count, or a fraction <= 1)")
    if n_points > 1:
        if n_points != int(n_points):
            raise UsageError(f"--n-points {n_points} must be a whole number when above 1")
        return min(int(n_points), int(area))
    return min(int(area), int(math.floor(n_points * area)))


# --------------------------------------------------------------------------- patches


def patch_grid(stage_hw: tuple[int, int], crop_hw: tuple[int, int]) -> list[Window]:
    """Patches that cover a stage exactly, row-major.

    Along each axis (length L, crop T): ``n = ceil(L / T)`` patches of size
    ``T' = min(T, L)`` starting at ``s_i = floor(i * (L - T') / (n - 1))`` (0 when
    n = 1): the first starts at 0, the last ends at L, consecutive patches touch or
    overlap (``s_{i+1} - s_i <= T``). Same count as the official code; its
    truncated step left the last 1-2 columns uncovered for uneven sizes.

    Args:
        stage_hw: ``(H, W)`` stage size, px (>= 1).
        crop_hw: ``(h, w)`` patch size at the stage scale, px (>= 1).

    Returns:
        ``ceil(H / h) * ceil(W / w)`` windows (stage pixels).
    """
    if min(crop_hw) < 1:
        raise UsageError(f"crop size {crop_hw} must be >= 1 px")
    rows = axis_starts(int(stage_hw[0]), int(crop_hw[0]), 0)
    cols = axis_starts(int(stage_hw[1]), int(crop_hw[1]), 0)
    ph, pw = min(crop_hw[0], stage_hw[0]), min(crop_hw[1], stage_hw[1])
    return [Window(r, c, ph, pw) for r in rows for c in cols]


def coverage_count(boxes: Sequence[Window], shape: tuple[int, int]) -> np.ndarray:
    """How many patches cover each pixel.

    Args:
        boxes: windows inside ``shape``.
        shape: ``(H, W)``.

    Returns:
        ``(H, W)`` int32 counts (>= 1 everywhere for :func:`patch_grid`).
    """
    count = np.zeros(shape, dtype=np.int32)
    for b in boxes:
        count[b.slices] += 1
    return count


def covered_area(boxes: Sequence[Window], shape: tuple[int, int]) -> int:
    """Pixels covered by at least one of ``boxes`` (the union's area)."""
    return int(np.count_nonzero(coverage_count(boxes, shape)))


def patch_mean(yu: torch.Tensor, boxes: Sequence[Window]) -> torch.Tensor:
    """Mean of a map over each patch (exact box mean at the map's resolution).

    The official code takes ``roi_align`` (with its half-pixel shift) to the input
    size and averages that; the exact mean is what the paper describes.

    Args:
        yu: ``(H, W)`` or ``(1, 1, H, W)`` float, e.g. Yu.
        boxes: windows inside the map.

    Returns:
        ``(len(boxes),)`` float32 means.
    """
    m = _as_map(yu).to(torch.float64)
    return torch.stack([m[b.slices].mean() for b in boxes]).to(torch.float32) if boxes else torch.zeros(0)


def rank_patches(scores: torch.Tensor | Sequence[float], n_patches: int | None) -> list[int]:
    """MagNet-Fast's patch choice: the ``n_patches`` highest mean uncertainties.

    Descending score as in the paper, ties to the lower patch index. (The official code
    sorts ascending, so it refines the *least* uncertain patches, and then zeroes the
    point score inside them. Neither is reproduced.)

    Args:
        scores: ``(P,)`` mean Yu per patch (:func:`patch_mean`).
        n_patches: patches to keep; ``None`` or a value >= P keeps all.

    Returns:
        Patch indices, most uncertain first.
    """
    values = [float(v) for v in (scores.tolist() if isinstance(scores, torch.Tensor) else scores)]
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    if n_patches is None:
        return order
    if n_patches < 1:
        raise UsageError(f"--n-patches {n_patches} must be >= 1")
    return order[:n_patches]


def _resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``, no antialias) of ``(N, C, H, W)``."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def crop_resize(x: torch.Tensor, box: Window, size: tuple[int, int]) -> torch.Tensor:
    """Crop a window and resize it (bilinear, ``align_corners=False``): the Y crop of a patch.

    This is the exact crop the paper describes. The official code uses torchvision's
    ``roi_align(aligned=False)`` instead, which adds a half-pixel shift
    (:func:`roi_align_legacy`).

    Args:
        x: ``(N, C, H, W)`` float map.
        box: window inside the map.
        size: ``(h, w)`` output size.

    Returns:
        ``(N, C, h, w)``.
    """
    return _resize_bilinear(x[..., box.row : box.row_end, box.col : box.col_end], size)


def _roi_axis_weights(start: float, end: float, n_out: int, n_in: int, sampling_ratio: int) -> torch.Tensor:
    """``(n_out, n_in)`` float64 matrix of legacy roi_align sampling along one axis."""
    length = max(end - start, 1.0)
    bin_size = length / n_out
    grid = sampling_ratio if sampling_ratio > 0 else math.ceil(length / n_out)
    grid = max(grid, 1)
    weights = torch.zeros((n_out, n_in), dtype=torch.float64)
    for o in range(n_out):
        for s in range(grid):
            p = start + o * bin_size + (s + 0.5) * bin_size / grid
            if p < -1.0 or p > n_in:
                continue
            p = max(p, 0.0)
            lo = int(p)
            if lo >= n_in - 1:
                weights[o, n_in - 1] += 1.0
                continue
            frac = p - lo
            weights[o, lo] += 1.0 - frac
            weights[o, lo + 1] += frac
    return weights / grid


def roi_align_legacy(
    x: torch.Tensor, box: Window, size: tuple[int, int], sampling_ratio: int = -1
) -> torch.Tensor:
    """``torchvision.ops.roi_align(x, box, size, aligned=False)`` re-implemented with matrices.

    Bin ``o`` of length ``b = max(L, 1) / n_out`` (L the box length) averages ``g``
    bilinear samples at ``start + o b + (s + 1/2) b / g`` (``g = ceil(L / n_out)``
    unless ``sampling_ratio > 0``), in a frame where pixel i's centre is at i: the
    legacy half-pixel shift. Samples outside ``[-1, n]`` count as 0; coordinates are
    clamped at 0 and at the last pixel. Separable, so it is two matrix products.
    For parity experiments with the official pipeline; :func:`crop_resize` is the default.

    Args:
        x: ``(N, C, H, W)`` float map.
        box: window in x's pixels (used as the box ``[col, row, col_end, row_end]``).
        size: ``(h, w)`` output size.
        sampling_ratio: samples per bin and axis; <= 0 for adaptive.

    Returns:
        ``(N, C, h, w)`` in x's dtype.
    """
    h, w = x.shape[-2:]
    wy = _roi_axis_weights(box.row, box.row_end, size[0], h, sampling_ratio).to(x.device, x.dtype)
    wx = _roi_axis_weights(box.col, box.col_end, size[1], w, sampling_ratio).to(x.device, x.dtype)
    return torch.matmul(torch.matmul(wy, x), wx.T)


def ensemble_patches(
    patches: Sequence[torch.Tensor], boxes: Sequence[Window], stage_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assemble per-patch predictions into a stage map, averaging overlaps.

    Each patch is resized (bilinear, ``align_corners=False``) to its window's size and
    added; the sum is divided by the number of patches covering each pixel.

    Args:
        patches: ``(N, C, h, w)`` float per patch (e.g. softmax of the refinement output).
        boxes: the patches' windows at the stage scale, one per patch.
        stage_hw: ``(H, W)``.

    Returns:
        ``(R, covered)``: ``(N, C, H, W)`` averaged map (0 where no patch lies) and
        ``(H, W)`` bool, True where at least one patch lies.
    """
    if len(patches) != len(boxes) or not patches:
        raise ValueError(f"need one window per patch, got {len(patches)} patches and {len(boxes)} windows")
    first = patches[0]
    acc = torch.zeros((*first.shape[:-2], *stage_hw), dtype=first.dtype, device=first.device)
    count = torch.from_numpy(coverage_count(boxes, stage_hw)).to(first.device)
    for p, b in zip(patches, boxes, strict=True):
        acc[..., b.row : b.row_end, b.col : b.col_end] += _resize_bilinear(p, b.shape)
    covered = count > 0
    return acc / count.clamp(min=1).to(acc.dtype), covered
