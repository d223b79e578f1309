"""Synthetic scenes with exact ground truth, for tests, samples and benchmarks (not used by runs).

A scene is a list of shapes given by signed distance functions (negative inside):
discs, rings (holes), thin bars and sharp-cornered boxes. Because the ground
truth is analytic, any window of the image, of the ground truth and of a coarse
mask at any resolution can be computed on its own, so gigapixel test files are
written tile by tile without ever holding the image.

Image model: a textured background and a differently coloured, textured
foreground blended with ``alpha = clip(1/2 - d, 0, 1)`` (a 1-px anti-aliased
edge). Ground truth: ``d < 0`` at pixel centres. The background texture is
periodic (512 px), so uniform tiles are cheap to write.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from refine_cli.tiling.grid import Window, blocks

PERIOD = 512


@dataclass(frozen=True)
class Shape:
    """One shape.

    Attributes:
        kind: ``disc`` | ``ring`` | ``bar`` | ``box``.
        cy: centre row, px.
        cx: centre column, px.
        a: radius (disc, ring) or half length (bar, box), px.
        b: ring half thickness, or half width (bar, box), px.
        angle: rotation of bars and boxes, radians.
    """

    kind: str
    cy: float
    cx: float
    a: float
    b: float = 0.0
    angle: float = 0.0

    def bbox(self, margin: float = 0.0) -> Window:
        """Bounding window grown by ``margin`` px (not clipped)."""
        r = self.a + self.b + margin + 2
        return Window(int(self.cy - r), int(self.cx - r), int(2 * r) + 1, int(2 * r) + 1)

    def sdf(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Signed distance (px, negative inside) at points ``(y, x)`` (broadcastable float arrays)."""
        dy, dx = y - self.cy, x - self.cx
        if self.kind == "disc":
            return np.hypot(dy, dx) - self.a
        if self.kind == "ring":
            return np.abs(np.hypot(dy, dx) - self.a) - self.b
        c, s = np.cos(self.angle), np.sin(self.angle)
        u, v = np.abs(c * dx + s * dy), np.abs(-s * dx + c * dy)
        qu, qv = u - self.a, v - self.b
        outside = np.hypot(np.maximum(qu, 0), np.maximum(qv, 0))
        dist: np.ndarray = outside + np.minimum(np.maximum(qu, qv), 0)
        return dist


@dataclass(frozen=True)
class Scene:
    """Shapes on a ``(H, W)`` canvas."""

    shape: tuple[int, int]
    shapes: tuple[Shape, ...]
    seed: int = 0

    def sdf(self, window: Window, offset: float = 0.5, scale: float = 1.0) -> np.ndarray:
        """Signed distance of the union at pixel centres of ``window``.

        ``scale`` is image px per window px (for coarse grids), ``offset`` the
        sample position inside a pixel.
        """
        y = (np.arange(window.row, window.row_end, dtype=np.float64) + offset)[:, None] * scale
        x = (np.arange(window.col, window.col_end, dtype=np.float64) + offset)[None, :] * scale
        d = np.full(window.shape, np.inf)
        for sh in self.shapes:
            box = sh.bbox(margin=4 * scale)
            box = Window(int(box.row / scale), int(box.col / scale), int(box.height / scale) + 2,
                         int(box.width / scale) + 2)
            inter = box.intersection(window)
            if inter is None:
                continue
            rel = inter.relative_to(window)
            d[rel.slices] = np.minimum(d[rel.slices], sh.sdf(y[rel.slices[0]], x[:, rel.slices[1]]))
        return d

    def gt(self, window: Window) -> np.ndarray:
        """``(h, w)`` bool ground truth over ``window``."""
        return self.sdf(window) < 0

    def alpha(self, window: Window) -> np.ndarray:
        """``(h, w)`` float32 foreground coverage with a 1-px anti-aliased edge."""
        return np.clip(0.5 - self.sdf(window), 0.0, 1.0).astype(np.float32)

    def image(self, window: Window) -> np.ndarray:
        """``(h, w, 3)`` uint8 RGB over ``window``."""
        bg = texture(window, self.seed, (70, 110, 60), (35, 30, 30))
        a = self.alpha(window)
        if not a.any():
            return bg
        fg = texture(window, self.seed + 1, (200, 120, 90), (30, 35, 40))
        out: np.ndarray = bg.astype(np.float32) * (1 - a[..., None]) + fg.astype(np.float32) * a[..., None]
        return np.round(out).astype(np.uint8)

    def coarse(self, factor: int, soft: bool = True) -> np.ndarray:
        """The whole coarse mask at ``1/factor`` resolution: ``(ceil(H/f), ceil(W/f))`` uint8.

        Each coarse pixel holds the area fraction of its block (``soft``, 0..255)
        or its thresholded value (0/255).
        """
        h, w = -(-self.shape[0] // factor), -(-self.shape[1] // factor)
        # Sample each block on a 4x4 grid of points for the area fraction.
        acc = np.zeros((h, w), np.float32)
        for oy in range(4):
            for ox in range(4):
                yy = (np.arange(h) * factor + (oy + 0.5) * factor / 4)[:, None]
                xx = (np.arange(w) * factor + (ox + 0.5) * factor / 4)[None, :]
                d = np.full((h, w), np.inf)
                for sh in self.shapes:
                    d = np.minimum(d, sh.sdf(yy, xx))
                acc += d < 0
        frac = acc / 16
        if not soft:
            frac = (frac >= 0.5).astype(np.float32)
        return np.round(frac * 255).astype(np.uint8)


def texture(window: Window, seed: int, base: tuple[int, int, int], amp: tuple[int, int, int]) -> np.ndarray:
    """A periodic (512 px) RGB texture: smooth waves plus fine hash noise, ``(h, w, 3)`` uint8."""
    y = (np.arange(window.row, window.row_end) % PERIOD)[:, None].astype(np.float32)
    x = (np.arange(window.col, window.col_end) % PERIOD)[None, :].astype(np.float32)
    k = 2 * np.pi / PERIOD
    waves = np.sin(k * (3 * x + 2 * y) + seed) * 0.6 + np.sin(k * (5 * y - 4 * x) + 2 * seed) * 0.4
    h = (y.astype(np.uint32) * np.uint32(73856093)) ^ (x.astype(np.uint32) * np.uint32(19349663)) ^ np.uint32(
        seed * 83492791 & 0xFFFFFFFF)
    h = (h ^ (h >> np.uint32(13))) * np.uint32(0x5BD1E995)
    noise = ((h >> np.uint32(24)).astype(np.float32) / 255.0 - 0.5) * 0.8
    out = np.empty((window.height, window.width, 3), np.float32)
    for c in range(3):
        out[..., c] = base[c] + amp[c] * (waves + noise)
    return np.clip(out, 0, 255).astype(np.uint8)


def random_scene(shape: tuple[int, int], n: int, seed: int = 0, size: float | None = None) -> Scene:
    """A scene of ``n`` random shapes (discs, rings, bars, boxes) kept inside the canvas.

    Args:
        shape: ``(H, W)``.
        n: number of shapes.
        seed: RNG seed.
        size: typical shape radius in px (default: 1/8 of the short side).
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    size = size or min(h, w) / 8
    kinds = ("disc", "ring", "bar", "box")
    shapes = []
    for i in range(n):
        kind = kinds[i % 4]
        a = float(rng.uniform(0.5, 1.0) * size)
        b = {"disc": 0.0, "ring": float(rng.uniform(0.15, 0.3) * a), "bar": float(rng.uniform(2, 6)),
             "box": float(rng.uniform(0.3, 0.8) * a)}[kind]
        m = a + b + 8
        cy = float(rng.uniform(m, max(m + 1, h - m)))
        cx = float(rng.uniform(m, max(m + 1, w - m)))
        shapes.append(Shape(kind, cy, cx, a, b, float(rng.uniform(0, np.pi))))
    return Scene((h, w), tuple(shapes), seed)


def iter_tiles(scene: Scene, tile: int = 512) -> Iterator[np.ndarray]:
    """Image tiles in row-major order, padded to ``tile x tile`` (for tifffile's tiled writer)."""
    h, w = scene.shape
    plain: dict[tuple[int, int], np.ndarray] = {}
    for win in blocks((h, w), tile):
        out = np.zeros((tile, tile, 3), np.uint8)
        touched = any(sh.bbox(4).intersection(win) is not None for sh in scene.shapes)
        if touched:
            out[: win.height, : win.width] = scene.image(win)
        else:
            key = (win.row % PERIOD, win.col % PERIOD)
            if key not in plain:
                plain[key] = texture(Window(win.row, win.col, tile, tile), scene.seed, (70, 110, 60),
                                     (35, 30, 30))
            out[: win.height, : win.width] = plain[key][: win.height, : win.width]
        yield out


def write_tiled(scene: Scene, path: str, tile: int = 512, compression: str = "zlib") -> None:
    """Write the scene's image as a tiled BigTIFF, one tile at a time (bounded memory)."""
    import tifffile

    h, w = scene.shape
    tifffile.imwrite(path, data=iter_tiles(scene, tile), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile),
                     compression=compression, compressionargs={"level": 1} if compression == "zlib" else None,
                     photometric="rgb", bigtiff=True, metadata=None)
