"""The CascadePSP module: state_dict layout, deterministic fill, golden forward outputs.

Golden file: ``shared/reference/cascadepsp/golden_forward.npz`` (GOLDEN.md §2): outputs of the
official module with the fill weights at 96x128 in three call modes. Pass criterion (CPU,
float32, stated in GOLDEN.md): ``|diff| <= 1e-4 + 1e-4 * |ref|`` on ``out_*`` (logits) and
``|diff| <= 5e-5`` on ``pred_*`` (probabilities). On CUDA with TF32 disabled the criterion
is 10x looser: ``1e-3 + 1e-3 * |ref|`` and ``5e-4``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED
from torch import nn

from refine_cli.devtools.fill_cascadepsp import (
    fill_state_dict,
    official_entries,
    save_fill_checkpoint,
)
from refine_cli.devtools.manifest import read_manifest
from refine_cli.models.cascadepsp import CascadeRefinementModule, CascadeWidths, cascadepsp_official

REF = SHARED / "reference" / "cascadepsp"
MANIFEST = REF / "state_dict_manifest.tsv"
GOLDEN = REF / "golden_forward.npz"
FAILURES = Path(__file__).resolve().parent / "failures"

CPU_TOL = {"out_abs": 1e-4, "out_rel": 1e-4, "pred_abs": 5e-5}
CUDA_TOL = {"out_abs": 1e-3, "out_rel": 1e-3, "pred_abs": 5e-4}
MODES = {
    "a": {},
    "b": {"inter_s8": "in_inter_s8"},
    "c": {"inter_s8": "in_inter_s8", "inter_s4": "in_inter_s4"},
}
N_KEYS = {"a": 12, "b": 10, "c": 6}


@pytest.fixture(scope="module")
def filled():
    return fill_state_dict()


@pytest.fixture(scope="module")
def model(filled):
    m = cascadepsp_official()
    m.load_state_dict(filled, strict=True)
    return m.eval()


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.exists():
        pytest.skip(f"golden file absent: {GOLDEN}")
    return dict(np.load(GOLDEN))


# ---------------------------------------------------------------- layout


def test_parameter_count_and_entries():
    m = cascadepsp_official()
    assert sum(p.numel() for p in m.parameters()) == 67_683_433
    sd = m.state_dict()
    assert len(sd) == 426
    assert "pixel_mean" not in sd and "pixel_std" not in sd  # normalisation buffers are not persistent
    assert sum(t.numel() for t in sd.values()) == 67_745_648


@pytest.mark.skipif(not MANIFEST.exists(), reason=f"manifest absent: {MANIFEST}")
def test_state_dict_equals_manifest():
    manifest = read_manifest(MANIFEST)
    assert len(manifest) == 426
    sd = cascadepsp_official().state_dict()
    assert list(sd) == [e.name for e in manifest]  # names, in order
    for e in manifest:
        assert tuple(sd[e.name].shape) == e.shape, e.name
        assert str(sd[e.name].dtype) == f"torch.{e.dtype}", e.name
    assert official_entries() == manifest


# ---------------------------------------------------------------- fill rule (GOLDEN.md §1 spot checks)

SPOT_CHECKS = {
    "feats.conv1.weight": [0xBD272E44, 0x3DA564D9, 0x3D3D72B2],
    "feats.bn1.running_var": [0x3F9D19C2, 0x3F88AF80, 0x3F842891],
    "final_21.weight": [0xBF2002EC, 0x3F9C1A84, 0xBF3E361C],
    "final_21.bias": [0x4000D799],
    "psp.bottleneck.bias": [0xBC393035, 0xBC7B61A5, 0x3C6C846D],
    "up_3.conv.0.weight": [0x3F766B7B, 0x3F79D580, 0x3F86D0BE],
}


@pytest.mark.parametrize("name", sorted(SPOT_CHECKS))
def test_fill_spot_checks(filled, name):
    bits = filled[name].flatten()[: len(SPOT_CHECKS[name])].numpy().view(np.uint32)
    assert [int(b) for b in bits] == SPOT_CHECKS[name]


def test_fill_categories(filled):
    assert len(filled) == 426
    counters = [k for k in filled if k.endswith("num_batches_tracked")]
    assert len(counters) == 65
    assert all(filled[k].dtype == torch.int64 and int(filled[k]) == 0 for k in counters)
    var = torch.cat([filled[k] for k in filled if k.endswith("running_var")])
    assert float(var.min()) >= 1.0 and float(var.max()) <= 1.25
    assert 1.99 < float(filled["final_56.2.bias"]) < 2.02  # the +2 offset of the (1,) conv biases
    assert float(filled["feats.conv1.weight"].abs().max()) < 1.5 / 16  # e = 4 for fan_in 294


def test_save_fill_checkpoint(tmp_path):
    path = save_fill_checkpoint(tmp_path / "fill.pth")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert len(sd) == 426 and all(k.startswith("module.") for k in sd)


# ---------------------------------------------------------------- normalisation and forward


def test_normalisation_matches_golden(model, golden):
    u8 = torch.from_numpy(golden["in_image_u8"]).permute(2, 0, 1)[None]
    assert torch.equal(model.normalize_image(u8), torch.from_numpy(golden["in_im"]))
    assert torch.equal(model.normalize_image(u8.float() / 255), torch.from_numpy(golden["in_im"]))
    mask = torch.from_numpy(golden["in_mask_u8"])[None, None]
    assert torch.equal(model.mask_to_seg(mask), torch.from_numpy(golden["in_seg"]))
    assert torch.equal(model.mask_to_seg(mask.float() / 255), torch.from_numpy(golden["in_seg"]))
    green = model.normalize_image(u8[:, 1:2], slice(1, 2))
    assert torch.equal(green, torch.from_numpy(golden["in_im"])[:, 1:2])


def compare_outputs(out, golden, mode, tol, tag):
    want_keys = sorted(k[2:] for k in golden if k.startswith(mode + "_"))
    assert sorted(out) == want_keys and len(out) == N_KEYS[mode]
    report, bad = {}, {}
    for key in want_keys:
        got = out[key].detach().float().cpu().numpy()
        ref = golden[f"{mode}_{key}"]
        diff = np.abs(got - ref)
        if key.startswith("out_"):
            ratio = float((diff / (tol["out_abs"] + tol["out_rel"] * np.abs(ref))).max())
        else:
            ratio = float(diff.max() / tol["pred_abs"])
        report[key] = (float(diff.max()), ratio)
        if ratio > 1:
            bad[key] = got
    if bad:
        FAILURES.mkdir(exist_ok=True)
        np.savez_compressed(FAILURES / f"forward_{tag}_{mode}.npz", **bad)
    assert not bad, f"mode {mode}: over tolerance {tol}: " + ", ".join(
        f"{k} max|diff| {report[k][0]:.3g} ({report[k][1]:.2f}x)" for k in bad
    )


@pytest.mark.parametrize("mode", sorted(MODES))
def test_golden_forward_cpu(model, golden, mode):
    args = {k: torch.from_numpy(golden[v]) for k, v in MODES[mode].items()}
    with torch.inference_mode():
        out = model(torch.from_numpy(golden["in_im"]), torch.from_numpy(golden["in_seg"]), **args)
    compare_outputs(out, golden, mode, CPU_TOL, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("mode", sorted(MODES))
def test_golden_forward_cuda(filled, golden, mode):
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        m = cascadepsp_official()
        m.load_state_dict(filled, strict=True)
        m = m.eval().cuda()
        args = {k: torch.from_numpy(golden[v]).cuda() for k, v in MODES[mode].items()}
        with torch.inference_mode():
            im, seg = torch.from_numpy(golden["in_im"]).cuda(), torch.from_numpy(golden["in_seg"]).cuda()
            out = m(im, seg, **args)
        compare_outputs(out, golden, mode, CUDA_TOL, "cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ---------------------------------------------------------------- reuse by smaller variants


class TinyEncoder(nn.Module):
    """A 3-stage encoder returning (f at 1/8, f_1 at 1/2, f_2 at 1/4)."""

    def __init__(self):
        super().__init__()
        self.s2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.s4 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.s8 = nn.Conv2d(16, 32, 3, stride=2, padding=1)

    def forward(self, x):
        f_1 = self.s2(x)
        f_2 = self.s4(torch.relu(f_1))
        return self.s8(torch.relu(f_2)), f_1, f_2


def test_cascade_reusable_with_another_encoder():
    widths = CascadeWidths(
        feat8=32, feat2=8, feat4=16, psp=24, up1=16, up2=8, up3=8, head=8, psp_sizes=(1, 2)
    )
    m = CascadeRefinementModule(TinyEncoder(), widths).eval()
    im, seg = torch.randn(2, 3, 32, 48), torch.ones(2, 1, 32, 48)
    with torch.inference_mode():
        out = m(im, seg)
        local = m(im, seg, inter_s8=torch.zeros(2, 1, 32, 48))
    assert len(out) == 12 and len(local) == 10
    for v in out.values():
        assert v.shape == (2, 1, 32, 48) and v.dtype == torch.float32
    assert bool(((out["pred_224"] >= 0) & (out["pred_224"] <= 1)).all())
    assert sum(p.numel() for p in m.parameters()) < 100_000
