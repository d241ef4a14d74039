"""Every injected fault of the virtual card, with a real tokenizer server and real processes."""
from __future__ import annotations

import json
import signal
import time

import pytest

from ax_emulator.scripted import reply_text
from emulator_support import Runner, emulator, plain

RED = b"\x1b[1;30;31m"


@pytest.fixture
def start(emulator_tokenizer, tmp_path):
    started: list[Runner] = []

    def start_runner(*flags: str, env: dict | None = None) -> Runner:
        runner = Runner(emulator("--devices", "0", f"--url_tokenizer_model={emulator_tokenizer.url}", "--axmodel_num", "4",
                                 "--emu_init_seconds", "0", *flags),
                        cwd=tmp_path, env={"AX_EMU_STATE_DIR": str(tmp_path), **(env or {})})
        started.append(runner)
        return runner

    yield start_runner
    for runner in started:
        runner.close()


def error_line(func: str, line: int, message: str) -> bytes:
    return RED + f"[E][{func:>32}][{line:4d}]: {message}".encode() + b"\x1b[0m\n"


@pytest.mark.parametrize("step, func, line, message", [
    ("connect", "Init", 30, "connect {url} failed"),
    ("set_device", "run", 48, "Set AXCL device failed{0x8030040a}."),
    ("get_device", "run", 42, "Get AXCL device failed{0x       0}, find total 0 device."),
    ("axcl_timeout", "Run", 322, "AXCLWorker initialization timeout"),
    ("init_axmodel", "Init", 178, "init axmodel(m_l2.axmodel) failed"),
    ("embed_selector", "Init", 151, "embed_selector.Init(e.bin, 49152, 576) failed"),
])
def test_init_failures(start, emulator_tokenizer, step, func, line, message):
    runner = start("--template_filename_axmodel", "m_l%d.axmodel", "--filename_tokens_embed", "e.bin",
                   "--emu_faults", f"init_fail={step}")
    assert runner.wait(timeout=20) == 255
    runner.quiet_for(0.2)
    assert runner.output.endswith(error_line(func, line, message.replace("{url}", emulator_tokenizer.url))
                                  + error_line("main", 206, "lLaMa.Init failed"))
    assert b"LLM init ok" not in runner.output


@pytest.mark.parametrize("name", ["SEGV", "KILL", "ABRT"])
def test_crash_mid_answer_keeps_flushed_text_and_loses_buffered_lines(start, name):
    runner = start("--emu_faults", f"crash_after_tokens=7,crash_signal={name}")
    runner.read_until(b"prompt >> ")
    runner.send("crash now\n")
    assert runner.wait() == -getattr(signal, "SIG" + name)
    runner.quiet_for(0.2)
    turn = plain(runner.output).split("prompt >> ")[-1]
    flushed = turn.split(" ms\n", 1)[1]  # ttft left with the first chunk; the rest is text
    full = reply_text("crash now", 12, False)
    assert "You said" in flushed and full.startswith(flushed) and len(flushed) < len(full)
    assert "hit eos" not in turn


def test_crash_before_the_first_chunk_loses_the_ttft_line(start):
    runner = start(env={"AX_EMU_FAULTS": "crash_after_tokens=1"})
    runner.read_until(b"prompt >> ")
    runner.send("x\n")
    assert runner.wait() == -signal.SIGSEGV
    runner.quiet_for(0.2)
    assert runner.output.endswith(b"prompt >> ")


def test_hang_mid_answer_ignores_sigint_but_not_sigterm(start):
    runner = start("--emu_faults", "hang_after_tokens=4")
    runner.read_until(b"prompt >> ")
    runner.send("hang\n")
    runner.read_until(b"You said")
    runner.quiet_for(0.5)  # the hang is in effect (a SIGINT before it would end the reply normally)
    runner.signal(signal.SIGINT)
    assert b"hit eos" not in runner.quiet_for(1.0)
    assert runner.process.poll() is None
    runner.signal(signal.SIGTERM)
    assert runner.wait(timeout=10) == -signal.SIGTERM


def test_hang_at_init_stops_the_bar_part_way(start):
    runner = start("--axmodel_num", "10", "--emu_faults", "hang_at_init=1")
    runner.read_until(b"init 4 axmodel ok")
    assert b"init 5 axmodel" not in runner.quiet_for(1.0)
    assert runner.process.poll() is None
    runner.signal(signal.SIGTERM)
    assert runner.wait(timeout=10) == -signal.SIGTERM


def test_slow_tokens(start):
    runner = start("--emu_reply_words", "3", env={"AX_EMU_FAULTS": "tokens_per_second=10"})
    runner.read_until(b"prompt >> ")
    began = time.monotonic()
    runner.send("slow\n")
    runner.read_until(b"hit eos", start=len(runner.output))
    assert time.monotonic() - began >= 0.8  # about 12 tokens at 10/s; the default pace takes 0.25 s


def test_garbage_bytes_inside_a_text_chunk(start):
    runner = start("--emu_faults", "garbage=1")
    runner.read_until(b"prompt >> ")
    runner.send("junk\n")
    runner.read_until(b"prompt >> ", start=len(runner.output))
    chunk = runner.chunk_with(b"You said")
    with pytest.raises(UnicodeDecodeError):
        chunk.decode()


def test_card_memory_busy_after_a_crash(start, tmp_path):
    crashing = start("--emu_faults", "crash_after_tokens=2,crash_signal=KILL,busy_after_crash_seconds=2")
    crashing.read_until(b"prompt >> ")
    crashing.send("die\n")
    assert crashing.wait() == -signal.SIGKILL
    busy = start()
    assert busy.wait() == 255
    busy.quiet_for(0.2)
    assert busy.output.endswith(error_line("run", 48, "Set AXCL device failed{0x8030040a}.")
                                + error_line("main", 206, "lLaMa.Init failed"))
    time.sleep(2.2)
    healthy = start()
    healthy.read_until(b"prompt >> ")


def test_fault_file_is_reread_every_turn(start, tmp_path):
    fault_file = tmp_path / "faults.json"
    fault_file.write_text("{}")
    runner = start(env={"AX_EMU_FAULT_FILE": str(fault_file)})
    runner.read_until(b"prompt >> ")
    runner.send("fine\n")
    runner.read_until(b"prompt >> ", start=len(runner.output))
    assert reply_text("fine", 12, False) in plain(runner.output)
    fault_file.write_text(json.dumps({"crash_after_tokens": 2, "crash_signal": "ABRT"}))
    runner.send("now crash\n")
    assert runner.wait() == -signal.SIGABRT
