"""``refine review``: one page that shows where to look after a run, instead of its JSON.

:func:`review_runs` reads the run reports of ``refine run --report`` or the output folder of
``refine batch`` (:mod:`~refine_cli.review.sources`), streams once over each image's uncertainty
map (or, without one, over where the refinement changed the coarse mask) in windowed blocks to find
the most uncertain non-overlapping regions (:mod:`~refine_cli.review.scan`), draws each region at
full resolution with the coarse and refined contours beside its heat map, and the tile map of the
run (:mod:`~refine_cli.review.pictures`), and writes one self-contained HTML page (PNG pictures as
``data:`` URIs, inline CSS, no script, no external request) or one PNG contact sheet
(:mod:`~refine_cli.review.sheet`). Memory stays bounded whatever the image's size: only windows, a
thumbnail and the pictures (PNG-encoded) are held.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from refine_cli.config import RefineConfig
from refine_cli.errors import RefineError, UsageError
from refine_cli.io.image import ImageSource, choose_level, fit_within
from refine_cli.io.masks import MaskSource
from refine_cli.io.readers import Reader, open_raster
from refine_cli.io.writers import check_output, default_tmp_dir, write_bytes_atomic
from refine_cli.overlay import GAP, unit_reader
from refine_cli.review.model import ImageReview, Review
from refine_cli.review.pictures import region_picture, tile_map_picture
from refine_cli.review.scan import Maps, scan_regions
from refine_cli.review.sheet import render_png, write_html
from refine_cli.review.sources import RunEntry, find_runs

log = logging.getLogger(__name__)

DEFAULT_TOP = 8
"""Regions shown per image."""

DEFAULT_CROP = 384
"""Side of a region, px (shown 1:1)."""

DEFAULT_MAP_SIDE = 640
"""Long side of the tile map, px."""

FORMATS = (".html", ".htm", ".png")

MAX_SHEET_HEIGHT = 30_000
"""Tallest PNG contact sheet, px (about 140 MB of RGB at its width): larger reviews go to HTML."""

__all__ = ["ImageReview", "Review", "check_review_output", "review_image", "review_runs"]


def png_bytes(rgb: np.ndarray) -> bytes:
    """PNG bytes of an ``(h, w, 3)`` uint8 RGB picture."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RefineError("cannot encode a picture as PNG")
    return buf.tobytes()


MAX_CACHE = 64 << 20
"""Largest decoded-chunk cache of one reader, bytes."""


def band_cache_bytes(reader: Reader) -> int:
    """A chunk cache that holds one row of the file's chunks (the scan reads bands thinner than a chunk).

    ``chunk height x W x bands x itemsize``, between 1 MiB and :data:`MAX_CACHE`: it grows with the
    image's width, never with its height.
    """
    chunk = getattr(reader, "chunk_shape", None) or (256, 256)
    row = int(chunk[0]) * reader.shape[1] * reader.bands * reader.dtype.itemsize
    return max(1 << 20, min(MAX_CACHE, row))


def _open(path: str, what: str, cfg: RefineConfig, readers: list[Reader]) -> Reader:
    r = open_raster(path, max_pixels=cfg.max_pixels, inline_limit=cfg.inline_limit, tmp_dir=default_tmp_dir(),
                    what=what)
    readers.append(r)
    r.set_cache_bytes(band_cache_bytes(r))
    return r


def _kinds(entry: RunEntry) -> tuple[str, int | None]:
    """How the run read its coarse mask, and the class count of a label map (else ``None``).

    The kind is the report's (``binary``, ``soft``, ``labels``, ``instances``; ``auto`` when unknown):
    the review reads the masks the way the run did, without detecting their kind again.
    """
    mask = (entry.report or {}).get("mask") or {}
    kind = str(mask.get("kind") or "auto")
    if kind not in ("binary", "soft", "labels", "instances"):
        kind = str(entry.config.get("mask_kind") or "auto")
    classes = mask.get("classes") if kind == "labels" else entry.config.get("classes")
    return kind, (int(classes) if classes else None)


def _open_maps(entry: RunEntry, cfg: RefineConfig, readers: list[Reader],
               notes: list[str]) -> tuple[ImageSource, Maps]:
    """Open the image, the refined and coarse masks and the uncertainty map of one run."""
    assert entry.image is not None and entry.refined is not None
    run_cfg = entry.config
    bands = ((entry.report or {}).get("image") or {}).get("rgb_bands")
    image = ImageSource(_open(entry.image, "image", cfg, readers), tuple(bands) if bands else None)
    shape = image.shape
    threshold = float(run_cfg.get("threshold", 0.5))
    kind, classes = _kinds(entry)
    refined_kind = "labels" if kind == "labels" else "soft" if run_cfg.get("soft") else "binary"
    refined = MaskSource(_open(entry.refined, "mask", cfg, readers), shape, classes=classes,
                         kind=refined_kind if entry.report is not None else "auto", threshold=threshold)
    coarse = None
    if entry.coarse is not None:
        coarse = MaskSource(_open(entry.coarse, "mask", cfg, readers), shape, classes=classes, kind=kind,
                            threshold=threshold)
        if coarse.is_labels != refined.is_labels:
            notes.append(f"{entry.coarse} and {entry.refined}: one is a label map and the other is not; "
                         "the coarse mask is left out")
            coarse = None
    unc = None
    if entry.uncertainty is not None:
        ur = _open(entry.uncertainty, "mask", cfg, readers)
        if ur.shape == shape:
            unc = unit_reader(ur)
        else:
            notes.append(f"uncertainty map {entry.uncertainty} is {ur.shape[1]}x{ur.shape[0]}, not the "
                         f"image's {shape[1]}x{shape[0]}; regions are chosen by change instead")
    return image, Maps(shape, refined, coarse, unc, refined.is_labels, threshold)


def review_image(entry: RunEntry, anchor: str, *, top: int = DEFAULT_TOP, crop: int = DEFAULT_CROP,
                 map_side: int = DEFAULT_MAP_SIDE, config: RefineConfig | None = None) -> ImageReview:
    """Scan one run's maps and draw its regions and tile map.

    Raises:
        RefineError: a file cannot be read.
    """
    rv = ImageReview(entry, anchor, notes=list(entry.notes))
    if entry.status != "done" or entry.image is None or entry.refined is None:
        if entry.status == "done":
            rv.notes.append("nothing to draw: the image or the refined mask is not there")
        return rv
    cfg = config or RefineConfig()
    readers: list[Reader] = []
    try:
        image, maps = _open_maps(entry, cfg, readers, rv.notes)
        rv.shape = maps.shape
        thumb_shape = fit_within(maps.shape, map_side)
        pyramid = choose_level(image.level_shapes, thumb_shape) > 0
        rv.scan = scan_regions(maps, top, crop, None if pyramid else thumb_shape, image)
        thumb = rv.scan.thumbnail
        if thumb is None:  # the file has a pyramid level to downscale from
            thumb = np.clip(np.rint(image.overview(thumb_shape)), 0, 255).astype(np.uint8)
        rv.scan.thumbnail = None
        tile_map = (entry.report or {}).get("tile_map") or {}
        rv.tile_map_png = png_bytes(tile_map_picture(thumb, maps.shape, tile_map, rv.scan.regions))
        rv.regions_png = [png_bytes(region_picture(image, maps, r, k))
                          for k, r in enumerate(rv.scan.regions, 1)]
    finally:
        for r in readers:
            r.close()
    return rv


def check_review_output(out: str, overwrite: bool) -> str:
    """The output's format (``html`` or ``png``) by its extension; refuses an existing file.

    Raises:
        UsageError: another extension.
        OutputExistsError: ``out`` exists and not ``overwrite``.
    """
    ext = Path(out).suffix.lower()
    if ext not in FORMATS:
        raise UsageError(f"cannot write {out}: a review is written as .html (or .png for one contact sheet); "
                         "change the extension")
    check_output(out, overwrite)
    return "png" if ext == ".png" else "html"


def review_runs(sources: Sequence[str], out: str, *, top: int = DEFAULT_TOP, crop: int = DEFAULT_CROP,
                map_side: int = DEFAULT_MAP_SIDE, overwrite: bool = False, config: RefineConfig | None = None,
                progress: Callable[[str, int, int], None] | None = None) -> Review:
    """Review the runs that ``sources`` name and write the page (or contact sheet) to ``out``.

    Args:
        sources: run report JSON files (``refine run --report``), ``refine batch`` output folders or
            journal files.
        out: ``.html`` (a self-contained page) or ``.png`` (one contact sheet).
        top: regions per image (>= 1).
        crop: region side, px (16 to 4096), shown 1:1.
        map_side: long side of the tile map, px (>= 64).
        overwrite: replace an existing ``out``.
        config: reader limits (``max_pixels``, ``inline_limit``); default :class:`RefineConfig`.
        progress: ``f(stage, done, total)`` after each image.

    Returns:
        What the review shows.

    Raises:
        RefineError: a bad option, a missing or unreadable source; in a batch, an image that cannot be
            read becomes a note in its section instead.

    The HTML page is written while the images are reviewed, one image's pictures in memory at a
    time, and the returned :class:`ImageReview` records no longer hold them; the PNG sheet holds
    every picture (its size is capped by :data:`MAX_SHEET_HEIGHT`).
    """
    if top < 1:
        raise UsageError(f"--top {top} must be at least 1")
    if not 16 <= crop <= 4096:
        raise UsageError(f"--crop {crop} must be between 16 and 4096 px")
    if map_side < 64:
        raise UsageError(f"--map-side {map_side} is too small: use 64 px or more")
    fmt = check_review_output(out, overwrite)
    entries, batch = find_runs(list(sources))
    review = Review(list(sources), batch, [], top, crop)

    def each() -> Iterator[ImageReview]:
        for k, entry in enumerate(entries, 1):
            try:
                yield review_image(entry, f"img-{k}", top=top, crop=crop, map_side=map_side, config=config)
            except RefineError as exc:
                if not batch:
                    raise
                yield ImageReview(entry, f"img-{k}", notes=[*entry.notes, str(exc)])
            if progress is not None:
                progress("review images", k, len(entries))

    if fmt == "html":
        write_html(out, review, each(), overwrite)
        return review
    tall = sum(120 + map_side + -(-top // 2) * (crop + GAP) for _ in entries)
    if tall > MAX_SHEET_HEIGHT:
        raise UsageError(f"a contact sheet of {len(entries)} image(s) would be about {tall} px tall (at most "
                         f"{MAX_SHEET_HEIGHT}): write .html, or lower --top, --crop or --map-side")
    review.images.extend(each())
    write_bytes_atomic(out, png_bytes(render_png(review)), overwrite=overwrite)
    return review
