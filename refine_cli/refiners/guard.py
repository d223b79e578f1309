"""The do-no-harm guard: a refiner may change the coarse mask only where a change is plausible.

A refined mask is compared with the user's coarse mask, window by window, and four
kinds of change are held back (the coarse value is kept there):

* **far changes**: pixels farther than ``band`` px from the coarse boundary (twice that
  around large objects), unless the coarse mask itself is unsure there (a soft value
  between ``unsure`` and ``1 - unsure``, as in an upsampled low-resolution mask). The band
  is the coarse mask's error scale: from its resolution or the width of its soft ramps, or
  ``--max-shift``.
* **detached changes**: connected regions of change that touch neither the coarse
  boundary nor an unsure coarse pixel: a hole punched into an object (lettering on a
  fuselage) or an island painted into the background (a tree crown next to a roof).
* **deleted components**: a connected component of the coarse foreground, or a hole of
  it, whose bounding box fits in ``component`` px and of which the refiner kept less
  than ``keep`` of the pixels: a nucleus wiped out, a gap between an arm and a body
  filled. It is restored whole.
* **unsupported changes** (with the image): a changed pixel whose colour clearly keeps to
  its old class, a change to a strand or gap a few px wide, or a change where the coarse
  boundary already sits on the image's edge (see :class:`GuardParams`). Detached regions and
  deleted components go through when most of their pixels clearly show the new class.
* **worse fits** (with the image, for full-resolution masks): the changes in a ``fit_cell`` px cell
  whose new boundary runs along weaker colour steps than the coarse boundary they replace: moving a
  boundary that already sits on the image's edge by a pixel or two (a cell eroded, a roof grown).

Everything is computed inside the window the engine reads (the tile grown by the
guard's halo). A component is judged whole only when it lies inside the window
without touching a side that cuts the image; the engine's halo (``component`` + the band) makes every
component that small fully visible to every tile that writes any of its pixels, so
decisions do not depend on where tiles are cut.

Arrays: ``refined`` and ``coarse`` are ``(h, w)`` float32 probabilities in ``[0, 1]``
(foreground ``>= 0.5``); the result has the same shape and dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

from refine_cli.refiners.base import FULL_RESOLUTION_SCALE, Refiner, TileInput, TileResult, binary_uncertainty
from refine_cli.tiling.grid import Window

FIT_SIGMA = 1.5
"""Gaussian smoothing of the colours whose steps the worse-fit rule compares, px."""

ANCHOR_PX = 1.5
"""A change touches the coarse boundary when it reaches a pixel this close to it, px."""


@dataclass(frozen=True)
class GuardParams:
    """How much the guard lets a refiner change.

    Attributes:
        band: changes farther than this from the coarse boundary are held back, px (> 0).
        band_large: the band around large coarse components (bounding box over ``component`` px,
            or reaching a cut of the window), at least ``band``; ``None``: twice ``band``.
        component: coarse components (and holes) whose bounding box fits in this many px are
            judged whole (deleted ones restored), px (>= 0; 0 turns the rule off).
        keep: a judged component is restored when the refiner kept less than this share of it.
        unsure: coarse values in ``(unsure, 1 - unsure)`` mark pixels the coarse mask is unsure
            of: changes there are allowed whatever their distance.
        evidence: ``pixel``: a changed pixel whose colour does not lean to its new class by more than
            noise does (see :func:`colour_level`: less than ``noise`` times the local spread, minus
            ``margin``, past halfway on the new class's side) is held back, and a detached region or a
            deleted component is let through when at least ``release`` of its pixels clearly show the
            new class (more than ``strong`` past halfway); ``none``: no image evidence.
        margin: how far on its old class's side a changed pixel's colour may lie where the colours
            do not spread, in levels.
        noise: a changed pixel must also lean to its new class by more than this many times the
            local spread of its class colours (noise and texture, see :func:`colour_level`), so
            that noise alone does not count as evidence (0: no such rule).
        strong: how far on the new class's side a pixel's colour must lie to count as clear.
        release: the share of clear pixels that lets a detached region or a deleted component through.
        aligned: where at least this share of the pixels 2-3 px from the coarse boundary look like
            their own class (the boundary already sits on the image's edge), changes farther than
            ``tight`` px from it need clear evidence.
        tight: px, see ``aligned``.
        thin: parts of either class at most this wide (strands, bars, gaps between them), px, change
            only with clear evidence (0: no such rule).
        fit: the changes in a cell are held back when the mean colour step across their new boundary
            is less than this times the mean step across the coarse boundary they replace (0: no
            such rule; see :func:`worse_fit`).
        fit_cell: cell side, px.
    """

    band: float
    band_large: float | None = None
    component: int = 96
    keep: float = 0.5
    unsure: float = 0.05
    evidence: str = "pixel"
    margin: float = 0.15
    noise: float = 1.0
    strong: float = 0.25
    release: float = 0.8
    aligned: float = 0.85
    tight: float = 0.0
    thin: float = 6.0
    fit: float = 1.3
    fit_cell: int = 32

    @property
    def wide(self) -> float:
        """The band around large components, px: ``band_large``, or twice ``band`` when it is ``None``."""
        return 2.0 * self.band if self.band_large is None else max(self.band, self.band_large)

    @property
    def halo(self) -> int:
        """Context each side of a tile the guard needs to decide independently of the cut, px."""
        # a pixel's nearest boundary within the wide band, and every small component within the
        # band of a pixel, must lie inside the window
        return int(np.ceil(max(self.wide, self.band + self.component, self.fit_cell))) + 4


@dataclass
class GuardStats:
    """What the guard held back, counted over tile cores (each image pixel once).

    Attributes:
        pixels_changed: pixels whose class the refiner changed.
        pixels_held: of those, pixels whose change was held back (the coarse class kept).
        far: held back because they lie beyond the band.
        detached: held back because their region of change does not touch the coarse boundary.
        unsupported: held back because the image does not support them (see ``GuardParams.evidence``).
        restored: held back because the refiner deleted (most of) a small coarse component.
        components_restored: coarse components and holes restored whole (counted in the tile
            holding their first pixel in row-major order).
        regions_detached: detached regions of change held back (counted the same way).
        misfit: held back because the new boundary fits the image's edges worse than the coarse one.
    """

    pixels_changed: int = 0
    pixels_held: int = 0
    far: int = 0
    detached: int = 0
    unsupported: int = 0
    restored: int = 0
    misfit: int = 0
    components_restored: int = 0
    regions_detached: int = 0

    def add(self, other: GuardStats) -> None:
        """Add another tile's counts (in place)."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_dict(self) -> dict[str, int]:
        """Plain dict for the report."""
        return {name: int(getattr(self, name)) for name in self.__dataclass_fields__}


@dataclass
class GuardResult:
    """The guarded window.

    Attributes:
        prob: ``(h, w)`` float32 in [0, 1]: the refined value where its change is allowed, else
            the coarse value.
        held: ``(h, w)`` bool, where a change was held back.
        stats: counts over the core (see :func:`guard_window`).
    """

    prob: np.ndarray
    held: np.ndarray
    stats: GuardStats = field(default_factory=GuardStats)


def boundary_distance(fg: np.ndarray) -> np.ndarray:
    """Distance of every pixel to the nearest pixel of the other class, px.

    Args:
        fg: ``(h, w)`` bool.

    Returns:
        ``(h, w)`` float32 >= 1 (``inf`` when the window holds one class only): 1 next to the
        boundary, on either side.
    """
    if fg.all() or not fg.any():
        return np.full(fg.shape, np.inf, np.float32)
    u8 = fg.astype(np.uint8)
    inside = cv2.distanceTransform(u8, cv2.DIST_L2, 5)
    outside = cv2.distanceTransform(1 - u8, cv2.DIST_L2, 5)
    return np.where(fg, inside, outside).astype(np.float32)


Cut = tuple[bool, bool, bool, bool]
"""Which sides of a window (top, bottom, left, right) cut through the image; the others are its edges."""

ALL_CUT: Cut = (True, True, True, True)


def _touching_border(labels: np.ndarray, n: int, cut: Cut) -> np.ndarray:
    """``(n,)`` bool: components (by label) that reach a side of the window that cuts the image.

    What lies beyond such a side is unknown; the image's own edges are not cuts.
    """
    out = np.zeros(n, bool)
    for side, edge in zip(cut, (labels[0], labels[-1], labels[:, 0], labels[:, -1]), strict=True):
        if side:
            out[edge] = True
    return out


def _first_in_core(labels: np.ndarray, n: int, core: tuple[slice, slice] | None) -> np.ndarray:
    """``(n,)`` bool: components whose first pixel (row-major) lies in ``core`` (all when ``None``)."""
    if core is None:
        return np.ones(n, bool)
    flat = labels.ravel()
    first = np.full(n, -1, np.int64)
    idx = np.flatnonzero(flat)
    if idx.size:
        lab = flat[idx]
        order = np.unique(lab, return_index=True)
        first[order[0]] = idx[order[1]]
    rows, cols = np.divmod(np.maximum(first, 0), labels.shape[1])
    r, c = core
    in_core: np.ndarray = (
        (first >= 0) & (rows >= r.start) & (rows < r.stop) & (cols >= c.start) & (cols < c.stop)
    )
    return in_core


def _restore_deleted(coarse_fg: np.ndarray, out_fg: np.ndarray, params: GuardParams, value: bool,
                     core: tuple[slice, slice] | None, cut: Cut,
                     strong: np.ndarray | None) -> tuple[np.ndarray | None, int]:
    """Mask of the small components of ``coarse_fg == value`` that ``out_fg`` mostly lost, and their count.

    Components whose loss the image clearly shows are left lost (see :attr:`GuardParams.release`);
    the count is of the components that start in the core.
    """
    comp = coarse_fg if value else ~coarse_fg
    n, labels, st, _ = cv2.connectedComponentsWithStats(comp.astype(np.uint8), connectivity=8)
    if n <= 1:
        return None, 0
    kept_px = out_fg if value else ~out_fg
    kept = np.bincount(labels.ravel(), weights=kept_px.ravel(), minlength=n)
    area = st[:, cv2.CC_STAT_AREA].astype(np.float64)
    small = (st[:, cv2.CC_STAT_WIDTH] <= params.component) & (st[:, cv2.CC_STAT_HEIGHT] <= params.component)
    lost = small & ~_touching_border(labels, n, cut) & (kept < params.keep * area)
    lost[0] = False
    if lost.any() and strong is not None:
        lost &= ~_clear(labels, n, comp & ~kept_px, strong, params.release)
    if not lost.any():
        return None, 0
    return lost[labels], int((lost & _first_in_core(labels, n, core)).sum())


def band_map(c_fg: np.ndarray, params: GuardParams, cut: Cut = ALL_CUT,
             components: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray | float:
    """The allowed distance from the coarse boundary per pixel, px.

    ``band_large`` for pixels of, or nearest to, a large coarse component, ``band`` elsewhere (a
    float when it is the same everywhere).

    Args:
        c_fg: ``(h, w)`` bool coarse foreground.
        params: the bands and the component size.
        cut: which sides of the window cut through the image.
        components: :func:`nearest_components` of ``c_fg`` when the caller has it already.
    """
    if params.wide <= params.band or not c_fg.any():
        return params.band
    comp, large = components or nearest_components(c_fg, params.component, cut)
    if not large.any():
        return params.band
    bands = np.where(large, params.wide, params.band).astype(np.float32)
    result: np.ndarray | float = bands[comp]
    return result


def nearest_components(c_fg: np.ndarray, size: int, cut: Cut) -> tuple[np.ndarray, np.ndarray]:
    """The coarse foreground component each pixel belongs to or lies nearest to, and which are large.

    Args:
        c_fg: ``(h, w)`` bool coarse foreground (not empty).
        size: components whose bounding box is wider or taller than this are large.
        cut: which sides of the window cut through the image (a component reaching one is large).

    Returns:
        ``(comp, large)``: ``(h, w)`` int32 labels ``1..n-1`` and ``(n,)`` bool (label 0 unused). When
        every component is large, which one a pixel is nearest to decides nothing (each gets the large
        band and none has its own colour), and ``comp`` is 1 everywhere, without the distance transform.
    """
    n, labels, st, _ = cv2.connectedComponentsWithStats(c_fg.astype(np.uint8), connectivity=8)
    large = (st[:, cv2.CC_STAT_WIDTH] > size) | (st[:, cv2.CC_STAT_HEIGHT] > size)
    large |= _touching_border(labels, n, cut)
    large[0] = False
    if n > 1 and bool(large[1:].all()):
        return np.ones(c_fg.shape, np.int32), large
    return nearest_labels(c_fg, labels), large


def nearest_labels(c_fg: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(h, w)`` int32: the component label of each foreground pixel, and of the nearest one elsewhere.

    Args:
        c_fg: ``(h, w)`` bool foreground (not empty).
        labels: ``(h, w)`` int32 its 8-connected component labels (0: background).
    """
    _, near = cv2.distanceTransformWithLabels((~c_fg).astype(np.uint8), cv2.DIST_L2, 5,
                                              labelType=cv2.DIST_LABEL_CCOMP)
    to_comp = np.zeros(int(near.max()) + 1, np.int32)
    to_comp[near[c_fg]] = labels[c_fg]
    return np.where(c_fg, labels, to_comp[near]).astype(np.int32)


def colour_level(image: np.ndarray, c_fg: np.ndarray, changed: np.ndarray, radius: int,
                 objects: tuple[np.ndarray, np.ndarray] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each pixel's colour lies between the local background and foreground colours.

    The local colour of each class is the mean Lab colour of the unchanged pixels of that class in
    a ``(2 radius + 1)`` box around the pixel; a pixel's level is its Lab colour projected on the
    line from the background's mean (0) to the foreground's (1).

    Args:
        image: ``(h, w, 3)`` uint8 RGB.
        c_fg: ``(h, w)`` bool coarse foreground.
        changed: ``(h, w)`` bool pixels whose class the refiner changed (left out of the means).
        radius: box radius, px.
        objects: ``(comp, small)``: the coarse foreground component of (or nearest to) each pixel,
            ``(h, w)`` int, and which components are small, ``(n,)`` bool: pixels of or near a small
            component take its own mean colour as the foreground's.

    Returns:
        ``(level, known, spread)``: ``(h, w)`` float32 level (unbounded; 0.5 is halfway), ``(h, w)``
        bool, False where a class has no unchanged pixel in the box (nothing to compare with), and
        ``(h, w)`` float32 >= 0, the standard deviation of the levels of the unchanged pixels about
        their class's level (0 or 1) in the box, pooled over both classes: how far noise and texture
        alone move a pixel's level.
    """
    planes, own = _lab_and_objects(image, c_fg, changed, objects)
    return _level_in_boxes(planes, c_fg, changed, radius, own)


_Own = tuple[np.ndarray, np.ndarray, list[np.ndarray]]
"""``(comp, use, means)``: each pixel's component, which components take their own colour, and their
mean colour per Lab channel (float64)."""

STRIP = 128
"""Rows per strip of :func:`colour_level_near` (each strip is cropped to where it changed)."""


def _lab_and_objects(image: np.ndarray, c_fg: np.ndarray, changed: np.ndarray,
                     objects: tuple[np.ndarray, np.ndarray] | None, region: Window | None = None
                     ) -> tuple[list[np.ndarray], _Own | None]:
    """The image's Lab planes over ``region``, float32 each, and the small components' own colours.

    Args:
        image: ``(h, w, 3)`` uint8 RGB of the whole window.
        c_fg: ``(h, w)`` bool coarse foreground.
        changed: ``(h, w)`` bool changed pixels.
        objects: ``(comp, small)`` as :func:`colour_level`, or ``None``.
        region: the part of the window to convert (``None``: all of it). The colour conversion is per
            pixel, so a region's planes equal the whole window's there. The small components' means read
            the stable pixels in ``region``: it must hold all of those of every small component.

    Returns:
        The Lab planes, ``region``'s shape, and ``(comp, use, means)`` (``comp`` over the whole window).
    """
    cs = (slice(None), slice(None)) if region is None else region.slices
    lab = cv2.cvtColor(image[cs].astype(np.float32) * np.float32(1 / 255), cv2.COLOR_RGB2Lab)
    planes = list(cv2.split(lab))
    if objects is None:
        return planes, None
    comp, small = objects
    stable = (c_fg & ~changed)[cs]
    idx = comp[cs][stable]
    cnt = np.bincount(idx, minlength=small.size).astype(np.float32)
    means = [np.bincount(idx, weights=p[stable], minlength=small.size) / np.maximum(cnt, 1) for p in planes]
    return planes, (comp, small & (cnt > 0), means)


def _level_in_boxes(planes: list[np.ndarray], c_fg: np.ndarray, changed: np.ndarray, radius: int,
                    own: _Own | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`colour_level` from the Lab planes and the small components' colours (any crop of them)."""
    # one plane per channel (strided channel reductions are slow); sums keep numpy's order, and the
    # small objects' float64 means promote the arithmetic as they always did: the values are unchanged
    k = (2 * radius + 1, 2 * radius + 1)
    unchanged = ~changed
    means = []
    for side in (c_fg & unchanged, ~c_fg & unchanged):
        w = side.astype(np.float32)
        n = _box_sum(w, k)
        den = np.maximum(n, 1e-6)
        means.append(([_box_sum(p * w, k) / den for p in planes], n > 0.5, n))
    (m_fg, has_fg, n_fg), (m_bg, has_bg, n_bg) = means
    if own is not None:  # small objects: their own colour, not the mix of their neighbours'
        comp, use_comp, own_means = own
        use = use_comp[comp]
        m_fg = [np.where(use, m[comp], f) for m, f in zip(own_means, m_fg, strict=True)]
        has_fg = has_fg | use
    axis = [f - b for f, b in zip(m_fg, m_bg, strict=True)]
    norm2 = np.maximum((axis[0] * axis[0] + axis[1] * axis[1]) + axis[2] * axis[2], 1e-6)
    dots = [(p - b) * a for p, b, a in zip(planes, m_bg, axis, strict=True)]
    level = ((dots[0] + dots[1]) + dots[2]) / norm2
    # spread: the box sum of (level - own class level)^2 over the unchanged pixels (class level: 1 or 0)
    d = (level - c_fg.astype(np.float32)) * unchanged.astype(np.float32)
    sq = _box_sum(d * d, k)
    spread = np.sqrt(np.maximum(sq, 0.0) / np.maximum(n_fg + n_bg, 1.0))  # box sums round below 0
    return level.astype(np.float32), has_fg & has_bg, spread


def colour_level_near(image: np.ndarray, c_fg: np.ndarray, changed: np.ndarray, radius: int,
                      objects: tuple[np.ndarray, np.ndarray] | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`colour_level` where the evidence rules read it: within ``radius`` px of a changed pixel.

    The window is cut into strips of :data:`STRIP` rows; each strip with changes is computed on a crop
    around them (the changes' rows and columns grown by ``radius`` for the output, and by ``radius + 1``
    more for the boxes the output reads), so a tile whose changes follow a boundary costs about the
    boundary's band, not the tile. Every box these values come from reads only pixels of its crop, so
    level and known equal :func:`colour_level`'s within ``radius`` px of a change and spread at the
    changes; elsewhere level is 0.5, known False and spread 0 or a partial sum.

    Args and returns: as :func:`colour_level`.
    """
    h, w = changed.shape
    level = np.full((h, w), 0.5, np.float32)
    known = np.zeros((h, w), bool)
    spread: np.ndarray | None = None
    strips = _change_strips(changed, radius)
    if strips:
        region = _covering(c_fg, changed, objects, [crop for _, _, crop in strips])
        planes, own = _lab_and_objects(image, c_fg, changed, objects, region)
        for top, out, crop in strips:
            cs = crop.slices
            own_crop = None if own is None else (own[0][cs], own[1], own[2])
            rel = crop.relative_to(region).slices
            lv, kn, sp = _level_in_boxes([p[rel] for p in planes], c_fg[cs], changed[cs], radius, own_crop)
            inner = out.relative_to(crop).slices
            level[out.slices], known[out.slices] = lv[inner], kn[inner]
            # the spread is exact only at this strip's own changes (its boxes read levels up to radius away)
            own_rows = _bounds(max(top, out.row), out.col, min(top + STRIP, out.row_end), out.col_end, (h, w))
            if spread is None:
                spread = np.zeros((h, w), sp.dtype)
            spread[own_rows.slices] = sp[own_rows.relative_to(crop).slices]
    return level, known, spread if spread is not None else np.zeros((h, w), np.float32)


def _change_strips(changed: np.ndarray, radius: int) -> list[tuple[int, Window, Window]]:
    """``(top, out, crop)`` per strip of :data:`STRIP` rows with changes (see :func:`colour_level_near`)."""
    h, w = changed.shape
    rows = np.flatnonzero(changed.any(axis=1))
    strips = []
    for top in range(int(rows[0]) // STRIP * STRIP, int(rows[-1]) + 1, STRIP) if rows.size else ():
        band = changed[top : top + STRIP]
        r_in, c_in = np.flatnonzero(band.any(axis=1)), np.flatnonzero(band.any(axis=0))
        if not r_in.size:
            continue
        out = _bounds(top + int(r_in[0]) - radius, int(c_in[0]) - radius,
                      top + int(r_in[-1]) + 1 + radius, int(c_in[-1]) + 1 + radius, (h, w))
        crop = _bounds(out.row - radius - 1, out.col - radius - 1, out.row_end + radius + 1,
                       out.col_end + radius + 1, (h, w))
        strips.append((top, out, crop))
    return strips


def _covering(c_fg: np.ndarray, changed: np.ndarray, objects: tuple[np.ndarray, np.ndarray] | None,
              crops: list[Window]) -> Window:
    """The smallest window holding ``crops`` and the stable pixels of every small component."""
    r0, c0 = min(c.row for c in crops), min(c.col for c in crops)
    r1, c1 = max(c.row_end for c in crops), max(c.col_end for c in crops)
    if objects is not None:
        comp, small = objects
        rr, cc = np.nonzero(c_fg & ~changed & small[comp])
        if rr.size:
            r0, r1 = min(r0, int(rr.min())), max(r1, int(rr.max()) + 1)
            c0, c1 = min(c0, int(cc.min())), max(c1, int(cc.max()) + 1)
    return _bounds(r0, c0, r1, c1, changed.shape)


def _bounds(r0: int, c0: int, r1: int, c1: int, shape: tuple[int, int]) -> Window:
    """The window of rows ``[r0, r1)`` and columns ``[c0, c1)``, clipped to ``shape``."""
    r0, c0 = max(0, r0), max(0, c0)
    return Window(r0, c0, min(shape[0], r1) - r0, min(shape[1], c1) - c0)


def _box_sum(a: np.ndarray, k: tuple[int, int]) -> np.ndarray:
    """Unnormalised box sum of a 2-D float array over a ``k`` window, zero outside."""
    out: np.ndarray = cv2.boxFilter(a, -1, k, normalize=False, borderType=cv2.BORDER_CONSTANT)
    return out


def guard_window(refined: np.ndarray, coarse: np.ndarray, params: GuardParams,
                 core: tuple[slice, slice] | None = None, image: np.ndarray | None = None,
                 cut: Cut = ALL_CUT, origin: tuple[int, int] = (0, 0)) -> GuardResult:
    """Hold back the changes of ``refined`` from ``coarse`` that the coarse mask and the image do not allow.

    Args:
        refined: ``(h, w)`` float32 in [0, 1], the refiner's probability.
        coarse: ``(h, w)`` float32 in [0, 1], the user's coarse probability on the same grid.
        params: the rules' sizes.
        core: the part of the window this tile writes (slices into it), where pixels are counted;
            ``None``: the whole window.
        image: ``(h, w, 3)`` uint8 RGB of the window, for the evidence rules (``None``: none).
        cut: which sides of the window (top, bottom, left, right) cut through the image: a
            component reaching one is not judged whole; one reaching the image's edge is.
        origin: ``(row, col)`` of the window in the image (the worse-fit rule's cells lie on its grid).

    Returns:
        The guarded probability, where changes were held back, and the counts.
    """
    c_fg = coarse >= 0.5
    r_fg = refined >= 0.5
    changed = c_fg != r_fg
    stats = GuardStats()
    cr = core or (slice(0, refined.shape[0]), slice(0, refined.shape[1]))
    stats.pixels_changed = int(changed[cr].sum())
    if not changed.any():
        return GuardResult(refined, np.zeros(refined.shape, bool), stats)
    dist = boundary_distance(c_fg)
    unsure = (coarse > params.unsure) & (coarse < 1.0 - params.unsure)
    components = nearest_components(c_fg, params.component, cut) if c_fg.any() else None
    far = changed & (dist > band_map(c_fg, params, cut, components)) & ~unsure
    supported = strong = None
    settled = np.zeros_like(changed)
    if image is not None and params.evidence != "none":
        supported, strong, settled = _evidence(image, c_fg, changed, far, dist, components, params)
    allowed = changed & ~far
    # Regions of change must reach the coarse boundary or the coarse mask's unsure pixels, unless
    # the image clearly shows the new class over most of them.
    detached, n_detached = _detached(allowed, dist, unsure, strong, params, core, cut)
    allowed &= ~detached
    unsupported = np.zeros_like(changed)
    if supported is not None:
        unsupported = allowed & (~supported | settled)
        allowed &= ~unsupported
    misfit = np.zeros_like(changed)
    if image is not None and params.evidence != "none" and params.fit > 0:
        misfit = worse_fit(image, c_fg, allowed, params.fit, params.fit_cell, origin)
        allowed &= ~misfit
    out_fg = np.where(allowed, r_fg, c_fg)
    restored = np.zeros_like(changed)
    n_restored = 0
    if params.component > 0:
        for value in (True, False):
            lost, count = _restore_deleted(c_fg, out_fg, params, value, core, cut, strong)
            if lost is not None:
                restored |= lost & (out_fg != c_fg)
                out_fg = np.where(lost, c_fg, out_fg)
                n_restored += count
    held = changed & (out_fg == c_fg)
    prob = np.where(held, coarse, refined).astype(np.float32, copy=False)
    stats.pixels_held = int(held[cr].sum())
    stats.far = int(far[cr].sum())
    stats.detached = int((detached & held)[cr].sum())
    stats.unsupported = int((unsupported & held)[cr].sum())
    stats.misfit = int((misfit & held)[cr].sum())
    stats.restored = int((restored & held & ~far & ~detached & ~unsupported & ~misfit)[cr].sum())
    stats.components_restored = n_restored
    stats.regions_detached = n_detached
    return GuardResult(prob, held, stats)


def _evidence(
    image: np.ndarray, c_fg: np.ndarray, changed: np.ndarray, far: np.ndarray, dist: np.ndarray,
    components: tuple[np.ndarray, np.ndarray] | None, params: GuardParams,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the image says about each change (the evidence rules).

    Args:
        image: ``(h, w, 3)`` uint8 RGB of the window.
        c_fg: ``(h, w)`` bool coarse foreground.
        changed: ``(h, w)`` bool pixels whose class the refiner changed.
        far: ``(h, w)`` bool changes beyond the allowed band.
        dist: ``(h, w)`` distance to the coarse boundary, px.
        components: :func:`nearest_components` of ``c_fg`` (``None`` when it is empty).
        params: the rules' sizes.

    Returns:
        ``(supported, strong, settled)``, ``(h, w)`` bool each: the colour does not contradict the
        new class (or cannot be judged); the colour clearly shows the new class; changes that only
        clear evidence may make, because the coarse boundary already sits on the image's edge or
        the coarse mask is thin there (strands, bars, gaps).
    """
    radius = max(4, int(round(params.band)))
    objects = None if components is None else (components[0], ~components[1])
    level, known, spread = colour_level_near(image, c_fg, changed, radius, objects)
    new_side = np.where(c_fg, 0.5 - level, level - 0.5)  # > 0: the colour leans to the new class
    supported = ~known | (new_side > params.noise * spread - params.margin)
    strong = known & (new_side > params.strong)
    settled = changed & ~far & ((~strong & _on_edge(dist, known, -new_side, radius, params))
                                | _thin(c_fg, dist, params.thin))
    return supported, strong, settled


def _detached(
    allowed: np.ndarray, dist: np.ndarray, unsure: np.ndarray, strong: np.ndarray | None, params: GuardParams,
    core: tuple[slice, slice] | None, cut: Cut,
) -> tuple[np.ndarray, int]:
    """Regions of allowed change that are detached from the coarse boundary.

    A region is detached when it reaches neither the coarse boundary nor the coarse mask's unsure
    pixels (nor a side of the window that cuts the image), unless the image clearly shows the new
    class over most of it (``strong``, :attr:`GuardParams.release`).

    Returns:
        ``(h, w)`` bool of those regions' pixels and how many regions start in the core.
    """
    detached = np.zeros_like(allowed)
    if not allowed.any():
        return detached, 0
    n, labels = cv2.connectedComponents(allowed.astype(np.uint8), connectivity=8)
    anchor = (dist <= ANCHOR_PX) | unsure
    free = ~(np.bincount(labels[anchor], minlength=n) > 0) & ~_touching_border(labels, n, cut)
    free[0] = False
    if free.any() and strong is not None:
        free &= ~_clear(labels, n, allowed, strong, params.release)
    if not free.any():
        return detached, 0
    return free[labels], int((free & _first_in_core(labels, n, core)).sum())


def worse_fit(image: np.ndarray, c_fg: np.ndarray, allowed: np.ndarray, fit: float, cell: int,
              origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """``(h, w)`` bool: the changes, cell by cell, whose new boundary fits the image's edges worse.

    A boundary is the set of 4-neighbour pixel pairs with one pixel in each class; a pair's step is
    the Euclidean distance of the two pixels' CIELAB colours (smoothed by a Gaussian of
    :data:`FIT_SIGMA` px, so that noise does not decide).
    Only pairs that touch a changed pixel differ between the coarse mask and the changed one, so the
    changes in each ``cell`` x ``cell`` px cell of the image (a pair belongs to its changed pixel's
    cell) remove part of the coarse boundary and make a new one. They are held back when the mean
    step across the new boundary is less than ``fit`` times the mean across the old one. Cells whose
    changes remove or make no boundary pair (a whole island) are left to the other rules. Cells lie
    on the image's grid, so a window with at least ``cell`` px of context decides its core as the
    whole image would.

    Args:
        image: ``(h, w, 3)`` uint8 RGB.
        c_fg: ``(h, w)`` bool coarse foreground.
        allowed: ``(h, w)`` bool changes the other rules let through.
        fit: the ratio a cell's new boundary must reach.
        cell: cell side, px.
        origin: ``(row, col)`` of the window's first pixel in the image.
    """
    h, w = c_fg.shape
    if not allowed.any():
        return np.zeros((h, w), bool)
    r0, c0 = origin
    rows = (np.arange(r0, r0 + h) // cell) - r0 // cell
    cols = (np.arange(c0, c0 + w) // cell) - c0 // cell
    n_cols = int(cols[-1]) + 1
    ids = rows[:, None] * n_cols + cols[None, :]
    size = int(ids[-1, -1]) + 1
    lab = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32), (0, 0), FIT_SIGMA)
    new_fg = c_fg ^ allowed
    old_sum, old_n = np.zeros(size), np.zeros(size)
    new_sum, new_n = np.zeros(size), np.zeros(size)
    for a, b in (((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
                 ((slice(None), slice(None, -1)), (slice(None), slice(1, None)))):
        step = np.sqrt(((lab[a] - lab[b]) ** 2).sum(axis=-1))
        was = c_fg[a] != c_fg[b]
        now = new_fg[a] != new_fg[b]
        cell_of = np.where(allowed[a], ids[a], ids[b])  # the changed pixel's cell
        for pairs, sums, counts in ((was & ~now, old_sum, old_n), (now & ~was, new_sum, new_n)):
            sums += np.bincount(cell_of[pairs], weights=step[pairs], minlength=size)
            counts += np.bincount(cell_of[pairs], minlength=size)
    worse = (old_n > 0) & (new_n > 0) & (new_sum * old_n < fit * old_sum * new_n)  # mean new < fit * mean old
    held: np.ndarray = worse[ids] & allowed
    return held


def _on_edge(dist: np.ndarray, known: np.ndarray, own_side: np.ndarray, radius: int,
             params: GuardParams) -> np.ndarray:
    """``(h, w)`` bool: pixels farther than ``params.tight`` px from a coarse boundary on the image's edge.

    The boundary sits on the image's edge in a pixel's ``(2 radius + 1)`` box when at least
    ``params.aligned`` of the pixels 2-3 px from it look like their own coarse class
    (``own_side > 0.2``).
    """
    near = known & (dist > 1.5) & (dist <= 3.5)
    ok = near & (own_side > 0.2)
    k = (2 * radius + 1, 2 * radius + 1)
    n_near = cv2.boxFilter(near.astype(np.float32), -1, k, normalize=False, borderType=cv2.BORDER_CONSTANT)
    n_ok = cv2.boxFilter(ok.astype(np.float32), -1, k, normalize=False, borderType=cv2.BORDER_CONSTANT)
    aligned = (n_near >= radius) & (n_ok >= params.aligned * n_near)
    return aligned & (dist > params.tight)


def _thin(c_fg: np.ndarray, dist: np.ndarray, width: float) -> np.ndarray:
    """``(h, w)`` bool: pixels of parts of either class at most ``width`` px wide (strands, bars, gaps)."""
    if width <= 0:
        return np.zeros(c_fg.shape, bool)
    d = np.minimum(dist, 1e6).astype(np.float32)
    r = int(np.ceil(width / 2.0)) + 2  # the largest distance within r px is a part's half-width
    local = cv2.dilate(d, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    return 2.0 * local <= width + 1.0


def _clear(labels: np.ndarray, n: int, where: np.ndarray, strong: np.ndarray, share: float) -> np.ndarray:
    """``(n,)`` bool: components in which at least ``share`` of the pixels in ``where`` are ``strong``."""
    sizes = np.bincount(labels[where], minlength=n)
    votes = np.bincount(labels[where & strong], minlength=n)
    return (sizes > 0) & (votes >= share * np.maximum(sizes, 1))


class GuardRefiner(Refiner):
    """The guard as the engine's last full-resolution level.

    Its coarse input has 2 or 3 channels over each window: channel 0 is the refiner's result (the
    previous level), channel 1 its uncertainty when ``inner_uncertainty``, the last one the user's
    coarse mask. It needs no image.

    Args:
        params: the rules' sizes.
        shape: ``(H, W)`` of the image, to tell the image's edges from tile cuts.
        inner_uncertainty: the refiner wrote its own uncertainty as channel 1.
    """

    name = "guard"
    provides_uncertainty = True
    custom_skip = True

    def __init__(self, params: GuardParams, shape: tuple[int, int], inner_uncertainty: bool = False) -> None:
        self.params = params
        self.shape = (int(shape[0]), int(shape[1]))
        self.needs_image = params.evidence != "none"
        self.inner_uncertainty = inner_uncertainty
        self.halo = params.halo
        self.preferred_tile = 1024
        self.stats = GuardStats()

    def out_channels(self, in_channels: int) -> int:
        """One channel: the guarded probability."""
        return 1

    def skip_test(self, coarse: np.ndarray) -> bool | None:
        """Skip a window where the refined and the coarse class agree everywhere."""
        return bool(((coarse[..., 0] >= 0.5) == (coarse[..., -1] >= 0.5)).all())

    def skip_output(self, coarse: np.ndarray) -> np.ndarray:
        """The refined value (it agrees with the coarse class everywhere)."""
        return coarse[..., :1]

    def refine(self, tile: TileInput) -> TileResult:
        """Guard one window; the uncertainty is 1 where a change was held back."""
        refined, coarse = tile.coarse[..., 0], tile.coarse[..., -1]
        core = tile.core.slices if tile.core is not None else None
        w = tile.window
        cut = (w.row > 0, w.row_end < self.shape[0], w.col > 0, w.col_end < self.shape[1])
        res = guard_window(refined, coarse, self.params, core, image=tile.image, cut=cut,
                           origin=(w.row, w.col))
        self.stats.add(res.stats)
        if self.inner_uncertainty:
            unc = np.where(res.held, 1.0, tile.coarse[..., 1]).astype(np.float32)
        else:
            unc = binary_uncertainty(res.prob)
            unc[res.held] = 1.0
        held = bool(res.held[core].any()) if core is not None else bool(res.held.any())
        return TileResult(res.prob[..., None], unc, held=held)

    def tile_memory(self, pixels: int) -> int:
        """Inputs, Lab colours and their local means, distances, labels and masks of one window.

        Measured with tracemalloc: 173 bytes per pixel at the peak, plus 15 of inputs.
        """
        return 190 * pixels

    def describe(self) -> dict[str, Any]:
        """Parameters and counts."""
        return {**asdict(self.params), **self.stats.to_dict()}


MIN_BAND = 16.0
"""Smallest default band, px: a full-resolution mask's boundary may be off by this much."""


def default_band(scale: float) -> float:
    """The band for a coarse mask whose boundary is blurred or blocky over ``scale`` px.

    ``scale`` is the mask's size ratio to the image, or the width of its soft ramps; the band is
    ``1.5 * scale + 2`` px, and at least :data:`MIN_BAND`.
    """
    return max(MIN_BAND, 1.5 * float(scale) + 2.0)


def ramp_width(mask: Any, rows: int = 256) -> float:
    """Mean width of a soft mask's ramps from background to foreground, px, in one streamed pass.

    The pixels strictly between ``0.05`` and ``0.95`` over the pixels on the foreground's
    boundary (an upsampled low-resolution mask saved at full size has ramps about as wide as its
    upsampling factor; a binary mask has none).

    Args:
        mask: a ``MaskSource`` (binary or soft) on the image grid.
        rows: rows read per block.
    """
    h, w = mask.shape
    soft = edge = 0
    kernel = np.ones((3, 3), np.uint8)
    for r0 in range(0, h, rows):
        block = mask.read(Window(r0, 0, min(rows, h - r0), w))
        soft += int(((block > 0.05) & (block < 0.95)).sum())
        fg = (block >= 0.5).astype(np.uint8)
        edge += int((fg - cv2.erode(fg, kernel, borderType=cv2.BORDER_REPLICATE)).sum())
    return soft / edge if edge else 0.0


def guard_params(config: Any, refiner: Refiner, mask: Any, shape: tuple[int, int]) -> GuardParams | None:
    """The guard of a run, or ``None`` when it does not run.

    The band is ``--max-shift`` when given (then also around large objects); otherwise
    :func:`default_band` of the mask's scale (its size ratio to the image, or for a soft mask of the
    image's size the width of its ramps, :func:`ramp_width`), and twice that around large objects.

    Args:
        config: the run's ``RefineConfig`` (``guard``, ``max_shift``).
        refiner: the method (its ``guarded`` flag).
        mask: the user's ``MaskSource``, or ``None`` (no mask: nothing to guard against).
        shape: ``(H, W)`` of the image.
    """
    if mask is None or mask.is_labels:
        return None
    soft_full = mask.same_resolution and mask.kind.kind == "soft"
    return band_guard(config, refiner, mask.native_shape, shape,
                      ramp=(lambda: ramp_width(mask)) if soft_full else None)


def band_guard(config: Any, refiner: Refiner, mask_shape: tuple[int, int], shape: tuple[int, int],
               ramp: Callable[[], float] | None = None) -> GuardParams | None:
    """The guard for a binary or soft mask of ``mask_shape`` on an image of ``shape``, or ``None``.

    Args:
        config: the run's ``RefineConfig`` (``guard``, ``max_shift``).
        refiner: the method (its ``guarded`` flag).
        mask_shape: ``(h, w)`` of the mask as stored.
        shape: ``(H, W)`` of the image.
        ramp: the width of a full-size soft mask's ramps, px (read only when ``--max-shift`` is not
            given); ``None`` for other masks.
    """
    if config.guard == "off" or not refiner.guarded:
        return None
    if config.max_shift is not None:
        return GuardParams(band=float(config.max_shift), band_large=float(config.max_shift))
    scale = max(shape[0] / mask_shape[0], shape[1] / mask_shape[1])
    if ramp is not None:
        scale = max(scale, ramp())
    # an upsampled or soft-ramped mask's boundary is not on the image's edges: only a full-resolution
    # mask's may be exact already, and only there does a move off the edges need holding back
    fit = GuardParams.fit if scale <= FULL_RESOLUTION_SCALE else 0.0
    return GuardParams(band=default_band(scale), fit=fit)


def guard_report(config: Any, refiner: Refiner, mask: Any, params: GuardParams | None,
                 facts: dict[str, Any] | None) -> dict[str, Any]:
    """The report's ``guard`` entry: its state, sizes and counts."""
    if params is not None:
        return {"state": "on", **(facts or {})}
    if config.guard == "off":
        state = "off (--guard off)"
    elif mask is None:
        state = "not run: no coarse mask to compare with"
    elif mask.is_labels:
        state = "not run: label maps are not guarded"
    else:
        state = f"not run: {refiner.name} does not change classes"
    return {"state": state}


def guard_notes(facts: dict[str, Any]) -> list[str]:
    """One line for the report's notes when the guard held changes back (else none)."""
    held = int(facts.get("pixels_held", 0))
    if facts.get("state") != "on" or not held:
        return []
    changed = max(1, int(facts.get("pixels_changed", 0)))
    return [f"guard: kept the coarse mask on {held} px of the {changed} the refiner changed "
            f"({100.0 * held / changed:.1f} %): {facts.get('far', 0)} beyond {facts.get('band', 0):g} px of "
            f"the coarse boundary, {facts.get('detached', 0)} in {facts.get('regions_detached', 0)} detached "
            f"regions, {facts.get('restored', 0)} in {facts.get('components_restored', 0)} objects restored "
            f"whole, {facts.get('unsupported', 0)} against the image's evidence, "
            f"{facts.get('misfit', 0)} where the new boundary fits the image's edges worse "
            "(--max-shift widens the band; --guard off gives the refiner's output as is)"]
