"""CascadePSP-lite: the CascadePSP cascade around a narrow encoder, small enough to train on a CPU.

The lite model keeps everything of the official refinement module that the inference code
relies on (:class:`~refine_cli.models.cascadepsp.CascadeRefinementModule`: the same 6-channel
input, the three cascade iterations, the PSP module, the three ``UpBlock``s and the OS8 / OS4 /
OS1 heads, the same output keys, ImageNet normalisation and ``{-1, +1}`` mask input), and
replaces the dilated ResNet-50 by :class:`LiteEncoder`::

    stem    3x3 conv s2 -> BN -> ReLU -> 3x3 conv -> BN -> ReLU        1/2, ``stem`` ch   -> f_1
    stage1  basic residual blocks, the first with stride 2             1/4, ``widths[0]`` -> f_2
    stage2  basic residual blocks, the first with stride 2             1/8, ``widths[1]``
    stage3  basic residual blocks at 1/8, 3x3 dilation ``dilation``    1/8, ``widths[2]`` -> f

A basic block is ``relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))`` (ResNet-18 style;
the shortcut is a strided 1x1 conv + BN where the shape changes).

Two optional changes turn the module into a *corrector* of the coarse mask:

* ``prior_gain > 0``: every output logit is ``head(x) + g * seg``, where ``seg`` is the
  ``{-1, +1}`` mask input and ``g`` a learned scalar initialised to ``prior_gain``. With an
  untrained head the output is ``sigmoid(+-g)``, i.e. the coarse mask, and training only has to
  learn where to change it. The cascade feedback (``tanh`` of the logits) includes the prior,
  exactly as if the heads had produced the full logit.
* ``mask_skip``: the full-resolution skip input of ``up_3`` and of the OS1 head is
  ``cat(im, seg)`` (4 channels) instead of ``im`` (3), so the decoder sees exactly where the
  prior's sharp edges are and can move them (the official decoder sees the mask only through the
  encoder, at 1/2 resolution and coarser).

The architecture is fully described by :class:`LiteArch` (a small dict stored with every
checkpoint), so ``cascadepsp_lite(**arch)`` rebuilds the exact module for a state_dict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refine_cli.errors import WeightsError
from refine_cli.models.cascadepsp import CascadeRefinementModule, CascadeWidths, UpBlock


@dataclass(frozen=True)
class LiteArch:
    """Hyper-parameters of a CascadePSP-lite module (all it takes to rebuild it).

    Attributes:
        stem: channels of the 1/2-resolution stem (the encoder's ``f_1``).
        widths: channels of stages 1..3 (1/4, 1/8, 1/8); ``widths[0]`` is ``f_2``, ``widths[2]`` is ``f``.
        depths: basic blocks per stage.
        dilation: dilation of the 3x3 convs of stage 3 (the first block keeps 1).
        psp: output channels of the PSP bottleneck.
        up1: output channels of ``up_1`` (1/4).
        up2: output channels of ``up_2`` (1/2).
        up3: output channels of ``up_3`` (1/1).
        head: hidden channels of the 1x1 heads.
        psp_sizes: pooled grid sizes of the PSP stages.
        prior_gain: initial gain of the coarse-mask prior added to every logit; 0 disables it
            (no parameter is created).
        mask_skip: give the full-resolution decoder stage and the OS1 head the mask as well as the image.
    """

    stem: int = 24
    widths: tuple[int, int, int] = (32, 64, 96)
    depths: tuple[int, int, int] = (1, 2, 2)
    dilation: int = 2
    psp: int = 96
    up1: int = 64
    up2: int = 32
    up3: int = 16
    head: int = 16
    psp_sizes: tuple[int, ...] = (1, 2, 3, 6)
    prior_gain: float = 0.0
    mask_skip: bool = False

    def __post_init__(self) -> None:
        for name in ("widths", "depths", "psp_sizes"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if len(self.widths) != 3 or len(self.depths) != 3:
            raise ValueError(f"widths and depths need 3 entries, got {self.widths} and {self.depths}")
        ints = (self.stem, *self.widths, self.psp, self.up1, self.up2, self.up3, self.head, *self.psp_sizes)
        if min(ints) < 1 or min(self.depths) < 1 or self.dilation < 1:
            raise ValueError(f"all widths, depths, sizes and the dilation must be >= 1: {self}")
        if not 0.0 <= float(self.prior_gain) <= 10.0:
            raise ValueError(f"prior_gain must be in [0, 10], got {self.prior_gain}")
        object.__setattr__(self, "prior_gain", float(self.prior_gain))
        object.__setattr__(self, "mask_skip", bool(self.mask_skip))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, arch: Mapping[str, Any]) -> LiteArch:
        """Rebuild from :meth:`to_dict` output.

        Raises:
            WeightsError: unknown or invalid keys (the checkpoint's arch dict is damaged or newer).
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(arch) - known)
        if unknown:
            raise WeightsError(
                f"unknown cascadepsp-lite architecture keys {unknown}; the checkpoint needs a newer refine"
            )
        try:
            return cls(**dict(arch))
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"invalid cascadepsp-lite architecture {dict(arch)}: {exc}") from exc

    @property
    def widths_of_cascade(self) -> CascadeWidths:
        """The :class:`CascadeWidths` of the cascade around this encoder."""
        return CascadeWidths(
            feat8=self.widths[2], feat2=self.stem, feat4=self.widths[0], psp=self.psp, up1=self.up1,
            up2=self.up2, up3=self.up3, head=self.head, psp_sizes=self.psp_sizes,
        )


LITE_V1 = LiteArch(
    stem=16, widths=(24, 48, 96), depths=(1, 2, 2), dilation=2, psp=64, up1=32, up2=16, up3=8, head=16,
    prior_gain=3.0, mask_skip=True,
)
"""The architecture of the shipped ``cascadepsp-lite-v1`` and ``-v2`` weights."""


def _conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv + BN, a residual shortcut, ReLU after the sum.

    Args:
        cin: input channels.
        cout: output channels.
        stride: stride of the first conv (1 or 2).
        dilation: dilation of both convs.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, stride, dilation)
        self.conv2 = _conv_bn(cout, cout, 1, dilation)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        """``(N, cin, H, W)`` -> ``(N, cout, H / stride, W / stride)``."""
        out = F.relu(self.conv1(x), inplace=True)
        return F.relu(self.conv2(out) + self.shortcut(x), inplace=True)


def _stage(cin: int, cout: int, depth: int, stride: int, dilation: int) -> nn.Sequential:
    blocks = [BasicBlock(cin, cout, stride, 1)]
    blocks += [BasicBlock(cout, cout, 1, dilation) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class LiteEncoder(nn.Module):
    """Narrow ResNet-18-style encoder with output stride 8 (see the module docstring).

    Args:
        arch: the hyper-parameters.
    """

    def __init__(self, arch: LiteArch) -> None:
        super().__init__()
        s, (w1, w2, w3), (d1, d2, d3) = arch.stem, arch.widths, arch.depths
        self.stem = nn.Sequential(
            nn.Conv2d(6, s, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(s), nn.ReLU(inplace=True),
            nn.Conv2d(s, s, 3, padding=1, bias=False), nn.BatchNorm2d(s), nn.ReLU(inplace=True),
        )
        self.stage1 = _stage(s, w1, d1, 2, 1)
        self.stage2 = _stage(w1, w2, d2, 2, 1)
        self.stage3 = _stage(w2, w3, d3, 1, arch.dilation)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encode image + mask channels.

        Args:
            x: ``(N, 6, H, W)`` float, H and W multiples of 8.

        Returns:
            ``f`` ``(N, widths[2], H/8, W/8)``, ``f_1`` ``(N, stem, H/2, W/2)``,
            ``f_2`` ``(N, widths[0], H/4, W/4)``.
        """
        f_1 = self.stem(x)
        f_2 = self.stage1(f_1)
        f = self.stage3(self.stage2(f_2))
        return f, f_1, f_2


def _up(x: Tensor, factor: int) -> Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class LiteCascadeModule(CascadeRefinementModule):
    """:class:`CascadeRefinementModule` with a :class:`LiteEncoder` and the optional coarse-mask prior.

    Same inputs, outputs and normalisation as the official module (see its ``forward``);
    with ``arch.prior_gain == 0`` and ``arch.mask_skip`` off the forward is the parent's, unchanged.

    Attributes:
        arch: the hyper-parameters this module was built from.
        prior_gain: learned scalar ``g`` of ``logit = head + g * seg`` (only when ``arch.prior_gain > 0``).
        pad_mode: ``replicate``: trained on crops without padding, the module reads a strip of
            mean colour and background (the official padding) at the bottom/right of the global
            step as an edge and grows the mask along it (``benchmarks/quality.py``).
        working_size: 640: trained on 224-448 px views, the module refines better from a global view
            of 640 px than of 900 (mBA on 16 tuning composites of 1200 x 1600 px: 512 0.881, 640 0.883,
            768 0.878, 900 0.874; weights/README.md).
        edge_snap: on: the module's boundaries land a few px off the colour edge; a guided filter
            of radius 8 moves them onto it (same tuning set, mBA 0.883 -> 0.904; weights/README.md).
    """

    pad_mode = "replicate"
    working_size = 640
    edge_snap = True

    def __init__(self, arch: LiteArch) -> None:
        super().__init__(LiteEncoder(arch), arch.widths_of_cascade)
        self.arch = arch
        if arch.mask_skip:  # the full-resolution guide is cat(im, seg): one more input channel
            self.up_3 = UpBlock(arch.up2, arch.up2 + 4, arch.up3)
            self.final_11 = nn.Conv2d(arch.up3 + 4, arch.head, 1)
        self.prior_gain: nn.Parameter | None = None
        if arch.prior_gain > 0:
            self.prior_gain = nn.Parameter(torch.tensor(arch.prior_gain))
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal convs (fan-out, ReLU), BN weight 1 / bias 0; the last conv of each head at 0.

        Zero-initialised last head convs make an untrained module return ``sigmoid(g * seg)``
        (the coarse mask) when the prior is on, and 0.5 everywhere otherwise.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # the last layer of each head is a Conv2d (CascadeRefinementModule builds them so)
        for last in (cast(nn.Conv2d, self.final_28[2]), cast(nn.Conv2d, self.final_56[2]), self.final_21):
            nn.init.zeros_(last.weight)
            assert last.bias is not None  # built with the default bias=True
            nn.init.zeros_(last.bias)

    def forward(
        self, im: Tensor, seg: Tensor, inter_s8: Tensor | None = None, inter_s4: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Run the cascade (contract of :meth:`CascadeRefinementModule.forward`).

        Args:
            im: ``(N, 3, H, W)`` float normalised image; H, W multiples of 8.
            seg: ``(N, 1, H, W)`` float mask in [-1, 1].
            inter_s8: optional ``(N, 1, H, W)`` feedback in [-1, 1] (local step).
            inter_s4: optional ``(N, 1, H, W)`` feedback in [-1, 1].

        Returns:
            ``out_*`` logits and ``pred_*`` probabilities, ``(N, 1, H, W)``, the keys of the parent.
        """
        prior = None if self.prior_gain is None else self.prior_gain.to(seg.dtype) * seg
        guide = torch.cat([im, seg.to(im.dtype)], 1) if self.arch.mask_skip else im
        return self._cascade(im, seg, inter_s8, inter_s4, guide=guide, prior=prior)


def cascadepsp_lite(**arch: Any) -> LiteCascadeModule:
    """Build a CascadePSP-lite module.

    Args:
        **arch: :class:`LiteArch` fields (as stored in a checkpoint's sidecar); none gives
            :data:`LITE_V1`, the shipped architecture.

    Returns:
        A module in training mode with fresh initialisation.

    Raises:
        WeightsError: unknown or invalid architecture keys.
    """
    spec = LiteArch.from_dict(arch) if arch else LITE_V1
    return LiteCascadeModule(spec)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
