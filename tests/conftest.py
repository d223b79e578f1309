"""Shared fixtures: the ../shared folder, synthetic rasters, a CLI runner, an isolated weights cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _share_the_cores() -> None:
    """Under pytest-xdist, give each worker its share of the cores for compute threads.

    N workers whose torch, OpenCV, ONNX Runtime and OpenVINO pools each take every core oversubscribe
    them: with 2 workers on 2 cores, an official CascadePSP forward pass took twice the CPU time and
    2.4-3.5 times the wall time of one thread per worker (spinning OpenMP threads). Set before torch is
    imported, and inherited by the ``refine`` subprocesses (``$REFINE_THREADS`` is ``refine run``'s
    default ``--threads``). Values the caller set are kept.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        share = str(max(1, len(os.sched_getaffinity(0)) // workers))
        for name in ("REFINE_THREADS", "OMP_NUM_THREADS", "OPENCV_FOR_THREADS_NUM"):
            os.environ.setdefault(name, share)


_share_the_cores()


@pytest.fixture
def shared() -> Path:
    """The read-only ../shared folder beside the checkout (skips when absent)."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not found: the shared reference data sits beside the checkout in CI")
    return SHARED


def session_folder(tmp_path_factory, name: str, make) -> Path:
    """A folder made once per test session by ``make(folder)``, shared by the pytest-xdist workers.

    The first worker to ask makes it while holding a lock; the others wait for it and reuse it (a 20k x
    20k TIFF is written once, not once per worker).
    """
    import fcntl

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".made").exists():
            folder.mkdir(exist_ok=True)
            make(folder)
            (folder / ".made").touch()
    return folder


@pytest.fixture(scope="session")
def _graphs(tmp_path_factory) -> Path:
    """One folder of exported ONNX graphs for the whole session, shared by the pytest-xdist workers (an
    export takes seconds to a minute; graphs are named by a hash of the weights, so tests cannot see each
    other's by mistake, and written atomically, so two workers exporting the same graph do not collide)."""
    return session_folder(tmp_path_factory, "refine-graphs", lambda folder: None)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch, _graphs):
    """Point the weights cache and temp caches at a fresh folder for every test (sharing the graphs)."""
    home = tmp_path_factory.mktemp("refine-home")
    (home / "graphs").symlink_to(_graphs, target_is_directory=True)
    monkeypatch.setenv("REFINE_HOME", str(home))
    yield


@pytest.fixture
def cli(capfd):
    """Run ``refine ARGS`` in-process; returns ``(exit_code, stdout, stderr)``."""
    from refine_cli.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capfd.readouterr()
        return code, out, err

    return run


def write_png(path: Path, array: np.ndarray) -> Path:
    """Write an RGB (or grey) uint8/uint16 array as PNG."""
    import cv2

    arr = array[..., ::-1] if array.ndim == 3 and array.shape[2] == 3 else array
    assert cv2.imwrite(str(path), np.ascontiguousarray(arr))
    return path


def python_exe() -> str:
    return sys.executable


def popen_interruptible(args: list[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` of a child that turns SIGINT into ``KeyboardInterrupt``, as in a terminal.

    A shell's background job (``cmd &``, some CI runners) inherits SIGINT as ignored, and Python then
    installs no handler: a test's SIGINT would be lost and the child would run to the end. The child
    gets the default disposition back before it starts.
    """
    return subprocess.Popen(args, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def one_line_error(err: str) -> str:
    """The single ``error:`` line of a failed command's stderr (asserting there is nothing else)."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    return lines[0]
