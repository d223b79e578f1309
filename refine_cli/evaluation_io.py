"""File-level evaluation behind ``refine eval``: masks on disk -> metrics, window by window.

The prediction, the ground truth and the optional coarse mask are opened with
the readers ``refine run`` uses (:func:`~refine_cli.io.readers.open_raster`
and :class:`~refine_cli.io.masks.MaskSource`), so a file means the same thing
to both commands. The metrics come from :mod:`refine_cli.evaluate`; every
image is visited in core windows grown by the metric halo, so the numbers are
exactly those of the whole image in memory, with memory bounded by
``(window + 2 * halo)^2`` pixels per open file.

How values are read (binary mode):

* The kind and full-scale value of each file are decided once, by the scan
  ``MaskSource`` makes when it opens a mask (``refine_cli.io.masks``): binary
  masks (``{0, v}``) count non-zero as foreground; soft masks (uint8 v/255,
  uint16 v/65535, float in ``[0, 1]``) are foreground when ``value >= threshold
  * scale`` (prediction, coarse) or ``>= 0.5 * scale`` (GT).
* An integer file that ``MaskSource`` reads as a label map (values ``0..63``
  that are not binary, palette or colour-coded masks) or as an instance map
  (many object ids) counts ``label > 0`` as foreground; pass ``labels=True``
  for per-class IoU.
* The prediction and the GT must have the same size. The coarse mask may be
  smaller with the same aspect ratio: it is resampled to the GT grid exactly as
  ``refine run`` resamples it (bilinear, ``align_corners=False``), so its
  metrics are those of the null refiner (``--method coarse``).

Label mode (``EvalOptions.labels``): raw integer values are class indices. A
resampled coarse label map takes, per pixel, the class of the largest
resampled one-hot probability (``LabelWindow.labels``); a resampled coarse
binary mask becomes classes 0/1.

Directories (:func:`pair_directories`) are paired by *key*: the file name
without its extension and without a trailing ``.refined`` (the default name
``refine run`` gives its output), so ``a.refined.tif`` pairs with ``a.png``.
Only image files (:data:`MASK_SUFFIXES`) take part; hidden files are ignored.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refine_cli.config import RefineConfig
from refine_cli.errors import InputError, UsageError
from refine_cli.evaluate import DEFAULT_WINDOW_SIZE, EvalOptions, MetricAccumulator, Metrics, gain
from refine_cli.io.masks import MaskSource
from refine_cli.io.readers import Reader, open_raster
from refine_cli.io.writers import default_tmp_dir
from refine_cli.tiling.grid import Window

log = logging.getLogger(__name__)

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".webp", ".bmp", ".jp2")
"""File extensions (lower case) that directory evaluation considers."""

REFINED_SUFFIX = ".refined"
"""Removed from the end of a stem when pairing (``refine run`` writes ``<stem>.refined.tif``)."""

Progress = Callable[[str, int, int], None]
"""``f(image_name, done_windows, total_windows)``."""


@dataclass(frozen=True)
class Limits:
    """Reader limits, as in :class:`~refine_cli.config.RefineConfig`.

    Attributes:
        max_pixels: refuse files declaring more pixels than this.
        inline_limit: PNG/JPEG files above this many pixels are cached as tiled TIFF first.
    """

    max_pixels: int = RefineConfig.max_pixels
    inline_limit: int = RefineConfig.inline_limit


class MaskFile:
    """One mask raster opened for evaluation, read window by window on a target grid.

    Args:
        path: the file.
        what: role for messages (``prediction``, ``ground truth``, ``coarse mask``).
        grid: ``(H, W)`` grid to read on; ``None`` = the file's own size. A
            smaller file (same aspect ratio) is resampled like ``refine run`` does.
        labels: read label maps (class indices) instead of foreground masks.
        classes: force a label map with this many classes (implies label reading of integer files).
        limits: reader limits.

    Attributes:
        path: the file, as given.
        shape: ``(H, W)`` of the grid windows are read on.
        native_shape: ``(h, w)`` of the file.
        kind: ``binary`` | ``soft`` | ``labels`` (``MaskSource``'s detection).
        scale: full-scale value of what :meth:`read` returns (binary mode), or ``None``
            when :meth:`read` returns bool.
    """

    def __init__(self, path: str | Path, *, what: str, grid: tuple[int, int] | None = None,
                 labels: bool = False, classes: int | None = None, limits: Limits | None = None,
                 flag: str | None = None) -> None:
        limits = limits or Limits()
        self.path = str(path)
        self.what = what
        self.labels_mode = labels or classes is not None
        self._reader: Reader = open_raster(self.path, max_pixels=limits.max_pixels,
                                           inline_limit=limits.inline_limit, tmp_dir=default_tmp_dir(),
                                           what="mask", flag=flag)
        try:
            self.native_shape: tuple[int, int] = self._reader.shape
            self.shape: tuple[int, int] = self.native_shape if grid is None else (int(grid[0]), int(grid[1]))
            self._src = MaskSource(self._reader, self.shape, classes=classes)
        except BaseException:
            self._reader.close()
            raise
        self.kind = self._src.kind.kind
        self.resampled = not self._src.same_resolution
        self.max_value: float = 0.0
        if self.labels_mode or self.kind == "labels":
            self.scale: float | None = None
        elif self.resampled:
            self.scale = 1.0
        else:
            self.scale = float(self._src.kind.scale)
        if not self.labels_mode and self.kind == "labels":
            log.info("%s %s holds integer classes (read as a label map); foreground = label > 0 "
                     "(pass --labels for per-class IoU)", what, self.path)

    def read(self, window: Window) -> np.ndarray:
        """Values of ``window`` (on :attr:`shape`'s grid) ready for :class:`MetricAccumulator`.

        Returns:
            ``window.shape`` array: label mode: integer class indices; binary mode:
            the raw values (scale :attr:`scale`), float32 probabilities in ``[0, 1]``
            for a resampled file, or bool ``label > 0`` for a label-map file.
        """
        src = self._src
        if self.labels_mode:
            if not self.resampled:
                return src.read_native(window)
            if src.is_labels:
                return src.read_labels(window).labels()
            return (src.read(window) >= 0.5).astype(np.uint8)
        if src.is_labels:
            if self.resampled:
                return src.read_labels(window).labels() > 0
            return src.read_native(window) > 0
        if self.resampled:
            return src.read(window)
        raw = src.read_native(window)
        if raw.size:
            self.max_value = max(self.max_value, float(raw.max()))
        return raw

    def describe(self) -> dict[str, Any]:
        """Facts for the report: path, size, detected kind, scale, whether resampled."""
        return {"path": self.path, "height": self.native_shape[0], "width": self.native_shape[1],
                "kind": self.kind, "scale": self.scale, "resampled": self.resampled}

    def close(self) -> None:
        """Close the reader (and delete its temporary cache)."""
        self._reader.close()

    def __enter__(self) -> MaskFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class PairResult:
    """Evaluation of one prediction (and optionally its coarse mask) against one GT.

    Attributes:
        name: the pair's key (file stem).
        pred: prediction path.
        gt: ground-truth path.
        coarse: coarse-mask path, or ``None``.
        metrics: metrics of the prediction.
        coarse_metrics: metrics of the coarse mask against the same GT, or ``None``.
        seconds: wall time of this pair.
        files: what was detected about each file (kind, scale, size).
    """

    name: str
    pred: str
    gt: str
    coarse: str | None
    metrics: Metrics
    coarse_metrics: Metrics | None = None
    seconds: float = 0.0
    files: dict[str, Any] = field(default_factory=dict)

    @property
    def gain(self) -> dict[str, float] | None:
        """``refined - coarse`` per scalar metric (positive = better), or ``None`` without a coarse mask."""
        return None if self.coarse_metrics is None else gain(self.metrics, self.coarse_metrics)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view."""
        return {
            "name": self.name, "pred": self.pred, "gt": self.gt, "coarse": self.coarse,
            "metrics": self.metrics.to_dict(),
            "coarse_metrics": None if self.coarse_metrics is None else self.coarse_metrics.to_dict(),
            "gain": self.gain, "seconds": self.seconds, "files": self.files,
        }


def _mean_dicts(rows: Sequence[dict[Any, float]]) -> dict[Any, float]:
    """Per key, the mean over the rows that have it (keys in first-seen order)."""
    sums: dict[Any, float] = {}
    counts: dict[Any, int] = {}
    for row in rows:
        for k, v in row.items():
            sums[k] = sums.get(k, 0.0) + float(v)
            counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


@dataclass
class EvalSummary:
    """Results of one ``refine eval`` call: one row per pair and their means.

    Means are macro averages (each image counts once). A class's mean IoU is
    taken over the images where it occurs in the GT or the prediction.

    Attributes:
        results: one :class:`PairResult` per evaluated pair, in key order.
        options: the evaluation options (threshold, tolerance, labels ...).
        window: core window side used, px.
        unpaired_pred: predictions without a GT (directory mode).
        unpaired_gt: GTs without a prediction (directory mode).
    """

    results: list[PairResult]
    options: EvalOptions
    window: int = DEFAULT_WINDOW_SIZE
    unpaired_pred: list[str] = field(default_factory=list)
    unpaired_gt: list[str] = field(default_factory=list)

    @property
    def has_coarse(self) -> bool:
        """Whether any pair was evaluated with a coarse mask."""
        return any(r.coarse_metrics is not None for r in self.results)

    def mean(self) -> dict[str, float]:
        """Mean of every scalar metric over the images."""
        return _mean_dicts([r.metrics.scalars() for r in self.results])

    def mean_coarse(self) -> dict[str, float] | None:
        """Mean coarse-mask metrics over the pairs that have one, or ``None``."""
        rows = [r.coarse_metrics.scalars() for r in self.results if r.coarse_metrics is not None]
        return _mean_dicts(rows) if rows else None

    def mean_gain(self) -> dict[str, float] | None:
        """Mean gain (refined - coarse) over the pairs that have a coarse mask, or ``None``."""
        rows = [g for g in (r.gain for r in self.results) if g is not None]
        return _mean_dicts(rows) if rows else None

    def mean_class_iou(self) -> dict[int, float]:
        """Label mode: mean IoU of each class over the images where it occurs."""
        return dict(sorted(_mean_dicts([r.metrics.class_iou for r in self.results]).items()))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view: options, per-image rows, means, unpaired files."""
        opts = dataclasses.asdict(self.options)
        opts.pop("pred_scale", None)
        opts.pop("gt_scale", None)
        return {
            "options": {**opts, "window": self.window},
            "images": [r.to_dict() for r in self.results],
            "mean": self.mean(),
            "mean_coarse": self.mean_coarse(),
            "mean_gain": self.mean_gain(),
            "mean_class_iou": {str(k): v for k, v in self.mean_class_iou().items()},
            "unpaired": {"pred": self.unpaired_pred, "gt": self.unpaired_gt},
        }


def evaluate_pair(
    pred: str | Path,
    gt: str | Path,
    coarse: str | Path | None = None,
    *,
    options: EvalOptions | None = None,
    window: int = DEFAULT_WINDOW_SIZE,
    classes: int | None = None,
    limits: Limits | None = None,
    name: str | None = None,
    progress: Progress | None = None,
) -> PairResult:
    """Evaluate one prediction file (and its coarse mask) against a GT file, streaming windows.

    Args:
        pred: prediction mask (same size as the GT): hard, soft or label map.
        gt: ground-truth mask or label map.
        coarse: coarse mask (the GT's size or smaller with the same aspect ratio), or ``None``.
        options: what to compute; the value scales are detected per file (see the module docstring).
        window: core window side, px (>= 1).
        classes: force label maps with this many classes (implies ``options.labels``).
        limits: reader limits.
        name: key shown in tables (default: the prediction's stem).
        progress: called after each window.

    Returns:
        The pair's metrics; ``coarse_metrics`` and ``gain`` when a coarse mask is given.

    Raises:
        InputError: unreadable file, or the prediction and GT sizes differ.
    """
    options = options or EvalOptions()
    if classes is not None and not options.labels:
        options = dataclasses.replace(options, labels=True)
    if window < 1:
        raise UsageError(f"--window {window} must be >= 1 px")
    t0 = time.perf_counter()
    labels = options.labels
    opened: list[MaskFile] = []
    label = name or Path(str(pred)).stem
    try:
        p, g, c = _open_pair(pred, gt, coarse, labels=labels, classes=classes, limits=limits, opened=opened)
        metrics, coarse_metrics, n_windows = _accumulate(p, g, c, options, window, label, progress)
        _warn_empty(g, metrics, options)
        files = {"pred": p.describe(), "gt": g.describe(), "coarse": c.describe() if c is not None else None}
    finally:
        for f in opened:
            f.close()
    seconds = time.perf_counter() - t0
    log.debug("%s: evaluated %dx%d px in %d windows, %.2f s", label, g.shape[1], g.shape[0], n_windows,
              seconds)
    return PairResult(name=label, pred=str(pred), gt=str(gt), coarse=None if coarse is None else str(coarse),
                      metrics=metrics, coarse_metrics=coarse_metrics, seconds=seconds, files=files)


def _open_pair(
    pred: str | Path, gt: str | Path, coarse: str | Path | None, *, labels: bool, classes: int | None,
    limits: Limits | None, opened: list[MaskFile],
) -> tuple[MaskFile, MaskFile, MaskFile | None]:
    """Open the GT, the prediction and the coarse mask (each appended to ``opened`` for closing).

    Returns:
        ``(pred, gt, coarse or None)``.

    Raises:
        InputError: unreadable file, or the prediction and GT sizes differ.
    """
    g = MaskFile(gt, what="ground truth", labels=labels, classes=classes, limits=limits, flag="GT")
    opened.append(g)
    p = MaskFile(pred, what="prediction", labels=labels, classes=classes, limits=limits, flag="PRED")
    opened.append(p)
    if p.native_shape != g.native_shape:
        (ph, pw), (gh, gw) = p.native_shape, g.native_shape
        raise InputError(
            f"prediction {p.path} is {pw}x{ph} px but the ground truth {g.path} is {gw}x{gh}: "
            "evaluate at the GT's resolution (refine the full-resolution image, or resize the "
            "prediction with nearest-neighbour)"
        )
    c = None
    if coarse is not None:
        c = MaskFile(coarse, what="coarse mask", grid=g.shape, labels=labels, classes=classes,
                     limits=limits, flag="--coarse")
        opened.append(c)
    return p, g, c


def _accumulate(
    p: MaskFile, g: MaskFile, c: MaskFile | None, options: EvalOptions, window: int, label: str,
    progress: Progress | None,
) -> tuple[Metrics, Metrics | None, int]:
    """Stream the windows of the pair through the metric accumulators.

    Returns:
        The prediction's metrics, the coarse mask's (``None`` without one) and the number of windows.
    """
    p_opts = dataclasses.replace(options, pred_scale=p.scale, gt_scale=g.scale)
    acc = MetricAccumulator(g.shape, p_opts)
    acc_c = None
    if c is not None:
        acc_c = MetricAccumulator(g.shape, dataclasses.replace(p_opts, pred_scale=c.scale))
    plan = list(acc.plan(window))
    for i, (core, read) in enumerate(plan):
        gt_win = g.read(read)
        acc.add(core, read, p.read(read), gt_win)
        if acc_c is not None and c is not None:
            acc_c.add(core, read, c.read(read), gt_win)
        if progress is not None:
            progress(label, i + 1, len(plan))
    return acc.result(), acc_c.result() if acc_c is not None else None, len(plan)


def _warn_empty(gt: MaskFile, metrics: Metrics, options: EvalOptions) -> None:
    """Warn when a non-zero GT has no foreground at its detected scale (a label map read as a mask?)."""
    c = metrics.counts
    if options.labels or gt.scale is None or c.tp + c.fn > 0 or gt.max_value <= 0:
        return
    log.warning("ground truth %s has no foreground pixel: its values reach %g but foreground starts at %g "
                "(scale %g); if it is a label map, pass --labels", gt.path, gt.max_value, 0.5 * gt.scale,
                gt.scale)


def pair_key(path: str | Path) -> str:
    """The key files are paired by: name without extension and without a trailing ``.refined``."""
    stem = Path(path).stem
    if stem.endswith(REFINED_SUFFIX) and len(stem) > len(REFINED_SUFFIX):
        stem = stem[: -len(REFINED_SUFFIX)]
    return stem


def _index_dir(folder: str | Path, flag: str) -> dict[str, Path]:
    """``{key: path}`` of the mask files in a folder; duplicate keys are an error."""
    d = Path(folder)
    if not d.is_dir():
        raise InputError(f"{flag} {d} is not a directory")
    out: dict[str, Path] = {}
    for p in sorted(d.iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in MASK_SUFFIXES:
            continue
        key = pair_key(p)
        if key in out:
            raise InputError(f"{flag} {d}: {out[key].name} and {p.name} both pair as {key!r}; "
                             "keep one of them")
        out[key] = p
    return out


@dataclass(frozen=True)
class PairPlan:
    """Which files ``refine eval --pred-dir/--gt-dir`` evaluates.

    Attributes:
        pairs: ``(key, pred, gt, coarse or None)`` in key order.
        unpaired_pred: predictions whose key has no GT.
        unpaired_gt: GTs whose key has no prediction.
    """

    pairs: list[tuple[str, Path, Path, Path | None]]
    unpaired_pred: list[str]
    unpaired_gt: list[str]


def pair_directories(
    pred_dir: str | Path, gt_dir: str | Path, coarse_dir: str | Path | None = None
) -> PairPlan:
    """Pair the masks of two (or three) folders by key (see :func:`pair_key`).

    Raises:
        InputError: a folder is missing, no key is shared, two files of one folder
            share a key, or ``coarse_dir`` lacks a mask for some pair.
    """
    preds = _index_dir(pred_dir, "--pred-dir")
    gts = _index_dir(gt_dir, "--gt-dir")
    keys = sorted(set(preds) & set(gts))
    if not keys:
        raise InputError(
            f"no prediction in --pred-dir {pred_dir} ({len(preds)} masks) has a GT with the same name in "
            f"--gt-dir {gt_dir} ({len(gts)} masks): files pair by name without extension "
            "(a.png, a.tif and a.refined.tif all pair as 'a')"
        )
    coarses: dict[str, Path] = {}
    if coarse_dir is not None:
        coarses = _index_dir(coarse_dir, "--coarse-dir")
        missing = [k for k in keys if k not in coarses]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise InputError(f"--coarse-dir {coarse_dir} has no coarse mask for {', '.join(missing[:5])}"
                             f"{more}; give one per evaluated pair, or drop --coarse-dir")
    un_p = sorted(str(preds[k]) for k in set(preds) - set(gts))
    un_g = sorted(str(gts[k]) for k in set(gts) - set(preds))
    if un_p:
        log.warning("%d prediction(s) without a GT in %s are skipped (e.g. %s)", len(un_p), gt_dir,
                    Path(un_p[0]).name)
    if un_g:
        log.warning("%d GT mask(s) without a prediction in %s are skipped (e.g. %s)", len(un_g), pred_dir,
                    Path(un_g[0]).name)
    pairs = [(k, preds[k], gts[k], coarses.get(k)) for k in keys]
    return PairPlan(pairs, un_p, un_g)


def evaluate_many(
    pairs: Sequence[tuple[str, str | Path, str | Path, str | Path | None]],
    *,
    options: EvalOptions | None = None,
    window: int = DEFAULT_WINDOW_SIZE,
    classes: int | None = None,
    limits: Limits | None = None,
    unpaired_pred: Sequence[str] = (),
    unpaired_gt: Sequence[str] = (),
    progress: Progress | None = None,
) -> EvalSummary:
    """Evaluate several ``(name, pred, gt, coarse)`` pairs one after another.

    Returns:
        The per-pair results and their means.
    """
    options = options or EvalOptions()
    if classes is not None and not options.labels:
        options = dataclasses.replace(options, labels=True)
    results = [
        evaluate_pair(pred, gt, coarse, options=options, window=window, classes=classes, limits=limits,
                      name=name, progress=progress)
        for name, pred, gt, coarse in pairs
    ]
    return EvalSummary(results, options, window, list(unpaired_pred), list(unpaired_gt))


def evaluate_directories(
    pred_dir: str | Path,
    gt_dir: str | Path,
    coarse_dir: str | Path | None = None,
    **kwargs: Any,
) -> EvalSummary:
    """Pair two (or three) folders by key and evaluate every pair (``kwargs``: see :func:`evaluate_many`)."""
    plan = pair_directories(pred_dir, gt_dir, coarse_dir)
    return evaluate_many(plan.pairs, unpaired_pred=plan.unpaired_pred, unpaired_gt=plan.unpaired_gt, **kwargs)


def format_metric(value: float | None, digits: int = 4) -> str:
    """A metric for tables: fixed digits, ``-`` when absent or not finite."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"
