"""Training and evaluation samples with exact ground truth, made on the fly.

Six kinds of sample, each an RGB image with a soft ground-truth alpha and a
coarse mask:

* ``shapes``: random shapes with thin branches, holes and sharp corners,
  rasterised at 4x supersampling with a 1-2 px anti-aliased edge, filled with a
  texture crop of one photo and pasted onto a crop of another photo.
* ``portraits``: a portrait and its alpha matte composited onto a photo crop.
* ``pairs``: random crops of user image/mask pairs (``--pairs``).
* ``aerial``, ``cells``, ``thin``: one window of a larger scene of that family
  (:mod:`refine_cli.train.scenes`: roofs among roads, trees and water; fluorescent
  nuclei; wires, branches, fences and strands), whose ground truth is exact too.

For the two composite kinds the image is ``round(alpha * fg + (1 - alpha) * bg)``
(:meth:`Layers.composite`), so the ground truth is exactly the alpha used to
make it. The coarse input is a perturbation of the ground truth
(:func:`perturb`): CascadePSP's boundary modification plus random local
dilation/erosion down to a target IoU, low-resolution down/up-sampling, or
blobs added and removed along the boundary; scene kinds can instead use their
``detector`` mask (per-object errors like a cheap instance detector's).

Everything is deterministic: sample ``i`` of a :class:`SampleSpec` comes from
``numpy.random.default_rng([seed, i, stream])`` and does not depend on the
worker, the order of calls, or what was generated before. Photos are decoded
lazily, once per process, and kept downscaled (long side <= ``cache_side``).

Value conventions follow ``refine_cli.config``: images are ``(h, w, 3)`` uint8
RGB, ground truth and coarse masks ``(h, w)`` float32 in ``[0, 1]``, and a
pixel is foreground when its probability is ``>= 0.5``.
"""

from __future__ import annotations

import csv
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from refine_cli.errors import InputError, UsageError
from refine_cli.tiling.grid import Window
from refine_cli.train.scenes import FAMILIES, SceneGenerator

logger = logging.getLogger(__name__)

T = TypeVar("T")

SCENE_KINDS: tuple[str, ...] = FAMILIES
"""Sample kinds cut from a :class:`~refine_cli.train.scenes.SceneGenerator` scene."""

KINDS = ("shapes", "portraits", "pairs", *SCENE_KINDS)
"""Sample kinds :func:`make_sample` can produce."""

PERTURBATIONS = ("cascadepsp", "lowres", "blobs")
"""Coarse-mask perturbations :func:`perturb` implements (functions of the ground truth alone)."""

SCENE_PERTURBATIONS = ("detector",)
"""Coarse masks that come with a scene: ``detector`` is the scene's own detector-like mask.

For kinds outside :data:`SCENE_KINDS` a ``detector`` draw falls back to ``cascadepsp``
(``meta["perturbation"] == "cascadepsp"``, ``meta["requested"] == "detector"``).
"""

COARSE_METHODS = PERTURBATIONS + SCENE_PERTURBATIONS
"""Every name :attr:`SampleSpec.perturbations` accepts."""

SCENE_SCALE = (2.0, 8.0)
"""A scene sample's scene is this many times the sample size per side (log-uniform)."""

SCENE_DENSITY = (0.5, 2.0)
"""Range of a scene sample's object density factor (log-uniform)."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")
"""File suffixes read as photos (case-insensitive)."""

SUPERSAMPLE = 4
"""Shapes are drawn at this many sub-pixels per pixel side, then box-filtered down."""

PORTRAIT_CACHE_SIDE = 2048
"""Portraits are kept up to this long side (the shared ones are <= 1920 px)."""

_STREAM_LAYERS, _STREAM_COARSE, _STREAM_CROP = 0, 1, 2

Weights = tuple[tuple[str, float], ...]
"""Relative weights by name as sorted ``(("shapes", 0.7), ...)`` pairs; :class:`SampleSpec` also
accepts ``{"shapes": 0.7, ...}`` or bare names (weight 1) and stores the pairs."""


def default_data_dir() -> Path | None:
    """``../shared/data`` next to the repository checkout, if it exists.

    Returns:
        The folder, or ``None`` when the package is not run from a checkout that
        has ``shared/`` beside it.
    """
    repo = Path(__file__).resolve().parents[2]
    candidate = repo.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def _default_subdir(name: str) -> Path | None:
    root = default_data_dir()
    if root is None or not (root / name).is_dir():
        return None
    return root / name


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class SampleSpec:
    """What :func:`make_sample` generates.

    Attributes:
        size: ``(height, width)`` of every sample, px (>= 32 each); one int means a square.
        seed: base seed; sample ``i`` uses ``default_rng([seed, i, stream])``.
        kinds: relative weights of ``shapes`` / ``portraits`` / ``pairs`` / ``aerial`` /
            ``cells`` / ``thin`` (a mapping is accepted and stored as sorted ``(name, weight)``
            pairs); the default has no scene kinds.
        perturbations: relative weights of the coarse-mask perturbations
            (``cascadepsp`` / ``lowres`` / ``blobs`` / ``detector``; ``detector`` applies to
            scene kinds only and falls back to ``cascadepsp`` for the others).
        strength: perturbation strength in ``(0, 2]``; 1 is CascadePSP's recipe
            (target IoU in ``[0.8, 1)``, low-res factors 4-32).
        photos: folder of photos for textures and backgrounds (searched
            recursively); ``None`` uses ``../shared/data/photos`` when present. Scene
            kinds fall back to procedural textures when there is none.
        portraits: folder with ``image/`` and ``alpha*/`` (same stems); ``None``
            uses ``../shared/data/p3m-portraits-pseudogt`` when present, and drops
            the ``portraits`` kind with a log message when it is absent.
        pairs: a CSV (columns ``image,mask``) or a folder of image/mask pairs.
        cache_side: photos are kept in memory with their long side at most this, px.
        edge_width: range of the anti-aliased edge width of shapes, px, within ``[1, 2]``.
    """

    size: tuple[int, int] = (224, 224)
    seed: int = 0
    kinds: Weights = (("portraits", 0.3), ("shapes", 0.7))
    perturbations: Weights = (("blobs", 0.25), ("cascadepsp", 0.5), ("lowres", 0.25))
    strength: float = 1.0
    photos: Path | None = None
    portraits: Path | None = None
    pairs: Path | None = None
    cache_side: int = 1536
    edge_width: tuple[float, float] = (1.0, 2.0)

    def __post_init__(self) -> None:
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(int(s) for s in self.size)
        if len(size) != 2 or min(size) < 32:
            raise UsageError(f"--size {self.size} is invalid: give one or two sides of at least 32 px")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "kinds", _weights(self.kinds, KINDS, "--kinds"))
        perts = _weights(self.perturbations, COARSE_METHODS, "--perturbations")
        object.__setattr__(self, "perturbations", perts)
        if not 0.0 < self.strength <= 2.0:
            raise UsageError(f"--strength {self.strength} must be in (0, 2]")
        if self.cache_side < 256:
            raise UsageError(f"--cache-side {self.cache_side} is too small: use 256 or more")
        lo, hi = (float(v) for v in self.edge_width)
        if not 1.0 <= lo <= hi <= 2.0:
            raise UsageError(f"edge width {self.edge_width} must satisfy 1 <= low <= high <= 2 (px)")
        object.__setattr__(self, "edge_width", (lo, hi))
        for name in ("photos", "portraits", "pairs"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value).expanduser())
        if self.photos is None:
            object.__setattr__(self, "photos", _default_subdir("photos"))
        if self.portraits is None and self.weight("portraits") > 0:
            object.__setattr__(self, "portraits", _default_subdir("p3m-portraits-pseudogt"))
            if self.portraits is None:
                logger.info("no portraits folder (--portraits) found; generating shapes and pairs only")
                kinds = tuple((k, w) for k, w in self.kinds if k != "portraits")
                if not any(w > 0 for _, w in kinds):
                    raise UsageError("no sample kind left without portraits: pass --portraits DIR")
                object.__setattr__(self, "kinds", kinds)
        if self.weight("pairs") > 0 and self.pairs is None:
            raise UsageError("sample kind 'pairs' needs --pairs (a CSV or a folder of image/mask pairs)")

    def weight(self, kind: str) -> float:
        """Relative weight of a sample kind (0 when absent)."""
        return dict(self.kinds).get(kind, 0.0)


def _weights(value: Any, names: Sequence[str], flag: str) -> tuple[tuple[str, float], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    if isinstance(items, str):
        items = [(items, 1.0)]
    out: dict[str, float] = {}
    for item in items:
        name, w = (item, 1.0) if isinstance(item, str) else item
        if name not in names:
            raise UsageError(f"{flag}: unknown name {name!r}; use {', '.join(names)}")
        if not w >= 0:
            raise UsageError(f"{flag}: weight of {name!r} must be >= 0, got {w}")
        out[name] = float(w)
    if not any(w > 0 for w in out.values()):
        raise UsageError(f"{flag}: at least one weight must be positive")
    return tuple(sorted(out.items()))


def _choose(rng: np.random.Generator, weighted: Sequence[tuple[str, float]]) -> str:
    names = [n for n, w in weighted if w > 0]
    w = np.array([w for _, w in weighted if w > 0], dtype=np.float64)
    return names[int(rng.choice(len(names), p=w / w.sum()))]


def _rng(spec_seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([spec_seed & 0xFFFFFFFF, index, stream])


# ------------------------------------------------------------------------ samples


@dataclass
class Sample:
    """One training or evaluation sample.

    Attributes:
        image: ``(h, w, 3)`` uint8 RGB.
        gt: ``(h, w)`` float32 ground-truth alpha in ``[0, 1]``.
        coarse: ``(h, w)`` float32 coarse mask in ``[0, 1]``.
        kind: one of :data:`KINDS`.
        meta: JSON-serialisable description (sources, placement, ``perturbation``
            and its parameters, ``coarse_iou`` against the hard GT ...; scene kinds add
            ``scene``: family, shape, seed, density, window ``[row, col, h, w]``).
    """

    image: np.ndarray
    gt: np.ndarray
    coarse: np.ndarray
    kind: str
    meta: dict[str, Any]

    @property
    def hard(self) -> np.ndarray:
        """``(h, w)`` bool hard ground truth, ``gt >= 0.5``."""
        return self.gt >= 0.5


@dataclass
class Layers:
    """The parts of a composite.

    Attributes:
        fg: ``(h, w, 3)`` uint8 RGB foreground.
        bg: ``(h, w, 3)`` uint8 RGB background.
        alpha: ``(h, w)`` float32 in ``[0, 1]``, the ground truth.
    """

    fg: np.ndarray
    bg: np.ndarray
    alpha: np.ndarray

    def composite(self) -> np.ndarray:
        """``round(alpha * fg + (1 - alpha) * bg)`` as ``(h, w, 3)`` uint8 RGB (float32 maths)."""
        return composite(self.fg, self.bg, self.alpha)


def composite(fg: np.ndarray, bg: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-blend two RGB images.

    Args:
        fg: ``(h, w, 3)`` uint8.
        bg: ``(h, w, 3)`` uint8.
        alpha: ``(h, w)`` float32 in ``[0, 1]``.

    Returns:
        ``(h, w, 3)`` uint8, ``rint(alpha * fg + (1 - alpha) * bg)`` computed in float32.
    """
    a = alpha.astype(np.float32, copy=False)[..., None]
    out = a * fg.astype(np.float32) + (np.float32(1.0) - a) * bg.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make_sample(
    index: int,
    spec: SampleSpec,
    *,
    kind: str | None = None,
    perturbation: str | None = None,
    strength: float | None = None,
) -> Sample:
    """Generate sample ``index`` of ``spec``.

    Args:
        index: sample number (>= 0); the same index always gives the same arrays.
        spec: what to generate.
        kind: force a kind instead of drawing it from ``spec.kinds``.
        perturbation: force a coarse perturbation instead of drawing it; ``detector``
            uses a scene kind's detector mask and means ``cascadepsp`` for other kinds.
        strength: override ``spec.strength`` for the coarse mask (not used by ``detector``).

    Returns:
        A :class:`Sample` of size ``spec.size``. Scene kinds render one window of a
        scene 2-8 times the sample size (:func:`scene_crop`).

    Raises:
        InputError: a data folder (``--photos``, ``--portraits``, ``--pairs``) is
            missing or holds nothing readable.
    """
    rng = _rng(spec.seed, index, _STREAM_LAYERS)
    drawn = _choose(rng, spec.kinds)  # always drawn, so forcing the drawn kind changes nothing
    kind = kind or drawn
    if kind not in KINDS:
        raise UsageError(f"unknown sample kind {kind!r}; use {', '.join(KINDS)}")
    detector = None
    if kind == "pairs":
        image, gt, meta = _pair_crop(index, spec, rng)
    elif kind in SCENE_KINDS:
        image, gt, detector, meta = scene_crop(kind, spec, rng)
    else:
        layers, meta = _make_layers(kind, index, spec, rng)
        image, gt = layers.composite(), layers.alpha
    crng = _rng(spec.seed, index, _STREAM_COARSE)
    drawn = _choose(crng, spec.perturbations)
    method = perturbation or drawn
    strength = spec.strength if strength is None else strength
    if method == "detector" and detector is not None:
        if not 0.0 < strength <= 2.0:
            raise UsageError(f"--strength {strength} must be in (0, 2]")
        coarse = detector
        pmeta = {"perturbation": "detector", "strength": float(strength),
                 "coarse_iou": iou(detector >= 0.5, gt >= 0.5)}
    elif method == "detector":  # not a scene kind: no detector mask to use
        coarse, pmeta = perturb(gt, "cascadepsp", crng, strength)
        pmeta["requested"] = "detector"
    else:
        coarse, pmeta = perturb(gt, method, crng, strength)
    meta = {"index": int(index), "kind": kind, **meta, **pmeta}
    return Sample(image=image, gt=gt, coarse=coarse, kind=kind, meta=meta)


def scene_crop(
    kind: str, spec: SampleSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """One ``spec.size`` window of a random scene of family ``kind``.

    The scene is :data:`SCENE_SCALE` times the sample size per side, with a seed and
    a density (:data:`SCENE_DENSITY`) drawn from ``rng``; textures come from
    ``spec.photos`` (procedural without photos). Windows with (almost) no
    foreground or background are redrawn, up to 3 times.

    Args:
        kind: one of :data:`SCENE_KINDS`.
        spec: size and photo folder.
        rng: random generator (consumed).

    Returns:
        image ``(h, w, 3)`` uint8 RGB, gt ``(h, w)`` float32 in ``[0, 1]``, the scene's
        detector mask ``(h, w)`` float32 in ``[0, 1]``, and meta ``{"scene": {...}}``.
    """
    h, w = spec.size
    lo, hi = SCENE_SCALE
    f = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    shape = (int(round(h * f)), int(round(w * f)))
    seed = int(rng.integers(2**63))
    dlo, dhi = SCENE_DENSITY
    density = float(math.exp(rng.uniform(math.log(dlo), math.log(dhi))))
    photos = sources(spec).photos if spec.photos is not None else None
    gen = SceneGenerator(kind, shape, seed, photos, density)
    for attempt in range(1, 5):
        y0, x0 = int(rng.integers(0, shape[0] - h + 1)), int(rng.integers(0, shape[1] - w + 1))
        sw = gen.render(Window(y0, x0, h, w))
        meta = {"scene": {"family": kind, "shape": list(shape), "seed": seed, "density": density,
                          "window": [y0, x0, h, w], "attempts": attempt}}
        if 0.002 < np.count_nonzero(sw.gt >= 0.5) / sw.gt.size < 0.998:
            break
    return sw.image, sw.gt, sw.detector, meta


def make_layers(index: int, spec: SampleSpec, kind: str | None = None) -> tuple[Layers, dict[str, Any]]:
    """The foreground, background and alpha of composite sample ``index``.

    ``make_sample(index, spec, kind=k)`` composites exactly these layers.

    Args:
        index: sample number.
        spec: what to generate.
        kind: ``shapes`` or ``portraits``; ``None`` draws it as :func:`make_sample` does.

    Returns:
        ``(layers, meta)``.
    """
    rng = _rng(spec.seed, index, _STREAM_LAYERS)
    drawn = _choose(rng, spec.kinds)
    kind = kind or drawn
    if kind not in ("shapes", "portraits"):
        raise UsageError(f"kind {kind!r} is not a composite: use shapes or portraits")
    return _make_layers(kind, index, spec, rng)


def _make_layers(
    kind: str, index: int, spec: SampleSpec, rng: np.random.Generator
) -> tuple[Layers, dict[str, Any]]:
    src = sources(spec)
    h, w = spec.size
    if kind == "shapes":
        alpha, smeta = render_shapes((h, w), rng, spec.edge_width)
        i_fg = int(rng.integers(len(src.photos)))
        # A different photo for the background, except sometimes the same one (a hard case).
        if len(src.photos) > 1 and rng.random() >= 0.1:
            i_bg = int((i_fg + 1 + rng.integers(len(src.photos) - 1)) % len(src.photos))
        else:
            i_bg = i_fg
        fg, fmeta = src.photos.crop(i_fg, (h, w), rng)
        bg, bmeta = src.photos.crop(i_bg, (h, w), rng)
        meta = {"shapes": smeta, "fg": fmeta, "bg": bmeta}
        return Layers(fg, bg, alpha), meta
    pid = index % len(src.portraits)
    fg, alpha, pmeta = src.portraits.place(pid, (h, w), rng)
    bg, bmeta = src.photos.crop(int(rng.integers(len(src.photos))), (h, w), rng)
    return Layers(fg, bg, alpha), {"portrait": pmeta, "bg": bmeta}


# ------------------------------------------------------------------------ sources


class _LRU(Generic[T]):
    """A small least-recently-used cache of loaded items."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[int, T] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: int, load: Callable[[], T]) -> T:
        """The item of ``key``, loaded with ``load()`` (outside the lock) when it is not cached."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = load()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value


def _read_rgb(path: Path, flag: str) -> np.ndarray:
    im = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if im is None:
        raise InputError(f"cannot read image {path} ({flag}); check that it is a valid image file")
    return cv2.cvtColor(im, cv2.COLOR_BGR2RGB)


def _read_mask(path: Path, flag: str) -> np.ndarray:
    """Read a mask as float32 ``[0, 1]``: 8-bit /255, 16-bit /65535, max 1 read as 0/1, floats clipped."""
    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if m is None:
        raise InputError(f"cannot read mask {path} ({flag}); check that it is a valid image file")
    if m.ndim == 3:
        m = m[..., 3] if m.shape[2] == 4 and m[..., 3].min() != m[..., 3].max() else m[..., 0]
    if m.dtype == np.bool_:
        return m.astype(np.float32)
    if np.issubdtype(m.dtype, np.floating):
        return np.clip(m.astype(np.float32), 0.0, 1.0)
    top = float(m.max()) if m.size else 0.0
    if top <= 1:
        return m.astype(np.float32)
    scale = 65535.0 if m.dtype == np.uint16 else 255.0
    result: np.ndarray = np.clip(m.astype(np.float32) / scale, 0.0, 1.0)
    return result


def _downscale(im: np.ndarray, max_side: int) -> np.ndarray:
    h, w = im.shape[:2]
    if max(h, w) <= max_side:
        return im
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(im, size, interpolation=cv2.INTER_AREA)


class _Pyramid:
    """An image and its successive 2x INTER_AREA reductions, built on demand."""

    def __init__(self, base: np.ndarray) -> None:
        self.levels = [base]

    def level(self, k: int) -> np.ndarray:
        while len(self.levels) <= k:
            prev = self.levels[-1]
            h, w = prev.shape[:2]
            size = (max(1, (w + 1) // 2), max(1, (h + 1) // 2))
            self.levels.append(cv2.resize(prev, size, interpolation=cv2.INTER_AREA))
        return self.levels[k]


def _window_resize(
    pyrs: Sequence[_Pyramid],
    zoom: float,
    size: tuple[int, int],
    rng: np.random.Generator,
    center: tuple[float, float] | None = None,
) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Crop the same window of ``zoom`` source px per output px from each pyramid, resized to ``size``.

    All pyramids must share the base size. The window is read from the
    coarsest level that still has at least one px per output px, centred on
    ``center`` (base px, row/col) when given, else placed at random; zooms
    below 1 upsample (bilinear), others reduce with INTER_AREA. ``zoom`` must be
    small enough for the window to fit the base image.
    """
    h, w = size
    base = pyrs[0].levels[0]
    k = max(0, int(math.floor(math.log2(zoom)))) if zoom >= 2 else 0
    while k > 0 and min(pyrs[0].level(k).shape[:2]) < 8:
        k -= 1
    levels = [p.level(k) for p in pyrs]
    lh, lw = levels[0].shape[:2]
    ry, rx = lh / base.shape[0], lw / base.shape[1]
    wh = min(lh, max(1, round(h * zoom * ry)))
    ww = min(lw, max(1, round(w * zoom * rx)))
    if center is None:
        y0 = int(rng.integers(0, lh - wh + 1))
        x0 = int(rng.integers(0, lw - ww + 1))
    else:
        y0 = int(np.clip(round(center[0] * ry - wh / 2), 0, lh - wh))
        x0 = int(np.clip(round(center[1] * rx - ww / 2), 0, lw - ww))
    interp = cv2.INTER_AREA if (wh > h or ww > w) else cv2.INTER_LINEAR
    outs = []
    for lev in levels:
        win = lev[y0 : y0 + wh, x0 : x0 + ww]
        outs.append(cv2.resize(win, (w, h), interpolation=interp) if (wh, ww) != (h, w) else win.copy())
    meta = {"zoom": float(zoom), "level": k, "window": [int(y0), int(x0), int(wh), int(ww)]}
    return outs, meta


class PhotoBank:
    """Photos from a folder, decoded lazily and cached downscaled.

    Args:
        folder: searched recursively for :data:`IMAGE_SUFFIXES` files.
        cache_side: cached long side, px.
        flag: CLI flag named in errors.
    """

    def __init__(self, folder: Path | None, cache_side: int = 1536, flag: str = "--photos") -> None:
        if folder is None:
            raise InputError(f"no photo folder given: pass {flag} DIR (any folder of JPEG/PNG photos)")
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"photo folder {folder} ({flag}) does not exist; pass a folder of photos")
        self.paths = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not self.paths:
            raise InputError(f"no photos found in {folder} ({flag}); pass a folder of JPEG/PNG photos")
        self.cache_side = cache_side
        self.flag = flag
        self._cache: _LRU[_Pyramid] = _LRU(capacity=max(64, len(self.paths)))

    def __len__(self) -> int:
        return len(self.paths)

    def pyramid(self, i: int) -> _Pyramid:
        """The cached pyramid of photo ``i`` (``(h, w, 3)`` uint8 RGB levels)."""

        def load() -> _Pyramid:
            im = _read_rgb(self.paths[i], self.flag)
            if min(im.shape[:2]) < 32:
                raise InputError(f"photo {self.paths[i]} ({self.flag}) is smaller than 32 px; remove it")
            logger.debug("loaded photo %s %s", self.paths[i].name, im.shape)
            return _Pyramid(_downscale(im, self.cache_side))

        return self._cache.get(i, load)

    def crop(
        self, i: int, size: tuple[int, int], rng: np.random.Generator
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """A random crop of photo ``i`` at a random zoom, resized to ``size``, maybe mirrored.

        Returns:
            ``(h, w, 3)`` uint8 RGB and a meta dict (``photo``, ``zoom``, ``window``, ``flip``).
        """
        pyr = self.pyramid(i)
        ph, pw = pyr.levels[0].shape[:2]
        zmax = min(ph / size[0], pw / size[1])
        zlo = min(zmax, max(0.6, 0.25 * zmax))
        zoom = float(math.exp(rng.uniform(math.log(zlo), math.log(zmax)))) if zmax > zlo else zmax
        (out,), meta = _window_resize([pyr], zoom, size, rng)
        flip = bool(rng.random() < 0.5)
        if flip:
            out = np.ascontiguousarray(out[:, ::-1])
        return out, {"photo": self.paths[i].name, **meta, "flip": flip}


@dataclass
class _Portrait:
    """A cached portrait: pyramids, (row, col) boundary points, alpha bbox (r0, r1, c0, c1), touched sides."""

    image: _Pyramid
    alpha: _Pyramid
    points: np.ndarray
    box: tuple[int, int, int, int]
    touches: tuple[bool, bool, bool, bool]


class PortraitBank:
    """Portraits with alpha mattes: ``image/<id>.jpg`` + ``alpha*/<id>.png``.

    Args:
        folder: the folder holding ``image/`` (or ``images/``) and an ``alpha*`` folder.
        flag: CLI flag named in errors.
    """

    def __init__(self, folder: Path, flag: str = "--portraits") -> None:
        folder = Path(folder)
        img_dir = next((folder / d for d in ("image", "images") if (folder / d).is_dir()), None)
        alpha_dirs = sorted(d for d in folder.glob("alpha*") if d.is_dir()) if folder.is_dir() else []
        if img_dir is None or not alpha_dirs:
            raise InputError(
                f"portrait folder {folder} ({flag}) needs image/ and alpha*/ subfolders with matching names"
            )
        alphas = {p.stem: p for p in alpha_dirs[0].iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        self.items = [
            (p, alphas[p.stem])
            for p in sorted(img_dir.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in alphas
        ]
        if not self.items:
            raise InputError(f"no image/alpha pairs with matching names in {folder} ({flag})")
        self.flag = flag
        self._cache: _LRU[_Portrait] = _LRU(capacity=max(16, len(self.items)))

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> _Portrait:
        """Portrait ``i``, decoded on first use and cached."""

        def load() -> _Portrait:
            img_path, alpha_path = self.items[i]
            im = _downscale(_read_rgb(img_path, self.flag), PORTRAIT_CACHE_SIDE)
            a = _downscale(_read_mask(alpha_path, self.flag), PORTRAIT_CACHE_SIDE)
            if a.shape != im.shape[:2]:
                raise InputError(
                    f"alpha {alpha_path} size {a.shape} differs from image {im.shape[:2]} ({self.flag})"
                )
            rows = np.flatnonzero(a.max(axis=1) > 0.02)
            cols = np.flatnonzero(a.max(axis=0) > 0.02)
            if len(rows) == 0:
                raise InputError(f"alpha {alpha_path} ({self.flag}) is empty")
            pts = np.argwhere(_boundary(a >= 0.5) | ((a > 0.05) & (a < 0.95)))
            if len(pts) > 4096:
                pts = pts[:: len(pts) // 4096]
            touches = tuple(bool(e.max() > 0.02) for e in (a[0], a[-1], a[:, 0], a[:, -1]))
            box = (int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1]))
            return _Portrait(_Pyramid(im), _Pyramid(a), pts, box, touches)  # type: ignore[arg-type]

        return self._cache.get(i, load)

    def place(
        self, i: int, size: tuple[int, int], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Portrait ``i`` at a random scale and position on a ``size`` canvas, maybe mirrored.

        The person's height spans 0.6-2.5 canvas heights and a random point of
        the matte's boundary (60 %) or the person's centre lands in the middle
        half of the canvas. Sides where the matte touches the portrait's border
        (the body cut at the bottom) are kept outside the canvas, so no
        artificial straight edge shows. Placements whose canvas is (almost) all
        foreground or all background are redrawn, up to 6 times.

        Returns:
            fg ``(h, w, 3)`` uint8 RGB (0 outside the portrait), alpha ``(h, w)``
            float32 in ``[0, 1]`` (0 outside), and a meta dict.
        """
        p = self.load(i)
        ph, pw = p.alpha.levels[0].shape
        h, w = size
        top, bottom, left, right = p.touches
        r0, r1, c0, c1 = p.box
        for attempt in range(6):  # redraw placements that leave the canvas all fore- or background
            s = float(math.exp(rng.uniform(math.log(0.6), math.log(2.5)))) * h / (r1 - r0 + 1)
            if attempt >= 3:
                s = min(s, h / (r1 - r0 + 1))
            if top and bottom:
                s = max(s, (h + 2) / ph)
            if left and right:
                s = max(s, (w + 2) / pw)
            if rng.random() < 0.6 and len(p.points):
                ay, ax = (float(v) for v in p.points[int(rng.integers(len(p.points)))])
            else:
                ay, ax = (r0 + r1) / 2.0, (c0 + c1) / 2.0
            oy = rng.uniform(0.25, 0.75) * h - ay * s
            ox = rng.uniform(0.25, 0.75) * w - ax * s
            oy = _clamp_offset(oy, h, ph * s, top, bottom)
            ox = _clamp_offset(ox, w, pw * s, left, right)
            k = max(0, int(math.floor(-math.log2(s)))) if s < 1 else 0
            fg_l, a_l = p.image.level(k), p.alpha.level(k)
            sy, sx = s * ph / fg_l.shape[0], s * pw / fg_l.shape[1]
            m = np.array([[sx, 0.0, ox + 0.5 * (sx - 1)], [0.0, sy, oy + 0.5 * (sy - 1)]], dtype=np.float64)
            alpha = np.clip(_warp(a_l, m, (w, h)), 0.0, 1.0).astype(np.float32)
            if 0.002 < np.count_nonzero(alpha >= 0.5) / alpha.size < 0.998:
                break
        fg = _warp(fg_l, m, (w, h))
        flip = bool(rng.random() < 0.5)
        if flip:
            fg, alpha = np.ascontiguousarray(fg[:, ::-1]), np.ascontiguousarray(alpha[:, ::-1])
        meta = {
            "id": self.items[i][0].stem,
            "scale": s,
            "offset": [float(oy), float(ox)],
            "level": k,
            "flip": flip,
        }
        return fg, alpha, meta


def _warp(im: np.ndarray, m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear affine warp to ``size`` (w, h), zero outside the source."""
    return cv2.warpAffine(im, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _clamp_offset(o: float, canvas: int, extent: float, touch_lo: bool, touch_hi: bool) -> float:
    """Keep portrait sides that touch its border outside the canvas (1 px margin)."""
    lo, hi = -math.inf, math.inf
    if touch_lo:
        hi = -1.0
    if touch_hi:
        lo = canvas + 1.0 - extent
    if lo > hi:
        return (lo + hi) / 2.0
    return float(min(max(o, lo), hi))


class PairBank:
    """User image/mask pairs from a CSV or a folder.

    Layouts (``--pairs``):

    * a CSV with columns ``image`` and ``mask`` (or two unnamed columns); relative
      paths are relative to the CSV's folder;
    * a folder with ``images/`` and ``masks/`` (or ``image/`` + ``mask/``, ``im/`` + ``gt/``)
      holding files with the same stem;
    * a flat folder with ``NAME.jpg`` next to ``NAME_mask.png`` (or ``NAME_gt.png``).

    Masks: grey, 0 = background; 8-bit 255 = foreground, 16-bit 65535; a mask
    whose maximum is 1 is read as 0/1; soft values are kept.

    Args:
        source: the CSV or folder.
        cache_side: long side of cached pairs, px.
        capacity: number of decoded pairs kept in memory.
    """

    FLAG = "--pairs"

    def __init__(self, source: Path, cache_side: int = 2048, capacity: int = 32) -> None:
        source = Path(source)
        if not source.exists():
            raise InputError(
                f"{source} ({self.FLAG}) does not exist; pass a CSV or a folder of image/mask pairs"
            )
        self.items = self._csv(source) if source.is_file() else self._folder(source)
        if not self.items:
            raise InputError(
                f"no image/mask pairs found in {source} ({self.FLAG}); use a CSV with image,mask columns, "
                "images/ + masks/ folders, or NAME.jpg + NAME_mask.png"
            )
        self.cache_side = cache_side
        self._cache: _LRU[tuple[_Pyramid, _Pyramid, np.ndarray]] = _LRU(capacity=capacity)

    def _csv(self, path: Path) -> list[tuple[Path, Path]]:
        with path.open(newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
        if not rows:
            return []
        head = [c.strip().lower() for c in rows[0]]
        if "image" in head and "mask" in head:
            ii, mi = head.index("image"), head.index("mask")
            rows = rows[1:]
        else:
            ii, mi = 0, 1
        items = []
        for r in rows:
            if len(r) <= max(ii, mi):
                raise InputError(f"{path} ({self.FLAG}): row {r} lacks an image or mask column")
            im, mk = (path.parent / r[ii].strip(), path.parent / r[mi].strip())
            for p in (im, mk):
                if not p.is_file():
                    raise InputError(f"{path} ({self.FLAG}) lists {p}, which does not exist")
            items.append((im, mk))
        return items

    def _folder(self, folder: Path) -> list[tuple[Path, Path]]:
        def files(d: Path) -> dict[str, Path]:
            return {
                p.stem: p for p in sorted(d.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            }

        for a, b in (("images", "masks"), ("image", "mask"), ("im", "gt"), ("images", "gt")):
            if (folder / a).is_dir() and (folder / b).is_dir():
                ims, mks = files(folder / a), files(folder / b)
                return [(ims[k], mks[k]) for k in sorted(ims) if k in mks]
        flat = files(folder)
        items = []
        for stem, p in sorted(flat.items()):
            for suffix in ("_mask", "_gt"):
                if stem.endswith(suffix):
                    break
            else:
                mk = flat.get(stem + "_mask") or flat.get(stem + "_gt")
                if mk is not None:
                    items.append((p, mk))
        return items

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> tuple[_Pyramid, _Pyramid, np.ndarray]:
        """Cached ``(image pyramid, mask pyramid, boundary points)`` of pair ``i``."""

        def load() -> tuple[_Pyramid, _Pyramid, np.ndarray]:
            img_path, mask_path = self.items[i]
            im = _read_rgb(img_path, self.FLAG)
            m = _read_mask(mask_path, self.FLAG)
            if m.shape != im.shape[:2]:
                raise InputError(
                    f"mask {mask_path} is {m.shape[1]}x{m.shape[0]} but image {img_path} is "
                    f"{im.shape[1]}x{im.shape[0]} ({self.FLAG}); resize the mask to the image"
                )
            im, m = _downscale(im, self.cache_side), _downscale(m, self.cache_side)
            pts = np.argwhere(_boundary(m >= 0.5))
            if len(pts) > 4096:
                pts = pts[:: len(pts) // 4096]
            return _Pyramid(im), _Pyramid(m), pts

        return self._cache.get(i, load)


def _pair_crop(index: int, spec: SampleSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    bank = sources(spec).pairs
    i = index % len(bank)
    img_pyr, m_pyr, pts = bank.load(i)
    ph, pw = m_pyr.levels[0].shape
    h, w = spec.size
    zfit = min(ph / h, pw / w)  # source px per output px that shows the whole short side
    if zfit <= 1:
        zoom = zfit
    else:
        zoom = float(math.exp(rng.uniform(0.0, math.log(zfit))))
    center = None
    if len(pts) and rng.random() < 0.8:
        cy, cx = pts[int(rng.integers(len(pts)))]
        center = (cy + rng.uniform(-0.3, 0.3) * h * zoom, cx + rng.uniform(-0.3, 0.3) * w * zoom)
    (image, gt), imeta = _window_resize([img_pyr, m_pyr], zoom, (h, w), rng, center)
    gt = np.clip(gt.astype(np.float32), 0.0, 1.0)
    flip = bool(rng.random() < 0.5)
    if flip:
        image, gt = np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(gt[:, ::-1])
    meta = {"pair": bank.items[i][0].name, **imeta, "flip": flip}
    return image, gt, meta


class Sources:
    """The data folders of one spec, each listed on first use and then shared (see :func:`sources`).

    Attributes:
        spec: the spec whose folders these are.
    """

    def __init__(self, spec: SampleSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._photos: PhotoBank | None = None
        self._portraits: PortraitBank | None = None
        self._pairs: PairBank | None = None

    @property
    def photos(self) -> PhotoBank:
        """Photos for textures and backgrounds (``--photos``)."""
        with self._lock:
            if self._photos is None:
                self._photos = PhotoBank(self.spec.photos, self.spec.cache_side)
            return self._photos

    @property
    def portraits(self) -> PortraitBank:
        """Portraits with mattes (``--portraits``)."""
        with self._lock:
            if self._portraits is None:
                if self.spec.portraits is None:
                    raise InputError("portrait samples need --portraits DIR (with image/ and alpha*/)")
                self._portraits = PortraitBank(self.spec.portraits)
            return self._portraits

    @property
    def pairs(self) -> PairBank:
        """User image/mask pairs (``--pairs``)."""
        with self._lock:
            if self._pairs is None:
                if self.spec.pairs is None:
                    raise UsageError("sample kind 'pairs' needs --pairs (a CSV or a folder of pairs)")
                self._pairs = PairBank(self.spec.pairs)
            return self._pairs

    def check(self) -> None:
        """List every folder the spec's positive-weight kinds need, raising on the first missing one."""
        if self.spec.weight("shapes") > 0 or self.spec.weight("portraits") > 0:
            _ = self.photos
        elif self.spec.photos is not None and any(self.spec.weight(k) > 0 for k in SCENE_KINDS):
            _ = self.photos
        if self.spec.weight("portraits") > 0:
            _ = self.portraits
        if self.spec.weight("pairs") > 0:
            _ = self.pairs


_SOURCES: dict[tuple[Any, ...], Sources] = {}
_SOURCES_LOCK = threading.Lock()


def sources(spec: SampleSpec, check: bool = False) -> Sources:
    """The data folders of ``spec``, shared by all samples of this process.

    Args:
        spec: the spec.
        check: list every folder the spec needs now instead of on first use.

    Raises:
        InputError: a folder is missing or holds nothing usable; the message
            names the flag (``--photos``, ``--portraits``, ``--pairs``).
    """
    key = (spec.photos, spec.portraits, spec.pairs, spec.cache_side)
    with _SOURCES_LOCK:
        src = _SOURCES.get(key)
        if src is None:
            src = _SOURCES[key] = Sources(spec)
    if check:
        src.check()
    return src


# ------------------------------------------------------------------------- shapes


def rasterize(mask_ss: np.ndarray, factor: int, edge_width: float = 1.0) -> np.ndarray:
    """Turn a supersampled binary mask into an anti-aliased alpha.

    The mask is box-filtered over ``edge_width`` output px and averaged over
    ``factor x factor`` blocks, so a straight edge ramps from 0 to 1 over
    ``edge_width`` px (quantised to ``1 / factor`` px).

    Args:
        mask_ss: ``(h * factor, w * factor)`` uint8 or bool, nonzero = inside.
        factor: supersampling factor (>= 1).
        edge_width: ramp width in output px, in ``[1, 2]``.

    Returns:
        ``(h, w)`` float32 alpha in ``[0, 1]``.
    """
    hs, ws = mask_ss.shape
    if hs % factor or ws % factor:
        raise ValueError(f"mask size {mask_ss.shape} is not a multiple of {factor}")
    f: np.ndarray = mask_ss.astype(np.float32)
    k = 1 + int(round((edge_width - 1.0) * factor))
    if k > 1:
        f = cv2.blur(f, (k, k), borderType=cv2.BORDER_REPLICATE)
    out = cv2.resize(f, (ws // factor, hs // factor), interpolation=cv2.INTER_AREA)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _ss(pts: np.ndarray, s: int) -> np.ndarray:
    """Polygon vertices (x, y) in px -> int32 supersampled coordinates."""
    return np.round(pts * s).astype(np.int32)


def _random_polygon(
    rng: np.random.Generator, center: np.ndarray, radius: float, star: bool
) -> np.ndarray:
    n = int(rng.integers(4, 10)) if star else int(rng.integers(3, 10))
    if star:
        angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    else:
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    angles = angles + rng.uniform(0, 2 * np.pi)
    if star:
        inner = rng.uniform(0.25, 0.6)
        angles = np.repeat(angles, 2)
        angles[1::2] += np.pi / n
        radii = np.tile([1.0, inner], n) * rng.uniform(0.8, 1.0, 2 * n)
    else:
        radii = rng.uniform(0.5, 1.0, n)
    pts: np.ndarray = center + radius * radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return pts


def _blob(
    rng: np.random.Generator, canvas: np.ndarray, center: np.ndarray, radius: float, s: int, value: int
) -> None:
    """Draw a smoothed-noise blob (may have holes and several parts) into ``canvas`` (SS px)."""
    g = int(rng.integers(3, 8))
    noise = rng.standard_normal((g, g)).astype(np.float32)
    side = max(8, int(2 * radius * s))
    field_: np.ndarray = cv2.resize(noise, (side, side), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.ogrid[:side, :side]
    r2 = ((yy - side / 2) ** 2 + (xx - side / 2) ** 2) / (side / 2) ** 2
    field_ += np.float32(rng.uniform(0.6, 1.6)) * (1.0 - r2.astype(np.float32)) - np.float32(0.6)
    blob = field_ > 0
    y0, x0 = int(center[1] * s) - side // 2, int(center[0] * s) - side // 2
    cy0, cx0 = max(0, y0), max(0, x0)
    cy1, cx1 = min(canvas.shape[0], y0 + side), min(canvas.shape[1], x0 + side)
    if cy1 <= cy0 or cx1 <= cx0:
        return
    region = canvas[cy0:cy1, cx0:cx1]
    region[blob[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]] = value


def _branches(
    rng: np.random.Generator, canvas: np.ndarray, start: np.ndarray, scale: float, s: int, value: int
) -> int:
    """Draw a small tree of thin line segments (1-5 px wide); returns the segment count."""
    stack = [(start, rng.uniform(0, 2 * np.pi), float(rng.uniform(1.0, 5.0)), 0)]
    count = 0
    while stack and count < 24:
        p, ang, width, depth = stack.pop()
        length = scale * rng.uniform(0.15, 0.45)
        q = p + length * np.array([np.cos(ang), np.sin(ang)])
        thick = max(1, int(round(width * s)))
        cv2.line(canvas, tuple(int(v) for v in p * s), tuple(int(v) for v in q * s), value, thick, cv2.LINE_8)
        count += 1
        if depth < 3:
            for _ in range(int(rng.integers(1, 3))):
                child = max(1.0, width * rng.uniform(0.5, 0.9))
                stack.append((q, ang + rng.uniform(-1.0, 1.0), child, depth + 1))
    return count


def render_shapes(
    size: tuple[int, int], rng: np.random.Generator, edge_width: tuple[float, float] = (1.0, 2.0)
) -> tuple[np.ndarray, dict[str, Any]]:
    """A random shape scene as an anti-aliased alpha.

    Unions of polygons, stars, ellipses and smoothed-noise blobs, with thin
    branches and wires added and holes and polygons cut out, drawn at
    :data:`SUPERSAMPLE` x resolution and reduced by :func:`rasterize`. Scenes
    covering less than 2 % or more than 90 % of the canvas are redrawn.

    Args:
        size: ``(h, w)`` px.
        rng: random generator (consumed).
        edge_width: range of the anti-aliased edge width, px.

    Returns:
        ``(h, w)`` float32 alpha in ``[0, 1]`` and a meta dict (primitives used,
        ``edge_width``).
    """
    h, w = size
    s = SUPERSAMPLE
    short = min(h, w)
    for _attempt in range(10):
        canvas = np.zeros((h * s, w * s), np.uint8)
        parts: list[str] = []
        center = np.array([rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h])
        radius = rng.uniform(0.18, 0.45) * short
        for _ in range(int(rng.integers(1, 3))):
            c = center + rng.uniform(-0.5, 0.5, 2) * radius
            r = radius * rng.uniform(0.6, 1.0)
            prim = str(rng.choice(["polygon", "star", "blob", "ellipse"]))
            parts.append(prim)
            if prim == "blob":
                _blob(rng, canvas, c, r, s, 1)
            elif prim == "ellipse":
                axes = (int(r * s), int(r * rng.uniform(0.3, 1.0) * s))
                cv2.ellipse(canvas, (int(c[0] * s), int(c[1] * s)), axes, rng.uniform(0, 180), 0, 360, 1, -1)
            else:
                pts = _random_polygon(rng, c, r, star=prim == "star")
                cv2.fillPoly(canvas, [np.round(pts * s).astype(np.int32)], 1)
        if rng.random() < 0.5:  # holes
            for _ in range(int(rng.integers(1, 5))):
                c = center + rng.uniform(-0.6, 0.6, 2) * radius
                hr = radius * rng.uniform(0.05, 0.25)
                if rng.random() < 0.5:
                    cv2.circle(canvas, (int(c[0] * s), int(c[1] * s)), int(hr * s), 0, -1)
                else:
                    cv2.fillPoly(canvas, [_ss(_random_polygon(rng, c, hr, False), s)], 0)
            parts.append("holes")
        if rng.random() < 0.3:  # difference with a larger polygon: notches and sharp inner corners
            c = center + rng.uniform(-1.0, 1.0, 2) * radius
            cv2.fillPoly(canvas, [_ss(_random_polygon(rng, c, radius * 0.6, False), s)], 0)
            parts.append("difference")
        if rng.random() < 0.6:  # thin branches growing out of the shape
            for _ in range(int(rng.integers(1, 4))):
                ang = rng.uniform(0, 2 * np.pi)
                start = center + radius * rng.uniform(0.3, 0.9) * np.array([np.cos(ang), np.sin(ang)])
                _branches(rng, canvas, start, radius, s, 1)
            parts.append("branches")
        if rng.random() < 0.25:  # a wire across the canvas
            if rng.random() < 0.5:  # top to bottom
                p, q = np.array([rng.uniform(0, w), 0.0]), np.array([rng.uniform(0, w), float(h)])
            else:  # left to right
                p, q = np.array([0.0, rng.uniform(0, h)]), np.array([float(w), rng.uniform(0, h)])
            thick = max(1, int(round(rng.uniform(1.0, 3.0) * s)))
            cv2.line(canvas, tuple(int(v) for v in p * s), tuple(int(v) for v in q * s), 1, thick, cv2.LINE_8)
            parts.append("wire")
        if rng.random() < 0.2:  # a second, separate object
            c = np.array([rng.uniform(0, w), rng.uniform(0, h)])
            pts = _random_polygon(rng, c, radius * rng.uniform(0.2, 0.5), star=bool(rng.random() < 0.5))
            cv2.fillPoly(canvas, [np.round(pts * s).astype(np.int32)], 1)
            parts.append("second")
        frac = float(canvas.mean())
        if 0.02 <= frac <= 0.9:
            break
    k = 1 + int(round((float(rng.uniform(*edge_width)) - 1.0) * s))
    ew = 1.0 + (k - 1) / s  # the width rasterize() really uses
    alpha = rasterize(canvas, s, ew)
    return alpha, {"parts": parts, "edge_width": ew}


# ---------------------------------------------------------------------- coarse


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two masks (nonzero = foreground); 1.0 when both are empty."""
    a, b = a.astype(bool), b.astype(bool)
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else float(np.count_nonzero(a & b) / union)


def _boundary(hard: np.ndarray) -> np.ndarray:
    """``(h, w)`` bool: foreground pixels of ``hard`` with a background pixel among their 8 neighbours.

    The image border does not count as background.
    """
    m = hard.astype(np.uint8)
    result: np.ndarray = (m > 0) & (cv2.erode(m, np.ones((3, 3), np.uint8)) == 0)
    return result


def perturb(
    gt: np.ndarray, method: str, rng: np.random.Generator, strength: float = 1.0
) -> tuple[np.ndarray, dict[str, Any]]:
    """Make a coarse mask from a ground truth.

    Methods:
    * ``cascadepsp``: CascadePSP's recipe. A target IoU is drawn in
      ``[1 - 0.2 * strength, 1)``. Every contour of >= 10 points loses a run of
      10 % of its vertices (starting among the 10 % of starts with the shortest
      chord) and keeps every 10th remaining vertex; the polygons are refilled.
      If that alone falls below the target it is discarded. Then rectangles
      centred on boundary pixels are dilated or eroded (3-9 px rect or ellipse
      kernels, scaled by ``min(h, w) / 224`` when larger; a 25 % chance of a
      one-pixel flip at the centre) until the IoU drops below the target (at
      most 1000 rectangles, checked after each one rather than every 4).
    * ``lowres``: block-average down by a factor ``f`` drawn log-uniformly in
      ``[4, 4 * 8 ** strength]`` (4-32 at strength 1), binarise half of the time,
      then upsample with nearest (blocky) or bilinear interpolation.
    * ``blobs``: add or remove 1 to ``1 + 6 * strength`` blobs centred near the
      boundary, and half of the time dilate or erode the whole mask by a few px.

    Args:
        gt: ``(h, w)`` float32 in ``[0, 1]``.
        method: one of :data:`PERTURBATIONS`.
        rng: random generator (consumed).
        strength: in ``(0, 2]``.

    Returns:
        ``(h, w)`` float32 coarse mask in ``[0, 1]`` (binary except for soft
        ``lowres`` variants) and a meta dict with ``perturbation``, ``strength``,
        the method's parameters and ``coarse_iou`` (IoU of ``coarse >= 0.5``
        against ``gt >= 0.5``).
    """
    if method not in PERTURBATIONS:
        raise UsageError(f"unknown perturbation {method!r}; use {', '.join(PERTURBATIONS)}")
    if not 0.0 < strength <= 2.0:
        raise UsageError(f"--strength {strength} must be in (0, 2]")
    hard = (gt >= 0.5).astype(np.uint8)
    if method == "cascadepsp":
        coarse, meta = _perturb_cascadepsp(hard, rng, strength)
    elif method == "lowres":
        coarse, meta = _perturb_lowres(gt, rng, strength)
    else:
        coarse, meta = _perturb_blobs(hard, rng, strength)
    coarse = np.clip(coarse.astype(np.float32), 0.0, 1.0)
    meta = {"perturbation": method, "strength": float(strength), **meta}
    meta["coarse_iou"] = iou(coarse >= 0.5, hard)
    return coarse, meta


def _modify_boundary(hard: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    contours, _ = cv2.findContours(hard, cv2.RETR_TREE, cv2.CHAIN_APPROX_NONE)
    polys = []
    for c in contours:
        pts = c[:, 0, :]
        n = len(pts)
        if n >= 10:
            run = n // 10
            chord = np.linalg.norm(pts - np.roll(pts, -run, axis=0), axis=1)
            cand = np.argpartition(chord, run - 1)[:run]
            start = int(cand[int(rng.integers(len(cand)))])
            keep = np.ones(n, bool)
            keep[(start + np.arange(run)) % n] = False
            pts = pts[keep]
            sparse = pts[int(rng.integers(10)) :: 10]
            if len(sparse) >= 3:
                pts = sparse
        polys.append(pts.astype(np.int32))
    out = np.zeros_like(hard)
    if polys:
        cv2.fillPoly(out, polys, 1)
    return out


def _perturb_cascadepsp(
    hard: np.ndarray, rng: np.random.Generator, strength: float
) -> tuple[np.ndarray, dict[str, Any]]:
    h, w = hard.shape
    target = float(rng.uniform(max(0.3, 1.0 - 0.2 * strength), 1.0))
    meta: dict[str, Any] = {"target_iou": target}
    if not hard.any() or hard.all():
        return hard.astype(np.float32), {**meta, "boundary_modified": False, "rectangles": 0}
    mod = _modify_boundary(hard, rng)
    modified = iou(mod, hard) >= target
    m = mod if modified else hard.copy()
    gt = hard.astype(bool)
    inter = int(np.count_nonzero(m.astype(bool) & gt))
    union = int(np.count_nonzero(m.astype(bool) | gt))
    pts = np.argwhere(_boundary(hard.astype(bool)))
    scale = max(1.0, min(h, w) / 224.0)
    size_ref = math.sqrt(max(int(gt.sum()), 64))
    n_rect = 0
    while inter / union >= target and n_rect < 1000:
        cy, cx = pts[int(rng.integers(len(pts)))]
        rh = int(max(4, rng.uniform(0.05, 0.2) * size_ref))
        rw = int(max(4, rng.uniform(0.05, 0.2) * size_ref))
        y0, y1 = max(0, cy - rh), min(h, cy + rh + 1)
        x0, x1 = max(0, cx - rw), min(w, cx + rw + 1)
        ksize = max(3, int(round(rng.integers(3, 10) * scale)))
        shape = cv2.MORPH_RECT if rng.random() < 0.5 else cv2.MORPH_ELLIPSE
        kernel = cv2.getStructuringElement(shape, (ksize, ksize))
        old = m[y0:y1, x0:x1]
        new = cv2.dilate(old, kernel) if rng.random() < 0.5 else cv2.erode(old, kernel)
        if rng.random() < 0.25:
            new[cy - y0, cx - x0] = 1 - new[cy - y0, cx - x0]
        g = gt[y0:y1, x0:x1]
        ob, nb = old.astype(bool), new.astype(bool)
        inter += int(np.count_nonzero(nb & g)) - int(np.count_nonzero(ob & g))
        union += int(np.count_nonzero(nb | g)) - int(np.count_nonzero(ob | g))
        m[y0:y1, x0:x1] = new
        n_rect += 1
        if union == 0:
            break
    return m.astype(np.float32), {**meta, "boundary_modified": bool(modified), "rectangles": n_rect}


def block_mean(x: np.ndarray, f: int) -> np.ndarray:
    """Average over ``f x f`` blocks anchored at (0, 0); partial edge blocks average their valid pixels.

    Args:
        x: ``(h, w)`` float.
        f: block side (>= 1).

    Returns:
        ``(ceil(h / f), ceil(w / f))`` float32.
    """
    h, w = x.shape
    hb, wb = -(-h // f), -(-w // f)
    pad = np.zeros((hb * f, wb * f), np.float32)
    pad[:h, :w] = x
    cnt = np.zeros((hb * f, wb * f), np.float32)
    cnt[:h, :w] = 1
    sums = pad.reshape(hb, f, wb, f).sum(axis=(1, 3))
    result: np.ndarray = (sums / cnt.reshape(hb, f, wb, f).sum(axis=(1, 3))).astype(np.float32)
    return result


def _perturb_lowres(gt: np.ndarray, rng: np.random.Generator, strength: float) -> tuple[np.ndarray, dict]:
    h, w = gt.shape
    f = int(round(2.0 ** rng.uniform(2.0, 2.0 + 3.0 * strength)))
    f = max(2, min(f, min(h, w) // 2))
    low = block_mean(gt, f)
    binarized = bool(rng.random() < 0.5)
    if binarized:
        low = (low >= 0.5).astype(np.float32)
    upsample = "nearest" if rng.random() < 0.5 else "bilinear"
    hb, wb = low.shape
    if upsample == "nearest":
        up = np.repeat(np.repeat(low, f, axis=0), f, axis=1)
    else:
        up = cv2.resize(low, (wb * f, hb * f), interpolation=cv2.INTER_LINEAR)
    return up[:h, :w], {"factor": f, "binarized": binarized, "upsample": upsample}


def _radial_blob(rng: np.random.Generator, center: np.ndarray, radius: float) -> np.ndarray:
    """A smooth star-convex polygon (32 vertices) as an int32 ``(n, 2)`` (x, y) array."""
    t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    r = np.ones_like(t)
    for k in (2, 3, 5):
        r += rng.uniform(0, 0.25) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    r *= radius * rng.uniform(0.6, 1.0)
    ratio = rng.uniform(0.4, 1.0)
    pts = np.stack([center[0] + r * np.cos(t), center[1] + ratio * r * np.sin(t)], axis=1)
    return np.round(pts).astype(np.int32)


def _perturb_blobs(hard: np.ndarray, rng: np.random.Generator, strength: float) -> tuple[np.ndarray, dict]:
    h, w = hard.shape
    m = hard.copy()
    pts = np.argwhere(_boundary(hard.astype(bool)))
    size_ref = math.sqrt(max(int(hard.sum()), 64))
    n = int(rng.integers(1, 2 + round(6 * strength)))
    added = removed = 0
    for _ in range(n if len(pts) else 0):
        cy, cx = pts[int(rng.integers(len(pts)))]
        radius = max(2.0, rng.uniform(0.03, 0.06 + 0.1 * strength) * size_ref)
        center = np.array([cx, cy]) + rng.uniform(-0.5, 0.5, 2) * radius
        value = int(rng.random() < 0.5)
        cv2.fillPoly(m, [_radial_blob(rng, center, radius)], value)
        added += value
        removed += 1 - value
    morph = 0
    if rng.random() < 0.5:
        px = int(rng.integers(1, 2 + round(2 * strength * max(1.0, min(h, w) / 224.0))))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
        morph = px if rng.random() < 0.5 else -px
        m = cv2.dilate(m, kernel) if morph > 0 else cv2.erode(m, kernel)
    return m.astype(np.float32), {"blobs_added": added, "blobs_removed": removed, "morph_px": morph}


# ----------------------------------------------------------------- torch wrappers


class CompositeDataset(Dataset):
    """Map-style torch dataset of random crops of :func:`make_sample` samples.

    Item ``i`` is sample ``start + i`` of ``spec``, cropped to ``crop x crop``
    (biased towards the ground-truth boundary) and, with ``augment``, mirrored
    and colour-jittered like CascadePSP's training (brightness 0.2, contrast
    0.05, saturation 0.05, 10 % greyscale). Deterministic per item.

    Items are dicts:

    * ``image``: ``(3, crop, crop)`` float32 RGB in ``[0, 1]`` (not normalised;
      the model owns its normalisation);
    * ``gt``, ``coarse``: ``(1, crop, crop)`` float32 in ``[0, 1]``;
    * ``index`` (int), ``kind`` and ``perturbation`` (str).

    Args:
        spec: sample spec; its ``size`` must be at least ``crop`` on both sides.
        length: number of items (one epoch).
        crop: crop side, px; ``None`` takes the whole sample (square specs only).
        augment: apply flips and colour jitter.
        start: index of the first sample (keeps train and validation apart).
    """

    def __init__(
        self, spec: SampleSpec, length: int, crop: int | None = None, augment: bool = True, start: int = 0
    ) -> None:
        if length < 1:
            raise UsageError(f"dataset length must be >= 1, got {length}")
        crop = crop if crop is not None else min(spec.size)
        if crop > min(spec.size) or crop < 32:
            raise UsageError(f"--crop {crop} must be between 32 and the sample size {spec.size}")
        self.spec, self.length, self.crop, self.augment, self.start = spec, length, crop, augment, start
        sources(spec, check=True)  # fail early on missing data folders

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        index = self.start + i
        sample = make_sample(index, self.spec)
        rng = _rng(self.spec.seed, index, _STREAM_CROP)
        image, gt, coarse = random_crop(sample, self.crop, rng)
        img = image.astype(np.float32) / 255.0
        if self.augment:
            if rng.random() < 0.5:
                img, gt, coarse = img[:, ::-1], gt[:, ::-1], coarse[:, ::-1]
            img = color_jitter(img, rng)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
            "gt": torch.from_numpy(np.ascontiguousarray(gt))[None],
            "coarse": torch.from_numpy(np.ascontiguousarray(coarse))[None],
            "index": index,
            "kind": sample.kind,
            "perturbation": str(sample.meta["perturbation"]),
        }


def random_crop(
    sample: Sample, crop: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ``crop x crop`` window of a sample, centred near a boundary pixel 80 % of the time.

    Returns:
        ``(image (crop, crop, 3) uint8, gt (crop, crop) float32, coarse (crop, crop) float32)`` views.
    """
    h, w = sample.gt.shape
    if (h, w) == (crop, crop):
        return sample.image, sample.gt, sample.coarse
    pts = np.argwhere(_boundary(sample.hard)) if rng.random() < 0.8 else np.empty((0, 2), int)
    if len(pts):
        cy, cx = pts[int(rng.integers(len(pts)))]
        y0 = int(np.clip(cy - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, h - crop))
        x0 = int(np.clip(cx - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, w - crop))
    else:
        y0, x0 = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    win = (slice(y0, y0 + crop), slice(x0, x0 + crop))
    return sample.image[win], sample.gt[win], sample.coarse[win]


def color_jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CascadePSP-style jitter: brightness x[0.8, 1.2], contrast and saturation x[0.95, 1.05], 10 % grey.

    Args:
        img: ``(h, w, 3)`` float32 RGB in ``[0, 1]``.
        rng: the generator of the three factors and of the grey choice.

    Returns:
        ``(h, w, 3)`` float32 in ``[0, 1]``.
    """
    weights = np.array([0.299, 0.587, 0.114], np.float32)
    out = img * np.float32(rng.uniform(0.8, 1.2))
    grey = out @ weights
    out = (out - grey.mean()) * np.float32(rng.uniform(0.95, 1.05)) + grey.mean()
    grey = out @ weights
    out = (out - grey[..., None]) * np.float32(rng.uniform(0.95, 1.05)) + grey[..., None]
    if rng.random() < 0.1:
        out = np.repeat((out @ weights)[..., None], 3, axis=2)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class EvalItem:
    """Which sample an :class:`EvalSet` entry is (index, forced kind, perturbation, strength)."""

    index: int
    kind: str
    perturbation: str
    strength: float


class EvalSet(Sequence[Sample]):
    """A fixed validation set; samples are regenerated on access (deterministic, nothing cached).

    Attributes:
        spec: the spec of every entry.
        items: one :class:`EvalItem` per entry.
    """

    def __init__(self, spec: SampleSpec, items: Sequence[EvalItem]) -> None:
        self.spec = spec
        self.items = tuple(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        it = self.items[i]
        return make_sample(
            it.index, self.spec, kind=it.kind, perturbation=it.perturbation, strength=it.strength
        )

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]


def make_eval_set(
    n: int,
    size: int | tuple[int, int],
    seed: int = 1_000_003,
    spec: SampleSpec | None = None,
    strengths: Sequence[float] = (0.5, 1.0, 1.5),
) -> EvalSet:
    """A fixed, balanced validation set.

    Entry ``i`` cycles through the kinds with positive weight, then the
    perturbations with positive weight, then ``strengths`` (mixed radix), so
    every combination appears once ``n`` is large enough.

    Args:
        n: number of samples.
        size: side or ``(h, w)`` of each sample, px.
        seed: seed of the set (use one that training does not use).
        spec: data folders and weights to start from (default :class:`SampleSpec`).
        strengths: perturbation strengths to cycle through.

    Returns:
        An :class:`EvalSet` (a sequence of :class:`Sample`).
    """
    if n < 1:
        raise UsageError(f"eval set size must be >= 1, got {n}")
    base = spec or SampleSpec()
    spec = replace(base, size=(size, size) if isinstance(size, int) else size, seed=seed)
    kinds = [k for k, w in spec.kinds if w > 0]
    perts = [p for p, w in spec.perturbations if w > 0]
    items = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        pert = perts[(i // len(kinds)) % len(perts)]
        strength = float(strengths[(i // (len(kinds) * len(perts))) % len(strengths)])
        items.append(EvalItem(i, kind, pert, strength))
    return EvalSet(spec, items)
