"""Tile geometry: frozen windows and a pure grid planner.

Coordinates are integer pixels, rows first: a :class:`Window` is the half-open
rectangle ``[row, row + height) x [col, col + width)``. Nothing here does IO or
imports torch.

Grid along one axis (length ``L``, tile size ``T``, requested overlap ``O``)::

    T' = min(T, L)                                  # a short axis is one tile
    n  = 1                          if L <= T
         ceil((L - O) / (T - O))    otherwise       # fewest tiles with overlap >= O
    s_i = floor(i * (L - T') / (n - 1))             # i = 0 .. n-1 (s_0 = 0 when n = 1)

so the first tile starts at 0, the last one ends exactly at ``L``, every tile
has size ``T'`` and consecutive tiles overlap by at least ``O`` (the spare
length is spread evenly instead of piling up in the last tile).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from refine_cli.errors import UsageError


@dataclass(frozen=True, order=True)
class Window:
    """An axis-aligned pixel rectangle ``[row, row+height) x [col, col+width)``.

    Attributes:
        row: top row (>= 0 once clipped to an image).
        col: left column.
        height: number of rows (>= 0).
        width: number of columns (>= 0).
    """

    row: int
    col: int
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.height < 0 or self.width < 0:
            raise ValueError(f"window size must be >= 0, got {self.height}x{self.width}")

    @property
    def row_end(self) -> int:
        """One past the last row."""
        return self.row + self.height

    @property
    def col_end(self) -> int:
        """One past the last column."""
        return self.col + self.width

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)``."""
        return (self.height, self.width)

    @property
    def area(self) -> int:
        """Number of pixels."""
        return self.height * self.width

    @property
    def slices(self) -> tuple[slice, slice]:
        """Numpy slices ``(rows, cols)`` selecting this window from a full array."""
        return (slice(self.row, self.row_end), slice(self.col, self.col_end))

    @classmethod
    def full(cls, shape: tuple[int, int]) -> Window:
        """The window covering a whole ``(height, width)`` array."""
        return cls(0, 0, int(shape[0]), int(shape[1]))

    def intersection(self, other: Window) -> Window | None:
        """The overlap of two windows, or ``None`` when they do not overlap."""
        r0, c0 = max(self.row, other.row), max(self.col, other.col)
        r1, c1 = min(self.row_end, other.row_end), min(self.col_end, other.col_end)
        if r1 <= r0 or c1 <= c0:
            return None
        return Window(r0, c0, r1 - r0, c1 - c0)

    def expand(self, margin: int, bounds: tuple[int, int]) -> Window:
        """Grow by ``margin`` px on every side, clipped to ``[0, H) x [0, W)``."""
        r0, c0 = max(0, self.row - margin), max(0, self.col - margin)
        r1 = min(int(bounds[0]), self.row_end + margin)
        c1 = min(int(bounds[1]), self.col_end + margin)
        return Window(r0, c0, r1 - r0, c1 - c0)

    def relative_to(self, outer: Window) -> Window:
        """This window in the coordinates of ``outer`` (which must contain it)."""
        if not (outer.row <= self.row and outer.col <= self.col and
                self.row_end <= outer.row_end and self.col_end <= outer.col_end):
            raise ValueError(f"{self} is not inside {outer}")
        return Window(self.row - outer.row, self.col - outer.col, self.height, self.width)

    def scaled(self, factor_rows: float, factor_cols: float) -> Window:
        """The smallest window at another resolution that covers this one.

        ``factor`` is target pixels per source pixel (0.5 = half resolution).
        """
        r0 = math.floor(self.row * factor_rows)
        c0 = math.floor(self.col * factor_cols)
        r1 = math.ceil(self.row_end * factor_rows)
        c1 = math.ceil(self.col_end * factor_cols)
        return Window(r0, c0, r1 - r0, c1 - c0)


@dataclass(frozen=True)
class Tile:
    """One tile of a grid.

    Attributes:
        index: position in row-major order (0-based).
        grid_row: row index in the grid.
        grid_col: column index in the grid.
        window: the region whose output this tile contributes to the blend.
        read: ``window`` grown by the halo and clipped to the image: what a
            refiner sees. The halo is context only; its output is discarded.
        low_neighbours: ``(top, left)``: whether a tile overlaps this one above / to the left.
        high_neighbours: ``(bottom, right)``: whether a tile overlaps this one below / to the right.
    """

    index: int
    grid_row: int
    grid_col: int
    window: Window
    read: Window
    low_neighbours: tuple[bool, bool]
    high_neighbours: tuple[bool, bool]


def axis_starts(length: int, size: int, overlap: int) -> list[int]:
    """Tile starts along one axis (see the module docstring for the formula).

    Args:
        length: axis length L in px (>= 1).
        size: tile size T in px (> overlap).
        overlap: minimum overlap O in px (>= 0).

    Returns:
        Sorted starts ``s_0 = 0 < s_1 < ... < s_{n-1} = L - min(T, L)``.
    """
    if length < 1:
        raise UsageError(f"cannot tile an axis of length {length}")
    if overlap < 0 or size <= overlap:
        raise UsageError(f"tile size ({size}) must be larger than the overlap ({overlap})")
    if length <= size:
        return [0]
    n = math.ceil((length - overlap) / (size - overlap))
    span = length - size
    return [(i * span) // (n - 1) for i in range(n)]


@dataclass(frozen=True)
class GridPlan:
    """A planned tile grid over an image.

    Attributes:
        shape: ``(H, W)`` of the image.
        tile_size: requested tile side T (tiles are ``min(T, H) x min(T, W)``).
        overlap: minimum overlap O between neighbouring tiles, px.
        halo: context margin added around each tile for the refiner, px.
        row_starts: tile starts along rows.
        col_starts: tile starts along columns.
    """

    shape: tuple[int, int]
    tile_size: int
    overlap: int
    halo: int
    row_starts: tuple[int, ...]
    col_starts: tuple[int, ...]

    @property
    def tile_height(self) -> int:
        """Height of every tile."""
        return min(self.tile_size, self.shape[0])

    @property
    def tile_width(self) -> int:
        """Width of every tile."""
        return min(self.tile_size, self.shape[1])

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(tile rows, tile columns)``."""
        return (len(self.row_starts), len(self.col_starts))

    def __len__(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def tile(self, grid_row: int, grid_col: int) -> Tile:
        """The tile at a grid position."""
        nr, nc = self.grid_shape
        win = Window(self.row_starts[grid_row], self.col_starts[grid_col], self.tile_height, self.tile_width)
        return Tile(
            index=grid_row * nc + grid_col,
            grid_row=grid_row,
            grid_col=grid_col,
            window=win,
            read=win.expand(self.halo, self.shape),
            low_neighbours=(grid_row > 0, grid_col > 0),
            high_neighbours=(grid_row < nr - 1, grid_col < nc - 1),
        )

    def tiles(self) -> Iterator[Tile]:
        """All tiles in row-major order."""
        nr, nc = self.grid_shape
        for i in range(nr):
            for j in range(nc):
                yield self.tile(i, j)

    def row_tiles(self, grid_row: int) -> list[Tile]:
        """The tiles of one grid row, left to right."""
        return [self.tile(grid_row, j) for j in range(self.grid_shape[1])]

    def owned(self, tile: Tile) -> Window:
        """The part of ``tile.window`` that this tile alone accounts for.

        It runs from the tile's start to the next tile's start on each axis (to the image's end for the
        last tile). The owned windows of a grid partition the image: counting per tile over them counts
        every pixel once.
        """
        g, c = tile.grid_row, tile.grid_col
        r1 = self.row_starts[g + 1] if g + 1 < len(self.row_starts) else self.shape[0]
        c1 = self.col_starts[c + 1] if c + 1 < len(self.col_starts) else self.shape[1]
        r0, c0 = self.row_starts[g], self.col_starts[c]
        return Window(r0, c0, r1 - r0, c1 - c0).intersection(tile.window) or Window(r0, c0, 0, 0)

    def rows_final_after(self, grid_row: int) -> int:
        """First image row that a later grid row can still touch.

        Once tile rows ``0..grid_row`` are blended, image rows below the returned
        value are final.
        """
        if grid_row + 1 < len(self.row_starts):
            return self.row_starts[grid_row + 1]
        return self.shape[0]


def plan_grid(shape: tuple[int, int], tile_size: int, overlap: int, halo: int = 0) -> GridPlan:
    """Plan an overlapping tile grid over an image.

    Args:
        shape: ``(H, W)`` of the image in px, both >= 1.
        tile_size: tile side T in px (> overlap).
        overlap: minimum overlap O between neighbours in px (>= 0).
        halo: extra context around each tile for the refiner in px (>= 0).

    Returns:
        The plan; see the module docstring for the formula.
    """
    h, w = int(shape[0]), int(shape[1])
    if halo < 0:
        raise UsageError(f"halo must be >= 0, got {halo}")
    return GridPlan(
        shape=(h, w),
        tile_size=int(tile_size),
        overlap=int(overlap),
        halo=int(halo),
        row_starts=tuple(axis_starts(h, tile_size, overlap)),
        col_starts=tuple(axis_starts(w, tile_size, overlap)),
    )


def blocks(shape: tuple[int, int], size: int) -> Iterator[Window]:
    """Partition an image into disjoint ``size x size`` windows (cut at the edges), row-major.

    Window ``(i, j)`` is ``[i*size, min((i+1)*size, H)) x [j*size, min((j+1)*size, W))``;
    together they cover every pixel exactly once (unlike ``plan_grid`` tiles, which overlap).

    Args:
        shape: ``(H, W)``, px (>= 0).
        size: window side, px (>= 1).
    """
    if size < 1:
        raise UsageError(f"block size {size} must be >= 1 px")
    h, w = int(shape[0]), int(shape[1])
    for r in range(0, h, size):
        for c in range(0, w, size):
            yield Window(r, c, min(size, h - r), min(size, w - c))
