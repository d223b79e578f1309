"""Fault injection for tests and benchmarks of distributed runs (``refine run --scheduler``).

:class:`KillOnce` is a Dask worker plugin: the first time any worker starts a task whose key
begins with ``prefix`` (a band of ``refine_cli.cluster``: ``refine-band-``), that worker kills its
own process (SIGKILL) ``delay`` seconds later, mid-task. A flag file makes it happen once across
all workers and restarts. The scheduler then reruns the task elsewhere.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin


class KillOnce(WorkerPlugin):
    """Kill the worker that first runs a matching task (once; see the module docstring).

    Args:
        flag: a file path that records that the kill happened (holds the killed pid).
        prefix: task key prefix that triggers it.
        delay: seconds into the task before the kill.
    """

    name = "refine-kill-once"

    def __init__(self, flag: str, prefix: str = "refine-band-", delay: float = 0.3) -> None:
        self.flag, self.prefix, self.delay = flag, prefix, delay

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        """On a matching task starting to execute, schedule this process's SIGKILL (first time only)."""
        name = key if isinstance(key, str) else str(key)
        if finish != "executing" or not name.startswith(self.prefix):
            return
        try:
            fd = os.open(self.flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        threading.Timer(self.delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
