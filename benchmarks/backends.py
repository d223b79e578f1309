"""Inference backends: torch, ONNX Runtime and OpenVINO on the same weights, and the official code.

Four parts, in one run, on the machine at hand (nothing is asserted):

1. **forward**: one network call of the lite weights (``cascadepsp-lite-v2``) and of the official
   architecture (deterministic fill weights, the golden tests' own) per backend, on a crop of the photo, at
   the sizes ``refine run`` uses: a local step at L (640 lite, 900 official) and, for the lite weights, a
   global step of a 4:3 photo. Seconds per call (median of ``--repeat``; the official one once) and the
   largest probability difference from torch fp32.
2. **magnet**: MagNet's bundled binary refinement module, one call of 3 patches at 256 and at 508 px, per
   backend: seconds and the largest logit difference from torch.
3. **photo**: ``refine run --method cascade`` (the defaults: lite-v2, edge snap, guard) on ``aeroplane.jpg``
   (8.1 MPx, a 4K-class photo) per backend, each in a child process: wall seconds (read to written mask
   and uncertainty), the report's stage seconds, peak RSS, and the mask's IoU with the torch run.
4. **official**: the official architecture with the fill weights, ``--cascade-size 900``, the full cascade,
   ``--guard off``, per backend; and the official code (``segmentation-refinement``, when it is installed)
   on the same weights through a harness of our own: IoU of every output with the official one.

Usage::

    python benchmarks/backends.py [--parts forward,magnet,photo,official] [--backends torch,onnx,openvino]
        [--repeat 5] [--out benchmarks/results]

Writes ``backends.json`` and ``backends.md`` to ``--out`` and prints the tables. The official code is
looked for on ``sys.path`` and in ``--peer-path`` (a folder made with
``pip install --no-deps --target DIR segmentation-refinement``); its only other import, torchvision's
``ToTensor``/``Normalize``, is replaced by an equivalent when torchvision is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO.parent / "shared" / "data" / "cascadepsp-samples"
PHOTO, PHOTO_MASK = SAMPLES / "aeroplane.jpg", SAMPLES / "aeroplane_coarse.png"
OFFICIAL_L = 900


# --------------------------------------------------------------------------- part 1: one network call


def _models(repeat: int) -> dict[str, Any]:
    """``name: (module, L, timed calls)``; the official one (~1 min a call on 2 cores): once, local only."""
    from refine_cli.config import CascadeOptions
    from refine_cli.devtools.fill_cascadepsp import fill_state_dict
    from refine_cli.models.cascadepsp import cascadepsp_official
    from refine_cli.refiners.cascade_method import load_cascade_model

    lite, _, _ = load_cascade_model(CascadeOptions(), "cpu", backend="torch")
    official = cascadepsp_official()
    official.load_state_dict(fill_state_dict(), strict=True)
    return {"lite-v2": (lite.eval(), 640, repeat), "official (fill)": (official.eval(), 900, 1)}


def _photo_tensors() -> tuple[Any, Any]:
    """A 912 x 912 crop of the photo, ``(1, 3, h, w)`` uint8, and its coarse mask as ``seg`` in [-1, 1].

    Real inputs, not noise: random activations can fall into the CPU's slow denormal range.
    """
    import cv2
    import torch

    img = cv2.cvtColor(cv2.imread(str(PHOTO)), cv2.COLOR_BGR2RGB)
    mask = cv2.imread(str(PHOTO_MASK), cv2.IMREAD_GRAYSCALE)
    r0, c0 = max(0, (img.shape[0] - 912) // 2), max(0, (img.shape[1] - 912) // 2)
    img, mask = img[r0 : r0 + 912, c0 : c0 + 912], mask[r0 : r0 + 912, c0 : c0 + 912]
    im = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
    seg = torch.from_numpy((mask > 127).astype(np.float32) * 2 - 1)[None, None]
    return im, seg


def forward_part(backends: list[str], repeat: int, graphs: Path) -> list[dict[str, Any]]:
    """Seconds per call and the largest probability difference from torch, per model, shape and backend."""
    import torch

    from refine_cli.models.runtime import OUTPUTS, CascadeRuntime

    rows = []
    photo = _photo_tensors()
    for name, (model, side, n) in _models(repeat).items():
        s8 = -(-side // 8) * 8  # inputs are padded to a multiple of 8
        calls = (("local", (s8, s8), True), ("global 4:3", (s8 * 3 // 4 // 8 * 8, s8), False))
        for label, (h, w), local in calls[: 2 if n > 1 else 1]:
            im, seg = (t[..., :h, :w] for t in photo)
            args = (model.normalize_image(im), seg, seg) if local else (model.normalize_image(im), seg)
            ref: dict[str, Any] = {}
            for backend in backends:
                fn: Any = model if backend == "torch" else CascadeRuntime(model, backend, graphs)
                times = []
                with torch.inference_mode():
                    if backend != "torch":
                        fn(*args)  # first call: export (once per weights) and compile, not timed
                    for _ in range(n):
                        t0 = time.perf_counter()
                        out = fn(*args)
                        times.append(time.perf_counter() - t0)
                ref = ref or out
                diff = max(float((out[k] - ref[k]).abs().max()) for k in OUTPUTS)
                rows.append({"model": name, "call": f"{label} {w}x{h}", "backend": backend,
                             "seconds": float(np.median(times)), "max_prob_diff": diff})
                print(f"  {name:16s} {label:10s} {backend:9s} {np.median(times):7.3f} s  diff {diff:.1e}",
                      flush=True)
    return rows


def magnet_part(backends: list[str], repeat: int, graphs: Path) -> list[dict[str, Any]]:
    """MagNet's refinement module per backend: the bundled binary one (C = 2) on 3 patches of 256 px (the
    ``binary`` preset's batch of a stage) and of 508 px (DeepGlobe's input size): seconds per call and
    the largest logit difference from torch."""
    import cv2
    import torch

    from refine_cli.models.runtime import ModuleRuntime, refinement_graphs
    from refine_cli.refiners.magnet import get_preset
    from refine_cli.refiners.magnet_method import load_refinement_modules

    module = load_refinement_modules(get_preset("binary"), "cpu")[0].eval()
    mask = (cv2.imread(str(PHOTO_MASK), cv2.IMREAD_GRAYSCALE) > 127).astype(np.float32)
    rows = []
    for side in (256, 508):
        r0, c0 = (mask.shape[0] - side) // 2, (mask.shape[1] - side) // 2
        crops = [mask[r0 + d : r0 + d + side, c0 + d : c0 + d + side] for d in (-side // 2, 0, side // 2)]
        hard = torch.from_numpy(np.stack(crops))[:, None]
        soft = torch.from_numpy(np.stack([cv2.GaussianBlur(c, (0, 0), 4) for c in crops]))[:, None]
        first, second = torch.cat([1 - hard, hard], 1), torch.cat([1 - soft, soft], 1)
        ref = None
        for backend in backends:
            module.runtime = None if backend == "torch" else ModuleRuntime(
                module, backend, graphs, refinement_graphs(2), "magnet-refine")
            times = []
            with torch.inference_mode():
                module(first, second)  # first call: export (once per weights) and compile, not timed
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    out = module(first, second)
                    times.append(time.perf_counter() - t0)
            ref = out if ref is None else ref
            diff = float((out - ref).abs().max())
            rows.append({"model": "magnet-binary-refine", "call": f"3 x {side}x{side}", "backend": backend,
                         "seconds": float(np.median(times)), "max_logit_diff": diff})
            print(f"  magnet refine    3x{side:<4d}    {backend:9s} {np.median(times):7.3f} s  "
                  f"diff {diff:.1e}", flush=True)
    module.runtime = None
    return rows


# --------------------------------------------------------------------------- parts 2 and 3: whole runs


def _child(cmd: list[str], timeout: float = 3600.0) -> tuple[int, float, int, str]:
    """Run ``cmd`` through ``speed.py``'s minimal launcher (a child of this big process would inherit its
    peak RSS); ``(status, wall seconds, peak RSS bytes, stderr tail)``."""
    from speed import launch

    return launch(cmd, timeout)


def _mask(path: Path) -> np.ndarray:
    import cv2

    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise SystemExit(f"cannot read {path}")
    return m > 127


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def run_part(label: str, backends: list[str], extra: list[str], work: Path,
             peer: Path | None = None) -> list[dict[str, Any]]:
    """``refine run`` per backend (and the official code when ``peer`` is given); IoU against the first."""
    rows: list[dict[str, Any]] = []
    masks: dict[str, np.ndarray] = {}
    runs: list[tuple[str, list[str]]] = []
    for backend in backends:
        out, rep = work / f"{label}.{backend}.png", work / f"{label}.{backend}.json"
        runs.append((backend, [sys.executable, "-m", "refine_cli", "run", str(PHOTO),
                               "--mask", str(PHOTO_MASK), "-o", str(out),
                               "--uncertainty", str(work / f"{label}.{backend}.unc.png"),
                               "--report", str(rep), "--method", "cascade", "--backend", backend,
                               "--overwrite", "-q", *extra]))
    if peer is not None:
        peer_out = work / f"{label}.official code.png"
        runs.insert(0, ("official code", [sys.executable, str(Path(__file__).resolve()), "_official",
                                          str(peer), str(OFFICIAL_L), str(peer_out)]))
    for backend, cmd in runs:
        for _ in range(2):  # the first run of a backend exports its graphs: time the second
            status, wall, rss, tail = _child(cmd)
            if status or backend in ("torch", "official code"):
                break
        rec: dict[str, Any] = {"part": label, "backend": backend, "status": status, "wall_seconds": wall,
                               "peak_rss_mib": rss / 2**20}
        if status:
            rec["error"] = (tail.strip().splitlines() or ["?"])[-1]
        else:
            masks[backend] = _mask(work / f"{label}.{backend}.png")
            rep = work / f"{label}.{backend}.json"
            if rep.is_file():
                r = json.loads(rep.read_text())
                rec["stages"] = {k: round(v, 2) for k, v in r.get("stages", {}).items()}
                rec["run_seconds"] = r.get("wall_seconds")
            else:
                rec["run_seconds"] = json.loads((work / f"{label}.{backend}.png.time").read_text())["refine"]
        rows.append(rec)
        print(f"  {label:9s} {backend:14s} " + (f"{wall:6.1f} s  RSS {rss / 2**20:5.0f} MiB" if not status
                                                  else rec["error"]), flush=True)
    base = next(iter(masks), None)
    for rec in rows:
        if base is not None and rec["backend"] in masks:
            rec["iou_vs_" + base] = _iou(masks[rec["backend"]], masks[base])
    return rows


def official_child(checkpoint: str, size: str, out: str) -> int:
    """The official code on ``aeroplane.jpg`` with ``checkpoint``; writes the mask and ``OUT.time``."""
    import types

    import cv2
    import torch

    try:
        import torchvision.transforms  # noqa: F401
    except Exception:  # an equivalent of the two transforms the official code uses
        tv = types.ModuleType("torchvision")
        tr = types.ModuleType("torchvision.transforms")

        class ToTensor:
            def __call__(self, a: np.ndarray) -> torch.Tensor:
                t = torch.from_numpy(np.ascontiguousarray(a if a.ndim == 3 else a[..., None]))
                return t.permute(2, 0, 1).contiguous().to(torch.float32).div(255)

        class Normalize:
            def __init__(self, mean: list[float], std: list[float]) -> None:
                self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

            def __call__(self, t: torch.Tensor) -> torch.Tensor:
                return t.sub(self.mean).div(self.std)

        class Compose:
            def __init__(self, fns: list[Any]) -> None:
                self.fns = fns

            def __call__(self, x: Any) -> Any:
                for fn in self.fns:
                    x = fn(x)
                return x

        tr.ToTensor, tr.Normalize, tr.Compose = ToTensor, Normalize, Compose  # type: ignore[attr-defined]
        tv.transforms = tr  # type: ignore[attr-defined]
        sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, tr
    import segmentation_refinement as sr

    folder = Path(checkpoint).parent
    refiner = sr.Refiner(device="cpu", model_folder=str(folder), download_and_check_model=False)
    image = cv2.cvtColor(cv2.imread(str(PHOTO)), cv2.COLOR_BGR2RGB)
    mask = cv2.imread(str(PHOTO_MASK), cv2.IMREAD_GRAYSCALE)
    t0 = time.perf_counter()
    result = refiner.refine(image, mask, fast=False, L=int(size))
    seconds = time.perf_counter() - t0
    cv2.imwrite(out, result)
    Path(out + ".time").write_text(json.dumps({"refine": seconds}))
    return 0


def _peer(peer_path: Path | None) -> bool:
    """Whether the official code imports (adding ``peer_path`` to ``PYTHONPATH`` for the children)."""
    if peer_path is not None:
        paths = [str(peer_path), os.environ.get("PYTHONPATH")]
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        sys.path.insert(0, str(peer_path))
    import importlib.util

    return importlib.util.find_spec("segmentation_refinement") is not None


# --------------------------------------------------------------------------- tables


def markdown(result: dict[str, Any]) -> str:
    """The tables as Markdown."""
    lines = [f"Machine: {result['machine']}", "",
             "| model | call | backend | s/call | max prob diff vs torch |", "|---|---|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['call']} | {r['backend']} | {r['seconds']:.3f} | "
              f"{r['max_prob_diff']:.1e} |" for r in result.get("forward", [])]
    if result.get("magnet"):
        lines += ["", "| model | call | backend | s/call | max logit diff vs torch |",
                  "|---|---|---|---:|---:|"]
        lines += [f"| {r['model']} | {r['call']} | {r['backend']} | {r['seconds']:.3f} | "
                  f"{r['max_logit_diff']:.1e} |" for r in result["magnet"]]
    lines += ["", "| run | backend | wall s | refine's own s | peak RSS MiB | IoU vs first | stages (s) |",
              "|---|---|---:|---:|---:|---:|---|"]
    for r in result.get("runs", []):
        iou = next((v for k, v in r.items() if k.startswith("iou_vs_")), None)
        if r["status"]:
            lines.append(f"| {r['part']} | {r['backend']} | *{r.get('error', '')}* | | | | |")
            continue
        own = r.get("run_seconds")
        lines.append(f"| {r['part']} | {r['backend']} | {r['wall_seconds']:.1f} | "
                     f"{own:.1f} | {r['peak_rss_mib']:.0f} | "
                     f"{'' if iou is None else f'{iou:.5f}'} | {r.get('stages', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_official":
        return official_child(*argv[1:4])
    from refine_cli.models.runtime import installed

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="forward,magnet,photo,official")
    ap.add_argument("--backends", default=None, help="default: torch and every installed one")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--peer-path", type=Path, default=None, help="folder holding segmentation_refinement")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    a = ap.parse_args(argv)
    backends = (a.backends.split(",") if a.backends
                else [b for b in ("torch", "onnx", "openvino") if installed(b)])
    parts = a.parts.split(",")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import machine_info

    mach = machine_info()
    result: dict[str, Any] = {"benchmark": "backends", "machine": f"{mach['cores']} cores, {mach['cpu']}",
                              "machine_info": mach, "load_average_at_start": list(os.getloadavg()),
                              "backends": backends, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if not PHOTO.is_file():
        print(f"{PHOTO} not found: the benchmark needs ../shared beside the checkout")
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        os.environ.setdefault("REFINE_HOME", str(work / "home"))
        if "forward" in parts:
            print("forward (one network call):")
            result["forward"] = forward_part(backends, a.repeat, Path(os.environ["REFINE_HOME"]) / "graphs")
        if "magnet" in parts:
            print("magnet (the refinement module, one call):")
            result["magnet"] = magnet_part(backends, a.repeat, Path(os.environ["REFINE_HOME"]) / "graphs")
        result["runs"] = []
        if "photo" in parts:
            print("photo (refine run --method cascade, defaults):")
            result["runs"] += run_part("photo", backends, [], work)
        if "official" in parts:
            from refine_cli.devtools.fill_cascadepsp import save_fill_checkpoint

            print("official architecture, fill weights, L = 900, full:")
            ours = save_fill_checkpoint(work / "fill.pth", module_prefix=False)
            (work / "peer").mkdir()
            theirs = save_fill_checkpoint(work / "peer" / "model", module_prefix=True)
            peer = theirs if _peer(a.peer_path) else None
            if peer is None:
                print("  the official code (segmentation-refinement) is not installed: refine only")
            result["runs"] += run_part("official", backends, ["--weights", str(ours), "--cascade-size",
                                                              str(OFFICIAL_L), "--guard", "off"], work, peer)
    result["seconds_total"] = round(time.perf_counter() - time.mktime(time.strptime(result["started"],
                                                                                   "%Y-%m-%dT%H:%M:%S")), 1)
    (a.out / "backends.json").write_text(json.dumps(result, indent=1) + "\n")
    (a.out / "backends.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {a.out / 'backends.json'}, backends.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
