"""Pure geometry of coarse-to-fine pyramids: the sizes of the levels between an overview and the image."""

from __future__ import annotations

import math


def plan_levels(top: tuple[int, int], full: tuple[int, int], max_ratio: float = 5.0) -> list[tuple[int, int]]:
    """Level sizes after the top (overview) level, ending at the full size.

    With ``r = max(H / h0, W / w0)`` the total upscale, there are
    ``n = max(1, ceil(log(r) / log(max_ratio)))`` levels, level ``k = 1 .. n`` of size
    ``round(H * (h0 / H) ** ((n - k) / n))`` by the same for W (geometric spacing, each step
    at most ``max_ratio``); level ``n`` is exactly ``(H, W)``.

    Args:
        top: ``(h0, w0)`` of the overview (the global step's size).
        full: ``(H, W)`` of the image, at least ``top`` in both axes.
        max_ratio: largest upscale between consecutive levels (> 1).

    Returns:
        ``n`` sizes, strictly increasing in area, the last equal to ``full``.
    """
    h0, w0 = top
    H, W = full
    if h0 > H or w0 > W or h0 < 1 or w0 < 1:
        raise ValueError(f"overview {top} must fit inside the image {full}")
    if max_ratio <= 1:
        raise ValueError("max_ratio must be > 1")
    r = max(H / h0, W / w0)
    n = max(1, math.ceil(math.log(r) / math.log(max_ratio) - 1e-9)) if r > 1 else 1
    out = []
    for k in range(1, n + 1):
        t = (n - k) / n
        out.append((max(1, round(H * (h0 / H) ** t)), max(1, round(W * (w0 / W) ** t))))
    out[-1] = (H, W)
    return out
