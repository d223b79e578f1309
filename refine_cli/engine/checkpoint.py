"""Resumable runs: the hidden parts folder beside an output.

A TIFF output taller than one segment is written as row segments
(``io.writers.SegmentedSink``) into ``.<name>.refine-parts/`` next to it, together
with the finished intermediate pyramid levels and a ``state.json`` that
identifies the run (configuration hash, inputs' path, size and mtime, output
shape). A killed run leaves only whole segments and whole levels there.
``refine run --resume`` continues from them when ``state.json`` still matches;
a run without ``--resume`` (or with a changed configuration or input) starts
over and clears the folder. A finished run removes it. A failed write (a full
disk ...) keeps it, and its one-line error says where it is, how much it holds,
and that ``--resume`` continues while a run without it starts over
(``io.writers.resumable_error``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from refine_cli.io.writers import PARTS_SUFFIX, TILE, write_bytes_atomic

log = logging.getLogger(__name__)

STATE_VERSION = 1
SEGMENT_BYTES = 32 * 1024**2
"""Target size of one output segment before compression (bounds the work lost to a kill);
``REFINE_SEGMENT_BYTES`` overrides it."""


def segment_rows_for(width: int, bytes_per_pixel: int) -> int:
    """Rows per segment: about :data:`SEGMENT_BYTES` of samples, a multiple of 512, at least 512."""
    target = int(os.environ.get("REFINE_SEGMENT_BYTES", SEGMENT_BYTES))
    rows = target // max(1, width * bytes_per_pixel)
    return max(TILE, (rows // TILE) * TILE)


def file_identity(path: str) -> dict[str, Any]:
    """Absolute path, size and modification time of an input (``-`` for stdin; a URL or GDAL path: itself)."""
    if path == "-":
        return {"path": "-"}
    if path.startswith("/vsi") or "://" in path:  # GDAL paths and URLs: no cheap size and mtime
        return {"path": path}
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def parts_dir_for(out: str) -> Path:
    """``<dir>/.<name>.refine-parts`` beside the output."""
    p = Path(out)
    return p.parent / f".{p.name}{PARTS_SUFFIX}"


class RunCheckpoint:
    """The parts folder of one output.

    Args:
        out: the final mask path.
        identity: what must match for a resume (see :func:`file_identity`, :func:`config_hash`).
        resume: continue from matching parts instead of starting over.
    """

    def __init__(self, out: str, identity: dict[str, Any], resume: bool) -> None:
        self.dir = parts_dir_for(out)
        self.identity = {"version": STATE_VERSION, **identity}
        self.resumed = False
        state = self.dir / "state.json"
        if self.dir.exists():
            old = None
            try:
                old = json.loads(state.read_text())
            except (OSError, ValueError):
                pass
            if resume and old == self.identity:
                self.resumed = True
                log.info("resuming from the parts of an interrupted run in %s", self.dir)
            else:
                if resume:
                    log.warning("the parts in %s come from another configuration or input; starting over",
                                self.dir)
                else:
                    log.info("discarding the parts of an earlier interrupted run in %s (use --resume to "
                             "continue from them)", self.dir)
                shutil.rmtree(self.dir, ignore_errors=True)
        elif resume:
            log.info("nothing to resume for %s; starting a new run", out)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(str(state), json.dumps(self.identity, indent=1).encode(), overwrite=True)

    def path(self, name: str) -> str:
        """A sub-folder of the parts (created)."""
        p = self.dir / name
        p.mkdir(parents=True, exist_ok=True)
        return str(p)

    def finish(self) -> None:
        """Remove the parts after a successful run."""
        shutil.rmtree(self.dir, ignore_errors=True)
