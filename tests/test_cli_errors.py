"""Every bad input gives one red line, the right exit code, and never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tifffile

from conftest import write_png

rng = np.random.default_rng(3)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    img = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    write_png(d / "img.png", img)
    mask = np.zeros((96, 128), np.uint8)
    mask[20:70, 30:90] = 255
    write_png(d / "mask.png", mask)
    write_png(d / "mask_small.png", cv2.resize(mask, (32, 24), interpolation=cv2.INTER_AREA))
    write_png(d / "mask_aspect.png", np.zeros((50, 50), np.uint8))
    write_png(d / "mask_big.png", np.zeros((192, 256), np.uint8))
    tifffile.imwrite(d / "tiled.tif", img, tile=(32, 32), compression="zlib", photometric="rgb")
    data = (d / "tiled.tif").read_bytes()
    (d / "truncated.tif").write_bytes(data[: len(data) // 2])
    with tifffile.TiffFile(d / "tiled.tif") as tf:
        off = int(tf.pages[0].dataoffsets[5]) + 10
    flipped = bytearray(data)
    for k in range(off, off + 40):
        flipped[k] ^= 0xFF
    (d / "flipped.tif").write_bytes(bytes(flipped))
    (d / "empty.tif").write_bytes(b"")
    (d / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    (d / "notimage.tif").write_bytes(b"II*\x00" + b"\xff" * 60)
    (d / "text.jpg").write_bytes(b"hello, this is not a jpeg")
    (d / "subdir").mkdir()
    np.save(d / "nan.npy", 0)
    tifffile.imwrite(d / "nan_mask.tif", np.full((96, 128), np.nan, np.float32))
    tifffile.imwrite(d / "big_float_mask.tif", np.full((96, 128), 7.0, np.float32))
    (d / "exists.tif").write_bytes(b"x")
    return d


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    return lines[0]


CASES = [
    # (args (with {d} for the folder), exit code, text the message must contain)
    (["run", "{d}/missing.png", "--mask", "{d}/mask.png"], 2, "not found"),
    (["run", "{d}/subdir", "--mask", "{d}/mask.png"], 2, "directory"),
    (["run", "{d}/empty.tif", "--mask", "{d}/mask.png"], 2, "empty"),
    (["run", "{d}/truncated.tif", "--mask", "{d}/mask.png", "-o", "{t}/o.tif"], 2, "truncated"),
    (["run", "{d}/flipped.tif", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--no-skip"], 2, "corrupt"),
    (["run", "{d}/garbage.png", "--mask", "{d}/mask.png"], 2, "PNG"),
    (["run", "{d}/notimage.tif", "--mask", "{d}/mask.png"], 2, "TIFF"),
    (["run", "{d}/text.jpg", "--mask", "{d}/mask.png"], 2, "not a recognised image"),
    (["run", "{d}/img.png", "--mask", "{d}/missing.png"], 2, "--mask"),
    (["run", "{d}/img.png", "--mask", "{d}/mask_aspect.png", "-o", "{t}/o.tif"], 2, "aspect ratio"),
    (["run", "{d}/img.png", "--mask", "{d}/mask_big.png", "-o", "{t}/o.tif"], 2, "larger"),
    (["run", "{d}/img.png", "--mask", "{d}/nan_mask.tif", "-o", "{t}/o.tif"], 2, "NaN"),
    (["run", "{d}/img.png", "--mask", "{d}/big_float_mask.tif", "-o", "{t}/o.tif"], 2, "[0, 1]"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "--method", "magic", "-o", "{t}/o.tif"], 2, "unknown --method"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{d}/exists.tif"], 2, "--overwrite"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.jpg"], 2, ".tif"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/nodir/o.tif"], 2, "does not exist"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--max-memory", "lots"], 2, "size"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--max-memory", "100M"], 2, "256M"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--device", "tpu"], 2, "--device"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--device", "cuda:0"], 2, "cuda"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--threshold", "1.5"], 2, "threshold"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--tile-size", "16"], 2, "tile"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--max-pixels", "1000"], 2, "bomb"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.png", "--inline-limit", "100"], 2, ".tif"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "-", "--json"], 2, "stdout"),
    (["run", "{d}/img.png", "-o", "{t}/o.tif"], 2, "--mask"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "--classes", "1", "-o", "{t}/o.tif"], 2, "--classes"),
    (["info", "{d}/missing.tif"], 2, "not found"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "--bands", "1,2", "-o", "{t}/o.tif"], 2, "--bands"),
]


@pytest.mark.parametrize(("args", "code", "text"), CASES, ids=[" ".join(c[0][:1] + [c[2]]) for c in CASES])
def test_bad_input_gives_one_line_and_exit_code(files, tmp_path, cli, args, code, text):
    argv = [a.format(d=files, t=tmp_path) for a in args]
    if sys.platform.startswith("linux") and "cuda" in argv:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
    got, out, err = cli(*argv)
    line = one_line_error(err)
    assert got == code, err
    assert text.lower() in line.lower(), line
    assert out == ""
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".refine-tmp")]
    assert leftovers == []


def test_unreadable_file(files, tmp_path, cli, monkeypatch):
    p = tmp_path / "locked.png"
    p.write_bytes((files / "img.png").read_bytes())
    p.chmod(0)
    real_access = os.access
    # root reads anything, so stand in for an ordinary user's permission check
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(p) else real_access(path, mode))
    code, _, err = cli("run", p, "--mask", files / "mask.png")
    assert code == 2 and "permission" in one_line_error(err)


def test_ok_run_and_lowres_mask(files, tmp_path, cli):
    code, _, err = cli("run", files / "img.png", "--mask", files / "mask_small.png", "-o", tmp_path / "o.tif",
                       "-q")
    assert code == 0, err
    assert tifffile.imread(tmp_path / "o.tif").shape == (96, 128)
    code, _, err = cli("run", files / "img.png", "--mask", files / "mask_small.png", "-o", tmp_path / "o.tif",
                       "-q")
    assert code == 2 and "--overwrite" in one_line_error(err)


def test_real_process_has_no_traceback(files, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "refine_cli", "run", str(files / "truncated.tif"), "--mask",
                           str(files / "mask.png"), "-o", str(tmp_path / "o.tif")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    one_line_error(proc.stderr)
    assert proc.stdout == ""


def test_version_and_help(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("refine ")
    code, out, _ = cli("run", "--help")
    assert code == 0 and "--mask" in out


def test_info(files, cli):
    import json

    code, out, err = cli("info", files / "tiled.tif", "--json")
    assert code == 0, err
    facts = json.loads(out)
    assert facts["width"] == 128 and facts["height"] == 96 and facts["tiled"] is True
    assert facts["chunks"] == [32, 32]


def test_unknown_option_is_a_usage_error(cli):
    code, out, err = cli("run", "x.png", "--bogus")
    assert code == 2 and "--bogus" in one_line_error(err)


def test_error_text_keeps_square_brackets(files, tmp_path, cli, monkeypatch):
    from refine_cli import api
    from refine_cli.errors import DependencyError

    def boom(*a, **k):
        raise DependencyError('needs an extra: pip install "refine-cli[distributed]"')

    monkeypatch.setattr(api, "refine_file", boom)
    code, _, err = cli("run", files / "img.png", "--mask", files / "mask.png", "-o", tmp_path / "o.tif")
    assert code == 2 and 'refine-cli[distributed]' in one_line_error(err)


def test_ctrl_c_exits_130_with_a_message(files, tmp_path, cli, monkeypatch):
    from refine_cli import api

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "refine_file", interrupted)
    code, _, err = cli("run", files / "img.png", "--mask", files / "mask.png", "-o", tmp_path / "o.tif")
    assert code == 130 and "interrupted" in one_line_error(err)
