"""Training loop of the CascadePSP refinement module (``refine train``), on CPU or CUDA.

The recipe is CascadePSP's training recipe (its ``train.py``: 224 px random crops, flips and
colour jitter, a coarse mask made by perturbing the GT down to a target IoU in [0.8, 1), Adam
with step decays, the six-output loss): random ``crop x crop`` crops of generated
composites with a perturbed coarse mask, the three-iteration cascade on every step, the
multi-output loss of :func:`~refine_cli.train.losses.cascadepsp_loss` (CE at OS8, CE + L1 +
L2 at OS4, L1 + L2 + gradient at OS1). Differences, all configurable: AdamW with linear
warm-up and a cosine decay instead of Adam with step decays, gradient-norm clipping, and
harder, more varied data (strength drawn per sample, samples made at one to two crop sides
so that some crops see the whole composite).

What a run writes to ``out``::

    checkpoint.pt     resumable state, rewritten atomically every ``ckpt_every`` steps:
                      model, optimiser, scheduler, grad scaler, step, RNG states, config,
                      best score, wall time (tensors and plain values only: loads with
                      ``weights_only=True``). The data position is the step: item ``k`` of
                      the stream is always the same crop, so resuming at step ``s`` goes on
                      with items ``s * batch_size ...``.
    best.pt/best.json the best validated weights as a plain state_dict + sidecar (arch dict,
                      steps, metrics, data spec, sha256); see :func:`export_weights`.
    final.pt/.json    the weights after the last step.
    log.jsonl         one JSON record per logged step and per validation.

Validation runs the official *global step* (:func:`refine_cli.refiners.cascadepsp.global_step`)
at ``val_size`` on a fixed generated set (seed :data:`VAL_SEED`, never used for training)
and, on ``val_full_n`` samples twice that size, the full global + local procedure; it reports
IoU and mBA of the refined and of the coarse masks and the gain, overall, per sample kind
and per coarse perturbation. The set is made of the run's own kinds and perturbations
(``data.kinds``, ``data.perturbations``), balanced: entry ``i`` cycles through the kinds,
then the perturbations, then three strengths (:func:`~refine_cli.train.data.make_eval_set`),
so the kinds' counts differ by at most one.

Model selection (``best.pt``, :func:`selection_score`): the validation with the highest
**mean over the validated kinds of the IoU gain over the coarse mask** (global step),
every kind weighing the same whatever its training weight or sample count. A step that
gains in one domain only by losing as much or more in another does not score higher, and a
domain with few samples cannot be traded away for a frequent one. The per-kind numbers of
the selected step are in ``best.json`` (``metrics.by_kind``).

Conventions: images enter the network through the model's own normalisation; masks are
float32 in [0, 1] (``refine_cli.config``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from refine_cli.errors import InputError, UsageError, WeightsError
from refine_cli.hashing import sha256_file as sha256_file
from refine_cli.models.registry import ARCHITECTURES, arch_dict
from refine_cli.models.registry import build_model as build_model
from refine_cli.train.data import (
    COARSE_METHODS,
    KINDS,
    SampleSpec,
    color_jitter,
    make_eval_set,
    make_sample,
    random_crop,
)
from refine_cli.train.losses import cascadepsp_loss
from refine_cli.train.runtime import (
    CHECKPOINT,
    ProgressFn,
    RunLog,
    RunState,
    TrainResult,
    check_settings,
    export_weights,
    iou_mba,
    load_checkpoint,
    lr_factor,
    mean_or_nan,
    resolve_device,
    rng_state,
    run_steps,
    seed_everything,
)
from refine_cli.weights.files import load_exported as load_exported

logger = logging.getLogger(__name__)

MAGNET_ARCH = "magnet-refinement"
"""``--arch`` of MagNet's refinement module (one of ``ARCHITECTURES``).

:mod:`refine_cli.train.magnet` trains it.
"""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""Values of ``TrainConfig.precision``."""

VAL_SEED = 1_000_003
"""Seed of the validation set (training streams use ``TrainConfig.seed``; keep them apart)."""


_STREAM = 0x7EA1
"""Extra seed word of the per-item crop / augmentation random stream."""


SELECTION_RULE = "mean over kinds of (IoU - coarse IoU), global step on the validation set"
"""How ``best.pt`` is chosen (stored in sidecars): see :func:`selection_score`."""


# --------------------------------------------------------------------------------------------
# configuration


Mix = tuple[tuple[str, float], ...]
"""Relative weights as sorted ``(name, weight)`` pairs."""


def check_mix(value: Any, names: Sequence[str], flag: str) -> Mix:
    """Normalise and check a weight mix (``kinds`` or ``perturbations``).

    Args:
        value: a mapping ``name -> weight``, or ``(name, weight)`` pairs or bare names (weight 1).
        names: the valid names.
        flag: the option named in errors (``--kinds``).

    Returns:
        Sorted ``(name, weight)`` pairs (float weights).

    Raises:
        UsageError: an unknown or repeated name, a weight that is not a number >= 0, or no
            positive weight; one line naming the valid names.
    """
    items = value.items() if isinstance(value, Mapping) else [value] if isinstance(value, str) else value
    out: dict[str, float] = {}
    for item in items:
        name, weight = (item, 1.0) if isinstance(item, str) else item
        name = str(name)
        if name not in names:
            raise UsageError(f"{flag}: unknown name {name!r}; the valid names are {', '.join(names)}")
        if name in out:
            raise UsageError(f"{flag}: {name!r} is given twice; give each name once")
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise UsageError(f"{flag}: the weight of {name!r} must be a number, got {weight!r}") from None
        if not (w >= 0 and math.isfinite(w)):
            raise UsageError(f"{flag}: the weight of {name!r} must be a finite number >= 0, got {weight!r}")
        out[name] = w
    if not any(w > 0 for w in out.values()):
        raise UsageError(f"{flag}: give at least one name with a positive weight, e.g. {names[0]}=1")
    return tuple(sorted(out.items()))


def parse_mix(text: str, names: Sequence[str], flag: str) -> Mix:
    """``--kinds`` / ``--perturbations``: ``name=weight,name=weight,...``; a bare name weighs 1.

    Weights are relative (they need not sum to 1). ``"aerial"`` alone is ``aerial=1``.

    Raises:
        UsageError: empty text, a malformed item, or what :func:`check_mix` refuses (one line).
    """
    items: list[tuple[str, str] | str] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            raise UsageError(f"{flag} {text!r}: empty entry; write name=weight,name=weight (e.g. "
                             f"{names[0]}=0.5,{names[1]}=0.5)")
        if "=" in part:
            name, _, weight = part.partition("=")
            items.append((name.strip(), weight.strip()))
        else:
            items.append(part)
    return check_mix(items, names, flag)


def format_mix(mix: Mix) -> str:
    """``name=weight,...`` (the ``--kinds`` syntax) of a mix."""
    return ",".join(f"{k}={w:g}" for k, w in mix)


@dataclass(frozen=True)
class DataConfig:
    """What the training stream generates (see :mod:`refine_cli.train.data`).

    Attributes:
        photos: folder of photos (``None``: ``../shared/data/photos`` when present).
        portraits: folder of portraits with mattes (``None``: the shared one when present).
        pairs: CSV or folder of user image/mask pairs; adds the ``pairs`` kind (weight 0.3)
            when given and ``kinds`` does not name it.
        kinds: relative weights of the sample kinds (:data:`~refine_cli.train.data.KINDS`:
            ``shapes`` / ``portraits`` / ``pairs`` / ``aerial`` / ``cells`` / ``thin``); a mapping,
            pairs or bare names (weight 1). The validation set is made of the same kinds.
        perturbations: relative weights of the coarse masks
            (:data:`~refine_cli.train.data.COARSE_METHODS`: ``cascadepsp`` / ``lowres`` /
            ``blobs`` / ``detector``; ``detector`` is the scene kinds' own detector-like mask and
            means ``cascadepsp`` for the other kinds).
        strength: ``(low, high)``: each sample's perturbation strength is drawn uniformly here
            (1 = CascadePSP's recipe, target IoU 0.8-1; 2 = target IoU down to 0.6).
        scales: sample side = ``crop * scale`` (rounded to 8 px), drawn uniformly from these;
            a scale of 1 shows the whole composite in the crop (the global step's view).
    """

    photos: Path | None = None
    portraits: Path | None = None
    pairs: Path | None = None
    kinds: tuple[tuple[str, float], ...] = (("portraits", 0.38), ("shapes", 0.62))
    perturbations: tuple[tuple[str, float], ...] = (("blobs", 0.25), ("cascadepsp", 0.45), ("lowres", 0.3))
    strength: tuple[float, float] = (0.6, 1.8)
    scales: tuple[float, ...] = (1.0, 1.0, 1.5, 2.0)

    def __post_init__(self) -> None:
        for name in ("photos", "portraits", "pairs"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else Path(value).expanduser())
        kinds = dict(check_mix(self.kinds, KINDS, "--kinds"))
        if self.pairs is not None and "pairs" not in kinds:
            kinds["pairs"] = 0.3
        object.__setattr__(self, "kinds", tuple(sorted(kinds.items())))
        perts = check_mix(self.perturbations, COARSE_METHODS, "--perturbations")
        object.__setattr__(self, "perturbations", perts)
        lo, hi = (float(v) for v in self.strength)
        if not 0.0 < lo <= hi <= 2.0:
            raise UsageError(f"strength range {self.strength} must satisfy 0 < low <= high <= 2")
        object.__setattr__(self, "strength", (lo, hi))
        scales = tuple(float(s) for s in self.scales)
        if not scales or min(scales) < 1.0 or max(scales) > 4.0:
            raise UsageError(f"sample scales {self.scales} must lie in [1, 4]")
        object.__setattr__(self, "scales", scales)

    def spec(self, side: int, seed: int) -> SampleSpec:
        """The :class:`SampleSpec` of square samples of ``side`` px."""
        return SampleSpec(
            size=(side, side), seed=seed, kinds=self.kinds, perturbations=self.perturbations,
            strength=self.strength[1], photos=self.photos, portraits=self.portraits, pairs=self.pairs,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view."""
        return {
            "photos": None if self.photos is None else str(self.photos),
            "portraits": None if self.portraits is None else str(self.portraits),
            "pairs": None if self.pairs is None else str(self.pairs),
            "kinds": [list(kv) for kv in self.kinds],
            "perturbations": [list(kv) for kv in self.perturbations],
            "strength": list(self.strength),
            "scales": list(self.scales),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(
            photos=d.get("photos"), portraits=d.get("portraits"), pairs=d.get("pairs"),
            kinds=tuple(tuple(kv) for kv in d["kinds"]),
            perturbations=tuple(tuple(kv) for kv in d["perturbations"]),
            strength=tuple(d["strength"]),
            scales=tuple(d["scales"]),
        )




@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (stored in its checkpoint).

    Attributes:
        out: output folder (checkpoint, exported weights, log).
        arch: one of :data:`ARCHITECTURES`.
        arch_params: ``cascadepsp-lite`` hyper-parameters (fields of
            :class:`~refine_cli.models.cascadepsp_lite.LiteArch`); empty = the shipped ``LITE_V1``.
            Ignored by ``cascadepsp``.
        steps: optimiser steps in total.
        batch_size: crops per step.
        crop: crop side, px (multiple of 8, >= 32).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay.
        warmup: linear warm-up steps; then cosine decay to ``lr * min_lr_ratio``.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        grad_clip: max global gradient norm (0 = no clipping).
        precision: ``auto`` (fp32 on CPU, where bf16 is emulated and slower without AVX-512 BF16;
            bf16 or else fp16 on CUDA), ``fp32``, ``bf16`` or ``fp16`` (CUDA only, with loss scaling).
        channels_last: NHWC memory format (faster for the convolutions on CPU and CUDA).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        threads: torch CPU threads (``None`` = torch's default).
        workers: data-loading processes (0 = generate in the training process).
        seed: seed of initialisation and of the training stream.
        val_every: validate every this many steps (0 = only at the end).
        val_size: side of the validation samples and working size L of the validation global step.
        val_n: validation samples (global step).
        val_full_n: extra samples of ``2 * val_size`` refined with global + local steps.
        ckpt_every: write ``checkpoint.pt`` every this many steps (0 = at validations and the end).
        log_every: log the mean loss every this many steps.
        fixed_batch: train on the first batch over and over (a debugging / test aid).
        data: what the training stream generates.
        init: start from these exported weights (a ``.pt`` with its sidecar, or a registry name
            such as ``cascadepsp-lite-v2``; strict and checksum-checked) instead of a random
            initialisation: fine-tuning. Their architecture is kept.
    """

    out: Path
    arch: str = "cascadepsp-lite"
    arch_params: Mapping[str, Any] = field(default_factory=dict)
    steps: int = 6000
    batch_size: int = 8
    crop: int = 224
    lr: float = 2e-3
    weight_decay: float = 1e-2
    warmup: int = 100
    min_lr_ratio: float = 0.02
    grad_clip: float = 2.0
    precision: str = "auto"
    channels_last: bool = True
    device: str = "auto"
    threads: int | None = None
    workers: int = 1
    seed: int = 0
    val_every: int = 500
    val_size: int = 320
    val_n: int = 24
    val_full_n: int = 2
    ckpt_every: int = 250
    log_every: int = 25
    fixed_batch: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    init: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out).expanduser())
        if self.init is not None:
            object.__setattr__(self, "init", str(self.init))
        object.__setattr__(self, "arch_params", dict(self.arch_params))
        if self.arch not in ARCHITECTURES:
            raise UsageError(f"--arch {self.arch!r}: use one of {', '.join(ARCHITECTURES)}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        check_settings(self, (
            (self.val_size >= 64 and self.val_size % 8 == 0,
             f"--val-size {self.val_size} must be a multiple of 8, >= 64"),
            (self.val_n >= 1, f"--val-n {self.val_n} must be >= 1"),
            (min(self.val_every, self.ckpt_every, self.val_full_n, self.workers, self.warmup) >= 0,
             "--val-every, --ckpt-every, --workers, warm-up and val_full_n must be >= 0"),
        ))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view (stored in checkpoints and sidecars)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["out"] = str(self.out)
        d["arch_params"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.arch_params.items()}
        d["data"] = self.data.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (newer checkpoint)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"the checkpoint's config has unknown keys {unknown}; it needs a newer refine")
        return cls(**{**d, "data": DataConfig.from_dict(d["data"])})


TINY = {
    "steps": 8, "batch_size": 2, "crop": 64, "lr": 3e-3, "warmup": 2, "val_every": 4, "val_size": 64,
    "val_n": 2, "val_full_n": 0, "ckpt_every": 4, "log_every": 2, "workers": 0, "threads": 1,
    "arch_params": {"stem": 8, "widths": [8, 16, 16], "depths": [1, 1, 1], "psp": 16, "up1": 16, "up2": 8,
                    "up3": 8, "head": 8, "prior_gain": 3.0, "mask_skip": True},
}
"""Overrides of ``--tiny``: a CI smoke run of a few steps on 64 px crops with a minute model."""

RESUME_OVERRIDABLE = (
    "steps", "threads", "workers", "device", "val_every", "ckpt_every", "log_every", "val_full_n",
)
"""Config fields a resumed run may change; any other difference from the checkpoint is refused."""


def resume_config(stored: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """The config of a resumed run: the checkpoint's, with the allowed overrides applied.

    Args:
        stored: the config saved in the checkpoint.
        overrides: fields the caller set explicitly (e.g. the CLI flags given).

    Raises:
        UsageError: an override would change the run (arch, data, batch, learning rate ...).
    """
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in ("out",):
            continue
        if key == "data":
            _check_resume_data(stored, value)
            continue
        current = getattr(stored, key)
        if key in RESUME_OVERRIDABLE:
            changes[key] = value
        elif value != current:
            raise UsageError(
                f"--resume continues the run in {stored.out} whose {key} is {current!r}, not {value!r}; "
                f"drop that flag, or train into a new --out folder"
            )
    return replace(stored, **changes)


_DATA_FLAGS = {"kinds": "--kinds", "perturbations": "--perturbations", "photos": "--photos",
               "portraits": "--portraits", "pairs": "--pairs", "strength": "strength", "scales": "scales"}


def _check_resume_data(stored: TrainConfig, given: DataConfig | Mapping[str, Any]) -> None:
    """Refuse a resume whose data options differ from the stored run's (all are fixed).

    Args:
        stored: the checkpoint's config.
        given: a whole :class:`DataConfig`, or only the data fields the caller set (the CLI's
            ``--kinds``, ``--photos`` ...), each compared after normalisation against the
            stored run's (a bare ``--kinds`` equal to the stored mix is accepted).

    Raises:
        UsageError: a field differs; names the flag, the stored and the given value.
    """
    if isinstance(given, DataConfig):
        candidate = given
        names = [f.name for f in dataclasses.fields(DataConfig)]
    else:
        try:
            candidate = replace(stored.data, **dict(given))
        except UsageError as exc:
            raise UsageError(f"--resume: {exc}") from None
        names = list(given)
    for name in names:
        have, want = getattr(stored.data, name), getattr(candidate, name)
        if have == want:
            continue
        show = format_mix if name in ("kinds", "perturbations") else repr
        flag = _DATA_FLAGS.get(name, name)
        raise UsageError(
            f"--resume continues the run in {stored.out} whose {flag} is {show(have)}, "
            f"not {show(want)}; the data mix cannot change on resume: drop that flag, or train into a new "
            f"--out folder"
        )


# --------------------------------------------------------------------------------------------
# models


def parse_arch_params(text: str, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``--arch-params``: a JSON object of ``LiteArch`` fields over ``base`` (none: the shipped v1).

    Raises:
        UsageError: not a JSON object, or fields ``LiteArch`` does not have or refuses.
    """
    from refine_cli.models.cascadepsp_lite import LITE_V1, LiteArch

    try:
        given = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--arch-params is not valid JSON ({exc.msg}); give an object such as "
                         '\'{"widths": [32, 64, 128]}\'') from None
    if not isinstance(given, dict):
        raise UsageError("--arch-params must be a JSON object of architecture fields, e.g. '{\"psp\": 96}'")
    known = set(LITE_V1.to_dict())
    unknown = sorted(set(given) - known)
    if unknown:
        raise UsageError(
            f"--arch-params: unknown fields {unknown}; the fields are {', '.join(sorted(known))}"
        )
    merged = {**(dict(base) if base else LITE_V1.to_dict()), **given}
    try:
        return LiteArch.from_dict(merged).to_dict()
    except (WeightsError, ValueError, TypeError) as exc:
        raise UsageError(f"--arch-params: {exc}") from None


# --------------------------------------------------------------------------------------------
# data


class TrainStream(Dataset):
    """The training stream: item ``k`` is one ``(crop, crop)`` training crop, always the same.

    Item ``k`` draws (from ``default_rng([seed, k, _STREAM])``) a sample side from
    ``data.scales``, a strength in ``data.strength``, makes sample ``k`` of that spec
    (:func:`~refine_cli.train.data.make_sample`), crops it near the boundary
    (:func:`~refine_cli.train.data.random_crop`), mirrors it half of the time and applies
    CascadePSP's colour jitter.

    Items: ``image`` ``(3, crop, crop)`` float32 RGB in [0, 1]; ``gt`` and ``coarse``
    ``(1, crop, crop)`` float32 in [0, 1].

    Args:
        data: what to generate.
        crop: crop side, px.
        seed: stream seed.
        length: number of items (``steps * batch_size``).
    """

    def __init__(self, data: DataConfig, crop: int, seed: int, length: int) -> None:
        self.data, self.crop, self.seed, self.length = data, crop, seed, length
        self._specs: dict[int, SampleSpec] = {}

    def spec(self, side: int) -> SampleSpec:
        """The (cached) spec of samples of ``side`` px."""
        if side not in self._specs:
            self._specs[side] = self.data.spec(side, self.seed)
        return self._specs[side]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> dict[str, Tensor]:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, int(k), _STREAM])
        scale = float(self.data.scales[int(rng.integers(len(self.data.scales)))])
        side = max(self.crop, int(round(self.crop * scale / 8)) * 8)
        strength = float(rng.uniform(*self.data.strength))
        sample = make_sample(int(k), self.spec(side), strength=strength)
        image, gt, coarse = random_crop(sample, self.crop, rng)
        img = image.astype(np.float32) * np.float32(1 / 255)
        if rng.random() < 0.5:
            img, gt, coarse = img[:, ::-1], gt[:, ::-1], coarse[:, ::-1]
        img = color_jitter(img, rng)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
            "gt": torch.from_numpy(np.ascontiguousarray(gt, dtype=np.float32))[None],
            "coarse": torch.from_numpy(np.ascontiguousarray(coarse, dtype=np.float32))[None],
        }


def _worker_init(_: int) -> None:
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _batches(stream: TrainStream, cfg: TrainConfig, start_step: int) -> Iterator[dict[str, Tensor]]:
    """Batches of steps ``start_step ..`` (item ``k`` of step ``s`` is ``s * batch + k``)."""
    b = cfg.batch_size
    if cfg.fixed_batch:
        first = [stream[k] for k in range(b)]
        batch = {key: torch.stack([it[key] for it in first]) for key in first[0]}
        while True:
            yield batch
    loader = DataLoader(
        stream, batch_size=b, sampler=range(start_step * b, cfg.steps * b), shuffle=False,
        num_workers=cfg.workers, worker_init_fn=_worker_init if cfg.workers else None,
        persistent_workers=False, prefetch_factor=4 if cfg.workers else None,
        # fork after torch/OpenCV thread pools exist (a resumed run has loaded its checkpoint)
        # can leave a worker waiting on a lock held by a thread that was not copied: spawn
        multiprocessing_context="spawn" if cfg.workers else None,
    )
    yield from loader


# --------------------------------------------------------------------------------------------
# devices and precision




def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``fp32`` on CPU, ``bf16`` (or ``fp16`` without bf16 support) on CUDA.

    On this project's CPUs (AVX2, no AVX-512 BF16) bf16 autocast made a training step 3-8x
    slower than fp32 (weights/README.md), hence fp32 on CPU.

    Raises:
        UsageError: ``fp16`` on a CPU.
    """
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs CUDA; use fp32 or bf16 on the CPU")
    return precision


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)




# --------------------------------------------------------------------------------------------
# files


# --------------------------------------------------------------------------------------------
# validation


@dataclass
class ValidationSet:
    """Fixed validation samples, generated once and kept in memory.

    Attributes:
        size: side of the global-step samples and the working size L.
        samples: ``(kind, perturbation, image (s, s, 3) uint8, gt (s, s) float32, coarse (s, s) float32)``.
        full: the same for the ``2 * size`` samples of the global + local check.
    """

    size: int
    samples: list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]]
    full: list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]]


def make_validation_set(cfg: TrainConfig) -> ValidationSet:
    """The validation samples of a run (seed :data:`VAL_SEED`, strengths 0.5 / 1 / 1.5).

    Made of the run's kinds and perturbations (``cfg.data``), balanced by
    :func:`~refine_cli.train.data.make_eval_set`: entry ``i`` has kind ``i mod K`` and
    perturbation ``(i div K) mod P`` (``K`` kinds, ``P`` perturbations, sorted by name), so each
    kind gets ``val_n / K`` entries (+-1) and, within a kind, the perturbations cycle. A
    ``val_n`` that is a multiple of ``K * P`` balances both exactly. Logs a warning when
    ``val_n`` is below ``K`` (some kinds would go unvalidated and out of model selection).
    """
    base = cfg.data.spec(cfg.val_size, VAL_SEED)
    kinds = [k for k, w in base.kinds if w > 0]
    if cfg.val_n < len(kinds):
        logger.warning("validation: --val-n %d covers %d of the %d kinds (%s); the others are neither "
                       "validated nor part of model selection: use --val-n %d or more",
                       cfg.val_n, cfg.val_n, len(kinds), ", ".join(kinds), len(kinds))

    def take(n: int, size: int, seed: int) -> list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]]:
        if n == 0:
            return []
        es = make_eval_set(n, size, seed=seed, spec=base)
        return [(s.kind, str(s.meta["perturbation"]), s.image, s.gt, s.coarse) for s in es]

    return ValidationSet(cfg.val_size, take(cfg.val_n, cfg.val_size, VAL_SEED),
                         take(cfg.val_full_n, 2 * cfg.val_size, VAL_SEED + 1))


def validation_counts(vset: ValidationSet) -> dict[str, dict[str, int]]:
    """How many global-step validation samples each kind and each perturbation has (for sidecars).

    A ``detector`` entry of a kind that has no detector mask counts as ``cascadepsp``, the
    coarse mask it really got.
    """
    kinds: dict[str, int] = {}
    perts: dict[str, int] = {}
    for kind, pert, *_ in vset.samples:
        kinds[kind] = kinds.get(kind, 0) + 1
        perts[pert] = perts.get(pert, 0) + 1
    return {"kinds": dict(sorted(kinds.items())), "perturbations": dict(sorted(perts.items()))}


def selection_score(res: Mapping[str, Any]) -> float:
    """The model-selection score of a validation result: higher is better.

    The mean over the validated kinds (``res["by_kind"]``) of ``iou - coarse_iou`` (global
    step), each kind weighing the same whatever its sample count or training weight; a result
    without ``by_kind`` scores its overall ``iou - coarse_iou``. Recomputed from the per-kind
    numbers, so the ``best`` of a checkpoint written under an earlier rule (``iou + mba``)
    compares on this rule when the run resumes.
    """
    by_kind = res.get("by_kind") or {}
    gains = [float(v["iou"]) - float(v["coarse_iou"]) for v in by_kind.values()]
    if not gains:
        return float(res["iou"]) - float(res["coarse_iou"])
    return float(np.mean(gains))




def validate(model: nn.Module, vset: ValidationSet, precision: str = "fp32") -> dict[str, Any]:
    """Refine the validation set and compare with the coarse masks.

    Args:
        model: the module (any mode; it is evaluated in eval mode and restored).
        vset: the fixed samples.
        precision: ``fp32`` | ``bf16`` | ``fp16`` of the inference.

    Returns:
        ``iou``, ``mba`` (global step, refined), ``coarse_iou``, ``coarse_mba``, ``gain_iou``,
        ``gain_mba``, ``n``; ``by_kind`` and ``by_perturbation`` (the same per sample kind and
        per coarse mask actually used); ``score`` (:func:`selection_score`, the best-checkpoint
        criterion: the mean over kinds of ``gain_iou``) and ``worst_kind`` (the kind with the
        lowest ``gain_iou``: ``{"kind", "gain_iou"}``); ``full_*`` for the global + local
        samples when any (overall, and ``full_by_kind``).
    """
    from refine_cli.evaluate import evaluate_arrays
    from refine_cli.models.cascadepsp import CascadeRefinementModule
    from refine_cli.refiners.cascadepsp import fast_output, global_step, refine_exact

    if not isinstance(model, CascadeRefinementModule):
        raise TypeError(f"validate takes a CascadePSP module, not {type(model).__name__}")
    was_training = model.training
    model.eval()
    Row = tuple[str, str, float, float, float, float]  # kind, perturbation, IoU, mBA, coarse IoU, mBA
    rows: list[Row] = []
    full_rows: list[Row] = []
    try:
        for kind, pert, image, gt, coarse in vset.samples:
            glob = global_step(model, image, coarse, vset.size, precision=precision)
            pred = fast_output(glob)[0, 0].numpy()
            r, c = evaluate_arrays(pred, gt), evaluate_arrays(coarse, gt)
            rows.append((kind, pert, *iou_mba(r), *iou_mba(c)))
        for kind, pert, image, gt, coarse in vset.full:
            pred, _ = refine_exact(model, image, coarse, size=vset.size, precision=precision)
            r, c = evaluate_arrays(pred, gt), evaluate_arrays(coarse, gt)
            full_rows.append((kind, pert, *iou_mba(r), *iou_mba(c)))
    finally:
        model.train(was_training)

    def summary(sel: Sequence[Row]) -> dict[str, float]:
        iou, mba = mean_or_nan([r[2] for r in sel]), mean_or_nan([r[3] for r in sel])
        ciou, cmba = mean_or_nan([r[4] for r in sel]), mean_or_nan([r[5] for r in sel])
        return {"iou": iou, "mba": mba, "coarse_iou": ciou, "coarse_mba": cmba,
                "gain_iou": iou - ciou, "gain_mba": mba - cmba, "n": len(sel)}

    def grouped(sel: Sequence[Row], col: Literal[0, 1]) -> dict[str, dict[str, float]]:
        return {k: summary([r for r in sel if r[col] == k]) for k in sorted({r[col] for r in sel})}

    out: dict[str, Any] = summary(rows)
    out["by_kind"] = grouped(rows, 0)
    out["by_perturbation"] = grouped(rows, 1)
    out["score"] = selection_score(out)
    worst = min(out["by_kind"].items(), key=lambda kv: kv[1]["gain_iou"])
    out["worst_kind"] = {"kind": worst[0], "gain_iou": worst[1]["gain_iou"]}
    if full_rows:
        out["full_iou"] = mean_or_nan([r[2] for r in full_rows])
        out["full_mba"] = mean_or_nan([r[3] for r in full_rows])
        out["full_coarse_iou"] = mean_or_nan([r[4] for r in full_rows])
        out["full_coarse_mba"] = mean_or_nan([r[5] for r in full_rows])
        out["full_by_kind"] = grouped(full_rows, 0)
    return out


# --------------------------------------------------------------------------------------------
# the loop












def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overrides: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train (or continue training) a CascadePSP refinement module.

    MagNet's module (``--arch magnet-refinement``) trains with
    :func:`refine_cli.train.magnet.train_magnet`; :func:`refine_cli.train.dispatch.train`
    takes this function's arguments and picks the trainer by architecture.

    Args:
        cfg: the run's config (with ``resume``, only ``cfg.out`` matters plus ``overrides``).
        resume: continue from ``cfg.out / checkpoint.pt``; the stored config is used, with the
            fields in ``overrides`` that :data:`RESUME_OVERRIDABLE` allows.
        overrides: fields set explicitly by the caller (only used with ``resume``).
        progress: called after every step.

    Returns:
        A :class:`TrainResult`.

    Raises:
        UsageError: bad settings, ``out`` already holds a run and ``resume`` is off, or the run
            is MagNet's.
        InputError: unreadable checkpoint or missing data folders.
    """
    t_start = time.perf_counter()
    ckpt_path = cfg.out / CHECKPOINT
    state: dict[str, Any] | None = None
    if cfg.arch == MAGNET_ARCH or (resume and _stored_arch(ckpt_path) == MAGNET_ARCH):
        raise UsageError(
            f"--arch {MAGNET_ARCH} trains with refine_cli.train.magnet.train_magnet; "
            "refine_cli.train.dispatch.train takes a TrainConfig of any --arch"
        )
    if resume:
        state = load_checkpoint(ckpt_path)
        cfg = resume_config(TrainConfig.from_dict(state["config"]), {**dict(overrides or {}), "out": cfg.out})
        cfg = replace(cfg, out=ckpt_path.parent)
    elif ckpt_path.exists():
        raise UsageError(
            f"{cfg.out} already holds a training run ({CHECKPOINT}); pass --resume or another --out"
        )
    cfg.out.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, state, t_start=t_start, progress=progress)
    finally:
        torch.set_num_threads(threads_before)


def load_init(cfg: TrainConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The module a fine-tuning run (``cfg.init``) starts from, and facts for the sidecar.

    Raises:
        UsageError: the weights are of another architecture than ``--arch``, or ``--arch-params``
            was given too.
        WeightsError: missing files, checksum mismatch, keys or shapes that do not fit.
    """
    from refine_cli import weights

    resolved = weights.resolve_weights(str(cfg.init))
    model, side = load_exported(resolved.path, sha256=resolved.sha256)  # strict, checksum-checked
    if side.get("arch") != cfg.arch:
        raise UsageError(f"--init {cfg.init} holds {side.get('arch')} weights; train them with --arch "
                         f"{side.get('arch')} (not {cfg.arch})")
    if cfg.arch_params:
        raise UsageError("--init keeps the architecture of its weights; drop --arch-params")
    meta = {"weights": resolved.name or resolved.path.name, "sha256": side.get("sha256"),
            "steps": side.get("steps")}
    logger.info("fine-tuning from %s (%s steps)", cfg.init, meta["steps"])
    return model.train(), meta


def _stored_arch(ckpt_path: Path) -> str | None:
    """The ``arch`` of the run whose checkpoint is ``ckpt_path`` (``None`` if unreadable)."""
    try:
        return str(load_checkpoint(ckpt_path)["config"].get("arch"))
    except InputError:
        return None


def _run(
    cfg: TrainConfig, state: dict[str, Any] | None, *, t_start: float, progress: ProgressFn | None
) -> TrainResult:
    """The body of :func:`train` once the config is settled (``state``: the checkpoint to resume)."""
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)
    model, init_meta = _start_model(cfg, state, device)
    arch_params = arch_dict(model, cfg.arch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step, best, wall = 0, None, 0.0
    if state is not None:
        step, best, wall = _restore(state, model, optimizer, scheduler, scaler, device)
        logger.info("resuming %s at step %d of %d", cfg.out, step, cfg.steps)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "training %s (%.3f M parameters) on %s, %s, %d steps of %d x %d px crops",
        cfg.arch, n_params / 1e6, device, precision, cfg.steps, cfg.batch_size, cfg.crop,
    )
    (cfg.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
    log = RunLog(cfg.out / "log.jsonl")
    stream = TrainStream(cfg.data, cfg.crop, cfg.seed, cfg.steps * cfg.batch_size)
    vset = make_validation_set(cfg)
    meta_base = _meta_base(cfg, arch_params, vset, init_meta, state)
    run = _CascadeRun(cfg=cfg, model=model, optimizer=optimizer, scheduler=scheduler, device=device, log=log,
                      meta_base=meta_base, t_start=t_start, best=best, wall=wall, scaler=scaler,
                      precision=precision, vset=vset)
    model.train()
    batches = _batches(stream, cfg, step)
    step, losses, validations = run_steps(
        cfg, step, lambda _: _train_step(model, next(batches), cfg, device, precision, optimizer, scaler),
        scheduler=scheduler, log=log, progress=progress, run_validation=run.run_validation,
        snapshot=run.snapshot, ckpt_path=cfg.out / CHECKPOINT,
    )
    seconds = time.perf_counter() - t_start
    final = cfg.out / "final.pt"
    last_val = validations[-1] if validations else None
    export_weights(model, final, {**run.meta_base, "steps": step, "metrics": last_val,
                                  "wall_seconds": wall + seconds})
    return TrainResult(cfg.out, step, losses, validations, run.best, seconds, final)


def _start_model(
    cfg: TrainConfig, state: dict[str, Any] | None, device: torch.device
) -> tuple[nn.Module, dict[str, Any] | None]:
    """The module a run starts from, on ``device``, and the facts of ``--init`` weights (else ``None``).

    A resumed run rebuilds the exact architecture it stored, whatever the defaults are now.
    """
    init_meta = None
    if state is not None:
        model = build_model(cfg.arch, state["arch_params"])
    elif cfg.init is not None:
        model, init_meta = load_init(cfg)
    else:
        model = build_model(cfg.arch, cfg.arch_params)
    model = model.to(device)
    if cfg.channels_last:
        # nn.Module.to takes memory_format (torch's docs); the stub's overloads leave it out
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model, init_meta


def _restore(
    state: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
) -> tuple[int, dict[str, Any] | None, float]:
    """Load a checkpoint's states and random-number state; its ``(step, best, wall seconds)``."""
    model.load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    return int(state["step"]), state.get("best"), float(state.get("wall_seconds", 0.0))


def _meta_base(
    cfg: TrainConfig, arch_params: dict[str, Any], vset: ValidationSet, init_meta: dict[str, Any] | None,
    state: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The facts every exported sidecar of the run carries (architecture, data, validation, init)."""
    meta_base = {"arch": cfg.arch, "arch_params": arch_params, "crop": cfg.crop, "batch_size": cfg.batch_size,
                 "data": cfg.data.to_dict(), "seed": cfg.seed, "val_seed": VAL_SEED, "val_size": cfg.val_size,
                 "validation": {"n": len(vset.samples), "full_n": len(vset.full), **validation_counts(vset),
                                "selection": SELECTION_RULE}}
    if cfg.init is not None:
        meta_base["init"] = init_meta if init_meta is not None else (state or {}).get("init")
    return meta_base


@dataclass
class _CascadeRun(RunState):
    """A CascadePSP run in progress (:class:`RunState`, plus its mixed precision and validation set).

    Attributes:
        cfg: the run's config.
        scaler: the fp16 gradient scaler.
        precision: how validation runs on CUDA.
        vset: the fixed validation samples.
    """

    cfg: TrainConfig
    scaler: torch.amp.GradScaler
    precision: str
    vset: ValidationSet

    def snapshot(self, step: int) -> dict[str, Any]:
        """The resumable checkpoint after ``step`` steps."""
        return {**self.snapshot_state(step),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "rng": rng_state(self.device), "init": self.meta_base.get("init")}

    def run_validation(self, step: int) -> dict[str, Any]:
        """Validate after ``step`` steps, log it, and export ``best.pt`` when the score improved."""
        t0 = time.perf_counter()
        precision = "fp32" if self.device.type == "cpu" else self.precision
        res = {"step": step, **validate(self.model, self.vset, precision)}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        _log_validation(res)
        best = self.best
        improved = best is None or res["score"] > selection_score(best)
        kept = "new best" if best is None or improved else \
            f"best stays step {best['step']} ({selection_score(best):+.4f})"
        logger.info("  selection score (mean IoU gain over kinds) %+.4f; worst kind %s %+.4f; %s",
                    res["score"], res["worst_kind"]["kind"], res["worst_kind"]["gain_iou"], kept)
        self.log.write({"type": "val", **res, "best": improved})
        if improved:
            self.best = dict(res)
            meta = {**self.meta_base, "steps": step, "metrics": res}
            export_weights(self.model, self.cfg.out / "best.pt", meta)
        return res


def _log_validation(res: Mapping[str, Any]) -> None:
    """Log a validation result: overall, global + local when run, and per kind."""
    full = ""
    if "full_iou" in res:
        full = f"; global+local IoU {res['full_iou']:.4f} mBA {res['full_mba']:.4f}"
    logger.info(
        "step %d: val IoU %.4f (coarse %.4f, %+.4f), mBA %.4f (coarse %.4f, %+.4f)%s", res["step"],
        res["iou"], res["coarse_iou"], res["gain_iou"], res["mba"], res["coarse_mba"], res["gain_mba"], full,
    )
    for kind, k in res["by_kind"].items():
        logger.info("  %-10s IoU %.4f (coarse %.4f, %+.4f), mBA %.4f (coarse %.4f, %+.4f), n %d",
                    kind, k["iou"], k["coarse_iou"], k["gain_iou"], k["mba"], k["coarse_mba"],
                    k["gain_mba"], k["n"])


def _train_step(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    cfg: TrainConfig,
    device: torch.device,
    precision: str,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> float | None:
    """One optimiser step on a batch (global mode, all three cascade iterations).

    Args:
        model: the module in training mode.
        batch: ``image`` ``(B, 3, c, c)`` float32 RGB in [0, 1]; ``gt`` and ``coarse``
            ``(B, 1, c, c)`` float32 in [0, 1].
        cfg: the run's config (``channels_last``, ``grad_clip``).
        device: where the module is.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast of the forward pass).
        optimizer: the optimiser to step.
        scaler: the gradient scaler (enabled for ``fp16`` only).

    Returns:
        The total loss, or ``None`` when it was not finite (no update made).
    """
    im = model.normalize_image(batch["image"].to(device, non_blocking=True))  # type: ignore[operator]
    seg = model.mask_to_seg(batch["coarse"].to(device, non_blocking=True))  # type: ignore[operator]
    gt = batch["gt"].to(device, non_blocking=True)
    if cfg.channels_last:
        im = im.contiguous(memory_format=torch.channels_last)
    with _autocast(device, precision):
        outputs = model(im, seg)
    loss, _parts = cascadepsp_loss({k: v.float() for k, v in outputs.items()}, gt)
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return None
    scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())
