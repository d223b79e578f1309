"""MagNet's point step and patch geometry against golden_points.npz and reference implementations.

Tolerances (GOLDEN.md §3): Yu, R_certainty and E within 1e-6; E_small, Q_small and Q
exactly equal (they only copy values); the canonical index set and ``Y_new_canonical``
exact; the official ``grid_sample`` replacement within 1e-5 of the exact copy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from conftest import SHARED
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from refine_cli.devtools.fill_magnet import golden_probabilities
from refine_cli.errors import UsageError
from refine_cli.refiners.magnet_points import (
    POINT_PRESETS,
    StreamingTopK,
    TopKCut,
    canonical_topk,
    certainty,
    coverage_count,
    covered_area,
    crop_resize,
    ensemble_patches,
    error_score,
    median_filter,
    nearest_indices,
    patch_grid,
    patch_mean,
    rank_patches,
    replace_points,
    replace_where,
    resize_nearest,
    roi_align_legacy,
    score_map,
    stage_points,
    topk_cut,
    uncertainty,
)
from refine_cli.tiling.grid import Window

REF = SHARED / "reference" / "magnet"

needs_ref = pytest.mark.skipif(
    not (REF / "golden_points.npz").is_file(),
    reason=f"MagNet reference data not found at {REF} (needs the shared/ checkout beside the repository)",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CASES = ["stage", "patch"]


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(REF / "golden_points.npz") as z:
        return {k: z[k] for k in z.files}


def _case(golden: dict[str, np.ndarray], case: str) -> dict[str, np.ndarray]:
    prefix = case + "_"
    return {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}


def _run_step(g: dict[str, np.ndarray], device: str = "cpu") -> dict[str, torch.Tensor]:
    """The whole point step on one golden case."""
    y = torch.from_numpy(g["Y"]).to(device)
    r = torch.from_numpy(g["R"]).to(device)
    yu = uncertainty(y)
    rc = certainty(r)
    e = error_score(yu, rc)
    w_in, h_in = (int(v) for v in g["input_size_wh"])
    score = score_map(e, (h_in, w_in), int(g["kernel"]))
    idx = canonical_topk(score.q, int(g["k"]))
    return {"Yu": yu, "R_certainty": rc, "E": e, "E_small": score.e_small, "Q_small": score.q_small,
            "Q": score.q, "indices": idx, "Y_new": replace_points(y, r, idx)}


def _reference_topk(q: np.ndarray, k: int, valid: np.ndarray | None = None) -> np.ndarray:
    """Sort by (Q descending, flat index ascending), take the first k; ascending indices."""
    flat = q.reshape(-1).astype(np.float64)
    idx = np.arange(flat.size) if valid is None else np.flatnonzero(valid.reshape(-1))
    order = np.lexsort((idx, -flat[idx]))
    return np.sort(idx[order[:k]])


# --------------------------------------------------------------------------- golden


@needs_ref
@pytest.mark.parametrize("case", CASES)
def test_point_step_golden(case: str, golden: dict[str, np.ndarray]) -> None:
    g = _case(golden, case)
    out = _run_step(g)
    for key in ("Yu", "R_certainty", "E"):
        np.testing.assert_allclose(out[key].numpy(), g[key], atol=1e-6, rtol=0, err_msg=key)
    for key in ("E_small", "Q_small", "Q"):
        assert np.array_equal(out[key].numpy(), g[key]), key
    assert np.array_equal(out["indices"].numpy(), g["indices_canonical_sorted"])
    assert np.array_equal(out["Y_new"].numpy(), g["Y_new_canonical"])
    # an exact copy at the official indices matches the official grid_sample replacement
    official = replace_points(torch.from_numpy(g["Y"]), torch.from_numpy(g["R"]),
                              torch.from_numpy(g["indices_official_sorted"]))
    np.testing.assert_allclose(official.numpy(), g["Y_new_official"], atol=1e-5, rtol=0)


@needs_ref
@pytest.mark.parametrize("case", CASES)
def test_inputs_regenerate_from_tags(case: str, golden: dict[str, np.ndarray]) -> None:
    g = _case(golden, case)
    for name in ("Y", "R"):
        x = golden_probabilities(f"{case}_{name}", g[name].shape, 3.0)
        assert np.array_equal(x.numpy(), g[name])


@needs_ref
@pytest.mark.parametrize("case", CASES)
def test_tie_statistics_and_official_set_valid(case: str, golden: dict[str, np.ndarray]) -> None:
    g = _case(golden, case)
    q = torch.from_numpy(g["Q"])
    k = int(g["k"])
    cut = topk_cut(q, k)
    assert cut.threshold == float(g["q_threshold"])
    assert (cut.n_greater, cut.n_equal) == (int(g["n_greater"]), int(g["n_equal"]))
    assert 0 < cut.n_tied_taken < cut.n_equal  # the golden cases really split a tie
    # The official CPU set satisfies the tie rule: all Q > t, the rest Q == t, k in all.
    official = g["indices_official_sorted"]
    flat = g["Q"].reshape(-1)
    t = g["q_threshold"]
    assert len(np.unique(official)) == k
    assert set(np.flatnonzero(flat > t)) <= set(official.tolist())
    assert np.all(flat[official] >= t) and np.sum(flat[official] == t) == k - int(g["n_greater"])
    # ...but it is not the canonical one.
    assert not np.array_equal(official, g["indices_canonical_sorted"])


@needs_ref
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bits", [16, 5])
def test_streaming_topk_on_golden_tiles(case: str, bits: int, golden: dict[str, np.ndarray]) -> None:
    g = _case(golden, case)
    q = torch.from_numpy(g["Q"])[0, 0]
    h, w = q.shape
    sel = StreamingTopK(int(g["k"]), (h, w), bits=bits)
    tiles = [(r, c) for r in range(0, h, 20) for c in range(0, w, 28)]
    while not sel.done:
        for r, c in reversed(tiles):  # any order
            sel.update(q[r : r + 20, c : c + 28], r, c)
        sel.end_pass()
    cut = sel.result()
    mask = torch.zeros(h, w, dtype=torch.bool)
    for r, c in tiles:
        mask[r : r + 20, c : c + 28] = cut.mask(q[r : r + 20, c : c + 28], r, c)
    assert np.array_equal(torch.nonzero(mask.reshape(-1)).squeeze(1).numpy(), g["indices_canonical_sorted"])
    assert cut == topk_cut(q, int(g["k"]))


# --------------------------------------------------------------------------- uncertainty


def test_certainty_is_top1_minus_top2() -> None:
    p = torch.tensor([0.5, 0.3, 0.2]).view(1, 3, 1, 1)
    assert certainty(p).shape == (1, 1, 1, 1)
    assert float(certainty(p)) == pytest.approx(0.2)
    assert float(uncertainty(p)) == pytest.approx(0.8)
    assert float(error_score(uncertainty(p), certainty(p))) == pytest.approx(0.16)


# --------------------------------------------------------------------------- resampling


@given(st.integers(1, 400), st.integers(1, 400))
@settings(max_examples=200, deadline=None)
def test_nearest_indices_exact_formula(n_in: int, n_out: int) -> None:
    idx = nearest_indices(n_in, n_out).tolist()
    assert idx == [d * n_in // n_out for d in range(n_out)]
    assert all(0 <= i < n_in for i in idx)


@pytest.mark.parametrize("n_in, n_out", [(2048, 256), (256, 2048), (1024, 128), (2448, 508), (508, 2448),
                                         (1224, 508), (612, 508), (508, 612), (96, 48), (48, 96), (7, 7)])
def test_nearest_matches_torch_on_magnet_sizes(n_in: int, n_out: int) -> None:
    x = torch.arange(n_in, dtype=torch.float32).view(1, 1, 1, n_in)
    expected = F.interpolate(x, size=(1, n_out), mode="nearest")
    assert torch.equal(resize_nearest(x, (1, n_out)), expected)


@given(
    h=st.integers(1, 14), w=st.integers(1, 14), kernel=st.sampled_from([1, 3, 5, 7]),
    seed=st.integers(0, 2**16), chunk=st.sampled_from([1, 50, 1 << 24]),
)
@settings(max_examples=60, deadline=None)
def test_median_filter_matches_scipy(h: int, w: int, kernel: int, seed: int, chunk: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 4, size=(h, w)).astype(np.float32) / 4  # many ties
    expected = ndimage.median_filter(x, size=kernel, mode="constant", cval=0.0)
    got = median_filter(torch.from_numpy(x).view(1, 1, h, w), kernel, max_elements=chunk)
    assert got.shape == (1, 1, h, w)
    assert np.array_equal(got[0, 0].numpy(), expected)


def test_median_filter_rejects_even_kernels() -> None:
    with pytest.raises(UsageError, match="odd"):
        median_filter(torch.zeros(1, 1, 8, 8), 16)


# --------------------------------------------------------------------------- top-k


def _scores(draw: st.DrawFn, h: int, w: int) -> np.ndarray:
    """Scores with many ties (a few distinct levels), including -0.0."""
    palette = [0.0, -0.0, 0.25, 0.5, 0.75, 1.0, 1e-30, 3.0]
    levels = draw(st.lists(st.sampled_from(palette), min_size=1, max_size=5))
    picks = draw(st.lists(st.integers(0, len(levels) - 1), min_size=h * w, max_size=h * w))
    return np.array([levels[i] for i in picks], dtype=np.float32).reshape(h, w)


@st.composite
def topk_problems(draw: st.DrawFn) -> tuple[np.ndarray, int, np.ndarray | None, int, int, int]:
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    q = _scores(draw, h, w)
    use_valid = draw(st.booleans())
    valid = np.array(draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))).reshape(h, w) \
        if use_valid else None
    k = draw(st.integers(0, h * w + 2))
    return q, k, valid, draw(st.integers(2, 12)), draw(st.integers(2, 12)), draw(st.sampled_from([3, 8, 16]))


@given(topk_problems())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_canonical_topk_matches_sorting(problem: tuple) -> None:
    q, k, valid, *_ = problem
    got = canonical_topk(torch.from_numpy(q), k, None if valid is None else torch.from_numpy(valid))
    assert np.array_equal(got.numpy(), _reference_topk(q, k, valid))


@given(topk_problems())
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_streaming_topk_picks_the_canonical_set(problem: tuple) -> None:
    q, k, valid, th, tw, bits = problem
    h, w = q.shape
    tiles = [(r, c) for r in range(0, h, th) for c in range(0, w, tw)]

    def tile(a: np.ndarray | None, r: int, c: int) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a[r : r + th, c : c + tw]))

    sel = StreamingTopK(k, (h, w), bits=bits)
    passes = 0
    while not sel.done:
        for r, c in tiles:
            sel.update(tile(q, r, c), r, c, tile(valid, r, c))
        sel.end_pass()
        passes += 1
    assert passes <= math.ceil(32 / bits) + math.ceil(max(1, (h * w - 1).bit_length()) / bits)
    cut = sel.result()
    mask = np.zeros((h, w), dtype=bool)
    for r, c in tiles:
        mask[r : r + th, c : c + tw] = cut.mask(tile(q, r, c), r, c, tile(valid, r, c)).numpy()
    assert np.array_equal(np.flatnonzero(mask), _reference_topk(q, k, valid))
    assert cut == topk_cut(torch.from_numpy(q), k, None if valid is None else torch.from_numpy(valid))


def test_streaming_topk_detects_changed_scores() -> None:
    q = torch.arange(64, dtype=torch.float32).view(8, 8) % 5
    sel = StreamingTopK(10, (8, 8))
    sel.update(q)
    sel.end_pass()
    sel.update(q + 1)
    with pytest.raises(RuntimeError, match="changed between passes"):
        sel.end_pass()


def test_streaming_topk_rejects_tiles_outside_the_map() -> None:
    sel = StreamingTopK(3, (8, 8))
    with pytest.raises(ValueError, match="outside"):
        sel.update(torch.zeros(4, 4), 6, 0)


def test_topk_rejects_nan_and_float64() -> None:
    with pytest.raises(ValueError, match="NaN"):
        canonical_topk(torch.tensor([[0.0, float("nan")]]), 1)
    with pytest.raises(ValueError, match="float32"):
        canonical_topk(torch.zeros(2, 2, dtype=torch.float64), 1)


def test_topk_edge_counts() -> None:
    q = torch.tensor([[0.2, 0.1], [0.2, 0.0]])
    assert canonical_topk(q, 0).tolist() == []
    assert canonical_topk(q, 9).tolist() == [0, 1, 2, 3]
    assert canonical_topk(q, 1).tolist() == [0]  # tie at 0.2: lower flat index first
    cut = topk_cut(q, 4)
    assert isinstance(cut, TopKCut) and cut.select_all and cut.n_tied_taken == 0


# --------------------------------------------------------------------------- replacement


def test_replace_where_matches_replace_points() -> None:
    torch.manual_seed(1)
    y, r = torch.rand(1, 3, 6, 7).softmax(1), torch.rand(1, 3, 6, 7).softmax(1)
    idx = torch.tensor([0, 5, 13, 41])
    mask = torch.zeros(42, dtype=torch.bool)
    mask[idx] = True
    out = replace_points(y, r, idx)
    assert torch.equal(out, replace_where(y, r, mask.view(6, 7)))
    assert torch.equal(out.view(1, 3, -1)[..., idx], r.view(1, 3, -1)[..., idx])
    keep = torch.ones(42, dtype=torch.bool)
    keep[idx] = False
    assert torch.equal(out.view(1, 3, -1)[..., keep], y.view(1, 3, -1)[..., keep])


# --------------------------------------------------------------------------- patches and budget


def test_rank_patches_descending_like_the_paper() -> None:
    scores = torch.tensor([0.1, 0.5, 0.3, 0.5])
    assert rank_patches(scores, 2) == [1, 3]  # official code would pick [0, 2] (ascending)
    assert rank_patches(scores, None) == [1, 3, 2, 0]
    assert rank_patches([0.2, 0.2], 5) == [0, 1]
    with pytest.raises(UsageError):
        rank_patches(scores, 0)


def test_patch_mean_is_the_exact_box_mean() -> None:
    yu = torch.arange(24, dtype=torch.float32).view(4, 6)
    means = patch_mean(yu, [Window(0, 0, 2, 3), Window(2, 3, 2, 3)])
    assert means.tolist() == pytest.approx([float(yu[:2, :3].mean()), float(yu[2:, 3:].mean())])


def test_stage_points_rule_and_presets() -> None:
    assert stage_points(32768, 2048 * 1024) == 32768
    assert stage_points(32768, 1000) == 1000
    assert stage_points(0.75, 1224 * 1224) == int(0.75 * 1224 * 1224)
    assert stage_points(0.9, 3 * 612 * 612) == math.floor(0.9 * 3 * 612 * 612)
    assert stage_points(1.0, 77) == 77
    with pytest.raises(UsageError):
        stage_points(0, 10)
    with pytest.raises(UsageError):
        stage_points(2.5, 10)
    assert POINT_PRESETS["cityscapes"].kernel == 5 and POINT_PRESETS["deepglobe"].kernel == 11
    assert POINT_PRESETS["cityscapes"].full_points == 2**15


@given(st.integers(1, 300), st.integers(1, 300), st.integers(6, 120), st.integers(6, 120))
@settings(max_examples=150, deadline=None)
def test_patch_grid_covers_exactly(h: int, w: int, ch: int, cw: int) -> None:
    boxes = patch_grid((h, w), (ch, cw))
    assert len(boxes) == math.ceil(h / ch) * math.ceil(w / cw)
    assert {b.shape for b in boxes} == {(min(ch, h), min(cw, w))}
    assert all(b.row >= 0 and b.col >= 0 and b.row_end <= h and b.col_end <= w for b in boxes)
    count = coverage_count(boxes, (h, w))
    assert count.min() >= 1  # every pixel covered
    # averaging weights 1/count sum to 1 at every pixel
    total = np.zeros((h, w))
    for b in boxes:
        total[b.slices] += 1.0 / count[b.slices]
    np.testing.assert_allclose(total, 1.0, rtol=1e-12)
    assert covered_area(boxes, (h, w)) == h * w


def test_patch_grid_official_sizes_tile_without_overlap() -> None:
    cases = [((128, 256), (128, 256), 1), ((256, 512), (128, 256), 4), ((512, 1024), (128, 256), 16),
             ((1024, 2048), (128, 256), 64), ((2448, 2448), (612, 612), 16)]
    for stage, crop, n in cases:
        boxes = patch_grid(stage, crop)
        assert len(boxes) == n
        assert coverage_count(boxes, stage).max() == 1


def test_ensemble_averages_overlaps_to_probabilities() -> None:
    # 1000x2000 with 612 crops: the official ensemble left 35 % of pixels with class sums < 1.
    stage = (250, 500)  # same geometry at quarter scale: 153 px crops -> overlapping grid
    boxes = patch_grid(stage, (153, 153))
    torch.manual_seed(0)
    patches = [torch.rand(1, 3, 64, 64).softmax(1) for _ in boxes]
    r, covered = ensemble_patches(patches, boxes, stage)
    assert r.shape == (1, 3, *stage) and bool(covered.all())
    torch.testing.assert_close(r.sum(1), torch.ones(1, *stage), atol=1e-6, rtol=0)
    # a subset (MagNet-Fast) leaves zeros outside the chosen patches
    r2, covered2 = ensemble_patches(patches[:2], boxes[:2], stage)
    assert int(covered2.sum()) == covered_area(boxes[:2], stage)
    assert float(r2[..., ~covered2].abs().max()) == 0.0


def test_crop_resize_same_size_is_the_crop() -> None:
    x = torch.rand(1, 2, 20, 30)
    box = Window(3, 4, 10, 12)
    assert torch.equal(crop_resize(x, box, (10, 12)), x[..., 3:13, 4:16])
    assert crop_resize(x, box, (5, 6)).shape == (1, 2, 5, 6)


def test_roi_align_legacy_half_pixel_shift() -> None:
    # x[i, j] = j: a same-size legacy roi_align samples at j + 0.5 (between two pixels).
    x = torch.arange(16, dtype=torch.float32).repeat(12, 1).view(1, 1, 12, 16)
    out = roi_align_legacy(x, Window(2, 3, 6, 8), (6, 8))
    np.testing.assert_allclose(out[0, 0, 0].numpy(), np.arange(3, 11) + 0.5, atol=1e-6)
    # at the right border the sample is clamped to the last pixel
    edge = roi_align_legacy(x, Window(0, 8, 4, 8), (4, 8))
    assert float(edge[0, 0, 0, -1]) == pytest.approx(15.0)
    # a constant map stays constant, also when shrinking (adaptive sampling averages)
    const = torch.full((1, 2, 20, 20), 0.25)
    np.testing.assert_allclose(roi_align_legacy(const, Window(1, 1, 15, 17), (4, 6)).numpy(), 0.25, atol=1e-7)


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@needs_cuda
@needs_ref
@pytest.mark.parametrize("case", CASES)
def test_point_step_golden_cuda(case: str, golden: dict[str, np.ndarray]) -> None:
    g = _case(golden, case)
    out = {k: v.cpu() for k, v in _run_step(g, "cuda").items()}
    for key in ("Yu", "R_certainty", "E"):
        np.testing.assert_allclose(out[key].numpy(), g[key], atol=1e-6, rtol=0, err_msg=key)
    for key in ("E_small", "Q_small", "Q"):
        assert np.array_equal(out[key].numpy(), g[key]), key
    assert np.array_equal(out["indices"].numpy(), g["indices_canonical_sorted"])
    assert np.array_equal(out["Y_new"].numpy(), g["Y_new_canonical"])


@pytest.mark.cuda
@needs_cuda
@needs_ref
def test_streaming_topk_cuda_tiles(golden: dict[str, np.ndarray]) -> None:
    g = _case(golden, "stage")
    q = torch.from_numpy(g["Q"])[0, 0].cuda()
    sel = StreamingTopK(int(g["k"]), tuple(q.shape))
    while not sel.done:
        for r in range(0, q.shape[0], 32):
            sel.update(q[r : r + 32], r, 0)
        sel.end_pass()
    mask = torch.cat([sel.result().mask(q[r : r + 32], r, 0) for r in range(0, q.shape[0], 32)])
    picked = torch.nonzero(mask.reshape(-1)).squeeze(1).cpu().numpy()
    assert np.array_equal(picked, g["indices_canonical_sorted"])
