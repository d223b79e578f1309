"""``refine segment IMAGE -o coarse.tif``: run a coarse segmenter alone and write its mask.

A thin translator over :func:`refine_cli.segment.segment_file` (whose docstring tells the size,
kind and georeferencing of the mask written): ``--soft`` writes probabilities instead of a
0/255 mask or a label map.
"""

from __future__ import annotations

from typing import Annotated

import typer

from refine_cli.commands.console import Debug, Quiet, Verbose, configure_logging, err_console
from refine_cli.errors import UsageError
from refine_cli.segment import output_shape, segment_file

__all__ = ["app", "output_shape", "segment_cmd", "segment_file"]

app = typer.Typer(help="Make a coarse mask with a segmenter (the first step of MagNet-Fast).",
                  no_args_is_help=True, add_completion=False)
"""Sub-app for ``cli.app.add_typer(app, name="segment")``; ``segment_cmd`` is its callback, which
takes the options anywhere on the line (interspersed), so ``refine segment IMG -o OUT`` works.
``cli.app.command("segment")(segment_cmd)`` mounts the same function as a plain command."""


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
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Segment IMAGE with a coarse segmenter and write the mask (low resolution, image aspect ratio)."""
    import json

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

