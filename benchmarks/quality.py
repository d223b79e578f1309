"""Quality benchmark: every available refiner on every evaluation set -> IoU, mBA, boundary F, s/MPx.

Methods come from the refiner registry (``refine_cli.refiners.list_refiners``);
each is probed on a tiny image first and reported as ``unavailable: <reason>``
when it cannot run (missing weights, missing optional package). The null
refiner ``coarse`` (the coarse mask resampled to the image) is the baseline.

Data sets (each case has an image, a GT and coarse masks of several kinds):

* ``synthetic``: analytic scenes of ``refine_cli.devtools.synthetic`` (exact GT;
  needs no data, so ``--quick`` runs anywhere).
* ``shapes`` / ``portrait-comp``: composites of real photos with exact GT,
  written by ``benchmarks/make_composites.py`` (24 shape and 8 portrait cases,
  1024 px, in full mode).
* ``p3m``: the 8 real P3M portraits; the alpha mattes are *pseudo*-GT (P3M-Net
  output), so treat absolute numbers with care.
* ``nuclei``: the DSB2018 fluorescence image with hand-annotated nuclei (GT = label > 0).

Coarse kinds: ``lowres`` (block-averaged by 8, stored small so that ``refine run``
upsamples it; the composites store theirs upsampled, factor 4-32),
``perturbed`` (CascadePSP's training perturbation, target IoU 0.8-1) and
``segmenter`` (MediaPipe selfie segmentation, portraits only; skipped with a
logged reason while ``ai_edge_litert`` is not importable).

Every case runs through ``refine_cli.api.refine_file`` (the code path of
``refine run``) and is scored by ``refine_cli.evaluation_io.evaluate_pair``
(that of ``refine eval``). **Harm** is counted per case: a run harms when its IoU is more than
:data:`HARM_IOU` (0.5 points) below the IoU of the coarse mask it started from (the ``coarse``
method on the same case and coarse kind); every table gives, per method, data set and coarse
kind, the harm count and the worst case (lowest IoU and largest IoU loss). Seconds per
megapixel are the runs' wall time (opening files, refining, writing) over the image sizes.
Nothing is asserted: the numbers are printed, written as JSON and Markdown and plotted.

Time budget (``--max-minutes``, default 55): each method gets an equal share of
what is left; a method that runs out of its share stops and is marked
``partial n/N`` (cases run round-robin across data sets, so a partial method
still covers each of them).

Usage::

    python benchmarks/quality.py [--quick] [--out benchmarks/results] [--work DIR] [--methods a,b]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from refine_cli.errors import RefineError

log = logging.getLogger("quality")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SEGMENTER_MODEL = SHARED / "weights" / "mediapipe-selfie-segmentation" / "selfie_segmentation.tflite"
METRICS = ("iou", "mba", "boundary_f")
COARSE_KINDS = ("lowres", "perturbed", "segmenter")
COMPOSITES = ("shapes", "portrait-comp")  # exact-GT composites, pooled as "the composites benchmark"
HARM_IOU = 0.005
"""A run *harms* its case when its IoU is more than this below the coarse mask's IoU (0.5 points)."""


# ---------------------------------------------------------------------------------------------- helpers


def select_methods(spec: str | None) -> list[str] | None:
    """The registry's methods, or the comma-separated subset ``spec``, baseline ``coarse`` first.

    Returns ``None`` (after logging the registry's names) when ``spec`` names an unknown method.
    """
    from refine_cli.refiners import list_refiners

    methods = list_refiners()
    if spec:
        wanted = [m.strip() for m in spec.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in methods]
        if unknown:
            log.error("unknown method(s) %s; the registry has %s", ", ".join(unknown), ", ".join(methods))
            return None
        methods = wanted
    if "coarse" in methods:
        methods = ["coarse"] + [m for m in methods if m != "coarse"]
    return methods


def parse_variant(spec: str) -> tuple[str, Any]:
    """``LABEL=METHOD[,GROUP.FIELD=VALUE ...]`` -> ``(label, RefineConfig)``.

    A variant is a registered method with other options, run under its own label beside the
    others, e.g. ``lite-v2=cascade,cascade.weights=runs/a/best.pt`` or
    ``magnet-binary=magnet-fast,magnet.preset=binary``. Values are JSON when they parse, else text.
    """
    import dataclasses

    from refine_cli.config import RefineConfig

    label, _, rest = spec.partition("=")
    method, *assignments = [p.strip() for p in rest.split(",")]
    if not label or not method:
        raise SystemExit(f"--variant {spec!r}: use LABEL=METHOD[,GROUP.FIELD=VALUE ...]")
    config = RefineConfig(method=method)
    for item in assignments:
        key, _, text = item.partition("=")
        try:
            value: Any = json.loads(text)
        except json.JSONDecodeError:
            value = text
        group, _, name = key.partition(".")
        try:
            if name:
                config = dataclasses.replace(config, **{group: dataclasses.replace(getattr(config, group),
                                                                                    **{name: value})})
            else:
                config = dataclasses.replace(config, **{group: value})
        except (AttributeError, TypeError) as exc:
            raise SystemExit(f"--variant {spec!r}: {key} is not an option ({exc})") from None
    return label, config


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory and library versions of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    versions = {"python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__}
    for name in ("torch", "pydensecrf"):
        try:
            mod = __import__(name)
            versions[name] = str(getattr(mod, "__version__", "installed"))
        except ImportError:
            versions[name] = "absent"
    cuda = None
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            cuda = torch.cuda.get_device_name(0)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "platform": platform.platform(),
            "cuda": cuda, "versions": versions, "load_average": list(os.getloadavg())}


def write_png(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 grey or RGB array as PNG."""
    data = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    if not cv2.imwrite(str(path), data):
        raise OSError(f"cannot write {path}")
    return path


def to_u8(prob: np.ndarray) -> np.ndarray:
    """float ``[0, 1]`` -> uint8 ``0..255``."""
    return np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)


def lowres(prob: np.ndarray, factor: int) -> np.ndarray:
    """Block mean by ``factor`` (edge blocks average their valid pixels): ``(ceil(h/f), ceil(w/f))``."""
    from refine_cli.train.data import block_mean

    return block_mean(prob.astype(np.float32), factor)


def perturbed(prob: np.ndarray, seed: list[int]) -> np.ndarray:
    """CascadePSP's training perturbation of ``prob >= 0.5`` (strength 1), deterministic in ``seed``."""
    from refine_cli.train.data import perturb

    coarse, _ = perturb(prob.astype(np.float32), "cascadepsp", np.random.default_rng(seed), 1.0)
    return coarse


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    """One evaluation image.

    Attributes:
        dataset: data-set name.
        name: case name (unique within the data set).
        image: image path.
        gt: ground-truth path.
        coarse: coarse-mask path per kind.
        megapixels: image size, MPx.
    """

    dataset: str
    name: str
    image: Path
    gt: Path
    coarse: dict[str, Path]
    megapixels: float


@dataclass
class DataSet:
    """A data set and what was left out of it.

    Attributes:
        name: data-set name.
        cases: its cases.
        note: one line on what the GT is.
        skipped: ``{coarse kind or 'all': reason}``.
    """

    name: str
    cases: list[Case] = field(default_factory=list)
    note: str = ""
    skipped: dict[str, str] = field(default_factory=dict)


class Segmenter:
    """The MediaPipe selfie segmenter (``refine_cli.segmenters``, TFLite): person-probability coarse masks."""

    def __init__(self) -> None:
        self.reason = ""
        self._seg: Any = None
        if not SEGMENTER_MODEL.is_file():
            self.reason = f"segmenter model {SEGMENTER_MODEL} not found"
            return
        try:
            from refine_cli.segmenters import load_segmenter

            self._seg = load_segmenter(SEGMENTER_MODEL, "cpu")
        except (ImportError, RefineError) as exc:  # no segmenters package yet, or no ai_edge_litert
            self.reason = f"{type(exc).__name__}: {exc}"

    @property
    def available(self) -> bool:
        """Whether the model can run here."""
        return self._seg is not None

    def coarse(self, rgb: np.ndarray, long_side: int = 256) -> np.ndarray:
        """Person probability of ``(h, w, 3)`` uint8 RGB, long side ``long_side``, the image's aspect ratio.

        The model sees the image resized to its input size (256 x 256) and answers
        a probability of that size, resized back to the image's aspect ratio: a
        low-resolution mask that ``refine run`` upsamples.
        """
        probs = self._seg.predict(self._seg.resize(rgb, self._seg.input_size)[None])  # (1, 2, 256, 256)
        person = probs[0, list(self._seg.classes).index("person")].astype(np.float32)
        h, w = rgb.shape[:2]
        s = long_side / max(h, w)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        return np.clip(cv2.resize(person, size, interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


def synthetic_set(work: Path, n: int, side: int) -> DataSet:
    """Analytic scenes: exact GT, coarse ``lowres`` (1/8, stored small) and ``perturbed``."""
    from refine_cli.devtools.synthetic import random_scene
    from refine_cli.tiling.grid import Window

    ds = DataSet("synthetic", note="analytic shapes on periodic texture, exact GT")
    folder = work / f"synthetic-{side}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scene = random_scene((side, side), 6, seed=100 + i, size=side / 7)
        full = Window.full((side, side))
        gt = scene.gt(full).astype(np.float32)
        stem = folder / f"scene_{i:02d}"
        image, gtp = Path(f"{stem}_image.png"), Path(f"{stem}_gt.png")
        low, pert = Path(f"{stem}_lowres.png"), Path(f"{stem}_perturbed.png")
        if not all(p.is_file() for p in (image, gtp, low, pert)):
            write_png(image, scene.image(full))
            write_png(gtp, to_u8(gt))
            write_png(low, scene.coarse(8))
            write_png(pert, to_u8(perturbed(gt, [7, i])))
        ds.cases.append(Case(ds.name, f"scene_{i:02d}", image, gtp, {"lowres": low, "perturbed": pert},
                             side * side / 1e6))
    return ds


def composite_sets(work: Path, n_shapes: int, n_portraits: int, size: int, seg: Segmenter) -> list[DataSet]:
    """Composites of real photos (``make_composites.py``), generated once into ``work``."""
    shapes = DataSet("shapes", note="shapes textured with real photos on real photos, exact GT")
    portraits = DataSet("portrait-comp", note="P3M portraits composited on real photos, exact GT (the alpha)")
    if not (SHARED / "data" / "photos").is_dir():
        reason = f"{SHARED / 'data' / 'photos'} not found"
        shapes.skipped["all"] = portraits.skipped["all"] = reason
        return [shapes, portraits]
    if n_portraits and not (SHARED / "data" / "p3m-portraits-pseudogt").is_dir():
        portraits.skipped["all"] = "P3M portraits not found"
        n_portraits = 0
    out = work / f"composites-{size}-{n_shapes}-{n_portraits}"
    manifest = out / "manifest.json"
    if not manifest.is_file():
        cmd = [sys.executable, str(REPO / "benchmarks" / "make_composites.py"), str(out), "--n-shapes",
               str(n_shapes), "--n-portraits", str(n_portraits), "--size", str(size), "--overwrite"]
        log.info("generating composites: %s", " ".join(cmd[1:]))
        subprocess.run(cmd, check=True)
    for case in json.loads(manifest.read_text())["cases"]:
        folder = out / case["case"]
        coarse = {"lowres": folder / case["coarse"]["lowres"]["file"],
                  "perturbed": folder / case["coarse"]["cascadepsp"]["file"]}
        ds = portraits if case["kind"] == "portraits" else shapes
        if ds is portraits:
            seg_path = folder / "coarse_segmenter.png"
            if seg.available:
                if not seg_path.is_file():
                    rgb = cv2.cvtColor(cv2.imread(str(folder / case["image"])), cv2.COLOR_BGR2RGB)
                    write_png(seg_path, to_u8(seg.coarse(rgb)))
                coarse["segmenter"] = seg_path
            else:
                ds.skipped["segmenter"] = seg.reason
        ds.cases.append(Case(ds.name, case["case"], folder / case["image"], folder / case["gt"], coarse,
                             size * size / 1e6))
    return [shapes, portraits]


def p3m_set(work: Path, seg: Segmenter, limit: int | None = None) -> DataSet:
    """The real P3M portraits with their alpha mattes as pseudo-GT."""
    ds = DataSet("p3m", note="real portraits; GT = P3M-Net alpha (pseudo-GT)")
    root = SHARED / "data" / "p3m-portraits-pseudogt"
    if not root.is_dir():
        ds.skipped["all"] = f"{root} not found"
        return ds
    folder = work / "p3m"
    folder.mkdir(parents=True, exist_ok=True)
    images = sorted((root / "image").glob("*.jpg"))[:limit]
    for i, img in enumerate(images):
        gt = root / "alpha_p3mnet" / f"{img.stem}.png"
        if not gt.is_file():
            continue
        alpha = cv2.imread(str(gt), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0
        low, pert = folder / f"{img.stem}_lowres.png", folder / f"{img.stem}_perturbed.png"
        if not low.is_file():
            write_png(low, to_u8(lowres(alpha, 8)))
        if not pert.is_file():
            write_png(pert, to_u8(perturbed(alpha, [11, i])))
        coarse = {"lowres": low, "perturbed": pert}
        if seg.available:
            sp = folder / f"{img.stem}_segmenter.png"
            if not sp.is_file():
                write_png(sp, to_u8(seg.coarse(cv2.cvtColor(cv2.imread(str(img)), cv2.COLOR_BGR2RGB))))
            coarse["segmenter"] = sp
        else:
            ds.skipped["segmenter"] = seg.reason
        ds.cases.append(Case(ds.name, img.stem, img, gt, coarse, alpha.size / 1e6))
    return ds


def nuclei_set(work: Path) -> DataSet:
    """The DSB2018 nuclei image (uint16) with GT = label > 0; coarse ``lowres`` by 4 (nuclei are small)."""
    import tifffile

    ds = DataSet("nuclei", note="fluorescence nuclei, hand-annotated labels > 0")
    root = SHARED / "data" / "stardist-dsb2018-nuclei"
    if not (root / "labels.tif").is_file():
        ds.skipped["all"] = f"{root} not found"
        return ds
    folder = work / "nuclei"
    folder.mkdir(parents=True, exist_ok=True)
    gt = (tifffile.imread(root / "labels.tif") > 0).astype(np.float32)
    gtp, low, pert = folder / "gt.png", folder / "lowres.png", folder / "perturbed.png"
    if not gtp.is_file():
        write_png(gtp, to_u8(gt))
        write_png(low, to_u8(lowres(gt, 4)))
        write_png(pert, to_u8(perturbed(gt, [13, 0])))
    ds.cases.append(Case(ds.name, "img2d", root / "image.tif", gtp, {"lowres": low, "perturbed": pert},
                         gt.size / 1e6))
    return ds


# ------------------------------------------------------------------------------------------------- runs


def probe(method: str, work: Path, config: Any = None) -> str | None:
    """Run ``method`` (or its variant ``config``) on a tiny image; ``None`` when it works, else why not."""
    from refine_cli.api import refine_file
    from refine_cli.config import RefineConfig

    folder = work / "probe"
    folder.mkdir(parents=True, exist_ok=True)
    img, msk = folder / "image.png", folder / "mask.png"
    if not img.is_file():
        yy, xx = np.mgrid[:96, :128]
        inside = (yy - 48) ** 2 + (xx - 64) ** 2 < 30**2
        fg, bg = np.array([200, 120, 90], np.uint8), np.array([60, 100, 60], np.uint8)
        rgb = np.where(inside[..., None], fg, bg)
        write_png(img, rgb.astype(np.uint8))
        write_png(msk, to_u8(cv2.resize(inside.astype(np.float32), (32, 24), interpolation=cv2.INTER_AREA)))
    try:
        refine_file(str(img), str(msk), str(folder / f"out_{method}.png"),
                    config=config or RefineConfig(method=method), overwrite=True)
    except RefineError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def interleave(sets: Iterable[DataSet], kinds: Iterable[str]) -> list[tuple[Case, str]]:
    """``(case, coarse kind)`` jobs, round-robin over data sets so that a partial run covers each of them."""
    queues = []
    for ds in sets:
        jobs = [(c, k) for c in ds.cases for k in kinds if k in c.coarse]
        if jobs:
            queues.append(jobs)
    longest = max((len(q) for q in queues), default=0)
    return [q[i] for i in range(longest) for q in queues if i < len(q)]


def run_method(
    method: str, jobs: list[tuple[Case, str]], out_dir: Path, budget_s: float, config: Any = None
) -> tuple[list[dict], bool]:
    """Refine and score every job with one method (or its variant ``config``) until ``budget_s`` is spent.

    Returns:
        One record per job run, and whether every job ran.
    """
    from refine_cli.api import refine_file
    from refine_cli.config import RefineConfig
    from refine_cli.evaluation_io import evaluate_pair

    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    t0 = time.perf_counter()
    config = config or RefineConfig(method=method)
    for n, (case, kind) in enumerate(jobs):
        if time.perf_counter() - t0 > budget_s:
            log.warning("%s: time share of %.0f s spent after %d of %d cases; the rest is skipped", method,
                        budget_s, n, len(jobs))
            return records, False
        rec: dict[str, Any] = {"method": method, "dataset": case.dataset, "case": case.name, "coarse": kind,
                               "megapixels": case.megapixels}
        out = out_dir / f"{case.dataset}__{case.name}__{kind}.png"
        try:
            rep = refine_file(str(case.image), str(case.coarse[kind]), str(out), config=config,
                              overwrite=True)
            res = evaluate_pair(out, case.gt)
            rec.update({k: res.metrics.scalars()[k] for k in METRICS}, seconds=rep.wall_seconds,
                       tiles=rep.tiles)
        except RefineError as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"
            log.warning("%s on %s/%s (%s): %s", method, case.dataset, case.name, kind, exc)
        finally:
            out.unlink(missing_ok=True)
        records.append(rec)
        done = rec.get("error") or " ".join(f"{k}={rec[k]:.4f}" for k in METRICS) + f" {rec['seconds']:.2f}s"
        log.info("%s %s/%s %s: %s", method, case.dataset, case.name, kind, done)
    return records, True


def mark_harm(records: list[dict]) -> None:
    """Add ``delta_iou`` (IoU minus the coarse mask's IoU on the same case and coarse kind) and ``harm``
    (``delta_iou < -HARM_IOU``) to every scored record that has a ``coarse`` baseline (in place)."""
    base = {(r["dataset"], r["case"], r["coarse"]): r["iou"] for r in records
            if r["method"] == "coarse" and "error" not in r}
    for r in records:
        b = base.get((r["dataset"], r["case"], r["coarse"]))
        if "error" in r or b is None:
            continue
        r["delta_iou"] = r["iou"] - b
        r["harm"] = bool(r["delta_iou"] < -HARM_IOU)


def aggregate(records: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Mean metrics and seconds per megapixel per group of ``keys`` (failed runs counted, not averaged),
    the harm count, the worst IoU and the largest IoU loss against the coarse mask (see :func:`mark_harm`)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    rows = []
    for key, recs in groups.items():
        ok = [r for r in recs if "error" not in r]
        row: dict[str, Any] = dict(zip(keys, key, strict=True))
        row["n"] = len(ok)
        row["failed"] = len(recs) - len(ok)
        for m in METRICS:
            row[m] = float(np.mean([r[m] for r in ok])) if ok else None
        mpx = sum(r["megapixels"] for r in ok)
        row["s_per_mpx"] = sum(r["seconds"] for r in ok) / mpx if mpx else None
        row["harm"] = sum(1 for r in ok if r.get("harm"))
        row["worst_iou"] = min((r["iou"] for r in ok), default=None)
        deltas = [r["delta_iou"] for r in ok if "delta_iou" in r]
        row["worst_delta_iou"] = min(deltas) if deltas else None
        rows.append(row)
    return rows


def add_gain(rows: list[dict], keys: tuple[str, ...]) -> None:
    """Add ``gain_<metric>`` = method minus the ``coarse`` baseline of the same group (in place)."""
    base = {tuple(r[k] for k in keys if k != "method"): r for r in rows if r["method"] == "coarse"}
    for r in rows:
        b = base.get(tuple(r[k] for k in keys if k != "method"))
        for m in METRICS:
            known = b is not None and r[m] is not None and b[m] is not None
            r[f"gain_{m}"] = r[m] - b[m] if known else None


def pool_composites(records: list[dict]) -> list[dict]:
    """Per method x coarse kind, means over every case of the composite sets together (each case once)."""
    rows = aggregate([r for r in records if r["dataset"] in COMPOSITES], ("method", "coarse"))
    add_gain(rows, ("method", "coarse"))
    return rows


# --------------------------------------------------------------------------------------------- reports


def fmt(v: float | None, digits: int = 4, signed: bool = False) -> str:
    """Table cell of a number (``-`` when absent)."""
    if v is None:
        return "-"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def markdown(result: dict) -> str:
    """The two tables as Markdown (for benchmarks/README.md and the project README)."""
    lines = ["| method | data set | n | IoU | mBA | BF@2 | ΔmBA vs coarse | harm | worst IoU | worst ΔIoU "
             "| s/MPx |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["summary"]:
        lines.append(f"| {r['method']} | {r['dataset']} | {r['n']} | {fmt(r['iou'])} | {fmt(r['mba'])} | "
                     f"{fmt(r['boundary_f'])} | {fmt(r['gain_mba'], signed=True)} | {harm_cell(r)} | "
                     f"{fmt(r['worst_iou'])} | {fmt(r['worst_delta_iou'], signed=True)} | "
                     f"{fmt(r['s_per_mpx'], 2)} |")
    lines += [f"\n{name}: {status['status']}" for name, status in result["methods"].items()
              if status["status"] != "ok"]
    lines += ["", "mBA by coarse-mask kind (gain over the coarse mask in brackets; harm count: cases whose "
              f"IoU fell more than {100 * HARM_IOU:.1f} points below the coarse mask's):", ""]
    methods = [m for m, s in result["methods"].items()
               if s["status"] == "ok" or s["status"].startswith("partial")]
    lines.append("| data set | coarse mask | " + " | ".join(methods) + " |")
    lines.append("|---|---|" + "---:|" * len(methods))
    cells: dict[tuple, dict] = {(r["dataset"], r["coarse"], r["method"]): r for r in result["by_coarse"]}
    for ds, kind in dict.fromkeys((r["dataset"], r["coarse"]) for r in result["by_coarse"]):
        row = []
        for m in methods:
            r = cells.get((ds, kind, m))
            row.append("-" if r is None or r["mba"] is None else
                       f"{r['mba']:.4f}" + ("" if m == "coarse" else
                                            f" ({fmt(r['gain_mba'], 3, True)}) harm {harm_cell(r)}"))
        lines.append(f"| {ds} | {kind} | " + " | ".join(row) + " |")
    if result["composites"]:
        lines += ["", f"Composites pooled ({' + '.join(COMPOSITES)}, every case weighted once), IoU / mBA "
                  "(gain over the coarse mask in points):", "",
                  "| coarse mask | n | " + " | ".join(methods) + " |", "|---|---:|" + "---:|" * len(methods)]
        pooled = {(r["coarse"], r["method"]): r for r in result["composites"]}
        for kind in dict.fromkeys(r["coarse"] for r in result["composites"]):
            row = [pooled_cell(pooled.get((kind, m)), m == "coarse") for m in methods]
            n = max(r["n"] for (k, _), r in pooled.items() if k == kind)
            lines.append(f"| {kind} | {n} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def harm_cell(r: dict) -> str:
    """``harm/n`` of a table row (``-`` for the coarse baseline itself)."""
    return "-" if r["method"] == "coarse" else f"{r['harm']}/{r['n']}"


def pooled_cell(r: dict | None, baseline: bool) -> str:
    """``IoU / mBA (+gain / +gain)`` in the pooled table; gains in points (x 100)."""
    if r is None or r["mba"] is None:
        return "-"
    cell = f"{r['iou']:.3f} / {r['mba']:.3f}"
    if baseline or r["gain_mba"] is None:
        return cell
    return cell + f" ({100 * r['gain_iou']:+.1f} / {100 * r['gain_mba']:+.1f}) harm {r['harm']}"


def print_tables(result: dict) -> None:
    """Rich tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    con = Console(width=None if sys.stdout.isatty() else 150)
    mach = result["machine"]
    load = mach.get("load_average_at_start", [0.0])[0], mach.get("load_average", [0.0])[0]
    t = Table(title=f"refine quality benchmark ({result['mode']}, {mach['cores']} cores, load "
              f"{load[0]:.1f} -> {load[1]:.1f}, {result['seconds']:.0f} s)", title_justify="left")
    for col in ("method", "data set", "n", "IoU", "mBA", "BF@2", "ΔmBA", "harm", "worst ΔIoU", "s/MPx"):
        t.add_column(col, justify="left" if col in ("method", "data set") else "right")
    last = None
    for r in result["summary"]:
        if last is not None and r["method"] != last:
            t.add_section()
        last = r["method"]
        n = str(r["n"]) + (f" ({r['failed']} failed)" if r["failed"] else "")
        t.add_row(r["method"], r["dataset"], n,
                  fmt(r["iou"]), fmt(r["mba"]), fmt(r["boundary_f"]), fmt(r["gain_mba"], signed=True),
                  harm_cell(r), fmt(r["worst_delta_iou"], signed=True), fmt(r["s_per_mpx"], 2))
    con.print(t)
    if result["composites"]:
        t = Table(title=f"composites pooled ({' + '.join(COMPOSITES)}): IoU / mBA (gain in points)",
                  title_justify="left")
        for col in ("method", "coarse mask", "n", "IoU / mBA (gain)"):
            t.add_column(col, justify="left" if col != "n" else "right")
        for r in sorted(result["composites"], key=lambda r: r["coarse"]):
            t.add_row(r["method"], r["coarse"], str(r["n"]), pooled_cell(r, r["method"] == "coarse"))
        con.print(t)
    for name, status in result["methods"].items():
        if status["status"] != "ok":
            con.print(f"{name}: {status['status']}", highlight=False)
    for ds in result["datasets"].values():
        if ds["skipped"]:
            con.print(f"{ds['name']}: skipped " + "; ".join(f"{k}: {v}" for k, v in ds["skipped"].items()))


def load_pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` (with a message) when matplotlib is absent."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'refine-cli[plot]'): no chart written")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(result: dict, path: Path) -> bool:
    """Bars of IoU, mBA and boundary F per data set, one per method; ``False`` without matplotlib."""
    plt = load_pyplot()
    if plt is None:
        return False
    rows = result["summary"]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["dataset"]): r for r in rows}
    fig, axes = plt.subplots(3, 1, figsize=(max(8.0, 1.5 * len(datasets)), 10))
    width = 0.8 / max(1, len(methods))
    for ax, metric, title in zip(axes, METRICS, ("IoU", "mBA", "boundary F (2 px)"), strict=True):
        lo = 1.0
        for i, m in enumerate(methods):
            vals = [cell.get((m, d), {}).get(metric) for d in datasets]
            vals = [np.nan if v is None else v for v in vals]
            lo = min(lo, np.nanmin(vals) if not all(np.isnan(vals)) else 1.0)
            ax.bar(np.arange(len(datasets)) + (i - (len(methods) - 1) / 2) * width, vals, width, label=m)
        ax.set_xticks(np.arange(len(datasets)), datasets)
        ax.set_title(title)
        ax.set_ylim(max(0.0, lo - 0.05), 1.0)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"refine quality ({result['mode']}); coarse kinds pooled")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------- main


def build_sets(args: argparse.Namespace, work: Path) -> list[DataSet]:
    """The data sets of this mode."""
    seg = Segmenter()
    if not seg.available:
        log.info("coarse kind 'segmenter' skipped: %s", seg.reason)
    if args.quick:
        sets = [synthetic_set(work, 2, 384)]
        sets += [s for s in composite_sets(work, 2, 0, 256, seg) if s.name == "shapes"]
        sets.append(nuclei_set(work))
        return sets
    sets = [synthetic_set(work, 4, 1536)]
    sets += composite_sets(work, 24, 8, 1024, seg)
    sets.append(p3m_set(work, seg))
    sets.append(nuclei_set(work))
    return sets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny data (CI, seconds)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="where quality.json/.md/.png go (default benchmarks/results)")
    parser.add_argument("--work", type=Path, default=None,
                        help="cache of generated data (default: <tmp>/refine-bench)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the registry's methods")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="time budget for all methods (default 55, quick 5)")
    parser.add_argument("--datasets", default=None, help="comma-separated subset of the data sets "
                        "(synthetic, shapes, portrait-comp, p3m, nuclei)")
    parser.add_argument("--coarse", default=None, help=f"comma-separated coarse kinds (default {','.join(COARSE_KINDS)})")
    parser.add_argument("--max-cases", type=int, default=None, help="at most this many cases per data set")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=METHOD[,GROUP.FIELD=VALUE]",
                        help="also run a method with other options under its own label, e.g. "
                             "lite2=cascade,cascade.weights=runs/a/best.pt (repeatable)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    log.setLevel(logging.INFO)
    logging.getLogger("refine_cli").setLevel(logging.WARNING)
    t_start = time.perf_counter()
    load_start = list(os.getloadavg())
    methods = select_methods(args.methods)
    if methods is None:
        return 2
    variants = dict(parse_variant(v) for v in args.variant)
    methods += [v for v in variants if v not in methods]
    work = args.work or Path(tempfile.gettempdir()) / "refine-bench"
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    sets = build_sets(args, work)
    if args.datasets:
        wanted_sets = {d.strip() for d in args.datasets.split(",") if d.strip()}
        sets = [s for s in sets if s.name in wanted_sets]
    if args.max_cases:
        for ds in sets:
            ds.cases = ds.cases[: args.max_cases]
    kinds = tuple(k.strip() for k in args.coarse.split(",")) if args.coarse else COARSE_KINDS
    jobs = interleave(sets, kinds)
    log.info("%d jobs: %s", len(jobs), ", ".join(f"{s.name} ({len(s.cases)})" for s in sets))

    budget = 60.0 * (args.max_minutes if args.max_minutes is not None else 5.0 if args.quick else 55.0)
    status: dict[str, dict[str, Any]] = {}
    records: list[dict] = []
    runnable = []
    for m in methods:
        reason = probe(m, work, variants.get(m))
        if reason:
            status[m] = {"status": f"unavailable: {reason}"}
            log.warning("%s unavailable: %s", m, reason)
        else:
            runnable.append(m)
    for i, m in enumerate(runnable):
        left = budget - (time.perf_counter() - t_start)
        share = max(0.0, left / (len(runnable) - i))
        recs, complete = run_method(m, jobs, work / "outputs" / m, share, variants.get(m))
        records += recs
        status[m] = {"status": "ok" if complete else f"partial {len(recs)}/{len(jobs)} (time budget)"}

    mark_harm(records)
    summary = aggregate(records, ("method", "dataset"))
    by_coarse = aggregate(records, ("method", "dataset", "coarse"))
    add_gain(summary, ("method", "dataset"))
    add_gain(by_coarse, ("method", "dataset", "coarse"))
    result = {
        "benchmark": "quality",
        "mode": "quick" if args.quick else "full",
        "machine": {**machine_info(), "load_average_at_start": load_start},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": time.perf_counter() - t_start,
        "methods": {m: status[m] for m in methods},
        "variants": {label: spec for label, spec in (v.split("=", 1) for v in args.variant)},
        "datasets": {s.name: {"name": s.name, "cases": len(s.cases), "note": s.note, "skipped": s.skipped,
                              "megapixels": sum(c.megapixels for c in s.cases)} for s in sets},
        "summary": summary,
        "by_coarse": by_coarse,
        "composites": pool_composites(records),
        "runs": records,
    }
    (args.out / "quality.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "quality.md").write_text(markdown(result))
    plotted = not args.no_plot and bool(summary) and plot(result, args.out / "quality.png")
    print_tables(result)
    print(f"wrote {args.out / 'quality.json'}, quality.md" + (", quality.png" if plotted else ""))
    if not args.work:
        shutil.rmtree(work / "outputs", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
