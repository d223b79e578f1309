"""Stage timers: wall-clock seconds per named stage, safe to use from several threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

STAGES = ("read", "segment", "refine", "blend", "write")
"""Stages every report lists, in this order (others may be added)."""


class StageTimer:
    """Accumulates seconds per stage, timed by ``with timer.stage(name)`` blocks or by laps.

    Stages run in different threads can overlap, so their sum may exceed the
    wall time of the run; the report gives both.

    Args:
        stages: stages listed from the start, at 0 s (default: the run's :data:`STAGES`; ``()`` for
            a timer of a pipeline's own steps, listed in the order they first run).
        sync: called before each reading of the clock, e.g. ``torch.cuda.synchronize`` so that a
            lap includes the device work queued in it; ``None``: nothing to wait for.
    """

    def __init__(self, stages: Iterable[str] = STAGES, sync: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = dict.fromkeys(stages, 0.0)
        self._counts: dict[str, int] = dict.fromkeys(self._seconds, 0)
        self._sync = sync
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        """Add the time since the last lap (or :meth:`restart`, or the timer's start) to ``name``."""
        if self._sync is not None:
            self._sync()
        now = time.perf_counter()
        self.add(name, now - self._t)
        self._t = now

    def restart(self) -> None:
        """Start the next lap now."""
        self._t = time.perf_counter()

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
