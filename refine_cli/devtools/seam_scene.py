"""A mask of objects placed across the seams of a row-band polygonizer, with a known object count.

The mask is a grid of cells ``4 * band_rows`` high; each cell's centre row and the rows a quarter above
and below it are band seams (multiples of ``band_rows``). Every cell holds one pattern, cycling through
:data:`PATTERNS`: a bar cut by one seam, a ring whose hole is cut by a seam, a U whose arms meet only
below a seam, an upside-down U, a comb of three arms, a small square inside one band, a ring with an
island in its hole, and two squares touching at one corner across a seam (two objects with
4-connectivity). Rows are rendered on demand (:meth:`SeamScene.rows`), so huge masks are streamed.
"""

from __future__ import annotations

import numpy as np

PATTERNS = ("bar", "ring", "u", "n", "comb", "square", "ring_island", "corners")
OBJECTS = {"bar": 1, "ring": 1, "u": 1, "n": 1, "comb": 1, "square": 1, "ring_island": 2, "corners": 2}
"""4-connected objects per pattern."""


def pattern(kind: str, h: int, w: int) -> np.ndarray:
    """One cell: ``(h, w)`` bool, ``h = 4 b`` with seams at rows ``b``, ``2 b``, ``3 b``; ``w >= 24``."""
    c, t = h // 2, 3
    m = np.zeros((h, w), bool)
    left, right = 2, w - 2
    if kind == "bar":
        m[c - 3:c + 3, left:right] = True
    elif kind in ("ring", "ring_island"):
        m[2:h - 2, left:right] = True
        m[c - h // 8:c + h // 8, left + t:right - t] = False  # the hole crosses the centre seam
        if kind == "ring_island":
            m[c - 2:c + 2, w // 2 - 2:w // 2 + 2] = True
    elif kind in ("u", "comb"):
        m[c + 1:c + 1 + t, left:right] = True  # the arms meet only below the centre seam
        arms = (left, right - t) if kind == "u" else (left, w // 2 - 1, right - t)
        for a in arms:
            m[2:c + 1 + t, a:a + t] = True
    elif kind == "n":
        m[c - 1 - t:c - 1, left:right] = True  # the arms meet only above the centre seam
        for a in (left, right - t):
            m[c - 1 - t:h - 2, a:a + t] = True
    elif kind == "square":
        m[c - h // 4 + 2:c - h // 4 + 6, left:left + 4] = True  # inside the band above the centre seam
    elif kind == "corners":
        m[c - 4:c, left:left + 4] = True  # touches the next square only at the corner (c, left + 4)
        m[c:c + 4, left + 4:left + 8] = True
    else:
        raise ValueError(kind)
    return m


class SeamScene:
    """A streamed uint8 mask (``{0, 255}``) of seam-crossing objects.

    Args:
        height, width: size in pixels (a multiple of the cell size is filled; the rest is background).
        band_rows: seam spacing (the polygonizer's band height), at least 8.
        cell_width: width of one cell, at least 24.
    """

    def __init__(self, height: int, width: int, band_rows: int, cell_width: int = 48) -> None:
        self.shape = (int(height), int(width))
        self.cell = (4 * band_rows, cell_width)
        self.grid = (height // self.cell[0], width // cell_width)
        self._cells = {k: pattern(k, *self.cell) for k in PATTERNS}

    def kind(self, i: int, j: int) -> str:
        """The pattern of cell ``(i, j)``."""
        return PATTERNS[(i + 3 * j) % len(PATTERNS)]

    @property
    def count(self) -> int:
        """Number of 4-connected objects."""
        return sum(OBJECTS[self.kind(i, j)] for i in range(self.grid[0]) for j in range(self.grid[1]))

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)``: ``(r1 - r0, W)`` uint8, 255 = object."""
        ch, cw = self.cell
        out = np.zeros((r1 - r0, self.shape[1]), np.uint8)
        for i in range(r0 // ch, min(-(-r1 // ch), self.grid[0])):
            a, b = max(r0, i * ch), min(r1, (i + 1) * ch)
            strip = np.concatenate([self._cells[self.kind(i, j)][a - i * ch:b - i * ch]
                                    for j in range(self.grid[1])], axis=1)
            out[a - r0:b - r0, :strip.shape[1]] = strip * np.uint8(255)
        return out
