"""Row bands of a level (``engine.bands``): any cut gives the whole-grid run's rows bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from refine_cli.devtools.synthetic import random_scene
from refine_cli.engine.bands import band_rows, bands, level_steps, run_band, step_coarse, step_refiner
from refine_cli.engine.levels import LevelSettings, level_grid
from refine_cli.engine.runner import GridRunner
from refine_cli.io.image import ImageSource
from refine_cli.io.masks import MaskSource
from refine_cli.io.readers import ArrayReader
from refine_cli.refiners.classical import GuidedRefiner
from refine_cli.report.timing import StageTimer
from refine_cli.tiling.grid import Window

H, W = 700, 160


class Rows:
    def __init__(self) -> None:
        self.out = np.full((H, W, 1), np.nan, np.float32)
        self.rows: list[int] = []

    def write(self, row0: int, block: np.ndarray) -> None:
        self.out[row0 : row0 + block.shape[0]] = block[..., :1]
        self.rows += range(row0, row0 + block.shape[0])


@pytest.fixture(scope="module")
def inputs():
    sc = random_scene((H, W), 6, seed=2, size=40)
    image = sc.image(Window(0, 0, H, W))
    mask = sc.coarse(1)
    return ImageSource(ArrayReader("img", image)), MaskSource(ArrayReader("mask", mask), (H, W))


@pytest.mark.parametrize("cut", [[0, 300, H], [0, 97, 98, 512, 650, H], [0, 64, 128, 192, 256, 320, 384, 448,
                                                                       512, 576, 640, H]])
def test_any_cut_into_bands_gives_the_whole_run(inputs, cut):
    src, mask = inputs
    refiner = GuidedRefiner()
    step = level_steps(refiner, (H, W), False, None)[0]
    settings = LevelSettings(StageTimer(), 1 << 30, 2, overlap=16, tile_size=96)
    level_refiner = step_refiner(step, refiner, None, (H, W))
    _, mplan, grid = level_grid((H, W), level_refiner, mask, False, True, settings)
    whole = Rows()
    GridRunner(src, mask, level_refiner, grid, whole, StageTimer(), queue_depth=2).run()
    parts = Rows()
    for r0, r1 in zip(cut[:-1], cut[1:], strict=True):
        run_band(src, step_coarse(step, refiner, mask, None), level_refiner, step, (r0, r1), parts, settings)
    assert parts.rows == list(range(H))  # every row once, in order
    assert np.array_equal(parts.out, whole.out) and not np.isnan(whole.out).any()


def test_band_sizes():
    from refine_cli.tiling.grid import plan_grid

    grid = plan_grid((10_000, 500), 1000, 64)
    assert band_rows(grid, 512) == 4096  # four tile heights, on segment boundaries
    assert band_rows(grid, 512, slots=4) == 2048  # two per slot, at least two tile heights
    assert band_rows(grid, 512, requested=700) == 1024
    assert band_rows(plan_grid((900, 500), 1000, 64), 512) == 1024  # one tile row: one band
    assert bands(1100, 512) == [(0, 512), (512, 1024), (1024, 1100)]
