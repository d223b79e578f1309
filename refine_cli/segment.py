"""Run a coarse segmenter on a whole image and write its mask.

The API behind ``refine segment`` and ``refine run --segmenter``.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from refine_cli.errors import UsageError
from refine_cli.tiling.grid import Window

if TYPE_CHECKING:  # numpy and the readers load only when a segmenter runs
    import numpy as np

    from refine_cli.io.readers import Georef
    from refine_cli.segmenters.base import Segmenter

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
    image: str, out: str, *, segmenter: str = "mediapipe-selfie", device: str = "auto",
    soft: bool | None = False, overwrite: bool = False, bands: tuple[int, ...] | None = None,
    max_pixels: int = 50_000_000_000, inline_limit: int = 64_000_000, download: bool = False,
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
    from refine_cli.io.paths import check_distinct
    from refine_cli.io.writers import check_output, output_format
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
    res = _segment_overview(image, seg, bands, max_pixels, inline_limit)
    c = res.probs.shape[-1]
    data = _mask_data(res.probs, soft, fmt)
    _write_mask(out, data, res, soft=soft, overwrite=overwrite, inline_limit=inline_limit)
    t_end = time.perf_counter()
    shape = res.shape
    facts = {
        **seg.describe(), "image_size": [int(res.image_shape[1]), int(res.image_shape[0])],
        "mask_size": [shape[1], shape[0]],
        "output": out, "kind": ("probabilities" if soft else "mask" if c == 2 else "labels"),
        "seconds": {"load": round(t_load - t0, 3), "read": round(res.t_read - t_load, 3),
                    "segment": round(res.t_seg - res.t_read, 3), "write": round(t_end - res.t_seg, 3)},
    }
    logger.info("segmented %s with %s into %s (%dx%d, %d classes)", image, seg.name, out, shape[1], shape[0],
                c)
    if progress is not None:
        progress(SEGMENT_STAGE, 1, 1)
    return facts


@dataclass
class _Segmented:
    """The segmenter's output on an image.

    Attributes:
        probs: ``(h, w, C)`` class probabilities at :attr:`shape`.
        shape: ``(h, w)`` of the written mask (:func:`output_shape`).
        image_shape: ``(H, W)`` of the image.
        georef: the image's georeferencing, or ``None``.
        t_read, t_seg: ``time.perf_counter()`` after reading the image and after segmenting it.
    """

    probs: np.ndarray
    shape: tuple[int, int]
    image_shape: tuple[int, int]
    georef: Georef | None
    t_read: float
    t_seg: float


def _segment_overview(
    image: str, seg: Segmenter, bands: tuple[int, ...] | None, max_pixels: int, inline_limit: int
) -> _Segmented:
    """Read ``image`` at the output size (a streamed area overview when smaller) and segment it."""
    import numpy as np

    from refine_cli.io.image import ImageSource
    from refine_cli.io.readers import open_raster
    from refine_cli.io.writers import default_tmp_dir

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
    image_shape = (int(src.shape[0]), int(src.shape[1]))
    return _Segmented(probs, shape, image_shape, georef, t_read, t_seg)


def _mask_data(probs: np.ndarray, soft: bool, fmt: str) -> np.ndarray:
    """What is written: probabilities (``soft``; uint8 for PNG), a 0/255 mask (2 classes) or labels."""
    import numpy as np

    from refine_cli.config import MASK_FG

    c = probs.shape[-1]
    if soft:
        data = probs[..., 1] if c == 2 else probs
        if fmt == "png":
            data = np.clip(np.rint(data * 255), 0, 255).astype(np.uint8)
        return data
    labels = probs.argmax(axis=-1)
    if c == 2:
        mask: np.ndarray = (labels == 1).astype(np.uint8) * np.uint8(MASK_FG)
        return mask
    label_map: np.ndarray = labels.astype(np.uint8 if c <= 256 else np.uint16)
    return label_map


def _write_mask(
    out: str, data: np.ndarray, res: _Segmented, *, soft: bool, overwrite: bool, inline_limit: int
) -> None:
    """Write ``data`` to ``out`` atomically, georeferenced like the image scaled to the mask."""
    from refine_cli.io.writers import open_sink

    shape = res.shape
    bands_out = 1 if data.ndim == 2 else data.shape[2]
    georef = res.georef
    if georef is not None:
        georef = georef.scaled(shape[0] / res.image_shape[0], shape[1] / res.image_shape[1])
    sink = open_sink(out, shape, bands_out, data.dtype, overwrite=overwrite, georef=georef,
                     inline_limit=inline_limit, resampling="average" if soft else "nearest")
    try:
        sink.write_rows(0, data)
        sink.commit()
    except BaseException:
        sink.abort()
        raise
