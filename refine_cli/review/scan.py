"""The most uncertain regions of a refined image, found in one streamed pass over its maps.

The image is cut into cells of ``s = crop // 2`` px; each cell is read once, as part of a band of
``s`` rows and a few thousand columns (windowed reads through the project's readers), and scored:
the sum of its uncertainty (``refine run --uncertainty``), or, without an uncertainty map, the count
of pixels whose class the refinement changed. A candidate region is a block of 2 x 2 cells
(``crop x crop`` px, smaller at the image's far edges), one per cell position, so candidates overlap
by half; only the best ``25 x top`` of them are kept while streaming. The regions are then picked
greedily, best first, skipping any that overlaps one already picked, after moving each inside the
image at its full ``crop x crop`` size. Every candidate overlaps at most 24 others, so the
greedy pick from the kept ones equals the greedy pick from all.

Memory: one band of cells (``s x 2048`` px per map), one row of cell scores and the kept candidates,
whatever the image's size.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np

from refine_cli.io.image import ImageSource
from refine_cli.io.masks import MaskSource
from refine_cli.tiling.grid import Window

BAND_COLUMNS = 2048
"""Columns read at once (rounded down to whole cells), px."""


@dataclass
class Region:
    """One region to look at.

    Attributes:
        window: ``crop x crop`` (clipped to the image) window in image px.
        score: mean uncertainty in ``[0, 1]`` over the candidate block (or the share of changed pixels).
    """

    window: Window
    score: float


@dataclass
class Scan:
    """What one streamed pass found.

    Attributes:
        regions: the best non-overlapping regions, best first.
        changed_fraction: share of the pixels whose class the refinement changed (``None`` without a
            coarse mask).
        mean_uncertainty: mean of the uncertainty map in ``[0, 1]`` (``None`` without one).
        by: what scored the regions: ``uncertainty`` or ``change``.
        thumbnail: ``(th, tw, 3)`` uint8 RGB area-downscaled image (``None`` when not asked).
    """

    regions: list[Region] = field(default_factory=list)
    changed_fraction: float | None = None
    mean_uncertainty: float | None = None
    by: str = "uncertainty"
    thumbnail: np.ndarray | None = None


@dataclass
class Maps:
    """The opened maps of one run, on the image's grid.

    Attributes:
        shape: ``(H, W)`` of the image.
        refined: the refined mask.
        coarse: the coarse mask, or ``None``.
        uncertainty: ``f(window) -> (h, w, 1)`` float32 in ``[0, 1]``, or ``None``.
        labels: the masks are label maps.
        threshold: probability at or above which a pixel is foreground.
    """

    shape: tuple[int, int]
    refined: MaskSource
    coarse: MaskSource | None
    uncertainty: Callable[[Window], np.ndarray] | None
    labels: bool
    threshold: float

    def classes(self, mask: MaskSource, win: Window) -> np.ndarray:
        """``(h, w)`` class of every pixel of ``win`` (bool foreground, or int labels)."""
        if self.labels:
            return mask.read_labels(win).labels()
        return mask.read(win) >= self.threshold


def _bands(shape: tuple[int, int], s: int) -> Iterator[tuple[int, Window]]:
    """``(cell row, window)`` of every band: ``s`` rows by up to :data:`BAND_COLUMNS` columns."""
    H, W = shape
    step = max(s, BAND_COLUMNS // s * s)
    for i, r0 in enumerate(range(0, H, s)):
        for c0 in range(0, W, step):
            yield i, Window(r0, c0, min(s, H - r0), min(step, W - c0))


def _cell_sums(values: np.ndarray, s: int) -> np.ndarray:
    """Sums of ``values`` ``(h, w)`` over cells ``s`` px wide (the last one may be narrower)."""
    cols = np.add.reduceat(values.sum(axis=0, dtype=np.float64), np.arange(0, values.shape[1], s))
    return np.asarray(cols, np.float64)


def scan_regions(maps: Maps, top: int, crop: int, thumbnail: tuple[int, int] | None = None,
                 image: ImageSource | None = None) -> Scan:
    """Stream over the maps once and find the ``top`` best non-overlapping regions (module docstring).

    Args:
        maps: the opened maps.
        top: how many regions (>= 1).
        crop: region side, px (>= 2).
        thumbnail: also area-downscale ``image`` to this ``(th, tw)`` while streaming, or ``None``.
        image: the image (only read for the thumbnail).

    Returns:
        The regions, the changed share, the mean uncertainty and the thumbnail.
    """
    H, W = maps.shape
    s = max(1, crop // 2)
    nc = -(-W // s)
    by = "uncertainty" if maps.uncertainty is not None else "change"
    kept: list[tuple[float, int, int]] = []  # min-heap of (score, -cell row, -cell col)
    prev: np.ndarray | None = None
    row = np.zeros(nc)
    changed = unc_sum = 0.0
    thumb = np.zeros((*thumbnail, 3), np.uint8) if thumbnail and image is not None else None
    last_i = -1
    for i, win in _bands(maps.shape, s):
        if i != last_i:
            if last_i >= 0:
                prev = _close_row(row, prev, last_i, kept, 25 * top)
            row, last_i = np.zeros(nc), i
        cells, n_changed, u_sum = _band_scores(maps, win, s, by)
        row[win.col // s: win.col // s + len(cells)] = cells
        changed, unc_sum = changed + n_changed, unc_sum + u_sum
        if thumb is not None and image is not None:
            _thumb_band(thumb, image, win, maps.shape)
    _close_row(row, prev, last_i, kept, 25 * top, last=prev is None)
    regions = _pick(kept, top, s, crop, maps.shape, by)
    return Scan(regions, changed / (H * W) if maps.coarse is not None else None,
                unc_sum / (H * W) if maps.uncertainty is not None else None, by, thumb)


def _band_scores(maps: Maps, win: Window, s: int, by: str) -> tuple[np.ndarray, float, float]:
    """Cell scores of one band, its changed pixel count and its uncertainty sum."""
    n_changed = 0.0
    diff = None
    if maps.coarse is not None:
        diff = maps.classes(maps.refined, win) != maps.classes(maps.coarse, win)
        n_changed = float(diff.sum())
    if maps.uncertainty is not None:
        unc = maps.uncertainty(win)[..., 0]
        return _cell_sums(unc, s), n_changed, float(unc.sum(dtype=np.float64))
    if diff is None:
        return np.zeros(-(-win.width // s)), n_changed, 0.0
    return _cell_sums(diff.astype(np.float32), s), n_changed, 0.0


def _close_row(row: np.ndarray, prev: np.ndarray | None, i: int, kept: list[tuple[float, int, int]],
               keep: int, last: bool = False) -> np.ndarray:
    """Score the candidates whose lower cells are in ``row`` (cell row ``i``); returns its pair sums."""
    pairs = row[:-1] + row[1:] if len(row) > 1 else row.copy()
    if prev is not None:
        scores, top_row = prev + pairs, i - 1
    elif last:  # a single cell row: candidates one cell tall
        scores, top_row = pairs, i
    else:
        return pairs
    for j in np.flatnonzero(scores > 0):
        item = (float(scores[j]), -top_row, -int(j))
        if len(kept) < keep:
            heapq.heappush(kept, item)
        elif item > kept[0]:
            heapq.heapreplace(kept, item)
    return pairs


def _pick(kept: list[tuple[float, int, int]], top: int, s: int, crop: int, shape: tuple[int, int],
          by: str) -> list[Region]:
    """The best non-overlapping regions, each moved inside the image at ``crop x crop`` px."""
    H, W = shape
    ch, cw = min(crop, H), min(crop, W)
    out: list[Region] = []
    for score, mi, mj in sorted(kept, reverse=True):
        r0, c0 = -mi * s, -mj * s
        block = Window(r0, c0, min(2 * s, H - r0), min(2 * s, W - c0))
        win = Window(min(r0, H - ch), min(c0, W - cw), ch, cw)
        if any(win.intersection(r.window) is not None for r in out):
            continue
        out.append(Region(win, score / block.area))
        if len(out) == top:
            break
    return out


def _thumb_band(thumb: np.ndarray, image: ImageSource, win: Window, shape: tuple[int, int]) -> None:
    """Area-downscale one band of the image into its place in the thumbnail (in place)."""
    (H, W), (th, tw) = shape, thumb.shape[:2]
    r0, r1 = win.row * th // H, win.row_end * th // H
    c0, c1 = win.col * tw // W, win.col_end * tw // W
    if r1 > r0 and c1 > c0:
        thumb[r0:r1, c0:c1] = cv2.resize(image.read(win), (c1 - c0, r1 - r0), interpolation=cv2.INTER_AREA)
