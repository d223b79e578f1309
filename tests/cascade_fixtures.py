"""A tiny random CascadePSP-lite checkpoint, exported the way `refine train` exports (for fast pipeline tests)."""

from __future__ import annotations

from pathlib import Path

TINY = dict(stem=8, widths=(8, 16, 16), depths=(1, 1, 1), dilation=2, psp=16, up1=16, up2=8, up3=8, head=8,
            prior_gain=3.0)


def tiny_cascade_weights(folder: Path) -> Path:
    """Write ``tiny.pt`` + ``tiny.json`` (random weights, seed 0) and return the ``.pt`` path."""
    import torch

    from refine_cli.models.cascadepsp_lite import cascadepsp_lite
    from refine_cli.train.trainer import export_weights

    torch.manual_seed(0)
    model = cascadepsp_lite(**TINY).eval()
    path = folder / "tiny.pt"
    export_weights(model, path, {"arch": "cascadepsp-lite", "arch_params": model.arch.to_dict(),
                                 "bytes_per_pixel": 600, "note": "random weights for tests"})
    return path
