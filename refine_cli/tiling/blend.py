"""Seamless blending of overlapping tile outputs.

Feather weights are separable. Along one axis, a tile ``[s, s+T)`` gives pixel
``x`` the weight::

    d(x) = min(x - s      if the tile has a neighbour before it else inf,
               s+T-1 - x  if the tile has a neighbour after it  else inf)
    w(x) = clip((d(x) + 1/2) / F, floor, 1)

with ``F`` the feather width (the grid's overlap) and ``floor`` a small positive
number, so no weight is ever zero. The 2-D weight is ``w_row(y) * w_col(x)``.
Where two tiles overlap by exactly ``F`` px the two ramps sum to exactly 1; in
general the accumulator divides by the summed weights::

    out(p) = sum_t w_t(p) * v_t(p) / sum_t w_t(p)

so the normalised weights at every pixel sum to 1. Edges on the image border
keep full weight, so a pixel covered by a single tile gets that tile's value.

:class:`BandAccumulator` keeps only the band of rows that tiles can still
touch: rows are handed out (``pop_final``) as soon as the grid has moved past
them, so memory is ``O(tile height x image width)``, never the whole image.
"""

from __future__ import annotations

import numpy as np

from refine_cli.tiling.grid import Tile, Window

WEIGHT_FLOOR = 1e-3
"""Smallest blend weight: keeps every weight strictly positive."""


def ramp(length: int, feather: int, low: bool, high: bool, floor: float = WEIGHT_FLOOR) -> np.ndarray:
    """1-D feather weights for one tile axis.

    Args:
        length: tile length along the axis, px.
        feather: ramp width F, px (>= 1 for a ramp; 0 gives flat weights).
        low: a neighbour overlaps the start of the tile.
        high: a neighbour overlaps the end of the tile.
        floor: smallest weight (> 0).

    Returns:
        ``(length,)`` float32 weights in ``[floor, 1]``.
    """
    x = np.arange(length, dtype=np.float64)
    d = np.full(length, np.inf)
    if low:
        d = np.minimum(d, x)
    if high:
        d = np.minimum(d, length - 1 - x)
    if feather <= 0:
        w = np.ones(length)
    else:
        w = np.clip((d + 0.5) / feather, floor, 1.0)
    return w.astype(np.float32)


def tile_weights(tile: Tile, feather: int, floor: float = WEIGHT_FLOOR) -> np.ndarray:
    """2-D feather weights of a tile's ``window``.

    Returns:
        ``(h, w)`` float32 in ``[floor**2, 1]``.
    """
    wy = ramp(tile.window.height, feather, tile.low_neighbours[0], tile.high_neighbours[0], floor)
    wx = ramp(tile.window.width, feather, tile.low_neighbours[1], tile.high_neighbours[1], floor)
    weights: np.ndarray = wy[:, None] * wx[None, :]
    return weights


class BandAccumulator:
    """Weighted sum of tile outputs over a moving band of full-width rows.

    Args:
        width: image width W, px.
        channels: values per pixel C (1 for a binary probability, C for classes,
            +1 for an uncertainty plane ...).
        max_rows: the largest band the caller will need (tile height is enough
            with row-major tile order).

    Memory: ``max_rows * W * (C + 1) * 4`` bytes.
    """

    def __init__(self, width: int, channels: int, max_rows: int) -> None:
        self.width = int(width)
        self.channels = int(channels)
        self.top = 0
        self._sum = np.zeros((max_rows, self.width, self.channels), np.float32)
        self._weight = np.zeros((max_rows, self.width), np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes held by the band buffers."""
        return self._sum.nbytes + self._weight.nbytes

    def add(self, window: Window, values: np.ndarray, weights: np.ndarray) -> None:
        """Add ``weights * values`` over ``window`` (image coordinates).

        Args:
            window: must start at or below ``top`` and fit in the band.
            values: ``(h, w, C)`` or ``(h, w)`` float32.
            weights: ``(h, w)`` float32 > 0.
        """
        r0 = window.row - self.top
        r1 = r0 + window.height
        if r0 < 0 or r1 > self._sum.shape[0]:
            raise ValueError(f"{window} falls outside the open band starting at row {self.top}")
        if values.ndim == 2:
            values = values[:, :, None]
        cs = slice(window.col, window.col_end)
        self._sum[r0:r1, cs] += values * weights[:, :, None]
        self._weight[r0:r1, cs] += weights

    def pop_final(
        self, until_row: int, allow_uncovered: bool = False
    ) -> tuple[int, np.ndarray, np.ndarray | None]:
        """Hand out the finished rows ``[top, until_row)`` and drop them from the band.

        Args:
            until_row: first row not handed out.
            allow_uncovered: rows may hold pixels no tile gave weight to (their values
                are 0 and the caller fills them); otherwise such a pixel is an error.

        Returns:
            ``(first_row, values, uncovered)``: ``values`` of shape ``(n, W, C)`` float32 is the
            normalised blend ``sum / weight``; ``uncovered`` is the ``(n, W)`` bool mask of
            zero-weight pixels, or ``None`` when there are none.
        """
        n = until_row - self.top
        if n <= 0:
            return self.top, np.zeros((0, self.width, self.channels), np.float32), None
        if n > self._sum.shape[0]:
            raise ValueError(f"cannot pop {n} rows from a band of {self._sum.shape[0]}")
        w = self._weight[:n]
        zero = w <= 0
        uncovered = None
        if zero.any():
            if not allow_uncovered:
                bad = int(np.argmax(zero.any(axis=1))) + self.top
                raise AssertionError(f"row {bad} was never covered by a tile")
            uncovered = zero.copy()
        out = self._sum[:n] / np.where(zero, 1.0, w)[:, :, None]
        first = self.top
        # Shift the open rows up; the freed rows at the bottom start at zero again.
        rest = self._sum.shape[0] - n
        self._sum[:rest] = self._sum[n:]
        self._sum[rest:] = 0
        self._weight[:rest] = self._weight[n:]
        self._weight[rest:] = 0
        self.top = until_row
        return first, out, uncovered
