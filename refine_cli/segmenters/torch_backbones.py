"""The official MagNet backbones as segmenters (HRNetV2-W18-Small-v2+OCR, ResNet-50 FPN).

Pre- and post-processing follow the official test pipeline: images reach the input
size by OpenCV bilinear resizing of uint8 RGB (done by the caller or
:meth:`Segmenter.segment_window`), are scaled to ``[0, 1]`` and normalised with the
ImageNet mean/std (the model's own buffers), and the logits go through a softmax over
the classes. No official code.

| name | network (``refine_cli.models``) | input (w x h) | classes |
| --- | --- | --- | --- |
| ``magnet-cityscapes-hrnet`` | ``hrnet_ocr.build_hrnet18_ocr(19)`` | 256 x 128 | Cityscapes train ids |
| ``magnet-deepglobe-fpn`` | ``resnet_fpn.build_resnet50_fpn(7)`` | 508 x 508 | DeepGlobe land cover |
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from refine_cli.models.magnet import IMAGENET_MEAN, IMAGENET_STD, ImageBackbone
from refine_cli.segmenters.base import Segmenter, SegmenterSpec, resolve_device

logger = logging.getLogger(__name__)

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
"""The 19 Cityscapes train ids, in id order (0 = road)."""

DEEPGLOBE_CLASSES = ("unknown", "urban", "agriculture", "rangeland", "forest", "water", "barren")
"""DeepGlobe land-cover classes in MagNet's label order (0 = unknown/black ... 6 = barren/white)."""


@dataclass(frozen=True)
class BackboneInfo:
    """How to build one official backbone segmenter.

    Attributes:
        name: segmenter name, also the weights-registry name of its checkpoint.
        build: ``build(num_classes) -> ImageBackbone`` (random weights, eval mode).
        input_size: ``(w, h)``.
        classes: class names.
        description: one line for listings.
    """

    name: str
    build: Callable[[int], ImageBackbone]
    input_size: tuple[int, int]
    classes: tuple[str, ...]
    description: str


def _hrnet(num_classes: int) -> ImageBackbone:
    from refine_cli.models.hrnet_ocr import build_hrnet18_ocr

    return build_hrnet18_ocr(num_classes)


def _fpn(num_classes: int) -> ImageBackbone:
    from refine_cli.models.resnet_fpn import build_resnet50_fpn

    return build_resnet50_fpn(num_classes)


BACKBONES: dict[str, BackboneInfo] = {
    "magnet-cityscapes-hrnet": BackboneInfo(
        "magnet-cityscapes-hrnet", _hrnet, (256, 128), CITYSCAPES_CLASSES,
        "MagNet's Cityscapes HRNetV2-W18-Small-v2+OCR, 19 classes, input 256x128",
    ),
    "magnet-deepglobe-fpn": BackboneInfo(
        "magnet-deepglobe-fpn", _fpn, (508, 508), DEEPGLOBE_CLASSES,
        "MagNet's DeepGlobe ResNet-50 FPN, 7 land-cover classes, input 508x508",
    ),
}
"""The official backbones by segmenter name."""

BACKBONE_STRIP_PREFIXES = ("module.", "model.")
"""Key prefixes removed by name when loading a backbone checkpoint (``module.``, ``model.``)."""


class TorchBackboneSegmenter(Segmenter):
    """A PyTorch :class:`~refine_cli.models.magnet.ImageBackbone` as a segmenter.

    Args:
        model: the network with its weights loaded (moved to ``device``, set to eval).
        input_size: ``(w, h)``.
        classes: class names (``len == model.num_classes``).
        name: segmenter name.
        device: ``auto`` | ``cpu`` | ``cuda[:N]``.
        extra: facts for reports (weights name, sha256 ...).
    """

    def __init__(
        self,
        model: ImageBackbone,
        input_size: tuple[int, int],
        classes: tuple[str, ...],
        name: str,
        device: str | torch.device = "auto",
        extra: dict[str, Any] | None = None,
    ) -> None:
        n = getattr(model, "num_classes", len(classes))
        if n != len(classes):
            raise ValueError(f"{name}: model has {n} classes but {len(classes)} names were given")
        self.spec = SegmenterSpec(
            name=name, input_size=input_size, classes=classes, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            layout="NCHW", output="logits", resize="linear", extra=dict(extra or {}),
        )
        self.model = model.to(resolve_device(device)).eval()

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return self.model.device

    @torch.inference_mode()
    def predict_torch(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax of the backbone on uint8 images at the input size.

        Args:
            images: ``(N, h, w, 3)`` uint8 RGB tensor, ``(w, h) == input_size``.

        Returns:
            ``(N, C, h, w)`` float32 on :attr:`device`.
        """
        if images.dim() == 3:
            images = images.unsqueeze(0)
        w, h = self.input_size
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (h, w, 3):
            raise ValueError(
                f"{self.name} takes (N, {h}, {w}, 3) uint8, got {tuple(images.shape)} {images.dtype}"
            )
        x = self.model.normalize(images.to(self.device).permute(0, 3, 1, 2))
        return torch.softmax(self.model.logits(x).float(), dim=1)

    def predict(self, images: Any) -> Any:
        """See :meth:`Segmenter.predict` (numpy in, numpy out)."""
        batch = self.check_batch(images)
        return self.predict_torch(torch.from_numpy(batch)).cpu().numpy()


def load_backbone_segmenter(
    name: str, device: str | torch.device = "auto", *, weights: str | None = None, download: bool = False
) -> TorchBackboneSegmenter:
    """Build an official backbone and load its checkpoint strictly.

    The released files carry the backbone trainer's ``model.`` prefix (its
    ``FullModel(model, loss)`` wrapper) and may hold ``loss.*`` buffers (Cityscapes'
    class weights); both are handled by name: the prefixes of
    :data:`BACKBONE_STRIP_PREFIXES` are removed and ``loss.*`` keys dropped, then the
    load is strict.

    Args:
        name: a key of :data:`BACKBONES`.
        device: torch device string.
        weights: checkpoint file or registry name (default: the registry record ``name``).
        download: fetch a registry checkpoint that is not cached yet.

    Raises:
        WeightsError: checkpoint missing, or it does not fit the network (names the keys).
    """
    from refine_cli import weights as registry

    info = BACKBONES[name]
    model = info.build(len(info.classes))
    resolved = registry.resolve_weights(weights or name, download=download)
    state = registry.load_state_dict(
        resolved.path, model, strip_prefixes=BACKBONE_STRIP_PREFIXES, drop_prefixes=("loss.",)
    )
    model.load_state_dict(state, strict=True)
    extra = {"weights": resolved.name or str(resolved.path)}
    if resolved.sha256:
        extra["weights_sha256"] = resolved.sha256
    logger.info("loaded %s from %s", name, resolved.path)
    return TorchBackboneSegmenter(model, info.input_size, info.classes, name, device, extra)

