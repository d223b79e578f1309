"""Geometry of the official CascadePSP inference: global resize, padding, local patch grid.

Pure integer maths (plus the one float64 product torch uses for resize sizes); no IO,
no torch. Coordinates are pixels, rows first; windows are half-open.

Global step (working size ``L``, image ``h x w``, ``M = max(h, w)``)::

    s      = L / M                                  (float64)
    out    = (floor(float(h) * s), floor(float(w) * s))
    mode   = 'area' if M > L, 'up' (bicubic image / bilinear mask) if M < L, none if M == L

``floor(float(side) * s)`` is torch's output-size rule for ``interpolate(scale_factor=s)``;
the product can fall just below an integer, so the long side is sometimes ``L - 1``
(3492 x 2328 at L=900 gives 899 x 599, not 900 x 600).

``safe_forward`` padding (bottom and right): when ``h % 8`` or ``w % 8`` is non-zero, *both*
sides become ``(d // 8 + 1) * 8``, so a side that is already a multiple of 8 still gains 8.

Local step grid over the full-resolution ``h x w`` image::

    step = L // 2 - 32                              (418 for L=900)
    for xi in 0 .. w // step:                       (x outer)
        for yi in 0 .. h // step:                   (y inner)
            sx, ex = xi * step, xi * step + L
            if ex > w: sx, ex = w - L, w
            sx, ex = max(sx, 0), min(ex, w)        (same for y)
            skip if key sy * w + sx was seen before

Each kept patch contributes its prediction trimmed by 16 px on every side that is not on
the image border (``sy > 0``, ``ey < h``, ``sx > 0``, ``ex < w``), to the same trimmed
region of the output (``dst``), which is averaged over contributing patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from refine_cli.errors import UsageError
from refine_cli.tiling.grid import Window

PATCH_TRIM = 16
"""Pixels trimmed from each interior side of a local patch before accumulation."""

PAD_MULTIPLE = 8
"""The network needs both sides to be multiples of this (output stride 8)."""

MIN_SIZE = 66
"""Smallest working size L for which the local grid step ``L // 2 - 32`` is positive."""


def resize_output_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """Torch's output size of ``interpolate(scale_factor=scale)``: ``floor(float(side) * scale)``.

    Args:
        shape: ``(h, w)`` input size in px.
        scale: scale factor (float64).

    Returns:
        ``(h', w')`` in px.
    """
    return (math.floor(float(shape[0]) * scale), math.floor(float(shape[1]) * scale))


@dataclass(frozen=True)
class GlobalResize:
    """How the global step resizes an image to working size L.

    Attributes:
        in_shape: ``(h, w)`` of the full image.
        size: working size L.
        scale: ``L / max(h, w)`` (float64), passed as ``scale_factor``.
        out_shape: ``(h', w')`` after resizing (see the module docstring).
    """

    in_shape: tuple[int, int]
    size: int
    scale: float
    out_shape: tuple[int, int]

    @property
    def mode(self) -> str:
        """``'down'`` ('area'), ``'up'`` (bicubic image, bilinear mask) or ``'none'``."""
        m = max(self.in_shape)
        return "down" if m > self.size else "up" if m < self.size else "none"


def global_resize(shape: tuple[int, int], size: int) -> GlobalResize:
    """Plan the global step's resize of a ``(h, w)`` image to max side ``size``.

    Args:
        shape: ``(h, w)`` in px, both >= 1.
        size: working size L >= 1.

    Returns:
        The resize; ``out_shape == shape`` when ``max(h, w) == size``.
    """
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1 or size < 1:
        raise UsageError(f"cannot resize a {h}x{w} image to max side {size}")
    scale = size / max(h, w)
    out = (h, w) if max(h, w) == size else resize_output_shape((h, w), scale)
    if min(out) < 1:
        raise UsageError(f"a {h}x{w} image is too elongated for --cascade-size {size}: a side would be 0 px")
    return GlobalResize((h, w), int(size), scale, out)


def padded_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """The official ``safe_forward`` padded size (see the module docstring).

    Args:
        shape: ``(h, w)`` in px.

    Returns:
        ``(H, W)`` with ``H, W`` multiples of 8; ``shape`` itself when both already are.
    """
    h, w = int(shape[0]), int(shape[1])
    if h % PAD_MULTIPLE == 0 and w % PAD_MULTIPLE == 0:
        return (h, w)
    return ((h // PAD_MULTIPLE + 1) * PAD_MULTIPLE, (w // PAD_MULTIPLE + 1) * PAD_MULTIPLE)


def patch_step(size: int) -> int:
    """Grid step of the local patches, ``L // 2 - 32`` px (needs ``L >= 66``)."""
    step = size // 2 - 2 * PATCH_TRIM
    if step < 1:
        raise UsageError(f"--cascade-size {size} is too small for the local step: use {MIN_SIZE} or more")
    return step


@dataclass(frozen=True)
class CascadePatch:
    """One local patch of the official grid.

    Attributes:
        index: position in the official loop order (x outer, y inner), after de-duplication.
        window: the patch in image coordinates (``min(L, h) x min(L, w)``).
        dst: the trimmed region of the image the patch's prediction is added to.
        src: the same region in patch coordinates (``dst.shape == src.shape``).
    """

    index: int
    window: Window
    dst: Window
    src: Window


def _axis_span(idx: int, step: int, size: int, length: int) -> tuple[int, int]:
    start, end = idx * step, idx * step + size
    if end > length:
        start, end = length - size, length
    return max(start, 0), min(end, length)


def _trim(start: int, end: int, length: int) -> tuple[int, int, int, int]:
    """``(dst_start, dst_end, src_start, src_end)`` of one axis after the interior trims."""
    lo = PATCH_TRIM if start > 0 else 0
    hi = PATCH_TRIM if end < length else 0
    return start + lo, end - hi, lo, end - start - hi


def plan_cascade_patches(shape: tuple[int, int], size: int) -> tuple[CascadePatch, ...]:
    """The official local-step patch grid (formula in the module docstring).

    Args:
        shape: ``(h, w)`` of the full-resolution image, both >= 1.
        size: working size L (>= 66).

    Returns:
        Unique patches in the official order: x index outer, y index inner.
    """
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1:
        raise UsageError(f"cannot plan patches over a {h}x{w} image")
    step = patch_step(size)
    seen: set[int] = set()
    patches: list[CascadePatch] = []
    for xi in range(w // step + 1):
        sx, ex = _axis_span(xi, step, size, w)
        for yi in range(h // step + 1):
            sy, ey = _axis_span(yi, step, size, h)
            key = sy * w + sx
            if key in seen:
                continue
            seen.add(key)
            dsy, dey, ssy, sey = _trim(sy, ey, h)
            dsx, dex, ssx, sex = _trim(sx, ex, w)
            patches.append(
                CascadePatch(
                    index=len(patches),
                    window=Window(sy, sx, ey - sy, ex - sx),
                    dst=Window(dsy, dsx, dey - dsy, dex - dsx),
                    src=Window(ssy, ssx, sey - ssy, sex - ssx),
                )
            )
    return tuple(patches)
