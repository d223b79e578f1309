"""``refine``: the command line. Options become a ``RefineConfig``, one API call runs, the result is rendered.

Human output (logs, progress bars, tables, errors) goes to stderr; stdout carries
only data (``--json`` reports, ``-`` outputs). A :class:`~refine_cli.errors.RefineError`
becomes one red line and its exit code (2 usage/input, 1 runtime, 130 interrupted);
any other exception is a bug: one line too, and the traceback with ``--debug``.

No torch or OpenCV import at module top: ``refine --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Any

import typer
from rich.console import Console

from refine_cli import __version__
from refine_cli.errors import RefineError, UsageError

err_console = Console(stderr=True)
app = typer.Typer(
    name="refine",
    help="Refine segmentation masks on very large images, tile by tile, with bounded memory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"refine {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Refine segmentation masks on very large images."""


def configure_logging(verbose: int, quiet: bool) -> None:
    """Map ``-v/-q`` to a log level and send records to stderr through Rich."""
    from rich.logging import RichHandler

    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else
                                         logging.WARNING)
    root = logging.getLogger("refine_cli")
    root.handlers.clear()
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    import warnings

    warnings.filterwarnings("ignore", module="rasterio")


Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv for debug).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr; no progress bar or table.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks of internal errors.")]


class _Progress:
    """A Rich progress bar on stderr, shown only on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and err_console.is_terminal
        self._bar: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True)
            self._bar.__enter__()
        return self

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self._bar is None:
            return
        task = self._tasks.get(stage)
        if task is None:
            task = self._tasks[stage] = self._bar.add_task(f"{stage} tiles", total=total)
        self._bar.update(task, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


@app.command("run")
def run_cmd(
    image: Annotated[str, typer.Argument(help="Image to refine (TIFF/GeoTIFF/PNG/JPEG/WebP), or - for stdin.")],
    mask: Annotated[str | None, typer.Option("--mask", "-m", help="Coarse mask (any resolution with the image's "
                                             "aspect ratio), or - for stdin.")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Refined mask (.tif/.png, or - for stdout); "
                                            "default <stem>.refined.tif beside the image.")] = None,
    method: Annotated[str, typer.Option("--method", help="Refiner: guided, fgs, coarse, cascade, magnet-fast.")]
    = "guided",
    uncertainty: Annotated[str | None, typer.Option("--uncertainty", help="Also write the uncertainty map "
                                                    "(uint8, 255 = most uncertain).")] = None,
    report: Annotated[str | None, typer.Option("--report", help="Write the timing report as JSON.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    soft: Annotated[bool, typer.Option("--soft", help="Write probabilities (float32 TIFF / uint8 PNG) "
                                       "instead of a 0/255 mask.")] = False,
    threshold: Annotated[float, typer.Option(help="Foreground probability threshold of the hard mask.")] = 0.5,
    classes: Annotated[int | None, typer.Option(help="Treat the mask as a label map with this many classes.")]
    = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    max_memory: Annotated[str, typer.Option(help="RAM budget, e.g. 2G or 1500M; tile size follows.")] = "2G",
    tile_size: Annotated[int | None, typer.Option(help="Tile side in px (default: from the budget).")] = None,
    overlap: Annotated[int, typer.Option(help="Blend overlap between tiles, px.")] = 64,
    no_skip: Annotated[bool, typer.Option("--no-skip", help="Refine every tile, also where the coarse mask "
                                          "is uniform.")] = False,
    radius: Annotated[int | None, typer.Option(help="guided/fgs: filter radius in px (default: from the "
                                               "resolution).")] = None,
    eps: Annotated[float, typer.Option(help="guided: regularisation (smaller follows edges more).")] = 1e-2,
    cascade_size: Annotated[int, typer.Option(help="cascade: working size L of global step and patches.")]
    = 900,
    fast: Annotated[bool, typer.Option("--fast", help="cascade: global step only.")] = False,
    weights: Annotated[str | None, typer.Option(help="Checkpoint file or registry name (see `refine weights "
                                                "list`).")] = None,
    precision: Annotated[str, typer.Option(help="fp32, fp16 or bf16 (autocast).")] = "fp32",
    batch_size: Annotated[int, typer.Option(help="Patches per forward pass.")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")] = False,
    fmt: Annotated[str | None, typer.Option("--format", help="Output format png or tiff (default: from the "
                                            "extension; png for -).")] = None,
    cog: Annotated[bool, typer.Option("--cog", help="Write Cloud-Optimised GeoTIFFs (with overviews).")] = False,
    bands: Annotated[str | None, typer.Option(help="Image bands to use as RGB, 1-based, e.g. 3,2,1.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all cores).")] = None,
    max_pixels: Annotated[float, typer.Option(help="Refuse images declaring more pixels than this.")] = 5e10,
    inline_limit: Annotated[float, typer.Option(help="PNG/JPEG images above this many pixels are cached as "
                                                "tiled TIFF first.")] = 6.4e7,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Refine the coarse mask of IMAGE and write the refined mask (and uncertainty map and report)."""
    from refine_cli.config import CascadeOptions, GuidedOptions, RefineConfig, parse_size
    from refine_cli.io.readers import parse_bands

    configure_logging(verbose, quiet)
    target = out
    if json_out and target == "-":
        raise UsageError("--json and -o - both write to stdout; give -o a file")
    if image == "-" and target is None:
        target = "-"
    config = RefineConfig(
        method=method, device=device, max_memory=parse_size(max_memory), tile_size=tile_size, overlap=overlap,
        skip_uniform=not no_skip, classes=classes, threshold=threshold, soft=soft, threads=threads,
        max_pixels=int(max_pixels), inline_limit=int(inline_limit),
        guided=GuidedOptions(radius=radius, eps=eps),
        cascade=CascadeOptions(size=cascade_size, fast=fast, weights=weights, precision=precision,
                               batch_size=batch_size),
    )
    from refine_cli.api import refine_file

    with _Progress(enabled=not quiet) as progress:
        rep = refine_file(image, mask, target, config=config, uncertainty=uncertainty, report=report,
                          overwrite=overwrite, fmt=fmt, cog=cog, bands=parse_bands(bands), progress=progress)
    if json_out:
        typer.echo(rep.to_json())
    if not quiet:
        from refine_cli.report.summary import render_table

        err_console.print(render_table(rep))


@app.command("info")
def info_cmd(
    image: Annotated[str, typer.Argument(help="Image or mask to describe.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Size, bands, dtype, tiling, pyramid levels and georeferencing of an image."""
    configure_logging(verbose, quiet)
    from refine_cli.api import describe_image

    facts = describe_image(image)
    if json_out:
        typer.echo(json.dumps(facts, indent=2))
        return
    from rich.table import Table

    t = Table(title=str(image), show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    for k, v in facts.items():
        if k == "crs" and v:
            v = v[:80] + ("..." if len(v) > 80 else "")
        t.add_row(k, str(v))
    Console().print(t)


def _mount_optional() -> None:
    """Attach command groups that live in their own modules."""
    import importlib

    for name, module in (("weights", "refine_cli.commands.weights"),):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        app.add_typer(mod.app, name=name, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None)


_mount_optional()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and turn errors into one line and an exit code."""
    import click

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        app(args=args, prog_name="refine", standalone_mode=False)
    except click.exceptions.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except click.exceptions.Abort:
        err_console.print("[red]error:[/] interrupted")
        raise SystemExit(130) from None
    except click.ClickException as exc:
        err_console.print(f"[red]error:[/] {exc.format_message()}", highlight=False)
        raise SystemExit(2) from None
    except RefineError as exc:
        if debug:
            err_console.print_exception()
        err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("[red]error:[/] interrupted", highlight=False)
        raise SystemExit(130) from None
    except MemoryError:
        err_console.print("[red]error:[/] out of memory; lower --max-memory or --tile-size", highlight=False)
        raise SystemExit(1) from None
    except OSError as exc:
        if debug:
            err_console.print_exception()
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        err_console.print(f"[red]error:[/] {exc.strerror or exc}{where}", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None
    except Exception as exc:  # a bug: one line, traceback with --debug
        if debug:
            err_console.print_exception()
        else:
            err_console.print(f"[red]internal error:[/] {type(exc).__name__}: {exc} (rerun with --debug for "
                              "the traceback and please report it)", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()

