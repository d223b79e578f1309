"""MagNet(-Fast) in bounded memory on a bare image: its stages as the engine's levels.

:func:`run_magnet_tiled` runs the same levels as ``refine run --method magnet-fast`` on its tiled
path (``refiners.magnet_tiled.StageLevels``: stage 1 in memory, then one engine level per
refinement stage, each stage's Y written tile by tile to a float32 level file that the next stage
reads by window), and keeps the final Y, all C channels, in one more such file that
:class:`TiledMagnetResult` reads by window. It is the library call for callers that have an image
and a segmenter but no files to write, and what the tests compare with the whole-image reference
:func:`~refine_cli.refiners.magnet.run_magnet`, bit for bit.

Shapes: images ``(H, W, 3)`` uint8 RGB; probabilities ``(h, w, C)`` float32 in ``[0, 1]``; windows
:class:`~refine_cli.tiling.grid.Window` in image pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from refine_cli.engine.levels import LevelWriter, run_levels
from refine_cli.errors import UsageError
from refine_cli.io.image import ImageSource
from refine_cli.io.readers import ArrayReader, Reader, TiffReader
from refine_cli.refiners.base import Refiner, TileInput, TileResult
from refine_cli.refiners.magnet import MagnetPreset, Schedule, StageProgress, StageStats
from refine_cli.refiners.magnet_tiled import (
    ArrayImage,
    LevelY,
    StageLevels,
    StagePassThrough,
    TiledPlan,
    fast_uncertainty,
)
from refine_cli.report.timing import StageTimer
from refine_cli.tiling.grid import Window

if TYPE_CHECKING:
    from refine_cli.io.protocols import LevelInput, PyramidImage
    from refine_cli.models.magnet import RefinementMagNet
    from refine_cli.segmenters.base import Segmenter

Size = tuple[int, int]


class TiledMagnetResult:
    """The output of :func:`run_magnet_tiled`: the final Y by window, plus what every stage did.

    Args:
        final: the final Y, an ``(H, W, C)`` float32 level file.
        stages: the run's stages (statistics, the plan, its temporary folder).
        classes: class names.
    """

    def __init__(self, final: Reader, stages: StageLevels, classes: tuple[str, ...]) -> None:
        self.final, self.run, self.classes = final, stages, classes
        self.y = LevelY(final)  # the final Y as stages read theirs, (1, C, h, w) by window
        self.shape: Size = self.y.shape

    @property
    def stages(self) -> list[StageStats]:
        """Per-stage statistics, stage 1 first."""
        return self.run.stats

    @property
    def schedule(self) -> Schedule:
        """What was run."""
        return self.run.schedule

    @property
    def plan(self) -> TiledPlan:
        """The memory plan."""
        return self.run.plan

    def probs(self, window: Window) -> np.ndarray:
        """``(h, w, C)`` float32 final probabilities over ``window``."""
        return np.ascontiguousarray(self.final.read(window), dtype=np.float32)

    def labels(self, window: Window) -> np.ndarray:
        """``(h, w)`` uint8 (uint16 above 256 classes) argmax (ties: lowest class)."""
        y = self.y.read(window)
        dtype = np.uint8 if y.shape[1] <= 256 else np.uint16
        return y.argmax(dim=1)[0].numpy().astype(dtype)

    def uncertainty(self, window: Window) -> np.ndarray:
        """``(h, w)`` float32 ``1 - (top1 - top2)`` of the final Y."""
        return fast_uncertainty(self.y.read(window))[0, 0].numpy()

    def report(self) -> dict[str, Any]:
        """Plain-JSON facts, the same keys as :meth:`MagnetResult.report` plus ``tiled``."""
        return self.run.report()

    def close(self) -> None:
        """Delete the final Y and the run's temporary files (idempotent)."""
        self.y.close()
        self.run.close()


class _Stages(Refiner):
    """The stages of a :class:`StageLevels` behind the engine's level hooks; every level copies Y exactly."""

    name = "magnet-fast"
    needs_image = False
    guarded = False

    def __init__(self, run: StageLevels) -> None:
        self.run = run

    def level_shapes(self, shape: Size) -> list[Size]:
        """The refinement stages, ending at the image size."""
        return self.run.shapes()

    def level_input(self, index: int, previous: Reader | None) -> LevelInput | None:
        """The stage's Y by window, after its patches are refined."""
        return self.run.level_input(index, previous)

    def for_level(self, index: int, final: bool) -> Refiner:
        """A pass-through without blending: the final level keeps all C channels, unclipped."""
        return StagePassThrough(self.run.plan.bytes_per_pixel, self.run.held_bytes())

    def refine(self, tile: TileInput) -> TileResult:
        """Not called: each level runs its :meth:`for_level` refiner."""
        raise RuntimeError("the MagNet stages run through for_level")


def _engine_image(image: PyramidImage) -> ImageSource:
    """The engine's view of the image (its size; its pixels are read by the stages, not the engine)."""
    if isinstance(image, ImageSource):
        return image
    if isinstance(image, ArrayImage):
        return ImageSource(ArrayReader("array", image.image, alpha_band=None))
    raise UsageError("run_magnet_tiled takes an (H, W, 3) uint8 array, an ArrayImage or an ImageSource")


def run_magnet_tiled(
    image: PyramidImage | np.ndarray,
    segmenter: Segmenter,
    refinement_modules: Sequence[RefinementMagNet],
    preset: MagnetPreset | Schedule,
    coarse_probs: np.ndarray | None = None,
    *,
    fast: bool = True,
    n_patches: int | None = None,
    n_points: float | None = None,
    batch_size: int = 1,
    budget: int = 2 << 30,
    tile: int | None = None,
    memory_pixels: int | None = None,
    read_limit: int | None = None,
    store_dtype: str = "float32",
    tmp_dir: str | None = None,
    progress: StageProgress | None = None,
) -> TiledMagnetResult:
    """MagNet(-Fast) in bounded memory; the final Y is read back by window (then ``close()`` it).

    Args:
        image: the image (read by window), or an ``(H, W, 3)`` uint8 array.
        segmenter: gives stage-1 Y and O.
        refinement_modules: one per checkpoint of the preset (or one shared), eval mode, on the CPU
            or the segmenter's device.
        preset: a preset (resolved for this image) or a ready schedule.
        coarse_probs: ``(h, w, C)`` float32 first-stage Y (a user mask); ``None`` runs the segmenter.
        fast: MagNet-Fast (default) or full MagNet.
        n_patches: patches per stage override (MagNet-Fast).
        n_points: points per stage override.
        batch_size: patches per forward pass (also the grouping of the whole-image reference).
        budget: memory budget in bytes (tile sizes and in-memory limits follow).
        tile: force the side of the tiles that pick a stage's patches (a multiple of 256).
        memory_pixels: force the largest stage whose patches are picked on the whole map in memory (tests).
        read_limit: force the largest full-resolution region read at once, bytes (tests).
        store_dtype: ``float32`` (exact) or ``float16`` (Y rounded between stages).
        tmp_dir: parent folder of the temporary files.
        progress: ``progress(stage, done, total)`` as :func:`refine_cli.refiners.magnet.run_magnet`.

    Returns:
        :class:`TiledMagnetResult`.
    """
    pyramid: PyramidImage = ArrayImage(image) if isinstance(image, np.ndarray) else image
    engine_image = _engine_image(pyramid)
    image_hw = engine_image.shape
    schedule = preset if isinstance(preset, Schedule) else preset.schedule(
        image_hw, fast=fast, n_patches=n_patches, n_points=n_points)
    run = StageLevels.create(pyramid, segmenter, refinement_modules, schedule, budget=budget,
                             batch_size=batch_size, tile=tile, memory_pixels=memory_pixels,
                             read_limit=read_limit, store_dtype=store_dtype, tmp_dir=tmp_dir,
                             progress=progress, class1=False)
    c = segmenter.num_classes
    out = LevelWriter(run.folder, image_hw, c, index=len(run.shapes()))
    try:
        run.stage_one(coarse_probs)
        run_levels(engine_image, None, _Stages(run), out, timer=StageTimer(), budget=budget, bytes_out=4 * c,
                   overlap=0, tmp_dir=run.folder)
        out.commit()
    except BaseException:
        out.abort()
        run.close()
        raise
    return TiledMagnetResult(TiffReader(out.path), run, tuple(segmenter.classes))
