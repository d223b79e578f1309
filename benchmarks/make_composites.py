"""Write a fixed benchmark set of composites with exact ground truth.

Every case is a folder::

    OUT/shapes_000/  image.png  gt.png  coarse_lowres.png  coarse_perturbed.png
    OUT/portrait_000/ ...

* ``image``: RGB composite, ``round(alpha * fg + (1 - alpha) * bg)`` (PNG, or JPEG
  with ``--image-format jpg``);
* ``gt``: the alpha used to make it, 8-bit grey (``round(255 * alpha)``; a pixel
  is foreground when ``gt >= 128``, i.e. alpha >= 0.5);
* ``coarse_lowres``: the GT block-averaged by 4-32 and upsampled again;
* ``coarse_perturbed``: CascadePSP's training perturbation (target IoU 0.8-1).

Large composites (4K-8K, ``--size 3072x4096 5464x8192 ... --reference-side 1024``): the
same layers (``refine_cli.train.data.make_layers``), each made once, with the coarse masks
drawn *relative to the image* as they are for a ``--reference-side`` composite:

* ``coarse_lowres``: the GT area-averaged (``cv2.INTER_AREA``) by ``F = r * long side /
  reference side``, ``r`` drawn log-uniformly in 4-32 as at 1024 px (so ``F`` is 32-256 at
  8192 px: the mask is the same fraction of the image), binarised half of the time and stored
  **small**, about ``h / F x w / F``, for ``refine run`` to upsample;
* ``coarse_perturbed``: the same CascadePSP perturbation at full size; its rectangles scale with
  the object (``sqrt(area)``) and its kernels with ``min(h, w) / 224``, so the defects keep their
  relative size and the IoU target (0.8-1) is the same (only the polygon simplification, every
  10th contour pixel, is finer relative to a larger image).

``--cache-side`` defaults to the largest long side, so photo textures are not upscaled from a
1536 px cache (photos that are themselves smaller still are: the P3M portraits are ~1080 px
tall, so a person spanning 0.6-2.5 image heights of a 4-8K composite is upscaled 2-20x).
``--supersample`` lowers the shapes' sub-pixel grid (default 4, i.e. 16 sub-pixels per pixel;
at 8192 x 5464 that grid alone takes 6 GB while it is box-filtered, 2 takes 1.6 GB).

``manifest.json`` records each case's size and parameters, the source photos and their
licences. The same flags always give byte-identical files.

Licences: the composites contain pixels of ``shared/data/photos`` (CC-BY-4.0,
CC-BY-SA-3.0/4.0, CC0-1.0, GPL-2+) and of the P3M portraits (MIT). A case made
from a CC-BY-SA photo is a derivative and carries that BY-SA licence; the
photos' attribution table is copied next to the cases as ``PHOTOS_LICENSES.md``
and must stay with them.

Usage::

    python benchmarks/make_composites.py OUT [--n-shapes 24] [--n-portraits 8] [--size 1024]
    python benchmarks/make_composites.py OUT --n-shapes 6 --n-portraits 0 \\
        --size 3072x4096 6144x4096 5464x8192 --reference-side 1024 --supersample 2

``--size`` is one side (a square), ``HEIGHT WIDTH`` (two numbers), or one or more ``HxW``
(height x width) sizes that the cases of each kind take in turn.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from refine_cli.errors import RefineError, UsageError
from refine_cli.train import data
from refine_cli.train.data import SampleSpec, make_layers, make_sample, perturb

logger = logging.getLogger("make_composites")

COARSE = {"lowres": "coarse_lowres.png", "cascadepsp": "coarse_perturbed.png"}
SOURCE_KEYS = ("shapes", "fg", "bg", "portrait")


def photo_licenses(readme: Path) -> dict[str, dict[str, str]]:
    """File name -> {license, author} from the markdown table of the photos README (empty if absent)."""
    if not readme.is_file():
        return {}
    out: dict[str, dict[str, str]] = {}
    cols: list[str] = []
    for line in readme.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            cols = []
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not cols:
            cols = [c.lower() for c in cells]
            continue
        if set("".join(cells)) <= set("-: "):
            continue
        row = dict(zip(cols, cells, strict=False))
        if "file" in row and "license" in row:
            out[row["file"]] = {"license": row["license"], "author": row.get("author (copyright line)", "")}
    return out


def case_license(photos: list[str], table: dict[str, dict[str, str]], portrait: bool) -> dict:
    """Licences of a case's sources and the terms the composite inherits."""
    lic = {table.get(p, {}).get("license", "unknown") for p in photos}
    lic = sorted(lic | {"MIT"}) if portrait else sorted(lic)
    share_alike = [x for x in lic if "BY-SA" in x]
    gpl = [x for x in lic if x.startswith("GPL")]
    if share_alike and gpl:
        terms = "mixes CC-BY-SA and GPL sources: keep local, or check compatibility before redistributing"
    elif share_alike:
        terms = f"{share_alike[-1]}: share-alike inherited by the composite; credit the authors"
    elif gpl:
        terms = "GPL-2+: keep the copyright lines"
    elif "unknown" in lic:
        terms = "a source photo is not in the attribution table: check its licence"
    else:
        terms = "attribution (CC-BY) / no conditions (CC0, MIT): credit the authors"
    return {"sources": lic, "terms": terms}


def write_png(path: Path, array: np.ndarray) -> None:
    """Write uint8 grey or RGB as PNG (deterministic)."""
    data = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
    if not cv2.imwrite(str(path), data, [cv2.IMWRITE_PNG_COMPRESSION, 6]):
        raise OSError(f"cannot write {path}")


def to_u8(prob: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 0..255 (round half to even)."""
    return np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)


def parse_sizes(items: list[str]) -> list[tuple[int, int]]:
    """``--size`` values -> ``(height, width)`` sizes.

    One number is a square, two numbers are ``HEIGHT WIDTH`` (one size), anything else is a list
    of ``HxW`` (or single-number square) sizes.
    """
    plain = all(re.fullmatch(r"\d+", t) for t in items)
    if plain and len(items) in (1, 2):
        h, w = int(items[0]), int(items[-1])
        return [(h, w)]
    sizes = []
    for t in items:
        m = re.fullmatch(r"(\d+)(?:[xX](\d+))?", t.strip())
        if not m:
            raise UsageError(f"--size {t!r}: use SIDE, HEIGHT WIDTH, or HxW (e.g. 5464x8192)")
        sizes.append((int(m.group(1)), int(m.group(2) or m.group(1))))
    return sizes


def composite_rows(layers: data.Layers, rows: int = 512) -> np.ndarray:
    """:meth:`Layers.composite` computed in row bands (the same pixels; float32 temporaries of
    ``rows`` rows instead of three full-size ones, which at 8192 x 5464 are 540 MB each)."""
    out = np.empty(layers.fg.shape, np.uint8)
    for r in range(0, out.shape[0], rows):
        out[r : r + rows] = data.composite(layers.fg[r : r + rows], layers.bg[r : r + rows],
                                           layers.alpha[r : r + rows])
    return out


def write_image(folder: Path, rgb: np.ndarray, args: argparse.Namespace) -> str:
    """Write the composite as ``image.png`` or ``image.jpg``; returns the file name."""
    if args.image_format == "jpg":
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(str(folder / "image.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, args.jpeg_quality]):
            raise OSError(f"cannot write {folder / 'image.jpg'}")
        return "image.jpg"
    write_png(folder / "image.png", rgb)
    return "image.png"


def small_size(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """``(h, w)`` reduced by ``factor``: the short side rounded, the long side rounded from it, so both
    sides keep the image's aspect ratio within half a pixel (``refine run`` allows one)."""
    h, w = shape
    if h <= w:
        mh = max(1, round(h / factor))
        return mh, max(1, round(w * mh / h))
    mw = max(1, round(w / factor))
    return max(1, round(h * mw / w)), mw


def make_case(
    out: Path, name: str, index: int, kind: str, spec: SampleSpec, args: argparse.Namespace
) -> dict:
    """Case ``index`` of ``kind`` with its two coarse masks from :func:`make_sample` (stored at full size)."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    case: dict = {"case": name, "kind": kind, "index": index, "size": list(spec.size), "coarse": {}}
    first = None
    for method, fname in COARSE.items():
        s = make_sample(index, spec, kind=kind, perturbation=method)
        if first is None:
            first = s
            case["image"] = write_image(folder, s.image, args)
            write_png(folder / "gt.png", to_u8(s.gt))
            case["gt"] = "gt.png"
            case["foreground_fraction"] = float(s.hard.mean())
            case["sources"] = {k: v for k, v in s.meta.items() if k in SOURCE_KEYS}
        elif not (np.array_equal(s.image, first.image) and np.array_equal(s.gt, first.gt)):
            raise RuntimeError(f"case {name}: the image changed between coarse variants (not deterministic)")
        write_png(folder / fname, to_u8(s.coarse))
        keep = {k: v for k, v in s.meta.items() if k not in SOURCE_KEYS + ("index", "kind")}
        case["coarse"][method] = {"file": fname, **keep}
    return case


def make_scaled_case(
    out: Path, name: str, index: int, kind: str, spec: SampleSpec, args: argparse.Namespace
) -> dict:
    """Case ``index`` of ``kind`` with coarse masks drawn relative to a ``--reference-side`` image.

    The layers are made once (:func:`make_layers`, the same image and GT as ``make_sample``).
    ``lowres``: a relative factor ``r`` drawn log-uniformly in ``[4, 4 * 8 ** strength]`` (as
    ``perturb`` draws it), the GT area-averaged by ``F = r * long side / reference side`` to
    :func:`small_size` (about ``h / F x w / F``) and stored that small (binarised half of the time).
    ``cascadepsp``: :func:`perturb` at full size. Both come from ``default_rng([seed, index, 1])``.
    """
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    h, w = spec.size
    case: dict = {"case": name, "kind": kind, "index": index, "size": [h, w], "coarse": {}}
    layers, meta = make_layers(index, spec, kind=kind)
    image = composite_rows(layers)
    gt = layers.alpha
    del layers
    case["image"] = write_image(folder, image, args)
    del image
    write_png(folder / "gt.png", to_u8(gt))
    case["gt"] = "gt.png"
    hard = gt >= 0.5
    case["foreground_fraction"] = float(hard.mean())
    case["sources"] = {k: v for k, v in meta.items() if k in SOURCE_KEYS}
    rng = np.random.default_rng([spec.seed & 0xFFFFFFFF, index, 1])

    rel = float(2.0 ** rng.uniform(2.0, 2.0 + 3.0 * spec.strength))
    factor = max(1.0, rel * max(h, w) / args.reference_side)
    small_shape = small_size((h, w), factor)
    small = cv2.resize(gt, small_shape[::-1], interpolation=cv2.INTER_AREA)
    binarized = bool(rng.random() < 0.5)
    if binarized:
        small = (small >= 0.5).astype(np.float32)
    small_u8 = to_u8(small)
    write_png(folder / COARSE["lowres"], small_u8)
    # IoU of the mask as ``refine run`` sees it: the stored bytes, upsampled bilinearly (half-pixel centres)
    up = cv2.resize(small_u8.astype(np.float32) / 255.0, (w, h), interpolation=cv2.INTER_LINEAR) >= 0.5
    case["coarse"]["lowres"] = {
        "file": COARSE["lowres"], "perturbation": "lowres", "strength": spec.strength,
        "relative_factor": rel, "factor": factor, "reference_side": args.reference_side,
        "stored_size": list(small_shape), "binarized": binarized, "upsample": "refine run (bilinear)",
        "coarse_iou": data.iou(up, hard),
    }
    del up, small, small_u8

    coarse, pmeta = perturb(gt, "cascadepsp", rng, spec.strength)
    write_png(folder / COARSE["cascadepsp"], to_u8(coarse))
    case["coarse"]["cascadepsp"] = {"file": COARSE["cascadepsp"], **pmeta}
    return case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--n-shapes", type=int, default=24, help="shape composites (default 24)")
    parser.add_argument("--n-portraits", type=int, default=8, help="portrait composites (default 8)")
    parser.add_argument("--size", nargs="+", default=["1024"],
                        help="SIDE, HEIGHT WIDTH, or HxW sizes the cases take in turn (default 1024)")
    parser.add_argument("--reference-side", type=int, default=None, metavar="SIDE",
                        help="draw the coarse masks relative to a SIDE-px composite: lowres factor "
                             "r * long side / SIDE (r in 4-32) stored small; perturbed at full size")
    parser.add_argument("--cache-side", type=int, default=None,
                        help="photo cache long side (default: max(1536, the largest long side))")
    parser.add_argument("--supersample", type=int, default=None,
                        help=f"sub-pixels per pixel side of the shapes (default {data.SUPERSAMPLE})")
    parser.add_argument("--seed", type=int, default=20_250_101, help="seed of the set (default 20250101)")
    parser.add_argument("--strength", type=float, default=1.0, help="perturbation strength in (0, 2]")
    parser.add_argument("--photos", type=Path, default=None, help="photo folder (default: shared photos)")
    parser.add_argument("--portraits", type=Path, default=None, help="portrait folder (default: shared P3M)")
    parser.add_argument("--image-format", choices=("png", "jpg"), default="png")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)

    try:
        sizes = parse_sizes(args.size)
        if args.reference_side is not None and args.reference_side < 32:
            raise UsageError(f"--reference-side {args.reference_side} must be at least 32 px")
        if args.supersample is not None:
            if not 1 <= args.supersample <= 8:
                raise UsageError(f"--supersample {args.supersample} must be in 1..8")
            data.SUPERSAMPLE = args.supersample  # read by render_shapes at each call
    except RefineError as exc:
        logger.error("%s", exc)
        return 2
    size = sizes[0]
    cache_side = args.cache_side or max(1536, *(max(s) for s in sizes))
    try:
        if args.out.exists() and any(args.out.iterdir()):
            if not args.overwrite:
                logger.error("%s exists and is not empty; pass --overwrite to replace it", args.out)
                return 2
            shutil.rmtree(args.out)
        kinds = {"shapes": float(args.n_shapes > 0), "portraits": float(args.n_portraits > 0)}
        if not any(kinds.values()):
            logger.error("nothing to do: --n-shapes and --n-portraits are both 0")
            return 2
        spec = SampleSpec(
            size=size,
            seed=args.seed,
            kinds=kinds,
            perturbations={"lowres": 1.0, "cascadepsp": 1.0},
            strength=args.strength,
            photos=args.photos,
            portraits=args.portraits,
            cache_side=cache_side,
        )
        specs = [dataclasses.replace(spec, size=s) for s in sizes]
        make = make_case if args.reference_side is None else make_scaled_case
        if args.n_portraits > 0 and spec.weight("portraits") == 0:
            logger.error("no portrait folder found: pass --portraits DIR or --n-portraits 0")
            return 2
        args.out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        cases = []
        todo = ((args.n_shapes, "shapes", "shapes"), (args.n_portraits, "portraits", "portrait"))
        for n, kind, prefix in todo:
            for i in range(n):
                cases.append(make(args.out, f"{prefix}_{i:03d}", i, kind, specs[i % len(specs)], args))
                logger.info("%s_%03d (%d x %d px, width x height) done, %.1f s", prefix, i,
                            *specs[i % len(specs)].size[::-1], time.perf_counter() - t0)
    except RefineError as exc:
        logger.error("%s", exc)
        return 2

    readme = spec.photos / "README.md" if spec.photos is not None else None
    table = photo_licenses(readme) if readme is not None else {}
    for case in cases:
        src = case["sources"]
        photos = [src[k]["photo"] for k in ("fg", "bg") if k in src]
        case["photos"] = photos
        case["license"] = case_license(photos, table, case["kind"] == "portraits")
    if readme is not None and readme.is_file():
        shutil.copyfile(readme, args.out / "PHOTOS_LICENSES.md")
    manifest = {
        "generator": "benchmarks/make_composites.py",
        "args": {
            "n_shapes": args.n_shapes,
            "n_portraits": args.n_portraits,
            "size": list(size),
            "sizes": [list(s) for s in sizes],
            "reference_side": args.reference_side,
            "cache_side": cache_side,
            "supersample": data.SUPERSAMPLE,
            "seed": args.seed,
            "strength": args.strength,
            "image_format": args.image_format,
        },
        "cases": cases,
    }
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    (args.out / "manifest.json").write_text(text, encoding="utf-8")
    (args.out / "README.md").write_text(
        "# Benchmark composites (generated)\n\n"
        f"{len(cases)} cases of {', '.join(f'{w}x{h}' for h, w in sizes)} px (width x height) made by "
        f"`python benchmarks/make_composites.py` (seed {args.seed}, strength {args.strength}"
        + (f", coarse masks relative to {args.reference_side} px" if args.reference_side else "")
        + "); rerun it to regenerate byte-identical files.\n"
        "Per case: `image` (composite), `gt.png` (exact alpha, 8-bit, foreground >= 128), "
        "`coarse_lowres.png`" + (" (stored small)" if args.reference_side else "")
        + ", `coarse_perturbed.png`. "
        "Parameters, sources and licences: `manifest.json`.\n\n"
        "Licence: the composites contain pixels of the photos listed in `PHOTOS_LICENSES.md` "
        "(CC-BY-4.0, CC-BY-SA-3.0/4.0, CC0-1.0, GPL-2+) and of P3M portraits (MIT). "
        "A case made from a CC-BY-SA photo is a derivative work under the same BY-SA licence "
        "(see each case's `license` in the manifest; "
        "cases mixing BY-SA and GPL sources should stay local); keep `PHOTOS_LICENSES.md` (the attribution "
        "table) with any copy of these files.\n",
        encoding="utf-8",
    )
    logger.info("wrote %d cases to %s in %.1f s", len(cases), args.out, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
