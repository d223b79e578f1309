"""Geometry of the official CascadePSP inference (tiling/cascade_grid.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED
from hypothesis import given, settings
from hypothesis import strategies as st

from refine_cli.errors import UsageError
from refine_cli.tiling.cascade_grid import (
    MIN_SIZE,
    PATCH_TRIM,
    global_resize,
    padded_shape,
    patch_step,
    plan_cascade_patches,
)

GOLDEN_INFERENCE = SHARED / "reference" / "cascadepsp" / "golden_inference.npz"

sizes = st.integers(min_value=MIN_SIZE, max_value=1000)
sides = st.integers(min_value=1, max_value=700)


def patch_rows(patches, processed=None):
    """Rows like the golden ``patches`` table (all patches treated as processed unless told)."""
    rows = []
    for i, p in enumerate(patches):
        w, d, s = p.window, p.dst, p.src
        done = True if processed is None else processed[i]
        tail = [d.row, d.row_end, d.col, d.col_end, s.row, s.row_end, s.col, s.col_end] if done else [-1] * 8
        rows.append([w.row, w.row_end, w.col, w.col_end, int(done), *tail])
    return np.array(rows, dtype=np.int32)


# ---------------------------------------------------------------- global resize


def test_global_resize_examples():
    demo = global_resize((2328, 3492), 900)  # the official demo image: L - 1 on the long side
    assert demo.out_shape == (599, 899) and demo.mode == "down"
    assert padded_shape(demo.out_shape) == (600, 904)
    down = global_resize((300, 400), 130)
    assert (down.out_shape, down.mode) == ((97, 130), "down")
    up = global_resize((300, 400), 450)
    assert (up.out_shape, up.mode, up.scale) == ((337, 450), "up", 1.125)
    same = global_resize((300, 400), 400)
    assert (same.out_shape, same.mode) == ((300, 400), "none")


@settings(max_examples=300, deadline=None)
@given(h=st.integers(1, 60000), w=st.integers(1, 60000), size=st.integers(MIN_SIZE, 2000))
def test_global_resize_matches_torch(h, w, size):
    x = torch.empty(1, 1, h, w, device="meta")  # shapes only, no memory
    scale = size / max(h, w)
    try:
        plan = global_resize((h, w), size)
    except UsageError:  # refused only when torch would produce an empty side
        out = F.interpolate(x, scale_factor=scale, mode="area" if max(h, w) > size else "bilinear")
        assert min(out.shape[-2:]) == 0
        return
    if plan.mode == "none":
        assert plan.out_shape == (h, w)
        return
    assert plan.scale == scale
    out = F.interpolate(x, scale_factor=plan.scale, mode="area" if plan.mode == "down" else "bilinear")
    assert tuple(out.shape[-2:]) == plan.out_shape
    assert max(plan.out_shape) in (size - 1, size)


def test_global_resize_l_minus_one_is_common():
    hits = [m for m in range(901, 5000) if max(global_resize((m, m), 900).out_shape) == 899]
    assert 3492 in hits and len(hits) > 100


def test_global_resize_rejects_degenerate():
    with pytest.raises(UsageError):
        global_resize((1, 100000), 900)  # the short side would become 0 px
    with pytest.raises(UsageError):
        global_resize((0, 10), 900)


@given(h=st.integers(1, 5000), w=st.integers(1, 5000))
def test_padded_shape(h, w):
    ph, pw = padded_shape((h, w))
    assert ph % 8 == 0 and pw % 8 == 0
    if h % 8 == 0 and w % 8 == 0:
        assert (ph, pw) == (h, w)
    else:  # both sides gain 1..8 px, even one that is already a multiple of 8
        assert 1 <= ph - h <= 8 and 1 <= pw - w <= 8


def test_padded_shape_examples():
    assert padded_shape((97, 130)) == (104, 136)
    assert padded_shape((337, 450)) == (344, 456)
    assert padded_shape((300, 400)) == (304, 408)  # 400 is a multiple of 8 and still gains 8
    assert padded_shape((296, 400)) == (296, 400)


# ---------------------------------------------------------------- local grid


def test_patch_step():
    assert patch_step(900) == 418 and patch_step(130) == 33 and patch_step(MIN_SIZE) == 1
    with pytest.raises(UsageError, match="cascade-size"):
        patch_step(MIN_SIZE - 2)


def test_grid_l130_literal():
    patches = plan_cascade_patches((300, 400), 130)
    assert len(patches) == 70  # 10 x positions, 7 y positions after de-duplication
    rows = patch_rows(patches)
    assert rows[1].tolist() == [33, 163, 0, 130, 1, 49, 147, 0, 114, 16, 114, 0, 114]
    assert rows[6].tolist() == [170, 300, 0, 130, 1, 186, 300, 0, 114, 16, 130, 0, 114]
    assert rows[-1].tolist() == [170, 300, 270, 400, 1, 186, 300, 286, 400, 16, 130, 16, 130]


def test_grid_single_patch_when_image_is_smaller():
    (p,) = plan_cascade_patches((300, 400), 450)
    assert patch_rows([p]).tolist() == [[0, 300, 0, 400, 1, 0, 300, 0, 400, 0, 300, 0, 400]]


@pytest.mark.skipif(not GOLDEN_INFERENCE.exists(), reason=f"golden file absent: {GOLDEN_INFERENCE}")
@pytest.mark.parametrize("size", [130, 450])
def test_grid_matches_golden_table(size):
    golden = np.load(GOLDEN_INFERENCE)[f"L{size}_patches"]
    patches = plan_cascade_patches((300, 400), size)
    rows = patch_rows(patches, processed=golden[:, 4].astype(bool))
    np.testing.assert_array_equal(rows, golden)


def official_loop(h, w, size):
    """The official loop written out literally, as an independent oracle."""
    step = size // 2 - 32
    seen, out = set(), []
    for xi in range(w // step + 1):
        for yi in range(h // step + 1):
            sx, ex, sy, ey = xi * step, xi * step + size, yi * step, yi * step + size
            if ex > w:
                ex, sx = w, w - size
            if ey > h:
                ey, sy = h, h - size
            sx, sy, ex, ey = max(sx, 0), max(sy, 0), min(ex, w), min(ey, h)
            if sy * w + sx not in seen:
                seen.add(sy * w + sx)
                out.append((sy, ey, sx, ex))
    return out


@settings(max_examples=150, deadline=None)
@given(h=sides, w=sides, size=sizes)
def test_grid_properties(h, w, size):
    patches = plan_cascade_patches((h, w), size)
    step = patch_step(size)
    spans = [(p.window.row, p.window.row_end, p.window.col, p.window.col_end) for p in patches]
    assert spans == official_loop(h, w, size)
    cover = np.zeros((h, w), np.int32)
    weight = np.zeros((h, w), np.int32)
    xs = [p.window.col for p in patches]
    assert xs == sorted(xs)  # x outer, y inner
    assert len({(p.window.row, p.window.col) for p in patches}) == len(patches)
    for i, p in enumerate(patches):
        win, dst, src = p.window, p.dst, p.src
        assert p.index == i
        assert win.shape == (min(size, h), min(size, w))  # in bounds, all the same size
        assert 0 <= win.row and win.row_end <= h and 0 <= win.col and win.col_end <= w
        assert dst.relative_to(win) == src  # trimmed region is the same in both coordinates
        assert dst.row - win.row == (PATCH_TRIM if win.row > 0 else 0)
        assert win.row_end - dst.row_end == (PATCH_TRIM if win.row_end < h else 0)
        assert dst.col - win.col == (PATCH_TRIM if win.col > 0 else 0)
        assert win.col_end - dst.col_end == (PATCH_TRIM if win.col_end < w else 0)
        cover[win.slices] += 1
        weight[dst.slices] += 1
    # every pixel lies in a patch and in >= 1 trimmed region, so the average (weights 1 / count,
    # summing to 1) is defined everywhere and the binarised-global fallback is never needed for coverage
    assert cover.min() >= 1 and weight.min() >= 1
    for starts, length in (
        (sorted({p.window.row for p in patches}), h),
        (sorted({p.window.col for p in patches}), w),
    ):
        for a, b in zip(starts, starts[1:], strict=False):
            assert b - a <= step  # neighbours overlap by at least L - step
            assert min(size, length) - (b - a) >= size - step
