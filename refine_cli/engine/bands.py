"""One level of a run cut into row bands that run apart (a distributed run's tasks).

A level (``engine.levels``) is one tile grid over one image size. Its rows are cut into bands
``[r0, r1)`` on segment boundaries of the level's output (:func:`band_rows`). One band runs the
level's :class:`~refine_cli.engine.runner.GridRunner` over the grid rows that touch it and
hands on only its own rows (``start_row``/``end_row``): every pixel of the band is blended from
the same tiles, in the same order, as in a whole-image run, so the band is bit for bit what that
run writes there. The tiles of grid rows that straddle a band boundary run in both bands (the
price of cutting: about one tile height per boundary, see :func:`band_rows`).

The levels of a run are described by :func:`level_steps` (the refiner's levels, then the guard's),
so that a band knows which refiner and which coarse input its level has: the first level reads
the user's mask (or the refiner's global step), every later one the previous level's whole
float32 file (written once all its bands are done), and the guard level that file beside the
user's mask.
"""

from __future__ import annotations

from dataclasses import dataclass

from refine_cli.engine.heap import limit_heap_retention
from refine_cli.engine.levels import LevelSettings, level_grid, mask_at
from refine_cli.engine.runner import GridRunner, GridStats
from refine_cli.io.masks import ProbSource, StackedSource
from refine_cli.io.protocols import CoarseSource, ImageWindows, RowWriter
from refine_cli.io.readers import TiffReader
from refine_cli.refiners.base import Refiner
from refine_cli.refiners.guard import GuardParams, GuardRefiner
from refine_cli.tiling.grid import GridPlan

BAND_TILES = 4
"""A default band is at most this many tile heights tall (taller bands lose parallelism for little)."""


@dataclass(frozen=True)
class LevelStep:
    """One level of a run, as :func:`engine.levels.run_levels` walks them.

    Attributes:
        index: 0-based position, coarse to fine.
        shape: ``(h, w)`` of the level.
        final: it writes the user's outputs (else a float32 level file).
        guard: it is the do-no-harm guard's level (after the refiner's last).
        last_inner: it is the refiner's own last level.
        carries_uncertainty: the refiner's last level writes its uncertainty as one more channel
            for the guard level (on the guard level: it reads that channel).
    """

    index: int
    shape: tuple[int, int]
    final: bool
    guard: bool
    last_inner: bool
    carries_uncertainty: bool


def level_steps(refiner: Refiner, shape: tuple[int, int], mask_labels: bool | None,
                guard: GuardParams | None) -> list[LevelStep]:
    """The levels of a run of the prepared ``refiner`` on an image of ``shape``.

    Args:
        refiner: the method, already ``prepare``-d.
        shape: ``(H, W)`` of the image.
        mask_labels: the user's mask is a label map; ``None``: no mask.
        guard: the guard's parameters, or ``None``.
    """
    shapes = refiner.level_shapes(shape)
    if shapes[-1] != shape:
        raise ValueError(f"the last level must be the image size {shape}, got {shapes[-1]}")
    n_inner = len(shapes)
    guarded = guard is not None and mask_labels is False
    unc = guarded and refiner.for_level(n_inner - 1, True).provides_uncertainty
    steps = [LevelStep(i, s, not guarded and i == n_inner - 1, False, i == n_inner - 1,
                       unc and i == n_inner - 1) for i, s in enumerate(shapes)]
    if guarded:
        steps.append(LevelStep(n_inner, shape, True, True, False, unc))
    return steps


def step_refiner(step: LevelStep, refiner: Refiner, guard: GuardParams | None,
                 image_shape: tuple[int, int]) -> Refiner:
    """The refiner of one level: the method's own for the level, or the guard."""
    if step.guard:
        assert guard is not None
        return GuardRefiner(guard, image_shape, inner_uncertainty=step.carries_uncertainty)
    return refiner.for_level(step.index, step.last_inner)


def step_coarse(step: LevelStep, refiner: Refiner, mask: CoarseSource | None,
                previous: str | None) -> CoarseSource:
    """The coarse input of one level.

    Args:
        step: the level.
        refiner: the prepared method (its global step's output feeds the first level).
        mask: the user's mask.
        previous: the previous level's float32 file (``None`` for the first level).
    """
    if previous is None:
        init = refiner.initial_coarse()
        coarse = mask_at(mask, step.shape) if init is None else ProbSource(init, step.shape, "global step")
    else:
        reader = TiffReader(previous, cache_bytes=0)  # as in run_levels: the plan counts no cache here
        coarse = ProbSource(reader, step.shape, f"level {step.index + 1}")
    if step.guard:
        assert mask is not None
        return StackedSource(coarse, mask)
    return coarse


def band_rows(grid: GridPlan, segment_rows: int, requested: int | None = None, slots: int = 1) -> int:
    """Rows per band of a level: a multiple of ``segment_rows``.

    ``requested`` rounded up to a segment; by default about two bands per task slot of the
    cluster (``slots``), but at most :data:`BAND_TILES` and at least two tile heights (the tiles of
    the grid rows at each inner band edge run in both bands: about one tile row per edge). A grid
    of one tile row (e.g. CascadePSP's exact path: the whole image as one tile) is one band:
    cutting it would only run that row again in every band.
    """
    if len(grid.row_starts) == 1:
        return -(-grid.shape[0] // segment_rows) * segment_rows
    share = -(-grid.shape[0] // (2 * max(1, slots)))
    want = requested or max(2 * grid.tile_height, min(BAND_TILES * grid.tile_height, share))
    return max(1, -(-int(want) // segment_rows)) * segment_rows


def bands(height: int, rows: int) -> list[tuple[int, int]]:
    """``[(r0, r1), ...]``: the row bands of ``rows`` rows covering ``height`` rows."""
    return [(r, min(r + rows, height)) for r in range(0, height, rows)]


def run_band(image: ImageWindows, coarse: CoarseSource, refiner: Refiner, step: LevelStep,
             rows: tuple[int, int], writer: RowWriter, settings: LevelSettings) -> GridStats:
    """Refine rows ``[r0, r1)`` of one level and hand them to ``writer``.

    Args:
        image: the level's image (uint8 RGB windows).
        coarse: the level's coarse input (:func:`step_coarse`).
        refiner: the level's refiner (:func:`step_refiner`).
        step: the level.
        rows: ``(r0, r1)``, the band.
        writer: receives the band's rows ``write(row0, block (n, W, K))``, float32 blended values.
        settings: the run's budget, overlap, tile size and batch (as for the whole-image run).

    Returns:
        The band's tile counts (the tiles of the grid rows that touch the band).
    """
    limit_heap_retention()
    _, mplan, grid = level_grid(step.shape, refiner, coarse, step.carries_uncertainty and not step.final,
                                step.final, settings)
    runner = GridRunner(image, coarse, refiner, grid, writer, settings.timer, queue_depth=mplan.queue_depth,
                        skip_uniform=settings.skip_uniform, batch_size=settings.batch_size,
                        start_row=rows[0], end_row=rows[1])
    return runner.run()
