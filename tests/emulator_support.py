"""Helpers for the emulator tests: a real tokenizer server and runner processes read in raw chunks."""
from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from harness.net import free_port, wait_http
from harness.paths import REPO_ROOT, TOKENIZER_DIR

ANSI = re.compile(rb"\x1b\[[0-9;]*m")


class TokenizerServer:
    """`python -m tokenizer_service.server` on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tokenizer_service.server", "--host", "127.0.0.1",
             "--port", str(self.port), "--tokenizer", str(TOKENIZER_DIR)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"{self.url}/get_uid", 60, process=self.process)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class Runner:
    """A runner process (ax-emulator or /bin/sh run_*.sh) whose stdout is a pipe, or with
    `packets=True` a SOCK_SEQPACKET socket so every write(2) of the runner is one read here."""

    def __init__(self, args: list[str], cwd: Path | str = REPO_ROOT, env: dict | None = None,
                 packets: bool = False):
        if packets:
            reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.read_fd, stdout = reader.detach(), writer
        else:
            self.read_fd, stdout = os.pipe()
        self.process = subprocess.Popen(
            args, cwd=cwd, env={**os.environ, **(env or {})}, stdin=subprocess.PIPE,
            stdout=stdout, stderr=subprocess.PIPE, start_new_session=True)
        if packets:
            stdout.close()
        else:
            os.close(stdout)
        self.chunks: list[bytes] = []

    @property
    def output(self) -> bytes:
        return b"".join(self.chunks)

    def read_until(self, needle: bytes, timeout: float = 30.0, start: int = 0) -> bytes:
        """Read raw chunks until `needle` shows up after byte `start`; the output so far."""
        deadline = time.monotonic() + timeout
        while needle not in self.output[start:]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{needle!r} not seen in {timeout}s; output: {self.output[-1500:]!r}")
            if not self.read_chunk(remaining):
                raise AssertionError(f"runner closed stdout before {needle!r}; output: {self.output[-1500:]!r}")
        return self.output

    def read_chunk(self, timeout: float) -> bool:
        """One os.read; False at end of output. A short pause first lets a burst complete."""
        ready, _, _ = select.select([self.read_fd], [], [], timeout)
        if not ready:
            return True
        chunk = os.read(self.read_fd, 1 << 16)
        if not chunk:
            return False
        self.chunks.append(chunk)
        return True

    def quiet_for(self, seconds: float) -> bytes:
        """Everything that arrives within `seconds` (nothing, when the runner is stuck)."""
        before = len(self.output)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if not self.read_chunk(left):
                break
        return self.output[before:]

    def chunk_with(self, needle: bytes) -> bytes:
        matches = [chunk for chunk in self.chunks if needle in chunk]
        assert len(matches) == 1, f"{needle!r} in {len(matches)} chunks"
        return matches[0]

    def send(self, text: str) -> None:
        self.process.stdin.write(text.encode())
        self.process.stdin.flush()

    def signal(self, signum: int) -> None:
        os.killpg(self.process.pid, signum)

    def wait(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout=timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)
        else:
            try:  # the runner under /bin/sh may outlive the shell
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.close(self.read_fd)
        for stream in (self.process.stdin, self.process.stderr):
            try:
                stream.close()
            except BrokenPipeError:
                pass


def plain(data: bytes) -> str:
    """Output as a person reads it: colours removed, bar updates on their own lines."""
    return ANSI.sub(b"", data).replace(b"\r", b"\n").decode(errors="replace")


def emulator(*flags: str) -> list[str]:
    return [str(Path(sys.executable).parent / "ax-emulator"), *flags]
