"""--co / --nodata / --dtype on the outputs, streamed COG overviews, and their place in the resume hashes."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import rasterio
from rasterio.shutil import copy as rio_copy

from conftest import one_line_error, write_png
from refine_cli.api import refine_file
from refine_cli.config import EncodingOptions, RefineConfig, parse_creation_options
from refine_cli.engine.checkpoint import parts_dir_for
from refine_cli.errors import Interrupted, UsageError
from refine_cli.hashing import config_hash
from refine_cli.io.overviews import StreamedOverviews, level_shapes
from refine_cli.io.writers import TiffSink

H, W = 192, 160
CO = "COMPRESS=ZSTD,PREDICTOR=2,BLOCKXSIZE=256,BLOCKYSIZE=256"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("co")
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    mask = np.zeros((H, W), np.uint8)
    mask[40:150, 30:120] = 255
    img[mask > 0] //= 3
    write_png(d / "img.png", img)
    write_png(d / "mask.png", mask)
    return d


def _read(path, level=None):
    kw = {} if level is None else {"overview_level": level}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path, **kw) as ds:
            return ds.read(), ds.profile, ds.tags(ns="IMAGE_STRUCTURE")


def test_parse_creation_options_splits_lists_and_upper_cases_keys():
    assert parse_creation_options(["compress=zstd,PREDICTOR=2", "blockxsize=256"]) == (
        ("COMPRESS", "zstd"), ("PREDICTOR", "2"), ("BLOCKXSIZE", "256"))
    assert parse_creation_options("ZLEVEL=1,ZLEVEL=9") == (("ZLEVEL", "9"),)
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_creation_options(["COMPRESS"])


def test_co_is_visible_in_info(pair, tmp_path, cli):
    out = tmp_path / "o.tif"
    code, _, err = cli("run", pair / "img.png", "--mask", pair / "mask.png", "-o", out, "--co", CO, "-q")
    assert code == 0, err
    code, text, _ = cli("info", out, "--json")
    facts = json.loads(text)
    assert (facts["compression"], facts["predictor"], facts["block"]) == ("ZSTD", 2, [256, 256])
    code, text, _ = cli("info", out)  # the table too
    assert "ZSTD" in text and "[256, 256]" in text
    # options not given keep the defaults: deflate, 512 px tiles, horizontal predictor
    code, _, err = cli("run", pair / "img.png", "--mask", pair / "mask.png", "-o", tmp_path / "d.tif", "-q")
    facts = json.loads(cli("info", tmp_path / "d.tif", "--json")[1])
    assert (facts["compression"], facts["predictor"], facts["block"]) == ("DEFLATE", 2, [512, 512])


@pytest.mark.parametrize(("co", "cog", "says"), [
    ("FOO=1", False, "has no creation option FOO"),
    ("COMPRESS=BOGUS", False, "use one of NONE"),
    ("BLOCKXSIZE=100", False, "GDAL refused it"),
    ("PREDICTOR=3", False, "PREDICTOR=3 is only supported"),
    ("BLOCKXSIZE=256", True, "COG driver has no creation option BLOCKXSIZE"),
    ("ZSTD_LEVEL=99,COMPRESS=ZSTD", False, "ZSTD_LEVEL=99"),
])
def test_bad_creation_option_is_one_line(pair, tmp_path, cli, co, cog, says):
    out = tmp_path / "o.tif"
    code, _, err = cli("run", pair / "img.png", "--mask", pair / "mask.png", "-o", out, "--co", co,
                       *(["--cog"] if cog else []), "-q")
    assert code == 2
    assert says in one_line_error(err)
    assert not out.exists()


def test_co_on_png_is_refused(pair, tmp_path, cli):
    code, _, err = cli("run", pair / "img.png", "--mask", pair / "mask.png", "-o", tmp_path / "o.png",
                       "--co", "COMPRESS=ZSTD", "-q")
    assert code == 2 and "--co applies to TIFF outputs" in one_line_error(err)


def test_co_from_config_file(pair, tmp_path, cli):
    cfg = tmp_path / "run.toml"
    cfg.write_text('co = ["COMPRESS=LZW", "BLOCKXSIZE=128,BLOCKYSIZE=128"]\n')
    out = tmp_path / "o.tif"
    code, _, err = cli("run", pair / "img.png", "--mask", pair / "mask.png", "-o", out, "--config", cfg, "-q")
    assert code == 0, err
    facts = json.loads(cli("info", out, "--json")[1])
    assert (facts["compression"], facts["block"]) == ("LZW", [128, 128])


def test_dtype_and_nodata_round_trip(pair, tmp_path):
    img, mask = str(pair / "img.png"), str(pair / "mask.png")
    base = RefineConfig(soft=True)
    refine_file(img, mask, str(tmp_path / "f.tif"), config=base, uncertainty=str(tmp_path / "fu.tif"))
    for dtype, scale in (("uint16", 65535), ("uint8", 255)):
        cfg = base.replace(encoding=EncodingOptions(soft_dtype=dtype, nodata=7))
        refine_file(img, mask, str(tmp_path / f"{dtype}.tif"), config=cfg,
                    uncertainty=str(tmp_path / f"{dtype}u.tif"))
        for ref, got in (("f.tif", f"{dtype}.tif"), ("fu.tif", f"{dtype}u.tif")):
            data, profile, _ = _read(tmp_path / got)
            assert profile["dtype"] == dtype and profile["nodata"] == 7
            ref_data = _read(tmp_path / ref)[0]
            expect = np.round(ref_data * np.float32(scale)) if ref == "f.tif" else ref_data  # float32 maths
            if ref == "fu.tif":  # the default uncertainty map is uint8 round(255 u)
                assert np.abs(data.astype(np.float64) / scale - ref_data / 255.0).max() <= 0.5 / 255 + 1e-6
            else:
                assert np.array_equal(data, expect.astype(dtype))
    cfg = base.replace(encoding=EncodingOptions(soft_dtype="float32", nodata=-1.0))
    refine_file(img, mask, str(tmp_path / "g.tif"), config=cfg)
    data, profile, _ = _read(tmp_path / "g.tif")
    assert profile["nodata"] == -1.0 and np.array_equal(data, _read(tmp_path / "f.tif")[0])
    with pytest.raises(UsageError, match="does not fit"):  # a hard mask is uint8
        refine_file(img, mask, str(tmp_path / "h.tif"),
                    config=RefineConfig(encoding=EncodingOptions(nodata=300)))
    with pytest.raises(UsageError, match="float32 cannot be stored in PNG"):
        refine_file(img, mask, str(tmp_path / "h.png"),
                    config=base.replace(encoding=EncodingOptions(soft_dtype="float32")))


@pytest.mark.parametrize(("shape", "block"), [((256, 192), 32), ((512, 64), 16), ((203, 155), 32)])
def test_streamed_overviews_equal_gdal(tmp_path, shape, block):
    rng = np.random.default_rng(2)
    soft = rng.random(shape).astype(np.float32)
    mask = (rng.random(shape) > 0.5).astype(np.uint8) * 255
    soft8 = (soft * 255).astype(np.uint8)
    holes = soft8.copy()
    holes[rng.random(shape) < 0.3] = 7  # the nodata value: left out of averages
    for name, data, rs, nodata in (("mask", mask, "nearest", None), ("soft", soft, "average", None),
                                   ("soft8", soft8, "average", None), ("holes", holes, "average", 7)):
        paths = {}
        for stream in (True, False):
            paths[stream] = str(tmp_path / f"{name}{stream}.tif")
            sink = TiffSink(paths[stream], shape, 1, data.dtype, True, cog=True, resampling=rs,
                            creation={"BLOCKSIZE": str(block)}, stream_overviews=stream, nodata=nodata)
            # nearest is streamed at any size, average where every level halves exactly (else GDAL's pass)
            assert (sink._ovr is not None) == (stream and (rs == "nearest" or shape != (203, 155)))
            for r in range(0, shape[0], 37):
                sink.write_rows(r, data[r : r + 37])
            sink.commit()
        full_s, _, tags = _read(paths[True])
        assert tags["LAYOUT"] == "COG"
        assert np.array_equal(full_s, _read(paths[False])[0])
        n = len(level_shapes(shape, block))
        assert n >= 2
        for k in range(n):
            got, want = _read(paths[True], k)[0], _read(paths[False], k)[0]
            assert got.shape == want.shape
            if rs == "nearest" or data.dtype == np.uint8:
                assert np.array_equal(got, want), (name, k)
            else:
                assert np.abs(got - want).max() <= 1e-4, (name, k)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_streamed_overviews_memory_does_not_grow_with_height(tmp_path):
    """The arrays the levels hold (counting the whole array a view keeps alive) stay below one strip of
    ``block`` rows per level, whatever the height."""
    for height in (1024, 8192):
        shape, block = (height, 256), 256
        levels = level_shapes(shape, block)
        ovr = StreamedOverviews([str(tmp_path / f"h{height}_{k}.tif") for k in range(len(levels))], shape, 1,
                                np.dtype(np.uint8), block, "nearest", {"COMPRESS": "NONE"}, None)
        bound = sum(block * w for _, w in levels)
        most = 0
        for r in range(0, height, 16):
            ovr.push(np.full((16, shape[1], 1), r % 251, np.uint8))  # a new array per strip, as TiffSink's
            arrays = [p for lv in ovr.levels for p in lv.pending]
            arrays += [lv.carry for lv in ovr.levels if lv.carry is not None]
            owners = [p if p.base is None else p.base for p in arrays]  # a view keeps its whole base alive
            held = {id(o): o.nbytes for o in owners}
            most = max(most, sum(held.values()))
        ovr.close()
        assert most <= bound, (height, most, bound)
    with rasterio.open(tmp_path / "h8192_0.tif") as ds:
        assert ds.shape == (4096, 128)


def test_cog_with_gdal_resampling_still_works(tmp_path):
    data = np.arange(128 * 96, dtype=np.uint16).reshape(128, 96)
    out = str(tmp_path / "o.tif")
    sink = TiffSink(out, data.shape, 1, data.dtype, True, cog=True,
                    creation={"BLOCKSIZE": "32", "OVERVIEW_RESAMPLING": "BILINEAR"})
    assert sink._ovr is None  # not streamed: GDAL computes these at commit
    sink.write_rows(0, data)
    sink.commit()
    ref = str(tmp_path / "plain.tif")
    with rasterio.open(ref, "w", driver="GTiff", width=96, height=128, count=1, dtype="uint16") as ds:
        ds.write(data, 1)
    rio_copy(ref, str(tmp_path / "ref.tif"), driver="COG", BLOCKSIZE=32, OVERVIEW_RESAMPLING="BILINEAR")
    assert np.array_equal(_read(out, 0)[0], _read(tmp_path / "ref.tif", 0)[0])


def test_encoding_enters_the_config_hash():
    plain = RefineConfig()
    with_co = plain.replace(encoding=EncodingOptions(creation=(("COMPRESS", "ZSTD"),)))
    assert config_hash(plain.to_dict()) != config_hash(with_co.to_dict())
    assert config_hash(with_co.to_dict()) != config_hash(
        plain.replace(encoding=EncodingOptions(creation=(("COMPRESS", "LZW"),))).to_dict())
    # no option given: the hash of a configuration from before the options existed
    old = {k: v for k, v in plain.to_dict().items() if k != "encoding"}
    assert config_hash(plain.to_dict()) == config_hash(old)


def test_resume_with_co_is_byte_identical(tmp_path, monkeypatch):
    monkeypatch.setenv("REFINE_SEGMENT_BYTES", str(512 * 64))  # 512-row segments: the run is checkpointed
    rng = np.random.default_rng(9)
    h, w = 1536, 64
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[100:1400, 10:50] = 255
    write_png(tmp_path / "img.png", img)
    write_png(tmp_path / "mask.png", mask)
    cfg = RefineConfig(tile_size=256, soft=True, encoding=EncodingOptions(
        creation=(("COMPRESS", "ZSTD"), ("BLOCKSIZE", "256")), soft_dtype="uint16", nodata=0))
    args = (str(tmp_path / "img.png"), str(tmp_path / "mask.png"))
    ref = tmp_path / "ref.tif"
    refine_file(*args, str(ref), config=cfg, cog=True)
    out = tmp_path / "out.tif"
    seen = {"rows": 0}

    def stop(stage: str, done: int, total: int) -> None:
        seen["rows"] = done
        if (parts_dir_for(str(out)) / "mask" / "segment_000001.tif").exists():
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        refine_file(*args, str(out), config=cfg, cog=True, progress=stop)
    assert not out.exists() and (parts_dir_for(str(out)) / "mask" / "segment_000000.tif").exists()
    rep = refine_file(*args, str(out), config=cfg, cog=True, resume=True)
    assert rep.tiles["resumed_from_row"] >= 512
    assert out.read_bytes() == ref.read_bytes()
    facts = _read(out)[2]
    assert facts["LAYOUT"] == "COG" and facts["COMPRESSION"] == "ZSTD"
    # parts made with other creation options are not resumed
    out2 = tmp_path / "out2.tif"
    out = out2
    with pytest.raises(Interrupted):
        refine_file(*args, str(out2), config=cfg, cog=True, progress=stop)
    other = cfg.replace(encoding=EncodingOptions(creation=(("COMPRESS", "LZW"),), soft_dtype="uint16",
                                                 nodata=0))
    assert refine_file(*args, str(out2), config=other, cog=True, resume=True).tiles["resumed_from_row"] == 0


def test_nodata_marks_the_images_empty_pixels(pair, tmp_path):
    """With --nodata, pixels of alpha 0 get the nodata value in every output; the rest is computed."""
    import cv2

    rgb = cv2.imread(str(pair / "img.png"))
    rgba = np.dstack([rgb, np.full((H, W), 255, np.uint8)])
    rgba[:, :40, 3] = 0  # a collar without data
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    cfg = RefineConfig(encoding=EncodingOptions(nodata=1))
    refine_file(str(tmp_path / "rgba.png"), str(pair / "mask.png"), str(tmp_path / "o.tif"), config=cfg,
                uncertainty=str(tmp_path / "u.tif"))
    refine_file(str(pair / "img.png"), str(pair / "mask.png"), str(tmp_path / "ref.tif"),
                uncertainty=str(tmp_path / "ref_u.tif"))
    for name, ref in (("o.tif", "ref.tif"), ("u.tif", "ref_u.tif")):
        data, profile, _ = _read(tmp_path / name)
        assert profile["nodata"] == 1
        assert (data[0, :, :40] == 1).all()
        assert np.array_equal(data[0, :, 40:], _read(tmp_path / ref)[0][0, :, 40:])  # the same RGB
    # without --nodata the collar is computed like any pixel
    refine_file(str(tmp_path / "rgba.png"), str(pair / "mask.png"), str(tmp_path / "p.tif"))
    assert _read(tmp_path / "p.tif")[1]["nodata"] is None
    assert set(np.unique(_read(tmp_path / "p.tif")[0][0, :, :40])) <= {0, 255}


def test_batch_journal_sees_changed_creation_options(pair, tmp_path, cli):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes((pair / "img.png").read_bytes())
    (src / "a_mask.png").write_bytes((pair / "mask.png").read_bytes())
    base = ("batch", src / "a.png", "--mask-suffix", "_mask", "-o", tmp_path / "out", "-q")
    code, _, err = cli(*base, "--co", "COMPRESS=LZW")
    assert code == 0, err
    assert json.loads(cli("info", tmp_path / "out" / "a.refined.tif", "--json")[1])["compression"] == "LZW"
    code, _, err = cli(*base, "--co", "compress=LZW")  # the same options (keys in any case): already done
    assert code == 0, err
    code, _, err = cli(*base, "--co", "COMPRESS=ZSTD")  # other options: not kept silently
    assert code == 2 and "other settings" in one_line_error(err)
    code, _, err = cli(*base, "--co", "COMPRESS=NOPE")
    assert code == 2 and "use one of" in one_line_error(err)
