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
from magnet_fixtures import ColourSegmenter, fill_module
from torch import nn

from refine_cli import weights as registry
from refine_cli.devtools.fill_magnet import fill_state_dict, module_entries
from refine_cli.errors import InputError, UsageError, WeightsError
from refine_cli.models.magnet import build_refinement_magnet
from refine_cli.refiners.base import Scene, TileInput
from refine_cli.refiners.magnet import (
    OFFICIAL_INSET,
    PRESETS,
    MagnetPreset,
    coarse_to_probs,
    generic_scales,
    run_magnet,
)
from refine_cli.refiners.magnet_method import MagnetRefiner, load_refinement_modules
from refine_cli.tiling.grid import Window
from refine_cli.weights.magnet import MAGNET_RECORDS

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
        assert len(st.patches) == 3 and int(tr.covered.sum()) == 3 * 48 * 32
        # candidates: the refined pixels with a positive score (the median zeroes Q at some patch edges)
        assert 0 < st.candidates == int((tr.covered & (tr.score.q[0, 0] > 0)).sum()) <= 3 * 48 * 32
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
        cand = np.flatnonzero(tr.covered.numpy().ravel() & (q > 0))  # zero scores are never replaced
        expected = np.sort(cand[np.lexsort((cand, -q[cand]))][: st.k])
        np.testing.assert_array_equal(tr.indices.numpy(), expected)
        assert torch.equal(tr.replaced, tr.indices)  # the paper's rule: every selected point takes R
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
        positive = int((tr.score.q > 0).sum())  # the zero-padded median leaves Q = 0 at the corners
        assert st.patches == tuple(range(st.patches_total)) and st.candidates == positive > 0.99 * w * h
        assert bool(tr.covered.all()) and st.points == min(500, positive)


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
        # the paper's points: k = 90 % of the refined area, all inside it, at most every positive score
        positive = int((tp.covered & (tp.score.q[0, 0] > 0)).sum())
        assert tp.indices.numel() == min(int(0.9 * int(tp.covered.sum())), positive)
        assert bool(tp.covered.reshape(-1)[tp.indices].all())
        assert bool((tp.score.q.reshape(-1)[tp.indices] > 0).all())
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
    import warnings

    from refine_cli.config import MagnetOptions

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


# --------------------------------------------------------------------------- issue 14.7: honest uncertainty


class HedgingModule(nn.Module):
    """A 2-class refinement module that hedges like the shipped binary one (R ~ 0.22 on sure background).

    R is the mean of O and Y, except where both say background (p < 0.1): there it answers 0.22.
    """

    n_classes = 2

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # the pipeline reads the device from the parameters

    def forward(self, o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = 0.5 * (o[:, 1:2] + y[:, 1:2])
        p = torch.where(p < 0.1, torch.full_like(p, 0.22), p)
        return torch.log(torch.cat([1 - p, p], 1).clamp_min(1e-6))


def portrait_like(hw: tuple[int, int] = (384, 512), seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A blue ellipse on a noisy green background, and its exact mask.

    :class:`ColourSegmenter` ``(2, (64, 64))`` calls the background 0.001 and the ellipse 0.997.

    Returns:
        ``(image (H, W, 3) uint8, mask (H, W) bool)``.
    """
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy - 0.55 * h) / (0.3 * h)) ** 2 + ((xx - 0.4 * w) / (0.18 * w)) ** 2 <= 1
    rng = np.random.default_rng(seed)
    img = np.where(mask[..., None], np.array([20, 20, 235]), np.array([20, 235, 20])).astype(np.float32)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def far_from_edge(mask: np.ndarray, distance: float = 32) -> np.ndarray:
    """``(H, W)`` bool: background pixels more than ``distance`` px from the mask's boundary."""
    import cv2

    inside = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    outside = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)
    return (~mask) & (np.maximum(inside, outside) > distance)


def patch_edge_steps(
    u: np.ndarray, stages: list[dict], crop_hw: tuple[int, int], keep: np.ndarray
) -> tuple[float, float]:
    """Steps of an uncertainty map across the refined patches' edges, against steps elsewhere.

    Every refined patch of every stage (from a MagNet report: ``scale`` and ``patches``) is mapped
    to the image; for each of its edges inside the image the step is the mean ``|u[r] - u[r - 1]|``
    (rows; columns alike) along the edge over pixels in ``keep`` (plus the neighbouring step on each
    side, so rounding of the edge position cannot hide it). Elsewhere: the mean step over every
    other pair of ``keep`` pixels.

    Args:
        u: ``(H, W)`` float uncertainty in [0, 1].
        stages: report stages (dicts with ``scale`` ``[W, H]`` and ``patches``); stage 1 is skipped.
        crop_hw: ``(h, w)`` patch size at the stage scale.
        keep: ``(H, W)`` bool, where to look (e.g. far background).

    Returns:
        ``(largest mean step along one patch edge, mean step elsewhere)``.
    """
    from refine_cli.refiners.magnet_points import patch_grid

    h, w = u.shape
    d_row = np.abs(np.diff(u, axis=0))  # (H - 1, W): between rows r and r + 1
    d_col = np.abs(np.diff(u, axis=1))
    ok_row, ok_col = keep[1:] & keep[:-1], keep[:, 1:] & keep[:, :-1]
    on_row, on_col = np.zeros_like(ok_row), np.zeros_like(ok_col)
    edges = []
    for st in stages[1:]:
        sw, sh = st["scale"]
        boxes = patch_grid((sh, sw), crop_hw)
        for i in st["patches"]:
            b = boxes[i]
            r0, r1 = round(b.row * h / sh), round(b.row_end * h / sh)
            c0, c1 = round(b.col * w / sw), round(b.col_end * w / sw)
            for r in (r0, r1):
                if 0 < r < h:
                    band = (slice(max(0, r - 2), min(h - 1, r + 1)), slice(c0, c1))
                    on_row[band] = True
                    edges.append((d_row[band], ok_row[band]))
            for c in (c0, c1):
                if 0 < c < w:
                    band = (slice(r0, r1), slice(max(0, c - 2), min(w - 1, c + 1)))
                    on_col[band] = True
                    edges.append((d_col[band], ok_col[band]))
    worst = max((float(d[ok].mean()) for d, ok in edges if ok.sum() >= 16), default=0.0)
    rest = np.concatenate([d_row[ok_row & ~on_row], d_col[ok_col & ~on_col]])
    return worst, float(rest.mean())


class _Rows:
    """A final writer keeping the rows it gets."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.out = np.zeros((*shape, 1), np.float32)

    def write(self, row0: int, block: np.ndarray) -> None:
        self.out[row0 : row0 + block.shape[0]] = block[..., :1]


def run_refiner(refiner: MagnetRefiner, image: np.ndarray, tmp_dir: str, budget: int = 1 << 30) -> np.ndarray:
    """``prepare`` then the engine's levels, as ``refine run`` does; the final probability ``(H, W)``."""
    from refine_cli.engine.levels import run_levels
    from refine_cli.io.image import ImageSource
    from refine_cli.io.readers import ArrayReader
    from refine_cli.report.timing import StageTimer

    src = ImageSource(ArrayReader("mem", image))
    scene = Scene(shape=image.shape[:2],
                  read_overview=lambda shape, binarize=False: (image.astype(np.float32), None),
                  max_memory=budget, has_mask=False, image_source=src)
    refiner.prepare(scene)
    writer = _Rows(image.shape[:2])
    run_levels(src, None, refiner, writer, timer=StageTimer(), budget=budget, bytes_out=2, overlap=16,
               tile_size=128, tmp_dir=tmp_dir)
    return writer.out[..., 0]


def _binary_like() -> MagnetPreset:
    """``--preset binary`` with the test segmenter's input size (64 x 64: stages 64, 128x96, 256x192,
    512x384)."""
    import dataclasses

    return dataclasses.replace(PRESETS["binary"], segmenter="colour", input_size=(64, 64),
                               refinement=("hedge",))


def test_binary_preset_uncertainty_has_no_patch_rectangles(tmp_path):
    """The uncertainty a user gets (``1 - |2p - 1|`` of the final probability) is ~0 on background far from
    the boundary and shows no step along the refined patches' edges, although the module hedges there.

    With the paper's rule every selected point took R, and R = 0.22 filled the refined patches of certain
    background: u = 0.44 in rectangles (steps of ~0.4 along their edges; 86-91 % of the background of real
    P3M photos with the shipped module)."""
    image, mask = portrait_like()
    refiner = MagnetRefiner(ColourSegmenter(2, (64, 64)), [HedgingModule()], _binary_like(), tiled=False)
    p = run_refiner(refiner, image, str(tmp_path))
    u = 1 - np.abs(2 * p - 1)
    far = far_from_edge(mask)
    stages = refiner.report()["stages"]
    assert sum(len(s["patches"]) for s in stages[1:]) == 9  # the refinement did run
    worst, elsewhere = patch_edge_steps(u, stages, (64, 64), far)
    facts = (f"far background: {float((u[far] > 0.05).mean()):.3f} with u > 0.05, mean u "
             f"{float(u[far].mean()):.4f}; patch-edge step {worst:.4f} vs {elsewhere:.4f} elsewhere")
    assert float((u[far] > 0.05).mean()) < 0.01, facts
    assert worst < 0.01 and worst < 3 * elsewhere + 0.002, facts
    # the run is still right: IoU against the exact mask
    fg = p >= 0.5
    assert (fg & mask).sum() / (fg | mask).sum() > 0.97, facts


def test_confident_rule_replaces_only_where_r_is_more_certain():
    """``replace="confident"``: of the top-k points, those where R is more certain than Y take R, the others
    keep Y; the paper's rule (``all``) copies the hedge into certain background."""
    import dataclasses

    image, _ = portrait_like()
    seg = ColourSegmenter(2, (64, 64))
    preset = _binary_like()
    ours = run_magnet(image, seg, [HedgingModule()], preset, trace=True)
    paper = run_magnet(image, seg, [HedgingModule()], dataclasses.replace(preset, replace="all"), trace=True)
    assert ours.report()["replace"] == "confident" and paper.report()["replace"] == "all"
    for tr in ours.trace:
        y, r, y_out = (t[0].reshape(2, -1) for t in (tr.y, tr.r, tr.y_out))
        sel = tr.indices
        gain = (r[0] - r[1]).abs() > (y[0] - y[1]).abs()
        assert torch.equal(tr.replaced, sel[gain[sel]]) and 0 < tr.replaced.numel() < sel.numel()
        taken = torch.zeros(y.shape[1], dtype=torch.bool)
        taken[tr.replaced] = True
        assert torch.equal(y_out[:, taken], r[:, taken]) and torch.equal(y_out[:, ~taken], y[:, ~taken])
    hedged = lambda res: float(((res.probs[..., 1] > 0.15) & (res.probs[..., 1] < 0.3)).mean())  # noqa: E731
    assert hedged(paper) > 0.2 and hedged(ours) < 0.01


def test_binary_preset_ends_with_the_edge_snap(tmp_path):
    """On by default for the binary preset (recorded in the report as ``snap``), off on request and for
    other presets; the snap moves the final probability near the boundary only (within its support, 2 r)."""
    import dataclasses

    image, mask = portrait_like()
    seg = ColourSegmenter(2, (64, 64))
    runs = {}
    for snap in ("auto", "off"):
        refiner = MagnetRefiner(seg, [HedgingModule()], _binary_like(), tiled=False, snap=snap)
        runs[snap] = run_refiner(refiner, image, str(tmp_path))
        described = refiner.describe()
        if snap == "auto":
            assert described["snap"] == {"radius": 16, "eps": 1e-4, "halo": 33}
            y = refiner.result.probs[..., 1]
        else:
            assert described["snap"] == "off"
            np.testing.assert_allclose(runs["off"], y, atol=1e-6)  # the final Y, passed through
    moved = np.abs(runs["auto"] - runs["off"]) > 0.01
    assert moved.any() and not moved[far_from_edge(mask, 2 * 16)].any()
    plain = MagnetRefiner(seg, [HedgingModule()], dataclasses.replace(_binary_like(), snap=False))
    plain.prepare(Scene(shape=image.shape[:2], read_overview=lambda shape, binarize=False: (image, None),
                        has_mask=False))
    assert plain.describe()["snap"] == "off" and plain.snap is None
    with pytest.raises(UsageError, match="use one of auto, on, off"):
        MagnetRefiner(seg, [HedgingModule()], _binary_like(), snap="yes")


def test_stages_none_is_the_segmenter_pass_only(tmp_path):
    """``stages="none"`` (the benchmark's ``segmenter+snap``): stage 1 upsampled to the image, no module call,
    the same in both paths."""
    from refine_cli.refiners.magnet import first_stage, resize_y

    class Untouchable(HedgingModule):
        def forward(self, o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            raise AssertionError("no refinement stage may run")

    image, _ = portrait_like()
    seg = ColourSegmenter(2, (64, 64))
    preset = _binary_like()
    y1, _ = first_stage(image, seg, preset.schedule(image.shape[:2]).stages[0])
    expected = resize_y(y1, image.shape[:2])[0, 1].numpy()
    for tiled in (False, True):
        refiner = MagnetRefiner(seg, [Untouchable()], preset, tiled=tiled, snap="off", stages="none")
        out = run_refiner(refiner, image, str(tmp_path))
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
        assert len(refiner.report()["stages"]) == 1 and refiner.describe()["stages"] == "none"
        refiner.close()
    with pytest.raises(UsageError, match="use one of all, none"):
        MagnetRefiner(seg, [Untouchable()], preset, stages="some")


@pytest.mark.parametrize("tiled", [False, True])
def test_magnet_reports_its_segmenter_and_scales_as_progress(tiled):
    """The segmenter's pass and every refinement scale report progress, in both pipelines."""
    seen: list[tuple[str, int, int]] = []
    seg = ColourSegmenter()
    if tiled:
        from refine_cli.engine.magnet import run_magnet_tiled

        run_magnet_tiled(_image(), seg, [_module()], _preset(), progress=lambda *a: seen.append(a)).close()
    else:
        run_magnet(_image(), seg, [_module()], _preset(), progress=lambda *a: seen.append(a))
    assert seen[:2] == [("magnet segmenter", 0, 0), ("magnet segmenter", 1, 1)]
    scales = [(d, t) for s, d, t in seen if s == "magnet scales"]
    assert scales[0] == (0, 3) and scales[-1] == (3, 3)  # 4 scales: the segmenter's, then 3 refined
