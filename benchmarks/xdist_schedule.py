"""How pytest-xdist's ``load`` and ``worksteal`` schedulers would spread a measured test run over workers.

Reads the per-test durations of a run (``python -m pytest -q -n 2 --dist worksteal --durations=0 > log``)
and replays the collection order (``python -m pytest -q --collect-only``, one node id a line) through a model
of each scheduler of pytest-xdist 3.8: ``load`` sends consecutive chunks (a quarter of each worker's share
first, then refills a worker that falls below its minimum, unless its last test took >= 0.1 s and it still
has two queued), ``worksteal`` splits the collection in halves and a worker left with one queued test takes
half of the other's queue from its end. Prints each scheduler's wall time and each worker's busy time, then
the tail (wall minus half the work) over 200 draws with every duration scaled by 0.6-1.4, so that one run's
noise does not decide. A model: fixture sharing and the workers' interference are not in it.

Usage::

    python benchmarks/xdist_schedule.py durations.log order.txt [order2.txt ...]
"""

from __future__ import annotations

import argparse
import random
import re


def durations(log: str) -> dict[str, float]:
    """Seconds per node id (setup + call + teardown) from a ``--durations=0`` log."""
    out: dict[str, float] = {}
    with open(log) as fh:
        for line in fh:
            m = re.match(r"\s*([\d.]+)s (?:call|setup|teardown)\s+(\S+)", line)
            if m:
                out[m.group(2)] = out.get(m.group(2), 0.0) + float(m.group(1))
    return out


def _next_done(queues: list[list[int]], clock: list[float], durs: list[float]) -> int:
    return min((k for k in range(len(queues)) if queues[k]), key=lambda k: clock[k] + durs[queues[k][0]])


def load(durs: list[float], nodes: int = 2) -> list[float]:
    """Busy seconds per worker under ``--dist load``."""
    pending = list(range(len(durs)))
    chunk = max(len(durs) // nodes // 4, 2)
    queues = [pending[k * chunk:(k + 1) * chunk] for k in range(nodes)]
    del pending[:nodes * chunk]
    clock = [0.0] * nodes
    while any(queues):
        k = _next_done(queues, clock, durs)
        i = queues[k].pop(0)
        clock[k] += durs[i]
        lo, hi = max(2, len(pending) // nodes // 4), max(2, len(pending) // nodes // 2)
        if pending and len(queues[k]) < lo and not (durs[i] >= 0.1 and len(queues[k]) >= 2):
            n = hi - len(queues[k])
            queues[k] += pending[:n]
            del pending[:n]
    return clock


def worksteal(durs: list[float], nodes: int = 2) -> list[float]:
    """Busy seconds per worker under ``--dist worksteal``."""
    per = len(durs) // nodes
    queues = [list(range(k * per, (k + 1) * per if k < nodes - 1 else len(durs))) for k in range(nodes)]
    clock = [0.0] * nodes
    while any(queues):
        k = _next_done(queues, clock, durs)
        clock[k] += durs[queues[k].pop(0)]
        if len(queues[k]) <= 1:
            other = max(range(nodes), key=lambda j: len(queues[j]))
            n = min(len(queues[other]) // 2, max(0, len(queues[other]) - 2))
            if other != k and n:
                queues[k] += queues[other][-n:]
                del queues[other][-n:]
    return clock


def main() -> None:
    """Print the modelled wall time of each scheduler for each collection order."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", help="a pytest log with --durations=0")
    ap.add_argument("orders", nargs="+", help="collection orders: one node id a line")
    args = ap.parse_args()
    secs = durations(args.log)
    for order in args.orders:
        with open(order) as fh:
            base = [secs.get(line.strip(), 0.0) for line in fh if "::" in line]
        work = sum(base)
        print(f"{order}: {len(base)} tests, {work:.0f} s of work, {work / 2:.0f} s on 2 ideal workers")
        for name, fn in (("load", load), ("worksteal", worksteal)):
            busy = fn(base)
            tails = []
            for seed in range(200):
                rng = random.Random(seed)
                noisy = [d * rng.uniform(0.6, 1.4) for d in base]
                tails.append(max(fn(noisy)) - sum(noisy) / 2)
            mean = sum(tails) / len(tails)
            print(f"  {name:9s} wall {max(busy):6.0f} s  workers {[round(b) for b in busy]}  "
                  f"tail over 200 noisy draws: mean {mean:.0f} s, worst {max(tails):.0f} s")


if __name__ == "__main__":
    main()
