"""Faults cost nothing but time: full disk, a failing read, killed renames, leftovers of killed runs."""

from __future__ import annotations

import errno
import os

import cv2
import pytest

from refine_cli.api import refine_file
from refine_cli.config import RefineConfig
from refine_cli.devtools.synthetic import random_scene
from refine_cli.engine.checkpoint import parts_dir_for
from refine_cli.errors import OutputError, ReadError
from refine_cli.io import readers, writers
from refine_cli.tiling.grid import Window

H, W = 3072, 512


@pytest.fixture(scope="module")
def tall(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    sc = random_scene((H, W), 12, seed=6, size=60)
    import tifffile

    tifffile.imwrite(d / "img.tif", sc.image(Window(0, 0, H, W)), tile=(256, 256), photometric="rgb")
    cv2.imwrite(str(d / "coarse.png"), sc.coarse(4))
    return d


@pytest.fixture
def segments(monkeypatch):
    monkeypatch.setenv("REFINE_SEGMENT_BYTES", str(W * 512))  # resumable 512-row segments


def run(d, out, **kw):
    return refine_file(str(d / "img.tif"), str(d / "coarse.png"), str(out), config=RefineConfig(tile_size=256),
                       uncertainty=str(out.with_suffix(".unc.tif")), **kw)


@pytest.fixture(scope="module")
def reference(tall, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.tif"
    os.environ["REFINE_SEGMENT_BYTES"] = str(W * 512)
    try:
        run(tall, out)
    finally:
        del os.environ["REFINE_SEGMENT_BYTES"]
    return out


def no_temps(folder):
    return [p.name for p in folder.rglob("*") if p.name.endswith(writers.TMP_SUFFIX)] == []


def test_disk_full_keeps_finished_rows_and_resume_is_identical(tall, reference, tmp_path, segments, monkeypatch):
    out = tmp_path / "out.tif"
    real_init = writers.TiffSink.__init__
    calls = {"n": 0}

    class FullDisk:
        """Stands in for the GDAL dataset: the 5th block write finds the disk full."""

        def __init__(self, ds):
            self._ds = ds

        def write(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == 5:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self._ds.write(*a, **k)

        def __getattr__(self, name):
            return getattr(self._ds, name)

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self._ds = FullDisk(self._ds)

    monkeypatch.setattr(writers.TiffSink, "__init__", init)
    with pytest.raises(OutputError, match="No space left on device.*free disk space"):
        run(tall, out)
    assert not out.exists() and no_temps(tmp_path)
    assert (parts_dir_for(str(out)) / "mask" / "segment_000000.tif").exists()
    monkeypatch.setattr(writers.TiffSink, "__init__", real_init)  # space freed
    rep = run(tall, out, resume=True)
    assert rep.tiles["resumed_from_row"] > 0
    assert out.read_bytes() == reference.read_bytes()
    assert out.with_suffix(".unc.tif").read_bytes() == reference.with_suffix(".unc.tif").read_bytes()
    assert not parts_dir_for(str(out)).exists() and no_temps(tmp_path)


def test_read_error_on_a_tile_then_resume(tall, reference, tmp_path, segments, monkeypatch):
    out = tmp_path / "out.tif"
    real = readers.TiffReader._read
    calls = {"n": 0}

    def failing(self, window, level):
        calls["n"] += 1
        if calls["n"] == 25:
            raise OSError(errno.EIO, "Input/output error")
        return real(self, window, level)

    monkeypatch.setattr(readers.TiffReader, "_read", failing)
    with pytest.raises(ReadError, match="Input/output error.*--resume"):
        run(tall, out)
    assert not out.exists() and no_temps(tmp_path)
    monkeypatch.setattr(readers.TiffReader, "_read", real)
    run(tall, out, resume=True)
    assert out.read_bytes() == reference.read_bytes()


def test_read_error_through_the_cli(tall, tmp_path, cli, monkeypatch):
    def failing(self, window, level):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(readers.TiffReader, "_read", failing)
    code, _, err = cli("run", tall / "img.tif", "--mask", tall / "coarse.png", "-o", tmp_path / "o.tif", "--no-skip")
    assert code == 1 and err.startswith("error:") and "Input/output error" in err and "Traceback" not in err


def test_leftovers_of_killed_runs_are_removed_but_live_ones_kept(tall, reference, tmp_path):
    out = tmp_path / "out.tif"
    dead = tmp_path / f".out.tif.{2**22 + 12345}.deadbeef{writers.TMP_SUFFIX}"  # pid above pid_max
    live = tmp_path / f".out.tif.{os.getppid()}.cafecafe{writers.TMP_SUFFIX}"
    other = tmp_path / f".other.tif.{2**22 + 12345}.deadbeef{writers.TMP_SUFFIX}"
    # a complete temporary file as a kill between fsync and rename leaves it
    dead.write_bytes(reference.read_bytes())
    live.write_bytes(b"x")
    other.write_bytes(b"x")
    run(tall, out)
    assert not dead.exists() and live.exists() and other.exists()
    assert out.read_bytes() == reference.read_bytes()


def test_killed_before_rename_never_leaves_a_final_name(tall, tmp_path, monkeypatch):
    out = tmp_path / "out.tif"

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies right before the rename

    monkeypatch.setattr(writers.os, "replace", killed)
    from refine_cli.errors import Interrupted

    with pytest.raises(Interrupted):
        run(tall, out)
    assert not out.exists() and not out.with_suffix(".unc.tif").exists()
    assert no_temps(tmp_path)
