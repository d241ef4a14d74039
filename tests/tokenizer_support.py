"""Helpers for the tokenizer tests: real tokenizer server processes on loopback ports."""
from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from harness.net import free_port, wait_http
from harness.paths import REPO_ROOT, TOKENIZER_DIR

SMOLLM2_TOKENIZER = TOKENIZER_DIR
SERVER_START_TIMEOUT = 60.0


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
        wait_http(f"{base_url}/capabilities", SERVER_START_TIMEOUT, process=process,
                  output=lambda: process.stdout.read() if process.poll() is not None else "")
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
