"""The batch journal: append-only JSON Lines, one fsynced record per input and attempt.

``OUTDIR/refine-journal.jsonl`` (``refine-journal.shard-I-of-N.jsonl`` for a shard) is
append-only JSON Lines, one record per input and attempt, each line written with one
``write`` and fsynced before the next input starts. Record fields (version 1)::

    v            1
    key          the mask output's path relative to OUTDIR (posix); identifies the input
    status       "done" | "failed" | "skipped"
    image, mask  {"path": absolute, "size": bytes, "mtime_ns": int, "sha256": hex | absent}
                 (mask is null when the segmenter made it; sha256 only with --verify-inputs)
    config_hash  sha256 of the configuration and output options (:func:`~refine_cli.batch.config_hash`)
    outputs      {"mask" | "uncertainty" | "report": {"path": relative, "sha256": hex, "bytes": int}}
    timings      {"wall_seconds": float, "stages": {stage: seconds}}
    result       {"method", "device", "shape": [H, W], "tiles": {...}} (done only)
    error        one-line reason (failed/skipped), else null; error_type: exception class
    time         unix seconds when the record was made; finished: the same as ISO 8601 UTC
    host, pid, shard, refine   where and by which version it ran

Before it runs anything, a run appends one *claim line* ``{"v": 1, "claim": [keys], "time",
"finished", "host", "pid", "shard"}`` naming the inputs it is about to run (it has no
``status`` and is not an input record). A line that does not parse (a run killed
mid-write, a disk error) is reported and ignored: the input it described runs again.
:func:`merge_journals` reads every shard's journal and keeps the latest record of each key.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from refine_cli.batch.model import JOURNAL_GLOB, RECORD_VERSION, STATUSES, Record, _now
from refine_cli.errors import UsageError

_KEY_RE = re.compile(rb'"key":\s*("(?:[^"\\]|\\.)*")')


def read_journal(path: str | Path) -> tuple[list[Record], list[str], set[str]]:
    """Parse a journal file; bad lines are reported, never fatal.

    Returns:
        ``(records in file order, problems, claimed keys)``: each problem is one line
        naming the file and line number of a line that was ignored; claimed keys are those
        of claim lines and those still legible in unreadable lines (a batch wrote or was
        about to write their outputs, so a rerun may replace them).
    """
    records: list[Record] = []
    problems: list[str] = []
    claimed: set[str] = set()
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return records, problems, claimed
    except OSError as exc:
        return records, [f"{path}: cannot read the journal ({exc}); its inputs will run again"], claimed
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        last = lineno == len(lines)
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            what = "truncated" if last else "corrupt"
            problems.append(f"{path} line {lineno}: {what} record ignored (its input runs again)")
            m = _KEY_RE.search(raw)
            if m:
                with contextlib.suppress(UnicodeDecodeError, json.JSONDecodeError):
                    claimed.add(json.loads(m.group(1).decode("utf-8")))
            continue
        if isinstance(rec, dict) and isinstance(rec.get("claim"), list):
            claimed.update(k for k in rec["claim"] if isinstance(k, str))
            continue
        if (not isinstance(rec, dict) or not isinstance(rec.get("key"), str)
                or rec.get("status") not in STATUSES or not isinstance(rec.get("time"), int | float)):
            problems.append(f"{path} line {lineno}: not a batch record; ignored")
            continue
        records.append(rec)
    return records, problems, claimed


@dataclass
class JournalState:
    """All journals of an OUTDIR, merged.

    Attributes:
        latest: the latest record of every key.
        problems: lines that were ignored (one message each).
        claimed: keys whose outputs a batch wrote or set out to write (claim lines, and
            keys legible in unreadable lines); such outputs may be replaced.
    """

    latest: dict[str, Record] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    claimed: set[str] = field(default_factory=set)


def merge_journals(outdir: str | Path) -> JournalState:
    """The latest record of every key over all journals in ``outdir`` (all shards included).

    Records are ordered by their ``time``; between equal times a later line in the same
    file wins.
    """
    order_of: dict[str, tuple[float, int, int]] = {}
    state = JournalState()
    for fi, path in enumerate(sorted(Path(outdir).glob(JOURNAL_GLOB))):
        records, bad, claimed = read_journal(path)
        state.problems += bad
        state.claimed |= claimed
        for li, rec in enumerate(records):
            order = (float(rec["time"]), fi, li)
            if rec["key"] not in order_of or order > order_of[rec["key"]]:
                order_of[rec["key"]] = order
                state.latest[rec["key"]] = rec
    return state


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while a journal line is written (main thread only)."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Journal:
    """An append-only JSON Lines journal, one fsynced line per record, locked against a second writer.

    Args:
        path: journal file (created if missing).

    Raises:
        UsageError: another process holds the journal (a second batch into the same OUTDIR and shard).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            self._lock()
            if created:
                from refine_cli.io.writers import fsync_dir

                fsync_dir(self.path.parent)
            self._end_line()
        except BaseException:
            os.close(self._fd)
            raise

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UsageError(f"{self.path} is in use by another refine batch; wait for it or give "
                                 "another OUTDIR or --shard") from None
            raise

    def _end_line(self) -> None:
        """Terminate a line a killed writer left without its newline, so the next record starts clean."""
        size = os.fstat(self._fd).st_size
        if size:
            with open(self.path, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    self._write(b"\n")

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)

    def append(self, record: Record) -> None:
        """Write one record as one line and fsync it (interrupts wait until it is on disk)."""
        data = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
        with _signals_deferred():
            self._write(data)

    def claim(self, keys: Sequence[str], shard: tuple[int, int] | None = None) -> None:
        """Record that this run is about to write the outputs of ``keys`` (a claim line, not an input record).

        A run killed between writing an output and appending its record (SIGKILL, power
        loss, an interrupted Dask run whose tasks still finish) leaves outputs that no
        record names; the claim lets the next run replace them instead of refusing them.
        """
        t, iso = _now()
        self.append({"v": RECORD_VERSION, "claim": list(keys), "time": t, "finished": iso,
                     "host": socket.gethostname(), "pid": os.getpid(),
                     "shard": f"{shard[0]}/{shard[1]}" if shard else None})

    def close(self) -> None:
        """Release the lock and the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
