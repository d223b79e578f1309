"""Batch inputs as Dask tasks, one per file, on a cluster or on local worker processes.

``scheduler="tcp://HOST:PORT"`` or ``"local:N"`` (optional extra
``refine-cli[distributed]``): each input that must run becomes one task; workers run
:func:`refine_cli.api.refine_file` exactly as the local loop does and return the record,
and this (client) process appends records as tasks complete. Workers must see the same
paths as the client (shared filesystem) and have ``refine-cli`` installed. With
``gpus_per_worker=K`` each worker gets its own K device ids (by its rank among the
workers on the same host, or ``0..K-1`` of its ``CUDA_VISIBLE_DEVICES`` when that is
set) and every task borrows one of them as ``cuda:<id>``.

Dask pickles the task function by reference: :func:`_dask_task` must stay importable as
``refine_cli.batch.dask._dask_task``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from refine_cli.batch.item import _record, run_item
from refine_cli.batch.model import BatchItem, BatchJob, BatchSummary, Decision, Record, _one_line
from refine_cli.errors import DependencyError, UsageError

log = logging.getLogger(__name__)


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise DependencyError('--scheduler needs Dask distributed: pip install "refine-cli[distributed]"'
                              ) from None
    return distributed


def assign_gpus(addresses: Iterable[str], per_worker: int) -> dict[str, list[int]]:
    """Device ids for each Dask worker: the r-th worker of a host gets ``r*K .. r*K+K-1``.

    Args:
        addresses: worker addresses such as ``tcp://10.0.0.5:40331``.
        per_worker: K, devices per worker.

    Returns:
        ``{address: [device ids]}`` (ranks follow sorted addresses within each host).
    """
    by_host: dict[str, list[str]] = {}
    for addr in addresses:
        host = addr.split("://", 1)[-1].rsplit(":", 1)[0]
        by_host.setdefault(host, []).append(addr)
    out: dict[str, list[int]] = {}
    for addrs in by_host.values():
        for rank, addr in enumerate(sorted(addrs)):
            out[addr] = list(range(rank * per_worker, (rank + 1) * per_worker))
    return out


_GPU_POOLS: dict[str, Any] = {}
_GPU_LOCK = threading.Lock()


def _pin_worker(ids: list[int], dask_worker: Any = None) -> list[int]:
    """Runs on a worker (``client.run``): give it a pool of device ids; returns the pool.

    When ``CUDA_VISIBLE_DEVICES`` is set for the worker (dask-cuda, a job script), its
    visible devices are used as ``0..K-1`` instead of the host-wide ids. A worker without
    CUDA gets no pool (``--device auto`` then runs on its CPU).
    """
    import queue

    try:
        import torch

        count = int(torch.cuda.device_count())
    except ImportError:
        count = 0
    if count == 0:
        log.info("worker %s sees no CUDA device; its tasks run with --device as given", dask_worker.address)
        return []
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        ids = list(range(min(len(ids), count)))
    elif max(ids) >= count:
        log.warning("worker %s: devices %s exceed the %d on its host; sharing them", dask_worker.address, ids,
                    count)
        ids = sorted({i % count for i in ids})
    pool: queue.Queue[int] = queue.Queue()
    for i in ids:
        pool.put(i)
    with _GPU_LOCK:
        _GPU_POOLS[dask_worker.address] = pool
    return ids


def _dask_task(item: BatchItem, job: BatchJob, chash: str, facts: dict[str, Any], owned: bool) -> Record:
    """One input on a Dask worker, on a borrowed device when the worker has a pool."""
    import warnings

    from distributed import get_worker

    warnings.filterwarnings("ignore", module="rasterio")  # as the CLI does: "not georeferenced" is expected

    try:
        address = get_worker().address
    except ValueError:
        address = ""
    with _GPU_LOCK:
        pool = _GPU_POOLS.get(address)
    if pool is None or job.config.device not in ("auto", "cuda"):
        return run_item(item, job, chash, facts=facts, owned=owned)
    gid = pool.get()
    try:
        config = job.config.replace(device=f"cuda:{gid}")
        return run_item(item, job, chash, facts=facts, owned=owned, config=config)
    finally:
        pool.put(gid)


@contextlib.contextmanager
def open_client(scheduler: str, gpus_per_worker: int = 0) -> Iterator[Any]:
    """A Dask client for ``tcp://HOST:PORT`` (any ``scheme://``) or ``local:N``.

    ``local:N`` starts N worker processes here, each with ``max(1, K)`` threads and the
    resource ``GPU=K`` when ``gpus_per_worker=K``.

    Raises:
        DependencyError: Dask distributed is missing.
        UsageError: a malformed spec or an unreachable scheduler.
    """
    distributed = _import_distributed()
    cluster = None
    if scheduler.startswith("local:"):
        try:
            n = int(scheduler.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise UsageError(f"--scheduler {scheduler!r}: give local:N with N >= 1 workers")
        cluster = distributed.LocalCluster(
            n_workers=n, threads_per_worker=max(1, gpus_per_worker), processes=True, dashboard_address=None,
            resources={"GPU": gpus_per_worker} if gpus_per_worker else None, silence_logs=logging.CRITICAL)
        client = distributed.Client(cluster)
    elif "://" in scheduler:
        try:
            client = distributed.Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise UsageError(f"--scheduler {scheduler}: cannot reach the Dask scheduler ({exc}); check the "
                             "address and that `dask scheduler` runs") from None
    else:
        raise UsageError(f"--scheduler {scheduler!r}: use tcp://HOST:PORT or local:N")
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _run_dask(pending: Sequence[tuple[BatchItem, Decision]], job: BatchJob, chash: str,
              emit: Callable[[Record, bool, bool], None], summary: BatchSummary, scheduler: str) -> None:
    distributed = _import_distributed()
    if not pending:
        return
    with open_client(scheduler, job.gpus_per_worker) as client:
        workers = client.scheduler_info().get("workers", {})
        resources = None
        if job.gpus_per_worker:
            for addr, ids in assign_gpus(workers, job.gpus_per_worker).items():
                got = client.run(_pin_worker, ids, workers=[addr])
                log.info("worker %s: devices %s", addr, got.get(addr))
            if workers and all("GPU" in (w.get("resources") or {}) for w in workers.values()):
                resources = {"GPU": 1}
        futures = {}
        for item, dec in pending:
            task_key = f"refine-{hashlib.sha256(item.key.encode()).hexdigest()[:16]}-{time.time_ns()}"
            fut = client.submit(_dask_task, item, job, chash, dec.facts, dec.owned, key=task_key, pure=False,
                                resources=resources)
            futures[fut] = item
        recorded: set[Any] = set()
        try:
            for fut in distributed.as_completed(list(futures)):
                item = futures[fut]
                try:
                    rec = fut.result()
                except Exception as exc:  # noqa: BLE001 - a worker died or the task could not run
                    rec = _record(item, job, chash, "failed", error=f"Dask task failed: {_one_line(exc)}",
                                  error_type=type(exc).__name__)
                emit(rec, False, True)
                recorded.add(fut)
                if job.fail_fast and rec["status"] == "failed":
                    summary.stopped = True
                    break
        except KeyboardInterrupt:
            client.cancel([f for f in futures if not f.done()])
            for fut in futures:  # keep the work that finished meanwhile
                if fut not in recorded and fut.status == "finished":
                    with contextlib.suppress(Exception):
                        emit(fut.result(timeout=5), False, True)
            raise
        finally:
            client.cancel([f for f in futures if not f.done()])
