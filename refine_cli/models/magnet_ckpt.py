"""Key rules for MagNet checkpoints (pure functions on state_dicts; no file IO).

The released backbone files (``cityscapes_hrnet.pth``, ``deepglobe_fpn.pth``) hold
the state_dict of the backbone trainer's ``FullModel(model, loss)`` wrapper: every
network key carries a ``model.`` prefix, and Cityscapes may add a ``loss.*`` entry
(``loss.criterion.weight``, the class weights). The official loader deletes
``model.`` anywhere in a key and loads with ``strict=False``, silently ignoring
misnamed keys. Here, so that nothing is ignored silently:

1. strip ONE leading ``model.`` by name (not a substring anywhere, not a blind slice);
2. drop keys starting with ``loss.``;
3. keep everything else, so that a strict load reports any other mismatch.

The refinement checkpoints have no prefix and load as they are.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from refine_cli.errors import WeightsError

MODEL_PREFIX = "model."
"""Prefix of network keys in the released backbone checkpoints (trainer's ``FullModel.model``)."""

LOSS_PREFIX = "loss."
"""Prefix of the trainer's loss buffers, which the network does not use."""


def clean_backbone_state_dict(state_dict: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Map a released backbone checkpoint's keys onto the network's names.

    Args:
        state_dict: name -> tensor as loaded from the file (order kept).

    Returns:
        A new ordered dict: ``loss.*`` entries dropped, one leading ``model.``
        removed from the other keys, everything else unchanged.

    Raises:
        WeightsError: two keys map to the same name (e.g. both ``model.conv1.weight``
            and ``conv1.weight``).
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith(LOSS_PREFIX):
            continue
        name = key.removeprefix(MODEL_PREFIX)
        if name in out:
            raise WeightsError(
                f"checkpoint holds {name!r} twice (with and without the {MODEL_PREFIX!r} prefix); "
                "re-export it with one copy per parameter"
            )
        out[name] = value
    return out


def load_strict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with a one-line :class:`WeightsError`.

    Args:
        module: the network to fill.
        state_dict: cleaned state_dict (see :func:`clean_backbone_state_dict`).
        source: what to call the weights in the message (path or registry name).

    Raises:
        WeightsError: keys missing or unexpected, or a shape differs; the message
            names the first few and the fix.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
        raise WeightsError(
            f"{source} does not match {type(module).__name__}: {'; '.join(parts)}; "
            "check that the weights belong to this architecture and class count"
        )
    module.load_state_dict(state_dict, strict=True)
