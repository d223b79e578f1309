"""Run a coarse segmenter on a whole image and write its mask: the API behind ``refine segment``
and ``refine run --segmenter``.

The segmenter sees the whole image once, at its input size (big images are read as a
streamed 'area' overview, never whole). The result is written at the smallest size with
the image's aspect ratio that keeps the segmenter's resolution along both axes
(``scale = max(w_in / W, h_in / H)``, at most 1), georeferenced like the image: exactly
the kind of low-resolution coarse mask that ``refine run --mask`` accepts.

Output (``soft=False``): 2 classes -> a 0/255 mask of class 1 (``person`` ...); more
classes -> a uint8 label map ``0 .. C-1`` (uint16 above 256). ``soft=True``: class-1
probability (float32 TIFF, uint8 0..255 PNG) for 2 classes, else C float32 bands (TIFF).
``soft=None``: probabilities for 2 classes, a label map for more (what ``refine run``
refines best: a single-band mask either way).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from refine_cli.errors import UsageError
from refine_cli.tiling.grid import Window

logger = logging.getLogger(__name__)

SEGMENT_STAGE = "segmenter"
"""Progress stage of a segmenter run (reported as unknown amount, then 1 of 1)."""


def output_shape(image_hw: tuple[int, int], input_size: tuple[int, int]) -> tuple[int, int]:
    """Size of the written mask: the image scaled by ``min(1, max(w_in / W, h_in / H))``.

    Args:
        image_hw: ``(H, W)`` of the image.
        input_size: ``(w_in, h_in)`` of the segmenter.

    Returns:
        ``(h, w)``, each >= 1, aspect ratio within one pixel of the image's.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    s = min(1.0, max(input_size[0] / w, input_size[1] / h))
    return (max(1, round(h * s)), max(1, round(w * s)))


def segment_file(
    image: str, out: str, *, segmenter: str = "mediapipe-selfie", device: str = "auto", soft: bool = False,
    overwrite: bool = False, bands: tuple[int, ...] | None = None, max_pixels: int = 50_000_000_000,
    inline_limit: int = 64_000_000, download: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Segment ``image`` and write the coarse mask to ``out`` (the API behind ``refine segment``).

    Args:
        image: image path (``-`` for stdin bytes).
        out: output path (``.tif``/``.png``, or ``-`` for stdout).
        segmenter: segmenter name or model file (``refine_cli.segmenters``).
        device: ``auto`` | ``cpu`` | ``cuda[:N]``.
        soft: write probabilities instead of labels / a hard mask; ``None``: probabilities for
            2 classes, a label map for more (see the module docstring).
        overwrite: replace an existing output.
        bands: 0-based image bands to use as RGB.
        max_pixels: refuse images declaring more pixels than this.
        inline_limit: PNG/JPEG above this many pixels are cached as tiled TIFF first.
        download: fetch the segmenter's checkpoint when it is not cached.
        progress: ``f(stage, done, total)``: :data:`SEGMENT_STAGE`, 0 of 0 (unknown) while it
            runs, then 1 of 1.

    Returns:
        Facts for the report: segmenter, classes, sizes, seconds per step.

    Raises:
        RefineError: any problem a user can fix (missing file, existing output, missing package ...).
    """
    import numpy as np

    from refine_cli.config import MASK_FG
    from refine_cli.io.image import ImageSource
    from refine_cli.io.paths import check_distinct
    from refine_cli.io.readers import open_raster
    from refine_cli.io.writers import check_output, default_tmp_dir, open_sink, output_format
    from refine_cli.segmenters import load_segmenter

    t0 = time.perf_counter()
    check_distinct({"image": image}, {"-o": out})
    check_output(out, overwrite)
    if progress is not None:
        progress(SEGMENT_STAGE, 0, 0)
    seg = load_segmenter(segmenter, device, download=download)
    fmt = output_format(out)
    if soft is None:
        soft = seg.num_classes == 2
    if soft and fmt == "png" and seg.num_classes != 2:
        raise UsageError(f"--soft with {seg.num_classes} classes writes {seg.num_classes} float bands; "
                         "use a .tif output")
    t_load = time.perf_counter()
    with open_raster(image, max_pixels=max_pixels, inline_limit=inline_limit, tmp_dir=default_tmp_dir(),
                     what="image") as reader:
        src = ImageSource(reader, bands)
        shape = output_shape(src.shape, seg.input_size)
        over = src.overview(shape) if shape != tuple(src.shape) else src.read(Window.full(src.shape))
        img = np.clip(np.rint(over), 0, 255).astype(np.uint8) if over.dtype != np.uint8 else over
        georef = src.georef
        t_read = time.perf_counter()
        probs = seg.segment_window(img)
        t_seg = time.perf_counter()
    c = probs.shape[-1]
    if soft:
        data = probs[..., 1] if c == 2 else probs
        if fmt == "png":
            data = np.clip(np.rint(data * 255), 0, 255).astype(np.uint8)
        dtype = data.dtype
    else:
        labels = probs.argmax(axis=-1)
        if c == 2:
            data = (labels == 1).astype(np.uint8) * np.uint8(MASK_FG)
        else:
            data = labels.astype(np.uint8 if c <= 256 else np.uint16)
        dtype = data.dtype
    bands_out = 1 if data.ndim == 2 else data.shape[2]
    if georef is not None:
        georef = georef.scaled(shape[0] / src.shape[0], shape[1] / src.shape[1])
    sink = open_sink(out, shape, bands_out, dtype, overwrite=overwrite, georef=georef,
                     inline_limit=inline_limit, resampling="average" if soft else "nearest")
    try:
        sink.write_rows(0, data)
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    t_end = time.perf_counter()
    facts = {
        **seg.describe(), "image_size": [int(src.shape[1]), int(src.shape[0])],
        "mask_size": [shape[1], shape[0]],
        "output": out, "kind": ("probabilities" if soft else "mask" if c == 2 else "labels"),
        "seconds": {"load": round(t_load - t0, 3), "read": round(t_read - t_load, 3),
                    "segment": round(t_seg - t_read, 3), "write": round(t_end - t_seg, 3)},
    }
    logger.info("segmented %s with %s into %s (%dx%d, %d classes)", image, seg.name, out, shape[1], shape[0],
                c)
    if progress is not None:
        progress(SEGMENT_STAGE, 1, 1)
    return facts
