"""Any ONNX segmentation model, run with onnxruntime (optional extra ``refine-cli[onnx]``).

The model file comes with a sidecar JSON (:func:`~refine_cli.segmenters.base.read_sidecar`)
giving its input size, normalisation, layout, output kind and class names. The first
graph input receives ``(image / 255 - mean) / std`` as float32 in the sidecar's
layout; the first graph output is taken as logits or probabilities. Models exported
with a fixed batch of 1 are run image by image.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refine_cli.errors import DependencyError, InputError
from refine_cli.segmenters.base import Segmenter, read_sidecar, resolve_device

logger = logging.getLogger(__name__)

ONNX_INSTALL = 'pip install "refine-cli[onnx]"'
"""How to get onnxruntime."""


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise DependencyError(f"ONNX segmenters need onnxruntime; run `{ONNX_INSTALL}`") from exc
    return onnxruntime


class OnnxSegmenter(Segmenter):
    """An ONNX segmentation model.

    Args:
        path: the ``.onnx`` file.
        device: ``auto`` | ``cpu`` | ``cuda[:N]``; CUDA uses onnxruntime's CUDA provider when the
            installed onnxruntime has it, else falls back to the CPU (logged).
        threads: intra-op threads of the CPU provider (``None``: onnxruntime's default).

    Raises:
        DependencyError: onnxruntime is not installed.
        InputError: missing file, missing or bad sidecar, or a file onnxruntime cannot load.
    """

    def __init__(
        self, path: str | Path, device: str | torch.device = "auto", threads: int | None = None
    ) -> None:
        ort = _import_onnxruntime()
        path = Path(path)
        if not path.is_file():
            raise InputError(f"segmenter file {path} not found; check the path")
        self.spec = read_sidecar(path)
        dev = resolve_device(device) if device != "auto" else torch.device("cpu")
        providers = ["CPUExecutionProvider"]
        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        if (device == "auto" or dev.type == "cuda") and has_cuda:
            providers.insert(0, "CUDAExecutionProvider")
        elif dev.type == "cuda":
            logger.warning("onnxruntime has no CUDA provider here; running %s on the CPU", path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph ...)
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise InputError(f"onnxruntime cannot load {path} ({first}); is it an ONNX model?") from exc
        self._input = self.session.get_inputs()[0]
        self._output = self.session.get_outputs()[0].name
        first_dim = self._input.shape[0] if self._input.shape else None
        self._fixed_batch = first_dim if isinstance(first_dim, int) and first_dim > 0 else None
        logger.info("loaded ONNX segmenter %s with %s (%d classes, input %dx%d)", path,
                    self.session.get_providers()[0], self.num_classes, *self.input_size)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """See :meth:`Segmenter.predict`."""
        batch = self.check_batch(images)
        x = self.normalized(batch)
        step = self._fixed_batch or len(x)
        outs = []
        for i in range(0, len(x), step):
            chunk = x[i : i + step]
            if self._fixed_batch and len(chunk) < step:
                raise InputError(f"{self.name} was exported for batches of exactly {step}; "
                                 "re-export it with a dynamic batch axis")
            outs.append(self.session.run([self._output], {self._input.name: chunk})[0])
        return self.to_probs(np.concatenate(outs), len(batch)).numpy()
