"""The refinement architectures that ``refine train`` makes and exported weights name (``arch``).

:func:`build_model` turns an ``arch`` name and its hyper-parameters into a freshly initialised
module; the exported weights' sidecar stores both (:func:`arch_dict`), so loading rebuilds the
same module before reading the tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from refine_cli.errors import UsageError, WeightsError

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

ARCHITECTURES = ("cascadepsp-lite", "cascadepsp", "magnet-refinement")
"""Values of ``--arch`` and of an export sidecar's ``arch``."""


def build_model(arch: str, params: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a freshly initialised refinement module.

    Args:
        arch: ``cascadepsp-lite`` (params: ``LiteArch`` fields, none = ``LITE_V1``), ``cascadepsp``
            (the official architecture; trained from scratch, because ImageNet weights for its
            ResNet-50 are not available here), or ``magnet-refinement`` (MagNet's refinement module;
            params: ``n_classes``, default 2; trained by :mod:`refine_cli.train.magnet`).
        params: architecture hyper-parameters.

    Returns:
        A module with the CascadePSP forward contract, in training mode.

    Raises:
        UsageError: unknown or unavailable architecture.
    """
    if arch == "cascadepsp-lite":
        from refine_cli.models.cascadepsp_lite import cascadepsp_lite

        try:
            return cascadepsp_lite(**dict(params or {}))
        except WeightsError as exc:
            raise UsageError(f"cascadepsp-lite architecture: {exc}") from exc
    if arch == "cascadepsp":
        from refine_cli.models.cascadepsp import cascadepsp_official

        logger.warning("training the official CascadePSP architecture from scratch (no ImageNet weights)")
        return cascadepsp_official()
    if arch == "magnet-refinement":
        from refine_cli.models.magnet import RefinementMagNet

        n_classes = int(dict(params or {}).get("n_classes", 2))
        unknown = sorted(set(params or {}) - {"n_classes"})
        if unknown or n_classes < 2:
            raise UsageError(
                f"magnet-refinement architecture: takes only n_classes >= 2, got {dict(params or {})}"
            )
        return RefinementMagNet(n_classes).train()
    raise UsageError(f"--arch {arch!r}: use one of {', '.join(ARCHITECTURES)}")


def arch_dict(model: nn.Module, arch: str) -> dict[str, Any]:
    """The architecture dict that rebuilds ``model`` with :func:`build_model` (stored with weights)."""
    if arch == "cascadepsp-lite":
        return dict(model.arch.to_dict())  # type: ignore[union-attr, operator]
    if arch == "magnet-refinement":
        return {"n_classes": int(model.n_classes)}  # type: ignore[arg-type]
    return {}
