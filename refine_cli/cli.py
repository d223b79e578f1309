"""``refine``: the command line. Options become a ``RefineConfig``, one API call runs, the result is rendered.

Human output (logs, progress bars, tables, errors) goes to stderr; stdout carries
only data (``--json`` reports, ``-`` outputs). A :class:`~refine_cli.errors.RefineError`
becomes one red line and its exit code (2 usage/input, 1 runtime, 130 interrupted);
any other exception is a bug: one line too, and the traceback with ``--debug``.

No torch or OpenCV import at module top: ``refine --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console

from refine_cli import __version__
from refine_cli.commands.console import Debug, ProgressBars, Quiet, Verbose, configure_logging, err_console
from refine_cli.commands.options import MinAreaOpt, RunOptions, SimplifyOpt, VectorFormatOpt, run_options
from refine_cli.errors import RefineError, UsageError

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


@app.command("run")
@run_options
def run_cmd(
    image: Annotated[str, typer.Argument(
        help="Image to refine (TIFF/GeoTIFF/PNG/JPEG/WebP), or - for stdin.")],
    mask: Annotated[str | None, typer.Option(
        "--mask", "-m", help="Coarse mask (any resolution with the image's "
        "aspect ratio), or - for stdin.")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Refined mask (.tif/.png, or - for stdout); "
                                            "default <stem>.refined.tif beside the image.")] = None,
    uncertainty: Annotated[str | None, typer.Option("--uncertainty", help="Also write the uncertainty map "
                                                    "(uint8, 255 = most uncertain).")] = None,
    report: Annotated[str | None, typer.Option("--report", help="Write the timing report as JSON.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from the finished "
                                         "rows it left beside the output.")] = False,
    save_coarse: Annotated[str | None, typer.Option("--save-coarse", help="With --segmenter and no --mask: "
                                                    "also keep the coarse mask it made (.tif/.png).")] = None,
    vector: Annotated[str | None, typer.Option(
        "--vector", help="Also write the refined mask's polygons (.gpkg/.geojson/.fgb/.parquet), streamed "
        "by row band, with class, pixels, prob_mean and unc_mean.")] = None,
    vector_format: VectorFormatOpt = None,
    simplify: SimplifyOpt = None,
    min_area: MinAreaOpt = None,
    scheduler: Annotated[str | None, typer.Option(
        "--scheduler", help="Spread the image's row bands over Dask workers: local:N or tcp://HOST:PORT "
        "(paths must be reachable from every worker; needs the distributed extra).")] = None,
    band_rows: Annotated[int | None, typer.Option(
        "--band-rows", min=1, help="With --scheduler: rows per task (rounded up to a segment of the "
        "output; default: two bands per worker thread, two to four tile heights).")] = None,
    opts: RunOptions = RunOptions(),
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Refine the coarse mask of IMAGE and write the refined mask (and uncertainty map and report)."""
    configure_logging(verbose, quiet)
    target = out
    if json_out and target == "-":
        raise UsageError("--json and -o - both write to stdout; give -o a file")
    if image == "-" and target is None:
        target = "-"
    config = opts.config()
    if band_rows is not None and scheduler is None:
        raise UsageError("--band-rows sizes the tasks of --scheduler: add --scheduler local:N or "
                         "tcp://HOST:PORT")
    if scheduler is not None:
        if vector is not None:
            raise UsageError("--scheduler does not write --vector yet: polygonize its output afterwards with "
                             "`refine vectorize OUT -o FILE`")
        if save_coarse:
            raise UsageError("--save-coarse needs --segmenter, which --scheduler does not run: make the "
                             "coarse mask first with `refine segment`")
        from refine_cli.cluster import refine_on_cluster

        with ProgressBars(enabled=not quiet) as progress:
            rep = refine_on_cluster(image, mask, target, scheduler=scheduler, config=config,
                                    uncertainty=uncertainty, report=report, overwrite=opts.overwrite,
                                    fmt=opts.fmt, cog=opts.cog, bands=opts.band_indices(), progress=progress,
                                    resume=resume, command=_command_line(), band_rows=band_rows)
        _show(rep, json_out, quiet)
        return
    from refine_cli.api import refine_file
    from refine_cli.io.vectorize import VectorSpec

    if vector is None and (vector_format or simplify or min_area):
        raise UsageError("--vector-format, --simplify and --min-area shape the polygons of --vector: add "
                         "--vector FILE")
    vspec = VectorSpec(vector, vector_format, simplify, min_area) if vector else None

    with ProgressBars(enabled=not quiet) as progress:
        rep = refine_file(image, mask, target, config=config, uncertainty=uncertainty, report=report,
                          overwrite=opts.overwrite, fmt=opts.fmt, cog=opts.cog, bands=opts.band_indices(),
                          progress=progress, resume=resume, save_coarse=save_coarse, command=_command_line(),
                          vector=vspec)
    _show(rep, json_out, quiet)


def _show(rep: Any, json_out: bool, quiet: bool) -> None:
    """Print the report as JSON on stdout (``--json``) and as a table on stderr (unless ``-q``)."""
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
    """Attach commands that live in their own modules (``refine_cli/commands/``).

    A module either exposes ``register(app, name)`` (a plain command) or a Typer ``app``
    (a command group such as ``refine weights list``).
    """
    import importlib

    for name, module in (("weights", "refine_cli.commands.weights"), ("batch", "refine_cli.commands.batch"),
                         ("eval", "refine_cli.commands.eval"), ("overlay", "refine_cli.commands.overlay"),
                         ("review", "refine_cli.commands.review"), ("train", "refine_cli.commands.train"),
                         ("vectorize", "refine_cli.commands.vectorize")):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        if hasattr(mod, "register"):
            mod.register(app, name)
            continue
        app.add_typer(mod.app, name=name,
                      help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None)


_mount_optional()

from refine_cli.commands.segment import segment_cmd  # noqa: E402

app.command("segment",
            help="Make a coarse mask with a segmenter (the first step of MagNet-Fast).")(segment_cmd)


_ARGV: list[str] = []
"""The arguments of the running command (set by :func:`main`), for the report."""


def _command_line() -> str | None:
    import shlex

    return shlex.join(["refine", *_ARGV]) if _ARGV else None


def _error(text: str, debug: bool = False) -> None:
    """Print one red ``error:`` line (the message is not parsed as markup)."""
    from rich.markup import escape

    if debug:
        err_console.print_exception()
    err_console.print(f"[red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and turn errors into one line and an exit code."""
    from typer._click.exceptions import ClickException  # typer bundles its own click

    args = list(sys.argv[1:] if argv is None else argv)
    _ARGV[:] = args
    debug = "--debug" in args
    try:
        rc = app(args=args, prog_name="refine", standalone_mode=False)
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        _error("interrupted")
        raise SystemExit(130) from None
    except ClickException as exc:
        if exc.format_message().strip():  # empty when the help was shown instead
            # a typed option's refusal reads "Value error, 'x' is not one of 'a', 'b'": keep the facts
            _error(exc.format_message().replace("Value error, ", ""))
        raise SystemExit(exc.exit_code or 2) from None
    except RefineError as exc:
        _error(str(exc), debug)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        _error("interrupted")
        raise SystemExit(130) from None
    except MemoryError:
        _error("out of memory; lower --max-memory or --tile-size")
        raise SystemExit(1) from None
    except OSError as exc:
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        _error(f"{exc.strerror or exc}{where}", debug)
        raise SystemExit(1) from None
    except ModuleNotFoundError as exc:  # a broken install, not a bug: say what to install
        _error(f"the Python package {exc.name!r} is missing: reinstall refine (`pip install -e .` in the "
               f"checkout, or `pip install {exc.name}`)", debug)
        raise SystemExit(1) from None
    except Exception as exc:  # a bug: one line, traceback with --debug
        if debug:
            err_console.print_exception()
        else:
            from rich.markup import escape

            err_console.print(f"[red]internal error:[/] {escape(f'{type(exc).__name__}: {exc}')} (rerun with "
                              "--debug for the traceback and please report it)",
                              highlight=False, soft_wrap=True)
        raise SystemExit(1) from None
    if isinstance(rc, int) and rc:
        if rc == 130:
            _error("interrupted")
        raise SystemExit(rc)


if __name__ == "__main__":
    main()

