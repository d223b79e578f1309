"""A killed or interrupted run continues with --resume and gives the same bytes as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import popen_interruptible, write_png
from refine_cli.devtools.synthetic import random_scene
from refine_cli.engine.checkpoint import parts_dir_for
from refine_cli.tiling.grid import Window

H, W = 6144, 640


@pytest.fixture(scope="module")
def tall(tmp_path_factory):
    d = tmp_path_factory.mktemp("tall")
    sc = random_scene((H, W), 24, seed=4, size=70)
    write_png(d / "img.png", sc.image(Window(0, 0, H, W)))
    cv2.imwrite(str(d / "coarse.png"), sc.coarse(4))
    return d


def cmd(d: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "refine_cli", "run", str(d / "img.png"), "--mask", str(d / "coarse.png"),
            "-o", str(out), "--uncertainty", str(out.with_suffix(".unc.tif")), "--tile-size", "256", "-q", *extra]


ENV = {**os.environ, "REFINE_SEGMENT_BYTES": str(W * 512)}  # 512-row segments: 12 of them


def interrupted_run(d: Path, out: Path, sig: int) -> subprocess.CompletedProcess:
    proc = popen_interruptible(cmd(d, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    seg = parts_dir_for(str(out)) / "mask" / "segment_000002.tif"
    t0 = time.time()
    while not seg.exists() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def reference(tall, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.tif"
    subprocess.run(cmd(tall, out), env=ENV, check=True, timeout=600)
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_resume_after_interruption_is_byte_identical(tall, reference, tmp_path, sig):
    out = tmp_path / "out.tif"
    first = interrupted_run(tall, out, sig)
    if sig == signal.SIGINT:
        assert first.returncode == 130
        assert "--resume" in first.stderr and "Traceback" not in first.stderr
    else:
        assert first.returncode == -signal.SIGKILL
    assert not out.exists() and not out.with_suffix(".unc.tif").exists()  # nothing under a final name
    parts = parts_dir_for(str(out))
    assert (parts / "mask" / "segment_000001.tif").exists()
    rep = tmp_path / "rep.json"
    second = subprocess.run(cmd(tall, out, "--resume", "--report", str(rep)), env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert json.loads(rep.read_text())["tiles"]["resumed_from_row"] >= 1024
    assert out.read_bytes() == reference.read_bytes()
    assert out.with_suffix(".unc.tif").read_bytes() == reference.with_suffix(".unc.tif").read_bytes()
    assert not parts.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_run_without_resume_starts_over_and_cleans_parts(tall, reference, tmp_path):
    out = tmp_path / "out.tif"
    interrupted_run(tall, out, signal.SIGKILL)
    rep = tmp_path / "rep.json"
    subprocess.run(cmd(tall, out, "--report", str(rep)), env=ENV, check=True, timeout=600)
    assert json.loads(rep.read_text())["tiles"]["resumed_from_row"] == 0
    assert out.read_bytes() == reference.read_bytes()
    assert not parts_dir_for(str(out)).exists()


def test_changed_config_does_not_resume(tall, tmp_path):
    out = tmp_path / "out.tif"
    interrupted_run(tall, out, signal.SIGKILL)
    rep = tmp_path / "rep.json"
    subprocess.run(cmd(tall, out, "--resume", "--radius", "3", "--report", str(rep)), env=ENV, check=True,
                   timeout=600)
    assert json.loads(rep.read_text())["tiles"]["resumed_from_row"] == 0
    assert np.array_equal(np.unique(cv2.imread(str(out), cv2.IMREAD_UNCHANGED)), [0, 255])


def test_png_uncertainty_beside_a_resumable_tiff_is_a_png(tmp_path, monkeypatch):
    """In a run whose TIFF mask is written resumably, a .png uncertainty map is still a PNG."""
    from refine_cli.api import refine_file
    from refine_cli.config import RefineConfig

    rng = np.random.default_rng(0)
    mask = np.zeros((1100, 300), np.uint8)
    mask[200:900, 50:250] = 255
    write_png(tmp_path / "img.png", rng.integers(0, 256, (1100, 300, 3), dtype=np.uint8))
    write_png(tmp_path / "m.png", mask)
    monkeypatch.setenv("REFINE_SEGMENT_BYTES", str(512 * 300))  # 512-row segments: the run is checkpointed
    refine_file(str(tmp_path / "img.png"), str(tmp_path / "m.png"), str(tmp_path / "o.tif"),
                uncertainty=str(tmp_path / "u.png"), config=RefineConfig(method="coarse"))
    assert (tmp_path / "u.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cv2.imread(str(tmp_path / "u.png"), cv2.IMREAD_UNCHANGED).shape == (1100, 300)
