"""The real daemon (`axm1-llm serve`) as a process on free loopback ports.

Every process of a daemon run carries a marker unique to the run in its environment: the daemon
gets AXM1_HARNESS_RUN=<marker>, and what it starts (tokenizer service, tokenizer servers, run
scripts, emulator runners) inherits that or, where the daemon gives its children an environment
of its own, carries its owner tag AXM1_OWNER=<its data folder>, which is the same value: each
run has a data folder of its own. After the daemon stops, whatever still carries the marker is a
leftover, found in /proc and killed (and, for the tests, reported).
"""
from __future__ import annotations

import json
import os
import pty
import resource
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from harness import net
from harness.net import WaitFailed, free_port, wait_http, wait_until
from harness.paths import AXM1_LLM, BIN

MARKER_VARIABLE = "AXM1_HARNESS_RUN"
OWNER_VARIABLE = "AXM1_OWNER"  # the daemon's tag on its children: its data folder, resolved
# Restarts and reloads fast enough for tests: the daemon's own settings, not sleeps.
FAST_FLAGS = ("--descriptor-poll-s", "0.2", "--backoff-min-s", "0.2", "--backoff-max-s", "2", "--stop-grace-s", "2")


def write_descriptor(path: Path, entries: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, indent=2))
    tmp.replace(path)  # atomic, so the daemon never reads half a file


@dataclass
class Daemon:
    url: str
    port: int
    process: subprocess.Popen
    root: Path
    descriptor: Path
    metrics_dir: Path
    log_path: Path
    marker: str
    fault_file: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    tokenizer_service_url: str = ""
    api_key: str | None = None  # sent by client() and get() when set (a daemon run with --api-keys)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return net.client(base_url=self.url, timeout=timeout, headers=self.headers)

    def get(self, path: str, timeout: float = 10.0) -> Any:
        return net.get(self.url + path, timeout=timeout, headers=self.headers).json()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def set_faults(self, **faults: Any) -> None:
        """Faults for the emulator runners, re-read by them at every start and every turn."""
        if self.fault_file is None:
            raise RuntimeError("this daemon was started without a fault file (running_daemon(faults=False))")
        tmp = self.fault_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(faults))
        tmp.replace(self.fault_file)

    def wait_state(self, model: str, states: str | tuple[str, ...], timeout: float = 30.0) -> dict:
        states = (states,) if isinstance(states, str) else states
        last: dict = {}

        def reached() -> dict | None:
            nonlocal last
            last = self.get(f"/api/status/{model}", timeout=5)
            return last if last.get("state") in states else None

        try:
            return wait_until(reached, timeout, f"{model} to reach {states}")
        except WaitFailed:
            raise WaitFailed(f"{model} never reached {states}; last status: {json.dumps(last)[:2000]}") from None

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
    """Live processes (not zombies reaped) whose environment carries `marker`: (pid, command line)."""
    found = []
    needles = {f"{MARKER_VARIABLE}={marker}".encode(), f"{OWNER_VARIABLE}={marker}".encode()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needles.intersection((entry / "environ").read_bytes().split(b"\0")):
                found.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except OSError:
            continue
    return found


def kill_leftovers(marker: str, grace_s: float) -> list[tuple[int, str]]:
    """Wait up to `grace_s` for the processes carrying `marker` to end; SIGKILL and return those
    still there."""
    deadline = time.monotonic() + grace_s
    while (leftovers := processes_with_marker(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid, _ in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return leftovers


def _before_exec(open_files_limit: int | None, preexec: Callable[[], None] | None) -> None:
    if open_files_limit is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files_limit, open_files_limit))
    if preexec is not None:
        preexec()


def _copy_terminal(fd: int, log_path: Path) -> None:
    """Everything the daemon writes to its pseudo-terminal, appended to its log, until it closes."""
    with open(log_path, "ab", buffering=0) as log:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the daemon's side is closed
                break
            if not data:
                break
            log.write(data)
    os.close(fd)


@contextmanager
def running_daemon(
    root: Path,
    entries: list[dict[str, Any]],
    *flags: str,
    fast_restarts: bool = True,
    faults: bool = True,
    log_level: str | None = None,
    extra_env: dict[str, str] | None = None,
    leftovers_fail: bool = True,
    leftover_grace_s: float = 10.0,
    start_timeout: float = 60.0,
    open_files_limit: int | None = None,
    terminal: bool = False,
    port: int | None = None,
    discover: bool = False,
    preexec: Callable[[], None] | None = None,
) -> Iterator[Daemon]:
    """The real daemon on free loopback ports, serving `entries` (written to a descriptor in
    `root`, with its metrics folder and log); `flags` go on its command line after ours.

    - `fast_restarts`: short descriptor polling, restart back-off and stop grace (FAST_FLAGS),
      so a test's restarts take fractions of a second; off, the daemon's defaults (the bench).
    - `faults`: a fault file the emulator runners read (`Daemon.set_faults`); it is re-read at
      every turn, so a benchmark goes without it.
    - `log_level`, `extra_env`: the daemon's --log-level, and variables for it and its children
      (e.g. a PYTHONPATH that runs another checkout's daemon).
    - `open_files_limit`: the daemon's RLIMIT_NOFILE (systemd gives 1024 by default).
    - `terminal`: its stdout and stderr a pseudo-terminal (what it shows a person), not a file.
    - `discover`: serve model folders in `root` that `entries` do not name, as the daemon does by
      default; off here, since tests build folders they add to the descriptor later.
    - `preexec`: run in the daemon's process before it starts (e.g. a resource limit).
    - `port`: the API's port (a daemon started again where a router expects it); default: a free one.
    - After SIGTERM, processes still carrying the run's marker `leftover_grace_s` later are
      killed; with `leftovers_fail` that fails (an AssertionError naming them and the log's end).
    """
    port, tokenizer_service_port = port or free_port(), free_port()
    descriptor = root / "model-descriptor.json"
    write_descriptor(descriptor, entries)
    metrics_dir = root / "metrics"
    metrics_dir.mkdir(exist_ok=True)
    # The daemon tags its children with its data folder (AXM1_OWNER, llm_service.children); the
    # harness tags the daemon itself with the same value, so one marker finds them all.
    data_dir = root / "data"
    marker = str(data_dir.resolve())
    env = dict(os.environ)
    env.update({
        MARKER_VARIABLE: marker,
        # its own: a daemon ends what an earlier one with its data folder left, and locks it
        # (a setting given as a variable, which a daemon without it ignores)
        "AXM1_DATA_DIR": str(data_dir),
        "AX_EMU_STATE_DIR": str(root),
        "HF_HUB_OFFLINE": "1",
        "PATH": str(BIN) + os.pathsep + env.get("PATH", ""),  # runners find ax-emulator here
    })
    fault_file = None
    if faults:
        fault_file = root / "faults.json"
        fault_file.write_text("{}")
        env["AX_EMU_FAULT_FILE"] = str(fault_file)
    env.update(extra_env or {})
    command = [
        str(AXM1_LLM), "serve",
        "--port", str(port),
        "--tokenizer-service-port", str(tokenizer_service_port),
        "--descriptor", str(descriptor),
        "--metrics-dir", str(metrics_dir),
        *(FAST_FLAGS if fast_restarts else ()),
        *(() if discover else ("--discover-models", "false")),
        *(("--log-level", log_level) if log_level else ()),
        *flags,
    ]
    log_path = root / "daemon.log"
    copier = None
    with open(log_path, "wb") as log_file:
        output: Any = log_file
        if terminal:  # a pseudo-terminal, as a person's shell gives it; copied into the log as is
            reading_side, output = pty.openpty()
            copier = threading.Thread(target=_copy_terminal, args=(reading_side, log_path), daemon=True)
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT,
            preexec_fn=lambda: _before_exec(open_files_limit, preexec),
        )
        if copier is not None:
            os.close(output)
            copier.start()
    daemon = Daemon(
        f"http://127.0.0.1:{port}", port, process, root, descriptor, metrics_dir, log_path, marker, fault_file, env,
        tokenizer_service_url=f"http://127.0.0.1:{tokenizer_service_port}",
    )
    try:
        wait_http(f"{daemon.url}/health", start_timeout, process=process, output=lambda: daemon.log()[-3000:])
        yield daemon
    finally:
        daemon.stop()
        leftovers = kill_leftovers(marker, leftover_grace_s)
        if leftovers_fail:
            assert not leftovers, f"processes left behind after the daemon stopped: {leftovers}\n{daemon.log()[-3000:]}"
