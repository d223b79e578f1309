"""Content hashes: of files (sha256, md5) and of configurations (sha256 of canonical JSON).

One place for them, so that a checkpoint's sidecar, the batch journal, the resume
checkpoint and the weights registry agree on what a hash means.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK = 4 << 20
"""Bytes read at a time when hashing a file (4 MiB)."""


@dataclass(frozen=True)
class Digests:
    """Size in bytes, md5 and sha256 (lowercase hex) of a file."""

    size: int
    md5: str
    sha256: str


def _blocks(path: str | Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            yield block


def sha256_file(path: str | Path) -> str:
    """sha256 (lowercase hex) of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    for block in _blocks(path):
        h.update(block)
    return h.hexdigest()


def file_digests(path: str | Path) -> Digests:
    """Size, md5 and sha256 of a file, in one pass."""
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    size = 0
    for block in _blocks(path):
        md5.update(block)
        sha.update(block)
        size += len(block)
    return Digests(size, md5.hexdigest(), sha.hexdigest())


def json_sha256(payload: Any) -> str:
    """sha256 (hex) of ``payload`` as canonical JSON: sorted keys, no spaces, ``str()`` for other types."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _no_encoding(value: Any) -> bool:
    """Whether an ``encoding`` entry of a configuration gives no option (empty or ``None`` values)."""
    return isinstance(value, Mapping) and all(v is None or v == () or v == [] for v in value.values())


def config_hash(config: Mapping[str, Any], **extra: Any) -> str:
    """sha256 (hex) of a run configuration (``RefineConfig.to_dict()``) and ``extra`` facts.

    The thread count is left out: it changes speed, not results. So is an ``encoding`` entry that
    holds no option (``--co``, ``--nodata``, ``--dtype`` not given): the hashes of such runs stay
    those of runs made before these options existed. The hash is :func:`json_sha256` of
    ``{"config": config, **extra}``.
    """
    cfg = {k: v for k, v in config.items() if k != "threads" and not (k == "encoding" and _no_encoding(v))}
    return json_sha256({"config": cfg, **extra})
