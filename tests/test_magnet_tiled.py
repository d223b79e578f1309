"""The tiled MagNet pipeline (issue 6): same result as the whole-image reference, bounded memory.

The deterministic :class:`~magnet_fixtures.ColourSegmenter` and fill-rule refinement modules
make both pipelines reproducible, so the comparisons are exact: at integer stage factors the
tiled run must give the whole-image probabilities bit for bit (label maps identical: both
pipelines break top-k ties the same canonical way). The 4K comparison prints its figures (-s).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from magnet_fixtures import ColourSegmenter, blocky_image, fill_module, make_preset

from refine_cli.engine.levels import LevelWriter, run_levels
from refine_cli.engine.magnet import run_magnet_tiled
from refine_cli.errors import ResourceError, UsageError
from refine_cli.io.image import ImageSource
from refine_cli.io.readers import ArrayReader
from refine_cli.refiners.base import Scene
from refine_cli.refiners.magnet import run_magnet, upsample_window, upsample_y
from refine_cli.refiners.magnet_method import MagnetRefiner
from refine_cli.refiners.magnet_points import (
    certainty,
    median_filter,
    patch_grid,
    resize_nearest,
    topk_cut,
    uncertainty,
)
from refine_cli.refiners.magnet_tiled import (
    ArrayImage,
    BlockScores,
    PatchBank,
    LevelY,
    StageImages,
    fast_uncertainty,
)
from refine_cli.report.timing import StageTimer
from refine_cli.tiling.grid import Window


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread for the whole module: faster on busy shared CPUs, and every run sees the same
    setting (convolutions round differently with another thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_window(rng: np.random.Generator, hw: tuple[int, int]) -> Window:
    r, c = int(rng.integers(0, hw[0])), int(rng.integers(0, hw[1]))
    return Window(r, c, int(rng.integers(1, hw[0] - r + 1)), int(rng.integers(1, hw[1] - c + 1)))


def _compare(whole, tiled, hw):
    """Exact equality of probabilities, labels, uncertainty and per-stage choices."""
    full = Window.full(hw)
    np.testing.assert_array_equal(tiled.probs(full), whole.probs)
    np.testing.assert_array_equal(tiled.labels(full), whole.labels)
    np.testing.assert_array_equal(tiled.uncertainty(full), whole.uncertainty)
    for a, b in zip(whole.stages, tiled.stages, strict=True):
        facts = ("scale", "patches", "candidates", "k", "points")
        assert [getattr(a, f) for f in facts] == [getattr(b, f) for f in facts]
        np.testing.assert_allclose(a.patch_uncertainty, b.patch_uncertainty, rtol=1e-6)


# --------------------------------------------------------------------------- primitives


def test_window_upsampling_matches_interpolate_and_the_whole_map():
    rng = np.random.default_rng(0)
    for _ in range(25):
        src = (int(rng.integers(40, 200)), int(rng.integers(40, 200)))
        out = (src[0] + int(rng.integers(0, 400)), src[1] + int(rng.integers(0, 400)))
        y = torch.rand(1, 3, *src)
        whole = upsample_y(y, (out[1], out[0]))
        ref = F.interpolate(y, size=out, mode="bilinear", align_corners=False)
        # PyTorch's CPU kernel rounds the same way (fused multiply-add) on current x86/ARM CPUs
        np.testing.assert_allclose(whole, ref, rtol=0, atol=2.4e-7)
        for _ in range(4):
            w = _random_window(rng, out)
            part = upsample_window(lambda v: y[..., v.row : v.row_end, v.col : v.col_end], src, out, w)
            assert torch.equal(part, whole[..., w.row : w.row_end, w.col : w.col_end])
    with pytest.raises(ValueError, match="shrinks"):
        upsample_window(lambda v: y, (10, 10), (5, 20))


@pytest.mark.parametrize("classes", [2, 3, 19])
def test_fast_uncertainty_is_bit_identical(classes):
    y = torch.softmax(torch.randn(1, classes, 64, 80) * 3, dim=1)
    y[..., :4, :4] = 1.0 / classes  # exact ties
    assert torch.equal(fast_uncertainty(y), uncertainty(y))


def _full_q(q_small: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return resize_nearest(q_small.reshape(1, 1, *q_small.shape[-2:]), hw)[0, 0]


@pytest.mark.parametrize("seed", range(12))
def test_block_scores_give_the_canonical_cut(seed):
    rng = np.random.default_rng(seed)
    small = (int(rng.integers(5, 20)), int(rng.integers(5, 20)))
    hw = (int(rng.integers(3, 90)), int(rng.integers(3, 90)))  # smaller and larger than Q_small
    q_small = torch.from_numpy(rng.integers(0, 6, small).astype(np.float32) / 5)  # many ties
    boxes = [_random_window(rng, hw) for _ in range(int(rng.integers(1, 5)))] if seed % 3 else None
    covered = torch.zeros(hw, dtype=torch.bool)
    for b in boxes or [Window.full(hw)]:
        covered[b.slices] = True
    q = _full_q(q_small, hw)
    scores = BlockScores(q_small, hw, boxes)
    n = int(covered.sum())
    assert scores.n_candidates == n
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n, n + 5, int(rng.integers(0, n + 1))}):
        got, want = scores.cut(k), topk_cut(q, k, None if boxes is None else covered)
        assert got == want, (k, got, want)
        mask = got.mask(q, valid=None if boxes is None else covered)
        w = _random_window(rng, hw)
        part = got.mask(scores.q_window(w), w.row, w.col, None if boxes is None else covered[w.slices])
        assert torch.equal(part, mask[w.slices])
        assert int(mask.sum()) == min(k, n)


def test_stage_maps_round_trip_through_the_engines_level_files(tmp_path):
    """A stage's Y goes through the engine's float32 level file unchanged (float16: rounded as read)."""
    from refine_cli.io.readers import TiffReader

    y = torch.rand(1, 3, 300, 520)
    y[0, :, :5, :5] = torch.tensor([0.0, 1.0, 1.0 + 2**-23])[:, None, None]  # ends of [0, 1], one ulp above
    level = LevelWriter(str(tmp_path), (300, 520), 3)
    for r in range(0, 300, 128):  # rows in bands, as the engine hands them
        level.write(r, y[0, :, r : r + 128].permute(1, 2, 0).numpy())
    level.commit()
    rng = np.random.default_rng(1)
    for dtype in ("float32", "float16"):
        stored = LevelY(TiffReader(level.path), dtype)
        want = y if dtype == "float32" else y.to(torch.float16).to(torch.float32)
        assert torch.equal(stored.read_all(), want)
        for _ in range(10):
            w = _random_window(rng, (300, 520))
            assert torch.equal(stored.read(w), want[..., w.slices[0], w.slices[1]])
        stored.close()


def test_patch_bank_averages_like_the_reference_on_disk_and_in_memory(tmp_path):
    from refine_cli.refiners.magnet_points import ensemble_patches

    hw = (200, 300)
    boxes = [Window(0, 0, 120, 150), Window(80, 100, 120, 150), Window(10, 140, 100, 160)]
    patches = [torch.rand(1, 4, b.height, b.width) for b in boxes]
    ref, covered = ensemble_patches(patches, boxes, hw)
    for folder in (None, str(tmp_path)):
        bank = PatchBank(boxes, 4, folder)
        for j, p in enumerate(patches):
            bank.put(j, p)
        assert bank.on_disk == (folder is not None)
        assert torch.equal(bank.render(Window.full(hw)), ref)
        w = Window(50, 90, 100, 120)
        assert torch.equal(bank.render(w), ref[..., 50:150, 90:210])
        assert torch.equal(bank.covered(w), covered[50:150, 90:210])
        bank.close()


@pytest.mark.parametrize(("hw", "scale", "resize"), [
    ((512, 768), (192, 128), "linear"),   # integer factor 4
    ((512, 768), (192, 128), "area"),
    ((600, 1000), (375, 225), "area"),    # rational factor 8/3: lattice-aligned windows
])
def test_stage_image_windows_equal_the_whole_resize(hw, scale, resize):
    seg = ColourSegmenter(2, (64, 64), resize=resize)
    img = blocky_image(hw, block=7)
    src = ArrayImage(img)
    images = StageImages(src, seg, [(scale, (64, 64), 3)], read_limit=1 << 30, tmp_dir="/tmp")
    whole = seg.resize(img, scale)
    for box in patch_grid((scale[1], scale[0]), (64, 64)):
        np.testing.assert_array_equal(images.crop(scale, box), whole[box.slices])
    assert images.modes[scale] == "full"
    assert src.pixels_read < 16 * img.shape[0] * img.shape[1] // 5  # windows, not the whole image per patch


def test_stage_images_come_from_a_built_level_when_windows_are_too_large(tmp_path):
    seg = ColourSegmenter(2, (32, 32), resize="area")
    img = blocky_image((512, 1024), block=5)
    src = ArrayImage(img)
    stages = [((32, 16), (32, 32), 1), ((64, 32), (32, 32), 2), ((128, 64), (32, 32), 3),
              ((256, 128), (32, 32), 1), ((1024, 512), (32, 32), 3)]
    images = StageImages(src, seg, stages, read_limit=100_000, tmp_dir=str(tmp_path))
    # 256x128: windows fit, and one patch reads little; the coarser scales need a level
    assert images.modes == {(32, 16): "level", (64, 32): "level", (128, 64): "level", (256, 128): "full",
                            (1024, 512): "full"}
    crop = images.crop((64, 32), Window(0, 0, 32, 32))
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
    # levels are built once, the largest from the image, the others from it: one pass over the image
    assert src.pixels_read == img.shape[0] * img.shape[1]
    # integer factors: the largest level is the rounded block mean; smaller ones are built from it
    # (rounded twice, so within one grey level of their block mean)
    for (w, h), tol in (((128, 64), 0.5), ((64, 32), 1.0)):
        blocks = img.reshape(h, 512 // h, w, 1024 // w, 3).astype(np.float64).mean(axis=(1, 3))
        assert np.abs(images.whole((w, h)).astype(np.float64) - blocks).max() <= tol
    images.close()


# --------------------------------------------------------------------------- whole image versus tiled


@pytest.fixture(scope="module")
def binary_case():
    """1024x2048, the binary preset's geometry (input 256x256; stages 256^2, 512x256, 1024x512, 2048x1024)."""
    seg = ColourSegmenter(2, (256, 256))
    img = blocky_image((1024, 2048), block=24)
    preset = make_preset(seg, kernel=5, n_points=2**16)
    module = fill_module(2)
    return seg, img, preset, module, run_magnet(img, seg, [module], preset)


def test_tiled_equals_whole_image_binary_geometry(binary_case, tmp_path):
    seg, img, preset, module, whole = binary_case
    assert [s.scale for s in whole.stages] == [(256, 256), (512, 256), (1024, 512), (2048, 1024)]
    src = ArrayImage(img)
    tiled = run_magnet_tiled(src, seg, [module], preset, memory_pixels=0, tile=512, tmp_dir=str(tmp_path))
    try:
        _compare(whole, tiled, img.shape[:2])
        rep = tiled.report()
        assert rep["points"] == whole.report()["points"] == 3 * 2**16
        assert rep["patches"] == whole.report()["patches"] == 1 + 2 + 3 + 3
        assert rep["tiled"]["stages_in_memory"] == [] and rep["tiled"]["store_bytes_written"] > 0
        assert set(rep["tiled"]["stage_images"].values()) == {"full"}
        # only patch regions were read (with margins), never the whole image per stage
        assert src.pixels_read < 4 * img.shape[0] * img.shape[1]
    finally:
        tiled.close()
    assert not list(tmp_path.iterdir())  # temporary stores removed


def test_patch_bank_on_disk_gives_the_same_result(binary_case, tmp_path, monkeypatch):
    """R of the selected patches in a zarr store on disk (a small budget's choice) reads back bit for bit."""
    import refine_cli.refiners.magnet_tiled as mt

    seg, img, preset, module, whole = binary_case
    folders: list[str | None] = []
    plain = mt.PatchBank.__init__

    def on_disk(self, boxes, channels, folder=None):
        folders.append(str(tmp_path / "bank"))
        (tmp_path / "bank").mkdir(exist_ok=True)
        plain(self, boxes, channels, folders[-1])

    monkeypatch.setattr(mt.PatchBank, "__init__", on_disk)
    run = run_magnet_tiled(img, seg, [module], preset, memory_pixels=0, tile=256, tmp_dir=str(tmp_path))
    try:
        assert folders, "no patch bank was made"
        np.testing.assert_array_equal(run.probs(Window.full(img.shape[:2])), whole.probs)
    finally:
        run.close()
    assert not list((tmp_path / "bank").iterdir())  # every bank's store removed


def test_tiled_result_does_not_depend_on_the_tile_size(binary_case, tmp_path):
    seg, img, preset, module, whole = binary_case
    hw = img.shape[:2]
    runs = [run_magnet_tiled(img, seg, [module], preset, tmp_dir=str(tmp_path), **kw)
            for kw in ({"memory_pixels": 0, "tile": 256}, {})]  # 256-px tiles; the default (stages in memory)
    try:
        assert runs[1].report()["tiled"]["stages_in_memory"] == ["512x256", "1024x512", "2048x1024"]
        for run in runs:
            np.testing.assert_array_equal(run.probs(Window.full(hw)), whole.probs)
        w = Window(300, 1100, 333, 517)  # any window reads the same values
        np.testing.assert_array_equal(runs[0].probs(w), whole.probs[w.slices])
    finally:
        for run in runs:
            run.close()


@pytest.mark.parametrize(("classes", "fast", "resize"), [(4, True, "area"), (3, False, "linear")])
def test_tiled_equals_whole_image_multiclass(classes, fast, resize, tmp_path):
    """C = 4 MagNet-Fast with overlapping patches (stage sizes not multiples of the crop), and full
    MagNet (every patch, a fraction of the points), on a small budget (the smallest the engine's level
    plan takes here; R stays in memory at this size, `test_patch_bank_on_disk...` puts it on disk)."""
    seg = ColourSegmenter(classes, (128, 96), resize=resize)
    img = blocky_image((600, 1000), block=13)
    preset = make_preset(seg, kernel=5, n_points=2**14 if fast else 0.5)
    module = fill_module(classes)
    whole = run_magnet(img, seg, [module], preset, fast=fast, batch_size=2)
    tiled = run_magnet_tiled(img, seg, [module], preset, fast=fast, batch_size=2, memory_pixels=0, tile=256,
                             tmp_dir=str(tmp_path), budget=(350 << 20) + (210 << 20))
    try:
        _compare(whole, tiled, img.shape[:2])
        assert whole.stages[-1].patches_total > 8
    finally:
        tiled.close()


def test_tiled_equals_whole_image_with_a_user_mask(tmp_path):
    seg = ColourSegmenter(3, (64, 48))
    img = blocky_image((384, 512), block=11)
    labels = np.zeros((96, 128), np.uint8)
    labels[20:70, 30:100] = 2
    labels[:, 110:] = 1
    from refine_cli.refiners.magnet import coarse_to_probs

    probs = coarse_to_probs(labels, 3)
    preset = make_preset(seg, n_points=3000)
    whole = run_magnet(img, seg, [fill_module(3)], preset, probs)
    tiled = run_magnet_tiled(img, seg, [fill_module(3)], preset, probs, memory_pixels=0, tile=256,
                             tmp_dir=str(tmp_path))
    try:
        _compare(whole, tiled, img.shape[:2])
        assert seg.images == 2 * 3 * (len(whole.stages) - 1)  # O only: no stage-1 segmentation in either
    finally:
        tiled.close()


def test_4k_whole_versus_tiled(tmp_path):
    """3840x2160 (input 256: stages 480x270 -> 960x540 -> 1920x1080 -> 3840x2160, integer factors):
    identical label maps with float32 stores; float16 stores move a few pixels. Prints the figures
    (differing pixels, top-k ties per stage, timings)."""
    hw = (2160, 3840)
    seg = ColourSegmenter(2, (256, 256))
    img = blocky_image(hw, block=37)
    preset = make_preset(seg, kernel=5, n_points=2**16)
    module = fill_module(2)
    t0 = time.perf_counter()
    whole = run_magnet(img, seg, [module], preset)
    t_whole = time.perf_counter() - t0
    figures = {}
    for dtype in ("float32", "float16"):
        t0 = time.perf_counter()
        tiled = run_magnet_tiled(ArrayImage(img), seg, [module], preset, budget=1 << 30, store_dtype=dtype,
                                 tmp_dir=str(tmp_path))
        labels = tiled.labels(Window.full(hw))
        rep = tiled.report()
        in_memory = rep["tiled"]["stages_in_memory"]
        figures[dtype] = {"differing_pixels": int((labels != whole.labels).sum()),
                          "seconds": round(time.perf_counter() - t0, 1),
                          "tiled_stages": [s["scale"] for s in rep["stages"][1:]
                                           if f"{s['scale'][0]}x{s['scale'][1]}" not in in_memory],
                          "ties": [(c["tied"], c["tied_taken"]) for c in rep["tiled"]["cuts"]]}
        if dtype == "float32":
            _compare(whole, tiled, hw)
        tiled.close()
    print(f"4K whole {t_whole:.1f}s; tiled {figures}")  # shown with -s
    assert figures["float32"]["differing_pixels"] == 0
    assert figures["float32"]["tiled_stages"] == [[1920, 1080], [3840, 2160]]
    assert figures["float16"]["differing_pixels"] < 0.001 * hw[0] * hw[1]


# --------------------------------------------------------------------------- the refiner and the engine


class _Collect:
    """A final writer keeping the rows it gets."""

    def __init__(self, shape, channels):
        self.out = np.zeros((*shape, channels), np.float32)

    def write(self, row0, block):
        self.out[row0 : row0 + block.shape[0]] = block


def _scene(img, budget, with_source=True):
    src = ImageSource(ArrayReader("mem", img))
    return src, Scene(shape=img.shape[:2], read_overview=lambda shape, binarize=False: (
        img.astype(np.float32), None), max_memory=budget, has_mask=False, image_source=src if with_source else None)


def test_refiner_goes_tiled_when_the_whole_image_does_not_fit(tmp_path):
    seg = ColourSegmenter(2, (64, 64))
    img = blocky_image((384, 640), block=9)
    preset = make_preset(seg, n_points=4000)
    budget = 1 << 30
    outs = {}
    for tiled in (False, True):
        refiner = MagnetRefiner(seg, [fill_module(2)], preset)
        if tiled:  # pretend the whole-image path needs one byte more than the budget
            refiner.whole_image_bytes = lambda shape: budget + 1  # type: ignore[method-assign]
        src, scene = _scene(img, budget)
        refiner.prepare(scene)
        assert (refiner.staged is not None) == tiled
        writer = _Collect(img.shape[:2], 1)
        levels = run_levels(src, None, refiner, writer, timer=StageTimer(), budget=budget, bytes_out=2,
                            overlap=16, tile_size=128, tmp_dir=str(tmp_path))
        outs[tiled] = writer.out[..., 0]
        # the tiled path's stages are the engine's levels: their points are counted once they ran
        assert refiner.report()["points"] > 0 and ("tiled" in refiner.report()) == tiled
        assert refiner.describe()["tiled"] == tiled
        assert len(levels) == (len(refiner.report()["stages"]) - 1 if tiled else 1)
        if tiled:  # tiles without a boundary are copied without reading the image
            assert levels[-1].stats.tiles_skipped > 0
    np.testing.assert_allclose(outs[True], outs[False], rtol=0, atol=1e-6)  # blending rounds both alike
    assert outs[True].std() > 0.01
    assert not list(tmp_path.iterdir())


def test_refiner_tiled_option_and_errors():
    seg = ColourSegmenter(2, (64, 64))
    img = blocky_image((256, 384), block=9)
    preset = make_preset(seg, n_points=1000)
    forced = MagnetRefiner(seg, [fill_module(2)], preset, tiled=True)
    _, scene = _scene(img, 2 << 30)
    forced.prepare(scene)
    assert forced.staged is not None and forced.result is None and forced.initial_coarse() is None
    shapes = forced.level_shapes((256, 384))  # one level per refinement stage, the last the image's
    assert len(shapes) > 1 and shapes[-1] == (256, 384)
    first = forced.level_input(0, None)  # the first stage's Y by window, every class
    assert first is not None and first.shape == shapes[0] and first.channels == 2
    first.close()
    forced.close()
    whole = MagnetRefiner(seg, [fill_module(2)], preset, tiled=False)
    with pytest.raises(ResourceError, match="raise --max-memory"):
        whole.prepare(_scene(img, whole.whole_image_bytes((256, 384)) - 1)[1])
    no_source = MagnetRefiner(seg, [fill_module(2)], preset, tiled=True)
    with pytest.raises(ResourceError, match="image source"):
        no_source.prepare(_scene(img, 2 << 30, with_source=False)[1])


def test_tiled_run_rejects_a_budget_it_cannot_keep():
    seg = ColourSegmenter(2, (64, 64))
    with pytest.raises(ResourceError, match="raise --max-memory"):
        run_magnet_tiled(blocky_image((128, 256)), seg, [fill_module(2)], make_preset(seg), budget=380 << 20)
    with pytest.raises(UsageError, match="multiple of"):
        run_magnet_tiled(blocky_image((128, 256)), seg, [fill_module(2)], make_preset(seg), tile=300)


def test_score_samples_follow_the_reference_score_map():
    """E is only needed where nearest-down samples it: Q_small from those samples equals score_map's."""
    from refine_cli.refiners.magnet_points import nearest_indices, score_map

    rng = torch.Generator().manual_seed(3)
    yu = torch.rand(1, 1, 300, 500, generator=rng)
    r = torch.softmax(torch.randn(1, 3, 300, 500, generator=rng) * 2, 1)
    e = certainty(r) * yu
    ref = score_map(e, (64, 96), 5)
    rows, cols = nearest_indices(300, 64), nearest_indices(500, 96)
    samples = certainty(r[..., rows, :][..., cols]) * yu[..., rows, :][..., cols]
    assert torch.equal(median_filter(samples, 5), ref.q_small)
    assert math.isclose(float(ref.q.max()), float(ref.q_small.max()))


@pytest.mark.parametrize("last", [(160, 96), (480, 288)])  # smaller than the image, larger than it
def test_absolute_scales_are_resized_to_the_image_like_the_reference(last, tmp_path):
    """Presets with absolute scales (Cityscapes, DeepGlobe): the last stage is resized to the image
    at the end, enlarged window by window or (when it shrinks) whole, as ``finish`` does."""
    seg = ColourSegmenter(3, (40, 24))
    img = blocky_image((240, 400), block=9)
    scales = ((40, 24), (80, 48), last)
    preset = make_preset(seg, scales=scales, fast_scales=None, refinement=("a", "b"), n_points=800)
    modules = [fill_module(3), fill_module(3)]
    whole = run_magnet(img, seg, modules, preset)
    tiled = run_magnet_tiled(img, seg, modules, preset, memory_pixels=0, tile=256, tmp_dir=str(tmp_path))
    try:
        assert [s.scale for s in tiled.stages] == list(scales)
        _compare(whole, tiled, img.shape[:2])
    finally:
        tiled.close()


# --------------------------------------------------------------------------- issue 14.7: confident rule, snap


def test_tiled_equals_whole_image_with_the_confident_rule(tmp_path):
    """``replace="confident"`` is a pointwise test, so the tiled run keeps the whole-image result bit for bit
    (1024x2048, the binary preset's geometry, with a module that hedges on sure background)."""
    import dataclasses

    from test_magnet_pipeline import HedgingModule

    seg = ColourSegmenter(2, (256, 256))
    img = blocky_image((1024, 2048), block=24)
    preset = dataclasses.replace(make_preset(seg, kernel=5, n_points=2**16), replace="confident")
    module = HedgingModule()
    whole = run_magnet(img, seg, [module], preset)
    tiled = run_magnet_tiled(ArrayImage(img), seg, [module], preset, memory_pixels=0, tile=512,
                             tmp_dir=str(tmp_path))
    try:
        _compare(whole, tiled, img.shape[:2])
        assert tiled.report()["replace"] == whole.report()["replace"] == "confident"
        paper = run_magnet(img, seg, [module], make_preset(seg, kernel=5, n_points=2**16))
        assert not np.array_equal(paper.probs, whole.probs)  # the rule changed something
    finally:
        tiled.close()


def test_refiner_snap_is_the_same_tiled_and_whole_and_keeps_the_budget(tmp_path):
    """The binary preset's edge snap runs as the engine's level over the final Y in both paths: same output;
    the tiled path's level plan counts rendering Y per window and what the run holds."""
    from test_magnet_pipeline import HedgingModule, _binary_like, portrait_like, run_refiner

    from refine_cli.refiners.magnet_method import SnapOverY

    image, _ = portrait_like()
    outs = {}
    for tiled in (False, True):
        refiner = MagnetRefiner(ColourSegmenter(2, (64, 64)), [HedgingModule()], _binary_like(), tiled=tiled)
        outs[tiled] = run_refiner(refiner, image, str(tmp_path))
        level = refiner.for_level(0, True)
        assert isinstance(level, SnapOverY) and level.halo == 33
        if tiled:
            run = refiner.staged
            assert level.tile_memory(100) == 100 * (110 + run.plan.bytes_per_pixel + 8)
            assert level.fixed_memory() == refiner.fixed_memory() + run.held_bytes()
        assert refiner.describe()["snap"] == {"radius": 16, "eps": 1e-4, "halo": 33}
        refiner.close()
    np.testing.assert_allclose(outs[True], outs[False], rtol=0, atol=1e-6)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("tiled", [False, True])
def test_dry_run_plans_the_stages_the_run_takes(tmp_path, tiled):
    """``refine batch --dry-run`` foresees MagNet's path and, tiled, one level per stage with what each
    stage holds in memory: its estimate is the run's own, byte for byte."""
    from conftest import write_png
    from magnet_fixtures import write_fill_checkpoint, write_torchscript_segmenter

    from refine_cli.api import refine_file
    from refine_cli.batch import OutputOptions, plan_file_memory
    from refine_cli.config import MagnetOptions, RefineConfig

    seg = write_torchscript_segmenter(tmp_path, classes=2, size=(64, 64))
    weights = write_fill_checkpoint(tmp_path / "w.pth", classes=2)
    write_png(tmp_path / "img.png", blocky_image((384, 640), block=9))
    cfg = RefineConfig(method="magnet-fast", segmenter=str(seg), threads=1,
                       magnet=MagnetOptions(weights=str(weights), tiled=tiled))
    planned = plan_file_memory(str(tmp_path / "img.png"), cfg, OutputOptions())
    rep = refine_file(str(tmp_path / "img.png"), None, str(tmp_path / "o.tif"), config=cfg)
    assert rep.refiner["tiled"] == tiled
    assert len(rep.levels) == (len(rep.refiner["magnet"]["stages"]) - 1 if tiled else 1)
    assert planned.total == rep.memory_plan["estimate_bytes"]
