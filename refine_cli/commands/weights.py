"""List, fetch, verify, locate and import checkpoints (`refine weights ...`).

A thin translator over :mod:`refine_cli.weights`: user errors are raised as
``RefineError`` subclasses (``cli.py`` prints them as one red line). Tables and
progress go to stderr; machine output (paths, JSON) goes to stdout.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich import box
from rich.table import Table

from refine_cli import weights
from refine_cli.commands.console import Debug, ProgressBars, Quiet, Verbose, configure_logging, err_console

app = typer.Typer(help="Manage model weights (cache: $REFINE_HOME/weights).", no_args_is_help=True)


def _names() -> list[str]:
    return [r.name for r in weights.list_records()]


NAME = typer.Argument(..., help="registry name (see `refine weights list`)", autocompletion=_names)


@app.command("list")
def list_cmd(
    as_json: bool = typer.Option(False, "--json", help="print the records as JSON on stdout"),
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """List known checkpoints and where they are (cache, bundled in weights/, or not here)."""
    configure_logging(verbose, quiet)
    rows = []
    for record in weights.list_records():
        found = weights.local_file(record.name)
        path = found[0] if found else weights.cache_path(record.name)
        rows.append({**record.to_dict(), "cached": found is not None and found[1] == "cache",
                     "local": found[1] if found else None, "path": str(path)})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if quiet:
        return
    wide = err_console.width >= 110
    table = Table(title=f"weights (cache {weights.refine_home() / 'weights'})", box=box.SIMPLE_HEAD,
                  title_justify="left")
    table.add_column("name", no_wrap=True, min_width=max(len(r["name"]) for r in rows))  # typed by users
    if wide:
        table.add_column("architecture", no_wrap=True)
    table.add_column("size", no_wrap=True, justify="right")
    table.add_column("here", no_wrap=True)
    table.add_column("license", overflow="fold")
    for row in rows:
        size = row["size"] or row["approx_size"]
        text = f"{size / 1e6:.0f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"
        text = ("" if row["size"] else "~") + text
        cells = [row["name"], *([row["architecture"]] if wide else []), text, row["local"] or "no",
                 weights.short_license(row["license"]) if not wide else row["license"]]
        table.add_row(*cells)
    err_console.print(table)


@app.command()
def fetch(
    name: str = NAME,
    force: bool = typer.Option(False, "--force", help="download again even when a verified copy is cached"),
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Download a checkpoint into the cache (resumable) and verify it; prints its path."""
    configure_logging(verbose, quiet)
    record = weights.get_record(name)
    if record.url and not quiet:
        licence = weights.short_license(record.license)
        err_console.print(f"fetching {name} from {record.url} (licence: {licence}; "
                          "`refine weights list --json` has it in full)", highlight=False, soft_wrap=True)
    with ProgressBars(enabled=not quiet, unit="bytes") as bars:

        def progress(done: int, total: int | None) -> None:
            bars(name, done, total)

        path = weights.fetch(name, progress=progress, force=force)
    typer.echo(str(path))


@app.command()
def verify(name: str = NAME, verbose: Verbose = 0, quiet: Quiet = False, debug: Debug = False) -> None:
    """Check the checkpoint's size and checksums (the cached copy, else the bundled one)."""
    configure_logging(verbose, quiet)
    digests = weights.verify(name)
    if not quiet:
        err_console.print(f"[green]ok[/green] {name}: {digests.size} bytes, sha256 {digests.sha256}")


@app.command()
def path(name: str = NAME, verbose: Verbose = 0, quiet: Quiet = False, debug: Debug = False) -> None:
    """Print where the checkpoint is (cache, else bundled), or where it must be put in the cache."""
    configure_logging(verbose, quiet)
    found = weights.local_file(name)
    typer.echo(str(found[0] if found else weights.cache_path(name)))


@app.command("import")
def import_cmd(
    name: str = NAME,
    file: Path = typer.Argument(..., help="the checkpoint downloaded by hand"),
    verbose: Verbose = 0,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Verify a checkpoint downloaded by hand and copy it into the cache; prints its path."""
    configure_logging(verbose, quiet)
    typer.echo(str(weights.import_file(name, file)))
