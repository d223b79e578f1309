"""One entry point for every ``--arch``: CascadePSP's trainer or MagNet's, chosen by architecture.

:func:`refine_cli.train.trainer.train` trains the CascadePSP modules and
:func:`refine_cli.train.magnet.train_magnet` MagNet's refinement module; :func:`train` takes
a :class:`~refine_cli.train.trainer.TrainConfig` of any architecture and hands it to the
right one. It lives above both trainers so that neither imports the other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from refine_cli.train import magnet, trainer
from refine_cli.train.runtime import ProgressFn, TrainResult

MAGNET_SHARED = ("steps", "batch_size", "crop", "lr", "warmup", "min_lr_ratio", "grad_clip", "device",
                 "threads", "seed", "val_every", "ckpt_every", "log_every", "fixed_batch")
"""``TrainConfig`` fields that MagNet's config has too (carried over by :func:`train`)."""


def train(
    cfg: trainer.TrainConfig,
    *,
    resume: bool = False,
    overrides: Mapping[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train (or continue training) the module of ``cfg.arch``, or of the run stored in ``cfg.out``.

    A ``magnet-refinement`` run (given, or found in the checkpoint on ``resume``) goes to
    :func:`train_magnet_from`; any other to :func:`refine_cli.train.trainer.train`. The
    arguments are those of :func:`refine_cli.train.trainer.train`.

    Returns:
        A :class:`~refine_cli.train.runtime.TrainResult`.
    """
    stored = magnet.checkpoint_arch(cfg.out) if resume and cfg.arch != magnet.ARCH else None
    if magnet.ARCH in (cfg.arch, stored):
        return train_magnet_from(cfg, resume, overrides, progress)
    return trainer.train(cfg, resume=resume, overrides=overrides, progress=progress)


def train_magnet_from(
    cfg: trainer.TrainConfig, resume: bool, overrides: Mapping[str, Any] | None, progress: ProgressFn | None
) -> TrainResult:
    """``--arch magnet-refinement``: :func:`refine_cli.train.magnet.train_magnet` with ``cfg``'s fields.

    Only the fields both recipes have are carried over (:data:`MAGNET_SHARED`), and only where
    they differ from ``TrainConfig``'s defaults (steps, batch, crop, learning rate, schedule,
    device, threads, seed, validation/checkpoint/log intervals, data folders): the rest keeps
    MagNet's defaults. Build a :class:`~refine_cli.train.magnet.MagnetTrainConfig` for full control.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(trainer.TrainConfig)}
    given = {k: getattr(cfg, k) for k in MAGNET_SHARED if getattr(cfg, k) != defaults.get(k)}
    given.update({k: v for k, v in (overrides or {}).items() if k in MAGNET_SHARED})
    if resume:
        return magnet.train_magnet(magnet.MagnetTrainConfig(out=cfg.out), resume=True, overrides=given,
                                   progress=progress)
    mcfg = magnet.MagnetTrainConfig(out=cfg.out, photos=cfg.data.photos, portraits=cfg.data.portraits,
                                    **given)
    return magnet.train_magnet(mcfg, progress=progress)
