"""Tests of refine_cli.evaluate: hand-computed cases, an independent reference, streamed == whole."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from refine_cli.errors import InputError, UsageError
from refine_cli.evaluate import (
    EvalOptions,
    MetricAccumulator,
    Metrics,
    binarize,
    core_windows,
    disk,
    evaluate_arrays,
    evaluate_streamed,
    gain,
    mba_radii,
)
from refine_cli.tiling.grid import Window


def square(shape, top, left, side, value=255):
    m = np.zeros(shape, np.uint8)
    m[top:top + side, left:left + side] = value
    return m


def streamed(pred, gt, window_size, options=None):
    return evaluate_streamed(lambda w: pred[w.slices], lambda w: gt[w.slices], gt.shape, window_size, options)


# --------------------------------------------------------------------------- radii and kernels


@pytest.mark.parametrize(
    ("shape", "radii"),
    [
        # max_r = 9000/300 = 30; (30-1)/5 = 5.8 -> int(5.8 i) = 0, 5, 11, 17, 23
        ((5000, 4000), (1, 6, 12, 18, 24)),
        # max_r = 6 -> steps of exactly 1
        ((900, 900), (1, 2, 3, 4, 5)),
        # max_r = 3.33 -> (2.33/5) i = 0, .47, .93, 1.4, 1.87 -> truncated 0, 0, 0, 1, 1
        ((500, 500), (1, 1, 1, 2, 2)),
        # max_r = 0.67 < 1: negative steps truncate toward 0, never below radius 1
        ((100, 100), (1, 1, 1, 1, 1)),
        # BIG's largest: max_r = 28.67 -> 5.53 i -> 0, 5, 11, 16, 22
        ((3600, 5000), (1, 6, 12, 17, 23)),
    ],
)
def test_mba_radii(shape, radii):
    assert mba_radii(shape) == radii


def test_disk_shapes():
    assert disk(0).tolist() == [[1]]
    assert disk(1).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    # |dx| <= round(sqrt(4 - dy^2)): dy=0 -> 2, dy=1 -> round(1.73) = 2, dy=2 -> 0
    assert disk(2).tolist() == [[0, 0, 1, 0, 0], [1] * 5, [1] * 5, [1] * 5, [0, 0, 1, 0, 0]]


# --------------------------------------------------------------------------- hand-computed cases


def test_half_plane_shifted_by_three():
    # 900 x 900 -> radii 1..5. GT = columns < 450, prediction = columns < 453.
    # Top and bottom borders never create a boundary, so band_r = columns [450-r, 450+r): 2r x 900 px.
    # Wrong band pixels: columns 450..452 inside the band, i.e. min(3, r) columns.
    # acc_r = (2r - min(3, r)) / 2r = 1/2, 2/4, 3/6, 5/8, 7/10 -> mBA = 2.825 / 5 = 0.565.
    gt = np.zeros((900, 900), np.uint8)
    gt[:, :450] = 255
    pred = np.zeros_like(gt)
    pred[:, :453] = 255
    m = evaluate_arrays(pred, gt)
    assert m.radii == (1, 2, 3, 4, 5)
    assert m.counts.band == tuple(2 * r * 900 for r in range(1, 6))
    assert m.counts.band_correct == tuple((2 * r - min(3, r)) * 900 for r in range(1, 6))
    assert m.band_accuracy == pytest.approx((0.5, 0.5, 0.5, 0.625, 0.7))
    assert m.mba == pytest.approx(0.565)
    assert m.iou == pytest.approx(450 / 453)
    assert m.accuracy == pytest.approx(1 - 3 * 900 / 900**2)
    # Boundaries are columns 449 (GT) and 452 (prediction), 900 px each, 3 px apart:
    # unmatched at tolerance 2, all matched at tolerance 3.
    far = evaluate_arrays(pred, gt, EvalOptions(tolerance=2))
    assert (far.counts.gt_boundary, far.counts.pred_boundary) == (900, 900)
    assert (far.boundary_precision, far.boundary_recall, far.boundary_f) == (0.0, 0.0, 0.0)
    near = evaluate_arrays(pred, gt, EvalOptions(tolerance=3))
    assert (near.boundary_precision, near.boundary_recall, near.boundary_f) == (1.0, 1.0, 1.0)


def test_square_shifted_by_three():
    # 100 x 100 (radii all 1, the 3x3 cross). GT = rows/cols [20, 60), prediction shifted right by 3.
    gt = square((100, 100), 20, 20, 40)
    pred = square((100, 100), 20, 23, 40)
    m = evaluate_arrays(pred, gt, EvalOptions(tolerance=0))
    # IoU = 40*37 / (40*43)
    assert m.iou == pytest.approx(1480 / 1720)
    # Cross gradient = dilation (1600 + 4*40 side pixels, no corners) - erosion (38^2):
    # band = 1760 - 1444 = 316 (156 inner ring + 160 outer ring).
    # Wrong: inner ring in columns 20..22 (40 + 2 + 2 = 44) and outer ring column 60 (40): 84.
    assert m.counts.band == (316,) * 5
    assert m.counts.band_correct == (232,) * 5
    assert m.mba == pytest.approx(232 / 316)
    # Both inner boundaries are 156 px rings. Exact matches (tol 0): the shared parts of the
    # top and bottom rows, columns 23..59, 2 x 37 = 74 px.
    assert (m.counts.pred_boundary, m.counts.gt_boundary) == (156, 156)
    assert m.counts.pred_boundary_matched == m.counts.gt_boundary_matched == 74
    assert m.boundary_f == pytest.approx(74 / 156)
    # Tolerance 2 (D(2) reaches dx <= 2 for |dy| <= 1, and (±2, 0)): unmatched prediction
    # pixels are column 62 (40 px, 3 from column 59) and column 23 rows 23..56 (34 px,
    # 3 from column 20 and from row 20): 156 - 74 = 82 matched; the GT side is the mirror image.
    m2 = evaluate_arrays(pred, gt, EvalOptions(tolerance=2))
    assert m2.counts.pred_boundary_matched == m2.counts.gt_boundary_matched == 82
    assert m2.boundary_f == pytest.approx(82 / 156)
    # Tolerance 3: every boundary pixel is within (3, 0) of the other ring.
    assert evaluate_arrays(pred, gt, EvalOptions(tolerance=3)).boundary_f == 1.0


def test_identical_masks_score_one():
    rng = np.random.default_rng(0)
    gt = (cv2.GaussianBlur(rng.random((300, 400)).astype(np.float32), (0, 0), 8) > 0.5).astype(np.uint8) * 255
    assert 0 < np.count_nonzero(gt) < gt.size
    m = evaluate_arrays(gt.copy(), gt)
    assert m.counts.band[0] > 0 and m.counts.gt_boundary > 0
    for name in ("iou", "accuracy", "mba", "boundary_f", "boundary_precision", "boundary_recall"):
        assert getattr(m, name) == 1.0, name
    labels = (gt // 255).astype(np.int32) + (np.arange(400) // 100)[None, :].astype(np.int32)
    lm = evaluate_arrays(labels, labels, EvalOptions(labels=True))
    assert lm.miou == 1.0 and set(lm.class_iou) == {0, 1, 2, 3, 4}
    assert lm.iou == 1.0 and lm.mba == 1.0


def test_empty_prediction():
    gt = square((100, 100), 20, 20, 40)
    m = evaluate_arrays(np.zeros_like(gt), gt)
    assert m.iou == 0.0
    assert m.accuracy == pytest.approx(1 - 1600 / 10000)
    # Only the 160 outer-ring band pixels (GT background) are right.
    assert m.mba == pytest.approx(160 / 316)
    # No predicted boundary: precision is vacuously 1, recall 0, F 0.
    assert (m.boundary_precision, m.boundary_recall, m.boundary_f) == (1.0, 0.0, 0.0)


def test_empty_gt_conventions():
    empty = np.zeros((100, 100), np.uint8)
    both = evaluate_arrays(empty, empty)
    assert (both.iou, both.accuracy, both.mba, both.boundary_f) == (1.0, 1.0, 1.0, 1.0)
    # Empty GT, non-empty prediction: IoU 0; the GT has no band, so mBA is vacuously 1;
    # no GT boundary (recall 1) but nothing predicted matches (precision 0), F 0.
    m = evaluate_arrays(square((100, 100), 20, 20, 40), empty)
    assert m.iou == 0.0
    assert m.counts.band == (0,) * 5 and m.mba == 1.0
    assert (m.boundary_precision, m.boundary_recall, m.boundary_f) == (0.0, 1.0, 0.0)


def test_full_gt_has_no_band_at_image_border():
    # OpenCV's border rule: a mask covering the image has no boundary along the image border.
    full = np.full((50, 60), 255, np.uint8)
    m = evaluate_arrays(full, full)
    assert m.counts.band == (0,) * 5 and m.counts.gt_boundary == 0 and m.counts.pred_boundary == 0
    # A square touching the top-left corner only has boundary on its two inner sides.
    gt = square((50, 60), 0, 0, 10)
    assert evaluate_arrays(gt, gt).counts.gt_boundary == 19


def test_label_maps_hand_case():
    gt = np.array([[0, 0, 1, 1], [0, 2, 2, 1], [0, 2, 2, 1]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [0, 2, 2, 2], [3, 2, 0, 1]], np.uint8)
    m = evaluate_arrays(pred, gt, EvalOptions(labels=True))
    # class 0: inter 2, pred 3, gt 4 -> 2/5; class 1: 3/(4+4-3); class 2: 3/5; class 3: pred only -> 0.
    assert m.counts.classes == ((0, 2, 3, 4), (1, 3, 4, 4), (2, 3, 4, 4), (3, 0, 1, 0))
    assert m.class_iou == pytest.approx({0: 0.4, 1: 0.6, 2: 0.6, 3: 0.0})
    assert m.miou == pytest.approx(0.4)
    # Foreground = label > 0: tp 7, fp 2 ((0,1), (2,0)), fn 1 ((2,2)).
    assert (m.counts.tp, m.counts.fp, m.counts.fn) == (7, 2, 1)
    assert m.iou == pytest.approx(0.7)
    # Ignoring GT label 2 drops its 4 pixels: class 0 -> 2/4, class 1 -> 3/5, class 2 is still
    # predicted once at a counted pixel ((1,3)) -> 0, class 3 -> 0.
    ig = evaluate_arrays(pred, gt, EvalOptions(labels=True, ignore_index=2))
    assert ig.class_iou == pytest.approx({0: 0.5, 1: 0.6, 2: 0.0, 3: 0.0})
    assert ig.miou == pytest.approx(0.275)
    assert ig.counts.pixels == 8
    only = evaluate_arrays(pred, gt, EvalOptions(labels=True, foreground=False))
    assert only.iou is None and only.mba is None and only.miou == pytest.approx(0.4)
    everything_ignored = evaluate_arrays(pred, np.full_like(gt, 9), EvalOptions(labels=True, ignore_index=9))
    assert everything_ignored.miou == 1.0 and everything_ignored.class_iou == {}


def test_soft_prediction_thresholding():
    gt = np.array([[0, 0, 1, 1]], np.uint8) * 255
    soft = np.array([[0.2, 0.4999, 0.5, 0.9]], np.float32)
    assert binarize(soft).tolist() == [[False, False, True, True]]
    assert evaluate_arrays(soft, gt).iou == 1.0
    # threshold 0.7: the 0.5 pixel drops out -> IoU 1/2
    assert evaluate_arrays(soft, gt, EvalOptions(threshold=0.7)).iou == 0.5
    # uint8 soft masks use 255 as full scale: >= 127.5 means >= 128
    assert binarize(np.array([[127, 128]], np.uint8)).tolist() == [[False, True]]
    assert binarize(np.array([[178, 179]], np.uint8), 0.7).tolist() == [[False, True]]
    assert binarize(np.array([[32767, 32768]], np.uint16)).tolist() == [[False, True]]
    # ">=": a value exactly at threshold * scale is foreground
    assert binarize(np.array([[49, 50, 51]], np.int32), 0.5, scale=100).tolist() == [[False, True, True]]
    assert binarize(np.array([[0.25, 0.5]], np.float64), 0.5).tolist() == [[False, True]]


def test_gt_binarisation():
    pred = np.array([[0, 1, 1, 0]], bool)
    for gt in (
        np.array([[0, 128, 255, 127]], np.uint8),  # uint8 > 127
        np.array([[0.0, 0.5, 1.0, 0.49]], np.float32),  # float >= 0.5
        np.array([[0, 1, 1, 0]], np.int32),  # 0/1 integers
        np.array([[False, True, True, False]]),  # bool
    ):
        assert evaluate_arrays(pred, gt).iou == 1.0, gt.dtype
    # A 0/1 uint8 mask needs its full scale stated, or it reads as all background.
    zero_one = np.array([[0, 1, 1, 0]], np.uint8)
    assert evaluate_arrays(pred, zero_one).iou == 0.0
    assert evaluate_arrays(pred, zero_one, EvalOptions(gt_scale=1)).iou == 1.0


def test_gain_and_to_dict():
    gt = square((100, 100), 20, 20, 40)
    coarse = evaluate_arrays(square((100, 100), 20, 23, 40), gt)
    refined = evaluate_arrays(square((100, 100), 20, 21, 40), gt)
    g = gain(refined, coarse)
    assert g["iou"] == pytest.approx(refined.iou - coarse.iou) and g["iou"] > 0
    assert g["mba"] > 0
    assert g["band_accuracy_0"] == pytest.approx(refined.band_accuracy[0] - coarse.band_accuracy[0])
    assert "miou" not in g
    with pytest.raises(UsageError):
        gain(refined, evaluate_arrays(gt, gt, EvalOptions(tolerance=5)))
    d = json.loads(json.dumps(refined.to_dict()))
    assert d["iou"] == refined.iou and d["counts"]["band"] == list(refined.counts.band)


def test_input_errors():
    gt = square((20, 20), 5, 5, 5)
    with pytest.raises(InputError):
        evaluate_arrays(gt[:10], gt)
    with pytest.raises(InputError):
        evaluate_arrays(gt.astype(np.float32), gt, EvalOptions(labels=True))
    with pytest.raises(InputError):
        evaluate_arrays(gt.astype(np.int16) - 1, gt, EvalOptions(labels=True))
    with pytest.raises(InputError):
        evaluate_streamed(lambda w: gt, lambda w: gt[w.slices], gt.shape, 8)
    for bad in (dict(threshold=1.0), dict(tolerance=-1), dict(radii=(0, 1)), dict(ignore_index=3)):
        with pytest.raises(UsageError):
            EvalOptions(**bad)
    with pytest.raises(UsageError):
        list(core_windows((10, 10), 0))
    acc = MetricAccumulator((20, 20))
    core = Window(0, 0, 10, 10)
    with pytest.raises(ValueError, match="halo"):
        acc.add(core, core, gt[:10, :10], gt[:10, :10])
    with pytest.raises(ValueError, match="halo"):
        acc.add(core, Window(0, 0, 25, 25), np.zeros((25, 25), bool), np.zeros((25, 25), bool))
    acc.add(core, Window.full((20, 20)), gt, gt)
    with pytest.raises(ValueError, match="partition"):
        acc.result()


# --------------------------------------------------------------------------- independent reference


def reference_binary(pred_fg, gt_fg, radii, tol):
    """CascadePSP's loop with cv2.morphologyEx, and boundary F with scipy.ndimage."""
    g8 = gt_fg.astype(np.uint8)
    accs = []
    for r in radii:
        band = cv2.morphologyEx(g8, cv2.MORPH_GRADIENT, disk(r)) > 0
        accs.append(np.mean(pred_fg[band] == gt_fg[band]) if band.any() else 1.0)
    cross = ndimage.generate_binary_structure(2, 1)

    def boundary(m):  # border_value=1: outside pixels do not erode (OpenCV's rule)
        return m & ~ndimage.binary_erosion(m, cross, border_value=1)

    def near(m):
        return ndimage.binary_dilation(m, disk(tol).astype(bool)) if tol else m

    bp, bg = boundary(pred_fg), boundary(gt_fg)
    matched = int((bp & near(bg)).sum()), int((bg & near(bp)).sum())
    return float(np.mean(accs)), *matched, int(bp.sum()), int(bg.sum())


@pytest.mark.parametrize("tol", [0, 1, 4])
def test_matches_independent_reference(tol):
    rng = np.random.default_rng(tol)
    shape = (600, 900)  # radii 1, 1, 2, 3, 4
    blur = cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), 6)
    gt = blur > 0.5
    pred = (blur + 0.01 * rng.standard_normal(shape).astype(np.float32)) > 0.5
    m = evaluate_arrays(pred.astype(np.uint8) * 255, gt, EvalOptions(tolerance=tol))
    mba, pm, gm, pb, gb = reference_binary(pred, gt, mba_radii(shape), tol)
    assert m.radii == (1, 1, 2, 3, 4)
    assert m.mba == pytest.approx(mba, abs=1e-12)
    c = m.counts
    assert (c.pred_boundary_matched, c.gt_boundary_matched) == (pm, gm)
    assert (c.pred_boundary, c.gt_boundary) == (pb, gb)
    assert (c.tp, c.fp, c.fn) == (int((pred & gt).sum()), int((pred & ~gt).sum()), int((gt & ~pred).sum()))


def test_label_foreground_metrics_skip_ignored_pixels():
    # GT labels: a 60 x 60 square of class 2 inside an ignore frame (255), as in VOC.
    rng = np.random.default_rng(5)
    gt = np.zeros((200, 300), np.uint8)
    gt[40:140, 50:150] = 255
    gt[60:120, 70:130] = 2
    pred = np.zeros_like(gt)
    pred[55:125, 72:140] = 1
    pred[rng.random(gt.shape) < 0.05] = 3
    m = evaluate_arrays(pred, gt, EvalOptions(labels=True, ignore_index=255, tolerance=1, radii=(1, 3, 5)))
    valid = gt != 255
    gt_fg, pred_fg = (gt > 0) & valid, pred > 0
    g8 = gt_fg.astype(np.uint8)
    bands = [(cv2.morphologyEx(g8, cv2.MORPH_GRADIENT, disk(r)) > 0) & valid for r in (1, 3, 5)]
    assert m.counts.band == tuple(int(b.sum()) for b in bands)
    assert m.counts.band_correct == tuple(int((b & (pred_fg == gt_fg)).sum()) for b in bands)
    assert m.counts.pixels == int(valid.sum())
    assert (m.counts.tp, m.counts.fp) == (int((pred_fg & gt_fg).sum()), int((pred_fg & ~gt_fg & valid).sum()))
    # Ignored pixels are background for the geometry: the GT boundary is the square's
    # inner ring, all of it counted (class 2, not ignored).
    assert m.counts.gt_boundary == int(ndimage_boundary(gt_fg).sum()) == 4 * 59
    assert m.counts.pred_boundary == int((ndimage_boundary(pred_fg) & valid).sum())


def ndimage_boundary(m):
    return m & ~ndimage.binary_erosion(m, ndimage.generate_binary_structure(2, 1), border_value=1)


# --------------------------------------------------------------------------- streamed == whole


@pytest.fixture(scope="module")
def big_case():
    """5000 x 4000 uint8 GT and soft uint8 prediction; shapes cross window edges and image borders."""
    h, w = 5000, 4000
    gt = np.zeros((h, w), np.uint8)
    cv2.rectangle(gt, (0, 0), (699, 499), 255, -1)  # top-left corner, two image borders
    cv2.circle(gt, (3950, 2100), 400, 255, -1)  # crosses the right border
    cv2.ellipse(gt, (1000, 4950), (700, 200), 15, 0, 360, 255, -1)  # crosses the bottom border
    gt[1000:2000, 1000:2000] = 255  # edges exactly on window edges of sizes 500 and 1000
    gt[2047:2049, :] = 255  # a 2-px line across the image, on a 2048 window edge
    gt[:, 3071] = 255  # a 1-px vertical line through the whole image
    cv2.circle(gt, (1536, 3072), 300, 255, -1)  # centred on a window corner of size 512 / 768 / 1536
    cv2.circle(gt, (1536, 3072), 120, 0, -1)  # with a hole
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, (h // 8, w // 8), dtype=np.uint8)
    noise = cv2.resize(noise, (w, h), interpolation=cv2.INTER_NEAREST)
    # Prediction: the GT shifted by (5, -7), grey levels around the threshold, plus blocky noise.
    pred = np.roll(gt, (5, -7), axis=(0, 1)) // 255 * 200
    pred[noise > 250] = 255 - pred[noise > 250]
    pred[3900:4100, 100:3900] = 127  # below 0.5 * 255
    pred[4200:4300, 100:3900] = 128  # at/above
    whole = evaluate_arrays(pred, gt)
    return pred, gt, whole


@pytest.mark.parametrize("window_size", [512, 1000, 1536, 2500])
def test_streamed_equals_whole_5000x4000(big_case, window_size):
    pred, gt, whole = big_case
    assert whole.radii == (1, 6, 12, 18, 24)
    assert min(whole.counts.band) > 0 and whole.counts.gt_boundary_matched > 0
    s = streamed(pred, gt, window_size)
    assert s.counts == whole.counts  # every integer count, so every metric
    assert s.to_dict() == whole.to_dict()


def test_streamed_labels_with_ignore_equals_whole():
    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 5, (30, 25), dtype=np.uint8)
    base = cv2.resize(coarse, (1000, 1200), interpolation=cv2.INTER_NEAREST)
    gt = base.copy()
    gt[::97, :] = 255  # ignore lines
    pred = np.roll(base, 3, axis=1)
    pred[rng.random(pred.shape) < 0.01] = 7
    opts = EvalOptions(labels=True, ignore_index=255)
    whole = evaluate_arrays(pred, gt, opts)
    assert 7 in whole.class_iou and 255 not in whole.class_iou
    for ws in (128, 333, 1200):
        assert streamed(pred, gt, ws, opts).counts == whole.counts


@settings(max_examples=150, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    window_size=st.integers(1, 45),
    tol=st.integers(0, 4),
    radii=st.none() | st.lists(st.integers(1, 9), min_size=1, max_size=5).map(tuple),
    labels=st.booleans(),
    density=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**32 - 1),
)
def test_streamed_equals_whole_property(h, w, window_size, tol, radii, labels, density, seed):
    rng = np.random.default_rng(seed)
    if labels:
        gt = (rng.random((h, w)) < density).astype(np.uint8) * rng.integers(1, 4, (h, w), dtype=np.uint8)
        gt[rng.random((h, w)) < 0.1] = 9
        pred = np.where(rng.random((h, w)) < 0.2, rng.integers(0, 4, (h, w)), gt % 9).astype(np.int64)
        opts = EvalOptions(labels=True, ignore_index=9, tolerance=tol, radii=radii)
    else:
        gt = rng.random((h, w)) < density
        pred = np.where(rng.random((h, w)) < 0.2, rng.random((h, w)), gt).astype(np.float32)
        opts = EvalOptions(tolerance=tol, radii=radii)
    whole = evaluate_arrays(pred, gt, opts)
    assert isinstance(whole, Metrics)
    assert streamed(pred, gt, window_size, opts).counts == whole.counts
