"""Training of MagNet's refinement module for a frozen segmenter (``refine train --arch magnet-refinement``).

Re-implemented from a description of the official recipe (MagNet's ``train.py``); no
official code. The official recipe: the backbone is frozen and only the refinement module
trains; each example pairs the backbone's softmax on the whole image resized to the input size
(cropped with ``roi_align`` to the box: the Y crop) with its softmax on a random crop of the
image resized to a random stage scale (O); the loss is OHEM cross-entropy (threshold 0.7,
``min_kept`` 100 000) against the crop's label; SGD (lr 1e-3, momentum 0.9, weight decay
5e-4) with step decays, 50 epochs of batch 8, on Cityscapes or DeepGlobe. What one training
example is here, for a composite image with exact ground truth (GT)::

    Y      = segmenter(whole image resized to the input size)        the coarse pass (stage 1)
    scale  = one of the image's refinement stage sizes                 generic_scales (random)
    box    = an input-size crop of the image resized to that scale     (see below)
    O      = segmenter(the crop, resized to the input size)            the fine prediction
    Ycrop  = Y upsampled to the scale, cropped to the box              crop_resize
    GT     = alpha resized to the scale, cropped, >= 0.5               the target
    loss   = OHEM cross-entropy(module(O, Ycrop), GT)                  threshold 0.7

Everything upstream of the module uses the inference pipeline's own functions
(:mod:`refine_cli.refiners.magnet`: the segmenter's resize, ``upsample_y``,
``crop_resize``, ``generic_scales``), and the module is called in the pipeline's argument
order, **O first** (``refine_patches``). The official ``train.py`` calls it as (Y crop, O)
but its ``test.py`` and ``demo.py`` as (O, Y crop) (the order the released weights were
measured with); training and inference must agree, and ours do.

Deviations from the official recipe, and why:

* **Data**: portrait composites with exact GT (``refine_cli.train.data``: P3M portraits
  and their alpha mattes pasted on other photos), not Cityscapes/DeepGlobe. Portraits
  whose stem is in ``holdout`` are never used, so a benchmark can test on people the
  module has not seen.
* **Scales**: the stage sizes of the generic schedule of the image (``binary`` preset),
  not a fixed list; canvases of random size and aspect ratio.
* **Crops**: per stage, one crop is the patch-grid patch with the highest mean
  uncertainty of Y (exactly what MagNet-Fast refines first), one is centred on an
  uncertain or boundary pixel, one is uniform (the official crops are uniform only;
  MagNet-Fast only ever refines uncertain patches, so they matter most).
* **Cache**: the frozen segmenter's outputs (O, Y crop) and the GT crop are computed
  once per example and stored as ``uint8`` (probability * 255, rounded; error <= 0.002)
  in ``.npz`` shards, so the module trains from memory. Each step takes random
  ``crop x crop`` sub-crops (the module's receptive field is 9 x 9 px, so sub-crops
  lose nothing but BatchNorm context), biased to uncertain pixels, mirrored half of the time.
* **Optimiser**: AdamW with warm-up and cosine decay by default (a short CPU budget);
  ``optimizer="sgd"`` gives the official SGD (momentum 0.9, weight decay 5e-4) with the
  same schedule. ``min_kept`` of OHEM is a fraction of the batch's pixels
  (``ohem_keep``; the official 100 000 of 8 x 256 x 128 px is 0.381).
* **Loss**: OHEM cross-entropy plus ``ce_weight`` x plain cross-entropy over all pixels
  (default 1; 0 is the official loss). OHEM alone drops every pixel whose true-class
  probability passed the 0.7 threshold, so nothing pushes the output beyond ~0.7: a module
  trained that way answered 0.30 / 0.70 where O and Y agreed on certain background /
  foreground. MagNet copies R into Y at the selected points (also where the score ties at
  0), so such R turns certain regions uncertain and misleads the next stage's patch
  ranking; measured on held-out composites, IoU fell by 4 points. The plain term keeps R
  calibrated; the OHEM term still weights the hard pixels twice.

What a run writes to ``out``::

    cache/train-NNNN.npz, cache/val-NNNN.npz   the segmenter cache (shards of ``SHARD`` composites:
                      o, y, g uint8 (n, h, w) and a JSON list of where each crop came from)
    cache/key.json    what the cache depends on (a run refuses a cache built differently)
    checkpoint.pt     resumable state (same format as the CascadePSP trainer's)
    best.pt/.json, final.pt/.json   exported weights + sidecar (``runtime.export_weights``)
    log.jsonl, config.json

Conventions: probabilities in ``[0, 1]``; maps ``(N, C, h, w)`` float32, C = 2
(background, foreground) for binary segmenters.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from refine_cli.errors import InputError, UsageError
from refine_cli.train.runtime import (
    CHECKPOINT,
    ProgressFn,
    RunLog,
    RunState,
    TrainResult,
    atomic_write,
    check_settings,
    export_weights,
    iou_mba,
    load_checkpoint,
    lr_factor,
    resolve_device,
    run_steps,
    seed_everything,
    sha256_file,
)
from refine_cli.weights.files import read_export_sidecar

logger = logging.getLogger(__name__)

ARCH = "magnet-refinement"
"""``--arch`` value (and sidecar ``arch``) of MagNet's refinement module."""

VAL_SEED = 1_000_003
"""Seed of the validation composites (the CascadePSP trainer's; never a training seed)."""

SHARD = 25
"""Composites per cache shard."""

CACHE_FORMAT = "refine-magnet-cache/1"
"""``format`` of ``cache/key.json``."""

HOLDOUT = ("p_09ba26b4", "p_818e689d")
"""Portraits (file stems) of ``../shared/data/p3m-portraits-pseudogt`` kept out of training."""

OPTIMIZERS = ("adamw", "sgd")
"""Values of ``MagnetTrainConfig.optimizer``."""

_STREAM_CANVAS, _STREAM_CROPS, _STREAM_BATCH = 0x3A61, 0x3A62, 0x3A63


@dataclass(frozen=True)
class MagnetTrainConfig:
    """Everything a refinement-module training run depends on (stored in its checkpoint).

    Attributes:
        out: output folder (cache, checkpoint, exported weights, log).
        arch: always :data:`ARCH`.
        segmenter: the frozen segmenter: registry name or model file (``refine_cli.segmenters``).
        steps: optimiser steps.
        batch_size: sub-crops per step.
        crop: sub-crop side, px (multiple of 8, 32 ..  the segmenter's input size).
        lr: peak learning rate.
        optimizer: ``adamw`` or ``sgd`` (the official one: momentum 0.9).
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        warmup: linear warm-up steps, then cosine decay to ``lr * min_lr_ratio``.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        grad_clip: max global gradient norm (0 = none).
        ohem_threshold: OHEM keeps pixels whose true-class probability is below this ...
        ohem_keep: ... and at least this fraction of the batch's pixels (the hardest).
        ce_weight: weight of a plain cross-entropy over all pixels added to the OHEM loss (0 = the
            official loss alone; see the module docstring for why the shipped module uses 1).
        init: start from these exported weights (``refine train`` export with its sidecar, loaded
            strictly and checksum-checked) instead of a random initialisation: fine-tuning.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` for the module (the cache is made on the CPU
            for TFLite segmenters).
        threads: torch, OpenCV and TFLite CPU threads (``None``: the libraries' defaults).
        seed: seed of initialisation, of the training composites and of the batches.
        samples: training composites in the cache.
        val_samples: validation composites (seed :data:`VAL_SEED`, same portraits as training).
        crops_per_stage: crops per composite and refinement stage (top patch, boundary, uniform, ...).
        canvas: ``(low, high)`` long side of the composites, px; aspect ratio 9:16 .. 16:9.
        boundary_bias: fraction of sub-crops centred on an uncertain or boundary pixel.
        holdout: portrait stems never used (kept for benchmarks).
        photos: background photos (``None``: ``../shared/data/photos``).
        portraits: portraits with mattes (``None``: ``../shared/data/p3m-portraits-pseudogt``).
        val_every: validate every this many steps (0 = only at the end).
        ckpt_every: write ``checkpoint.pt`` every this many steps (0 = at validations and the end).
        log_every: log the mean loss every this many steps.
        fixed_batch: train on the first batch over and over (debugging / tests).
    """

    out: Path
    arch: str = ARCH
    segmenter: str = "mediapipe-selfie"
    steps: int = 800
    batch_size: int = 8
    crop: int = 128
    lr: float = 2e-3
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    warmup: int = 40
    min_lr_ratio: float = 0.05
    grad_clip: float = 5.0
    ohem_threshold: float = 0.7
    ohem_keep: float = 100_000 / (8 * 256 * 128)
    ce_weight: float = 1.0
    init: Path | None = None
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    samples: int = 400
    val_samples: int = 8
    crops_per_stage: int = 3
    canvas: tuple[int, int] = (768, 1600)
    boundary_bias: float = 0.7
    holdout: tuple[str, ...] = HOLDOUT
    photos: Path | None = None
    portraits: Path | None = None
    val_every: int = 200
    ckpt_every: int = 100
    log_every: int = 25
    fixed_batch: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out).expanduser())
        for name in ("photos", "portraits", "init"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else Path(value).expanduser())
        object.__setattr__(self, "canvas", tuple(int(v) for v in self.canvas))
        object.__setattr__(self, "holdout", tuple(str(v) for v in self.holdout))
        if self.arch != ARCH:
            raise UsageError(f"MagnetTrainConfig trains --arch {ARCH}, not {self.arch!r}")
        lo, hi = self.canvas
        check_settings(self, (
            (self.optimizer in OPTIMIZERS,
             f"optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}"),
            (0.0 < self.ohem_threshold <= 1.0, "ohem_threshold must be in (0, 1]"),
            (0.0 <= self.ohem_keep <= 1.0, "ohem_keep must be in [0, 1]"),
            (self.ce_weight >= 0.0, "ce_weight must be >= 0"),
            (self.samples >= 1 and self.val_samples >= 1, "--samples and val_samples must be >= 1"),
            (self.crops_per_stage >= 1, "crops_per_stage must be >= 1"),
            (64 <= lo <= hi, f"canvas {self.canvas} must satisfy 64 <= low <= high"),
            (0.0 <= self.boundary_bias <= 1.0, "boundary_bias must be in [0, 1]"),
            (min(self.val_every, self.ckpt_every, self.warmup) >= 0, "--val-every, --ckpt-every and warm-up "
             "must be >= 0"),
        ))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view (stored in checkpoints and sidecars)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("out", "photos", "portraits", "init"):
            d[name] = None if d[name] is None else str(d[name])
        d["canvas"], d["holdout"] = list(self.canvas), list(self.holdout)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MagnetTrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (newer checkpoint)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"the checkpoint's config has unknown keys {unknown}; it needs a newer refine")
        return cls(**{**d, "canvas": tuple(d["canvas"]), "holdout": tuple(d["holdout"])})

    def cache_key(self, segmenter_id: Mapping[str, Any]) -> dict[str, Any]:
        """What the segmenter cache depends on (a cache with another key is refused)."""
        return {
            "format": CACHE_FORMAT, "segmenter": dict(segmenter_id), "seed": self.seed,
            "samples": self.samples,
            "val_samples": self.val_samples, "crops_per_stage": self.crops_per_stage,
            "canvas": list(self.canvas), "holdout": list(self.holdout),
            "photos": None if self.photos is None else str(self.photos),
            "portraits": None if self.portraits is None else str(self.portraits),
        }


TINY: dict[str, Any] = {
    "steps": 30, "batch_size": 2, "crop": 64, "lr": 1e-2, "warmup": 2, "samples": 2, "val_samples": 1,
    "crops_per_stage": 1, "canvas": (320, 400), "val_every": 0, "ckpt_every": 10, "log_every": 5,
    "threads": 1, "holdout": (),
}
"""Overrides of ``--tiny``: a CI smoke run of a few steps on 64 px crops from a tiny cache."""

RESUME_OVERRIDABLE = ("steps", "threads", "device", "val_every", "ckpt_every", "log_every")
"""Config fields a resumed run may change; any other difference from the checkpoint is refused."""


def resume_config(stored: MagnetTrainConfig, overrides: Mapping[str, Any]) -> MagnetTrainConfig:
    """The config of a resumed run: the checkpoint's, with the allowed overrides applied.

    Raises:
        UsageError: an override would change the run (data, batch, learning rate ...).
    """
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in ("out", "arch"):
            continue
        if key in RESUME_OVERRIDABLE:
            changes[key] = value
            continue
        current = getattr(stored, key)
        norm = tuple(value) if isinstance(current, tuple) and isinstance(value, list | tuple) else value
        if norm != current:
            raise UsageError(
                f"--resume continues the run in {stored.out} whose {key} is {current!r}, not {value!r}; "
                "drop that flag, or train into a new --out folder"
            )
    return replace(stored, **changes)


# --------------------------------------------------------------------------------------------
# the segmenter


def load_frozen_segmenter(name: str, threads: int | None = None) -> tuple[Any, dict[str, Any]]:
    """The frozen segmenter and what identifies it (name, file, sha256, input size, classes).

    TFLite models (the registry's ``mediapipe-selfie`` or a ``.tflite`` file) get ``threads``
    interpreter threads; other segmenters load through :func:`refine_cli.segmenters.load_segmenter`.

    Raises:
        WeightsError: a registry model is not in the cache (the message gives the fetch command).
        DependencyError: the runtime's optional package is missing.
    """
    from refine_cli import weights as registry
    from refine_cli.hashing import sha256_file
    from refine_cli.segmenters import load_segmenter
    from refine_cli.segmenters.base import Segmenter
    from refine_cli.segmenters.tflite import SELFIE_NAME, SELFIE_SPEC, TFLiteSegmenter

    path: Path | None = None
    seg: Segmenter
    if name == SELFIE_NAME and not Path(name).is_file():
        path = registry.resolve_weights(SELFIE_NAME).path
        seg = TFLiteSegmenter(path, spec=SELFIE_SPEC, threads=threads)
    elif Path(name).suffix.lower() == ".tflite":
        path = Path(name).expanduser()
        seg = TFLiteSegmenter(path, threads=threads)
    else:
        seg = load_segmenter(name, "cpu")
        path = Path(name) if Path(name).is_file() else None
    ident = {
        "name": seg.name if path is None or name == SELFIE_NAME else name,
        "sha256": sha256_file(path) if path is not None else None,
        "input_size": list(seg.input_size), "classes": list(seg.classes),
    }
    return seg, ident


# --------------------------------------------------------------------------------------------
# the cache


def canvas_size(cfg: MagnetTrainConfig, seed: int, index: int) -> tuple[int, int]:
    """``(H, W)`` of composite ``index``: long side in ``cfg.canvas``, aspect 9:16 .. 16:9, multiples of 8."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, index, _STREAM_CANVAS])
    long = rng.uniform(cfg.canvas[0], cfg.canvas[1])
    aspect = math.exp(rng.uniform(math.log(9 / 16), math.log(16 / 9)))  # W / H
    h, w = (long, long * aspect) if aspect < 1 else (long / aspect, long)
    return max(64, int(round(h / 8)) * 8), max(64, int(round(w / 8)) * 8)


def composite_indices(n: int, n_portraits: int, excluded: Sequence[int], start: int = 0) -> list[int]:
    """The first ``n`` sample indices ``i >= start`` whose portrait ``i % n_portraits`` is not excluded.

    ``refine_cli.train.data`` composites portrait ``i % n_portraits`` for sample ``i``.

    Raises:
        UsageError: every portrait is excluded.
    """
    if len(set(excluded)) >= n_portraits:
        raise UsageError("every portrait is held out: shorten --holdout")
    out: list[int] = []
    i = start
    while len(out) < n:
        if i % n_portraits not in excluded:
            out.append(i)
        i += 1
    return out


@dataclass
class Example:
    """One cached training example at the segmenter's input size.

    Attributes:
        o: ``(h, w)`` uint8 foreground probability * 255 of the segmenter on the crop (O).
        y: ``(h, w)`` uint8 the same of the coarse pass, upsampled and cropped (Y crop).
        g: ``(h, w)`` uint8 ground-truth alpha * 255.
        meta: where it came from (sample, portrait, stage, scale, box, how the box was chosen).
    """

    o: np.ndarray
    y: np.ndarray
    g: np.ndarray
    meta: dict[str, Any]


def _u8(p: np.ndarray | Tensor) -> np.ndarray:
    arr = p.detach().cpu().numpy() if isinstance(p, Tensor) else np.asarray(p)
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)


def _choose_box(
    mode: str, stage_hw: tuple[int, int], crop_hw: tuple[int, int], yu: Tensor, alpha_s: np.ndarray,
    rng: np.random.Generator,
) -> Any:
    """A crop window of ``crop_hw`` inside the stage, chosen by ``mode``.

    ``top``: the patch-grid patch of highest mean Yu; ``boundary``: centred (+- a quarter
    crop) on an uncertain (Yu > 0.2) or GT-boundary pixel; ``uniform``: anywhere.
    """
    from refine_cli.refiners.magnet_points import patch_grid, patch_mean, rank_patches
    from refine_cli.tiling.grid import Window

    H, W = stage_hw
    h, w = crop_hw
    if mode == "top":
        boxes = patch_grid(stage_hw, crop_hw)
        return boxes[rank_patches(patch_mean(yu, boxes), 1)[0]]
    if mode == "boundary":
        cand = (yu[0, 0].numpy() > 0.2) | ((alpha_s > 0.05) & (alpha_s < 0.95))
        flat = np.flatnonzero(cand)
        if len(flat):
            cy, cx = divmod(int(flat[int(rng.integers(len(flat)))]), W)
            r0 = int(np.clip(cy - h // 2 + rng.integers(-h // 4, h // 4 + 1), 0, H - h))
            c0 = int(np.clip(cx - w // 2 + rng.integers(-w // 4, w // 4 + 1), 0, W - w))
            return Window(r0, c0, h, w)
    return Window(int(rng.integers(H - h + 1)), int(rng.integers(W - w + 1)), h, w)


def make_examples(
    index: int, seed: int, cfg: MagnetTrainConfig, segmenter: Any, fg_class: int = 1
) -> list[Example]:
    """The examples of composite ``index`` (portraits kind of ``refine_cli.train.data``).

    Args:
        index: sample index (portrait ``index % n_portraits``).
        seed: data seed (the run's, or :data:`VAL_SEED`).
        cfg: canvas, crops per stage, data folders.
        segmenter: the frozen segmenter (C classes; ``fg_class`` is kept for C = 2).
        fg_class: class whose probability is stored.

    Returns:
        ``crops_per_stage`` examples per refinement stage of the composite's generic schedule.
    """
    from refine_cli.refiners.magnet import generic_scales, predict_crops, stage_image, upsample_y
    from refine_cli.refiners.magnet_points import crop_resize, uncertainty
    from refine_cli.train.data import SampleSpec, make_layers

    hw = canvas_size(cfg, seed, index)
    spec = SampleSpec(size=hw, seed=seed, kinds=(("portraits", 1.0),), photos=cfg.photos,
                      portraits=cfg.portraits)
    layers, lmeta = make_layers(index, spec, kind="portraits")
    image, alpha = layers.composite(), layers.alpha
    w_in, h_in = segmenter.input_size
    with torch.inference_mode():
        y0 = predict_crops(segmenter, [image])  # (1, C, h_in, w_in): the coarse pass on the whole image
        rng = np.random.default_rng([seed & 0xFFFFFFFF, index, _STREAM_CROPS])
        modes = ("top", "boundary", "uniform")
        out: list[Example] = []
        for stage, scale in enumerate(generic_scales(hw, (w_in, h_in))[1:], start=2):
            stage_hw = (scale[1], scale[0])
            img_s = stage_image(image, scale, segmenter)
            alpha_s = cv2.resize(alpha, scale, interpolation=cv2.INTER_AREA) if scale != (hw[1], hw[0]) \
                else alpha
            y_s = upsample_y(y0, scale)
            yu = uncertainty(y_s)
            crop_hw = (min(h_in, stage_hw[0]), min(w_in, stage_hw[1]))
            for j in range(cfg.crops_per_stage):
                mode = modes[j % len(modes)]
                box = _choose_box(mode, stage_hw, crop_hw, yu, alpha_s, rng)
                o = predict_crops(segmenter, [img_s[box.slices]])[0, fg_class]
                yc = crop_resize(y_s, box, (h_in, w_in))[0, fg_class]
                g = alpha_s[box.slices]
                if g.shape != (h_in, w_in):  # a stage smaller than the input: enlarged like O and the Y crop
                    g = cv2.resize(g, (w_in, h_in), interpolation=cv2.INTER_LINEAR)
                meta = {"index": int(index), "portrait": lmeta["portrait"]["id"], "stage": stage,
                        "scale": list(scale), "box": [box.row, box.col, box.height, box.width], "mode": mode}
                out.append(Example(_u8(o), _u8(yc), _u8(g), meta))
    return out


def _shard_path(folder: Path, split: str, k: int) -> Path:
    return folder / f"{split}-{k:04d}.npz"


def _write_shard(path: Path, examples: Sequence[Example]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f, o=np.stack([e.o for e in examples]), y=np.stack([e.y for e in examples]),
                g=np.stack([e.g for e in examples]), meta=np.array(json.dumps([e.meta for e in examples])),
            )

    atomic_write(path, write)


@dataclass
class CacheArrays:
    """A split of the cache in memory.

    Attributes:
        o, y, g: ``(n, h, w)`` uint8 (see :class:`Example`).
        meta: per example.
    """

    o: np.ndarray
    y: np.ndarray
    g: np.ndarray
    meta: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.o)


def build_cache(
    cfg: MagnetTrainConfig, segmenter: Any, segmenter_id: Mapping[str, Any], split: str
) -> CacheArrays:
    """Make (or complete) the cached examples of a split and load them.

    Shards already written with the same key are kept, so an interrupted build continues
    where it stopped and a resumed run does not run the segmenter again.

    Args:
        cfg: the run's config.
        segmenter: the frozen segmenter.
        segmenter_id: what identifies it (:func:`load_frozen_segmenter`).
        split: ``train`` (``cfg.samples`` composites, seed ``cfg.seed``) or ``val``
            (``cfg.val_samples``, seed :data:`VAL_SEED`).

    Raises:
        UsageError: ``out/cache`` was built with other settings.
        InputError: missing data folders.
    """
    from refine_cli.train.data import SampleSpec, sources

    folder = cfg.out / "cache"
    folder.mkdir(parents=True, exist_ok=True)
    key = cfg.cache_key(segmenter_id)
    key_path = folder / "key.json"
    if key_path.is_file():
        stored = json.loads(key_path.read_text(encoding="utf-8"))
        if stored != key:
            diff = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
            raise UsageError(f"{folder} holds a segmenter cache made with other settings "
                             f"({', '.join(diff)}); delete it or train into another --out")
    else:
        key_path.write_text(json.dumps(key, indent=2) + "\n", encoding="utf-8")
    spec = SampleSpec(size=(64, 64), seed=0, kinds=(("portraits", 1.0),), photos=cfg.photos,
                      portraits=cfg.portraits)
    bank = sources(spec, check=True).portraits
    stems = [p.stem for p, _ in bank.items]
    unknown = [s for s in cfg.holdout if s not in stems]
    if unknown and cfg.portraits is None:
        logger.warning("held-out portraits %s are not in the portrait folder", unknown)
    excluded = [i for i, s in enumerate(stems) if s in cfg.holdout]
    n, seed = (cfg.samples, cfg.seed) if split == "train" else (cfg.val_samples, VAL_SEED)
    indices = composite_indices(n, len(stems), excluded)
    parts: list[CacheArrays] = []
    t0, made = time.perf_counter(), 0
    for k in range(math.ceil(n / SHARD)):
        path = _shard_path(folder, split, k)
        if not path.is_file():
            block = indices[k * SHARD : (k + 1) * SHARD]
            examples = [e for i in block for e in make_examples(i, seed, cfg, segmenter)]
            _write_shard(path, examples)
            made += 1
            logger.info("cache %s shard %d/%d: %d examples (%.0f s so far)", split, k + 1,
                        math.ceil(n / SHARD), len(examples), time.perf_counter() - t0)
        with np.load(path) as z:
            parts.append(CacheArrays(z["o"], z["y"], z["g"], json.loads(str(z["meta"]))))
    arrays = CacheArrays(
        np.concatenate([p.o for p in parts]), np.concatenate([p.y for p in parts]),
        np.concatenate([p.g for p in parts]), [m for p in parts for m in p.meta],
    )
    logger.info("cache %s: %d examples from %d composites (%d shards made in %.0f s)", split, len(arrays), n,
                made, time.perf_counter() - t0)
    return arrays


# --------------------------------------------------------------------------------------------
# batches


def to_probs(u8: np.ndarray | Tensor) -> Tensor:
    """``(N, h, w)`` uint8 foreground probabilities * 255 -> ``(N, 2, h, w)`` float32 ``[1 - p, p]``."""
    p = torch.as_tensor(u8).float() * (1.0 / 255.0)
    return torch.stack([1.0 - p, p], dim=1)


def batch_at(cache: CacheArrays, step: int, cfg: MagnetTrainConfig) -> dict[str, Tensor]:
    """The batch of ``step``: always the same sub-crops (``default_rng([seed, step, stream])``).

    Each item picks a cached example, a ``crop x crop`` window (centred on an uncertain or
    boundary pixel with probability ``boundary_bias``, else uniform) and mirrors it half of the time.

    Returns:
        ``o``, ``y`` ``(B, 2, c, c)`` float32 probabilities; ``target`` ``(B, c, c)`` int64 (GT >= 0.5).
    """
    rng = np.random.default_rng([cfg.seed & 0xFFFFFFFF, int(step), _STREAM_BATCH])
    _, H, W = cache.o.shape
    c = min(cfg.crop, H, W)
    os_, ys, gs = [], [], []
    for _ in range(cfg.batch_size):
        i = int(rng.integers(len(cache)))
        o, y, g = cache.o[i], cache.y[i], cache.g[i]
        r0, c0 = int(rng.integers(H - c + 1)), int(rng.integers(W - c + 1))
        if rng.random() < cfg.boundary_bias:
            cand = np.flatnonzero(((o > 12) & (o < 243)) | ((y > 12) & (y < 243)) | ((g > 12) & (g < 243)))
            if len(cand):
                cy, cx = divmod(int(cand[int(rng.integers(len(cand)))]), W)
                r0, c0 = int(np.clip(cy - c // 2, 0, H - c)), int(np.clip(cx - c // 2, 0, W - c))
        sl = (slice(r0, r0 + c), slice(c0, c0 + c))
        o, y, g = o[sl], y[sl], g[sl]
        if rng.random() < 0.5:
            o, y, g = o[:, ::-1], y[:, ::-1], g[:, ::-1]
        os_.append(o)
        ys.append(y)
        gs.append(g)
    o_b, y_b, g_b = (np.ascontiguousarray(np.stack(a)) for a in (os_, ys, gs))
    return {"o": to_probs(o_b), "y": to_probs(y_b), "target": torch.from_numpy(g_b >= 128).long()}


# --------------------------------------------------------------------------------------------
# validation


def validate(model: nn.Module, cache: CacheArrays, device: torch.device, batch: int = 4) -> dict[str, Any]:
    """IoU and mBA of the module's output, of O and of the Y crop, on the validation examples.

    Returns:
        ``iou``, ``mba`` (the module, ``softmax(module(O, Y))`` foreground >= 0.5), ``coarse_iou``,
        ``coarse_mba`` (the Y crop), ``fine_iou``, ``fine_mba`` (O), ``gain_iou``/``gain_mba``
        (module minus the better of O and Y), ``score`` (``iou + mba``, the best-checkpoint
        criterion), ``n``.
    """
    from refine_cli.evaluate import evaluate_arrays

    was_training = model.training
    model.eval()
    rows: list[tuple[float, ...]] = []
    try:
        with torch.inference_mode():
            for s in range(0, len(cache), batch):
                o = to_probs(cache.o[s : s + batch]).to(device)
                y = to_probs(cache.y[s : s + batch]).to(device)
                r = torch.softmax(model(o, y).float(), dim=1)[:, 1].cpu().numpy()
                for k in range(len(r)):
                    gt = cache.g[s + k].astype(np.float32) / 255.0
                    preds = (r[k], cache.y[s + k] / 255.0, cache.o[s + k] / 255.0)
                    m = [evaluate_arrays(p, gt) for p in preds]
                    rows.append(tuple(v for x in m for v in iou_mba(x)))
    finally:
        model.train(was_training)
    mean = np.mean(np.array(rows), axis=0)
    res: dict[str, Any] = {
        "iou": mean[0], "mba": mean[1], "coarse_iou": mean[2], "coarse_mba": mean[3], "fine_iou": mean[4],
        "fine_mba": mean[5], "n": len(rows),
    }
    res["gain_iou"] = res["iou"] - max(res["coarse_iou"], res["fine_iou"])
    res["gain_mba"] = res["mba"] - max(res["coarse_mba"], res["fine_mba"])
    res["score"] = res["iou"] + res["mba"]
    return {k: float(v) if isinstance(v, np.floating | float) else v for k, v in res.items()}


# --------------------------------------------------------------------------------------------
# the loop


def _optimizer(model: nn.Module, cfg: MagnetTrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _train_step(
    model: nn.Module, batch: Mapping[str, Tensor], cfg: MagnetTrainConfig, device: torch.device,
    optimizer: torch.optim.Optimizer,
) -> float | None:
    """One optimiser step; ``None`` (no update) when the loss is not finite."""
    from refine_cli.train.losses import ohem_cross_entropy

    o, y, target = (batch[k].to(device, non_blocking=True) for k in ("o", "y", "target"))
    logits = model(o, y)  # the pipeline's order: O first (refine_cli.refiners.magnet.refine_crops)
    min_kept = int(cfg.ohem_keep * target.numel())
    loss = ohem_cross_entropy(logits, target, threshold=cfg.ohem_threshold, min_kept=min_kept)
    if cfg.ce_weight:
        loss = loss + cfg.ce_weight * nn.functional.cross_entropy(logits, target)
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return None
    loss.backward()
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return float(loss.detach())


def normalization_meta() -> dict[str, Any]:
    """The input contract written into exported sidecars."""
    return {"inputs": "two C-class softmax maps at the segmenter's input size: O (the segmenter on the "
                      "patch) first, then the Y crop (the accumulated prediction, upsampled and cropped)",
            "output": "C-class logits (softmax over dim 1)"}


def train_magnet(
    cfg: MagnetTrainConfig,
    *,
    resume: bool = False,
    overrides: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train (or continue training) MagNet's refinement module for a frozen segmenter.

    Args:
        cfg: the run's config (with ``resume``, only ``cfg.out`` matters plus ``overrides``).
        resume: continue from ``cfg.out / checkpoint.pt``.
        overrides: fields set explicitly by the caller (only used with ``resume``;
            :data:`RESUME_OVERRIDABLE` may change).
        progress: ``progress(step_done, steps_total, last_loss)`` after every step.

    Returns:
        A :class:`refine_cli.train.runtime.TrainResult`.

    Raises:
        UsageError: bad settings, or ``out`` already holds a run and ``resume`` is off.
        InputError: unreadable checkpoint or missing data folders.
        WeightsError / DependencyError: the segmenter cannot be loaded.
    """
    t_start = time.perf_counter()
    ckpt_path = cfg.out / CHECKPOINT
    state: dict[str, Any] | None = None
    if resume:
        state = load_checkpoint(ckpt_path)
        if state["config"].get("arch") != ARCH:
            raise UsageError(f"{ckpt_path} is a {state['config'].get('arch')} run, not {ARCH}; drop --arch")
        stored = MagnetTrainConfig.from_dict({**state["config"], "out": str(cfg.out)})
        cfg = resume_config(stored, dict(overrides or {}))
    elif ckpt_path.exists():
        raise UsageError(
            f"{cfg.out} already holds a training run ({CHECKPOINT}); pass --resume or another --out"
        )
    cfg.out.mkdir(parents=True, exist_ok=True)
    threads_before, cv_threads_before = torch.get_num_threads(), cv2.getNumThreads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        cv2.setNumThreads(cfg.threads)
    try:
        return _run(cfg, state, t_start=t_start, progress=progress)
    finally:
        torch.set_num_threads(threads_before)
        cv2.setNumThreads(cv_threads_before)


def _run(
    cfg: MagnetTrainConfig, state: dict[str, Any] | None, *, t_start: float, progress: ProgressFn | None
) -> TrainResult:
    """The body of :func:`train_magnet` once the config is settled."""
    device = resolve_device(cfg.device)
    (cfg.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
    segmenter, seg_id = load_frozen_segmenter(cfg.segmenter, cfg.threads)
    t_cache = time.perf_counter()
    train_set = build_cache(cfg, segmenter, seg_id, "train")
    val_set = build_cache(cfg, segmenter, seg_id, "val")
    cache_seconds = time.perf_counter() - t_cache
    n_classes = segmenter.num_classes
    if n_classes != 2:
        raise UsageError(f"segmenter {seg_id['name']} has {n_classes} classes; the cache stores binary "
                         "(2-class) predictions only")
    if cfg.crop > min(train_set.o.shape[1:]):
        raise UsageError(f"--crop {cfg.crop} is larger than the segmenter's input {seg_id['input_size']}")

    seed_everything(cfg.seed)
    model, init_meta = _start_model(cfg, n_classes, device)
    optimizer = _optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    step, best, wall = 0, None, 0.0
    if state is not None:
        model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        step, best, wall = int(state["step"]), state.get("best"), float(state.get("wall_seconds", 0.0))
        logger.info("resuming %s at step %d of %d", cfg.out, step, cfg.steps)
    logger.info("training %s (%d parameters) on %s: %d steps of %d x %d px crops from %d cached examples",
                ARCH, sum(p.numel() for p in model.parameters()), device, cfg.steps, cfg.batch_size, cfg.crop,
                len(train_set))
    log = RunLog(cfg.out / "log.jsonl")
    meta_base = _meta_base(cfg, n_classes, seg_id, init_meta, len(train_set))
    run = _MagnetRun(cfg=cfg, model=model, optimizer=optimizer, scheduler=scheduler, device=device, log=log,
                     meta_base=meta_base, t_start=t_start, best=best, wall=wall, val_set=val_set)
    fixed = batch_at(train_set, 0, cfg) if cfg.fixed_batch else None

    def one_step(step: int) -> float | None:
        batch = fixed if fixed is not None else batch_at(train_set, step, cfg)
        return _train_step(model, batch, cfg, device, optimizer)

    step, losses, validations = run_steps(
        cfg, step, one_step, scheduler=scheduler, log=log, progress=progress,
        run_validation=run.run_validation, snapshot=run.snapshot, ckpt_path=cfg.out / CHECKPOINT,
    )
    seconds = time.perf_counter() - t_start
    final = cfg.out / "final.pt"
    last_val = validations[-1] if validations else None
    export_weights(model, final, {**meta_base, "steps": step, "metrics": last_val,
                                  "wall_seconds": wall + seconds, "cache_seconds": cache_seconds})
    return TrainResult(cfg.out, step, losses, validations, run.best, seconds, final)


def _start_model(
    cfg: MagnetTrainConfig, n_classes: int, device: torch.device
) -> tuple[nn.Module, dict[str, Any] | None]:
    """A fresh module, or ``cfg.init``'s weights (strict, checksum-checked), in training mode on ``device``.

    Returns:
        The module and the facts of the ``--init`` weights (``None`` without them).
    """
    from refine_cli.models.magnet import RefinementMagNet

    model = RefinementMagNet(n_classes)
    init_meta = None
    if cfg.init is not None:
        from refine_cli.refiners.magnet_method import load_refinement_file

        start = load_refinement_file(cfg.init, n_classes)  # strict, checksum-checked
        model.load_state_dict(start.state_dict(), strict=True)
        init_meta = {"file": cfg.init.name, "sha256": sha256_file(cfg.init),
                     "steps": read_export_sidecar(cfg.init).get("steps")}
        logger.info("fine-tuning from %s (%s steps)", cfg.init, init_meta["steps"])
    return model.to(device).train(), init_meta


def _meta_base(
    cfg: MagnetTrainConfig, n_classes: int, seg_id: Mapping[str, Any], init_meta: dict[str, Any] | None,
    n_examples: int,
) -> dict[str, Any]:
    """The facts every exported sidecar of the run carries (architecture, segmenter, recipe, data)."""
    return {
        "arch": ARCH, "arch_params": {"n_classes": n_classes}, "segmenter": seg_id,
        "normalization": normalization_meta(),
        "recipe": {k: getattr(cfg, k) for k in ("crop", "batch_size", "lr", "optimizer", "weight_decay",
                                                "warmup", "min_lr_ratio", "grad_clip", "ohem_threshold",
                                                "ohem_keep", "ce_weight", "boundary_bias", "seed",
                                                "threads")},
        "init": init_meta,
        "data": {"samples": cfg.samples, "examples": n_examples, "val_samples": cfg.val_samples,
                 "val_seed": VAL_SEED, "crops_per_stage": cfg.crops_per_stage, "canvas": list(cfg.canvas),
                 "holdout": list(cfg.holdout), "photos": None if cfg.photos is None else str(cfg.photos),
                 "portraits": None if cfg.portraits is None else str(cfg.portraits)},
    }


@dataclass
class _MagnetRun(RunState):
    """A MagNet refinement-module run in progress (:class:`RunState`, plus its validation examples).

    Attributes:
        cfg: the run's config.
        val_set: the cached validation examples.
    """

    cfg: MagnetTrainConfig
    val_set: CacheArrays

    def snapshot(self, step: int) -> dict[str, Any]:
        """The resumable checkpoint after ``step`` steps (no gradient scaler: MagNet trains in fp32)."""
        return {**self.snapshot_state(step), "scaler": {}, "rng": {"torch": torch.get_rng_state()}}

    def run_validation(self, step: int) -> dict[str, Any]:
        """Validate after ``step`` steps, log it, and export ``best.pt`` when ``iou + mba`` improved."""
        t0 = time.perf_counter()
        res = {"step": step, **validate(self.model, self.val_set, self.device)}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        logger.info("step %d: val IoU %.4f (Y %.4f, O %.4f), mBA %.4f (Y %.4f, O %.4f)", step, res["iou"],
                    res["coarse_iou"], res["fine_iou"], res["mba"], res["coarse_mba"], res["fine_mba"])
        self.log.write({"type": "val", **res})
        if self.best is None or res["score"] > self.best["score"]:
            self.best = dict(res)
            meta = {**self.meta_base, "steps": step, "metrics": res}
            export_weights(self.model, self.cfg.out / "best.pt", meta)
        return res


def checkpoint_arch(out: Path) -> str | None:
    """The ``arch`` of the run in ``out`` (``None`` when it has no readable checkpoint)."""
    try:
        return str(load_checkpoint(Path(out) / CHECKPOINT)["config"].get("arch"))
    except InputError:
        return None


__all__ = [
    "ARCH", "HOLDOUT", "TINY", "MagnetTrainConfig", "batch_at", "build_cache", "load_frozen_segmenter",
    "make_examples", "train_magnet", "validate",
]
