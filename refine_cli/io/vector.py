"""Polygons of a mask, made by row band in bounded memory.

:class:`BandPolygonizer` receives a class map (``0`` = background) row block by row block, top to bottom.
It cuts the rows into bands of :attr:`BandPolygonizer.band_rows`; in each band it labels the
4-connected regions of equal class (``scipy.ndimage.label``) and traces them with GDAL's polygonizer
(``rasterio.features.shapes``, 4-connectivity), in pixel coordinates, so every vertex lies on a pixel
corner. A region that does not reach the band's last row is finished: it is written at once. A region
that does is held, with the pieces of the same object from earlier bands, and joined to the regions of
the next band that continue it (same class, vertically adjacent pixels at the seam; a union-find over
the seam's pixel pairs). A finished object is the union of its pieces (GEOS, exact on the integer pixel
grid): holes are kept, objects cut by seams come out whole and without slivers, and the polygons are
those of ``rasterio.features.shapes`` on the whole image. Memory is the band plus the held objects'
outlines: it does not grow with the image height (an object as tall as the image is held whole).

Per polygon it also accumulates the pixel count and the sums of the mean probability and uncertainty
(when given), so the means of an object cut by seams are those of all its pixels.

Coordinates: ``x = a*col + b*row + c``, ``y = d*col + e*row + f`` of the pixel corner ``(col, row)``
through the :class:`~refine_cli.io.readers.Georef` transform; without georeferencing, pixel coordinates
(``x`` = column, ``y`` = row, growing down, as GDAL does for ungeoreferenced rasters) and no CRS.
Exterior rings are counter-clockwise, holes clockwise (in the output coordinates).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refine_cli.errors import UsageError

FOUR = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
BAND_PIXELS = 1 << 22
"""Pixels per band (about 4 MPx: 36 MB of class, probability and uncertainty rows)."""
BAND_BYTES_PER_PIXEL = 48
"""Peak bytes per band pixel: the buffered rows (9), region ids (4), the sums (16), the polygonizer's mask
and GDAL's work (about 19)."""


def default_band_rows(width: int) -> int:
    """Rows per band: about :data:`BAND_PIXELS` pixels, 16 to 4096 rows."""
    return int(np.clip(BAND_PIXELS // max(width, 1), 16, 4096))


def band_memory(width: int) -> int:
    """Bytes a :class:`BandPolygonizer` of this width takes at its peak, besides the objects it holds."""
    return default_band_rows(width) * width * BAND_BYTES_PER_PIXEL


@dataclass(frozen=True)
class Measure:
    """A length or area in map units, or in pixels (``px``)."""

    value: float
    pixels: bool


def parse_measure(text: str | float | None, flag: str) -> Measure | None:
    """``"2.5"`` (map units) or ``"2.5px"`` (pixels) → :class:`Measure`; ``None`` stays ``None``.

    Raises:
        UsageError: not a non-negative number with an optional ``px``.
    """
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(px)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UsageError(f"{flag} {text!r}: give a number in map units, or pixels with px (e.g. 2px)")
    return Measure(float(m.group(1)), bool(m.group(2)))


@dataclass(frozen=True)
class PolygonOptions:
    """What to do with finished polygons.

    Attributes:
        transform: affine ``(a, b, c, d, e, f)`` from pixel corners to output coordinates (identity:
            pixel coordinates).
        simplify: topology-preserving Douglas-Peucker tolerance (per polygon; holes kept), or ``None``.
        min_area: drop polygons smaller than this, or ``None``.
    """

    transform: tuple[float, float, float, float, float, float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    simplify: Measure | None = None
    min_area: Measure | None = None

    @property
    def pixel_area(self) -> float:
        """Area of one pixel in output units squared."""
        a, b, _, d, e, _ = self.transform
        return abs(a * e - b * d)

    def pixel_size(self) -> float:
        """Side of a pixel in output units (the geometric mean of its two sides)."""
        return float(np.sqrt(self.pixel_area))


@dataclass
class _Object:
    """An object held across a seam: its pieces (pixel coordinates) and its pixel sums."""

    cls: int
    pieces: list[Any] = field(default_factory=list)
    pixels: int = 0
    prob: float = 0.0
    unc: float = 0.0

    def absorb(self, other: _Object) -> None:
        self.pieces += other.pieces
        self.pixels += other.pixels
        self.prob += other.prob
        self.unc += other.unc


Emit = Callable[[np.ndarray, dict[str, np.ndarray]], None]
"""``emit(geoms, attrs)``: ``(n,)`` shapely polygons and the ``(n,)`` attribute columns."""


def _components(cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """4-connected regions of equal non-zero class.

    Args:
        cls: ``(h, w)`` integer class map, 0 = background.

    Returns:
        ``(h, w)`` int32 region ids (0 = background, 1..n) and the ``(n + 1,)`` class of each id.
    """
    from scipy import ndimage

    comp = np.zeros(cls.shape, np.int32)
    classes = [np.zeros(1, np.int64)]
    n = 0
    # each class is labelled inside its bounding box only: cheap for instance-like maps of many ids
    for value, box in enumerate(ndimage.find_objects(cls), start=1):
        if box is None:
            continue
        lab, k = ndimage.label(cls[box] == value, structure=FOUR, output=np.int32)
        inside = lab > 0
        comp[box][inside] = lab[inside] + n
        classes.append(np.full(k, value, np.int64))
        n += k
    return comp, np.concatenate(classes)


def _trace(comp: np.ndarray, row0: int, n: int) -> list[Any]:
    """The polygon of every region of ``comp`` (pixel coordinates, rows offset by ``row0``); index = id."""
    import shapely
    from rasterio.features import shapes
    from rasterio.transform import Affine

    pieces: list[Any] = [None] * (n + 1)
    if n == 0:
        return pieces
    for geom, value in shapes(comp, mask=comp > 0, connectivity=4, transform=Affine(1, 0, 0, 0, 1, row0)):
        rings = geom["coordinates"]
        pieces[int(value)] = shapely.Polygon(rings[0], rings[1:])
    return pieces


class BandPolygonizer:
    """Streams a class map into polygons, band by band (see the module docstring).

    Args:
        shape: ``(H, W)`` of the map.
        emit: receives finished polygons in output coordinates with their attributes ``class``
            (int32), ``pixels`` (int64) and, with ``stats``, ``prob_mean`` and ``unc_mean`` (float32).
        options: transform, simplification and minimum area.
        stats: probabilities and uncertainties come with the rows.
        band_rows: rows per band (default: about :data:`BAND_PIXELS` pixels, 16 to 4096 rows).
    """

    def __init__(self, shape: tuple[int, int], emit: Emit, options: PolygonOptions | None = None, *,
                 stats: bool = False, band_rows: int | None = None) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.emit = emit
        self.options = options or PolygonOptions()
        self.stats = stats
        self.band_rows = band_rows or default_band_rows(self.shape[1])
        self.next_row = 0
        self.count = 0
        self._rows: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = []
        self._buffered = 0
        self._band0 = 0
        self._held: dict[int, _Object] = {}
        self._last_ids: np.ndarray | None = None
        """``(W,)`` key of the held object at each pixel of the previous band's last row (-1: none)."""
        self._last_cls: np.ndarray | None = None
        self._next_key = 0

    def add(self, row0: int, cls: np.ndarray, prob: np.ndarray | None = None,
            unc: np.ndarray | None = None) -> None:
        """Rows ``[row0, row0 + n)``.

        Args:
            row0: first row; rows arrive in order.
            cls: ``(n, W)`` uint8/uint16 class map, 0 = background.
            prob: ``(n, W)`` float32 probability of the pixel's class in ``[0, 1]`` (with ``stats``).
            unc: ``(n, W)`` float32 uncertainty in ``[0, 1]`` (with ``stats``).
        """
        if row0 != self.next_row:
            raise ValueError(f"rows must arrive in order: expected row {self.next_row}, got {row0}")
        if cls.shape[1:] != (self.shape[1],):
            raise ValueError(f"rows of shape {cls.shape} do not fit width {self.shape[1]}")
        self.next_row += cls.shape[0]
        start = 0
        while start < cls.shape[0]:
            take = min(cls.shape[0] - start, self.band_rows - self._buffered)
            sl = slice(start, start + take)
            self._rows.append((cls[sl].copy(), None if prob is None else np.array(prob[sl], np.float32),
                               None if unc is None else np.array(unc[sl], np.float32)))
            self._buffered += take
            start += take
            if self._buffered == self.band_rows:
                self._band()

    def finish(self) -> None:
        """Polygonize the last rows and emit every object still held."""
        if self.next_row != self.shape[0]:
            raise ValueError(f"only {self.next_row} of {self.shape[0]} rows were given")
        if self._buffered:
            self._band()
        self._finalize(list(self._held.values()))
        self._held.clear()

    def _band(self) -> None:
        """Polygonize the buffered band; emit what is finished, hold what touches its lower seam."""
        cls = np.concatenate([r[0] for r in self._rows])
        row0, h = self._band0, cls.shape[0]
        comp, cls_of = _components(cls)
        n = len(cls_of) - 1
        pixels = np.bincount(comp.ravel(), minlength=n + 1)
        sums: list[np.ndarray] = [np.zeros(n + 1), np.zeros(n + 1)]
        if self.stats:
            for i in (1, 2):
                vals = np.concatenate([r[i] for r in self._rows if r[i] is not None])
                sums[i - 1] = np.bincount(comp.ravel(), weights=vals.ravel(), minlength=n + 1)
        self._rows, self._buffered, self._band0 = [], 0, row0 + h
        pieces = _trace(comp, row0, n)
        bottom = comp[-1] if row0 + h < self.shape[0] else np.zeros(0, np.int32)
        held_ids = np.unique(bottom[bottom > 0])
        seam = self._seam_pairs(comp[0], cls[0])
        linked = np.zeros(n + 1, bool)
        linked[seam[:, 1]] = True
        linked[held_ids] = True

        def obj(i: int) -> _Object:
            return _Object(int(cls_of[i]), [pieces[i]], int(pixels[i]), float(sums[0][i]), float(sums[1][i]))

        free = np.flatnonzero(~linked[1:]) + 1
        self._emit_direct(free, pieces, cls_of, pixels, sums)
        keys = self._join(seam, held_ids, obj)
        lut = np.full(n + 1, -1, np.int64)
        for i, key in keys.items():
            lut[i] = key
        self._last_ids, self._last_cls = lut[bottom], cls[-1].copy()

    def _seam_pairs(self, top_ids: np.ndarray, top_cls: np.ndarray) -> np.ndarray:
        """``(k, 2)`` unique pairs (held key, new region id) that touch across the seam."""
        if self._last_ids is None or self._last_cls is None or not len(self._last_ids):
            return np.zeros((0, 2), np.int64)
        m = (self._last_ids >= 0) & (top_ids > 0) & (self._last_cls == top_cls)
        pairs = np.stack([self._last_ids[m], top_ids[m].astype(np.int64)], axis=1)
        return np.unique(pairs, axis=0) if len(pairs) else pairs

    def _join(self, seam: np.ndarray, held_ids: np.ndarray, obj: Callable[[int], _Object]) -> dict[int, int]:
        """Merge held objects with the regions that continue them; emit the objects that end here.

        Returns:
            New region id → key of the held object it belongs to, for the regions on the lower seam.
        """
        parent: dict[tuple[int, int], tuple[int, int]] = {}

        def find(x: tuple[int, int]) -> tuple[int, int]:
            parent.setdefault(x, x)
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for key in self._held:
            find((0, key))
        for key, i in seam.tolist():
            parent[find((0, key))] = find((1, i))
        for i in held_ids.tolist():
            find((1, i))
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for node in list(parent):
            groups.setdefault(find(node), []).append(node)
        held_now: dict[int, _Object] = {}
        on_seam = set(held_ids.tolist())
        keys: dict[int, int] = {}
        done: list[_Object] = []
        for members in groups.values():
            merged: _Object | None = None
            for side, ident in members:
                part = self._held[ident] if side == 0 else obj(ident)
                if merged is None:
                    merged = part
                else:
                    merged.absorb(part)
            assert merged is not None
            continues = [ident for side, ident in members if side == 1 and ident in on_seam]
            if not continues:
                done.append(merged)
                continue
            key, self._next_key = self._next_key, self._next_key + 1
            held_now[key] = merged
            keys.update((i, key) for i in continues)
        self._held = held_now
        self._finalize(done)
        return keys

    def _emit_direct(self, ids: np.ndarray, pieces: list[Any], cls_of: np.ndarray, pixels: np.ndarray,
                     sums: list[np.ndarray]) -> None:
        """Emit regions that lie inside one band (no merge needed)."""
        if not len(ids):
            return
        geoms = np.empty(len(ids), object)
        geoms[:] = [pieces[i] for i in ids.tolist()]
        self._write(geoms, cls_of[ids], pixels[ids], sums[0][ids], sums[1][ids])

    def _finalize(self, objects: list[_Object]) -> None:
        """Emit held objects: the union of their pieces (exact on the pixel grid, no collinear points)."""
        import shapely

        if not objects:
            return
        geoms = np.empty(len(objects), object)
        geoms[:] = [o.pieces[0] if len(o.pieces) == 1 else
                    shapely.simplify(shapely.union_all(o.pieces), 0) for o in objects]
        self._write(geoms, np.array([o.cls for o in objects]), np.array([o.pixels for o in objects]),
                    np.array([o.prob for o in objects]), np.array([o.unc for o in objects]))

    def _write(self, geoms: np.ndarray, cls: np.ndarray, pixels: np.ndarray, psum: np.ndarray,
               usum: np.ndarray) -> None:
        """Filter by area, transform, simplify, orient and hand finished polygons to ``emit``."""
        import shapely

        opt = self.options
        if opt.min_area is not None:
            area = pixels * (1.0 if opt.min_area.pixels else opt.pixel_area)
            keep = area >= opt.min_area.value
            geoms, cls, pixels, psum, usum = geoms[keep], cls[keep], pixels[keep], psum[keep], usum[keep]
        if not len(geoms):
            return
        if opt.simplify is not None and opt.simplify.pixels:
            geoms = shapely.simplify(geoms, opt.simplify.value, preserve_topology=True)
        if opt.transform != (1.0, 0.0, 0.0, 0.0, 1.0, 0.0):
            a, b, c, d, e, f = opt.transform
            matrix = np.array([[a, d], [b, e]])
            geoms = shapely.transform(geoms, lambda xy: xy @ matrix + np.array([c, f]))
        if opt.simplify is not None and not opt.simplify.pixels:
            geoms = shapely.simplify(geoms, opt.simplify.value, preserve_topology=True)
        geoms = shapely.orient_polygons(geoms)
        attrs: dict[str, np.ndarray] = {"class": cls.astype(np.int32), "pixels": pixels.astype(np.int64)}
        if self.stats:
            attrs["prob_mean"] = (psum / np.maximum(pixels, 1)).astype(np.float32)
            attrs["unc_mean"] = (usum / np.maximum(pixels, 1)).astype(np.float32)
        self.count += len(geoms)
        self.emit(geoms, attrs)
