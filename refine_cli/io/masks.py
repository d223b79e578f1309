"""Coarse masks: kind detection and per-window resampling to the image grid.

Kinds (see ``refine_cli.config`` for the value conventions):

* ``binary``: values ``{0, 1}``, ``{0, 255}`` (uint8), ``{0, 65535}`` (uint16) or bool.
* ``soft``: probabilities: uint8 ``v/255``, uint16 ``v/65535``, float in ``[0, 1]``.
* ``labels``: class indices ``0 .. C-1``. Detected for integer masks whose
  largest value is at most :data:`MAX_AUTO_LABEL` (and that are not binary),
  for palette masks, and for colour-coded RGB masks (classes numbered in sorted
  colour order, black first); forced with ``--classes C``.

Multi-band masks: a constant alpha band is ignored; a varying alpha over
constant colour is the mask; equal R, G, B bands are one grey band.

**Resolution.** A mask may be smaller than the image if the aspect ratios agree
within one mask pixel. It is resampled per window, never whole: image pixel
``(y, x)`` reads the mask bilinearly at ``((y + 1/2) * mh/H - 1/2, (x + 1/2) * mw/W - 1/2)``
(``align_corners=False``, clamped at the edges), computed from global
coordinates so every tile gets identical values. Label maps are resampled as
one-hot probabilities per class, only for the classes present in the window.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from refine_cli.errors import InputError
from refine_cli.io.readers import ArrayReader, Reader
from refine_cli.tiling.grid import Window

log = logging.getLogger(__name__)

MAX_AUTO_LABEL = 63
"""Integer masks with values up to this (and not binary) are read as label maps."""


@dataclass(frozen=True)
class MaskKind:
    """How raw mask values become probabilities.

    Attributes:
        kind: ``binary`` | ``soft`` | ``labels``.
        scale: raw value of probability 1 (binary/soft); unused for labels.
        classes: number of classes (labels), 1 otherwise.
    """

    kind: str
    scale: float = 1.0
    classes: int = 1


def check_mask_shape(mask_shape: tuple[int, int], image_shape: tuple[int, int], path: str) -> None:
    """Accept a mask of the image's size, or smaller with the same aspect ratio within a pixel."""
    mh, mw = mask_shape
    h, w = image_shape
    if (mh, mw) == (h, w):
        return
    if mh > h or mw > w:
        raise InputError(f"mask {path} is {mw}x{mh} but the image is {w}x{h}: a mask must not be larger "
                         "than the image; resize it to the image size or below")
    if abs(mw - w * mh / h) > 1.0 or abs(mh - h * mw / w) > 1.0:
        raise InputError(f"mask {path} is {mw}x{mh} but the image is {w}x{h}: the aspect ratios differ; "
                         "give a mask covering the same area (any lower resolution with the same aspect ratio)")


class Resampler:
    """Bilinear resampling (``align_corners=False``) from a native grid to a larger target grid, per window.

    Target pixel ``(y, x)`` reads the native grid at ``((y + 1/2) * nh/H - 1/2, (x + 1/2) * nw/W - 1/2)``,
    clamped to the edges. Positions come from global coordinates, so every window
    gets bit-identical values to the whole-image computation.

    Args:
        native_shape: ``(nh, nw)`` of the source grid.
        shape: ``(H, W)`` of the target grid (>= the native size).
    """

    def __init__(self, native_shape: tuple[int, int], shape: tuple[int, int]) -> None:
        self.native_shape = (int(native_shape[0]), int(native_shape[1]))
        self.shape = (int(shape[0]), int(shape[1]))
        self.identity = self.native_shape == self.shape
        self.scale_rows = self.native_shape[0] / self.shape[0]
        self.scale_cols = self.native_shape[1] / self.shape[1]

    @staticmethod
    def _coords(start: int, n: int, scale: float, n_native: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(start, start + n, dtype=np.float64) + 0.5) * scale - 0.5
        pos = np.clip(pos, 0.0, n_native - 1)
        i0 = np.floor(pos).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_native - 1)
        return i0, i1, (pos - i0).astype(np.float32)

    def native_window(self, window: Window) -> Window:
        """The native window that resampling ``window`` reads."""
        if self.identity:
            return window
        mh, mw = self.native_shape
        r0, r1, _ = self._coords(window.row, window.height, self.scale_rows, mh)
        c0, c1, _ = self._coords(window.col, window.width, self.scale_cols, mw)
        top, left = int(r0[0]), int(c0[0])
        return Window(top, left, int(r1[-1]) + 1 - top, int(c1[-1]) + 1 - left)

    def resample(self, raw: np.ndarray, window: Window, nwin: Window) -> np.ndarray:
        """Resample a float block read over ``nwin`` (``(nh', nw')`` or ``(nh', nw', K)``) to ``window``."""
        if self.identity:
            return raw
        mh, mw = self.native_shape
        r0, r1, fy = self._coords(window.row, window.height, self.scale_rows, mh)
        c0, c1, fx = self._coords(window.col, window.width, self.scale_cols, mw)
        r0, r1 = r0 - nwin.row, r1 - nwin.row
        c0, c1 = c0 - nwin.col, c1 - nwin.col
        extra = (None,) * (raw.ndim - 2)
        wy1 = fy[(slice(None), None, *extra)]
        wx1 = fx[(None, slice(None), *extra)]
        rows = raw[r0] * (1 - wy1) + raw[r1] * wy1
        return rows[:, c0] * (1 - wx1) + rows[:, c1] * wx1


class MaskSource:
    """Probability windows of a coarse mask on the image's pixel grid.

    Args:
        reader: the opened mask raster.
        image_shape: ``(H, W)`` of the image (level 0).
        classes: force a label map with this many classes.
    """

    def __init__(self, reader: Reader, image_shape: tuple[int, int], classes: int | None = None) -> None:
        self.reader = reader
        self.path = reader.path
        self.native_shape = reader.shape
        self.shape = (int(image_shape[0]), int(image_shape[1]))
        check_mask_shape(self.native_shape, self.shape, self.path)
        self._band, self._colours = self._pick_band()
        self.kind = self._detect(classes)
        self.classes = self.kind.classes
        self.resampler = Resampler(self.native_shape, self.shape)

    # -- setup --------------------------------------------------------------
    def _pick_band(self) -> tuple[int | None, np.ndarray | None]:
        """Which band holds the mask; for colour-coded masks the colour table."""
        r = self.reader
        if r.bands == 1:
            return 0, None
        if not isinstance(r, ArrayReader):
            if r.alpha_band is not None and r.bands == 2:
                return 0, None
            raise InputError(f"mask {self.path} has {r.bands} bands; give a single-band mask (grey, "
                             "probability or label map)")
        a = r.array
        alpha = r.bands - 1 if r.bands in (2, 4) else None
        colour = a[..., : (1 if r.bands <= 2 else 3)]
        if alpha is not None and a[..., alpha].min() != a[..., alpha].max():
            if colour.min() == colour.max():
                return alpha, None
        if colour.shape[-1] == 1:
            return 0, None
        if (colour[..., 0] == colour[..., 1]).all() and (colour[..., 0] == colour[..., 2]).all():
            return 0, None
        flat = colour.reshape(-1, 3)
        colours, inverse = np.unique(flat, axis=0, return_inverse=True)
        if len(colours) > 256:
            raise InputError(f"mask {self.path} is a colour image with {len(colours)} colours; give a "
                             "single-band mask or a label map")
        # black first, then sorted colours (np.unique sorts lexicographically, so black is already first)
        labels = inverse.reshape(colour.shape[:2]).astype(np.uint16 if len(colours) > 255 else np.uint8)
        self.reader = ArrayReader(self.path, labels)
        return 0, colours

    def _detect(self, classes: int | None) -> MaskKind:
        dtype = self.reader.dtype
        if self._colours is not None:
            n = len(self._colours)
            if classes is not None and classes < n:
                raise InputError(f"mask {self.path} has {n} colours but --classes {classes}")
            return MaskKind("labels", classes=classes or max(n, 2))
        if dtype == np.bool_:
            if classes:
                return MaskKind("labels", classes=classes)
            return MaskKind("binary", 1.0)
        if dtype.kind == "f":
            lo, hi, nan = self._float_range()
            if nan:
                raise InputError(f"mask {self.path} contains NaN values; fill them (e.g. with 0) first")
            if lo < -1e-6 or hi > 1 + 1e-6:
                raise InputError(f"float mask {self.path} has values in [{lo:g}, {hi:g}]; float masks must be "
                                 "probabilities in [0, 1] (or save it as an integer label map)")
            if classes:
                raise InputError(f"--classes needs an integer label map, but {self.path} is a float mask")
            return MaskKind("soft", 1.0)
        if dtype.kind not in "ui":
            raise InputError(f"mask {self.path} has unsupported dtype {dtype}")
        values = self._unique_values()
        vmax = int(values.max()) if values.size else 0
        if values.size and int(values.min()) < 0:
            raise InputError(f"mask {self.path} has negative values; masks are probabilities or class indices")
        if self.reader.palette is not None and classes is None and vmax >= 2:
            return MaskKind("labels", classes=vmax + 1)
        if classes is not None:
            if vmax >= classes:
                raise InputError(f"mask {self.path} has label {vmax} but --classes {classes}: labels must be "
                                 f"0..{classes - 1}")
            return MaskKind("labels", classes=classes)
        vs = set(values.tolist())
        if vs <= {0, 1}:
            return MaskKind("binary", 1.0)
        full = float(np.iinfo(dtype).max) if dtype.kind == "u" else 255.0
        if vs <= {0, 255}:
            return MaskKind("binary", 255.0)
        if vs <= {0, int(full)}:
            return MaskKind("binary", full)
        if vmax <= MAX_AUTO_LABEL:
            log.info("mask %s: integer values 0..%d read as a label map with %d classes (force a probability "
                     "mask by saving it as float in [0, 1])", self.path, vmax, vmax + 1)
            return MaskKind("labels", classes=max(vmax + 1, 2))
        return MaskKind("soft", 255.0 if dtype.itemsize == 1 else full)

    def _iter_native(self, block: int = 2048):
        h, w = self.native_shape
        for r in range(0, h, block):
            for c in range(0, w, block):
                yield self.reader.read(Window(r, c, min(block, h - r), min(block, w - c)))[..., self._band]

    def _unique_values(self) -> np.ndarray:
        seen: set[int] = set()
        for part in self._iter_native():
            if part.dtype.itemsize <= 2 and part.dtype.kind == "u":
                counts = np.bincount(part.ravel(), minlength=1)
                seen.update(np.flatnonzero(counts).tolist())
            else:
                seen.update(np.unique(part).tolist())
            if len(seen) > 70_000:
                break
        return np.array(sorted(seen), dtype=np.int64)

    def _float_range(self) -> tuple[float, float, bool]:
        lo, hi, nan = np.inf, -np.inf, False
        for part in self._iter_native():
            finite = np.isfinite(part)
            if not finite.all():
                nan = True
                break
            lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
        return lo, hi, nan

    # -- reading ----------------------------------------------------------
    @property
    def is_labels(self) -> bool:
        """Whether the mask is a label map."""
        return self.kind.kind == "labels"

    @property
    def same_resolution(self) -> bool:
        """Whether the mask has the image's size (no resampling)."""
        return self.native_shape == self.shape

    def native_window(self, window: Window) -> Window:
        """The mask-resolution window that bilinear sampling of ``window`` reads."""
        return self.resampler.native_window(window)

    def read_native(self, window: Window) -> np.ndarray:
        """Raw mask values (one band) over the native window serving image ``window``."""
        return self.reader.read(self.native_window(window))[..., self._band]

    def uniform_value(self, window: Window) -> float | None:
        """The probability if the mask is constant over ``window`` (image grid), else ``None``.

        For label maps the constant class index is returned.
        """
        raw = self.read_native(window)
        first = raw.flat[0]
        if not (raw == first).all():
            return None
        if self.is_labels:
            return float(first)
        return float(first) / self.kind.scale

    def _resample(self, raw: np.ndarray, window: Window, nwin: Window) -> np.ndarray:
        return self.resampler.resample(raw, window, nwin)

    # -- the coarse-source protocol used by the engine --------------------------
    @property
    def channels(self) -> int:
        """Channels of :meth:`read_k`: 1 for binary/soft masks, C for label maps."""
        return self.classes if self.is_labels else 1

    def constant(self, window: Window) -> np.ndarray | None:
        """The ``(K,)`` float32 values if the mask is constant over ``window``, else ``None``."""
        value = self.uniform_value(window)
        if value is None:
            return None
        if self.is_labels:
            out = np.zeros(self.classes, np.float32)
            out[int(value)] = 1.0
            return out
        return np.array([min(max(value, 0.0), 1.0)], np.float32)

    def binary_uniform(self, window: Window, threshold: float = 0.5) -> bool:
        """Whether every probability that resampling ``window`` reads lies on one side of ``threshold``."""
        if self.is_labels:
            return self.uniform_value(window) is not None
        raw = self.read_native(window)
        fg = raw >= threshold * self.kind.scale if raw.dtype.kind != "f" else raw >= threshold
        return bool(fg.all() or not fg.any())

    def read_k(self, window: Window) -> np.ndarray:
        """``(h, w, 1)`` float32 probability (binary/soft masks), ``(h, w, C)`` one-hot probabilities
        (label maps; memory grows with C)."""
        if self.is_labels:
            lw = self.read_labels(window)
            out = np.zeros((window.height, window.width, self.classes), np.float32)
            for c in lw.present:
                out[..., c] = lw.prob(c)
            return out
        return self.read(window)[:, :, None]


    def read(self, window: Window) -> np.ndarray:
        """Foreground probability over ``window`` (binary/soft masks).

        Returns:
            ``(h, w)`` float32 in ``[0, 1]``.
        """
        if self.is_labels:
            raise TypeError("read() is for binary/soft masks; use read_labels() for label maps")
        nwin = self.native_window(window)
        raw = self.reader.read(nwin)[..., self._band]
        if raw.dtype.kind == "f":
            if not np.isfinite(raw).all():
                raise InputError(f"mask {self.path} contains NaN values near rows {nwin.row}-{nwin.row_end}; "
                                 "fill them (e.g. with 0) first")
            prob = np.clip(raw.astype(np.float32), 0.0, 1.0)
        else:
            prob = raw.astype(np.float32) * np.float32(1.0 / self.kind.scale)
        return np.clip(self._resample(prob, window, nwin), 0.0, 1.0).astype(np.float32, copy=False)

    def read_labels(self, window: Window) -> LabelWindow:
        """Class probabilities over ``window`` of a label map, computed per class on demand."""
        nwin = self.native_window(window)
        raw = self.reader.read(nwin)[..., self._band]
        if int(raw.max()) >= self.classes:
            raise InputError(f"mask {self.path} has label {int(raw.max())} but only {self.classes} classes")
        return LabelWindow(self, window, nwin, raw)


class LabelWindow:
    """One window of a label map: the classes present and their resampled one-hot probabilities."""

    def __init__(self, source: MaskSource, window: Window, nwin: Window, raw: np.ndarray) -> None:
        self._src, self.window, self._nwin, self._raw = source, window, nwin, raw
        self.present: list[int] = np.flatnonzero(np.bincount(raw.ravel().astype(np.int64))).tolist()

    def prob(self, cls: int) -> np.ndarray:
        """``(h, w)`` float32 probability of class ``cls`` (bilinear of its indicator)."""
        onehot = (self._raw == cls).astype(np.float32)
        return self._src._resample(onehot, self.window, self._nwin).astype(np.float32, copy=False)

    def labels(self) -> np.ndarray:
        """``(h, w)`` int class index of the largest resampled probability (ties: lowest class)."""
        if len(self.present) == 1:
            return np.full(self.window.shape, self.present[0], np.int32)
        best = np.full(self.window.shape, -1.0, np.float32)
        out = np.zeros(self.window.shape, np.int32)
        for c in self.present:
            p = self.prob(c)
            better = p > best
            out[better] = c
            best[better] = p[better]
        return out


class ProbSource:
    """K-channel probabilities on a coarser grid (a previous level's output), resampled per window.

    Args:
        source: ``(nh, nw, K)`` float array in [0, 1], or a :class:`Reader` of a K-band float raster.
        shape: ``(H, W)`` target grid (>= the source size).
        path: name used in messages.
    """

    is_labels = False

    def __init__(self, source: np.ndarray | Reader, shape: tuple[int, int], path: str = "level") -> None:
        if isinstance(source, np.ndarray):
            arr = source if source.ndim == 3 else source[:, :, None]
            self.reader: Reader = ArrayReader(path, np.ascontiguousarray(arr, dtype=np.float32))
        else:
            self.reader = source
        self.path = path
        self.native_shape = self.reader.shape
        self.shape = (int(shape[0]), int(shape[1]))
        self.channels = self.reader.bands
        self.resampler = Resampler(self.native_shape, self.shape)

    def _native(self, window: Window) -> tuple[np.ndarray, Window]:
        nwin = self.resampler.native_window(window)
        return self.reader.read(nwin).astype(np.float32, copy=False), nwin

    def constant(self, window: Window) -> np.ndarray | None:
        """The ``(K,)`` values if every channel is constant over ``window``, else ``None``."""
        raw, _ = self._native(window)
        first = raw[:1, :1].reshape(-1)
        if (raw == first).all():
            return first.astype(np.float32)
        return None

    def binary_uniform(self, window: Window, threshold: float = 0.5) -> bool:
        """Whether channel 0 lies on one side of ``threshold`` everywhere ``window`` reads."""
        raw, _ = self._native(window)
        fg = raw[..., 0] >= threshold
        return bool(fg.all() or not fg.any())

    def read_k(self, window: Window) -> np.ndarray:
        """``(h, w, K)`` float32 over ``window`` of the target grid."""
        raw, nwin = self._native(window)
        return np.clip(self.resampler.resample(raw, window, nwin), 0.0, 1.0).astype(np.float32, copy=False)

    def read(self, window: Window) -> np.ndarray:
        """``(h, w)`` float32 channel 0 over ``window``."""
        return self.read_k(window)[..., 0]

    def close(self) -> None:
        """Release the underlying raster."""
        self.reader.close()
