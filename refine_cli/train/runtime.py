"""What every ``refine train`` architecture shares: settings checks, the step loop, files.

CascadePSP's trainer (:mod:`refine_cli.train.trainer`) and MagNet's
(:mod:`refine_cli.train.magnet`) both build on this module: the checks of the step-loop
settings, the learning-rate schedule (linear warm-up, then cosine decay), device choice and
seeding, the ``log.jsonl`` writer and the step loop itself (:func:`run_steps`). Checkpoints and
exported weights are read and written by :mod:`refine_cli.weights.files` (re-exported here), the
one place that calls ``torch.load`` and ``torch.save``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from refine_cli.errors import Interrupted, RefineError, UsageError
from refine_cli.hashing import sha256_file as sha256_file
from refine_cli.weights.files import CHECKPOINT_FORMAT as CHECKPOINT_FORMAT
from refine_cli.weights.files import EXPORT_FORMAT as EXPORT_FORMAT
from refine_cli.weights.files import atomic_write as atomic_write
from refine_cli.weights.files import export_weights as export_weights
from refine_cli.weights.files import load_checkpoint as load_checkpoint
from refine_cli.weights.files import save_checkpoint as save_checkpoint

if TYPE_CHECKING:
    from refine_cli.evaluate import Metrics

logger = logging.getLogger(__name__)


CHECKPOINT = "checkpoint.pt"
"""File name of the resumable checkpoint inside ``out``."""


class RunSettings(Protocol):
    """The step-loop settings every ``refine train`` config has (CascadePSP's and MagNet's)."""

    @property
    def out(self) -> Path:
        """Output folder of the run."""

    @property
    def steps(self) -> int:
        """Optimiser steps in total."""

    @property
    def batch_size(self) -> int:
        """Crops per step."""

    @property
    def crop(self) -> int:
        """Crop side, px."""

    @property
    def lr(self) -> float:
        """Peak learning rate."""

    @property
    def warmup(self) -> int:
        """Linear warm-up steps."""

    @property
    def min_lr_ratio(self) -> float:
        """Final learning rate as a fraction of ``lr``."""

    @property
    def threads(self) -> int | None:
        """The number of torch CPU threads (``None``: torch's default)."""

    @property
    def val_every(self) -> int:
        """Validate every this many steps (0: only at the end)."""

    @property
    def ckpt_every(self) -> int:
        """Write the checkpoint every this many steps (0: at validations)."""

    @property
    def log_every(self) -> int:
        """Log the mean loss every this many steps."""


# --------------------------------------------------------------------------------------------
# settings and schedule


def check_settings(cfg: RunSettings, checks: Sequence[tuple[bool, str]]) -> None:
    """Validate the step-loop settings every ``refine train`` config has, then ``checks``.

    Args:
        cfg: the config (CascadePSP's ``TrainConfig`` or MagNet's ``MagnetTrainConfig``); its
            ``steps``, ``batch_size``, ``crop``, ``lr``, ``log_every``, ``threads`` and
            ``min_lr_ratio`` are checked.
        checks: ``(ok, message)`` pairs of the config's own fields.

    Raises:
        UsageError: the message of the first failed check.
    """
    common = (
        (cfg.steps >= 1, f"--steps {cfg.steps} must be >= 1"),
        (cfg.batch_size >= 1, f"--batch-size {cfg.batch_size} must be >= 1"),
        (cfg.crop >= 32 and cfg.crop % 8 == 0, f"--crop {cfg.crop} must be a multiple of 8, >= 32"),
        (cfg.lr > 0, f"--lr {cfg.lr} must be > 0"),
        (cfg.log_every >= 1, "log_every must be >= 1"),
        (cfg.threads is None or cfg.threads >= 1, f"--threads {cfg.threads} must be >= 1"),
        (0.0 < cfg.min_lr_ratio <= 1.0, "min_lr_ratio must be in (0, 1]"),
    )
    for ok, message in (*common, *checks):
        if not ok:
            raise UsageError(message)


def lr_factor(step: int, cfg: RunSettings) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warm-up, then cosine to ``min_lr_ratio``."""
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    t = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


# --------------------------------------------------------------------------------------------
# devices and seeding


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``.

    Raises:
        UsageError: a CUDA device was asked for but none is available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The random-number state of torch (and the CUDA device's, on CUDA) for a checkpoint."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


# --------------------------------------------------------------------------------------------
# results


@dataclass
class TrainResult:
    """What a training run did (``trainer.train``, ``magnet.train_magnet``).

    Attributes:
        out: the output folder.
        steps: steps completed in total (including those before a resume).
        losses: total loss of every step run by this call, in order.
        validations: the validation results of this call (with ``step``).
        best: the best validation so far (``None`` if none ran).
        seconds: wall time of this call.
        final_weights: the exported final weights (``final.pt``).
    """

    out: Path
    steps: int
    losses: list[float]
    validations: list[dict[str, Any]]
    best: dict[str, Any] | None
    seconds: float
    final_weights: Path


ProgressFn = Callable[[int, int, float], None]
"""``progress(step_done, steps_total, last_loss)``."""


class RunLog:
    """Appends JSON records to ``out/log.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record as a JSON line."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")


class SavedConfig(Protocol):
    """A training config as its checkpoint stores it."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values."""
        ...


@dataclass
class RunState:
    """A training run in progress, as both trainers' checkpoints store it and their validations update it.

    Attributes:
        cfg: the run's config.
        model, optimizer, scheduler: the training state.
        device: where the model trains.
        log: the run's ``log.jsonl``.
        meta_base: the facts of every exported sidecar (``arch_params`` among them).
        t_start: ``time.perf_counter()`` when this call began.
        best: the best validation so far (``None``: none yet).
        wall: wall seconds of the run before this call.
    """

    cfg: SavedConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    log: RunLog
    meta_base: dict[str, Any]
    t_start: float
    best: dict[str, Any] | None
    wall: float

    def snapshot_state(self, step: int) -> dict[str, Any]:
        """The checkpoint keys of every architecture after ``step`` steps (all but ``scaler`` and ``rng``)."""
        return {
            "format": CHECKPOINT_FORMAT, "step": step, "config": self.cfg.to_dict(),
            "arch_params": self.meta_base["arch_params"], "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "best": self.best, "wall_seconds": self.wall + time.perf_counter() - self.t_start,
        }


def iou_mba(metrics: Metrics) -> tuple[float, float]:
    """IoU and mBA of a mask evaluated by ``evaluate_arrays`` (``None`` only for label maps)."""
    assert metrics.iou is not None and metrics.mba is not None, "a mask's evaluation has IoU and mBA"
    return float(metrics.iou), float(metrics.mba)


def mean_or_nan(xs: Sequence[float]) -> float:
    """The mean of ``xs``, NaN when empty."""
    return float(np.mean(xs)) if len(xs) else float("nan")


def run_steps(
    cfg: RunSettings,
    start: int,
    train_step: Callable[[int], float | None],
    *,
    scheduler: Any,
    log: RunLog,
    progress: ProgressFn | None,
    run_validation: Callable[[int], dict[str, Any]],
    snapshot: Callable[[int], dict[str, Any]],
    ckpt_path: Path,
) -> tuple[int, list[float], list[dict[str, Any]]]:
    """The step loop every ``refine train`` architecture shares: steps ``start .. cfg.steps``.

    Per step: ``train_step(step)`` (the loss, or ``None`` when it was not finite and no update
    was made; more than 20 such steps stop the run), the scheduler, the progress callback, a
    ``train`` log record every ``cfg.log_every`` steps, ``run_validation(step)`` every
    ``cfg.val_every`` steps and at the end, and ``snapshot(step)`` saved to ``ckpt_path`` every
    ``cfg.ckpt_every`` steps and after each validation. Ctrl-C saves the last consistent state
    and raises :class:`Interrupted` with the resume command.

    Returns:
        ``(steps done, losses of this run, validation records of this run)``.
    """
    step = start
    losses: list[float] = []
    validations: list[dict[str, Any]] = []
    window: list[float] = []
    t_log = time.perf_counter()
    skipped = 0
    mid_step = False  # an interrupt between the update and ``step += 1`` leaves no consistent state
    try:
        while step < cfg.steps:
            mid_step = True
            value = train_step(step)
            if value is None:
                skipped += 1
                logger.warning("step %d: non-finite loss, batch skipped (%d so far)", step, skipped)
                if skipped > 20:
                    raise RefineError(
                        f"training diverged at step {step} (non-finite loss); lower --lr and start again"
                    )
                value = float("nan")
            scheduler.step()
            step += 1
            mid_step = False
            losses.append(value)
            window.append(value)
            if progress is not None:
                progress(step, cfg.steps, value)
            if step % cfg.log_every == 0 or step == cfg.steps:
                dt = time.perf_counter() - t_log
                rec = {"type": "train", "step": step, "loss": mean_or_nan(window),
                       "lr": scheduler.get_last_lr()[0], "sec_per_step": dt / len(window)}
                log.write(rec)
                logger.info("step %d/%d: loss %.4f, lr %.2e, %.2f s/step", step, cfg.steps, rec["loss"],
                            rec["lr"], rec["sec_per_step"])
                window, t_log = [], time.perf_counter()
            validated = bool(cfg.val_every and step % cfg.val_every == 0) or step == cfg.steps
            if validated:
                validations.append(run_validation(step))
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or validated:
                save_checkpoint(ckpt_path, snapshot(step))
    except KeyboardInterrupt:
        if not mid_step:
            save_checkpoint(ckpt_path, snapshot(step))
        when = "during" if mid_step else "after"
        raise Interrupted(
            f"training interrupted {when} step {step}; {ckpt_path} holds the last saved state: "
            f"continue with `refine train --out {cfg.out} --resume`"
        ) from None
    return step, losses, validations
