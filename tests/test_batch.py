"""``refine batch``: pairing, plan, journal, resume, failure isolation, shards, NDJSON, Dask, SIGINT."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import popen_interruptible, write_png
from refine_cli import batch as lib
from refine_cli.config import RefineConfig
from refine_cli.errors import DependencyError, UsageError
from refine_cli.io.writers import TMP_SUFFIX

FAST = ("--method", "guided", "--threads", "1")
COARSE = ("--method", "coarse", "--threads", "1")


def make_pair(folder: Path, stem: str, seed: int, shape=(200, 300), mask_name: str | None = None) -> Path:
    """An RGB PNG with a disc and its coarse (quarter-size) mask; returns the image path."""
    rng = np.random.default_rng(seed)
    h, w = shape
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2 - seed) ** 2 < (h / 3) ** 2
    img[disc] += 150
    write_png(folder / f"{stem}.png", img)
    small = disc[::4, ::4].astype(np.uint8) * 255
    if mask_name is not None:
        write_png(folder / mask_name, small)
    return folder / f"{stem}.png"


@pytest.fixture
def data(tmp_path):
    """Three images with ``_mask`` masks beside them."""
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        make_pair(d, f"im{i}", i, mask_name=f"im{i}_mask.png")
    return d


@pytest.fixture
def bcli(cli):
    """Run ``refine batch ARGS``; returns ``(exit code, stdout, stderr)``."""
    return lambda *args: cli("batch", *args)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def journal(outdir: Path, name: str = lib.JOURNAL_NAME) -> list[dict]:
    """The input records of a journal (claim lines left out)."""
    lines = [json.loads(line) for line in (outdir / name).read_text().splitlines() if line.strip()]
    return [rec for rec in lines if "claim" not in rec]


def ndjson(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def tree(outdir: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of the outputs (journals left out)."""
    return {str(p.relative_to(outdir)): sha(p) for p in sorted(outdir.rglob("*"))
            if p.is_file() and not p.name.startswith("refine-journal")}


# ------------------------------------------------------------------------------------------ pairing


def test_pairing_by_suffix(data, tmp_path):
    items = lib.plan_batch(str(data), tmp_path / "out", config=RefineConfig(), outputs=lib.OutputOptions(),
                           mask_suffix="_mask")
    assert [Path(it.image).name for it in items] == ["im0.png", "im1.png", "im2.png"]
    assert [Path(it.mask).name for it in items] == ["im0_mask.png", "im1_mask.png", "im2_mask.png"]
    assert [it.key for it in items] == ["im0.refined.tif", "im1.refined.tif", "im2.refined.tif"]
    assert all(it.skip is None and it.error is None for it in items)


def test_pairing_by_mask_dir_and_missing_mask(tmp_path):
    imgs, masks = tmp_path / "imgs", tmp_path / "masks"
    imgs.mkdir()
    masks.mkdir()
    make_pair(imgs, "a", 0)
    make_pair(imgs, "b", 1)
    make_pair(masks, "tmp", 0, mask_name="a.tif")  # mask of a (other extension)
    (masks / "tmp.png").unlink()
    items = lib.plan_batch(str(imgs), tmp_path / "out", config=RefineConfig(), outputs=lib.OutputOptions(),
                           mask_dir=masks)
    by = {Path(it.image).stem: it for it in items}
    assert Path(by["a"].mask) == masks / "a.tif"
    assert by["b"].mask is None and "no coarse mask" in by["b"].skip and "segmenter" in by["b"].skip


def test_pairing_segmenter_method_runs_without_mask(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    make_pair(d, "a", 0)
    items = lib.plan_batch(str(d), tmp_path / "out", config=RefineConfig(segmenter="some-net"),
                           outputs=lib.OutputOptions())
    assert items[0].mask is None and items[0].skip is None


def test_pairing_by_csv_and_glob(data, tmp_path, bcli):
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,mask,out\nimgs/im0.png,imgs/im1_mask.png,sub/first.png\n"
                   "# comment\n\nimgs/im2.png,imgs/im2_mask.png\nimgs/im1.png,\n")
    items = lib.plan_batch(None, tmp_path / "out", config=RefineConfig(),
                           outputs=lib.OutputOptions(report=True), pairs=csv)
    by = {Path(it.image).name: it for it in items}
    assert by["im0.png"].mask == str(data / "im1_mask.png")
    assert by["im0.png"].outputs() == {"mask": "sub/first.png", "report": "sub/first.report.json"}
    assert by["im2.png"].outputs() == {"mask": "im2.refined.tif", "report": "im2.report.json"}
    assert by["im1.png"].mask is None and by["im1.png"].skip

    code, out, _ = bcli(f"{data}/im[01].png", "--mask-suffix", "_mask", "-o", tmp_path / "out", "--list")
    assert code == 0
    rows = [line.split("\t") for line in out.splitlines()]
    assert [Path(r[0]).name for r in rows] == ["im0.png", "im1.png"]
    assert [Path(r[1]).name for r in rows] == ["im0_mask.png", "im1_mask.png"]
    assert not (tmp_path / "out").exists(), "--list must not create anything"


def test_glob_mirrors_tree_and_collisions_fail(tmp_path):
    root = tmp_path / "data"
    for sub in ("x", "y"):
        (root / sub).mkdir(parents=True)
        make_pair(root / sub, "a", 0, mask_name="a_mask.png")
    make_pair(root / "x", "a_copy", 1, mask_name="a_copy_mask.png")
    (root / "x" / "a_copy.png").rename(root / "x" / "a.jpg")  # a.png and a.jpg both -> a.refined.tif
    items = lib.plan_batch(f"{root}/**/*.*", tmp_path / "out", config=RefineConfig(),
                           outputs=lib.OutputOptions(), mask_suffix="_mask")
    by = {it.image: it for it in items}
    assert by[str(root / "y" / "a.png")].key == "y/a.refined.tif"
    assert by[str(root / "y" / "a.png")].error is None
    clashing = [by[str(root / "x" / "a.png")], by[str(root / "x" / "a.jpg")]]
    assert all(it.error and "would also be written" in it.error for it in clashing)
    assert len({it.key for it in items}) == len(items)


def test_usage_errors(data, tmp_path, bcli):
    out = tmp_path / "out"
    cases = [
        ((data, "-o", out), "needs coarse masks"),
        ((data, "--pairs", tmp_path / "p.csv", "-o", out), "--pairs"),
        ((data, "--mask-suffix", "_mask", "-o", out, "--shard", "3/2"), "--shard"),
        ((data, "--mask-suffix", "_mask", "-o", out, "--gpus-per-worker", "1"), "--scheduler"),
        ((tmp_path / "nope", "--mask-suffix", "_mask", "-o", out), "does not exist"),
        ((data, "--mask-suffix", "_mask", "-o", out, "--scheduler", "bogus"), "--scheduler"),
    ]
    for args, text in cases:
        code, _, err = bcli(*args, *FAST)
        assert code == 2, (args, err)
        assert text in err and "Traceback" not in err


# ----------------------------------------------------------------------------------- plan, dry run


def test_dry_run_prints_plan_and_memory_without_running(data, tmp_path, bcli):
    out = tmp_path / "out"
    code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", out, "--dry-run", "--json", *FAST)
    assert code == 0, err
    rows = ndjson(stdout)
    assert [r["action"] for r in rows] == ["run"] * 3
    for r in rows:
        mem = r["memory"]
        assert mem["shape"] == [200, 300]
        assert 0 < mem["estimate_bytes"] <= mem["budget"] == 2 * 1024**3
    assert "3 to run" in err
    assert not out.exists()

    plan = lib.plan_file_memory(str(data / "im0.png"), RefineConfig(max_memory=1024**3), lib.OutputOptions())
    assert plan.budget == 1024**3 and plan.total <= plan.budget
    assert lib.image_shape(str(data / "im0_mask.png")) == (50, 75)


def test_dry_run_memory_plan_is_the_runs(data, tmp_path, bcli, cli):
    """The dry run plans with the run's planner and counts the decoded PNGs the run holds."""
    code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", tmp_path / "out", "--dry-run", "--json", *FAST)
    assert code == 0, err
    planned = {Path(r["image"]).name: r["memory"]["estimate_bytes"] for r in ndjson(stdout)}
    code, stdout, err = cli("run", data / "im0.png", "--mask", data / "im0_mask.png", "-o", tmp_path / "r.tif",
                            "--json", "-q", *FAST)
    assert code == 0, err
    assert planned["im0.png"] == json.loads(stdout)["memory_plan"]["estimate_bytes"]


def test_dry_run_summary_counts_planned_failures_and_exits_like_the_run(data, tmp_path, bcli):
    out = tmp_path / "out"
    (data / "im1.png").write_bytes(b"not an image")
    code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", out, "--dry-run", *FAST)
    rows = [line.split("\t") for line in stdout.splitlines()]
    assert [r[0] for r in rows] == ["run", "fail", "run"] and rows[1][3].startswith("error:")
    assert "2 to run" in err and "1 failing" in err and "0 failing" not in err
    assert code == 3 and "1 of 3 inputs would end failed" in err and "Traceback" not in err
    assert not out.exists()
    assert bcli(data, "--mask-suffix", "_mask", "-o", out, *FAST)[0] == 3, "the real run fails it too"
    code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", out, "--dry-run", *FAST)
    assert [line.split("\t")[0] for line in stdout.splitlines()] == ["keep"] * 3
    assert code == 3 and "(1 of them failed)" in err and "--retry-failed" in err

    csv = tmp_path / "pairs.csv"  # a planning error: two inputs would write one file
    csv.write_text("imgs/im0.png,imgs/im0_mask.png,same.tif\nimgs/im2.png,imgs/im2_mask.png,same.tif\n")
    code, stdout, err = bcli("--pairs", csv, "-o", tmp_path / "other", "--dry-run", "--json", *FAST)
    assert [r["action"] for r in ndjson(stdout)] == ["fail", "fail"]
    assert code == 3 and "2 failing" in err and "2 of 2 inputs would end failed" in err


# ------------------------------------------------------------------------------ journal and resume


def test_journal_records_and_resume(data, tmp_path, bcli):
    out = tmp_path / "out"
    code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", out, "--uncertainty", "--report", "--json",
                             *FAST)
    assert code == 0, err
    recs = journal(out)
    assert [r["status"] for r in recs] == ["done"] * 3
    chash = lib.config_hash(RefineConfig(method="guided", threads=1),
                            lib.OutputOptions(uncertainty=True, report=True))
    for r in recs:
        assert r["v"] == 1 and r["config_hash"] == chash and r["error"] is None
        img = Path(r["image"]["path"])
        assert r["image"]["size"] == img.stat().st_size and r["image"]["mtime_ns"] == img.stat().st_mtime_ns
        assert "sha256" not in r["image"]
        assert Path(r["mask"]["path"]).name == img.stem + "_mask.png"
        assert set(r["outputs"]) == {"mask", "uncertainty", "report"}
        for o in r["outputs"].values():
            assert sha(out / o["path"]) == o["sha256"] and (out / o["path"]).stat().st_size == o["bytes"]
        assert r["timings"]["wall_seconds"] > 0 and "refine" in r["timings"]["stages"]
        assert r["result"]["shape"] == [200, 300]
    assert [r["resumed"] for r in ndjson(stdout)] == [False] * 3
    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}

    code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", out, "--uncertainty", "--report", "--json",
                             *FAST)
    assert code == 0, err
    assert [r["resumed"] for r in ndjson(stdout)] == [True] * 3
    assert len(journal(out)) == 3, "kept inputs add no records"
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def _rerun_keys(bcli, data, out, *extra) -> set[str]:
    code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", out, "--json", *FAST, *extra)
    assert code == 0, err
    return {r["key"] for r in ndjson(stdout) if not r["resumed"]}


@pytest.mark.parametrize("change", ["mtime", "mask-size", "output-missing", "output-modified", "config"])
def test_resume_redoes_changed_inputs(data, tmp_path, bcli, change):
    out = tmp_path / "out"
    assert _rerun_keys(bcli, data, out) == {"im0.refined.tif", "im1.refined.tif", "im2.refined.tif"}
    extra: tuple[str, ...] = ()
    expect = {"im1.refined.tif"}
    if change == "mtime":
        st = (data / "im1.png").stat()
        os.utime(data / "im1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    elif change == "mask-size":
        write_png(data / "im1_mask.png", np.zeros((50, 75), np.uint8))
    elif change == "output-missing":
        (out / "im1.refined.tif").unlink()
    elif change == "output-modified":
        with open(out / "im1.refined.tif", "ab") as fh:
            fh.write(b"\0")
    else:
        extra = ("--eps", "0.05", "--overwrite")  # without --overwrite it stops: see the tests below
        expect = {"im0.refined.tif", "im1.refined.tif", "im2.refined.tif"}
    assert _rerun_keys(bcli, data, out, *extra) == expect
    assert _rerun_keys(bcli, data, out, *extra) == set()
    for rec in lib.merge_journals(out).latest.values():
        assert sha(out / rec["outputs"]["mask"]["path"]) == rec["outputs"]["mask"]["sha256"]


def test_changed_method_stops_before_replacing_done_outputs(data, tmp_path, bcli):
    out = tmp_path / "out"
    assert bcli(data, "--mask-suffix", "_mask", "-o", out, *FAST)[0] == 0
    before, journal_bytes = tree(out), (out / lib.JOURNAL_NAME).read_bytes()
    for extra in ((), ("--json",), ("--dry-run",)):
        code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", out, *COARSE, *extra)
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == (2 if extra == ("--dry-run",) else 1), err
        assert lines[-1].startswith("error: 3 of 3 inputs were done with method guided, not coarse, and "
                                    "their outputs are still in "), err
        assert "(first: im0.refined.tif)" in lines[-1] and "--overwrite" in lines[-1]
        assert "--force" in lines[-1] and "another -o OUTDIR" in lines[-1]
        if extra == ("--dry-run",):
            assert [line.split("\t")[0] for line in stdout.splitlines()] == ["conflict"] * 3
            assert "3 would replace earlier outputs" in lines[0]
        else:
            assert stdout == ""
        assert tree(out) == before, "outputs untouched"
        assert (out / lib.JOURNAL_NAME).read_bytes() == journal_bytes, "nothing recorded, not even a claim"
    # output options are part of the configuration too
    code, _, err = bcli(data, "--mask-suffix", "_mask", "-o", out, *FAST, "--soft")
    assert code == 2 and "done with other settings of method guided and" in err
    # the same configuration still resumes
    code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", out, "--json", *FAST)
    assert code == 0 and [r["resumed"] for r in ndjson(stdout)] == [True] * 3
    assert tree(out) == before


@pytest.mark.parametrize("flag", ["--overwrite", "--force"])
def test_changed_method_replaces_with_overwrite_or_force(data, tmp_path, bcli, flag):
    out = tmp_path / "out"
    assert bcli(data, "--mask-suffix", "_mask", "-o", out, *FAST)[0] == 0
    before = tree(out)
    assert bcli(data, "--mask-suffix", "_mask", "-o", out, *COARSE)[0] == 2, "without the flag it stops"
    assert tree(out) == before
    code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", out, "--json", flag, *COARSE)
    assert code == 0, err
    recs = ndjson(stdout)
    assert [r["resumed"] for r in recs] == [False] * 3
    assert {r["result"]["method"] for r in recs} == {"coarse"}
    assert tree(out) != before
    for rec in lib.merge_journals(out).latest.values():
        assert sha(out / rec["outputs"]["mask"]["path"]) == rec["outputs"]["mask"]["sha256"]
    assert _rerun_keys(bcli, data, out, *COARSE) == set(), "then the new configuration resumes"


def test_changed_method_after_killed_run_replaces_only_unrecorded_outputs(data, tmp_path, bcli):
    """Outputs that only a claim line names (a run killed before their record) are debris: they are redone."""
    out = tmp_path / "out"
    assert bcli(data, "--mask-suffix", "_mask", "-o", out, *FAST)[0] == 0
    path = out / lib.JOURNAL_NAME
    lines = path.read_text().splitlines()
    path.write_text("\n".join(ln for ln in lines if '"im1.refined.tif","status"' not in ln) + "\n")
    (out / "im1.refined.tif").write_bytes(b"half-finished by a killed run")
    code, _, err = bcli(data, "--mask-suffix", "_mask", "-o", out, *COARSE)
    assert code == 2 and "2 of 3 inputs were done" in err and "(first: im0.refined.tif)" in err
    assert (out / "im1.refined.tif").read_bytes() == b"half-finished by a killed run"

    assert '"claim"' in lines[0]
    path.write_text(lines[0] + "\n")  # killed before its first record: nothing is vouched for
    code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", out, "--json", *COARSE)
    assert code == 0, err
    assert [(r["status"], r["resumed"], r["result"]["method"]) for r in ndjson(stdout)] == \
        [("done", False, "coarse")] * 3


def test_changed_method_check_reads_every_shard_journal(data, tmp_path, bcli):
    out = tmp_path / "out"
    for i in (1, 2):
        assert bcli(data, "--mask-suffix", "_mask", "-o", out, "--shard", f"{i}/2", *FAST)[0] == 0
    before = tree(out)
    code, _, err = bcli(data, "--mask-suffix", "_mask", "-o", out, *COARSE)
    assert code == 2 and "3 of 3 inputs were done with method guided" in err
    assert not (out / lib.JOURNAL_NAME).exists(), "the stopped run leaves no journal of its own"
    code, _, err = bcli(data, "--mask-suffix", "_mask", "-o", out, "--shard", "2/2", *COARSE)
    assert code == 2 and "1 of 1 input was done with method guided" in err and "(im1.refined.tif)" in err
    assert tree(out) == before


def test_verify_inputs_detects_same_size_same_mtime_edit(data, tmp_path, bcli):
    import tifffile

    out = tmp_path / "out"
    mask = np.zeros((50, 75), np.uint8)
    mask[10:40, 20:60] = 255
    (data / "im2_mask.png").unlink()
    tifffile.imwrite(data / "im2_mask.tif", mask)  # uncompressed: an edit keeps the size
    assert len(_rerun_keys(bcli, data, out, "--verify-inputs")) == 3
    rec = {r["key"]: r for r in journal(out)}["im2.refined.tif"]
    assert rec["image"]["sha256"] == sha(data / "im2.png")
    assert rec["mask"]["sha256"] == sha(data / "im2_mask.tif")
    st = (data / "im2_mask.tif").stat()
    mask[10:40, 20:30] = 0
    tifffile.imwrite(data / "im2_mask.tif", mask)
    os.utime(data / "im2_mask.tif", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (data / "im2_mask.tif").stat().st_size == st.st_size
    assert _rerun_keys(bcli, data, out) == set(), "size+mtime alone cannot see it"
    assert _rerun_keys(bcli, data, out, "--verify-inputs") == {"im2.refined.tif"}


def test_bad_input_fails_alone_then_retry_and_force(data, tmp_path, bcli):
    out = tmp_path / "out"
    good = (data / "im1.png").read_bytes()
    (data / "im1.png").write_bytes(good[:200])  # truncated PNG
    code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", out, "--json", *FAST)
    assert code == 3, err
    recs = {r["key"]: r for r in journal(out)}
    assert recs["im1.refined.tif"]["status"] == "failed"
    assert recs["im1.refined.tif"]["error"] and "\n" not in recs["im1.refined.tif"]["error"]
    assert recs["im1.refined.tif"]["error_type"] == "InputError"
    assert recs["im0.refined.tif"]["status"] == recs["im2.refined.tif"]["status"] == "done"
    assert not (out / "im1.refined.tif").exists()
    assert "1 of 3 inputs failed" in err

    code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", out, "--json", *FAST)
    assert code == 3, "a failure stays until retried"
    assert all(r["resumed"] for r in ndjson(stdout))
    code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", out, "--json", "--retry-failed", *FAST)
    assert code == 3 and [r["key"] for r in ndjson(stdout) if not r["resumed"]] == ["im1.refined.tif"]

    (data / "im1.png").write_bytes(good)  # fixed: new size and mtime, so it runs without --retry-failed
    code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", out, "--json", *FAST)
    assert code == 0, err
    assert [r["key"] for r in ndjson(stdout) if not r["resumed"]] == ["im1.refined.tif"]
    before = len(journal(out))
    code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", out, "--json", "--force", *FAST)
    assert code == 0 and not any(r["resumed"] for r in ndjson(stdout))
    assert len(journal(out)) == before + 3


def test_several_bad_inputs_fail_alone_with_one_line_reasons(tmp_path, bcli):
    """A corrupt image, a mask of another aspect ratio and an empty file fail; the good inputs finish."""
    d, out = tmp_path / "imgs", tmp_path / "out"
    d.mkdir()
    for i in range(5):
        make_pair(d, f"im{i}", i, mask_name=f"im{i}_mask.png")
    png = bytearray((d / "im1.png").read_bytes())
    png[60:160] = bytes(100)  # inside the compressed data
    (d / "im1.png").write_bytes(bytes(png))
    write_png(d / "im2_mask.png", np.zeros((50, 50), np.uint8))
    (d / "im3.png").write_bytes(b"")
    code, stdout, err = bcli(d, "--mask-suffix", "_mask", "-o", out, "--json", *FAST)
    assert code == 3, err
    assert "Traceback" not in err and "3 of 5 inputs failed" in err
    recs = {r["key"]: r for r in journal(out)}
    assert len(journal(out)) == 5
    reasons = {"im1": "corrupt", "im2": "aspect ratio", "im3": "empty"}
    for stem, reason in reasons.items():
        rec = recs[f"{stem}.refined.tif"]
        assert rec["status"] == "failed" and rec["error_type"] == "InputError", rec
        assert "\n" not in rec["error"] and reason in rec["error"], rec["error"]
        assert not (out / f"{stem}.refined.tif").exists()
    for stem in ("im0", "im4"):
        assert recs[f"{stem}.refined.tif"]["status"] == "done"
        assert tifffile.imread(out / f"{stem}.refined.tif").shape == (200, 300)
    assert sorted(r["status"] for r in ndjson(stdout)) == ["done", "done", "failed", "failed", "failed"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(TMP_SUFFIX)]


def test_fail_fast_stops_at_first_failure(data, tmp_path, bcli):
    out = tmp_path / "out"
    (data / "im0.png").write_bytes(b"not an image at all")
    code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", out, "--json", "--fail-fast", *FAST)
    assert code == 3
    assert [r["status"] for r in journal(out)] == ["failed"]
    assert "--fail-fast" in err


def test_existing_foreign_output_needs_overwrite(data, tmp_path, bcli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "im0.refined.tif").write_bytes(b"someone else's file")
    code, _, err = bcli(data, "--mask-suffix", "_mask", "-o", out, *FAST)
    assert code == 3 and "--overwrite" in {r["key"]: r for r in journal(out)}["im0.refined.tif"]["error"]
    assert (out / "im0.refined.tif").read_bytes() == b"someone else's file"
    code, _, err = bcli(data, "--mask-suffix", "_mask", "-o", out, "--overwrite", *FAST)
    assert code == 0, err


def test_corrupt_and_truncated_journal_lines_are_ignored(data, tmp_path, bcli):
    out = tmp_path / "out"
    assert len(_rerun_keys(bcli, data, out)) == 3
    lines = [ln for ln in (out / lib.JOURNAL_NAME).read_text().splitlines() if '"claim"' not in ln]
    broken = [lines[0], "{this is not json", lines[1][:10] + "\x00garbage", lines[2][: len(lines[2]) // 2]]
    (out / lib.JOURNAL_NAME).write_text("\n".join(broken))  # no final newline: a killed writer
    records, problems, claimed = lib.read_journal(out / lib.JOURNAL_NAME)
    assert len(records) == 1 and len(problems) == 3
    assert "truncated" in problems[-1] and "line 4" in problems[-1]
    assert claimed == {"im2.refined.tif"}, "the key of a truncated record is still legible"

    code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", out, "--json", *FAST)
    assert "ignored" in err and "Traceback" not in err
    recs = {r["key"]: r for r in ndjson(stdout)}
    assert recs["im0.refined.tif"]["resumed"]
    assert recs["im2.refined.tif"]["status"] == "done" and not recs["im2.refined.tif"]["resumed"]
    # nothing legible names im1 any more: its output counts as someone else's file
    assert code == 3 and recs["im1.refined.tif"]["error_type"] == "OutputExistsError"
    code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", out, "--json", "--overwrite", *FAST)
    assert code == 0, err
    assert [r["key"] for r in ndjson(stdout) if not r["resumed"]] == ["im1.refined.tif"]
    records, problems, _ = lib.read_journal(out / lib.JOURNAL_NAME)
    assert len(records) == 4 and len(problems) == 3, "new records start on a fresh line"


def test_claimed_output_without_record_is_replaced(data, tmp_path, bcli):
    """A run killed after writing an output but before its record (SIGKILL) leaves a claimed output."""
    out = tmp_path / "out"
    assert len(_rerun_keys(bcli, data, out)) == 3
    path = out / lib.JOURNAL_NAME
    lines = path.read_text().splitlines()
    assert '"claim"' in lines[0] and json.loads(lines[0])["claim"] == sorted(json.loads(lines[0])["claim"])
    path.write_text("\n".join(ln for ln in lines if '"im1.refined.tif","status"' not in ln) + "\n")
    (out / "im1.refined.tif").write_bytes(b"half-finished by a killed run")
    assert _rerun_keys(bcli, data, out) == {"im1.refined.tif"}
    path.write_text("\n".join(ln for ln in path.read_text().splitlines() if '"claim"' not in ln) + "\n")
    assert _rerun_keys(bcli, data, out) == set(), "claims only matter for outputs without a record"


def test_journal_is_locked_against_a_second_writer(tmp_path):
    with lib.Journal(tmp_path / lib.JOURNAL_NAME):
        with pytest.raises(UsageError, match="in use"):
            lib.Journal(tmp_path / lib.JOURNAL_NAME)
    lib.Journal(tmp_path / lib.JOURNAL_NAME).close()


def test_stale_temp_files_are_removed(data, tmp_path, bcli):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True)
    stale = out / f".im0.refined.tif.{int(dead.stdout)}.deadbeef{TMP_SUFFIX}"
    stale.write_bytes(b"half a file")
    code, _, err = bcli(data, "--mask-suffix", "_mask", "-o", out, *FAST)
    assert code == 0, err
    assert not stale.exists()


# ----------------------------------------------------------------------------------------- security


def test_pairs_csv_cannot_escape_outdir(data, tmp_path, bcli):
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (out / "link").symlink_to(outside, target_is_directory=True)
    (out / "file-link.tif").symlink_to(outside / "victim.tif")
    csv = tmp_path / "pairs.csv"
    m = "imgs/im0_mask.png"
    csv.write_text(f"imgs/im0.png,{m},../escaped.tif\n"
                   f"imgs/im1.png,{m},{tmp_path}/absolute.tif\n"
                   f"imgs/im2.png,{m},link/through-symlink.tif\n"
                   f"imgs/im0.png,{m},sub/../../dotdot.tif\n"
                   f"imgs/im1.png,{m},file-link.tif\n"
                   f"imgs/im2.png,{m},.hidden.tif\n"
                   f"imgs/im2.png,{m},fine/ok.tif\n")
    code, stdout, err = bcli("--pairs", csv, "-o", out, "--json", *FAST)
    assert code == 3, err
    recs = ndjson(stdout)
    failed = [r for r in recs if r["status"] == "failed"]
    assert len(failed) == 6 and all(r["error"] for r in failed)
    assert [r["outputs"]["mask"]["path"] for r in recs if r["status"] == "done"] == ["fine/ok.tif"]
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "escaped.tif").exists() and not (tmp_path / "absolute.tif").exists()
    assert not (tmp_path / "dotdot.tif").exists()
    with pytest.raises(UsageError):
        lib.resolve_output(out, "link/x.tif", create=True)


# ------------------------------------------------------------------------------------ shards, NDJSON


def test_shards_partition_and_journals_merge(tmp_path, bcli):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(7):
        make_pair(d, f"s{i}", i, shape=(64, 96), mask_name=f"s{i}_mask.png")
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert bcli(d, "--mask-suffix", "_mask", "-o", single, *FAST)[0] == 0
    seen: list[set[str]] = []
    for i in (1, 2, 3):
        code, stdout, err = bcli(d, "--mask-suffix", "_mask", "-o", sharded, "--shard", f"{i}/3", "--json",
                                 *FAST)
        assert code == 0, err
        keys = {r["key"] for r in ndjson(stdout)}
        assert keys == {r["key"] for r in journal(sharded, f"refine-journal.shard-{i}-of-3.jsonl")}
        assert all(r["shard"] == f"{i}/3" for r in ndjson(stdout))
        seen.append(keys)
    assert sum(len(s) for s in seen) == 7 and len(set().union(*seen)) == 7
    assert sorted(len(s) for s in seen) == [2, 2, 3]

    state = lib.merge_journals(sharded)
    merged, whole = state.latest, lib.merge_journals(single).latest
    assert not state.problems and merged.keys() == whole.keys()
    for key, rec in merged.items():
        assert rec["status"] == whole[key]["status"] == "done"
        assert rec["outputs"] == whole[key]["outputs"] and rec["config_hash"] == whole[key]["config_hash"]
    assert tree(sharded) == tree(single)
    code, stdout, _ = bcli(d, "--mask-suffix", "_mask", "-o", sharded, "--json", *FAST)
    assert code == 0 and all(r["resumed"] for r in ndjson(stdout)), "unsharded reruns resume from all shards"


def test_ndjson_on_stdout_and_humans_on_stderr(data, tmp_path, bcli):
    (data / "extra.png").write_bytes((data / "im0.png").read_bytes())  # no mask: skipped
    code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", tmp_path / "out", "--json", *FAST)
    assert code == 0, err
    lines = stdout.splitlines()
    assert len(lines) == 4
    recs = [json.loads(line) for line in lines]
    assert sorted(r["status"] for r in recs) == ["done", "done", "done", "skipped"]
    assert "1 skipped" in err and "{" not in err


def test_assign_gpus_ranks_workers_per_host():
    got = lib.assign_gpus(["tcp://10.0.0.2:4001", "tcp://10.0.0.1:5000", "tcp://10.0.0.2:3999",
                           "tcp://10.0.0.1:4000"], 2)
    assert got == {"tcp://10.0.0.1:4000": [0, 1], "tcp://10.0.0.1:5000": [2, 3],
                   "tcp://10.0.0.2:3999": [0, 1], "tcp://10.0.0.2:4001": [2, 3]}
    assert lib.parse_shard("2/5") == (2, 5)
    for bad in ("0/3", "4/3", "x", "1/0", "1/2/3"):
        with pytest.raises(UsageError):
            lib.parse_shard(bad)


# ---------------------------------------------------------------------------------------------- Dask


def test_scheduler_without_dask_names_the_extra(data, tmp_path, bcli, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    code, _, err = bcli(data, "--mask-suffix", "_mask", "-o", tmp_path / "out", "--scheduler", "local:1",
                        *FAST)
    assert code == 2
    assert 'pip install "refine-cli' in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    with pytest.raises(DependencyError) as info:
        lib.run_batch([], lib.BatchJob(outdir=tmp_path / "out"), scheduler="local:1")
    assert 'pip install "refine-cli[distributed]"' in str(info.value)


def test_dask_local_cluster_matches_local_run(data, tmp_path, bcli):
    distributed = pytest.importorskip("distributed")
    (data / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (data / "bad_mask.png").write_bytes((data / "im0_mask.png").read_bytes())
    local, remote = tmp_path / "local", tmp_path / "dask"
    code, _, err = bcli(data, "--mask-suffix", "_mask", "-o", local, "--uncertainty", *FAST)
    assert code == 3, err
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None,
                                  protocol="tcp", host="127.0.0.1") as cluster:
        code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", remote, "--uncertainty", "--json",
                                 "--scheduler", cluster.scheduler_address, "--gpus-per-worker", "1", *FAST)
        assert code == 3, err
        assert len(ndjson(stdout)) == 4
        code, stdout, err = bcli(data, "--mask-suffix", "_mask", "-o", remote, "--json", "--uncertainty",
                                 "--scheduler", cluster.scheduler_address, *FAST)
        assert code == 3 and all(r["resumed"] for r in ndjson(stdout))
    assert tree(remote) == tree(local) and len(tree(local)) == 6
    a, b = lib.merge_journals(local).latest, lib.merge_journals(remote).latest
    assert a.keys() == b.keys()
    for key in a:
        for field in ("status", "outputs", "config_hash", "image", "mask", "error", "error_type"):
            assert a[key][field] == b[key][field], (key, field)


# ------------------------------------------------------------------------------------------- SIGINT


def test_sigint_flushes_journal_and_resume_is_identical(tmp_path, bcli):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(14):
        make_pair(d, f"k{i:02d}", i, shape=(400, 600), mask_name=f"k{i:02d}_mask.png")
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = [str(d), "--mask-suffix", "_mask", "--uncertainty", *FAST, "--no-skip", "--tile-size", "128",
            "--overlap", "16"]
    cmd = [sys.executable, "-m", "refine_cli", "batch", *args, "-o", str(out), "-q"]
    proc = popen_interruptible(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path))
    jpath = out / lib.JOURNAL_NAME
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if jpath.exists() and lib.read_journal(jpath)[0]:  # the first input record is on disk
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the batch ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert b"interrupted" in err and b"Traceback" not in err
    records, problems, _ = lib.read_journal(jpath)
    assert not problems and 1 <= len(records) < 14
    assert all(r["status"] == "done" for r in records)
    assert not [p for p in out.rglob("*") if p.name.endswith(TMP_SUFFIX)]
    recorded = {o["path"] for r in records for o in r["outputs"].values()}
    assert set(tree(out)) == recorded, "no output without a done record"

    code, stdout, err = bcli(*args, "-o", out, "--json")
    assert code == 0, err
    resumed = [r for r in ndjson(stdout) if r["resumed"]]
    assert len(resumed) == len(records)
    assert bcli(*args, "-o", ref)[0] == 0
    assert tree(out) == tree(ref) and len(tree(ref)) == 28


# ---------------------------------------------------------------------------------- shared options


def test_run_options_defaults_match_config_and_flags_are_declared():
    import inspect

    from refine_cli.commands.batch import batch_cmd
    from refine_cli.commands.options import OPTIONS, RunOptions, run_options

    assert RunOptions().config() == RefineConfig()
    params = inspect.signature(batch_cmd).parameters
    assert set(OPTIONS) <= set(params) and "opts" not in params
    assert list(params)[-3:] == ["verbose", "quiet", "debug"]
    cfg = RunOptions(method="coarse", no_skip=True, max_memory="1G", eps=0.2, bands="3,2,1").config()
    assert (cfg.method, cfg.skip_uniform, cfg.max_memory, cfg.guided.eps) == ("coarse", False, 1024**3, 0.2)
    assert RunOptions(bands="3,2,1").band_indices() == (2, 1, 0)
    with pytest.raises(TypeError):
        run_options(lambda method: None)


def test_shared_options_are_the_same_flags_in_run_and_batch():
    import typer

    from refine_cli import cli
    from refine_cli.commands.batch import register
    from refine_cli.commands.options import OPTIONS

    register(cli.app)
    group = typer.main.get_command(cli.app)
    run = {p.name: p for p in group.commands["run"].params}
    batch = {p.name: p for p in group.commands["batch"].params}
    for name in OPTIONS:
        assert (run[name].opts, run[name].default, run[name].is_flag) == \
            (batch[name].opts, batch[name].default, batch[name].is_flag), name
