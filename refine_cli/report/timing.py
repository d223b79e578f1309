"""Stage timers: wall-clock seconds per named stage, safe to use from several threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

STAGES = ("read", "segment", "refine", "blend", "write")
"""Stages every report lists, in this order (others may be added)."""


class StageTimer:
    """Accumulates seconds per stage.

    Stages run in different threads can overlap, so their sum may exceed the
    wall time of the run; the report gives both.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {s: 0.0 for s in STAGES}
        self._counts: dict[str, int] = {s: 0 for s in STAGES}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the body of a ``with`` block under ``name``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float, count: int = 1) -> None:
        """Add ``seconds`` to ``name``."""
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds
            self._counts[name] = self._counts.get(name, 0) + count

    def seconds(self) -> dict[str, float]:
        """Seconds per stage (a copy)."""
        with self._lock:
            return dict(self._seconds)

    def counts(self) -> dict[str, int]:
        """Number of timed sections per stage (a copy)."""
        with self._lock:
            return dict(self._counts)
