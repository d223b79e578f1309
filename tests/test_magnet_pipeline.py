"""The whole-image MagNet / MagNet-Fast pipeline with fill-rule weights and a deterministic segmenter.

Small schedules (segmenter input 48x32, image 384x256: stages 48x32 -> 96x64 -> 192x128 ->
384x256) keep this file fast on CPU. Every check recomputes the expected value
independently (numpy sorting for top-k, box means for patch ranking) from the traced
intermediates of :func:`run_magnet`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from magnet_fixtures import ColourSegmenter, fill_module
from refine_cli import weights as registry
from refine_cli.devtools.fill_magnet import fill_state_dict, module_entries
from refine_cli.errors import InputError, UsageError, WeightsError
from refine_cli.models.magnet import build_refinement_magnet
from refine_cli.refiners.base import Scene, TileInput
from refine_cli.refiners.magnet import (
    OFFICIAL_INSET,
    PRESETS,
    MagnetPreset,
    MagnetRefiner,
    coarse_to_probs,
    generic_scales,
    load_refinement_modules,
    run_magnet,
)
from refine_cli.tiling.grid import Window
from refine_cli.weights_magnet import MAGNET_RECORDS

C = 3
INPUT = (48, 32)  # (w, h)
IMAGE_HW = (256, 384)


def _image(hw: tuple[int, int] = IMAGE_HW, seed: int = 7) -> np.ndarray:
    """Blocky random colours with a smooth gradient, so patches differ in uncertainty."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (hw[0] // 16 + 1, hw[1] // 16 + 1, 3)).astype(np.float32)
    img = np.repeat(np.repeat(blocks, 16, 0), 16, 1)[: hw[0], : hw[1]]
    ramp = np.linspace(-60, 60, hw[1], dtype=np.float32)[None, :, None]
    return np.clip(img + ramp, 0, 255).astype(np.uint8)


def _module(classes: int = C) -> nn.Module:
    return fill_module(classes)


def _preset(**over: object) -> MagnetPreset:
    base = dict(name="test", segmenter="colour", num_classes=C, input_size=INPUT, crop_size=None, scales=None,
                fast_scales=None, n_patches=3, n_points=500, kernel=3, refinement=("fill",))
    base.update(over)
    return MagnetPreset(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fast_run():
    seg = ColourSegmenter()
    return seg, run_magnet(_image(), seg, [_module()], _preset(), trace=True)


# --------------------------------------------------------------------------- schedules


def test_generic_schedule_doubles_up_to_the_image():
    assert generic_scales((1024, 2048), (256, 128)) == [(256, 128), (512, 256), (1024, 512), (2048, 1024)]
    four_k = [(256, 256), (480, 270), (960, 540), (1920, 1080), (3840, 2160)]
    assert generic_scales((2160, 3840), (256, 256)) == four_k
    assert generic_scales((100, 120), (256, 256)) == [(256, 256), (120, 100)]  # small: one full-res stage
    assert generic_scales(IMAGE_HW, INPUT) == [(48, 32), (96, 64), (192, 128), (384, 256)]


def test_preset_schedules_follow_the_paper():
    city = PRESETS["cityscapes"]
    fast = city.schedule((1024, 2048), fast=True)
    assert [p.scale for p in fast.stages] == [(256, 128), (512, 256), (2048, 1024)]
    assert [p.refinement for p in fast.stages] == [-1, 0, 2]  # 512 and 2048 checkpoints
    assert [p.n_patches for p in fast.stages] == [None, 3, 3] and fast.kernel == 5
    full = city.schedule((1024, 2048), fast=False)
    assert [p.scale for p in full.stages] == [(256, 128), (512, 256), (1024, 512), (2048, 1024)]
    assert [p.refinement for p in full.stages] == [-1, 0, 1, 2]
    assert all(p.n_patches is None for p in full.stages)
    glob = PRESETS["deepglobe"].schedule((2448, 2448))
    assert [p.scale for p in glob.stages] == [(612, 612), (1224, 1224), (2448, 2448)]
    assert {p.crop for p in glob.stages} == {(612, 612)}
    assert glob.kernel == 11 and glob.input_size == (508, 508)
    assert all(p.n_points == 2**16 for p in fast.stages + glob.stages)


# --------------------------------------------------------------------------- MagNet-Fast run


def test_stage_shapes_and_counts(fast_run):
    _, res = fast_run
    assert [s.scale for s in res.stages] == [(48, 32), (96, 64), (192, 128), (384, 256)]
    assert [s.patches_total for s in res.stages] == [1, 4, 16, 64]
    assert len(res.trace) == 3
    for st, tr in zip(res.stages[1:], res.trace, strict=True):
        w, h = st.scale
        assert tr.y.shape == tr.y_out.shape == tr.r.shape == (1, C, h, w)
        assert tr.yu.shape == tr.score.q.shape == (1, 1, h, w) and tr.score.q_small.shape == (1, 1, 32, 48)
        assert len(st.patches) == 3 and st.candidates == 3 * 48 * 32 == int(tr.covered.sum())
        assert st.k == st.points == 500
        steps = {"upsample", "uncertainty", "select", "segment", "refine", "score", "topk", "replace"}
        assert set(st.seconds) >= steps
    assert res.probs.shape == (*IMAGE_HW, C) and res.probs.dtype == np.float32
    assert res.report()["patches"] == 1 + 9 and res.report()["points"] == 1500


def test_patches_ranked_by_descending_mean_uncertainty(fast_run):
    _, res = fast_run
    for tr in res.trace:
        yu = tr.yu[0, 0].numpy().astype(np.float64)
        means = np.array([yu[b.slices].mean() for b in tr.boxes])
        order = sorted(range(len(means)), key=lambda i: (-means[i], i))
        assert tr.chosen == order[:3]
        np.testing.assert_allclose(tr.patch_means.numpy(), means, rtol=1e-6)
        assert means[tr.chosen[0]] > np.median(means)


def test_replaced_points_are_the_canonical_topk_of_q(fast_run):
    _, res = fast_run
    for st, tr in zip(res.stages[1:], res.trace, strict=True):
        q = tr.score.q[0, 0].numpy().ravel()
        cand = np.flatnonzero(tr.covered.numpy().ravel())
        expected = np.sort(cand[np.lexsort((cand, -q[cand]))][: st.k])
        np.testing.assert_array_equal(tr.indices.numpy(), expected)
        # E = Yu * (1 - Ru), and Q was filtered from it
        r_top = tr.r.topk(2, dim=1).values
        np.testing.assert_allclose(tr.e, tr.yu * (r_top[:, :1] - r_top[:, 1:]), atol=1e-7)
        # Y takes R's values exactly at the points and keeps its own elsewhere
        y, y_out, r = (t[0].reshape(C, -1).numpy() for t in (tr.y, tr.y_out, tr.r))
        mask = np.zeros(y.shape[1], bool)
        mask[expected] = True
        np.testing.assert_array_equal(y_out[:, mask], r[:, mask])
        np.testing.assert_array_equal(y_out[:, ~mask], y[:, ~mask])


def test_label_map_and_uncertainty_come_from_the_final_y(fast_run):
    _, res = fast_run
    np.testing.assert_array_equal(res.labels, res.probs.argmax(axis=-1))
    top = np.sort(res.probs, axis=-1)
    np.testing.assert_allclose(res.uncertainty, 1 - (top[..., -1] - top[..., -2]), atol=1e-6)
    # the last stage is at the image size, so the final Y is the traced one
    np.testing.assert_array_equal(res.probs, res.trace[-1].y_out[0].permute(1, 2, 0).numpy())
    assert res.labels.dtype == np.uint8 and res.uncertainty.min() >= 0 and res.uncertainty.max() <= 1


def test_refinement_module_gets_o_first():
    class EchoFirst(nn.Module):
        """Logits = log(first): R equals whatever came first."""

        n_classes = C

        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Parameter(torch.zeros(1))

        def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
            return torch.log(first.clamp_min(1e-12))

    seg = ColourSegmenter()
    res = run_magnet(_image(), seg, [EchoFirst()], _preset(n_patches=1), trace=True)
    tr = res.trace[0]
    box = tr.boxes[tr.chosen[0]]
    img = seg.resize(_image(), res.stages[1].scale)[box.slices]
    o = torch.from_numpy(seg.predict(seg.resize(img, INPUT)[None]))
    np.testing.assert_allclose(tr.r[..., box.row : box.row_end, box.col : box.col_end], o, atol=1e-6)


# --------------------------------------------------------------------------- full MagNet, official selection


def test_full_magnet_refines_every_patch():
    seg = ColourSegmenter()
    res = run_magnet(_image((128, 192)), seg, [_module()], _preset(), fast=False, trace=True, batch_size=8)
    assert [s.patches_total for s in res.stages] == [1, 4, 16] and seg.images == 21
    for st, tr in zip(res.stages[1:], res.trace, strict=True):
        w, h = st.scale
        assert st.patches == tuple(range(st.patches_total)) and st.candidates == w * h
        assert bool(tr.covered.all()) and st.points == min(500, w * h)


def test_official_selection_reproduces_the_ascending_order():
    res = run_magnet(_image(), ColourSegmenter(), [_module()], _preset(n_points=0.9), selection="official",
                     trace=True)
    paper = run_magnet(_image(), ColourSegmenter(), [_module()], _preset(n_points=0.9), trace=True)
    for tr, tp in zip(res.trace, paper.trace, strict=True):
        means = tr.patch_means.numpy()
        order = sorted(range(len(means)), key=lambda i: (means[i], i))
        assert tr.chosen == order[:3]  # the LEAST uncertain patches (official defect 1)
        if len(tr.boxes) >= 6:
            assert set(tr.chosen).isdisjoint(tp.chosen)
        inset = torch.zeros(tr.covered.shape, dtype=torch.bool)
        for i in tr.chosen:
            b = tr.boxes[i]
            d = OFFICIAL_INSET
            inset[b.row + d : b.row_end - d, b.col + d : b.col_end - d] = True
        assert not bool(tr.e[0, 0][inset].any())  # score zeroed inside the refined patches (defect 2)
        assert bool(inset.reshape(-1)[tr.indices].all())  # and only points inside them kept
        # the paper's points: k = 90 % of the refined area, all inside it
        assert tp.indices.numel() == int(0.9 * int(tp.covered.sum()))
        assert bool(tp.covered.reshape(-1)[tp.indices].all())
    assert sum(s.points for s in res.stages) < sum(s.points for s in paper.stages)


# --------------------------------------------------------------------------- user coarse masks


def test_user_mask_becomes_the_first_stage_y():
    seg = ColourSegmenter()
    labels = np.zeros((64, 96), np.uint8)
    labels[16:48, 24:72] = 2
    labels[:, 80:] = 1
    probs = coarse_to_probs(labels, C, seg.classes)
    assert probs.shape == (64, 96, C) and np.array_equal(probs.argmax(-1), labels) and probs.max() == 1
    res = run_magnet(_image(), seg, [_module()], _preset(), probs, trace=True)
    assert res.stages[0].scale == (96, 64) and res.stages[0].patches_total == 0
    assert seg.images == 3 * 3  # O on the 3 patches of each refinement stage; no stage-1 segmentation
    # stage 2 starts from the mask upsampled from 96x64 to 96x64: the mask itself
    np.testing.assert_array_equal(res.trace[0].y[0].permute(1, 2, 0).numpy(), probs)
    # a hard mask is certain away from edges: refinement happens where the mask is unsure or R disagrees
    assert res.labels.shape == IMAGE_HW


def test_binary_masks_for_two_classes():
    p = np.array([[0.0, 0.25], [1.0, 0.5]], np.float32)
    np.testing.assert_allclose(coarse_to_probs(p, 2), np.stack([1 - p, p], -1))
    hard = np.array([[0, 255], [255, 0]], np.uint8)
    np.testing.assert_array_equal(coarse_to_probs(hard, 2)[..., 1], hard / 255)
    np.testing.assert_array_equal(coarse_to_probs(hard > 0, 2)[..., 1], hard / 255)


@pytest.mark.parametrize(
    ("mask", "needle"),
    [
        (np.array([[0, 1], [2, 19]], np.uint8), "labels up to 19"),
        (np.array([[0, 255], [255, 0]], np.uint8), "binary mask"),
        (np.array([[0.0, 0.7]], np.float32), "binary mask"),
        (np.zeros((2, 2, 7), np.float32), "7 probability channels"),
        (np.array([[-1, 0]], np.int16), "negative"),
    ],
)
def test_label_space_mismatch_is_an_input_error(mask, needle):
    from refine_cli.segmenters.torch_backbones import CITYSCAPES_CLASSES

    with pytest.raises(InputError) as err:
        coarse_to_probs(mask, 19, CITYSCAPES_CLASSES)
    assert needle in str(err.value)
    if "labels up to" in needle:
        assert "0 road" in str(err.value) and "0..18" in str(err.value)


def test_run_rejects_inconsistent_inputs():
    seg = ColourSegmenter()
    with pytest.raises(InputError, match=r"\(h, w, 3\)"):
        run_magnet(_image(), seg, [_module()], _preset(), np.zeros((8, 8, 2), np.float32))
    with pytest.raises(UsageError, match="2 classes"):
        run_magnet(_image(), seg, [_module(2)], _preset())
    with pytest.raises(InputError, match="uint8 RGB"):
        run_magnet(_image().astype(np.float32), seg, [_module()], _preset())


# --------------------------------------------------------------------------- the refiner and its weights


def test_refiner_prepare_then_windows():
    seg = ColourSegmenter(2)
    refiner = MagnetRefiner(seg, [_module(2)], _preset(num_classes=2), info={"weights": "fill"})
    image = _image()
    coarse = (image[..., 0] > 128).astype(np.float32)

    def read_overview(shape, binarize=False):
        assert tuple(shape) == tuple(IMAGE_HW)
        return image.astype(np.float32), coarse

    refiner.prepare(Scene(shape=IMAGE_HW, read_overview=read_overview))
    assert refiner.result is not None
    win = Window(40, 100, 64, 80)
    out = refiner.refine(TileInput(image[win.slices], coarse[win.slices], win))
    np.testing.assert_array_equal(out.prob, refiner.result.probs[win.slices][..., 1])
    np.testing.assert_array_equal(out.uncertainty, refiner.result.uncertainty[win.slices])
    assert refiner.describe()["magnet"]["points"] > 0


def test_missing_official_weights_say_how_to_fetch_them(monkeypatch):
    # the binary preset's module is shipped in weights/ (tests/test_magnet_binary.py)
    for record in MAGNET_RECORDS:
        monkeypatch.setitem(registry._REGISTRY, record.name, record)
    with pytest.raises(WeightsError, match="refine weights fetch magnet-cityscapes-refine-512"):
        load_refinement_modules(PRESETS["cityscapes"])


def test_refinement_checkpoints_load_strictly(tmp_path, monkeypatch):
    for record in MAGNET_RECORDS:
        monkeypatch.setitem(registry._REGISTRY, record.name, record)
    sd = fill_state_dict(module_entries(build_refinement_magnet(7)))
    path = tmp_path / "deepglobe_refinement.pth"
    torch.save(sd, path)
    registry.import_file("magnet-deepglobe-refine", path)
    (module,) = load_refinement_modules(PRESETS["deepglobe"])
    assert all(torch.equal(module.state_dict()[k], v) for k, v in sd.items())
    torch.save({k: v for k, v in sd.items() if k != "conv1.weight"}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="conv1.weight"):
        load_refinement_modules(PRESETS["deepglobe"], weights=str(tmp_path / "bad.pth"))


def test_refiner_from_options_picks_preset_segmenter_and_checkpoints(shared, tmp_path, monkeypatch):
    from refine_cli.config import MagnetOptions

    for record in MAGNET_RECORDS:
        monkeypatch.setitem(registry._REGISTRY, record.name, record)
    manifest = shared / "reference/magnet/hrnet18_ocr_c19_state_dict_manifest.tsv"
    torch.save({"model." + k: v for k, v in fill_state_dict(manifest).items()}, tmp_path / "hrnet.pth")
    registry.import_file("magnet-cityscapes-hrnet", tmp_path / "hrnet.pth")
    ref = fill_state_dict(module_entries(build_refinement_magnet(19)))
    for stage in (512, 1024, 2048):
        torch.save(ref, tmp_path / f"r{stage}.pth")
        registry.import_file(f"magnet-cityscapes-refine-{stage}", tmp_path / f"r{stage}.pth")
    refiner = MagnetRefiner.from_options(MagnetOptions(), device="cpu")  # no preset, no segmenter: cityscapes
    assert refiner.preset.name == "cityscapes" and refiner.fast and len(refiner.modules) == 3
    assert refiner.segmenter.name == "magnet-cityscapes-hrnet" and refiner.segmenter.num_classes == 19
    full = MagnetRefiner.from_options(MagnetOptions(full=True, n_points=1000),
                                      segmenter="magnet-cityscapes-hrnet", device="cpu")
    assert not full.fast and full.n_points == 1000
    assert full.info["refinement"][0] == "magnet-cityscapes-refine-512"
    with pytest.raises(UsageError, match="does not fit --preset deepglobe"):
        MagnetRefiner.from_options(MagnetOptions(preset="deepglobe"), segmenter="magnet-cityscapes-hrnet",
                                   device="cpu")


def test_custom_segmenter_needs_refinement_weights(tmp_path):
    import json

    from refine_cli.config import MagnetOptions

    import warnings

    model = tmp_path / "seg.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated upstream
        torch.jit.save(torch.jit.script(nn.Conv2d(3, 2, 1)), str(model))
    (tmp_path / "seg.pt.json").write_text(json.dumps({"input_size": [48, 32], "classes": ["bg", "fg"]}))
    with pytest.raises(UsageError, match="give --weights"):
        MagnetRefiner.from_options(MagnetOptions(), segmenter=str(model), device="cpu")
    torch.save(fill_state_dict(module_entries(build_refinement_magnet(2))), tmp_path / "r.pth")
    refiner = MagnetRefiner.from_options(MagnetOptions(weights=str(tmp_path / "r.pth")), segmenter=str(model),
                                         device="cpu")
    assert refiner.preset.name == "custom" and refiner.preset.scales is None
    res = refiner.refine_image(_image((64, 96)))
    assert [s.scale for s in res.stages] == [(48, 32), (96, 64)] and res.labels.shape == (64, 96)
