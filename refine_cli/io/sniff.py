"""Identify an image file by its first bytes and read its declared size without decoding it.

The declared size is checked against the decompression-bomb limit before
anything is allocated. JPEG, PNG and WebP files may carry an EXIF orientation
(a phone photo stored sideways); the size given is the size viewers show.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import BinaryIO

TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


@dataclass(frozen=True)
class Sniffed:
    """What the header says.

    Attributes:
        kind: ``tiff`` | ``png`` | ``jpeg`` | ``webp`` | ``bmp`` | ``other``.
        size: declared ``(height, width)`` as shown (after the EXIF orientation) if the header
            gives it, else ``None``.
        orientation: EXIF orientation 1-8 found in the bytes given (1: none, or not in them).
    """

    kind: str
    size: tuple[int, int] | None = None
    orientation: int = 1


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
        return _oriented("png", size, head)
    if head[:3] == b"\xff\xd8\xff":
        return _oriented("jpeg", _jpeg_size(head), head)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _oriented("webp", _webp_size(head), head)
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


def _oriented(kind: str, size: tuple[int, int] | None, head: bytes) -> Sniffed:
    orientation = exif_orientation(kind, io.BytesIO(head))
    if size is not None and orientation >= 5:  # 5-8 swap rows and columns
        size = (size[1], size[0])
    return Sniffed(kind, size, orientation)


def exif_orientation(kind: str, fh: BinaryIO) -> int:
    """The EXIF Orientation (1-8) of a JPEG, PNG or WebP file open at ``fh`` (1 when absent or invalid).

    Only the container is walked (JPEG markers up to the image data, PNG chunks up to the first
    IDAT, WebP RIFF chunks by their sizes); the TIFF-structured EXIF block is parsed by
    :func:`_exif_tiff_orientation`.
    """
    try:
        block = _exif_block(kind, fh)
    except (OSError, struct.error, ValueError):
        return 1
    return _exif_tiff_orientation(block) if block else 1


def _exif_block(kind: str, fh: BinaryIO) -> bytes | None:
    fh.seek(0)
    if kind == "jpeg":
        if fh.read(2) != b"\xff\xd8":
            return None
        while True:
            marker = fh.read(2)
            if len(marker) < 2 or marker[0] != 0xFF:
                return None
            while marker[1] == 0xFF:  # fill bytes
                marker = marker[1:] + fh.read(1)
            code = marker[1]
            if code in (0xD9, 0xDA) or 0xC0 <= code <= 0xCF and code not in (0xC4, 0xC8, 0xCC):
                return None  # image data reached: EXIF comes before it
            if code == 0x01 or 0xD0 <= code <= 0xD7:
                continue
            (length,) = struct.unpack(">H", fh.read(2))
            body = fh.read(length - 2)
            if code == 0xE1 and body.startswith(b"Exif\x00\x00"):
                return body[6:]
    if kind == "png":
        fh.seek(8)
        while True:
            head = fh.read(8)
            if len(head) < 8:
                return None
            (n,) = struct.unpack(">I", head[:4])
            ctype = head[4:]
            if ctype == b"eXIf":
                return fh.read(n)
            if ctype in (b"IDAT", b"IEND"):
                return None
            fh.seek(n + 4, 1)
    if kind == "webp":
        fh.seek(12)
        while True:
            head = fh.read(8)
            if len(head) < 8:
                return None
            ctype = head[:4]
            (n,) = struct.unpack("<I", head[4:])
            if ctype == b"EXIF":
                body = fh.read(n)
                return body[6:] if body.startswith(b"Exif\x00\x00") else body
            fh.seek(n + (n & 1), 1)
    return None


def _exif_tiff_orientation(block: bytes) -> int:
    """Tag 0x0112 of IFD0 of a TIFF-structured EXIF block (1 when absent or invalid)."""
    if block[:4] not in (b"II*\x00", b"MM\x00*"):
        return 1
    order = "<" if block[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", block[4:8])
    if ifd + 2 > len(block):
        return 1
    (n,) = struct.unpack(order + "H", block[ifd : ifd + 2])
    for i in range(n):
        entry = block[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
        if len(entry) < 12:
            return 1
        tag, typ, count = struct.unpack(order + "HHI", entry[:8])
        if tag == 0x0112 and count >= 1 and typ in (3, 4):
            (value,) = struct.unpack(order + ("H" if typ == 3 else "I"), entry[8 : 10 if typ == 3 else 12])
            return int(value) if 1 <= value <= 8 else 1
    return 1
