"""A TorchScript model given by path, described by a sidecar JSON (``base.read_sidecar``).

The model is loaded with ``torch.jit.load(path, map_location=device)`` and called on a
float32 batch ``(image / 255 - mean) / std`` in the sidecar's layout; its output (logits
or probabilities, C channels or 1 for a 2-class model) becomes ``(N, C, h, w)`` probabilities.

TorchScript archives contain code; load only files you trust. TorchScript is deprecated
upstream (torch >= 2.9 warns) but still loads; prefer ONNX for new exports.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from refine_cli.errors import InputError
from refine_cli.segmenters.base import Segmenter, read_sidecar, resolve_device

logger = logging.getLogger(__name__)

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")
"""File suffixes treated as TorchScript archives by :func:`~refine_cli.segmenters.load_segmenter`."""


class TorchScriptSegmenter(Segmenter):
    """A TorchScript segmentation model.

    Args:
        path: the ``torch.jit.save`` archive.
        device: ``auto`` | ``cpu`` | ``cuda[:N]``.

    Raises:
        InputError: missing file, missing or bad sidecar, or not a TorchScript archive.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "auto") -> None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"segmenter file {path} not found; check the path")
        self.spec = read_sidecar(path)
        self._device = resolve_device(device)
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated upstream but still loads
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(path), map_location=self._device).eval()
        except (RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise InputError(
                f"{path} is not a TorchScript archive ({first}); export the model with "
                "torch.jit.trace/script and torch.jit.save, or use an .onnx file"
            ) from exc
        logger.info("loaded TorchScript segmenter %s (%d classes, input %dx%d)", path, self.num_classes,
                    *self.input_size)

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self._device

    @torch.inference_mode()
    def predict_torch(self, images: torch.Tensor) -> torch.Tensor:
        """Probabilities of uint8 images at the input size.

        Args:
            images: ``(N, h, w, 3)`` uint8 RGB tensor.

        Returns:
            ``(N, C, h, w)`` float32 on :attr:`device`.
        """
        batch = self.check_batch(images.detach().cpu().numpy())
        x = torch.from_numpy(self.normalized(batch)).to(self._device)
        out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        elif isinstance(out, dict):
            out = out.get("out", next(iter(out.values())))
        return self.to_probs(out.detach(), batch.shape[0]).to(self._device)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """See :meth:`Segmenter.predict`."""
        return self.predict_torch(torch.from_numpy(self.check_batch(images))).cpu().numpy()
