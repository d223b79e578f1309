"""Every bad input gives one red line, the right exit code, and never a traceback."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from conftest import one_line_error, write_png

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
    # truncated at 10/50/90 % (the IFD comes first, so every cut falls inside the tile data)
    for pct in (10, 50, 90):
        (d / f"truncated{pct}.tif").write_bytes(data[: len(data) * pct // 100])
    (d / "header_only.tif").write_bytes(data[:64])
    png, jpg = (d / "img.png").read_bytes(), cv2.imencode(".jpg", img)[1].tobytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    # a TIFF declaring 10^6 x 10^6 pixels: a 4 x 4 file with its size tags patched (its strip tags
    # then disagree with the size, and tifffile logs that while parsing it)
    tifffile.imwrite(d / "giant.tif", np.zeros((4, 4), np.uint8), metadata=None)
    giant = bytearray((d / "giant.tif").read_bytes())
    with tifffile.TiffFile(d / "giant.tif") as tf:
        offsets = [tf.pages[0].tags[t].valueoffset for t in ("ImageWidth", "ImageLength")]
    for off in offsets:
        struct.pack_into("<I", giant, off, 1_000_000)
    (d / "giant.tif").write_bytes(bytes(giant))
    # a PNG whose IHDR declares 40000 x 30000 (> 2^30) pixels, with one row of image data
    (d / "huge.png").write_bytes(make_png(40000, 30000, 0, b"\x00" * 41))
    # a stripped TIFF: one strip of the whole image
    tifffile.imwrite(d / "stripped.tif", img, rowsperstrip=96, photometric="rgb", metadata=None)
    # masks that must work, all showing the same foreground as mask.png
    fg = mask > 0
    write_png(d / "mask16.png", fg.astype(np.uint16) * 65535)
    tifffile.imwrite(d / "mask_prob.tif", cv2.GaussianBlur(fg.astype(np.float32), (9, 9), 3))
    voc = bytes([0, 0, 0, 128, 0, 0, 0, 128, 0])  # black, dark red, green, as in Pascal VOC
    (d / "mask_palette.png").write_bytes(make_png(128, 96, 3, png_rows(fg.astype(np.uint8)), plte=voc))
    labels = fg.astype(np.uint8)
    labels[20:70, 60:90] = 2
    (d / "mask_palette3.png").write_bytes(make_png(128, 96, 3, png_rows(labels), plte=voc))
    write_png(d / "mask_rgba.png", np.dstack([mask, mask, mask, np.full_like(mask, 255)])[..., [2, 1, 0, 3]])
    write_png(d / "mask_alpha.png", np.dstack([np.zeros((96, 128, 3), np.uint8), mask]))
    write_png(d / "mask_rgb.png", np.dstack([mask, mask, mask]))
    write_png(d / "mask_noise.png", rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    (d / "maskdir").mkdir()
    (d / "img_link.png").symlink_to(d / "img.png")
    os.link(d / "mask.png", d / "mask_hardlink.png")
    return d


def make_png(width: int, height: int, color_type: int, raw: bytes, plte: bytes | None = None) -> bytes:
    """An 8-bit PNG built chunk by chunk (correct CRCs); ``raw`` is the filtered scanlines."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + (chunk(b"PLTE", plte) if plte else b"")
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def png_rows(a: np.ndarray) -> bytes:
    """Scanlines of a uint8 ``(h, w)`` array with filter type 0."""
    return b"".join(b"\x00" + row.tobytes() for row in a)


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
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "--method", "cascade", "--cascade-snap", "yes", "-o",
      "{t}/o.tif"], 2, "'--cascade-snap': 'yes' is not one of 'auto', 'on', 'off'"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{d}/exists.tif"], 2, "--overwrite"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.jpg"], 2, ".tif"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/nodir/o.tif"], 2, "does not exist"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--max-memory", "lots"], 2, "size"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--max-memory", "100M"], 2,
     "512M or more"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--device", "tpu"], 2, "--device"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--device", "cuda:0"], 2, "cuda"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--threshold", "1.5"], 2, "threshold"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--tile-size", "16"], 2, "tile"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--max-pixels", "1000"], 2, "bomb"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.png", "--inline-limit", "100"], 2, ".tif"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "-", "--json"], 2, "stdout"),
    (["run", "{d}/img.png", "-o", "{t}/o.tif"], 2, "--mask"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "--classes", "1", "-o", "{t}/o.tif"], 2, "--classes"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "--mask-kind", "probs", "-o", "{t}/o.tif"], 2,
     "'--mask-kind': 'probs' is not one of"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "--mask-kind", "soft", "--classes", "3", "-o",
      "{t}/o.tif"], 2, "--classes 3 declares a label map but --mask-kind soft"),
    (["run", "{d}/img.png", "--mask", "{d}/mask_prob.tif", "--mask-kind", "instances", "-o", "{t}/o.tif"], 2,
     "--mask-kind instances needs an integer mask"),
    (["info", "{d}/missing.tif"], 2, "not found"),
    # outputs that are an input, or each other: refused before anything is read, even with --overwrite
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{d}/img.png", "--overwrite"], 2, "-o"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{d}/mask.png", "--overwrite"], 2,
     "is the --mask"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{d}/img_link.png", "--overwrite"], 2,
     "is the image"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{d}/mask_hardlink.png", "--overwrite"], 2,
     "is the --mask"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{d}/../{dn}/img.png", "--overwrite"], 2,
     "is the image"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.png", "--uncertainty", "{t}/./o.png"], 2,
     "same file"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--report", "{t}/o.tif"], 2,
     "same file"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--report", "{d}/mask.png",
      "--overwrite"], 2, "--report"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--uncertainty", "{d}/img_link.png",
      "--overwrite"], 2, "--uncertainty"),
    (["run", "{d}/img.png", "--method", "magnet-fast", "--magnet-snap", "yes", "-o", "{t}/o.tif"], 2,
     "'--magnet-snap': 'yes' is not one of"),
    (["run", "{d}/img.png", "--method", "magnet-fast", "--magnet-stages", "some", "-o", "{t}/o.tif"], 2,
     "'--magnet-stages': 'some' is not one of"),
    # a segmenter in the same run
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "--save-coarse", "{t}/c.png", "-o", "{t}/o.tif"], 2,
     "without --mask"),
    (["run", "{d}/img.png", "--segmenter", "nonsense", "-o", "{t}/o.tif"], 2, "unknown --segmenter"),
    (["run", "{d}/img.png", "--segmenter", "{d}/missing.onnx", "-o", "{t}/o.tif"], 2, "missing.onnx"),
    (["run", "{d}/img.png", "--segmenter", "mediapipe-selfie", "--save-coarse", "{d}/img.png", "-o",
      "{t}/o.tif", "--overwrite"], 2, "--save-coarse"),
    # positional arguments are named as such
    (["eval", "{d}/missing.png", "{d}/mask.png"], 2, "given as PRED"),
    (["eval", "{d}/mask.png", "{d}/missing.png"], 2, "given as GT"),
    (["overlay", "{d}/img.png", "{d}/missing.png", "-o", "{t}/v.png"], 2, "given as MASK"),
    (["overlay", "{d}/missing.png", "{d}/mask.png", "-o", "{t}/v.png"], 2, "given as IMAGE"),
    (["overlay", "{d}/img.png", "{d}/mask.png", "--compare", "{d}/missing.png", "-o", "{t}/v.png"], 2,
     "given as --compare"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "--bands", "1,2", "-o", "{t}/o.tif"], 2, "--bands"),
    (["run", "{d}/truncated10.tif", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--no-skip"], 2, "truncated"),
    (["run", "{d}/truncated50.tif", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--no-skip"], 2, "truncated"),
    (["run", "{d}/truncated90.tif", "--mask", "{d}/mask.png", "-o", "{t}/o.tif", "--no-skip"], 2, "truncated"),
    (["run", "{d}/header_only.tif", "--mask", "{d}/mask.png", "-o", "{t}/o.tif"], 2, "corrupt or truncated"),
    (["run", "{d}/truncated.png", "--mask", "{d}/mask.png", "-o", "{t}/o.tif"], 2, "corrupt or truncated"),
    (["run", "{d}/truncated.jpg", "--mask", "{d}/mask.png", "-o", "{t}/o.tif"], 2, "corrupt or truncated"),
    (["run", "{d}/giant.tif", "--mask", "{d}/mask.png", "-o", "{t}/o.tif"], 2, "raise --max-pixels"),
    (["run", "{d}/huge.png", "--mask", "{d}/mask.png", "-o", "{t}/o.tif"], 2, "huge.png: cannot decode PNG"),
    (["run", "{d}/img.png", "--mask", "{d}/mask_noise.png", "-o", "{t}/o.tif"], 2, "single-band mask"),
    (["run", "{d}/img.png", "--mask", "{d}/maskdir", "-o", "{t}/o.tif"], 2, "--mask-dir"),
    (["run", "{d}/img.png", "--mask", "{d}/mask.png", "-o", "{d}/maskdir"], 2, "is a directory"),
    (["run", "{d}/img.png", "--mask", "{d}/truncated.png", "-o", "{t}/o.tif"], 2, "corrupt or truncated"),
]


@pytest.mark.parametrize(("args", "code", "text"), CASES, ids=[" ".join(c[0][:1] + [c[2]]) for c in CASES])
def test_bad_input_gives_one_line_and_exit_code(files, tmp_path, cli, args, code, text):
    argv = [a.format(d=files, t=tmp_path, dn=files.name) for a in args]
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


def locked_copy(src: Path, dst: Path, monkeypatch) -> Path:
    """``dst``: a copy of ``src`` with no permissions, unreadable even though the tests may run as root."""
    dst.write_bytes(src.read_bytes())
    dst.chmod(0)
    real_access = os.access
    # root reads anything, so stand in for an ordinary user's permission check
    monkeypatch.setattr(os, "access",
                        lambda path, mode: False if str(path) == str(dst) else real_access(path, mode))
    return dst


def test_unreadable_file(files, tmp_path, cli, monkeypatch):
    p = locked_copy(files / "img.png", tmp_path / "locked.png", monkeypatch)
    code, _, err = cli("run", p, "--mask", files / "mask.png")
    assert code == 2 and "permission" in one_line_error(err)


def test_unreadable_mask(files, tmp_path, cli, monkeypatch):
    p = locked_copy(files / "mask.png", tmp_path / "locked_mask.png", monkeypatch)
    code, out, err = cli("run", files / "img.png", "--mask", p, "-o", tmp_path / "o.tif")
    line = one_line_error(err)
    assert code == 2 and "permission" in line and line.startswith(f"error: mask {p}"), line
    assert out == "" and not (tmp_path / "o.tif").exists()


def test_mask_from_empty_stdin(files, tmp_path, cli, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    code, out, err = cli("run", files / "img.png", "--mask", "-", "-o", tmp_path / "o.tif")
    assert code == 2 and "no mask data on stdin" in one_line_error(err)
    assert out == "" and list(tmp_path.iterdir()) == []


def refined(cli, image: Path, mask: Path, outdir: Path, *extra: str) -> np.ndarray:
    """Run ``refine run`` successfully and return the refined mask."""
    out = outdir / f"{image.stem}-{mask.stem}.tif"
    code, stdout, err = cli("run", image, "--mask", mask, "-o", out, "-q", *extra)
    assert code == 0, err
    assert "Traceback" not in err and stdout == ""
    return tifffile.imread(out)


@pytest.mark.parametrize("mask", ["mask16.png", "mask_palette.png", "mask_rgba.png", "mask_alpha.png",
                                  "mask_rgb.png"])
def test_binary_masks_in_other_encodings_refine_like_the_grey_one(files, tmp_path, cli, mask):
    """16-bit 0/65535, palette indices 0/1, RGBA, alpha-only and grey-as-RGB masks mean mask.png."""
    expected = refined(cli, files / "img.png", files / "mask.png", tmp_path)
    got = refined(cli, files / "img.png", files / mask, tmp_path)
    assert got.shape == (96, 128) and set(np.unique(got)) <= {0, 255}
    np.testing.assert_array_equal(got, expected)


def test_float_probability_mask(files, tmp_path, cli):
    got = refined(cli, files / "img.png", files / "mask_prob.tif", tmp_path) > 127
    fg = tifffile.imread(files / "mask_prob.tif") >= 0.5
    assert fg.any() and (got & fg).sum() / (got | fg).sum() > 0.9


def test_palette_mask_classes_are_its_indices(files, tmp_path, cli):
    """Index 1 (dark red) and 2 (green) stay classes 1 and 2, whatever the sort order of their colours."""
    got = refined(cli, files / "img.png", files / "mask_palette3.png", tmp_path)
    assert got[5, 5] == 0 and got[45, 40] == 1 and got[45, 80] == 2


def test_palette_png_image_reads_as_its_colours(files, tmp_path, cli):
    """A palette PNG image (here cached as a tiled TIFF) reads through its palette, like its RGB twin."""
    voc = np.array([[0, 0, 0], [128, 0, 0], [0, 128, 0]], np.uint8)
    indices = np.asarray(cv2.imread(str(files / "mask.png"), cv2.IMREAD_UNCHANGED) > 0, np.uint8)
    indices[::7] = 2
    (tmp_path / "pal.png").write_bytes(make_png(128, 96, 3, png_rows(indices), plte=voc.tobytes()))
    write_png(tmp_path / "rgb.png", voc[indices])
    got = refined(cli, tmp_path / "pal.png", files / "mask.png", tmp_path, "--inline-limit", "1000")
    np.testing.assert_array_equal(got, refined(cli, tmp_path / "rgb.png", files / "mask.png", tmp_path))


@pytest.mark.parametrize("chunk_limit", [None, 1024], ids=["streamed-strip", "decoded-once"])
def test_stripped_tiff_above_the_inline_limit(files, tmp_path, cli, monkeypatch, chunk_limit):
    """A stripped TIFF above --inline-limit refines like the same pixels as PNG.

    With a strip above the streaming limit it is decoded once and cached as a tiled TIFF.
    """
    from refine_cli.io import readers

    made = []
    if chunk_limit is not None:
        monkeypatch.setattr(readers, "MAX_STREAM_CHUNK_BYTES", chunk_limit)
        real = readers._inline_or_cache

        def spy(*a, **k):
            made.append(real(*a, **k))
            return made[-1]

        monkeypatch.setattr(readers, "_inline_or_cache", spy)
    got = refined(cli, files / "stripped.tif", files / "mask.png", tmp_path, "--inline-limit", "1000")
    np.testing.assert_array_equal(got, refined(cli, files / "img.png", files / "mask.png", tmp_path))
    if chunk_limit is not None:
        assert type(made[0]).__name__ == "TiffReader" and made[0].tiled  # the stripped image, cached tiled


def test_ok_run_and_lowres_mask(files, tmp_path, cli):
    code, _, err = cli("run", files / "img.png", "--mask", files / "mask_small.png", "-o", tmp_path / "o.tif",
                       "-q")
    assert code == 0, err
    assert tifffile.imread(tmp_path / "o.tif").shape == (96, 128)
    code, _, err = cli("run", files / "img.png", "--mask", files / "mask_small.png", "-o", tmp_path / "o.tif",
                       "-q")
    assert code == 2 and "--overwrite" in one_line_error(err)


@pytest.mark.parametrize("name", ["truncated.tif", "giant.tif", "huge.png", "truncated.jpg"])
def test_real_process_has_no_traceback(files, tmp_path, name):
    """Neither C decoders (libpng and libjpeg print on fd 2) nor library loggers (tifffile) add lines."""
    proc = subprocess.run([sys.executable, "-m", "refine_cli", "run", str(files / name), "--mask",
                           str(files / "mask.png"), "-o", str(tmp_path / "o.tif")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert name in one_line_error(proc.stderr)
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


def test_a_missing_package_names_what_to_install(files, cli, monkeypatch):
    """A broken install (a dependency not importable) is one line naming the package, not 'internal error'."""
    import sys

    monkeypatch.setitem(sys.modules, "zarr", None)  # `import zarr` now raises ModuleNotFoundError
    code, _, err = cli("info", files / "tiled.tif")
    line = one_line_error(err)
    assert code == 1 and "'zarr' is missing" in line and "pip install" in line and "internal" not in line


def test_the_memory_floor_is_real(files, tmp_path, cli):
    """The smallest --max-memory accepted is one a run fits in; below it: exit 2, one line."""
    from refine_cli.config import MIB, MIN_MAX_MEMORY

    floor = f"{MIN_MAX_MEMORY // MIB}M"
    code, _, err = cli("run", files / "img.png", "--mask", files / "mask.png", "-o", tmp_path / "o.tif",
                       "--max-memory", floor, "-q")
    assert code == 0, err
    code, _, err = cli("run", files / "img.png", "--mask", files / "mask.png", "-o", tmp_path / "d.tif", "-q")
    assert code == 0, err  # known answer: the same mask as at the default budget
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "o.tif"), tifffile.imread(tmp_path / "d.tif"))
    code, _, err = cli("run", files / "img.png", "--mask", files / "mask.png", "-o", tmp_path / "p.tif",
                       "--max-memory", f"{MIN_MAX_MEMORY // MIB - 1}M")
    assert code == 2 and f"{floor} or more" in one_line_error(err)


def test_report_has_timestamps_and_the_command_line(files, tmp_path, cli):
    import datetime as dt
    import json
    import shlex

    args = ["run", str(files / "img.png"), "--mask", str(files / "mask.png"), "-o", str(tmp_path / "o.tif"),
            "--report", str(tmp_path / "r.json"), "-q"]
    code, _, err = cli(*args)
    assert code == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    started = dt.datetime.strptime(rep["started"], "%Y-%m-%dT%H:%M:%SZ")
    finished = dt.datetime.strptime(rep["finished"], "%Y-%m-%dT%H:%M:%SZ")
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    assert started <= finished and abs((now - finished).total_seconds()) < 600
    assert shlex.split(rep["command"]) == ["refine", *args]
