"""One exception tree for everything a user can fix.

Every error a user can act on derives from :class:`RefineError` and also from the
matching built-in (``InputError`` is a ``ValueError``, ``WeightsError`` a
``RuntimeError`` ...), so library callers can catch either. Messages name the
path or flag at fault and the next step, in one line. ``cli.py`` prints a
``RefineError`` as one red line with ``exit_code``; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


def exception_chain(exc: BaseException, limit: int = 10) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during.

    Follows ``__cause__``, else ``__context__``, outermost first, at most ``limit``; cycles are cut.
    """
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain and len(chain) < limit:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return chain


class RefineError(Exception):
    """Root of all user-facing errors.

    Attributes:
        exit_code: process exit status the CLI uses (2 = usage/input, 1 = runtime).
    """

    exit_code: int = 1


class UsageError(RefineError, ValueError):
    """A flag or argument is invalid (unknown method, bad ``--tile-size`` ...)."""

    exit_code = 2


class InputError(RefineError, ValueError):
    """An input file is missing, unreadable, corrupt or inconsistent with another input."""

    exit_code = 2


class OutputExistsError(RefineError, FileExistsError):
    """The output path exists and ``--overwrite`` was not given."""

    exit_code = 2


class ReadError(RefineError, OSError):
    """Reading an input failed at the storage level (EIO, a vanished network share ...)."""

    exit_code = 1


class OutputError(RefineError, OSError):
    """An output could not be written (disk full, permissions ...)."""

    exit_code = 1


class WeightsError(RefineError, RuntimeError):
    """Weights are missing, fail verification, or do not match the architecture."""

    exit_code = 2


class ResourceError(RefineError, MemoryError):
    """The work does not fit the memory budget or the device (e.g. CUDA out of memory)."""

    exit_code = 1


class BudgetError(ResourceError):
    """The planned work does not fit ``--max-memory`` (found before running: fix the flag)."""

    exit_code = 2


class DependencyError(RefineError, ImportError):
    """An optional dependency is needed; the message gives the ``pip install`` line."""

    exit_code = 2


class Interrupted(RefineError):
    """The run was interrupted (SIGINT/SIGTERM) and cleaned up; the message says how to continue.

    Not a ``KeyboardInterrupt`` subclass on purpose: click/typer turn those into a bare
    abort and drop the message. Code that isolates failures (``except Exception``)
    must let it through explicitly.
    """

    exit_code = 130
