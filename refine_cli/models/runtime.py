"""CPU inference engines for the networks: ONNX Runtime and OpenVINO behind ``--backend``.

A module is exported once per weights to ONNX with dynamic batch, height and width, one graph per
*mode* (a :class:`GraphSpec`: its inputs, outputs and the forward that produces them):

* a :class:`~refine_cli.models.cascadepsp.CascadeRefinementModule` (official or lite), two modes:
  ``global``: ``(im, seg)`` -> the three cascade iterations (the global step); ``local``:
  ``(im, seg, inter_s8)`` -> iterations 2 and 3 (a local step). Each returns ``pred_224``,
  ``pred_28_3`` and ``pred_56_2``, ``(N, 1, H, W)`` float32 probabilities in [0, 1];
* MagNet's :class:`~refine_cli.models.magnet.RefinementMagNet`, mode ``refine``: ``(first, second)``,
  ``(N, C, H, W)`` probabilities each -> ``logits`` ``(N, C, H, W)``;
* a segmentation backbone (:class:`~refine_cli.models.magnet.ImageBackbone`), mode ``segment``:
  ``x`` ``(N, 3, H, W)`` normalised image -> ``logits`` ``(N, C, H, W)``.

The files go to a cache folder named by a hash of the architecture and the weights, written
atomically, so later runs load them without exporting again.

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
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
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
"""The cascade graphs' outputs."""
_MODULES = {"onnx": "onnxruntime", "openvino": "openvino"}


class GraphSpec(NamedTuple):
    """One exported forward (mode) of a module.

    Attributes:
        inputs: ``(name, channels)`` of each input, ``(N, channels, H, W)`` float32.
        outputs: names of the outputs, ``(N, *, H, W)`` float32.
        wrap: builds the module to export from the (export-ready) network: its forward takes the
            inputs in order and returns a tuple of the outputs in order.
    """

    inputs: tuple[tuple[str, int], ...]
    outputs: tuple[str, ...]
    wrap: Callable[[nn.Module], nn.Module]


MAGNET_ORDER = ("openvino", "onnx")
"""``auto``'s order for MagNet's networks: 3 patches of 256 px through the bundled refinement module took
0.25 s in OpenVINO, 0.57 s in ONNX Runtime and 1.30 s in torch (508 px: 0.84 / 2.25 / 5.94 s), 2 idle AMD
EPYC cores."""


def traceable_size(size: Sequence[Any]) -> tuple[Any, Any]:
    """``(H, W)`` for ``F.interpolate``: ints, or the traced sizes they are during an ONNX export.

    ``int()`` of a traced size would freeze the exported graph to the sample input's size.
    """
    h, w = (s if isinstance(s, torch.Tensor) else int(s) for s in size[:2])
    return h, w


def installed(backend: str) -> bool:
    """Whether ``backend`` can run: its package and ``onnx`` (the exporter needs it); ``torch``: always."""
    if backend == "torch":
        return True
    return all(importlib.util.find_spec(name) is not None for name in (_MODULES[backend], "onnx"))


def import_openvino() -> Any:
    """The ``openvino`` module, imported with its usage telemetry off.

    Importing ``openvino`` (2024 and later) sends usage events to Google Analytics and writes a client
    id under ``~/intel`` unless a consent file there says no or it runs in a CI job. refine runs
    offline and writes nothing outside its outputs and its cache, so the import runs with
    ``CI=true``, which OpenVINO's telemetry reads as "collect nothing"; the variable is restored at
    once. A process that imported ``openvino`` before keeps its own setting.
    """
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    before = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        import openvino
    finally:
        if before is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = before
    return openvino


def resolve_backend(backend: str, device: torch.device, precision: str,
                    order: tuple[str, ...] = ("onnx", "openvino")) -> str:
    """The backend that runs: ``auto`` -> the first installed of ``order``, else ``torch``.

    ``auto`` keeps ``torch`` on CUDA and for ``bf16``/``fp16`` (autocast is torch's). ``order`` is the
    network's own, measured on 2 idle AMD EPYC cores (``benchmarks/backends.py`` measures them on the
    machine at hand): the cascade's lite-v2 local step at 640 px took 0.21-0.26 s in ONNX Runtime,
    0.26 s in OpenVINO and 0.32-0.40 s in torch, and OpenVINO keeps ~0.4 GB more, so ONNX Runtime comes
    first; MagNet's refinement module (:data:`MAGNET_ORDER`) is faster in OpenVINO.

    Raises:
        UsageError: an unknown backend, a named one that is not installed (the message says what to
            install), or a non-torch backend on CUDA or with reduced precision.
    """
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type != "cpu" or precision != "fp32":
            return "torch"
        return next((b for b in order if installed(b)), "torch")
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


class _CascadeGraph(nn.Module):
    """One exported mode of a cascade module: a tuple of :data:`OUTPUTS`."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, im: Tensor, seg: Tensor, inter_s8: Tensor | None = None) -> tuple[Tensor, ...]:
        """The module's probabilities, in :data:`OUTPUTS` order."""
        out = self.model(im, seg, inter_s8 if self.mode == "local" else None)
        return tuple(out[k] for k in OUTPUTS)


class _Single(nn.Module):
    """A network whose forward returns one tensor, as a graph with one output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: Tensor) -> tuple[Tensor]:
        """``(model(*inputs),)``."""
        return (self.model(*inputs),)


CASCADE_GRAPHS: dict[str, GraphSpec] = {
    "global": GraphSpec((("im", 3), ("seg", 1)), OUTPUTS, lambda m: _CascadeGraph(m, "global")),
    "local": GraphSpec((("im", 3), ("seg", 1), ("inter_s8", 1)), OUTPUTS,
                       lambda m: _CascadeGraph(m, "local")),
}
"""The two graphs of a cascade module."""


def refinement_graphs(classes: int) -> dict[str, GraphSpec]:
    """The graph of MagNet's refinement module for C classes: ``(first, second)`` -> ``logits``."""
    return {"refine": GraphSpec((("first", classes), ("second", classes)), ("logits",), _Single)}


BACKBONE_GRAPHS: dict[str, GraphSpec] = {"segment": GraphSpec((("x", 3),), ("logits",), _Single)}
"""The graph of a segmentation backbone: a normalised image -> logits."""


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


def export_onnx(model: nn.Module, spec: GraphSpec, path: Path) -> Path:
    """Export one graph of ``model`` to ``path`` (atomically: temp file + rename)."""
    import warnings

    graph = spec.wrap(exportable(model)).eval()
    args = tuple(torch.zeros(1, channels, 64, 96) for _, channels in spec.inputs)
    names = [name for name, _ in spec.inputs]
    dyn = {k: {0: "n", 2: "h", 3: "w"} for k in (*names, *spec.outputs)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, args, tmp, dynamo=False, opset_version=OPSET, input_names=names,
                              output_names=list(spec.outputs), dynamic_axes=dyn)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


class _OpenVinoSession(NamedTuple):
    """An OpenVINO infer request with the core and compiled model it came from, kept alive as long as it."""

    core: Any
    compiled: Any
    request: Any


class ModuleRuntime:
    """Runs a module's inference graphs in ONNX Runtime or OpenVINO on the CPU.

    Sessions are built on first use per mode (exporting the graph when the cache has none) and
    reused; calls are serialised by a lock (the engine calls from one compute thread).

    Args:
        model: the module (its weights are exported as they are now).
        backend: ``onnx`` | ``openvino``.
        folder: cache folder of the exported graphs.
        graphs: the module's graphs by mode.
        kind: the graph files' name prefix (``cascade``, ``magnet-refine``, ``backbone``).
        threads: intra-op threads (``None``: torch's current setting).
        held_bytes: memory the engine keeps between calls, for the memory plan: OpenVINO keeps its
            buffers (about one forward's activations at the largest input); ONNX Runtime runs without
            its memory arena and keeps nothing (with the arena a 640 px call took 0.22 s instead of
            0.28 s but kept ~280 MB, and peak RSS rose by ~400 MB on a 4K photo).
    """

    def __init__(self, model: nn.Module, backend: str, folder: Path, graphs: Mapping[str, GraphSpec],
                 kind: str, threads: int | None = None, held_bytes: int = 0) -> None:
        if backend not in ("onnx", "openvino"):
            raise ValueError(f"a module runtime runs onnx or openvino, not {backend!r}")
        self.backend, self.folder = backend, Path(folder)
        self.graphs, self.kind = dict(graphs), kind
        self.threads = int(threads or torch.get_num_threads())
        self.held_bytes = int(held_bytes)
        self.key = weights_key(model)
        self._model = weakref.ref(model)  # the module holds its runtime: no reference cycle
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def graph_path(self, mode: str) -> Path:
        """Where the ``mode`` graph of these weights lives in the cache."""
        return self.folder / f"{self.kind}-{self.key}-{mode}.onnx"

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
        logger.info("exporting the %s %s graph to %s (once per weights)", mode, self.kind, path)
        try:
            return export_onnx(self._module(), self.graphs[mode], path)
        except OSError as exc:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="refine-graphs-")
            logger.warning("cannot write %s (%s): exporting to a temporary folder for this run; make "
                           "$REFINE_HOME writable to keep the graphs", path.parent, exc.strerror or exc)
            return export_onnx(self._module(), self.graphs[mode], Path(self._tmp.name) / path.name)

    def _open(self, path: Path) -> Any:
        if self.backend == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.enable_cpu_mem_arena = False  # peak RSS as torch's (see held_bytes)
            opts.enable_mem_pattern = False
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        ov = import_openvino()
        core = ov.Core()
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": self.threads,
                                                         "INFERENCE_PRECISION_HINT": "f32"})
        return _OpenVinoSession(core, compiled, compiled.create_infer_request())

    def _module(self) -> nn.Module:
        module = self._model()
        if module is None:
            raise RuntimeError("the module of this runtime is gone")
        return module

    def run(self, mode: str, *inputs: Tensor) -> list[Tensor]:
        """The ``mode`` graph's outputs, in its spec's order, for CPU float32 inputs ``(N, *, H, W)``."""
        spec = self.graphs[mode]
        feed = {name: np.ascontiguousarray(t.detach().float().numpy())
                for (name, _), t in zip(spec.inputs, inputs, strict=True)}
        with self._lock:
            session = self._session(mode)
            if self.backend == "onnx":
                outs = session.run(list(spec.outputs), feed)
            else:
                result = session.request.infer(feed)
                outs = [result[session.request.model_outputs[i]] for i in range(len(spec.outputs))]
        return [torch.from_numpy(np.array(o, dtype=np.float32, copy=True)) for o in outs]


class CascadeRuntime(ModuleRuntime):
    """A cascade module's runtime: :data:`CASCADE_GRAPHS`, called like the module's inference forward.

    Args:
        model, backend, folder, threads, held_bytes: as :class:`ModuleRuntime`.
    """

    def __init__(self, model: nn.Module, backend: str, folder: Path, threads: int | None = None,
                 held_bytes: int = 0) -> None:
        super().__init__(model, backend, folder, CASCADE_GRAPHS, "cascade", threads, held_bytes)

    def __call__(self, im: Tensor, seg: Tensor, inter_s8: Tensor | None = None) -> dict[str, Tensor]:
        """The module's ``pred_*`` outputs (:data:`OUTPUTS`) for CPU float32 inputs ``(N, *, H, W)``."""
        outs = self.run("global", im, seg) if inter_s8 is None else self.run("local", im, seg, inter_s8)
        return dict(zip(OUTPUTS, outs, strict=True))


def runs_here(x: Tensor) -> bool:
    """Whether a forward on ``x`` may go to a runtime: inference (no autograd) on the CPU in float32."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not (
        torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"))


def held_bytes(model: nn.Module) -> int:
    """Bytes a module's runtime keeps between calls (0 without one; see :class:`CascadeRuntime`)."""
    rt = model.__dict__.get("runtime")
    return int(rt.held_bytes) if isinstance(rt, ModuleRuntime) else 0
