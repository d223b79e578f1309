"""MagNet's networks in ONNX Runtime and OpenVINO: the golden outputs within the golden tests' tolerances.

The refinement module (C = 2 and 19) and the two official backbones (HRNetV2-W18-Small+OCR, ResNet-50 FPN)
with their deterministic fill weights, on the golden inputs, within the tolerances of
``tests/test_magnet_models.py`` (refinement logits 1e-5 + 1e-4 relative; HRNet 2e-4 + 1e-4; FPN 5e-5 + 1e-4);
end to end, ``--method magnet-fast --preset binary`` on a sample gives the torch run's mask (IoU >= 0.999).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from refine_cli.devtools.fill_magnet import fill_state_dict
from refine_cli.models.magnet import build_refinement_magnet
from refine_cli.models.runtime import BACKBONE_GRAPHS, ModuleRuntime, installed, refinement_graphs

BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not installed(b), reason=f"{b} is not installed"))
            for b in ("onnx", "openvino")]
SAMPLES = Path(__file__).resolve().parents[1] / "samples"


@pytest.fixture
def ref(shared) -> Path:
    folder = shared / "reference" / "magnet"
    if not (folder / "golden_refinement.npz").exists():
        pytest.skip(f"golden files absent: {folder}")
    return folder


def _within(name: str, got: torch.Tensor, want: np.ndarray, atol: float, rtol: float) -> None:
    diff = float(np.abs(got.numpy() - want).max())
    assert np.allclose(got.numpy(), want, atol=atol, rtol=rtol), f"{name}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_refinement_module_meets_the_golden_tolerance(backend, ref, _graphs):
    golden = np.load(ref / "golden_refinement.npz")
    for c in (2, 19):
        module = build_refinement_magnet(c)
        module.load_state_dict(fill_state_dict(ref / f"refinement_c{c}_state_dict_manifest.tsv"), strict=True)
        module.runtime = ModuleRuntime(module, backend, _graphs, refinement_graphs(c), "magnet-refine")
        first = torch.from_numpy(golden[f"c{c}_input_first"])
        second = torch.from_numpy(golden[f"c{c}_input_second"])
        with torch.inference_mode():
            logits = module(first, second)
            batch = module(torch.cat([first, second]), torch.cat([second, first]))  # batch 2
        _within(f"c{c} logits", logits, golden[f"c{c}_output_logits"], 1e-5, 1e-4)
        with torch.inference_mode():
            module.runtime = None
            want = module(torch.cat([first, second]), torch.cat([second, first]))
        assert float((batch - want).abs().max()) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("case", "manifest", "atol"), [  # exports take 10-30 s: one case runs by default
    pytest.param("hrnet", "hrnet18_ocr_c19", 2e-4, marks=pytest.mark.slow),
    pytest.param("fpn", "resnet50_fpn_c7", 5e-5, marks=pytest.mark.slow),
    ("fpnodd", "resnet50_fpn_c7", 5e-5)])
def test_backbones_meet_the_golden_tolerance(backend, case, manifest, atol, ref, _graphs):
    from refine_cli.models.hrnet_ocr import build_hrnet18_ocr
    from refine_cli.models.resnet_fpn import build_resnet50_fpn

    golden = np.load(ref / "golden_backbones.npz")
    model = build_hrnet18_ocr(19) if case == "hrnet" else build_resnet50_fpn(7)
    model.load_state_dict(fill_state_dict(ref / f"{manifest}_state_dict_manifest.tsv"), strict=True)
    model.eval().runtime = ModuleRuntime(model, backend, _graphs, BACKBONE_GRAPHS, "backbone")
    with torch.inference_mode():
        out = model.logits(torch.from_numpy(golden[f"{case}_input"]))
    _within(f"{case} output", out, golden[f"{case}_output"], atol, 1e-4)


def test_magnet_fast_runs_its_modules_in_the_backend(cli, tmp_path, shared):
    """``--backend onnx`` takes the refinement module (and is reported); the mask is the torch run's."""
    from refine_cli import weights as registry

    if not installed("onnx"):
        pytest.skip("onnxruntime is not installed")
    selfie = shared / "weights" / "mediapipe-selfie-segmentation" / "selfie_segmentation.tflite"
    if not selfie.is_file():
        pytest.skip(f"absent: {selfie}")
    registry.import_file("mediapipe-selfie", selfie)  # as after `refine weights fetch`
    import cv2

    image = tmp_path / "scene.png"  # the sample at a third of its size: three scales, a few seconds
    big = cv2.imread(str(SAMPLES / "scene.jpg"))
    cv2.imwrite(str(image), cv2.resize(big, (big.shape[1] // 3, big.shape[0] // 3), interpolation=cv2.INTER_AREA))
    masks = {}
    for backend in ("torch", "onnx"):
        out, report = tmp_path / f"{backend}.png", tmp_path / f"{backend}.json"
        code, _, err = cli("run", str(image), "--method", "magnet-fast", "--preset", "binary",
                           "--backend", backend, "-o", str(out), "--report", str(report), "-q")
        assert code == 0, err
        import json

        assert json.loads(report.read_text())["refiner"]["backend"] == backend
        masks[backend] = cv2.imread(str(out), cv2.IMREAD_UNCHANGED) > 127
    a, b = masks["torch"], masks["onnx"]
    iou = (a & b).sum() / max(1, (a | b).sum())
    assert iou >= 0.999, iou


def test_auto_takes_the_faster_engine_for_magnet():
    """``auto`` runs MagNet's networks in OpenVINO first (measured faster for them), then ONNX Runtime."""
    from types import SimpleNamespace

    from refine_cli.models.runtime import MAGNET_ORDER
    from refine_cli.refiners.magnet_method import attach_runtimes

    module = build_refinement_magnet(2)
    segmenter = SimpleNamespace(device=torch.device("cpu"), input_size=(256, 256))
    want = next((b for b in MAGNET_ORDER if installed(b)), "torch")
    assert MAGNET_ORDER[0] == "openvino"
    assert attach_runtimes([module], segmenter, "auto") == want
    assert (module.runtime is None) == (want == "torch")
    assert attach_runtimes([build_refinement_magnet(2)], segmenter, "torch") == "torch"
