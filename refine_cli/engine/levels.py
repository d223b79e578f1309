"""Coarse-to-fine levels: run a refiner over each level of an image pyramid, tile by tile.

A single-level refiner (guided filter ...) runs one grid at full resolution with
the user's mask as coarse input. A multi-level refiner (the streamed CascadePSP)
declares its level sizes; each level's image comes from the file's pyramid or is
built once by streaming (``io.image.image_level``), each level's result is
written to a temporary K-band float TIFF and becomes the next level's coarse
input (``io.masks.ProbSource``, resampled per window), and only the last level
goes to the user's outputs. Memory is bounded per level exactly as for one grid.

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

from refine_cli.engine.runner import GridRunner, GridStats
from refine_cli.io.image import ImageSource, image_level
from refine_cli.io.masks import ProbSource, StackedSource
from refine_cli.io.readers import TiffReader
from refine_cli.io.writers import TiffSink
from refine_cli.refiners.base import Refiner
from refine_cli.refiners.guard import GuardParams, GuardRefiner
from refine_cli.report.timing import StageTimer
from refine_cli.tiling.budget import MemoryPlan, plan_memory
from refine_cli.tiling.grid import GridPlan, plan_grid

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
        self.sink = TiffSink(self.path, shape, channels, "float32", overwrite=True)

    def write(self, row0: int, block: Any) -> None:
        """Write blended rows ``(n, W, K)``."""
        self.sink.write_rows(row0, block)

    def commit(self) -> None:
        """Finish the file."""
        self.sink.commit()

    def abort(self) -> None:
        """Remove the partial file."""
        if not self.sink.closed:
            self.sink.abort()


def run_levels(
    src: ImageSource,
    mask: Any,
    refiner: Refiner,
    final_writer: Any,
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
        mask: the user's coarse mask (``io.masks.MaskSource``), the first level's input
            unless the refiner supplies one (:meth:`Refiner.initial_coarse`).
        refiner: the method (already ``prepare``-d).
        final_writer: receives the last level's rows (``write(row0, block)``).
        timer: stage timer.
        budget: memory budget in bytes.
        bytes_out: bytes per pixel of the final outputs.
        overlap: requested blend overlap, px.
        tile_size: forced tile size, or ``None`` to derive it from the budget.
        batch_size: tiles per refiner call.
        skip_uniform: boundary-only processing.
        tmp_dir: where intermediate levels are written (in a folder removed at the end).
        progress: ``f(stage, done, total)``.
        work_dir: a persistent folder for intermediate levels instead (resumable runs):
            a level whose file is already there (written atomically) is not computed again.
        start_row: rows of the final level already written by an interrupted run.
        resident: bytes of inputs held decoded in memory all run long (an item of every plan).
        guard: run the guard level after the refiner's last (binary and soft masks only); its
            counts go to the last result's ``stats.extra["guard"]``.

    Returns:
        One :class:`LevelResult` per level, coarse to fine.
    """
    shapes = refiner.level_shapes(src.shape)
    if shapes[-1] != src.shape:
        raise ValueError(f"the last level must be the image size {src.shape}, got {shapes[-1]}")
    n_inner = len(shapes)
    guarded = guard is not None and mask is not None and not mask.is_labels
    if guarded:
        shapes = [*shapes, src.shape]
    init = refiner.initial_coarse()
    coarse: Any = ProbSource(init, shapes[0], "global step") if init is not None else mask
    own_folder = work_dir is None and len(shapes) > 1
    folder = tempfile.mkdtemp(prefix="refine-levels-", dir=tmp_dir) if own_folder else work_dir
    results: list[LevelResult] = []
    opened: list[Any] = []
    inner_unc = False
    try:
        for i, shape in enumerate(shapes):
            final = i == len(shapes) - 1
            if guarded and final:
                assert guard is not None
                level_refiner: Refiner = GuardRefiner(guard, src.shape, inner_uncertainty=inner_unc)
                coarse = StackedSource(coarse, mask)
            else:
                level_refiner = refiner.for_level(i, i == n_inner - 1)
            channels = coarse.channels if coarse.is_labels else level_refiner.out_channels(coarse.channels)
            if guarded and i == n_inner - 1:
                inner_unc = bool(getattr(level_refiner, "provides_uncertainty", False))
            if inner_unc and not final:
                channels += 1  # the guard passes the refiner's uncertainty on
            level_bytes = bytes_out if final else 4 * channels
            mplan = plan_memory(
                shape, budget=budget, halo=level_refiner.halo, channels=channels, batch=batch_size,
                tile_memory=level_refiner.tile_memory, fixed_memory=level_refiner.fixed_memory(),
                bytes_out=level_bytes, preferred_tile=int(getattr(level_refiner, "preferred_tile", 1024)),
                tile_size=tile_size or getattr(level_refiner, "fixed_tile", None),
                size_flag=None if tile_size else getattr(level_refiner, "size_flag", None),
                resident=resident,
            )
            ov = min(overlap, mplan.tile_size // 4)
            grid = level_refiner.plan_grid(shape, mplan.tile_size, ov) or plan_grid(shape, mplan.tile_size, ov,
                                                                                      level_refiner.halo)
            with timer.stage("read"):
                image = image_level(src, shape, tmp_dir=folder)
            opened.append(image)
            if image.reader is None:
                src.reader.set_cache_bytes(mplan.cache_bytes)
            writer: Any = final_writer if final else LevelWriter(folder or "", shape, channels, i)
            what = level_refiner.name or "refine"
            name = f"{what} tiles" if len(shapes) == 1 else f"level {i + 1}/{len(shapes)} {what} tiles"
            if not final and work_dir is not None and _complete(writer.path, shape, channels):
                log.info("level %d/%d: reusing %s", i + 1, len(shapes), writer.path)
                stats = GridStats(tiles_total=len(grid), pixels=shape[0] * shape[1], extra={"reused": True})
                writer.sink.abort()
            else:
                runner = GridRunner(
                    image, coarse, level_refiner, grid, writer, timer, queue_depth=mplan.queue_depth,
                    skip_uniform=skip_uniform, batch_size=batch_size,
                    progress=(lambda d, t, n=name: progress(n, d, t)) if progress else None,
                    start_row=start_row if final else 0,
                )
                try:
                    stats = runner.run()
                except BaseException:
                    if not final:
                        writer.abort()
                    raise
                if not final:
                    with timer.stage("write"):
                        writer.commit()
            if isinstance(level_refiner, GuardRefiner):
                stats.extra["guard"] = level_refiner.describe()
            results.append(LevelResult(shape, stats, mplan, grid))
            log.info("level %d/%d %dx%d: %d tiles, %d refined, %d skipped", i + 1, len(shapes), shape[1],
                     shape[0], stats.tiles_total, stats.tiles_refined, stats.tiles_skipped)
            if not final:
                if isinstance(coarse, ProbSource):
                    coarse.close()
                coarse = ProbSource(TiffReader(writer.path), shapes[i + 1], f"level {i + 1}")
    finally:
        for image in opened:
            image.close()
        for part in getattr(coarse, "parts", (coarse,)):
            if isinstance(part, ProbSource):
                part.close()
        if own_folder and folder:
            shutil.rmtree(folder, ignore_errors=True)
    return results


def _complete(path: str, shape: tuple[int, int], channels: int) -> bool:
    """Whether a level file of the right size is already there (level files are renamed in when whole)."""
    if not os.path.exists(path):
        return False
    try:
        with TiffReader(path) as r:
            return r.shape == shape and r.bands == channels
    except Exception:  # noqa: BLE001 - unreadable: compute it again
        return False
