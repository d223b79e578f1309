"""``--config run.toml``: option defaults from a file, command-line options win, bad files refused."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import tifffile

from conftest import one_line_error, write_png


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    image = write_png(tmp_path / "img.png", rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    mask = np.zeros((96, 128), np.uint8)
    mask[20:70, 30:100] = 255
    return image, write_png(tmp_path / "mask.png", mask)


def _report(cli, *args):
    code, out, err = cli("run", *args, "--json", "-q")
    assert code == 0, err
    return json.loads(out)


def test_config_file_sets_defaults_and_the_command_line_wins(tmp_path, cli, pair):
    image, mask = pair
    cfg = tmp_path / "run.toml"
    cfg.write_text('method = "coarse"\nmax-memory = "1G"\ncascade_grid = "feather"\neps = 0.05\nsoft = true\n')
    rep = _report(cli, image, "--mask", mask, "-o", tmp_path / "a.tif", "--config", cfg)
    assert rep["method"] == "coarse" and rep["config"]["max_memory"] == 1024**3
    # the file's method and output kind: `coarse --soft` writes a full-size binary mask back as 0.0 / 1.0
    written = tifffile.imread(tmp_path / "a.tif")
    assert written.dtype == np.float32
    np.testing.assert_array_equal(written, cv2.imread(str(mask), cv2.IMREAD_UNCHANGED) / np.float32(255))
    assert rep["config"]["cascade"]["grid"] == "feather" and rep["config"]["guided"]["eps"] == 0.05
    rep = _report(cli, image, "--mask", mask, "-o", tmp_path / "b.tif", "--config", cfg, "--method", "guided",
                  "--max-memory", "2G")
    assert rep["method"] == "guided" and rep["config"]["max_memory"] == 2 * 1024**3
    assert rep["config"]["guided"]["eps"] == 0.05  # not given on the command line: the file's


@pytest.mark.parametrize(("text", "expected"), [
    ('metod = "coarse"\n', "unknown option 'metod'"),
    ('overlap = "wide"\n', "wrong type for --overlap"),
    ("method = \n", "not valid TOML"),
    ('cascade-grid = "diagonal"\n', "--cascade-grid 'diagonal': use official or feather"),
])
def test_bad_config_files_are_refused_with_one_line(tmp_path, cli, pair, text, expected):
    image, mask = pair
    cfg = tmp_path / "run.toml"
    cfg.write_text(text)
    code, out, err = cli("run", image, "--mask", mask, "-o", tmp_path / "o.tif", "--config", cfg)
    assert code == 2 and out == ""
    assert expected in one_line_error(err)
    assert not (tmp_path / "o.tif").exists()


def test_missing_config_file(tmp_path, cli, pair):
    image, mask = pair
    code, _, err = cli("run", image, "--mask", mask, "-o", tmp_path / "o.tif", "--config", tmp_path / "no.toml")
    assert code == 2 and "cannot read it" in one_line_error(err)


def test_default_threads_come_from_refine_threads_then_the_affinity(monkeypatch, cli, pair, tmp_path):
    """``--threads`` left out: ``$REFINE_THREADS`` when a positive integer, else the cores this process may
    use; the run reports what it used."""
    import os

    from refine_cli.api import default_threads

    monkeypatch.setenv("REFINE_THREADS", "3")
    assert default_threads() == 3
    for bad in ("0", "two", ""):
        monkeypatch.setenv("REFINE_THREADS", bad)
        assert default_threads() == len(os.sched_getaffinity(0))
    before = cv2.getNumThreads()
    try:
        monkeypatch.setenv("REFINE_THREADS", "1")
        run = (pair[0], "--mask", pair[1], "--method", "guided")
        assert _report(cli, *run, "-o", tmp_path / "a.png")["config"]["threads_used"] == 1
        assert _report(cli, *run, "-o", tmp_path / "b.png", "--threads", "2")["config"]["threads_used"] == 2
    finally:
        cv2.setNumThreads(before)
