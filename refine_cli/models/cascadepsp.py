"""CascadePSP refinement module (Cheng et al., CVPR 2020) as plain ``nn.Module``s.

One weight-shared network refines an image + coarse mask pair. A forward call runs the
encoder and PSP module up to three times ("cascade" iterations), feeding the previous
iteration's upsampled logits back as extra input channels::

    iteration 1 (if inter_s8 is None):  enc([im, seg, seg, seg])      -> OS8 logit
    iteration 2 (if inter_s4 is None):  enc([im, seg, T8, T8])        -> OS8, OS4 logits
    iteration 3 (always):               enc([im, seg, T8_2, T4])      -> OS8, OS4, OS1 logits

``T*`` are ``tanh`` of the previous iteration's logits, bilinearly upsampled to the input
size, or the ``inter_*`` maps given by the caller (used as they are).

:class:`CascadeRefinementModule` holds the PSP module, decoder and heads and takes the
encoder and channel widths as parameters, so smaller variants reuse the cascade logic;
:func:`cascadepsp_official` builds the configuration of the official checkpoint
(dilated ResNet-50 with a 6-channel stem; parameter names and shapes equal to the
official ``state_dict``: 426 entries, 67,683,433 parameters).

Conventions: tensors are NCHW float32 unless stated; images are RGB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refine_cli.models.runtime import runs_here

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel mean (RGB) of the image normalisation, in [0, 1] units."""

IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel standard deviation (RGB) of the image normalisation."""


def _up(x: Tensor, factor: int) -> Tensor:
    """Bilinear upsampling by an integer factor (``align_corners=False``, by scale factor)."""
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class Bottleneck(nn.Module):
    """ResNet bottleneck block: 1x1 -> 3x3 (stride, dilation) -> 1x1 (x4 channels) + shortcut.

    Parameter names follow torchvision (``conv1``/``bn1`` ... ``downsample.0/1``).
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """``(N, inplanes, H, W)`` -> ``(N, 4*planes, H/stride, W/stride)``."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        y: Tensor = self.relu(out + shortcut)
        return y


class DilatedResNet(nn.Module):
    """ResNet with output stride 8 (``layer3``/``layer4`` dilated instead of strided).

    Quirk of the official network: in ``layer3`` (dilation 2) and ``layer4`` (dilation 4)
    only blocks 2..n are dilated; the first block keeps dilation 1 and its downsample
    conv has stride 1.

    Attributes:
        out_channels: channels of ``(f, f_1, f_2)`` returned by :meth:`forward`.
    """

    def __init__(self, layers: tuple[int, int, int, int] = (3, 4, 6, 3), in_channels: int = 6) -> None:
        super().__init__()
        self._inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], dilation=2)
        self.layer4 = self._make_layer(512, layers[3], dilation=4)
        self.out_channels = (512 * Bottleneck.expansion, 64, 64 * Bottleneck.expansion)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self._inplanes != out:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )
        modules = [Bottleneck(self._inplanes, planes, stride, 1, downsample)]
        self._inplanes = out
        modules += [Bottleneck(out, planes, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encode a 6-channel input.

        Args:
            x: ``(N, 6, H, W)`` float32, H and W multiples of 8.

        Returns:
            ``f`` ``(N, 2048, H/8, W/8)`` (``layer4``), ``f_1`` ``(N, 64, H/2, W/2)`` (raw
            ``conv1`` output, before BN and ReLU), ``f_2`` ``(N, 256, H/4, W/4)`` (``layer1``).
        """
        f_1 = self.conv1(x)
        x = self.maxpool(self.relu(self.bn1(f_1)))
        f_2 = self.layer1(x)
        f = self.layer4(self.layer3(self.layer2(f_2)))
        return f, f_1, f_2


class PSPModule(nn.Module):
    """Pyramid pooling: pooled 1x1 convs at several grid sizes, concatenated with the input.

    ``out = relu(bottleneck(cat(up(stage_1(f)), ..., up(stage_k(f)), f)))``; the stages
    have no BN and no ReLU; ``up`` is bilinear (``align_corners=False``) to the size of ``f``.
    """

    def __init__(self, in_channels: int, out_channels: int, sizes: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Conv2d(in_channels, in_channels, 1, bias=False))
            for s in sizes
        )
        self.bottleneck = nn.Conv2d(in_channels * (len(sizes) + 1), out_channels, 1)
        self.relu = nn.ReLU()

    def forward(self, f: Tensor) -> Tensor:
        """``(N, C_in, h, w)`` -> ``(N, C_out, h, w)``."""
        size = f.shape[-2:]
        priors = [
            F.interpolate(stage(f), size=size, mode="bilinear", align_corners=False) for stage in self.stages
        ]
        y: Tensor = self.relu(self.bottleneck(torch.cat([*priors, f], 1)))
        return y


def _pre_act_convs(in_channels: int, out_channels: int) -> nn.Sequential:
    """BN -> ReLU -> 3x3 conv -> BN -> ReLU -> 3x3 conv (indices 0, 2, 3, 5 hold parameters)."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(),
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
    )


class UpBlock(nn.Module):
    """x2 upsampling with a skip connection and two pre-activation residual units.

    ``x' = up2(x)``; ``p = conv(cat(x', skip)) + shortcut(x')``; returns ``p + conv2(p)``
    (no final ReLU). The official name of this block is ``PSPUpsample``.
    """

    def __init__(self, x_channels: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = _pre_act_convs(in_channels, out_channels)
        self.conv2 = _pre_act_convs(out_channels, out_channels)
        self.shortcut = nn.Conv2d(x_channels, out_channels, 1)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        """``x`` ``(N, x_ch, h, w)`` and ``skip`` ``(N, in_ch - x_ch, 2h, 2w)`` -> ``(N, out_ch, 2h, 2w)``."""
        x = _up(x, 2)
        p: Tensor = self.conv(torch.cat([x, skip], 1)) + self.shortcut(x)
        out: Tensor = p + self.conv2(p)
        return out


@dataclass(frozen=True)
class CascadeWidths:
    """Channel widths of a cascade refinement module.

    Attributes:
        feat8: channels of the encoder's ``f`` (1/8 resolution).
        feat2: channels of the encoder's ``f_1`` (1/2).
        feat4: channels of the encoder's ``f_2`` (1/4).
        psp: output channels of the PSP bottleneck.
        up1: output channels of ``up_1`` (1/4).
        up2: output channels of ``up_2`` (1/2).
        up3: output channels of ``up_3`` (1/1).
        head: hidden channels of the 1x1 heads.
        psp_sizes: pooled grid sizes of the PSP stages.
    """

    feat8: int = 2048
    feat2: int = 64
    feat4: int = 256
    psp: int = 1024
    up1: int = 512
    up2: int = 256
    up3: int = 32
    head: int = 32
    psp_sizes: tuple[int, ...] = (1, 2, 3, 6)


class CascadeRefinementModule(nn.Module):
    """The CascadePSP refinement module around any encoder.

    The encoder takes ``(N, 6, H, W)`` and returns ``(f, f_1, f_2)`` at 1/8, 1/2 and 1/4
    of the input with ``widths.feat8``, ``widths.feat2`` and ``widths.feat4`` channels.

    The module owns its input normalisation (:meth:`normalize_image`, :meth:`mask_to_seg`,
    :meth:`prob_to_feedback`); mean and std are non-persistent buffers, so they follow
    ``.to(device)`` but are not part of the ``state_dict``.

    Attributes:
        pad_mode: how inference pads inputs to a multiple of 8 (see
            ``refine_cli.refiners.cascadepsp.safe_forward``): ``official`` (mean colour and
            background, as the official code: the golden references need it) or ``replicate``
            (edge pixels repeated). Set per run by ``--cascade-pad``.
        working_size: the default working size L of inference (``--cascade-size``): 900, the paper's.
        edge_snap: whether ``--method cascade`` ends with the edge snap by default
            (``--cascade-snap auto``): off, the official procedure's output as it is.
        runtime: ``None`` (torch), or a :class:`~refine_cli.models.runtime.CascadeRuntime` that runs
            inference calls (no autograd, CPU float32, no ``inter_s4``) in ONNX Runtime or OpenVINO;
            it then returns only the ``pred_224``, ``pred_28_3`` and ``pred_56_2`` entries.
    """

    pixel_mean: Tensor
    pixel_std: Tensor
    pad_mode: str = "official"
    working_size: int = 900
    edge_snap: bool = False
    runtime: Any = None

    def __init__(self, encoder: nn.Module, widths: CascadeWidths | None = None) -> None:
        super().__init__()
        w = widths or CascadeWidths()
        self.widths = w
        self.feats = encoder
        self.psp = PSPModule(w.feat8, w.psp, w.psp_sizes)
        self.up_1 = UpBlock(w.psp, w.psp + w.feat4, w.up1)
        self.up_2 = UpBlock(w.up1, w.up1 + w.feat2, w.up2)
        self.up_3 = UpBlock(w.up2, w.up2 + 3, w.up3)
        self.final_28 = nn.Sequential(nn.Conv2d(w.psp, w.head, 1), nn.ReLU(), nn.Conv2d(w.head, 1, 1))
        self.final_56 = nn.Sequential(nn.Conv2d(w.up1, w.head, 1), nn.ReLU(), nn.Conv2d(w.head, 1, 1))
        self.final_11 = nn.Conv2d(w.up3 + 3, w.head, 1)
        self.final_21 = nn.Conv2d(w.head, 1, 1)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        """Device of the module's buffers and parameters."""
        return self.pixel_mean.device

    def normalize_image(self, image: Tensor, channels: slice = slice(None)) -> Tensor:
        """Turn an RGB image into the network's image input.

        ``v = u8 / 255`` (or the float as given), then ``(v - mean_c) / std_c``, all in float32:
        bit-identical to torchvision ``ToTensor`` + ``Normalize``. Computed on the input's device.

        Args:
            image: ``(N, C, H, W)`` uint8 in 0..255, or float in [0, 1]; the RGB channels
                selected by ``channels`` (all three by default, ``slice(c, c + 1)`` for one).
            channels: which of the R, G, B statistics apply to ``image``'s channels.

        Returns:
            ``(N, C, H, W)`` float32, contiguous, about [-2.2, 2.7].
        """
        # one new buffer, then in-place steps (same float32 results as the out-of-place formula)
        x = image.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        if image.dtype == torch.uint8:
            x.div_(255)
        mean = self.pixel_mean[:, channels].to(x.device)
        return x.sub_(mean).div_(self.pixel_std[:, channels].to(x.device))

    @staticmethod
    def mask_to_seg(mask: Tensor) -> Tensor:
        """Binarise a coarse mask into the network's ``seg`` input (on the input's device).

        Foreground is ``u8 > 127`` for uint8, ``p >= 0.5`` for float probabilities (the same
        pixels for ``p = u8 / 255``), ``True`` for bool.

        Args:
            mask: ``(N, 1, H, W)`` uint8 0..255, float in [0, 1] or bool.

        Returns:
            ``(N, 1, H, W)`` float32 in {-1, +1}.
        """
        if mask.dtype == torch.bool:
            fg = mask
        elif mask.dtype == torch.uint8:
            fg = mask > 127
        else:
            fg = mask >= 0.5
        return fg.to(torch.float32).mul_(2).sub_(1)

    @staticmethod
    def prob_to_feedback(prob: Tensor) -> Tensor:
        """Map a probability to a feedback map for ``inter_s8``/``inter_s4``: ``2p - 1``.

        Args:
            prob: any shape, float32 in [0, 1].

        Returns:
            Same shape, float32 in [-1, 1].
        """
        return prob * 2 - 1

    def _encode(self, im: Tensor, seg: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        f, f_1, f_2 = self.feats(torch.cat([im, seg, a, b], 1))
        return self.psp(f), f_1, f_2

    def forward(
        self, im: Tensor, seg: Tensor, inter_s8: Tensor | None = None, inter_s4: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Run the cascade.

        Args:
            im: ``(N, 3, H, W)`` float32 normalised image (:meth:`normalize_image`); H, W multiples of 8.
            seg: ``(N, 1, H, W)`` float32 mask in [-1, 1] (:meth:`mask_to_seg`).
            inter_s8: optional ``(N, 1, H, W)`` feedback in [-1, 1]; when given, iteration 1 is
                skipped and this map is used as-is in place of its ``tanh`` output.
            inter_s4: optional ``(N, 1, H, W)`` feedback in [-1, 1]; when given together with
                ``inter_s8``, iteration 2 is skipped and iteration 3 gets ``(inter_s8, inter_s4)``.

        Returns:
            ``(N, 1, H, W)`` float32 maps at input resolution: logits ``out_*`` and
            probabilities ``pred_* = sigmoid(out_*)`` in [0, 1]. Keys: ``*_28`` (iteration 1,
            OS8), ``*_28_2`` and ``*_56`` (iteration 2, OS8/OS4), ``*_28_3``, ``*_56_2`` and
            ``*_224`` (iteration 3, OS8/OS4/OS1; ``pred_224`` is the refined mask).
            12 entries with no ``inter_*``, 10 with ``inter_s8`` only, 6 with both.
        """
        return self._cascade(im, seg, inter_s8, inter_s4, guide=im, prior=None)

    def _cascade(
        self, im: Tensor, seg: Tensor, inter_s8: Tensor | None, inter_s4: Tensor | None, *, guide: Tensor,
        prior: Tensor | None,
    ) -> dict[str, Tensor]:
        """The three cascade iterations (see :meth:`forward`).

        Args:
            im: ``(N, 3, H, W)`` normalised image.
            seg: ``(N, 1, H, W)`` mask in [-1, 1].
            inter_s8: optional ``(N, 1, H, W)`` feedback in [-1, 1] (see :meth:`forward`).
            inter_s4: optional ``(N, 1, H, W)`` feedback in [-1, 1] (see :meth:`forward`).
            guide: the full-resolution skip input of ``up_3`` and of the OS1 head (the official
                module: ``im``; subclasses may add channels).
            prior: added to every output logit before it is emitted and fed back (``None``: nothing).
        """
        if self.runtime is not None and _runtime_call(im, inter_s4):
            return dict(self.runtime(im, seg, inter_s8))
        out: dict[str, Tensor] = {}

        def emit(key: str, logit: Tensor) -> Tensor:
            if prior is not None:
                logit = logit + prior
            out["out_" + key] = logit
            out["pred_" + key] = torch.sigmoid(logit)
            return logit

        if inter_s8 is None:
            p, _, _ = self._encode(im, seg, seg, seg)
            inter_s8 = torch.tanh(emit("28", _up(self.final_28(p), 8)))
        if inter_s4 is None:
            p, _, f_2 = self._encode(im, seg, inter_s8, inter_s8)
            logit8 = emit("28_2", _up(self.final_28(p), 8))
            logit4 = emit("56", _up(self.final_56(self.up_1(p, f_2)), 4))
            inter_s8, inter_s4 = torch.tanh(logit8), torch.tanh(logit4)
        p, f_1, f_2 = self._encode(im, seg, inter_s8, inter_s4)
        emit("28_3", _up(self.final_28(p), 8))
        p = self.up_1(p, f_2)
        emit("56_2", _up(self.final_56(p), 4))
        p = self.up_3(self.up_2(p, f_1), guide)
        emit("224", self.final_21(F.relu(self.final_11(torch.cat([p, guide], 1)))))
        return out


def _runtime_call(im: Tensor, inter_s4: Tensor | None) -> bool:
    """Whether a forward may go to the module's runtime: inference on the CPU in float32, no ``inter_s4``."""
    return inter_s4 is None and runs_here(im)


def cascadepsp_official() -> CascadeRefinementModule:
    """The official CascadePSP configuration (loads the released checkpoint with ``strict=True``).

    Returns:
        A module in training mode with default initialisation; call ``.eval()`` after
        loading weights.
    """
    return CascadeRefinementModule(DilatedResNet((3, 4, 6, 3), in_channels=6), CascadeWidths())
