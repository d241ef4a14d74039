"""Dialect C: `ax-emulator run <dir>` mirrors the 2026 `axllm run <dir>`.

No run script and no tokenizer server: `<dir>/config.json` names the tokenizer folder, which
is loaded in-process with transformers. Logs are `HH:MM:SS.mmm LVL Func:line | msg`; the
buffering and flush points are those of the older runners.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ax_emulator import faults as fault_config
from ax_emulator.engines import ScriptedEngine, TransformersEngine, default_gguf
from ax_emulator.output import RunnerOutput, clock_log_line
from ax_emulator.runner import CTX_PREFILL_GROUPS, IDLE_EOF_PAUSE_SECONDS, Runner, StdinLines

COMMANDS = (
    "Commands:\n"
    "  /q, /exit   quit\n"
    "  /reset      reset kvcache\n"
    "  /dd         remove last conversation\n"
    "  /pp         print precompute_len\n"
    "  Ctrl+C      stop current running\n"
)


class LocalTokenizer:
    """The tokenizer inside the axllm process: a chat-templated conversation plus decoding."""

    def __init__(self, folder: Path, system_prompt: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.system_prompt = system_prompt
        self.messages: list[dict] = []
        self.reply_ids: list[int] = []
        self.emitted = ""

    def reset(self) -> list[int]:
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return self._render(generation_prompt=False) if self.messages else []

    def encode(self, text: str, last_reply: str) -> list[int]:
        if last_reply:
            self.messages.append({"role": "assistant", "content": last_reply})
        self.messages.append({"role": "user", "content": text})
        self.reply_ids, self.emitted = [], ""
        return self._render(generation_prompt=True)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, token_ids: list[int]) -> str:
        """The text these ids add to the reply; "" while a character is still incomplete."""
        self.reply_ids += token_ids
        text = self.tokenizer.decode(self.reply_ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def _render(self, generation_prompt: bool) -> list[int]:
        rendered = self.tokenizer.apply_chat_template(
            self.messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True)
        return list(rendered["input_ids"])


class AxllmRunner(Runner):
    def __init__(self, model_dir: Path, config: dict):
        settings = {
            "emu_build": "axcl", "devices": "0", "emu_faults": "", "axmodel_num": 30, "emu_cmm_mb": 600,
            "emu_engine": "scripted", "emu_init_seconds": 0.3, "emu_tokens_per_second": 50.0,
            "emu_reply_words": 12, "emu_think": False, "emu_gguf": "",
        }
        settings.update({key: value for key, value in config.items() if key in settings})
        super().__init__(settings, RunnerOutput())
        self.model_dir = model_dir
        self.config = config

    def log(self, level: str, func: str, line: int, message: str) -> None:
        self.out.write(clock_log_line(level, func, line, message))

    def run(self) -> int:
        self.log("INF", "Init", 120, "LLM init start")
        if fault_config.device_busy(self.device) or self.faults.init_fail:
            self.log("ERR", "Init", 131, "Set AXCL device failed{0x8030040a}.")
            self.log("ERR", "main", 88, "LLM init failed")
            self.out.flush()
            return 255
        time.sleep(self.flags["emu_init_seconds"])
        tokenizer = LocalTokenizer(self.model_dir / self.config["tokenizer_path"], self.config.get("system_prompt", ""))
        self.eos_id = tokenizer.tokenizer.eos_token_id
        if self.flags["emu_engine"] == "transformers":
            gguf = Path(self.flags["emu_gguf"]) if self.flags["emu_gguf"] else default_gguf()
            self.engine = TransformersEngine(gguf, self.config.get("post_config", {}))
        else:
            self.engine = ScriptedEngine(tokenizer, self.eos_id, self.flags["emu_reply_words"],
                                         self.flags["emu_think"], self.flags["emu_tokens_per_second"])
        self.log("INF", "Init", 448, "LLM init ok")
        self.out.write(COMMANDS)
        system_ids = tokenizer.reset()
        precompute_len, last_reply = len(system_ids), ""
        stdin = StdinLines()
        while True:
            self.out.write("prompt >> ")
            self.out.flush()
            raw = stdin.readline()
            if raw is None:
                time.sleep(IDLE_EOF_PAUSE_SECONDS)  # stdin closed: re-print the marker, gently
                continue
            line = raw.decode(errors="replace")
            self.stop_requested = False
            if line in ("/q", "/exit"):
                self.out.flush()
                return 0
            if line == "/reset":
                system_ids = tokenizer.reset()
                precompute_len, last_reply = len(system_ids), ""
                self.log("INF", "main", 301, "reset kvcache ok")
            elif line == "/pp":
                self.log("INF", "main", 322, f"precompute_len: {precompute_len}")
            elif line and line != "/dd":
                context_ids = tokenizer.encode(line, last_reply)
                precompute_len = len(context_ids)
                remaining = CTX_PREFILL_GROUPS[-1] - precompute_len
                count, last_reply, average = self.generate(tokenizer, context_ids, line, max(remaining, 0))
                self.out.write("\n\n")
                self.out.flush()
                precompute_len += count
                self.log("NTC", "Run", 1145, f"hit eos,avg {average:.2f} token/s")
                self.log("INF", "GetKVCache", 721, f"precompute_len:{precompute_len}, "
                                                   f"remaining:{CTX_PREFILL_GROUPS[-1] - precompute_len}")

    def report_ttft(self, milliseconds: float) -> None:
        self.log("INF", "Run", 1023, f"ttft: {milliseconds:.2f} ms")


def main(model_dir: str) -> int:
    folder = Path(model_dir)
    config = json.loads((folder / "config.json").read_text())
    runner = AxllmRunner(folder, config)
    runner.install_signal_handlers()
    try:
        return runner.run()
    finally:
        runner.out.flush()
