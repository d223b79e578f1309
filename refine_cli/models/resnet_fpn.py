"""ResNet-50 + FPN: MagNet's DeepGlobe backbone.

Re-implemented from a written description of the architecture (no official
code). Parameter names and state_dict order equal the official ``ResnetFPN(7)``
(its state_dict manifest: 344 entries, 28 064 839
parameters); the trunk's names equal torchvision's ``resnet50`` under the
``resnet_backbone.`` prefix. Nothing is downloaded: the official constructor's
ImageNet initialisation is replaced by the checkpoint anyway.

Structure: ResNet-50 (stride on the 3x3 convs) gives c2..c5 at strides 4..32;
1x1 lateral convs and a bilinear (``align_corners=False``) top-down pathway give
p5..p2; two 3x3 convs per level smooth them (256 -> 256 -> 128; ``smooth1_*`` is
p5, ``smooth4_*`` p2); the four are resized to p2's size, concatenated as
``[p5, p4, p3, p2]`` (512 ch) and classified by a 3x3 conv; the stride-4 logits
are resized to the input size. The head has biases but no BN and no ReLU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from refine_cli.models.magnet import ImageBackbone, make_layer
from refine_cli.models.runtime import traceable_size

RESNET50_LAYERS = (3, 4, 6, 3)
"""Bottlenecks per layer of ResNet-50."""


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=False`` to an explicit ``(H, W)``."""
    return F.interpolate(x, size=traceable_size(size), mode="bilinear", align_corners=False)


class ResNetTrunk(nn.Module):
    """ResNet with bottlenecks and no classifier; returns c2..c5.

    Args:
        layers: bottlenecks per layer (``(3, 4, 6, 3)`` for ResNet-50).
    """

    def __init__(self, layers: Sequence[int] = RESNET50_LAYERS) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = make_layer(64, 64, layers[0], stride=1)
        self.layer2 = make_layer(256, 128, layers[1], stride=2)
        self.layer3 = make_layer(512, 256, layers[2], stride=2)
        self.layer4 = make_layer(1024, 512, layers[3], stride=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(N, 3, H, W)`` -> c2 (256 ch), c3 (512), c4 (1024), c5 (2048).

        Each level halves the size with ``ceil(n / 2)``: c2 is
        ``ceil(ceil(H / 2) / 2)`` high, and so on.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return c2, c3, c4, c5


class ResNetFPN(ImageBackbone):
    """ResNet-50 FPN segmenter (official ``ResnetFPN``).

    Inputs are normalised images ``(N, 3, H, W)`` float32 (see :meth:`normalize`);
    any H, W >= 1 work. Outputs are logits at the input resolution. No softmax inside.

    Args:
        num_classes: K, number of classes (7 for DeepGlobe).
    """

    def __init__(self, num_classes: int = 7) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.resnet_backbone = ResNetTrunk(RESNET50_LAYERS)
        self.toplayer = nn.Conv2d(2048, 256, kernel_size=1)
        self.latlayer1 = nn.Conv2d(1024, 256, kernel_size=1)
        self.latlayer2 = nn.Conv2d(512, 256, kernel_size=1)
        self.latlayer3 = nn.Conv2d(256, 256, kernel_size=1)
        # Registration order decides the state_dict order: all *_1 convs, then all *_2.
        self.smooth1_1 = nn.Conv2d(256, 256, kernel_size=3, padding=1)
        self.smooth2_1 = nn.Conv2d(256, 256, kernel_size=3, padding=1)
        self.smooth3_1 = nn.Conv2d(256, 256, kernel_size=3, padding=1)
        self.smooth4_1 = nn.Conv2d(256, 256, kernel_size=3, padding=1)
        self.smooth1_2 = nn.Conv2d(256, 128, kernel_size=3, padding=1)
        self.smooth2_2 = nn.Conv2d(256, 128, kernel_size=3, padding=1)
        self.smooth3_2 = nn.Conv2d(256, 128, kernel_size=3, padding=1)
        self.smooth4_2 = nn.Conv2d(256, 128, kernel_size=3, padding=1)
        self.classify = nn.Conv2d(512, num_classes, kernel_size=3, padding=1)

    def logits_stride4(self, x: torch.Tensor) -> torch.Tensor:
        """Classifier output before the final resize.

        Args:
            x: ``(N, 3, H, W)`` float32 normalised image.

        Returns:
            ``(N, K, ceil(ceil(H/2)/2), ceil(ceil(W/2)/2))`` logits (p2's size).
        """
        c2, c3, c4, c5 = self.resnet_backbone(x)
        p5 = self.toplayer(c5)
        p4 = _resize(p5, c4.shape[-2:]) + self.latlayer1(c4)
        p3 = _resize(p4, c3.shape[-2:]) + self.latlayer2(c3)
        p2 = _resize(p3, c2.shape[-2:]) + self.latlayer3(c2)
        p5 = self.smooth1_2(self.smooth1_1(p5))
        p4 = self.smooth2_2(self.smooth2_1(p4))
        p3 = self.smooth3_2(self.smooth3_1(p3))
        p2 = self.smooth4_2(self.smooth4_1(p2))
        size = p2.shape[-2:]
        logits: torch.Tensor = self.classify(
            torch.cat([_resize(p5, size), _resize(p4, size), _resize(p3, size), p2], dim=1)
        )
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment a normalised image.

        Args:
            x: ``(N, 3, H, W)`` float32 normalised image.

        Returns:
            ``(N, K, H, W)`` logits (stride-4 logits resized bilinearly, ``align_corners=False``).
        """
        return _resize(self.logits_stride4(x), x.shape[-2:])


def build_resnet50_fpn(num_classes: int = 7) -> ResNetFPN:
    """The official DeepGlobe backbone (``--model fpn``), input 508x508.

    Returns:
        A randomly initialised network in eval mode; load a checkpoint strictly.
    """
    return ResNetFPN(num_classes).eval()
