"""Reusable pieces for MagNet tests: a deterministic segmenter, fill-rule modules, images, presets.

Everything runs on the CPU in seconds and needs no downloaded weights:

* :class:`ColourSegmenter`: per-pixel softmax of a fixed linear map of RGB, blurred 3x3;
* :func:`fill_module`: the refinement module with the GOLDEN §1 fill weights;
* :func:`blocky_image`: random colour blocks plus a ramp, so patches differ in uncertainty;
* :func:`make_preset`: a generic-schedule preset for the segmenter;
* :func:`write_torchscript_segmenter` / :func:`write_fill_checkpoint`: files the CLI loads.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from refine_cli.devtools.fill_magnet import fill_state_dict, module_entries
from refine_cli.models.magnet import build_refinement_magnet
from refine_cli.refiners.magnet import MagnetPreset
from refine_cli.segmenters.base import Segmenter, SegmenterSpec


class ColourSegmenter(Segmenter):
    """Deterministic: per-pixel softmax of a fixed linear map of RGB plus a 3x3 box blur of it.

    Counts the images it segments, so tests can tell whether a stage ran.

    Args:
        classes: C.
        size: ``(w, h)`` input size.
        resize: ``linear`` (the official pipeline's) or ``area``.
        seed: seed of the linear map.
    """

    def __init__(self, classes: int = 3, size: tuple[int, int] = (48, 32), resize: str = "linear",
                 seed: int = 1234) -> None:
        self.spec = SegmenterSpec("colour", size, tuple(f"class{i}" for i in range(classes)), resize=resize)
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(classes, 3, generator=g) * 6
        self.images = 0

    def predict(self, images: np.ndarray) -> np.ndarray:
        batch = self.check_batch(images)
        self.images += len(batch)
        x = torch.from_numpy(batch).float().permute(0, 3, 1, 2) / 255 - 0.5
        logits = torch.einsum("nkhw,ck->nchw", x, self.weight)
        logits = torch.nn.functional.avg_pool2d(logits, 3, 1, 1, count_include_pad=False)
        return torch.softmax(logits, dim=1).numpy()


def fill_module(classes: int) -> nn.Module:
    """A C-class refinement module with the deterministic fill weights, eval mode."""
    m = build_refinement_magnet(classes)
    m.load_state_dict(fill_state_dict(module_entries(m)), strict=True)
    return m.eval()


def blocky_image(hw: tuple[int, int], seed: int = 7, block: int = 16) -> np.ndarray:
    """``(H, W, 3)`` uint8: random colour blocks plus a horizontal ramp."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (hw[0] // block + 1, hw[1] // block + 1, 3)).astype(np.float32)
    img = np.repeat(np.repeat(blocks, block, 0), block, 1)[: hw[0], : hw[1]]
    ramp = np.linspace(-60, 60, hw[1], dtype=np.float32)[None, :, None]
    return np.clip(img + ramp, 0, 255).astype(np.uint8)


def make_preset(segmenter: Segmenter, **over: object) -> MagnetPreset:
    """A generic-schedule preset for ``segmenter`` (3 patches, kernel 3, 500 points unless overridden)."""
    base = dict(name="test", segmenter=segmenter.name, num_classes=segmenter.num_classes,
                input_size=segmenter.input_size, crop_size=None, scales=None, fast_scales=None, n_patches=3,
                n_points=500, kernel=3, refinement=("fill",))
    base.update(over)
    return MagnetPreset(**base)  # type: ignore[arg-type]




class _PixelNet(nn.Module):
    """1x1 convolution followed by a 5x5 mean: a tiny segmentation network (logits)."""

    def __init__(self, classes: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, classes, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(classes, 3, 1, 1, generator=g) * 3)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(self.conv(x), 5, 1, 2, count_include_pad=False)


def write_torchscript_segmenter(folder: Path, classes: int = 2, size: tuple[int, int] = (256, 256),
                                seed: int = 5) -> Path:
    """A TorchScript segmenter with its sidecar JSON (``--segmenter PATH``)."""
    path = Path(folder) / "seg.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated upstream
        torch.jit.save(torch.jit.script(_PixelNet(classes, seed).eval()), str(path))
    names = ["background", "foreground"] if classes == 2 else [f"class{i}" for i in range(classes)]
    sidecar = {"input_size": list(size), "classes": names, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    (Path(folder) / "seg.pt.json").write_text(json.dumps(sidecar))
    return path


def write_fill_checkpoint(path: Path, classes: int = 2) -> Path:
    """A fill-rule refinement checkpoint for C classes (``--weights PATH``)."""
    torch.save(fill_state_dict(module_entries(build_refinement_magnet(classes))), path)
    return Path(path)
