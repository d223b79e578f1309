"""Segmentation metrics shared by ``refine eval`` and the benchmarks. No CLI, no file IO.

Every metric is a ratio of integer pixel counts (:class:`Counts`). Counts over
disjoint windows add up, so :func:`evaluate_streamed` visits an image of any
size window by window, with bounded memory, and returns exactly the numbers
:func:`evaluate_arrays` returns for the whole image in memory.

Binarisation (binary mode). ``scale`` is the full-scale value of the array:
1 for bool, float and integer types other than uint8/uint16, 255 for uint8 and
65535 for uint16 (override with ``EvalOptions.pred_scale``/``gt_scale``, e.g.
``gt_scale=1`` for a 0/1 uint8 mask)::

    pred_fg = pred >= threshold * scale     (threshold = config.DEFAULT_THRESHOLD = 0.5 by default)
    gt_fg   = gt   >= 0.5 * scale           (uint8: gt > 127; float: gt >= 0.5; 0/1 int: gt > 0)

Bool arrays are used as they are. The rule depends on the dtype only, never
on the values, so every window of an image is read the same way.

Metrics (binary, or "foreground = label > 0" of label maps)::

    IoU      = TP / (TP + FP + FN)                  1 when the union is empty
    accuracy = (TP + TN) / N                        1 when N = 0 (everything ignored)
    max_r    = (W + H) / 300                        W, H of the WHOLE image
    r_i      = 1 + int((max_r - 1) / 5 * i)         i = 0..4, int() truncates toward 0
    band_i   = (dilate(gt_fg, D(r_i)) - erode(gt_fg, D(r_i))) > 0
    acc_i    = #(band_i & pred_fg == gt_fg) / #band_i     1 when band_i is empty
    mBA      = mean(acc_0 .. acc_4)                 (CascadePSP's boundary accuracy)

``D(r)`` is OpenCV's elliptical structuring element of size ``(2r+1, 2r+1)``:
the offsets ``(dy, dx)`` with ``|dy| <= r`` and ``|dx| <= round(sqrt(r^2 - dy^2))``
(r = 1 is the 3x3 cross). For ``5000 x 4000`` the radii are ``1, 6, 12, 18, 24``.
Morphology follows OpenCV's default border: pixels outside the image take no
part, so the image border never creates a boundary (a mask touching the border
has no band along it).

Boundary F-score at tolerance ``tol`` px (``tol >= 0``)::

    boundary(m) = m & ~erode(m, 3x3 cross)          1-px inner boundary, same border rule
    P = #(B_pred & dilate(B_gt, D(tol))) / #B_pred  1 when B_pred is empty
    R = #(B_gt & dilate(B_pred, D(tol))) / #B_gt    1 when B_gt is empty
    F = 2 P R / (P + R)                             0 when P + R = 0

``D(0)`` is the single pixel (exact matching).

Label maps (``EvalOptions.labels``): non-negative integer class indices.
``IoU_c = #(pred=c & gt=c) / #(pred=c | gt=c)`` for every class ``c`` present in
the GT or the prediction (class 0 included), and ``mIoU`` is their mean (1 when
no class is present, i.e. every pixel is ignored). Pixels whose GT equals
``ignore_index`` are left out of every count; for the foreground metrics they
are background when the GT bands and boundaries are drawn.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from refine_cli.config import DEFAULT_THRESHOLD
from refine_cli.errors import InputError, UsageError
from refine_cli.tiling.grid import Window
from refine_cli.tiling.grid import blocks as core_windows

log = logging.getLogger(__name__)

MBA_STEPS = 5
"""Number of band radii averaged by mBA (CascadePSP)."""

DEFAULT_TOLERANCE = 2
"""Default boundary F-score matching tolerance, px."""

DEFAULT_WINDOW_SIZE = 2048
"""Default core window side of :func:`evaluate_streamed`, px."""

_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))

ReadFn = Callable[[Window], np.ndarray]
"""Reads a window of a full ``(H, W)`` raster and returns an array of ``window.shape``."""


def mba_radii(shape: tuple[int, int]) -> tuple[int, ...]:
    """CascadePSP's five band radii for an image.

    Args:
        shape: ``(H, W)`` of the whole image, px.

    Returns:
        ``r_i = 1 + int(((W + H) / 300 - 1) / 5 * i)`` for ``i = 0..4`` (non-decreasing, >= 1).
    """
    max_r = (int(shape[0]) + int(shape[1])) / 300
    return tuple(1 + int((max_r - 1) / MBA_STEPS * i) for i in range(MBA_STEPS))


@lru_cache(maxsize=64)
def disk(radius: int) -> np.ndarray:
    """OpenCV's elliptical structuring element ``D(radius)``.

    Args:
        radius: r >= 0, px.

    Returns:
        ``(2r+1, 2r+1)`` uint8 {0, 1}; see the module docstring for its shape.
    """
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def binarize(
    array: np.ndarray, threshold: float = DEFAULT_THRESHOLD, scale: float | None = None
) -> np.ndarray:
    """Foreground mask of a hard or soft binary mask.

    Args:
        array: ``(h, w)`` bool, integer or float mask.
        threshold: fraction of full scale at or above which a pixel is foreground.
        scale: full-scale value; ``None`` takes it from the dtype (255 for uint8,
            65535 for uint16, 1 otherwise). Ignored for bool.

    Returns:
        ``(h, w)`` bool, C-contiguous: ``array >= threshold * scale``.
    """
    if array.dtype == np.bool_:
        return np.ascontiguousarray(array)
    if scale is None:
        scale = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}.get(array.dtype, 1)
    cut = threshold * scale
    if np.issubdtype(array.dtype, np.integer):
        # arr >= x  <=>  arr >= ceil(x) for integers; avoids a float copy of the array.
        return array >= int(np.ceil(cut))
    if np.issubdtype(array.dtype, np.floating):
        return array >= cut
    raise InputError(f"cannot read a mask of dtype {array.dtype}: use bool, integer or float values")


@dataclass(frozen=True)
class EvalOptions:
    """What an evaluation computes.

    Attributes:
        labels: inputs are integer label maps (per-class IoU and mIoU) instead of binary masks.
        threshold: binary mode: fraction of full scale at or above which the
            prediction is foreground, in (0, 1).
        tolerance: boundary F-score matching distance, px (>= 0).
        ignore_index: label mode: GT value left out of every count.
        foreground: label mode: also compute the binary metrics on ``label > 0``.
        pred_scale: full-scale value of the prediction; ``None`` = from its dtype.
        gt_scale: full-scale value of the GT; ``None`` = from its dtype.
        radii: mBA band radii; ``None`` = CascadePSP's five radii from the image size.
    """

    labels: bool = False
    threshold: float = DEFAULT_THRESHOLD
    tolerance: int = DEFAULT_TOLERANCE
    ignore_index: int | None = None
    foreground: bool = True
    pred_scale: float | None = None
    gt_scale: float | None = None
    radii: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise UsageError(f"--threshold {self.threshold} must be strictly between 0 and 1")
        if self.tolerance < 0:
            raise UsageError(f"--tolerance {self.tolerance} must be >= 0 px")
        if self.radii is not None and (not self.radii or min(self.radii) < 1):
            raise UsageError(f"mBA radii {self.radii} must be a non-empty list of integers >= 1")
        for name in ("pred_scale", "gt_scale"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"{name} {value} must be > 0")
        if self.ignore_index is not None and not self.labels:
            raise UsageError("ignore_index applies to label maps only: pass labels=True or drop it")

    @property
    def binary(self) -> bool:
        """Whether the binary metrics (IoU, mBA, boundary F) are computed."""
        return not self.labels or self.foreground


@dataclass(frozen=True)
class Counts:
    """Integer counts every metric derives from; counts of disjoint regions add up.

    Attributes:
        pixels: counted (non-ignored) pixels N.
        tp: foreground in both prediction and GT.
        fp: foreground in the prediction only.
        fn: foreground in the GT only.
        band: pixels of each mBA band, one per radius.
        band_correct: band pixels where prediction == GT, one per radius.
        pred_boundary: predicted boundary pixels.
        pred_boundary_matched: predicted boundary pixels within tolerance of a GT boundary pixel.
        gt_boundary: GT boundary pixels.
        gt_boundary_matched: GT boundary pixels within tolerance of a predicted boundary pixel.
        classes: label mode: ``(label, intersection, predicted, ground truth)`` pixel
            counts per class present in either map, sorted by label.
    """

    pixels: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    band: tuple[int, ...] = ()
    band_correct: tuple[int, ...] = ()
    pred_boundary: int = 0
    pred_boundary_matched: int = 0
    gt_boundary: int = 0
    gt_boundary_matched: int = 0
    classes: tuple[tuple[int, int, int, int], ...] = ()

    @property
    def tn(self) -> int:
        """Background in both prediction and GT."""
        return self.pixels - self.tp - self.fp - self.fn

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["band"], out["band_correct"] = list(self.band), list(self.band_correct)
        out["classes"] = [list(c) for c in self.classes]
        return out


def _ratio(num: int, den: int) -> float:
    """``num / den``, or 1.0 when ``den == 0`` (nothing to get wrong)."""
    return num / den if den else 1.0


@dataclass(frozen=True)
class Metrics:
    """Evaluation result; see the module docstring for every formula and convention.

    Attributes:
        shape: ``(H, W)`` of the evaluated image.
        iou: foreground IoU in [0, 1] (``None`` for label maps without ``foreground``).
        accuracy: pixel accuracy in [0, 1] (same).
        mba: CascadePSP mean boundary accuracy in [0, 1] (same).
        band_accuracy: accuracy in each mBA band, one per radius.
        radii: the mBA band radii, px.
        boundary_f: boundary F-score in [0, 1] (same ``None`` rule).
        boundary_precision: fraction of predicted boundary pixels matched.
        boundary_recall: fraction of GT boundary pixels matched.
        tolerance: boundary matching tolerance, px.
        miou: label mode: mean IoU over the classes present, else ``None``.
        class_iou: label mode: IoU per class label present in GT or prediction.
        counts: the integer counts behind every number.
    """

    shape: tuple[int, int]
    iou: float | None
    accuracy: float | None
    mba: float | None
    band_accuracy: tuple[float, ...]
    radii: tuple[int, ...]
    boundary_f: float | None
    boundary_precision: float | None
    boundary_recall: float | None
    tolerance: int
    miou: float | None
    class_iou: dict[int, float] = field(default_factory=dict)
    counts: Counts = field(default_factory=Counts)

    @classmethod
    def from_counts(
        cls, counts: Counts, shape: tuple[int, int], radii: tuple[int, ...], options: EvalOptions
    ) -> Metrics:
        """Derive every metric from summed counts.

        Args:
            counts: counts over the whole image.
            shape: ``(H, W)`` of the image.
            radii: the mBA radii used for ``counts.band``.
            options: the evaluation options (metric families, tolerance).
        """
        c = counts
        iou = acc = mba = bf = bp = br = None
        band_acc: tuple[float, ...] = ()
        if options.binary:
            iou = _ratio(c.tp, c.tp + c.fp + c.fn)
            acc = _ratio(c.tp + c.tn, c.pixels)
            band_acc = tuple(_ratio(k, n) for k, n in zip(c.band_correct, c.band, strict=True))
            mba = sum(band_acc) / len(band_acc)
            bp = _ratio(c.pred_boundary_matched, c.pred_boundary)
            br = _ratio(c.gt_boundary_matched, c.gt_boundary)
            bf = 2 * bp * br / (bp + br) if bp + br > 0 else 0.0
        class_iou: dict[int, float] = {}
        miou = None
        if options.labels:
            class_iou = {lab: _ratio(i, p + g - i) for lab, i, p, g in c.classes}
            miou = sum(class_iou.values()) / len(class_iou) if class_iou else 1.0
        return cls(
            shape=shape, iou=iou, accuracy=acc, mba=mba, band_accuracy=band_acc,
            radii=radii if options.binary else (), boundary_f=bf, boundary_precision=bp,
            boundary_recall=br, tolerance=options.tolerance, miou=miou, class_iou=class_iou, counts=c,
        )

    def scalars(self) -> dict[str, float]:
        """The scalar metrics that exist for this result, by name (``iou``, ``mba`` ...)."""
        names = ("iou", "accuracy", "mba", "boundary_f", "boundary_precision", "boundary_recall", "miou")
        out = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        out.update({f"band_accuracy_{i}": a for i, a in enumerate(self.band_accuracy)})
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view (class labels become string keys)."""
        return {
            "shape": list(self.shape),
            "iou": self.iou,
            "accuracy": self.accuracy,
            "mba": self.mba,
            "band_accuracy": list(self.band_accuracy),
            "radii": list(self.radii),
            "boundary_f": self.boundary_f,
            "boundary_precision": self.boundary_precision,
            "boundary_recall": self.boundary_recall,
            "tolerance": self.tolerance,
            "miou": self.miou,
            "class_iou": {str(k): v for k, v in self.class_iou.items()},
            "counts": self.counts.to_dict(),
        }


def gain(refined: Metrics, coarse: Metrics) -> dict[str, float]:
    """Improvement of a refined mask over the coarse one, per scalar metric.

    Args:
        refined: metrics of the refined mask.
        coarse: metrics of the coarse mask against the same GT, same options.

    Returns:
        ``{name: refined - coarse}`` for every scalar metric both have (see
        :meth:`Metrics.scalars`), positive = better.
    """
    if (refined.shape, refined.radii, refined.tolerance) != (coarse.shape, coarse.radii, coarse.tolerance):
        raise UsageError(
            f"cannot compare metrics of shape {refined.shape}, radii {refined.radii}, tolerance "
            f"{refined.tolerance} with shape {coarse.shape}, radii {coarse.radii}, tolerance "
            f"{coarse.tolerance}: evaluate both masks against the same GT with the same options"
        )
    a, b = refined.scalars(), coarse.scalars()
    return {k: a[k] - b[k] for k in a if k in b}


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a bool mask by ``D(radius)`` (OpenCV border rule); ``(h, w)`` bool."""
    if radius == 0:
        return mask
    return cv2.dilate(mask.view(np.uint8), disk(radius)).view(np.bool_)


def _inner_boundary(mask: np.ndarray) -> np.ndarray:
    """``mask & ~erode(mask, 3x3 cross)``; ``(h, w)`` bool in, bool out."""
    return mask > cv2.erode(mask.view(np.uint8), _CROSS).view(np.bool_)


def _count(a: np.ndarray, valid: np.ndarray | None) -> int:
    """Number of True pixels of ``a`` that are valid."""
    return int(np.count_nonzero(a if valid is None else a & valid))


class MetricAccumulator:
    """Sums metric counts over windows of one image, with bounded memory.

    Feed it a partition of the image into core windows, each with data read on
    the core grown by :attr:`halo` (clipped to the image); counts are taken in
    the core only, so the sum equals the whole-image counts exactly.

    Args:
        shape: ``(H, W)`` of the whole image, px.
        options: what to compute; ``None`` = binary defaults.
    """

    def __init__(self, shape: tuple[int, int], options: EvalOptions | None = None) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        if min(self.shape) < 1:
            raise InputError(f"cannot evaluate an empty image of shape {self.shape}")
        self.options = options or EvalOptions()
        self.radii = self.options.radii if self.options.radii is not None else mba_radii(self.shape)
        self._ints = dict.fromkeys(
            ("pixels", "tp", "fp", "fn", "pred_boundary", "pred_boundary_matched", "gt_boundary",
             "gt_boundary_matched"), 0,
        )
        self._unique_radii = sorted(set(self.radii))
        self._band = dict.fromkeys(self._unique_radii, 0)
        self._band_correct = dict.fromkeys(self._unique_radii, 0)
        self._class = np.zeros((3, 0), np.int64)  # rows: intersection, predicted, GT
        self._covered = 0

    @property
    def halo(self) -> int:
        """Context around a core window, px: ``max(max(radii), tolerance + 1)``; 0 without binary metrics."""
        if not self.options.binary:
            return 0
        return max(max(self.radii), self.options.tolerance + 1)

    def plan(self, window_size: int = DEFAULT_WINDOW_SIZE) -> Iterator[tuple[Window, Window]]:
        """Core windows (a partition, see :func:`core_windows`) with their read windows.

        Yields:
            ``(core, read)`` with ``read = core.expand(halo, shape)``.
        """
        if window_size < 1:
            raise UsageError(f"--window-size {window_size} must be >= 1")
        for core in core_windows(self.shape, window_size):
            yield core, core.expand(self.halo, self.shape)

    def consume(self, read_pred: ReadFn, read_gt: ReadFn, window_size: int = DEFAULT_WINDOW_SIZE) -> None:
        """Read and count the whole image, window by window.

        Args:
            read_pred: ``window -> (h, w)`` prediction of that window (see :func:`binarize`).
            read_gt: ``window -> (h, w)`` GT of that window.
            window_size: core window side, px; peak memory grows with ``(window_size + 2 * halo)^2``.
        """
        n = 0
        for core, read in self.plan(window_size):
            self.add(core, read, read_pred(read), read_gt(read))
            n += 1
        log.debug("evaluated %s in %d windows (halo %d px)", self.shape, n, self.halo)

    def add(self, core: Window, read: Window, pred: np.ndarray, gt: np.ndarray) -> None:
        """Count one core window.

        Args:
            core: the pixels to count; cores must partition the image.
            read: where ``pred`` and ``gt`` lie; must contain ``core.expand(halo, shape)``.
            pred: ``read.shape`` prediction: bool/int/float mask, or integer labels.
            gt: ``read.shape`` ground truth of the same kind.
        """
        need = core.expand(self.halo, self.shape)
        if read.intersection(need) != need or read.intersection(Window.full(self.shape)) != read:
            raise ValueError(
                f"read window {read} must lie in the image {self.shape} and contain the core {core} "
                f"grown by the halo ({need})"
            )
        for name, arr in (("prediction", pred), ("ground truth", gt)):
            if arr.shape != read.shape:
                raise InputError(
                    f"{name} window {read} has shape {arr.shape}, expected {read.shape}: "
                    "the prediction and the GT must be 2-D and the same size as the image"
                )
        self._covered += core.area
        cs = core.relative_to(read).slices
        opt = self.options
        valid = None
        if opt.labels:
            for name, arr in (("prediction", pred), ("ground truth", gt)):
                if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
                    raise InputError(
                        f"label-map {name} has dtype {arr.dtype}: label maps must hold integer classes"
                    )
            if opt.ignore_index is not None:
                valid = gt != opt.ignore_index
            self._add_classes(pred[cs], gt[cs], None if valid is None else valid[cs])
            if not opt.foreground:
                return
            p = np.ascontiguousarray(pred > 0)
            g = np.ascontiguousarray(gt > 0 if valid is None else (gt > 0) & valid)
        else:
            p = binarize(pred, opt.threshold, opt.pred_scale)
            g = binarize(gt, 0.5, opt.gt_scale)
        self._add_binary(p, g, valid, cs)

    def _add_classes(self, pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None) -> None:
        """Add per-class intersection / predicted / GT counts of a core window."""
        if valid is not None:
            pred, gt = pred[valid], gt[valid]
        pred, gt = pred.ravel().astype(np.intp, copy=False), gt.ravel().astype(np.intp, copy=False)
        if pred.size == 0:
            return
        if pred.min() < 0 or gt.min() < 0:
            raise InputError("label maps hold negative values: labels must be class indices 0 .. C-1")
        size = max(int(pred.max()), int(gt.max())) + 1
        counts = np.stack([
            np.bincount(gt[gt == pred], minlength=size),
            np.bincount(pred, minlength=size),
            np.bincount(gt, minlength=size),
        ])
        if size > self._class.shape[1]:
            self._class = np.pad(self._class, ((0, 0), (0, size - self._class.shape[1])))
        self._class[:, :size] += counts

    def _add_binary(
        self, p: np.ndarray, g: np.ndarray, valid: np.ndarray | None, cs: tuple[slice, slice]
    ) -> None:
        """Add pixel, band and boundary counts of the core ``cs`` of a read window.

        ``p``/``g``: ``(h, w)`` bool foreground of the read window; ``valid``: bool or None.
        """
        t = self._ints
        pc, gc = p[cs], g[cs]
        vc = None if valid is None else valid[cs]
        t["pixels"] += pc.size if vc is None else int(np.count_nonzero(vc))
        t["tp"] += _count(pc & gc, vc)
        t["fp"] += _count(pc > gc, vc)
        t["fn"] += _count(gc > pc, vc)
        pred_b = _inner_boundary(p)
        t["pred_boundary"] += _count(pred_b[cs], vc)
        if not g.any() or g.all():
            # A uniform GT over the read window has no band and no boundary within
            # halo >= max(r, tol + 1) of the core: all remaining counts are 0.
            return
        correct = pc == gc if vc is None else (pc == gc) & vc
        g8 = g.view(np.uint8)
        for r in self._unique_radii:
            band = cv2.morphologyEx(g8, cv2.MORPH_GRADIENT, disk(r))[cs].view(np.bool_)
            self._band[r] += _count(band, vc)
            self._band_correct[r] += int(np.count_nonzero(band & correct))
        tol = self.options.tolerance
        gt_b = _inner_boundary(g)
        t["gt_boundary"] += _count(gt_b[cs], vc)
        t["pred_boundary_matched"] += _count(pred_b[cs] & _dilate(gt_b, tol)[cs], vc)
        t["gt_boundary_matched"] += _count(gt_b[cs] & _dilate(pred_b, tol)[cs], vc)

    def counts(self) -> Counts:
        """The counts summed so far."""
        nz = np.flatnonzero(self._class[1] + self._class[2])
        tab = self._class
        classes = tuple((int(k), int(tab[0, k]), int(tab[1, k]), int(tab[2, k])) for k in nz)
        return Counts(
            **self._ints,
            band=tuple(self._band[r] for r in self.radii) if self.options.binary else (),
            band_correct=tuple(self._band_correct[r] for r in self.radii) if self.options.binary else (),
            classes=classes,
        )

    def result(self) -> Metrics:
        """Metrics of the whole image, once every pixel has been counted exactly once."""
        total = self.shape[0] * self.shape[1]
        if self._covered != total:
            raise ValueError(
                f"core windows covered {self._covered} px of {total}: they must partition the image"
            )
        return Metrics.from_counts(self.counts(), self.shape, self.radii, self.options)


def evaluate_arrays(pred: np.ndarray, gt: np.ndarray, options: EvalOptions | None = None) -> Metrics:
    """Evaluate a prediction held in memory against its GT.

    Args:
        pred: ``(H, W)`` prediction: bool/uint8/uint16/float mask (soft masks are
            thresholded), or integer labels with ``options.labels``.
        gt: ``(H, W)`` ground truth of the same kind.
        options: what to compute; ``None`` = binary defaults.

    Returns:
        The metrics; formulas and conventions in the module docstring.
    """
    if pred.ndim != 2 or pred.shape != gt.shape:
        raise InputError(
            f"prediction shape {pred.shape} and GT shape {gt.shape} differ or are not 2-D: "
            "give one (H, W) mask each, at the GT's resolution"
        )
    acc = MetricAccumulator(gt.shape, options)
    full = Window.full(gt.shape)
    acc.add(full, full, pred, gt)
    return acc.result()


def evaluate_streamed(
    read_pred: ReadFn,
    read_gt: ReadFn,
    shape: tuple[int, int],
    window_size: int = DEFAULT_WINDOW_SIZE,
    options: EvalOptions | None = None,
) -> Metrics:
    """Evaluate an image of any size window by window; equals :func:`evaluate_arrays` exactly.

    Args:
        read_pred: ``window -> (window.height, window.width)`` prediction array.
        read_gt: ``window -> (window.height, window.width)`` GT array.
        shape: ``(H, W)`` of the whole image, px.
        window_size: core window side, px (>= 1); each read is at most
            ``(window_size + 2 * halo)^2`` px, ``halo = max(max mBA radius, tolerance + 1)``.
        options: what to compute; ``None`` = binary defaults.

    Returns:
        The metrics of the whole image.
    """
    acc = MetricAccumulator(shape, options)
    acc.consume(read_pred, read_gt, window_size)
    return acc.result()
