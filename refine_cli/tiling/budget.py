"""From a memory budget to a tile size, a queue depth and cache sizes.

The estimate adds up what a run holds at its peak (bytes)::

    base                      interpreter, numpy, OpenCV, torch (measured, ~350 MiB)
  + refiner.fixed_memory()    weights and caches of the method
  + depth * 7 * A             prefetched tiles: RGB (3 B/px) + coarse probability (4 B/px)
  + batch * refiner.tile_memory(A)
  + depth * 4 * C * T^2       refined tiles waiting to be blended
  + 4 * (C + 1) * T * W       the accumulator band (sum + weight)
  + (bytes_out + 1) * 512 * W + 2 * 64 MiB   output strips and GDAL block caches
  + cache                     decoded input chunks: one band of (T + 2*halo + 512) rows
  + resident                  inputs decoded whole for the run (PNG/JPEG below the inline limit)

with ``A = (T + 2*halo)^2`` the pixels a refiner sees per tile, ``C`` the blended
channels and ``W`` the image width. The largest tile size from
:data:`TILE_SIZES` whose estimate fits the budget is chosen (at most the
refiner's preferred size).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from refine_cli.config import MIB
from refine_cli.errors import BudgetError

BASE_BYTES = 350 * MIB
GDAL_CACHE_BYTES = 64 * MIB
TILE_SIZES = (2048, 1536, 1024, 768, 512, 384, 256, 128)


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen sizes and the estimate behind them.

    Attributes:
        tile_size: tile side T, px.
        queue_depth: tiles buffered between threads (each side).
        cache_bytes: decoded-chunk cache given to the image reader.
        estimate: bytes per item of the estimate (see module docstring).
        budget: the budget in bytes.
    """

    tile_size: int
    queue_depth: int
    cache_bytes: int
    budget: int
    estimate: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Estimated peak bytes."""
        return sum(self.estimate.values())


def estimate(tile: int, halo: int, width: int, channels: int, depth: int, batch: int,
             tile_memory: int, fixed_memory: int, bytes_out: int, resident: int = 0) -> dict[str, int]:
    """The items of the estimate for one tile size (see module docstring).

    Args:
        tile: tile side T.
        halo: context px per side.
        width: image width W.
        channels: blended channels C.
        depth: queue depth.
        batch: tiles per refiner call.
        tile_memory: refiner working bytes for one tile of ``(T + 2*halo)^2`` px.
        fixed_memory: refiner bytes held all run long.
        bytes_out: bytes per pixel of all outputs together.
        resident: bytes of inputs held decoded in memory all run long.
    """
    read = (tile + 2 * halo) ** 2
    return {
        "base": BASE_BYTES,
        "refiner_fixed": fixed_memory,
        "prefetch": depth * 7 * read,
        "refiner_tiles": batch * tile_memory,
        "results": depth * 4 * channels * tile * tile,
        "accumulator": 4 * (channels + 1) * tile * width,
        "writers": (bytes_out + 1) * 512 * width + 2 * GDAL_CACHE_BYTES,
        "read_cache": 3 * (tile + 2 * halo + 512) * width,
        "resident_inputs": resident,
    }


def plan_memory(shape: tuple[int, int], *, budget: int, halo: int, channels: int, batch: int,
                tile_memory: object, fixed_memory: int, bytes_out: int, preferred_tile: int = 1024,
                tile_size: int | None = None, size_flag: str | None = None, resident: int = 0) -> MemoryPlan:
    """Choose the tile size and queue depth for a budget.

    Args:
        shape: ``(H, W)`` of the image.
        budget: bytes (``--max-memory``).
        halo: refiner context px.
        channels: blended channels.
        batch: tiles per refiner call.
        tile_memory: ``f(pixels) -> bytes`` of the refiner.
        fixed_memory: refiner bytes held all run long.
        bytes_out: bytes per pixel of all outputs together.
        preferred_tile: the refiner's favourite tile size (upper bound when choosing).
        tile_size: a size forced by ``--tile-size`` or by the method (checked, not chosen).
        size_flag: the flag that fixed ``tile_size``, for the message (default ``--tile-size N``).
        resident: bytes of inputs held decoded in memory all run long.

    Raises:
        BudgetError: nothing fits; the message gives the budget that would (exit code 2).
    """
    best = _search(shape, budget=budget, halo=halo, channels=channels, batch=batch, tile_memory=tile_memory,
                   fixed_memory=fixed_memory, bytes_out=bytes_out, preferred_tile=preferred_tile,
                   tile_size=tile_size, resident=resident)
    if best.total <= budget:
        return best
    h, w = shape
    need = -(-best.total // MIB)
    what = size_flag or (f"--tile-size {tile_size}" if tile_size else "refining")
    if size_flag:
        fix = f" or lower {size_flag.split()[0]}"
    else:
        fix = " or use a smaller --tile-size" if tile_size else ""
    raise BudgetError(
        f"{what} needs about {need} MiB for a {w}x{h} image but --max-memory is {budget // MIB} MiB; "
        f"raise --max-memory to {need + 64}M or more{fix}"
    )


def smallest_need(shape: tuple[int, int], *, halo: int, channels: int, batch: int, tile_memory: object,
                  fixed_memory: int, bytes_out: int, tile_size: int, resident: int = 0) -> int:
    """The smallest estimate in bytes of a grid of ``tile_size`` tiles.

    That is what :func:`plan_memory` would need as a budget to accept that tile size; arguments as
    there.
    """
    return _search(shape, budget=0, halo=halo, channels=channels, batch=batch, tile_memory=tile_memory,
                   fixed_memory=fixed_memory, bytes_out=bytes_out, preferred_tile=tile_size,
                   tile_size=tile_size, resident=resident).total


def _search(shape: tuple[int, int], *, budget: int, halo: int, channels: int, batch: int,
            tile_memory: object, fixed_memory: int, bytes_out: int, preferred_tile: int,
            tile_size: int | None, resident: int = 0) -> MemoryPlan:
    """The first plan (largest tile, deepest queue) within ``budget``, else the smallest one."""
    h, w = shape
    candidates = ([tile_size] if tile_size
                  else [t for t in TILE_SIZES if t <= max(preferred_tile, TILE_SIZES[-1])])
    best: MemoryPlan | None = None
    for t in candidates:
        t_eff = min(t, max(h, w))
        for depth in (2, 1):
            est = estimate(t_eff, halo, w, channels, depth, batch,
                           int(tile_memory((t_eff + 2 * halo) ** 2)),  # type: ignore[operator]
                           fixed_memory, bytes_out, resident)
            plan = MemoryPlan(t, depth, est["read_cache"], budget, est)
            if plan.total <= budget:
                return plan
            if best is None or plan.total < best.total:
                best = plan
    assert best is not None
    return best
