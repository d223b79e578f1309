"""``refine segment IMAGE -o coarse.tif``: run a coarse segmenter alone and write its mask.

The segmenter sees the whole image once, at its input size (big images are read as a
streamed 'area' overview, never whole). The result is written at the smallest size with
the image's aspect ratio that keeps the segmenter's resolution along both axes
(``scale = max(w_in / W, h_in / H)``, at most 1), georeferenced like the image: exactly
the kind of low-resolution coarse mask that ``refine run --mask`` accepts.

Output (``--soft`` off): 2 classes -> a 0/255 mask of class 1 (``person`` ...); more
classes -> a uint8 label map ``0 .. C-1`` (uint16 above 256). ``--soft``: class-1
probability (float32 TIFF, uint8 0..255 PNG) for 2 classes, else C float32 bands (TIFF).
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

import typer

from refine_cli.errors import UsageError
from refine_cli.tiling.grid import Window

logger = logging.getLogger(__name__)

app = typer.Typer(help="Make a coarse mask with a segmenter (the first step of MagNet-Fast).",
                  no_args_is_help=True, add_completion=False)
"""Sub-app for ``cli.app.add_typer(app, name="segment")``; ``segment_cmd`` is its callback, which
takes the options anywhere on the line (interspersed), so ``refine segment IMG -o OUT`` works.
``cli.app.command("segment")(segment_cmd)`` mounts the same function as a plain command."""


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
) -> dict[str, Any]:
    """Segment ``image`` and write the coarse mask to ``out`` (the API behind ``refine segment``).

    Args:
        image: image path (``-`` for stdin bytes).
        out: output path (``.tif``/``.png``, or ``-`` for stdout).
        segmenter: segmenter name or model file (``refine_cli.segmenters``).
        device: ``auto`` | ``cpu`` | ``cuda[:N]``.
        soft: write probabilities instead of labels / a hard mask.
        overwrite: replace an existing output.
        bands: 0-based image bands to use as RGB.
        max_pixels: refuse images declaring more pixels than this.
        inline_limit: PNG/JPEG above this many pixels are cached as tiled TIFF first.
        download: fetch the segmenter's checkpoint when it is not cached.

    Returns:
        Facts for the report: segmenter, classes, sizes, seconds per step.

    Raises:
        RefineError: any problem a user can fix (missing file, existing output, missing package ...).
    """
    import numpy as np

    from refine_cli.config import MASK_FG
    from refine_cli.io.image import ImageSource
    from refine_cli.io.readers import open_raster
    from refine_cli.io.writers import check_output, default_tmp_dir, open_sink, output_format
    from refine_cli.segmenters import load_segmenter

    t0 = time.perf_counter()
    check_output(out, overwrite)
    seg = load_segmenter(segmenter, device, download=download)
    fmt = output_format(out)
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
    return facts


@app.callback(invoke_without_command=True, context_settings={"allow_interspersed_args": True})
def segment_cmd(
    image: Annotated[str, typer.Argument(help="Image to segment (TIFF/GeoTIFF/PNG/JPEG/WebP), or - for "
                                         "stdin.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Coarse mask to write (.tif/.png, or - for "
                                     "stdout).")],
    segmenter: Annotated[str, typer.Option(help="Segmenter name (magnet-cityscapes-hrnet, "
                                           "magnet-deepglobe-fpn, "
                                           "mediapipe-selfie) or a .onnx/.tflite/TorchScript file with a "
                                           "<file>.json sidecar.")] = "mediapipe-selfie",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    soft: Annotated[bool, typer.Option("--soft", help="Write probabilities instead of a mask / label map.")]
    = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    bands: Annotated[str | None, typer.Option(help="Image bands to use as RGB, 1-based, e.g. 3,2,1.")] = None,
    download: Annotated[bool, typer.Option("--download", help="Fetch the segmenter's weights if not cached.")]
    = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the facts as JSON on stdout.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")] = False,
) -> None:
    """Segment IMAGE with a coarse segmenter and write the mask (low resolution, image aspect ratio)."""
    import json

    from refine_cli.cli import configure_logging, err_console
    from refine_cli.io.readers import parse_bands

    configure_logging(verbose, quiet)
    if json_out and out == "-":
        raise UsageError("--json and -o - both write to stdout; give -o a file")
    facts = segment_file(image, out, segmenter=segmenter, device=device, soft=soft, overwrite=overwrite,
                         bands=parse_bands(bands), download=download)
    if json_out:
        typer.echo(json.dumps(facts, indent=2))
    elif not quiet:
        w, h = facts["mask_size"]
        err_console.print(f"[green]wrote[/] {facts['output']}: {facts['kind']} {w}x{h}, "
                          f"{len(facts['classes'])} classes, segmenter {facts['segmenter']} "
                          f"({facts['seconds']['segment']:.2f}s)", highlight=False)

