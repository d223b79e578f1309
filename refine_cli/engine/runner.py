"""The streaming scheduler: prefetch -> refine -> blend + write, over a tile grid.

Three threads share the work through bounded queues, so reading and writing
overlap with computing and at most ``queue_depth`` tiles wait on each side:

* the **prefetch** thread walks the grid in row-major order, reads each tile's
  coarse input (grown by the refiner's halo) and decides whether the tile can be
  skipped (**boundary-only processing**, see ``Refiner.skip_rule``): when the
  coarse input is constant over the read window, or (rule ``binary``) has no
  boundary there, the refiner's ``skip_output`` of the coarse values is used and
  the image is not even read;
* the **calling** thread runs the refiner (batched when the refiner asks), per
  class for label maps (classes absent from a tile cost nothing);
* the **writer** thread blends results into a :class:`~refine_cli.tiling.blend.BandAccumulator`
  and hands finished row bands to the outputs.

An exception in any thread stops the others and is re-raised in the caller.

The coarse input is any object with ``shape``, ``channels`` (K), ``is_labels``,
``constant(window) -> (K,) | None``, ``binary_uniform(window) -> bool`` and
``read_k(window) -> (h, w, K) float32`` (``io.masks.MaskSource`` for user masks,
``io.masks.ProbSource`` for a previous level's output); label maps also provide
``read_labels(window)`` and are refined class by class. The writer is any object
with ``write(row0, block (n, W, C))``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refine_cli.engine.heap import HeapTrimmer
from refine_cli.io.protocols import CoarseSource, ImageWindows, RowWriter
from refine_cli.refiners.base import Refiner, TileInput, TileResult
from refine_cli.report.tiles import TILE_HELD, TILE_NOT_RUN, TILE_REFINED, TILE_SKIPPED
from refine_cli.report.timing import StageTimer
from refine_cli.tiling.blend import BandAccumulator, tile_weights
from refine_cli.tiling.grid import GridPlan, Tile, Window

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
        states: ``grid_shape`` uint8, one ``report.tiles.TILE_*`` code per tile (row-major grid):
            one byte per tile; ``None`` for a level that did not run.
    """

    tiles_total: int = 0
    tiles_refined: int = 0
    tiles_skipped: int = 0
    refiner_calls: int = 0
    pixels: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    states: np.ndarray | None = None


@dataclass
class _Item:
    tile: Tile
    skip: np.ndarray | None = None  # (th, tw, K) coarse values of a skipped tile, or (K,) constant
    image: np.ndarray | None = None
    coarse: np.ndarray | None = None  # (h, w) or (h, w, K) over tile.read
    label_window: Any = None  # labels: LabelWindow


@dataclass
class _Result:
    tile: Tile
    values: np.ndarray  # (th, tw, C) over tile.window
    refined: bool
    held: bool = False


class _Stop(Exception):
    pass


class GridRunner:
    """Runs one refiner over one tile grid of one image.

    Args:
        image: uint8 RGB windows (``read(window)``) of the grid's image.
        coarse: the coarse input (see the module docstring).
        refiner: the method.
        plan: the tile grid (its halo must be at least ``refiner.halo``).
        writer: receives finished rows (``write(row0, block)``).
        timer: stage timer.
        queue_depth: tiles buffered between threads.
        skip_uniform: skip tiles the refiner's ``skip_rule`` allows.
        batch_size: tiles per refiner call.
        progress: ``f(done_tiles, total_tiles)`` called after each blended tile.
        start_row: rows above this were written by an earlier, interrupted run: start at
            the first tile row that touches it and hand the writer only rows from it on.
        end_row: hand the writer only rows above this and stop after the last tile row that
            touches them (one row band of a distributed run); ``None``: the whole image. With
            ``start_row`` and ``end_row`` a band's rows are blended from the same tiles, added in the
            same order, as in a run over the whole grid, so they come out bit for bit the same.
    """

    def __init__(self, image: ImageWindows, coarse: CoarseSource, refiner: Refiner, plan: GridPlan,
                 writer: RowWriter, timer: StageTimer, *, queue_depth: int = 2, skip_uniform: bool = True,
                 batch_size: int = 1, progress: Callable[[int, int], None] | None = None,
                 start_row: int = 0, end_row: int | None = None) -> None:
        self.image, self.coarse, self.refiner, self.plan = image, coarse, refiner, plan
        self.writer, self.timer = writer, timer
        self.depth = max(1, queue_depth)
        self.skip_uniform = skip_uniform
        self.batch_size = max(1, batch_size)
        self.progress = progress
        self.labels = bool(coarse.is_labels)
        self.k_in = int(coarse.channels)
        self.k_out = self.k_in if self.labels else refiner.out_channels(self.k_in)
        self.refiner_unc = refiner.provides_uncertainty
        self.channels = self.k_out + (1 if self.refiner_unc else 0)
        self.custom_skip = refiner.custom_skip and not self.labels
        self.custom_weights = refiner.custom_weights
        self.weightless_skips = refiner.skipped_tiles_weightless
        self.start_row = int(start_row)
        self.first_grid_row = next(
            (i for i, r in enumerate(plan.row_starts) if r + plan.tile_height > start_row),
            len(plan.row_starts))
        self.band = end_row is not None
        self.end_row = plan.shape[0] if end_row is None else min(int(end_row), plan.shape[0])
        self.end_grid_row = next((i for i, r in enumerate(plan.row_starts) if r >= self.end_row),
                                 len(plan.row_starts))
        self.stats = GridStats(tiles_total=len(plan), pixels=plan.shape[0] * plan.shape[1],
                               states=np.full(plan.grid_shape, TILE_NOT_RUN, np.uint8))
        self.stats.extra["resumed_from_row"] = self.start_row
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
        k = None
        if self.skip_uniform:
            const = self.coarse.constant(tile.read)
            if const is not None:
                item.skip = const
                return item
            if self.custom_skip:
                k = self.coarse.read_k(tile.read)
                if self.refiner.skip_test(k):
                    item.skip = k[tile.window.relative_to(tile.read).slices]
                    return item
            elif self.refiner.skip_rule == "binary" and self.coarse.binary_uniform(tile.read):
                item.skip = self.coarse.read_k(tile.window)
                return item
        if self.labels:
            item.label_window = self.coarse.read_labels(tile.read)
        else:
            k = self.coarse.read_k(tile.read) if k is None else k
            item.coarse = k[..., 0] if self.k_in == 1 else k
        item.image = self.image.read(tile.read) if self.refiner.needs_image else None
        return item

    def _todo(self) -> list[Tile]:
        """The tiles still to run (all of them unless resuming)."""
        return [t for g in range(self.first_grid_row, self.end_grid_row) for t in self.plan.row_tiles(g)]

    def _prefetch(self, q_in: queue.Queue) -> None:
        for tile in self._todo():
            with self.timer.stage("read"):
                item = self._load(tile)
            self._put(q_in, item)
        self._put(q_in, _END)

    def _skip_values(self, item: _Item) -> np.ndarray:
        th, tw = item.tile.window.shape
        assert item.skip is not None
        coarse = item.skip if item.skip.ndim == 3 else np.broadcast_to(item.skip, (th, tw, self.k_in))
        values = coarse if self.labels else self.refiner.skip_output(coarse)
        if not self.refiner_unc:
            return np.ascontiguousarray(values, dtype=np.float32)
        unc = 1.0 - np.abs(2.0 * values[..., :1] - 1.0)
        return np.concatenate([values, unc], axis=-1).astype(np.float32)

    def _crop(self, tile: Tile, arr: np.ndarray) -> np.ndarray:
        rel = tile.window.relative_to(tile.read)
        return arr[rel.slices]

    def _core(self, tile: Tile) -> Window:
        """The pixels this tile accounts for (relative to its read window); in a band, only the band's."""
        own = self.plan.owned(tile)
        if self.band:
            r0 = min(max(own.row, self.start_row), own.row_end)
            r1 = max(min(own.row_end, self.end_row), r0)
            own = Window(r0, own.col, r1 - r0, own.width)
        return own.relative_to(tile.read)

    def _refine_items(self, items: list[_Item]) -> list[_Result]:
        """Refine a batch of non-skipped items (binary: batched; labels: per class)."""
        results: list[_Result] = []
        if not self.labels:
            inputs = [TileInput(it.image, it.coarse, it.tile.read,  # type: ignore[arg-type]
                                core=self._core(it.tile)) for it in items]
            with self.timer.stage("refine"):
                outs = self.refiner.refine_batch(inputs)
            self.stats.refiner_calls += len(items)
            for it, res in zip(items, outs, strict=True):
                results.append(_Result(it.tile, self._pack_binary(it.tile, res), True, res.held))
            return results
        for it in items:
            lw = it.label_window
            th, tw = it.tile.window.shape
            values = np.zeros((th, tw, self.channels), np.float32)
            inputs = [TileInput(it.image, lw.prob(c), it.tile.read) for c in lw.present]
            with self.timer.stage("refine"):
                outs = self.refiner.refine_batch(inputs)
            self.stats.refiner_calls += len(inputs)
            for c, res in zip(lw.present, outs, strict=True):
                values[..., c] = self._crop(it.tile, res.prob)
            results.append(_Result(it.tile, values, True))
        return results

    def _pack_binary(self, tile: Tile, res: TileResult) -> np.ndarray:
        prob = self._crop(tile, res.prob)
        if prob.ndim == 2:
            prob = prob[..., None]
        if not self.refiner_unc:
            return prob.astype(np.float32, copy=False)
        unc = (self._crop(tile, res.uncertainty) if res.uncertainty is not None
               else 1 - np.abs(2 * prob[..., 0] - 1))
        return np.concatenate([prob, unc[..., None]], axis=-1).astype(np.float32, copy=False)

    def _compute(self, q_in: queue.Queue, q_out: queue.Queue) -> None:
        done = False
        trimmer = HeapTrimmer()  # freed working memory of the refiner goes back to the system
        while not done:
            item = self._get(q_in)
            batch = [item]
            # Gather more ready tiles for a batched call, keeping order.
            while self.batch_size > 1 and len([b for b in batch if b is not _END and b.skip is None]) \
                    < self.batch_size and batch[-1] is not _END:
                try:
                    batch.append(q_in.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is _END:
                done = True
                batch.pop()
            pending = [b for b in batch if b.skip is None]
            refined = iter(self._refine_items(pending)) if pending else iter(())
            if pending:
                trimmer.tick()
            states = self.stats.states
            assert states is not None
            for b in batch:
                at = (b.tile.grid_row, b.tile.grid_col)
                if b.skip is not None:
                    self.stats.tiles_skipped += 1
                    states[at] = TILE_SKIPPED
                    self._put(q_out, _Result(b.tile, self._skip_values(b), False))
                else:
                    self.stats.tiles_refined += 1
                    res = next(refined)
                    states[at] = TILE_HELD if res.held else TILE_REFINED
                    self._put(q_out, res)
        self._put(q_out, _END)

    def _blend_and_write(self, q_out: queue.Queue) -> None:
        plan = self.plan
        acc = BandAccumulator(plan.shape[1], self.channels, plan.tile_height)
        nrows, ncols = plan.grid_shape
        todo = len(self._todo())
        if self.first_grid_row < nrows:
            acc.top = plan.row_starts[self.first_grid_row]
        done = 0
        weights_cache: dict[tuple[bool, bool, bool, bool], np.ndarray] = {}
        while True:
            res = self._get(q_out)
            if res is _END:
                break
            t = res.tile
            key = (*t.low_neighbours, *t.high_neighbours, *t.window.shape)
            w = weights_cache.get(key)
            if w is None:
                custom = self.refiner.tile_weights(t, plan) if self.custom_weights else None
                w = weights_cache[key] = custom if custom is not None else tile_weights(t, plan.overlap)
            if res.refined or not self.weightless_skips:
                with self.timer.stage("blend"):
                    acc.add(t.window, res.values, w)
            done += 1
            if t.grid_col == ncols - 1:
                with self.timer.stage("blend"):
                    row0, block, uncovered = acc.pop_final(
                        plan.rows_final_after(t.grid_row),
                        allow_uncovered=self.weightless_skips or self.custom_weights)
                    if uncovered is not None:
                        self._fill_uncovered(row0, block, uncovered)
                if row0 < self.start_row:  # written by the interrupted run (or another band's)
                    block = block[self.start_row - row0:]
                    row0 = self.start_row
                block = block[:max(0, self.end_row - row0)]
                if block.shape[0]:
                    with self.timer.stage("write"):
                        self.writer.write(row0, block)
            if self.progress is not None:
                self.progress(done, todo)
        if done != todo:
            raise RuntimeError(f"only {done} of {todo} tiles reached the writer")

    def _fill_uncovered(self, row0: int, block: np.ndarray, uncovered: np.ndarray) -> None:
        """Pixels no refined tile reached get the refiner's ``skip_output`` of the coarse input."""
        win = Window(row0, 0, block.shape[0], block.shape[1])
        values = self._skip_values(_Item(Tile(-1, -1, -1, win, win, (False, False), (False, False)),
                                         skip=self.coarse.read_k(win)))
        block[uncovered] = values[uncovered]

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
        writer = threading.Thread(target=self._guard(lambda: self._blend_and_write(q_out)),
                                  name="refine-writer", daemon=True)
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
