"""MagNet / MagNet-Fast on images of any size in bounded memory: the stages as the engine's levels.

The whole-image reference (:func:`~refine_cli.refiners.magnet.run_magnet`) keeps Y as one
dense ``C x H_s x W_s`` float32 map per stage. Here each refinement stage is one level of
``engine.levels.run_levels`` (:class:`StageLevels`), and nothing proportional to the image area
stays in RAM::

    Y_{s-1}      stage 1 in memory; later stages the previous level's float32 file, which the
                 engine wrote tile by tile and this stage reads by window (:class:`LevelY`)
    pass A       (:meth:`StageLevels.level_input`, before the engine runs the level) tiles of the
                 stage grid: Yu of the upsampled Y_{s-1} (:func:`upsample_window`, bit-identical to
                 the whole-image ``upsample_y``), summed per patch -> the MagNet-Fast patch ranking
                 (skipped when every patch is refined)
    patches      the selected patches in selection order, in chunks: the stage image over the
                 patch (:class:`StageImages`: only that region of the image is read), O, the Y
                 crop, R; R resized to the patch is kept (:class:`PatchBank`: in memory, on disk
                 for full MagNet), and so are E's values at the pixels the score reads
    score        Q = up(median_k(down(E))) needs E only where legacy-nearest ``down`` samples it
                 (``h_in x w_in`` values), so Q_small is computed exactly as the whole image
                 does; Q is constant on blocks, so the canonical top-k cut (Q descending, flat
                 index ascending, only Q > 0) is found by counting block areas (:class:`BlockScores`),
                 no sort
    pass B       the engine's tiles of the level (:class:`StageSource` read by window): Y_s =
                 upsampled Y_{s-1}, R at the selected points (``replace="confident"``: only where
                 R is more certain than Y, a pointwise test); :class:`StagePassThrough` copies it
                 into the level's file without blending; the image-size level goes to the outputs
                 (:class:`PassThrough`, or the edge snap)

Every per-pixel step (upsampling, uncertainty, patch crops, R averaging, score samples, the
cut) depends only on global coordinates, so the tiled run reproduces the whole-image run
bit for bit whenever the stage images match, which they do when a stage is an integer
factor of the image (both OpenCV modes) or a rational one for ``area`` resizing: windows are
read with a margin and aligned to the resampling lattice. Patch means are summed tile by
tile in float64 (the reference sums each patch at once), so patch ranks could only differ
between patches whose means tie to float32 precision.

Stage images that would need too large a full-resolution window (a 256-px patch at a
1/64 scale reads 16k x 16k pixels) come instead from an area-downscaled level of exactly the
stage size, all from one streaming pass (in memory, or a temporary tiled TIFF); the report
names the source of every stage. ``MagnetRefiner`` reads a user mask as an area-averaged
overview at the first refinement scale; it becomes stage-1 Y.

Y between stages is float32 by default: ``store_dtype="float16"`` rounds it as it is read back,
which moves the top-k cut and R slightly (on the 4K comparison of ``tests/test_magnet_tiled.py``
a few hundred of 8.3 M labels change, against 0 with float32).

Shapes: tensors ``(1, C, h, w)`` float32 (probabilities in [0, 1]); images ``(h, w, 3)`` uint8
RGB; windows :class:`~refine_cli.tiling.grid.Window` in the pixels of the stage they refer to.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from refine_cli.errors import ResourceError, UsageError
from refine_cli.io.image import area_downscale_bands_u8, choose_level, write_level_tiff
from refine_cli.io.protocols import PyramidImage
from refine_cli.io.readers import Reader
from refine_cli.refiners.classical import CoarseRefiner
from refine_cli.refiners.magnet import (
    SCALES_STAGE,
    SEGMENTER_STAGE,
    Schedule,
    StagePlan,
    StageProgress,
    StageStats,
    check_pipeline,
    first_stage,
    predict_crops,
    refine_crops,
    resize_y,
    upsample_window,
)
from refine_cli.refiners.magnet_points import (
    TopKCut,
    certainty,
    confident_mask,
    error_score,
    median_filter,
    nearest_indices,
    patch_grid,
    patch_mean,
    rank_patches,
    stage_points,
    uncertainty,
)
from refine_cli.report.timing import StageTimer
from refine_cli.segmenters.base import Segmenter
from refine_cli.tiling.budget import BASE_BYTES
from refine_cli.tiling.grid import GridPlan, Window, blocks, plan_grid

if TYPE_CHECKING:
    from refine_cli.models.magnet import RefinementMagNet

logger = logging.getLogger(__name__)

Size = tuple[int, int]

STORE_TILE = 256
"""Pass tiles of pass A are multiples of this side, px."""

PASS_TILES = (2048, 1024, 512, 256)
"""Candidate pass tile sides, largest first."""

SOURCE_MARGIN = 2
"""Source pixels read beyond a stage window on each side (bilinear needs 1)."""

STORE_DTYPES = ("float32", "float16")


# --------------------------------------------------------------------------- the image


class ArrayImage:
    """An in-memory ``(H, W, 3)`` uint8 image behind :class:`PyramidImage` (tests, small images)."""

    georef = None

    def __init__(self, image: np.ndarray) -> None:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UsageError(f"MagNet takes an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
        self.image = image
        self.shape = (int(image.shape[0]), int(image.shape[1]))
        self.level_shapes = [self.shape]
        self.reads = 0
        self.pixels_read = 0

    def read(self, window: Window, level: int = 0) -> np.ndarray:
        """A copy of the window (counts calls and pixels, so tests can check what was read)."""
        if level != 0:
            raise ValueError("ArrayImage has one level")
        self.reads += 1
        self.pixels_read += window.area
        return self.image[window.slices].copy()


class _LevelImage:
    """A built stage level (in-memory array or temporary TIFF reader) behind :class:`PyramidImage`."""

    georef = None

    def __init__(self, shape: Size, array: np.ndarray | None = None, level: Any = None) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.level_shapes = [self.shape]
        self.array, self.level = array, level

    def read(self, window: Window, level: int = 0) -> np.ndarray:
        """``(h, w, 3)`` uint8 over ``window``."""
        if self.array is not None:
            return self.array[window.slices]
        out: np.ndarray = self.level.read(window)
        return out

    def close(self) -> None:
        """Delete a temporary level file."""
        if self.level is not None:
            self.level.close()


def _lattice(n_src: int, n_dst: int) -> tuple[int, int]:
    """``(q, p)``: the lattice of destination positions that fall on a source pixel boundary.

    Destination positions ``x`` with ``x * n_src / n_dst`` integer are multiples of q, and q of them
    span p source pixels.
    """
    g = math.gcd(n_src, n_dst)
    return n_dst // g, n_src // g


class StageImages:
    """The image at each stage scale, read one patch at a time.

    Mode per stage:

    * ``full``: the patch window of the stage image is made by resizing (the segmenter's own
      ``resize``, as the whole-image reference does for the whole image) a region of the
      full-resolution image; the region has a margin and is aligned to the resampling lattice,
      so the window equals the whole-image resize (exactly for integer factors, and for
      rational factors with ``area`` resizing);
    * ``level``: when that region would exceed ``read_limit`` bytes, an area-downscaled
      level of exactly the stage size is built (in memory when small, else a temporary tiled
      TIFF) and patches are read from it. All levels come from one streaming pass over the
      image (the largest; the others from it), so once a pass is needed, every stage whose
      full-resolution windows would add up to more than 1/8 of the image joins it.

    Args:
        image: the image.
        segmenter: resizes like the reference pipeline.
        stages: ``(scale (W, H), crop (w, h), refined patches)`` of every stage.
        read_limit: largest full-resolution region read at once, bytes.
        tmp_dir: folder for built levels.
    """

    def __init__(self, image: PyramidImage, segmenter: Segmenter, stages: Sequence[tuple[Size, Size, int]],
                 read_limit: int, tmp_dir: str) -> None:
        self.image, self.segmenter, self.read_limit, self.tmp_dir = image, segmenter, int(read_limit), tmp_dir
        self.modes: dict[Size, str] = {}
        self._levels: dict[Size, _LevelImage] = {}
        H, W = image.shape
        costs: dict[Size, int] = {}
        for scale, crop, patches in stages:
            hw = (scale[1], scale[0])
            if hw == (H, W) or hw[0] > H or hw[1] > W:
                self.modes[scale] = "full"
                continue
            box = (min(crop[1], hw[0]), min(crop[0], hw[1]))
            area = self._region_rows(hw[0], H, box[0]) * self._region_rows(hw[1], W, box[1])
            self.modes[scale] = "full" if 3 * area <= self.read_limit else "level"
            if 3 * hw[0] * hw[1] <= self.read_limit // 2:
                costs[scale] = area * max(1, patches)
        if "level" in self.modes.values():
            for scale, cost in costs.items():
                if cost > H * W // 8:
                    self.modes[scale] = "level"

    @staticmethod
    def _region_rows(n_dst: int, n_src: int, length: int) -> int:
        """Upper bound of the source length read for ``length`` destination pixels."""
        q, p = _lattice(n_src, n_dst)
        margin = math.ceil(SOURCE_MARGIN * n_dst / n_src) + 1
        span = min(n_dst, length + 2 * margin + 2 * (q - 1))
        return min(n_src, math.ceil(span * n_src / n_dst) + p)

    def _aligned(self, start: int, stop: int, n_dst: int, n_src: int) -> tuple[int, int, int, int]:
        """Destination ``[a0, a1)`` around ``[start, stop)`` on the lattice, and its source ``[s0, s1)``."""
        q, p = _lattice(n_src, n_dst)
        margin = math.ceil(SOURCE_MARGIN * n_dst / n_src) + 1
        a0 = max(0, (start - margin) // q * q)
        a1 = min(n_dst, -(-(stop + margin) // q) * q)
        s0 = a0 // q * p
        s1 = n_src if a1 == n_dst else a1 // q * p
        return a0, a1, s0, s1

    def crop(self, scale: Size, box: Window) -> np.ndarray:
        """The stage image over ``box`` (stage pixels).

        Returns:
            ``(box.height, box.width, 3)`` uint8, C-contiguous.
        """
        hw = (scale[1], scale[0])
        if self.modes.get(scale) == "level":
            return np.ascontiguousarray(self._level(hw).read(box))
        H, W = self.image.shape
        if hw == (H, W):
            return np.ascontiguousarray(self.image.read(box))
        r0, r1, y0, y1 = self._aligned(box.row, box.row_end, hw[0], H)
        c0, c1, x0, x1 = self._aligned(box.col, box.col_end, hw[1], W)
        region = self.image.read(Window(y0, x0, y1 - y0, x1 - x0))
        out = self.segmenter.resize(region, (c1 - c0, r1 - r0))
        rel = box.relative_to(Window(r0, c0, r1 - r0, c1 - c0))
        return np.ascontiguousarray(out[rel.slices])

    def whole(self, scale: Size) -> np.ndarray:
        """The whole stage image (small stages: stage 1)."""
        return self.crop(scale, Window(0, 0, scale[1], scale[0]))

    def _level(self, hw: Size) -> _LevelImage:
        """The area-downscaled level of size ``hw``.

        The first call builds every level, largest first, each from the smallest larger one (the
        largest from the image or its pyramid).
        """
        if hw not in self._levels:
            wanted = sorted({(s[1], s[0]) for s, m in self.modes.items() if m == "level"},
                            key=lambda t: t[0] * t[1], reverse=True)
            for target in wanted:
                if target not in self._levels:
                    self._levels[target] = self._build(target)
        return self._levels[hw]

    def _build(self, target: Size) -> _LevelImage:
        """One level, area-downscaled from the smallest built level that is larger (else the image)."""
        bigger = [lv for s, lv in self._levels.items() if s[0] >= target[0] and s[1] >= target[1]]
        if bigger:
            src: PyramidImage = min(bigger, key=lambda lv: lv.shape[0] * lv.shape[1])
            level_index, src_shape = 0, src.shape
        else:
            src = self.image
            level_index = choose_level(self.image.level_shapes, target)
            src_shape = self.image.level_shapes[level_index]
        logger.info("MagNet: building the %dx%d stage image from %dx%d (area)", target[1], target[0],
                    src_shape[1], src_shape[0])
        bands = area_downscale_bands_u8(lambda w: src.read(w, level_index), src_shape, target)
        if 3 * target[0] * target[1] <= self.read_limit // 2:
            return _LevelImage(target, array=np.concatenate([b for _, b in bands], axis=0))
        return _LevelImage(target, level=write_level_tiff(bands, target, self.tmp_dir))

    def describe(self) -> dict[str, str]:
        """``{"WxH": mode}`` per stage."""
        return {f"{s[0]}x{s[1]}": m for s, m in self.modes.items()}

    def close(self) -> None:
        """Release built levels."""
        for lv in self._levels.values():
            lv.close()
        self._levels.clear()


# --------------------------------------------------------------------------- Y sources


class MemoryY:
    """A ``(1, C, h, w)`` map held in memory."""

    def __init__(self, y: torch.Tensor) -> None:
        self.y = y
        self.shape = (int(y.shape[-2]), int(y.shape[-1]))
        self.channels = int(y.shape[1])

    def read(self, window: Window) -> torch.Tensor:
        """A view of the window."""
        return self.y[..., window.row : window.row_end, window.col : window.col_end]

    def read_all(self) -> torch.Tensor:
        """The whole map."""
        return self.y

    def close(self) -> None:
        """Drop the map."""
        self.y = torch.empty(0)


class LevelY:
    """A previous stage's Y as the engine wrote it (its float32 level file), read by window.

    Args:
        reader: the ``(h, w, C)`` float32 raster of the stage.
        store_dtype: ``float32`` (exact) or ``float16``: values are rounded to float16 as they are
            read, as a half-precision store between stages would keep them.
    """

    def __init__(self, reader: Reader, store_dtype: str = "float32") -> None:
        if store_dtype not in STORE_DTYPES:
            raise UsageError(f"store dtype {store_dtype!r}: use one of {STORE_DTYPES}")
        self.reader = reader
        self.shape = (int(reader.shape[0]), int(reader.shape[1]))
        self.channels = int(reader.bands)
        self.half = store_dtype == "float16"

    def read(self, window: Window) -> torch.Tensor:
        """``(1, C, h, w)`` float32 over ``window``."""
        values = np.asarray(self.reader.read(window), dtype=np.float32)
        y = torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1)))[None]
        return y.to(torch.float16).to(torch.float32) if self.half else y

    def read_all(self) -> torch.Tensor:
        """The whole map, ``(1, C, H, W)`` float32 (small stages only)."""
        return self.read(Window.full(self.shape))

    def close(self) -> None:
        """Close the file (the engine removes it)."""
        self.reader.close()


class UpsampledY:
    """Y of the previous stage enlarged to this stage's size, per window (:func:`upsample_window`)."""

    def __init__(self, source: MemoryY | LevelY, shape: Size) -> None:
        if shape[0] < source.shape[0] or shape[1] < source.shape[1]:
            raise UsageError(
                f"the tiled MagNet needs stages that grow; {source.shape[1]}x{source.shape[0]} -> "
                f"{shape[1]}x{shape[0]} shrinks (use the whole-image path for this schedule)")
        self.source, self.shape, self.channels = source, (int(shape[0]), int(shape[1])), source.channels

    def read(self, window: Window) -> torch.Tensor:
        """``(1, C, h, w)`` float32 over ``window`` of the stage."""
        return upsample_window(self.source.read, self.source.shape, self.shape, window)


YMap = MemoryY | LevelY | UpsampledY


def fast_uncertainty(y: torch.Tensor) -> torch.Tensor:
    """:func:`~refine_cli.refiners.magnet_points.uncertainty` of ``(N, C, h, w)``, bit for bit.

    For C = 2 ``1 - |y0 - y1|`` (``max - min`` equals ``|a - b|`` exactly) instead of ``topk``.
    """
    if y.shape[1] == 2:
        return 1 - (y[:, 0:1] - y[:, 1:2]).abs()
    return uncertainty(y)


# --------------------------------------------------------------------------- R of the refined patches


class PatchBank:
    """R of the selected patches, each resized to its window, and their average per window.

    Averaging follows :func:`~refine_cli.refiners.magnet_points.ensemble_patches`: the
    patches covering a pixel are added in selection order and divided by their count.

    Args:
        boxes: the selected patch windows, in selection order.
        channels: C.
        folder: keep the patches in a zarr array there instead of in memory.
    """

    def __init__(self, boxes: Sequence[Window], channels: int, folder: str | None = None) -> None:
        self.boxes = list(boxes)
        self.channels = channels
        rows = [[b.row, b.row_end, b.col, b.col_end] for b in self.boxes]
        self._bounds = np.array(rows, np.int64).reshape(-1, 4)
        self._memory: dict[int, torch.Tensor] = {}
        self._array: Any = None
        self.path: str | None = None
        if folder is not None and self.boxes:
            import zarr

            # one uncompressed chunk per patch, padded to the largest patch (a stage's are all alike)
            h = max(b.height for b in self.boxes)
            w = max(b.width for b in self.boxes)
            self.path = tempfile.mkdtemp(prefix="r_patches_", suffix=".zarr", dir=folder)
            self._array = zarr.create_array(store=self.path, shape=(len(self.boxes), channels, h, w),
                                            chunks=(1, channels, h, w), dtype=np.float32, compressors=None,
                                            fill_value=0, overwrite=True)

    @property
    def on_disk(self) -> bool:
        """Whether the patches live in a zarr array on disk."""
        return self._array is not None

    @property
    def nbytes_memory(self) -> int:
        """Bytes of the patches held in memory."""
        return sum(t.numel() * 4 for t in self._memory.values())

    def put(self, j: int, r: torch.Tensor) -> None:
        """Keep patch ``j``'s R, ``(1, C, h, w)`` at its window's size."""
        if self._array is None:
            self._memory[j] = r.contiguous()
            return
        b = self.boxes[j]
        self._array[j, :, : b.height, : b.width] = r[0].contiguous().numpy().astype(np.float32, copy=False)

    def get(self, j: int) -> torch.Tensor:
        """Patch ``j``'s R, ``(1, C, h, w)`` float32."""
        if self._array is None:
            return self._memory[j]
        b = self.boxes[j]
        values = np.asarray(self._array[j, :, : b.height, : b.width], dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(values))[None]

    def overlapping(self, window: Window) -> list[int]:
        """Indices (selection order) of the patches that intersect ``window``."""
        b = self._bounds
        hit = (b[:, 0] < window.row_end) & (b[:, 1] > window.row)
        hit &= (b[:, 2] < window.col_end) & (b[:, 3] > window.col)
        return np.flatnonzero(hit).tolist()

    def covered(self, window: Window) -> torch.Tensor:
        """``(h, w)`` bool: pixels of ``window`` inside a selected patch."""
        mask = torch.zeros(window.shape, dtype=torch.bool)
        for j in self.overlapping(window):
            inter = self.boxes[j].intersection(window)
            assert inter is not None
            rel = inter.relative_to(window)
            mask[rel.slices] = True
        return mask

    def render(self, window: Window) -> torch.Tensor:
        """``(1, C, h, w)`` averaged R over ``window`` (0 outside every patch)."""
        acc = torch.zeros((1, self.channels, window.height, window.width))
        count = torch.zeros(window.shape, dtype=torch.int32)
        for j in self.overlapping(window):
            box = self.boxes[j]
            inter = box.intersection(window)
            assert inter is not None
            dst, src = inter.relative_to(window), inter.relative_to(box)
            r = self.get(j)
            part = r[..., src.row : src.row_end, src.col : src.col_end]
            acc[..., dst.row : dst.row_end, dst.col : dst.col_end] += part
            count[dst.slices] += 1
        return acc / count.clamp(min=1).to(acc.dtype)

    def close(self) -> None:
        """Drop the patches (and delete their store)."""
        self._memory.clear()
        self._array = None
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


# --------------------------------------------------------------------------- the score and its top-k


class BlockScores:
    """The stage score Q as blocks, and its canonical top-k cut, without a full-size map.

    ``Q = up(Q_small)`` with legacy-nearest ``up``, so Q is constant on the blocks where the
    up-sampled row and column indices are constant; the candidates (the refined patches'
    union) are constant on the blocks cut by patch edges. Both together cut the stage into
    at most ``(h_in + 2P) x (w_in + 2P)`` rectangles of known value, area and candidacy,
    enough to find what :func:`~refine_cli.refiners.magnet_points.topk_cut` finds on the
    full map: the threshold (k-th largest Q), the counts above and at it, and the flat index
    below which tied pixels are taken (walking the tied rectangles in row-major order).

    Args:
        q_small: ``(h, w)`` or ``(1, 1, h, w)`` float32 Q before ``up``.
        stage_hw: ``(H, W)``.
        boxes: candidate windows (their union), or ``None`` for every pixel.
        positive: only pixels with Q > 0 are candidates (the pipeline's rule: zero scores are never
            replaced); :attr:`covered_area` still counts the whole union.
    """

    def __init__(self, q_small: torch.Tensor, stage_hw: Size, boxes: Sequence[Window] | None,
                 positive: bool = False) -> None:
        q = q_small.reshape(q_small.shape[-2], q_small.shape[-1]).to(torch.float32)
        if bool(torch.isnan(q).any()):
            raise ValueError("scores contain NaN")
        self.q_small = q
        self.stage_hw = (int(stage_hw[0]), int(stage_hw[1]))
        H, W = self.stage_hw
        self.row_cells = nearest_indices(q.shape[0], H)
        self.col_cells = nearest_indices(q.shape[1], W)
        boxes = list(boxes) if boxes is not None else None
        self.rows = self._segments(self.row_cells.numpy(), [(b.row, b.row_end) for b in boxes or []], H)
        self.cols = self._segments(self.col_cells.numpy(), [(b.col, b.col_end) for b in boxes or []], W)
        r_len, c_len = np.diff(self.rows), np.diff(self.cols)
        qv = (q.numpy().astype(np.float64) + 0.0)  # -0.0 counts as 0.0
        self.values = qv[self.row_cells.numpy()[self.rows[:-1]]][:, self.col_cells.numpy()[self.cols[:-1]]]
        self.sizes = r_len[:, None].astype(np.int64) * c_len[None, :].astype(np.int64)
        if boxes is None:
            self.valid = np.ones(self.values.shape, bool)
        else:  # box edges are breakpoints: mark each box's block rectangle in a difference array
            bounds = np.array([[b.row, b.row_end, b.col, b.col_end] for b in boxes], np.int64).reshape(-1, 4)
            r0, r1 = np.searchsorted(self.rows, bounds[:, 0]), np.searchsorted(self.rows, bounds[:, 1])
            c0, c1 = np.searchsorted(self.cols, bounds[:, 2]), np.searchsorted(self.cols, bounds[:, 3])
            diff = np.zeros((len(self.rows), len(self.cols)), np.int64)
            for a, b in ((r0, c0), (r1, c1)):
                np.add.at(diff, (a, b), 1)
            for a, b in ((r0, c1), (r1, c0)):
                np.add.at(diff, (a, b), -1)
            self.valid = diff.cumsum(axis=0).cumsum(axis=1)[:-1, :-1] > 0
        self.covered_area = int(self.sizes[self.valid].sum())
        if positive:
            self.valid &= self.values > 0
        self.n_candidates = int(self.sizes[self.valid].sum())
        self._q_np, self._rows_np, self._cols_np = q.numpy(), self.row_cells.numpy(), self.col_cells.numpy()

    @staticmethod
    def _segments(cells: np.ndarray, spans: list[tuple[int, int]], length: int) -> np.ndarray:
        """Breakpoints ``0 = b_0 < ... < b_n = length`` where the cell or the set of spans changes."""
        points = {0, length}
        points.update((np.flatnonzero(np.diff(cells)) + 1).tolist())
        for a, b in spans:
            points.update((min(max(a, 0), length), min(max(b, 0), length)))
        return np.array(sorted(points), np.int64)

    def cut(self, k: int) -> TopKCut:
        """The canonical top-k rule (same as ``topk_cut(Q, k, covered)`` on the full map)."""
        H, W = self.stage_hw
        n = self.n_candidates
        k = max(0, min(int(k), n))
        if k == 0:
            return TopKCut(0, n, math.inf, 0, 0, 0, select_all=False, width=W)
        if k == n:
            return TopKCut(k, n, -math.inf, n, 0, 0, select_all=True, width=W)
        v, s = self.values[self.valid], self.sizes[self.valid]
        order = np.argsort(-v, kind="stable")
        reach = np.cumsum(s[order])
        t = float(v[order][int(np.searchsorted(reach, k))])
        n_greater = int(s[v > t].sum())
        n_equal = int(s[v == t].sum())
        need = k - n_greater
        if need == n_equal:
            return TopKCut(k, n, t, n_greater, n_equal, H * W, select_all=False, width=W)
        tied = self.valid & (self.values == t)
        c_len = np.diff(self.cols)
        per_row = (tied * c_len[None, :]).sum(axis=1)
        for a in range(len(self.rows) - 1):
            rows_here = int(self.rows[a + 1] - self.rows[a])
            total = int(per_row[a]) * rows_here
            if need > total:
                need -= total
                continue
            y = int(self.rows[a]) + (need - 1) // int(per_row[a])
            rem = (need - 1) % int(per_row[a]) + 1
            for b in np.flatnonzero(tied[a]).tolist():
                if rem <= c_len[b]:
                    x = int(self.cols[b]) + rem - 1
                    return TopKCut(k, n, t, n_greater, n_equal, y * W + x + 1, select_all=False, width=W)
                rem -= int(c_len[b])
        raise AssertionError("tied pixels ran out before the cut")  # pragma: no cover

    def q_window(self, window: Window) -> torch.Tensor:
        """``(h, w)`` float32 Q over ``window`` (gathered from ``q_small``)."""
        rows = self._rows_np[window.row : window.row_end]
        cols = self._cols_np[window.col : window.col_end]
        return torch.from_numpy(np.take(np.take(self._q_np, rows, axis=0), cols, axis=1))


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class TiledPlan:
    """Memory-derived sizes of a tiled run.

    Attributes:
        budget: bytes (``--max-memory``).
        tile: side of the pass tiles, px (a multiple of :data:`STORE_TILE`).
        memory_pixels: stages of at most this area are processed whole, in memory.
        read_limit: largest image region read at once, bytes.
        patch_chunk: patches segmented and refined together (a multiple of the batch size).
        bank_bytes: R of the selected patches beyond this goes to disk.
        store_dtype: ``float32`` | ``float16``.
        bytes_per_pixel: working bytes per stage pixel of a pass tile.
    """

    budget: int
    tile: int
    memory_pixels: int
    read_limit: int
    patch_chunk: int
    bank_bytes: int
    store_dtype: str
    bytes_per_pixel: int

    @classmethod
    def from_budget(cls, budget: int, channels: int, fixed: int, *, input_hw: Size, batch_size: int = 1,
                    tile: int | None = None, store_dtype: str = "float32",
                    memory_pixels: int | None = None, read_limit: int | None = None) -> TiledPlan:
        """Split the budget (see the module docstring of ``tiling.budget`` for the base).

        Args:
            budget: bytes.
            channels: C.
            fixed: bytes held all run long (weights, segmenter).
            input_hw: segmenter input ``(h, w)``.
            batch_size: patches per forward pass.
            tile: force the pass tile side (a multiple of :data:`STORE_TILE`).
            store_dtype: dtype of the stores.
            memory_pixels: force the in-memory stage limit (tests).
            read_limit: force the largest image region read at once, bytes (tests).

        Raises:
            ResourceError: the budget leaves too little room (the message gives one that fits).
        """
        if store_dtype not in STORE_DTYPES:
            raise UsageError(f"store dtype {store_dtype!r}: use one of {STORE_DTYPES}")
        avail = int(budget) - BASE_BYTES - int(fixed)
        bpp = 32 * channels + 32
        floor = bpp * PASS_TILES[-1] ** 2 * 4 + (64 << 20)
        if avail < floor:
            need = (BASE_BYTES + fixed + floor) >> 20
            raise ResourceError(f"the tiled MagNet needs about {need} MiB but --max-memory is {budget >> 20} "
                                f"MiB; raise --max-memory to {need + 64}M or more")
        if tile is None:
            tile = next((t for t in PASS_TILES if bpp * t * t <= avail // 6), PASS_TILES[-1])
        elif tile % STORE_TILE:
            raise UsageError(f"tile {tile} must be a multiple of {STORE_TILE}")
        per_patch = 4 * channels * input_hw[0] * input_hw[1] * 8 + 6 * input_hw[0] * input_hw[1] * 16
        chunk = max(1, (avail // 8) // max(1, per_patch))
        chunk = max(batch_size, chunk // batch_size * batch_size)
        mem_px = memory_pixels if memory_pixels is not None else avail // 4 // bpp
        return cls(
            budget=int(budget), tile=int(tile), memory_pixels=int(mem_px),
            read_limit=int(read_limit if read_limit is not None else max(32 << 20, avail // 6)),
            patch_chunk=int(chunk), bank_bytes=int(avail // 8),
            store_dtype=store_dtype, bytes_per_pixel=int(bpp),
        )


# --------------------------------------------------------------------------- one stage


@dataclass
class StageOutput:
    """Y of a refined stage, computable for any window: upsampled Y_{s-1}, R at the selected points.

    Attributes:
        yup: the upsampled previous Y (a :class:`MemoryY` for in-memory stages).
        scores: Q as blocks.
        cut: the selected points.
        bank: R of the refined patches.
        full: the refined patches cover the stage (no patch mask; candidates still need Q > 0).
        replace: ``all`` | ``confident`` (selected points take R only where it is more certain than Y).
    """

    yup: YMap
    scores: BlockScores
    cut: TopKCut
    bank: PatchBank
    full: bool
    replace: str = "all"

    @property
    def shape(self) -> Size:
        """``(H, W)`` of the stage."""
        return self.yup.shape

    @property
    def channels(self) -> int:
        """C."""
        return self.yup.channels

    def read(self, window: Window) -> torch.Tensor:
        """``(1, C, h, w)`` float32 Y over ``window``."""
        with torch.inference_mode():
            y = self.yup.read(window)
            if self.cut.k == 0:
                return y
            covered = None if self.full else self.bank.covered(window)
            if covered is not None and not bool(covered.any()):
                return y
            q = self.scores.q_window(window)
            valid = q > 0 if covered is None else covered & (q > 0)
            sel = self.cut.mask(q, window.row, window.col, valid)
            if not bool(sel.any()):
                return y
            r = self.bank.render(window)
            if self.replace == "confident":
                sel = sel & confident_mask(y, r)
            return torch.where(sel, r, y)

    def close(self) -> None:
        """Drop R of the patches."""
        self.bank.close()


@dataclass
class _RunContext:
    """What every stage of one run shares."""

    images: StageImages
    segmenter: Segmenter
    schedule: Schedule
    plan: TiledPlan
    folder: str
    batch_size: int
    device: torch.device


def _patch_means(yup: YMap, boxes: Sequence[Window], tiles: Sequence[Window]) -> torch.Tensor:
    """Mean Yu per patch, ``(P,)`` float32: exact ``patch_mean`` for one tile, else float64 sums per tile."""
    if len(tiles) == 1 and tiles[0].shape == yup.shape:
        return patch_mean(fast_uncertainty(yup.read(tiles[0])), boxes)
    sums = np.zeros(len(boxes), np.float64)
    row_starts = sorted({b.row for b in boxes})
    col_starts = sorted({b.col for b in boxes})
    by_start: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(boxes):
        by_start.setdefault((b.row, b.col), []).append(i)
    ph = max(b.height for b in boxes)
    pw = max(b.width for b in boxes)
    for tile in tiles:
        yu = fast_uncertainty(yup.read(tile))[0, 0].numpy()
        r_lo = bisect.bisect_right(row_starts, tile.row - ph)
        r_hi = bisect.bisect_left(row_starts, tile.row_end)
        c_lo = bisect.bisect_right(col_starts, tile.col - pw)
        c_hi = bisect.bisect_left(col_starts, tile.col_end)
        for r in row_starts[r_lo:r_hi]:
            for c in col_starts[c_lo:c_hi]:
                for i in by_start.get((r, c), []):
                    inter = boxes[i].intersection(tile)
                    if inter is not None:
                        rel = inter.relative_to(tile)
                        sums[i] += float(yu[rel.slices].sum(dtype=np.float64))
    areas = np.array([b.area for b in boxes], np.float64)
    return torch.from_numpy(sums / areas).to(torch.float32)


def _sample_span(samples: torch.Tensor, start: int, stop: int) -> tuple[int, int]:
    """``[i0, i1)``: the samples (non-decreasing pixel indices) lying in ``[start, stop)``."""
    values = samples.tolist()
    return bisect.bisect_left(values, start), bisect.bisect_left(values, stop)


@dataclass
class _SmallMaps:
    """The refined patches sampled at the segmenter's input size (nearest pixels), for the point scores.

    Attributes:
        acc: ``(1, C, h, w)`` sum of R over the patches that cover each sample.
        count: ``(h, w)`` int32 number of those patches.
        yu: ``(1, 1, h, w)`` uncertainty of the upsampled Y at the samples.
        rows: stage rows of the samples; cols: stage columns.
        own_means: mean uncertainty of each refined patch (when the patches are not ranked).
    """

    acc: torch.Tensor
    count: torch.Tensor
    yu: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    own_means: list[float]

    @classmethod
    def empty(cls, channels: int, input_hw: Size, stage_hw: Size) -> _SmallMaps:
        """Zero maps of ``input_hw`` sampling a stage of ``stage_hw``."""
        return cls(torch.zeros((1, channels, *input_hw)), torch.zeros(input_hw, dtype=torch.int32),
                   torch.zeros((1, 1, *input_hw)), nearest_indices(stage_hw[0], input_hw[0]),
                   nearest_indices(stage_hw[1], input_hw[1]), [])


def _refine_chunk(ctx: _RunContext, module: RefinementMagNet, plan: StagePlan, yup: YMap, boxes: list[Window],
                  index: list[int], bank: PatchBank, small: _SmallMaps, *, own_means: bool,
                  clock: StageTimer) -> None:
    """Segment and refine one chunk of patches: R into ``bank`` (at ``index``) and into ``small``."""
    input_hw = ctx.schedule.input_hw
    t0 = time.perf_counter()
    crops = [ctx.images.crop(plan.scale, box) for box in boxes]
    clock.add("read", time.perf_counter() - t0)
    t0 = time.perf_counter()
    o = predict_crops(ctx.segmenter, crops, ctx.batch_size, ctx.device)
    del crops
    t1 = time.perf_counter()
    y_boxes = [yup.read(box) for box in boxes]
    y_crops = torch.cat([_resize_to(yb, input_hw) for yb in y_boxes]).to(ctx.device)
    r = refine_crops(module, o, y_crops, ctx.batch_size).cpu()
    del o, y_crops
    for n, (j, box) in enumerate(zip(index, boxes, strict=True)):
        r_box = _resize_to(r[n : n + 1], box.shape)
        bank.put(j, r_box)
        i0, i1 = _sample_span(small.rows, box.row, box.row_end)
        k0, k1 = _sample_span(small.cols, box.col, box.col_end)
        if i1 > i0 and k1 > k0:
            rr = small.rows[i0:i1] - box.row
            cc = small.cols[k0:k1] - box.col
            small.acc[..., i0:i1, k0:k1] += r_box.index_select(-2, rr).index_select(-1, cc)
            small.count[i0:i1, k0:k1] += 1
            yb = y_boxes[n].index_select(-2, rr).index_select(-1, cc)
            small.yu[..., i0:i1, k0:k1] = fast_uncertainty(yb)
        if own_means:
            yu_box = fast_uncertainty(y_boxes[n])
            small.own_means.append(float(patch_mean(yu_box, [Window.full(box.shape)])[0]))
    del r, y_boxes
    clock.add("segment", t1 - t0)
    clock.add("refine", time.perf_counter() - t1)


def refinement_stage_tiled(
    ctx: _RunContext, y_prev: MemoryY | LevelY, module: RefinementMagNet, plan: StagePlan
) -> tuple[StageOutput, StageStats]:
    """One refinement stage up to (not including) pass B; see the module docstring.

    Returns:
        ``(output, stats)``: :class:`StageOutput` (its windows are pass B; the engine reads them
        through :class:`StageSource`), and the stage's :class:`~refine_cli.refiners.magnet.StageStats`.
    """
    clock = StageTimer(())
    stage_hw = plan.hw
    area = stage_hw[0] * stage_hw[1]
    in_memory = area <= ctx.plan.memory_pixels
    if in_memory:
        yup: YMap = MemoryY(resize_y(y_prev.read_all(), stage_hw))
        tiles = [Window.full(stage_hw)]
    else:
        yup = UpsampledY(y_prev, stage_hw)
        tiles = list(blocks(stage_hw, ctx.plan.tile))
    clock.lap("upsample")
    boxes = patch_grid(stage_hw, (plan.crop[1], plan.crop[0]))
    ranked = plan.n_patches is not None and plan.n_patches < len(boxes)
    means: torch.Tensor | None = None
    if ranked:
        means = _patch_means(yup, boxes, tiles)
        chosen = rank_patches(means, plan.n_patches)
    else:
        chosen = list(range(len(boxes)))
    clock.lap("select")
    sel_boxes = [boxes[i] for i in chosen]
    channels = y_prev.channels
    input_hw = ctx.schedule.input_hw
    bank_bytes = sum(channels * b.area * 4 for b in sel_boxes)
    bank = PatchBank(sel_boxes, channels, ctx.folder if bank_bytes > ctx.plan.bank_bytes else None)
    small = _SmallMaps.empty(channels, input_hw, stage_hw)
    clock.restart()
    try:
        for lo in range(0, len(sel_boxes), ctx.plan.patch_chunk):
            part = list(range(lo, min(len(sel_boxes), lo + ctx.plan.patch_chunk)))
            _refine_chunk(ctx, module, plan, yup, [sel_boxes[j] for j in part], part, bank, small,
                          own_means=not ranked, clock=clock)
        clock.restart()
        r_small = small.acc / small.count.clamp(min=1).to(small.acc.dtype)
        e_small = error_score(small.yu, certainty(r_small))
        q_small = median_filter(e_small, ctx.schedule.kernel)
        clock.lap("score")
        # patch_grid covers the stage exactly, so refining every patch leaves no pixel out
        scores = BlockScores(q_small, stage_hw, None if len(chosen) == len(boxes) else sel_boxes,
                             positive=True)
        full = scores.covered_area == area
        if full and len(chosen) < len(boxes):
            scores = BlockScores(q_small, stage_hw, None, positive=True)
        k = stage_points(plan.n_points, scores.covered_area)
        cut = scores.cut(k)
        clock.lap("topk")
    except BaseException:
        bank.close()
        raise
    mean_values = means.tolist() if means is not None else None
    stats = StageStats(
        plan.index, plan.scale, len(boxes), tuple(chosen),
        tuple(float(mean_values[i]) for i in chosen) if mean_values is not None else tuple(small.own_means),
        scores.n_candidates, k, cut.k, clock.seconds(),
    )
    return StageOutput(yup, scores, cut, bank, full, ctx.schedule.replace), stats


def _resize_to(x: torch.Tensor, size: Size) -> torch.Tensor:
    """Bilinear resize without antialiasing (``crop_resize`` / ``ensemble_patches``'s)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------ the stages as the engine's levels


class FinalY:
    """The final Y at the image size, by window: the last stage's output, or it resized.

    Args:
        source: the last stage's :class:`StageOutput`, or its stored Y.
        image_hw: ``(H, W)`` of the image.
    """

    def __init__(self, source: StageOutput | MemoryY | LevelY, image_hw: Size) -> None:
        self.source = source
        self.shape = (int(image_hw[0]), int(image_hw[1]))
        self.channels = source.channels
        self._whole: torch.Tensor | None = None
        shrinks = self.shape[0] < source.shape[0] or self.shape[1] < source.shape[1]
        if source.shape != self.shape and shrinks:
            whole = source.read(Window.full(source.shape))  # shrinking: small by construction
            self._whole = resize_y(whole, self.shape)

    def read(self, window: Window) -> torch.Tensor:
        """``(1, C, h, w)`` float32 final Y over ``window``."""
        with torch.inference_mode():
            if self._whole is not None:
                return self._whole[..., window.row : window.row_end, window.col : window.col_end]
            if self.source.shape == self.shape:
                return self.source.read(window)
            return upsample_window(self.source.read, self.source.shape, self.shape, window)

    def close(self) -> None:
        """Drop the resized map."""
        self._whole = None


class StageSource:
    """One stage's Y as the coarse input of its engine level (and as a K-band float32 raster).

    Reading a window runs the stage's pass B there (:meth:`StageOutput.read`), or the final resize
    (:class:`FinalY`). The last window is cached: the engine asks for it up to three times
    (constant?, boundary?, values). Closing it closes the stage: R of its patches and the previous
    stage's Y it reads.

    Args:
        source: the stage's output.
        previous: the previous stage's Y that ``source`` reads (closed with this source).
        class1: give the class-1 probability only (K = 1; C must be 2), else all C channels.
        clip: clip the values read with :meth:`read_k` to ``[0, 1]`` (the engine's outputs), else
            hand them on bit for bit (a level file the next stage reads).
    """

    is_labels = False
    dtype = np.dtype(np.float32)

    def __init__(self, source: StageOutput | FinalY, previous: MemoryY | LevelY, class1: bool = False,
                 clip: bool = False) -> None:
        self.source, self.previous = source, previous
        self.shape = source.shape
        self.level_shapes = [self.shape]
        self.class1 = class1
        self.clip = clip
        self.channels = self.bands = 1 if class1 else source.channels
        self.path = f"magnet stage {self.shape[1]}x{self.shape[0]}"
        self._cache: tuple[Window, np.ndarray] | None = None

    def read(self, window: Window, level: int = 0) -> np.ndarray:
        """``(h, w, K)`` float32 Y over ``window`` (``level`` must be 0)."""
        if self._cache is not None and self._cache[0] == window:
            return self._cache[1]
        y = self.source.read(window)[0]
        y = y[1:2] if self.class1 else y
        out = y.permute(1, 2, 0).contiguous().numpy()
        self._cache = (window, out)
        return out

    def read_k(self, window: Window) -> np.ndarray:
        """``(h, w, K)`` float32 over ``window`` (clipped to ``[0, 1]`` with ``clip``)."""
        values = self.read(window)
        return np.clip(values, 0.0, 1.0).astype(np.float32, copy=False) if self.clip else values

    def constant(self, window: Window) -> np.ndarray | None:
        """The ``(K,)`` values when every channel is constant over ``window``, else ``None``."""
        raw = self.read(window)
        first = raw[:1, :1].reshape(-1)
        return first.astype(np.float32) if bool((raw == first).all()) else None

    def binary_uniform(self, window: Window, threshold: float = 0.5) -> bool:
        """Whether channel 0 lies on one side of ``threshold`` everywhere in ``window``."""
        fg = self.read(window)[..., 0] >= threshold
        return bool(fg.all() or not fg.any())

    def read_labels(self, window: Window) -> Any:
        """Not a label map: raises ``TypeError``."""
        raise TypeError("a MagNet stage holds probabilities, not a label map")

    @property
    def held_bytes(self) -> int:
        """RAM the stage keeps while it is read (R of its patches in memory, in-memory maps)."""
        source: Any = self.source
        held = 0
        if isinstance(source, FinalY):
            held += 0 if source._whole is None else source._whole.numel() * 4
            source = source.source
        if isinstance(source, StageOutput):
            held += source.bank.nbytes_memory
            source = source.yup
        if isinstance(source, UpsampledY):
            source = source.source
        if isinstance(source, MemoryY):
            held += source.y.numel() * 4
        return int(held)

    def close(self) -> None:
        """Close the stage and the previous stage's Y it reads (idempotent)."""
        self._cache = None
        self.source.close()
        if isinstance(self.source, StageOutput) and isinstance(self.source.yup, MemoryY):
            self.source.yup.close()
        self.previous.close()


class StageLevels:
    """MagNet's refinement stages as the engine's levels, and what they share between levels.

    Stage 1 (the segmenter on the stage-1 image, or the user's mask) runs in :meth:`stage_one`.
    Refinement stage ``s`` (2, 3 ...) is level ``s - 2`` of ``engine.levels.run_levels``:
    :meth:`level_input` runs its pass A on the previous stage's Y (stage 1's in memory, later ones
    read by window from the level file the engine wrote) and returns the :class:`StageSource` whose
    windows are its pass B; the level's refiner (:class:`StagePassThrough`) copies them into the
    next level file tile by tile, bit for bit. When the last stage is not the image size (absolute
    scales, or stage 1 alone) one more level resizes it to the image (:class:`FinalY`).

    Args:
        image: the image, read by window (only the patch regions each stage needs).
        segmenter: gives stage-1 Y and O.
        modules: refinement modules, one per checkpoint of the schedule (or one shared).
        schedule: the stages.
        plan: the memory plan.
        batch_size: patches per forward pass.
        tmp_dir: parent folder of the run's temporary files (built stage images, R on disk).
        progress: ``progress(stage, done, total)`` as :func:`refine_cli.refiners.magnet.run_magnet`.
        class1: the image-size level gives the class-1 probability alone when C = 2 and clips to
            ``[0, 1]`` (the engine's outputs); else all C channels as computed.
    """

    def __init__(self, image: PyramidImage, segmenter: Segmenter, modules: Sequence[RefinementMagNet],
                 schedule: Schedule, plan: TiledPlan, *, batch_size: int = 1, tmp_dir: str | None = None,
                 progress: StageProgress | None = None, class1: bool = True) -> None:
        check_pipeline(segmenter, modules, schedule)
        self.image_hw = (int(image.shape[0]), int(image.shape[1]))
        self.schedule, self.plan, self.modules = schedule, plan, list(modules)
        self.progress, self.class1 = progress, class1
        self.folder = tempfile.mkdtemp(prefix="refine-magnet-", dir=tmp_dir)
        self._finalizer = _Finalizer(self.folder)
        self.images = StageImages(image, segmenter, _stage_list(schedule), plan.read_limit, self.folder)
        device = next(self.modules[0].parameters()).device
        self.ctx = _RunContext(self.images, segmenter, schedule, plan, self.folder, batch_size, device)
        self.stats: list[StageStats] = []
        self.cuts: list[dict[str, Any]] = []
        self.y1: MemoryY | None = None
        self.current: StageSource | None = None
        self.level_bytes = 0

    @classmethod
    def create(cls, image: PyramidImage, segmenter: Segmenter, modules: Sequence[RefinementMagNet],
               schedule: Schedule, *, budget: int, batch_size: int = 1, tile: int | None = None,
               memory_pixels: int | None = None, read_limit: int | None = None, store_dtype: str = "float32",
               tmp_dir: str | None = None, progress: StageProgress | None = None,
               class1: bool = True) -> StageLevels:
        """Plan the run for ``budget`` bytes (see :meth:`TiledPlan.from_budget`) and set it up."""
        plan = TiledPlan.from_budget(budget, segmenter.num_classes, module_bytes(modules),
                                     input_hw=schedule.input_hw, batch_size=batch_size, tile=tile,
                                     store_dtype=store_dtype,
                                     memory_pixels=memory_pixels, read_limit=read_limit)
        return cls(image, segmenter, modules, schedule, plan, batch_size=batch_size, tmp_dir=tmp_dir,
                   progress=progress, class1=class1)

    @staticmethod
    def planned_held(schedule: Schedule, plan: TiledPlan, channels: int, image_hw: Size) -> list[int]:
        """RAM each level's stage keeps while the engine reads it (:meth:`held_bytes`), foreseen.

        Per refinement stage: R of its refined patches unless they go to disk (above
        ``plan.bank_bytes``), and the upsampled previous Y when the stage is processed in memory
        (else the first stage's reads stage 1 in memory); the image-size level after the stages
        holds the resized Y when it shrinks, and stage 1 when it is the only stage.
        """
        stage1 = 4 * channels * schedule.stages[0].hw[0] * schedule.stages[0].hw[1]
        held = []
        for i, p in enumerate(schedule.stages[1:]):
            boxes = patch_grid(p.hw, (p.crop[1], p.crop[0]))
            bank = min(p.n_patches or len(boxes), len(boxes)) * channels * boxes[0].area * 4
            area = p.hw[0] * p.hw[1]
            y = 4 * channels * area if area <= plan.memory_pixels else (stage1 if i == 0 else 0)
            held.append((bank if bank <= plan.bank_bytes else 0) + y)
        last = schedule.stages[-1].hw
        if len(schedule.stages) == 1 or last != image_hw:
            shrinks = image_hw[0] < last[0] or image_hw[1] < last[1]
            held.append((4 * channels * image_hw[0] * image_hw[1] if shrinks else 0)
                        + (stage1 if len(schedule.stages) == 1 else 0))
        return held

    def stage_one(self, coarse_probs: np.ndarray | None) -> None:
        """Stage-1 Y: the segmenter on the stage-1 image, or ``coarse_probs`` ``(h, w, C)`` float32."""
        try:
            with torch.inference_mode():
                y, s1 = _tiled_stage_one(self.ctx, coarse_probs, self.progress)
        except BaseException:
            self.close()
            raise
        self.y1 = MemoryY(y)
        self.stats = [s1]

    def shapes(self) -> list[Size]:
        """``(h, w)`` of every level (:meth:`level_shapes` of this run)."""
        return self.level_shapes(self.schedule, self.image_hw)

    @staticmethod
    def level_shapes(schedule: Schedule, image_hw: Size) -> list[Size]:
        """``(h, w)`` of every level: the refinement stages, then the image when they end elsewhere."""
        shapes = [p.hw for p in schedule.stages[1:]]
        if not shapes or shapes[-1] != image_hw:
            shapes.append(image_hw)
        return shapes

    def level_input(self, index: int, previous: Reader | None) -> StageSource:
        """Run level ``index``'s pass A and return its Y by window (see the class docstring).

        Args:
            index: the level (0: the first refinement stage).
            previous: the previous level's file (``None`` for level 0, which reads stage 1 in memory).
        """
        if previous is None:
            if index != 0 or self.y1 is None:
                raise RuntimeError("StageLevels.stage_one must run first; later levels need the previous one")
            prev: MemoryY | LevelY = self.y1
            self.y1 = None
        else:
            prev = LevelY(previous, self.plan.store_dtype)
            self.level_bytes += os.path.getsize(previous.path)
        stages = self.schedule.stages[1:]
        try:
            if index < len(stages):
                source: StageOutput | FinalY = self._refine(index, prev)
            else:
                source = FinalY(prev, self.image_hw)
        except BaseException:
            prev.close()
            raise
        if index >= len(stages) - 1:
            self.images.close()  # no stage reads the image any more
        final = index == len(self.shapes()) - 1
        class1 = final and self.class1 and source.channels == 2
        self.current = StageSource(source, prev, class1=class1, clip=final and self.class1)
        return self.current

    def _refine(self, index: int, prev: MemoryY | LevelY) -> StageOutput:
        """Pass A of refinement stage ``index + 2``: its patches, R, scores and the top-k cut."""
        stages = self.schedule.stages[1:]
        if self.progress is not None:
            self.progress(SCALES_STAGE, index, len(stages))
        stage = stages[index]
        module = self.modules[stage.refinement if len(self.modules) > 1 else 0]
        with torch.inference_mode():
            out, st = refinement_stage_tiled(self.ctx, prev, module, stage)
        self.stats.append(st)
        self.cuts.append(_cut_facts(st.stage, out.cut))
        if self.progress is not None:
            self.progress(SCALES_STAGE, index + 1, len(stages))
        where = "memory" if stage.hw[0] * stage.hw[1] <= self.plan.memory_pixels else "tiled"
        logger.info("MagNet stage %d %dx%d (%s): %d/%d patches, %d points in %.2fs", st.stage, *st.scale,
                    where, len(st.patches), st.patches_total, st.points, st.total)
        return out

    def held_bytes(self) -> int:
        """RAM the current level's stage keeps while the engine reads it."""
        return self.current.held_bytes if self.current is not None else 0

    def report(self) -> dict[str, Any]:
        """Plain-JSON facts, the same keys as :meth:`MagnetResult.report` plus ``tiled``."""
        schedule, plan = self.schedule, self.plan
        in_memory = [f"{p.scale[0]}x{p.scale[1]}" for p in schedule.stages[1:]
                     if p.hw[0] * p.hw[1] <= plan.memory_pixels]
        return {
            "preset": schedule.preset, "mode": "magnet-fast" if schedule.fast else "magnet",
            "input_size": list(schedule.input_size), "kernel": schedule.kernel, "replace": schedule.replace,
            "stages": [s.to_dict() for s in self.stats],
            "patches": sum(len(s.patches) for s in self.stats), "points": sum(s.points for s in self.stats),
            "tiled": {"tile": plan.tile, "store_dtype": plan.store_dtype, "memory_pixels": plan.memory_pixels,
                      "read_limit": plan.read_limit, "stage_images": self.images.describe(),
                      "store_bytes_written": self.level_bytes, "cuts": self.cuts,
                      "stages_in_memory": in_memory},
        }

    def close(self) -> None:
        """Delete the temporary files (idempotent; the engine closes each level's source itself)."""
        self.y1 = None
        self.current = None
        self.images.close()
        self._finalizer()


def module_bytes(modules: Sequence[torch.nn.Module]) -> int:
    """Bytes of the modules' weights (their state dicts)."""
    return int(sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values()))


def _stage_list(schedule: Schedule) -> list[tuple[Size, Size, int]]:
    """``(scale, crop, patches refined)`` of every stage, for the stage images."""
    stage_list = []
    for p in schedule.stages:
        total = len(patch_grid(p.hw, (p.crop[1], p.crop[0])))
        stage_list.append((p.scale, p.crop, min(p.n_patches or total, total)))
    return stage_list


def _tiled_stage_one(ctx: _RunContext, coarse_probs: np.ndarray | None,
                     progress: StageProgress | None) -> tuple[torch.Tensor, StageStats]:
    """Stage-1 Y ``(1, C, h, w)`` on the CPU: the segmenter on the first stage image, or the coarse mask."""
    schedule, segmenter = ctx.schedule, ctx.segmenter
    t0 = time.perf_counter()
    if coarse_probs is None:
        if progress is not None:
            progress(SEGMENTER_STAGE, 0, 0)
        first_image = ctx.images.whole(schedule.stages[0].scale)
        t_read = time.perf_counter() - t0
        y, s1 = first_stage(first_image, segmenter, schedule.stages[0], ctx.batch_size, ctx.device)
        s1.seconds["read"] = t_read
        if progress is not None:
            progress(SEGMENTER_STAGE, 1, 1)
        return y.cpu(), s1
    c = segmenter.num_classes
    probs = np.asarray(coarse_probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[2] != c:
        raise UsageError(f"coarse probabilities must be (h, w, {c}), got {probs.shape}")
    y = torch.from_numpy(np.ascontiguousarray(probs.transpose(2, 0, 1)))[None]
    return y, StageStats(1, (probs.shape[1], probs.shape[0]), 0, (), (), 0, 0, 0,
                         {"coarse": time.perf_counter() - t0})


def _cut_facts(stage: int, cut: TopKCut) -> dict[str, Any]:
    """The top-k cut of a stage for the report.

    Threshold (``None`` when all or none are taken), pixels above it, pixels at it and how many of
    those were taken (lowest flat indices).
    """
    finite = math.isfinite(cut.threshold)
    return {"stage": stage, "threshold": round(cut.threshold, 8) if finite else None, "above": cut.n_greater,
            "tied": cut.n_equal, "tied_taken": cut.n_tied_taken}


class _Finalizer:
    """Removes the run's temporary folder when called, or at the latest when garbage-collected."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._finalize = weakref.finalize(self, shutil.rmtree, folder, True)

    def __call__(self) -> None:
        """Remove the folder now (idempotent)."""
        self._finalize()


# --------------------------------------------------------------------------- the levels' refiners


class PassThrough(CoarseRefiner):
    """The image-size level's refiner: copies the final Y (read through :class:`StageSource`) to the outputs.

    Its skip rule is ``binary``: a tile whose channel 0 lies on one side of 1/2 is copied by the
    engine without reading the image, which for a pass-through gives the same values.

    Args:
        bytes_per_pixel: working bytes per pixel of rendering a window of the final Y.
        fixed: bytes the run holds while the engine runs (weights, R of the stage's patches, maps).
    """

    name = "magnet-fast"
    skip_rule = "binary"

    def __init__(self, bytes_per_pixel: int, fixed: int) -> None:
        self._bpp, self._fixed = int(bytes_per_pixel), int(fixed)

    def tile_memory(self, pixels: int) -> int:
        """Rendering the window (upsampling, score, R) plus the copy."""
        return (self._bpp + 8) * pixels

    def fixed_memory(self) -> int:
        """R of the stage's patches, in-memory maps and the weights."""
        return self._fixed


class StagePassThrough(PassThrough):
    """A refinement stage's level: copies the stage's Y, all C channels, into the level file bit for bit.

    Tiles lie side by side (no overlap, no halo), so nothing is blended: every pixel is written
    exactly as pass B computed it, and the next stage reads it back unchanged.
    """

    def plan_grid(self, shape: tuple[int, int], tile_size: int, overlap: int) -> GridPlan:
        """The engine's grid without overlap."""
        return plan_grid(shape, tile_size, 0, 0)
