"""HRNetV2-W18-Small-v2 + OCR, full resolution: MagNet's Cityscapes backbone.

Re-implemented from a written description of the architecture (no official
code). Parameter names and state_dict order equal the official
``HRNetW18_OCR(19)`` (its state_dict manifest: 924 entries,
6 379 278 parameters), so released checkpoints load strictly once their
``model.`` prefix is removed (``models.magnet_ckpt.clean_backbone_state_dict``).

Structure (``full_os``: both stem convs have stride 1, so branch b runs at stride
``2**b`` of the input and every head works at the input resolution):

* stem: conv 3x3 3->64 + BN + ReLU, conv 3x3 64->64 + BN + ReLU; ``layer1``: two
  bottlenecks (64 -> 256);
* stages 2/3/4: 1/3/2 high-resolution modules over 2/3/4 branches of width
  18/36/72/144, two basic blocks per branch, then the multi-scale fuse;
* head: the four branch outputs resized to full resolution (bilinear,
  ``align_corners=True``) and concatenated (270 ch); ``aux_head`` gives soft object
  regions; OCR (mid 512, key 256) gives the class logits ``out``.

The default output is the blend ``(out + 0.4 * out_aux) / 1.4`` that the official
test pipeline uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from refine_cli.models.magnet import ImageBackbone, conv1x1, conv3x3, make_layer
from refine_cli.models.runtime import traceable_size

HRNET_BN_MOMENTUM = 0.01
"""BatchNorm momentum of the official HRNet (training only)."""

AUX_WEIGHT = 0.4
"""Weight of ``out_aux`` in the output blend (the backbone trainer's balance weights 1 and 0.4)."""

W18_SMALL_V2_WIDTHS = (18, 36, 72, 144)
"""HRNetV2-W18-Small-v2: branch widths, highest resolution first."""

W18_SMALL_V2_MODULES = (1, 3, 2)
"""HRNetV2-W18-Small-v2: high-resolution modules in stages 2, 3 and 4."""

W18_SMALL_V2_BLOCKS = 2
"""HRNetV2-W18-Small-v2: basic blocks per branch in every module."""


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True`` (HRNet's internal convention)."""
    return F.interpolate(x, size=traceable_size(size), mode="bilinear", align_corners=True)


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    """``Sequential(conv, BN[, ReLU])`` with names ``0`` and ``1`` (conv without bias)."""
    conv = conv3x3(in_ch, out_ch, stride) if kernel == 3 else conv1x1(in_ch, out_ch, stride)
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(out_ch, momentum=HRNET_BN_MOMENTUM)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _bn_relu(channels: int) -> nn.Sequential:
    """``Sequential(BN, ReLU)``: the OCR blocks' norm layer (hence the extra ``.0`` in their names)."""
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN, identity shortcut: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + x)``.

    Args:
        channels: input and output channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.bn1 = nn.BatchNorm2d(channels, momentum=HRNET_BN_MOMENTUM)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, momentum=HRNET_BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> same shape."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        y: torch.Tensor = self.relu(out + x)
        return y


class HighResolutionModule(nn.Module):
    """One HRNet module: per-branch basic blocks, then the all-to-all fuse.

    Fuse for output branch i: the sum over source branches j = 0, 1, ... (in that
    order) of x_i itself (j = i), a 1x1 conv + BN then bilinear upsampling
    (``align_corners=True``; j > i), or a chain of i - j stride-2 3x3 conv + BN
    (ReLU after all but the last; j < i); then ReLU.

    Args:
        widths: channels per branch, highest resolution first (>= 2 branches).
        blocks: basic blocks per branch.
    """

    def __init__(self, widths: Sequence[int], blocks: int) -> None:
        super().__init__()
        n = len(widths)
        if n < 2:
            raise ValueError("a high-resolution module needs at least 2 branches")
        self.branches = nn.ModuleList(
            nn.Sequential(*[BasicBlock(w) for _ in range(blocks)]) for w in widths
        )
        self.fuse_layers = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j > i:
                    row.append(_conv_bn(widths[j], widths[i], kernel=1, relu=False))
                elif j == i:
                    row.append(nn.Identity())
                else:
                    steps = i - j
                    row.append(nn.Sequential(*[
                        _conv_bn(widths[j], widths[i] if k == steps - 1 else widths[j], kernel=3, stride=2,
                                 relu=k != steps - 1)
                        for k in range(steps)
                    ]))
            self.fuse_layers.append(row)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Branch tensors ``(N, widths[b], H_b, W_b)`` -> the fused tensors, same shapes."""
        xs = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        outs = []
        for i in range(len(xs)):
            y = self._fuse_term(xs, i, 0)
            for j in range(1, len(xs)):
                y = y + self._fuse_term(xs, i, j)
            outs.append(self.relu(y))
        return outs

    def _fuse_term(self, xs: list[torch.Tensor], i: int, j: int) -> torch.Tensor:
        """Contribution of source branch j to output branch i, at branch i's size."""
        if j == i:
            return xs[j]
        row = cast(nn.ModuleList, self.fuse_layers[i])  # each row is built as a ModuleList
        term = row[j](xs[j])
        return _upsample(term, xs[i].shape[-2:]) if j > i else term


class Stage(nn.Sequential):
    """A sequence of :class:`HighResolutionModule` passing the list of branch tensors along."""

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Branch tensors -> branch tensors (shapes unchanged)."""
        for module in self:
            xs = module(xs)
        return xs


class ObjectContextBlock(nn.Module):
    """OCR's pixel-to-object attention (scale 1: no pooling).

    ``query = f_pixel(F)``, ``key = f_object(context)``, ``value = f_down(context)``;
    per pixel a softmax over classes of ``query . key / sqrt(key_ch)`` weights the
    values; ``f_up`` maps the result back to ``in_ch`` channels.

    Args:
        in_ch: channels of the pixel features and of the context (512).
        key_ch: channels of query, key and value (256).
    """

    def __init__(self, in_ch: int, key_ch: int) -> None:
        super().__init__()
        self.key_ch = key_ch
        self.f_pixel = nn.Sequential(conv1x1(in_ch, key_ch), _bn_relu(key_ch),
                                     conv1x1(key_ch, key_ch), _bn_relu(key_ch))
        self.f_object = nn.Sequential(conv1x1(in_ch, key_ch), _bn_relu(key_ch),
                                      conv1x1(key_ch, key_ch), _bn_relu(key_ch))
        self.f_down = nn.Sequential(conv1x1(in_ch, key_ch), _bn_relu(key_ch))
        self.f_up = nn.Sequential(conv1x1(key_ch, in_ch), _bn_relu(in_ch))

    def forward(self, feats: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Attend.

        Args:
            feats: ``(N, in_ch, H, W)`` pixel features F.
            context: ``(N, in_ch, K, 1)`` object region representations.

        Returns:
            ``(N, in_ch, H, W)`` object-contextual features G.
        """
        n, _, h, w = feats.shape
        query = self.f_pixel(feats).view(n, self.key_ch, -1).permute(0, 2, 1)  # N, HW, key
        key = self.f_object(context).view(n, self.key_ch, -1)  # N, key, K
        value = self.f_down(context).view(n, self.key_ch, -1).permute(0, 2, 1)  # N, K, key
        sim = torch.matmul(query, key) * (self.key_ch**-0.5)
        sim = F.softmax(sim, dim=-1)
        out = torch.matmul(sim, value).permute(0, 2, 1).contiguous().view(n, self.key_ch, h, w)
        y: torch.Tensor = self.f_up(out)
        return y


class SpatialOCR(nn.Module):
    """OCR distribution head: ``conv_bn_dropout(cat([G, F]))`` with G from :class:`ObjectContextBlock`.

    Args:
        in_ch: pixel feature channels (512).
        key_ch: attention channels (256).
        out_ch: output channels (512).
        dropout: 2-D dropout probability (identity in eval).
    """

    def __init__(self, in_ch: int, key_ch: int, out_ch: int, dropout: float = 0.05) -> None:
        super().__init__()
        self.object_context_block = ObjectContextBlock(in_ch, key_ch)
        self.conv_bn_dropout = nn.Sequential(
            conv1x1(2 * in_ch, out_ch), _bn_relu(out_ch), nn.Dropout2d(dropout)
        )

    def forward(self, feats: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``(N, in_ch, H, W)``, ``(N, in_ch, K, 1)`` -> ``(N, out_ch, H, W)``."""
        g = self.object_context_block(feats, context)
        y: torch.Tensor = self.conv_bn_dropout(torch.cat([g, feats], dim=1))
        return y


def ocr_gather(feats: torch.Tensor, region_logits: torch.Tensor) -> torch.Tensor:
    """Object region representations: per class, a softmax *over pixels* weights F.

    Args:
        feats: ``(N, D, H, W)`` pixel features.
        region_logits: ``(N, K, H, W)`` soft object region logits (``out_aux``).

    Returns:
        ``(N, D, K, 1)``: the weighted mean feature of every class.
    """
    n, k = region_logits.shape[:2]
    weights = F.softmax(region_logits.reshape(n, k, -1), dim=2)  # N, K, HW
    pixels = feats.reshape(n, feats.shape[1], -1).permute(0, 2, 1)  # N, HW, D
    return torch.matmul(weights, pixels).permute(0, 2, 1).unsqueeze(3)


def blend_logits(out: torch.Tensor, out_aux: torch.Tensor) -> torch.Tensor:
    """``(out + 0.4 * out_aux) / 1.4`` in the tensors' dtype: the official eval output.

    Args:
        out: ``(N, K, H, W)`` OCR classifier logits.
        out_aux: ``(N, K, H, W)`` auxiliary logits.

    Returns:
        ``(N, K, H, W)`` blended logits.
    """
    return (out + AUX_WEIGHT * out_aux) / (1.0 + AUX_WEIGHT)


class HRNetOCROutput(NamedTuple):
    """All heads of one forward pass.

    Attributes:
        out: ``(N, K, H, W)`` OCR classifier logits.
        out_aux: ``(N, K, H, W)`` auxiliary (soft object region) logits.
        context: ``(N, 512, K, 1)`` object region representations.
    """

    out: torch.Tensor
    out_aux: torch.Tensor
    context: torch.Tensor


class HRNetW18SmallOCR(ImageBackbone):
    """HRNetV2-W18-Small-v2 + OCR with the full-resolution stem (official ``HRNetW18_OCR``).

    Inputs are normalised images ``(N, 3, H, W)`` float32 (see :meth:`normalize`);
    any H, W >= 1 work. Outputs are logits at the input resolution. No softmax inside.

    Args:
        num_classes: K, number of classes (19 for Cityscapes).
        ocr_mid: OCR mid channels (512).
        ocr_key: OCR key channels (256).
    """

    def __init__(self, num_classes: int = 19, ocr_mid: int = 512, ocr_key: int = 256) -> None:
        super().__init__()
        widths, modules, blocks = W18_SMALL_V2_WIDTHS, W18_SMALL_V2_MODULES, W18_SMALL_V2_BLOCKS
        self.num_classes = num_classes
        self.conv1 = conv3x3(3, 64, stride=1)
        self.bn1 = nn.BatchNorm2d(64, momentum=HRNET_BN_MOMENTUM)
        self.conv2 = conv3x3(64, 64, stride=1)
        self.bn2 = nn.BatchNorm2d(64, momentum=HRNET_BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_layer(64, 64, blocks=2, bn_momentum=HRNET_BN_MOMENTUM)

        # Transition s feeds stage s+1: identities for kept branches, a stride-2 3x3 conv
        # (from the lowest-resolution branch) for the new one. transition1 also maps layer1's
        # 256 channels to branch 0's width.
        self.transition1 = nn.ModuleList([
            _conv_bn(256, widths[0], kernel=3),
            nn.Sequential(_conv_bn(256, widths[1], kernel=3, stride=2)),
        ])
        self.stage2 = Stage(*[HighResolutionModule(widths[:2], blocks) for _ in range(modules[0])])
        self.transition2 = nn.ModuleList(
            [nn.Identity(), nn.Identity(), nn.Sequential(_conv_bn(widths[1], widths[2], kernel=3, stride=2))]
        )
        self.stage3 = Stage(*[HighResolutionModule(widths[:3], blocks) for _ in range(modules[1])])
        self.transition3 = nn.ModuleList(
            [nn.Identity() for _ in range(3)]
            + [nn.Sequential(_conv_bn(widths[2], widths[3], kernel=3, stride=2))]
        )
        self.stage4 = Stage(*[HighResolutionModule(widths, blocks) for _ in range(modules[2])])

        feats_ch = sum(widths)  # 270
        self.conv3x3_ocr = nn.Sequential(
            conv3x3(feats_ch, ocr_mid, bias=True), nn.BatchNorm2d(ocr_mid), nn.ReLU(inplace=True)
        )
        self.ocr_distri_head = SpatialOCR(ocr_mid, ocr_key, ocr_mid, dropout=0.05)
        self.cls_head = conv1x1(ocr_mid, num_classes, bias=True)
        self.aux_head = nn.Sequential(
            conv1x1(feats_ch, feats_ch, bias=True), nn.BatchNorm2d(feats_ch), nn.ReLU(inplace=True),
            conv1x1(feats_ch, num_classes, bias=True),
        )

    @staticmethod
    def _transition(layers: nn.ModuleList, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Apply a transition: branch i reads ``xs[i]``, or the last branch when it is new."""
        outs = []
        for i, layer in enumerate(layers):
            src = xs[i] if i < len(xs) else xs[-1]
            outs.append(src if isinstance(layer, nn.Identity) else layer(src))
        return outs

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features.

        Args:
            x: ``(N, 3, H, W)`` normalised image.

        Returns:
            ``(N, 270, H, W)``: the four branches at full resolution, concatenated
            highest resolution first.
        """
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.layer1(x)
        xs = self.stage2(self._transition(self.transition1, [x]))
        xs = self.stage3(self._transition(self.transition2, xs))
        xs = self.stage4(self._transition(self.transition3, xs))
        size = xs[0].shape[-2:]
        return torch.cat([xs[0]] + [_upsample(y, size) for y in xs[1:]], dim=1)

    def forward_heads(self, x: torch.Tensor) -> HRNetOCROutput:
        """Run the network and return every head.

        Args:
            x: ``(N, 3, H, W)`` float32 normalised image.

        Returns:
            :class:`HRNetOCROutput`; ``out`` and ``out_aux`` are ``(N, K, H, W)``
            logits. (The official resize of both to the input size with
            ``align_corners=True`` is the identity here, because the full-resolution
            stem keeps branch 0 at the input size.)
        """
        feats = self.features(x)
        out_aux = self.aux_head(feats)
        feats = self.conv3x3_ocr(feats)
        context = ocr_gather(feats, out_aux)
        out = self.cls_head(self.ocr_distri_head(feats, context))
        return HRNetOCROutput(out, out_aux, context)

    def forward(
        self, x: torch.Tensor, return_pair: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Segment a normalised image.

        Args:
            x: ``(N, 3, H, W)`` float32 normalised image.
            return_pair: return ``(out, out_aux)`` (training's two-term loss) instead of the blend.

        Returns:
            ``(N, K, H, W)`` logits ``(out + 0.4 * out_aux) / 1.4``, or the pair.
        """
        heads = self.forward_heads(x)
        if return_pair:
            return heads.out, heads.out_aux
        return blend_logits(heads.out, heads.out_aux)


def build_hrnet18_ocr(num_classes: int = 19) -> HRNetW18SmallOCR:
    """The official Cityscapes backbone (``--model hrnet18+ocr``), input 256x128 (W x H).

    Returns:
        A randomly initialised network in eval mode; load a checkpoint strictly.
    """
    return HRNetW18SmallOCR(num_classes).eval()
