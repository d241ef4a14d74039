"""The emulated vision-language runners: dialects `vl_internvl` and `vl_qwen`.

docs/vlm-runners.md is the reference: after the text line the runner prints a second marker
(`image >> `, or `video >> ` for a Qwen build started with `--video 1`), reads the path of an
image on its own machine, logs the encoder's time, and prefills the prompt the tokenizer built
with the image placeholders (`/encode` with `img_prompt`). Every turn starts afresh (stateless
tokenizer, no KV cache between turns). A missing or undecodable image logs
`image prompt(PATH) not found` and the text is answered alone.

The reply is scripted: `[image N: WxH FORMAT sha256:…]` per image, then the echo of the line.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from ax_emulator.engines import ScriptedEngine
from ax_emulator.images import ImageFacts, read_images
from ax_emulator.runner import PREFILL_TOKEN_NUM, Runner, StdinLines, post_config, IDLE_EOF_PAUSE_SECONDS
from ax_emulator.scripted import vision_reply_text
from ax_emulator.tokenizer_client import TokenizerUnreachable, VisionTokenizer

INTERNVL_IMAGE_SIZE = 448
NOT_FOUND_LINE = 279  # not in any published transcript: docs/vlm-runners.md §3


class ScriptedVisionEngine(ScriptedEngine):
    """The scripted engine, told before each prefill which images the turn carries."""

    images: list[ImageFacts] = []

    def prefill(self, context_ids: list[int], user_line: str) -> None:
        descriptions = [facts.describe(i) for i, facts in enumerate(self.images, start=1)]
        text = vision_reply_text(user_line, descriptions, self.words, self.think)
        self.reply_ids = self.tokenizer.tokenize(text) + [self.eos_id]


class Family:
    """What differs between the two lines of runner: numbers and lines of their start-up."""

    def __init__(self, flags: dict):
        self.qwen = flags["emu_dialect"] == "vl_qwen"
        embed = flags["tokens_embed_size"]
        if self.qwen:
            self.width, self.height = flags["img_width"], flags["img_height"]
            patch = flags["patch_size"]
            patches = (self.width // patch) * (self.height // patch)
            self.image_tokens = patches // (flags["spatial_merge_size"] ** 2)
            self.patch_values = patch * patch * flags["temporal_patch_size"]
            self.patches = patches
            self.init_start, self.init_ok = 162, 456
            self.groups = [1, 128, 256, 384, 512]
            self.max_token_len = 1023
        else:
            self.width = self.height = INTERNVL_IMAGE_SIZE
            self.image_tokens = 256
            self.init_start, self.init_ok = 160, 448
            self.groups = [1] + list(range(128, 2049, 128))
            self.max_token_len = 2559
        self.embed = embed
        self.directories = self.qwen
        self.marker = "video >> " if self.qwen and flags["video"] else "image >> "

    def tensors(self) -> str:
        """The encoder's input and output, as the axmodel runner prints them at load."""
        if self.qwen:
            return ("input size: 1\n"
                    f"    name: {'hidden_states':>8} [unknown] [unknown]\n"
                    f"        1 x {self.patches} x {self.patch_values} x 3 size:{self.patches * self.patch_values * 3}\n\n"
                    "output size: 1\n"
                    f"    name: {'hidden_states_out':>8}\n"
                    f"        {self.image_tokens} x {self.embed} size:{self.image_tokens * self.embed * 4}\n\n")
        return ("input size: 1\n"
                f"    name: {'image':>8} [unknown] [unknown]\n"
                f"        1 x 3 x {self.height} x {self.width} size:{3 * self.height * self.width * 4}\n\n\n"
                "output size: 1\n"
                f"    name: {'output':>8}\n"
                f"        1 x {self.image_tokens} x {self.embed} size:{self.image_tokens * self.embed * 4}\n\n")


class VisionRunner(Runner):
    def __init__(self, flags: dict, out=None):
        super().__init__(flags, out)
        self.family = Family(flags)

    def make_engine(self, tokenizer, sampling: dict):
        return ScriptedVisionEngine(tokenizer, self.eos_id, self.flags["emu_reply_words"], self.flags["emu_think"],
                                    self.flags["emu_tokens_per_second"])

    def report_ttft(self, milliseconds: float) -> None:
        self.out.log("I", "Run", 796, f"ttft: {milliseconds:.2f} ms")

    def run(self) -> int:
        flags, out, family = self.flags, self.out, self.family
        tokenizer = VisionTokenizer(flags["filename_tokenizer_model"])
        out.log("I", "Init", family.init_start, "LLM init start")
        if self.faults.init_fail == "connect":
            return self.fail_init("Init", 30, f"connect {tokenizer.url} failed")
        try:
            bos_id, self.eos_id = tokenizer.bos_id(), tokenizer.eos_id()
            out.log("I", "Init", 34, f"connect {tokenizer.url} ok")
            start_token, context_token = tokenizer.img_start_token(), tokenizer.img_context_token()
        except TokenizerUnreachable:
            return self.fail_init("Init", 30, f"connect {tokenizer.url} failed")
        out.write(f"bos_id: {bos_id}, eos_id: {self.eos_id}\n")
        out.write(f"img_start_token: {start_token}\nimg_context_token: {context_token}\n")
        sampling = post_config(flags["post_config_path"])
        status = self.load_axmodels(lambda: self.make_engine(tokenizer, sampling))
        if status is not None:
            return status
        out.write(family.tensors())
        if family.qwen:
            out.log("I", "Init", 267, f"IMAGE_CONTEXT_TOKEN: {context_token}, IMAGE_START_TOKEN: {start_token}")
            out.log("I", "Init", 328, "image encoder output float32\n")
            lines = (340, 343, 351, 355, 359)
        else:
            out.log("I", "Init", 265, f"IMAGE_CONTEXT_TOKEN: {context_token}, IMAGE_START_TOKEN: {start_token}")
            out.log("I", "Init", 290, "image encoder input nchw@float32")
            out.log("I", "Init", 320, "image encoder output float32\n")
            out.log("I", "Init", 330, f"image_encoder_height : {family.height}, image_encoder_width: {family.width}")
            lines = (332, 335, 343, 347, 351)
        out.log("I", "Init", lines[0], f"max_token_len : {family.max_token_len}")
        out.log("I", "Init", lines[1], f"kv_cache_size : 256, kv_cache_num: {family.max_token_len}")
        out.log("I", "Init", lines[2], f"prefill_token_num : {PREFILL_TOKEN_NUM}")
        for group, size in enumerate(family.groups, start=1):
            out.log("I", "Init", lines[3], f"grp: {group}, prefill_max_token_num : {size}")
        out.log("I", "Init", lines[4], f"prefill_max_token_num : {family.groups[-1]}")
        if self.axcl:
            rows = "".join(f"|{d:>6}|{self.remain_cmm():>15}|\n" for d in flags["devices"].split(","))
            out.write("_" * 24 + "\n|    ID| remain cmm(MB)|\n" + "=" * 24 + "\n" + rows + "¯" * 24 + "\n")
        self.print_config(sampling)
        out.log("I", "Init", family.init_ok, "LLM init ok")
        out.write('Type "q" to exit, Ctrl+c to stop current running\n')
        stdin = StdinLines()
        while True:
            line = self._read(stdin, "prompt >> ")
            if line is None:
                time.sleep(IDLE_EOF_PAUSE_SECONDS)  # stdin closed: the marker again, forever
                continue
            self.stop_requested = False
            if line == "q":
                return self.quit()
            if not line:
                continue
            path = self._read(stdin, family.marker) or ""
            self.stop_requested = False  # nor does one at the image marker
            self._turn(tokenizer, line, path)

    def _read(self, stdin: StdinLines, marker: str) -> str | None:
        self.out.write(marker)
        self.out.flush()
        raw = stdin.readline()
        return None if raw is None else raw.decode(errors="replace")

    def _turn(self, tokenizer: VisionTokenizer, line: str, path: str) -> None:
        out, family = self.out, self.family
        images: list[ImageFacts] = []
        if path:
            images = read_images(path, directories=family.directories)
            if family.directories and Path(path).is_dir():
                for facts in images:  # ReadImages lists the frames of a directory
                    out.write(facts.path + "\n")
            if images:
                started = time.monotonic()
                time.sleep(self.flags["emu_vision_ms"] * len(images) / 1000)
                elapsed = (time.monotonic() - started) * 1000
                size = family.image_tokens * len(images) * family.embed
                out.log("I", "Encode", 539, f"image encode time : {elapsed:.6f} ms, size : {size}")
            else:
                out.log("E", "main", NOT_FOUND_LINE, f"image prompt({path}) not found")
        token_ids = tokenizer.encode_turn(line, len(images), family.width, family.image_tokens)
        count = len(token_ids)
        out.log("I", "Run", 625, f"input token num : {count}, prefill_split_num : "
                                 f"{max(1, math.ceil(count / PREFILL_TOKEN_NUM))}")
        for start in range(0, max(count, 1), PREFILL_TOKEN_NUM):
            out.log("I", "Run", 659, f"input_num_token:{min(PREFILL_TOKEN_NUM, count - start)}")
        self.engine.images = images
        _, _, average = self.generate(tokenizer, token_ids, line, max(family.max_token_len - count, 0))
        self.write_tail(949, average)
