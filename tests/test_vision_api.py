"""Images on the card's vision-language runners (issue 18, section 2), end to end: the real
daemon, model folders served by the emulator's `vl_internvl` / `vl_qwen` dialects, the apps'
own clients. The emulator's reply names every image it read as `[image N: WxH FORMAT
sha256:<12 hex>]`, computed from the file the daemon wrote: the tests compute the same from
the bytes they sent, so a reply proves the right picture arrived intact."""
from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
from typing import Any

import ollama
import pytest

from ax_emulator.images import png_bytes
from ax_emulator.scripted import reply_text
from harness.daemon import running_daemon
from harness.models import scripted_model, scripted_vision_model
from test_structured_output import REVIEW, ReviewMetadata, directive, frigate_review_format, review_prompt

WORDS = 4


def jpeg_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A JPEG-shaped file (SOI, JFIF, a baseline frame header of `width`×`height`, a scan, EOI)
    whose bytes depend on `seed`: what the emulator's reader and the daemon's checks take."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    sos = b"\xff\xda" + struct.pack(">HB", 12, 3) + b"\x01\x00\x02\x11\x03\x11\x00\x3f\x00"
    scan = bytes((seed * 31 + i * 7) % 255 for i in range(64))  # no 0xff: no marker inside
    return b"\xff\xd8" + app0 + sof0 + sos + scan + b"\xff\xd9"


def tag(index: int, data: bytes, width: int, height: int, kind: str) -> str:
    return f"[image {index}: {width}x{height} {kind} sha256:{hashlib.sha256(data).hexdigest()[:12]}]"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    entries = [
        scripted_vision_model(root, "internvl", family="internvl", reply_words=WORDS),
        scripted_vision_model(root, "qwen-vl", family="qwen", reply_words=WORDS),
        scripted_model(root, "text", reply_words=WORDS),
    ]
    with running_daemon(root, entries) as d:
        yield d


def image_files(daemon) -> list[str]:
    """What the daemon's image folder holds now."""
    folder = daemon.root / "data" / "images"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def post(daemon, path: str, body: dict[str, Any]) -> Any:
    with daemon.client(timeout=120) as http:
        return http.post(path, json=body)


def test_generate_with_one_image_reaches_the_runner(daemon):
    picture = jpeg_bytes(640, 480, seed=1)
    client = ollama.Client(host=daemon.url, timeout=120)
    result = client.generate("internvl", "What is in this picture?", images=[b64(picture)])
    expected = tag(1, picture, 640, 480, "JPEG") + " " + reply_text("What is in this picture?", WORDS, think=False)
    assert result.response == expected
    assert image_files(daemon) == []  # the file the runner read is gone with the answer
