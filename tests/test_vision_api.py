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
MAX_BYTES = 200_000  # the module's daemon takes images up to this size
MAX_COUNT = 4  # … and this many in one request
FROM_PROSE = "structured output: the JSON was taken out of the text around it in the answer"


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
        # Slow enough to leave in the middle of its answer.
        scripted_vision_model(root, "slow-vl", family="internvl", reply_words=40, tokens_per_second=8),
        scripted_vision_model(root, "qwen-video", family="qwen", reply_words=WORDS, video=True),
    ]
    with running_daemon(root, entries, "--image-max-bytes", str(MAX_BYTES), "--image-max-count", str(MAX_COUNT)) as d:
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


def test_show_lists_vision_for_vision_models_only(daemon):
    client = ollama.Client(host=daemon.url, timeout=120)
    assert "vision" in client.show("internvl").capabilities
    assert "vision" in client.show("qwen-vl").capabilities
    assert "vision" not in client.show("text").capabilities


@pytest.mark.parametrize(("model", "frames"), [("internvl", 1), ("qwen-vl", 1)])
def test_frigates_review_call_with_its_images(daemon, model, frames):
    """frigate/genai/ollama.py: `generate(model, prompt, images=[<base64 JPEG>, …], format=<its
    schema>, options={...})`, the answer's fences stripped and `ReviewMetadata.model_validate_json`.
    Frigate sends the review's frames in order: a Qwen-VL runner reads several (a folder of
    frames), an InternVL one reads one image a turn; with Frigate's prompt and schema one frame
    is what fits a Qwen2.5-VL build's 1023-token context (below)."""
    pictures = [jpeg_bytes(1280, 720, seed=10 + i) for i in range(frames)]
    client = ollama.Client(host=daemon.url, timeout=120)
    assert client.show(model).modelfile is not None
    options = {"temperature": 0.5, "repeat_penalty": 1.05, "presence_penalty": 0.3}
    prompt = review_prompt(directive("valid", REVIEW)).replace("Total frames: 0", f"Total frames: {frames}")
    result = client.generate(model, prompt, images=[b64(p) for p in pictures], options=options,
                             format=frigate_review_format())
    text = str(result["response"]).strip()
    clean = re.sub(r"\n?```$", "", re.sub(r"^```[a-zA-Z0-9]*\n?", "", text))
    assert ReviewMetadata.model_validate_json(clean) == ReviewMetadata(**REVIEW)
    # The raw answer: the JSON was taken out of the text around it, which named the images.
    body = post(daemon, "/api/generate", {"model": model, "prompt": prompt, "images": [b64(p) for p in pictures],
                                          "format": frigate_review_format(), "stream": False}).json()
    assert json.loads(body["response"]) == REVIEW and FROM_PROSE in body["warnings"]
    # The runner encoded every frame (256 tokens x the embedding width each) and no frame list
    # reached the answer (the daemon logs the runner's list of the frames it read).
    embed = 2048 if model == "qwen-vl" else 1536
    with daemon.client() as http:
        logs = http.get(f"/api/logs/{model}").text
    assert f"size : {256 * embed * frames}" in logs
    assert logs.count("[frame] ") == (2 * frames if frames > 1 else 0)
    assert image_files(daemon) == []


def test_frigates_frames_beyond_the_context_are_a_clear_400(daemon):
    """Three frames (3 x 260 tokens) and Frigate's prompt with its schema do not fit the 1023
    tokens the Qwen-VL runner says at start-up (`max_token_len`): a 400 that says so, not the
    empty answer the runner would give."""
    pictures = [b64(jpeg_bytes(1280, 720, seed=20 + i)) for i in range(3)]
    prompt = review_prompt(directive("valid", REVIEW)).replace("Total frames: 0", "Total frames: 3")
    answer = post(daemon, "/api/generate", {"model": "qwen-vl", "prompt": prompt, "images": pictures,
                                            "format": frigate_review_format(), "stream": False})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert "more than the model's context of 1023 tokens" in error and "the 3 image(s) take 780 of these tokens" in error
    assert image_files(daemon) == []


def test_frames_reach_a_qwen_runner_in_order(daemon):
    pictures = [png_bytes(30 + i, 20, seed=i) for i in range(3)]
    client = ollama.Client(host=daemon.url, timeout=120)
    result = client.generate("qwen-vl", "Follow the frames.", images=[b64(p) for p in pictures])
    tags = " ".join(tag(i + 1, p, 30 + i, 20, "PNG") for i, p in enumerate(pictures))
    assert result.response == tags + " " + reply_text("Follow the frames.", WORDS, think=False)


def test_frames_the_runner_skips_fail_the_request(daemon):
    """A Qwen-VL runner lists the frames it read from the folder: one it skipped (here a WebP,
    which the emulator's reader, like some OpenCV builds, does not take) fails the request
    instead of an answer about fewer pictures than were sent."""
    images = [b64(png_bytes(8, 8, seed=50)), b64(webp_bytes(16, 16))]
    answer = post(daemon, "/api/generate", {"model": "qwen-vl", "prompt": "Both?", "images": images, "stream": False})
    assert answer.status_code == 400, answer.text
    assert "read 1 of the 2 images (PNG 8x8" in answer.json()["error"] and "WEBP 16x16" in answer.json()["error"]
    assert image_files(daemon) == []


def test_a_video_build_takes_the_frames_at_its_video_marker(daemon):
    pictures = [png_bytes(12, 10, seed=40 + i) for i in range(2)]
    client = ollama.Client(host=daemon.url, timeout=120)
    result = client.generate("qwen-video", "What happens?", images=[b64(p) for p in pictures])
    tags = " ".join(tag(i + 1, p, 12, 10, "PNG") for i, p in enumerate(pictures))
    assert result.response == tags + " " + reply_text("What happens?", WORDS, think=False)
    assert image_files(daemon) == []


def test_openai_image_url_chat(daemon):
    import openai

    picture = png_bytes(33, 21, seed=5)
    oai = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    answer = oai.chat.completions.create(model="internvl", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Describe the picture."},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(picture), "detail": "auto"}},
    ]}])
    assert answer.choices[0].message.content == (tag(1, picture, 33, 21, "PNG") + " "
                                                 + reply_text("Describe the picture.", WORDS, think=False))
    # Streamed the same.
    stream = oai.chat.completions.create(model="internvl", stream=True, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(picture)}},
        {"type": "text", "text": "Describe the picture."},
    ]}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answer.choices[0].message.content
    assert image_files(daemon) == []


def test_chat_with_images_sends_the_last_messages_image(daemon):
    first, second = png_bytes(16, 16, seed=1), jpeg_bytes(800, 600, seed=2)
    client = ollama.Client(host=daemon.url, timeout=120)
    one = client.chat("internvl", messages=[{"role": "user", "content": "What is this?", "images": [b64(first)]}])
    assert one.message.content == tag(1, first, 16, 16, "PNG") + " " + reply_text("What is this?", WORDS, think=False)
    # The second turn: the whole conversation goes again (the runner keeps nothing), with the
    # new message's image; the earlier image cannot reach the runner, and the answer says so.
    messages = [{"role": "user", "content": "What is this?", "images": [b64(first)]},
                {"role": "assistant", "content": one.message.content},
                {"role": "user", "content": "And this one?", "images": [b64(second)]}]
    body = post(daemon, "/api/chat", {"model": "internvl", "messages": messages, "stream": False}).json()
    assert body["message"]["content"] == (tag(1, second, 800, 600, "JPEG") + " "
                                          + reply_text("And this one?", WORDS, think=False))
    assert any("images of earlier messages not sent (1)" in w for w in body["warnings"])
    # The runner read the whole conversation (its own count of the prompt it prefilled): more
    # than the first turn's, which had the same one image.
    assert body["prompt_eval_count"] > one.prompt_eval_count + 10
    # A follow-up question without an image: the latest image goes again (nothing is kept).
    messages += [{"role": "assistant", "content": body["message"]["content"]},
                 {"role": "user", "content": "What colour is it?"}]
    body = post(daemon, "/api/chat", {"model": "internvl", "messages": messages, "stream": False}).json()
    assert body["message"]["content"] == (tag(1, second, 800, 600, "JPEG") + " "
                                          + reply_text("What colour is it?", WORDS, think=False))
    assert any("the image(s) of an earlier message (1) went with this turn again" in w for w in body["warnings"])
    assert any("images of earlier messages not sent (1)" in w for w in body["warnings"])
    # A conversation of text only: no image at the runner's image prompt.
    text = client.chat("internvl", messages=[{"role": "user", "content": "Only text now."}])
    assert text.message.content == reply_text("Only text now.", WORDS, think=False)
    assert image_files(daemon) == []


def tiff_bytes() -> bytes:
    return b"II*\x00\x08\x00\x00\x00" + b"\x00" * 64


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width`×`height`: a valid IHDR, a one-row IDAT, IEND (not decodable as a
    whole, but the header is what the size check reads)."""
    good = png_bytes(1, 1)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    import zlib
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return good[:8] + chunk + good[8 + 25:]


BAD_IMAGES = {
    "corrupt": (lambda: b64(png_bytes(20, 20)[:-30]), "corrupt or truncated"),
    "garbage": (lambda: b64(bytes(range(256)) * 4), "unsupported or unrecognised image type"),
    "unsupported type": (lambda: b64(tiff_bytes()), "unsupported or unrecognised image type"),
    "not base64": (lambda: "this is not base64!", "not valid base64"),
    "huge in bytes": (lambda: b64(png_bytes(400, 400, seed=3) + b"\x00" * MAX_BYTES), "setting image_max_bytes"),
    "huge in pixels": (lambda: b64(png_header_only(20000, 20000)), "20000x20000 pixels"),
    "empty": (lambda: "", "the image is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_are_clear_400s(daemon, case):
    make, message = BAD_IMAGES[case]
    image = make()
    for path, body in (("/api/generate", {"model": "internvl", "prompt": "Look.", "images": [image]}),
                       ("/api/chat", {"model": "internvl", "messages": [{"role": "user", "content": "Look.", "images": [image]}]})):
        answer = post(daemon, path, {**body, "stream": False})
        assert answer.status_code == 400, answer.text
        assert message in answer.json()["error"], answer.json()
    url = "data:image/png;base64," + image
    answer = post(daemon, "/v1/chat/completions", {"model": "internvl", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Look."}, {"type": "image_url", "image_url": {"url": url}}]}]})
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]["message"]
    assert image_files(daemon) == []


def test_too_many_images(daemon):
    pictures = [b64(png_bytes(8, 8, seed=i)) for i in range(MAX_COUNT + 1)]
    answer = post(daemon, "/api/generate", {"model": "qwen-vl", "prompt": "Look.", "images": pictures, "stream": False})
    assert answer.status_code == 400 and f"{MAX_COUNT + 1} images in one request, more than the {MAX_COUNT}" in answer.json()["error"]
    # Spread over the messages of a chat, the same limit.
    messages = [{"role": "user", "content": f"Look {i}.", "images": [p]} for i, p in enumerate(pictures)]
    answer = post(daemon, "/api/chat", {"model": "qwen-vl", "messages": messages, "stream": False})
    assert answer.status_code == 400 and "more than the 4 this server takes" in answer.json()["error"]
    # An InternVL runner reads one image a turn.
    answer = post(daemon, "/api/generate", {"model": "internvl", "prompt": "Look.", "images": pictures[:2], "stream": False})
    assert answer.status_code == 400 and "reads one image a turn" in answer.json()["error"], answer.text


def test_openai_http_image_urls_are_refused_unless_fetching_is_on(daemon):
    answer = post(daemon, "/v1/chat/completions", {"model": "internvl", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Look."}, {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]})
    assert answer.status_code == 400 and "setting image_url_fetch is off" in answer.json()["error"]["message"]
    picture = png_bytes(8, 8)
    answer = post(daemon, "/v1/chat/completions", {"model": "internvl", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64(picture)}}]}]})
    assert answer.status_code == 400 and "says image/jpeg but the bytes are PNG" in answer.json()["error"]["message"]


def test_a_text_model_keeps_the_clear_400_for_images(daemon):
    picture = b64(png_bytes(8, 8))
    for path, body in (("/api/generate", {"model": "text", "prompt": "Look.", "images": [picture]}),
                       ("/api/chat", {"model": "text", "messages": [{"role": "user", "content": "Look.", "images": [picture]}]})):
        answer = post(daemon, path, {**body, "stream": False})
        assert answer.status_code == 400
        assert answer.json()["error"].startswith('images are not supported by "text": the model takes text only')
    answer = post(daemon, "/v1/chat/completions", {"model": "text", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + picture}}]}]})
    assert answer.status_code == 400 and "the model takes text only" in answer.json()["error"]["message"]


def webp_bytes(width: int, height: int) -> bytes:
    """A lossless WebP header (RIFF, VP8L signature and size) with a few bytes of stream: what the
    daemon's checks take, and what the emulator's reader (like an OpenCV without WebP) cannot."""
    bits = (width - 1) | ((height - 1) << 14)
    body = b"VP8L" + struct.pack("<I", 9) + b"\x2f" + bits.to_bytes(4, "little") + b"\x00\x00\x00\x00" + b"\x00"
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def test_an_image_the_runner_cannot_read_is_an_error_not_a_text_answer(daemon):
    """The runner logs `image prompt(PATH) not found` and would answer the text alone: the
    request fails and says so, rather than answering as if the image had been seen."""
    answer = post(daemon, "/api/generate", {"model": "internvl", "prompt": "Look.", "images": [b64(webp_bytes(64, 32))],
                                            "stream": False})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert "could not read the image (WEBP 64x32" in error and "not found" in error and "You said" not in error
    # Streamed: the same error before any text (the error comes before the answer's first byte).
    streamed = post(daemon, "/api/generate", {"model": "internvl", "prompt": "Look.", "images": [b64(webp_bytes(64, 32))]})
    assert streamed.status_code == 400 and "could not read the image" in streamed.json()["error"], streamed.text
    assert image_files(daemon) == []
    # The runner is fine: the next image turn is answered.
    picture = png_bytes(9, 9, seed=9)
    result = ollama.Client(host=daemon.url, timeout=120).generate("internvl", "Again.", images=[b64(picture)])
    assert result.response.startswith(tag(1, picture, 9, 9, "PNG"))


def test_image_files_are_removed_after_a_runner_crash_mid_turn(daemon):
    picture = b64(png_bytes(12, 12, seed=4))
    daemon.set_faults(crash_after_tokens=3)
    try:
        answer = post(daemon, "/api/generate", {"model": "internvl", "prompt": "Crash now.", "images": [picture],
                                                "stream": False})
    finally:
        daemon.set_faults()
    assert answer.status_code >= 500, answer.text
    assert "crash" in answer.json()["error"] or "signal" in answer.json()["error"], answer.text
    assert image_files(daemon) == []
    # Restarted, it answers the same image.
    result = ollama.Client(host=daemon.url, timeout=120).generate("internvl", "After the crash.", images=[picture])
    assert result.response.startswith(tag(1, base64.b64decode(picture), 12, 12, "PNG"))
    assert image_files(daemon) == []


def test_image_files_are_removed_when_the_client_leaves(daemon):
    import time

    picture = b64(png_bytes(10, 10, seed=6))
    with daemon.client(timeout=60) as http:
        with http.stream("POST", "/api/generate", json={"model": "slow-vl", "prompt": "Tell me slowly.",
                                                        "images": [picture]}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            first = json.loads(next(lines))
            assert first["response"].startswith("[image")
            assert len(image_files(daemon)) == 1  # the file is there while the runner answers
    deadline = time.monotonic() + 15
    while image_files(daemon) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert image_files(daemon) == []
    daemon.wait_state("slow-vl", "ready", timeout=30)


def test_image_files_left_by_a_killed_daemon_are_swept_at_start(tmp_path):
    left = tmp_path / "data" / "images"
    left.mkdir(parents=True)
    (left / "old-request.png").write_bytes(png_bytes(4, 4))
    (left / "old-frames").mkdir()
    (left / "old-frames" / "frame000.png").write_bytes(png_bytes(4, 4))
    with running_daemon(tmp_path, [scripted_model(tmp_path, "text", reply_words=WORDS)]):
        assert list(left.iterdir()) == []
        assert oct(left.stat().st_mode & 0o777) == "0o700"


def test_frigates_review_call_through_its_openai_provider_with_images(daemon):
    """frigate/genai/openai.py: one user message of a text part and the frames as image_url data
    URLs, response_format json_schema "review_metadata", strict; content stripped, fences
    removed, validated."""
    import openai

    from test_structured_output import frigate_review_schema

    picture = jpeg_bytes(1280, 720, seed=30)
    oai = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    response_format = {"type": "json_schema", "json_schema": {"name": "review_metadata", "strict": True,
                                                              "schema": frigate_review_schema()}}
    content = [{"type": "text", "text": review_prompt(directive("fenced", REVIEW))},
               {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{b64(picture)}"}}]
    result = oai.chat.completions.create(model="internvl", messages=[{"role": "user", "content": content}],
                                         response_format=response_format)
    text = result.choices[0].message.content.strip()
    clean = re.sub(r"\n?```$", "", re.sub(r"^```[a-zA-Z0-9]*\n?", "", text))
    assert ReviewMetadata.model_validate_json(clean) == ReviewMetadata(**REVIEW)
    assert image_files(daemon) == []


class ImageServer:
    """A local http server with one picture at /picture.png and a large file at /large.png."""

    def __init__(self, picture: bytes, large: bytes):
        import http.server
        import threading

        files = {"/picture.png": picture, "/large.png": large}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the stdlib's name)
                body = files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def test_http_image_urls_are_fetched_where_the_setting_allows(tmp_path):
    import openai

    picture = png_bytes(24, 12, seed=8)
    server = ImageServer(picture, png_bytes(300, 300, seed=1) + b"\x00" * 300_000)
    try:
        entries = [scripted_vision_model(tmp_path, "internvl", family="internvl", reply_words=WORDS)]
        with running_daemon(tmp_path, entries, "--image-url-fetch", "true", "--image-max-bytes", str(MAX_BYTES)) as d:
            oai = openai.OpenAI(base_url=d.url + "/v1", api_key="unused", max_retries=0, timeout=120)
            answer = oai.chat.completions.create(model="internvl", messages=[{"role": "user", "content": [
                {"type": "text", "text": "What is at this URL?"},
                {"type": "image_url", "image_url": {"url": server.url + "/picture.png"}}]}])
            assert answer.choices[0].message.content == (tag(1, picture, 24, 12, "PNG") + " "
                                                         + reply_text("What is at this URL?", WORDS, think=False))
            for path, message in (("/missing.png", "answered HTTP 404"), ("/large.png", f"larger than {MAX_BYTES} bytes")):
                refused = post(d, "/v1/chat/completions", {"model": "internvl", "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": server.url + path}}]}]})
                assert refused.status_code == 400 and message in refused.json()["error"]["message"], refused.text
    finally:
        server.stop()
