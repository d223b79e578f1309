"""Coarse-to-fine levels: run a refiner over each level of an image pyramid, tile by tile.

A single-level refiner (guided filter ...) runs one grid at full resolution with
the user's mask as coarse input. A multi-level refiner (the streamed CascadePSP)
declares its level sizes; each level's image comes from the file's pyramid or is
built once by streaming (``io.image.image_level``), each level's result is
written to a temporary K-band float TIFF and becomes the next level's coarse
input (``io.masks.ProbSource``, resampled per window), and only the last level
goes to the user's outputs. Memory is bounded per level exactly as for one grid.
A refiner may build a level's coarse input itself from the previous level's file
(``Refiner.level_input``; MagNet's stages pick and refine their patches there, on
the file read unresampled). A level whose refiner does not read the image
(``needs_image`` false) builds no level image.

With a guard (``refiners.guard``), one more full-resolution level follows the
refiner's last: it reads the refiner's result and the user's mask side by side
(``io.masks.StackedSource``) and holds back the changes the coarse mask does not
allow. Label maps are not guarded.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from refine_cli.engine.heap import limit_heap_retention, release_free_heap
from refine_cli.engine.runner import GridRunner, GridStats
from refine_cli.io.creation import fast_codec
from refine_cli.io.image import ImageSource, LevelImage, image_level
from refine_cli.io.masks import MaskSource, ProbSource, StackedSource
from refine_cli.io.protocols import CoarseSource, LevelInput, RowWriter
from refine_cli.io.readers import TiffReader
from refine_cli.io.writers import RAW_LEVELS_BYTES, TiffSink
from refine_cli.refiners.base import Refiner
from refine_cli.refiners.guard import GuardParams, GuardRefiner
from refine_cli.report.timing import StageTimer
from refine_cli.tiling.budget import MemoryPlan, plan_memory
from refine_cli.tiling.grid import GridPlan, Window, plan_grid

log = logging.getLogger(__name__)


@dataclass
class LevelResult:
    """What one level did.

    Attributes:
        shape: ``(h, w)`` of the level.
        stats: tile counts.
        memory: the memory plan.
        grid: the tile grid.
    """

    shape: tuple[int, int]
    stats: GridStats
    memory: MemoryPlan
    grid: GridPlan

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the report."""
        return {"height": self.shape[0], "width": self.shape[1], "tiles": self.stats.tiles_total,
                "refined": self.stats.tiles_refined, "skipped": self.stats.tiles_skipped,
                "tile_size": self.grid.tile_size, "halo": self.grid.halo, "overlap": self.grid.overlap}


class LevelWriter:
    """Writes a level's K blended channels to a temporary float32 TIFF (the next level's input)."""

    def __init__(self, folder: str, shape: tuple[int, int], channels: int, index: int = 0) -> None:
        # the index keeps two levels of one size apart (a refiner's last level and its edge snap)
        self.path = os.path.join(folder, f"level{index}_{shape[0]}x{shape[1]}.tif")
        # temporary: uncompressed up to RAW_LEVELS_BYTES (reading and writing it is several times faster
        # than decompressing), above it ZSTD level 1 (about twice DEFLATE's speed at the same size)
        raw = shape[0] * shape[1] * channels * 4 <= RAW_LEVELS_BYTES
        self.sink = TiffSink(self.path, shape, channels, "float32", overwrite=True,
                             creation={"COMPRESS": "NONE"} if raw else fast_codec())

    def write(self, row0: int, block: np.ndarray) -> None:
        """Write blended rows ``(n, W, K)``."""
        self.sink.write_rows(row0, block)

    def commit(self) -> None:
        """Finish the file."""
        self.sink.commit()

    def abort(self) -> None:
        """Remove the partial file."""
        if not self.sink.closed:
            self.sink.abort()


@dataclass
class LevelSettings:
    """What every level of one run shares (the arguments of :func:`run_levels`)."""

    timer: StageTimer
    budget: int
    bytes_out: int
    overlap: int
    tile_size: int | None = None
    batch_size: int = 1
    skip_uniform: bool = True
    progress: Callable[[str, int, int], None] | None = None
    start_row: int = 0
    resident: int = 0


def plan_level(shape: tuple[int, int], refiner: Refiner, *, channels: int, bytes_out: int, budget: int,
               batch_size: int = 1, tile_size: int | None = None, resident: int = 0) -> MemoryPlan:
    """The memory plan of one level: the tile size and queue depth that fit ``budget``.

    The one planner of the project: :func:`run_levels` and ``refine batch --dry-run`` both call it.

    Args:
        shape: ``(h, w)`` of the level.
        refiner: the level's refiner (its halo, memory per tile, fixed memory, tile preferences).
        channels: K, channels of the level's blended output.
        bytes_out: bytes per pixel of what the level writes.
        budget: memory budget in bytes.
        batch_size: tiles per refiner call.
        tile_size: a tile side forced by the user (else the refiner's fixed tile, else planned).
        resident: bytes held by decoded inputs all run long.

    Raises:
        ResourceError: nothing fits ``budget`` (the message names the option to change).
    """
    return plan_memory(
        shape, budget=budget, halo=refiner.halo, channels=channels, batch=batch_size,
        tile_memory=refiner.tile_memory, fixed_memory=refiner.fixed_memory(), bytes_out=bytes_out,
        preferred_tile=refiner.preferred_tile, tile_size=tile_size or refiner.fixed_tile,
        size_flag=None if tile_size else refiner.size_flag, resident=resident,
    )


def level_channels(refiner: Refiner, in_channels: int, labels: bool, pass_uncertainty: bool = False) -> int:
    """K, the channels a level writes.

    A label map's class count, else the refiner's output channels; plus one when the refiner's
    uncertainty travels on to the guard level.
    """
    channels = in_channels if labels else refiner.out_channels(in_channels)
    return channels + (1 if pass_uncertainty else 0)


def run_levels(
    src: ImageSource,
    mask: CoarseSource | None,
    refiner: Refiner,
    final_writer: RowWriter,
    *,
    timer: StageTimer,
    budget: int,
    bytes_out: int,
    overlap: int,
    tile_size: int | None = None,
    batch_size: int = 1,
    skip_uniform: bool = True,
    tmp_dir: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    work_dir: str | None = None,
    start_row: int = 0,
    resident: int = 0,
    guard: GuardParams | None = None,
) -> list[LevelResult]:
    """Refine every level of ``refiner`` and write the last one to ``final_writer``.

    Args:
        src: the image (level 0).
        mask: the user's coarse mask; the first level's input unless the refiner gives one.
        refiner: the method (already ``prepare``-d).
        final_writer: receives the last level's rows (``write(row0, block)``).
        timer: stage timer.
        budget: memory budget in bytes.
        bytes_out: bytes per pixel of the final outputs.
        overlap: requested blend overlap, px.
        tile_size: forced tile size, or ``None`` to derive it from the budget.
        batch_size: tiles per refiner call.
        skip_uniform: boundary-only processing.
        tmp_dir: where intermediate levels go (in a folder removed at the end).
        progress: ``f(stage, done, total)``.
        work_dir: a persistent folder for intermediate levels instead (resumable runs): a level whose
            file is already there (written atomically) is not computed again.
        start_row: rows of the final level already written by an interrupted run.
        resident: bytes of inputs held decoded in memory all run long (an item of every plan).
        guard: add the guard level after the refiner's last (binary and soft masks; counts in stats.extra).

    Returns:
        One :class:`LevelResult` per level, coarse to fine.
    """
    settings = LevelSettings(timer, budget, bytes_out, overlap, tile_size, batch_size, skip_uniform, progress,
                             start_row, resident)
    shapes = _level_shapes(refiner, src.shape)
    n_inner = len(shapes)
    guarded = guard is not None and mask is not None and not mask.is_labels
    shapes = [*shapes, src.shape] if guarded else shapes
    own_folder = work_dir is None and len(shapes) > 1
    folder = tempfile.mkdtemp(prefix="refine-levels-", dir=tmp_dir) if own_folder else work_dir
    results: list[LevelResult] = []
    opened: list[Any] = []
    made: LevelInput | None = None  # the level's coarse input when the engine or the refiner built it
    previous: str | None = None  # the previous level's file
    inner_unc = False  # the guard level gets the refiner's own uncertainty as one more channel
    try:
        for i, shape in enumerate(shapes):
            final = i == len(shapes) - 1
            coarse, made = _level_coarse(refiner, (i, n_inner), mask, previous, shape, timer)
            if guarded and final:
                assert guard is not None and mask is not None
                level_refiner: Refiner = GuardRefiner(guard, src.shape, inner_uncertainty=inner_unc)
                coarse = StackedSource(coarse, mask)
            else:
                level_refiner = refiner.for_level(i, i == n_inner - 1)
            if guarded and i == n_inner - 1:
                inner_unc = level_refiner.provides_uncertainty
            result, previous = _run_level(src, coarse, level_refiner, shape, (i, len(shapes)),
                                          final_writer if final else None, inner_unc and not final, folder,
                                          work_dir, settings, opened)
            results.append(result)
            if made is not None:
                made.close()
                made = None
    finally:
        _release(opened, made, folder if own_folder else None)
    return results


def _level_coarse(refiner: Refiner, position: tuple[int, int], mask: CoarseSource | None,
                  previous: str | None, shape: tuple[int, int],
                  timer: StageTimer) -> tuple[CoarseSource, LevelInput | None]:
    """A level's coarse input, and the same again when it must be closed after the level.

    The refiner's own (:meth:`Refiner.level_input`) for its levels; else the previous level's file
    resampled to ``shape``; for the first level the refiner's global step or the user's mask (resampled
    to ``shape`` when the level is smaller than the image).

    Args:
        refiner: the prepared method.
        position: ``(i, n_inner)``: the level, and how many levels are the refiner's (the guard's follows).
        mask: the user's mask.
        previous: the previous level's float32 file (``None`` for the first level).
        shape: ``(h, w)`` of the level.
        timer: the refiner's own step counts as ``refine``.
    """
    i, n_inner = position
    reader = TiffReader(previous) if previous is not None else None
    if i < n_inner:
        try:
            with timer.stage("refine"):
                own = refiner.level_input(i, reader)
        except BaseException:
            if reader is not None:
                reader.close()
            raise
        if own is not None:
            return own, own
    if reader is not None:
        # no chunk cache: the memory plan does not count one (level files up to RAW_LEVELS_BYTES are
        # uncompressed, so a window costs a copy; larger ones decode ZSTD-1 chunks again, which is fast)
        reader.set_cache_bytes(0)
        level = ProbSource(reader, shape, f"level {i + 1}")
        return level, level
    init = refiner.initial_coarse()
    if init is not None:
        level = ProbSource(init, shape, "global step")
        return level, level
    return mask_at(mask, shape), None


def mask_at(mask: CoarseSource | None, shape: tuple[int, int]) -> CoarseSource:
    """The user's mask as the coarse input of a first level of ``shape`` (below the image size: resampled)."""
    if mask is None:
        raise ValueError("no coarse input: give a mask, or a refiner that makes one")
    if isinstance(mask, MaskSource) and mask.shape != shape:
        return mask.at(shape)
    return mask


def _level_shapes(refiner: Refiner, shape: tuple[int, int]) -> list[tuple[int, int]]:
    """The refiner's level sizes, checked to end at the image size ``shape``."""
    shapes = refiner.level_shapes(shape)
    if shapes[-1] != shape:
        raise ValueError(f"the last level must be the image size {shape}, got {shapes[-1]}")
    return shapes


def _run_level(src: ImageSource, coarse: CoarseSource, refiner: Refiner, shape: tuple[int, int],
               position: tuple[int, int], final_writer: RowWriter | None, pass_uncertainty: bool,
               folder: str | None, work_dir: str | None, s: LevelSettings,
               opened: list[Any]) -> tuple[LevelResult, str | None]:
    """Plan, read and refine one level; the result and, for an inner level, the file it wrote.

    ``final_writer`` is ``None`` for an inner level, which goes to a temporary K-band float TIFF
    in ``folder`` (reused when ``work_dir`` already holds it whole). ``pass_uncertainty``: one
    more channel carries the refiner's uncertainty to the guard level.
    """
    i, n = position
    final = final_writer is not None
    limit_heap_retention()
    channels, mplan, grid = level_grid(shape, refiner, coarse, pass_uncertainty, final, s)
    if refiner.needs_image:
        with s.timer.stage("read"):
            image = image_level(src, shape, tmp_dir=folder)
        opened.append(image)
        # one decoded-chunk cache, the plan's: the level image's own file, or the source file's
        src.reader.set_cache_bytes(0 if image.reader is not None else mplan.cache_bytes)
        if image.reader is not None:
            image.reader.set_cache_bytes(mplan.cache_bytes)
    else:  # the level only transforms its coarse input: no level image is built or read
        image = LevelImage(_no_image, shape)
    level: LevelWriter | None = None
    writer: RowWriter
    if final_writer is None:
        writer = level = LevelWriter(folder or "", shape, channels, i)
    else:
        writer = final_writer
    what = refiner.name or "refine"
    name = f"{what} tiles" if n == 1 else f"level {i + 1}/{n} {what} tiles"
    if level is not None and work_dir is not None and _complete(level.path, shape, channels):
        log.info("level %d/%d: reusing %s", i + 1, n, level.path)
        stats = GridStats(tiles_total=len(grid), pixels=shape[0] * shape[1], extra={"reused": True})
        level.sink.abort()
    else:
        progress = s.progress
        runner = GridRunner(image, coarse, refiner, grid, writer, s.timer, queue_depth=mplan.queue_depth,
                            skip_uniform=s.skip_uniform, batch_size=s.batch_size,
                            progress=(lambda d, t: progress(name, d, t)) if progress else None,
                            start_row=s.start_row if final else 0)
        try:
            stats = runner.run()
        except BaseException:
            if level is not None:
                level.abort()
            raise
        if level is not None:
            with s.timer.stage("write"):
                level.commit()
    if image.reader is not None:  # a level image built for this level only: its file and cache go now
        opened.remove(image)
        image.close()
    release_free_heap()
    if isinstance(refiner, GuardRefiner):
        stats.extra["guard"] = refiner.describe()
    log.info("level %d/%d %dx%d: %d tiles, %d refined, %d skipped", i + 1, n, shape[1], shape[0],
             stats.tiles_total, stats.tiles_refined, stats.tiles_skipped)
    return LevelResult(shape, stats, mplan, grid), None if level is None else level.path


def level_grid(shape: tuple[int, int], refiner: Refiner, coarse: CoarseSource, pass_uncertainty: bool,
               final: bool, s: LevelSettings) -> tuple[int, MemoryPlan, GridPlan]:
    """The channels K a level writes, its memory plan and its tile grid.

    One function for the whole-image run and for the row bands of a distributed run, so both cut
    the level into the same tiles.

    Args:
        shape: ``(h, w)`` of the level.
        refiner: the level's refiner.
        coarse: the level's coarse input (its channels and whether it is a label map).
        pass_uncertainty: one more channel carries the refiner's uncertainty to the guard level.
        final: the level writes the user's outputs (else a float32 level file).
        s: the run's shared settings (budget, overlap, tile size, batch).
    """
    channels = level_channels(refiner, coarse.channels, coarse.is_labels, pass_uncertainty)
    mplan = plan_level(shape, refiner, channels=channels, bytes_out=s.bytes_out if final else 4 * channels,
                       budget=s.budget, batch_size=s.batch_size, tile_size=s.tile_size, resident=s.resident)
    ov = min(s.overlap, mplan.tile_size // 4)
    grid = refiner.plan_grid(shape, mplan.tile_size, ov) or plan_grid(shape, mplan.tile_size, ov,
                                                                          refiner.halo)
    return channels, mplan, grid


def _release(opened: list[Any], made: LevelInput | None, folder: str | None) -> None:
    """Close the level images and the coarse input the engine or the refiner built; remove ``folder``."""
    for image in opened:
        image.close()
    if made is not None:
        made.close()
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def _complete(path: str, shape: tuple[int, int], channels: int) -> bool:
    """Whether a level file of the right size is already there (level files are renamed in when whole)."""
    if not os.path.exists(path):
        return False
    try:
        with TiffReader(path) as r:
            return r.shape == shape and r.bands == channels
    except Exception:  # noqa: BLE001 - unreadable: compute it again
        return False


def _no_image(window: Window) -> np.ndarray:
    """The image of a level whose refiner does not read it (``needs_image`` false)."""
    raise RuntimeError(f"this level's refiner declared needs_image=False but read the image at {window}")
