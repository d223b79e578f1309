"""MagNet-Fast patch and point selection: the paper's rule against the official code's, on the same input.

The official test script sorts patches by *ascending* mean uncertainty (it refines the most
*certain* ones) and zeroes the point score inside the refined patches (keeping only the points
there with zero score) — ``../shared/reference/magnet/NOTES.md`` §0. ``refine`` follows the paper
(descending, the score Q everywhere in the refined patches); ``run_magnet(selection="official")``
reproduces the official behaviour for this comparison. For each image and stage the script prints
which patches each rule picks, their mean uncertainty, how many points each replaces, and the
final IoU / mBA of both against the ground truth.

Data: the real P3M portraits (pseudo-GT alpha >= 0.5) with the MediaPipe selfie segmenter and the
bundled 2-class refinement module (``--preset binary``), or any ``--images`` with ``--gts``.

Usage::

    python benchmarks/magnet_selection.py [--n 4] [--json benchmarks/results/magnet_selection.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
P3M = SHARED / "data" / "p3m-portraits-pseudogt"
SELFIE = SHARED / "weights" / "mediapipe-selfie-segmentation" / "selfie_segmentation.tflite"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4, help="portraits to run (default 4)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "magnet_selection.json"))
    args = ap.parse_args(argv)

    import torch

    from refine_cli.evaluate import EvalOptions, evaluate_arrays
    from refine_cli.refiners.magnet import get_preset, run_magnet
    from refine_cli.refiners.magnet_method import load_refinement_modules
    from refine_cli.segmenters import load_segmenter

    torch.set_num_threads(args.threads)
    seg = load_segmenter(str(SELFIE), "cpu")
    preset = get_preset("binary")
    modules = load_refinement_modules(preset, "cpu")
    images = sorted((P3M / "image").glob("*.jpg"))[: args.n]
    rows, per_image = [], []
    for path in images:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        gt = cv2.imread(str(P3M / "alpha_p3mnet" / f"{path.stem}.png"), cv2.IMREAD_GRAYSCALE) >= 128
        result = {}
        for rule in ("paper", "official"):
            t0 = time.perf_counter()
            res = run_magnet(rgb, seg, modules, preset, selection=rule, trace=True)
            m = evaluate_arrays(res.labels == 1, gt, EvalOptions())
            result[rule] = {"iou": m.iou, "mba": m.mba, "seconds": time.perf_counter() - t0,
                            "stages": [s.to_dict() for s in res.stages[1:]]}
        for sp, so in zip(result["paper"]["stages"], result["official"]["stages"], strict=True):
            rows.append((path.stem, tuple(sp["scale"]), sp["patches_total"], sp["patches"], so["patches"],
                         np.mean(sp["patch_uncertainty"]), np.mean(so["patch_uncertainty"]), sp["points"],
                         so["points"]))
        per_image.append({"image": path.stem, **result})

    print(f"{'image':12} {'scale':>11} {'P':>3}  {'paper patches':>14} {'official':>14}  "
          f"{'mean Yu p/o':>13}  {'points p/o':>15}")
    for stem, scale, total, pp, po, up, uo, kp, ko in rows:
        print(f"{stem:12} {scale[0]:>5}x{scale[1]:<5} {total:>3}  {str(pp):>14} {str(po):>14}  "
              f"{up:6.3f}/{uo:6.3f}  {kp:>7}/{ko:<7}")
    print(f"\n{'image':12} {'paper IoU':>9} {'mBA':>7} | {'official IoU':>12} {'mBA':>7}")
    for r in per_image:
        print(f"{r['image']:12} {r['paper']['iou']:9.4f} {r['paper']['mba']:7.4f} | "
              f"{r['official']['iou']:12.4f} {r['official']['mba']:7.4f}")
    for rule in ("paper", "official"):
        print(f"mean {rule:8}: IoU {np.mean([r[rule]['iou'] for r in per_image]):.4f}  "
              f"mBA {np.mean([r[rule]['mba'] for r in per_image]):.4f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "magnet_selection", "images": per_image}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
