"""The shipped ``cascadepsp-lite`` weights (v2, the default, and v1): strict, checksummed loading, the
default-weights notice, and a quality floor on held-out composites (seeds the training never saw)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED, write_png

from refine_cli import weights
from refine_cli.api import refine_file
from refine_cli.config import CascadeOptions, RefineConfig
from refine_cli.errors import WeightsError
from refine_cli.evaluate import EvalOptions, evaluate_arrays
from refine_cli.train.trainer import load_exported, sha256_file

SHARED_DATA = SHARED / "data"
RECORD = weights.get_record(weights.DEFAULT_CASCADEPSP_LITE)


def test_the_default_lite_weights_are_v2():
    assert RECORD.name == "cascadepsp-lite-v2"


@pytest.mark.parametrize("name", ["cascadepsp-lite-v2", "cascadepsp-lite-v3", "cascadepsp-lite-v1"])
def test_shipped_weights_match_the_registry_and_load_strictly(name):
    record = weights.get_record(name)
    path = weights.bundled_path(record)
    assert path is not None and path.is_file(), f"weights/{name}.pt is missing"
    assert path.stat().st_size == record.size
    assert sha256_file(path) == record.sha256
    model, side = load_exported(path, sha256=record.sha256)  # strict: every key and shape
    assert side["sha256"] == record.sha256 and side["arch"] == "cascadepsp-lite" and side["name"] == name
    assert sum(p.numel() for p in model.parameters()) == side["parameters"]
    with pytest.raises(WeightsError, match="checksum"):
        load_exported(path, sha256="0" * 64)


def test_everything_shipped_in_weights_stays_under_40_mb():
    folder = Path(weights.__file__).resolve().parents[1] / "weights"
    assert sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) < 40 << 20


def test_default_weights_are_the_bundled_lite_with_a_notice(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINE_HOME", str(tmp_path / "empty-cache"))
    rng = np.random.default_rng(5)
    write_png(tmp_path / "img.png", rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    mask = np.zeros((96, 128), np.uint8)
    mask[20:70, 30:90] = 255
    write_png(tmp_path / "m.png", mask)
    rep = refine_file(str(tmp_path / "img.png"), str(tmp_path / "m.png"), str(tmp_path / "o.png"),
                      config=RefineConfig(method="cascade"), report=str(tmp_path / "r.json"))
    notes = " ".join(rep.notes)
    assert "bundled cascadepsp-lite-v2" in notes and "refine weights fetch cascadepsp" in notes
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["refiner"]["weights"] == "cascadepsp-lite-v2"
    assert saved["refiner"]["size"] == 640 and saved["refiner"]["pad"] == "replicate"  # the lite defaults
    assert saved["refiner"]["weights_sha256"] == RECORD.sha256


@pytest.mark.skipif(not (SHARED_DATA / "photos").is_dir(), reason="needs ../shared/data")
def test_lite_improves_perturbed_composites(tmp_path):
    """Held-out composites (seed 777, never used in training) with CascadePSP-style perturbed coarse
    masks: the default cascade must gain clearly on the coarse mask (measured: see weights/README.md)."""
    from refine_cli.train.data import SampleSpec, make_sample

    torch.set_num_threads(1)
    spec = SampleSpec(size=(320, 320), seed=777)
    opts = EvalOptions()
    gains_iou, gains_mba = [], []
    for i, kind in enumerate(("shapes", "shapes", "portraits")):
        s = make_sample(i, spec, kind=kind, perturbation="cascadepsp")
        write_png(tmp_path / "img.png", s.image)
        write_png(tmp_path / "coarse.png", np.rint(s.coarse * 255).astype(np.uint8))
        out = tmp_path / f"o{i}.png"
        refine_file(str(tmp_path / "img.png"), str(tmp_path / "coarse.png"), str(out),
                    config=RefineConfig(method="cascade", cascade=CascadeOptions(size=320)))
        import cv2

        pred = cv2.imread(str(out), cv2.IMREAD_UNCHANGED) >= 128
        refined = evaluate_arrays(pred, s.hard, opts)
        coarse = evaluate_arrays(s.coarse >= 0.5, s.hard, opts)
        gains_iou.append(refined.iou - coarse.iou)
        gains_mba.append(refined.mba - coarse.mba)
    # v2 measured: IoU +0.094 / +0.038 / +0.136, mBA +0.273 / +0.106 / +0.190 (v1 passed > 0.01 / > 0.03)
    assert np.mean(gains_iou) > 0.04, gains_iou
    assert np.mean(gains_mba) > 0.10, gains_mba


def test_weights_commands_see_the_bundled_copies(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("REFINE_HOME", str(tmp_path / "empty-cache"))
    code, out, _ = cli("weights", "list", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    for name in ("cascadepsp-lite-v2", "cascadepsp-lite-v3", "cascadepsp-lite-v1"):
        assert rows[name]["local"] == "bundled" and not rows[name]["cached"]
    assert rows["cascadepsp"]["local"] is None
    code, _, err = cli("weights", "verify", "cascadepsp-lite-v2")
    assert code == 0 and RECORD.sha256 in "".join(err.split())
    code, out, _ = cli("weights", "path", "cascadepsp-lite-v2")
    assert Path(out.strip()) == weights.bundled_path(RECORD)
    code, _, err = cli("weights", "verify", "cascadepsp")
    assert code != 0 and "refine weights fetch cascadepsp" in err


@pytest.mark.skipif(not (SHARED_DATA / "photos").is_dir(), reason="needs ../shared/data")
def test_lite_does_not_grow_the_mask_along_the_padded_border():
    """At L = 300 the global input is padded to 304 at the bottom and right. With the official padding
    (mean colour, background) the lite weights read that strip as an edge and grow false foreground
    along it; their own ``replicate`` padding must leave those sides no worse than the top and left."""
    from refine_cli.refiners.cascade_method import load_cascade_model
    from refine_cli.refiners.cascadepsp import refine_exact
    from refine_cli.train.data import SampleSpec, make_sample

    torch.set_num_threads(1)
    model, _, _ = load_cascade_model(CascadeOptions(), "cpu")
    assert model.pad_mode == "replicate"
    spec = SampleSpec(size=(300, 300), seed=777)
    strip = 12
    padded_sides, other_sides = 0, 0
    for i in range(6):
        s = make_sample(i, spec, perturbation="cascadepsp")
        prob, _ = refine_exact(model, s.image, s.coarse, size=300)
        fp = (prob >= 0.5) & ~s.hard
        padded_sides += int(fp[-strip:].sum() + fp[:, -strip:].sum())
        other_sides += int(fp[:strip].sum() + fp[:, :strip].sum())
    # measured: replicate 0 px vs 30 px on the top/left strips; the official padding gave 1 978 px
    assert padded_sides <= other_sides + 100, (padded_sides, other_sides)
