"""Training/evaluation sample generator and training losses (CPU, synthetic data unless marked)."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import SHARED

from refine_cli.errors import InputError, RefineError, UsageError
from refine_cli.train import data as D
from refine_cli.train.losses import (
    OUTPUTS,
    CascadeLossWeights,
    OhemCrossEntropy,
    cascadepsp_loss,
    ohem_cross_entropy,
    sobel_magnitude,
)

SHARED_PHOTOS = SHARED / "data" / "photos"
SHARED_PORTRAITS = SHARED / "data" / "p3m-portraits-pseudogt"
needs_shared = pytest.mark.skipif(
    not (SHARED_PHOTOS.is_dir() and SHARED_PORTRAITS.is_dir()),
    reason=f"shared data not found at {SHARED / 'data'} (photos/ and p3m-portraits-pseudogt/)",
)


# ----------------------------------------------------------------------------- fixtures


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth random colour texture, (h, w, 3) uint8."""
    small = rng.uniform(0, 255, (h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    big += rng.normal(0, 12, big.shape).astype(np.float32)
    return np.clip(big, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic photos (3) and portraits (2, soft matte touching the bottom edge)."""
    root = tmp_path_factory.mktemp("traindata")
    rng = np.random.default_rng(7)
    (root / "photos" / "sub").mkdir(parents=True)
    for i, (h, w) in enumerate([(300, 420), (360, 360), (700, 500)]):
        folder = root / "photos" / ("sub" if i == 2 else "")
        cv2.imwrite(str(folder / f"photo{i}.jpg"), _texture(rng, h, w))
    (root / "photos" / "notes.txt").write_text("not an image")
    (root / "portraits" / "image").mkdir(parents=True)
    (root / "portraits" / "alpha").mkdir()
    for i in range(2):
        h, w = 400, 300 + 40 * i
        yy, xx = np.mgrid[:h, :w]
        # a head (disc) on shoulders (rectangle down to the bottom edge), soft 6 px edge
        inside = np.minimum(
            80 - np.hypot(yy - 130, xx - w / 2),
            np.where(yy > 220, np.minimum(xx - 40, w - 40 - xx), -1e9),
        )
        inside = np.maximum(inside, 80 - np.hypot(yy - 130, xx - w / 2))
        alpha = np.clip(0.5 + inside / 6.0, 0, 1)
        cv2.imwrite(str(root / "portraits" / "image" / f"p{i}.jpg"), _texture(rng, h, w))
        cv2.imwrite(str(root / "portraits" / "alpha" / f"p{i}.png"), np.rint(alpha * 255).astype(np.uint8))
    return root


@pytest.fixture()
def spec(data_dir: Path) -> D.SampleSpec:
    return D.SampleSpec(size=(96, 128), seed=3, photos=data_dir / "photos", portraits=data_dir / "portraits")


def _kinds_perts():
    return [(k, p) for k in ("shapes", "portraits") for p in D.PERTURBATIONS]


# --------------------------------------------------------------------------- determinism


def test_same_index_same_sample_regardless_of_order_and_cache(spec: D.SampleSpec) -> None:
    first = [D.make_sample(i, spec) for i in range(6)]
    D._SOURCES.clear()  # a fresh process: nothing cached
    again = [D.make_sample(i, spec) for i in reversed(range(6))][::-1]
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(a.gt, b.gt)
        assert np.array_equal(a.coarse, b.coarse)
        assert a.kind == b.kind and a.meta == b.meta


def test_different_index_or_seed_differs(spec: D.SampleSpec) -> None:
    a, b = D.make_sample(0, spec), D.make_sample(1, spec)
    assert not np.array_equal(a.image, b.image)
    assert not np.array_equal(a.gt, b.gt)
    c = D.make_sample(0, D.SampleSpec(size=spec.size, seed=4, photos=spec.photos, portraits=spec.portraits))
    assert not np.array_equal(a.image, c.image)


def test_forcing_the_drawn_kind_changes_nothing(spec: D.SampleSpec) -> None:
    for i in range(4):
        natural = D.make_sample(i, spec)
        forced = D.make_sample(i, spec, kind=natural.kind, perturbation=natural.meta["perturbation"])
        assert np.array_equal(natural.image, forced.image) and np.array_equal(natural.coarse, forced.coarse)


def test_perturbation_override_keeps_image(spec: D.SampleSpec) -> None:
    a = D.make_sample(5, spec, kind="shapes", perturbation="lowres")
    b = D.make_sample(5, spec, kind="shapes", perturbation="cascadepsp")
    assert np.array_equal(a.image, b.image) and np.array_equal(a.gt, b.gt)
    assert a.meta["perturbation"] == "lowres" and b.meta["perturbation"] == "cascadepsp"


# ------------------------------------------------------------------- ranges, dtypes, shapes


@pytest.mark.parametrize(("kind", "pert"), _kinds_perts())
def test_ranges_dtypes_shapes(spec: D.SampleSpec, kind: str, pert: str) -> None:
    for i in range(3):
        s = D.make_sample(i, spec, kind=kind, perturbation=pert)
        assert s.image.shape == (96, 128, 3) and s.image.dtype == np.uint8
        assert s.gt.shape == (96, 128) and s.gt.dtype == np.float32
        assert s.coarse.shape == (96, 128) and s.coarse.dtype == np.float32
        for m in (s.gt, s.coarse):
            assert np.isfinite(m).all() and m.min() >= 0.0 and m.max() <= 1.0
        assert s.kind == kind and s.meta["kind"] == kind and s.meta["perturbation"] == pert
        assert 0.0 < s.hard.mean() < 1.0
        assert s.hard.dtype == bool and np.array_equal(s.hard, s.gt >= 0.5)
        assert 0.0 <= s.meta["coarse_iou"] <= 1.0


def test_shapes_are_varied_with_thin_parts_and_soft_edges(spec: D.SampleSpec) -> None:
    parts: set[str] = set()
    thin = 0
    for i in range(30):
        s = D.make_sample(i, spec, kind="shapes")
        parts.update(s.meta["shapes"]["parts"])
        soft = (s.gt > 0) & (s.gt < 1)
        assert soft.any()
        # thin structure: foreground that a 5x5 opening removes
        hard = s.hard.astype(np.uint8)
        opened = cv2.morphologyEx(hard, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
        thin += int((hard & (1 - opened)).sum() > 10)
        assert s.meta["fg"]["photo"].startswith("photo")
    assert {"polygon", "star", "blob", "ellipse", "holes", "branches"} <= parts
    assert thin >= 10


# ------------------------------------------------------------------------ exact alpha


def test_portrait_gt_is_exact_alpha_of_composite(spec: D.SampleSpec) -> None:
    for i in range(4):
        layers, meta = D.make_layers(i, spec, kind="portraits")
        s = D.make_sample(i, spec, kind="portraits")
        assert np.array_equal(s.gt, layers.alpha)
        a = layers.alpha.astype(np.float64)[..., None]
        expected = a * layers.fg + (1 - a) * layers.bg
        diff = np.abs(s.image.astype(np.float64) - expected)
        assert diff.max() <= 0.5 + 1e-3  # rounding of the float32 blend only
        opaque, clear = layers.alpha == 1.0, layers.alpha == 0.0
        assert np.array_equal(s.image[opaque], layers.fg[opaque])
        assert np.array_equal(s.image[clear], layers.bg[clear])
        soft = (layers.alpha > 0.02) & (layers.alpha < 0.98)
        assert soft.any() and opaque.any() and clear.any()
        assert meta["portrait"]["id"] in {"p0", "p1"}


def test_portrait_matte_touching_bottom_stays_outside(spec: D.SampleSpec) -> None:
    # The synthetic shoulders touch the portrait's bottom edge (400 px high); the
    # placed portrait must always end below the canvas so that cut never shows.
    h = spec.size[0]
    bottoms = []
    for i in range(16):
        s = D.make_sample(i, spec, kind="portraits")
        p = s.meta["portrait"]
        bottom = p["offset"][0] + 400 * p["scale"]
        assert bottom >= h + 1 - 1e-6, f"sample {i}: portrait ends at row {bottom:.1f} inside the canvas"
        bottoms.append(bottom)
        assert 0.0 < s.hard.mean() < 1.0  # never a canvas inside the person or beside it
    assert min(bottoms) < h + 400  # and it is not simply pushed far away


def test_shapes_composite_is_exact(spec: D.SampleSpec) -> None:
    layers, _ = D.make_layers(2, spec, kind="shapes")
    s = D.make_sample(2, spec, kind="shapes")
    assert np.array_equal(s.image, layers.composite())
    assert np.array_equal(s.gt, layers.alpha)


# ------------------------------------------------------------------------ perturbations


def test_cascadepsp_perturbation_reaches_target_band(spec: D.SampleSpec) -> None:
    targets = []
    for i in range(16):
        s = D.make_sample(i, spec, perturbation="cascadepsp")
        target = s.meta["target_iou"]
        targets.append(target)
        assert 0.8 <= target < 1.0
        measured = D.iou(s.coarse >= 0.5, s.hard)
        assert measured == pytest.approx(s.meta["coarse_iou"])
        assert target - 0.06 <= measured < target
        assert set(np.unique(s.coarse)) <= {0.0, 1.0}
    assert max(targets) - min(targets) > 0.05


def test_cascadepsp_strength_widens_band() -> None:
    rng = np.random.default_rng(0)
    gt = np.zeros((224, 224), np.float32)
    cv2.circle(gt, (112, 112), 70, 1.0, -1)
    ious = []
    for _ in range(10):
        coarse, meta = D.perturb(gt, "cascadepsp", rng, strength=2.0)
        assert 0.6 <= meta["target_iou"] < 1.0
        ious.append(D.iou(coarse >= 0.5, gt >= 0.5))
    assert min(ious) < 0.8


def test_lowres_is_blocky() -> None:
    rng = np.random.default_rng(1)
    gt = np.zeros((200, 300), np.float32)
    cv2.fillPoly(gt, [np.array([[20, 30], [280, 60], [150, 190]], np.int32)], 1.0)
    seen = set()
    for _ in range(40):
        coarse, meta = D.perturb(gt, "lowres", rng)
        f = meta["factor"]
        assert 4 <= f <= 32
        seen.add(meta["upsample"])
        if meta["upsample"] != "nearest":
            continue
        low = D.block_mean(gt, f)
        if meta["binarized"]:
            low = (low >= 0.5).astype(np.float32)
        for by in range(low.shape[0]):
            for bx in range(low.shape[1]):
                block = coarse[by * f : (by + 1) * f, bx * f : (bx + 1) * f]
                assert np.all(block == low[by, bx])
    assert seen == {"nearest", "bilinear"}


def test_block_mean_partial_blocks() -> None:
    x = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    m = D.block_mean(x, 4)
    assert m.shape == (2, 2)
    assert m[0, 0] == pytest.approx(x[:4, :4].mean())
    assert m[1, 1] == pytest.approx(x[4:, 4:].mean())


def test_blobs_change_boundary_only_nearby() -> None:
    rng = np.random.default_rng(2)
    gt = np.zeros((256, 256), np.float32)
    gt[64:192, 64:192] = 1
    for _ in range(10):
        coarse, meta = D.perturb(gt, "blobs", rng)
        changed = (coarse >= 0.5) != (gt >= 0.5)
        assert changed.any() or meta["morph_px"] == 0
        # far inside and far outside stay put
        assert not changed[110:146, 110:146].any()
        assert not changed[:10, :10].any()


def test_perturb_rejects_unknown() -> None:
    with pytest.raises(UsageError, match="perturbation"):
        D.perturb(np.zeros((8, 8), np.float32), "nope", np.random.default_rng(0))


# ---------------------------------------------------------------------- anti-aliased edge


@pytest.mark.parametrize("width", [1.0, 1.5, 2.0])
def test_rasterize_edge_width(width: float) -> None:
    s = D.SUPERSAMPLE
    h, w = 64, 64
    counts = []
    for off in range(s):  # every sub-pixel position of a vertical edge
        mask = np.zeros((h * s, w * s), np.uint8)
        mask[:, 20 * s + off : 44 * s + off] = 1
        alpha = D.rasterize(mask, s, width)
        row = alpha[h // 2]
        counts.append(int(((row > 0) & (row < 1)).sum()) / 2)  # two edges per row
        assert alpha.sum() == pytest.approx(mask.sum() / s**2, rel=1e-5)  # box filter keeps area
    assert np.mean(counts) == pytest.approx(width, abs=0.3)
    assert max(counts) <= math.ceil(width) + (1 if width % 1 else 0)


def test_shape_edges_are_one_to_two_px(spec: D.SampleSpec) -> None:
    for i in range(8):
        alpha, meta = D.render_shapes((160, 160), np.random.default_rng(i))
        assert 1.0 <= meta["edge_width"] <= 2.0
        hard = (alpha >= 0.5).astype(np.uint8)
        contours, _ = cv2.findContours(hard, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        length = sum(cv2.arcLength(c, True) for c in contours if len(c) > 2)
        partial = int(((alpha > 0.02) & (alpha < 0.98)).sum())
        # band thickness: pixels per unit of boundary length
        assert 0.5 <= partial / max(length, 1.0) <= 3.0, (i, partial, length)


# ------------------------------------------------------------------------- torch wrapper


def test_dataset_items(spec: D.SampleSpec) -> None:
    big = D.SampleSpec(size=(160, 160), seed=1, photos=spec.photos, portraits=spec.portraits)
    ds = D.CompositeDataset(big, length=6, crop=96)
    item = ds[3]
    assert item["image"].shape == (3, 96, 96) and item["image"].dtype == torch.float32
    assert item["gt"].shape == (1, 96, 96) and item["coarse"].shape == (1, 96, 96)
    assert 0 <= float(item["image"].min()) and float(item["image"].max()) <= 1
    assert item["index"] == 3 and item["kind"] in ("shapes", "portraits")
    again = ds[3]
    for k in ("image", "gt", "coarse"):
        assert torch.equal(item[k], again[k])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, 96, 96) and len(batch["kind"]) == 3
    with pytest.raises(IndexError):
        ds[6]


def test_dataset_same_in_worker_processes(spec: D.SampleSpec) -> None:
    ds = D.CompositeDataset(spec, length=4, crop=96, start=100)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    got = torch.cat([b["gt"] for b in loader])
    direct = torch.stack([ds[i]["gt"] for i in range(4)])
    assert torch.equal(got, direct)


def test_dataset_crop_too_big(spec: D.SampleSpec) -> None:
    with pytest.raises(UsageError, match="--crop"):
        D.CompositeDataset(spec, length=2, crop=200)


def test_eval_set_fixed_and_balanced(spec: D.SampleSpec) -> None:
    es = D.make_eval_set(12, 96, seed=11, spec=spec)
    assert len(es) == 12
    combos = {(s.kind, s.meta["perturbation"]) for s in es}
    assert combos == set(_kinds_perts())
    assert {it.strength for it in es.items} == {0.5, 1.0}
    a, b = es[5], D.make_eval_set(12, 96, seed=11, spec=spec)[5]
    assert np.array_equal(a.image, b.image) and np.array_equal(a.coarse, b.coarse)
    assert a.gt.shape == (96, 96)


# ------------------------------------------------------------------------ sources, errors


def test_photos_cached_downscaled(data_dir: Path) -> None:
    bank = D.PhotoBank(data_dir / "photos", cache_side=256)
    assert len(bank) == 3  # recursive, non-images ignored
    for i in range(len(bank)):
        assert max(bank.pyramid(i).levels[0].shape[:2]) <= 256


def test_no_photos_names_the_flag(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    spec = D.SampleSpec(size=64, photos=empty, kinds={"shapes": 1.0})
    with pytest.raises(InputError, match="--photos") as err:
        D.make_sample(0, spec)
    assert isinstance(err.value, RefineError)
    with pytest.raises(InputError, match="--photos"):
        missing = D.SampleSpec(size=64, photos=tmp_path / "missing", kinds={"shapes": 1.0})
        D.CompositeDataset(missing, length=1)


def test_spec_validation() -> None:
    with pytest.raises(UsageError, match="--strength"):
        D.SampleSpec(strength=0.0)
    with pytest.raises(UsageError, match="--size"):
        D.SampleSpec(size=8)
    with pytest.raises(UsageError, match="--kinds"):
        D.SampleSpec(kinds={"cats": 1.0})
    with pytest.raises(UsageError, match="--pairs"):
        D.SampleSpec(kinds={"pairs": 1.0})


def _write_pairs(root: Path, n: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(5)
    out = []
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        h, w = 180 + 20 * i, 240
        mask = np.zeros((h, w), np.uint8)
        cv2.circle(mask, (w // 2 + 10 * i, h // 2), 60, 255, -1)
        image = np.where(mask[..., None] > 0, np.uint8(230), np.uint8(20)).repeat(3, axis=2)
        image = np.clip(image.astype(np.int16) + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(root / "images" / f"c{i}.png"), image)
        cv2.imwrite(str(root / "masks" / f"c{i}.png"), mask)
        out.append((image, mask))
    return out


def test_user_pairs_folder_and_csv(tmp_path: Path) -> None:
    _write_pairs(tmp_path / "set")
    with (tmp_path / "pairs.csv").open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["image", "mask"])
        for i in range(3):
            wr.writerow([f"set/images/c{i}.png", f"set/masks/c{i}.png"])
    for source in (tmp_path / "set", tmp_path / "pairs.csv"):
        spec = D.SampleSpec(size=96, kinds={"pairs": 1.0}, pairs=source, photos=tmp_path / "none")
        names = set()
        for i in range(6):
            s = D.make_sample(i, spec)
            assert s.kind == "pairs" and s.image.shape == (96, 96, 3)
            names.add(s.meta["pair"])
            # the crop of the image and of the mask are aligned: bright pixels are foreground
            bright = s.image.mean(axis=2) > 125
            assert (bright == s.hard).mean() > 0.97
        assert names == {"c0.png", "c1.png", "c2.png"}


def test_pairs_errors(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    with pytest.raises(InputError, match="--pairs"):
        D.PairBank(tmp_path / "x")
    with pytest.raises(InputError, match="--pairs"):
        D.PairBank(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("image,mask\nnope.png,nope_mask.png\n")
    with pytest.raises(InputError, match="nope.png"):
        D.PairBank(tmp_path / "bad.csv")


# --------------------------------------------------------------------------------- losses


def _outputs_from(gt: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    logits = scale * (2 * gt - 1)
    out = {}
    for k in OUTPUTS:
        out[f"out_{k}"] = logits.clone().requires_grad_(True)
        out[f"pred_{k}"] = torch.sigmoid(out[f"out_{k}"])
    return out


def test_cascadepsp_loss_goes_to_zero_for_perfect_prediction() -> None:
    gt = torch.zeros(2, 1, 32, 32)
    gt[:, :, 8:24, 6:20] = 1
    values = []
    for scale in (0.5, 2.0, 5.0, 10.0, 20.0):
        total, parts = cascadepsp_loss(_outputs_from(gt, scale), gt)
        total = total.detach()
        assert torch.isfinite(total)
        values.append(total.item())
        assert set(parts) >= {"ce_28", "ce_56", "l1_224", "l2_56_2", "grad"}
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert values[-1] < 1e-3
    # soft ground truth, predicted exactly: L1, L2 and gradient terms are exactly 0
    soft = torch.rand(1, 1, 16, 16)
    out = {f"pred_{k}": soft.clone() for k in OUTPUTS} | {f"out_{k}": torch.logit(soft) for k in OUTPUTS}
    _, parts = cascadepsp_loss(out, soft)
    assert float(parts["l1_224"]) == 0 and float(parts["l2_56_2"]) == 0 and float(parts["grad"]) == 0


def test_cascadepsp_loss_weights_and_gradients() -> None:
    gt = torch.zeros(1, 1, 16, 16)
    gt[..., 4:12, 4:12] = 1
    out = _outputs_from(gt, -3.0)  # everything wrong
    total, parts = cascadepsp_loss(out, gt)
    w = CascadeLossWeights()
    expected = sum(c * float(parts[f"ce_{k}"]) for k, c in zip(OUTPUTS, w.ce, strict=True) if c)
    for k, a in zip(OUTPUTS, w.l1, strict=True):
        if a:
            expected += a * (float(parts[f"l1_{k}"]) + float(parts[f"l2_{k}"]))
    expected += 5 * float(parts["grad"])
    assert total.item() == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert out["out_224"].grad is not None and out["out_224"].grad.abs().sum() > 0
    assert out["out_28"].grad is not None and out["out_28"].grad.abs().sum() > 0
    assert "ce_224" not in parts and "l1_28" not in parts


def test_cascadepsp_loss_missing_output() -> None:
    gt = torch.zeros(1, 1, 8, 8)
    out = _outputs_from(gt, 1.0)
    del out["out_28"], out["pred_28"]
    with pytest.raises(KeyError, match="out_28"):
        cascadepsp_loss(out, gt)
    no28 = CascadeLossWeights(ce=(0, 0, 0.5, 1, 1, 0.5))
    total, _ = cascadepsp_loss(out, gt, no28)
    assert torch.isfinite(total)


def test_sobel_magnitude() -> None:
    flat = torch.full((1, 1, 12, 12), 0.7)
    mag = sobel_magnitude(flat)
    assert torch.allclose(mag[..., 3:-3, 3:-3], torch.full((6, 6), 0.01))  # sqrt(1e-4)
    ramp = torch.arange(12.0).repeat(12, 1)[None, None]
    # Sobel / 4 is a central difference over 2 px: slope 1 gives magnitude 2
    assert torch.allclose(sobel_magnitude(ramp)[..., 3:-3, 3:-3], torch.full((6, 6), math.sqrt(4 + 1e-4)))


def _ohem_reference(logits, target, thresh, min_kept, ignore):
    n, c = logits.shape[:2]
    lg = logits.permute(0, 2, 3, 1).reshape(-1, c)
    t = target.reshape(-1)
    valid = t != ignore
    lg, t = lg[valid], t[valid]
    p = torch.softmax(lg, 1)[torch.arange(len(t)), t]
    losses = torch.nn.functional.cross_entropy(lg, t, reduction="none")
    order = torch.sort(p).values
    cut = max(thresh, float(order[min(min_kept, len(order) - 1)]))
    return losses[p < cut].mean()


def test_ohem_cross_entropy_matches_definition() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 10, 12, generator=g) * 3
    target = torch.randint(0, 3, (2, 10, 12), generator=g)
    target[0, :2] = 255
    for min_kept in (0, 10, 150, 10_000):
        got = ohem_cross_entropy(logits, target, 0.7, min_kept)
        ref = _ohem_reference(logits, target, 0.7, min_kept, 255)
        assert torch.allclose(got, ref), min_kept
    # with many kept pixels the loss is closer to the plain mean CE than with few
    plain = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    few = ohem_cross_entropy(logits, target, 0.0, 5)
    assert float(few) > float(plain)
    module = OhemCrossEntropy(min_kept=10)
    assert torch.allclose(module(logits, target), ohem_cross_entropy(logits, target, 0.7, 10))


def test_ohem_easy_pixels_and_gradients() -> None:
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    logits = torch.zeros(1, 2, 4, 4)
    logits[:, 0] = 10.0  # every pixel confidently right
    easy = logits.clone().requires_grad_(True)
    loss = ohem_cross_entropy(easy, target, 0.7, min_kept=0)
    assert loss.item() == 0.0
    loss.backward()
    assert easy.grad is not None
    hard = torch.zeros(1, 2, 4, 4, requires_grad=True)  # p = 0.5 < 0.7 everywhere
    loss = ohem_cross_entropy(hard, target, 0.7, min_kept=0)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-5)
    all_ignored = torch.full((1, 4, 4), 255)
    assert ohem_cross_entropy(hard, all_ignored).item() == 0.0


# ------------------------------------------------------------------------ benchmark script


def _load_script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "make_composites.py"
    spec = importlib.util.spec_from_file_location("make_composites", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_composites_deterministic(tmp_path: Path, data_dir: Path) -> None:
    script = _load_script()
    args = ["--n-shapes", "2", "--n-portraits", "2", "--size", "96", "128"]
    args += ["--photos", str(data_dir / "photos"), "--portraits", str(data_dir / "portraits")]
    assert script.main([str(tmp_path / "a"), *args]) == 0
    assert script.main([str(tmp_path / "b"), *args]) == 0
    assert script.main([str(tmp_path / "a"), *args]) == 2  # refuses to overwrite
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    names = {p.name for p in files}
    assert {"image.png", "gt.png", "coarse_lowres.png", "coarse_perturbed.png", "manifest.json"} <= names
    assert len([p for p in files if p.name == "gt.png"]) == 4
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    gt = cv2.imread(str(tmp_path / "a" / "portrait_001" / "gt.png"), cv2.IMREAD_UNCHANGED)
    same = D.SampleSpec(
        size=(96, 128), seed=20_250_101, photos=data_dir / "photos", portraits=data_dir / "portraits"
    )
    s = D.make_sample(1, same, kind="portraits")
    assert gt.shape == (96, 128) and np.array_equal(gt >= 128, s.hard)


# ------------------------------------------------------------------------- real shared data


@needs_shared
def test_shared_data_defaults_and_speed() -> None:
    import time

    spec = D.SampleSpec(size=224)
    assert spec.photos == SHARED_PHOTOS and spec.portraits == SHARED_PORTRAITS
    for i in range(12):  # load every photo/portrait that these indices touch
        D.make_sample(i, spec)
    t0 = time.perf_counter()
    for i in range(12):
        s = D.make_sample(i, spec)
        assert s.image.shape == (224, 224, 3)
    assert (time.perf_counter() - t0) / 12 < 0.1  # a few ms each; generous for busy CI machines


@needs_shared
def test_shared_portrait_composite_exact() -> None:
    spec = D.SampleSpec(size=(256, 320), seed=9, kinds={"portraits": 1.0})
    for i in (0, 3):
        layers, meta = D.make_layers(i, spec)
        s = D.make_sample(i, spec)
        assert np.array_equal(s.gt, layers.alpha) and np.array_equal(s.image, layers.composite())
        assert meta["portrait"]["id"].startswith("p_")
        assert ((s.gt > 0.05) & (s.gt < 0.95)).mean() > 0.001  # hair-level soft matte survives
