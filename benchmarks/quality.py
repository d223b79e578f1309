"""Quality benchmark: every available refiner on every evaluation set -> IoU, mBA, boundary F, s/MPx.

Methods come from the refiner registry (``refine_cli.refiners.list_refiners``);
each is probed on a tiny image first and reported as ``unavailable: <reason>``
when it cannot run (missing weights, missing optional package). The null
refiner ``coarse`` (the coarse mask resampled to the image) is the baseline.

Data sets (each case has an image, a GT and coarse masks of several kinds), by size class
(``--sizes small,large,huge``, default all three; the names carry the size):

small, ~1 MPx:

* ``synthetic``: 4 analytic scenes of ``refine_cli.devtools.synthetic``, 1536² (exact GT;
  needs no data, so ``--quick`` runs anywhere).
* ``shapes`` / ``portrait-comp``: composites of real photos with exact GT,
  written by ``benchmarks/make_composites.py`` (24 shape and 8 portrait cases, 1024²).
* ``p3m``: the 8 real P3M portraits (~1.9 MPx); the alpha mattes are *pseudo*-GT (P3M-Net
  output), so treat absolute numbers with care.
* ``nuclei``: the DSB2018 fluorescence image with hand-annotated nuclei (GT = label > 0), 512².
* ``aerial`` / ``cells`` / ``thin``: 8 many-object scenes each of ``refine_cli.train.scenes``
  (roofs seen from above, touching nuclei, wires and strands), 1024², exact GT.

large, 4K-8K (12-45 MPx), made by ``make_composites.py`` with the generator of the 1024 sets:

* ``shapes-large``: 6 cases, 4096x3072, 4096x6144, 8192x5464 (width x height) in turn;
* ``portrait-large``: 4 cases, 3072x4096, 6144x4096, 5464x8192 in turn. The P3M portraits are
  ~1080 px tall, so the person is upscaled 2-20x (soft, blurred); the photos are 1-6K px,
  cached up to 8192 px (smaller ones are upscaled too). Shapes are drawn on a 2x (not 4x)
  sub-pixel grid, which at 8K would otherwise take 6 GB.

huge, >= 100 MPx:

* ``aerial-huge``: one 10240² aerial scene (105 MPx; ``--huge-side 20000``: 400 MPx), written 1024
  rows at a time as tiled deflate TIFF (image, GT 0/255, detector); nothing holds the whole image.

Coarse kinds, at the same size *relative to the image* in every set:

* ``lowres``: the GT block-averaged and stored small, so that ``refine run`` upsamples it
  (1/8 for synthetic, p3m and the scenes, 1/4 for nuclei). The 1024 composites store theirs
  upsampled with a factor r = 4-32 (log-uniform); the large composites draw r the same way and
  average by ``r * long side / 1024`` (32-256 at 8192 px), stored small.
* ``perturbed``: CascadePSP's training perturbation (target IoU 0.8-1), at full size: its
  rectangles scale with the object and its kernels with the image, so it is scale-free but for
  the polygon simplification (every 10th contour pixel). Not made for ``aerial-huge`` (it holds
  the whole mask in memory).
* ``segmenter``: MediaPipe selfie segmentation, 256 px long side, portraits only (skipped with a
  logged reason while ``ai_edge_litert`` is not importable).
* ``detector``: the scenes' simulated instance detector (per-object shape errors, missed
  objects, false positives), full size.

Every case runs through ``refine_cli.api.refine_file`` (the code path of
``refine run``) and is scored by ``refine_cli.evaluation_io.evaluate_pair``
(that of ``refine eval``). **Harm** is counted per case: a run harms when its IoU is more than
:data:`HARM_IOU` (0.5 points) below the IoU of the coarse mask it started from (the ``coarse``
method on the same case and coarse kind); every table gives, per method, data set and coarse
kind, the harm count and the worst case (lowest IoU and largest IoU loss). Seconds per
megapixel are the runs' wall time (opening files, refining, writing) over the image sizes.
Nothing is asserted: the numbers are printed, written as JSON and Markdown and plotted.

Time budget (``--max-minutes``, default 55, not counting the first run's data generation,
which is cached in ``--work``): each method gets an equal share of what is left; a method that
runs out of its share stops and is marked ``partial n/N``. Jobs run one of every data set
first, then from the set with the fewest megapixels run so far (:func:`interleave`), and that
first round runs even past the share, so every method covers every data set; the ~1 MPx sets
are not starved by the 100 MPx one.

``--keep-outputs`` keeps every refined mask as
``<work>/outputs/<method>/<data set>__<case>__<kind>.png`` (``.tif`` for large and huge); each
run's record in the JSON names its ``image``, ``gt`` and ``coarse_path`` (and ``output``).

Usage::

    python benchmarks/quality.py [--quick] [--out benchmarks/results] [--work DIR] [--methods a,b]
                                 [--sizes small,large,huge] [--datasets a,b] [--keep-outputs]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
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
COARSE_KINDS = ("lowres", "perturbed", "segmenter", "detector")
COMPOSITES = ("shapes", "portrait-comp")  # exact-GT composites, pooled as "the composites benchmark"
SIZE_CLASSES = {
    "small": ("synthetic", "shapes", "portrait-comp", "p3m", "nuclei", "aerial", "cells", "thin"),
    "large": ("shapes-large", "portrait-large"),
    "huge": ("aerial-huge",),
}
"""Data sets by size class (``--sizes``): ~1 MPx, 4K-8K (12-45 MPx), >= 100 MPx."""
SCENE_FAMILIES = ("aerial", "cells", "thin")
REFERENCE_SIDE = 1024
"""The large composites' coarse masks are drawn as for a composite of this side (same relative size)."""
LARGE_SHAPE_SIZES = ((3072, 4096), (6144, 4096), (5464, 8192))
"""``(height, width)`` of the ``shapes-large`` cases, taken in turn (long sides 4096, 6144, 8192)."""
LARGE_PORTRAIT_SIZES = ((4096, 3072), (4096, 6144), (8192, 5464))
"""``(height, width)`` of the ``portrait-large`` cases, taken in turn."""
LARGE_SUPERSAMPLE = 2
"""Sub-pixel grid of the large shapes (``make_composites.py --supersample``): 4 would take 6 GB at 8K."""
SCENE_LOWRES = 8
"""Block-mean factor of the scene sets' ``lowres`` coarse masks (stored small)."""
SCENE_SEED = 4000
HUGE_SIDE = 10240
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


def peak_rss() -> int | None:
    """Peak resident set size of this process so far, bytes (``None`` where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
        shape: ``(height, width)`` of the image.
        scale: size class of its data set (``small`` | ``large`` | ``huge``); large and huge
            outputs are written as tiled TIFF.
    """

    dataset: str
    name: str
    image: Path
    gt: Path
    coarse: dict[str, Path]
    megapixels: float
    shape: tuple[int, int] = (0, 0)
    scale: str = "small"


@dataclass
class DataSet:
    """A data set and what was left out of it.

    Attributes:
        name: data-set name.
        cases: its cases.
        note: one line on what the GT is.
        skipped: ``{coarse kind or 'all': reason}``.
        size: the image sizes, in words (``1024²``, ``4096x3072, 8192x5464`` as width x height ...).
        scale: size class (``small`` | ``large`` | ``huge``, see :data:`SIZE_CLASSES`).
    """

    name: str
    cases: list[Case] = field(default_factory=list)
    note: str = ""
    skipped: dict[str, str] = field(default_factory=dict)
    size: str = ""
    scale: str = "small"

    def add(self, name: str, image: Path, gt: Path, coarse: dict[str, Path], shape: tuple[int, int]) -> None:
        """Append a case of this set."""
        h, w = int(shape[0]), int(shape[1])
        self.cases.append(Case(self.name, name, image, gt, coarse, h * w / 1e6, (h, w), self.scale))


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

    ds = DataSet("synthetic", note="analytic shapes on periodic texture, exact GT", size=f"{side}²")
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
        ds.add(f"scene_{i:02d}", image, gtp, {"lowres": low, "perturbed": pert}, (side, side))
    return ds


def make_composites(out: Path, args: list[str]) -> Path:
    """Run ``make_composites.py`` into ``out`` once (a child process, so its memory is returned);
    the manifest path."""
    manifest = out / "manifest.json"
    if not manifest.is_file():
        cmd = [sys.executable, str(REPO / "benchmarks" / "make_composites.py"), str(out), *args,
               "--overwrite"]
        log.info("generating composites: %s", " ".join(cmd[1:]))
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        log.info("composites in %s: %.0f s", out, time.perf_counter() - t0)
    return manifest


def manifest_cases(manifest: Path, shapes: DataSet | None, portraits: DataSet | None, seg: Segmenter) -> None:
    """Add the cases of a ``make_composites.py`` manifest to ``shapes`` / ``portraits`` (with the
    ``segmenter`` coarse mask of each portrait, made once)."""
    out = manifest.parent
    for case in json.loads(manifest.read_text())["cases"]:
        folder = out / case["case"]
        coarse = {"lowres": folder / case["coarse"]["lowres"]["file"],
                  "perturbed": folder / case["coarse"]["cascadepsp"]["file"]}
        ds = portraits if case["kind"] == "portraits" else shapes
        if ds is None:
            continue
        if ds is portraits:
            seg_path = folder / "coarse_segmenter.png"
            if seg.available:
                if not seg_path.is_file():
                    rgb = cv2.cvtColor(cv2.imread(str(folder / case["image"])), cv2.COLOR_BGR2RGB)
                    write_png(seg_path, to_u8(seg.coarse(rgb)))
                coarse["segmenter"] = seg_path
            else:
                ds.skipped["segmenter"] = seg.reason
        h, w = case.get("size") or cv2.imread(str(folder / case["gt"]), cv2.IMREAD_GRAYSCALE).shape
        ds.add(case["case"], folder / case["image"], folder / case["gt"], coarse, (h, w))


def composite_sets(work: Path, n_shapes: int, n_portraits: int, size: int, seg: Segmenter) -> list[DataSet]:
    """Composites of real photos (``make_composites.py``), generated once into ``work``."""
    shapes = DataSet("shapes", note="shapes textured with real photos on real photos, exact GT",
                     size=f"{size}²")
    portraits = DataSet("portrait-comp", note="P3M portraits composited on real photos, exact GT (the alpha)",
                        size=f"{size}²")
    if not (SHARED / "data" / "photos").is_dir():
        reason = f"{SHARED / 'data' / 'photos'} not found"
        shapes.skipped["all"] = portraits.skipped["all"] = reason
        return [shapes, portraits]
    if n_portraits and not (SHARED / "data" / "p3m-portraits-pseudogt").is_dir():
        portraits.skipped["all"] = "P3M portraits not found"
        n_portraits = 0
    manifest = make_composites(work / f"composites-{size}-{n_shapes}-{n_portraits}",
                               ["--n-shapes", str(n_shapes), "--n-portraits", str(n_portraits),
                                "--size", str(size)])
    manifest_cases(manifest, shapes, portraits, seg)
    return [shapes, portraits]


def size_words(sizes: Iterable[tuple[int, int]]) -> str:
    """``W x H`` sizes (width first, as image viewers say) of a set, e.g. ``4096x3072, 8192x5464``."""
    return ", ".join(f"{w}x{h}" for h, w in sizes)


def large_sets(work: Path, n_shapes: int, n_portraits: int, seg: Segmenter,
               wanted: set[str]) -> list[DataSet]:
    """4K-8K composites (``shapes-large``, ``portrait-large``): the generator of the 1024 sets at
    :data:`LARGE_SHAPE_SIZES` / :data:`LARGE_PORTRAIT_SIZES`, coarse masks relative to 1024 px."""
    shapes = DataSet("shapes-large", scale="large", size=size_words(LARGE_SHAPE_SIZES),
                     note="shapes textured with real photos on real photos, exact GT; photos (1-6K px) "
                          "cached up to 8192 px, so the smaller ones are upscaled")
    portraits = DataSet("portrait-large", scale="large", size=size_words(LARGE_PORTRAIT_SIZES),
                        note="P3M portraits on real photos, exact GT; the portraits are ~1080 px tall, so "
                             "the person (0.6-2.5 image heights) is upscaled 2-20x: a soft, blurred subject")
    out: list[DataSet] = []
    for ds, n, sizes, kind in ((shapes, n_shapes, LARGE_SHAPE_SIZES, "shapes"),
                               (portraits, n_portraits, LARGE_PORTRAIT_SIZES, "portraits")):
        if ds.name not in wanted:
            continue
        out.append(ds)
        if not (SHARED / "data" / "photos").is_dir():
            ds.skipped["all"] = f"{SHARED / 'data' / 'photos'} not found"
            continue
        if kind == "portraits" and not (SHARED / "data" / "p3m-portraits-pseudogt").is_dir():
            ds.skipped["all"] = "P3M portraits not found"
            continue
        counts = ["--n-shapes", str(n if kind == "shapes" else 0),
                  "--n-portraits", str(n if kind == "portraits" else 0)]
        tag = "-".join(f"{w}x{h}" for h, w in sizes)
        manifest = make_composites(
            work / f"large-{kind}-{n}-{tag}",
            [*counts, "--size", *(f"{h}x{w}" for h, w in sizes), "--reference-side", str(REFERENCE_SIDE),
             "--supersample", str(LARGE_SUPERSAMPLE)])
        manifest_cases(manifest, shapes if kind == "shapes" else None,
                       portraits if kind == "portraits" else None, seg)
    return out


def p3m_set(work: Path, seg: Segmenter, limit: int | None = None) -> DataSet:
    """The real P3M portraits with their alpha mattes as pseudo-GT."""
    ds = DataSet("p3m", note="real portraits; GT = P3M-Net alpha (pseudo-GT)", size="1080 px tall, ~1.9 MPx")
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
        ds.add(img.stem, img, gt, coarse, alpha.shape)
    return ds


def nuclei_set(work: Path) -> DataSet:
    """The DSB2018 nuclei image (uint16) with GT = label > 0; coarse ``lowres`` by 4 (nuclei are small)."""
    import tifffile

    ds = DataSet("nuclei", note="fluorescence nuclei, hand-annotated labels > 0", size="512²")
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
    ds.add("img2d", root / "image.tif", gtp, {"lowres": low, "perturbed": pert}, gt.shape)
    return ds


def load_scenes() -> tuple[Any, str]:
    """``refine_cli.train.scenes`` and ``""``, or ``None`` and why it cannot be imported."""
    try:
        from refine_cli.train import scenes
    except ImportError as exc:
        return None, f"refine_cli.train.scenes is not importable ({exc})"
    return scenes, ""


@functools.lru_cache(maxsize=1)
def scene_photos() -> Any:
    """The shared photos as a ``PhotoBank`` (one per process, so decoded photos are reused), or ``None``."""
    from refine_cli.train.data import PhotoBank

    root = SHARED / "data" / "photos"
    return PhotoBank(root) if root.is_dir() else None


def scene_generator(scenes: Any, family: str, shape: tuple[int, int], seed: int) -> Any:
    """``SceneGenerator(family, shape, seed)`` with the shared photos as textures when present."""
    return scenes.SceneGenerator(family, shape, seed, photos=scene_photos())


def generator_stamp(scenes: Any, **params: Any) -> dict[str, Any]:
    """What a cached scene was made from: the parameters and a hash of ``scenes.py``, so a changed
    generator regenerates the cache instead of scoring stale files."""
    source = Path(scenes.__file__).read_bytes()
    return {"scenes_sha1": hashlib.sha1(source).hexdigest(), **params}


def cached(folder: Path, stamp: dict[str, Any], files: Iterable[Path]) -> bool:
    """Whether ``folder`` holds ``files`` made with ``stamp`` (``folder/stamp.json``)."""
    meta = folder / "stamp.json"
    return (meta.is_file() and json.loads(meta.read_text()) == stamp and all(f.is_file() for f in files))


def scene_sets(work: Path, families: Iterable[str], n: int, side: int) -> list[DataSet]:
    """Many-object scenes of ``refine_cli.train.scenes`` at ``side``² (whole windows), one data set per
    family: exact GT, coarse ``lowres`` (block mean by :data:`SCENE_LOWRES`, stored small),
    ``perturbed`` and ``detector`` (the generator's simulated detector output)."""
    families = list(families)
    notes = {"aerial": "aerial-style scene, many buildings/objects, exact GT",
             "cells": "microscopy-style scene, many touching cells, exact GT",
             "thin": "thin structures (wires, branches, vessels), exact GT"}
    sets = [DataSet(f, note=notes.get(f, "many-object scene, exact GT"), size=f"{side}²") for f in families]
    scenes, reason = load_scenes()
    if scenes is None:
        for ds in sets:
            ds.skipped["all"] = reason
        return sets
    for ds in sets:
        if ds.name not in scenes.FAMILIES:
            ds.skipped["all"] = f"family {ds.name!r} is not in refine_cli.train.scenes.FAMILIES"
            continue
        for i in range(n):
            seed = SCENE_SEED + i
            folder = work / f"scenes-{side}" / f"{ds.name}_{i:02d}"
            files = {k: folder / f"{k}.png" for k in ("image", "gt", "lowres", "perturbed", "detector")}
            stamp = generator_stamp(scenes, family=ds.name, shape=[side, side], seed=seed,
                                    lowres=SCENE_LOWRES)
            if not cached(folder, stamp, files.values()):
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "stamp.json").unlink(missing_ok=True)
                write_scene_case(scene_generator(scenes, ds.name, (side, side), seed), files, [17, i])
                (folder / "stamp.json").write_text(json.dumps(stamp) + "\n")
            ds.add(f"{ds.name}_{i:02d}", files["image"], files["gt"],
                   {k: files[k] for k in ("lowres", "perturbed", "detector")}, (side, side))
    return sets


def write_scene_case(gen: Any, files: dict[str, Path], seed: list[int]) -> None:
    """Render a whole (small) scene and write its image, GT, and ``lowres`` / ``perturbed`` /
    ``detector`` coarse masks as PNG."""
    from refine_cli.tiling.grid import Window

    win = gen.render(Window.full(tuple(gen.shape)))
    gt = np.asarray(win.gt, np.float32)
    write_png(files["image"], np.asarray(win.image, np.uint8))
    write_png(files["gt"], to_u8(gt))
    write_png(files["lowres"], to_u8(lowres(gt, SCENE_LOWRES)))
    write_png(files["perturbed"], to_u8(perturbed(gt, seed)))
    write_png(files["detector"], to_u8(np.asarray(win.detector, np.float32)))


def write_scene_tiffs(gen: Any, folder: Path, band: int = 1024,
                      factor: int = SCENE_LOWRES) -> dict[str, Path]:
    """Write a scene band by band (``band`` full-width rows at a time, bounded memory).

    Files: ``image.tif`` (RGB uint8), ``gt.tif`` (uint8 0/255, ``gt >= 0.5``) and ``detector.tif``
    (uint8 0-255), tiled 512 x 512 deflate BigTIFF through ``refine_cli.io.writers.TiffSink`` (each
    published atomically when complete), and ``lowres.png``, the soft GT block-averaged by ``factor``
    (``refine_cli.train.data.block_mean``; ``band`` is a multiple of ``factor``, so the bands'
    block means are the whole image's), stored small.
    """
    from refine_cli.io.writers import TiffSink
    from refine_cli.tiling.grid import Window
    from refine_cli.train.data import block_mean

    if band % factor:
        raise ValueError(f"band {band} must be a multiple of the lowres factor {factor}")
    h, w = (int(v) for v in gen.shape)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"image": folder / "image.tif", "gt": folder / "gt.tif", "detector": folder / "detector.tif",
             "lowres": folder / "lowres.png"}
    sinks = {"image": TiffSink(str(paths["image"]), (h, w), 3, np.uint8, overwrite=True),
             "gt": TiffSink(str(paths["gt"]), (h, w), 1, np.uint8, overwrite=True),
             "detector": TiffSink(str(paths["detector"]), (h, w), 1, np.uint8, overwrite=True)}
    small = []
    try:
        for row in range(0, h, band):
            win = gen.render(Window(row, 0, min(band, h - row), w))
            gt = np.asarray(win.gt, np.float32)
            sinks["image"].write_rows(row, np.asarray(win.image, np.uint8))
            sinks["gt"].write_rows(row, np.where(gt >= 0.5, np.uint8(255), np.uint8(0)))
            sinks["detector"].write_rows(row, to_u8(np.asarray(win.detector, np.float32)))
            small.append(block_mean(gt, factor))
            del win, gt
        for sink in sinks.values():
            sink.commit()
    except BaseException:
        for sink in sinks.values():
            if not sink.closed:
                sink.abort()
        raise
    write_png(paths["lowres"], to_u8(np.concatenate(small, axis=0)))
    return paths


def scene_tiffs(job: dict[str, Any]) -> None:
    """:func:`write_scene_tiffs` of the scene ``job`` names (``family``, ``shape``, ``seed``, ``folder``,
    ``band``): what the hidden ``--scene-tiffs JSON`` option runs in a child process."""
    scenes, reason = load_scenes()
    if scenes is None:
        raise RuntimeError(reason)
    gen = scene_generator(scenes, job["family"], tuple(job["shape"]), job["seed"])
    write_scene_tiffs(gen, Path(job["folder"]), job["band"])
    log.info("peak RSS while writing the scene: %.0f MiB", (peak_rss() or 0) / 2**20)


def huge_set(work: Path, side: int, band: int = 1024, child: bool = True) -> DataSet:
    """``aerial-huge``: one ``side``² aerial scene (>= 100 MPx at 10240), written band by band as tiled
    TIFF (by a child process unless ``child`` is false, so the runs' memory is not the generator's);
    coarse ``lowres`` (1/8, stored small) and ``detector`` (full size). No ``perturbed``: that
    perturbation works on the whole mask in memory."""
    ds = DataSet("aerial-huge", scale="huge", size=f"{side}²",
                 note=f"one {side * side / 1e6:.0f} MPx aerial scene, many objects, exact GT")
    scenes, reason = load_scenes()
    if scenes is None:
        ds.skipped["all"] = reason
        return ds
    folder = work / f"aerial-huge-{side}"
    seed = SCENE_SEED + 1000
    stamp = generator_stamp(scenes, family="aerial", shape=[side, side], seed=seed, lowres=SCENE_LOWRES,
                            band=band)
    names = {"image": "image.tif", "gt": "gt.tif", "detector": "detector.tif", "lowres": "lowres.png"}
    paths = {k: folder / v for k, v in names.items()}
    if not cached(folder, stamp, paths.values()):
        (folder / "stamp.json").unlink(missing_ok=True)
        log.info("writing the %dx%d aerial scene to %s", side, side, folder)
        t0 = time.perf_counter()
        job = {"family": "aerial", "shape": [side, side], "seed": seed, "folder": str(folder), "band": band}
        if child:
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--scene-tiffs", json.dumps(job)],
                           check=True)
        else:
            scene_tiffs(job)
        (folder / "stamp.json").write_text(json.dumps(stamp) + "\n")
        log.info("aerial-huge written in %.0f s", time.perf_counter() - t0)
    ds.skipped["perturbed"] = "not made at this size (the perturbation holds the whole mask in memory)"
    ds.add("aerial_00", paths["image"], paths["gt"],
           {"lowres": paths["lowres"], "detector": paths["detector"]}, (side, side))
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
    """``(case, coarse kind)`` jobs in the order they run, so that a method stopped by its time share
    has covered every data set, and the data sets about equally by pixels.

    Within a data set the jobs keep their order (case by case, the kinds of a case together). Each
    next job comes from the data set with the fewest megapixels queued so far (ties: the set listed
    first): so first one job of every set, in order, then the small sets catch up with the large
    ones (a 1 MPx set runs ~100 cases in the time of one 100 MPx case) before more large cases run.
    """
    kinds = tuple(kinds)
    queues = [q for q in ([(c, k) for c in ds.cases for k in kinds if k in c.coarse] for ds in sets) if q]
    done = [0.0] * len(queues)
    pos = [0] * len(queues)
    jobs = []
    while True:
        open_ = [i for i, q in enumerate(queues) if pos[i] < len(q)]
        if not open_:
            return jobs
        i = min(open_, key=lambda j: (done[j], j))
        job = queues[i][pos[i]]
        jobs.append(job)
        pos[i] += 1
        done[i] += job[0].megapixels


def run_method(
    method: str, jobs: list[tuple[Case, str]], out_dir: Path, budget_s: float, config: Any = None,
    keep: bool = False, first: int = 0,
) -> tuple[list[dict], bool]:
    """Refine and score every job with one method (or its variant ``config``) until ``budget_s`` is spent.

    The first ``first`` jobs run whatever the budget (:func:`interleave` puts one job of every data set
    first, so every method covers every data set).

    The refined mask is ``out_dir/<data set>__<case>__<kind>.png`` (``.tif`` for the large and huge
    sets); it is deleted once scored unless ``keep``. A job that starts inside the share runs to the
    end, so a method can overrun its share by one job (minutes for the 100 MPx case).

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
        if n >= first and time.perf_counter() - t0 > budget_s:
            log.warning("%s: time share of %.0f s spent after %d of %d cases; the rest is skipped", method,
                        budget_s, n, len(jobs))
            return records, False
        rec: dict[str, Any] = {"method": method, "dataset": case.dataset, "case": case.name, "coarse": kind,
                               "megapixels": case.megapixels, "shape": list(case.shape),
                               "image": str(case.image), "gt": str(case.gt),
                               "coarse_path": str(case.coarse[kind])}
        suffix = ".png" if case.scale == "small" else ".tif"
        out = out_dir / f"{case.dataset}__{case.name}__{kind}{suffix}"
        t_job = time.perf_counter()
        try:
            rep = refine_file(str(case.image), str(case.coarse[kind]), str(out), config=config,
                              overwrite=True)
            res = evaluate_pair(out, case.gt)
            rec.update({k: res.metrics.scalars()[k] for k in METRICS}, seconds=rep.wall_seconds,
                       eval_seconds=res.seconds, tiles=rep.tiles)
            if keep:
                rec["output"] = str(out)
        except RefineError as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"
            log.warning("%s on %s/%s (%s): %s", method, case.dataset, case.name, kind, exc)
        finally:
            if not keep:
                out.unlink(missing_ok=True)
        rec["job_seconds"] = time.perf_counter() - t_job
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


def order_rows(rows: list[dict], datasets: list[str], methods: list[str]) -> list[dict]:
    """Rows grouped by data set (in the order of :data:`SIZE_CLASSES`), then method, then coarse kind."""
    def key(r: dict) -> tuple:
        d = datasets.index(r["dataset"]) if r.get("dataset") in datasets else len(datasets)
        m = methods.index(r["method"]) if r["method"] in methods else len(methods)
        c = COARSE_KINDS.index(r["coarse"]) if r.get("coarse") in COARSE_KINDS else len(COARSE_KINDS)
        return (d, m, c)

    return sorted(rows, key=key)


def markdown(result: dict) -> str:
    """The tables as Markdown (for benchmarks/README.md and the project README)."""
    lines = ["| data set | size class | cases | image size (w x h) | ground truth |",
             "|---|---|---:|---|---|"]
    for ds in result["datasets"].values():
        skipped = "; ".join(f"{k} skipped: {v}" for k, v in ds["skipped"].items())
        lines.append(f"| {ds['name']} | {ds['scale']} | {ds['cases']} | {ds['size']} | {ds['note']}"
                     + (f" ({skipped})" if skipped else "") + " |")
    lines += ["", "| data set | method | n | IoU | mBA | BF@2 | ΔmBA vs coarse | harm | worst IoU "
              "| worst ΔIoU | s/MPx |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["summary"]:
        lines.append(f"| {r['dataset']} | {r['method']} | {r['n']} | {fmt(r['iou'])} | {fmt(r['mba'])} | "
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
    lines += ["", "Per data set, coarse mask and method:", "",
              "| data set | coarse mask | method | n | IoU | mBA | ΔmBA vs coarse | harm | worst IoU "
              "| worst ΔIoU | s/MPx |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["by_coarse"]:
        lines.append(f"| {r['dataset']} | {r['coarse']} | {r['method']} | {r['n']} | {fmt(r['iou'])} | "
                     f"{fmt(r['mba'])} | {fmt(r['gain_mba'], signed=True)} | {harm_cell(r)} | "
                     f"{fmt(r['worst_iou'])} | {fmt(r['worst_delta_iou'], signed=True)} | "
                     f"{fmt(r['s_per_mpx'], 2)} |")
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
    """Rich tables on stdout: per data set x method, per data set x coarse kind x method, and the
    composites pooled."""
    from rich.console import Console
    from rich.table import Table

    con = Console(width=None if sys.stdout.isatty() else 160)
    mach = result["machine"]
    load = mach.get("load_average_at_start", [0.0])[0], mach.get("load_average", [0.0])[0]
    sizes = {d["name"]: d["size"] for d in result["datasets"].values()}
    for title, rows, keys in (
        (f"refine quality benchmark ({result['mode']}, {mach['cores']} cores, load {load[0]:.1f} -> "
         f"{load[1]:.1f}, {result['seconds']:.0f} s)", result["summary"], ("dataset",)),
        ("per coarse mask", result["by_coarse"], ("dataset", "coarse")),
    ):
        t = Table(title=title, title_justify="left")
        cols = ["data set", *(["coarse"] if "coarse" in keys else []), "method", "n", "IoU", "mBA",
                *(["BF@2"] if "coarse" not in keys else []), "ΔmBA", "harm", "worst IoU", "worst ΔIoU",
                "s/MPx"]
        for col in cols:
            t.add_column(col, justify="left" if col in ("method", "data set", "coarse") else "right")
        last = None
        for r in rows:
            if last is not None and r["dataset"] != last:
                t.add_section()
            first = r["dataset"] != last
            last = r["dataset"]
            n = str(r["n"]) + (f" ({r['failed']} failed)" if r["failed"] else "")
            name = f"{r['dataset']} ({sizes.get(r['dataset'], '')})" if first and "coarse" not in keys else (
                r["dataset"] if first else "")
            cells = [name, *([r["coarse"]] if "coarse" in keys else []), r["method"], n, fmt(r["iou"]),
                     fmt(r["mba"]), *([fmt(r["boundary_f"])] if "coarse" not in keys else []),
                     fmt(r["gain_mba"], signed=True), harm_cell(r), fmt(r["worst_iou"]),
                     fmt(r["worst_delta_iou"], signed=True), fmt(r["s_per_mpx"], 2)]
            t.add_row(*cells)
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
            con.print(f"{ds['name']}: skipped " + "; ".join(f"{k}: {v}" for k, v in ds["skipped"].items()),
                      highlight=False)


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


def selected_sets(args: argparse.Namespace) -> list[str] | None:
    """The data-set names ``--sizes`` and ``--datasets`` select, in run order (``None``: a name is
    unknown, logged)."""
    names = [n for cls in SIZE_CLASSES.values() for n in cls]
    sizes = [c.strip() for c in (args.sizes or ",".join(SIZE_CLASSES)).split(",") if c.strip()]
    unknown = [c for c in sizes if c not in SIZE_CLASSES]
    if unknown:
        log.error("unknown size class(es) %s; use %s", ", ".join(unknown), ",".join(SIZE_CLASSES))
        return None
    wanted = [n for c in SIZE_CLASSES if c in sizes for n in SIZE_CLASSES[c]]
    if args.datasets:
        named = [d.strip() for d in args.datasets.split(",") if d.strip()]
        unknown = [d for d in named if d not in names]
        if unknown:
            log.error("unknown data set(s) %s; the data sets are %s", ", ".join(unknown), ", ".join(names))
            return None
        wanted = [n for n in wanted if n in named]
    return wanted


def build_sets(args: argparse.Namespace, work: Path, wanted: list[str]) -> list[DataSet]:
    """The data sets of this mode that ``wanted`` names, generated into ``work`` on first use."""
    seg = Segmenter()
    if not seg.available:
        log.info("coarse kind 'segmenter' skipped: %s", seg.reason)
    want = set(wanted)
    sets: list[DataSet] = []
    if args.quick:
        if "synthetic" in want:
            sets.append(synthetic_set(work, 2, 384))
        if "shapes" in want:
            sets += [s for s in composite_sets(work, 2, 0, 256, seg) if s.name == "shapes"]
        if "nuclei" in want:
            sets.append(nuclei_set(work))
        if "aerial" in want:
            sets += scene_sets(work, ["aerial"], 1, 256)
        return sets
    if "synthetic" in want:
        sets.append(synthetic_set(work, 4, 1536))
    if want & set(COMPOSITES):
        sets += [s for s in composite_sets(work, 24, 8, 1024, seg) if s.name in want]
    if "p3m" in want:
        sets.append(p3m_set(work, seg))
    if "nuclei" in want:
        sets.append(nuclei_set(work))
    sets += scene_sets(work, [f for f in SCENE_FAMILIES if f in want], 8, 1024)
    if want & set(SIZE_CLASSES["large"]):
        sets += large_sets(work, 6, 4, seg, want)
    if "aerial-huge" in want:
        sets.append(huge_set(work, args.huge_side))
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
    parser.add_argument("--sizes", default=None, help="comma-separated size classes: small (~1 MPx), large "
                        "(4K-8K), huge (100 MPx); default all (--quick: small, tiny)")
    parser.add_argument("--datasets", default=None, help="comma-separated subset of the data sets ("
                        + ", ".join(n for c in SIZE_CLASSES.values() for n in c) + ")")
    parser.add_argument("--coarse", default=None,
                        help=f"comma-separated coarse kinds (default {','.join(COARSE_KINDS)})")
    parser.add_argument("--max-cases", type=int, default=None, help="at most this many cases per data set")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=METHOD[,GROUP.FIELD=VALUE]",
                        help="also run a method with other options under its own label, e.g. "
                             "lite2=cascade,cascade.weights=runs/a/best.pt (repeatable)")
    parser.add_argument("--keep-outputs", action="store_true",
                        help="keep every refined mask as <work>/outputs/<method>/<data set>__<case>__<kind>"
                             ".png (.tif for the large and huge sets)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--huge-side", type=int, default=HUGE_SIDE, help=f"side of the aerial-huge scene, px "
                        f"(default {HUGE_SIDE}: 105 MPx; 20000 gives 400 MPx)")
    parser.add_argument("--scene-tiffs", default=None, help=argparse.SUPPRESS)  # internal: huge_set's child
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    log.setLevel(logging.INFO)
    logging.getLogger("refine_cli").setLevel(logging.WARNING)
    if args.scene_tiffs:
        scene_tiffs(json.loads(args.scene_tiffs))
        return 0
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
    wanted = selected_sets(args)
    if wanted is None:
        return 2
    sets = build_sets(args, work, wanted)
    data_seconds = time.perf_counter() - t_start
    rss_data = peak_rss()
    log.info("data sets ready in %.0f s", data_seconds)
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
        left = budget - (time.perf_counter() - t_start - data_seconds)  # generating the data is not counted
        share = max(0.0, left / (len(runnable) - i))
        recs, complete = run_method(m, jobs, work / "outputs" / m, share, variants.get(m), args.keep_outputs,
                                    first=len({case.dataset for case, _ in jobs}))
        records += recs
        status[m] = {"status": "ok" if complete else f"partial {len(recs)}/{len(jobs)} (time budget)"}

    mark_harm(records)
    order = [s.name for s in sets]
    summary = order_rows(aggregate(records, ("method", "dataset")), order, methods)
    by_coarse = order_rows(aggregate(records, ("method", "dataset", "coarse")), order, methods)
    add_gain(summary, ("method", "dataset"))
    add_gain(by_coarse, ("method", "dataset", "coarse"))
    result = {
        "benchmark": "quality",
        "mode": "quick" if args.quick else "full",
        "machine": {**machine_info(), "load_average_at_start": load_start},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": time.perf_counter() - t_start,
        "data_seconds": data_seconds,
        "peak_rss_bytes": {"after_data": rss_data, "end": peak_rss()},
        "methods": {m: status[m] for m in methods},
        "variants": {label: spec for label, spec in (v.split("=", 1) for v in args.variant)},
        "sizes": sorted({s.scale for s in sets}, key=list(SIZE_CLASSES).index),
        "datasets": {s.name: {"name": s.name, "scale": s.scale, "size": s.size, "cases": len(s.cases),
                              "note": s.note, "skipped": s.skipped,
                              "kinds": [k for k in kinds if any(k in c.coarse for c in s.cases)],
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
    if args.keep_outputs:
        print(f"refined masks kept in {work / 'outputs'}")
    elif not args.work:
        shutil.rmtree(work / "outputs", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
