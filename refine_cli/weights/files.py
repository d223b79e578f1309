"""Every checkpoint read and write of the project.

Safe ``torch.load``, exports with sidecars, and the resumable training checkpoints.

Reading always uses ``torch.load(weights_only=True, map_location="cpu")`` (no pickled code is
run), strips prefixes such as ``module.`` by name and checks names and shapes strictly, so a
wrong or damaged file gives a :class:`~refine_cli.errors.WeightsError` that names the keys.
Writing goes through a temporary file in the same folder, fsync and rename, so a crash never
leaves a half-written checkpoint. torch is imported inside the functions: importing this
module stays cheap.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refine_cli.errors import InputError, UsageError, WeightsError
from refine_cli.hashing import sha256_file

if TYPE_CHECKING:
    import torch
    from torch import nn

CHECKPOINT_FORMAT = "refine-train-checkpoint/1"
"""``format`` entry of the resumable training checkpoint."""

EXPORT_FORMAT = "refine-weights/1"
"""``format`` entry of an exported weights sidecar."""


def one_line(text: object) -> str:
    """``text`` as one line: runs of whitespace, newlines included, become one space."""
    return " ".join(str(text).split())


def _strip_prefixes(key: str, prefixes: Iterable[str]) -> str:
    """Remove any of ``prefixes`` from the start of ``key``, repeatedly (``module._orig_mod.x`` -> ``x``)."""
    prefixes = [p for p in prefixes if p]
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def _few(items: list[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def load_state_dict(
    path: str | Path,
    expected: Mapping[str, tuple[int, ...]] | nn.Module,
    strip_prefixes: tuple[str, ...] = ("module.",),
    drop_prefixes: tuple[str, ...] = (),
) -> OrderedDict[str, torch.Tensor]:
    """Read a tensor-only checkpoint safely and check it against the expected names and shapes.

    Args:
        path: checkpoint file (a state_dict, or a dict with a ``state_dict`` entry).
        expected: name -> shape, or a module whose ``state_dict`` gives them.
        strip_prefixes: prefixes removed from key starts by name (``module.`` of DataParallel).
        drop_prefixes: keys starting with these (after stripping) are ignored.

    Returns:
        Name -> CPU tensor, prefixes stripped, in file order; loads with ``strict=True``.

    Raises:
        WeightsError: unreadable file, pickled code (``weights_only=True`` refuses it),
            non-tensor entries, or missing / unexpected / wrongly shaped keys (named).
    """
    import torch
    from torch import nn

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found; check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = one_line(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise WeightsError(
            f"{path} is not a plain tensor checkpoint ({first[:160]}); refusing to unpickle it - "
            "re-download it or re-save it as a state_dict of tensors"
        ) from exc
    except Exception as exc:  # torch.load raises many types on foreign or truncated files
        raise WeightsError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {one_line(exc)[:160]}); "
            "re-download it"
        ) from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state_dict; save model.state_dict()")
    want = (
        {k: tuple(v.shape) for k, v in expected.state_dict().items()}
        if isinstance(expected, nn.Module)
        else {k: tuple(v) for k, v in expected.items()}
    )
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for raw, value in obj.items():
        key = _strip_prefixes(str(raw), strip_prefixes)
        if any(key.startswith(p) for p in drop_prefixes if p):
            continue
        if not isinstance(value, torch.Tensor):
            kind = type(value).__name__
            raise WeightsError(f"{path}: entry {raw!r} is a {kind}, not a tensor; not a state_dict")
        if key in state:
            raise WeightsError(f"{path}: two entries become {key!r} after stripping {strip_prefixes}")
        state[key] = value
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {want[k]}"
        for k in want
        if k in state and tuple(state[k].shape) != want[k]
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape ({_few(wrong)})")
        raise WeightsError(f"{path} does not fit the model: {'; '.join(parts)}; is it the right checkpoint?")
    return state


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary file in the same folder, fsync it, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write a resumable training checkpoint atomically (``torch.save`` of tensors and plain values)."""
    import torch

    atomic_write(path, lambda tmp: torch.save(dict(state), tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a resumable training checkpoint safely (``weights_only=True``, CPU).

    Raises:
        InputError: missing, unreadable, truncated or not a ``refine train`` checkpoint.
    """
    import torch

    if not path.is_file():
        raise InputError(f"no checkpoint at {path}; train without --resume to start a new run there")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on damaged files
        reason = one_line(exc)[:120]
        raise InputError(
            f"checkpoint {path} is unreadable or damaged ({type(exc).__name__}: {reason}); "
            "delete it to start again, or restore a copy"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not a `refine train` checkpoint ({CHECKPOINT_FORMAT}); check --out")
    return state


def export_weights(
    model: nn.Module, path: str | Path, meta: Mapping[str, Any], *, half: bool = False
) -> dict[str, Any]:
    """Save a plain state_dict and a JSON sidecar ``<path minus suffix>.json`` beside it.

    Args:
        model: the trained module.
        path: the ``.pt`` file to write (atomically).
        meta: facts for the sidecar (``arch``, ``arch_params``, steps, metrics, data ...).
        half: store floating-point tensors as float16 (loading converts them back to float32).

    Returns:
        The sidecar dict (with ``sha256``, ``size``, ``dtype``, ``parameters``).
    """
    import torch

    path = Path(path)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        state[k] = (v.to(torch.float16) if half and v.is_floating_point() else v).clone()
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    side = {
        "format": EXPORT_FORMAT,
        # CascadePSP's input contract unless ``meta`` gives the module's own (MagNet's takes no image)
        "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                          "mask": "binarised (p >= 0.5) and mapped to {-1, +1}"},
        **dict(meta),
        "file": path.name,
        "size": path.stat().st_size,
        "sha256": sha256_file(path),
        "dtype": "float16" if half else "float32",
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }
    sidecar = path.with_suffix(".json")
    atomic_write(sidecar, lambda tmp: tmp.write_text(json.dumps(side, indent=2) + "\n", encoding="utf-8"))
    return side


def read_export_sidecar(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of exported weights ``path`` (``<stem>.json``).

    Raises:
        WeightsError: missing or unreadable sidecar.
    """
    sidecar = Path(path).with_suffix(".json")
    try:
        side = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(
            f"cannot read {sidecar} ({exc}); the sidecar that describes {Path(path).name} must sit beside it"
        ) from exc
    if not isinstance(side, dict) or side.get("format") != EXPORT_FORMAT or "arch" not in side:
        raise WeightsError(f"{sidecar} is not a refine weights sidecar ({EXPORT_FORMAT})")
    return side


def load_exported(path: str | Path, *, sha256: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a module from exported weights and load them strictly, after checking the sha256.

    Args:
        path: the ``.pt`` written by :func:`export_weights` (its ``.json`` sidecar beside it).
        sha256: expected digest; ``None`` uses the sidecar's.

    Returns:
        The module (float32, eval mode, CPU) and the sidecar.

    Raises:
        WeightsError: missing files, checksum mismatch, unknown architecture, or keys / shapes
            that do not fit (all named).
    """
    from refine_cli.models.registry import build_model

    path = Path(path)
    side = read_export_sidecar(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found; check the path")
    want = (sha256 or side.get("sha256") or "").lower()
    got = sha256_file(path)
    if want != got:
        raise WeightsError(
            f"checksum mismatch for {path} (sha256 {got}, expected {want}); "
            "the file is damaged or not these weights"
        )
    try:
        model = build_model(str(side["arch"]), side.get("arch_params") or {})
    except UsageError as exc:
        raise WeightsError(f"{path}: {exc}") from exc
    state = load_state_dict(path, model)
    model.load_state_dict(state, strict=True)  # copies into the float32 parameters
    return model.float().eval(), side
