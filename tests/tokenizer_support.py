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


# A stand-in for a stock tokenizer script (stdlib only, starts in milliseconds): answers
# GET /bos_id, prints the pid of a child it spawns, and exits with EXIT_CODE when that is set.
STUB_TOKENIZER_SCRIPT = '''
import argparse, json, os, subprocess, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

EXIT_CODE = None

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"bos_id": -1}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

parser = argparse.ArgumentParser()
parser.add_argument("--host")
parser.add_argument("--port", type=int)
args = parser.parse_args()
print("stub running in", os.getcwd(), flush=True)
if EXIT_CODE is not None:
    sys.exit(EXIT_CODE)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print("child", child.pid, flush=True)
HTTPServer((args.host, args.port), Handler).serve_forever()
'''


def write_stub_tokenizer(folder: Path, name: str = "stub_tokenizer.py", exit_code: int | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    script.write_text(STUB_TOKENIZER_SCRIPT.replace("EXIT_CODE = None", f"EXIT_CODE = {exit_code!r}"))
    return script


def pid_alive(pid: int) -> bool:
    """Is `pid` a live process (not a zombie)?"""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition, timeout: float, what: str, interval: float = 0.1):
    """Poll `condition()` until it returns something truthy; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")
