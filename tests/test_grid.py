"""Property tests of the tile planner and of feathered blending."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refine_cli.errors import UsageError
from refine_cli.tiling.blend import WEIGHT_FLOOR, BandAccumulator, ramp, tile_weights
from refine_cli.tiling.grid import Window, axis_starts, plan_grid

sizes = st.integers(min_value=1, max_value=3000)


@settings(max_examples=300, deadline=None)
@given(length=sizes, tile=st.integers(16, 1024), overlap=st.integers(0, 200))
def test_axis_starts_cover_stay_in_bounds_and_overlap(length, tile, overlap):
    if overlap >= tile:
        with pytest.raises(UsageError):
            axis_starts(length, tile, overlap)
        return
    starts = axis_starts(length, tile, overlap)
    t = min(tile, length)
    assert starts[0] == 0 and starts[-1] + t == length  # first at 0, last ends at the border
    assert all(0 <= s and s + t <= length for s in starts)  # in bounds
    assert starts == sorted(set(starts))
    for a, b in zip(starts, starts[1:]):
        assert a + t - b >= overlap  # overlap at least as requested
        assert b > a
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + t] = True
    assert covered.all()  # every pixel covered
    if length > tile and len(starts) > 2:
        # fewest tiles: one fewer could not keep the overlap
        n = len(starts) - 1
        assert n * (tile - overlap) + overlap < length


@settings(max_examples=100, deadline=None)
@given(h=st.integers(1, 700), w=st.integers(1, 700), tile=st.integers(32, 300), halo=st.integers(0, 40),
       data=st.data())
def test_plan_grid_tiles_and_halo(h, w, tile, halo, data):
    overlap = data.draw(st.integers(0, tile // 2 - 1))
    plan = plan_grid((h, w), tile, overlap, halo)
    cover = np.zeros((h, w), np.int32)
    for t in plan.tiles():
        win = t.window
        assert 0 <= win.row and win.row_end <= h and 0 <= win.col and win.col_end <= w
        cover[win.slices] += 1
        r = t.read
        assert 0 <= r.row <= win.row and win.row_end <= r.row_end <= h
        assert r.row == max(0, win.row - halo) and r.col_end == min(w, win.col_end + halo)
        assert t.window.relative_to(t.read).shape == win.shape
    assert (cover >= 1).all()
    assert len(list(plan.tiles())) == len(plan)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 400), w=st.integers(1, 400), tile=st.integers(40, 200), data=st.data())
def test_blend_weights_sum_to_one_and_constant_is_preserved(h, w, tile, data):
    overlap = data.draw(st.integers(0, tile // 2 - 1))
    plan = plan_grid((h, w), tile, overlap)
    acc = BandAccumulator(w, 2, plan.tile_height)
    out = np.zeros((h, w, 2), np.float32)
    wsum_norm = np.zeros((h, w), np.float64)
    raw = []
    for gr in range(plan.grid_shape[0]):
        for t in plan.row_tiles(gr):
            wt = tile_weights(t, plan.overlap)
            assert wt.min() >= WEIGHT_FLOOR**2 and wt.max() <= 1
            raw.append((t.window, wt))
            vals = np.stack([np.full(t.window.shape, 0.25, np.float32), np.full(t.window.shape, t.index, np.float32)],
                            -1)
            acc.add(t.window, vals, wt)
        r0, block, _ = acc.pop_final(plan.rows_final_after(gr))
        out[r0:r0 + block.shape[0]] = block
    assert acc.top == h
    np.testing.assert_allclose(out[..., 0], 0.25, rtol=1e-6)  # a constant passes unchanged
    total = np.zeros((h, w), np.float64)
    for win, wt in raw:
        total[win.slices] += wt
    for win, wt in raw:
        wsum_norm[win.slices] += wt / total[win.slices]
    np.testing.assert_allclose(wsum_norm, 1.0, rtol=1e-9)  # normalised weights sum to 1
    lo, hi = out[..., 1].min(), out[..., 1].max()
    assert lo >= 0 and hi <= len(plan) - 1  # a convex combination of tile values


def test_ramps_cross_to_exactly_one_over_the_overlap():
    a = ramp(100, 20, low=False, high=True)
    b = ramp(100, 20, low=True, high=False)
    # tiles [0,100) and [80,180): the overlap [80,100) has a falling and a rising ramp
    np.testing.assert_allclose(a[80:] + b[:20], 1.0, rtol=1e-6)
    assert a[0] == 1 and b[-1] == 1  # image borders keep full weight


def test_window_helpers():
    w = Window(10, 20, 30, 40)
    assert w.expand(15, (35, 100)) == Window(0, 5, 35, 70)
    assert w.intersection(Window(0, 0, 11, 21)) == Window(10, 20, 1, 1)
    assert w.intersection(Window(0, 0, 10, 10)) is None
    assert Window(12, 25, 2, 2).relative_to(w) == Window(2, 5, 2, 2)
    with pytest.raises(ValueError):
        Window(0, 0, 50, 50).relative_to(w)
    assert Window(0, 0, 5, 5).scaled(0.5, 0.5) == Window(0, 0, 3, 3)


def test_accumulator_refuses_rows_outside_the_band_and_uncovered_rows():
    acc = BandAccumulator(10, 1, 4)
    with pytest.raises(ValueError):
        acc.add(Window(3, 0, 4, 10), np.zeros((4, 10), np.float32), np.ones((4, 10), np.float32))
    acc.add(Window(0, 0, 2, 10), np.ones((2, 10), np.float32), np.ones((2, 10), np.float32))
    top, rows, uncovered = acc.pop_final(2)
    assert uncovered is None
    assert top == 0 and rows.shape == (2, 10, 1)
    with pytest.raises(AssertionError, match="never covered"):
        acc.pop_final(3)  # row 2 received no tile


def test_uncovered_pixels_can_be_handed_to_the_caller():
    acc = BandAccumulator(4, 1, 2)
    w = np.array([[1, 0, 1, 0], [1, 1, 0, 0]], np.float32)
    acc.add(Window(0, 0, 2, 4), np.full((2, 4), 0.5, np.float32), w)
    top, rows, uncovered = acc.pop_final(2, allow_uncovered=True)
    assert uncovered is not None and (uncovered == (w == 0)).all()
    assert (rows[..., 0][w > 0] == 0.5).all() and (rows[..., 0][w == 0] == 0).all()
