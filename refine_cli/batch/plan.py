"""Planning a batch: list the images, pair each with its coarse mask, name its outputs inside OUTDIR.

:func:`plan_batch` lists the images (a folder, a glob or a ``pairs.csv``), pairs each
with its coarse mask by one rule, and names its outputs inside OUTDIR. An image without
a mask runs the method's segmenter when it has one, else it is ``skipped`` with the
reason. Problems found while planning (two masks match, an output name that escapes
OUTDIR, two inputs that would write the same file) become ``failed`` records; the rest
of the batch still runs.

**Security.** Output names from ``pairs.csv`` must be relative paths inside OUTDIR:
absolute paths, ``..``, hidden names, backslashes and paths through symbolic links
that leave OUTDIR are refused (the input is recorded as failed).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from refine_cli.batch.model import IMAGE_EXTS, OUTPUT_MARKERS, BatchItem, OutputOptions, method_has_segmenter
from refine_cli.config import RefineConfig
from refine_cli.errors import UsageError


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS) and not name.startswith(".")


def _is_output_name(path: Path) -> bool:
    return path.stem.endswith(OUTPUT_MARKERS)


def _glob_root(pattern: str) -> Path:
    """The leading folders of a glob pattern that hold no wildcard."""
    parts = Path(pattern).parts
    root: list[str] = []
    for part in parts[:-1]:
        if any(c in part for c in "*?["):
            break
        root.append(part)
    return Path(*root) if root else Path(".")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def list_images(source: str, *, exclude: Iterable[str | Path] = ()) -> tuple[Path, list[Path]]:
    """The images a folder, glob pattern or single file names.

    A folder gives its image files (non-recursive); a pattern is expanded with ``**``
    support. Hidden files, files the batch writes (``*.refined.*``, ...) and files under
    ``exclude`` folders (OUTDIR, the mask folder) are left out.

    Args:
        source: folder, glob pattern (quote it in the shell) or one image.
        exclude: folders whose files are never inputs.

    Returns:
        ``(root, images)``: the folder output names are taken relative to, and the sorted
        absolute image paths.

    Raises:
        UsageError: nothing matches.
    """
    import glob

    excl = [Path(os.path.abspath(e)) for e in exclude]
    src = Path(source)
    if src.is_dir():
        root = src
        found = [p for p in src.iterdir() if p.is_file() and _is_image_name(p.name)]
    elif src.is_file():
        root, found = src.parent, [src]
    elif any(c in source for c in "*?["):
        root = _glob_root(source)
        found = [Path(p) for p in glob.glob(source, recursive=True)
                 if os.path.isfile(p) and _is_image_name(os.path.basename(p))]
    else:
        raise UsageError(f"{source} does not exist: give a folder, an image or a quoted glob such as "
                         "'tiles/*.tif'")
    root = Path(os.path.abspath(root))
    images = sorted({Path(os.path.abspath(p)) for p in found})
    images = [p for p in images if not _is_output_name(p)
              and not any(_inside(p, e) and e != root for e in excl)]
    if not images:
        raise UsageError(f"no images found in {source} (looked for {', '.join(IMAGE_EXTS)})")
    return root, images


class _MaskFinder:
    """Finds ``<mask dir>/<image stem><suffix>.<ext>``, listing each folder once."""

    def __init__(self, mask_dir: Path | None, suffix: str) -> None:
        self.mask_dir = mask_dir
        self.suffix = suffix
        self._index: dict[Path, dict[str, list[Path]]] = {}

    def _stems(self, folder: Path) -> dict[str, list[Path]]:
        if folder not in self._index:
            index: dict[str, list[Path]] = {}
            if folder.is_dir():
                for p in folder.iterdir():
                    if _is_image_name(p.name) and p.is_file():
                        index.setdefault(p.stem, []).append(p)
            self._index[folder] = index
        return self._index[folder]

    def where(self, image: Path) -> str:
        """The pattern searched for ``image``, for messages."""
        folder = self.mask_dir or image.parent
        return str(folder / f"{image.stem}{self.suffix}.*")

    def find(self, image: Path) -> tuple[Path | None, str | None]:
        """``(mask, None)``, ``(None, None)`` when there is none, or ``(None, problem)`` when ambiguous."""
        folder = self.mask_dir or image.parent
        cands = sorted(p for p in self._stems(folder).get(image.stem + self.suffix, []) if p != image)
        if not cands:
            return None, None
        same = [p for p in cands if p.suffix.lower() == image.suffix.lower()]
        if len(same) == 1:
            return same[0], None
        if len(cands) == 1:
            return cands[0], None
        names = ", ".join(p.name for p in cands)
        return None, f"several masks match {image.name}: {names}; keep one or pair them with --pairs"


def read_pairs(csv_path: str | Path) -> list[tuple[str, str | None, str | None]]:
    """Rows of a ``pairs.csv``: ``image,mask[,out]``.

    A header row ``image,mask[,out]`` is optional; blank lines and lines starting with
    ``#`` are ignored; an empty mask cell means "no mask". Relative image and mask
    paths are taken relative to the CSV's folder; ``out`` stays relative to OUTDIR.

    Returns:
        ``[(image, mask | None, out | None)]`` with absolute image and mask paths.

    Raises:
        UsageError: unreadable file or a row with more than three columns.
    """
    path = Path(csv_path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--pairs {path}: cannot read it ({exc})") from None
    base = Path(os.path.abspath(path.parent))
    rows: list[tuple[str, str | None, str | None]] = []
    for lineno, row in enumerate(csv.reader(text.splitlines()), 1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if not rows and [c.lower() for c in cells[:3]] in (["image", "mask"], ["image", "mask", "out"]):
            continue
        if len(cells) > 3 or not cells[0]:
            raise UsageError(f"--pairs {path} line {lineno}: expected image,mask[,out], got {len(cells)} "
                             "cells")
        image = str(base / cells[0]) if not os.path.isabs(cells[0]) else cells[0]
        mask_cell = cells[1] if len(cells) > 1 else ""
        mask = (str(base / mask_cell) if not os.path.isabs(mask_cell) else mask_cell) if mask_cell else None
        out = cells[2] if len(cells) > 2 and cells[2] else None
        rows.append((os.path.abspath(image), os.path.abspath(mask) if mask else None, out))
    if not rows:
        raise UsageError(f"--pairs {path}: no rows")
    return rows


def check_relative_output(name: str) -> str:
    r"""Validate an output name relative to OUTDIR; returns it in posix form.

    Raises:
        UsageError: empty, absolute, with ``..``, ``\``, NUL, or a hidden component
            (those are reserved for temporary files and the journal).
    """
    if not name or "\x00" in name or "\\" in name:
        raise UsageError(f"output name {name!r} is not allowed: use a plain relative path such as "
                         "sub/name.tif")
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith("~"):
        raise UsageError(f"output name {name!r} is absolute: outputs must stay inside OUTDIR; give a "
                         "relative path")
    if any(part in ("..", "") for part in p.parts) or ".." in name.split("/"):
        raise UsageError(f"output name {name!r} leaves OUTDIR ('..'); give a path inside it")
    if any(part.startswith(".") for part in p.parts):
        raise UsageError(f"output name {name!r} has a hidden component; hidden names are reserved in OUTDIR")
    if p.name.startswith("refine-journal"):
        raise UsageError(f"output name {name!r} clashes with the journal; choose another name")
    return str(p)


def _within(path: str | Path, folder: str | Path) -> bool:
    """``path`` is ``folder`` or below it, after resolving symbolic links."""
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return real == top or real.startswith(top + os.sep)


def resolve_output(outdir: Path, rel: str, *, create: bool = False) -> Path:
    """The absolute path of output ``rel``, checked to stay inside ``outdir`` through symlinks.

    Args:
        outdir: the output folder.
        rel: name from :func:`check_relative_output`.
        create: create missing parent folders (one by one, after checking each).

    Raises:
        UsageError: a parent is a symbolic link leading out of OUTDIR, a parent is not a
            folder, or the output itself is a symbolic link.
    """
    cur = Path(outdir)
    for part in PurePosixPath(rel).parts[:-1]:
        cur = cur / part
        if cur.is_symlink() or cur.exists():
            if not _within(cur, outdir):
                raise UsageError(f"output {rel!r}: {cur} leads out of OUTDIR (symbolic link); refused")
            if not os.path.isdir(cur):
                raise UsageError(f"output {rel!r}: {cur} is not a folder")
        elif create:
            cur.mkdir()
        else:
            return Path(outdir) / rel
    target = Path(outdir) / rel
    if target.is_symlink():
        raise UsageError(f"output {rel!r} is a symbolic link in OUTDIR; refused (remove it)")
    return target


def _names(base: str, mask_suffix: str, outputs: OutputOptions) -> tuple[str, str | None, str | None]:
    """Mask, uncertainty and report names for ``base`` (relative, without extension)."""
    ext = mask_suffix if mask_suffix.lower() in (".tif", ".tiff", ".png") else outputs.extension
    unc = f"{base}.uncertainty{ext}" if outputs.uncertainty else None
    rep = f"{base}.report.json" if outputs.report else None
    return f"{base}{mask_suffix}", unc, rep


def plan_batch(
    source: str | None,
    outdir: str | Path,
    *,
    config: RefineConfig,
    outputs: OutputOptions,
    mask_dir: str | Path | None = None,
    mask_suffix: str | None = None,
    pairs: str | Path | None = None,
) -> list[BatchItem]:
    """Pair every image with its mask and name its outputs.

    Exactly one source of images: ``source`` (folder or glob), with masks by
    ``mask_dir`` (same stem, plus ``mask_suffix`` if given) or ``mask_suffix`` (beside
    the image), or ``pairs`` (a CSV, see :func:`read_pairs`). Default output names
    mirror the image's path below the folder (or the glob's fixed prefix):
    ``<rel stem>.refined.tif``, ``<rel stem>.uncertainty.tif``, ``<rel stem>.report.json``.

    Returns:
        Items sorted by key. Items that cannot run carry ``skip`` or ``error``.

    Raises:
        UsageError: conflicting or missing rules, nothing to do.
    """
    outdir = Path(os.path.abspath(outdir))
    has_segmenter = method_has_segmenter(config)
    if pairs is not None and (source is not None or mask_dir is not None or mask_suffix is not None):
        raise UsageError("--pairs lists images and masks itself: drop DIR_OR_GLOB, --mask-dir and "
                         "--mask-suffix")
    if pairs is None and source is None:
        raise UsageError("give a folder or glob of images (DIR_OR_GLOB) or --pairs pairs.csv")
    if pairs is None and mask_dir is None and mask_suffix is None and not has_segmenter:
        raise UsageError(f"method {config.method!r} needs coarse masks: give --mask-dir DIR, --mask-suffix "
                         "SUFFIX or --pairs pairs.csv")
    if pairs is not None:
        rows = [_Row(image, mask, None, out, Path(image).stem) for image, mask, out in read_pairs(pairs)]
        no_mask_hint = f"no mask in {pairs}"
    else:
        assert source is not None
        rows, no_mask_hint = _discover(source, outdir, mask_dir, mask_suffix)
    no_mask = None if has_segmenter else f"({no_mask_hint}) and method {config.method!r} has no segmenter"
    items = _distinct_keys(_mark_clashes([_item(row, outdir, outputs, no_mask) for row in rows]))
    return sorted(items, key=lambda it: it.key)


@dataclass(frozen=True)
class _Row:
    """One input found: image, mask or ``None``, why the mask is unusable, an explicit output, a base name."""

    image: str
    mask: str | None
    problem: str | None
    out: str | None
    base: str


def _discover(source: str, outdir: Path, mask_dir: str | Path | None,
              mask_suffix: str | None) -> tuple[list[_Row], str]:
    """The images of a folder or glob with their masks, and the hint for an image without one."""
    mdir = Path(os.path.abspath(mask_dir)) if mask_dir is not None else None
    if mdir is not None and not mdir.is_dir():
        raise UsageError(f"--mask-dir {mask_dir} is not a folder")
    suffix = mask_suffix or ""
    root, images = list_images(source, exclude=[outdir] + ([mdir] if mdir else []))
    if mdir is not None and not suffix and mdir == root:
        raise UsageError("--mask-dir is the image folder: masks there need a --mask-suffix such as _mask")
    finder = _MaskFinder(mdir, suffix) if (mdir is not None or suffix) else None
    rows = []
    for image in images:
        if suffix and image.stem.endswith(suffix) and (mdir is None or mdir == image.parent):
            continue  # a mask beside the images, not an image
        rel = image.relative_to(root) if _inside(image, root) else Path(image.name)
        base = str(PurePosixPath(*rel.parts).with_suffix(""))
        mask, problem = finder.find(image) if finder else (None, None)
        rows.append(_Row(str(image), str(mask) if mask else None, problem, None, base))
    return rows, f"no mask matches {finder.where(Path('<stem>'))}" if finder else "no mask rule given"


def _item(row: _Row, outdir: Path, outputs: OutputOptions, no_mask: str | None) -> BatchItem:
    """The item of one row: its output names, and why it cannot run.

    ``no_mask``: the reason when the row has no mask and the method cannot make one; ``None`` when it can.
    """
    error = row.problem
    if row.out is not None:
        try:
            mask_out = check_relative_output(row.out)
            resolve_output(outdir, mask_out)
        except UsageError as exc:
            error = error or str(exc)
            mask_out = f"{row.base}.refined{outputs.extension}"  # a key for the record only
        suffix = PurePosixPath(mask_out).suffix
        names = _names(str(PurePosixPath(mask_out).with_suffix("")), suffix, outputs)
    else:
        names = _names(row.base, f".refined{outputs.extension}", outputs)
    skip = None
    if row.mask is None and no_mask is not None and error is None:
        skip = f"no coarse mask for {Path(row.image).name} {no_mask}"
    return BatchItem(key=names[0], image=row.image, mask=row.mask, mask_out=names[0],
                     uncertainty_out=names[1], report_out=names[2],
                     vector_out=_vector_name(outdir, names[0], outputs), skip=skip, error=error)


def _vector_name(outdir: Path, mask_out: str, outputs: OutputOptions) -> str | None:
    """The polygon file of an input: ``<vector_dir>/<mask name without .refined and extension><ext>``.

    Relative to OUTDIR when ``vector_dir`` lies inside it, else absolute.
    """
    if not outputs.vector_dir:
        return None
    stem = str(PurePosixPath(mask_out).with_suffix(""))
    stem = stem[: -len(".refined")] if stem.endswith(".refined") else stem
    if _within(outputs.vector_dir, outdir):
        target = os.path.join(os.path.realpath(outputs.vector_dir), stem + outputs.vector_extension)
        return PurePosixPath(os.path.relpath(target, os.path.realpath(outdir))).as_posix()
    return os.path.join(outputs.vector_dir, stem + outputs.vector_extension)


def _mark_clashes(items: list[BatchItem]) -> list[BatchItem]:
    """Items whose outputs another item would also write get an error naming the others."""
    owners: dict[str, list[int]] = {}
    for idx, it in enumerate(items):
        for name in it.outputs().values():
            owners.setdefault(name, []).append(idx)
    clash = {i for idxs in owners.values() if len(idxs) > 1 for i in idxs}
    for idx in clash:
        it = items[idx]
        others = sorted({items[j].image for n in it.outputs().values() for j in owners[n] if j != idx})
        clash_msg = (f"output {it.mask_out} would also be written for {', '.join(others)}; rename one or "
                     "use --pairs with an out column")
        items[idx] = replace(it, error=it.error or clash_msg)
    return items


def _distinct_keys(items: list[BatchItem]) -> list[BatchItem]:
    """Colliding keys get ``#1``, ``#2`` ... so that the journal keeps the items apart."""
    keys: dict[str, int] = {}
    for idx, it in enumerate(items):
        n = keys.get(it.key, 0)
        keys[it.key] = n + 1
        if n:
            items[idx] = replace(it, key=f"{it.key}#{n}")
    return items
