"""The emulator's vision-language dialects against docs/vlm-runners.md: a run script through
/bin/sh, the second `image >> ` prompt, the reply that names the image, a bad image, the bytes."""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys

import httpx
import pytest

from ax_emulator.images import png_bytes
from ax_emulator.scripted import vision_reply_text
from harness.models import vision_tokenizer
from harness.net import free_port, wait_http
from emulator_support import Runner, emulator, plain

GREEN, RED, PURPLE, END = b"\x1b[1;30;32m", b"\x1b[1;30;31m", b"\x1b[1;30;35m", b"\x1b[0m"
WORDS = 4
EMBED = 1536
# An InternVL3-2B card script (docs/vlm-runners.md §3), the runner's name and port replaced.
INTERNVL_SCRIPT = """ax-emulator \\
--emu_dialect vl_internvl \\
--emu_init_seconds 0.1 \\
--emu_reply_words {words} \\
--emu_tokens_per_second 400 \\
--template_filename_axmodel "./internvl3_2b_axmodel/qwen2_p128_l%d_together.axmodel" \\
--axmodel_num 4 \\
--filename_image_encoder_axmodedl "./vit_axmodel/internvl3_2b_vit_slim.axmodel" \\
--use_mmap_load_embed 1 \\
--filename_tokenizer_model "http://127.0.0.1:{port}" \\
--filename_post_axmodel "./internvl3_2b_axmodel/qwen2_post.axmodel" \\
--filename_tokens_embed "./internvl3_2b_axmodel/model.embed_tokens.weight.bfloat16.bin" \\
--tokens_embed_num 151674 \\
--tokens_embed_size {embed} \\
--devices 0 \\
--live_print 1
"""
QWEN_SCRIPT = """ax-emulator \\
--emu_dialect vl_qwen \\
--emu_init_seconds 0.1 \\
--emu_reply_words {words} \\
--emu_tokens_per_second 400 \\
--template_filename_axmodel "qwen2_5-vl-3b-image-ax650/qwen2_5_vl_p128_l%d_together.axmodel" \\
--axmodel_num 4 \\
--filename_image_encoder_axmodedl "qwen2_5-vl-3b-image-ax650/Qwen2.5-VL-3B-Instruct_vision_nchw448.axmodel" \\
--filename_tokenizer_model "http://127.0.0.1:{port}" \\
--filename_post_axmodel "qwen2_5-vl-3b-image-ax650/qwen2_5_vl_post.axmodel" \\
--filename_tokens_embed "qwen2_5-vl-3b-image-ax650/model.embed_tokens.weight.bfloat16.bin" \\
--tokens_embed_num 151936 \\
--tokens_embed_size 2048 \\
--live_print 1 \\
--img_width 448 \\
--img_height 448 \\
--video {video} \\
--devices 0
"""


class VisionTokenizerServer:
    """Our tokenizer server on the SmolLM2 tokenizer with a VLM family's image tokens added."""

    def __init__(self, folder, family: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tokenizer_service.server", "--host", "127.0.0.1", "--port", str(self.port),
             "--tokenizer", str(vision_tokenizer(folder, family))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"{self.url}/bos_id", 60, process=self.process)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def internvl_tokenizer(tmp_path_factory):
    server = VisionTokenizerServer(tmp_path_factory.mktemp("internvl-tokenizer"), "internvl")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory):
    server = VisionTokenizerServer(tmp_path_factory.mktemp("qwen-tokenizer"), "qwen")
    yield server
    server.stop()


def model_folder(tmp_path, template: str, port: int, **values) -> list[str]:
    """A card-shaped folder: the run script without shebang, run through /bin/sh in the folder."""
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "post_config.json").write_text('{"enable_temperature": false}')
    script = folder / "run_vlm_axcl_x86.sh"
    script.write_text(template.format(port=port, words=WORDS, embed=EMBED, **values))
    return ["/bin/sh", str(script)]


def image_tag(index: int, path, width: int, height: int, kind: str = "PNG") -> str:
    """What the reply must say of an image: computed here from the file, not by the emulator."""
    return f"[image {index}: {width}x{height} {kind} sha256:{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}]"


def log(colour: bytes, level: str, func: str, line: int, message: str) -> bytes:
    return colour + f"[{level}][{func:>32}][{line:4d}]: {message}".encode() + END + b"\n"


def turn(runner: Runner, text: str, path: str) -> str:
    """One turn the way the runner takes it: the text line, `image >> `, the path line; the
    output of the turn up to the next `prompt >> `."""
    start = len(runner.output)
    runner.send(text + "\n")
    runner.read_until(b"image >> ", start=start)
    runner.send(path + "\n")
    runner.read_until(b"prompt >> ", start=start)
    return plain(runner.output[start:])


def reply_of(turn_text: str) -> str:
    """The reply text: after the ttft line, before the blank line of the tail."""
    return turn_text.split("ms\n", 1)[1].split("\n\n", 1)[0] if "ttft: " in turn_text else ""


def token_count(turn_text: str) -> int:
    return int(re.search(r"input token num : (\d+),", turn_text).group(1))


def test_image_turns_name_their_image_and_every_turn_starts_afresh(internvl_tokenizer, runners, tmp_path):
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    first.write_bytes(png_bytes(64, 48, seed=1))
    second.write_bytes(png_bytes(31, 17, seed=2))
    runner = runners(model_folder(tmp_path, INTERNVL_SCRIPT, internvl_tokenizer.port), cwd=tmp_path / "model")
    runner.read_until(b"prompt >> ")

    text_only = turn(runner, "hello there", "")
    assert "image encode time" not in text_only and "not found" not in text_only
    assert reply_of(text_only) == vision_reply_text("hello there", [], WORDS, False)

    with_first = turn(runner, "describe this picture", str(first))
    assert reply_of(with_first) == vision_reply_text(
        "describe this picture", [image_tag(1, first, 64, 48)], WORDS, False)
    assert re.search(r"\[I\]\[ +Encode\]\[ 539\]: image encode time : \d+\.\d{6} ms, size : "
                     + str(256 * EMBED) + r"\n", with_first)
    # the prompt holds the 256 placeholders and their <img> </img> around the question
    assert token_count(with_first) >= token_count(text_only) + 258
    chunks = [int(n) for n in re.findall(r"input_num_token:(\d+)", with_first)]
    assert sum(chunks) == token_count(with_first) and all(n == 128 for n in chunks[:-1])

    with_second = turn(runner, "and this one", str(second))
    assert reply_of(with_second) == vision_reply_text("and this one", [image_tag(1, second, 31, 17)], WORDS, False)
    assert image_tag(1, first, 64, 48) not in with_second

    # no memory between turns: the same line costs the same prompt tokens after two images
    again = turn(runner, "hello there", "")
    assert token_count(again) == token_count(text_only)
    assert "GetKVCache" not in plain(runner.output) and "SetKVCache" not in plain(runner.output)
    runner.send("q\n")
    assert runner.wait() == 0


@pytest.mark.parametrize("kind", ["missing", "truncated", "not an image", "directory"])
def test_a_bad_image_logs_not_found_and_the_text_is_answered_alone(internvl_tokenizer, runners, tmp_path, kind):
    path = tmp_path / "picture.png"
    if kind == "truncated":
        path.write_bytes(png_bytes(40, 30)[:-30])
    elif kind == "not an image":
        path.write_bytes(b"GIF? no: just some text that was named .png\n")
    elif kind == "directory":
        path.mkdir()
        (path / "frame.png").write_bytes(png_bytes(8, 8))  # InternVL reads one file, never a folder
    runner = runners(model_folder(tmp_path, INTERNVL_SCRIPT, internvl_tokenizer.port), cwd=tmp_path / "model")
    runner.read_until(b"prompt >> ")
    start = len(runner.output)
    text = turn(runner, "what is it", str(path))
    assert log(RED, "E", "main", 279, f"image prompt({path}) not found") in runner.output[start:]
    assert "image encode time" not in text
    assert reply_of(text) == vision_reply_text("what is it", [], WORDS, False)
    # still serving: the next turn with a good image works
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(12, 10))
    assert reply_of(turn(runner, "now this", str(good))).startswith(image_tag(1, good, 12, 10) + " You said: now this.")


def test_the_bytes_and_flush_points(internvl_tokenizer, runners, tmp_path):
    """Every write(2) of the runner is one packet: the markers leave alone, log lines wait."""
    image = tmp_path / "cat.png"
    image.write_bytes(png_bytes(20, 10))
    runner = runners(model_folder(tmp_path, INTERNVL_SCRIPT, internvl_tokenizer.port), cwd=tmp_path / "model",
                     packets=True)
    runner.read_until(b"prompt >> ")
    head = b"".join(runner.chunks)
    start_id = httpx.get(f"{internvl_tokenizer.url}/img_start_token").json()["img_start_token"]
    context_id = httpx.get(f"{internvl_tokenizer.url}/img_context_token").json()["img_context_token"]
    assert head.startswith(log(GREEN, "I", "Init", 160, "LLM init start")
                           + log(GREEN, "I", "Init", 34, f"connect http://127.0.0.1:{internvl_tokenizer.port} ok")
                           + f"bos_id: 1, eos_id: 2\nimg_start_token: {start_id}\nimg_context_token: {context_id}\n".encode())
    assert (b"\ninput size: 1\n    name:    image [unknown] [unknown]\n        1 x 3 x 448 x 448 size:2408448\n\n\n"
            b"output size: 1\n    name:   output\n        1 x 256 x 1536 size:1572864\n\n"
            + log(GREEN, "I", "Init", 265, f"IMAGE_CONTEXT_TOKEN: {context_id}, IMAGE_START_TOKEN: {start_id}")
            + log(GREEN, "I", "Init", 290, "image encoder input nchw@float32")
            + log(GREEN, "I", "Init", 320, "image encoder output float32\n")
            + log(GREEN, "I", "Init", 330, "image_encoder_height : 448, image_encoder_width: 448")
            + log(GREEN, "I", "Init", 332, "max_token_len : 2559")) in head
    assert head.endswith(log(GREEN, "I", "Init", 448, "LLM init ok")
                         + b'Type "q" to exit, Ctrl+c to stop current running\nprompt >> ')
    assert runner.chunks[-1].endswith(b"LLM init ok\x1b[0m\nType \"q\" to exit, Ctrl+c to stop current running\nprompt >> ")

    before = len(runner.chunks)
    runner.send("look\n")
    runner.read_until(b"image >> ", start=len(head))
    assert runner.chunks[before:] == [b"image >> "]  # flushed alone, no newline, no echo
    before = len(runner.chunks)
    runner.send(f"{image}\n")
    runner.read_until(b"prompt >> ", start=len(head))
    writes = runner.chunks[before:]
    # the Encode and Run lines wait in the buffer and leave with the first text chunk
    first = re.fullmatch(
        rb"\x1b\[1;30;32m\[I\]\[ {26}Encode\]\[ 539\]: image encode time : \d+\.\d{6} ms, size : 393216\x1b\[0m\n"
        rb"\x1b\[1;30;32m\[I\]\[ {29}Run\]\[ 625\]: input token num : \d+, prefill_split_num : 3\x1b\[0m\n"
        rb"(?:\x1b\[1;30;32m\[I\]\[ {29}Run\]\[ 659\]: input_num_token:\d+\x1b\[0m\n){3}"
        rb"\x1b\[1;30;32m\[I\]\[ {29}Run\]\[ 796\]: ttft: \d+\.\d\d ms\x1b\[0m\n(?P<text>[^\x1b\n]+)", writes[0])
    assert first, writes[0]
    # then one write per 3-token chunk, `\n\n`, and `hit eos` together with the next marker
    assert writes[-2] == b"\n\n"
    assert re.fullmatch(rb"\x1b\[1;30;35m\[N\]\[ {29}Run\]\[ 949\]: hit eos,avg \d+\.\d\d token/s\n\x1b\[0m\n"
                        rb"prompt >> ", writes[-1])
    reply = (first.group("text") + b"".join(writes[1:-2])).decode()
    assert reply == vision_reply_text("look", [image_tag(1, image, 20, 10)], WORDS, False)


def test_qwen_takes_a_directory_of_frames_and_the_video_marker(qwen_tokenizer, runners, tmp_path):
    frames = tmp_path / "video"
    frames.mkdir()
    for i, size in enumerate(((16, 16), (18, 12), (10, 20))):
        (frames / f"frame_{i * 8:04d}.png").write_bytes(png_bytes(*size, seed=i))
    (frames / "notes.txt").write_text("not a frame")
    runner = runners(model_folder(tmp_path, QWEN_SCRIPT, qwen_tokenizer.port, video=1), cwd=tmp_path / "model")
    head = plain(runner.read_until(b"prompt >> "))
    assert "name: hidden_states [unknown] [unknown]\n        1 x 1024 x 392 x 3 size:1204224\n\n" in head
    assert "name: hidden_states_out\n        256 x 2048 size:2097152\n" in head
    assert "[I][                            Init][ 456]: LLM init ok" in head
    start = len(runner.output)
    runner.send("describe the video\n")
    runner.read_until(b"video >> ", start=start)
    runner.send(f"{frames}\n")
    text = plain(runner.read_until(b"prompt >> ", start=start)[start:])
    names = sorted(p for p in frames.iterdir() if p.suffix == ".png")
    assert "".join(f"{p}\n" for p in names) in text  # ReadImages lists the frames it read
    assert f"size : {256 * 3 * 2048}\n" in text
    tags = [image_tag(i, p, *size) for i, (p, size) in enumerate(zip(names, ((16, 16), (18, 12), (10, 20))), 1)]
    assert reply_of(text) == vision_reply_text("describe the video", tags, WORDS, False)
    assert token_count(text) >= 3 * 258


def test_qwen_builds_require_the_image_size_flags(qwen_tokenizer):
    result = subprocess.run(emulator("--emu_dialect", "vl_qwen", "--devices", "0",
                                     f"--filename_tokenizer_model={qwen_tokenizer.url}", "--img_width", "448"),
                            capture_output=True, timeout=30, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("need option: --img_height\nusage: ")


def test_tokenizer_image_routes(internvl_tokenizer, qwen_tokenizer, emulator_tokenizer):
    """The image block goes after the question for InternVL, before it for Qwen; a text-only
    tokenizer answers -1 for the image tokens (as the published scripts do for None) and
    refuses an img_prompt encode."""
    for server, family in ((internvl_tokenizer, "internvl"), (qwen_tokenizer, "qwen")):
        assert httpx.get(f"{server.url}/capabilities").json()["images"] == family
        start = httpx.get(f"{server.url}/img_start_token").json()["img_start_token"]
        context = httpx.get(f"{server.url}/img_context_token").json()["img_context_token"]
        plain_ids = httpx.post(f"{server.url}/encode", json={"text": "hi"}).json()["token_ids"]
        ids = httpx.post(f"{server.url}/encode", json={"text": "hi", "img_prompt": True, "num_img": 2,
                                                         "imgsz": 448}).json()["token_ids"]
        assert ids.count(context) == 512 and ids.count(start) == 2 and context not in plain_ids
        hi = httpx.post(f"{server.url}/tokenize", json={"text": "hi"}).json()["token_ids"]
        text_at = next(i for i in range(len(ids)) if ids[i:i + len(hi)] == hi)
        assert (text_at < ids.index(start)) == (family == "internvl")
        small = httpx.post(f"{server.url}/encode", json={"text": "hi", "img_prompt": True, "num_img": 1,
                                                           "img_token_num": 64}).json()["token_ids"]
        assert small.count(context) == 64
    assert httpx.get(f"{emulator_tokenizer.url}/img_start_token").json() == {"img_start_token": -1}
    refused = httpx.post(f"{emulator_tokenizer.url}/encode", json={"text": "hi", "img_prompt": True, "num_img": 1,
                                                                   "imgsz": 448})
    assert refused.status_code == 400 and "no image tokens" in refused.json()["error"]


def test_probe_reads_jpeg_bmp_gif_headers_and_refuses_broken_files(tmp_path):
    import struct

    from ax_emulator.images import ImageUnreadable, probe

    frame = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 33, 44, 1) + b"\x01\x11\x00"
    jpeg = b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 6) + b"JFIF" + frame + b"\xff\xda\x00\x02" + b"\x12" * 9 + b"\xff\xd9"
    bmp = b"BM" + struct.pack("<I", 54) + b"\x00" * 12 + struct.pack("<ii", 5, -7) + b"\x00" * 28
    gif = b"GIF89a" + struct.pack("<HH", 9, 3) + b"\x00" * 10 + b"\x3b"
    cases = {"a.jpg": (jpeg, (44, 33, "JPEG")), "a.bmp": (bmp, (5, 7, "BMP")), "a.gif": (gif, (9, 3, "GIF"))}
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        facts = probe(tmp_path / name)
        assert (facts.width, facts.height, facts.format) == expected
        assert facts.sha256 == hashlib.sha256(data).hexdigest()
    for name, data in {"cut.jpg": jpeg[:-2], "cut.bmp": bmp[:40], "cut.gif": gif[:-1], "empty.png": b""}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageUnreadable):
            probe(tmp_path / name)


@pytest.mark.parametrize("family", ["internvl", "qwen"])
def test_the_harness_model_folder_serves_an_image_turn(runners, tmp_path, family):
    """What daemon tests will use: the folder's tokenizer script and its run script with the
    port as `$1`, both started the way the card's folders are started."""
    from harness.models import scripted_vision_model

    entry = scripted_vision_model(tmp_path, f"{family}-echo", family=family, reply_words=WORDS)
    folder, port = tmp_path / entry["model_name"], entry["tokenizer_port"]
    tokenizer = subprocess.Popen([sys.executable, entry["tokenizer_py"], "--host", "127.0.0.1", "--port", port],
                                 cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/bos_id", 60, process=tokenizer)
        runner = runners(["/bin/sh", entry["run_cmd"], port], cwd=folder)
        runner.read_until(b"prompt >> ")
        picture = tmp_path / "photo.png"
        picture.write_bytes(png_bytes(45, 30, seed=7))
        text = turn(runner, "what is in the photo", str(picture))
        assert reply_of(text) == vision_reply_text("what is in the photo", [image_tag(1, picture, 45, 30)], WORDS, False)
        assert f"size : {256 * (1536 if family == 'internvl' else 2048)}\n" in text
    finally:
        tokenizer.terminate()
        tokenizer.wait(timeout=10)


def test_the_card_faults_apply_to_the_vision_dialects(internvl_tokenizer, runners, tmp_path):
    """A crash in the middle of an image turn: text already flushed stays, the process dies by
    the signal (the fault keys of the text dialects, through --emu_faults)."""
    picture = tmp_path / "p.png"
    picture.write_bytes(png_bytes(8, 8))
    args = model_folder(tmp_path, INTERNVL_SCRIPT.replace("--live_print 1\n", "--live_print 1 \\\n"
                                                          "--emu_faults crash_after_tokens=4\n"),
                        internvl_tokenizer.port)
    runner = runners(args, cwd=tmp_path / "model", env={"AX_EMU_STATE_DIR": str(tmp_path)})
    runner.read_until(b"prompt >> ")
    runner.send("crash please\n")
    runner.read_until(b"image >> ")
    runner.send(f"{picture}\n")
    assert runner.wait() != 0
    while runner.read_chunk(1.0) and len(runner.chunks) < 10_000:
        pass
    after = plain(runner.output).rsplit("image >> ", 1)[1]
    assert after.startswith("[I][                          Encode][ 539]: image encode time")
    flushed = after.split("ms\n")[-1]  # the first 3-token chunk made it out, no more
    expected = vision_reply_text("crash please", [image_tag(1, picture, 8, 8)], WORDS, False)
    assert flushed and expected.startswith(flushed) and len(flushed) < len(expected)
    assert "hit eos" not in after and "prompt >> " not in after
