"""The segmenter protocol: an image window in, class probabilities at the segmenter's input size out.

A segmenter makes the coarse prediction that MagNet refines (stage-1 Y, and O on
every refined patch) and the coarse mask of ``refine segment``. Every backend
(the official MagNet backbones in PyTorch, TorchScript, ONNX, TFLite) implements
:meth:`Segmenter.predict` on images *already resized* to :attr:`Segmenter.input_size`;
resizing is the caller's business (the MagNet pipeline resizes stage images and
patches exactly like the official code) or :meth:`Segmenter.segment_window`'s.

Shapes and ranges:

* images: ``(N, h, w, 3)`` uint8 RGB (NHWC), ``(w, h) == input_size``;
* :meth:`Segmenter.predict`: ``(N, C, h, w)`` float32 numpy probabilities (softmax
  over C, each pixel sums to 1);
* :meth:`Segmenter.predict_torch`: the same as a torch tensor on :attr:`Segmenter.device`;
* :meth:`Segmenter.segment_window`: ``(H, W, 3)`` uint8 in, ``(H, W, C)`` float32 out
  (HWC, like every probability map in ``refine_cli.config``).
"""

from __future__ import annotations

import abc
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from refine_cli.errors import InputError, UsageError

logger = logging.getLogger(__name__)

RESIZE_MODES = ("linear", "area")
"""How images are brought to the input size: ``linear`` = cv2 bilinear (the official MagNet
pipeline), ``area`` = cv2 area averaging when shrinking and bilinear when enlarging."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else as given.

    Raises:
        UsageError: a CUDA device was asked for but torch sees none.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: torch sees no CUDA device; use --device cpu")
    return dev


def resize_image(image: np.ndarray, size_wh: tuple[int, int], mode: str = "linear") -> np.ndarray:
    """Resize a uint8 RGB image with OpenCV.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        size_wh: ``(w, h)`` output size (OpenCV order: width first).
        mode: ``linear`` (``INTER_LINEAR``, no antialiasing: what the official MagNet
            pipeline uses) or ``area`` (``INTER_AREA`` when both axes shrink, else linear).

    Returns:
        ``(h, w, 3)`` uint8, C-contiguous (a copy even when the size is unchanged).
    """
    w, h = int(size_wh[0]), int(size_wh[1])
    if image.shape[0] == h and image.shape[1] == w:
        return np.ascontiguousarray(image).copy()
    shrink = h <= image.shape[0] and w <= image.shape[1]
    interp = cv2.INTER_AREA if mode == "area" and shrink else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=interp)


def resize_probs(probs: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of ``(N, C, h, w)`` probabilities.

    Shrinking uses antialiasing; enlarging is plain bilinear (the official pipeline's
    upsampling). The result still sums to 1 over C (a convex combination per pixel).

    Returns:
        ``(N, C, H, W)``, same dtype and device (the input itself when the size matches).
    """
    if tuple(probs.shape[-2:]) == tuple(size_hw):
        return probs
    shrink = size_hw[0] < probs.shape[-2] or size_hw[1] < probs.shape[-1]
    return F.interpolate(probs, size=tuple(size_hw), mode="bilinear", align_corners=False, antialias=shrink)


@dataclass(frozen=True)
class SegmenterSpec:
    """The input/output contract of a segmenter (what a sidecar JSON describes).

    Attributes:
        name: registry name or file path (for messages and reports).
        input_size: ``(w, h)`` px the network expects.
        classes: class names, index = class id (``C = len(classes)``, C >= 2).
        mean: per-channel RGB mean subtracted from ``image / 255``.
        std: per-channel RGB standard deviation dividing it.
        layout: ``NCHW`` or ``NHWC`` (input and output tensors).
        output: ``logits`` (softmax applied here; sigmoid for a 1-channel output) or ``probs``.
        resize: ``linear`` | ``area`` (see :data:`RESIZE_MODES`).
        extra: free-form facts for reports (weights, license ...).
    """

    name: str
    input_size: tuple[int, int]
    classes: tuple[str, ...]
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"
    output: str = "logits"
    resize: str = "area"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        w, h = self.input_size
        if w < 1 or h < 1:
            raise UsageError(f"segmenter {self.name}: input size {self.input_size} must be positive (w, h)")
        if len(self.classes) < 2:
            raise UsageError(f"segmenter {self.name}: needs at least 2 classes, got {list(self.classes)}")
        if self.layout not in ("NCHW", "NHWC"):
            raise UsageError(f"segmenter {self.name}: layout {self.layout!r} must be NCHW or NHWC")
        if self.output not in ("logits", "probs"):
            raise UsageError(f"segmenter {self.name}: output {self.output!r} must be logits or probs")
        if self.resize not in RESIZE_MODES:
            raise UsageError(f"segmenter {self.name}: resize {self.resize!r} must be one of {RESIZE_MODES}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UsageError(f"segmenter {self.name}: mean/std need 3 values each, std > 0")


class Segmenter(abc.ABC):
    """A coarse segmenter behind one interface (see the module docstring for shapes).

    Subclasses set :attr:`spec` and implement :meth:`predict` (numpy) or
    :meth:`predict_torch` (tensors on :attr:`device`); each default calls the other.
    """

    spec: SegmenterSpec

    @property
    def name(self) -> str:
        """Registry name or path."""
        return self.spec.name

    @property
    def input_size(self) -> tuple[int, int]:
        """``(w, h)`` the network takes."""
        return self.spec.input_size

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, index = class id."""
        return self.spec.classes

    @property
    def num_classes(self) -> int:
        """C."""
        return len(self.spec.classes)

    @property
    def device(self) -> torch.device:
        """Where :meth:`predict_torch` returns its tensors (CPU unless the backend runs on a GPU)."""
        return torch.device("cpu")

    def resize(self, image: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
        """Resize an image the way this segmenter's inputs are made (:func:`resize_image`)."""
        return resize_image(image, size_wh, self.spec.resize)

    def check_batch(self, images: np.ndarray) -> np.ndarray:
        """Validate a batch for :meth:`predict`.

        Args:
            images: ``(N, h, w, 3)`` or ``(h, w, 3)`` uint8 RGB at the input size.

        Returns:
            ``(N, h, w, 3)`` uint8, C-contiguous.

        Raises:
            InputError: wrong dtype, channel count or size.
        """
        arr = np.asarray(images)
        if arr.ndim == 3:
            arr = arr[None]
        w, h = self.input_size
        if arr.ndim != 4 or arr.shape[3] != 3 or arr.dtype != np.uint8:
            raise InputError(
                f"segmenter {self.name} takes (N, {h}, {w}, 3) uint8 RGB, got {arr.shape} {arr.dtype}"
            )
        if arr.shape[1:3] != (h, w):
            raise InputError(
                f"segmenter {self.name} takes {w}x{h} images, got {arr.shape[2]}x{arr.shape[1]}; "
                "resize first (Segmenter.resize or segment_window)"
            )
        return np.ascontiguousarray(arr)

    def normalized(self, images: np.ndarray) -> np.ndarray:
        """``(image / 255 - mean) / std`` per channel, float32, in the spec's layout.

        Args:
            images: ``(N, h, w, 3)`` uint8 RGB.

        Returns:
            ``(N, 3, h, w)`` (NCHW) or ``(N, h, w, 3)`` (NHWC) float32.
        """
        x: np.ndarray = images.astype(np.float32) / np.float32(255.0)
        x = (x - np.asarray(self.spec.mean, np.float32)) / np.asarray(self.spec.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if self.spec.layout == "NCHW" else x

    def to_probs(self, raw: torch.Tensor | np.ndarray, batch: int) -> torch.Tensor:
        """Turn a network output into ``(N, C, h, w)`` probabilities at the input size.

        Handles both layouts, a 1-channel output for a 2-class segmenter (sigmoid of
        logits, or the probability itself, as class 1), softmax of logits, and
        outputs at another resolution (bilinear resize to the input size).

        Args:
            raw: ``(N, C', h', w')`` (NCHW) or ``(N, h', w', C')`` (NHWC) float, tensor or array.
            batch: N, to check the output.

        Returns:
            ``(N, C, h, w)`` float32 tensor on ``raw``'s device (CPU for arrays).

        Raises:
            InputError: the output does not fit the declared classes.
        """
        t = torch.as_tensor(raw).float()
        if t.dim() == 3:  # (N, h, w): one channel without its axis
            t = t.unsqueeze(1) if self.spec.layout == "NCHW" else t.unsqueeze(-1)
        if t.dim() != 4 or t.shape[0] != batch:
            raise InputError(
                f"segmenter {self.name} returned shape {tuple(t.shape)}; expected a batch of {batch} maps"
            )
        if self.spec.layout == "NHWC":
            t = t.permute(0, 3, 1, 2)
        c = self.num_classes
        if t.shape[1] == 1 and c == 2:
            p = torch.sigmoid(t) if self.spec.output == "logits" else t.clamp(0.0, 1.0)
            t = torch.cat([1.0 - p, p], dim=1)
        elif t.shape[1] == c:
            t = torch.softmax(t, dim=1) if self.spec.output == "logits" else t
        else:
            raise InputError(
                f"segmenter {self.name} returned {t.shape[1]} channels but declares {c} classes "
                f"({', '.join(self.classes)}); fix 'classes' in its sidecar JSON"
            )
        w, h = self.input_size
        return resize_probs(t.contiguous(), (h, w))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities of images at the input size.

        Args:
            images: ``(N, h, w, 3)`` uint8 RGB, ``(w, h) == input_size``.

        Returns:
            ``(N, C, h, w)`` float32 in ``[0, 1]``, summing to 1 over C.
        """
        batch = self.check_batch(images)
        return self.predict_torch(torch.from_numpy(batch)).float().cpu().numpy()

    def predict_torch(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`predict` for tensors.

        Args:
            images: ``(N, h, w, 3)`` uint8 RGB tensor (any device).

        Returns:
            ``(N, C, h, w)`` float32 tensor on :attr:`device`.
        """
        if type(self).predict is Segmenter.predict:
            raise NotImplementedError(f"{type(self).__name__} implements neither predict nor predict_torch")
        probs = self.predict(images.detach().cpu().numpy())
        return torch.from_numpy(probs).to(self.device)

    def segment_window(self, image: np.ndarray) -> np.ndarray:
        """Segment one image window of any size.

        The window is resized to the input size (:meth:`resize`), segmented, and the
        probabilities are resized back bilinearly (``align_corners=False``).

        Args:
            image: ``(H, W, 3)`` uint8 RGB.

        Returns:
            ``(H, W, C)`` float32 probabilities in ``[0, 1]``.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"segment_window takes (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        probs = self.predict_torch(torch.from_numpy(self.resize(image, self.input_size))[None])
        full = resize_probs(probs.float(), (image.shape[0], image.shape[1]))
        return full[0].permute(1, 2, 0).contiguous().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        """Facts for reports."""
        return {
            "segmenter": self.name, "input_size": list(self.input_size), "classes": list(self.classes),
            "device": str(self.device), **self.spec.extra,
        }


def check_class_names(classes: Sequence[object], where: str) -> tuple[str, ...]:
    """Validate a list of class names (strings, at least 2, no duplicates)."""
    names = tuple(str(c) for c in classes)
    if len(names) < 2:
        raise InputError(f"{where}: 'classes' needs at least 2 names, got {list(classes)}")
    if len(set(names)) != len(names):
        raise InputError(f"{where}: 'classes' has duplicate names {list(names)}")
    return names


SIDECAR_KEYS = ("input_size", "classes", "mean", "std", "layout", "output", "resize", "name")
"""Keys a sidecar JSON may hold (``input_size`` and ``classes`` are required)."""


def sidecar_candidates(model_path: str | Path) -> list[Path]:
    """Where the sidecar JSON of a model file may be: ``<file>.json``, then ``<stem>.json``.

    ``seg.onnx`` -> ``seg.onnx.json`` (preferred), ``seg.json``.
    """
    p = Path(model_path)
    return [p.with_name(p.name + ".json"), p.with_suffix(".json")]


def read_sidecar(model_path: str | Path, *, default_resize: str = "area") -> SegmenterSpec:
    """Read the sidecar JSON describing a model file's input and output.

    Format::

        {"input_size": [w, h],                  required, px
         "classes": ["background", "person"],   required, index = class id
         "mean": [0.485, 0.456, 0.406],         RGB, subtracted from image / 255 (default 0)
         "std": [0.229, 0.224, 0.225],          RGB (default 1)
         "layout": "NCHW" | "NHWC",             input and output tensors (default NCHW)
         "output": "logits" | "probs",          default logits (softmax, or sigmoid for 1 channel)
         "resize": "area" | "linear"}           how images reach the input size (default area)

    Args:
        model_path: the model file (``.onnx``, ``.pt`` ...).
        default_resize: ``resize`` when the sidecar does not say.

    Returns:
        The spec, named after the model path.

    Raises:
        InputError: no sidecar, unreadable JSON, or a missing / wrong field (the message
            names the sidecar path and the field).
    """
    candidates = sidecar_candidates(model_path)
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise InputError(
            f"segmenter {model_path} needs a sidecar JSON at {candidates[0]} describing its input and "
            'classes, e.g. {"input_size": [512, 512], "classes": ["background", "person"], '
            '"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "layout": "NCHW", '
            '"output": "logits"}'
        )
    try:
        meta = json.loads(found.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(
            f"sidecar {found} of segmenter {model_path} is not valid JSON ({exc}); fix it"
        ) from exc
    if not isinstance(meta, dict):
        raise InputError(f"sidecar {found} must hold a JSON object, got {type(meta).__name__}")
    unknown = sorted(set(meta) - set(SIDECAR_KEYS))
    if unknown:
        raise InputError(f"sidecar {found}: unknown keys {unknown}; allowed: {', '.join(SIDECAR_KEYS)}")
    for key in ("input_size", "classes"):
        if key not in meta:
            raise InputError(f"sidecar {found}: missing {key!r}")
    size = meta["input_size"]
    if (not isinstance(size, list) or len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size)):
        raise InputError(f"sidecar {found}: 'input_size' must be [width, height] in px, got {size!r}")
    if not isinstance(meta["classes"], list):
        raise InputError(f"sidecar {found}: 'classes' must be a list of names, got {meta['classes']!r}")

    def triple(key: str, default: float) -> tuple[float, float, float]:
        value = meta.get(key, [default] * 3)
        numbers = isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)
        if not numbers or len(value) != 3:
            raise InputError(f"sidecar {found}: {key!r} must be 3 numbers (R, G, B), got {value!r}")
        return (float(value[0]), float(value[1]), float(value[2]))

    try:
        return SegmenterSpec(
            name=str(meta.get("name", model_path)), input_size=(size[0], size[1]),
            classes=check_class_names(meta["classes"], str(found)), mean=triple("mean", 0.0),
            std=triple("std", 1.0), layout=str(meta.get("layout", "NCHW")),
            output=str(meta.get("output", "logits")), resize=str(meta.get("resize", default_resize)),
            extra={"path": str(model_path), "sidecar": str(found)},
        )
    except UsageError as exc:
        raise InputError(f"sidecar {found}: {exc}") from exc
