"""Tile geometry (pure integer maths) and blending of overlapping tiles."""

from refine_cli.tiling.blend import BandAccumulator, ramp, tile_weights
from refine_cli.tiling.grid import GridPlan, Tile, Window, axis_starts, plan_grid

__all__ = [
    "BandAccumulator", "GridPlan", "Tile", "Window", "axis_starts", "plan_grid", "ramp", "tile_weights",
]
