"""Readers: windowed reads equal whole reads, pyramids, formats, conversions, bomb guard."""

from __future__ import annotations

import os

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
