"""CPU inference engines (``--backend onnx|openvino``): torch fp32's outputs, within stated tolerances.

Tolerances: probabilities within 1e-4 absolute of torch on the lite weights at odd sizes and batches; on the
golden inputs of the official architecture (deterministic fill weights) within the golden test's own
CPU tolerance (5e-5 on probabilities); end to end on a sample, the binary mask's IoU with the torch run
>= 0.999.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from cascade_fixtures import TINY
from torch import nn

from refine_cli.config import CascadeOptions
from refine_cli.errors import UsageError
from refine_cli.models import runtime
from refine_cli.models.runtime import CascadeRuntime, MatrixPool, installed, pool_matrix, resolve_backend

BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not installed(b), reason=f"{b} is not installed"))
            for b in ("onnx", "openvino")]
SAMPLES = Path(__file__).resolve().parents[1] / "samples"
PROB_TOL = 1e-4
GOLDEN_PRED_TOL = 5e-5  # tests/test_cascadepsp_model.py CPU_TOL["pred_abs"]


@pytest.mark.parametrize(("n", "out"), [(80, 1), (80, 3), (80, 6), (53, 6), (7, 6), (6, 6), (117, 2)])
def test_matrix_pool_equals_adaptive_average_pooling(n, out):
    x = torch.randn(2, 5, n, n + 3)
    want = nn.AdaptiveAvgPool2d(out)(x)
    assert torch.allclose(MatrixPool(out)(x), want, atol=1e-6, rtol=1e-6)
    assert pool_matrix(n, out, torch.float32).sum(1).sub(1).abs().max() < 1e-6


def test_backend_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cuda, "fp32") == "torch"
    assert resolve_backend("auto", cpu, "bf16") == "torch"
    assert resolve_backend("auto", cpu, "fp32") == next(
        (b for b in ("onnx", "openvino") if installed(b)), "torch")
    assert resolve_backend("torch", cuda, "fp16") == "torch"
    with pytest.raises(UsageError, match="--backend"):
        resolve_backend("tensorrt", cpu, "fp32")
    with pytest.raises(UsageError, match="--backend torch with --device cuda"):
        resolve_backend("onnx", cuda, "fp32")
    with pytest.raises(UsageError, match="--precision fp32"):
        resolve_backend("onnx", cpu, "bf16")


def test_a_missing_backend_says_what_to_install(monkeypatch):
    monkeypatch.setattr(runtime, "installed", lambda b: b == "torch")
    with pytest.raises(UsageError, match="pip install openvino"):
        resolve_backend("openvino", torch.device("cpu"), "fp32")
    assert resolve_backend("auto", torch.device("cpu"), "fp32") == "torch"


def _lite_model() -> nn.Module:
    from refine_cli.refiners.cascade_method import load_cascade_model

    model, _, _ = load_cascade_model(CascadeOptions(), "cpu", backend="torch")
    return model


def _inputs(n: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    im = torch.randn(n, 3, h, w, generator=g)
    seg = torch.tanh(3 * torch.randn(n, 1, h, w, generator=g))
    inter = torch.tanh(3 * torch.randn(n, 1, h, w, generator=g))
    return im, seg, inter


@pytest.mark.parametrize("backend", BACKENDS)
def test_lite_outputs_match_torch_at_any_size(backend, _graphs):
    model = _lite_model()
    rt = CascadeRuntime(model, backend, _graphs)  # the session's graphs: exported once for both backends
    for n, h, w in ((1, 64, 96), (2, 200, 328), (1, 336, 248)):
        im, seg, inter = _inputs(n, h, w)
        with torch.inference_mode():
            for args in ((im, seg), (im, seg, inter)):
                want = model(*args)
                got = rt(*args)
                for key in runtime.OUTPUTS:
                    assert got[key].shape == (n, 1, h, w)
                    diff = float((got[key] - want[key]).abs().max())
                    assert diff <= PROB_TOL, (backend, (n, h, w), len(args), key, diff)


@pytest.mark.parametrize("backend", BACKENDS)
def test_official_architecture_meets_the_golden_tolerance(backend, shared, _graphs):
    from refine_cli.devtools.fill_cascadepsp import fill_state_dict
    from refine_cli.models.cascadepsp import cascadepsp_official

    golden_file = shared / "reference" / "cascadepsp" / "golden_forward.npz"
    if not golden_file.exists():
        pytest.skip(f"golden file absent: {golden_file}")
    golden = dict(np.load(golden_file))
    model = cascadepsp_official()
    model.load_state_dict(fill_state_dict(), strict=True)
    model.eval().runtime = CascadeRuntime(model, backend, _graphs)
    im, seg = torch.from_numpy(golden["in_im"]), torch.from_numpy(golden["in_seg"])
    with torch.inference_mode():
        for mode, extra in (("a", ()), ("b", (torch.from_numpy(golden["in_inter_s8"]),))):
            out = model(im, seg, *extra)
            assert sorted(out) == sorted(runtime.OUTPUTS)  # the runtime answered, not torch
            for key in runtime.OUTPUTS:
                diff = float(np.abs(out[key].numpy() - golden[f"{mode}_{key}"]).max())
                assert diff <= GOLDEN_PRED_TOL, (backend, mode, key, diff)


@pytest.mark.parametrize("backend", BACKENDS)
def test_graphs_are_exported_once_per_weights_and_reused(backend, tmp_path, monkeypatch):
    model = _lite_model()
    im, seg, _ = _inputs(1, 64, 64)
    with torch.inference_mode():
        CascadeRuntime(model, backend, tmp_path)(im, seg)
    assert sorted(p.name.split("-")[-1] for p in tmp_path.glob("*.onnx")) == ["global.onnx"]

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(runtime, "export_onnx", no_export)
    with torch.inference_mode():
        again = CascadeRuntime(model, backend, tmp_path)
        again(im, seg)
    assert again.graph_path("global").is_file()
    other = _lite_model()
    with torch.no_grad():
        next(other.parameters()).add_(1)
    assert CascadeRuntime(other, backend, tmp_path).key != again.key  # new weights, new graphs


def test_the_graph_key_tells_architectures_with_the_same_weights_apart():
    from refine_cli.models.cascadepsp_lite import cascadepsp_lite

    arch = {**TINY, "depths": (1, 1, 2)}  # stage 3's second block takes the dilation
    a = cascadepsp_lite(**arch).eval()
    b = cascadepsp_lite(**{**arch, "dilation": 4}).eval()
    b.load_state_dict(a.state_dict(), strict=True)  # a dilation changes no weight shape
    assert runtime.weights_key(a) != runtime.weights_key(b)
    assert runtime.weights_key(a) == runtime.weights_key(copy.deepcopy(a))


def test_training_and_reduced_precision_stay_in_torch():
    model = _lite_model()

    def fail(*args, **kwargs):
        raise AssertionError("the runtime ran")

    model.runtime = fail
    im, seg, inter = _inputs(1, 64, 64)
    assert len(model(im, seg)) == 12  # autograd on: torch, every output
    with torch.inference_mode():
        assert len(model(im, seg, inter, inter)) == 6  # inter_s4 is torch's
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert len(model(im, seg)) == 12


def _cascade_scene_mask(cli, out: Path, backend: str) -> np.ndarray:
    """``refine run --method cascade --backend BACKEND`` on the sample scene: the ``(H, W)`` bool mask."""
    import cv2

    code, _, err = cli("run", SAMPLES / "scene.jpg", "--mask", SAMPLES / "scene_coarse.png", "-o", out,
                       "--method", "cascade", "--backend", backend, "-q")
    assert code == 0, err
    return cv2.imread(str(out), cv2.IMREAD_GRAYSCALE) > 127


@pytest.fixture(scope="module")
def torch_scene_mask(tmp_path_factory) -> np.ndarray:
    """The torch run's mask, once for every backend compared with it (in a weights cache of its own)."""
    from refine_cli.cli import main

    def run(*args) -> tuple[int, str, str]:
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            return int(exc.code or 0), "", "see the captured stderr"
        return 0, "", ""

    folder = tmp_path_factory.mktemp("torch-scene")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFINE_HOME", str(folder / "home"))
        return _cascade_scene_mask(run, folder / "torch.png", "torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_refine_run_gives_the_torch_mask(backend, cli, tmp_path, torch_scene_mask):
    from refine_cli.weights import refine_home

    a, b = torch_scene_mask, _cascade_scene_mask(cli, tmp_path / f"{backend}.png", backend)
    assert (a & b).sum() / (a | b).sum() >= 0.999
    assert list((refine_home() / "graphs").glob("*.onnx"))  # the graphs went to the cache


def test_unknown_backend_is_one_line(cli, tmp_path):
    code, _, err = cli("run", SAMPLES / "scene.jpg", "--mask", SAMPLES / "scene_coarse.png",
                       "-o", tmp_path / "o.png", "--method", "cascade", "--backend", "tensorrt")
    assert code == 2 and "--backend" in err and "Traceback" not in err


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_damaged_graph_is_exported_again(backend, tmp_path):
    model = _lite_model()
    im, seg, _ = _inputs(1, 64, 64)
    rt = CascadeRuntime(model, backend, tmp_path)
    rt.graph_path("global").write_bytes(b"not an onnx file")
    with torch.inference_mode():
        out = rt(im, seg)
        want = model(im, seg)
    assert float((out["pred_224"] - want["pred_224"]).abs().max()) <= PROB_TOL
    assert rt.graph_path("global").stat().st_size > 10_000  # replaced by a real graph


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_unwritable_cache_exports_to_a_temporary_folder(backend, tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    model = _lite_model()
    im, seg, _ = _inputs(1, 64, 64)
    rt = CascadeRuntime(model, backend, blocker / "graphs")
    with torch.inference_mode(), caplog.at_level("WARNING", logger="refine_cli.models.runtime"):
        out = rt(im, seg)
        want = model(im, seg)
    assert float((out["pred_224"] - want["pred_224"]).abs().max()) <= PROB_TOL
    assert "temporary folder" in caplog.text


@pytest.mark.skipif(not installed("openvino"), reason="openvino is not installed")
def test_openvino_is_imported_without_its_telemetry(tmp_path):
    """Importing openvino sends usage events and writes a client id under ~/intel; refine's import turns
    that off (the telemetry singleton declines, nothing is written to HOME) and leaves the environment as
    it was."""
    import os
    import subprocess
    import sys

    code = ("import os, openvino_telemetry as tm; from refine_cli.models.runtime import import_openvino; "
            "import_openvino().Core(); print(tm.Telemetry().consent, os.environ.get('CI'))")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["HOME"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "None"]
    assert not any(tmp_path.iterdir())  # no ~/intel/openvino_ga_cid, no stats
