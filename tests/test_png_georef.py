"""PNG outputs of a georeferenced input keep its georeferencing in GDAL's sidecars (issue 14, point 12).

A PNG cannot hold a CRS or a geotransform; GDAL reads them from a world file ``<stem>.pgw`` (pixel-centre
convention) and ``<name>.aux.xml`` (PAM, the CRS as WKT). Both are written atomically with the PNG,
as one unit with the other outputs.
"""

from __future__ import annotations

import errno

import cv2
import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine, from_origin

from refine_cli.api import refine_file
from refine_cli.config import RefineConfig
from refine_cli.errors import OutputError
from refine_cli.io import writers
from refine_cli.io.readers import Georef

H, W = 96, 128


@pytest.fixture
def geo(tmp_path):
    img = np.random.default_rng(12).integers(0, 256, (3, H, W), dtype=np.uint8)
    with rasterio.open(tmp_path / "geo.tif", "w", driver="GTiff", width=W, height=H, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 4100000, 0.5, 0.25), tiled=True,
                       blockxsize=64, blockysize=64) as ds:
        ds.write(img)
    mask = np.zeros((H, W), np.uint8)
    mask[20:70, 30:90] = 255
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    return tmp_path


def georef_of(path):
    with rasterio.open(path) as ds:
        return ds.crs, ds.transform


def test_png_outputs_read_back_with_the_input_crs_and_transform(geo, cli):
    code, out, err = cli("run", geo / "geo.tif", "--mask", geo / "mask.png", "-o", geo / "out.png",
                         "--uncertainty", geo / "unc.png", "-q")
    assert code == 0, err
    crs, transform = georef_of(geo / "geo.tif")
    for name in ("out", "unc"):
        assert (geo / f"{name}.pgw").exists() and (geo / f"{name}.png.aux.xml").exists()
        got_crs, got_transform = georef_of(geo / f"{name}.png")
        assert got_crs == crs and got_crs.to_epsg() == 32633
        assert got_transform.almost_equals(transform)
    lines = (geo / "out.pgw").read_text().split()
    assert [float(v) for v in lines] == [0.5, 0.0, 0.0, -0.25, 500000.25, 4099999.875]  # pixel centre
    assert [p.name for p in geo.iterdir() if p.name.endswith(writers.TMP_SUFFIX)] == []


@pytest.mark.parametrize("epsg", [4326, 3035])
def test_sidecars_for_crs_with_other_axis_orders(tmp_path, epsg):
    """Latitude-first and northing-first CRSs still read back as the same CRS and transform."""
    wkt = rasterio.crs.CRS.from_epsg(epsg).to_wkt()
    georef = Georef(wkt, (0.001, 0.0, 10.0, 0.0, -0.002, 50.0))
    sink = writers.PngSink(str(tmp_path / "m.png"), (8, 10), 1, np.uint8, overwrite=False, georef=georef)
    sink.write_rows(0, np.zeros((8, 10), np.uint8))
    sink.commit()
    crs, transform = georef_of(tmp_path / "m.png")
    assert crs == rasterio.crs.CRS.from_epsg(epsg)
    assert transform.almost_equals(Affine(0.001, 0.0, 10.0, 0.0, -0.002, 50.0))


def test_no_georef_no_sidecars_and_stale_ones_removed(tmp_path):
    (tmp_path / "m.pgw").write_text("1\n0\n0\n-1\n0\n0\n")
    (tmp_path / "m.png.aux.xml").write_text("<PAMDataset/>")
    sink = writers.PngSink(str(tmp_path / "m.png"), (8, 10), 1, np.uint8, overwrite=False)
    sink.write_rows(0, np.zeros((8, 10), np.uint8))
    sink.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png"]


def test_a_failing_sidecar_leaves_no_png(geo, monkeypatch):
    real = writers.PngSink._stage

    def full(self, final, data, sidecar):
        if final.endswith(".aux.xml"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, final, data, sidecar)

    monkeypatch.setattr(writers.PngSink, "_stage", full)
    with pytest.raises(OutputError, match="No space left on device"):
        refine_file(str(geo / "geo.tif"), str(geo / "mask.png"), str(geo / "out.png"),
                    config=RefineConfig(tile_size=256))
    assert sorted(p.name for p in geo.iterdir()) == ["geo.tif", "mask.png"]


def test_stdout_png_warns_that_the_georeferencing_is_dropped(geo, cli):
    code, out, err = cli("run", geo / "geo.tif", "--mask", geo / "mask.png", "-o", "-")
    assert code == 0
    warning = [ln for ln in err.splitlines() if "georeferencing" in ln]
    assert len(warning) == 1 and ".tif" in warning[0], err
    assert "Traceback" not in err
