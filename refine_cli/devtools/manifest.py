"""State-dict manifests of the reference folders: ``name<TAB>shape<TAB>dtype`` per line."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class ManifestEntry(NamedTuple):
    """One ``state_dict`` entry: name, shape (``()`` for 0-d) and dtype name (``float32``/``int64``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """Read a ``name<TAB>shape<TAB>dtype`` manifest (shape comma-separated, empty for 0-d; no header).

    Args:
        path: the TSV file, e.g. the CascadePSP ``state_dict_manifest.tsv`` (one line per
            state_dict entry of the official module).

    Returns:
        Entries in file (= state_dict) order.
    """
    entries = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        name, shape, dtype = line.split("\t")
        entries.append(ManifestEntry(name, tuple(int(s) for s in shape.split(",") if s), dtype))
    return entries
