"""The emulated `main_axcl_*` runner of generations A (legacy) and B (ctx, b_reset).

Output bytes, flush points, line numbers and failure strings follow the protocol reference.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from pathlib import Path

from ax_emulator import faults as fault_config
from ax_emulator.engines import ScriptedEngine, TransformersEngine, default_gguf
from ax_emulator.output import RunnerOutput, progress_bar
from ax_emulator.tokenizer_client import StatelessTokenizer, TokenizerUnreachable, UidTokenizer

TOTAL_CMM_MB = 7040
PREFILL_TOKEN_NUM = 128
CTX_PREFILL_GROUPS = [1, 512, 1024, 1536, 2048]  # prefill_max_kv_cache_num_grp of a 2k model
CTX_MAX_TOKEN_LEN = 2559
LEGACY_MAX_TOKEN_LEN = 1023
SET_DEVICE_BUSY = 0x8030040A
IDLE_EOF_PAUSE_SECONDS = 0.5
CHUNK_TOKENS = 3


class StdinLines:
    """getline on the raw fd: lines without their `\\n`; None once stdin is closed."""

    def __init__(self, fd: int = 0):
        self.fd = fd
        self.buffer = b""
        self.closed = False

    def readline(self) -> bytes | None:
        while b"\n" not in self.buffer:
            if self.closed:
                line, self.buffer = self.buffer, b""
                return line or None
            chunk = os.read(self.fd, 4096)
            self.closed = not chunk
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line


def post_config(name: str = "post_config.json") -> dict:
    """post_config.json of the working directory (the sampling settings), as the card loads it."""
    path = Path(name)
    return json.loads(path.read_text()) if path.is_file() else {}


class Runner:
    """Shared by both generations: start-up, the generation loop, signals and faults."""

    def __init__(self, flags: dict, out: RunnerOutput | None = None):
        self.flags = flags
        self.out = out or RunnerOutput()
        self.axcl = flags["emu_build"] == "axcl"
        self.device = str(flags.get("devices") or "0").split(",")[0]
        self.stop_requested = False
        self.faults = fault_config.current(flags["emu_faults"])
        self.turn_index = 0
        self.engine = None
        self.eos_id = -1

    # -- process-level behaviour -------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigint(self, signum, frame) -> None:
        self.stop_requested = True

    def _on_sigterm(self, signum, frame) -> None:
        fault_config.record_crash(self.device, self.faults.busy_after_crash_seconds)
        self._die(signal.SIGTERM)

    def _die(self, signum: int) -> None:
        """End as a killed process does: buffered output never reaches the reader."""
        self.out.discard()
        if signum != signal.SIGKILL:  # SIGKILL cannot have a handler, and needs none
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def crash(self) -> None:
        fault_config.record_crash(self.device, self.faults.busy_after_crash_seconds)
        self._die(getattr(signal, "SIG" + self.faults.crash_signal))

    def hang(self) -> None:
        """Stop forever; like a wedged card call, deaf to SIGINT but killable."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        while True:
            time.sleep(3600)

    def fail_init(self, func: str, line: int, message: str) -> int:
        self.out.log("E", func, line, message)
        self.out.log("E", "main", 206, "lLaMa.Init failed")
        self.out.flush()
        return 255

    # -- start-up ----------------------------------------------------------------------
    def load_axmodels(self, load_engine) -> int | None:
        """The progress bar from `tokenizer init ok` to `init post axmodel ok`, with the text
        engine loaded (`load_engine()`) while it runs; an exit status when an injected fault
        makes the load fail."""
        layers = self.flags["axmodel_num"]
        total = layers + 3
        step_pause = self.flags["emu_init_seconds"] / total
        started = time.monotonic()
        cmm_per_step = self.flags["emu_cmm_mb"] / (layers + 1)

        def bar(step: int, message: str) -> None:
            time.sleep(step_pause)
            self.out.write(progress_bar(step, total, time.monotonic() - started, message))
            self.out.flush()

        bar(1, "tokenizer init ok")
        if self.axcl:
            status = self._start_axcl_worker()
            if status is not None:
                return status
        if self.faults.init_fail == "embed_selector":
            return self.fail_init("Init", 151, f'embed_selector.Init({self.flags["filename_tokens_embed"]}, '
                                                f'{self.flags["tokens_embed_num"]}, {self.flags["tokens_embed_size"]}) failed')
        bar(2, "embed_selector init ok")
        self.engine = load_engine()
        for layer in range(layers):
            if self.faults.hang_at_init and layer == layers // 2:
                self.hang()
            if self.faults.init_fail == "init_axmodel" and layer == layers // 2:
                path = self.flags["template_filename_axmodel"].replace("%d", str(layer))
                return self.fail_init("Init", 178, f"init axmodel({path}) failed")
            remain = round(TOTAL_CMM_MB - cmm_per_step * (layer + 1))
            bar(layer + 3, f"init {layer} axmodel ok,remain_cmm({remain} MB)")
        bar(total, f"init post axmodel ok,remain_cmm({self.remain_cmm()} MB)")
        self.out.write("\n")
        return None

    def remain_cmm(self) -> int:
        return TOTAL_CMM_MB - self.flags["emu_cmm_mb"]

    def _start_axcl_worker(self) -> int | None:
        self.out.log("I", "run", 30, f"AXCLWorker start with devid {self.device}")
        if fault_config.device_busy(self.device) or self.faults.init_fail == "set_device":
            return self.fail_init("run", 48, f"Set AXCL device failed{{0x{SET_DEVICE_BUSY:8x}}}.")
        if self.faults.init_fail == "get_device":
            return self.fail_init("run", 42, "Get AXCL device failed{0x       0}, find total 0 device.")
        # The box's cards: AX_EMU_CARDS of them (default one); --devices names one of them.
        cards = int(os.environ.get("AX_EMU_CARDS", "1"))
        if not self.device.isdigit() or int(self.device) >= cards:
            return self.fail_init("run", 42, f"Get AXCL device failed{{0x       0}}, find total {cards} device.")
        if self.faults.init_fail == "axcl_timeout":
            time.sleep(5)  # the real runner waits 5 s for its worker thread
            return self.fail_init("Run", 322, "AXCLWorker initialization timeout")
        return None

    def print_config(self, sampling: dict) -> None:
        self.out.log("I", "load_config", 282, "load config:")
        self.out.write(json.dumps(sampling, indent=4, sort_keys=True) + "\n\n")

    def make_engine(self, tokenizer, sampling: dict):
        if self.flags["emu_engine"] == "transformers":
            gguf = Path(self.flags["emu_gguf"]) if self.flags["emu_gguf"] else default_gguf()
            return TransformersEngine(gguf, sampling)
        return ScriptedEngine(tokenizer, self.eos_id, self.flags["emu_reply_words"], self.flags["emu_think"],
                              self.flags["emu_tokens_per_second"], unescape=self.flags["emu_echo"] == "unescaped")

    # -- one reply ---------------------------------------------------------------------
    def generate(self, tokenizer, context_ids: list[int], user_line: str,
                 max_tokens: int) -> tuple[int, str, float]:
        """Run the engine until EOS, Ctrl-C or `max_tokens`; write the text in 3-token chunks.
        Returns (tokens generated, reply text, average tokens per second)."""
        self.faults = fault_config.current(self.flags["emu_faults"])
        self.turn_index += 1
        started = time.monotonic()
        self.engine.prefill(context_ids, user_line)
        first_token_at = None
        pending: list[int] = []
        reply = ""
        count = 0
        while count < max_tokens and not self.stop_requested:
            token = self.engine.next_token()
            if first_token_at is None:
                first_token_at = time.monotonic()
                self.report_ttft((first_token_at - started) * 1000)
            if token == self.eos_id:
                break
            count += 1
            pending.append(token)
            if len(pending) == CHUNK_TOKENS:
                reply += self._write_chunk(tokenizer, pending, first=len(reply) == 0)
                pending = []
            if count == self.faults.crash_after_tokens:
                self.crash()
            if count == self.faults.hang_after_tokens:
                self.hang()
            self._pace(first_token_at, count)
        if pending:
            reply += self._write_chunk(tokenizer, pending, first=len(reply) == 0)
        elapsed = time.monotonic() - (first_token_at or started)
        average = count / elapsed if elapsed > 0 else 0.0
        return count, reply, average

    def report_ttft(self, milliseconds: float) -> None:
        self.out.log("I", "Run", 1030, f"ttft: {milliseconds:.2f} ms")

    def _pace(self, first_token_at: float, count: int) -> None:
        if self.faults.tokens_per_second > 0:
            delay = first_token_at + count / self.faults.tokens_per_second - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def _write_chunk(self, tokenizer, token_ids: list[int], first: bool) -> str:
        text = tokenizer.decode(token_ids)
        data = text.encode()
        if first and self.faults.garbage:
            noise = random.Random(self.turn_index)
            data += b"\xff\xfe" + bytes(noise.randrange(256) for _ in range(8))
        if data:
            self.out.write(data)
            self.out.flush()
        return text

    def write_tail(self, line: int, average: float) -> None:
        """`\\n\\n` (flushed), then `hit eos` — buffered until the next marker."""
        self.out.write("\n\n")
        self.out.flush()
        self.out.log("N", "Run", line, f"hit eos,avg {average:.2f} token/s\n")

    def quit(self) -> int:
        if self.axcl:
            self.out.log("I", "run", 80, f"AXCLWorker exit with devid {self.device}")
        self.out.flush()
        return 0

    def read_prompts(self, marker: str):
        """The prompt loop: print the marker, read a line; yields the non-empty lines until `q`."""
        stdin = StdinLines()
        while True:
            self.out.write(marker)
            self.out.flush()
            raw = stdin.readline()
            if raw is None:
                # stdin closed: the real runner re-prints the marker forever; pausing keeps a
                # forgotten emulator from spinning a CPU core.
                time.sleep(IDLE_EOF_PAUSE_SECONDS)
                continue
            line = raw.decode(errors="replace")
            self.stop_requested = False  # a Ctrl-C at the idle marker stops nothing
            if line == "q":
                return
            if line:
                yield line


class CtxRunner(Runner):
    """Generation B: session tokenizer, KV cache kept across turns."""

    def run(self) -> int:
        flags, out = self.flags, self.out
        tokenizer = UidTokenizer(flags["url_tokenizer_model"])
        out.log("I", "Init", 136, "LLM init start")
        if self.faults.init_fail == "connect":
            return self.fail_init("Init", 30, f"connect {tokenizer.url} failed")
        try:
            uid = tokenizer.open_session()
            out.log("I", "Init", 34, f"connect {tokenizer.url} ok")
            out.log("I", "Init", 57, f"uid: {uid}")
            bos_id, self.eos_id = tokenizer.bos_id(), tokenizer.eos_id()
        except TokenizerUnreachable:
            return self.fail_init("Init", 30, f"connect {tokenizer.url} failed")
        out.write(f"bos_id: {bos_id}, eos_id: {self.eos_id}\n")
        sampling = post_config()
        status = self.load_axmodels(lambda: self.make_engine(tokenizer, sampling))
        if status is not None:
            return status
        out.log("I", "Init", 237, f"max_token_len : {CTX_MAX_TOKEN_LEN}")
        out.log("I", "Init", 240, f"kv_cache_size : 1024, kv_cache_num: {CTX_MAX_TOKEN_LEN}")
        out.log("I", "Init", 248, f"prefill_token_num : {PREFILL_TOKEN_NUM}")
        for group, size in enumerate(CTX_PREFILL_GROUPS, start=1):
            out.log("I", "Init", 252, f"grp: {group}, prefill_max_token_num : {size}")
        out.log("I", "Init", 256, f"prefill_max_token_num : {CTX_PREFILL_GROUPS[-1]}")
        if self.axcl:
            self._print_cmm_table()
        self.print_config(sampling)
        out.log("I", "Init", 279, "LLM init ok")
        if flags["emu_dialect"] == "b_reset":
            out.write('Type "q" to exit\nCtrl+c to stop current running\n"reset" to reset kvcache\n'
                      '"dd" to remove last conversation.\n')
        else:
            out.write('Type "q" to exit, Ctrl+c to stop current running\n')
        self.system_ids = self._reset_context(tokenizer)
        self.precompute_len = len(self.system_ids)
        self.turn_starts: list[int] = []
        self.last_reply = ""
        self._prefill_engine(self.system_ids)
        out.log("I", "main", 236, f"precompute_len: {self.precompute_len}")
        out.log("I", "main", 237, f"system_prompt: {flags['system_prompt']}")
        for line in self.read_prompts("prompt >> "):
            if flags["emu_dialect"] == "b_reset" and line in ("reset", "dd"):
                self._command(tokenizer, line)
            else:
                self._turn(tokenizer, line)
        return self.quit()

    def _print_cmm_table(self) -> None:
        rows = "".join(f"|{device:>6}|{self.remain_cmm():>15}|\n" for device in self.flags["devices"].split(","))
        self.out.write("_" * 24 + "\n|    ID| remain cmm(MB)|\n" + "=" * 24 + "\n" + rows + "¯" * 24 + "\n")

    def _reset_context(self, tokenizer: UidTokenizer) -> list[int]:
        """Tokenizer /reset with the system prompt; with --kvcache_path, its load or save lines."""
        system_ids = tokenizer.reset(self.flags["system_prompt"])
        path = self.flags["kvcache_path"]
        if not path:
            self._prefill_lines("GenerateKVCachePrefill", 335, 372, len(system_ids), with_group=True)
            return system_ids
        saved = Path(path) / "config.json"
        state = json.loads(saved.read_text()) if saved.is_file() else {}
        if state.get("system_prompt") == self.flags["system_prompt"]:
            self.out.log("I", "main", 221, f"load kvcache from path: {path} success,precompute_len: {len(system_ids)}")
            return system_ids
        self.out.log("E", "load_kvcache", 100,
                     f"k_cache {path}/k_cache_0.bin or v_cache {path}/v_cache_0.bin not exist")
        self.out.log("W", "main", 223, f"load kvcache from path: {path} failed,generate kvcache")
        self._prefill_lines("GenerateKVCachePrefill", 336, 373, len(system_ids), with_group=True)
        try:
            for name in ("k_cache_0.bin", "v_cache_0.bin"):
                (Path(path) / name).write_bytes(b"")
            saved.write_text(json.dumps({"system_prompt": self.flags["system_prompt"],
                                         "precompute_len": len(system_ids)}))
        except OSError:
            self.out.log("E", "save_kvcache", 49, "save kvcache failed")
            self.out.log("E", "main", 227, "save kvcache failed")
        self.out.log("I", "main", 229, f"generate kvcache to path: {path}")
        return system_ids

    def _prefill_lines(self, func: str, first_line: int, second_line: int, count: int, with_group: bool) -> None:
        split = max(1, math.ceil(count / PREFILL_TOKEN_NUM))
        message = f"input token num : {count}, prefill_split_num : {split}"
        if with_group:
            message += f" prefill_grpid : {self._group_for(count)}"
        self.out.log("I", func, first_line, message)
        self.out.log("I", func, second_line, f"input_num_token:{count}")

    @staticmethod
    def _group_for(tokens: int) -> int:
        """1-based prefill group: the first whose capacity holds `tokens` (else the last)."""
        for group, size in enumerate(CTX_PREFILL_GROUPS, start=1):
            if tokens <= size:
                return group
        return len(CTX_PREFILL_GROUPS)

    def _prefill_engine(self, context_ids: list[int]) -> None:
        if isinstance(self.engine, TransformersEngine):
            self.engine.prefill(context_ids, "")

    def _turn(self, tokenizer: UidTokenizer, line: str) -> None:
        out = self.out
        all_ids, diff = tokenizer.encode(line, self.last_reply)
        tokens = len(diff)
        group = self._group_for(self.precompute_len + tokens)
        capacity = CTX_PREFILL_GROUPS[group - 1]
        window = (CTX_PREFILL_GROUPS[-1] - self.precompute_len) // PREFILL_TOKEN_NUM * PREFILL_TOKEN_NUM
        out.log("I", "SetKVCache", 628, f"prefill_grpid:{group} kv_cache_num:{capacity} "
                                        f"precompute_len:{self.precompute_len} input_num_token:{tokens}")
        out.log("I", "SetKVCache", 631, f"current prefill_max_token_num:{window}")
        context_ids = all_ids
        if self.precompute_len + tokens > capacity:
            out.log("E", "SetKVCache", 641, f"precompute_len({self.precompute_len}) + input_num_token({tokens}) "
                                            f"> _attr.prefill_max_kv_cache_num_grp[{group - 1}]")
            # The card's behaviour from here is undefined; the emulator deterministically drops
            # the earlier turns and answers from the system prompt plus the tail of this prompt
            # that still fits (the tokenizer server keeps its longer history).
            room = CTX_PREFILL_GROUPS[-1] - len(self.system_ids) - 1
            diff = diff[-room:] if room > 0 else []
            self.precompute_len = len(self.system_ids)
            context_ids = self.system_ids + diff
            tokens = len(diff)
        out.log("I", "Run", 869, f"input token num : {tokens}, prefill_split_num : "
                                 f"{max(1, math.ceil(tokens / PREFILL_TOKEN_NUM))}")
        out.log("I", "Run", 901, f"input_num_token:{tokens}")
        self.turn_starts.append(self.precompute_len)
        self.precompute_len += tokens
        remaining = CTX_PREFILL_GROUPS[-1] - self.precompute_len
        count, self.last_reply, average = self.generate(tokenizer, context_ids, line, max(remaining, 0))
        self.precompute_len += count
        self.write_tail(1182, average)
        self._log_kv_cache()

    def _log_kv_cache(self) -> None:
        self.out.log("I", "GetKVCache", 597, f"precompute_len:{self.precompute_len}, "
                                             f"remaining:{CTX_PREFILL_GROUPS[-1] - self.precompute_len}")

    def _command(self, tokenizer: UidTokenizer, command: str) -> None:
        """`reset` starts the conversation over; `dd` forgets the last turn."""
        if command == "reset":
            self.system_ids = self._reset_context(tokenizer)
            self.precompute_len = len(self.system_ids)
            self.turn_starts.clear()
            self.last_reply = ""
            self._prefill_engine(self.system_ids)
            self.out.log("I", "main", 236, f"precompute_len: {self.precompute_len}")
        elif self.turn_starts:
            self.precompute_len = self.turn_starts.pop()
            self.last_reply = ""
            self.out.log("I", "main", 262, f"remove last conversation, precompute_len: {self.precompute_len}")
        self._log_kv_cache()


class LegacyRunner(Runner):
    """Generation A: stateless tokenizer, every turn starts fresh, `>> ` marker."""

    def report_ttft(self, milliseconds: float) -> None:
        """The legacy runner does not report the time to first token."""

    def run(self) -> int:
        flags, out = self.flags, self.out
        tokenizer = StatelessTokenizer(flags["filename_tokenizer_model"])
        out.write("build time: Feb 13 2025 15:44:57\n")
        out.log("I", "Init", 111, "LLM init start")
        if self.faults.init_fail == "connect":
            return self.fail_init("Init", 105, f"connect {tokenizer.url} failed")
        try:
            bos_id, self.eos_id = tokenizer.bos_id(), tokenizer.eos_id()
        except TokenizerUnreachable:
            # The legacy runner does not check the tokenizer: it dies on the failed reply.
            self._die(signal.SIGSEGV)
        out.write(f"bos_id: {bos_id}, eos_id: {self.eos_id}\n")
        sampling = post_config()
        status = self.load_axmodels(lambda: self.make_engine(tokenizer, sampling))
        if status is not None:
            return status
        out.log("I", "Init", 226, f"max_token_len : {LEGACY_MAX_TOKEN_LEN}")
        out.log("I", "Init", 231, f"kv_cache_size : 256, kv_cache_num: {LEGACY_MAX_TOKEN_LEN}")
        self.print_config(sampling)
        out.log("I", "Init", 288, "LLM init ok")
        if flags["prompt"]:
            self._turn(tokenizer, flags["prompt"])
        if not flags["continue"]:
            return self.quit()
        out.write('Type "q" to exit, Ctrl+c to stop current running\n')
        for line in self.read_prompts(">> "):
            self._turn(tokenizer, line)
        return self.quit()

    def _turn(self, tokenizer: StatelessTokenizer, line: str) -> None:
        token_ids = tokenizer.encode(line)
        if len(token_ids) > PREFILL_TOKEN_NUM:
            self.out.log("E", "Encode", 394, f"input_ids({len(token_ids)}) > prefill_token_num({PREFILL_TOKEN_NUM})")
            return
        max_tokens = LEGACY_MAX_TOKEN_LEN - len(token_ids)
        _, _, average = self.generate(tokenizer, token_ids, line, max_tokens)
        self.write_tail(610, average)


def main(flags: dict) -> int:
    if flags["emu_dialect"].startswith("vl_"):
        from ax_emulator.vision import VisionRunner

        runner = VisionRunner(flags)
    else:
        runner = LegacyRunner(flags) if flags["emu_dialect"] == "a" else CtxRunner(flags)
    runner.install_signal_handlers()
    try:
        return runner.run()
    finally:
        runner.out.flush()
