"""`refine train`: the CascadePSP-lite model, training loop, checkpoints and exported weights (CPU, tiny)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from refine_cli.errors import InputError, Interrupted, UsageError, WeightsError
from refine_cli.models.cascadepsp import CascadeRefinementModule
from refine_cli.models.cascadepsp_lite import LITE_V1, LiteArch, cascadepsp_lite
from refine_cli.train import trainer as T

TINY_ARCH = dict(T.TINY["arch_params"])


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the tiny tensors gain nothing from more, and a busy CI runner makes them slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth random colour texture, (h, w, 3) uint8."""
    small = rng.uniform(0, 255, (h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    big += rng.normal(0, 10, (h, w, 3)).astype(np.float32)
    return np.clip(big, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small synthetic photos and two synthetic portraits (soft disc-on-shoulders matte)."""
    root = tmp_path_factory.mktemp("train-data")
    rng = np.random.default_rng(11)
    (root / "photos").mkdir()
    for i in range(3):
        cv2.imwrite(str(root / "photos" / f"photo{i}.png"), _texture(rng, 200 + 20 * i, 240))
    (root / "portraits" / "image").mkdir(parents=True)
    (root / "portraits" / "alpha").mkdir()
    for i in range(2):
        h, w = 200, 160
        yy, xx = np.mgrid[:h, :w]
        shoulders = np.where(yy > 110, np.minimum(xx - 20, w - 20 - xx), -99)
        inside = np.maximum(40 - np.hypot(yy - 70, xx - w / 2), shoulders)
        alpha = np.clip(0.5 + inside / 4.0, 0, 1)
        cv2.imwrite(str(root / "portraits" / "image" / f"p{i}.png"), _texture(rng, h, w))
        cv2.imwrite(str(root / "portraits" / "alpha" / f"p{i}.png"), np.rint(alpha * 255).astype(np.uint8))
    return root


def _cfg(out: Path, data_dir: Path, **kw: object) -> T.TrainConfig:
    data = T.DataConfig(photos=data_dir / "photos", portraits=data_dir / "portraits")
    settings = {**T.TINY, "threads": 1, "data": data, **kw}
    return T.TrainConfig(out=out, **settings)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ model


def test_lite_forward_contract_and_prior() -> None:
    torch.manual_seed(0)
    model = cascadepsp_lite(**TINY_ARCH).eval()
    im = model.normalize_image(torch.rand(2, 3, 48, 64))
    seg = model.mask_to_seg(torch.rand(2, 1, 48, 64))
    with torch.no_grad():
        out = model(im, seg)
        local = model(im, seg, inter_s8=seg * 0.5)
        both = model(im, seg, seg, seg)
    assert len(out) == 12 and len(local) == 10 and len(both) == 6
    assert all(v.shape == (2, 1, 48, 64) and v.dtype == torch.float32 for v in out.values())
    # untrained heads are zero: the output is the coarse mask through the prior, sigmoid(3 * seg)
    assert torch.allclose(out["pred_224"], torch.sigmoid(3.0 * seg))
    assert ((out["pred_224"] >= 0.5) == (seg > 0)).all()
    # the mask skip widens the full-resolution decoder input by one channel (image + mask)
    assert model.up_3.shortcut.in_channels == TINY_ARCH["up2"]
    assert model.final_11.in_channels == TINY_ARCH["up3"] + 4
    plain = cascadepsp_lite(**{**TINY_ARCH, "mask_skip": False})
    assert plain.final_11.in_channels == TINY_ARCH["up3"] + 3


def test_lite_cascade_matches_the_parent_forward() -> None:
    """With the prior gain at 0 (no mask skip) the lite forward is exactly CascadeRefinementModule.forward."""
    torch.manual_seed(1)
    model = cascadepsp_lite(**{**TINY_ARCH, "mask_skip": False}).eval()
    for p in model.parameters():  # make the heads non-trivial
        p.data.normal_(0, 0.3)
    assert model.prior_gain is not None
    model.prior_gain.data.zero_()
    im, seg = torch.randn(1, 3, 32, 40), torch.rand(1, 1, 32, 40) * 2 - 1
    with torch.no_grad():
        for args in ((), (seg.tanh(),), (seg.tanh(), seg * 0.3)):
            ours = model(im, seg, *args)
            ref = CascadeRefinementModule.forward(model, im, seg, *args)
            assert ours.keys() == ref.keys()
            for k in ours:
                assert torch.equal(ours[k], ref[k]), k


def test_lite_arch_dict_rebuilds_the_same_module() -> None:
    model = cascadepsp_lite(**LITE_V1.to_dict())
    again = cascadepsp_lite(**json.loads(json.dumps(model.arch.to_dict())))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in again.state_dict().items()}
    assert LiteArch.from_dict(LITE_V1.to_dict()) == LITE_V1
    no_prior = cascadepsp_lite(**{**TINY_ARCH, "prior_gain": 0.0})
    assert no_prior.prior_gain is None and "prior_gain" not in no_prior.state_dict()
    with pytest.raises(WeightsError, match="unknown"):
        cascadepsp_lite(**{**TINY_ARCH, "depth": 3})
    with pytest.raises(WeightsError, match="invalid"):
        cascadepsp_lite(**{**TINY_ARCH, "widths": [8, 16]})


def test_architectures(tmp_path: Path) -> None:
    from refine_cli.models.magnet import RefinementMagNet

    magnet = T.build_model("magnet-refinement")
    assert isinstance(magnet, RefinementMagNet) and magnet.n_classes == 2
    seven = T.build_model("magnet-refinement", {"n_classes": 7})
    assert T.arch_dict(seven, "magnet-refinement") == {"n_classes": 7}
    with pytest.raises(UsageError, match="n_classes"):
        T.build_model("magnet-refinement", {"n_classes": 1})
    with pytest.raises(UsageError, match="--arch"):
        T.TrainConfig(out=tmp_path, arch="unet")
    with pytest.raises(UsageError, match="crop"):
        T.TrainConfig(out=tmp_path, crop=60)
    with pytest.raises(UsageError, match="fp16"):
        T.resolve_precision("fp16", torch.device("cpu"))
    assert T.resolve_precision("auto", torch.device("cpu")) == "fp32"


# ------------------------------------------------------------------------------ training


def test_tiny_training_loss_goes_down(tmp_path: Path, data_dir: Path) -> None:
    cfg = _cfg(tmp_path / "run", data_dir, steps=40, fixed_batch=True, val_every=0, ckpt_every=0,
               log_every=10)
    result = T.train(cfg)
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < 0.8 * first, (first, last)
    assert result.steps == 40 and len(result.validations) == 1
    val = result.validations[0]
    assert 0.0 <= val["iou"] <= 1.0 and 0.0 <= val["mba"] <= 1.0 and "portraits" in val["by_kind"]
    records = [json.loads(line) for line in (cfg.out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [10, 20, 30, 40]
    assert not list(cfg.out.glob("*.tmp"))


def test_resume_gives_the_identical_continuation(tmp_path: Path, data_dir: Path) -> None:
    kw = {"steps": 6, "val_every": 0, "ckpt_every": 0, "log_every": 3}
    straight = T.train(_cfg(tmp_path / "a", data_dir, **kw))

    def stop_after_3(step: int, total: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    cfg_b = _cfg(tmp_path / "b", data_dir, **kw)
    with pytest.raises(Interrupted, match="--resume"):
        T.train(cfg_b, progress=stop_after_3)
    with pytest.raises(UsageError, match="--resume"):
        T.train(cfg_b)  # the folder holds a run
    with pytest.raises(UsageError, match="lr"):
        T.train(cfg_b, resume=True, overrides={"lr": 1.0})
    resumed = T.train(cfg_b, resume=True)
    assert resumed.steps == 6 and len(resumed.losses) == 3
    np.testing.assert_array_equal(resumed.losses, straight.losses[3:])
    sa = torch.load(tmp_path / "a" / "final.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "final.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_exported_weights_load_strictly(tmp_path: Path, data_dir: Path) -> None:
    result = T.train(_cfg(tmp_path / "run", data_dir, steps=2, val_every=2))
    best = tmp_path / "run" / "best.pt"
    side = json.loads(best.with_suffix(".json").read_text())
    assert side["arch"] == "cascadepsp-lite" and side["arch_params"]["widths"] == [8, 16, 16]
    assert side["steps"] == 2 and side["sha256"] == T.sha256_file(best) and "iou" in side["metrics"]
    model, meta = T.load_exported(best)
    trained = torch.load(result.final_weights, weights_only=True)
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)
    assert not model.training

    # fp16 storage: loads back into float32
    half = tmp_path / "half.pt"
    T.export_weights(model, half, {"arch": "cascadepsp-lite", "arch_params": meta["arch_params"]}, half=True)
    model16, _ = T.load_exported(half)
    assert all(p.dtype == torch.float32 for p in model16.parameters())

    with pytest.raises(WeightsError, match="checksum"):
        T.load_exported(best, sha256="0" * 64)
    state = dict(trained)
    state.pop("final_21.bias")
    torch.save(state, tmp_path / "run" / "final.pt")
    side_final = json.loads((tmp_path / "run" / "final.json").read_text())
    with pytest.raises(WeightsError, match="missing"):
        T.load_exported(tmp_path / "run" / "final.pt", sha256=T.sha256_file(tmp_path / "run" / "final.pt"))
    assert side_final["arch_params"] == side["arch_params"]


def test_corrupted_checkpoint_is_a_clear_error(tmp_path: Path, data_dir: Path) -> None:
    cfg = _cfg(tmp_path / "run", data_dir, steps=2, val_every=0)
    with pytest.raises(InputError, match="no checkpoint"):
        T.train(cfg, resume=True)
    T.train(cfg)
    ckpt = cfg.out / T.CHECKPOINT
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="damaged"):
        T.train(replace(cfg, steps=4), resume=True)
    torch.save({"model": {}}, ckpt)
    with pytest.raises(InputError, match="not a `refine train` checkpoint"):
        T.train(cfg, resume=True)


def test_cli_tiny_end_to_end(tmp_path: Path, data_dir: Path) -> None:
    from refine_cli.commands.train import app

    out = tmp_path / "cli"
    args = ["--tiny", "--out", str(out), "--photos", str(data_dir / "photos"),
            "--portraits", str(data_dir / "portraits"), "--threads", "1", "-q"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().endswith("best.pt")
    assert (out / "final.pt").is_file() and (out / T.CHECKPOINT).is_file()
    res = CliRunner().invoke(app, [*args, "--resume", "--steps", "10"])
    assert res.exit_code == 0, res.output
    assert T.load_checkpoint(out / T.CHECKPOINT)["step"] == 10
    res = CliRunner().invoke(app, ["--out", str(tmp_path / "m"), "--arch", "magnet-refinement",
                                   "--val-size", "64", "-q"])
    assert isinstance(res.exception, UsageError) and "--val-size" in str(res.exception)
    res = CliRunner().invoke(app, ["--out", str(tmp_path / "c"), "--samples", "3", "-q"])
    assert isinstance(res.exception, UsageError) and "magnet-refinement" in str(res.exception)


def test_cli_arch_params(tmp_path: Path, data_dir: Path) -> None:
    """--arch-params changes fields of the lite architecture; bad JSON or fields are usage errors."""
    from refine_cli.commands.train import app

    base = ["--tiny", "--photos", str(data_dir / "photos"), "--portraits", str(data_dir / "portraits"),
            "--threads", "1", "--steps", "2", "-q"]
    res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "w"), "--arch-params",
                                   '{"psp": 24, "head": 4}'])
    assert res.exit_code == 0, res.output
    arch = json.loads((tmp_path / "w" / "final.json").read_text())["arch_params"]
    assert arch["psp"] == 24 and arch["head"] == 4 and arch["widths"] == T.TINY["arch_params"]["widths"]
    assert T.parse_arch_params('{"psp": 80}')["widths"] == [24, 48, 96]  # over the shipped v1 without --tiny
    for text, words in (("{psp: 1}", "not valid JSON"), ("[1, 2]", "JSON object"),
                        ('{"pspx": 1}', "unknown fields ['pspx']"), ('{"widths": [8]}', "3 entries")):
        res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "bad"), "--arch-params", text])
        assert isinstance(res.exception, UsageError) and words in str(res.exception), (text, res.exception)
    res = CliRunner().invoke(app, ["--out", str(tmp_path / "m"), "--arch", "magnet-refinement",
                                   "--arch-params", "{}", "-q"])
    assert isinstance(res.exception, UsageError) and "--arch-params" in str(res.exception)


def test_cli_init_fine_tunes_exported_weights(tmp_path: Path, data_dir: Path) -> None:
    """--init starts a CascadePSP-lite run from exported weights (their architecture kept, the sidecar
    names where it started); a mismatched --arch or an --arch-params beside it is a usage error."""
    from refine_cli.commands.train import app

    base = ["--tiny", "--photos", str(data_dir / "photos"), "--portraits", str(data_dir / "portraits"),
            "--threads", "1", "-q"]
    res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "a"), "--arch-params", '{"psp": 24}'])
    assert res.exit_code == 0, res.output
    start = tmp_path / "a" / "final.pt"
    res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "b"), "--init", str(start), "--steps", "1"])
    assert res.exit_code == 0, res.output
    side = json.loads((tmp_path / "b" / "final.json").read_text())
    assert side["arch_params"]["psp"] == 24 and side["init"]["sha256"] == T.sha256_file(start)
    a, _ = T.load_exported(start)
    b, meta = T.load_init(T.TrainConfig(out=tmp_path / "x", init=str(start)))
    assert meta["steps"] == 8 and b.training
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "c"), "--init", str(start), "--arch",
                                   "cascadepsp"])
    assert isinstance(res.exception, UsageError) and "--arch cascadepsp-lite" in str(res.exception)
    res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "d"), "--init", str(start),
                                   "--arch-params", '{"psp": 16}'])
    assert isinstance(res.exception, UsageError) and "drop --arch-params" in str(res.exception)
    res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "e"), "--init", "cascadepsp-lite-v2",
                                   "--steps", "1", "--crop", "64"])
    assert res.exit_code == 0, res.output  # a registry name: the bundled weights
    assert json.loads((tmp_path / "e" / "final.json").read_text())["init"]["weights"] == "cascadepsp-lite-v2"


# ------------------------------------------------------------------------------ --kinds, --perturbations


MIX = ["--kinds", "shapes=0.5,thin=0.3,cells=0.2", "--perturbations", "cascadepsp=0.6,detector=0.4"]


def test_mix_options_parse() -> None:
    """name=weight,...; a bare name weighs 1; DataConfig checks the names too; defaults are the old mix."""
    assert T.parse_mix("shapes=0.3, aerial", T.KINDS, "--kinds") == (("aerial", 1.0), ("shapes", 0.3))
    assert T.parse_mix("thin", T.KINDS, "--kinds") == (("thin", 1.0),)
    assert T.parse_mix("detector=2,lowres=0", T.COARSE_METHODS, "--perturbations") == (
        ("detector", 2.0), ("lowres", 0.0))
    assert T.format_mix((("aerial", 1.0), ("shapes", 0.3))) == "aerial=1,shapes=0.3"
    valid = "the valid names are shapes, portraits, pairs, aerial, cells, thin"
    for text, words in (("shapes,bogus", f"unknown name 'bogus'; {valid}"),
                        ("shapes=0.5,shapes=1", "given twice"), ("shapes=x", "must be a number"),
                        ("shapes=-1", ">= 0"), ("shapes=0", "positive weight"),
                        ("shapes,,thin", "empty entry"), ("", "empty entry")):
        with pytest.raises(UsageError, match="--kinds") as info:
            T.parse_mix(text, T.KINDS, "--kinds")
        assert words in str(info.value) and "\n" not in str(info.value), text
    with pytest.raises(UsageError, match="cascadepsp, lowres, blobs, detector"):
        T.parse_mix("cascade", T.COARSE_METHODS, "--perturbations")
    with pytest.raises(UsageError, match="unknown name 'rivers'"):
        T.DataConfig(kinds={"rivers": 1.0})
    assert T.DataConfig(kinds="cells").kinds == (("cells", 1.0),)
    old = T.DataConfig()  # old runs reproduce: the default mix is unchanged
    assert old.kinds == (("portraits", 0.38), ("shapes", 0.62))
    assert old.perturbations == (("blobs", 0.25), ("cascadepsp", 0.45), ("lowres", 0.3))


def test_cli_bad_mix_is_one_error_line(tmp_path: Path, cli) -> None:
    for flag, value, words in (("--kinds", "shapes=0.5,forest=0.5", "aerial, cells, thin"),
                               ("--perturbations", "detector,sam", "cascadepsp, lowres, blobs, detector")):
        code, out, err = cli("train", "--tiny", "--out", tmp_path / "bad", flag, value)
        assert code == 2 and out == "", err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and flag in lines[0] and words in lines[0], err
    assert not (tmp_path / "bad").exists()
    code, _, err = cli("train", "--out", tmp_path / "m", "--arch", "magnet-refinement", "--kinds", "cells")
    assert code == 2 and "--kinds" in err and "magnet-refinement" in err


def test_cli_mix_is_stored_and_resume_refuses_a_changed_mix(tmp_path: Path, data_dir: Path) -> None:
    from refine_cli.commands.train import app

    out = tmp_path / "mix"
    base = ["--tiny", "--out", str(out), "--photos", str(data_dir / "photos"), "--threads", "1",
            "--val-n", "3", "-q"]
    res = CliRunner().invoke(app, [*base, *MIX, "--steps", "2"])
    assert res.exit_code == 0, res.output
    want = {"kinds": [["cells", 0.2], ["shapes", 0.5], ["thin", 0.3]],
            "perturbations": [["cascadepsp", 0.6], ["detector", 0.4]]}
    config = json.loads((out / "config.json").read_text())["data"]
    stored = T.load_checkpoint(out / T.CHECKPOINT)["config"]["data"]
    side = json.loads((out / "best.json").read_text())
    for data in (config, stored, side["data"]):
        assert {k: data[k] for k in want} == want
    assert side["validation"]["kinds"] == {"cells": 1, "shapes": 1, "thin": 1}
    assert side["validation"]["selection"] == T.SELECTION_RULE

    for flag, value, words in (
        ("--kinds", "shapes=0.5,thin=0.5", "whose --kinds is cells=0.2,shapes=0.5,thin=0.3"),
        ("--perturbations", "cascadepsp",
         "whose --perturbations is cascadepsp=0.6,detector=0.4, not cascadepsp=1"),
    ):
        res = CliRunner().invoke(app, [*base, "--resume", "--steps", "4", flag, value])
        assert isinstance(res.exception, UsageError) and words in str(res.exception), res.exception
        assert "cannot change on resume" in str(res.exception)
    with pytest.raises(UsageError, match="--kinds"):  # the Python API refuses it the same way
        T.train(T.TrainConfig(out=out), resume=True, overrides={"data": {"kinds": {"shapes": 1.0}}})
    assert T.load_checkpoint(out / T.CHECKPOINT)["step"] == 2
    # the same mix given again (in another order), or none: the run goes on with its stored mix
    res = CliRunner().invoke(app, [*base, "--resume", "--steps", "3",
                                   "--kinds", "thin=0.3,cells=0.2,shapes=0.5"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, [*base, "--resume", "--steps", "4"])
    assert res.exit_code == 0, res.output
    state = T.load_checkpoint(out / T.CHECKPOINT)
    assert state["step"] == 4 and {k: state["config"]["data"][k] for k in want} == want


def test_validation_reports_per_kind_metrics_and_selects_on_the_mean_kind_gain(
    tmp_path: Path, data_dir: Path
) -> None:
    data = T.DataConfig(photos=data_dir / "photos", portraits=data_dir / "portraits",
                        kinds={"shapes": 0.6, "portraits": 0.1, "aerial": 0.1, "cells": 0.1, "thin": 0.1},
                        perturbations={"cascadepsp": 1, "lowres": 1, "detector": 1})
    cfg = _cfg(tmp_path / "run", data_dir, data=data, steps=4, val_every=2, val_n=10, lr=3e-2)
    vset = T.make_validation_set(cfg)
    counts = T.validation_counts(vset)
    # balanced across kinds whatever their training weights; within a kind the perturbations cycle
    assert counts["kinds"] == {k: 2 for k in ("aerial", "cells", "portraits", "shapes", "thin")}
    by_kind_pert = {(k, p) for k, p, *_ in vset.samples}
    assert {("aerial", "cascadepsp"), ("aerial", "detector"), ("shapes", "cascadepsp")} <= by_kind_pert
    assert ("shapes", "detector") not in by_kind_pert  # no detector mask: it fell back to cascadepsp
    result = T.train(cfg)
    assert [v["step"] for v in result.validations] == [2, 4]
    for res in result.validations:
        assert set(res["by_kind"]) == {"aerial", "cells", "portraits", "shapes", "thin"}
        for k in res["by_kind"].values():
            assert k["n"] == 2
            assert {"iou", "mba", "coarse_iou", "coarse_mba", "gain_iou", "gain_mba"} <= set(k)
            assert k["gain_iou"] == pytest.approx(k["iou"] - k["coarse_iou"])
        assert "detector" in res["by_perturbation"]
        assert res["score"] == pytest.approx(np.mean([k["gain_iou"] for k in res["by_kind"].values()]))
        assert res["worst_kind"]["gain_iou"] == min(k["gain_iou"] for k in res["by_kind"].values())
    records = [json.loads(line) for line in (cfg.out / "log.jsonl").read_text().splitlines()]
    vals = [r for r in records if r["type"] == "val"]
    assert [set(r["by_kind"]) for r in vals] == [set(result.validations[0]["by_kind"])] * 2
    side = json.loads((cfg.out / "best.json").read_text())
    top = max(result.validations, key=T.selection_score)
    assert side["steps"] == top["step"]
    assert side["metrics"]["by_kind"] == json.loads(json.dumps(top["by_kind"]))
    second_better = result.validations[1]["score"] > result.validations[0]["score"]
    assert [r["best"] for r in vals] == [True, second_better]


def test_selection_rule_weighs_every_kind_the_same() -> None:
    """A step that wins on a frequent kind by ruining a rare one does not become best.pt."""

    def res(kinds: dict[str, tuple[float, float, int]]) -> dict:
        by = {k: {"iou": i, "coarse_iou": c, "n": n} for k, (i, c, n) in kinds.items()}
        total = sum(n for *_, n in kinds.values())
        iou = sum(i * n for i, _, n in kinds.values()) / total
        ciou = sum(c * n for _, c, n in kinds.values()) / total
        return {"iou": iou, "coarse_iou": ciou, "mba": 0.5, "by_kind": by}

    balanced = res({"shapes": (0.93, 0.90, 18), "thin": (0.75, 0.70, 2)})
    lopsided = res({"shapes": (0.96, 0.90, 18), "thin": (0.55, 0.70, 2)})  # higher overall IoU, thin ruined
    assert lopsided["iou"] > balanced["iou"]
    assert T.selection_score(balanced) == pytest.approx((0.03 + 0.05) / 2)
    assert T.selection_score(lopsided) < T.selection_score(balanced)
    # an older checkpoint's best (score = iou + mba) is compared on the per-kind rule
    old_best = {**balanced, "score": balanced["iou"] + balanced["mba"]}
    assert T.selection_score(old_best) == pytest.approx(0.04)
    assert T.selection_score({"iou": 0.9, "coarse_iou": 0.8}) == pytest.approx(0.1)


# ------------------------------------------------------------------------------ MagNet refinement module


SELFIE = "weights/mediapipe-selfie-segmentation/selfie_segmentation.tflite"


@pytest.fixture
def selfie(shared: Path) -> Path:
    """The MediaPipe selfie segmenter (skips without ai-edge-litert or the shared file)."""
    pytest.importorskip("ai_edge_litert", reason="the TFLite runtime (refine-cli[tflite]) is not installed")
    path = shared / SELFIE
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def _magnet_cfg(out: Path, shared: Path, selfie: Path, **kw: object):
    """A --tiny MagNet config on the shared portraits and photos.

    The selfie segmenter needs real people: on the synthetic portraits of ``data_dir`` it
    answers the same everywhere, so O and Y carry no signal and the loss cannot fall.
    """
    from refine_cli.train import magnet as M

    settings = {**M.TINY, "segmenter": str(selfie), "photos": shared / "data" / "photos",
                "portraits": shared / "data" / "p3m-portraits-pseudogt", **kw}
    return M.MagnetTrainConfig(out=out, **settings)  # type: ignore[arg-type]


def test_magnet_tiny_training_loss_goes_down(tmp_path: Path, shared: Path, selfie: Path) -> None:
    """--tiny on 64 px crops of a fixed batch: the OHEM loss falls (about 1.07 -> 0.08 in 30 steps, ~8 s)."""
    from refine_cli.train import magnet as M

    result = M.train_magnet(_magnet_cfg(tmp_path / "fixed", shared, selfie, fixed_batch=True))
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < 0.5 * first, (first, last)
    cache = np.load(tmp_path / "fixed" / "cache" / "train-0000.npz")
    assert cache["o"].dtype == np.uint8 and cache["o"].shape[1:] == (256, 256)
    assert cache["y"].shape == cache["g"].shape == cache["o"].shape
    meta = json.loads(str(cache["meta"]))
    assert meta[0]["portrait"].startswith("p_") and meta[0]["mode"] == "top"


def test_magnet_resume_and_export(tmp_path: Path, shared: Path, selfie: Path) -> None:
    """A resumed run continues identically; the export loads strictly and checks its sha256."""
    from refine_cli.refiners.magnet_method import load_refinement_file
    from refine_cli.train import magnet as M

    kw = {"steps": 6, "ckpt_every": 3}
    straight = M.train_magnet(_magnet_cfg(tmp_path / "a", shared, selfie, **kw))

    def stop_after_3(step: int, total: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    cfg_b = _magnet_cfg(tmp_path / "b", shared, selfie, **kw)
    with pytest.raises(Interrupted, match="--resume"):
        M.train_magnet(cfg_b, progress=stop_after_3)
    with pytest.raises(UsageError, match="lr"):
        M.train_magnet(cfg_b, resume=True, overrides={"lr": 1.0})
    resumed = M.train_magnet(cfg_b, resume=True)
    np.testing.assert_array_equal(resumed.losses, straight.losses[3:])

    side = json.loads((tmp_path / "b" / "final.json").read_text())
    assert side["arch"] == "magnet-refinement" and side["arch_params"] == {"n_classes": 2}
    assert side["segmenter"]["classes"] == ["background", "person"] and "O (the segmenter" in \
        side["normalization"]["inputs"]
    module = load_refinement_file(tmp_path / "b" / "final.pt", 2)
    trained = torch.load(tmp_path / "b" / "final.pt", weights_only=True)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in trained.items()) and not module.training
    with pytest.raises(WeightsError, match="checksum"):
        load_refinement_file(tmp_path / "b" / "final.pt", 2, sha256="0" * 64)
    with pytest.raises(WeightsError, match="not a 7-class"):
        load_refinement_file(tmp_path / "b" / "final.pt", 7)


def test_magnet_cli_tiny(tmp_path: Path, shared: Path, selfie: Path) -> None:
    from refine_cli.commands.train import app
    from refine_cli.train import magnet as M

    out = tmp_path / "cli"
    data = shared / "data"
    base = ["--arch", "magnet-refinement", "--tiny", "--segmenter", str(selfie),
            "--photos", str(data / "photos"), "--portraits", str(data / "p3m-portraits-pseudogt"), "-q"]
    res = CliRunner().invoke(app, [*base, "--steps", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().endswith("best.pt") and (out / "final.pt").is_file()
    # --resume finds the architecture in the checkpoint; the cache is reused, not rebuilt
    stamp = (out / "cache" / "train-0000.npz").stat().st_mtime_ns
    res = CliRunner().invoke(app, ["--out", str(out), "--resume", "--steps", "6", "-q"])
    assert res.exit_code == 0, res.output
    assert T.load_checkpoint(out / T.CHECKPOINT)["step"] == 6
    assert (out / "cache" / "train-0000.npz").stat().st_mtime_ns == stamp
    # fine-tuning from exported weights records where it started
    res = CliRunner().invoke(app, [*base, "--steps", "2", "--out", str(tmp_path / "ft"), "--init",
                                   str(out / "final.pt")])
    assert res.exit_code == 0, res.output
    side = json.loads((tmp_path / "ft" / "final.json").read_text())
    assert side["init"] == {"file": "final.pt", "sha256": T.sha256_file(out / "final.pt"), "steps": 6}
    # a cache made with other settings is refused
    (out / T.CHECKPOINT).unlink()
    with pytest.raises(UsageError, match="other settings"):
        M.train_magnet(_magnet_cfg(out, shared, selfie, samples=3))
