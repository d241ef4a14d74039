"""What the emulated VLM runner learns from an image file, without an image library.

The real runner reads the path it was given with OpenCV (`cv::imread`) and gets an empty
picture for a missing, unreadable or undecodable file. The emulator checks the file's structure
instead of decoding pixels: PNG (signature, IHDR, every chunk's CRC, the IDAT stream inflates,
IEND), JPEG (SOI, a frame header, EOI), BMP and GIF headers. Enough to tell a good picture
from a truncated or corrupted one, and to name its size and bytes in the scripted reply.
"""
from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
JPEG_FRAME_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class ImageUnreadable(Exception):
    """Where imread would return an empty picture."""


@dataclass(frozen=True)
class ImageFacts:
    path: str
    width: int
    height: int
    format: str
    sha256: str  # of the file's bytes

    def describe(self, index: int) -> str:
        return f"[image {index}: {self.width}x{self.height} {self.format} sha256:{self.sha256[:12]}]"


def probe(path: str | Path) -> ImageFacts:
    """The facts of one image file, or ImageUnreadable."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:  # missing, a directory, no permission
        raise ImageUnreadable(str(exc)) from exc
    for reader in (_png, _jpeg, _bmp, _gif):
        size = reader(data)
        if size is not None:
            width, height, name = size
            if width <= 0 or height <= 0:
                raise ImageUnreadable(f"{path}: empty picture")
            return ImageFacts(str(path), width, height, name, hashlib.sha256(data).hexdigest())
    raise ImageUnreadable(f"{path}: not a readable image")


def read_images(path: str, directories: bool) -> list[ImageFacts]:
    """What `ReadImages` gives the runner: one picture for a file; with `directories`, every
    image file of a directory in name order (video frames). [] where OpenCV gets nothing."""
    target = Path(path)
    if directories and target.is_dir():
        frames = sorted(p for p in target.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        try:
            return [probe(frame) for frame in frames]
        except ImageUnreadable:
            return []
    try:
        return [probe(target)]
    except ImageUnreadable:
        return []


def _png(data: bytes) -> tuple[int, int, str] | None:
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    at, size, idat, ended = 8, None, bytearray(), False
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        crc = data[at + 8 + length:at + 12 + length]
        if len(body) != length or len(crc) != 4 or zlib.crc32(kind + body) != struct.unpack(">I", crc)[0]:
            raise ImageUnreadable("PNG chunk truncated or its CRC is wrong")
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            ended = True
            break
        at += 12 + length
    if size is None or not idat or not ended:
        raise ImageUnreadable("PNG without IHDR, IDAT or IEND")
    try:
        zlib.decompress(bytes(idat))
    except zlib.error as exc:
        raise ImageUnreadable(f"PNG pixel data: {exc}") from exc
    return size[0], size[1], "PNG"


def _jpeg(data: bytes) -> tuple[int, int, str] | None:
    if not data.startswith(b"\xff\xd8"):
        return None
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise ImageUnreadable("JPEG without its end marker (truncated)")
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            raise ImageUnreadable("JPEG segment marker expected")
        marker = data[at + 1]
        length = struct.unpack(">H", data[at + 2:at + 4])[0]
        if marker in JPEG_FRAME_MARKERS:
            if at + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return width, height, "JPEG"
        if marker == 0xDA:  # scan data before any frame header
            break
        at += 2 + length
    raise ImageUnreadable("JPEG without a frame header")


def _bmp(data: bytes) -> tuple[int, int, str] | None:
    if not data.startswith(b"BM") or len(data) < 26:
        return None
    declared = struct.unpack("<I", data[2:6])[0]
    if declared > len(data):
        raise ImageUnreadable("BMP truncated")
    width, height = struct.unpack("<ii", data[18:26])
    return width, abs(height), "BMP"


def _gif(data: bytes) -> tuple[int, int, str] | None:
    if data[:6] not in (b"GIF87a", b"GIF89a") or len(data) < 10:
        return None
    if not data.endswith(b"\x3b"):
        raise ImageUnreadable("GIF without its trailer (truncated)")
    width, height = struct.unpack("<HH", data[6:10])
    return width, height, "GIF"


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A valid RGB PNG of `width`×`height` whose pixels depend on `seed` (for tests)."""
    rows = b"".join(b"\x00" + bytes((x * 7 + y * 13 + seed) % 256 for x in range(width * 3))
                    for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
