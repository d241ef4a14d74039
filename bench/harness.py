"""Processes for the benchmark: model folders with probes, a raw runner, a timed HTTP client.

The daemon itself, free ports and waiting for an answer come from the shared `harness` package
(with the tests); BENCH_DAEMON is how the benchmarks start it. Everything runs on loopback;
every process started here is stopped by the same context manager.
"""
from __future__ import annotations

import bisect
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ax_emulator.model_folder import write_model_folder
from harness import models
from harness.net import WaitFailed, free_port, wait_http
from harness.paths import BIN, REPO_ROOT, TOKENIZER_DIR

PROBE = Path(__file__).resolve().parent / "probe.py"
# running_daemon(..., **BENCH_DAEMON): the daemon's own timings (no fast restarts), no fault file
# (the runners would read it every turn), quiet logs; leftovers killed, not failed on.
BENCH_DAEMON: dict[str, Any] = dict(fast_restarts=False, faults=False, log_level="warning",
                                    leftovers_fail=False, leftover_grace_s=0.3)


def emulator_flags(name: str, tokens_per_second: float, reply_words: int, tokenizer_url: str) -> list[str]:
    # the pace comes from the fault key (absolute schedule, see pace()), not from the flag
    return models.emulator_flags(name, tokenizer_url=tokenizer_url, tokens_per_second=1000000,
                                 reply_words=reply_words, init_seconds=0.1)


def pace(tokens_per_second: float) -> str:
    """The emulator's `tokens_per_second` fault paces tokens on a fixed schedule from the first
    one (its --emu_tokens_per_second sleeps after every token, so slow steps would add up): raw
    runner and daemon then produce the same stream at the same instants."""
    return f"tokens_per_second={tokens_per_second}" if tokens_per_second else ""


def _sh_quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


def probed_model(root: Path, name: str, tokens_per_second: float, reply_words: int) -> dict[str, Any]:
    """A scripted model folder whose run script wraps the emulator in two probes."""
    folder = root / name
    port = free_port()
    flags = emulator_flags(name, tokens_per_second, reply_words, "http://127.0.0.1:$1")
    py, probe = _sh_quote(sys.executable), _sh_quote(str(PROBE))
    quoted = " ".join(f'"{f}"' if f.startswith("http://") else _sh_quote(f) for f in flags)
    run_script = (
        f"{py} {probe} in probe-in.log | AX_EMU_FAULTS={pace(tokens_per_second)} ax-emulator {quoted}"
        f" | {py} {probe} out probe-out.log\n"
    )
    return write_model_folder(folder, name, run_script, tokenizer_dir=TOKENIZER_DIR, tokenizer_port=port)


def read_probe(path: Path) -> list[tuple[int, bytes]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        stamp, _, data = line.partition(" ")
        records.append((int(stamp), bytes.fromhex(data)))
    return records


# ---- the daemon of another checkout ---------------------------------------------------------

def daemon_source_env(source: Path | None) -> dict[str, str]:
    """The environment that makes `axm1-llm` run the daemon of another checkout: a PYTHONPATH
    entry is searched before the editable install's finder, which points at this one."""
    return {"PYTHONPATH": str(source.resolve())} if source else {}


def daemon_package_file(extra_env: dict[str, str] | None = None) -> str:
    """Where the daemon's interpreter, given `extra_env`, imports llm_service from. -P and cwd=/
    keep the current directory out of sys.path, as it is for the `axm1-llm` script."""
    env = {**os.environ, **(extra_env or {})}
    check = subprocess.run([sys.executable, "-P", "-c", "import llm_service; print(llm_service.__file__)"],
                           env=env, cwd="/", capture_output=True, text=True, check=True, timeout=60)
    return check.stdout.strip()


# ---- the raw runner -------------------------------------------------------------------------

class RawRunner:
    """The emulator driven directly: a thread reads its stdout and timestamps every chunk —
    the physical limit any wrapper can reach."""

    def __init__(self, root: Path, name: str, tokens_per_second: float, reply_words: int,
                 command: list[str] | None = None, cwd: Path | None = None, tokenizer: Path | None = None,
                 tokenizer_port: int | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = tokenizer_port or free_port()
        self.tokenizer = subprocess.Popen(
            [sys.executable, "-m", "tokenizer_service.server", "--host", "127.0.0.1", "--port", str(self.port),
             "--tokenizer", str(tokenizer or TOKENIZER_DIR)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(REPO_ROOT),
            env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True,
        )
        try:
            wait_http(f"http://127.0.0.1:{self.port}/get_uid", 60, process=self.tokenizer)
        except WaitFailed:
            self.tokenizer.kill()
            self.tokenizer.wait(5)
            raise
        env = {**os.environ, "PATH": str(BIN) + os.pathsep + os.environ.get("PATH", ""), "AX_EMU_STATE_DIR": str(root),
               "AX_EMU_FAULTS": pace(tokens_per_second)}
        command = command or [str(BIN / "ax-emulator"),
                              *emulator_flags(name, tokens_per_second, reply_words, f"http://127.0.0.1:{self.port}")]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, env=env, cwd=str(cwd or root),
                                        start_new_session=True)
        self.chunks: list[tuple[int, bytes]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        fd = self.process.stdout.fileno()
        while True:
            data = os.read(fd, 65536)
            now = time.monotonic_ns()
            if not data:
                break
            with self._cond:
                self.chunks.append((now, data))
                self._cond.notify_all()

    def wait_for(self, needle: bytes, start_index: int, timeout: float) -> int:
        """Index just past the chunk where `needle` has appeared (searching from chunk index)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if needle in b"".join(d for _, d in self.chunks[start_index:]):
                    return len(self.chunks)
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    raise TimeoutError(f"raw runner: {needle!r} not seen")
                self._cond.wait(left)

    def send(self, line: str) -> tuple[int, int]:
        """Write one line; returns (chunk index before the write, write time ns)."""
        with self._cond:
            index = len(self.chunks)
        now = time.monotonic_ns()
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()
        return index, now

    def close(self) -> None:
        for proc in (self.process, self.tokenizer):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in (self.process, self.tokenizer):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


# ---- a client that timestamps every received byte -------------------------------------------

@dataclass
class TimedResponse:
    sent_ns: int
    status: int
    headers: dict[str, str]
    lines: list[tuple[int, dict]]  # (arrival ns of the line's last byte, parsed object)
    done_ns: int

    def text(self, key: str = "response") -> str:
        return "".join(obj.get(key) or "" for _, obj in self.lines)


def ndjson_line(line: bytes) -> dict | None:
    return json.loads(line) if line.strip() else None


def sse_line(line: bytes) -> dict | None:
    """The JSON of a `data:` line of an event stream; None for blank lines, comments and [DONE]."""
    if not line.startswith(b"data:"):
        return None
    data = line[len(b"data:"):].strip()
    return None if data == b"[DONE]" else json.loads(data)


def _request_bytes(method: str, path: str, body: dict | None) -> bytes:
    payload = json.dumps(body).encode() if body is not None else b""
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    return head + payload


def _connect(port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def timed_request(port: int, path: str, body: dict | None, method: str = "POST", timeout: float = 300,
                  decode_line: Callable[[bytes], dict | None] = ndjson_line) -> TimedResponse:
    """One HTTP/1.1 request over a raw socket; every recv is timestamped, then the (chunked)
    body is split into lines, each stamped with the arrival of its last byte. `decode_line`
    turns a line into its object (None: not one), for NDJSON (the default) or SSE (`sse_line`)."""
    sock = _connect(port, timeout)
    recvs: list[tuple[int, bytes]] = []
    try:
        sent = time.monotonic_ns()
        sock.sendall(_request_bytes(method, path, body))
        while True:
            data = sock.recv(262144)
            now = time.monotonic_ns()
            if not data:
                break
            recvs.append((now, data))
    finally:
        sock.close()
    return _timed_response(sent, recvs, decode_line)


def timed_requests_at_once(port: int, requests: list[tuple[str, dict]], timeout: float = 300,
                           decode_line: Callable[[bytes], dict | None] = ndjson_line) -> list[TimedResponse]:
    """POST (path, body) requests all at once, like timed_request. One thread stamps every recv of
    every socket and parses nothing before the last answer is in: with a thread per request, a
    thread parsing its finished answer would hold the GIL while the others' data waits unstamped."""
    socks = [_connect(port, timeout) for _ in requests]
    selector = selectors.DefaultSelector()
    recvs: dict[socket.socket, list[tuple[int, bytes]]] = {sock: [] for sock in socks}
    sent: dict[socket.socket, int] = {}
    try:
        for sock, (path, body) in zip(socks, requests):
            sent[sock] = time.monotonic_ns()
            sock.sendall(_request_bytes("POST", path, body))
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        while selector.get_map():
            ready = selector.select(timeout)
            if not ready:
                raise TimeoutError(f"no answer byte for {timeout}s")
            for key, _ in ready:
                try:
                    data = key.fileobj.recv(262144)
                except BlockingIOError:
                    continue
                now = time.monotonic_ns()
                if data:
                    recvs[key.fileobj].append((now, data))
                else:
                    selector.unregister(key.fileobj)
    finally:
        selector.close()
        for sock in socks:
            sock.close()
    return [_timed_response(sent[sock], recvs[sock], decode_line) for sock in socks]


def _timed_response(sent: int, recvs: list[tuple[int, bytes]], decode_line: Callable[[bytes], dict | None]) -> TimedResponse:
    raw = b"".join(d for _, d in recvs)
    ends, total = [], 0
    for _, d in recvs:
        total += len(d)
        ends.append(total)

    def arrival(offset: int) -> int:
        return recvs[bisect.bisect_right(ends, offset)][0]

    header_end = raw.index(b"\r\n\r\n") + 4
    status_line, *header_lines = raw[:header_end - 4].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    # body bytes with the raw offset of each piece
    pieces: list[tuple[int, bytes]] = []
    if headers.get("transfer-encoding") == "chunked":
        pos = header_end
        while True:
            line_end = raw.index(b"\r\n", pos)
            size = int(raw[pos:line_end].split(b";")[0], 16)
            if size == 0:
                break
            pieces.append((line_end + 2, raw[line_end + 2:line_end + 2 + size]))
            pos = line_end + 2 + size + 2
    else:
        pieces.append((header_end, raw[header_end:]))
    lines: list[tuple[int, dict]] = []
    pending = b""
    for raw_start, data in pieces:
        start = 0
        while True:
            newline = data.find(b"\n", start)
            if newline < 0:
                pending += data[start:]
                break
            obj = decode_line(pending + data[start:newline])
            pending = b""
            start = newline + 1
            if obj is not None:
                lines.append((arrival(raw_start + newline), obj))
    last = decode_line(pending)
    if last is not None:
        lines.append((recvs[-1][0], last))
    return TimedResponse(sent, int(status_line.split()[1]), headers, lines, recvs[-1][0] if recvs else sent)


# ---- /proc ----------------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of this process only (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def heavy_libraries(pid: int) -> list[str]:
    """Mapped files of torch, transformers and their native companions."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and any(k in parts[5] for k in ("torch", "transformers", "tokenizers", "safetensors")):
            found.add(parts[5])
    return sorted(found)
