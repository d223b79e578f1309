"""Keep the C heap from holding freed memory, so that peak RSS follows the memory plan.

ONNX Runtime (run without its arena), OpenCV and numpy allocate and free blocks of a few MiB for
every tile, from several threads. glibc's ``malloc`` serves such blocks from its heap arenas once its
dynamic mmap threshold has risen past them, and keeps the freed pages: a streamed CascadePSP run on
an 8000 x 8000 scene grew to 1352 MiB of RSS under ``--max-memory 1G`` (estimate about 1000 MiB), a
400 MPx one to 2362 MiB under 2 GiB. Two measures keep freed memory out of the RSS:

* at most :data:`ARENA_MAX` heap arenas per process (glibc's default is 8 per core);
* :class:`HeapTrimmer`: ``malloc_trim`` after a refined batch, at most every half second, which
  hands the arenas' free pages back. (Mapping every block of 256 KiB and more on its own did the
  same, but made each 640 px forward 2.5 times slower: every block's pages were faulted in again
  on every call.)

Only glibc is tuned; elsewhere (musl, macOS, Windows) these do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

M_ARENA_MAX = -8
ARENA_MAX = 2
"""Heap arenas per process."""

TRIM_SECONDS = 0.5
"""Least time between two ``malloc_trim`` calls, s (one call takes a few ms)."""


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc, else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
    except (OSError, AttributeError):
        return None
    return libc


@functools.cache
def limit_heap_retention() -> bool:
    """Cap glibc's heap arenas (once per process); whether it was done.

    Called before every level (``engine.levels``) and row band (``engine.bands.run_band``);
    arenas that exist already stay.
    """
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_ARENA_MAX, ARENA_MAX))
    if not ok:
        log.debug("mallopt refused M_ARENA_MAX; freed memory may stay in the RSS")
    return ok


def release_free_heap() -> None:
    """Give the heap's free pages back to the system (``malloc_trim``; glibc only)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class HeapTrimmer:
    """Calls :func:`release_free_heap` from :meth:`tick`, at most once every ``seconds``.

    Args:
        seconds: least time between two trims, s.
        clock: the time source (``time.monotonic``).
    """

    def __init__(self, seconds: float = TRIM_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.clock = float(seconds), clock
        self._last = clock()

    def tick(self) -> None:
        """After a refined batch: trim the heap when ``seconds`` have passed since the last trim."""
        now = self.clock()
        if now - self._last >= self.seconds:
            release_free_heap()
            self._last = self.clock()
