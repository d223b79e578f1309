"""MagNet-Fast binary (`--preset binary`) vs the segmenter alone and the guided filter, on held-out portraits.

What is compared, per image, side by side in one run (all through ``refine_cli.api.refine_file``,
the code path of ``refine run``, and scored by ``refine_cli.evaluation_io.evaluate_pair``, that of
``refine eval``):

* ``segmenter``: the MediaPipe selfie segmenter alone (``refine segment --soft``: the image
  at 256 px, probabilities resized back), upsampled to the image by the null refiner ``coarse``;
* ``magnet-fast``: ``refine run --method magnet-fast --preset binary`` as shipped (no mask: the
  segmenter runs inside, then the project-trained ``magnet-binary-refine`` module, then the
  edge snap);
* ``magnet-nosnap``: the same without the edge snap (``--magnet-snap off``);
* ``segmenter+snap``: the preset without its refinement stages (``--magnet-stages none``): the
  segmenter's pass upsampled, then the edge snap; no refinement module runs;
* ``guided``: ``refine run --method guided`` on the segmenter's mask.

Besides IoU, mBA and boundary F, every run's uncertainty map (``--uncertainty``) is scored: the
share of background pixels more than 32 px from the GT boundary with uncertainty above 0.05
(``far-bg u>0.05``); patch rectangles in the map show up there.

Data sets (``--split bench``, the default):

* ``heldout-comp``: composites of the two portraits kept out of training
  (``refine_cli.train.magnet.HOLDOUT``) on photos of ``../shared/data/photos``, made by the
  training generator with seed :data:`BENCH_SEED` (never a training or validation seed) and
  the training canvas sizes (long side 768-1600 px, aspect 9:16-16:9). Ground truth: the
  alpha used to composite (exact).
* ``p3m-heldout`` / ``p3m-seen``: the real P3M photos at full resolution (~1.9 MPx) with
  their P3M-Net alpha as **pseudo**-GT. ``seen`` are the six portraits whose foregrounds the
  module was trained on (pasted on other backgrounds); ``heldout`` the two it never saw.

``--split tune``: ``--n`` composites of the held-out portraits for each seed of
:data:`TUNE_SEEDS` (data set ``tune-comp``), no P3M photo: where the preset's settings were chosen,
so that the benchmark's images stay unseen.

Usage::

    python benchmarks/magnet_binary.py [--n 12] [--split bench|tune] [--methods a,b,...]
        [--out benchmarks/results] [--work DIR] [--threads 1]

Writes ``magnet_binary.json`` (``magnet_binary_tune.json`` for the tuning split: every run, the
summary, the machine) into ``--out`` and prints the table. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SEGMENTER_MODEL = SHARED / "weights" / "mediapipe-selfie-segmentation" / "selfie_segmentation.tflite"
P3M = SHARED / "data" / "p3m-portraits-pseudogt"
BENCH_SEED = 2_000_003
TUNE_SEEDS = (4_000_037, 4_000_039)
"""Composite seeds of the tuning split: not a training (0), validation (1 000 003), test (3 000 017) or
benchmark seed."""
METHODS = ("segmenter", "magnet-fast", "magnet-nosnap", "segmenter+snap", "guided")
METRICS = ("iou", "mba", "boundary_f", "far_bg_uncertain")
FAR_PX = 32
"""Background pixels farther than this from the GT boundary are scored for uncertainty."""
UNCERTAIN = 0.05
"""... above this uncertainty they count as uncertain."""

log = logging.getLogger("magnet_binary")


def write_png(path: Path, array: np.ndarray) -> Path:
    arr = array if array.ndim == 2 else cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), arr):
        raise OSError(f"cannot write {path}")
    return path


def heldout_composites(work: Path, n: int, seed: int = BENCH_SEED, dataset: str = "heldout-comp"
                       ) -> list[dict[str, Any]]:
    """``n`` composites of the held-out portraits made with ``seed`` (images and exact GT written to
    ``work``)."""
    from refine_cli.train.data import SampleSpec, make_layers, sources
    from refine_cli.train.magnet import HOLDOUT, MagnetTrainConfig, canvas_size, composite_indices

    cfg = MagnetTrainConfig(out=work)
    bank = sources(SampleSpec(size=64, kinds=(("portraits", 1.0),)), check=True).portraits
    stems = [p.stem for p, _ in bank.items]
    keep = [i for i, s in enumerate(stems) if s in HOLDOUT]
    indices = composite_indices(n, len(stems), [i for i in range(len(stems)) if i not in keep])
    folder = work / (dataset if seed == BENCH_SEED else f"{dataset}-{seed}")
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in indices:
        hw = canvas_size(cfg, seed, i)
        img, gt = folder / f"comp_{i:04d}_image.png", folder / f"comp_{i:04d}_gt.png"
        if not (img.is_file() and gt.is_file()):
            spec = SampleSpec(size=hw, seed=seed, kinds=(("portraits", 1.0),))
            layers, meta = make_layers(i, spec, kind="portraits")
            write_png(img, layers.composite())
            write_png(gt, np.clip(np.rint(layers.alpha * 255), 0, 255).astype(np.uint8))
        case = img.stem.removesuffix("_image") + ("" if seed == BENCH_SEED else f"@{seed}")
        cases.append({"dataset": dataset, "case": case, "image": img, "gt": gt, "seed": seed,
                      "portrait": stems[i % len(stems)], "megapixels": hw[0] * hw[1] / 1e6})
    return cases


def p3m_cases() -> list[dict[str, Any]]:
    """The real P3M portraits (pseudo-GT), split into held-out and seen-in-training people."""
    from refine_cli.train.magnet import HOLDOUT

    cases = []
    for img in sorted((P3M / "image").glob("*.jpg")):
        gt = P3M / "alpha_p3mnet" / f"{img.stem}.png"
        h, w = cv2.imread(str(gt), cv2.IMREAD_GRAYSCALE).shape
        ds = "p3m-heldout" if img.stem in HOLDOUT else "p3m-seen"
        cases.append({"dataset": ds, "case": img.stem, "image": img, "gt": gt, "portrait": img.stem,
                      "megapixels": h * w / 1e6})
    return cases


def far_background(gt_path: Path) -> np.ndarray:
    """``(H, W)`` bool: GT background (alpha < 0.5) more than :data:`FAR_PX` px from the GT boundary."""
    fg = cv2.imread(str(gt_path), cv2.IMREAD_GRAYSCALE) >= 128
    inside = cv2.distanceTransform(fg.astype(np.uint8), cv2.DIST_L2, 5)
    outside = cv2.distanceTransform((~fg).astype(np.uint8), cv2.DIST_L2, 5)
    return (~fg) & (np.maximum(inside, outside) > FAR_PX)


def method_configs(threads: int | None, coarse: Path) -> dict[str, tuple[str | None, Any]]:
    """``method -> (mask or None, RefineConfig)`` of every compared method."""
    from refine_cli.config import MagnetOptions, RefineConfig

    seg = str(SEGMENTER_MODEL)

    def magnet(**kw: str) -> tuple[None, RefineConfig]:
        return None, RefineConfig(method="magnet-fast", device="cpu", threads=threads, segmenter=seg,
                                  magnet=MagnetOptions(preset="binary", **kw))

    return {
        "segmenter": (str(coarse), RefineConfig(method="coarse", device="cpu", threads=threads)),
        "magnet-fast": magnet(),
        "magnet-nosnap": magnet(snap="off"),
        "segmenter+snap": magnet(stages="none"),
        "guided": (str(coarse), RefineConfig(method="guided", device="cpu", threads=threads)),
    }


def run_case(case: dict[str, Any], work: Path, threads: int | None, methods: tuple[str, ...] = METHODS
             ) -> list[dict[str, Any]]:
    """The methods on one case."""
    from refine_cli.api import refine_file
    from refine_cli.commands.segment import segment_file
    from refine_cli.evaluation_io import evaluate_pair

    coarse = work / f"{case['dataset']}__{case['case']}__coarse.png"
    t0 = time.perf_counter()
    segment_file(str(case["image"]), str(coarse), segmenter=str(SEGMENTER_MODEL), device="cpu", soft=True,
                 overwrite=True)
    t_seg = time.perf_counter() - t0
    configs = method_configs(threads, coarse)
    far = far_background(case["gt"])
    records = []
    for method in methods:
        mask, config = configs[method]
        out = work / f"{case['dataset']}__{case['case']}__{method}.png"
        unc = out.with_suffix(".unc.png")
        rec: dict[str, Any] = {k: (str(v) if isinstance(v, Path) else v) for k, v in case.items()}
        rec["method"] = method
        t0 = time.perf_counter()
        refine_file(str(case["image"]), mask, str(out), config=config, uncertainty=str(unc), overwrite=True)
        seconds = time.perf_counter() - t0 + (t_seg if mask is not None else 0.0)
        res = evaluate_pair(out, case["gt"])
        u = cv2.imread(str(unc), cv2.IMREAD_GRAYSCALE)
        rec.update({k: float(res.metrics.scalars()[k]) for k in METRICS if k != "far_bg_uncertain"},
                   far_bg_uncertain=float((u[far] > round(255 * UNCERTAIN)).mean()) if far.any() else 0.0,
                   seconds=seconds)
        out.unlink(missing_ok=True)
        unc.unlink(missing_ok=True)
        records.append(rec)
        log.info("%s %s/%s: IoU %.4f mBA %.4f BF %.4f far-bg unc %.3f %.2fs", method, case["dataset"],
                 case["case"], rec["iou"], rec["mba"], rec["boundary_f"], rec["far_bg_uncertain"], seconds)
    coarse.unlink(missing_ok=True)
    return records


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean metrics per data set and method, plus the gain over ``segmenter`` (same cases)."""
    rows = []
    for ds in dict.fromkeys(r["dataset"] for r in records):
        seg = [r for r in records if r["dataset"] == ds and r["method"] == "segmenter"]
        base = {m: float(np.mean([r[m] for r in seg])) for m in METRICS}
        seg_mba = {r["case"]: r["mba"] for r in seg}
        for method in dict.fromkeys(r["method"] for r in records):
            sel = [r for r in records if r["dataset"] == ds and r["method"] == method]
            if not sel:
                continue
            row: dict[str, Any] = {"dataset": ds, "method": method, "n": len(sel)}
            for m in METRICS:
                row[m] = float(np.mean([r[m] for r in sel]))
                row[f"d_{m}"] = row[m] - base[m]
            row["wins_mba"] = int(sum(r["mba"] > seg_mba[r["case"]] for r in sel))
            row["s_per_mpx"] = float(sum(r["seconds"] for r in sel) / sum(r["megapixels"] for r in sel))
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the summary."""
    head = ("| data set | method | n | IoU | ΔIoU | mBA | ΔmBA | boundary F | ΔF | mBA wins "
            "| far-bg u>0.05 | s/MPx |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['method']} | {r['n']} | {r['iou']:.4f} | {r['d_iou']:+.4f} | "
            f"{r['mba']:.4f} | {r['d_mba']:+.4f} | {r['boundary_f']:.4f} | {r['d_boundary_f']:+.4f} | "
            f"{r['wins_mba']}/{r['n']} | {r['far_bg_uncertain']:.3f} | {r['s_per_mpx']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12,
                    help="held-out composites (per tuning seed with --split tune)")
    ap.add_argument("--split", choices=("bench", "tune"), default="bench",
                    help="bench: the reported images (BENCH_SEED composites + P3M); "
                         "tune: TUNE_SEEDS composites")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated, from {', '.join(METHODS)} (segmenter is always run)")
    ap.add_argument("--no-p3m", action="store_true", help="skip the real P3M photos")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "refine-bench-magnet-binary")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    args = ap.parse_args(argv)
    methods = tuple(dict.fromkeys(["segmenter", *(m.strip() for m in args.methods.split(",") if m.strip())]))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown --methods {', '.join(unknown)}: use {', '.join(METHODS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for need in (SEGMENTER_MODEL, P3M, SHARED / "data" / "photos"):
        if not need.exists():
            print(f"skipped: {need} not found (the shared data sits beside the checkout)", file=sys.stderr)
            return 0
    try:
        import ai_edge_litert  # noqa: F401
    except ImportError:
        print('skipped: ai-edge-litert is not installed (pip install "refine-cli[tflite]")', file=sys.stderr)
        return 0
    import torch

    from refine_cli import weights as registry

    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.split == "tune":
        cases = [c for seed in TUNE_SEEDS for c in heldout_composites(args.work, args.n, seed, "tune-comp")]
    else:
        cases = heldout_composites(args.work, args.n) + ([] if args.no_p3m else p3m_cases())
    t0 = time.perf_counter()
    records = [r for case in cases for r in run_case(case, args.work, args.threads, methods)]
    rows = summarize(records)
    record = registry.get_record("magnet-binary-refine")
    result = {
        "benchmark": "magnet_binary", "split": args.split, "seconds": time.perf_counter() - t0,
        "bench_seed": BENCH_SEED, "tune_seeds": list(TUNE_SEEDS), "methods": list(methods),
        "weights": {"name": record.name, "sha256": record.sha256, "file": str(registry.bundled_path(record))},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_threads": torch.get_num_threads()},
        "summary": rows, "runs": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "magnet_binary.json" if args.split == "bench" else "magnet_binary_tune.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(table(rows))
    print(f"\nwrote {args.out / name} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
