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

``manifest.json`` records each case's parameters, the source photos and their
licences. The same flags always give byte-identical files.

Licences: the composites contain pixels of ``shared/data/photos`` (CC-BY-4.0,
CC-BY-SA-3.0/4.0, CC0-1.0, GPL-2+) and of the P3M portraits (MIT). A case made
from a CC-BY-SA photo is a derivative and carries that BY-SA licence; the
photos' attribution table is copied next to the cases as ``PHOTOS_LICENSES.md``
and must stay with them.

Usage::

    python benchmarks/make_composites.py OUT [--n-shapes 24] [--n-portraits 8] [--size 1024]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from refine_cli.errors import RefineError
from refine_cli.train.data import SampleSpec, make_sample

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


def make_case(
    out: Path, name: str, index: int, kind: str, spec: SampleSpec, args: argparse.Namespace
) -> dict:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    case: dict = {"case": name, "kind": kind, "index": index, "coarse": {}}
    first = None
    for method, fname in COARSE.items():
        s = make_sample(index, spec, kind=kind, perturbation=method)
        if first is None:
            first = s
            if args.image_format == "jpg":
                image_name = "image.jpg"
                bgr = cv2.cvtColor(s.image, cv2.COLOR_RGB2BGR)
                params = [cv2.IMWRITE_JPEG_QUALITY, args.jpeg_quality]
                if not cv2.imwrite(str(folder / image_name), bgr, params):
                    raise OSError(f"cannot write {folder / image_name}")
            else:
                image_name = "image.png"
                write_png(folder / image_name, s.image)
            write_png(folder / "gt.png", to_u8(s.gt))
            case["image"] = image_name
            case["gt"] = "gt.png"
            case["foreground_fraction"] = float(s.hard.mean())
            case["sources"] = {k: v for k, v in s.meta.items() if k in SOURCE_KEYS}
        elif not (np.array_equal(s.image, first.image) and np.array_equal(s.gt, first.gt)):
            raise RuntimeError(f"case {name}: the image changed between coarse variants (not deterministic)")
        write_png(folder / fname, to_u8(s.coarse))
        keep = {k: v for k, v in s.meta.items() if k not in SOURCE_KEYS + ("index", "kind")}
        case["coarse"][method] = {"file": fname, **keep}
    return case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--n-shapes", type=int, default=24, help="shape composites (default 24)")
    parser.add_argument("--n-portraits", type=int, default=8, help="portrait composites (default 8)")
    parser.add_argument("--size", type=int, nargs="+", default=[1024], help="side, or height width")
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

    size = tuple(args.size) if len(args.size) == 2 else (args.size[0], args.size[0])
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
        )
        if args.n_portraits > 0 and spec.weight("portraits") == 0:
            logger.error("no portrait folder found: pass --portraits DIR or --n-portraits 0")
            return 2
        args.out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        cases = []
        for i in range(args.n_shapes):
            cases.append(make_case(args.out, f"shapes_{i:03d}", i, "shapes", spec, args))
        for i in range(args.n_portraits):
            cases.append(make_case(args.out, f"portrait_{i:03d}", i, "portraits", spec, args))
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
        f"{len(cases)} cases of {size[1]}x{size[0]} px made by `python benchmarks/make_composites.py` "
        f"(seed {args.seed}, strength {args.strength}); rerun it to regenerate byte-identical files.\n"
        "Per case: `image` (composite), `gt.png` (exact alpha, 8-bit, foreground >= 128), "
        "`coarse_lowres.png`, `coarse_perturbed.png`. Parameters, sources and licences: `manifest.json`.\n\n"
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
