"""Large synthetic scenes with exact ground truth, rendered one window at a time.

Three families, each a different domain for the refiners:

* ``aerial``: a remote-sensing view from above. Foreground: hundreds of roofs
  (rotated rectangles, L-shapes, polygons, 8-60 px) with a cast shadow along one
  sun direction per scene. Background: a photo-textured ground, roads, water and
  tree crowns; crowns over a roof hide it (the hidden part is background).
* ``cells``: fluorescence microscopy. Foreground: nuclei (irregular ellipses
  5-40 px, alone or in touching clusters, 2x to 15x the background level).
  Background: a dim glow, out-of-focus haze and specks; PSF blur on the signal,
  Poisson-like noise; grey or tinted with one colour.
* ``thin``: wires, branches, fences and hair-like strands around blobs, textured
  with one photo on a background of another.

Window exactness: every object is placed in one cell of a fixed grid (cell size
``C``, margin ``M`` >= the reach of any object beyond its cell), drawn from
``np.random.default_rng([seed, family_id, cy, cx])``, and rasterised in its own
absolute bounding box (supersampled, cv2 with sub-pixel shift bits). A window
is rendered from the cells within ``M`` of it, objects painted in a fixed global
order (layer, then cell in row-major order). Fields that cover everything
(textures, value noise, pixel noise, roads, water) are elementwise functions of
absolute pixel coordinates. So ``render(w)`` equals the crop of ``render(full)``
bit for bit, and a 100 MPx scene can be written tile by tile in bounded memory.

Conventions: images ``(h, w, 3)`` uint8 RGB; ground truth and detector masks
``(h, w)`` float32 in ``[0, 1]``, foreground where ``>= 0.5``. Points are
``(x, y)`` in pixels, pixel ``(r, c)`` covering ``[c, c + 1) x [r, r + 1)``.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import cv2
import numpy as np

from refine_cli.errors import UsageError
from refine_cli.tiling.grid import Window, blocks


class PhotoLevels(Protocol):
    """A photo and its successive 2x reductions."""

    def level(self, k: int) -> np.ndarray:
        """Level ``k`` (0 = the photo), ``(h, w, 3)`` uint8 RGB."""
        ...


class PhotoSource(Protocol):
    """The photos a scene draws its textures from (:class:`refine_cli.train.data.PhotoBank` is one)."""

    def __len__(self) -> int:
        """Number of photos."""
        ...

    def pyramid(self, i: int) -> PhotoLevels:
        """The pyramid of photo ``i``."""
        ...

FAMILIES = ("aerial", "cells", "thin")
"""Scene families :class:`SceneGenerator` can render."""

SS = 4
"""Sub-pixels per pixel side when objects are rasterised (soft edges in steps of 1/16)."""

_SCENE_TAG = 1 << 33  # rng keys [seed, fid, tag + k, ...] that no real cell row reaches
_ROAD_TAG = 1 << 34
_COUNT_TAG = 1 << 35

Box = tuple[int, int, int, int]
"""Absolute pixel box ``(r0, c0, r1, c1)``, ends exclusive."""


@dataclass
class SceneWindow:
    """One rendered window of a scene.

    Attributes:
        image: ``(h, w, 3)`` uint8 RGB.
        gt: ``(h, w)`` float32 in ``[0, 1]``, exact foreground coverage (soft only at anti-aliased edges).
        detector: ``(h, w)`` float32 in ``[0, 1]``, a coarse mask like a cheap instance detector's
            (per-object shape errors, some objects missed, some false positives on distractors).
        layers: debug layers, filled only by ``render(..., layers=True)``; ``(h, w)`` float32 each.
            ``aerial``: visible coverage in ``[0, 1]`` of ``water``, ``road``, ``roof`` (= gt) and
            ``tree``. ``cells``: added signal of ``haze`` and ``speck`` (image units, >= 0).
            ``thin``: none.
    """

    image: np.ndarray
    gt: np.ndarray
    detector: np.ndarray
    layers: dict[str, np.ndarray] = field(default_factory=dict)


# ------------------------------------------------------------- coordinate functions


def _u32(a: Any) -> np.ndarray:
    return (np.asarray(a, dtype=np.int64) & 0xFFFFFFFF).astype(np.uint32)


def _mix(h: np.ndarray) -> np.ndarray:
    """A 32-bit integer finaliser (xor-shift-multiply), elementwise on uint32."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x7FEB352D)
    h = h ^ (h >> np.uint32(15))
    h = h * np.uint32(0x846CA68B)
    result: np.ndarray = h ^ (h >> np.uint32(16))
    return result


def _hash2(rows: np.ndarray, cols: np.ndarray, key: int) -> np.ndarray:
    """uint32 hash of integer coordinates: ``(n,)`` rows x ``(m,)`` cols -> ``(n, m)``."""
    hr = _mix(_u32(rows) * np.uint32(0x9E3779B1) + _u32(key))
    hc = _u32(cols) * np.uint32(0x85EBCA77)
    return _mix(hr[:, None] ^ hc[None, :])


def _gauss_noise(r0: int, c0: int, h: int, w: int, key: int) -> np.ndarray:
    """Approximately N(0, 1) noise at absolute pixels: ``(h, w)`` float32 (sum of 4 hashed bytes)."""
    x = _hash2(np.arange(r0, r0 + h), np.arange(c0, c0 + w), key)
    m = np.uint32(255)
    s = (x & m) + ((x >> np.uint32(8)) & m) + ((x >> np.uint32(16)) & m) + (x >> np.uint32(24))
    result: np.ndarray = (s.astype(np.float32) - np.float32(510.0)) * np.float32(1.0 / 147.8)
    return result


def _axis(start: int, n: int, period: float) -> tuple[np.ndarray, np.ndarray]:
    u = (np.arange(start, start + n, dtype=np.float64) + 0.5) / period
    i = np.floor(u).astype(np.int64)
    t = (u - i).astype(np.float32)
    return i, t * t * (np.float32(3.0) - np.float32(2.0) * t)


def value_noise(r0: int, c0: int, h: int, w: int, period: float, key: int) -> np.ndarray:
    """Smooth value noise sampled at the pixel centres of an absolute window.

    Args:
        r0: window top row, px (any integer).
        c0: window left column, px (any integer).
        h: window height, px.
        w: window width, px.
        period: lattice spacing, px (> 0).
        key: noise seed.

    Returns:
        ``(h, w)`` float32 in ``[0, 1)``, a function of absolute coordinates only.
    """
    iy, ty = _axis(r0, h, period)
    ix, tx = _axis(c0, w, period)
    ly = np.arange(iy[0], iy[-1] + 2)
    lx = np.arange(ix[0], ix[-1] + 2)
    lat = (_hash2(ly, lx, key) >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)
    jx = ix - lx[0]
    left = lat[:, jx]
    along = left + (lat[:, jx + 1] - left) * tx[None, :]  # (lattice rows, w)
    jy = iy - ly[0]
    top = along[jy]
    result: np.ndarray = top + (along[jy + 1] - top) * ty[:, None]
    return result


def _hash_int(a: int, b: int, key: int) -> int:
    """:func:`_hash2` for one pair of Python ints (same value)."""

    def mix(h: int) -> int:
        h ^= h >> 16
        h = (h * 0x7FEB352D) & 0xFFFFFFFF
        h ^= h >> 15
        h = (h * 0x846CA68B) & 0xFFFFFFFF
        return h ^ (h >> 16)

    hr = mix(((a & 0xFFFFFFFF) * 0x9E3779B1 + (key & 0xFFFFFFFF)) & 0xFFFFFFFF)
    return mix(hr ^ (((b & 0xFFFFFFFF) * 0x85EBCA77) & 0xFFFFFFFF))


def value_noise_at(x: float, y: float, period: float, key: int) -> float:
    """:func:`value_noise` at one point ``(x, y)`` (px, continuous; pixel centres give the same field)."""
    fx, fy = x / period, y / period
    ix, iy = math.floor(fx), math.floor(fy)
    tx, ty = fx - ix, fy - iy
    tx, ty = tx * tx * (3 - 2 * tx), ty * ty * (3 - 2 * ty)

    def lat(a: int, b: int) -> float:
        return (_hash_int(a, b, key) >> 8) * 2.0**-24

    top = lat(iy, ix) + (lat(iy, ix + 1) - lat(iy, ix)) * tx
    bot = lat(iy + 1, ix) + (lat(iy + 1, ix + 1) - lat(iy + 1, ix)) * tx
    return top + (bot - top) * ty


def _lum(rgb: np.ndarray) -> np.ndarray:
    """``(h, w, 3)`` float32 -> ``(h, w)`` float32 luma (elementwise, no BLAS)."""
    return np.float32(0.299) * rgb[..., 0] + np.float32(0.587) * rgb[..., 1] + np.float32(0.114) * rgb[..., 2]


def _pick(rng: np.random.Generator, weights: Sequence[float]) -> int:
    """Index drawn with probability proportional to ``weights`` (one uniform draw; faster than ``choice``)."""
    u = rng.random() * sum(weights)
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w
        if u < acc:
            return i
    return len(weights) - 1


def _runs(start: int, count: int, size: int) -> list[tuple[int, int, int]]:
    """Mirrored tiling of ``[0, size)`` along ``start .. start + count - 1`` as runs ``(dst, src, length)``.

    ``src >= 0`` runs forwards from ``src``; ``src < 0`` runs backwards from ``-src - 1``.
    """
    out, i, end = [], start, start + count
    while i < end:
        m = i % (2 * size)
        if m < size:
            length = min(size - m, end - i)
            out.append((i - start, m, length))
        else:
            first = 2 * size - 1 - m
            length = min(first + 1, end - i)
            out.append((i - start, -first - 1, length))
        i += length
    return out


def _run_slice(src: int, length: int) -> slice:
    if src >= 0:
        return slice(src, src + length)
    first = -src - 1
    return slice(first, first - length if first - length >= 0 else None, -1)


class _Texture:
    """An RGB texture at every integer pixel: an image tiled by mirroring, shifted, maybe transposed.

    Attributes:
        mean_lum: mean luma of the image, in ``(0, 255]`` (for normalising).
    """

    def __init__(self, img: np.ndarray, oy: int, ox: int, transpose: bool) -> None:
        self.img, self.oy, self.ox, self.t = img, oy, ox, transpose
        ph, pw = img.shape[:2]
        self.nr, self.nc = (pw, ph) if transpose else (ph, pw)
        self.mean_lum = float(max(16.0, _lum(img[::4, ::4].astype(np.float32)).mean()))
        self._luma: np.ndarray | None = None

    def patch(self, r0: int, c0: int, h: int, w: int) -> np.ndarray:
        """``(h, w, 3)`` float32 in ``[0, 255]`` at absolute rows ``r0..`` and columns ``c0..``."""
        return self._gather(self.img, r0, c0, h, w)

    def luma(self, r0: int, c0: int, h: int, w: int) -> np.ndarray:
        """``(h, w)`` float32 luma divided by :attr:`mean_lum` (mean about 1), like :meth:`patch`."""
        if self._luma is None:
            self._luma = _lum(self.img.astype(np.float32)) * np.float32(1.0 / self.mean_lum)
        return self._gather(self._luma, r0, c0, h, w)

    def _gather(self, img: np.ndarray, r0: int, c0: int, h: int, w: int) -> np.ndarray:
        out = np.empty((h, w, *img.shape[2:]), np.float32)
        rows = _runs(r0 + self.oy, h, self.nr)
        cols = _runs(c0 + self.ox, w, self.nc)
        for dr, sr, lr in rows:
            for dc, sc, lc in cols:
                if self.t:
                    block = img[_run_slice(sc, lc), _run_slice(sr, lr)].swapaxes(0, 1)
                else:
                    block = img[_run_slice(sr, lr), _run_slice(sc, lc)]
                out[dr : dr + lr, dc : dc + lc] = block
        return out


def _noise_image(
    key: int, c1: Sequence[float], c2: Sequence[float], period: float, side: int = 512
) -> np.ndarray:
    """Procedural stand-in for a photo: fractal value noise between two colours plus grain.

    Returns:
        ``(side, side, 3)`` uint8 RGB.
    """
    lum = (
        np.float32(0.5) * value_noise(0, 0, side, side, period, key)
        + np.float32(0.3) * value_noise(0, 0, side, side, period / 2.7, key + 1)
        + np.float32(0.2) * value_noise(0, 0, side, side, period / 7.3, key + 2)
    )
    hue = value_noise(0, 0, side, side, 3.1 * period, key + 3)[..., None]
    grain = (_hash2(np.arange(side), np.arange(side), key + 4) >> np.uint32(24)).astype(np.float32)
    lo, hi = np.asarray(c1, np.float32), np.asarray(c2, np.float32)
    shade = np.float32(0.5) + np.float32(0.9) * lum + grain * np.float32(0.1 / 255)
    result: np.ndarray = np.clip(np.rint((lo + (hi - lo) * hue) * shade[..., None]), 0, 255).astype(np.uint8)
    return result


def _texture(
    photos: PhotoSource | None,
    rng: np.random.Generator,
    levels: Sequence[int],
    fallback: tuple[Sequence[float], Sequence[float], float],
    avoid: int | None = None,
) -> tuple[_Texture, int | None]:
    """A photo texture at a random pyramid level, offset and orientation; procedural without photos."""
    if photos is None or len(photos) == 0:
        c1, c2, period = fallback
        img, i = _noise_image(int(rng.integers(1, 2**31)), c1, c2, period), None
    else:
        n = len(photos)
        i = int(rng.integers(n))
        if avoid is not None and n > 1 and i == avoid:
            i = (i + 1 + int(rng.integers(n - 1))) % n
        img = photos.pyramid(i).level(int(levels[int(rng.integers(len(levels)))]))
    oy, ox = int(rng.integers(0, 2 * img.shape[0])), int(rng.integers(0, 2 * img.shape[1]))
    return _Texture(img, oy, ox, bool(rng.random() < 0.5)), i


# ------------------------------------------------------------------- rasterising


def _box(xy: np.ndarray, pad: float) -> Box:
    """Integer box around points ``(n, 2)`` (x, y) grown by ``pad`` px."""
    x0, y0 = xy.min(axis=0).tolist()
    x1, y1 = xy.max(axis=0).tolist()
    return (math.floor(y0 - pad), math.floor(x0 - pad), math.ceil(y1 + pad) + 1, math.ceil(x1 + pad) + 1)


def _union(a: Box, b: Box) -> Box:
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


class _Canvas:
    """A binary canvas at ``ss`` sub-pixels per pixel over an absolute box; drawn with cv2 (4 shift bits).

    Inside is stored as ``ss**2`` so that an exact INTER_AREA reduction counts covered sub-pixels.
    """

    def __init__(self, box: Box, ss: int = SS) -> None:
        self.r0, self.c0 = box[0], box[1]
        self.h, self.w, self.ss = box[2] - box[0], box[3] - box[1], ss
        self.on = ss * ss
        self.a = np.zeros((self.h * ss, self.w * ss), np.uint8)

    def _fix(self, xy: np.ndarray) -> np.ndarray:
        k = 16.0 * self.ss
        return np.round((np.asarray(xy) - (self.c0, self.r0)) * k - 8.0).astype(np.int32)

    def poly(self, xy: np.ndarray, on: bool = True) -> None:
        cv2.fillPoly(self.a, [self._fix(xy)], self.on if on else 0, cv2.LINE_8, 4)

    def line(self, xy: np.ndarray, width: float, on: bool = True) -> None:
        t = max(1, int(round(width * self.ss)))
        cv2.polylines(self.a, [self._fix(xy)], False, self.on if on else 0, t, cv2.LINE_8, 4)

    def alpha(self) -> np.ndarray:
        """``(h, w)`` float32 coverage in ``[0, 1]`` (multiples of ``1 / ss**2``)."""
        cnt = cv2.resize(self.a, (self.w, self.h), interpolation=cv2.INTER_AREA)
        return cnt.astype(np.float32) * np.float32(1.0 / self.on)


def _span(box: Box, win: Window) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """``(window slices, box slices)`` of the overlap of a box and a window, or None."""
    r0, c0 = max(box[0], win.row), max(box[1], win.col)
    r1, c1 = min(box[2], win.row_end), min(box[3], win.col_end)
    if r1 <= r0 or c1 <= c0:
        return None
    return (
        (slice(r0 - win.row, r1 - win.row), slice(c0 - win.col, c1 - win.col)),
        (slice(r0 - box[0], r1 - box[0]), slice(c0 - box[1], c1 - box[1])),
    )


def _coords(box: Box, cx: float, cy: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre offsets from ``(cx, cy)``: ``(h, 1)`` and ``(1, w)`` float32."""
    yy = (np.arange(box[0], box[2], dtype=np.float64) + 0.5 - cy).astype(np.float32)[:, None]
    xx = (np.arange(box[1], box[3], dtype=np.float64) + 0.5 - cx).astype(np.float32)[None, :]
    return yy, xx


def _rot(xy: np.ndarray, angle: float) -> np.ndarray:
    """Points ``(n, 2)`` (x, y) rotated by ``angle`` (elementwise maths, no BLAS: same bits every time)."""
    c, s = math.cos(angle), math.sin(angle)
    out = np.empty_like(xy, dtype=np.float64)
    out[:, 0] = xy[:, 0] * c - xy[:, 1] * s
    out[:, 1] = xy[:, 0] * s + xy[:, 1] * c
    return out


_HARMONICS = np.array([2.0, 3.0, 5.0])[:, None]


_CIRCLES: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _circle(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(unit (n, 2), cos(k t) (3, n), sin(k t) (3, n))`` for ``k = 2, 3, 5`` at ``n`` equal angles."""
    if n not in _CIRCLES:
        t = np.arange(n) * (2 * np.pi / n)
        kt = _HARMONICS * t
        _CIRCLES[n] = (np.stack([np.cos(t), np.sin(t)], axis=1), np.cos(kt), np.sin(kt))
    return _CIRCLES[n]


def _radial(
    rng: np.random.Generator,
    cx: float,
    cy: float,
    a: float,
    b: float,
    angle: float,
    wobble: float,
    n: int = 24,
) -> np.ndarray:
    """An ellipse with low-frequency radial wobble, ``(n, 2)`` (x, y) vertices."""
    unit, ck, sk = _circle(n)
    amp, phase = rng.uniform(0, wobble, 3), rng.uniform(0, 2 * np.pi, 3)
    ac, as_ = amp * np.cos(phase), amp * np.sin(phase)
    r = np.ones(n)
    for k in range(3):  # sum of a_k cos(k t + phi_k), elementwise
        r += ac[k] * ck[k] - as_[k] * sk[k]
    return _rot(unit * r[:, None] * (a, b), angle) + (cx, cy)


def _seg_dist(px: np.ndarray, py: np.ndarray, segs: np.ndarray) -> np.ndarray:
    """Distance from points ``(n,)`` to segments ``(k, >=4)`` [ax, ay, bx, by, ...]: ``(n, k)`` float64."""
    ax, ay, bx, by = (segs[None, :, i] for i in range(4))
    dx, dy = bx - ax, by - ay
    qx, qy = px[:, None] - ax, py[:, None] - ay
    t = np.clip((qx * dx + qy * dy) / np.maximum(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
    result: np.ndarray = np.hypot(qx - t * dx, qy - t * dy)
    return result


# ---------------------------------------------------------------- detector errors


@dataclass
class _Det:
    """A detector primitive: filled polygons and polylines ``(xy, width)`` blurred by ``sigma`` px."""

    box: Box
    polys: list[np.ndarray]
    lines: list[tuple[np.ndarray, float]]
    sigma: float

    def mask(self) -> np.ndarray:
        cv = _Canvas(self.box, ss=2)
        for p in self.polys:
            cv.poly(p)
        for xy, wd in self.lines:
            cv.line(xy, wd)
        a = cv.alpha()
        if self.sigma > 0:
            a = cv2.GaussianBlur(a, (0, 0), sigmaX=self.sigma, borderType=cv2.BORDER_CONSTANT)
        return a


def _det(polys: list[np.ndarray], lines: list[tuple[np.ndarray, float]], sigma: float) -> _Det:
    pts = np.concatenate([*polys, *(xy for xy, _ in lines)])
    width = max([w for _, w in lines], default=0.0)
    return _Det(_box(pts, width / 2 + 3 * sigma + 2), polys, lines, sigma)


def _rough_shape(
    rng: np.random.Generator,
    xy: np.ndarray,
    shift: float = 0.15,
    scale: tuple[float, float] = (0.85, 1.2),
    p_box: float = 0.5,
) -> np.ndarray:
    """An ellipse or (with probability ``p_box``) a rotated box with the second moments of polygon ``xy``.

    It is shifted by up to ``shift`` x sqrt(area) (``shift * U**2``, mean a third of it) in a
    random direction and scaled by a factor from a triangular law on ``scale`` peaking at 1
    (with +-5 % anisotropy). Returns ``(n, 2)`` (x, y) vertices.
    """
    m = cv2.moments(xy.astype(np.float32))
    area = m["m00"]
    if area <= 1e-6:
        cx, cy = xy.mean(axis=0)
        mu20 = mu02 = 1.0
        mu11 = 0.0
        area = 1.0
    else:
        cx, cy = m["m10"] / area, m["m01"] / area
        mu20, mu02, mu11 = m["mu20"] / area, m["mu02"] / area, m["mu11"] / area
    theta = 0.5 * math.atan2(2 * mu11, mu20 - mu02)
    half, diff = (mu20 + mu02) / 2, math.hypot((mu20 - mu02) / 2, mu11)
    l1, l2 = max(half + diff, 0.05), max(half - diff, 0.05)
    s = rng.triangular(scale[0], min(max(1.0, scale[0]), scale[1]), scale[1])
    s1, s2 = s * rng.uniform(0.95, 1.05), s * rng.uniform(0.95, 1.05)
    ang = rng.uniform(0, 2 * np.pi)
    d = shift * rng.random() ** 2 * math.sqrt(area)
    cx, cy = cx + d * math.cos(ang), cy + d * math.sin(ang)
    if rng.random() >= p_box:
        local = _circle(24)[0] * (2 * math.sqrt(l1) * s1, 2 * math.sqrt(l2) * s2)
    else:
        a, b = math.sqrt(3 * l1) * s1, math.sqrt(3 * l2) * s2
        local = np.array([[-a, -b], [a, -b], [a, b], [-a, b]], np.float64)
    result: np.ndarray = _rot(local, theta + rng.normal(0, 0.08)) + (cx, cy)
    return result


def _rough_det(rng: np.random.Generator, xy: np.ndarray, p_box: float = 0.5) -> _Det:
    """A :func:`_rough_shape` of ``xy`` with a 1-2 px blurred edge."""
    return _det([_rough_shape(rng, xy, p_box=p_box)], [], float(rng.uniform(0.5, 1.0)))


# --------------------------------------------------------------------- objects


@dataclass
class _Obj:
    """One object to paint: a family-specific ``kind``, a paint ``layer``, its box and parameters."""

    kind: str
    layer: int
    box: Box
    p: dict[str, Any]


@dataclass
class _Plan:
    """The content of one grid cell: objects, detector primitives, foreground objects centred in the scene."""

    objs: list[_Obj]
    dets: list[_Det]
    n_fg: int


class _Family:
    """Scene-level parameters and per-cell planning of one family (subclasses draw and render)."""

    cell = 128
    margin = 96

    def __init__(self, gen: SceneGenerator, rng: np.random.Generator) -> None:
        self.gen = gen
        self.density = gen.density

    def plan(self, cy: int, cx: int, rng: np.random.Generator) -> _Plan:
        raise NotImplementedError

    def render(self, win: Window, objs: list[_Obj], dets: list[_Det], layers: bool) -> SceneWindow:
        raise NotImplementedError

    def inside(self, x: float, y: float) -> bool:
        """Whether the point ``(x, y)`` lies in the scene."""
        h, w = self.gen.shape
        return 0 <= x < w and 0 <= y < h

    def keep(self, cy: int, cx: int, box: Box) -> bool:
        """Whether ``box`` lies within the margin of cell ``(cy, cx)`` (others are dropped: exactness)."""
        c, m = self.cell, self.margin
        return (
            box[0] >= cy * c - m
            and box[1] >= cx * c - m
            and box[2] <= (cy + 1) * c + m
            and box[3] <= (cx + 1) * c + m
        )


def _detector(win: Window, dets: list[_Det]) -> np.ndarray:
    out = np.zeros(win.shape, np.float32)
    for d in dets:
        sp = _span(d.box, win)
        if sp is None:
            continue
        dst, src = sp
        np.maximum(out[dst], d.mask()[src], out=out[dst])
    return np.clip(out, 0.0, 1.0)


def _tiles(mask: np.ndarray, tile: int = 64) -> list[tuple[slice, slice]]:
    """Slices of the ``tile x tile`` blocks of a ``(h, w)`` array that hold a nonzero value."""
    return [win.slices for win in blocks((mask.shape[0], mask.shape[1]), tile) if mask[win.slices].any()]


def _to_u8(canvas: np.ndarray) -> np.ndarray:
    result: np.ndarray = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return result


class _Cover:
    """Visible coverage of named classes under 'over' painting (debug layers)."""

    def __init__(self, shape: tuple[int, int], names: Sequence[str], on: bool) -> None:
        self.on = on
        self.v = {n: np.zeros(shape, np.float32) for n in names} if on else {}

    def paint(self, name: str, dst: tuple[slice, slice], a: np.ndarray) -> None:
        if not self.on:
            return
        for n, arr in self.v.items():
            if n == name:
                arr[dst] += (np.float32(1.0) - arr[dst]) * a
            else:
                arr[dst] *= np.float32(1.0) - a


# ------------------------------------------------------------------------ aerial

_ROOF_TONES = np.array(
    [
        (160, 82, 62),
        (122, 58, 46),
        (126, 126, 131),
        (72, 74, 80),
        (196, 190, 180),
        (222, 221, 214),
        (100, 120, 110),
        (92, 106, 130),
        (122, 96, 72),
    ],
    np.float32,
)
_TREE_TONES = np.array([(40, 70, 36), (54, 84, 40), (30, 54, 34), (68, 90, 46), (100, 86, 44)], np.float32)
_GROUND_TINTS = np.array(
    [(104, 116, 76), (132, 122, 92), (90, 102, 70), (150, 136, 106), (118, 112, 96)], np.float32
)


@dataclass
class _AerialCell:
    """What the planning of one aerial grid cell shares.

    Attributes:
        cy, cx: the cell's grid row and column.
        y0, x0: its top-left pixel.
        segs: road segments near it (``_Aerial.roads_near``).
        u: urbanity in ``[0, 1]``.
        wet: whether water may reach it.
    """

    cy: int
    cx: int
    y0: int
    x0: int
    segs: np.ndarray
    u: float
    wet: bool


class _Aerial(_Family):
    """Roofs with shadows (foreground) among roads, water and trees (background)."""

    cell = 128
    margin = 96
    road_cell = 1024
    road_reach = 1536

    def __init__(self, gen: SceneGenerator, rng: np.random.Generator) -> None:
        super().__init__(gen, rng)
        photos = gen.photos
        self.theta = float(rng.uniform(0, np.pi / 2))
        phi = float(rng.uniform(0, 2 * np.pi))
        self.sun = np.array([math.cos(phi), math.sin(phi)])  # direction shadows fall in (x, y)
        self.shadow_len = float(rng.uniform(0.6, 1.5))
        self.shadow_dark = float(rng.uniform(0.35, 0.6))
        self.water_t = 9.0 if rng.random() < 0.3 else float(rng.uniform(0.66, 0.78))
        self.water_p = float(rng.uniform(250, 600))
        self.water_rgb = np.array(
            [rng.uniform(25, 60), rng.uniform(55, 90), rng.uniform(75, 120)], np.float32
        )
        self.urban_p = float(rng.uniform(4, 10))
        self.road_rate = float(rng.uniform(0.6, 1.2))
        self.road_grey = float(rng.uniform(85, 140))
        self.road_rgb = np.array([1.0, 0.99, 0.96], np.float32) * np.float32(self.road_grey)
        self.keys = [int(k) for k in rng.integers(1, 2**31, 8)]
        t1, t2 = rng.choice(len(_GROUND_TINTS), 2, replace=False)
        self.tint1 = _GROUND_TINTS[t1] * np.float32(rng.uniform(0.85, 1.1))
        self.tint2 = _GROUND_TINTS[t2] * np.float32(rng.uniform(0.85, 1.1))
        self.photo_mix = np.float32(rng.uniform(0.15, 0.45))
        self.roof_w = rng.dirichlet(np.full(len(_ROOF_TONES), 0.6)).tolist()
        self.tree_w = rng.dirichlet(np.full(len(_TREE_TONES), 0.8)).tolist()
        earth = ((110, 112, 80), (150, 140, 110), 160.0)
        self.tex_ground, gi = _texture(photos, gen._tex_rng, (0,), earth)
        self.tex_roof, _ = _texture(
            photos, gen._tex_rng, (1, 2), ((110, 105, 100), (170, 165, 160), 9.0), avoid=gi
        )
        self.tex_tree, _ = _texture(photos, gen._tex_rng, (1, 2), ((40, 70, 36), (90, 120, 60), 4.0))
        self.tex_road, _ = _texture(photos, gen._tex_rng, (1, 2), ((100, 100, 100), (140, 140, 135), 12.0))
        self._roads: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    # -- global fields

    def urban(self, cy: int, cx: int) -> float:
        v = value_noise_at(cx + 0.5, cy + 0.5, self.urban_p, self.keys[0])
        return min(max((v - 0.2) / 0.6, 0.0), 1.0)

    def water_at(self, x: float, y: float) -> float:
        p, k = self.water_p, self.keys[1]
        return 0.65 * value_noise_at(x, y, p, k) + 0.35 * value_noise_at(x, y, p / 2.7, k + 1)

    def water_max(self, y0: float, x0: float) -> float:
        """An upper bound of :meth:`water_at` over one grid cell (lattice maxima)."""
        best = 0.0
        for period, wgt, key in (
            (self.water_p, 0.65, self.keys[1]),
            (self.water_p / 2.7, 0.35, self.keys[1] + 1),
        ):
            iy0, ix0 = math.floor(y0 / period), math.floor(x0 / period)
            iy1, ix1 = math.floor((y0 + self.cell) / period) + 1, math.floor((x0 + self.cell) / period) + 1
            best += wgt * max(
                (_hash_int(a, b, key) >> 8) * 2.0**-24
                for a in range(iy0, iy1 + 1)
                for b in range(ix0, ix1 + 1)
            )
        return best

    def water(self, win: Window) -> np.ndarray:
        p, k = self.water_p, self.keys[1]
        args = (win.row, win.col, win.height, win.width)
        w = np.float32(0.65) * value_noise(*args, p, k) + np.float32(0.35) * value_noise(
            *args, p / 2.7, k + 1
        )
        return np.clip((w - np.float32(self.water_t)) * np.float32(p / 2.0) + np.float32(0.5), 0, 1)

    def road_plan(self, sy: int, sx: int) -> np.ndarray:
        """Road segments of one road cell: ``(k, 6)`` float64 [ax, ay, bx, by, half width, road id]."""
        key = (sy, sx)
        with self._lock:
            if key in self._roads:
                self._roads.move_to_end(key)
                return self._roads[key]
        g = self.gen
        rng = np.random.default_rng([g.seed, g.fid, _ROAD_TAG + sy, sx])
        s = self.road_cell
        segs = []
        for r in range(int(rng.poisson(2.5 * self.road_rate))):
            x, y = sx * s + rng.uniform(0, s), sy * s + rng.uniform(0, s)
            if rng.random() < 0.8:
                ang = self.theta + np.pi / 2 * int(rng.integers(4)) + rng.normal(0, 0.04)
            else:
                ang = rng.uniform(0, 2 * np.pi)
            hw = float(rng.uniform(4.0, 11.0))
            road = []
            for _ in range(int(rng.integers(3, 6))):
                ang += rng.normal(0, 0.1)
                ln = rng.uniform(150, 300)
                nx, ny = x + ln * math.cos(ang), y + ln * math.sin(ang)
                road.append((x, y, nx, ny, hw, sy * 1_000_003 + sx * 101 + r))
                x, y = nx, ny
            arr = np.array(road)
            lo = min(arr[:, 0].min(), arr[:, 2].min()), min(arr[:, 1].min(), arr[:, 3].min())
            hi = max(arr[:, 0].max(), arr[:, 2].max()), max(arr[:, 1].max(), arr[:, 3].max())
            reach = self.road_reach - hw - 2
            if (
                lo[0] >= sx * s - reach
                and lo[1] >= sy * s - reach
                and hi[0] <= (sx + 1) * s + reach
                and hi[1] <= (sy + 1) * s + reach
            ):
                segs.extend(road)
        out = np.array(segs, np.float64).reshape(-1, 6)
        with self._lock:
            self._roads[key] = out
            while len(self._roads) > 256:
                self._roads.popitem(last=False)
        return out

    def roads_near(self, r0: float, c0: float, r1: float, c1: float) -> np.ndarray:
        """Road segments whose band may touch rows ``[r0, r1)`` x cols ``[c0, c1)``: ``(k, 6)``."""
        s, reach = self.road_cell, self.road_reach
        out = []
        for sy in range(max(0, math.floor((r0 - reach) / s)), math.floor((r1 + reach) / s) + 1):
            for sx in range(max(0, math.floor((c0 - reach) / s)), math.floor((c1 + reach) / s) + 1):
                segs = self.road_plan(sy, sx)
                if len(segs) == 0:
                    continue
                m = segs[:, 4] + 2
                ok = (
                    (np.minimum(segs[:, 0], segs[:, 2]) - m < c1)
                    & (np.maximum(segs[:, 0], segs[:, 2]) + m > c0)
                    & (np.minimum(segs[:, 1], segs[:, 3]) - m < r1)
                    & (np.maximum(segs[:, 1], segs[:, 3]) + m > r0)
                )
                if ok.any():
                    out.append(segs[ok])
        return np.concatenate(out) if out else np.zeros((0, 6))

    def road_cover(self, win: Window, segs: np.ndarray, tile: int = 64) -> np.ndarray:
        """``(h, w)`` float32 road coverage (1-px anti-aliased bands), max over segments."""
        cov = np.zeros(win.shape, np.float32)
        for ax, ay, bx, by, hw, _ in segs:
            reach = hw + 1.5
            r0 = max(win.row, math.floor(min(ay, by) - reach))
            r1 = min(win.row_end, math.ceil(max(ay, by) + reach) + 1)
            c0 = max(win.col, math.floor(min(ax, bx) - reach))
            c1 = min(win.col_end, math.ceil(max(ax, bx) + reach) + 1)
            dx, dy = bx - ax, by - ay
            l2 = max(dx * dx + dy * dy, 1e-9)
            for tr in range(r0, r1, tile):
                for tc in range(c0, c1, tile):
                    th, tw = min(tile, r1 - tr), min(tile, c1 - tc)
                    d0 = _seg_dist(
                        np.array([tc + tw / 2]), np.array([tr + th / 2]), np.array([[ax, ay, bx, by]])
                    )
                    if d0[0, 0] > reach + 0.7072 * tile + 1:
                        continue
                    qy = (np.arange(tr, tr + th) + 0.5 - ay)[:, None]
                    qx = (np.arange(tc, tc + tw) + 0.5 - ax)[None, :]
                    t = np.clip((qx * dx + qy * dy) / l2, 0.0, 1.0)
                    ex, ey = qx - t * dx, qy - t * dy
                    c = np.clip(hw + 0.5 - np.sqrt(ex * ex + ey * ey), 0.0, 1.0).astype(np.float32)
                    sl = (slice(tr - win.row, tr - win.row + th), slice(tc - win.col, tc - win.col + tw))
                    np.maximum(cov[sl], c, out=cov[sl])
        return cov

    # -- planning

    def plan(self, cy: int, cx: int, rng: np.random.Generator) -> _Plan:
        """The roofs, trees, their shadows and the detector's primitives of cell ``(cy, cx)``.

        Draws, in this order: roofs, tree crowns (over roof edges, then clusters, then scattered
        trees), the roofs' detector shapes, then false detections on distractors.
        """
        c = self.cell
        y0, x0 = cy * c, cx * c
        segs = self.roads_near(y0 - 64, x0 - 64, y0 + c + 64, x0 + c + 64)
        u = self.urban(cy, cx)
        wet = self.water_t < 2 and self.water_max(y0, x0) > self.water_t - 0.05
        cell = _AerialCell(cy, cx, y0, x0, segs, u, wet)
        roofs = self._plan_roofs(cell, rng)
        trees = self._plan_trees(cell, rng, roofs)
        objs: list[_Obj] = []
        dets: list[_Det] = []
        n_fg = self._place_roofs(cell, rng, roofs, objs, dets)
        kept_trees = self._place_trees(cell, trees, objs)
        self._false_detections(cell, rng, len(roofs), kept_trees, dets)
        return _Plan(objs, dets, n_fg)

    def _clear(self, cell: _AerialCell, x: float, y: float, rad: float) -> bool:
        """Whether a disc of radius ``rad`` at ``(x, y)`` keeps off water and roads."""
        if cell.wet and self.water_at(x, y) > self.water_t - 0.03:
            return False
        segs = cell.segs
        if len(segs) and np.any(_seg_dist(np.array([x]), np.array([y]), segs)[0] < segs[:, 4] + rad + 1.5):
            return False
        return True

    def _plan_roofs(self, cell: _AerialCell, rng: np.random.Generator) -> list[dict[str, Any]]:
        """The cell's roofs: a Poisson count growing with urbanity, three placement tries each."""
        c = self.cell
        roofs: list[dict[str, Any]] = []
        for _ in range(int(rng.poisson(self.density * (1.0 + 14.0 * cell.u * cell.u)))):
            for _attempt in range(3):
                x, y = cell.x0 + rng.uniform(0, c), cell.y0 + rng.uniform(0, c)
                ln = math.exp(rng.uniform(math.log(8), math.log(60)))  # long side, px
                wd = max(6.0, ln * rng.uniform(0.45, 1.0))
                rad = 0.5 * math.hypot(ln, wd)
                if not self._clear(cell, x, y, 0.9 * rad):
                    continue
                if any(math.hypot(x - o["cx"], y - o["cy"]) < 0.75 * (rad + o["rad"]) for o in roofs):
                    continue
                roofs.append(self._roof(rng, x, y, ln, wd))
                break
        return roofs

    def _plan_trees(
        self, cell: _AerialCell, rng: np.random.Generator, roofs: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Tree crowns: over roof edges (the hidden roof part is background), in clusters, scattered."""
        c, dens, u = self.cell, self.density, cell.u
        trees: list[dict[str, Any]] = []
        for roof in roofs:
            if rng.random() < 0.18:
                v = roof["xy"][int(rng.integers(len(roof["xy"])))]
                t = rng.uniform(0.7, 1.1)
                trees.append(
                    self._tree(
                        rng,
                        roof["cx"] + (v[0] - roof["cx"]) * t,
                        roof["cy"] + (v[1] - roof["cy"]) * t,
                        rng.uniform(3, 10),
                    )
                )

        def tree_ok(x: float, y: float, r: float) -> bool:
            if not self._clear(cell, x, y, -r * 0.3):
                return False
            return not any(math.hypot(x - o["cx"], y - o["cy"]) < 0.8 * o["rad"] + 0.5 * r for o in roofs)

        for _ in range(int(rng.poisson(dens * (0.5 + 1.0 * (1 - u))))):  # clusters
            gx, gy = cell.x0 + rng.uniform(0, c), cell.y0 + rng.uniform(0, c)
            spread = rng.uniform(8, 32)
            for _ in range(int(rng.integers(3, 11))):
                off = rng.normal(0, spread / 2, 2)
                n = float(np.hypot(*off))
                if n > spread:
                    off *= spread / n
                x, y, r = gx + off[0], gy + off[1], rng.uniform(3, 15)
                if tree_ok(x, y, r):
                    trees.append(self._tree(rng, x, y, r))
        for _ in range(int(rng.poisson(dens * (1.0 + 2.0 * (1 - u))))):  # scattered
            x, y, r = cell.x0 + rng.uniform(0, c), cell.y0 + rng.uniform(0, c), rng.uniform(3, 12)
            if tree_ok(x, y, r):
                trees.append(self._tree(rng, x, y, r))
        return trees

    def _place_roofs(
        self, cell: _AerialCell, rng: np.random.Generator, roofs: list[dict[str, Any]], objs: list[_Obj],
        dets: list[_Det],
    ) -> int:
        """Append the roofs that fit the cell's margin (with shadow and detector shape); foreground count."""
        n_fg = 0
        for roof in roofs:
            xy, off = roof["xy"], roof["shadow"]
            shadow_box = _union(_box(xy, 1.5), _box(xy + off, 1.5))
            roof_box = _box(xy, 1.5)
            det = None if rng.random() < 0.05 else _rough_det(rng, xy)
            boxes = [shadow_box, roof_box] + ([det.box] if det else [])
            if not all(self.keep(cell.cy, cell.cx, b) for b in boxes):
                continue
            objs.append(_Obj("shadow", 0, shadow_box, {"polys": [xy, xy + off], "off": off}))
            objs.append(_Obj("roof", 1, roof_box, roof))
            if det:
                dets.append(det)
            n_fg += self.inside(roof["cx"], roof["cy"])
        return n_fg

    def _place_trees(
        self, cell: _AerialCell, trees: list[dict[str, Any]], objs: list[_Obj]
    ) -> list[dict[str, Any]]:
        """Append the trees (and their shadows) that fit the cell's margin; the trees kept."""
        kept_trees = []
        for tree in trees:
            xy, off = tree["xy"], tree["shadow"]
            tbox, sbox = _box(xy, 1.5), _box(xy + off, 1.5)
            if self.keep(cell.cy, cell.cx, tbox) and self.keep(cell.cy, cell.cx, sbox):
                objs.append(_Obj("shadow", 0, sbox, {"polys": [xy + off]}))
                objs.append(_Obj("tree", 2, tbox, tree))
                kept_trees.append(tree)
        return kept_trees

    def _false_detections(
        self, cell: _AerialCell, rng: np.random.Generator, n_roofs: int, kept_trees: list[dict[str, Any]],
        dets: list[_Det],
    ) -> None:
        """Append false positives on distractors: tree crowns or patches of road inside the cell."""
        c, x0, y0, segs = self.cell, cell.x0, cell.y0, cell.segs
        in_cell = (
            segs[(_seg_dist(np.array([x0 + c / 2]), np.array([y0 + c / 2]), segs)[0] < c / 2)]
            if len(segs)
            else segs
        )
        for _ in range(int(rng.binomial(n_roofs, 0.03))):
            if len(in_cell) and (not kept_trees or rng.random() < 0.4):
                ax, ay, bx, by, hw, _ = in_cell[int(rng.integers(len(in_cell)))]
                t = rng.uniform(0, 1)
                px, py = ax + t * (bx - ax), ay + t * (by - ay)
                if not (x0 <= px < x0 + c and y0 <= py < y0 + c):
                    continue
                ang = math.atan2(by - ay, bx - ax)
                patch = _radial(
                    rng, px, py, hw * rng.uniform(1.5, 3.0), hw * rng.uniform(0.9, 1.2), ang, 0.05
                )
                det = _det([patch], [], float(rng.uniform(0.5, 1.0)))
            elif kept_trees:
                det = _rough_det(rng, kept_trees[int(rng.integers(len(kept_trees)))]["xy"])
            else:
                continue
            if self.keep(cell.cy, cell.cx, det.box):
                dets.append(det)

    def _roof(self, rng: np.random.Generator, cx: float, cy: float, ln: float, wd: float) -> dict[str, Any]:
        """A roof of ``ln x wd`` px centred at ``(cx, cy)``: rectangle, L-shape or convex polygon."""
        kind = ("rect", "L", "poly")[_pick(rng, (0.55, 0.25, 0.2))]
        if rng.random() < 0.8:
            ang = self.theta + np.pi / 2 * int(rng.integers(2)) + rng.normal(0, 0.06)
        else:
            ang = rng.uniform(0, np.pi)
        hl, hw = ln / 2, wd / 2
        if kind == "rect":
            local = np.array([[-hl, -hw], [hl, -hw], [hl, hw], [-hl, hw]])
        elif kind == "L":
            a, b = rng.uniform(0.3, 0.65) * ln, rng.uniform(0.35, 0.65) * wd
            local = np.array(
                [[-hl, -hw], [hl, -hw], [hl, -hw + b], [-hl + a, -hw + b], [-hl + a, hw], [-hl, hw]]
            )
            if rng.random() < 0.5:
                local = local[::-1] * (1, -1)
        else:
            n = int(rng.integers(5, 9))
            t = np.sort(rng.uniform(0, 2 * np.pi, n))
            t = np.linspace(0, 2 * np.pi, n, endpoint=False) * 0.6 + t * 0.4
            t = np.sort(t % (2 * np.pi))
            r = rng.uniform(0.8, 1.0, n)
            local = np.stack([hl * r * np.cos(t), hw * r * np.sin(t)], axis=1)
        xy = _rot(local, ang) + (cx, cy)
        height = rng.uniform(0.3, 1.0) * (3 + 0.15 * ln)
        tone = _ROOF_TONES[_pick(rng, self.roof_w)] * rng.uniform(0.88, 1.12, 3)
        return {
            "xy": xy,
            "cx": cx,
            "cy": cy,
            "rad": 0.5 * math.hypot(ln, wd),
            "shadow": self.sun * height * self.shadow_len,
            "ang": ang,
            "tone": tone.astype(np.float32),
            "facet": float(rng.uniform(0.05, 0.2)) if kind == "rect" and rng.random() < 0.7 else 0.0,
            "tex_amt": float(rng.uniform(0.3, 0.7)),
            "oy": int(rng.integers(0, 4096)),
            "ox": int(rng.integers(0, 4096)),
        }

    def _tree(self, rng: np.random.Generator, x: float, y: float, r: float) -> dict[str, Any]:
        xy = _radial(rng, x, y, r, r * rng.uniform(0.85, 1.0), rng.uniform(0, np.pi), 0.1, n=16)
        tone = _TREE_TONES[_pick(rng, self.tree_w)] * rng.uniform(0.8, 1.2, 3)
        return {
            "xy": xy,
            "cx": x,
            "cy": y,
            "r": r,
            "shadow": self.sun * r * rng.uniform(0.7, 1.3) * self.shadow_len,
            "tone": tone.astype(np.float32),
            "oy": int(rng.integers(0, 4096)),
            "ox": int(rng.integers(0, 4096)),
        }

    # -- rendering

    def ground(self, win: Window) -> np.ndarray:
        args = (win.row, win.col, win.height, win.width)
        p = self.tex_ground.patch(*args)
        lum = (_lum(p) * np.float32(1.0 / self.tex_ground.mean_lum))[..., None]
        mix = value_noise(*args, 230.0, self.keys[2])
        mix = np.clip((mix - np.float32(0.5)) * np.float32(4.0) + np.float32(0.5), 0, 1)[..., None]
        tint = self.tint1 + (self.tint2 - self.tint1) * mix
        g: np.ndarray = tint * lum
        g += (p - g) * self.photo_mix
        g *= (np.float32(0.85) + np.float32(0.3) * value_noise(*args, 90.0, self.keys[3]))[..., None]
        return g

    def render(self, win: Window, objs: list[_Obj], dets: list[_Det], layers: bool) -> SceneWindow:
        canvas = self.ground(win)
        gt = np.zeros(win.shape, np.float32)
        cover = _Cover(win.shape, ("water", "road", "roof", "tree"), layers)
        if self.water_t < 2:
            wc = self.water(win)
            for sl in _tiles(wc):
                r0, c0 = win.row + sl[0].start, win.col + sl[1].start
                h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
                ripple = np.float32(0.92) + np.float32(0.16) * value_noise(r0, c0, h, w, 14.0, self.keys[4])
                canvas[sl] += (self.water_rgb * ripple[..., None] - canvas[sl]) * wc[sl][..., None]
                cover.paint("water", sl, wc[sl])
        segs = self.roads_near(win.row, win.col, win.row_end, win.col_end)
        if len(segs):
            rc = self.road_cover(win, segs)
            for sl in _tiles(rc):
                r0, c0 = win.row + sl[0].start, win.col + sl[1].start
                tex = self.tex_road.luma(r0, c0, sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
                f = np.float32(0.8) + np.float32(0.2) * tex
                canvas[sl] += (self.road_rgb * f[..., None] - canvas[sl]) * rc[sl][..., None]
                cover.paint("road", sl, rc[sl])
        shade = np.zeros(win.shape, np.float32)
        for o in objs:
            if o.kind != "shadow":
                continue
            sp = _span(o.box, win)
            if sp is None:
                continue
            cv = _Canvas(o.box)
            xy = o.p["polys"][0]
            for p in o.p["polys"]:
                cv.poly(p)
            if "off" in o.p:  # extrude the roof along the sun direction
                for i in range(len(xy)):
                    a, b = xy[i], xy[(i + 1) % len(xy)]
                    cv.poly(np.array([a, b, b + o.p["off"], a + o.p["off"]]))
            dst, src = sp
            np.maximum(shade[dst], cv.alpha()[src], out=shade[dst])
        canvas *= (np.float32(1.0) - np.float32(self.shadow_dark) * shade)[..., None]
        for o in objs:
            if o.kind == "shadow":
                continue
            sp = _span(o.box, win)
            if sp is None:
                continue
            dst, src = sp
            cv = _Canvas(o.box)
            cv.poly(o.p["xy"])
            a = cv.alpha()[src]
            col = self._roof_rgb(o, dst, win) if o.kind == "roof" else self._tree_rgb(o, dst, win)
            canvas[dst] += (col - canvas[dst]) * a[..., None]
            if o.kind == "roof":
                gt[dst] += (np.float32(1.0) - gt[dst]) * a
            else:
                gt[dst] *= np.float32(1.0) - a
            cover.paint(o.kind, dst, a)
        return SceneWindow(_to_u8(canvas), np.clip(gt, 0, 1), _detector(win, dets), cover.v)

    def _patch_coords(self, dst: tuple[slice, slice], win: Window) -> tuple[int, int, int, int]:
        r0, c0 = win.row + dst[0].start, win.col + dst[1].start
        return r0, c0, dst[0].stop - dst[0].start, dst[1].stop - dst[1].start

    def _roof_rgb(self, o: _Obj, dst: tuple[slice, slice], win: Window) -> np.ndarray:
        p = o.p
        r0, c0, h, w = self._patch_coords(dst, win)
        tex = self.tex_roof.luma(r0 + p["oy"], c0 + p["ox"], h, w)
        f = np.float32(1 - p["tex_amt"]) + np.float32(p["tex_amt"]) * tex
        if p["facet"] > 0:
            yy, xx = _coords((r0, c0, r0 + h, c0 + w), p["cx"], p["cy"])
            s, c = np.float32(math.sin(p["ang"])), np.float32(math.cos(p["ang"]))
            v = yy * c - xx * s  # across the ridge
            f = f * (np.float32(1.0) + np.float32(p["facet"]) * np.clip(v, -1, 1))
        result: np.ndarray = p["tone"] * f[..., None]
        return result

    def _tree_rgb(self, o: _Obj, dst: tuple[slice, slice], win: Window) -> np.ndarray:
        p = o.p
        r0, c0, h, w = self._patch_coords(dst, win)
        tex = self.tex_tree.luma(r0 + p["oy"], c0 + p["ox"], h, w)
        f = np.float32(0.6) + np.float32(0.4) * tex
        yy, xx = _coords((r0, c0, r0 + h, c0 + w), p["cx"], p["cy"])
        inv = np.float32(1.0 / p["r"])
        lit = (
            np.float32(1.0)
            - np.float32(0.3) * (xx * np.float32(self.sun[0]) + yy * np.float32(self.sun[1])) * inv
        )
        edge = np.float32(1.0) - np.float32(0.25) * np.minimum(
            (xx * xx + yy * yy) * inv * inv, np.float32(1.0)
        )
        result: np.ndarray = p["tone"] * (f * lit * edge)[..., None]
        return result


# ------------------------------------------------------------------------- cells

_TINTS = np.array(
    [
        (1.0, 1.0, 1.0),
        (0.3, 0.5, 1.0),
        (0.3, 1.0, 0.35),
        (1.0, 0.32, 0.25),
        (0.9, 0.3, 1.0),
        (0.25, 0.9, 1.0),
    ],
    np.float32,
)


class _Cells(_Family):
    """Fluorescent nuclei (foreground) over glow, haze and specks, with PSF blur and shot noise."""

    cell = 128
    margin = 112

    def __init__(self, gen: SceneGenerator, rng: np.random.Generator) -> None:
        super().__init__(gen, rng)
        self.bg = float(rng.uniform(0.03, 0.09))
        self.glow = float(rng.uniform(0.1, 0.5))
        self.glow_p = float(rng.uniform(150, 500))
        self.gain = float(math.exp(rng.uniform(math.log(150), math.log(1000))))
        self.read = float(rng.uniform(0.002, 0.01))
        self.psf = float(rng.uniform(0.7, 1.8))
        self.pad = math.ceil(4 * self.psf) + 1
        self.haze = float(rng.uniform(0.3, 1.2)) if rng.random() < 0.6 else 0.0
        self.mean_r = float(rng.uniform(4.0, 11.0))
        self.cmax = float(rng.uniform(6.0, 15.0))
        self.crowd_p = float(rng.uniform(3, 8))
        self.cluster = float(rng.uniform(0.2, 0.7))
        self.tex_amt = float(rng.uniform(0.15, 0.5))
        self.tint = _TINTS[int(rng.integers(len(_TINTS)))]
        self.exposure = float(rng.uniform(0.6, 1.0) / (self.bg * (1.0 + 0.7 * self.cmax)))
        self.knee = float(rng.uniform(0.3, 3.0))  # tone curve v (1 + k) / (v + k): lifts dim signal
        self.keys = [int(k) for k in rng.integers(1, 2**31, 6)]
        self.tex, _ = _texture(gen.photos, gen._tex_rng, (1, 2), ((60, 60, 60), (200, 200, 200), 3.0))

    def crowd(self, cy: int, cx: int) -> float:
        v = value_noise_at(cx + 0.5, cy + 0.5, self.crowd_p, self.keys[0])
        return min(max((v - 0.15) / 0.7, 0.0), 1.0)

    def plan(self, cy: int, cx: int, rng: np.random.Generator) -> _Plan:
        """The nuclei, specks, haze and the detector's primitives of cell ``(cy, cx)``.

        Draws, in this order: nuclei (touching clusters, then single ones), specks, haze, the
        nuclei's detector shapes, then false detections on haze or dim specks.
        """
        blobs = self._plan_blobs(cy, cx, rng)
        c = self.cell
        y0, x0 = cy * c, cx * c
        specks = [
            self._speck(rng, x0 + rng.uniform(0, c), y0 + rng.uniform(0, c))
            for _ in range(int(rng.poisson(1.5)))
        ]
        hazes = self._plan_hazes(y0, x0, rng)
        objs: list[_Obj] = []
        dets: list[_Det] = []
        for hz in hazes:
            if self.keep(cy, cx, hz["box"]):
                objs.append(_Obj("haze", 0, hz["box"], hz))
        for sp in specks:
            if self.keep(cy, cx, sp["box"]):
                objs.append(_Obj("speck", 1, sp["box"], sp))
        n_fg = 0
        for b in blobs:
            det = None if rng.random() < 0.05 else _rough_det(rng, b["xy"], p_box=0.1)
            if not self.keep(cy, cx, b["box"]) or (det and not self.keep(cy, cx, det.box)):
                continue
            objs.append(_Obj("blob", 2, b["box"], b))
            if det:
                dets.append(det)
            n_fg += self.inside(b["cx"], b["cy"])
        self._false_detections(cy, cx, rng, len(blobs), hazes, objs, dets)
        return _Plan(objs, dets, n_fg)

    def _plan_blobs(self, cy: int, cx: int, rng: np.random.Generator) -> list[dict[str, Any]]:
        """The cell's nuclei: touching clusters, then single ones, none overlapping another much."""
        c = self.cell
        y0, x0 = cy * c, cx * c
        lam = self.density * (3.0 + 30.0 * self.crowd(cy, cx) ** 2) * (8.0 / self.mean_r) ** 2
        blobs: list[dict[str, Any]] = []

        def radius() -> float:
            return float(np.clip(self.mean_r * math.exp(rng.normal(0, 0.3)), 2.5, 20.0))

        def free(x: float, y: float, r: float) -> bool:
            return all(math.hypot(x - b["cx"], y - b["cy"]) >= 0.75 * (r + b["r"]) for b in blobs)

        for _ in range(int(rng.poisson(lam * self.cluster / 3.5))):  # touching clusters
            gx, gy, r = x0 + rng.uniform(0, c), y0 + rng.uniform(0, c), radius()
            if not free(gx, gy, r):
                continue
            members = [self._blob(rng, gx, gy, r)]
            for _ in range(int(rng.integers(1, 6))):
                for _attempt in range(4):
                    j = members[int(rng.integers(len(members)))]
                    r = radius()
                    ang = rng.uniform(0, 2 * np.pi)
                    d = (j["r"] + r) * rng.uniform(0.8, 0.95)
                    x, y = j["cx"] + d * math.cos(ang), j["cy"] + d * math.sin(ang)
                    if math.hypot(x - gx, y - gy) > 48 or not free(x, y, r):
                        continue
                    if all(math.hypot(x - m["cx"], y - m["cy"]) >= 0.75 * (r + m["r"]) for m in members):
                        members.append(self._blob(rng, x, y, r))
                        break
            blobs.extend(members)
        for _ in range(int(rng.poisson(lam * (1 - self.cluster)))):
            for _attempt in range(4):
                x, y, r = x0 + rng.uniform(0, c), y0 + rng.uniform(0, c), radius()
                if free(x, y, r):
                    blobs.append(self._blob(rng, x, y, r))
                    break
        return blobs

    def _plan_hazes(self, y0: int, x0: int, rng: np.random.Generator) -> list[dict[str, Any]]:
        """Out-of-focus haze patches of the cell whose top-left pixel is ``(y0, x0)`` (none without haze)."""
        c = self.cell
        hazes: list[dict[str, Any]] = []
        if self.haze > 0:
            for _ in range(int(rng.poisson(0.5 * self.haze))):
                s = rng.uniform(6, 16)
                x, y = x0 + rng.uniform(0, c), y0 + rng.uniform(0, c)
                hazes.append(
                    {
                        "cx": x,
                        "cy": y,
                        "s": s,
                        "amp": self.bg * rng.uniform(0.5, 2.5),
                        "box": _box(np.array([[x, y]]), 3.5 * s),
                    }
                )
        return hazes

    def _false_detections(
        self, cy: int, cx: int, rng: np.random.Generator, n_blobs: int, hazes: list[dict[str, Any]],
        objs: list[_Obj], dets: list[_Det],
    ) -> None:
        """Append false positives: on a haze patch, or on a new dim speck (appended to ``objs`` too)."""
        c = self.cell
        y0, x0 = cy * c, cx * c
        for _ in range(int(rng.binomial(n_blobs, 0.03))):
            if hazes and rng.random() < 0.5:
                hz = hazes[int(rng.integers(len(hazes)))]
                r = hz["s"] * rng.uniform(0.6, 1.2)
                det = _det(
                    [_radial(rng, hz["cx"], hz["cy"], r, r * rng.uniform(0.7, 1), 0.0, 0.1)],
                    [],
                    float(rng.uniform(0.5, 1.0)),
                )
            else:
                sp = self._speck(rng, x0 + rng.uniform(0, c), y0 + rng.uniform(0, c))
                if self.keep(cy, cx, sp["box"]):
                    objs.append(_Obj("speck", 1, sp["box"], sp))
                r = rng.uniform(2.5, 5.0)
                det = _det(
                    [_radial(rng, sp["cx"], sp["cy"], r, r, 0.0, 0.1)], [], float(rng.uniform(0.5, 1.0))
                )
            if self.keep(cy, cx, det.box):
                dets.append(det)

    def _blob(self, rng: np.random.Generator, x: float, y: float, r: float) -> dict[str, Any]:
        b = r * rng.uniform(0.55, 1.0)
        ang = rng.uniform(0, np.pi)
        xy = _radial(rng, x, y, r, b, ang, 0.08, n=28)
        contrast = math.exp(rng.uniform(0.0, math.log(self.cmax)))
        return {
            "xy": xy,
            "cx": x,
            "cy": y,
            "r": r,
            "b": b,
            "ang": ang,
            "amp": self.bg * contrast,
            "box": _box(xy, self.pad + 1),
            "oy": int(rng.integers(0, 4096)),
            "ox": int(rng.integers(0, 4096)),
        }

    def _speck(self, rng: np.random.Generator, x: float, y: float) -> dict[str, Any]:
        r = rng.uniform(0.6, 1.6)
        xy = _radial(rng, x, y, r, r, 0.0, 0.0, n=8)
        return {
            "xy": xy,
            "cx": x,
            "cy": y,
            "amp": self.bg * rng.uniform(0.5, 2.0),
            "box": _box(xy, self.pad + 1),
        }

    def _signal(self, o: _Obj) -> tuple[np.ndarray, np.ndarray | None]:
        """``(signal, alpha)`` over the object's box: float32, alpha None for haze."""
        p = o.p
        yy, xx = _coords(o.box, p["cx"], p["cy"])
        if o.kind == "haze":
            q = (xx * xx + yy * yy) * np.float32(1.0 / p["s"] ** 2)
            d = np.float32(1.0) + q
            return np.float32(p["amp"]) / (d * d), None
        cv = _Canvas(o.box)
        cv.poly(p["xy"])
        a = cv.alpha()
        sig: np.ndarray = a * np.float32(p["amp"])
        if o.kind == "blob":
            s, c = np.float32(math.sin(p["ang"])), np.float32(math.cos(p["ang"]))
            u = (xx * c + yy * s) * np.float32(1.0 / p["r"])
            v = (yy * c - xx * s) * np.float32(1.0 / p["b"])
            dome = np.float32(1.0) - np.float32(0.35) * np.minimum(u * u + v * v, np.float32(1.0))
            h, w = a.shape
            tex = self.tex.luma(o.box[0] + p["oy"], o.box[1] + p["ox"], h, w)
            t = np.float32(1 - self.tex_amt) + np.float32(self.tex_amt) * tex
            sig = sig * dome * t
        sig = cv2.GaussianBlur(sig, (0, 0), sigmaX=self.psf, borderType=cv2.BORDER_CONSTANT)
        return sig, a

    def render(self, win: Window, objs: list[_Obj], dets: list[_Det], layers: bool) -> SceneWindow:
        args = (win.row, win.col, win.height, win.width)
        glow = value_noise(*args, self.glow_p, self.keys[1])
        v = np.float32(self.bg) * (np.float32(1.0 - self.glow / 2) + np.float32(self.glow) * glow)
        gt = np.zeros(win.shape, np.float32)
        debug = {k: np.zeros(win.shape, np.float32) for k in ("haze", "speck")} if layers else {}
        for o in objs:
            sp = _span(o.box, win)
            if sp is None:
                continue
            dst, src = sp
            sig, a = self._signal(o)
            v[dst] += sig[src]
            if o.kind == "blob" and a is not None:
                gt[dst] += (np.float32(1.0) - gt[dst]) * a[src]
            elif layers:
                debug[o.kind][dst] += sig[src]
        v = np.maximum(v, np.float32(0.0))
        v += np.sqrt(v * np.float32(1.0 / self.gain)) * _gauss_noise(*args, self.keys[2])
        v += np.float32(self.read) * _gauss_noise(*args, self.keys[3])
        v = np.maximum(v * np.float32(self.exposure), np.float32(0.0))
        v = np.minimum(v * np.float32(1.0 + self.knee) / (v + np.float32(self.knee)), np.float32(1.0))
        image = _to_u8(v[..., None] * (self.tint * np.float32(255.0)))
        return SceneWindow(image, np.clip(gt, 0, 1), _detector(win, dets), debug)


# -------------------------------------------------------------------------- thin


class _Thin(_Family):
    """Wires, branches, fences and hairy blobs textured with one photo on another."""

    cell = 256
    margin = 448

    def __init__(self, gen: SceneGenerator, rng: np.random.Generator) -> None:
        super().__init__(gen, rng)
        self.tex_bg, bi = _texture(gen.photos, gen._tex_rng, (0, 1), ((70, 100, 60), (150, 160, 120), 60.0))
        self.tex_fg, _ = _texture(
            gen.photos, gen._tex_rng, (1, 2), ((150, 90, 60), (220, 200, 170), 6.0), avoid=bi
        )
        self.kinds_w = rng.dirichlet(np.full(4, 2.0)).tolist()
        self.width_scale = float(rng.uniform(0.8, 1.3))

    def plan(self, cy: int, cx: int, rng: np.random.Generator) -> _Plan:
        c = self.cell
        y0, x0 = cy * c, cx * c
        objs: list[_Obj] = []
        dets: list[_Det] = []
        n_fg = 0
        n = int(rng.poisson(self.density * 1.6))
        for _ in range(n):
            kind = ("wire", "branch", "fence", "hair")[_pick(rng, self.kinds_w)]
            x, y = x0 + rng.uniform(0, c), y0 + rng.uniform(0, c)
            polys, lines, extra = getattr(self, "_" + kind)(rng, x, y)
            pts = np.concatenate([*polys, *(xy for xy, _ in lines), *extra.get("region", [])])
            wmax = max([w for _, w in lines], default=0.0)
            box = _box(pts, wmax / 2 + 2)
            tone = self._tone(rng)
            p = {
                "polys": polys,
                "lines": lines,
                "tone": tone,
                "oy": int(rng.integers(0, 4096)),
                "ox": int(rng.integers(0, 4096)),
                "cx": x,
                "cy": y,
                **extra,
            }
            det = self._thin_det(rng, kind, p)
            if not self.keep(cy, cx, box) or (det and not self.keep(cy, cx, det.box)):
                continue
            objs.append(_Obj(kind, 0, box, p))
            if det:
                dets.append(det)
            n_fg += self.inside(x, y)
        for _ in range(int(rng.binomial(max(n, 1), 0.03))):  # false positives on background texture
            x, y, r = x0 + rng.uniform(0, c), y0 + rng.uniform(0, c), rng.uniform(5, 18)
            det = _det(
                [_radial(rng, x, y, r, r * rng.uniform(0.4, 1.0), rng.uniform(0, np.pi), 0.2)],
                [],
                float(rng.uniform(0.6, 1.2)),
            )
            if self.keep(cy, cx, det.box):
                dets.append(det)
        return _Plan(objs, dets, n_fg)

    def _tone(self, rng: np.random.Generator) -> np.ndarray:
        kind = rng.random()
        if kind < 0.3:
            t = rng.uniform(0.15, 0.45) * rng.uniform(0.9, 1.1, 3)
        elif kind < 0.55:
            t = rng.uniform(1.3, 1.9) * rng.uniform(0.9, 1.1, 3)
        else:
            t = rng.uniform(0.75, 1.25, 3)
        return t.astype(np.float32)

    def _width(self, rng: np.random.Generator, lo: float, hi: float) -> float:
        return float(np.clip(rng.uniform(lo, hi) * self.width_scale, 0.5, 6.0))

    def _wire(self, rng: np.random.Generator, x: float, y: float) -> tuple[list, list, dict]:
        ln = rng.uniform(150, 380)
        ang = rng.uniform(0, np.pi) if rng.random() < 0.5 else rng.normal(0, 0.25)
        d = np.array([math.cos(ang), math.sin(ang)])
        nrm = np.array([-d[1], d[0]])
        if nrm[1] < 0:
            nrm = -nrm  # sag downwards
        sag = rng.uniform(0.0, 0.12) * ln
        t = np.linspace(0, 1, max(8, int(ln / 5)))[:, None]
        p0, p2 = np.array([x, y]), np.array([x, y]) + ln * d
        p1 = (p0 + p2) / 2 + 2 * sag * nrm
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t * t * p2
        k = (1, 1, 2, 3, 4)[int(rng.integers(5))]
        gap = rng.uniform(4, 12)
        w = self._width(rng, 0.8, 3.5)
        lines = [(curve + j * gap * nrm, float(w * rng.uniform(0.85, 1.15))) for j in range(k)]
        return [], lines, {}

    def _branch(self, rng: np.random.Generator, x: float, y: float) -> tuple[list, list, dict]:
        lines: list[tuple[np.ndarray, float]] = []
        stack = [
            (np.array([x, y]), rng.uniform(0, 2 * np.pi), self._width(rng, 2.0, 6.0), rng.uniform(35, 70), 0)
        ]
        depth_max = int(rng.integers(3, 5))
        while stack:
            p, ang, w, ln, depth = stack.pop()
            mid = p + ln / 2 * np.array([math.cos(ang), math.sin(ang)])
            ang2 = ang + rng.normal(0, 0.2)
            q = mid + ln / 2 * np.array([math.cos(ang2), math.sin(ang2)])
            lines.append((np.array([p, mid, q]), float(max(w, 0.6))))
            if depth < depth_max:
                for _ in range(int(rng.integers(1, 4))):
                    stack.append(
                        (
                            q,
                            ang2 + rng.uniform(-0.9, 0.9),
                            w * rng.uniform(0.55, 0.8),
                            ln * rng.uniform(0.6, 0.85),
                            depth + 1,
                        )
                    )
        return [], lines, {}

    def _fence(self, rng: np.random.Generator, x: float, y: float) -> tuple[list, list, dict]:
        hw, hh = rng.uniform(40, 130), rng.uniform(30, 100)
        ang = rng.normal(0, 0.15) if rng.random() < 0.6 else rng.uniform(0, np.pi)
        corners = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]])
        pattern = ("grid", "diamond", "rails")[int(rng.integers(3))]
        w = self._width(rng, 1.0, 3.0)
        segs: list[tuple[float, float, float, float]] = []
        if pattern == "grid":
            sx, sy = rng.uniform(7, 22), rng.uniform(7, 22)
            segs += [(u, -hh, u, hh) for u in np.arange(-hw + sx / 2, hw, sx)]
            segs += [(-hw, v, hw, v) for v in np.arange(-hh + sy / 2, hh, sy)]
        elif pattern == "diamond":
            s = rng.uniform(8, 16)
            for u in np.arange(-hw - hh, hw + hh, s):
                segs += [(u - hh, -hh, u + hh, hh), (u - hh, hh, u + hh, -hh)]
        else:
            s = rng.uniform(8, 20)
            segs += [(u, -hh, u, hh) for u in np.arange(-hw + s / 2, hw, s)]
            segs += [(-hw, v, hw, v) for v in (-hh * 0.8, hh * 0.8)]
        lines = []
        for seg in segs:
            clipped = _clip_segment(*seg, hw, hh)
            if clipped is not None:
                lines.append((_rot(clipped, ang) + (x, y), w))
        region = _rot(corners, ang) + (x, y)
        if rng.random() < 0.6:  # a frame around the lattice
            lines.append((np.concatenate([region, region[:1]]), self._width(rng, 2.0, 4.0)))
        return [], lines, {"region": [region]}

    def _hair(self, rng: np.random.Generator, x: float, y: float) -> tuple[list, list, dict]:
        r = rng.uniform(10, 40)
        body = _radial(rng, x, y, r, r * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi), 0.12, n=32)
        lines = []
        for _ in range(int(rng.integers(20, 90))):
            k = int(rng.integers(len(body)))
            v = body[k] - (x, y)
            ang = math.atan2(v[1], v[0]) + rng.normal(0, 0.3)
            p = (x, y) + v * 0.9
            ln = r * rng.uniform(0.4, 1.4)
            pts = [p]
            curl = rng.normal(0, 0.25)
            for _ in range(4):
                ang += curl
                p = p + ln / 4 * np.array([math.cos(ang), math.sin(ang)])
                pts.append(p)
            lines.append((np.array(pts), float(rng.uniform(0.5, 1.5))))
        return [body], lines, {}

    def _thin_det(self, rng: np.random.Generator, kind: str, p: dict[str, Any]) -> _Det | None:
        """A dilated, blurred, partly broken version of a structure (thin parts are what detectors lose)."""
        if rng.random() < (0.12 if kind == "wire" else 0.05):
            return None
        sigma = float(rng.uniform(0.4, 0.8))
        grow = float(rng.uniform(0.0, 0.5))
        polys = [_rough_shape(rng, q, shift=0.08, scale=(0.95, 1.15)) for q in p["polys"]]
        if kind == "fence" and rng.random() < 0.06:  # the whole lattice taken as one solid panel
            return _det(
                [_rough_shape(rng, p["region"][0], shift=0.05, scale=(0.9, 1.05), p_box=1.0)], [], sigma
            )
        lines = []
        for xy, w in p["lines"]:
            if kind == "hair" and rng.random() < 0.6:
                continue
            if kind == "branch" and w < 1.2 and rng.random() < 0.5:
                continue
            wd = max(w, 1.2) + grow
            for piece in _break(rng, _densify(xy, 4.0), 1 / 250):
                lines.append((piece, wd))
        if not polys and not lines:
            return None
        return _det(polys, lines, sigma)

    def render(self, win: Window, objs: list[_Obj], dets: list[_Det], layers: bool) -> SceneWindow:
        canvas = self.tex_bg.patch(win.row, win.col, win.height, win.width)
        gt = np.zeros(win.shape, np.float32)
        for o in objs:
            sp = _span(o.box, win)
            if sp is None:
                continue
            dst, src = sp
            a = self._alpha(o)[src]
            p = o.p
            h, w = a.shape
            r0, c0 = win.row + dst[0].start, win.col + dst[1].start
            col = self.tex_fg.patch(r0 + p["oy"], c0 + p["ox"], h, w) * p["tone"]
            canvas[dst] += (np.minimum(col, np.float32(255.0)) - canvas[dst]) * a[..., None]
            gt[dst] += (np.float32(1.0) - gt[dst]) * a
        return SceneWindow(_to_u8(canvas), np.clip(gt, 0, 1), _detector(win, dets), {})

    def _alpha(self, o: _Obj) -> np.ndarray:
        cv = _Canvas(o.box)
        p = o.p
        for xy, w in p["lines"]:
            cv.line(xy, w)
        for q in p["polys"]:
            cv.poly(q)
        return cv.alpha()


def _clip_segment(x0: float, y0: float, x1: float, y1: float, hw: float, hh: float) -> np.ndarray | None:
    """Segment clipped to ``[-hw, hw] x [-hh, hh]`` (Liang-Barsky): ``(2, 2)`` (x, y) or None."""
    dx, dy = x1 - x0, y1 - y0
    lo, hi = 0.0, 1.0
    for p, q in ((-dx, x0 + hw), (dx, hw - x0), (-dy, y0 + hh), (dy, hh - y0)):
        if abs(p) < 1e-12:
            if q < 0:
                return None
            continue
        t = q / p
        if p < 0:
            lo = max(lo, t)
        else:
            hi = min(hi, t)
    if hi - lo <= 1e-9:
        return None
    return np.array([[x0 + lo * dx, y0 + lo * dy], [x0 + hi * dx, y0 + hi * dy]])


def _densify(xy: np.ndarray, step: float) -> np.ndarray:
    """Polyline ``(n, 2)`` resampled so that no segment is longer than ``step`` px."""
    out = [xy[:1]]
    for a, b in zip(xy[:-1], xy[1:], strict=True):
        k = max(1, int(math.ceil(float(np.hypot(*(b - a))) / step)))
        t = np.arange(1, k + 1)[:, None] / k
        out.append(a + (b - a) * t)
    return np.concatenate(out)


def _break(rng: np.random.Generator, xy: np.ndarray, rate: float) -> list[np.ndarray]:
    """Cut gaps (2-6 vertices each, ``rate`` per px of length) into a dense polyline; returns the pieces."""
    n = len(xy)
    keep = np.ones(n, bool)
    length = float(np.hypot(*np.diff(xy, axis=0).T).sum()) if n > 1 else 0.0
    for _ in range(int(rng.poisson(rate * length))):
        s = int(rng.integers(n))
        keep[s : s + int(rng.integers(2, 7))] = False
    pieces, start = [], None
    for i in range(n + 1):
        if i < n and keep[i]:
            start = i if start is None else start
        elif start is not None:
            if i - start >= 2:
                pieces.append(xy[start:i])
            start = None
    return pieces


# ----------------------------------------------------------------------- generator

_FAMILY_CLASSES: dict[str, Callable[[SceneGenerator, np.random.Generator], _Family]] = {
    "aerial": _Aerial,
    "cells": _Cells,
    "thin": _Thin,
}


class SceneGenerator:
    """A scene of one family, rendered by window with exact ground truth.

    Args:
        family: one of :data:`FAMILIES`.
        shape: ``(height, width)`` of the whole scene, px (>= 1 each).
        seed: scene seed (any int; taken modulo 2**64).
        photos: a :class:`PhotoSource` for textures (such as
            :class:`~refine_cli.train.data.PhotoBank`); ``None`` uses procedural noise textures.
        density: object density factor in ``(0, 10]`` (1 = the family's default).

    Attributes:
        shape: ``(height, width)``.
        family, seed, density, photos: as given.

    Cell plans (object parameters) are cached, up to 4096 cells, so neighbouring
    windows share them; rendering is thread-safe and independent of the cache.
    """

    def __init__(
        self,
        family: str,
        shape: tuple[int, int],
        seed: int,
        photos: PhotoSource | None = None,
        density: float = 1.0,
    ) -> None:
        if family not in FAMILIES:
            raise UsageError(f"unknown scene family {family!r}; use {', '.join(FAMILIES)}")
        shape = (int(shape[0]), int(shape[1]))
        if min(shape) < 1:
            raise UsageError(f"scene shape {shape} must be at least 1 x 1 px")
        if not 0.0 < density <= 10.0:
            raise UsageError(f"scene density {density} must be in (0, 10]")
        self.family, self.shape, self.seed = family, shape, int(seed) % (1 << 64)
        self.density, self.photos = float(density), photos
        self.fid = FAMILIES.index(family) + 1
        # textures draw from their own stream, so photos change textures only, never geometry
        self._tex_rng = np.random.default_rng([self.seed, self.fid, _SCENE_TAG + 1, 0])
        self._fam = _FAMILY_CLASSES[family](self, np.random.default_rng([self.seed, self.fid, _SCENE_TAG, 0]))
        self._plans: OrderedDict[tuple[int, int], _Plan] = OrderedDict()
        self._lock = threading.Lock()

    def _plan(self, cy: int, cx: int) -> _Plan:
        key = (cy, cx)
        with self._lock:
            if key in self._plans:
                self._plans.move_to_end(key)
                return self._plans[key]
        plan = self._fam.plan(cy, cx, np.random.default_rng([self.seed, self.fid, cy, cx]))
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > 4096:
                self._plans.popitem(last=False)
        return plan

    def render(self, window: Window, layers: bool = False) -> SceneWindow:
        """Render one window of the scene.

        Args:
            window: a window inside ``[0, H) x [0, W)``.
            layers: also return the family's debug layers (see :class:`SceneWindow`).

        Returns:
            A :class:`SceneWindow` of ``window.shape``; equal, bit for bit, to the
            same crop of the whole scene rendered at once.
        """
        h, w = self.shape
        if window.row < 0 or window.col < 0 or window.row_end > h or window.col_end > w or window.area == 0:
            raise UsageError(f"window {window} is empty or outside the scene ({h} x {w})")
        fam = self._fam
        c, m = fam.cell, fam.margin
        objs: list[_Obj] = []
        dets: list[_Det] = []
        for cy in range(max(0, (window.row - m) // c), (window.row_end - 1 + m) // c + 1):
            for cx in range(max(0, (window.col - m) // c), (window.col_end - 1 + m) // c + 1):
                plan = self._plan(cy, cx)
                objs.extend(plan.objs)
                dets.extend(plan.dets)
        objs.sort(key=lambda o: o.layer)  # stable: cells stay in row-major order within a layer
        return fam.render(window, objs, dets, layers)

    def count(self) -> int:
        """Foreground objects (roofs, nuclei or structures) centred in the scene.

        Exact for scenes of up to 1024 grid cells, else estimated from 256 cells
        chosen deterministically.
        """
        c = self._fam.cell
        ny, nx = -(-self.shape[0] // c), -(-self.shape[1] // c)
        total = ny * nx
        if total <= 1024:
            return sum(self._plan(cy, cx).n_fg for cy in range(ny) for cx in range(nx))
        rng = np.random.default_rng([self.seed, self.fid, _COUNT_TAG, 0])
        picks = rng.choice(total, 256, replace=False)
        n = sum(self._plan(int(i) // nx, int(i) % nx).n_fg for i in picks)
        return int(round(n * total / 256))
