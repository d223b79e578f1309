"""One image on a Dask cluster (``refine run --scheduler``): bit for bit the single-process run.

A module-scoped ``LocalCluster`` of 2 worker processes serves every test (reached by its
``tcp://`` address, as a remote cluster would be). 512-row segments cut each level into several
row bands.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from refine_cli.api import refine_file
from refine_cli.config import CascadeOptions, RefineConfig
from refine_cli.devtools.synthetic import random_scene, write_tiled
from refine_cli.engine.checkpoint import parts_dir_for
from refine_cli.errors import Interrupted, UsageError

distributed = pytest.importorskip("distributed")

from refine_cli.cluster import refine_on_cluster  # noqa: E402
from refine_cli.devtools.chaos import KillOnce  # noqa: E402

H, W = 1536, 256


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    d = tmp_path_factory.mktemp("scene")
    sc = random_scene((H, W), 10, seed=7, size=50)
    write_tiled(sc, str(d / "img.tif"))
    cv2.imwrite(str(d / "coarse.png"), sc.coarse(4))
    return d


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as lc:
        yield lc


@pytest.fixture(autouse=True)
def small_segments(monkeypatch):
    monkeypatch.setenv("REFINE_SEGMENT_BYTES", str(W * 512))  # 512-row segments for every output


GUIDED = RefineConfig(method="guided", tile_size=256)


def cascade_config() -> RefineConfig:
    """The bundled lite weights on the streamed path (two levels at L = 256), edge snap and guard on."""
    return RefineConfig(method="cascade", cascade=CascadeOptions(weights="cascadepsp-lite-v2", size=256,
                                                                 exact=False, snap="on"))


@pytest.fixture(scope="module")
def guided_ref(scene, tmp_path_factory):
    import os as _os

    _os.environ["REFINE_SEGMENT_BYTES"] = str(W * 512)
    try:
        return reference(scene, tmp_path_factory.mktemp("ref"), GUIDED)
    finally:
        del _os.environ["REFINE_SEGMENT_BYTES"]


def reference(scene: Path, tmp: Path, config: RefineConfig) -> Path:
    out = tmp / "ref.tif"
    refine_file(str(scene / "img.tif"), str(scene / "coarse.png"), str(out), config=config,
                uncertainty=str(tmp / "ref.unc.tif"))
    return out


def on_cluster(scene: Path, out: Path, cluster, config: RefineConfig, **kw):
    return refine_on_cluster(str(scene / "img.tif"), str(scene / "coarse.png"), str(out),
                             scheduler=cluster.scheduler_address, config=config,
                             uncertainty=str(out.with_suffix(".unc.tif")), report=str(out.with_suffix(".json")),
                             band_rows=512, **kw)


def same_bytes(out: Path, ref: Path) -> None:
    assert out.read_bytes() == ref.read_bytes()
    assert out.with_suffix(".unc.tif").read_bytes() == ref.with_suffix(".unc.tif").read_bytes()
    assert not parts_dir_for(str(out)).exists()


def bands_run(out: Path) -> int:
    note = next(n for n in json.loads(out.with_suffix(".json").read_text())["notes"] if n.startswith("dask:"))
    return int(note.split()[1])


@pytest.mark.parametrize("config", [GUIDED, pytest.param("cascade", marks=pytest.mark.slow)],
                         ids=["guided", "cascade"])
def test_bands_on_two_workers_give_the_single_process_bytes(scene, cluster, tmp_path, config, guided_ref):
    config = cascade_config() if config == "cascade" else config
    ref = reference(scene, tmp_path, config) if config.method == "cascade" else guided_ref
    out = tmp_path / "out.tif"
    rep = on_cluster(scene, out, cluster, config)
    same_bytes(out, ref)
    assert bands_run(out) >= 6  # the refiner's level and the guard's, three bands each
    assert rep.guard["state"] == "on"


def test_a_killed_worker_is_replaced_and_its_band_rerun(scene, cluster, tmp_path, guided_ref):
    ref = guided_ref
    flag = tmp_path / "killed"
    client = distributed.Client(cluster)
    client.register_plugin(KillOnce(str(flag), delay=0.05))
    try:
        out = tmp_path / "out.tif"
        on_cluster(scene, out, cluster, GUIDED)
    finally:
        client.unregister_worker_plugin(KillOnce.name)
        client.close()
    assert flag.exists() and int(flag.read_text()) != os.getpid()  # a worker process died mid-band
    same_bytes(out, ref)


def test_interrupted_client_resumes_from_finished_bands(scene, cluster, tmp_path, guided_ref):
    ref = guided_ref
    out = tmp_path / "out.tif"

    def stop_after_two(stage: str, done: int, total: int) -> None:
        if "guard" in stage and done == 1:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="--resume"):
        on_cluster(scene, out, cluster, GUIDED, progress=stop_after_two)
    parts = parts_dir_for(str(out))
    assert not out.exists() and (parts / "mask").is_dir()
    on_cluster(scene, out, cluster, GUIDED, resume=True)
    same_bytes(out, ref)
    assert bands_run(out) <= 2  # the first level's file and a guard band were kept


def test_what_scheduler_refuses(scene, tmp_path, cli):
    img, msk = str(scene / "img.tif"), str(scene / "coarse.png")
    for kw, match in ((dict(mask=None), "needs --mask"), (dict(out=str(tmp_path / "o.png")), "a .tif name"),
                      (dict(image="-"), "stdin/stdout")):
        args = {"image": img, "mask": msk, "out": str(tmp_path / "o.tif"), **kw}
        with pytest.raises(UsageError, match=match):
            refine_on_cluster(args.pop("image"), args.pop("mask"), args.pop("out"), scheduler="local:1")
    code, _, err = cli("run", img, "--mask", msk, "-o", tmp_path / "o.tif", "--band-rows", "512")
    assert code == 2 and "--scheduler" in err and "Traceback" not in err
    code, _, err = cli("run", img, "--mask", msk, "-o", tmp_path / "o.tif", "--scheduler", "nope")
    assert code == 2 and "local:N" in err and "Traceback" not in err
    for extra, match in ((("--vector", str(tmp_path / "o.gpkg")), "refine vectorize"),
                         (("--co", "COMPRESS=ZSTD"), "default encoding"), (("--dtype", "uint16"), "--dtype")):
        code, _, err = cli("run", img, "--mask", msk, "-o", tmp_path / "o.tif", "--scheduler", "local:1", *extra)
        assert code == 2 and match in err and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())


def test_scheduler_refuses_magnet(scene, tmp_path, monkeypatch):
    """MagNet's stages keep their refined patches in this process between levels: refused in one line."""
    import refine_cli.cluster as cluster_module
    from magnet_fixtures import ColourSegmenter, fill_module, make_preset

    from refine_cli.refiners.magnet_method import MagnetRefiner

    seg = ColourSegmenter(2, (64, 64))
    monkeypatch.setattr(cluster_module, "build_refiner", lambda config, device: MagnetRefiner(
        seg, [fill_module(2)], make_preset(seg)))
    with pytest.raises(UsageError, match="without --scheduler"):
        refine_on_cluster(str(scene / "img.tif"), str(scene / "coarse.png"), str(tmp_path / "o.tif"),
                          scheduler="local:1", config=RefineConfig(method="magnet-fast"))
    assert not any(tmp_path.iterdir())


def test_image_read_through_a_gdal_path(scene, cluster, tmp_path):
    """Workers reopen a GDAL path (here inside a zip) themselves; one level, no guard."""
    import zipfile

    import tifffile

    with zipfile.ZipFile(tmp_path / "img.zip", "w") as z:
        z.write(scene / "img.tif", "img.tif")
    cfg = RefineConfig(method="guided", tile_size=512, guard="off")
    ref = tmp_path / "ref.tif"
    refine_file(str(scene / "img.tif"), str(scene / "coarse.png"), str(ref), config=cfg)
    out = tmp_path / "out.tif"
    refine_on_cluster(f"/vsizip/{tmp_path}/img.zip/img.tif", str(scene / "coarse.png"), str(out),
                      scheduler=cluster.scheduler_address, config=cfg, band_rows=512)
    assert np.array_equal(tifffile.imread(out), tifffile.imread(ref))


def test_cli_scheduler_is_the_library_call(scene, cluster, tmp_path, guided_ref, cli):
    out = tmp_path / "out.tif"
    code, _, err = cli("run", scene / "img.tif", "--mask", scene / "coarse.png", "-o", out, "--uncertainty",
                       out.with_suffix(".unc.tif"), "--method", "guided", "--tile-size", "256", "--scheduler",
                       cluster.scheduler_address, "--band-rows", "512", "-q")
    assert code == 0, err
    same_bytes(out, guided_ref)
