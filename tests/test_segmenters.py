"""Segmenters: TorchScript / ONNX / TFLite backends, sidecar errors, the official backbones, registry records.

Models are made in ``tmp_path`` (a tiny conv net, traced or exported), so these run
offline. Optional backends are skipped with a reason when their package is missing
(``pip install "refine-cli[onnx]"`` / ``"refine-cli[tflite]"``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from refine_cli import weights as registry
from refine_cli.errors import DependencyError, InputError, UsageError, WeightsError
from refine_cli.segmenters import list_segmenters, load_segmenter
from refine_cli.segmenters.base import sidecar_candidates
from refine_cli.weights.magnet import MAGNET_RECORDS

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
HAS_LITERT = importlib.util.find_spec("ai_edge_litert") is not None
SELFIE = "weights/mediapipe-selfie-segmentation/selfie_segmentation.tflite"
PORTRAIT = "p_514ca06a"  # MediaPipe reached IoU 0.975 on it (data README)

MEAN = [0.5, 0.4, 0.3]
STD = [0.2, 0.25, 0.3]


class TinySeg(nn.Module):
    """3 -> C logits with a 3x3 conv, optionally at half resolution."""

    def __init__(self, classes: int, half: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, 3, padding=1, stride=2 if half else 1)
        with torch.no_grad():
            self.conv.weight.mul_(4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _images(n: int = 2, h: int = 24, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _reference(model: nn.Module, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.softmax(model(x), dim=1).numpy()


def _sidecar(path: Path, **over: object) -> Path:
    meta = {"input_size": [40, 24], "classes": ["a", "b", "c"], "mean": MEAN, "std": STD, "layout": "NCHW",
            "output": "logits"}
    meta.update(over)
    side = path.with_name(path.name + ".json")
    side.write_text(json.dumps(meta))
    return side


def _torchscript(tmp_path: Path, model: nn.Module, name: str = "seg.pt") -> Path:
    path = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(model.eval(), torch.zeros(1, 3, 24, 40)).save(str(path))
    return path


# --------------------------------------------------------------------------- TorchScript


def test_torchscript_matches_the_model(tmp_path):
    model = TinySeg(3)
    path = _torchscript(tmp_path, model)
    _sidecar(path)
    seg = load_segmenter(path, "cpu")
    assert seg.input_size == (40, 24) and seg.classes == ("a", "b", "c") and seg.num_classes == 3
    images = _images()
    probs = seg.predict(images)
    assert probs.shape == (2, 3, 24, 40) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, _reference(model, images), atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    t = seg.predict_torch(torch.from_numpy(images))
    assert t.device.type == "cpu" and torch.allclose(t, torch.from_numpy(probs))


def test_torchscript_one_channel_and_low_resolution_outputs(tmp_path):
    one = TinySeg(1)
    path = _torchscript(tmp_path, one, "one.pt")
    _sidecar(path, classes=["background", "person"])
    seg = load_segmenter(path, "cpu")
    images = _images(1)
    probs = seg.predict(images)
    x = (torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255 - torch.tensor(MEAN).view(1, 3, 1, 1))
    x = x / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        p = torch.sigmoid(one(x)).numpy()
    np.testing.assert_allclose(probs[:, 1:], p, atol=1e-6)
    np.testing.assert_allclose(probs[:, :1], 1 - p, atol=1e-6)

    half = TinySeg(3, half=True)
    path = _torchscript(tmp_path, half, "half.pt")
    _sidecar(path)
    out = load_segmenter(path, "cpu").predict(images)
    assert out.shape == (1, 3, 24, 40)  # resized from 12x20 to the input size
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


def test_segment_window_resizes_both_ways(tmp_path):
    path = _torchscript(tmp_path, TinySeg(3))
    _sidecar(path)
    seg = load_segmenter(path, "cpu")
    image = _images(1, 61, 97)[0]
    probs = seg.segment_window(image)
    assert probs.shape == (61, 97, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)
    small = seg.predict(seg.resize(image, seg.input_size)[None])[0]
    # the centre of each input pixel maps back onto the same values (bilinear of a smooth map)
    assert abs(float(probs.mean()) - float(small.mean())) < 1e-2


# --------------------------------------------------------------------------- sidecar errors


def test_missing_sidecar_names_the_expected_path(tmp_path):
    path = _torchscript(tmp_path, TinySeg(3))
    with pytest.raises(InputError) as err:
        load_segmenter(path, "cpu")
    assert str(sidecar_candidates(path)[0]) in str(err.value)
    assert "input_size" in str(err.value)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "not valid JSON"),
        ('["input_size"]', "JSON object"),
        ('{"classes": ["a", "b"]}', "missing 'input_size'"),
        ('{"input_size": [40], "classes": ["a", "b"]}', "[width, height]"),
        ('{"input_size": [40, 24], "classes": ["a"]}', "at least 2"),
        ('{"input_size": [40, 24], "classes": ["a", "b"], "layout": "CHW"}', "NCHW or NHWC"),
        ('{"input_size": [40, 24], "classes": ["a", "b"], "std": [1, 0, 1]}', "std > 0"),
        ('{"input_size": [40, 24], "classes": ["a", "b"], "colour": "rgb"}', "unknown keys"),
    ],
)
def test_bad_sidecar_is_an_input_error(tmp_path, content, needle):
    path = _torchscript(tmp_path, TinySeg(3))
    side = path.with_name(path.name + ".json")
    side.write_text(content)
    with pytest.raises(InputError) as err:
        load_segmenter(path, "cpu")
    assert str(side) in str(err.value) and needle in str(err.value)


def test_class_count_mismatch_is_reported_at_predict(tmp_path):
    path = _torchscript(tmp_path, TinySeg(3))
    _sidecar(path, classes=["a", "b", "c", "d"])
    seg = load_segmenter(path, "cpu")
    with pytest.raises(InputError, match="returned 3 channels but declares 4 classes"):
        seg.predict(_images(1))
    with pytest.raises(InputError, match="takes 40x24 images"):
        seg.predict(_images(1, 20, 20))


def test_unknown_names_and_non_models(tmp_path):
    with pytest.raises(UsageError, match="mediapipe-selfie"):
        load_segmenter("no-such-segmenter")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip archive")
    _sidecar(junk)
    with pytest.raises(InputError, match="not a TorchScript archive"):
        load_segmenter(junk, "cpu")
    assert set(list_segmenters()) == {"magnet-cityscapes-hrnet", "magnet-deepglobe-fpn", "mediapipe-selfie"}


# --------------------------------------------------------------------------- ONNX


@pytest.mark.skipif(not HAS_ONNX, reason='onnx/onnxruntime missing (pip install "refine-cli[onnx]" onnx)')
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_onnx_matches_the_model(tmp_path, layout):
    model = TinySeg(3).eval()

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if layout == "NHWC":
                return self.inner(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            return self.inner(x)

    path = tmp_path / "seg.onnx"
    example = torch.zeros((1, 24, 40, 3) if layout == "NHWC" else (1, 3, 24, 40))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapped().eval(), (example,), str(path), dynamo=False, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "n"}, "logits": {0: "n"}})
    _sidecar(path, layout=layout)
    seg = load_segmenter(path, "cpu")
    images = _images(3)
    np.testing.assert_allclose(seg.predict(images), _reference(model, images), atol=2e-5)


def test_missing_onnxruntime_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    path = tmp_path / "seg.onnx"
    path.write_bytes(b"x")
    with pytest.raises(DependencyError, match=r'pip install "refine-cli\[onnx\]"'):
        load_segmenter(path)


# --------------------------------------------------------------------------- TFLite person segmenter


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.mark.skipif(not HAS_LITERT, reason='ai-edge-litert not installed (pip install "refine-cli[tflite]")')
def test_selfie_segmenter_on_a_real_portrait(shared):
    import cv2

    image = cv2.cvtColor(cv2.imread(str(shared / f"data/p3m-portraits-pseudogt/image/{PORTRAIT}.jpg")),
                         cv2.COLOR_BGR2RGB)
    alpha_path = shared / f"data/p3m-portraits-pseudogt/alpha_p3mnet/{PORTRAIT}.png"
    alpha = cv2.imread(str(alpha_path), cv2.IMREAD_GRAYSCALE)
    seg = load_segmenter(shared / SELFIE)  # recognised by its sha256: no sidecar needed
    assert seg.classes == ("background", "person") and seg.input_size == (256, 256)
    probs = seg.segment_window(image)
    assert probs.shape == (*image.shape[:2], 2)
    iou = _iou(probs[..., 1] >= 0.5, alpha > 127)
    assert iou > 0.9, f"IoU {iou:.3f} against the alpha matte"
    # the background class is the complement, and a blank image is not a person
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)
    assert seg.predict(np.zeros((1, 256, 256, 3), np.uint8))[0, 1].mean() < 0.1


@pytest.mark.skipif(not HAS_LITERT, reason='ai-edge-litert not installed (pip install "refine-cli[tflite]")')
def test_selfie_through_the_registry(shared, monkeypatch):
    for record in MAGNET_RECORDS:
        monkeypatch.setitem(registry._REGISTRY, record.name, record)
    with pytest.raises(WeightsError, match="refine weights fetch mediapipe-selfie"):
        load_segmenter("mediapipe-selfie")
    registry.import_file("mediapipe-selfie", shared / SELFIE)  # checks size and sha256 against the record
    seg = load_segmenter("mediapipe-selfie")
    assert seg.describe()["weights_sha256"] == registry.get_record("mediapipe-selfie").sha256


def test_missing_litert_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    path = tmp_path / "seg.tflite"
    path.write_bytes(b"x")
    with pytest.raises(DependencyError, match=r"pip install ai-edge-litert"):
        load_segmenter(path)


# --------------------------------------------------------------------------- official backbones


def _fill_backbone_checkpoint(shared: Path, tmp_path: Path) -> Path:
    from refine_cli.devtools.fill_magnet import fill_state_dict

    fill = fill_state_dict(shared / "reference/magnet/hrnet18_ocr_c19_state_dict_manifest.tsv")
    sd = OrderedDict(("model." + k, v) for k, v in fill.items())
    sd["loss.criterion.weight"] = torch.ones(19)  # the trainer's class weights, ignored by name
    path = tmp_path / "cityscapes_hrnet.pth"
    torch.save(sd, path)
    return path


def test_backbone_checkpoint_loads_by_name_strictly(shared, tmp_path):
    from refine_cli.devtools.fill_magnet import fill_state_dict
    from refine_cli.segmenters.torch_backbones import CITYSCAPES_CLASSES, load_backbone_segmenter

    ckpt = _fill_backbone_checkpoint(shared, tmp_path)
    seg = load_backbone_segmenter("magnet-cityscapes-hrnet", "cpu", weights=str(ckpt))
    assert seg.input_size == (256, 128) and seg.classes == CITYSCAPES_CLASSES and seg.num_classes == 19
    fill = fill_state_dict(shared / "reference/magnet/hrnet18_ocr_c19_state_dict_manifest.tsv")
    got = seg.model.state_dict()
    assert list(got) == list(fill) and all(torch.equal(got[k], fill[k]) for k in fill)
    assert seg.describe()["weights"].endswith("cityscapes_hrnet.pth")


def test_backbone_segmenter_normalises_and_takes_the_softmax():
    from refine_cli.models.magnet import ImageBackbone
    from refine_cli.segmenters.torch_backbones import TorchBackboneSegmenter

    class Linear(ImageBackbone):
        def __init__(self) -> None:
            super().__init__()
            self.num_classes = 2
            self.conv = nn.Conv2d(3, 2, 1)
            with torch.no_grad():
                self.conv.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0]]).view(2, 3, 1, 1))
                self.conv.bias.zero_()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    model = Linear()
    seg = TorchBackboneSegmenter(model, (40, 24), ("a", "b"), "linear", "cpu")
    images = _images(2)
    x = (images.astype(np.float64) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    logits = np.stack([x @ [1.0, -2.0, 0.5], x @ [0.0, 1.0, -1.0]], axis=1)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(seg.predict(images), expected, atol=1e-5)
    with pytest.raises(InputError):
        seg.predict(images[:, :, :20])


@pytest.mark.slow
def test_hrnet_segmenter_reproduces_the_golden_softmax(shared, tmp_path):
    from refine_cli.segmenters.torch_backbones import load_backbone_segmenter

    golden = np.load(shared / "reference/magnet/golden_backbones.npz")
    ckpt = _fill_backbone_checkpoint(shared, tmp_path)
    seg = load_backbone_segmenter("magnet-cityscapes-hrnet", "cpu", weights=str(ckpt))
    probs = seg.predict(golden["hrnet_image_u8"][None])
    expected = torch.softmax(torch.from_numpy(golden["hrnet_output"]), dim=1).numpy()
    np.testing.assert_allclose(probs, expected, atol=2e-5)


def test_backbone_checkpoint_mismatch_names_keys(shared, tmp_path):
    from refine_cli.segmenters.torch_backbones import load_backbone_segmenter

    bad = tmp_path / "bad.pth"
    torch.save({"model.conv1.weight": torch.zeros(64, 3, 3, 3)}, bad)
    with pytest.raises(WeightsError, match="missing"):
        load_backbone_segmenter("magnet-deepglobe-fpn", "cpu", weights=str(bad))


# --------------------------------------------------------------------------- registry records


def test_magnet_records_are_complete(shared):
    names = [r.name for r in MAGNET_RECORDS]
    assert len(names) == len(set(names)) and not set(names) & {"cascadepsp"}
    from refine_cli.refiners.magnet import PRESETS

    for preset in PRESETS.values():
        assert preset.segmenter in names and set(preset.refinement) <= set(names)
    for r in MAGNET_RECORDS:
        assert r.license and r.notes and r.filename and r.architecture
        if r.name.startswith("magnet-") and r.name != "magnet-binary-refine":
            assert r.url and "drive" in r.url and "AGPL-3.0" in r.license and "no stated license" in r.license
            assert r.sha256 is None and r.size is None  # never published
    selfie = next(r for r in MAGNET_RECORDS if r.name == "mediapipe-selfie")
    digests = registry.file_digests(shared / SELFIE)
    assert (digests.size, digests.sha256) == (selfie.size, selfie.sha256)
    assert selfie.url and selfie.url.startswith("https://storage.googleapis.com/mediapipe-assets/")
    assert "Apache-2.0" in selfie.license


# --------------------------------------------------------------------------- refine segment


def _segment_app():
    import typer

    from refine_cli.commands import segment

    app = typer.Typer()
    app.add_typer(segment.app, name="segment")

    @app.command()
    def other() -> None:  # a second command keeps `segment` a sub-command, as in the real CLI
        """Unused."""

    return app


def test_segment_command_writes_a_mask_run_accepts(tmp_path):
    import tifffile
    from typer.testing import CliRunner

    from refine_cli.commands.segment import output_shape
    from refine_cli.io.masks import check_mask_shape
    from tests.conftest import write_png

    model = _torchscript(tmp_path, TinySeg(3))
    _sidecar(model)
    image = _images(1, 120, 200, seed=3)[0]
    src = write_png(tmp_path / "img.png", image)
    out = tmp_path / "coarse.tif"
    args = ["segment", str(src), "--segmenter", str(model)]
    result = CliRunner().invoke(_segment_app(), [*args, "-o", str(out), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["mask_size"] == [40, 24] and facts["kind"] == "labels"
    assert facts["classes"] == ["a", "b", "c"]
    labels = tifffile.imread(out)
    assert labels.shape == output_shape((120, 200), (40, 24)) == (24, 40) and labels.dtype == np.uint8
    check_mask_shape(labels.shape, (120, 200), str(out))  # what `refine run --mask` requires
    seg = load_segmenter(model, "cpu")
    import cv2

    small = cv2.resize(image, (40, 24), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(labels, seg.segment_window(small).argmax(-1))

    soft = tmp_path / "soft.tif"
    result = CliRunner().invoke(_segment_app(), [*args, "-o", str(soft), "--soft", "-q"])
    assert result.exit_code == 0, result.output
    probs = tifffile.imread(soft)
    assert probs.shape == (24, 40, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
    result = CliRunner().invoke(_segment_app(), [*args, "-o", str(out)])
    assert result.exit_code != 0 and "exists" in str(result.exception)


def test_output_shape_keeps_the_aspect_ratio():
    from refine_cli.commands.segment import output_shape
    from refine_cli.io.masks import check_mask_shape

    for hw, size in [((1080, 1920), (256, 256)), ((1024, 2048), (256, 128)), ((7001, 333), (508, 508)),
                     ((100, 80), (256, 256))]:
        shape = output_shape(hw, size)
        check_mask_shape(shape, hw, "m")
        assert shape[0] <= hw[0] and shape[1] <= hw[1]
        assert shape[0] >= min(size[1], hw[0]) or shape[1] >= min(size[0], hw[1])
    assert output_shape((1080, 1920), (256, 256)) == (256, 455)


@pytest.mark.parametrize("classes", [2, 3])
def test_run_with_a_segmenter_makes_the_coarse_mask_first(tmp_path, classes):
    """``refine run IMG --segmenter FILE --method M`` (no --mask): the segmenter's output is the coarse
    mask (probabilities for 2 classes, a label map for more), kept with --save-coarse, reported, and
    shown as a progress stage; without --save-coarse nothing but the outputs is left behind."""
    import tifffile

    from refine_cli.api import refine_file
    from refine_cli.config import RefineConfig
    from tests.conftest import write_png

    names = ["background", "person"] if classes == 2 else ["a", "b", "c"]
    model = _torchscript(tmp_path, TinySeg(classes))
    _sidecar(model, classes=names)
    image = _images(1, 120, 200, seed=5)[0]
    src = write_png(tmp_path / "img.png", image)
    seen: list[tuple[str, int, int]] = []
    cfg = RefineConfig(method="guided", segmenter=str(model), device="cpu")
    rep = refine_file(str(src), None, str(tmp_path / "out.tif"), config=cfg,
                      save_coarse=str(tmp_path / "c.tif"), progress=lambda *a: seen.append(a))
    coarse = tifffile.imread(tmp_path / "c.tif")
    assert coarse.shape == (24, 40)
    assert coarse.dtype == (np.float32 if classes == 2 else np.uint8)
    assert rep.mask["made_by"]["segmenter"] == str(model) and rep.mask["path"] == str(tmp_path / "c.tif")
    assert rep.mask["kind"] == ("soft" if classes == 2 else "labels")
    assert ("segmenter", 0, 0) in seen and ("segmenter", 1, 1) in seen
    assert seen.index(("segmenter", 1, 1)) < min(i for i, a in enumerate(seen) if a[0].endswith("tiles"))
    out = tifffile.imread(tmp_path / "out.tif")
    assert out.shape == (120, 200)
    # known answer: the same as segmenting first and refining the saved mask in a second run
    two_step = refine_file(str(src), str(tmp_path / "c.tif"), str(tmp_path / "two.tif"),
                           config=RefineConfig(method="guided", device="cpu"))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "two.tif"), out)
    assert two_step.mask["kind"] == rep.mask["kind"] and 0 < (out > 0).mean() < 1
    # the same run without --save-coarse equals it and leaves no coarse file anywhere
    rep2 = refine_file(str(src), None, str(tmp_path / "out2.tif"), config=cfg)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out2.tif"), out)
    assert rep2.mask["path"] is None and rep2.outputs["coarse"] is None
    assert sorted(p.name for p in tmp_path.iterdir() if "coarse" in p.name or p.name.startswith(".")) == []


def test_run_with_a_segmenter_removes_the_saved_coarse_mask_when_refining_fails(tmp_path, monkeypatch):
    """The run's outputs are one unit: a failure after the segmenter leaves no --save-coarse file."""
    from refine_cli import api
    from refine_cli.config import RefineConfig
    from tests.conftest import write_png

    model = _torchscript(tmp_path, TinySeg(2))
    _sidecar(model, classes=["background", "person"])
    src = write_png(tmp_path / "img.png", _images(1, 120, 200, seed=5)[0])

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(api, "run_levels", boom)
    with pytest.raises(OSError):
        api.refine_file(str(src), None, str(tmp_path / "out.tif"), config=RefineConfig(segmenter=str(model)),
                        save_coarse=str(tmp_path / "c.png"))
    assert not (tmp_path / "c.png").exists() and not (tmp_path / "out.tif").exists()
