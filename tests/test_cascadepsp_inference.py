"""The official CascadePSP inference (global + local step, fast mode) against golden outputs.

Golden file: ``shared/reference/cascadepsp/golden_inference.npz`` (official
``process_high_res_im`` / ``process_im_single_pass`` on a 300x400 synthetic image with the
deterministic fill weights; see GOLDEN.md §3). Pass criterion (GOLDEN.md): patch table and
``local_weight`` exactly equal, ``local_seg_bin`` mismatches <= 0.01 % of pixels, float arrays
within 1e-4 absolute, ``*_u8`` within 1.

The golden global ``pred_224`` has pixels within 1e-6 of the 0.5 threshold after upsampling, so
float noise of a few 1e-6 (thread count, CPU) may flip a pixel of ``local_seg_bin`` and then
change the one patch that contains it by far more than 1e-4. The local step is therefore
checked from the golden global predictions (isolating it from global-step noise); the chain from
our own global step is checked end to end where the golden data has no pixel that close to 0.5
(L=450), and through ``local_seg_bin`` at L=130.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED
from hypothesis import given, settings
from hypothesis import strategies as st

from refine_cli.config import CascadeOptions
from refine_cli.devtools.fill_cascadepsp import fill_state_dict
from refine_cli.errors import InputError, ResourceError, UsageError
from refine_cli.models.cascadepsp import CascadeRefinementModule, CascadeWidths, cascadepsp_official
from refine_cli.refiners.base import TileInput, binary_uncertainty
from refine_cli.refiners.cascadepsp import (
    CascadePSPRefiner,
    GlobalStep,
    fast_output,
    global_inputs,
    global_maps_window,
    global_step,
    local_step,
    refine_exact,
    safe_forward,
    upsample_bilinear_window,
    with_model_defaults,
)
from refine_cli.tiling.cascade_grid import global_resize
from refine_cli.tiling.grid import Window

GOLDEN = SHARED / "reference" / "cascadepsp" / "golden_inference.npz"
FAILURES = Path(__file__).resolve().parent / "failures"
needs_golden = pytest.mark.skipif(not GOLDEN.exists(), reason=f"golden file absent: {GOLDEN}")

FLOAT_TOL = 1e-4
SEG_MISMATCH_FRACTION = 1e-4  # 0.01 % of pixels


@pytest.fixture(scope="module")
def model():
    m = cascadepsp_official()
    m.load_state_dict(fill_state_dict(), strict=True)
    return m.eval()


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN))


@pytest.fixture(scope="module")
def our_global(model, golden):
    """Our global step per L, computed once (it is the expensive part at L=450)."""
    cache = {}

    def get(size):
        if size not in cache:
            cache[size] = global_step(model, golden["in_image_u8"], golden["in_mask_u8"], size)
        return cache[size]

    return get


def save_failure(name, **arrays):
    FAILURES.mkdir(exist_ok=True)
    np.savez_compressed(FAILURES / f"{name}.npz", **arrays)


def assert_close(name, got, want, tol=FLOAT_TOL):
    got = np.asarray(got, np.float32).reshape(np.shape(want))
    diff = float(np.abs(got - want).max())
    if not diff <= tol:
        save_failure(name, got=got, want=want)
    assert diff <= tol, f"{name}: max |diff| {diff:.3g} > {tol} (arrays saved to tests/failures/{name}.npz)"


def assert_u8_within_one(name, prob, want_u8):
    got = (np.asarray(prob, np.float32) * 255).astype(np.uint8)  # truncation, as the package does
    diff = int(np.abs(got.astype(int) - want_u8.astype(int)).max())
    if diff > 1:
        save_failure(name, got=got, want=want_u8)
    assert diff <= 1, f"{name}: u8 differs by {diff}"


def golden_global(golden, size):
    p = f"L{size}_"
    return GlobalStep(
        resize=global_resize((300, 400), size),
        im=torch.from_numpy(golden[p + "global_in_im"]),
        seg=torch.from_numpy(golden[p + "global_in_seg"]),
        pred_224=torch.from_numpy(golden[p + "global_pred_224"]),
        pred_56=torch.from_numpy(golden[p + "global_pred_56_2"]),
    )


def patch_table(outcomes):
    rows = []
    for o in outcomes:
        w, d, s = o.patch.window, o.patch.dst, o.patch.src
        tail = [d.row, d.row_end, d.col, d.col_end, s.row, s.row_end, s.col, s.col_end]
        tail = tail if o.processed else [-1] * 8
        rows.append([w.row, w.row_end, w.col, w.col_end, int(o.processed), *tail])
    return np.array(rows, dtype=np.int32)


def check_local(name, local, golden, size):
    p = f"L{size}_"
    np.testing.assert_array_equal(patch_table(local.patches), golden[p + "patches"])
    np.testing.assert_array_equal(np.float32([o.frac for o in local.patches]), golden[p + "patch_frac"])
    np.testing.assert_array_equal(local.weight, golden[p + "local_weight"][0, 0])
    assert_close(f"{name}_final", local.prob, golden[p + "final"][0, 0])
    assert_u8_within_one(f"{name}_final_u8", local.prob, golden[p + "final_u8"])


# ---------------------------------------------------------------- global step and fast mode


@needs_golden
@pytest.mark.parametrize("size", [130, 450])
def test_global_step_and_fast(our_global, golden, size):
    p = f"L{size}_"
    glob = our_global(size)
    assert glob.resize.mode == ("down" if size == 130 else "up")
    assert_close(f"L{size}_global_in_im", glob.im, golden[p + "global_in_im"])
    assert_close(f"L{size}_global_in_seg", glob.seg, golden[p + "global_in_seg"])
    assert_close(f"L{size}_global_pred_224", glob.pred_224, golden[p + "global_pred_224"])
    assert_close(f"L{size}_global_pred_56_2", glob.pred_56, golden[p + "global_pred_56_2"])
    seg, inter = global_maps_window(glob, Window.full((300, 400)))
    mismatches = int((seg.numpy() != golden[p + "local_seg_bin"]).sum())
    assert mismatches <= SEG_MISMATCH_FRACTION * 300 * 400, f"{mismatches} local_seg_bin pixels differ"
    assert_close(f"L{size}_local_inter_s8", inter, golden[p + "local_inter_s8"])
    fast = fast_output(glob)
    assert fast.shape == (1, 1, 300, 400)
    assert_close(f"L{size}_fast_final", fast, golden[p + "fast_final"])
    assert_u8_within_one(f"L{size}_fast_final_u8", fast[0, 0].numpy(), golden[p + "fast_final_u8"])


# ---------------------------------------------------------------- local step


@needs_golden
def test_local_step_l130_batched(model, golden):
    """70 patches (62 processed), batched by 3, from the golden global predictions."""
    glob = golden_global(golden, 130)
    seg, inter = global_maps_window(glob, Window.full((300, 400)))
    np.testing.assert_array_equal(seg.numpy(), golden["L130_local_seg_bin"])
    assert_close("L130_local_inter_s8_from_golden", inter, golden["L130_local_inter_s8"])
    calls = []
    local = local_step(
        model, golden["in_image_u8"], glob, batch_size=3, progress=lambda d, t: calls.append((d, t))
    )
    check_local("L130_local", local, golden, 130)
    assert sum(o.processed for o in local.patches) == 62
    assert int((local.weight == 0).sum()) == 5048
    assert calls[-1] == (70, 70) and len(calls) == 21  # after each of the 20 full batches, and at the end


@needs_golden
def test_refine_exact_l450_end_to_end(model, golden, our_global, monkeypatch):
    """Our global step feeding our local step (one padded 300x400 patch) against the golden final."""
    import refine_cli.refiners.cascadepsp as mod

    monkeypatch.setattr(mod, "global_step", lambda *a, **k: our_global(450))  # reuse the cached global step
    prob, info = refine_exact(model, golden["in_image_u8"], golden["in_mask_u8"], size=450)
    assert prob.dtype == np.float32 and prob.shape == (300, 400)
    assert info["patches"] == 1 and info["patches_processed"] == 1 and info["pixels_fallback"] == 0
    assert_close("L450_final", prob, golden["L450_final"][0, 0])
    assert_u8_within_one("L450_final_u8", prob, golden["L450_final_u8"])
    fast, info = refine_exact(model, golden["in_image_u8"], golden["in_mask_u8"], size=450, fast=True)
    assert_close("L450_refine_fast", fast, golden["L450_fast_final"][0, 0])
    assert "patches" not in info


# ---------------------------------------------------------------- windowed upsampling


@settings(max_examples=60, deadline=None)
@given(
    src=st.tuples(st.integers(1, 120), st.integers(1, 120)),
    out=st.tuples(st.integers(1, 700), st.integers(1, 700)),
    data=st.data(),
)
def test_upsample_window_matches_interpolate(src, out, data):
    x = torch.rand(1, 1, *src, generator=torch.Generator().manual_seed(sum(src) + sum(out)))
    r0 = data.draw(st.integers(0, out[0] - 1))
    c0 = data.draw(st.integers(0, out[1] - 1))
    win = Window(r0, c0, data.draw(st.integers(1, out[0] - r0)), data.draw(st.integers(1, out[1] - c0)))
    want = F.interpolate(x, size=out, mode="bilinear", align_corners=False)[(..., *win.slices)]
    got = upsample_bilinear_window(x, out, win)
    assert got.shape == want.shape
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    exact_platform = x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    if exact_platform:
        assert torch.equal(got, want)  # the docstring promises bit-identity here
    else:
        assert (got - want).abs().max() <= 2.5e-7


@settings(max_examples=60, deadline=None)
@given(
    src=st.tuples(st.integers(2, 80), st.integers(2, 80)),
    out=st.tuples(st.integers(129, 600), st.integers(129, 600)),
    data=st.data(),
)
def test_binarised_global_thresholds_the_exact_upsampling(src, out, data):
    """The plainly rounded upsampling stays within 5e-7 of the exact one, and thresholding it (with exact
    recomputation near 0.5) gives the exact upsampling's sides, also for sources at and near 0.5."""
    from refine_cli.refiners.cascadepsp import _binarised_global

    g = torch.Generator().manual_seed(sum(src) * 7 + sum(out))
    x = torch.rand(1, 1, *src, generator=g)
    x = torch.where(torch.rand(x.shape, generator=g) < 0.3, 0.5 + (x - 0.5) * 1e-5, x)  # many near 0.5
    r0 = data.draw(st.integers(0, out[0] - 1))
    c0 = data.draw(st.integers(0, out[1] - 1))
    win = Window(r0, c0, data.draw(st.integers(1, out[0] - r0)), data.draw(st.integers(1, out[1] - c0)))
    exact = upsample_bilinear_window(x, out, win)
    plain = upsample_bilinear_window(x, out, win, exact=False)
    assert float((plain - exact).abs().max()) <= 5e-7
    glob = GlobalStep(global_resize(out, max(out)), x, x, x, x)  # only its full shape is read
    assert torch.equal(_binarised_global(glob, win), (exact > 0.5).float() * 2 - 1)


# ---------------------------------------------------------------- API, padding, precision, OOM


def synthetic(h=64, w=96):
    y, x = np.mgrid[0:h, 0:w]
    inside = ((x - w / 2) / (w / 3)) ** 2 + ((y - h / 2) / (h / 3)) ** 2 <= 1
    image = np.stack([np.where(inside, 200, 30), (x * 2) % 256, (y * 3) % 256], -1).astype(np.uint8)
    coarse = np.where(inside, 0.8, 0.1).astype(np.float32)
    return image, coarse


def test_refiner_whole_image(model):
    image, coarse = synthetic(40, 68)
    refiner = CascadePSPRefiner(model, size=66, batch_size=2)
    result = refiner.refine(TileInput(image, coarse, Window.full((40, 68))))
    prob = result.prob
    assert prob.shape == (40, 68) and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    np.testing.assert_array_equal(result.uncertainty, binary_uncertainty(prob))
    calls = []
    prob2, info = refine_exact(
        model, image, coarse, size=66, batch_size=1, progress=lambda s, d, t: calls.append((s, d, t))
    )
    assert info["global_shape"] == (38, 66) and info["patches"] == 3
    assert calls[:2] == [("cascade global step", 0, 1), ("cascade global step", 1, 1)]
    assert calls[-1] == ("cascade local patches", 3, 3)
    assert info["patches_processed"] >= 2  # so the batch of 2 really ran
    assert float(np.abs(prob2 - prob).max()) < 1e-5  # batching changes rounding only
    desc = refiner.describe()
    assert desc["name"] == "cascade" and desc["size"] == 66 and desc["batch_size"] == 2


def test_fast_mode_and_mask_inputs(model):
    image, coarse = synthetic(40, 72)
    glob = global_step(model, image, coarse, 66)
    fast = CascadePSPRefiner(model, size=66, fast=True).refine_image(image, coarse)[0]
    np.testing.assert_array_equal(fast, fast_output(glob)[0, 0].numpy())
    assert fast.shape == (40, 72)
    # uint8 masks threshold at > 127, float probabilities at >= 0.5: the same pixels for u8 / 255
    u8 = (coarse * 255).astype(np.uint8)
    np.testing.assert_array_equal(global_inputs(model, image, u8, 66)[1], glob.seg)
    edge = np.full((40, 72), 0.5, np.float32)
    assert bool((global_inputs(model, image, edge, 66)[1] == 1).all())


def test_input_errors(model):
    image, coarse = synthetic()
    with pytest.raises(InputError, match="resize the mask"):
        refine_exact(model, image, coarse[:32], size=80)
    with pytest.raises(InputError, match="uint8"):
        refine_exact(model, image.astype(np.float32), coarse, size=80)
    with pytest.raises(UsageError, match="fp16"):
        CascadePSPRefiner(model, precision="fp16", device="cpu")
    with pytest.raises(UsageError, match="batch"):
        CascadePSPRefiner(model, batch_size=0)


class Recorder(torch.nn.Module):
    """Stands in for the network: records its inputs, returns seg mapped to [0, 1]."""

    def __init__(self, pad_mode="official"):
        super().__init__()
        self.calls = []
        self.pad_mode = pad_mode

    def forward(self, im, seg, inter_s8=None, inter_s4=None):
        self.calls.append((im, seg, inter_s8, inter_s4))
        p = (seg + 1) / 2
        return {"pred_224": p, "pred_28_3": p, "pred_56_2": p}


def test_safe_forward_padding_rule():
    rec = Recorder()
    im, seg, inter = torch.ones(2, 3, 97, 130), torch.ones(2, 1, 97, 130), torch.ones(2, 1, 97, 130)
    out = safe_forward(rec, im, seg, inter)
    pim, pseg, pinter, p4 = rec.calls[0]
    assert pim.shape[-2:] == (104, 136) and p4 is None
    assert float(pim[..., 97:, :].abs().max()) == 0.0 and float(pim[..., :, 130:].abs().max()) == 0.0
    assert bool((pseg[..., 97:, :] == -1).all()) and bool((pinter[..., :, 130:] == -1).all())
    assert out["pred_224"].shape == (2, 1, 97, 130) and bool((out["pred_224"] == 1).all())
    safe_forward(rec, torch.ones(1, 3, 96, 128), torch.ones(1, 1, 96, 128))
    assert rec.calls[-1][0].shape[-2:] == (96, 128)  # multiples of 8 are not padded


def test_safe_forward_replicate_padding():
    """``pad_mode == "replicate"`` (the lite weights' convention): every input repeats its last
    row and column; the output is cropped back the same way."""
    rec = Recorder(pad_mode="replicate")
    g = torch.Generator().manual_seed(0)
    im, seg = torch.randn(1, 3, 97, 130, generator=g), torch.rand(1, 1, 97, 130, generator=g) * 2 - 1
    inter = torch.rand(1, 1, 97, 130, generator=g) * 2 - 1
    out = safe_forward(rec, im, seg, inter)
    pim, pseg, pinter, _ = rec.calls[0]
    assert pim.shape[-2:] == (104, 136)
    assert torch.equal(pim[..., :97, :130], im) and torch.equal(pseg[..., :97, :130], seg)
    assert torch.equal(pim[..., 97:, :130], im[..., 96:97, :].expand(-1, -1, 7, -1))
    assert torch.equal(pseg[..., :97, 130:], seg[..., :, 129:130].expand(-1, -1, -1, 6))
    assert torch.equal(pinter[..., 103, 135], inter[..., 96, 129])
    assert torch.equal(out["pred_224"], (seg + 1) / 2)


def test_each_architecture_has_its_inference_conventions():
    from refine_cli.models.cascadepsp_lite import cascadepsp_lite

    official, lite = cascadepsp_official(), cascadepsp_lite()
    assert (official.pad_mode, official.working_size) == ("official", 900)  # the golden references need it
    assert (lite.pad_mode, lite.working_size) == ("replicate", 640)
    assert not official.edge_snap and lite.edge_snap  # the official output stays the official procedure's
    for model, auto in ((official, "off"), (lite, "on")):
        assert with_model_defaults(CascadeOptions(), model).snap == auto
        assert with_model_defaults(CascadeOptions(snap="on"), model).snap == "on"
        assert with_model_defaults(CascadeOptions(snap="off"), model).snap == "off"


class TinyEncoder(torch.nn.Module):
    """A small encoder returning (f at 1/8, f_1 at 1/2, f_2 at 1/4), to keep precision tests cheap."""

    def __init__(self):
        super().__init__()
        self.s2 = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.s4 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.s8 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)

    def forward(self, x):
        f_1 = self.s2(x)
        f_2 = self.s4(torch.relu(f_1))
        return self.s8(torch.relu(f_2)), f_1, f_2


def test_bf16_on_cpu():
    torch.manual_seed(0)
    widths = CascadeWidths(feat8=32, feat2=8, feat4=16, psp=24, up1=16, up2=8, up3=8, head=8)
    tiny = CascadeRefinementModule(TinyEncoder(), widths).eval()
    im = tiny.normalize_image(torch.from_numpy(synthetic(36, 50)[0]).permute(2, 0, 1)[None])
    seg = torch.ones(1, 1, 36, 50)
    seg[..., :, :20] = -1
    ref = safe_forward(tiny, im, seg)
    low = safe_forward(tiny, im, seg, precision="bf16")
    assert set(low) == {"pred_224", "pred_28_3", "pred_56_2"}
    assert low["pred_224"].dtype == torch.float32 and low["pred_224"].shape == (1, 1, 36, 50)
    diff = float((low["pred_224"] - ref["pred_224"]).abs().max())
    assert 0 < diff < 0.05  # bf16 really ran (results differ) and stays close


class OOMModel(torch.nn.Module):
    """A fake network that runs out of CUDA memory above ``limit`` patches per batch."""

    def __init__(self, real, limit):
        super().__init__()
        self.real, self.limit, self.batches = real, limit, []

    @property
    def device(self):
        return self.real.device

    def normalize_image(self, image, channels=slice(None)):
        return self.real.normalize_image(image, channels)

    def forward(self, im, seg, inter_s8=None, inter_s4=None):
        if im.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        self.batches.append(im.shape[0])
        p = torch.sigmoid(im[:, :1] + seg + inter_s8)
        return {"pred_224": p, "pred_28_3": p, "pred_56_2": p}


def test_oom_halves_the_batch_then_raises(model):
    image, _ = synthetic(64, 200)
    ramp = torch.linspace(0, 1, 80).expand(1, 1, 25, 80).contiguous()  # global map: fractions vary by patch
    glob = GlobalStep(global_resize((64, 200), 80), torch.zeros(1, 3, 25, 80), ramp * 2 - 1, ramp, ramp)
    ref = local_step(OOMModel(model, limit=1), image, glob, batch_size=1)
    fake = OOMModel(model, limit=2)
    got = local_step(fake, image, glob, batch_size=8)
    assert sum(o.processed for o in got.patches) >= 4
    assert max(fake.batches) == 2 and sum(fake.batches) == sum(o.processed for o in got.patches)
    np.testing.assert_array_equal(got.prob, ref.prob)
    with pytest.raises(ResourceError, match="out of memory"):
        local_step(OOMModel(model, limit=0), image, glob, batch_size=4)


def test_uniform_windows_are_decided_as_counting_decides():
    """A window whose sources all lie on one side of 0.5 gets the fraction counting would give."""
    from refine_cli.refiners.cascadepsp import _binarised_global, _foreground_fraction, _uniform_global

    rng = np.random.default_rng(7)
    low = np.zeros((1, 1, 60, 90), np.float32)
    low[..., 20:40, 30:70] = 1.0  # an object; the rest background, with values close to 0.5 on both sides
    low += rng.uniform(-0.4999, 0.4999, low.shape).astype(np.float32) * np.where(low > 0.5, -1, 1)
    pred = torch.from_numpy(np.clip(low, 0, 1))
    glob = GlobalStep(global_resize((600, 900), 90), pred, pred, pred, pred)
    decided = 0
    for _ in range(300):
        r0, c0 = int(rng.integers(0, 560)), int(rng.integers(0, 860))
        win = Window(r0, c0, int(rng.integers(1, 601 - r0)), int(rng.integers(1, 901 - c0)))
        side = _uniform_global(glob, win)
        counted = _foreground_fraction(_binarised_global(glob, win))
        if side is not None:
            decided += 1
            assert side == counted, (win, side, counted)
    assert decided > 30  # the shortcut is taken, not only the count
