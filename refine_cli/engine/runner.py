"""The streaming scheduler: prefetch -> refine -> blend + write, over a tile grid.

Three threads share the work through bounded queues, so reading and writing
overlap with computing and at most ``queue_depth`` tiles wait on each side:

* the **prefetch** thread walks the grid in row-major order, reads each tile's
  coarse mask (grown by the refiner's halo) and decides whether the tile can be
  skipped: when the coarse mask is uniform over the whole read window, the
  refiner would only see a constant (**boundary-only processing**), so the
  coarse value is passed through and the image is not even read;
* the **calling** thread runs the refiner (batched when the refiner asks), per
  class for label maps (classes absent from a tile cost nothing);
* the **writer** thread blends results into a :class:`~refine_cli.tiling.blend.BandAccumulator`
  and hands finished row bands to the outputs.

An exception in any thread stops the others and is re-raised in the caller.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refine_cli.engine.outputs import OutputWriter
from refine_cli.io.image import ImageSource
from refine_cli.io.masks import MaskSource
from refine_cli.refiners.base import Refiner, TileInput, TileResult
from refine_cli.report.timing import StageTimer
from refine_cli.tiling.blend import BandAccumulator, tile_weights
from refine_cli.tiling.grid import GridPlan, Tile

log = logging.getLogger(__name__)

_END = object()


@dataclass
class GridStats:
    """Counts of one grid pass.

    Attributes:
        tiles_total: tiles in the grid.
        tiles_refined: tiles the refiner ran on.
        tiles_skipped: tiles copied from the uniform coarse mask.
        refiner_calls: refiner invocations (per class for label maps).
        pixels: pixels of the image.
    """

    tiles_total: int = 0
    tiles_refined: int = 0
    tiles_skipped: int = 0
    refiner_calls: int = 0
    pixels: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Item:
    tile: Tile
    skip_value: float | None = None  # uniform probability (binary) or class (labels)
    image: np.ndarray | None = None
    coarse: np.ndarray | None = None  # binary: (h, w) prob
    label_window: Any = None  # labels: LabelWindow


@dataclass
class _Result:
    tile: Tile
    values: np.ndarray  # (th, tw, C) over tile.window
    refined: bool


class _Stop(Exception):
    pass


class GridRunner:
    """Runs one refiner over one tile grid of one image.

    Args:
        image: the image windows (uint8 RGB).
        mask: the coarse mask windows.
        refiner: the method.
        plan: the tile grid (its halo must be at least ``refiner.halo``).
        writer: converts and writes finished rows.
        timer: stage timer.
        queue_depth: tiles buffered between threads.
        skip_uniform: pass tiles with a uniform coarse mask through unrefined.
        batch_size: tiles per refiner call.
        progress: ``f(done_tiles, total_tiles)`` called after each blended tile.
    """

    def __init__(self, image: ImageSource, mask: MaskSource, refiner: Refiner, plan: GridPlan,
                 writer: OutputWriter, timer: StageTimer, *, queue_depth: int = 2, skip_uniform: bool = True,
                 batch_size: int = 1, progress: Callable[[int, int], None] | None = None) -> None:
        self.image, self.mask, self.refiner, self.plan = image, mask, refiner, plan
        self.writer, self.timer = writer, timer
        self.depth = max(1, queue_depth)
        self.skip_uniform = skip_uniform
        self.batch_size = max(1, batch_size)
        self.progress = progress
        self.labels = mask.is_labels
        self.channels = mask.classes if self.labels else 1
        self.refiner_unc = bool(getattr(refiner, "provides_uncertainty", False))
        self.stats = GridStats(tiles_total=len(plan), pixels=plan.shape[0] * plan.shape[1])
        self._stop = threading.Event()
        self._errors: list[BaseException] = []

    # -- thread plumbing -------------------------------------------------
    def _put(self, q: queue.Queue, item: object) -> None:
        while True:
            if self._stop.is_set():
                raise _Stop
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _get(self, q: queue.Queue) -> Any:
        while True:
            if self._stop.is_set():
                raise _Stop
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except _Stop:
                pass
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self._errors.append(exc)
                self._stop.set()
        return run

    # -- stages --------------------------------------------------------------
    def _load(self, tile: Tile) -> _Item:
        item = _Item(tile)
        if self.skip_uniform:
            value = self.mask.uniform_value(tile.read)
            if value is not None:
                item.skip_value = value
                return item
        if self.labels:
            item.label_window = self.mask.read_labels(tile.read)
        else:
            item.coarse = self.mask.read(tile.read)
        item.image = self.image.read(tile.read)
        return item

    def _prefetch(self, q_in: queue.Queue) -> None:
        for tile in self.plan.tiles():
            with self.timer.stage("read"):
                item = self._load(tile)
            self._put(q_in, item)
        self._put(q_in, _END)

    def _skip_values(self, item: _Item) -> np.ndarray:
        th, tw = item.tile.window.shape
        out = np.zeros((th, tw, self.channels + (1 if self.refiner_unc else 0)), np.float32)
        assert item.skip_value is not None
        if self.labels:
            out[..., int(item.skip_value)] = 1.0
        else:
            out[..., 0] = item.skip_value
            if self.refiner_unc:
                out[..., 1] = 1.0 - abs(2.0 * item.skip_value - 1.0)
        return out

    def _crop(self, tile: Tile, arr: np.ndarray) -> np.ndarray:
        rel = tile.window.relative_to(tile.read)
        return arr[rel.slices]

    def _refine_items(self, items: list[_Item]) -> list[_Result]:
        """Refine a batch of non-skipped items (binary: batched; labels: per class)."""
        results: list[_Result] = []
        if not self.labels:
            inputs = [TileInput(it.image, it.coarse, it.tile.read) for it in items]  # type: ignore[arg-type]
            with self.timer.stage("refine"):
                outs = self.refiner.refine_batch(inputs)
            self.stats.refiner_calls += len(items)
            for it, res in zip(items, outs, strict=True):
                results.append(_Result(it.tile, self._pack_binary(it.tile, res), True))
            return results
        for it in items:
            lw = it.label_window
            th, tw = it.tile.window.shape
            values = np.zeros((th, tw, self.channels), np.float32)
            inputs = [TileInput(it.image, lw.prob(c), it.tile.read) for c in lw.present]  # type: ignore[arg-type]
            with self.timer.stage("refine"):
                outs = self.refiner.refine_batch(inputs)
            self.stats.refiner_calls += len(inputs)
            for c, res in zip(lw.present, outs, strict=True):
                values[..., c] = self._crop(it.tile, res.prob)
            results.append(_Result(it.tile, values, True))
        return results

    def _pack_binary(self, tile: Tile, res: TileResult) -> np.ndarray:
        prob = self._crop(tile, res.prob)
        if not self.refiner_unc:
            return prob[..., None].astype(np.float32, copy=False)
        unc = self._crop(tile, res.uncertainty) if res.uncertainty is not None else 1 - np.abs(2 * prob - 1)
        return np.stack([prob, unc], axis=-1).astype(np.float32, copy=False)

    def _compute(self, q_in: queue.Queue, q_out: queue.Queue) -> None:
        pending: list[_Item] = []
        done = False
        while not done:
            item = self._get(q_in)
            batch = [item]
            # Gather more ready tiles for a batched call, keeping order.
            while self.batch_size > 1 and len([b for b in batch if b is not _END and b.skip_value is None]) \
                    < self.batch_size and batch[-1] is not _END:
                try:
                    batch.append(q_in.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is _END:
                done = True
                batch.pop()
            pending = [b for b in batch if b.skip_value is None]
            refined = iter(self._refine_items(pending)) if pending else iter(())
            for b in batch:
                if b.skip_value is not None:
                    self.stats.tiles_skipped += 1
                    self._put(q_out, _Result(b.tile, self._skip_values(b), False))
                else:
                    self.stats.tiles_refined += 1
                    self._put(q_out, next(refined))
        self._put(q_out, _END)

    def _blend_and_write(self, q_out: queue.Queue) -> None:
        plan = self.plan
        acc = BandAccumulator(plan.shape[1], self.channels + (1 if self.refiner_unc else 0), plan.tile_height)
        nrows, ncols = plan.grid_shape
        done = 0
        weights_cache: dict[tuple[bool, bool, bool, bool], np.ndarray] = {}
        while True:
            res = self._get(q_out)
            if res is _END:
                break
            t = res.tile
            key = (*t.low_neighbours, *t.high_neighbours)
            w = weights_cache.get(key)
            if w is None:
                w = weights_cache[key] = tile_weights(t, plan.overlap)
            with self.timer.stage("blend"):
                acc.add(t.window, res.values, w)
            done += 1
            if t.grid_col == ncols - 1:
                with self.timer.stage("blend"):
                    row0, block = acc.pop_final(plan.rows_final_after(t.grid_row))
                if block.shape[0]:
                    with self.timer.stage("write"):
                        self.writer.write(row0, block)
            if self.progress is not None:
                self.progress(done, len(plan))
        if done != len(plan):
            raise RuntimeError(f"only {done} of {len(plan)} tiles reached the writer")

    # -- entry point ---------------------------------------------------------
    def run(self) -> GridStats:
        """Process every tile and write every row; returns the counts.

        Raises:
            Whatever a stage raised (the first error), after stopping the other threads.
        """
        if self.plan.halo < self.refiner.halo:
            raise ValueError(f"grid halo {self.plan.halo} is smaller than the refiner's {self.refiner.halo}")
        q_in: queue.Queue = queue.Queue(maxsize=self.depth)
        q_out: queue.Queue = queue.Queue(maxsize=self.depth)
        reader = threading.Thread(target=self._guard(lambda: self._prefetch(q_in)), name="refine-prefetch",
                                  daemon=True)
        writer = threading.Thread(target=self._guard(lambda: self._blend_and_write(q_out)), name="refine-writer",
                                  daemon=True)
        reader.start()
        writer.start()
        try:
            self._guard(lambda: self._compute(q_in, q_out))()
            while writer.is_alive() and not self._stop.is_set():
                writer.join(timeout=0.1)
        except BaseException:
            self._stop.set()
            raise
        finally:
            if self._errors:
                self._stop.set()
            reader.join(timeout=30)
            writer.join(timeout=30)
        if self._errors:
            raise self._errors[0]
        return self.stats
