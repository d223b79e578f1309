"""``refine review``: one page (or picture) that shows where to look after ``refine run`` or ``refine batch``.

A thin translator over :func:`refine_cli.review.review_runs`, mounted by ``cli._mount_optional``
through :func:`register` (a plain command). No OpenCV or torch import at module top.
"""

from __future__ import annotations

from typing import Annotated

import typer

from refine_cli.commands.console import Debug, ProgressBars, Quiet, Verbose, configure_logging, err_console


def review_cmd(
    runs: Annotated[list[str], typer.Argument(help="Run reports (`refine run --report`), `refine batch` "
                                              "output folders or their journals.", show_default=False)],
    out: Annotated[str, typer.Option("--out", "-o", help="Page to write: .html (self-contained), or .png "
                                     "for one contact sheet.")],
    top: Annotated[int, typer.Option("--top", help="Regions shown per image, the most uncertain first.")] = 8,
    crop: Annotated[int, typer.Option("--crop", help="Side of each region, px (shown 1:1).")] = 384,
    map_side: Annotated[int, typer.Option("--map-side", help="Long side of the tile map, px.")] = 640,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing page.")] = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Show the most uncertain regions of each refined image at 1:1, its tile map and its timings."""
    from refine_cli.review import check_review_output, review_runs

    configure_logging(verbose, quiet)
    check_review_output(out, overwrite)
    with ProgressBars(enabled=not quiet) as progress:
        result = review_runs(runs, out, top=top, crop=crop, map_side=map_side, overwrite=overwrite,
                             progress=progress)
    if not quiet:
        regions = sum(len(iv.scan.regions) for iv in result.images if iv.scan is not None)
        err_console.print(f"wrote {out} ({len(result.images)} image(s), {regions} region(s))",
                          highlight=False)


def register(parent: typer.Typer, name: str = "review") -> None:
    """Add ``refine review`` to ``parent`` as a plain command (once)."""
    if any(c.name == name for c in parent.registered_commands):
        return
    parent.command(name)(review_cmd)
