"""Start the real daemon (`axm1-llm serve`) on loopback ports with model folders made for a test.

Every process a test daemon starts — tokenizer service, tokenizer servers, run scripts, emulator
runners — inherits a unique marker in its environment, so a test can prove that none is left
behind after the daemon stops.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx

from ax_emulator.model_folder import write_model_folder
from conftest import REPO_ROOT, free_port, wait_http

TOKENIZER_DIR = REPO_ROOT / "model" / "smollm2-135m" / "tokenizer"
AXM1_LLM = Path(sys.executable).parent / "axm1-llm"



def scripted_model(
    root: Path,
    name: str,
    *,
    tokenizer_port: int | None = None,
    dialect: str = "b_reset",
    tokens_per_second: float = 200,
    reply_words: int = 8,
    think: bool = False,
    port_from_dollar1: bool = True,
    stock_tokenizer: bool = False,
    extra_flags: tuple[str, ...] = (),
    fields: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A model folder shaped like the card's (run script without shebang, tokenizer script),
    served by the scripted emulator; returns its descriptor entry in the original string format."""
    folder = root / name
    port = tokenizer_port or free_port()
    url = '"http://127.0.0.1:$1"' if port_from_dollar1 else f'"http://127.0.0.1:{port}"'
    flags = [
        "--emu_engine scripted",
        f"--emu_dialect {dialect}",
        f"--emu_tokens_per_second {tokens_per_second}",
        f"--emu_reply_words {reply_words}",
        f"--emu_think {1 if think else 0}",
        *extra_flags,
        '--system_prompt "You are a helpful assistant."',
        f'--template_filename_axmodel "{name}-ax650/{name}_p128_l%d_together.axmodel"',
        "--axmodel_num 4",
        f"--url_tokenizer_model {url}",
        f"--filename_post_axmodel {name}-ax650/{name}_post.axmodel",
        "--use_mmap_load_embed 1",
        "--live_print 1",
        "--devices 0",
    ]
    if dialect == "a":
        flags = [f for f in flags if not f.startswith(("--system_prompt", "--devices", "--url_tokenizer"))]
        flags += ['--prompt ""', "--continue 1", "--tokenizer_type 2", f"--filename_tokenizer_model {url}"]
    entry = write_model_folder(
        folder,
        name,
        "ax-emulator \\\n" + " \\\n".join(flags) + "\n",
        tokenizer_dir=TOKENIZER_DIR,
        tokenizer_port=port,
        tokenizer_args=("--stock",) if stock_tokenizer else (),
        think=think,
    )
    entry.update(fields or {})
    return entry


def write_descriptor(path: Path, entries: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, indent=2))
    tmp.replace(path)  # atomic, so the daemon never reads half a file


@dataclass
class Daemon:
    url: str
    process: subprocess.Popen
    descriptor: Path
    metrics_dir: Path
    log_path: Path
    marker: str
    fault_file: Path
    env: dict[str, str] = field(default_factory=dict)
    tokenizer_service_url: str = ""

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def set_faults(self, **faults: Any) -> None:
        """Faults for the emulator runners, re-read by them at every start and every turn."""
        tmp = self.fault_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(faults))
        tmp.replace(self.fault_file)

    def wait_state(self, model: str, states: str | tuple[str, ...], timeout: float = 30.0) -> dict:
        states = (states,) if isinstance(states, str) else states
        deadline = time.monotonic() + timeout
        status: dict = {}
        while time.monotonic() < deadline:
            status = httpx.get(f"{self.url}/api/status/{model}", timeout=5).json()
            if status.get("state") in states:
                return status
            time.sleep(0.05)
        raise AssertionError(f"{model} never reached {states}; last status: {json.dumps(status)[:2000]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def processes_with_marker(marker: str) -> list[tuple[int, str]]:
    """Live processes (not zombies reaped) whose environment carries `marker`."""
    found = []
    needle = f"AXM1_TEST_RUN={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except OSError:
            continue
    return found


@contextmanager
def running_daemon(tmp: Path, entries: list[dict[str, Any]], *flags: str, **env: str) -> Iterator[Daemon]:
    """The real daemon on free loopback ports; stopped (and checked for leftovers) afterwards."""
    port, tokenizer_service_port = free_port(), free_port()
    descriptor = tmp / "model-descriptor.json"
    write_descriptor(descriptor, entries)
    metrics_dir = tmp / "metrics"
    metrics_dir.mkdir(exist_ok=True)
    fault_file = tmp / "faults.json"
    fault_file.write_text("{}")
    marker = uuid.uuid4().hex
    process_env = dict(os.environ)
    process_env.update(
        AXM1_TEST_RUN=marker,
        AX_EMU_STATE_DIR=str(tmp),
        AX_EMU_FAULT_FILE=str(fault_file),
        HF_HUB_OFFLINE="1",
        **env,
    )
    log_path = tmp / "daemon.log"
    command = [
        str(AXM1_LLM),
        "serve",
        "--port", str(port),
        "--tokenizer-service-port", str(tokenizer_service_port),
        "--descriptor", str(descriptor),
        "--metrics-dir", str(metrics_dir),
        "--descriptor-poll-s", "0.2",
        "--backoff-min-s", "0.2",
        "--backoff-max-s", "2",
        "--stop-grace-s", "2",
        *flags,
    ]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, env=process_env, stdout=log_file, stderr=subprocess.STDOUT)
    daemon = Daemon(
        f"http://127.0.0.1:{port}", process, descriptor, metrics_dir, log_path, marker, fault_file, process_env,
        tokenizer_service_url=f"http://127.0.0.1:{tokenizer_service_port}",
    )
    try:
        wait_http(f"{daemon.url}/health", timeout=60)
        yield daemon
    finally:
        daemon.stop()
        deadline = time.monotonic() + 10
        while processes_with_marker(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        leftovers = processes_with_marker(marker)
        for pid, _ in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert not leftovers, f"processes left behind after the daemon stopped: {leftovers}\n{daemon.log()[-3000:]}"


SHELL_RUNNER = r"""log() { printf '\033[1;30;32m[I][%32s][%4d]: %s\033[0m\n' "$1" "$2" "$3"; }
@SETUP@
log Init 136 "LLM init start"
log Init 279 "LLM init ok"
printf 'Type "q" to exit, Ctrl+c to stop current running\n'
log main 236 "@PRECOMPUTE_LINE@"
printf 'prompt >> '
while IFS= read -r line; do
  [ "$line" = q ] && exit 0
  [ -z "$line" ] && { printf 'prompt >> '; continue; }
  log Run 1030 "ttft: 1.00 ms"
  printf 'You said: %s' "$line"
  @MID_ANSWER@
  printf '\n\n'
  printf '\033[1;30;35m[N][%32s][%4d]: %s\033[0m\n' Run 1182 "hit eos,avg 10.00 token/s"
  printf '\033[0m\n'
  log GetKVCache 597 "precompute_len:40, remaining:2008"
  printf 'prompt >> '
done
"""


def shell_runner_model(
    root: Path, name: str, *, setup: str = "", precompute_line: str = "precompute_len: 21", mid_answer: str = ""
) -> dict[str, Any]:
    """A hand-written B runner in plain sh (no reset, no tokenizer server): it answers
    `You said: <line>` and lets a test put odd bytes or behaviour where a real runner might."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / f"run_{name}.sh"
    text = SHELL_RUNNER.replace("@SETUP@", setup).replace("@PRECOMPUTE_LINE@", precompute_line)
    script.write_text(text.replace("@MID_ANSWER@", mid_answer))
    return {"model_name": name, "run_cmd": script.name, "model_path": str(folder)}
