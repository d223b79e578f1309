"""The review's records: what it shows for each image, and for the whole review."""

from __future__ import annotations

from dataclasses import dataclass, field

from refine_cli.review.scan import Scan
from refine_cli.review.sources import RunEntry


@dataclass
class ImageReview:
    """What the review shows for one image.

    Attributes:
        entry: the run's files, report and journal record.
        anchor: the HTML id of its section (``img-1`` ...).
        shape: ``(H, W)`` of the image, or ``None`` when it was not read.
        scan: the regions and the image's changed share and mean uncertainty, or ``None``.
        regions_png: one PNG per region (:func:`~refine_cli.review.pictures.region_picture`), best first.
        tile_map_png: the tile map as PNG, or ``None``.
        notes: one-line remarks (missing files, problems).
    """

    entry: RunEntry
    anchor: str
    shape: tuple[int, int] | None = None
    scan: Scan | None = None
    regions_png: list[bytes] = field(default_factory=list)
    tile_map_png: bytes | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Review:
    """A whole review: its sources, whether one is a batch, and one :class:`ImageReview` per image."""

    sources: list[str]
    batch: bool
    images: list[ImageReview]
    top: int
    crop: int
