"""TFLite segmenters through ``ai-edge-litert`` (a dependency of ``refine-cli``).

The built-in one is the MediaPipe (legacy) Selfie Segmentation *general* model
(``selfie_segmentation.tflite``, Apache-2.0, 249 505 bytes, sha256 ``9ee168ec...``;
see ``refine_cli.weights.magnet``): input ``[1, 256, 256, 3]`` float32 RGB in
``[0, 1]``, output ``[1, 256, 256, 1]`` person probability. Its one channel p becomes
two classes ``[background, person] = [1 - p, p]``. Other ``.tflite`` files need a
sidecar JSON like ONNX models. The interpreter takes one image at a time and runs on
the CPU (XNNPACK).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refine_cli.errors import DependencyError, InputError
from refine_cli.hashing import sha256_file
from refine_cli.segmenters.base import Segmenter, SegmenterSpec, read_sidecar

logger = logging.getLogger(__name__)

TFLITE_INSTALL = "pip install ai-edge-litert"
"""How to get the TFLite runtime."""

SELFIE_NAME = "mediapipe-selfie"
"""Segmenter (and weights-registry) name of the MediaPipe selfie segmenter."""

SELFIE_SHA256 = "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c"
"""sha256 of ``selfie_segmentation.tflite`` as shipped in the mediapipe 0.10.21 wheel."""

SELFIE_SPEC = SegmenterSpec(
    name=SELFIE_NAME, input_size=(256, 256), classes=("background", "person"), mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0), layout="NHWC", output="probs", resize="area",
    extra={"license": "Apache-2.0", "source": "MediaPipe Selfie Segmentation (general, 256x256)"},
)
"""Contract of the selfie model: RGB / 255, NHWC, one-channel person probability."""


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the duration (native libraries write there directly)."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2 (embedded interpreters): nothing to hide
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _import_interpreter() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise DependencyError("TFLite segmenters need ai-edge-litert, a dependency of refine that is "
                              f"missing here; run `{TFLITE_INSTALL}` (or reinstall refine)") from exc
    return Interpreter


class TFLiteSegmenter(Segmenter):
    """A TFLite segmentation model.

    Args:
        path: the ``.tflite`` file.
        spec: its contract; ``None`` reads the sidecar JSON, except for the selfie model
            (recognised by its sha256), which needs none.
        threads: interpreter threads (``None``: the runtime's default).

    Raises:
        DependencyError: ai-edge-litert is not installed.
        InputError: missing file, missing or bad sidecar, or a file the runtime cannot load.
    """

    def __init__(
        self, path: str | Path, spec: SegmenterSpec | None = None, threads: int | None = None
    ) -> None:
        interpreter_cls = _import_interpreter()
        path = Path(path)
        if not path.is_file():
            raise InputError(f"segmenter file {path} not found; check the path")
        if spec is None:
            spec = SELFIE_SPEC if sha256_file(path) == SELFIE_SHA256 else read_sidecar(path)
        self.spec = spec
        try:
            with _quiet_native_stderr():  # the runtime prints "INFO: Created ... delegate" on fd 2
                self.interpreter = interpreter_cls(model_path=str(path), num_threads=threads)
                self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise InputError(
                f"the TFLite runtime cannot load {path} ({exc}); is it a .tflite model?"
            ) from exc
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self._lock = threading.Lock()  # an interpreter is not re-entrant
        expected = [1, spec.input_size[1], spec.input_size[0], 3] if spec.layout == "NHWC" else \
            [1, 3, spec.input_size[1], spec.input_size[0]]
        if list(self._input["shape"]) != expected:
            raise InputError(
                f"{path} takes input {list(self._input['shape'])} but its description says {expected}; "
                "fix 'input_size'/'layout' in the sidecar JSON"
            )
        logger.info("loaded TFLite segmenter %s (%d classes, input %dx%d)", path, self.num_classes,
                    *self.input_size)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """See :meth:`Segmenter.predict` (one interpreter call per image)."""
        batch = self.check_batch(images)
        x = self.normalized(batch).astype(self._input["dtype"], copy=False)
        outs = []
        with self._lock:
            for i in range(len(x)):
                self.interpreter.set_tensor(self._input["index"], x[i : i + 1])
                self.interpreter.invoke()
                outs.append(np.array(self.interpreter.get_tensor(self._output["index"]), dtype=np.float32))
        return self.to_probs(np.concatenate(outs), len(batch)).numpy()

    @property
    def device(self) -> torch.device:
        """Always the CPU."""
        return torch.device("cpu")
