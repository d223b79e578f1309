"""CPU inference engines for the CascadePSP modules: ONNX Runtime and OpenVINO behind ``--backend``.

A :class:`~refine_cli.models.cascadepsp.CascadeRefinementModule` (official or lite) is exported once
per weights to ONNX with dynamic batch, height and width, in two graphs:

* ``global``: ``(im, seg)`` -> the three cascade iterations (the global step);
* ``local``: ``(im, seg, inter_s8)`` -> iterations 2 and 3 (a local step).

Each graph returns ``pred_224``, ``pred_28_3`` and ``pred_56_2``, ``(N, 1, H, W)`` float32
probabilities in [0, 1] (the outputs inference reads). The files go to a cache folder named by
a hash of the weights, written atomically, so later runs load them without exporting again.

Export-friendly pooling: ONNX has no adaptive average pooling for sizes that do not divide the
input, so the pyramid-pooling stages are exported as ``P_h @ x @ P_w^T`` with the bin-averaging
matrices of :func:`pool_matrix` (the same bins as ``nn.AdaptiveAvgPool2d``; the sums differ only
in rounding order, about 1e-7).

Agreement with torch fp32 (measured on lite-v2 and the official architecture, 224-900 px inputs):
probabilities within 2e-5 absolute; stated in ``tests/test_runtime.py`` as 1e-4.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from refine_cli.errors import UsageError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx", "openvino")
"""``--backend`` choices: ``auto`` picks the fastest installed one (see :func:`resolve_backend`)."""

EXPORT_VERSION = 1
"""Bumped when the exported graphs change; part of the cache key."""

OPSET = 17
OUTPUTS = ("pred_224", "pred_28_3", "pred_56_2")
_INPUTS = {"global": ("im", "seg"), "local": ("im", "seg", "inter_s8")}
_MODULES = {"onnx": "onnxruntime", "openvino": "openvino"}


def installed(backend: str) -> bool:
    """Whether ``backend`` can run: its package and ``onnx`` (the exporter needs it); ``torch``: always."""
    if backend == "torch":
        return True
    return all(importlib.util.find_spec(name) is not None for name in (_MODULES[backend], "onnx"))


def resolve_backend(backend: str, device: torch.device, precision: str) -> str:
    """The backend that runs: ``auto`` -> ``onnx``, else ``openvino``, else ``torch``.

    ``auto`` keeps ``torch`` on CUDA and for ``bf16``/``fp16`` (autocast is torch's). On 2 idle AMD
    EPYC cores the lite-v2 local step at 640 px took 0.21-0.26 s in ONNX Runtime, 0.26 s in OpenVINO
    and 0.32-0.40 s in torch (``benchmarks/backends.py`` measures them on the machine at hand).

    Raises:
        UsageError: an unknown backend, a named one that is not installed (the message says what to
            install), or a non-torch backend on CUDA or with reduced precision.
    """
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type != "cpu" or precision != "fp32":
            return "torch"
        return next((b for b in ("onnx", "openvino") if installed(b)), "torch")
    if backend == "torch":
        return backend
    if device.type != "cpu":
        raise UsageError(f"--backend {backend} runs on the CPU; use --backend torch with "
                         f"--device {device.type}")
    if precision != "fp32":
        raise UsageError(f"--backend {backend} runs fp32; use --precision fp32 or --backend torch")
    if not installed(backend):
        raise UsageError(f"--backend {backend} needs the {_MODULES[backend]} and onnx packages: "
                         f"pip install {_MODULES[backend]} onnx (or use --backend torch)")
    return backend


def pool_matrix(n: Any, out: int, dtype: torch.dtype) -> Tensor:
    """``(out, n)`` bin-averaging matrix of adaptive average pooling from ``n`` to ``out`` cells.

    Bin ``i`` covers ``[floor(i n / out), ceil((i + 1) n / out))``, as ``nn.AdaptiveAvgPool2d``;
    ``n`` may be a traced size (the exported graph then stays dynamic).
    """
    i = torch.arange(out)
    start = torch.div(i * n, out, rounding_mode="floor")
    end = torch.div((i + 1) * n + out - 1, out, rounding_mode="floor")
    j = torch.arange(n)
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return inside.to(dtype) / (end - start)[:, None].to(dtype)


class MatrixPool(nn.Module):
    """Adaptive average pooling to ``out x out`` cells as two matrix products (exportable)."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.out = int(out)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, h, w)`` -> ``(N, C, out, out)``."""
        rows = pool_matrix(x.shape[-2], self.out, x.dtype)
        cols = pool_matrix(x.shape[-1], self.out, x.dtype)
        return rows @ x @ cols.transpose(0, 1)


class _Graph(nn.Module):
    """One exported mode of a cascade module: a tuple of :data:`OUTPUTS`."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, im: Tensor, seg: Tensor, inter_s8: Tensor | None = None) -> tuple[Tensor, ...]:
        """The module's probabilities, in :data:`OUTPUTS` order."""
        out = self.model(im, seg, inter_s8 if self.mode == "local" else None)
        return tuple(out[k] for k in OUTPUTS)


def exportable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode on the CPU, its adaptive pools replaced by :class:`MatrixPool`."""
    saved = model.__dict__.pop("runtime", None)  # sessions do not copy
    try:
        clone = copy.deepcopy(model).cpu().eval()
    finally:
        if saved is not None:
            model.__dict__["runtime"] = saved
    for module in list(clone.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.AdaptiveAvgPool2d):
                size: Any = child.output_size
                sides = (size, size) if isinstance(size, int) else tuple(size)
                if sides[0] is None or sides[0] != sides[1]:
                    raise ValueError(f"only square adaptive pools of a fixed size export, got {size}")
                setattr(module, name, MatrixPool(int(sides[0])))
    return clone


def weights_key(model: nn.Module) -> str:
    """A 16-hex-digit hash of the module's architecture, state and :data:`EXPORT_VERSION`.

    The architecture is ``repr(model)``: every layer with its kernel, stride, dilation and padding, which
    the state alone does not fix (two dilations fit the same weights).
    """
    h = hashlib.sha256(f"{type(model).__qualname__}:{EXPORT_VERSION}:{OPSET}\n{model!r}".encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def export_onnx(model: nn.Module, mode: str, path: Path) -> Path:
    """Export one mode (``global`` | ``local``) of ``model`` to ``path`` (atomically: temp file + rename)."""
    import warnings

    graph = _Graph(exportable(model), mode).eval()
    n, h, w = 1, 64, 96
    args: tuple[Tensor, ...] = (torch.zeros(n, 3, h, w), torch.zeros(n, 1, h, w))
    if mode == "local":
        args = (*args, torch.zeros(n, 1, h, w))
    names = list(_INPUTS[mode])
    dyn = {k: {0: "n", 2: "h", 3: "w"} for k in (*names, *OUTPUTS)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, args, tmp, dynamo=False, opset_version=OPSET, input_names=names,
                              output_names=list(OUTPUTS), dynamic_axes=dyn)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


class _OpenVinoSession(NamedTuple):
    """An OpenVINO infer request with the core and compiled model it came from, kept alive as long as it."""

    core: Any
    compiled: Any
    request: Any


class CascadeRuntime:
    """Runs a cascade module's inference forward in ONNX Runtime or OpenVINO on the CPU.

    Sessions are built on first use per mode (exporting the graph when the cache has none) and
    reused; calls are serialised by a lock (the engine calls from one compute thread).

    Args:
        model: the module (its weights are exported as they are now).
        backend: ``onnx`` | ``openvino``.
        folder: cache folder of the exported graphs.
        threads: intra-op threads (``None``: torch's current setting).
        held_bytes: memory the engine keeps between calls, for the memory plan: OpenVINO keeps its
            buffers (about one forward's activations at the largest input); ONNX Runtime runs without
            its memory arena and keeps nothing (with the arena a 640 px call took 0.22 s instead of
            0.28 s but kept ~280 MB, and peak RSS rose by ~400 MB on a 4K photo).
    """

    def __init__(self, model: nn.Module, backend: str, folder: Path, threads: int | None = None,
                 held_bytes: int = 0) -> None:
        if backend not in ("onnx", "openvino"):
            raise ValueError(f"CascadeRuntime runs onnx or openvino, not {backend!r}")
        self.backend, self.folder = backend, Path(folder)
        self.threads = int(threads or torch.get_num_threads())
        self.held_bytes = int(held_bytes)
        self.key = weights_key(model)
        self._model = weakref.ref(model)  # the module holds its runtime: no reference cycle
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def graph_path(self, mode: str) -> Path:
        """Where the ``mode`` graph of these weights lives in the cache."""
        return self.folder / f"cascade-{self.key}-{mode}.onnx"

    def _session(self, mode: str) -> Any:
        if mode not in self._sessions:
            path = self.graph_path(mode)
            if path.is_file():
                try:
                    self._sessions[mode] = self._open(path)
                    return self._sessions[mode]
                except Exception as exc:  # noqa: BLE001 - a damaged file or another exporter's: export again
                    logger.warning("cannot load %s (%s); exporting it again", path, str(exc).splitlines()[0])
            self._sessions[mode] = self._open(self._export(mode, path))
        return self._sessions[mode]

    def _export(self, mode: str, path: Path) -> Path:
        """Export ``mode`` to ``path``, or to a temporary folder when the cache cannot be written."""
        logger.info("exporting the %s cascade graph to %s (once per weights)", mode, path)
        try:
            return export_onnx(self._module(), mode, path)
        except OSError as exc:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="refine-graphs-")
            logger.warning("cannot write %s (%s): exporting to a temporary folder for this run; make "
                           "$REFINE_HOME writable to keep the graphs", path.parent, exc.strerror or exc)
            return export_onnx(self._module(), mode, Path(self._tmp.name) / path.name)

    def _open(self, path: Path) -> Any:
        if self.backend == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.enable_cpu_mem_arena = False  # peak RSS as torch's (see held_bytes)
            opts.enable_mem_pattern = False
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": self.threads,
                                                         "INFERENCE_PRECISION_HINT": "f32"})
        return _OpenVinoSession(core, compiled, compiled.create_infer_request())

    def _module(self) -> nn.Module:
        module = self._model()
        if module is None:
            raise RuntimeError("the module of this runtime is gone")
        return module

    def __call__(self, im: Tensor, seg: Tensor, inter_s8: Tensor | None = None) -> dict[str, Tensor]:
        """The module's ``pred_*`` outputs (:data:`OUTPUTS`) for CPU float32 inputs ``(N, *, H, W)``."""
        mode = "global" if inter_s8 is None else "local"
        tensors = (im, seg) if inter_s8 is None else (im, seg, inter_s8)
        feed = {k: np.ascontiguousarray(t.detach().float().numpy()) for k, t in zip(_INPUTS[mode], tensors,
                                                                                       strict=True)}
        with self._lock:
            session = self._session(mode)
            if self.backend == "onnx":
                outs = session.run(list(OUTPUTS), feed)
            else:
                result = session.request.infer(feed)
                outs = [result[session.request.model_outputs[i]] for i in range(len(OUTPUTS))]
        return {k: torch.from_numpy(np.array(o, dtype=np.float32, copy=True)) for k, o in zip(OUTPUTS, outs,
                                                                                              strict=True)}


def held_bytes(model: nn.Module) -> int:
    """Bytes a module's runtime keeps between calls (0 without one; see :class:`CascadeRuntime`)."""
    rt = model.__dict__.get("runtime")
    return int(rt.held_bytes) if isinstance(rt, CascadeRuntime) else 0
