"""Readers: windowed reads equal whole reads, pyramids, formats, conversions, bomb guard."""

from __future__ import annotations

import os
import re

import cv2
import numpy as np
import pytest
import tifffile

from conftest import write_png
from refine_cli.errors import InputError, UsageError
from refine_cli.io.image import ImageSource, area_downscale, choose_level
from refine_cli.io.readers import ArrayReader, RasterioReader, TiffReader, open_raster, parse_bands
from refine_cli.io.sniff import sniff
from refine_cli.tiling.grid import Window

BIG = 10**12
rng = np.random.default_rng(0)
WINDOWS = [Window(0, 0, 1, 1), Window(0, 0, 130, 170), Window(37, 55, 64, 64), Window(100, 150, 80, 60),
           Window(179, 239, 1, 1), Window(63, 0, 2, 240)]


def rgb(h=180, w=240, dtype=np.uint8):
    if dtype == np.uint8:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return rng.integers(0, 4096, (h, w, 3)).astype(dtype)


def check_windows(reader, arr):
    for win in WINDOWS:
        got = reader.read(win)
        exp = arr[win.slices]
        if exp.ndim == 2:
            exp = exp[:, :, None]
        np.testing.assert_array_equal(got, exp)


@pytest.mark.parametrize("compression", [None, "zlib", "zstd", "lzw"])
def test_tiled_tiff_windows_equal_whole(tmp_path, compression):
    a = rgb()
    p = tmp_path / "t.tif"
    tifffile.imwrite(p, a, tile=(64, 64), compression=compression, photometric="rgb")
    with open_raster(p, max_pixels=BIG, inline_limit=BIG) as r:
        assert isinstance(r, TiffReader) and r.tiled
        assert r.shape == (180, 240) and r.bands == 3 and r.chunk_shape == (64, 64)
        check_windows(r, a)
        r.set_cache_bytes(0)  # no cache: same answers
        check_windows(r, a)


def test_planar_and_grey_and_16bit_tiffs(tmp_path):
    a = rgb()
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(a, -1, 0), tile=(64, 64), photometric="rgb",
                     planarconfig="separate")
    with open_raster(tmp_path / "planar.tif", max_pixels=BIG, inline_limit=BIG) as r:
        check_windows(r, a)
    g = rng.integers(0, 60000, (180, 240), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "g16.tif", g, tile=(64, 64))
    with open_raster(tmp_path / "g16.tif", max_pixels=BIG, inline_limit=BIG) as r:
        assert r.bands == 1 and r.dtype == np.uint16
        check_windows(r, g)
        src = ImageSource(r)
        out = src.read(Window(0, 0, 180, 240))
        assert out.dtype == np.uint8 and out.shape == (180, 240, 3)
        assert (out[..., 0] == out[..., 1]).all()  # grey expanded
        assert out.min() == 0 and out.max() == 255  # stretched


def test_pyramid_levels_from_subifds(tmp_path):
    a = rgb(256, 384)
    p = tmp_path / "pyr.tif"
    with tifffile.TiffWriter(p, bigtiff=True) as tw:
        tw.write(a, tile=(64, 64), subifds=2, photometric="rgb")
        tw.write(a[::2, ::2], tile=(64, 64), subfiletype=1, photometric="rgb")
        tw.write(a[::4, ::4], tile=(64, 64), subfiletype=1, photometric="rgb")
    with open_raster(p, max_pixels=BIG, inline_limit=BIG) as r:
        assert r.level_shapes == [(256, 384), (128, 192), (64, 96)]
        np.testing.assert_array_equal(r.read(Window(10, 20, 30, 40), level=1), a[::2, ::2][10:40, 20:60])
        assert choose_level(r.level_shapes, (100, 150)) == 1
        assert choose_level(r.level_shapes, (200, 150)) == 0


def test_stripped_tiffs_stream_or_decode_once(tmp_path):
    a = rgb()
    tifffile.imwrite(tmp_path / "strips.tif", a, rowsperstrip=16, photometric="rgb")
    with open_raster(tmp_path / "strips.tif", max_pixels=BIG, inline_limit=BIG) as r:
        assert isinstance(r, TiffReader) and not r.tiled
        check_windows(r, a)
    import refine_cli.io.readers as readers

    old = readers.MAX_STREAM_CHUNK_BYTES
    readers.MAX_STREAM_CHUNK_BYTES = 1000
    try:
        with open_raster(tmp_path / "strips.tif", max_pixels=BIG, inline_limit=BIG) as r:
            assert isinstance(r, ArrayReader)
            check_windows(r, a)
    finally:
        readers.MAX_STREAM_CHUNK_BYTES = old


@pytest.mark.parametrize("ext", ["png", "webp", "bmp"])
def test_lossless_in_memory_formats(tmp_path, ext):
    a = rgb()
    p = tmp_path / f"a.{ext}"
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == "webp" else []
    assert cv2.imwrite(str(p), a[..., ::-1], params)
    assert sniff(p.read_bytes()[:65536]).size == (180, 240)
    with open_raster(p, max_pixels=BIG, inline_limit=BIG) as r:
        assert isinstance(r, ArrayReader)
        check_windows(r, a)  # RGB order, not OpenCV's BGR


def test_jpeg_size_and_rgba_png(tmp_path):
    a = rgb()
    assert cv2.imwrite(str(tmp_path / "a.jpg"), a[..., ::-1])
    assert sniff((tmp_path / "a.jpg").read_bytes()[:65536]).size == (180, 240)
    rgba = np.dstack([a, np.full((180, 240), 200, np.uint8)])
    cv2.imwrite(str(tmp_path / "rgba.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    with open_raster(tmp_path / "rgba.png", max_pixels=BIG, inline_limit=BIG) as r:
        src = ImageSource(r)
        np.testing.assert_array_equal(src.read(Window(0, 0, 180, 240)), a)  # alpha dropped


def test_large_png_is_cached_as_tiled_tiff_and_cleaned(tmp_path):
    a = rgb()
    write_png(tmp_path / "a.png", a)
    r = open_raster(tmp_path / "a.png", max_pixels=BIG, inline_limit=1000, tmp_dir=str(tmp_path))
    assert isinstance(r, TiffReader)
    cache_dir = r._cleanup_dir
    assert cache_dir and os.path.isdir(cache_dir)
    check_windows(r, a)
    r.close()
    assert not os.path.exists(cache_dir)


def test_float_images_are_stretched(tmp_path):
    f = np.linspace(0, 1, 180 * 240, dtype=np.float32).reshape(180, 240)
    tifffile.imwrite(tmp_path / "f.tif", f, tile=(64, 64))
    with open_raster(tmp_path / "f.tif", max_pixels=BIG, inline_limit=BIG) as r:
        out = ImageSource(r).read(Window(0, 0, 180, 240))
        np.testing.assert_array_equal(out[..., 0], np.round(f * 255).astype(np.uint8))


def test_bands_selection(tmp_path):
    a = rng.integers(0, 256, (60, 80, 5), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "ms.tif", a, tile=(32, 32), photometric="minisblack", planarconfig="contig")
    with open_raster(tmp_path / "ms.tif", max_pixels=BIG, inline_limit=BIG) as r:
        assert r.bands == 5
        np.testing.assert_array_equal(ImageSource(r, parse_bands("4,2,1")).read(Window(0, 0, 60, 80)),
                                      a[..., [3, 1, 0]])
        with pytest.raises(UsageError):
            ImageSource(r, parse_bands("6,1,1"))
    with pytest.raises(UsageError):
        parse_bands("1,2")


def test_geotiff_goes_through_rasterio_with_overviews(tmp_path):
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin

    a = rgb(256, 256)
    p = tmp_path / "geo.tif"
    with rasterio.open(p, "w", driver="GTiff", width=256, height=256, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000, 4100000, 0.5, 0.5), tiled=True, blockxsize=64,
                       blockysize=64) as ds:
        ds.write(np.moveaxis(a, -1, 0))
        ds.build_overviews([2, 4], Resampling.average)
    with open_raster(p, max_pixels=BIG, inline_limit=BIG) as r:
        assert isinstance(r, RasterioReader)
        assert r.georef is not None
        assert rasterio.crs.CRS.from_wkt(r.georef.crs_wkt) == rasterio.crs.CRS.from_epsg(32633)
        assert r.georef.transform == (0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0)
        assert r.level_shapes == [(256, 256), (128, 128), (64, 64)]
        check_windows(r, a)
        assert r.read(Window(0, 0, 64, 64), level=2).shape == (64, 64, 3)


def test_overview_is_torch_area():
    import torch

    a = rgb(301, 457).astype(np.float32)
    got = area_downscale(lambda w: a[w.slices], (301, 457), (97, 130), band_rows=40, band_cols=100)
    ref = torch.nn.functional.interpolate(torch.from_numpy(a).permute(2, 0, 1)[None], size=(97, 130),
                                          mode="area")[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, ref, atol=2e-4)


def test_uint8_overview_is_the_rounded_float_one():
    from refine_cli.io.image import area_downscale_bands_u8

    a = rgb(301, 457)
    got = np.concatenate([b for _, b in area_downscale_bands_u8(lambda w: a[w.slices], (301, 457), (97, 130),
                                                                band_rows=40, band_cols=100)])
    ref = area_downscale(lambda w: a[w.slices].astype(np.float32), (301, 457), (97, 130))
    assert got.dtype == np.uint8 and got.shape == (97, 130, 3)
    assert int(np.abs(got.astype(np.int16) - np.round(ref).astype(np.int16)).max()) == 0


def test_decompression_bomb_rejected_before_decoding(tmp_path):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10**6, 10**6, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(png)
    with pytest.raises(InputError, match="decompression-bomb"):
        open_raster(tmp_path / "bomb.png", max_pixels=50_000_000_000, inline_limit=BIG)


# ---------------------------------------------------------------------------
# Truncated and inconsistent TIFFs (issue 14, point 3)
# ---------------------------------------------------------------------------


def _tag_entry(path, code):
    """Byte offset of the IFD entry of tag ``code`` in page 0 (classic TIFF)."""
    with tifffile.TiffFile(path) as tf:
        return tf.pages[0].tags[code].offset


@pytest.mark.parametrize("kind", ["tiled", "strips", "planar"])
def test_offset_count_must_match_the_layout(tmp_path, kind):
    """A page listing fewer chunks than its size and tiling need is damaged, not an image with zero tiles."""
    import struct

    a = rgb()
    p = tmp_path / "t.tif"
    if kind == "tiled":
        tifffile.imwrite(p, a, tile=(64, 64), photometric="rgb")  # 3 x 4 = 12 tiles
        codes, need = (324, 325), "need 12"
    elif kind == "strips":
        tifffile.imwrite(p, a, rowsperstrip=16, photometric="rgb")  # ceil(180 / 16) = 12 strips
        codes, need = (273, 279), "need 12"
    else:
        tifffile.imwrite(p, np.moveaxis(a, -1, 0), tile=(64, 64), photometric="rgb", planarconfig="separate")
        codes, need = (324, 325), "need 36 (3 planes)"
    data = bytearray(p.read_bytes())
    for code in codes:
        struct.pack_into("<I", data, _tag_entry(p, code) + 4, 11 if kind != "planar" else 35)  # one fewer
    (tmp_path / "short.tif").write_bytes(bytes(data))
    pattern = rf"TIFF is truncated or damaged .*offsets; .*{re.escape(need)}.*copy or export"
    with pytest.raises(InputError, match=pattern):
        open_raster(tmp_path / "short.tif", max_pixels=BIG, inline_limit=BIG)


def test_missing_offset_tags_are_an_error(tmp_path):
    """Without TileOffsets tifffile finds no chunk at all and zarr would return zeros."""
    import struct

    p = tmp_path / "t.tif"
    tifffile.imwrite(p, rgb(), tile=(64, 64), photometric="rgb")
    data = bytearray(p.read_bytes())
    struct.pack_into("<H", data, _tag_entry(p, 324), 65000)  # TileOffsets becomes a private tag
    (tmp_path / "nooffsets.tif").write_bytes(bytes(data))
    with pytest.raises(InputError, match="no TileOffsets/TileByteCounts tags"):
        open_raster(tmp_path / "nooffsets.tif", max_pixels=BIG, inline_limit=BIG)
    with pytest.raises(InputError, match="truncated"):
        TiffReader(str(tmp_path / "nooffsets.tif"))


@pytest.mark.parametrize("cut", [300, 400])
def test_tiff_cut_in_its_offset_tables_is_truncated_not_zeros(tmp_path, cut):
    """The issue's example: the first 300/400 bytes of a tiled TIFF lose the offset tables."""
    p = tmp_path / "big.tif"
    tifffile.imwrite(p, rng.integers(0, 256, (512, 512, 3), dtype=np.uint8), tile=(256, 256),
                     compression="zlib", photometric="rgb")
    (tmp_path / "t.tif").write_bytes(p.read_bytes()[:cut])
    with pytest.raises(InputError, match="TIFF is truncated .*copy or export it again"):
        open_raster(tmp_path / "t.tif", max_pixels=BIG, inline_limit=BIG)
    # the same bytes as a mask and from stdin
    with pytest.raises(InputError, match="truncated"):
        open_raster(tmp_path / "t.tif", max_pixels=BIG, inline_limit=BIG, what="mask")
    with pytest.raises(InputError, match="stdin: TIFF is truncated"):
        open_raster(p.read_bytes()[:cut], max_pixels=BIG, inline_limit=BIG)


def test_truncated_single_strip_tiff_fails_before_decoding_once(tmp_path, monkeypatch):
    import refine_cli.io.readers as readers

    p = tmp_path / "s.tif"
    tifffile.imwrite(p, rgb(), rowsperstrip=180, photometric="rgb", compression="zlib")
    data = p.read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) - 100])
    monkeypatch.setattr(readers, "MAX_STREAM_CHUNK_BYTES", 1000)
    with pytest.raises(InputError, match="TIFF is truncated"):
        open_raster(tmp_path / "cut.tif", max_pixels=BIG, inline_limit=BIG)


def _geotiff(path, a, **extra):
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(path, "w", driver="GTiff", width=a.shape[1], height=a.shape[0], count=a.shape[2],
                       dtype=a.dtype.name, crs="EPSG:32633", transform=from_origin(500000, 4100000, 0.5, 0.5),
                       tiled=True, blockxsize=64, blockysize=64, **extra) as ds:
        ds.write(np.moveaxis(a, -1, 0))


def test_truncated_geotiff_is_checked_before_gdal(tmp_path):
    """GDAL reads a GeoTIFF cut inside its tag values as an image without georeferencing (or zeros)."""
    p = tmp_path / "geo.tif"
    _geotiff(p, rgb(256, 256), compress="deflate")
    data = p.read_bytes()
    for cut in (300, 450, 600, len(data) // 2):
        (tmp_path / "cut.tif").write_bytes(data[:cut])
        with pytest.raises(InputError, match="truncated"):
            open_raster(tmp_path / "cut.tif", max_pixels=BIG, inline_limit=BIG)


def test_gdal_decode_error_is_corrupt_data_not_a_disk_error(tmp_path):
    """A damaged tile in a GeoTIFF is an InputError (re-export), not a ReadError (check the disk)."""
    p = tmp_path / "geo.tif"
    _geotiff(p, rgb(256, 256), compress="deflate")
    with tifffile.TiffFile(p) as tf:
        off = int(tf.pages[0].dataoffsets[3])
    data = bytearray(p.read_bytes())
    for k in range(off, off + 64):
        data[k] ^= 0xFF
    (tmp_path / "bad.tif").write_bytes(bytes(data))
    with open_raster(tmp_path / "bad.tif", max_pixels=BIG, inline_limit=BIG) as r:
        with pytest.raises(InputError, match="corrupt or truncated"):
            r.read(Window(0, 0, 256, 256))


# ---------------------------------------------------------------------------
# ExtraSamples: a 4th band is alpha only when the file says so (point 13)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("extrasamples", "alpha"), [(0, None), (1, 3), (2, 3)])
def test_fourth_band_is_alpha_only_when_extrasamples_says_so(tmp_path, extrasamples, alpha, caplog):
    import logging

    a = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    p = tmp_path / "four.tif"
    tifffile.imwrite(p, a, tile=(32, 32), photometric="rgb", extrasamples=[extrasamples])
    with caplog.at_level(logging.INFO, logger="refine_cli"):
        with open_raster(p, max_pixels=BIG, inline_limit=BIG) as r:
            assert isinstance(r, TiffReader) and r.bands == 4 and r.alpha_band == alpha
            np.testing.assert_array_equal(ImageSource(r).read(Window(0, 0, 64, 64)), a[..., :3])
    assert ("band 4 is not marked as alpha" in caplog.text) == (alpha is None)
    # decoded once (huge strips) and from stdin: the same rule
    import refine_cli.io.readers as readers

    old = readers.MAX_STREAM_CHUNK_BYTES
    readers.MAX_STREAM_CHUNK_BYTES = 10
    try:
        with open_raster(p, max_pixels=BIG, inline_limit=BIG) as r:
            assert isinstance(r, ArrayReader) and r.alpha_band == alpha
    finally:
        readers.MAX_STREAM_CHUNK_BYTES = old
    with open_raster(p.read_bytes(), max_pixels=BIG, inline_limit=BIG) as r:
        assert r.alpha_band == alpha
    with open_raster(p.read_bytes(), max_pixels=BIG, inline_limit=100) as r:  # cached as a tiled TIFF
        assert r.alpha_band == alpha


@pytest.mark.parametrize("alpha", [False, True])
def test_tifffile_and_gdal_agree_on_the_fourth_band(tmp_path, alpha):
    """GDAL's colour interpretation and the ExtraSamples rule give the same alpha band, both ways round."""
    a = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    gdal_made = tmp_path / "gdal.tif"
    _geotiff(gdal_made, a, photometric="RGB", **({"alpha": "YES"} if alpha else {}))
    tiff_made = tmp_path / "tifffile.tif"
    tifffile.imwrite(tiff_made, a, tile=(32, 32), photometric="rgb", extrasamples=[2 if alpha else 0])
    expected = 3 if alpha else None
    for p in (gdal_made, tiff_made):
        with RasterioReader(str(p)) as r:
            assert r.alpha_band == expected, p.name
        with TiffReader(str(p)) as r:
            assert r.alpha_band == expected, p.name


def test_four_band_mask_with_unspecified_fourth_band_is_not_mask_in_alpha(tmp_path):
    """A varying 4th band over constant colour is only the mask when it is declared alpha."""
    from refine_cli.io.masks import MaskSource

    m = np.zeros((64, 64, 4), np.uint8)
    m[16:48, 16:48, 3] = 255
    tifffile.imwrite(tmp_path / "m0.tif", m, tile=(32, 32), photometric="rgb", extrasamples=[0])
    with open_raster(tmp_path / "m0.tif", max_pixels=BIG, inline_limit=BIG, what="mask") as r:
        assert r.alpha_band is None
        with pytest.raises(InputError, match="4 bands"):
            MaskSource(r, (64, 64))


# ---------------------------------------------------------------------------
# TIFFs stored in huge strips that do not fit memory (point 13)
# ---------------------------------------------------------------------------


def test_huge_strip_tiff_above_the_memory_says_too_big_and_how_to_retile(tmp_path, monkeypatch):
    import refine_cli.io.readers as readers
    from refine_cli.errors import ResourceError

    p = tmp_path / "onestrip.tif"
    tifffile.imwrite(p, rgb(), rowsperstrip=180, photometric="rgb")  # 129600 bytes decoded
    monkeypatch.setattr(readers, "MAX_STREAM_CHUNK_BYTES", 1000)
    monkeypatch.setattr(readers, "available_memory", lambda: 100_000)
    with pytest.raises(ResourceError, match="too big to decode at once") as err:
        open_raster(p, max_pixels=BIG, inline_limit=BIG)
    msg = str(err.value)
    assert "1 strip;" in msg and "gdal_translate -co TILED=YES" in msg and "97.7 KiB available" in msg
    assert "corrupt" not in msg and "\n" not in msg
    # an explicit budget wins over the available memory
    monkeypatch.setattr(readers, "available_memory", lambda: 10**12)
    with pytest.raises(ResourceError, match="too big to decode at once"):
        open_raster(p, max_pixels=BIG, inline_limit=BIG, memory_limit=50_000)
    with open_raster(p, max_pixels=BIG, inline_limit=BIG, memory_limit=10**9) as r:
        assert isinstance(r, ArrayReader)
    with pytest.raises(ResourceError, match="stdin: too big to decode at once"):
        open_raster(p.read_bytes(), max_pixels=BIG, inline_limit=BIG, memory_limit=50_000)


def test_memory_error_while_decoding_once_is_not_called_corruption(tmp_path, monkeypatch):
    import refine_cli.io.readers as readers
    from refine_cli.errors import ResourceError

    p = tmp_path / "onestrip.tif"
    tifffile.imwrite(p, rgb(), rowsperstrip=180, photometric="rgb")
    monkeypatch.setattr(readers, "MAX_STREAM_CHUNK_BYTES", 1000)

    def no_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr(tifffile, "imread", no_memory)
    with pytest.raises(ResourceError, match="too big to decode at once.*gdal_translate -co TILED=YES"):
        open_raster(p, max_pixels=BIG, inline_limit=BIG)


def test_too_big_strip_tiff_through_the_cli(tmp_path, cli, monkeypatch):
    import refine_cli.io.readers as readers

    p = tmp_path / "onestrip.tif"
    tifffile.imwrite(p, rgb(), rowsperstrip=180, photometric="rgb")
    write_png(tmp_path / "m.png", np.zeros((180, 240), np.uint8))
    monkeypatch.setattr(readers, "MAX_STREAM_CHUNK_BYTES", 1000)
    monkeypatch.setattr(readers, "available_memory", lambda: 100_000)
    code, out, err = cli("run", p, "--mask", tmp_path / "m.png", "-o", tmp_path / "o.tif")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error:") and "too big to decode at once" in lines[0]
    assert "gdal_translate -co TILED=YES" in lines[0]
    assert not (tmp_path / "o.tif").exists()


# ---------------------------------------------------------------------------
# EXIF orientation (point 13)
# ---------------------------------------------------------------------------


def exif_block(orientation: int, big_endian: bool = False) -> bytes:
    """A TIFF-structured EXIF block holding only IFD0 with the Orientation tag (0x0112)."""
    import struct

    o = ">" if big_endian else "<"
    return ((b"MM" if big_endian else b"II") + struct.pack(o + "HI", 42, 8) + struct.pack(o + "H", 1)
            + struct.pack(o + "HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(o + "I", 0))


def jpeg_with_exif(rgb_image: np.ndarray, orientation: int) -> bytes:
    """A JPEG of ``rgb_image`` (as stored) with an APP1 Exif segment right after SOI."""
    import struct

    jpg = cv2.imencode(".jpg", np.ascontiguousarray(rgb_image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
    jpg = jpg.tobytes()
    body = b"Exif\x00\x00" + exif_block(orientation, big_endian=orientation % 2 == 1)
    return jpg[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + jpg[2:]


def png_with_exif(image: np.ndarray, orientation: int) -> bytes:
    """A PNG of ``image`` (RGB or grey, as stored) with an eXIf chunk before IDAT."""
    import struct
    import zlib

    arr = image[..., ::-1] if image.ndim == 3 else image
    png = cv2.imencode(".png", np.ascontiguousarray(arr))[1].tobytes()
    body = exif_block(orientation)
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    ihdr_end = 8 + 25
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def webp_with_exif(rgb_image: np.ndarray, orientation: int) -> bytes:
    """A lossless WebP of ``rgb_image`` in the extended format (VP8X) with an EXIF chunk at the end."""
    import struct

    bgr = np.ascontiguousarray(rgb_image[..., ::-1])
    simple = cv2.imencode(".webp", bgr, [cv2.IMWRITE_WEBP_QUALITY, 101])[1].tobytes()
    h, w = rgb_image.shape[:2]
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x08, 0, 0, 0]) + (w - 1).to_bytes(3, "little") + \
        (h - 1).to_bytes(3, "little")
    exif = exif_block(orientation)
    exif_chunk = b"EXIF" + struct.pack("<I", len(exif)) + exif + (b"\x00" if len(exif) % 2 else b"")
    body = b"WEBP" + vp8x + simple[12:] + exif_chunk
    return b"RIFF" + struct.pack("<I", len(body)) + body


def shown(stored: np.ndarray, orientation: int) -> np.ndarray:
    """What viewers show for ``orientation``, written from the EXIF definitions."""
    return {1: lambda s: s, 2: np.fliplr, 3: lambda s: np.rot90(s, 2), 4: np.flipud,
            5: lambda s: np.rot90(np.fliplr(s), 1), 6: lambda s: np.rot90(s, -1),
            7: lambda s: np.rot90(np.fliplr(s), -1), 8: lambda s: np.rot90(s, 1)}[orientation](stored)


def asymmetric(h=48, w=80):
    a = np.zeros((h, w, 3), np.uint8)
    a[:16, :24] = (255, 0, 0)  # a block at the top left
    a[-8:, :] = (0, 255, 0)  # a bar at the bottom
    a[:, -10:] = (0, 0, 255)  # a bar at the right
    return a


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_exif_orientation_is_applied_like_viewers(tmp_path, orientation, caplog):
    import logging

    stored = asymmetric()
    data = jpeg_with_exif(stored, orientation)
    p = tmp_path / "photo.jpg"
    p.write_bytes(data)
    viewer = cv2.imread(str(p), cv2.IMREAD_COLOR)[..., ::-1]  # OpenCV's IMREAD_COLOR applies EXIF itself
    with caplog.at_level(logging.INFO, logger="refine_cli"):
        with open_raster(p, max_pixels=BIG, inline_limit=BIG) as r:
            got = r.read(Window(0, 0, *r.shape))
    assert got.shape == viewer.shape == shown(stored, orientation).shape
    np.testing.assert_array_equal(got, viewer)
    sniffed = sniff(data[:65536])  # the header's size is the shown one too (batch --dry-run uses it)
    assert sniffed.orientation == orientation and sniffed.size == got.shape[:2]
    assert ("EXIF orientation" in caplog.text) == (orientation != 1)
    with open_raster(data, max_pixels=BIG, inline_limit=BIG) as r:  # stdin bytes
        np.testing.assert_array_equal(r.read(Window(0, 0, *r.shape)), viewer)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_png_and_webp_exif_orientation_exact(tmp_path, orientation):
    stored = asymmetric()
    for name, data in (("a.png", png_with_exif(stored, orientation)),
                       ("a.webp", webp_with_exif(stored, orientation))):
        (tmp_path / name).write_bytes(data)
        with open_raster(tmp_path / name, max_pixels=BIG, inline_limit=BIG) as r:
            np.testing.assert_array_equal(r.read(Window(0, 0, *r.shape)), shown(stored, orientation))
    # a 16-bit grey mask with orientation, from a file and from stdin
    mask16 = (asymmetric()[..., 0].astype(np.uint16) * 257)
    data = png_with_exif(mask16, orientation)
    for source in (data, tmp_path / "m.png"):
        (tmp_path / "m.png").write_bytes(data)
        with open_raster(source, max_pixels=BIG, inline_limit=BIG, what="mask") as r:
            assert r.dtype == np.uint16
            np.testing.assert_array_equal(r.read(Window(0, 0, *r.shape))[..., 0], shown(mask16, orientation))


def test_phone_photo_with_a_mask_drawn_as_shown(tmp_path, cli):
    """A landscape-stored photo shown portrait (orientation 6) refines against a portrait mask."""
    stored = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)  # stored 128 wide, 96 high
    (tmp_path / "photo.jpg").write_bytes(jpeg_with_exif(stored, 6))
    mask = np.zeros((128, 96), np.uint8)  # drawn on the portrait view
    mask[20:90, 10:60] = 255
    write_png(tmp_path / "mask.png", mask)
    code, out, err = cli("run", tmp_path / "photo.jpg", "--mask", tmp_path / "mask.png",
                         "-o", tmp_path / "o.tif", "-q")
    assert code == 0, err
    got = tifffile.imread(tmp_path / "o.tif")
    assert got.shape == (128, 96)
    assert (got > 0)[30:80, 20:50].mean() > 0.9 and (got > 0)[100:, 70:].mean() < 0.1
