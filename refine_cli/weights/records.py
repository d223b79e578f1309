"""What the project knows about a checkpoint: its record and its input contract (plain data, no IO)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Normalization:
    """The input contract of a checkpoint.

    Attributes:
        mean: per-channel RGB mean in [0, 1] units (image ``/ 255`` first).
        std: per-channel RGB standard deviation.
        mask: how the coarse mask enters the network.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mask: str


IMAGENET = Normalization(
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    mask="binarised (u8 > 127, i.e. p >= 0.5) and mapped to {-1, +1}",
)


@dataclass(frozen=True)
class WeightsRecord:
    """One checkpoint the project can fetch, verify and load.

    Attributes:
        name: registry key (CLI argument), e.g. ``cascadepsp``.
        architecture: builder that makes the matching module (e.g. ``cascadepsp_official``
            in ``refine_cli.models.cascadepsp``).
        url: pinned download URL, or ``None`` for files that are only imported.
        filename: file name in the cache.
        size: exact size in bytes, ``None`` when unknown.
        approx_size: approximate size in bytes (display, progress).
        md5: full md5 hex digest, ``None`` when unknown.
        sha256: full sha256 hex digest, ``None`` when unknown (then recorded in the sidecar).
        license: licence of the code and of the weights, as known.
        normalization: input contract.
        notes: provenance and caveats.
        strip_prefixes: key prefixes stripped by name when loading.
        bundled: file name in the shipped weights folder (:func:`bundled_dir`: the repository's
            ``weights/``, installed as package data) for checkpoints the project trains and ships
            itself (used when the cache has no copy).
        trust_on_first_use: no checksum was ever published for this file (md5 and sha256 are
            ``None`` on purpose): the first fetch or import records its sha256 in the cache
            sidecar, with a warning; later uses check the size against it and
            ``refine weights verify`` the full hash.
    """

    name: str
    architecture: str
    url: str | None
    filename: str
    size: int | None
    approx_size: int
    md5: str | None
    sha256: str | None
    license: str
    normalization: Normalization
    notes: str = ""
    strip_prefixes: tuple[str, ...] = ("module.",)
    bundled: str | None = None
    trust_on_first_use: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view."""
        return dataclasses.asdict(self)
