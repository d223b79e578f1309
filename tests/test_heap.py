"""The C heap gives freed memory back (engine.heap)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from refine_cli.engine import heap


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux") or heap._glibc() is None, reason="glibc only")
def test_trimming_returns_freed_small_blocks_to_the_system():
    assert heap.limit_heap_retention() is True
    heap.release_free_heap()
    before = rss_mib()
    # 400 MB in 100 KB blocks, below glibc's mmap threshold, so served from the heap; every eighth
    # stays, so the freed ones are holes that free() keeps and only malloc_trim gives back
    blocks = [np.ones(100_000, np.uint8) for _ in range(4000)]
    kept = blocks[::8]
    del blocks
    held = rss_mib()
    heap.release_free_heap()
    after = rss_mib()
    assert held - before > 300, (before, held)
    assert after - before < 120, (before, held, after)
    del kept


def test_trimmer_trims_at_most_every_half_second(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "release_free_heap", lambda: calls.append(1))
    now = [100.0]
    t = heap.HeapTrimmer(seconds=0.5, clock=lambda: now[0])
    for _ in range(10):  # batches of 0.2 s: a trim every third
        now[0] += 0.2
        t.tick()
    assert len(calls) == 3
