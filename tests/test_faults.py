"""Faults cost nothing but time: full disk, a failing read, killed renames, leftovers of killed runs."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from refine_cli.api import refine_file
from refine_cli.config import RefineConfig
from refine_cli.devtools.synthetic import random_scene
from refine_cli.engine.checkpoint import parts_dir_for
from refine_cli.errors import OutputError, OutputExistsError, ReadError
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

    def init(self, path, *a, **k):
        real_init(self, path, *a, **k)
        if Path(path).name.startswith("segment_"):  # the output's segments, not the engine's level files
            self._ds = FullDisk(self._ds)

    monkeypatch.setattr(writers.TiffSink, "__init__", init)
    with pytest.raises(OutputError, match="No space left on device.*free disk space") as err:
        run(tall, out)
    assert not out.exists() and no_temps(tmp_path)
    parts = parts_dir_for(str(out))
    assert (parts / "mask" / "segment_000000.tif").exists()
    # the message says where the finished rows are, how much they hold, and what to do with them
    msg = str(err.value)
    size = readers.human_bytes(writers.dir_bytes(parts))
    assert msg.startswith(f"disk full writing {out} ") and "\n" not in msg
    assert f"{size} of finished rows are kept in {parts}" in msg and "--resume" in msg
    assert f"or delete {parts}" in msg
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


# ---------------------------------------------------------------------------
# A real full disk: libtiff's own lines, and the parts left behind (issue 14, point 11)
# ---------------------------------------------------------------------------

FULL_DISK_RUN = """
import os, sys
import refine_cli.io.writers as w
real = w.temp_path_for
def on_full_disk(path):
    tmp = real(path)
    if sys.argv[1] in path:  # this file's temporary is /dev/full: every write fails with ENOSPC
        os.symlink("/dev/full", tmp)
    return tmp
w.temp_path_for = on_full_disk
from refine_cli.cli import main
main(sys.argv[2:])
"""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("fails", ["segment_000002", "out.unc.tif"], ids=["segment", "assembly"])
def test_real_enospc_is_one_line_and_keeps_the_parts(tall, tmp_path, fails):
    """GDAL writes through libtiff, which prints `_tiffWriteProc: No space left on device.` on fd 2 by itself.

    Writing to /dev/full gives a genuine ENOSPC without filling a disk: while a segment is written, or
    while the finished segments are assembled into the uncertainty map (then the mask, already
    prepared, must not appear either).
    """
    script = tmp_path / "full_disk_run.py"
    script.write_text(FULL_DISK_RUN)
    out = tmp_path / "out.tif"
    args = [sys.executable, str(script), fails, "run", str(tall / "img.tif"), "--mask",
            str(tall / "coarse.png"), "-o", str(out), "--uncertainty", str(tmp_path / "out.unc.tif"),
            "--tile-size", "256"]
    env = {**os.environ, "REFINE_SEGMENT_BYTES": str(W * 512)}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: disk full writing "), proc.stderr
    parts = parts_dir_for(str(out))
    assert f"kept in {parts}" in lines[0] and "--resume" in lines[0]
    assert "_tiffWriteProc" not in proc.stderr and "_tiffSeekProc" not in proc.stderr
    assert (parts / "mask" / "segment_000000.tif").exists()
    assert not out.exists() and not (tmp_path / "out.unc.tif").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p != parts] == []
    # with -v the libtiff lines are there, as log records
    proc = subprocess.run(args + ["-v", "--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1 and "No space left on device" in proc.stderr.split("error:")[0], proc.stderr


def test_png_failing_beside_a_resumable_tiff_says_the_parts_are_kept(tmp_path, monkeypatch):
    """A segmented TIFF and a PNG as one unit: the PNG fails, the TIFF goes, the parts stay (it says so)."""
    from refine_cli.engine.outputs import OutputSpec, OutputWriter

    out, unc = tmp_path / "out.tif", tmp_path / "unc.png"
    parts = parts_dir_for(str(out))
    mask_sink = writers.SegmentedSink(str(out), (1024, 64), 1, np.uint8, False, parts_dir=str(parts / "mask"),
                                      segment_rows=512)
    unc_sink = writers.PngSink(str(unc), (1024, 64), 1, np.uint8, False)
    writer = OutputWriter(OutputSpec(mask=str(out), uncertainty=str(unc)), False, mask_sink, unc_sink)
    writer.write(0, np.random.default_rng(0).random((1024, 64, 1), dtype=np.float32))

    def full(self, final, data, sidecar):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writers.PngSink, "_stage", full)
    with pytest.raises(OutputError) as err:
        writer.commit()
    msg = str(err.value)
    assert msg.startswith(f"disk full writing {unc} ") and f"kept in {parts}" in msg and "--resume" in msg
    assert not out.exists() and not unc.exists() and no_temps(tmp_path)
    assert (parts / "mask" / "segment_000001.tif").exists()


def small_scene(d: Path) -> None:
    img = np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    tifffile.imwrite(d / "img.tif", img, tile=(64, 64), photometric="rgb")
    mask = np.zeros((96, 128), np.uint8)
    mask[20:70, 30:90] = 255
    cv2.imwrite(str(d / "mask.png"), mask)


@pytest.mark.parametrize(("mask_name", "unc_name"), [("out.png", "unc.png"), ("out.tif", "unc.png"),
                                                     ("out.png", "unc.tif")])
def test_outputs_are_one_unit_when_the_second_fails(tmp_path, monkeypatch, mask_name, unc_name):
    """A failing uncertainty map leaves no mask behind: a plain rerun then works (no "exists")."""
    small_scene(tmp_path)
    out, unc = tmp_path / mask_name, tmp_path / unc_name
    real_stage, real_prepare = writers.PngSink._stage, writers.TiffSink.prepare

    def full_png(self, final, data, sidecar):
        if final == str(unc):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_stage(self, final, data, sidecar)

    def full_tiff(self):
        if self.path == str(unc):
            raise OutputError(f"writing {unc} failed (No space left on device); check free disk space")
        return real_prepare(self)

    monkeypatch.setattr(writers.PngSink, "_stage", full_png)
    monkeypatch.setattr(writers.TiffSink, "prepare", full_tiff)
    kw = dict(config=RefineConfig(tile_size=256), uncertainty=str(unc))
    with pytest.raises(OutputError, match="No space left on device"):
        refine_file(str(tmp_path / "img.tif"), str(tmp_path / "mask.png"), str(out), **kw)
    assert not out.exists() and not unc.exists() and no_temps(tmp_path)
    monkeypatch.setattr(writers.PngSink, "_stage", real_stage)
    monkeypatch.setattr(writers.TiffSink, "prepare", real_prepare)
    refine_file(str(tmp_path / "img.tif"), str(tmp_path / "mask.png"), str(out), **kw)  # no --overwrite
    assert out.exists() and unc.exists() and no_temps(tmp_path)


def test_a_report_that_cannot_be_written_takes_back_the_outputs(tmp_path, monkeypatch):
    """The report is part of the unit: when it fails (disk full), the published mask and uncertainty
    map are removed again, and a plain rerun works (no "exists")."""
    from refine_cli import api

    small_scene(tmp_path)
    out, unc, rep = tmp_path / "out.tif", tmp_path / "unc.png", tmp_path / "run.json"
    real = api.write_bytes_atomic

    def full(path, data, overwrite=True):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(api, "write_bytes_atomic", full)
    kw = dict(config=RefineConfig(tile_size=256), uncertainty=str(unc), report=str(rep))
    with pytest.raises(OSError, match="No space left"):
        refine_file(str(tmp_path / "img.tif"), str(tmp_path / "mask.png"), str(out), **kw)
    assert not out.exists() and not unc.exists() and not rep.exists() and no_temps(tmp_path)
    monkeypatch.setattr(api, "write_bytes_atomic", real)
    refine_file(str(tmp_path / "img.tif"), str(tmp_path / "mask.png"), str(out), **kw)
    assert out.exists() and unc.exists() and rep.exists()


def test_a_failed_rename_takes_back_the_renamed_outputs(tmp_path, monkeypatch):
    """The second rename of the unit fails: the first output, already in place, is removed again."""
    small_scene(tmp_path)
    out, unc = tmp_path / "out.tif", tmp_path / "unc.png"
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        if Path(dst) not in (out, unc):  # the engine's own level files
            return real_replace(src, dst)
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(writers.os, "replace", replace)
    with pytest.raises(OutputError, match="Input/output error"):
        refine_file(str(tmp_path / "img.tif"), str(tmp_path / "mask.png"), str(out),
                    config=RefineConfig(tile_size=256), uncertainty=str(unc))
    assert len(calls) == 2 and not out.exists() and not unc.exists() and no_temps(tmp_path)


def test_an_output_appearing_meanwhile_publishes_nothing(tmp_path, monkeypatch):
    """Both names are checked before the first rename: a file that appears meanwhile blocks the unit."""
    small_scene(tmp_path)
    out, unc = tmp_path / "out.png", tmp_path / "unc.png"
    real_prepare = writers.PngSink.prepare

    def prepare(self):
        real_prepare(self)
        if self.path == str(unc):
            unc.write_bytes(b"someone else's")

    monkeypatch.setattr(writers.PngSink, "prepare", prepare)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        refine_file(str(tmp_path / "img.tif"), str(tmp_path / "mask.png"), str(out),
                    config=RefineConfig(tile_size=256), uncertainty=str(unc))
    assert not out.exists() and unc.read_bytes() == b"someone else's" and no_temps(tmp_path)
