"""``refine review``: the page, the contact sheet, the streamed region search, batch folders, a real browser.

The regions are checked against a brute-force search over the whole uncertainty map held in memory;
the page is opened in headless Chromium when one is installed (``apt-get install chromium``).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from conftest import write_png

from refine_cli.api import refine_file
from refine_cli.config import RefineConfig
from refine_cli.review import review_image, review_runs
from refine_cli.review.sources import RunEntry
from refine_cli.tiling.grid import Window

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"


@pytest.fixture(scope="module")
def scene_run(tmp_path_factory):
    """samples/scene.jpg refined in 256 px tiles (guard on), run from its folder with relative paths."""
    d = tmp_path_factory.mktemp("scene_run")
    shutil.copy(SAMPLES / "scene.jpg", d / "scene.jpg")
    shutil.copy(SAMPLES / "scene_coarse.png", d / "scene_coarse.png")
    here = os.getcwd()
    os.chdir(d)
    try:
        rep = refine_file("scene.jpg", "scene_coarse.png", "refined.tif", uncertainty="unc.tif",
                          report="run.json", config=RefineConfig(tile_size=256))
    finally:
        os.chdir(here)
    assert rep.guard["pixels_held"] > 0
    return d


def test_report_tile_map_matches_the_counts(scene_run):
    """The report's tile map: one character per tile, agreeing with the tile and guard counts."""
    from refine_cli.report.tiles import STATE_CHARS, decode_states, encode_states, state_counts

    rep = json.loads((scene_run / "run.json").read_text())
    assert rep["workdir"] == str(scene_run)
    grid = rep["tile_map"]["refine"]
    rows = grid["states"]
    assert len(rows) == len(grid["row_starts"]) and {len(r) for r in rows} == {len(grid["col_starts"])}
    counts = state_counts(grid)
    assert counts["refined"] + counts["held back"] == rep["tiles"]["refined"] > 0
    assert counts["skipped"] == rep["tiles"]["skipped"] > 0 and counts["not run"] == 0
    guard = rep["tile_map"]["guard"]
    g = state_counts(guard)
    assert g["refined"] + g["held back"] == rep["guard"]["tiles_checked"]
    assert g["held back"] > 0 and rep["guard"]["pixels_held"] > 0
    assert set("".join(rows + guard["states"])) <= set(STATE_CHARS)
    codes = decode_states(rows)
    assert encode_states(codes) == rows
    # compact: about a byte per tile in the JSON report
    assert len(json.dumps(rows)) < 2 * codes.size + 4 * len(rows) + 8


def _imgs(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]*)"', page)


def test_review_page_is_self_contained(scene_run, tmp_path):
    out = tmp_path / "review.html"
    review = review_runs([str(scene_run / "run.json")], str(out), top=5, crop=256)
    page = out.read_text()
    assert "<script" not in page.lower() and not re.search(r'(src|href)="(https?:)?//', page)
    assert "url(" not in page  # no external style resource either
    iv = review.images[0]
    assert iv.notes == [] and len(iv.scan.regions) == 5
    assert iv.regions_png == [] and iv.tile_map_png is None  # written, then let go
    srcs = _imgs(page)
    assert len(srcs) == 1 + 5  # the tile map and the regions
    pics = []
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        pic = cv2.imdecode(np.frombuffer(base64.b64decode(src.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
        assert pic is not None and pic.std() > 5
        pics.append(pic)
    assert pics[0].shape == (480, 640, 3)  # the tile map
    assert {p.shape for p in pics[1:]} == {(256, 2 * 256 + 8, 3)}  # 1:1 crops beside their heat maps
    wins = [r.window for r in iv.scan.regions]
    assert all(a.intersection(b) is None for k, a in enumerate(wins) for b in wins[k + 1:])
    scores = [r.score for r in iv.scan.regions]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0
    # the stage times and the guard's counts are on the page; the paths were found from another folder
    assert "refine</td>" in page and "pixels held" in page and "unsupported" in page
    assert iv.scan.changed_fraction is not None and 0 < iv.scan.changed_fraction < 0.05
    assert 0 < iv.scan.mean_uncertainty < 0.5


def _brute_force(unc: np.ndarray, crop: int, top: int) -> list[tuple[Window, float]]:
    """The greedy pick of the module docstring of ``review.scan``, over the whole map in memory."""
    H, W = unc.shape
    s = crop // 2
    nr, nc = -(-H // s), -(-W // s)
    cands = []
    for i in range(max(1, nr - 1)):
        for j in range(max(1, nc - 1)):
            r0, c0 = i * s, j * s
            block = Window(r0, c0, min(2 * s, H - r0), min(2 * s, W - c0))
            total = float(unc[block.slices].sum(dtype=np.float64))
            if total > 0:
                cands.append((total, -i, -j, block))
    cands.sort(key=lambda c: c[:3], reverse=True)
    ch, cw = min(crop, H), min(crop, W)
    out: list[tuple[Window, float]] = []
    for total, _, _, block in cands:
        win = Window(min(block.row, H - ch), min(block.col, W - cw), ch, cw)
        if all(win.intersection(w) is None for w, _ in out):
            out.append((win, total / block.area))
        if len(out) == top:
            break
    return out


def test_streamed_regions_equal_a_brute_force_search(tmp_path, monkeypatch):
    import refine_cli.review.scan as scan

    monkeypatch.setattr(scan, "BAND_COLUMNS", 96)  # several column blocks per band row
    rng = np.random.default_rng(4)
    H, W = 410, 650
    yy, xx = np.mgrid[:H, :W]
    unc = np.zeros((H, W), np.float32)
    for _ in range(9):
        cy, cx, r = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(8, 40)
        unc += rng.uniform(0.3, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    unc8 = np.clip(np.rint(unc / unc.max() * 255), 0, 255).astype(np.uint8)
    write_png(tmp_path / "unc.png", unc8)
    write_png(tmp_path / "image.png", rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
    write_png(tmp_path / "refined.png", ((xx - 300) ** 2 + (yy - 200) ** 2 < 90**2).astype(np.uint8) * 255)
    entry = RunEntry("x", image=str(tmp_path / "image.png"), refined=str(tmp_path / "refined.png"),
                     uncertainty=str(tmp_path / "unc.png"))
    iv = review_image(entry, "img-1", top=6, crop=64)
    expected = _brute_force(unc8.astype(np.float32) / 255.0, 64, 6)
    assert [r.window for r in iv.scan.regions] == [w for w, _ in expected]
    assert [r.score for r in iv.scan.regions] == pytest.approx([s for _, s in expected], rel=1e-5)
    assert iv.scan.mean_uncertainty == pytest.approx(float((unc8 / 255.0).mean()), rel=1e-5)


def _tiled(path: Path, arr: np.ndarray) -> None:
    tifffile.imwrite(path, arr, tile=(256, 256))


def _scan_peak(d: Path, side: int) -> int:
    """Peak traced bytes of one scan over ``side x side`` tiled maps (uncertainty, refined, coarse)."""
    from refine_cli.io.masks import MaskSource
    from refine_cli.io.readers import open_raster
    from refine_cli.overlay import unit_reader
    from refine_cli.review import band_cache_bytes
    from refine_cli.review.scan import Maps, scan_regions

    col = np.where(np.arange(side) % 80 < 40, 255, 0).astype(np.uint8)[:, None]
    band = np.ascontiguousarray(np.broadcast_to(col, (side, side)))  # stripes 40 px wide
    _tiled(d / f"unc{side}.tif", band // 2)
    _tiled(d / f"ref{side}.tif", band)
    write_png(d / f"coarse{side}.png", band[::16, ::16])
    opened = [open_raster(str(d / f"{n}{side}.{e}"), max_pixels=1 << 40, inline_limit=1 << 20)
              for n, e in (("unc", "tif"), ("ref", "tif"), ("coarse", "png"))]
    for r in opened:
        r.set_cache_bytes(band_cache_bytes(r))  # as review_image does
    try:
        maps = Maps((side, side), MaskSource(opened[1], (side, side)), MaskSource(opened[2], (side, side)),
                    unit_reader(opened[0]), False, 0.5)
        tracemalloc.start()
        res = scan_regions(maps, top=8, crop=128)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        for r in opened:
            r.close()
    assert len(res.regions) == 8 and res.changed_fraction is not None
    return peak


def test_region_search_memory_does_not_grow_with_the_image(tmp_path):
    small = _scan_peak(tmp_path, 1024)
    big = _scan_peak(tmp_path, 3072)
    # a whole 3072 x 3072 float32 map is 36 MiB; the scan holds a band of cells, a row of scores and
    # one row of decoded 256 px chunks per map (1 MiB each at 4096 px wide: grows with the width only)
    assert big < small + (4 << 20), (small, big)
    assert big < 8 << 20


def test_review_png_sheet_and_errors(scene_run, tmp_path, cli):
    out = tmp_path / "sheet.png"
    code, _, err = cli("review", scene_run / "run.json", "-o", out, "--top", 3, "--crop", 128)
    assert code == 0, err
    assert "3 region(s)" in err
    pic = cv2.imread(str(out))
    assert pic.shape[1] == 640 and pic.shape[0] > 480 + 128 and pic.std() > 10  # the tile map is widest
    code, _, err = cli("review", scene_run / "run.json", "-o", out)
    assert code == 2 and "--overwrite" in err
    code, _, err = cli("review", scene_run / "run.json", "-o", tmp_path / "big.png", "--top", 200)
    assert code == 2 and "write .html" in err and not (tmp_path / "big.png").exists()
    code, _, err = cli("review", scene_run / "run.json", "-o", tmp_path / "r.pdf")
    assert code == 2 and ".html" in err
    code, _, err = cli("review", scene_run / "scene.jpg", "-o", tmp_path / "r.html")
    assert code == 2 and "run report" in err and "Traceback" not in err
    code, _, err = cli("review", tmp_path, "-o", tmp_path / "r.html")
    assert code == 2 and "journal" in err


def test_missing_outputs_become_notes(scene_run, tmp_path):
    rep = json.loads((scene_run / "run.json").read_text())
    rep["outputs"]["mask"] = str(tmp_path / "gone.tif")
    (tmp_path / "run.json").write_text(json.dumps(rep))
    review = review_runs([str(tmp_path / "run.json")], str(tmp_path / "r.html"))
    assert any("gone.tif not found" in n for n in review.images[0].notes)
    assert "gone.tif not found" in (tmp_path / "r.html").read_text()


@pytest.fixture(scope="module")
def batch_dir(tmp_path_factory):
    """A `refine batch` folder: samples/ortho.tif done (with reports), a broken image failed."""
    from refine_cli.cli import main

    src = tmp_path_factory.mktemp("batch_src")
    shutil.copy(SAMPLES / "ortho.tif", src / "ortho.tif")
    shutil.copy(SAMPLES / "ortho_coarse.png", src / "ortho_mask.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shutil.copy(SAMPLES / "ortho_coarse.png", src / "broken_mask.png")
    out = tmp_path_factory.mktemp("batch_out")
    with pytest.raises(SystemExit) as exc:
        main(["batch", str(src), "-o", str(out), "--mask-suffix", "_mask", "--uncertainty", "--report",
              "--tile-size", "256", "-q"])
    assert exc.value.code == 3  # one input failed
    return out


def test_review_of_a_batch_folder(batch_dir, tmp_path):
    out = tmp_path / "batch.html"
    review = review_runs([str(batch_dir)], str(out), top=3, crop=128)
    page = out.read_text()
    assert review.batch and [iv.entry.status for iv in review.images] == ["failed", "done"]
    done = review.images[1]
    assert done.entry.report is not None and done.entry.report["tile_map"]["refine"]["states"]
    assert len(done.scan.regions) == 3
    for iv in review.images:  # the table links to every section
        assert f'href="#{iv.anchor}"' in page and f'id="{iv.anchor}"' in page
    assert 'class="l failed"' in page and review.images[0].entry.error
    assert len(_imgs(page)) == 1 + 3
    # a journal file names the same runs
    journal = next(batch_dir.glob("refine-journal*.jsonl"))
    again = review_runs([str(journal)], str(tmp_path / "j.html"), top=1, crop=128)
    assert [iv.entry.name for iv in again.images] == [iv.entry.name for iv in review.images]


CHECK = ('<script>window.addEventListener("load",function(){var im=document.images,ok=0;'
         'for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)ok++;}'
         'var d=document.createElement("div");d.id="imgcheck";d.textContent="loaded "+ok+" of "+im.length;'
         "document.body.appendChild(d);});</script>")


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.mark.skipif(_chromium() is None, reason="no Chromium here (apt-get install chromium)")
def test_review_page_in_headless_chromium(scene_run, tmp_path):
    """Every picture decodes in a real browser and the page is not blank (the check runs in a copy)."""
    out = tmp_path / "review.html"
    review_runs([str(scene_run / "run.json")], str(out), top=3, crop=256)
    page = out.read_text()
    (tmp_path / "check.html").write_text(page.replace("</body>", CHECK + "</body>"))
    shot = tmp_path / "shot.png"
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
            "--window-size=1200,900", f"--screenshot={shot}", "--dump-dom",
            (tmp_path / "check.html").as_uri()]
    proc = subprocess.run([str(_chromium()), *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    m = re.search(r'id="imgcheck">loaded (\d+) of (\d+)<', proc.stdout)
    assert m, proc.stderr[-2000:]
    assert m.group(1) == m.group(2) == str(1 + 3)
    pic = cv2.imread(str(shot))
    assert pic is not None and pic.shape[:2] == (900, 1200)
    # not blank: the tile map and the text make a varied picture, not one colour
    assert pic.std() > 20 and len(np.unique(pic.reshape(-1, 3)[::7], axis=0)) > 200
