"""MagNet's refinement module, plus the pieces its backbones share.

Re-implemented from a written description of the architecture (the layer layout is
in :class:`RefinementMagNet`); no code from the official (AGPL-3.0) repository.
Parameter names and state_dict order equal the official ones (60 entries for any C),
so released checkpoints load with ``strict=True``.

The refinement module never sees the image: it maps two C-class probability maps
of the same size to C raw logits. In the official ``test.py`` the first argument
is the backbone's softmax on the current-scale patch (O) and the second the
accumulated prediction cropped to that patch (Y); ``train.py`` passes them the
other way round (the official test order dates from a 2021 fix, and the released
weights' published scores were measured with it). :class:`RefinementMagNet`
concatenates in call order, so the caller decides.

Also here, because all three MagNet networks use them:

* :class:`Bottleneck`: the ResNet bottleneck with the stride on the 3x3 conv;
* :class:`ImageBackbone`: base class of the segmentation backbones, owning their
  ImageNet input normalisation (non-persistent buffers, so state_dicts are unchanged).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from refine_cli.models.runtime import runs_here

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel RGB mean of the ImageNet normalisation (inputs in [0, 1])."""

IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel RGB standard deviation of the ImageNet normalisation."""

REFINEMENT_BN_MOMENTUM = 0.01
"""BatchNorm momentum of the official refinement module (only matters for training)."""


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """3x3 convolution with zero padding 1 (output size ``ceil(n / stride)``)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=bias)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """1x1 convolution."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=bias)


class Bottleneck(nn.Module):
    """ResNet bottleneck, expansion 4, stride on the 3x3 conv ("v1.5").

    ``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))) + shortcut(x))`` where
    the shortcut is the identity, or ``downsample`` (1x1 conv with the block's
    stride + BN) when the stride is not 1 or the channel count changes.

    Args:
        in_ch: input channels.
        width: bottleneck width p; the output has ``4 * p`` channels.
        stride: stride of ``conv2`` and of the shortcut.
        bn_momentum: BatchNorm momentum (training only).
    """

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, bn_momentum: float = 0.1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width, momentum=bn_momentum)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width, momentum=bn_momentum)
        self.conv3 = conv1x1(width, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch, momentum=bn_momentum)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_ch, H, W)`` -> ``(N, 4 * width, ceil(H / s), ceil(W / s))``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        y: torch.Tensor = self.relu(out + shortcut)
        return y


def make_layer(
    in_ch: int, width: int, blocks: int, stride: int = 1, bn_momentum: float = 0.1
) -> nn.Sequential:
    """``blocks`` bottlenecks; only block 0 changes the stride and channel count."""
    layers = [Bottleneck(in_ch, width, stride, bn_momentum)]
    layers += [Bottleneck(width * Bottleneck.expansion, width, 1, bn_momentum) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ImageBackbone(nn.Module):
    """Base class of the segmentation backbones: owns the ImageNet input normalisation.

    ``pixel_mean`` and ``pixel_std`` are non-persistent float32 buffers of shape
    ``(1, 3, 1, 1)``: they follow ``.to(device)`` but never appear in the state_dict.
    """

    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor
    runtime: Any = None
    """``None`` (torch), or a :class:`~refine_cli.models.runtime.ModuleRuntime` with the ``segment``
    graph, which :meth:`logits` uses for inference on the CPU in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        """Device of the model (that of its normalisation buffers)."""
        return self.pixel_mean.device

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """Turn an RGB image into the network input, as the official pipeline does.

        ``uint8`` values are divided by 255; floating values are taken to be in
        ``[0, 1]`` already. Then ``(v - mean_c) / std_c`` per channel. For a uint8
        image this equals torchvision ``ToTensor`` + ``Normalize`` bit for bit.

        Args:
            image: ``(3, H, W)`` or ``(N, 3, H, W)`` RGB (channels first), uint8 in
                ``[0, 255]`` or float in ``[0, 1]``; any device.

        Returns:
            ``(N, 3, H, W)`` in the buffers' dtype (float32 unless the model was
            cast) on the model's device; roughly in ``[-2.2, 2.7]``.
        """
        if image.dim() == 3:
            image = image.unsqueeze(0)
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(
                f"expected an RGB image (3, H, W) or (N, 3, H, W), got shape {tuple(image.shape)}"
            )
        x = image.to(self.pixel_mean.device)
        if x.dtype == torch.uint8:
            x = x.to(self.pixel_mean.dtype) / 255
        elif x.is_floating_point():
            x = x.to(self.pixel_mean.dtype)
        else:
            raise ValueError(f"expected a uint8 or floating image, got {image.dtype}")
        return (x - self.pixel_mean) / self.pixel_std

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The inference forward: ``(N, 3, H, W)`` normalised image -> ``(N, C, H, W)`` logits.

        Runs in the :attr:`runtime` when there is one and ``x`` is a CPU float32 tensor outside
        autograd; otherwise ``self(x)``.
        """
        if self.runtime is not None and runs_here(x):
            out: torch.Tensor = self.runtime.run("segment", x)[0]
            return out
        result: torch.Tensor = self(x)
        return result


class RefinementMagNet(nn.Module):
    """MagNet's refinement module (official ``RefinementMagNet(C, use_bn=True)``).

    Layers (all convs without bias, stride 1, zero padding; BN eps 1e-5):
    ``bn0`` on the 2C concatenated inputs (no activation) -> ``conv1`` 3x3 2C->64,
    ``bn1``, ReLU -> ``conv2`` 3x3 64->64, ``bn2``, ReLU -> ``residual``: two
    bottlenecks (width 32, output 128; block 0 has a 1x1 64->128 shortcut) ->
    ``seg_conv`` 1x1 128->C. Receptive field 9x9 px: a 4-px halo makes tiling exact.
    ``1284 * C + 79104`` parameters, 60 state_dict entries.

    Args:
        n_classes: C, the number of classes of both inputs and of the output (>= 2).

    Attributes:
        runtime: ``None`` (torch), or a :class:`~refine_cli.models.runtime.ModuleRuntime` with the
            ``refine`` graph that runs the inference forwards (CPU, float32, no autograd).
    """

    runtime: Any = None

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"the refinement module needs at least 2 classes, got {n_classes}")
        self.n_classes = n_classes
        m = REFINEMENT_BN_MOMENTUM
        self.bn0 = nn.BatchNorm2d(2 * n_classes, momentum=m)
        self.conv1 = conv3x3(2 * n_classes, 64)
        self.bn1 = nn.BatchNorm2d(64, momentum=m)
        self.conv2 = conv3x3(64, 64)
        self.bn2 = nn.BatchNorm2d(64, momentum=m)
        self.relu = nn.ReLU(inplace=True)
        self.residual = make_layer(64, 32, blocks=2, bn_momentum=m)
        self.seg_conv = conv1x1(128, n_classes)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """Refine: concatenate ``[first, second]`` on the channel axis and map to logits.

        Use the official test order ``forward(O, Y_crop)`` for released weights (their
        published scores were measured with it; the official training script passes
        ``(Y_crop, O)``). Call ``eval()`` first: train-mode BatchNorm changes the output.

        Args:
            first: ``(N, C, h, w)`` float class probabilities in ``[0, 1]`` (O in ``test.py``).
            second: ``(N, C, h, w)`` float class probabilities (the Y crop in ``test.py``).

        Returns:
            ``(N, C, h, w)`` raw logits (apply softmax over dim 1 for probabilities).
        """
        if first.shape != second.shape or first.dim() != 4 or first.shape[1] != self.n_classes:
            raise ValueError(
                f"expected two (N, {self.n_classes}, h, w) probability maps of equal shape, "
                f"got {tuple(first.shape)} and {tuple(second.shape)}"
            )
        if self.runtime is not None and runs_here(first):
            out: torch.Tensor = self.runtime.run("refine", first, second.to(first.dtype))[0]
            return out
        x = self.bn0(torch.cat([first, second], dim=1))
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        logits: torch.Tensor = self.seg_conv(self.residual(x))
        return logits


def build_refinement_magnet(n_classes: int) -> RefinementMagNet:
    """The official refinement module for C classes: 19 (Cityscapes), 7 (DeepGlobe), 2 (binary).

    Returns:
        A randomly initialised module in eval mode; load a checkpoint with ``strict=True``.
    """
    return RefinementMagNet(n_classes).eval()
