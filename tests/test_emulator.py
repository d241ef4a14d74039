"""The virtual card against the protocol reference: bytes, flush bursts, input, signals, dialects."""
from __future__ import annotations

import json
import re
import signal
import subprocess

import pytest

from ax_emulator.output import log_line, progress_bar
from ax_emulator.scripted import reply_text
from harness import net
from harness.paths import REPO_ROOT
from emulator_support import emulator, plain

GREEN, PURPLE, END = b"\x1b[1;30;32m", b"\x1b[1;30;35m", b"\x1b[0m"
# The Qwen3-4B run script of the reference, verbatim but for the runner's name and the port.
REFERENCE_B_SCRIPT = """ax-emulator \\
--system_prompt "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." \\
--template_filename_axmodel "qwen3-4b-ax650/qwen3_p128_l%d_together.axmodel" \\
--axmodel_num 36 \\
--url_tokenizer_model "http://127.0.0.1:{port}" \\
--filename_post_axmodel qwen3-4b-ax650/qwen3_post.axmodel \\
--use_mmap_load_embed 1 \\
--live_print 1 \\
--devices 0 \\
--emu_init_seconds 0.2
"""
LEGACY_SCRIPT = """ax-emulator \\
--emu_dialect a \\
--template_filename_axmodel "deepseek-r1-1.5b-ax650/qwen2_p128_l%d_together.axmodel" \\
--axmodel_num 28 \\
--tokenizer_type 2 \\
--filename_tokenizer_model "http://127.0.0.1:{port}" \\
--filename_post_axmodel deepseek-r1-1.5b-ax650/qwen2_post.axmodel \\
--bos 0 --eos 0 \\
--live_print 1 \\
--prompt "$1" \\
--continue 1 \\
--emu_init_seconds 0.2
"""


def script(tmp_path, text: str, port: int):
    path = tmp_path / "run_test.sh"
    path.write_text(text.format(port=port))
    return path


def log(level_colour: bytes, level: str, func: str, line: int, message: str) -> bytes:
    return level_colour + f"[{level}][{func:>32}][{line:4d}]: {message}".encode() + END + b"\n"


# -- pure formatting -----------------------------------------------------------------------

def test_log_line_and_bar_bytes_match_the_reference():
    assert log_line("I", "Init", 136, "LLM init start") == \
        "\x1b[1;30;32m[I][                            Init][ 136]: LLM init start\x1b[0m\n"
    assert progress_bar(31, 31, 64.75, "init post axmodel ok,remain_cmm(3788 MB)") == (
        "\x1b[1;30;33m\r100% | " + "█" * 32 + " |  31 /  31 [64.75s<64.75s, 0.48 count/s] "
        "\x1b[1;30;32minit post axmodel ok,remain_cmm(3788 MB)\x1b[0m")
    # cqdm's loops round up: step 1 of 31 draws 2 blocks and 31 blanks
    assert "| " + "█" * 2 + " " * 31 + " |   1 /  31" in progress_bar(1, 31, 0.5, "tokenizer init ok")


def test_scripted_reply_echoes_the_line_deterministically():
    text = reply_text("what is 2+2?", 5, think=False)
    assert text.startswith("You said: what is 2+2?.") and len(text.split()) == 5 + 5
    assert reply_text("what is 2+2?", 5, False) == text
    assert reply_text("other", 5, False) != text
    thought = reply_text("hi", 3, think=True)
    assert thought.startswith("<think>\n") and "\n</think>\n\n" in thought and thought.endswith(reply_text("hi", 3, False))


# -- flags -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, error", [
    (["--devices", "0", "--foo", "1"], "undefined option: --foo"),
    (["--devices", "0", "--live_print", "true"], "option value is invalid: --live_print=true"),
    (["--axmodel_num=28"], "need option: --devices"),
    (["--devices", "0", "--prompt", "hi"], "undefined option: --prompt"),
    (["--devices", "0", "--tokenizer_type", "2"], "undefined option: --tokenizer_type"),
    (["--emu_dialect", "a", "--continue", "1"], "need option: --prompt"),
])
def test_flag_errors_print_the_error_and_usage_and_exit_1(args, error):
    result = subprocess.run(emulator(*args), capture_output=True, timeout=30)
    assert result.returncode == 1
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert lines[0] == error
    assert lines[1].startswith("usage: ax-emulator ") and lines[2] == "options:"
    assert lines[-1] == "  -?, --help                         print this message"


def test_both_flag_forms_and_the_ax650_build(emulator_tokenizer, runners):
    # ax650 build: no --devices needed, --tokenizer_type accepted, no AXCLWorker lines
    runner = runners(emulator("--emu_build=ax650", "--tokenizer_type", "2", f"--url_tokenizer_model={emulator_tokenizer.url}",
                              "--axmodel_num=2", "--emu_init_seconds", "0"))
    out = runner.read_until(b"prompt >> ")
    assert b"AXCLWorker" not in out and b"remain cmm(MB)" not in out
    assert b"|   5 /   5 [" in out


def test_help_documents_every_flag_fault_and_variable():
    from ax_emulator.faults import FAULT_HELP
    from ax_emulator.flags import COMMON_FLAGS, CTX_FLAGS, EMULATOR_FLAGS, LEGACY_FLAGS

    result = subprocess.run(emulator("--help"), capture_output=True, timeout=30, text=True)
    assert result.returncode == 0
    for flag in COMMON_FLAGS + CTX_FLAGS + LEGACY_FLAGS + EMULATOR_FLAGS:
        assert f"--{flag.name} " in result.stdout
    for key in FAULT_HELP:
        assert f"  {key} " in result.stdout
    for variable in ("AX_EMU_FAULTS", "AX_EMU_FAULT_FILE", "AX_EMU_STATE_DIR", "--devices"):
        assert variable in result.stdout


# -- dialect B: replay of the reference transcript, write by write ------------------------

def test_b_session_writes_match_the_reference(emulator_tokenizer, runners, tmp_path):
    """Every write(2) of the runner is one packet here: the flush points are checked exactly."""
    runner = runners(["/bin/sh", str(script(tmp_path, REFERENCE_B_SCRIPT, emulator_tokenizer.port))],
                     cwd=REPO_ROOT / "model" / "scripted-echo", packets=True)
    runner.read_until(b"prompt >> ")
    writes = runner.chunks
    head = writes[0]
    assert head.startswith(log(GREEN, "I", "Init", 136, "LLM init start")
                           + log(GREEN, "I", "Init", 34, f"connect {emulator_tokenizer.url} ok"))
    assert re.search(rb"\[I\]\[ {28}Init\]\[  57\]: uid: [0-9a-f-]{36}\x1b\[0m\nbos_id: 1, eos_id: 2\n\x1b\[1;30;33m\r  2% \| ",
                     head)
    assert head.endswith(b"\x1b[1;30;32mtokenizer init ok\x1b[0m")
    # the AXCLWorker line waits in the buffer and leaves with the next bar update
    assert writes[1].startswith(log(GREEN, "I", "run", 30, "AXCLWorker start with devid 0") + b"\x1b[1;30;33m\r  5% | ")
    bars = writes[:39]
    assert all(b"\r" in bar and not bar.endswith(b"\n") for bar in bars)
    assert [re.search(rb"\| +(\d+) / +39 \[", bar).group(1) for bar in bars] == [str(i).encode() for i in range(1, 40)]
    assert bars[2].endswith(b"init 0 axmodel ok,remain_cmm(7024 MB)\x1b[0m")
    assert bars[-1].endswith(b"\x1b[1;30;32minit post axmodel ok,remain_cmm(6440 MB)\x1b[0m")
    init = writes[39]
    post_config = json.loads((REPO_ROOT / "model" / "scripted-echo" / "post_config.json").read_text())
    expected_init = (
        b"\n" + log(GREEN, "I", "Init", 237, "max_token_len : 2559")
        + log(GREEN, "I", "Init", 240, "kv_cache_size : 1024, kv_cache_num: 2559")
        + log(GREEN, "I", "Init", 248, "prefill_token_num : 128")
        + b"".join(log(GREEN, "I", "Init", 252, f"grp: {g}, prefill_max_token_num : {n}")
                   for g, n in enumerate([1, 512, 1024, 1536, 2048], start=1))
        + log(GREEN, "I", "Init", 256, "prefill_max_token_num : 2048")
        + "________________________\n|    ID| remain cmm(MB)|\n========================\n"
          "|     0|           6440|\n¯¯¯¯¯¯¯¯¯¯¯¯¯¯¯¯¯¯¯¯¯¯¯¯\n".encode()
        + log(GREEN, "I", "load_config", 282, "load config:")
        + json.dumps(post_config, indent=4, sort_keys=True).encode() + b"\n\n"
        + log(GREEN, "I", "Init", 279, "LLM init ok")
        + b'Type "q" to exit, Ctrl+c to stop current running\n'
    )
    assert init.startswith(expected_init)
    system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    match = re.fullmatch(
        re.escape(expected_init)
        + rb"\x1b\[1;30;32m\[I\]\[ {10}GenerateKVCachePrefill\]\[ 335\]: input token num : (\d+), prefill_split_num : 1 prefill_grpid : 2\x1b\[0m\n"
        + rb"\x1b\[1;30;32m\[I\]\[ {10}GenerateKVCachePrefill\]\[ 372\]: input_num_token:\1\x1b\[0m\n"
        + rb"\x1b\[1;30;32m\[I\]\[ {28}main\]\[ 236\]: precompute_len: \1\x1b\[0m\n"
        + re.escape(log(GREEN, "I", "main", 237, f"system_prompt: {system}") + b"prompt >> "),
        init)
    assert match, init
    system_tokens = int(match.group(1))

    runner.send("hello\n")
    runner.read_until(b"prompt >> ", start=len(runner.output))
    turn = runner.chunks[40:]
    first = re.fullmatch(
        rb"\x1b\[1;30;32m\[I\]\[ {22}SetKVCache\]\[ 628\]: prefill_grpid:2 kv_cache_num:512 precompute_len:"
        + str(system_tokens).encode() + rb" input_num_token:(\d+)\x1b\[0m\n"
        + re.escape(log(GREEN, "I", "SetKVCache", 631, "current prefill_max_token_num:1920"))
        + rb"\x1b\[1;30;32m\[I\]\[ {29}Run\]\[ 869\]: input token num : \1, prefill_split_num : 1\x1b\[0m\n"
        + rb"\x1b\[1;30;32m\[I\]\[ {29}Run\]\[ 901\]: input_num_token:\1\x1b\[0m\n"
        + rb"\x1b\[1;30;32m\[I\]\[ {29}Run\]\[1030\]: ttft: \d+\.\d\d ms\x1b\[0m\n"
        + rb"(You said:?)", turn[0])
    assert first, turn[0]  # ttft leaves together with the first text chunk
    prompt_tokens = int(first.group(1))
    text_chunks = turn[:-2]
    reply = first.group(2) + b"".join(text_chunks[1:])
    assert reply.decode() == reply_text("hello", 12, False)
    assert turn[-2] == b"\n\n"
    tail = re.fullmatch(
        rb"\x1b\[1;30;35m\[N\]\[ {29}Run\]\[1182\]: hit eos,avg \d+\.\d\d token/s\n\x1b\[0m\n"
        rb"\x1b\[1;30;32m\[I\]\[ {22}GetKVCache\]\[ 597\]: precompute_len:(\d+), remaining:(\d+)\x1b\[0m\nprompt >> ",
        turn[-1])
    assert tail, turn[-1]  # hit eos leaves together with the next marker
    reply_tokens = len(TokenizerReply.tokens(emulator_tokenizer, reply.decode()))
    assert int(tail.group(1)) == system_tokens + prompt_tokens + reply_tokens
    assert int(tail.group(2)) == 2048 - int(tail.group(1))

    runner.send("q\n")
    assert runner.wait() == 0
    runner.quiet_for(0.2)
    assert runner.chunks[-1] == log(GREEN, "I", "run", 80, "AXCLWorker exit with devid 0")


class TokenizerReply:
    @staticmethod
    def tokens(server, text: str) -> list[int]:
        return net.post(f"{server.url}/tokenize", json={"text": text}).json()["token_ids"]


def test_pipe_reader_sees_the_bursts(emulator_tokenizer, runners):
    """Read as a daemon does (os.read on a pipe): the log lines arrive late, in bursts."""
    runner = runners(emulator("--devices", "0", f"--url_tokenizer_model={emulator_tokenizer.url}", "--axmodel_num", "4",
                              "--emu_init_seconds", "0.2", "--emu_tokens_per_second", "8"))
    runner.read_until(b"prompt >> ")
    assert b"prompt >> " in runner.chunk_with(b"LLM init ok")
    runner.send("burst\n")
    runner.read_until(b"prompt >> ", start=len(runner.output))
    assert b"You said" in runner.chunk_with(b"ttft: ")
    hit_eos = runner.chunk_with(b"hit eos")
    assert hit_eos.endswith(b"prompt >> ") and b"You said" not in hit_eos


# -- input handling ----------------------------------------------------------------------------

def test_multiline_empty_lines_and_q(emulator_tokenizer, runners):
    runner = runners(emulator("--devices", "0", f"--url_tokenizer_model={emulator_tokenizer.url}", "--axmodel_num", "2",
                              "--emu_init_seconds", "0", "--emu_tokens_per_second", "0", "--emu_reply_words", "0"))
    runner.read_until(b"prompt >> ")
    runner.send("first\n\nsecond\nq\n")
    assert runner.wait() == 0
    runner.quiet_for(0.3)
    text = plain(runner.output)
    assert text.count("hit eos") == 2
    assert "You said: first." in text and "You said: second." in text
    assert text.count("prompt >> ") == 4  # start, after first, the empty line, after second
    assert text.endswith("AXCLWorker exit with devid 0\n")


def test_end_of_input_keeps_printing_the_marker(emulator_tokenizer, runners):
    runner = runners(emulator("--devices", "0", f"--url_tokenizer_model={emulator_tokenizer.url}", "--axmodel_num", "2",
                              "--emu_init_seconds", "0"))
    runner.read_until(b"prompt >> ")
    runner.process.stdin.close()
    later = runner.quiet_for(1.3)
    assert later.count(b"prompt >> ") >= 2
    assert runner.process.poll() is None


def test_sigint_stops_the_reply_and_the_runner_stays_usable(emulator_tokenizer, runners, tmp_path):
    runner = runners(["/bin/sh", str(REPO_ROOT / "model" / "scripted-echo" / "run_scripted_echo_axcl_x86.sh"),
                      str(emulator_tokenizer.port)], cwd=REPO_ROOT / "model" / "scripted-echo",
                     env={"AX_EMU_FAULTS": "tokens_per_second=10"})
    runner.read_until(b"prompt >> ", timeout=60)
    runner.signal(signal.SIGINT)  # idle: harmless
    assert runner.quiet_for(0.3) == b""
    runner.send("a long answer please\n")
    start = len(runner.output)
    runner.read_until(b"You said", start=start)
    runner.signal(signal.SIGINT)
    runner.read_until(b"prompt >> ", start=start, timeout=10)
    turn = plain(runner.output[start:])
    assert "\n\n[N][" in turn and "hit eos,avg" in turn and "GetKVCache" in turn
    assert reply_text("a long answer please", 12, False) not in turn  # cut short
    runner.send("again\n")
    runner.read_until(b"prompt >> ", start=len(runner.output))
    assert reply_text("again", 12, False) in plain(runner.output)


# -- b_reset, kvcache, overflow, dialect A, dialect C ------------------------------------------

def precompute_lengths(output: bytes) -> list[int]:
    return [int(n) for n in re.findall(rb"GetKVCache\]\[ 597\]: precompute_len:(\d+)", output)]


def test_b_reset_dialect_accepts_reset_and_dd(emulator_tokenizer, runners):
    runner = runners(["/bin/sh", "run_scripted_echo_axcl_x86.sh", str(emulator_tokenizer.port)],
                     cwd=REPO_ROOT / "model" / "scripted-echo")
    out = runner.read_until(b"prompt >> ", timeout=60)
    assert (b'Type "q" to exit\nCtrl+c to stop current running\n"reset" to reset kvcache\n'
            b'"dd" to remove last conversation.\n') in out
    system = int(re.search(rb"precompute_len: (\d+)", out).group(1))
    for line in ("one\n", "two\n", "dd\n", "reset\n"):
        runner.send(line)
        runner.read_until(b"prompt >> ", start=len(runner.output))
    first, second, after_dd, after_reset = precompute_lengths(runner.output)
    assert system < first < second and after_dd == first and after_reset == system


def test_kvcache_path_generates_then_loads(emulator_tokenizer, runners, tmp_path):
    (tmp_path / "kvcache").mkdir()
    args = emulator("--devices", "0", f"--url_tokenizer_model={emulator_tokenizer.url}", "--axmodel_num", "2",
                    "--emu_init_seconds", "0", "--system_prompt", "Be brief.", "--kvcache_path", "./kvcache")
    first = runners(args, cwd=tmp_path)
    out = first.read_until(b"prompt >> ")
    assert log(b"\x1b[1;30;33m", "W", "main", 223, "load kvcache from path: ./kvcache failed,generate kvcache") in out
    assert log(GREEN, "I", "main", 229, "generate kvcache to path: ./kvcache") in out
    first.send("q\n")
    assert first.wait() == 0
    second = runners(args, cwd=tmp_path)
    out = second.read_until(b"prompt >> ")
    count = int(re.search(rb"precompute_len: (\d+)", out).group(1))
    assert log(GREEN, "I", "main", 221, f"load kvcache from path: ./kvcache success,precompute_len: {count}") in out
    assert b"GenerateKVCachePrefill" not in out


def test_context_overflow_prints_the_setkvcache_error(emulator_tokenizer, runners):
    runner = runners(emulator("--devices", "0", f"--url_tokenizer_model={emulator_tokenizer.url}", "--axmodel_num", "2",
                              "--emu_init_seconds", "0", "--emu_reply_words", "0"))
    runner.read_until(b"prompt >> ")
    runner.send("apple " * 2100 + "\n")
    runner.read_until(b"prompt >> ", start=len(runner.output))
    text = plain(runner.output)
    assert re.search(r"\[E\]\[ +SetKVCache\]\[ 641\]: precompute_len\(\d+\) \+ input_num_token\(\d+\) "
                     r"> _attr\.prefill_max_kv_cache_num_grp\[4\]", text)
    assert "hit eos" in text  # it still answers (from a truncated context) and stays up


def test_legacy_dialect_answers_the_prompt_then_loops(emulator_tokenizer, runners, tmp_path):
    runner = runners(["/bin/sh", str(script(tmp_path, LEGACY_SCRIPT, emulator_tokenizer.port)), "who are you?"],
                     cwd=tmp_path, packets=True)
    runner.read_until(b">> ")
    out = runner.output
    assert out.startswith(b"build time: Feb 13 2025 15:44:57\n" + log(GREEN, "I", "Init", 111, "LLM init start")
                          + b"bos_id: 1, eos_id: 2\n\x1b[1;30;33m\r")
    assert log(GREEN, "I", "Init", 226, "max_token_len : 1023") in out
    assert log(GREEN, "I", "Init", 231, "kv_cache_size : 256, kv_cache_num: 1023") in out
    assert b"ttft" not in out and b"SetKVCache" not in out and b"GetKVCache" not in out
    answer_at = out.index(reply_text("who are you?", 12, False).encode())
    assert out.index(log(GREEN, "I", "Init", 288, "LLM init ok")) < answer_at
    assert runner.chunks[-2] == b"\n\n"
    assert re.fullmatch(rb"\x1b\[1;30;35m\[N\]\[ {29}Run\]\[ 610\]: hit eos,avg \d+\.\d\d token/s\n\x1b\[0m\n"
                        rb'Type "q" to exit, Ctrl\+c to stop current running\n>> ', runner.chunks[-1])
    runner.send("second\n")
    runner.read_until(b">> ", start=len(runner.output))
    assert runner.chunks[-1].endswith(b"\x1b[0m\n>> ")
    runner.send("q\n")
    assert runner.wait() == 0


def test_axllm_dialect(runners, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "tokenizer_path": str(REPO_ROOT / "model" / "smollm2-135m" / "tokenizer"),
        "system_prompt": "Be brief.", "emu_init_seconds": 0, "emu_reply_words": 2}))
    runner = runners(emulator("run", str(tmp_path)))
    out = runner.read_until(b"prompt >> ", timeout=60)
    assert re.match(rb"\d\d:\d\d:\d\d\.\d{3} INF Init:120 \| LLM init start\n", out)
    assert re.search(rb"INF Init:448 \| LLM init ok\nCommands:\n  /q, /exit", out)
    runner.send("hey\n")
    runner.read_until(b"prompt >> ", start=len(runner.output))
    turn = runner.output.decode()
    assert re.search(r"INF Run:1023 \| ttft: \d+\.\d\d ms\n" + re.escape(reply_text("hey", 2, False)) + r"\n\n"
                     r"\d\d:\d\d:\d\d\.\d{3} NTC Run:1145 \| hit eos,avg \d+\.\d\d token/s\n"
                     r"\d\d:\d\d:\d\d\.\d{3} INF GetKVCache:721 \| precompute_len:\d+, remaining:\d+\nprompt >> $", turn)
    runner.send("/reset\n/exit\n")
    assert runner.wait() == 0


def test_tokenizer_unreachable(runners):
    from harness.net import free_port

    url = f"http://127.0.0.1:{free_port()}"
    runner = runners(emulator("--devices", "0", f"--url_tokenizer_model={url}"))
    assert runner.wait() == 255
    runner.quiet_for(0.2)
    assert runner.output == (log(GREEN, "I", "Init", 136, "LLM init start")
                             + log(b"\x1b[1;30;31m", "E", "Init", 30, f"connect {url} failed")
                             + log(b"\x1b[1;30;31m", "E", "main", 206, "lLaMa.Init failed"))
    legacy = runners(emulator("--emu_dialect", "a", "--prompt", "", f"--filename_tokenizer_model={url}"))
    assert legacy.wait() == -signal.SIGSEGV
