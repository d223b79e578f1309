"""Identify an image file by its first bytes and read its declared size without decoding it.

The declared size is checked against the decompression-bomb limit before
anything is allocated.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@dataclass(frozen=True)
class Sniffed:
    """What the header says.

    Attributes:
        kind: ``tiff`` | ``png`` | ``jpeg`` | ``webp`` | ``bmp`` | ``other``.
        size: declared ``(height, width)`` if the header gives it, else ``None``.
    """

    kind: str
    size: tuple[int, int] | None = None


def sniff(head: bytes) -> Sniffed:
    """Classify a file from its first bytes (at least 64 KiB for JPEG sizes).

    Args:
        head: the first bytes of the file.

    Returns:
        The kind and, for PNG/JPEG/WebP/BMP, the declared size.
    """
    if head[:4] in TIFF_MAGICS:
        return Sniffed("tiff")
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        size = None
        if len(head) >= 24 and head[12:16] == b"IHDR":
            w, h = struct.unpack(">II", head[16:24])
            size = (h, w)
        return Sniffed("png", size)
    if head[:3] == b"\xff\xd8\xff":
        return Sniffed("jpeg", _jpeg_size(head))
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return Sniffed("webp", _webp_size(head))
    if head[:2] == b"BM" and len(head) >= 26:
        w, h = struct.unpack("<ii", head[18:26])
        return Sniffed("bmp", (abs(h), abs(w)))
    return Sniffed("other")


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    """Walk JPEG markers up to the first SOFn and read its height and width."""
    i = 2
    n = len(head)
    while i + 4 <= n:
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", head[i + 2 : i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", head[i + 5 : i + 9])
            return (h, w)
        i += 2 + length
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    """Read the canvas size of a WebP file (VP8, VP8L or VP8X)."""
    chunk = head[12:16]
    if chunk == b"VP8X" and len(head) >= 30:
        w = 1 + int.from_bytes(head[24:27], "little")
        h = 1 + int.from_bytes(head[27:30], "little")
        return (h, w)
    if chunk == b"VP8 " and len(head) >= 30:
        w, h = struct.unpack("<HH", head[26:30])
        return (h & 0x3FFF, w & 0x3FFF)
    if chunk == b"VP8L" and len(head) >= 25:
        b = head[21:25]
        w = 1 + (((b[1] & 0x3F) << 8) | b[0])
        h = 1 + (((b[3] & 0x0F) << 10) | (b[2] << 2) | ((b[1] & 0xC0) >> 6))
        return (h, w)
    return None
