"""Polygon output: the streamed band polygonizer, its sinks, `refine vectorize` and `refine run --vector`."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyogrio")
shapely = pytest.importorskip("shapely")
pytest.importorskip("pyarrow")

import pyogrio  # noqa: E402
import rasterio  # noqa: E402
from conftest import one_line_error, write_png  # noqa: E402
from rasterio.features import shapes  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402
from scipy import ndimage  # noqa: E402

from refine_cli.devtools.seam_scene import SeamScene  # noqa: E402
from refine_cli.io.vector import BandPolygonizer, PolygonOptions, parse_measure  # noqa: E402
from refine_cli.io.vectorize import VectorSpec, vectorize_file  # noqa: E402

TRANSFORM = from_origin(500000, 4000000, 0.5, 0.5)


def blobs(h: int, w: int, seed: int = 0, classes: int = 1) -> np.ndarray:
    """``(h, w)`` uint8 class map of random blobs with holes; binary: ``{0, 255}``, else ``0..classes``."""
    rng = np.random.default_rng(seed)
    out = np.zeros((h, w), np.uint8)
    for c in range(1, classes + 1):
        out[ndimage.gaussian_filter(rng.random((h, w)), 4) > 0.52] = 255 if classes == 1 else c
    return out


def polygonize(cls: np.ndarray, band_rows: int, step: int = 13, prob: np.ndarray | None = None,
               options: PolygonOptions | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Stream ``cls`` through a :class:`BandPolygonizer` in blocks of ``step`` rows; polygons, attributes."""
    out: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
    bp = BandPolygonizer(cls.shape, lambda g, a: out.append((g, a)), options, stats=prob is not None,
                         band_rows=band_rows)
    for r in range(0, cls.shape[0], step):
        p = None if prob is None else prob[r:r + step]
        bp.add(r, cls[r:r + step], p, None if p is None else 1 - p)
    bp.finish()
    geoms = np.concatenate([g for g, _ in out]) if out else np.zeros(0, object)
    attrs = {k: np.concatenate([a[k] for _, a in out]) for k in (out[0][1] if out else {})}
    return geoms, attrs


def reference(cls: np.ndarray) -> list[tuple[object, float]]:
    """``rasterio.features.shapes`` of the whole map (foreground, 4-connectivity) as shapely polygons."""
    return [(shapely.geometry.shape(g), v) for g, v in shapes(cls, mask=cls > 0, connectivity=4)]


def canonical(geoms) -> list[bytes]:
    return sorted(shapely.to_wkb(shapely.normalize(np.asarray(geoms, object))).tolist())


@pytest.mark.parametrize("band_rows", [5, 16, 1000])
def test_polygons_are_those_of_the_whole_image(band_rows):
    cls = blobs(180, 150, seed=1, classes=3)
    geoms, attrs = polygonize(cls, band_rows)
    ref = reference(cls)
    assert len(geoms) == len(ref)
    assert canonical(geoms) == canonical([g for g, _ in ref])  # exact pixel-edge geometry, holes included
    assert sorted(attrs["class"].tolist()) == sorted(int(v) for _, v in ref)
    assert np.array_equal(shapely.area(geoms), attrs["pixels"])
    assert shapely.area(geoms).sum() == np.count_nonzero(cls)
    assert set(shapely.get_type_id(geoms).tolist()) == {3} and shapely.is_valid(geoms).all()


@pytest.mark.parametrize("p", [0.4, 0.6])
def test_pixel_noise_matches_the_whole_image(p):
    """Salt-and-pepper: regions that touch themselves at corners around holes, cut by a seam every 5 rows."""
    cls = ((np.random.default_rng(0).random((120, 120)) < p) * 255).astype(np.uint8)
    geoms, attrs = polygonize(cls, 5, step=7)
    ref = reference(cls)
    assert len(geoms) == len(ref) and canonical(geoms) == canonical([g for g, _ in ref])
    assert shapely.area(geoms).sum() == np.count_nonzero(cls)


def test_objects_cut_by_seams_come_out_whole():
    band = 8
    scene = SeamScene(4 * band * 6 + 5, 48 * 9 + 3, band)
    cls = scene.rows(0, scene.shape[0])
    geoms, _ = polygonize(cls, band, step=5)
    ref = reference(cls)
    assert len(geoms) == scene.count == len(ref) == 66  # 54 cells, 12 of them with two objects
    assert canonical(geoms) == canonical([g for g, _ in ref])
    holes = sum(len(p.interiors) for p in geoms)
    assert holes == sum(len(g.interiors) for g, _ in ref) > 0
    # every ring's hole crosses a seam: the ring is one polygon with one hole spanning that seam
    rings = [p for p in geoms if len(p.interiors)]
    holes_y = [p.interiors[0].bounds[1::2] for p in rings]
    assert all(y0 < (y0 // band + 1) * band < y1 for y0, y1 in holes_y)


def test_means_combine_across_seams():
    cls = blobs(120, 90, seed=2)
    prob = np.random.default_rng(3).random(cls.shape).astype(np.float32)
    geoms, attrs = polygonize(cls, 7, prob=prob)
    lab, n = ndimage.label(cls > 0, structure=ndimage.generate_binary_structure(2, 1))
    count = np.bincount(lab.ravel())[1:]
    mean = np.bincount(lab.ravel(), weights=prob.ravel())[1:] / count
    expected = sorted(zip(count.tolist(), np.round(mean, 4).tolist(), strict=True))
    means = np.round(attrs["prob_mean"].astype(float), 4).tolist()
    got = sorted(zip(attrs["pixels"].tolist(), means, strict=True))
    assert got == expected
    assert np.allclose(attrs["unc_mean"], 1 - attrs["prob_mean"], atol=1e-5)


def test_min_area_and_simplify():
    cls = blobs(150, 150, seed=4)
    geoms, attrs = polygonize(cls, 16)
    kept, _ = polygonize(cls, 16, options=PolygonOptions(min_area=parse_measure("50px", "--min-area")))
    assert len(kept) == int((attrs["pixels"] >= 50).sum()) < len(geoms)
    # map units: a pixel is 0.25 m² here, so 12.5 m² = 50 px
    opts = PolygonOptions(transform=tuple(TRANSFORM)[:6], min_area=parse_measure("12.5", "--min-area"))
    assert len(polygonize(cls, 16, options=opts)[0]) == len(kept)
    simple, _ = polygonize(cls, 16, options=PolygonOptions(simplify=parse_measure("1.5px", "--simplify")))
    assert len(simple) == len(geoms) and shapely.is_valid(simple).all()
    assert shapely.get_num_coordinates(simple).sum() < 0.8 * shapely.get_num_coordinates(geoms).sum()
    assert sum(len(p.interiors) for p in simple) == sum(len(p.interiors) for p in geoms)


def _geotiff(path: Path, array: np.ndarray, georef: bool = True) -> Path:
    kw = {"crs": "EPSG:32633", "transform": TRANSFORM} if georef else {}
    with rasterio.open(path, "w", driver="GTiff", height=array.shape[0], width=array.shape[1], count=1,
                       dtype=array.dtype, **kw) as dst:
        dst.write(array, 1)
    return path


def _read(path: Path):
    """``(geoms, table columns, crs)`` of a written vector file (GeoParquet read with pyarrow)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        t = pq.read_table(path)
        geo = json.loads(t.schema.metadata[b"geo"])
        return shapely.from_wkb(t["geometry"].to_numpy(zero_copy_only=False)), t.to_pydict(), geo
    meta, _, geoms, cols = pyogrio.raw.read(path)
    return shapely.from_wkb(geoms), dict(zip(meta["fields"], cols, strict=True)), meta["crs"]


@pytest.mark.parametrize("ext", [".gpkg", ".geojson", ".fgb", ".parquet"])
def test_vectorize_file_formats_carry_the_georeferencing(tmp_path, ext):
    cls = blobs(100, 120, seed=5)
    mask = _geotiff(tmp_path / "mask.tif", cls)
    out = tmp_path / f"poly{ext}"
    res = vectorize_file(str(mask), VectorSpec(str(out)), band_rows=16)
    geoms, cols, crs = _read(out)
    ref = reference(cls)
    assert res["polygons"] == len(geoms) == len(ref)
    assert abs(shapely.area(geoms).sum() - np.count_nonzero(cls) * 0.25) < 1e-6
    xmin, _, _, ymax = shapely.total_bounds(geoms)
    assert 500000 <= xmin < 500060 and 3999950 < ymax <= 4000000  # map coordinates, not pixels
    if ext == ".parquet":
        assert crs["primary_column"] == "geometry" and crs["columns"]["geometry"]["encoding"] == "WKB"
        assert crs["columns"]["geometry"]["crs"]["id"]["code"] == 32633
    else:
        assert crs == "EPSG:32633"
    assert set(cols["class"]) == {255} and [f for f in ("prob_mean", "unc_mean") if f in cols] == []
    assert not [p for p in tmp_path.iterdir() if ".refine-tmp" in p.name]
    # exact geometry in map coordinates
    px = [shapely.affinity.affine_transform(g, [0.5, 0, 0, -0.5, 500000, 4000000]) for g, _ in ref]
    assert canonical(shapely.set_precision(geoms, 1e-6)) == canonical(shapely.set_precision(px, 1e-6))


def test_vectorize_without_georeferencing_uses_pixel_coordinates(tmp_path, cli):
    cls = np.zeros((40, 50), np.uint8)
    cls[5:10, 20:30] = 3
    cls[30:35, 1:4] = 7
    mask = write_png(tmp_path / "labels.png", cls)
    code, out, err = cli("vectorize", mask, "-o", tmp_path / "p.gpkg", "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["polygons"] == 2
    geoms, cols, crs = _read(tmp_path / "p.gpkg")
    assert crs is None
    by_class = dict(zip(cols["class"].tolist(), geoms, strict=True))
    assert by_class[3].bounds == (20, 5, 30, 10)  # x = column, y = row (growing down)
    assert by_class[7].bounds == (1, 30, 4, 35)


def test_vectorize_refuses_clashes_and_existing_outputs(tmp_path, cli):
    mask = _geotiff(tmp_path / "mask.tif", blobs(40, 40))
    out = tmp_path / "p.gpkg"
    out.write_bytes(b"old")
    code, _, err = cli("vectorize", mask, "-o", out)
    assert code == 2 and "--overwrite" in one_line_error(err)
    assert out.read_bytes() == b"old"
    code, _, err = cli("vectorize", mask, "-o", tmp_path / "p.shp")
    assert code == 2 and ".gpkg" in one_line_error(err)
    code, _, err = cli("vectorize", mask, "-o", out, "--simplify", "abc", "--overwrite")
    assert code == 2 and "--simplify" in one_line_error(err)
    stale = tmp_path / ".p.gpkg.999999999.0badf00d.refine-tmp"  # a killed run's temporary folder
    stale.mkdir()
    (stale / "polygons.gpkg").write_bytes(b"partial")
    assert cli("vectorize", mask, "-o", out, "--overwrite", "-q")[0] == 0
    assert pyogrio.read_info(out)["features"] > 0
    assert not stale.exists()


def _scene(tmp_path: Path, h: int = 96, w: int = 128) -> tuple[Path, Path]:
    cls = blobs(h, w, seed=6)
    rng = np.random.default_rng(7)
    img = np.stack([cls, 255 - cls, cls // 2]).astype(int) + rng.integers(0, 30, (3, h, w))
    with rasterio.open(tmp_path / "img.tif", "w", driver="GTiff", height=h, width=w, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=TRANSFORM) as dst:
        dst.write(np.clip(img, 0, 255).astype(np.uint8))
    return tmp_path / "img.tif", _geotiff(tmp_path / "mask.tif", cls)


def test_run_vector_matches_the_written_mask(tmp_path, cli):
    img, mask = _scene(tmp_path)
    code, out, err = cli("run", img, "-m", mask, "-o", tmp_path / "out.tif", "--method", "guided", "--vector",
                         tmp_path / "out.fgb", "--json", "-q")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["outputs"]["vector"] == str(tmp_path / "out.fgb")
    geoms, cols, crs = _read(tmp_path / "out.fgb")
    assert crs == "EPSG:32633" and rep["outputs"]["polygons"] == len(geoms) > 0
    with rasterio.open(tmp_path / "out.tif") as src:
        refined = src.read(1)
    ref = [shapely.affinity.affine_transform(g, [0.5, 0, 0, -0.5, 500000, 4000000])
           for g, _ in reference(refined)]
    assert canonical(shapely.set_precision(geoms, 1e-6)) == canonical(shapely.set_precision(ref, 1e-6))
    assert ((cols["prob_mean"] >= 0.5) & (cols["prob_mean"] <= 1)).all()
    assert ((cols["unc_mean"] >= 0) & (cols["unc_mean"] <= 1)).all()


def test_run_vector_with_the_mask_on_stdout(tmp_path, cli):
    img, mask = _scene(tmp_path)
    code, out, err = cli("run", img, "-m", mask, "-o", "-", "--method", "guided", "--vector",
                         tmp_path / "out.parquet", "--min-area", "4px", "-q")
    assert code == 0, err
    assert out  # the PNG bytes
    geoms, cols, _ = _read(tmp_path / "out.parquet")
    assert len(geoms) and min(cols["pixels"]) >= 4


def test_run_vector_refusals(tmp_path, cli):
    img, mask = _scene(tmp_path)
    base = ("run", img, "-m", mask, "--method", "guided")
    code, _, err = cli(*base, "-o", tmp_path / "o.tif", "--vector", mask)
    assert code == 2 and "--vector" in one_line_error(err) and "input" in err
    code, _, err = cli(*base, "-o", tmp_path / "o.tif", "--vector", tmp_path / "o.tif")
    assert code == 2 and "same file" in one_line_error(err)
    code, _, err = cli(*base, "-o", tmp_path / "o.tif", "--simplify", "2")
    assert code == 2 and "--vector" in one_line_error(err)
    (tmp_path / "v.gpkg").write_bytes(b"old")
    code, _, err = cli(*base, "-o", tmp_path / "o.tif", "--vector", tmp_path / "v.gpkg")
    assert code == 2 and "--overwrite" in one_line_error(err)
    assert not (tmp_path / "o.tif").exists() and (tmp_path / "v.gpkg").read_bytes() == b"old"


def test_failed_run_leaves_nothing(tmp_path, monkeypatch):
    from refine_cli.api import refine_file
    from refine_cli.config import RefineConfig
    from refine_cli.io import vector

    img, mask = _scene(tmp_path)
    before = set(tmp_path.iterdir())

    def broken(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(vector.BandPolygonizer, "_band", broken)
    with pytest.raises(RuntimeError, match="boom"):
        refine_file(str(img), str(mask), str(tmp_path / "o.tif"), config=RefineConfig(method="guided"),
                    vector=VectorSpec(str(tmp_path / "v.gpkg")), uncertainty=str(tmp_path / "u.tif"))
    assert set(tmp_path.iterdir()) == before


def test_label_rows_give_classes_and_their_probability():
    from refine_cli.engine.outputs import OutputSpec, OutputWriter

    w = OutputWriter(OutputSpec(mask=None), labels=True, mask_sink=None, unc_sink=None)
    probs = np.array([[[0.2, 0.6, 0.2], [0.1, 0.1, 0.3]]], np.float32)
    cls, prob = w.classes(probs)
    assert cls.tolist() == [[1, 2]] and np.allclose(prob, [[0.6, 0.6]])


def _noise(r: int, width: int) -> np.ndarray:
    """64 rows of blocky noise from seed ``r``: ``(64, width)`` uint8, about one object per 100 px."""
    small = np.random.default_rng(r).random((16, width // 4)) > 0.75
    return (np.kron(small, np.ones((4, 4), bool)) * 255).astype(np.uint8)


def _peak(height: int, monkeypatch) -> tuple[int, int]:
    """Peak traced bytes and polygon count of ``height x 256`` rows of noise polygonized into a GeoPackage."""
    import tempfile

    from refine_cli.io.vectorize import PolygonWriter

    monkeypatch.setattr("refine_cli.io.vector_sink.BATCH", 256)
    with tempfile.TemporaryDirectory() as d:
        tracemalloc.start()
        w = PolygonWriter(VectorSpec(str(Path(d) / "p.gpkg")), (height, 256), None, stats=False,
                          overwrite=False, band_rows=32)
        for r in range(0, height, 64):
            w.add(r, _noise(r, 256))
        w.commit()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, w.count


def test_memory_does_not_grow_with_height(monkeypatch):
    """Traced (Python and numpy) peak of the band polygonizer and its writer at two heights, 4x apart."""
    (small, n_small), (large, n_large) = _peak(512, monkeypatch), _peak(2048, monkeypatch)
    assert n_large > 3 * n_small > 2500
    assert large < 1.2 * small + 128 * 1024, (small, large)


@pytest.mark.parametrize("inside", [True, False])
def test_batch_vector_dir_one_file_per_input_and_resume(tmp_path, cli, inside):
    from test_batch import journal, make_pair

    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(2):
        make_pair(data, f"im{i}", i, shape=(64, 80), mask_name=f"im{i}_mask.png")
    out = tmp_path / "out"
    vdir = out / "polygons" if inside else tmp_path / "vec"
    args = ("batch", data, "--mask-suffix", "_mask", "-o", out, "--method", "guided", "--threads", "1",
            "--vector-dir", vdir, "--vector-format", "fgb", "-q")
    code, _, err = cli(*args)
    assert code == 0, err
    files = sorted(p.name for p in vdir.iterdir())
    assert files == ["im0.fgb", "im1.fgb"]
    for rec in journal(out):
        assert rec["status"] == "done" and "vector" in rec["outputs"]
        assert pyogrio.read_info(vdir / Path(rec["outputs"]["vector"]["path"]).name)["features"] >= 1
    mtimes = {p: p.stat().st_mtime_ns for p in vdir.iterdir()}
    assert cli(*args)[0] == 0
    assert {p: p.stat().st_mtime_ns for p in vdir.iterdir()} == mtimes  # resumed: nothing rewritten
    (vdir / "im1.fgb").unlink()
    assert cli(*args)[0] == 0
    assert (vdir / "im1.fgb").exists()  # a missing polygon file is made again


def test_resumed_run_with_vector_starts_again_at_row_0(tmp_path, monkeypatch):
    """A run killed after some resumable segments: with --vector the resume redoes every row."""
    from refine_cli.api import refine_file
    from refine_cli.config import RefineConfig
    from refine_cli.io import vector

    h, w = 1536, 96
    cls = blobs(h, w, seed=8)
    rng = np.random.default_rng(9)
    write_png(tmp_path / "img.png", np.clip(np.stack([cls, 255 - cls, cls], -1).astype(int)
                                            + rng.integers(0, 30, (h, w, 3)), 0, 255).astype(np.uint8))
    write_png(tmp_path / "mask.png", cls)
    monkeypatch.setenv("REFINE_SEGMENT_BYTES", str(w * 512))  # 512-row segments: 3 of them
    add = vector.BandPolygonizer.add

    def dies_late(self, row0, *args):
        if row0 >= 1200:  # after two segments of the mask are complete
            raise KeyboardInterrupt
        add(self, row0, *args)

    out, vec = tmp_path / "o.tif", tmp_path / "v.gpkg"
    run = dict(config=RefineConfig(method="guided", tile_size=256), vector=VectorSpec(str(vec)))
    monkeypatch.setattr(vector.BandPolygonizer, "add", dies_late)
    with pytest.raises(Exception, match="--resume"):
        refine_file(str(tmp_path / "img.png"), str(tmp_path / "mask.png"), str(out), **run)
    assert not out.exists() and not vec.exists()
    monkeypatch.setattr(vector.BandPolygonizer, "add", add)
    rep = refine_file(str(tmp_path / "img.png"), str(tmp_path / "mask.png"), str(out), resume=True, **run)
    assert rep.tiles["resumed_from_row"] == 0
    with rasterio.open(out) as src:
        refined = src.read(1)
    geoms, _, _ = _read(vec)
    assert len(geoms) == len(reference(refined)) and shapely.area(geoms).sum() == np.count_nonzero(refined)
