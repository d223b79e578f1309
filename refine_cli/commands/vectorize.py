"""``refine vectorize``: polygons of an existing mask raster, streamed by row band.

A thin translator over :func:`refine_cli.io.vectorize.vectorize_file`, mounted by
``cli._mount_optional`` through :func:`register`.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from refine_cli.commands.console import Debug, Quiet, Verbose, configure_logging, err_console
from refine_cli.commands.options import MinAreaOpt, SimplifyOpt, VectorFormatOpt


def vectorize_cmd(
    mask: Annotated[str, typer.Argument(help="One-band mask (TIFF/GeoTIFF/PNG): integer values are classes "
                                        "(0 = background), floats probabilities.", show_default=False)],
    out: Annotated[str, typer.Option("--out", "-o", help="Polygon file (.gpkg, .geojson, .fgb, .parquet).")],
    vector_format: VectorFormatOpt = None,
    simplify: SimplifyOpt = None,
    min_area: MinAreaOpt = None,
    threshold: Annotated[float, typer.Option(help="Foreground threshold of a float (probability) mask.")]
    = 0.5,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Write the polygons of MASK (exact pixel edges, holes kept, class attribute) to a vector file."""
    from refine_cli.io.vectorize import VectorSpec, vectorize_file

    configure_logging(verbose, quiet)
    result = vectorize_file(mask, VectorSpec(out, vector_format, simplify, min_area), overwrite=overwrite,
                            threshold=threshold)
    if json_out:
        typer.echo(json.dumps(result))
    if not quiet:
        err_console.print(f"wrote {out} ({result['polygons']} polygons from a {result['width']}x"
                          f"{result['height']} mask)", highlight=False)


def register(parent: typer.Typer, name: str = "vectorize") -> None:
    """Add ``refine vectorize`` to ``parent`` as a plain command (once)."""
    if any(c.name == name for c in parent.registered_commands):
        return
    parent.command(name)(vectorize_cmd)
