"""Coarse segmenters behind one protocol (see ``base.py``), by registry name or file path.

``--segmenter NAME|PATH``:

* a registry name (:func:`list_segmenters`): the official MagNet backbones
  (``magnet-cityscapes-hrnet``, ``magnet-deepglobe-fpn``; checkpoints from the weights
  registry) and the MediaPipe person segmenter (``mediapipe-selfie``, TFLite);
* a file: ``.onnx`` (onnxruntime), ``.tflite`` (ai-edge-litert) or a TorchScript archive
  (``.pt``, ``.pth``, ``.ts``, ``.torchscript``, ``.jit``), each with a sidecar JSON
  ``<file>.json`` giving input size, mean/std, layout, output kind and class names
  (:func:`~refine_cli.segmenters.base.read_sidecar`). The selfie ``.tflite`` needs no sidecar.

Heavy backends are imported only when used, so listing names stays fast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from refine_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

    from refine_cli.segmenters.base import Segmenter

__all__ = ["describe_segmenters", "list_segmenters", "load_segmenter"]


Builder = Callable[["str | torch.device", bool], "Segmenter"]
"""``build(device, download) -> Segmenter``."""


def _backbone(name: str) -> Builder:
    def build(device: str | torch.device, download: bool) -> Segmenter:
        from refine_cli.segmenters.torch_backbones import load_backbone_segmenter

        return load_backbone_segmenter(name, device, download=download)

    return build


def _selfie(device: str | torch.device, download: bool) -> Segmenter:
    from refine_cli import weights as registry
    from refine_cli.segmenters.tflite import SELFIE_NAME, SELFIE_SPEC, TFLiteSegmenter, _import_interpreter

    _import_interpreter()  # the missing-package error first, before any download
    resolved = registry.resolve_weights(SELFIE_NAME, download=download)
    extra = {**SELFIE_SPEC.extra, "weights": SELFIE_NAME, "weights_path": str(resolved.path)}
    if resolved.sha256:
        extra["weights_sha256"] = resolved.sha256
    return TFLiteSegmenter(resolved.path, spec=dataclasses.replace(SELFIE_SPEC, extra=extra))


REGISTRY: dict[str, tuple[Builder, str]] = {
    "magnet-cityscapes-hrnet": (
        _backbone("magnet-cityscapes-hrnet"),
        "MagNet Cityscapes HRNetV2-W18-Small-v2+OCR: 19 classes, input 256x128 (official checkpoint)",
    ),
    "magnet-deepglobe-fpn": (
        _backbone("magnet-deepglobe-fpn"),
        "MagNet DeepGlobe ResNet-50 FPN: 7 land-cover classes, input 508x508 (official checkpoint)",
    ),
    "mediapipe-selfie": (
        _selfie,
        "MediaPipe Selfie Segmentation (TFLite): background/person, input 256x256 (model: `refine weights "
        "fetch mediapipe-selfie`, 250 kB, once)",
    ),
}
"""Segmenters by name: ``name -> (build(device, download), description)``."""

FILE_SUFFIXES = (".onnx", ".tflite", ".pt", ".pth", ".ts", ".torchscript", ".jit")
"""Model files ``load_segmenter`` accepts by path."""


def list_segmenters() -> list[str]:
    """Names accepted by ``--segmenter`` (besides file paths)."""
    return list(REGISTRY)


def describe_segmenters() -> dict[str, str]:
    """``{name: one-line description}``."""
    return {k: v[1] for k, v in REGISTRY.items()}


def load_segmenter(
    name_or_path: str | Path, device: str | torch.device = "auto", *, download: bool = False
) -> Segmenter:
    """The segmenter called ``name_or_path``, ready to run.

    Args:
        name_or_path: a registry name (:func:`list_segmenters`) or a model file.
        device: ``auto`` | ``cpu`` | ``cuda[:N]`` (TFLite always runs on the CPU).
        download: fetch a registry checkpoint that is not cached yet.

    Returns:
        The segmenter.

    Raises:
        UsageError: neither a registry name nor a model file with a known suffix.
        InputError: the file or its sidecar JSON is missing or wrong.
        WeightsError: a registry checkpoint is not cached (the message gives the fetch command).
        DependencyError: the backend's optional package is missing (the message gives the pip line).
    """
    text = str(name_or_path)
    if text in REGISTRY and not Path(text).is_file():
        return REGISTRY[text][0](device, download)
    path = Path(text).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from refine_cli.segmenters.onnx import OnnxSegmenter

        return OnnxSegmenter(path, device)
    if suffix == ".tflite":
        from refine_cli.segmenters.tflite import TFLiteSegmenter

        return TFLiteSegmenter(path)
    if suffix in FILE_SUFFIXES:
        from refine_cli.segmenters.torchscript import TorchScriptSegmenter

        return TorchScriptSegmenter(path, device)
    raise UsageError(
        f"unknown --segmenter {text!r}: use one of {', '.join(REGISTRY)}, or a model file "
        f"({', '.join(FILE_SUFFIXES)}) with a sidecar JSON {text}.json"
    )
