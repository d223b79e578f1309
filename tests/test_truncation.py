"""A cut TIFF (image or mask, file or stdin) never refines as zeros: it reads correctly or fails in one line.

A truncated download or copy keeps the start of a file. tifffile drops the tags whose values lie past
the end ("invalid value offset") and GDAL may fill missing blocks with zeros; before the fix such a
file gave exit 0 and a wrong mask. The cut points cover the header, the IFD, the tag values (offset
tables, GeoTIFF keys) and the image data, for a tiled TIFF, a stripped TIFF, a BigTIFF and a GeoTIFF.
"""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import tifffile

from conftest import one_line_error, write_png
from refine_cli.errors import InputError
from refine_cli.io.readers import open_raster
from refine_cli.tiling.grid import Window

H, W = 160, 192
KINDS = ("tiled", "stripped", "bigtiff", "geotiff")
rng = np.random.default_rng(14)
IMAGE = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def make(kind: str, path) -> None:
    if kind == "tiled":
        tifffile.imwrite(path, IMAGE, tile=(64, 64), compression="zlib", photometric="rgb")
    elif kind == "stripped":
        tifffile.imwrite(path, IMAGE, rowsperstrip=16, compression="zlib", photometric="rgb")
    elif kind == "bigtiff":
        tifffile.imwrite(path, IMAGE, tile=(64, 64), compression="zlib", photometric="rgb", bigtiff=True)
    else:
        import rasterio
        from rasterio.transform import from_origin

        with rasterio.open(path, "w", driver="GTiff", width=W, height=H, count=3, dtype="uint8",
                           crs="EPSG:32633", transform=from_origin(500000, 4100000, 0.5, 0.5), tiled=True,
                           blockxsize=64, blockysize=64, compress="deflate") as ds:
            ds.write(np.moveaxis(IMAGE, -1, 0))


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuts")
    for kind in KINDS:
        make(kind, d / f"{kind}.tif")
    mask = np.zeros((H, W), np.uint8)
    mask[30:120, 40:150] = 255
    write_png(d / "mask.png", mask)
    tifffile.imwrite(d / "mask.tif", mask, tile=(64, 64), compression="zlib")
    return d


CUTS = list(range(50, 2001, 50)) + [-10, -50, -90, -1]
"""Every 50 bytes through the first 2 KB; negative: 10/50/90 % of the file, and all but the last byte."""


def resolve(cut: int, size: int) -> int:
    """Bytes kept for a cut point of :data:`CUTS` in a file of ``size`` bytes."""
    if cut >= 0:
        return cut
    return size - 1 if cut == -1 else size * -cut // 100


CASES = [(kind, cut) for kind in KINDS for cut in CUTS]


def reads_correctly(source) -> bool:
    """Opens and reads the original pixels (only possible when the cut lost no data), else InputError."""
    try:
        with open_raster(source, max_pixels=10**12, inline_limit=10**12) as r:
            return bool(np.array_equal(r.read(Window(0, 0, H, W)), IMAGE))
    except InputError as exc:
        assert "truncated" in str(exc) and "\n" not in str(exc), exc
        return False


@pytest.mark.parametrize(("kind", "cut"), CASES, ids=[f"{k}-{c}" for k, c in CASES])
def test_cut_tiff_image_fails_in_one_line_or_is_whole(originals, tmp_path, cli, kind, cut):
    data = (originals / f"{kind}.tif").read_bytes()
    n = resolve(cut, len(data))
    cut_file = tmp_path / f"cut-{kind}.tif"
    cut_file.write_bytes(data[:n])
    whole = reads_correctly(cut_file)
    code, out, err = cli("run", cut_file, "--mask", originals / "mask.png", "-o", tmp_path / "o.tif",
                         "--no-skip", "-q")
    if whole:  # the cut lost nothing the image needs: it refines like the original
        assert code == 0, err
        return
    line = one_line_error(err)
    assert code == 2, err
    assert "truncated" in line and str(cut_file) in line, line
    assert "copy or export it again" in line or "corrupt or truncated" in line, line
    assert out == "" and not (tmp_path / "o.tif").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".refine-tmp")] == []


@pytest.mark.parametrize("cut", ["in-offsets", 300, 400, -10, -50, -90])
def test_cut_tiff_mask_fails_in_one_line(originals, tmp_path, cli, cut):
    data = (originals / "mask.tif").read_bytes()
    if cut == "in-offsets":  # inside the TileOffsets values: tifffile would drop the tag and read zeros
        with tifffile.TiffFile(originals / "mask.tif") as tf:
            cut = tf.pages[0].tags["TileOffsets"].valueoffset + 6
    cut_file = tmp_path / "cut-mask.tif"
    cut_file.write_bytes(data[: resolve(cut, len(data))])
    write_png(tmp_path / "img.png", IMAGE)
    code, out, err = cli("run", tmp_path / "img.png", "--mask", cut_file, "-o", tmp_path / "o.tif", "-q")
    line = one_line_error(err)
    assert code == 2 and "truncated" in line and str(cut_file) in line, line
    assert not (tmp_path / "o.tif").exists()


@pytest.mark.parametrize(("kind", "cut"), [(k, c) for k in KINDS for c in (300, 400, -50)])
def test_cut_tiff_on_stdin_fails_in_one_line(originals, tmp_path, cli, monkeypatch, kind, cut):
    data = (originals / f"{kind}.tif").read_bytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data[: resolve(cut, len(data))])))
    code, out, err = cli("run", "-", "--mask", originals / "mask.png", "-o", tmp_path / "o.tif", "-q")
    line = one_line_error(err)
    assert code == 2 and "stdin" in line and "truncated" in line, line
    assert not (tmp_path / "o.tif").exists()


@pytest.mark.parametrize("cut", [300, 1000, -50, -1])
def test_cut_stripped_tiff_decoded_once_fails_in_one_line(originals, tmp_path, cli, monkeypatch, cut):
    """The decode-once path (a TIFF in huge strips) is checked the same way."""
    from refine_cli.io import readers

    monkeypatch.setattr(readers, "MAX_STREAM_CHUNK_BYTES", 1000)
    data = (originals / "stripped.tif").read_bytes()
    cut_file = tmp_path / "cut.tif"
    cut_file.write_bytes(data[: resolve(cut, len(data))])
    code, out, err = cli("run", cut_file, "--mask", originals / "mask.png", "-o", tmp_path / "o.tif", "-q")
    line = one_line_error(err)
    assert code == 2 and "truncated" in line, line


@pytest.mark.parametrize("kind", KINDS)
def test_whole_files_still_read(originals, kind):
    assert reads_correctly(originals / f"{kind}.tif")
    assert reads_correctly((originals / f"{kind}.tif").read_bytes())


def test_geotiff_cut_in_its_geokeys_is_not_silently_ungeoreferenced(originals, tmp_path):
    """Cutting inside GeoKeyDirectory/GeoAsciiParams would make GDAL drop the CRS with only a warning."""
    data = (originals / "geotiff.tif").read_bytes()
    with tifffile.TiffFile(originals / "geotiff.tif") as tf:
        tag = tf.pages[0].tags[34735]  # GeoKeyDirectoryTag
        end = tag.valueoffset + tag.count * 2
    (tmp_path / "g.tif").write_bytes(data[: end - 2])
    with pytest.raises(InputError, match="GeoKeyDirectory"):
        open_raster(tmp_path / "g.tif", max_pixels=10**12, inline_limit=10**12)
