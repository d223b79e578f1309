"""What every command shares on stderr: one console, ``-v/-q/--debug``, logging and progress bars.

Human output (logs, progress, tables, errors) goes to :data:`err_console` (stderr); stdout
carries only data. Progress bars are shown only when stderr is a terminal, so pipes and
logs stay clean. No torch or OpenCV import here: ``refine --help`` stays fast.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any, Literal

import typer
from rich.console import Console

err_console = Console(stderr=True)
"""The one stderr console of the command line."""

Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv for debug).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q",
                                     help="Only errors on stderr; no progress bar or table.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks of internal errors.")]

THIRD_PARTY_LOGGERS = ("tifffile", "zarr", "numcodecs", "imagecodecs", "rasterio")
"""Libraries whose log records are shown only with ``-v`` (see :func:`configure_logging`)."""


def configure_logging(verbose: int, quiet: bool) -> None:
    """Map ``-v/-q`` to a log level and send records to stderr.

    On a terminal records go through Rich; otherwise one plain line per record
    (``WARNING  text``), never wrapped, so logs and pipes can grep them. ``-q``: errors
    only; default: warnings; ``-v``: info; ``-vv``: debug.
    """
    from rich.logging import RichHandler

    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else
                                         logging.WARNING)
    root = logging.getLogger("refine_cli")
    root.handlers.clear()
    handler: logging.Handler
    if err_console.is_terminal:
        handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    # Decoder libraries log what they repair or skip in a damaged file ("incorrect StripOffsets
    # count"); without a handler Python prints that bare on stderr, beside refine's one-line error.
    # Their records go through the same handler, shown with -v only.
    for name in THIRD_PARTY_LOGGERS:
        lib = logging.getLogger(name)
        lib.handlers[:] = [handler]
        lib.setLevel(logging.WARNING if verbose else logging.CRITICAL + 1)
        lib.propagate = False
    import warnings

    warnings.filterwarnings("ignore", module="rasterio")


class ProgressBars:
    """Rich progress bars on stderr, one per named task; inactive unless enabled and on a terminal.

    ``bars(name, done, total)`` creates or updates the bar ``name`` (``total = 0``: amount
    unknown, a spinner); :meth:`reset` restarts one with a new description, :meth:`advance`
    steps one. ``unit="bytes"`` shows sizes and a transfer speed instead of ``done/total``;
    ``fields`` adds ``{task.fields[...]}`` columns (for example the training loss).
    """

    def __init__(self, enabled: bool, *, unit: Literal["count", "bytes"] = "count",
                 fields: tuple[str, ...] = (), transient: bool = True) -> None:
        self.enabled = enabled and err_console.is_terminal
        self.unit = unit
        self.fields = fields
        self.transient = transient
        self._bar: Any = None
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> ProgressBars:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                MofNCompleteColumn,
                Progress,
                ProgressColumn,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            amount: list[ProgressColumn] = ([DownloadColumn(), TransferSpeedColumn()] if self.unit == "bytes"
                                            else [MofNCompleteColumn()])
            extra = [TextColumn(f"{f} {{task.fields[{f}]}}") for f in self.fields]
            self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 *amount, *extra,
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=err_console,
                                 transient=self.transient)
            self._bar.__enter__()
        return self

    def _task(self, name: str, total: int | None, description: str | None) -> Any:
        task = self._tasks.get(name)
        if task is None:
            task = self._tasks[name] = self._bar.add_task(description or name, total=total or None,
                                                          **dict.fromkeys(self.fields, "-"))
        return task

    def __call__(self, name: str, done: int, total: int | None = 0, description: str | None = None,
                 **fields: Any) -> None:
        """Set bar ``name`` to ``done`` of ``total`` (0 or ``None``: unknown)."""
        if self._bar is None:
            return
        task = self._task(name, total, description)
        extra = {"description": description} if description is not None else {}
        self._bar.update(task, completed=done, total=total or None, **extra, **fields)

    def reset(self, name: str, description: str, total: int | None = 0) -> None:
        """Restart bar ``name`` at 0 with a new description."""
        if self._bar is None:
            return
        task = self._task(name, total, description)
        self._bar.reset(task, description=description, total=total or None)

    def advance(self, name: str, total: int | None = 0) -> None:
        """Step bar ``name`` by one."""
        if self._bar is not None:
            self._bar.advance(self._task(name, total, None))

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
