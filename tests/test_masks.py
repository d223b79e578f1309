"""Masks: kind detection, per-window resampling equal to whole-image bilinear, shape checks."""

from __future__ import annotations

import logging
import re

import cv2
import numpy as np
import pytest
import tifffile
import torch

from conftest import write_png
from refine_cli.errors import InputError
from refine_cli.io.masks import MaskKind, MaskSource, check_mask_shape
from refine_cli.io.readers import ArrayReader, open_raster
from refine_cli.tiling.grid import Window

BIG = 10**12


def src(arr, shape=None, classes=None):
    return MaskSource(ArrayReader("m", arr), shape or arr.shape[:2], classes=classes)


@pytest.mark.parametrize(("arr", "kind", "scale"), [
    (np.array([[0, 1], [1, 0]], np.uint8), "binary", 1),
    (np.array([[0, 255], [255, 0]], np.uint8), "binary", 255),
    (np.array([[0, 255], [255, 0]], np.uint16), "binary", 255),
    (np.array([[0, 65535], [0, 0]], np.uint16), "binary", 65535),
    (np.array([[True, False], [False, False]]), "binary", 1),
    (np.array([[0, 200], [255, 17]], np.uint8), "soft", 255),
    (np.array([[0, 30000], [65535, 0]], np.uint16), "soft", 65535),
    (np.array([[0, 0.25], [1.0, 0.5]], np.float32), "soft", 1),
    (np.array([[0, 1], [2, 3]], np.uint8), "labels", None),
])
def test_kind_detection(arr, kind, scale):
    m = src(arr)
    assert m.kind.kind == kind
    if scale is not None:
        assert m.kind.scale == scale
    if kind != "labels":
        p = m.read(Window(0, 0, 2, 2))
        assert p.dtype == np.float32 and p.min() >= 0 and p.max() <= 1
    else:
        assert m.classes == 4


def test_bad_float_masks():
    with pytest.raises(InputError, match="NaN"):
        src(np.array([[0, np.nan]], np.float32))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        src(np.array([[0, 3.0]], np.float32))
    with pytest.raises(InputError, match="label"):
        src(np.array([[0, 5]], np.uint8), classes=3)


def test_colour_and_alpha_masks():
    grey = np.array([[0, 128], [255, 64]], np.uint8)
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    m = src(rgba)  # constant alpha, equal RGB: one grey band, a soft mask
    np.testing.assert_allclose(m.read(Window(0, 0, 2, 2)), grey / 255, rtol=1e-6)
    alpha_only = np.dstack([np.zeros_like(grey)] * 3 + [grey])
    np.testing.assert_allclose(src(alpha_only).read(Window(0, 0, 2, 2)), grey / 255, rtol=1e-6)
    colours = np.zeros((2, 3, 3), np.uint8)
    colours[0, 1] = (255, 0, 0)
    colours[1, 2] = (0, 0, 255)
    m = src(colours)
    assert m.is_labels and m.classes == 3
    assert m.read_labels(Window(0, 0, 2, 3)).labels().tolist() == [[0, 2, 0], [0, 0, 1]]


def test_lowres_resampling_is_bilinear_and_window_independent():
    rng = np.random.default_rng(1)
    low = (rng.random((25, 40)) * 255).astype(np.uint8)
    low[low < 128] = 0
    H, W = 200, 320
    m = src(low, (H, W))
    whole = m.read(Window(0, 0, H, W))
    ref = torch.nn.functional.interpolate(torch.from_numpy(low.astype(np.float32) / 255)[None, None], size=(H, W),
                                          mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(whole, ref, atol=2e-6)
    for win in [Window(0, 0, 7, 9), Window(13, 101, 50, 77), Window(199, 319, 1, 1), Window(57, 0, 60, 320)]:
        np.testing.assert_array_equal(m.read(win), whole[win.slices])  # bit-identical per window


def test_lowres_label_map_per_class():
    low = np.zeros((10, 16), np.uint8)
    low[2:6, 3:9] = 1
    low[6:9, 10:15] = 2
    m = src(low, (40, 64))
    lw = m.read_labels(Window(0, 0, 40, 64))
    assert lw.present == [0, 1, 2]
    total = sum(lw.prob(c) for c in lw.present)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)  # one-hot probabilities stay a partition
    nearest = cv2.resize(low, (64, 40), interpolation=cv2.INTER_NEAREST)
    assert (lw.labels() == nearest).mean() > 0.95


def test_uniform_value_checks_the_native_window():
    low = np.zeros((10, 10), np.uint8)
    low[8:, 8:] = 255
    m = src(low, (100, 100))
    assert m.uniform_value(Window(0, 0, 60, 60)) == 0.0
    assert m.uniform_value(Window(0, 0, 85, 85)) is None  # bilinear reach touches the object
    assert m.uniform_value(Window(85, 85, 15, 15)) == 1.0


@pytest.mark.parametrize(("mask", "image", "ok"), [
    ((100, 200), (100, 200), True),
    ((25, 50), (100, 200), True),
    ((33, 67), (100, 200), True),   # 67 vs 66.7: within a pixel
    ((25, 53), (100, 200), False),  # another aspect ratio
    ((200, 400), (100, 200), False),  # larger than the image
])
def test_mask_shape_rule(mask, image, ok):
    if ok:
        check_mask_shape(mask, image, "m")
    else:
        with pytest.raises(InputError):
            check_mask_shape(mask, image, "m")


def test_mask_files_through_open_raster(tmp_path):
    m8 = np.zeros((30, 40), np.uint8)
    m8[5:20, 10:30] = 255
    write_png(tmp_path / "m.png", m8)
    tifffile.imwrite(tmp_path / "lab.tif", (m8 // 255).astype(np.uint16) * 3, tile=(16, 16))
    with open_raster(tmp_path / "m.png", max_pixels=BIG, inline_limit=BIG, what="mask") as r:
        ms = MaskSource(r, (60, 80))
        assert ms.kind.kind == "binary" and not ms.same_resolution
    with open_raster(tmp_path / "lab.tif", max_pixels=BIG, inline_limit=BIG, what="mask") as r:
        ms = MaskSource(r, (30, 40))
        assert ms.is_labels and ms.classes == 4
        assert ms.read_labels(Window(0, 0, 30, 40)).present == [0, 3]


# -- kind detection: alpha masks, instance maps, --mask-kind (issue 14) --------------------------------------


@pytest.fixture
def mask_log(caplog):
    """Records of ``refine_cli.io.masks`` at INFO and above (also after a CLI test stopped propagation)."""
    logger = logging.getLogger("refine_cli.io.masks")
    old = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # caplog's handler also sits on the root logger: count each record once
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(old[0])
    logger.propagate = old[1]


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def instance_map(n: int, shape=(512, 512), seed: int = 0) -> np.ndarray:
    """``shape`` int64 map of ``n`` touching blobs (Voronoi cells of random seeds, cut to discs), ids 1..n
    in random order, 0 between them."""
    rng = np.random.default_rng(seed)
    seeds = np.full(shape, 255, np.uint8)
    pts = np.unique((rng.random((n * 2, 2)) * shape).astype(int), axis=0)
    pts = pts[rng.permutation(len(pts))[:n]]
    seeds[pts[:, 0], pts[:, 1]] = 0
    dist, cell = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    ids = np.concatenate([[0], rng.permutation(n) + 1])
    out = ids[cell]
    out[dist > 0.9 * np.sqrt(shape[0] * shape[1] / n / np.pi)] = 0
    return out


def upsampled_probability(dtype, factor: int = 16, shape=(512, 512), seed: int = 1) -> np.ndarray:
    """A smooth low-resolution probability, bilinearly upsampled ``factor`` times, at ``dtype``'s scale."""
    rng = np.random.default_rng(seed)
    low = cv2.GaussianBlur(rng.standard_normal((shape[0] // factor, shape[1] // factor)).astype(np.float32),
                           (0, 0), 1.5)
    low = 1 / (1 + np.exp(-3 * low / low.std()))
    up = cv2.resize(low, shape[::-1], interpolation=cv2.INTER_LINEAR)
    return np.round(up * np.iinfo(dtype).max).astype(dtype)


def blurred_binary(sigma: float = 3.0, shape=(512, 512), seed: int = 2) -> np.ndarray:
    """Discs, Gaussian-blurred, as uint8 0..255."""
    rng = np.random.default_rng(seed)
    m = np.zeros(shape, np.float32)
    for _ in range(8):
        centre = (int(rng.integers(0, shape[1])), int(rng.integers(0, shape[0])))
        cv2.circle(m, centre, int(rng.integers(20, 80)), 1.0, -1)
    return np.round(cv2.GaussianBlur(m, (0, 0), sigma) * 255).astype(np.uint8)


def fg_src(arr, **kw):
    """A MaskSource as ``refine run`` opens it (with the run's threshold)."""
    return MaskSource(ArrayReader("m", arr), arr.shape[:2], threshold=0.5, **kw)


ALPHA = np.zeros((40, 50), np.uint8)
ALPHA[10:30, 5:35] = 255
ALPHA[10:30, 35:45] = np.linspace(230, 5, 10).astype(np.uint8)  # an anti-aliased edge


def red_fill(alpha: np.ndarray) -> np.ndarray:
    return np.dstack([np.full_like(alpha, 255), np.zeros_like(alpha), np.zeros_like(alpha), alpha])


@pytest.mark.parametrize("arr", [
    red_fill(ALPHA),  # constant red, the mask in alpha
    red_fill(ALPHA) * (ALPHA > 0)[..., None],  # red where alpha > 0, RGB = 0 where alpha = 0
    np.dstack([(ALPHA > 0) * np.uint8(255), ALPHA]),  # grey + alpha: grey 255 where alpha > 0, 0 elsewhere
    np.dstack([np.full_like(ALPHA, 200), ALPHA]),  # grey + alpha: constant grey
], ids=["red-fill", "red-where-alpha", "grey-alpha-2band-zero-outside", "grey-alpha-2band-constant"])
def test_alpha_over_constant_colour_is_the_mask(arr):
    m = fg_src(arr)
    assert m._band == arr.shape[2] - 1 and m.kind.kind == "soft"
    np.testing.assert_allclose(m.read(Window(0, 0, 40, 50)), ALPHA / 255, rtol=1e-6)


def test_varying_colour_under_alpha_stays_a_colour_coded_label_map():
    rgba = red_fill(ALPHA)
    rgba[:, 25:, :3] = (0, 0, 255)  # red and blue objects with an alpha: a colour-coded map, not alpha
    m = fg_src(rgba)
    assert m.is_labels and m.classes == 2  # blue, red (no black)
    m = fg_src(rgba * (ALPHA > 0)[..., None])
    assert m.is_labels and m.classes == 3  # black, blue, red


def test_uint16_instance_map_is_one_foreground(mask_log):
    ids = instance_map(300).astype(np.uint16)
    ids[ids == ids.max()] = 999  # ids up to 999, as a pathology tool writes them
    m = fg_src(ids)
    assert m.kind.kind == "instances" and m.kind.ids == 300 and m.channels == 1 and not m.is_labels
    assert warnings_of(mask_log) == []
    assert [r.getMessage() for r in mask_log.records if "instance ids" in r.getMessage()] != []
    win = Window(0, 0, 512, 512)
    np.testing.assert_array_equal(m.read(win), (ids > 0).astype(np.float32))
    # inside one instance, and across touching instances, the tile is uniform foreground
    r, c = np.argwhere(ids == ids[256, 256])[0] if ids[256, 256] else np.argwhere(ids > 0)[0]
    one = Window(int(r), int(c), 1, 1)
    assert m.uniform_value(one) == 1.0 and m.binary_uniform(one) and m.constant(one).tolist() == [1.0]
    y, x = np.argwhere((ids[:, :-1] > 0) & (ids[:, 1:] > 0) & (ids[:, :-1] != ids[:, 1:]))[0]
    two = Window(int(y), int(x), 1, 2)
    assert m.uniform_value(two) == 1.0 and m.binary_uniform(two)
    assert m.uniform_value(Window(0, 0, 512, 512)) is None and not m.binary_uniform(win)
    # a low-resolution instance map is resampled as its binary foreground
    big = MaskSource(ArrayReader("m", ids[::4, ::4].copy()), (512, 512), threshold=0.5)
    assert big.kind.kind == "instances" and not big.same_resolution
    low_fg = torch.from_numpy((ids[::4, ::4] > 0).astype(np.float32))[None, None]
    ref = torch.nn.functional.interpolate(low_fg, size=(512, 512), mode="bilinear", align_corners=False)[0, 0]
    ref = ref.numpy()
    np.testing.assert_allclose(big.read(win), ref, atol=2e-6)


@pytest.mark.parametrize(("name", "arr", "kind"), [
    ("instances-20-uint8", instance_map(20).astype(np.uint8), "instances"),
    ("instances-300-uint16", instance_map(300).astype(np.uint16), "instances"),
    ("instances-999-uint16", instance_map(999).astype(np.uint16), "instances"),
    ("instances-250-uint8", instance_map(250).astype(np.uint8), "instances"),  # ids reach the threshold
    ("upsampled-uint8", upsampled_probability(np.uint8), "soft"),
    ("upsampled-uint8-x64", upsampled_probability(np.uint8, factor=64), "soft"),
    ("upsampled-uint16", upsampled_probability(np.uint16), "soft"),
    ("blurred-binary-uint8", blurred_binary(), "soft"),
    ("blurred-binary-uint8-sigma1", blurred_binary(1.0), "soft"),
])
def test_auto_kind_from_plateaus_and_ramps(mask_log, name, arr, kind):
    """Ids are compact plateaus, probabilities ramps: flatness and compactness separate them widely."""
    m = fg_src(arr)
    assert m.kind.kind == kind, (m.stats.flat, m.stats.compact)
    assert warnings_of(mask_log) == []
    if kind == "instances":
        assert m.kind.ids == len(np.unique(arr)) - 1
        assert m.stats.flat >= 0.7 and m.stats.compact >= 0.85
    else:
        assert m.stats.flat <= 0.01 and m.stats.compact < 0.01
        assert m.kind.scale == np.iinfo(arr.dtype).max


def test_real_nuclei_instance_labels(shared, mask_log):
    """DSB2018 nuclei labels (uint16, ids up to 183): instances as uint16, int32 and uint8 (ids reach 0.5)."""
    labels = tifffile.imread(shared / "data" / "stardist-dsb2018-nuclei" / "labels.tif")
    for arr in (labels, labels.astype(np.uint8), labels.astype(np.int32)):
        m = fg_src(arr)
        assert m.kind.kind == "instances" and m.kind.ids == len(np.unique(labels)) - 1
        assert m.stats.flat > 0.8 and m.stats.compact > 0.8
        np.testing.assert_array_equal(m.read(Window(0, 0, 512, 512)) > 0, labels > 0)
    assert warnings_of(mask_log) == []


def test_small_values_stay_label_maps_unless_they_are_many_objects():
    labels = np.zeros((64, 64), np.uint8)
    labels[:, 20:] = 5
    labels[::7] = 9  # two classes, not objects
    m = fg_src(labels)
    assert m.is_labels and m.classes == 10
    few = instance_map(12, (128, 128)).astype(np.uint8)  # 12 < MIN_AUTO_INSTANCES compact blobs: labels
    assert fg_src(few).is_labels
    many = instance_map(20, (128, 128)).astype(np.uint8)
    assert fg_src(many).kind.kind == "instances"
    assert fg_src(many, classes=21).is_labels and fg_src(many, kind="labels").classes == 21


def test_one_value_above_63_is_binary():
    arr = np.zeros((20, 20), np.uint8)
    arr[5:15, 5:15] = 100  # read as v/255 before: 0.39, an empty result
    m = fg_src(arr)
    assert m.kind.kind == "binary"
    np.testing.assert_array_equal(m.read(Window(0, 0, 20, 20)), (arr > 0).astype(np.float32))


def stripes(levels=(100, 200), dtype=np.uint8) -> np.ndarray:
    """Vertical stripes 6 px wide cycling twice through ``levels`` (0 between them): plateaus, but each
    value in two places, not a compact object."""
    arr = np.zeros((96, 16 * len(levels)), dtype)
    for i, k in enumerate(range(0, arr.shape[1], 8)):
        arr[10:, k:k + 6] = levels[i % len(levels)]
    return arr


def tiny_blobs() -> np.ndarray:
    """uint8 ids up to 250 in 3x3 blobs: compact, but too small to be plateaus."""
    arr = np.zeros((96, 128), np.uint8)
    ids = np.random.default_rng(0).permutation(249)[:80] + 1
    ids[0] = 250
    for k, (i, j) in enumerate(np.ndindex(8, 10)):
        arr[4 + i * 11: 7 + i * 11, 4 + j * 12: 7 + j * 12] = ids[k]
    return arr


def radial_ramp() -> np.ndarray:
    """A uint8 ramp 0..100: a probability map that never reaches 0.5."""
    yy, xx = np.mgrid[:96, :128]
    return np.clip(100 - np.hypot(yy - 48, xx - 64) * 2, 0, 100).astype(np.uint8)


@pytest.mark.parametrize(("arr", "kind", "hint"), [
    (stripes(), "soft", "--mask-kind soft, instances or labels"),
    (stripes(range(100, 120)), "instances", "--mask-kind labels"),
    (stripes(range(100, 120), np.uint16), "instances", "--mask-kind labels"),
    (tiny_blobs(), "soft", "--mask-kind soft, instances or labels"),
    (radial_ramp(), "soft", "--mask-kind instances"),
], ids=["few-plateau-levels", "plateaus-not-objects", "plateaus-not-objects-uint16", "objects-not-plateaus",
        "ramp-below-threshold"])
def test_ambiguous_masks_warn_once_naming_the_flag(mask_log, arr, kind, hint):
    m = fg_src(arr)
    assert m.kind.kind == kind
    (line,) = warnings_of(mask_log)
    assert hint in line and "\n" not in line and line.startswith("mask m: ")


def test_mask_kind_overrides_detection(mask_log):
    ids = np.zeros((30, 40), np.uint16)
    ids[5:15, 5:20], ids[15:25, 5:20], ids[5:25, 25:35] = 17, 400, 999
    win = Window(0, 0, 30, 40)
    soft = fg_src(ids, kind="soft")  # the old reading: v/65535, never foreground, with a warning
    assert soft.kind.kind == "soft" and soft.kind.scale == 65535
    np.testing.assert_allclose(soft.read(win), ids / 65535, rtol=1e-6)
    (line,) = warnings_of(mask_log)
    assert "--threshold 0.5" in line and "--mask-kind instances" in line
    assert fg_src(ids, kind="instances").kind == fg_src(ids).kind == MaskKind("instances", 1.0, ids=3)
    binary = fg_src(ids, kind="binary")
    assert binary.kind.kind == "binary"
    np.testing.assert_array_equal(binary.read(win), (ids > 0).astype(np.float32))
    assert fg_src(ids, kind="labels").classes == 1000 and fg_src(ids, classes=1000, kind="labels").is_labels
    with pytest.raises(InputError, match="--classes 999"):
        fg_src(ids, classes=999)
    prob = np.array([[0.0, 0.2], [0.6, 1.0]], np.float32)
    assert fg_src(prob, kind="binary").read(Window(0, 0, 2, 2)).tolist() == [[0, 1], [1, 1]]
    with pytest.raises(InputError, match="--mask-kind instances needs an integer mask"):
        fg_src(prob, kind="instances")
    colours = np.zeros((2, 3, 3), np.uint8)
    colours[0, 1], colours[1, 2] = (255, 0, 0), (0, 0, 255)
    assert fg_src(colours, kind="instances").kind.ids == 2
    assert fg_src(colours[:, 1:] + 1, kind="binary").read(Window(0, 0, 2, 2)).min() == 1.0  # no black: all fg
    with pytest.raises(InputError, match="--mask-kind soft"):
        fg_src(colours, kind="soft")


@pytest.mark.parametrize(("kw", "text"), [
    ({"kind": "probabilities"}, "--mask-kind 'probabilities' is not valid"),
    ({"kind": "soft", "classes": 3}, "--classes 3 declares a label map"),
    ({"kind": "instances", "classes": 3}, "--mask-kind instances"),
])
def test_bad_mask_kind_arguments(kw, text):
    from refine_cli.config import RefineConfig
    from refine_cli.errors import UsageError

    cfg = {"mask_kind": kw["kind"], "classes": kw.get("classes")}
    with pytest.raises(UsageError, match=re.escape(text)):
        RefineConfig(**cfg)
    with pytest.raises(UsageError, match=re.escape(text)):
        MaskSource(ArrayReader("m", np.zeros((4, 4), np.uint8)), (4, 4), **kw)


# -- end to end: refine run with these masks --------------------------------------------------------------


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """A 96x128 image with a bright object, and masks of its foreground in several encodings."""
    d = tmp_path_factory.mktemp("kinds")
    rng = np.random.default_rng(5)
    fg = np.zeros((96, 128), bool)
    fg[20:70, 30:90] = True
    img = rng.integers(0, 60, (96, 128, 3), dtype=np.uint8) + np.uint8(150) * fg[..., None]
    write_png(d / "img.png", img)
    a = fg.astype(np.uint8) * 255
    z = np.zeros_like(a)
    write_png(d / "mask.png", a)
    cv2.imwrite(str(d / "red_alpha.png"), np.dstack([z, z, np.full_like(a, 255), a]))  # BGRA: red fill
    cv2.imwrite(str(d / "red_where_alpha.png"), np.dstack([z, z, a, a]))  # BGRA: black where alpha = 0
    ids = np.zeros((96, 128), np.uint16)  # 2x2 cells with random ids up to 999
    cells = rng.permutation(998)[:750] + 1
    cells[0] = 999
    ids[20:70, 30:90] = cells.reshape(25, 30).repeat(2, 0).repeat(2, 1)
    assert cv2.imwrite(str(d / "instances16.png"), ids)
    levels = fg.astype(np.uint8) * 200
    levels[:, 60:] //= 2  # two plateau levels, 200 and 100: a quantised probability, or two ids?
    write_png(d / "levels.png", levels)
    np.save(d / "fg.npy", fg)
    return d


def run_ok(cli, d, mask, *extra) -> tuple[np.ndarray, str]:
    out = d / f"out-{mask}-{'-'.join(extra) or 'auto'}.tif"
    code, stdout, err = cli("run", d / "img.png", "--mask", d / mask, "-o", out, "--overwrite", *extra)
    assert code == 0, err
    assert "Traceback" not in err
    return tifffile.imread(out) > 0, err


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def warning_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("WARNING")]


@pytest.fixture
def wide_console(monkeypatch):
    """Let Rich print each log record on one line (it wraps at 80 columns when stderr is not a terminal)."""
    from refine_cli import cli as cli_module

    monkeypatch.setenv("COLUMNS", "1000")
    monkeypatch.setattr(cli_module.err_console, "_width", None)


@pytest.mark.parametrize("mask", ["red_alpha.png", "red_where_alpha.png", "instances16.png"])
def test_cli_alpha_and_instance_masks_refine_to_the_foreground(e2e, cli, wide_console, mask):
    fg = np.load(e2e / "fg.npy")
    got, err = run_ok(cli, e2e, mask)
    assert got.any() and iou(got, fg) > 0.95
    assert warning_lines(err) == []
    np.testing.assert_array_equal(got, run_ok(cli, e2e, "mask.png")[0])


def test_cli_report_names_the_kind_and_instance_ids(e2e, cli):
    import json

    code, out, err = cli("run", e2e / "img.png", "--mask", e2e / "instances16.png", "-o", e2e / "rep.tif",
                         "--overwrite", "--json", "-q")
    assert code == 0, err
    mask = json.loads(out)["mask"]
    assert mask["kind"] == "instances" and mask["instance_ids"] == 750


def test_cli_mask_kind_soft_reads_instances_the_old_way(e2e, cli, wide_console):
    got, err = run_ok(cli, e2e, "instances16.png", "--mask-kind", "soft")
    assert not got.any()  # v/65535 < 0.5 everywhere: empty, as before, but now it says so
    (line,) = warning_lines(err)
    assert "stays below --threshold 0.5" in line and "--mask-kind instances" in line


def test_cli_ambiguous_mask_prints_one_warning_line(e2e, cli, wide_console):
    fg = np.load(e2e / "fg.npy")
    got, err = run_ok(cli, e2e, "levels.png")  # read as probabilities, as before: 200 is foreground, 100 not
    left = fg.copy()
    left[:, 60:] = False
    assert iou(got, left) > 0.9
    (line,) = warning_lines(err)
    assert "--mask-kind soft, instances or labels" in line
    got, err = run_ok(cli, e2e, "levels.png", "--mask-kind", "instances")  # settled: no warning
    assert iou(got, fg) > 0.95 and warning_lines(err) == []


@pytest.mark.parametrize(("extra", "text"), [
    (["--mask-kind", "probs"], "'--mask-kind': 'probs' is not one of"),
    (["--mask-kind", "soft", "--classes", "3"], "--classes 3 declares a label map"),
])
def test_cli_bad_mask_kind_is_one_line(e2e, cli, tmp_path, extra, text):
    for cmd in (["run", e2e / "img.png", "--mask", e2e / "mask.png", "-o", tmp_path / "o.tif"],
                ["batch", e2e, "--out", tmp_path / "outdir"]):
        code, out, err = cli(*cmd, *extra)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and text in lines[0], err
    assert not (tmp_path / "o.tif").exists()


def test_mask_on_a_pyramid_level_grid():
    """``MaskSource.at``: the same mask resampled to a level between its own size and the image's."""
    from refine_cli.engine.bands import LevelStep, step_coarse
    from refine_cli.engine.levels import mask_at
    from refine_cli.refiners.base import Refiner

    rng = np.random.default_rng(2)
    low = np.where(rng.random((25, 40)) > 0.5, 255, 0).astype(np.uint8)
    m = src(low, (200, 320))
    level = m.at((100, 160))
    assert level.shape == (100, 160) and m.shape == (200, 320)  # the original is unchanged
    ref = torch.nn.functional.interpolate(torch.from_numpy(low.astype(np.float32) / 255)[None, None],
                                          size=(100, 160), mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(level.read(Window(0, 0, 100, 160)), ref, atol=2e-6)
    with pytest.raises(InputError, match="must not be larger"):
        m.at((20, 32))
    # the first level of a run reads it there, in one process and in a cluster's bands alike
    assert mask_at(m, (200, 320)) is m
    assert mask_at(m, (100, 160)).shape == (100, 160)
    step = LevelStep(0, (100, 160), final=False, guard=False, last_inner=False, carries_uncertainty=False)
    class NoGlobalStep(Refiner):
        def refine(self, tile):
            raise AssertionError("not run")

    got = step_coarse(step, NoGlobalStep(), m, None)
    np.testing.assert_array_equal(got.read_k(Window(3, 5, 40, 50)), level.read_k(Window(3, 5, 40, 50)))


def test_mask_on_a_level_whose_sides_were_rounded_apart():
    """Levels round each side on its own: 2500 x 300 under a 7071 x 849 level is no aspect-ratio error."""
    m = src(np.zeros((300, 2500), np.uint8), (2400, 20000))
    assert m.at((849, 7071)).read(Window(0, 0, 5, 5)).shape == (5, 5)
