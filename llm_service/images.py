"""Images in requests: decoded, recognised and checked before any model sees them.

Ollama's `images` (base64 strings) and OpenAI's `image_url` parts (data URLs; an http(s) URL
only where a setting allows fetching, which the API layer does) become `ImageInput`s: the bytes
as the client sent them, their format found by magic bytes (JPEG, PNG, WebP, GIF, BMP), and
their width and height read from the header. No image library: the card's VLM runners read the
file themselves (OpenCV) and resize it to their encoder's fixed size (docs/vlm-runners.md §5), so
the daemon passes the bytes unchanged and only checks what it can without decoding pixels:
the structure of the header and the end of the file (a truncated or corrupted picture is a 400
here rather than an `image prompt(…) not found` from the runner), the size in bytes, the pixel
dimensions, and how many images a request carries.

Pure: no I/O. Every refusal is a BadRequest whose message says which image and what to do.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
import zlib
from dataclasses import dataclass, field

from .engines.base import BadRequest

# Format name -> the file extension a runner's image reader expects.
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}
MIME_TYPES = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/png": "PNG", "image/webp": "WEBP",
              "image/gif": "GIF", "image/bmp": "BMP", "image/x-ms-bmp": "BMP"}
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.ASCII)
_BASE64_CHARS = re.compile(rb"[A-Za-z0-9+/=_-]*")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 5 * 1024 * 1024
    max_side: int = 8192  # pixels, width or height
    max_pixels: int = 40_000_000
    max_count: int = 8  # images in one request, all messages together


@dataclass(frozen=True, eq=False)
class ImageInput:
    """One checked image of a request: its bytes as sent, what they are."""

    data: bytes = field(repr=False)
    format: str  # a key of EXTENSIONS
    width: int
    height: int

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def __eq__(self, other: object) -> bool:  # messages compare by content (conversation keys)
        return isinstance(other, ImageInput) and self.data == other.data

    def __hash__(self) -> int:
        return hash(self.data)

    def describe(self) -> str:
        return f"{self.format} {self.width}x{self.height}, {len(self.data)} bytes"


def limits_of(settings: object) -> ImageLimits:
    """The limits the daemon's settings set (`image_max_*`)."""
    return ImageLimits(
        max_bytes=getattr(settings, "image_max_bytes", ImageLimits.max_bytes),
        max_side=getattr(settings, "image_max_side", ImageLimits.max_side),
        max_pixels=getattr(settings, "image_max_pixels", ImageLimits.max_pixels),
        max_count=getattr(settings, "image_max_count", ImageLimits.max_count),
    )


def require_vision(model: str, accepts_images: bool, count: int, limits: ImageLimits) -> None:
    """A request's images, counted, for a model that reads them; else the clear 400."""
    if not count:
        return
    if not accepts_images:
        raise BadRequest(f'images are not supported by "{model}": the model takes text only (on the card, a '
                         "vision-language model is one whose run script names an image encoder)")
    check_count(count, limits)


def decode_base64_image(value: str, where: str, limits: ImageLimits) -> ImageInput:
    """An Ollama `images` entry: base64 (a data URL is taken too, as Ollama does not, but
    clients that copy OpenAI's form send one)."""
    if not isinstance(value, str):
        raise BadRequest(f"{where}: an image must be a base64 string")
    if value.startswith("data:"):
        return decode_data_url(value, where, limits)
    return check_image(_b64decode(value, where, limits), where, limits)


def decode_data_url(url: str, where: str, limits: ImageLimits) -> ImageInput:
    """A `data:image/...;base64,...` URL. Its media type must agree with the bytes' format."""
    match = _DATA_URL.match(url)
    if match is None:
        raise BadRequest(f"{where}: not a data URL (expected data:image/<type>;base64,<data>)")
    if not match.group("b64"):
        raise BadRequest(f"{where}: the data URL must be base64-encoded (data:image/<type>;base64,...)")
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise BadRequest(f"{where}: unsupported media type {mime!r}: send an image "
                         f"({', '.join(sorted(set(EXTENSIONS)))})")
    image = check_image(_b64decode(url[match.end():], where, limits), where, limits)
    declared = MIME_TYPES.get(mime)
    if mime and declared is None:
        raise BadRequest(f"{where}: unsupported image type {mime!r}: send JPEG, PNG, WebP, GIF or BMP")
    if declared is not None and declared != image.format:
        raise BadRequest(f"{where}: the data URL says {mime} but the bytes are {image.format}")
    return image


def _b64decode(text: str, where: str, limits: ImageLimits) -> bytes:
    raw = "".join(text.split()).encode("ascii", errors="replace")
    if len(raw) * 3 // 4 > limits.max_bytes + 3:
        raise BadRequest(f"{where}: the image is larger than {limits.max_bytes} bytes, the most this "
                         "server takes (setting image_max_bytes)")
    if not _BASE64_CHARS.fullmatch(raw):
        raise BadRequest(f"{where}: the image is not valid base64")
    try:
        if b"-" in raw or b"_" in raw:
            return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
        return base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"{where}: the image is not valid base64 ({exc})") from None


def sniff_format(data: bytes) -> str | None:
    """The image format by its magic bytes, None when none of the supported ones."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    return None


def check_image(data: bytes, where: str, limits: ImageLimits) -> ImageInput:
    """The bytes of one image, recognised and within the limits, or a BadRequest."""
    if not data:
        raise BadRequest(f"{where}: the image is empty")
    if len(data) > limits.max_bytes:
        raise BadRequest(f"{where}: the image has {len(data)} bytes, larger than the {limits.max_bytes} bytes this "
                         "server takes (setting image_max_bytes): send a smaller or more compressed picture")
    kind = sniff_format(data)
    if kind is None:
        raise BadRequest(f"{where}: unsupported or unrecognised image type (first bytes {data[:8].hex()}): "
                         "send JPEG, PNG, WebP, GIF or BMP")
    try:
        width, height = _READERS[kind](data)
    except (struct.error, IndexError, ValueError, zlib.error) as exc:
        raise BadRequest(f"{where}: the {kind} image is corrupt or truncated ({exc})") from None
    if width <= 0 or height <= 0:
        raise BadRequest(f"{where}: the {kind} image is corrupt: it says it is {width}x{height} pixels")
    if width > limits.max_side or height > limits.max_side or width * height > limits.max_pixels:
        raise BadRequest(
            f"{where}: the image is {width}x{height} pixels, more than this server takes (at most "
            f"{limits.max_side} a side and {limits.max_pixels} pixels; settings image_max_side, image_max_pixels): "
            "the model sees it resized to its encoder's size anyway (448x448 on the card), so send it smaller")
    return ImageInput(data, kind, width, height)


def check_count(count: int, limits: ImageLimits) -> None:
    if count > limits.max_count:
        raise BadRequest(f"{count} images in one request, more than the {limits.max_count} this server takes "
                         "(setting image_max_count)")


def _jpeg(data: bytes) -> tuple[int, int]:
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise ValueError("no end-of-image marker")
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            raise ValueError(f"segment marker expected at byte {at}")
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        length = struct.unpack(">H", data[at + 2:at + 4])[0]
        if marker in _JPEG_FRAMES:
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return width, height
        if marker == 0xDA:
            break
        at += 2 + length
    raise ValueError("no frame header")


def _png(data: bytes) -> tuple[int, int]:
    at, size, idat, ended = 8, None, [], False
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body, crc = data[at + 8:at + 8 + length], data[at + 8 + length:at + 12 + length]
        if len(body) != length or len(crc) != 4:
            raise ValueError(f"chunk {kind!r} truncated")
        if zlib.crc32(kind + body) != struct.unpack(">I", crc)[0]:
            raise ValueError(f"chunk {kind!r} has a wrong CRC")
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            ended = True
            break
        at += 12 + length
    if size is None or not idat or not ended:
        raise ValueError("no IHDR, IDAT or IEND chunk")
    decompressor = zlib.decompressobj()
    for body in idat:  # the stream must inflate (bounded: the output is not kept)
        decompressor.decompress(body, 1 << 16)
        while decompressor.unconsumed_tail:
            decompressor.decompress(decompressor.unconsumed_tail, 1 << 16)
    return size[0], size[1]


def _webp(data: bytes) -> tuple[int, int]:
    declared = struct.unpack("<I", data[4:8])[0] + 8
    if declared > len(data):
        raise ValueError("truncated")
    chunk = data[12:16]
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise ValueError("no VP8 key frame")
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            raise ValueError("no VP8L signature")
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    raise ValueError(f"unknown WebP chunk {chunk!r}")


def _gif(data: bytes) -> tuple[int, int]:
    if not data.endswith(b"\x3b"):
        raise ValueError("no trailer")
    return struct.unpack("<HH", data[6:10])


def _bmp(data: bytes) -> tuple[int, int]:
    if struct.unpack("<I", data[2:6])[0] > len(data):
        raise ValueError("truncated")
    width, height = struct.unpack("<ii", data[18:26])
    return width, abs(height)


_READERS = {"JPEG": _jpeg, "PNG": _png, "WEBP": _webp, "GIF": _gif, "BMP": _bmp}
