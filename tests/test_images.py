"""The daemon's image checks (llm_service/images.py) and the runner output parser's part of a
vision turn (the `image >> ` marker, a Qwen-VL runner's frame list): pure functions, no daemon."""
from __future__ import annotations

import base64
import struct

import pytest

from ax_emulator.images import png_bytes
from llm_service.api.ollama.show import capabilities
from llm_service.engines.base import BadRequest, ChatMessage, GenerationRequest
from llm_service.engines.card.dialects import DIALECTS
from llm_service.engines.card.planner import Runner, images_for_turn, read_turn
from llm_service.engines.card.output import FrameLine, ImageMarker, LogLine, RunnerOutputParser, Text, TurnEnd
from llm_service.images import ImageLimits, check_image, decode_base64_image, decode_data_url, sniff_format
from test_vision_api import jpeg_bytes, webp_bytes

LIMITS = ImageLimits(max_bytes=100_000, max_side=4096, max_pixels=4096 * 2048, max_count=3)


def gif_bytes(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b"\x2c" + b"\x00" * 9 + b"\x3b"


def bmp_bytes(width: int, height: int) -> bytes:
    pixels = b"\x00" * (((width * 3 + 3) // 4) * 4 * height)
    header = b"BM" + struct.pack("<IHHI", 54 + len(pixels), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, -height, 1, 24, 0, len(pixels), 0, 0, 0, 0)
    return header + info + pixels


@pytest.mark.parametrize(("data", "kind", "size"), [
    (png_bytes(7, 5), "PNG", (7, 5)),
    (jpeg_bytes(640, 480), "JPEG", (640, 480)),
    (webp_bytes(300, 200), "WEBP", (300, 200)),
    (gif_bytes(31, 17), "GIF", (31, 17)),
    (bmp_bytes(3, 2), "BMP", (3, 2)),
])
def test_each_format_is_recognised_with_its_size(data, kind, size):
    image = check_image(data, "images[0]", LIMITS)
    assert (image.format, (image.width, image.height), image.data) == (kind, size, data)
    assert sniff_format(data) == kind
    assert decode_base64_image(base64.b64encode(data).decode(), "images[0]", LIMITS).data == data


@pytest.mark.parametrize(("data", "message"), [
    (png_bytes(7, 5)[:-12], "corrupt or truncated"),  # IEND cut
    (png_bytes(7, 5)[:40] + b"\x00" + png_bytes(7, 5)[41:], "corrupt or truncated"),  # a flipped byte: CRC
    (jpeg_bytes(64, 64)[:-2], "corrupt or truncated"),  # no end-of-image marker
    (jpeg_bytes(0, 64), "0x64 pixels"),
    (gif_bytes(10, 10)[:-1], "corrupt or truncated"),
    (webp_bytes(10, 10)[:-4], "corrupt or truncated"),
    (b"II*\x00" + b"\x00" * 40, "unsupported or unrecognised image type"),  # TIFF
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "unsupported or unrecognised image type"),
    (b"", "the image is empty"),
    (png_bytes(10, 10) + b"\x00" * 100_000, "larger than the 100000 bytes"),
    (jpeg_bytes(5000, 10), "5000x10 pixels"),
    (jpeg_bytes(4096, 4096), "4096x4096 pixels"),  # each side within, the pixels not
])
def test_bad_images_are_refused_with_the_reason(data, message):
    with pytest.raises(BadRequest) as caught:
        check_image(data, "images[0]", LIMITS)
    assert message in caught.value.message and caught.value.message.startswith("images[0]: ")


def test_data_urls():
    data = png_bytes(4, 4)
    encoded = base64.b64encode(data).decode()
    assert decode_data_url(f"data:image/png;base64,{encoded}", "u", LIMITS).data == data
    assert decode_data_url(f"data:;base64,{encoded}", "u", LIMITS).format == "PNG"  # no type: the bytes say
    # base64url without padding, as some clients write it
    urlsafe = base64.urlsafe_b64encode(data).decode().rstrip("=")
    assert decode_data_url(f"data:image/png;base64,{urlsafe}", "u", LIMITS).data == data
    for url, message in [
        (f"data:image/jpeg;base64,{encoded}", "says image/jpeg but the bytes are PNG"),
        (f"data:image/tiff;base64,{encoded}", "unsupported image type 'image/tiff'"),
        (f"data:text/plain;base64,{encoded}", "unsupported media type 'text/plain'"),
        ("data:image/png,rawbytes", "must be base64-encoded"),
        ("data:image/png;base64,!!!!", "not valid base64"),
        ("file:///etc/passwd", "not a data URL"),
    ]:
        with pytest.raises(BadRequest) as caught:
            decode_data_url(url, "u", LIMITS)
        assert message in caught.value.message, (url, caught.value.message)


def events(parser: RunnerOutputParser, *chunks: bytes) -> list:
    found = []
    for chunk in chunks:
        found += parser.feed(chunk)
    return found


GREEN, END = b"\x1b[1;30;32m", b"\x1b[0m"


def log(func: str, line: int, message: str, colour: bytes = GREEN) -> bytes:
    return colour + f"[I][{func:>32}][{line:4d}]: {message}".encode() + END + b"\n"


def test_the_image_marker_then_the_turn():
    parser = RunnerOutputParser("vl")
    events(parser, b"prompt >> ")
    parser.begin_turn(b"image >> ")
    turn = (b"image >> " + log("Encode", 539, "image encode time : 50.1 ms, size : 393216")
            + log("Run", 625, "input token num : 280, prefill_split_num : 3") + log("Run", 796, "ttft: 10.00 ms")
            + b"[image 1: 8x8 PNG sha256:0123456789ab] You said: hi.\n\n"
            + b"\x1b[1;30;35m[N][" + b"Run".rjust(32) + b"][ 949]: hit eos,avg 5.00 token/s" + END + b"\n")
    for cut in range(1, len(turn)):  # wherever the pipe cuts it
        parser = RunnerOutputParser("vl")
        events(parser, b"prompt >> ")
        parser.begin_turn(b"image >> ")
        found = events(parser, turn[:cut], turn[cut:])
        assert [e for e in found if isinstance(e, ImageMarker)] == [ImageMarker("image >> ")], cut
        assert "".join(e.text for e in found if isinstance(e, Text)) == "[image 1: 8x8 PNG sha256:0123456789ab] You said: hi.", cut
        assert any(isinstance(e, TurnEnd) for e in found)


def test_a_qwen_runners_frame_list_is_not_answer_text():
    folder = b"/data/images/req-1"
    turn = (b"image >> " + folder + b"/frame000.png\n" + folder + b"/frame001.png\n"
            + log("Encode", 539, "image encode time : 100.2 ms, size : 1048576") + log("Run", 796, "ttft: 10.00 ms")
            + b"Two frames.\n\n" + b"\x1b[1;30;35m[N][" + b"Run".rjust(32) + b"][ 949]: hit eos,avg 5.00 token/s" + END + b"\n")
    for cut in range(1, len(turn), 3):
        parser = RunnerOutputParser("vl_qwen")
        events(parser, b"prompt >> ")
        parser.begin_turn(b"image >> ", folder + b"/")
        found = events(parser, turn[:cut], turn[cut:])
        assert [e.path for e in found if isinstance(e, FrameLine)] == [
            "/data/images/req-1/frame000.png", "/data/images/req-1/frame001.png"], cut
        assert "".join(e.text for e in found if isinstance(e, Text)) == "Two frames.", cut
        assert [e.message for e in found if isinstance(e, LogLine)][0].startswith("image encode time")


def test_a_turn_without_the_image_marker_is_text_as_before():
    """A runner that does not print the second marker: its bytes are the answer, none lost."""
    parser = RunnerOutputParser("vl")
    events(parser, b"prompt >> ")
    parser.begin_turn(b"image >> ")
    found = events(parser, b"ima", b"gine that.\n\n")
    assert "".join(e.text for e in found if isinstance(e, Text)) == "imagine that."


# ---- which images a turn carries (engines/card/planner.py) -------------------------------------


def picture(seed: int):
    return check_image(png_bytes(4, 4, seed=seed), "i", LIMITS)


def runner(dialect: str) -> Runner:
    return Runner(DIALECTS[dialect], supports_reset=False, our_tokenizer=True, context_size=2048, model="m")


def test_images_for_turn():
    a, b, c = picture(1), picture(2), picture(3)
    assert images_for_turn([ChatMessage("user", "x")]) == ((), None)
    assert images_for_turn([ChatMessage("user", "x", images=(a,))]) == ((a,), None)
    history = [ChatMessage("user", "1", images=(a,)), ChatMessage("assistant", "ok"),
               ChatMessage("user", "2", images=(b, c)), ChatMessage("assistant", "ok")]
    assert images_for_turn(history + [ChatMessage("user", "3")]) == ((b, c), 2)  # the latest, again
    assert images_for_turn(history + [ChatMessage("user", "3", images=(a,))]) == ((a,), None)


def test_read_turn_refuses_what_the_runner_cannot_take():
    a, b = picture(1), picture(2)
    two = GenerationRequest(id="r", messages=[ChatMessage("user", "x", images=(a, b))])
    with pytest.raises(BadRequest, match="does not support images: its runner takes text only"):
        read_turn(GenerationRequest(id="r", messages=[ChatMessage("user", "x", images=(a,))]), None, runner("b"))
    with pytest.raises(BadRequest, match="2 images in the last message: m's runner reads one image a turn"):
        read_turn(two, None, runner("vl"))
    assert read_turn(two, None, runner("vl_qwen")).images == (a, b)  # frames
    turn = read_turn(GenerationRequest(id="r", messages=[
        ChatMessage("user", "1", images=(a,)), ChatMessage("assistant", "ok"), ChatMessage("user", "2", images=(b,))]),
        None, runner("vl"))
    assert turn.images == (b,) and any("images of earlier messages not sent (1)" in w for w in turn.warnings)


def test_show_capabilities_name_vision_in_ollamas_order():
    assert capabilities(thinking=True, insert=True, tools=True, vision=True) == [
        "completion", "tools", "insert", "vision", "thinking"]
    assert "vision" not in capabilities(thinking=False, insert=False)
