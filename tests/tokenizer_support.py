"""Helpers for the tokenizer tests: real tokenizer server processes on loopback ports."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import REPO_ROOT, free_port

SMOLLM2_TOKENIZER = REPO_ROOT / "model" / "smollm2-135m" / "tokenizer"
SERVER_START_TIMEOUT = 60.0


def wait_port_answers(url: str, process: subprocess.Popen, timeout: float) -> None:
    """Poll `url` until it answers; fail early if `process` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(f"tokenizer server exited with {process.returncode}: {output}")
        try:
            httpx.get(url, timeout=2.0)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    pytest.fail(f"{url} did not answer within {timeout}s")


@contextlib.contextmanager
def tokenizer_server(tokenizer: Path = SMOLLM2_TOKENIZER, *extra_args: str) -> Iterator[str]:
    """Run `python -m tokenizer_service.server` on a free port; yield its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenizer_service.server", "--host", "127.0.0.1", "--port", str(port),
         "--tokenizer", str(tokenizer), *extra_args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_port_answers(f"{base_url}/capabilities", process, SERVER_START_TIMEOUT)
        yield base_url
    finally:
        process.kill()
        process.wait(timeout=10)
        if process.stdout:
            process.stdout.close()
