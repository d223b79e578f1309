"""``refine overlay``: draw mask contours over a downscaled image (and a 1:1 crop, an uncertainty heat map).

A thin translator over :mod:`refine_cli.overlay`, mounted by
``cli._mount_optional`` through :func:`register` (a plain command). No OpenCV
or torch import at module top.
"""

from __future__ import annotations

from typing import Annotated

import typer

from refine_cli.commands.console import Debug, Quiet, Verbose, configure_logging, err_console


def overlay_cmd(
    image: Annotated[str, typer.Argument(help="The image (any format `refine run` reads).",
                                         show_default=False)],
    mask: Annotated[str, typer.Argument(help="Mask to draw, e.g. the refined one (green).",
                                        show_default=False)],
    out: Annotated[str, typer.Option("--out", "-o", help="Picture to write (.png or .jpg).")],
    compare: Annotated[str | None, typer.Option("--compare", help="A second mask, e.g. the coarse one "
                                                "(magenta); the crop goes where they differ most.")] = None,
    uncertainty: Annotated[str | None, typer.Option("--uncertainty", help="Uncertainty map (`refine run "
                                                    "--uncertainty`), drawn as a heat map panel.")] = None,
    max_side: Annotated[int, typer.Option(help="Long side of the downscaled overview, px.")] = 1600,
    crop: Annotated[int, typer.Option(help="Width of the 1:1 crop (as tall as the overview), px (0 = none); "
                                      "it goes where the masks differ most, else where MASK's boundary is "
                                      "most uncertain, else on MASK's boundary.")] = 512,
    threshold: Annotated[float, typer.Option(help="Probability at or above which a pixel is "
                                             "foreground.")] = 0.5,
    classes: Annotated[int | None, typer.Option(help="Read the masks as label maps with this many classes.")]
    = None,
    bands: Annotated[str | None, typer.Option(help="Image bands to use as RGB, 1-based, e.g. 3,2,1.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing picture.")] = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Draw MASK (and --compare) as contours over a downscaled IMAGE, with a 1:1 crop and uncertainty."""
    from refine_cli.io.readers import parse_bands
    from refine_cli.io.writers import check_output
    from refine_cli.overlay import render_overlay, write_overlay

    configure_logging(verbose, quiet)
    check_output(out, overwrite)
    result = render_overlay(image, mask, compare, uncertainty, max_side=max_side, crop=crop,
                            threshold=threshold, classes=classes, bands=parse_bands(bands))
    write_overlay(result, out, overwrite=overwrite)
    if not quiet:
        h, w = result.rgb.shape[:2]
        where = ""
        if result.crop_window is not None:
            cw = result.crop_window
            where = f"; crop {cw.width}x{cw.height} at x={cw.col}, y={cw.row}"
        frac = result.changed_fraction
        changed = "" if frac is None else f"; masks differ on {frac:.2%} of the overview"
        err_console.print(f"wrote {out} ({w}x{h} px{where}{changed})", highlight=False)


def register(parent: typer.Typer, name: str = "overlay") -> None:
    """Add ``refine overlay`` to ``parent`` as a plain command (once)."""
    if any(c.name == name for c in parent.registered_commands):
        return
    parent.command(name)(overlay_cmd)
