"""Keep the C heap from holding freed memory, so that peak RSS follows the memory plan.

ONNX Runtime (run without its arena), OpenCV and numpy allocate and free blocks of a few MiB for
every tile, from several threads. glibc's ``malloc`` serves such blocks from its heap arenas once its
dynamic mmap threshold has risen past them, and keeps the freed pages: a streamed CascadePSP run on
an 8000 x 8000 scene grew to 1352 MiB of RSS under ``--max-memory 1G`` (estimate about 1000 MiB), a
400 MPx one to 2362 MiB under 2 GiB. Two measures keep freed memory out of the RSS:

* at most :data:`ARENA_MAX` heap arenas per process (glibc's default is 8 per core);
* :class:`HeapTrimmer`: ``malloc_trim`` after every few refined batches, which hands the arenas'
  free pages back. (Mapping every block of 256 KiB and more on its own did the same, but made each
  640 px forward 2.5 times slower: every block's pages were faulted in again on every call.)

Only glibc is tuned; elsewhere (musl, macOS, Windows) these do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

log = logging.getLogger(__name__)

M_ARENA_MAX = -8
ARENA_MAX = 2
"""Heap arenas per process."""

TRIM_EVERY = 8
"""Refined batches between two ``malloc_trim`` calls."""


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

    Called at the start of every run (``engine.levels.run_levels``, ``engine.bands.run_band``);
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
    """Calls :func:`release_free_heap` on every ``every``-th :meth:`tick`.

    Args:
        every: ticks between two trims (>= 1).
    """

    def __init__(self, every: int = TRIM_EVERY) -> None:
        self.every = max(1, int(every))
        self._count = 0

    def tick(self) -> None:
        """Count one refined batch; trim the heap on every ``every``-th."""
        self._count += 1
        if self._count % self.every == 0:
            release_free_heap()
