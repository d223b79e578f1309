"""MagNet networks against the official manifests and golden outputs (shared/reference/magnet).

Weights are the deterministic GOLDEN.md §1 fill, not real checkpoints, so these run
offline and in the default suite. Tolerances (GOLDEN.md §2 and §4.7, CPU float32):

* refinement logits: atol 1e-5, rtol 1e-4 (a swapped argument order is off by 0.28-0.45);
* HRNet logits and OCR context: atol 2e-4, rtol 1e-4;
* FPN logits (output and stride-4): atol 5e-5, rtol 1e-4;
* softmax of any output: atol 2e-5;
* argmax equal wherever the golden top1 - top2 logit gap exceeds 1e-3;
* regenerated images and normalised inputs: exact.

Failing comparisons write actual and expected arrays to ``tests/failures/``.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED

from refine_cli.devtools.fill_magnet import (
    fill_state_dict,
    golden_image,
    golden_probabilities,
    module_entries,
    param_checksums,
    read_manifest,
)
from refine_cli.errors import WeightsError
from refine_cli.models.hrnet_ocr import HRNetW18SmallOCR, blend_logits, build_hrnet18_ocr
from refine_cli.models.magnet import ImageBackbone, RefinementMagNet, build_refinement_magnet
from refine_cli.models.magnet_ckpt import clean_backbone_state_dict, load_strict
from refine_cli.models.resnet_fpn import ResNetFPN, build_resnet50_fpn

REF = SHARED / "reference" / "magnet"
FAILURES = Path(__file__).resolve().parent / "failures"

needs_ref = pytest.mark.skipif(
    not (REF / "GOLDEN.md").is_file(),
    reason=f"MagNet reference data not found at {REF} (needs the shared/ checkout beside the repository)",
)

REFINEMENT_ATOL, REFINEMENT_RTOL = 1e-5, 1e-4
HRNET_ATOL, HRNET_RTOL = 2e-4, 1e-4
FPN_ATOL, FPN_RTOL = 5e-5, 1e-4
SOFTMAX_ATOL = 2e-5
ARGMAX_GAP = 1e-3

MANIFESTS = {
    "refinement_c2": ("refinement_c2_state_dict_manifest.tsv", lambda: RefinementMagNet(2), 60, 81_672),
    "refinement_c7": ("refinement_c7_state_dict_manifest.tsv", lambda: RefinementMagNet(7), 60, 88_092),
    "refinement_c19": ("refinement_c19_state_dict_manifest.tsv", lambda: RefinementMagNet(19), 60, 103_500),
    "hrnet": ("hrnet18_ocr_c19_state_dict_manifest.tsv", lambda: HRNetW18SmallOCR(19), 924, 6_379_278),
    "fpn": ("resnet50_fpn_c7_state_dict_manifest.tsv", lambda: ResNetFPN(7), 344, 28_064_839),
}


def assert_close(name: str, actual: torch.Tensor, expected: np.ndarray, atol: float, rtol: float) -> None:
    """``allclose`` with the max error in the message; saves both arrays on failure."""
    a = actual.detach().cpu().numpy()
    if np.allclose(a, expected, atol=atol, rtol=rtol):
        return
    FAILURES.mkdir(exist_ok=True)
    np.savez(FAILURES / f"{name}.npz", actual=a, expected=expected)
    raise AssertionError(
        f"{name}: max abs diff {np.abs(a - expected).max():.3g} exceeds atol={atol}, rtol={rtol} "
        f"(arrays saved to {FAILURES / (name + '.npz')})"
    )


def assert_argmax_where_clear(name: str, logits: torch.Tensor, golden: np.ndarray) -> None:
    """Argmax over classes equals the golden one wherever the golden top1-top2 gap > 1e-3."""
    top2 = np.sort(golden, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > ARGMAX_GAP
    same = logits.argmax(1).numpy() == golden.argmax(1)
    assert same[clear].all(), f"{name}: {int((~same & clear).sum())} clear argmax flips"


@pytest.fixture(scope="module")
def golden_refinement() -> np.lib.npyio.NpzFile:
    return np.load(REF / "golden_refinement.npz")


@pytest.fixture(scope="module")
def golden_backbones() -> np.lib.npyio.NpzFile:
    return np.load(REF / "golden_backbones.npz")


@pytest.fixture(scope="module")
def hrnet() -> HRNetW18SmallOCR:
    model = build_hrnet18_ocr(19)
    load_strict(model, fill_state_dict(REF / "hrnet18_ocr_c19_state_dict_manifest.tsv"))
    return model


@pytest.fixture(scope="module")
def fpn() -> ResNetFPN:
    model = build_resnet50_fpn(7)
    load_strict(model, fill_state_dict(REF / "resnet50_fpn_c7_state_dict_manifest.tsv"))
    return model


@pytest.fixture(scope="module")
def hrnet_heads(hrnet: HRNetW18SmallOCR, golden_backbones: np.lib.npyio.NpzFile):
    with torch.inference_mode():
        return hrnet.forward_heads(torch.from_numpy(golden_backbones["hrnet_input"]))


# --------------------------------------------------------------------------- layout


@needs_ref
@pytest.mark.parametrize("key", list(MANIFESTS))
def test_state_dict_equals_manifest(key: str) -> None:
    path, build, n_entries, n_params = MANIFESTS[key]
    with torch.device("meta"):
        model = build()
    manifest = read_manifest(REF / path)
    assert module_entries(model) == manifest  # names, shapes, dtypes and order
    assert len(manifest) == n_entries
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_refinement_parameter_count_formula() -> None:
    for c in (2, 3, 7, 19):
        model = RefinementMagNet(c)
        assert sum(p.numel() for p in model.parameters()) == 1284 * c + 79_104
        assert len(model.state_dict()) == 60


def test_normalisation_buffers_stay_out_of_the_state_dict() -> None:
    model = ResNetFPN(7)
    assert not any("pixel_" in k for k in model.state_dict())
    assert model.pixel_mean.shape == (1, 3, 1, 1)


# --------------------------------------------------------------------------- fill rule


@needs_ref
@pytest.mark.parametrize("c", [2, 19])
def test_fill_checksums_refinement(c: int, golden_refinement: np.lib.npyio.NpzFile) -> None:
    sd = fill_state_dict(REF / f"refinement_c{c}_state_dict_manifest.tsv")
    total, total_sq = param_checksums(sd)
    assert total == pytest.approx(float(golden_refinement[f"c{c}_param_sum"]), rel=1e-12, abs=1e-9)
    assert total_sq == pytest.approx(float(golden_refinement[f"c{c}_param_sumsq"]), rel=1e-12)


@needs_ref
@pytest.mark.parametrize("case, manifest", [("hrnet", "hrnet18_ocr_c19"), ("fpn", "resnet50_fpn_c7")])
def test_fill_checksums_backbones(case: str, manifest: str, golden_backbones: np.lib.npyio.NpzFile) -> None:
    sd = fill_state_dict(REF / f"{manifest}_state_dict_manifest.tsv")
    total, total_sq = param_checksums(sd)
    assert len(sd) == int(golden_backbones[f"{case}_n_entries"])
    assert total == pytest.approx(float(golden_backbones[f"{case}_param_sum"]), rel=1e-12)
    assert total_sq == pytest.approx(float(golden_backbones[f"{case}_param_sumsq"]), rel=1e-12)


@needs_ref
def test_fill_categories() -> None:
    sd = fill_state_dict(REF / "refinement_c2_state_dict_manifest.tsv")
    assert sd["bn0.num_batches_tracked"].dtype == torch.int64 and int(sd["bn0.num_batches_tracked"]) == 0
    assert (sd["bn1.running_var"] >= 1).all()
    assert abs(float(sd["bn1.weight"].mean()) - 1) < 0.05
    # conv weight = z * float32(1/sqrt(fan_in)), fan_in = 4*3*3 for conv1 of C=2
    g = torch.Generator().manual_seed(zlib.crc32(b"conv1.weight"))
    z = torch.randn((64, 4, 3, 3), generator=g, dtype=torch.float32)
    assert torch.equal(sd["conv1.weight"], z * torch.tensor(1 / 6.0, dtype=torch.float32))


# --------------------------------------------------------------------------- refinement module


@needs_ref
@pytest.mark.parametrize("c", [2, 19])
def test_refinement_golden(c: int, golden_refinement: np.lib.npyio.NpzFile) -> None:
    model = build_refinement_magnet(c)
    load_strict(model, fill_state_dict(REF / f"refinement_c{c}_state_dict_manifest.tsv"))
    first = torch.from_numpy(golden_refinement[f"c{c}_input_first"])
    second = torch.from_numpy(golden_refinement[f"c{c}_input_second"])
    expected = golden_refinement[f"c{c}_output_logits"]
    with torch.no_grad():
        logits = model(first, second)
        swapped = model(second, first)
    assert_close(f"refinement_c{c}_logits", logits, expected, REFINEMENT_ATOL, REFINEMENT_RTOL)
    assert_close(f"refinement_c{c}_softmax", logits.softmax(1), golden_refinement[f"c{c}_output_softmax"],
                 SOFTMAX_ATOL, 0)
    # the golden file catches a swapped concatenation order
    assert not np.allclose(swapped.numpy(), expected, atol=REFINEMENT_ATOL, rtol=REFINEMENT_RTOL)
    assert np.abs(swapped.numpy() - expected).max() > 0.1


@needs_ref
def test_refinement_inputs_regenerate_from_tags(golden_refinement: np.lib.npyio.NpzFile) -> None:
    for c in (2, 19):
        for which in ("first", "second"):
            x = golden_probabilities(f"golden_refinement_input_{which}_c{c}", (1, c, 64, 64), 4.0)
            assert torch.equal(x, torch.from_numpy(golden_refinement[f"c{c}_input_{which}"]))


@needs_ref
def test_refinement_needs_eval_mode(golden_refinement: np.lib.npyio.NpzFile) -> None:
    model = RefinementMagNet(2)
    load_strict(model, fill_state_dict(REF / "refinement_c2_state_dict_manifest.tsv"))
    model.train()
    with torch.no_grad():
        out = model(torch.from_numpy(golden_refinement["c2_input_first"]),
                    torch.from_numpy(golden_refinement["c2_input_second"]))
    assert np.abs(out.numpy() - golden_refinement["c2_output_logits"]).max() > 1.0


def test_refinement_rejects_mismatched_inputs() -> None:
    model = RefinementMagNet(3).eval()
    with pytest.raises(ValueError, match="equal shape"):
        model(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError, match=r"\(N, 3, h, w\)"):
        model(torch.rand(1, 2, 8, 8), torch.rand(1, 2, 8, 8))


def test_refinement_tiles_exactly_with_a_4px_halo() -> None:
    torch.manual_seed(0)
    model = RefinementMagNet(2).eval()
    a, b = torch.rand(1, 2, 40, 40).softmax(1), torch.rand(1, 2, 40, 40).softmax(1)
    with torch.no_grad():
        full = model(a, b)
        part = model(a[..., 6:30, 6:30], b[..., 6:30, 6:30])
    assert torch.allclose(part[..., 4:-4, 4:-4], full[..., 10:26, 10:26], atol=1e-5)


# --------------------------------------------------------------------------- inputs


@needs_ref
@pytest.mark.parametrize("case", ["hrnet", "fpn", "fpnodd"])
def test_inputs_regenerate_bit_exact(case: str, golden_backbones: np.lib.npyio.NpzFile) -> None:
    expected_u8 = golden_backbones[f"{case}_image_u8"]
    h, w = expected_u8.shape[:2]
    image = golden_image(str(golden_backbones[f"{case}_input_tag"]), h, w)
    assert image.dtype == torch.uint8 and np.array_equal(image.numpy(), expected_u8)
    x = ImageBackbone().normalize(image.permute(2, 0, 1))
    assert x.dtype == torch.float32
    assert np.array_equal(x.numpy(), golden_backbones[f"{case}_input"])
    # float input in [0, 1] and a batch axis give the same result
    x_float = ImageBackbone().normalize((image.permute(2, 0, 1).float() / 255).unsqueeze(0))
    assert torch.equal(x_float, x)


def test_normalize_rejects_bad_images() -> None:
    model = ImageBackbone()
    with pytest.raises(ValueError, match="RGB image"):
        model.normalize(torch.zeros(4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 or floating"):
        model.normalize(torch.zeros(3, 8, 8, dtype=torch.int32))


# --------------------------------------------------------------------------- backbones


@needs_ref
def test_hrnet_golden(hrnet_heads, golden_backbones: np.lib.npyio.NpzFile) -> None:
    g = golden_backbones
    assert_close("hrnet_out_cls", hrnet_heads.out, g["hrnet_out_cls"], HRNET_ATOL, HRNET_RTOL)
    assert_close("hrnet_out_aux", hrnet_heads.out_aux, g["hrnet_out_aux"], HRNET_ATOL, HRNET_RTOL)
    assert_close("hrnet_ocr_context", hrnet_heads.context, g["hrnet_ocr_context"], HRNET_ATOL, HRNET_RTOL)
    blend = blend_logits(hrnet_heads.out, hrnet_heads.out_aux)
    assert_close("hrnet_output", blend, g["hrnet_output"], HRNET_ATOL, HRNET_RTOL)
    golden_softmax = torch.from_numpy(g["hrnet_output"]).softmax(1).numpy()
    assert_close("hrnet_softmax", blend.softmax(1), golden_softmax, SOFTMAX_ATOL, 0)
    assert_argmax_where_clear("hrnet_output", blend, g["hrnet_output"])


@needs_ref
def test_hrnet_blend_is_bit_exact(golden_backbones: np.lib.npyio.NpzFile) -> None:
    g = golden_backbones
    blend = blend_logits(torch.from_numpy(g["hrnet_out_cls"]), torch.from_numpy(g["hrnet_out_aux"]))
    assert np.array_equal(blend.numpy(), g["hrnet_output"])


def test_hrnet_forward_returns_blend_or_pair() -> None:
    torch.manual_seed(0)
    model = build_hrnet18_ocr(5)
    x = torch.randn(1, 3, 24, 40)
    with torch.inference_mode():
        heads = model.forward_heads(x)
        blend = model(x)
        out, aux = model(x, return_pair=True)
    assert blend.shape == (1, 5, 24, 40) and heads.context.shape == (1, 512, 5, 1)
    assert torch.equal(out, heads.out) and torch.equal(aux, heads.out_aux)
    assert torch.equal(blend, blend_logits(heads.out, heads.out_aux))


@needs_ref
@pytest.mark.parametrize("case", ["fpn", "fpnodd"])
def test_fpn_golden(case: str, fpn: ResNetFPN, golden_backbones: np.lib.npyio.NpzFile) -> None:
    g = golden_backbones
    x = torch.from_numpy(g[f"{case}_input"])
    with torch.inference_mode():
        stride4 = fpn.logits_stride4(x)
        out = fpn(x)
    assert_close(f"{case}_logits_stride4", stride4, g[f"{case}_logits_stride4"], FPN_ATOL, FPN_RTOL)
    assert_close(f"{case}_output", out, g[f"{case}_output"], FPN_ATOL, FPN_RTOL)
    assert_close(f"{case}_softmax", out.softmax(1), torch.from_numpy(g[f"{case}_output"]).softmax(1).numpy(),
                 SOFTMAX_ATOL, 0)
    assert_argmax_where_clear(f"{case}_output", out, g[f"{case}_output"])


# --------------------------------------------------------------------------- checkpoints


def _released_layout(sd: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """The expected layout of a released backbone file: ``model.`` keys plus a loss buffer."""
    out = OrderedDict(("model." + k, v) for k, v in sd.items())
    out["loss.criterion.weight"] = torch.ones(19)
    return out


@needs_ref
def test_strict_load_of_a_released_layout(tmp_path: Path) -> None:
    sd = fill_state_dict(REF / "hrnet18_ocr_c19_state_dict_manifest.tsv")
    path = tmp_path / "cityscapes_hrnet.pth"
    torch.save(_released_layout(sd), path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    cleaned = clean_backbone_state_dict(loaded)
    assert list(cleaned) == list(sd)  # prefix stripped, loss entry dropped, order kept
    model = HRNetW18SmallOCR(19)
    load_strict(model, cleaned, source=str(path))
    model.load_state_dict(cleaned, strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_clean_strips_one_prefix_and_only_loss_entries() -> None:
    t = torch.zeros(1)
    cleaned = clean_backbone_state_dict(OrderedDict([
        ("model.a.weight", t), ("model.model.b", t), ("loss.criterion.weight", t), ("lossy.c", t), ("d", t),
    ]))
    assert list(cleaned) == ["a.weight", "model.b", "lossy.c", "d"]


def test_clean_rejects_duplicates() -> None:
    t = torch.zeros(1)
    with pytest.raises(WeightsError, match="twice"):
        clean_backbone_state_dict(OrderedDict([("model.a", t), ("a", t)]))


@needs_ref
def test_unexpected_missing_and_misshaped_keys_are_rejected() -> None:
    sd = fill_state_dict(REF / "refinement_c2_state_dict_manifest.tsv")
    model = RefinementMagNet(2)
    extra = clean_backbone_state_dict(OrderedDict([("model." + k, v) for k, v in sd.items()]
                                                  + [("model.extra.weight", torch.zeros(1))]))
    with pytest.raises(WeightsError, match=r"1 unexpected: extra\.weight"):
        load_strict(model, extra, source="ckpt.pth")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        model.load_state_dict(extra, strict=True)
    missing = OrderedDict(sd)
    del missing["seg_conv.weight"]
    with pytest.raises(WeightsError, match=r"1 missing: seg_conv\.weight"):
        load_strict(model, missing)
    c19 = fill_state_dict(REF / "refinement_c19_state_dict_manifest.tsv")
    with pytest.raises(WeightsError, match="wrong shape"):
        load_strict(model, c19)


# --------------------------------------------------------------------------- CUDA
# GOLDEN.md measured no GPU tolerance. With TF32 off, these start from its suggestions
# (HRNet atol 1e-3, FPN 2e-4) and 1e-4 for the refinement module (logits <= 0.96).

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def no_tf32() -> Iterator[None]:
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.cuda
@needs_cuda
@needs_ref
@pytest.mark.parametrize("c", [2, 19])
def test_refinement_golden_cuda(c: int, golden_refinement: np.lib.npyio.NpzFile, no_tf32: None) -> None:
    model = build_refinement_magnet(c)
    load_strict(model, fill_state_dict(REF / f"refinement_c{c}_state_dict_manifest.tsv"))
    model = model.cuda()
    first = torch.from_numpy(golden_refinement[f"c{c}_input_first"]).cuda()
    second = torch.from_numpy(golden_refinement[f"c{c}_input_second"]).cuda()
    with torch.no_grad():
        logits = model(first, second)
    assert_close(f"refinement_c{c}_logits_cuda", logits, golden_refinement[f"c{c}_output_logits"], 1e-4, 1e-4)


@pytest.mark.cuda
@needs_cuda
@needs_ref
def test_backbones_golden_cuda(
    hrnet: HRNetW18SmallOCR, fpn: ResNetFPN, golden_backbones: np.lib.npyio.NpzFile, no_tf32: None
) -> None:
    g = golden_backbones
    image = golden_image(str(g["hrnet_input_tag"]), 128, 256).cuda()
    try:
        hrnet.cuda()
        with torch.inference_mode():
            out = hrnet(hrnet.normalize(image.permute(2, 0, 1)))
        assert_close("hrnet_output_cuda", out, g["hrnet_output"], 1e-3, HRNET_RTOL)
    finally:
        hrnet.cpu()
    try:
        fpn.cuda()
        for case in ("fpn", "fpnodd"):
            with torch.inference_mode():
                out = fpn(torch.from_numpy(g[f"{case}_input"]).cuda())
            assert_close(f"{case}_output_cuda", out, g[f"{case}_output"], 2e-4, FPN_RTOL)
    finally:
        fpn.cpu()
