"""Helpers for the tokenizer tests: real tokenizer server processes on loopback ports."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from harness.net import free_port, wait_http
from harness.paths import REPO_ROOT, TOKENIZER_DIR

SMOLLM2_TOKENIZER = TOKENIZER_DIR
SERVER_START_TIMEOUT = 60.0


@contextlib.contextmanager
def serving(command: list[str], cwd: Path, ready_path: str = "/bos_id",
            timeout: float = SERVER_START_TIMEOUT) -> Iterator[str]:
    """Run a tokenizer server (`command` takes --host and --port) on a free port in `cwd`; yield
    its base URL once `ready_path` answers; kill it after."""
    port = free_port()
    process = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base_url}{ready_path}", timeout, process=process,
                  output=lambda: process.stdout.read() if process.poll() is not None else "")
        yield base_url
    finally:
        process.kill()
        process.wait(timeout=10)
        if process.stdout:
            process.stdout.close()


@contextlib.contextmanager
def tokenizer_server(tokenizer: Path = SMOLLM2_TOKENIZER, *extra_args: str) -> Iterator[str]:
    """Run `python -m tokenizer_service.server` on a free port; yield its base URL."""
    command = [sys.executable, "-m", "tokenizer_service.server", "--tokenizer", str(tokenizer), *extra_args]
    with serving(command, REPO_ROOT, "/capabilities") as base_url:
        yield base_url


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


def tokenizer_entry(folder: Path, name: str, script: str, port: int, **fields: str) -> dict[str, str]:
    """A descriptor entry of a card model in `folder` whose tokenizer server is `script` on
    `port` (the folder gets a run script, which the descriptor requires; the service never runs it)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.sh").write_text("exit 0\n")
    return {"model_name": name, "run_cmd": "run.sh", "model_path": str(folder), "tokenizer_py": script,
            "tokenizer_port": str(port), **fields}


# A process that takes a model's tokenizer port before our server does: it answers every request
# with plausible JSON and appends what it received to a record file (one JSON object a line).
SQUATTER_SCRIPT = '''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, record = int(sys.argv[1]), sys.argv[2]

class Handler(BaseHTTPRequestHandler):
    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode(errors="replace")
        with open(record, "a") as out:
            out.write(json.dumps({"method": self.command, "path": self.path, "body": body}) + "\\n")
        reply = json.dumps({"bos_id": 1, "eos_id": 2, "uid": "squatter", "token_ids": [1, 2], "text": "x"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST = answer

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
print("listening", flush=True)
server.serve_forever()
'''


class Squatter:
    """A squatter process on `port` (see SQUATTER_SCRIPT); `received()` is what it was sent."""

    def __init__(self, port: int, record: Path) -> None:
        self.port, self.record = port, record
        record.write_text("")
        self.process = subprocess.Popen([sys.executable, "-c", SQUATTER_SCRIPT, str(port), str(record)],
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None and self.process.stdout.readline() == "listening\n"
        self.pid = self.process.pid

    def received(self) -> list[dict[str, str]]:
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)
        if self.process.stdout:
            self.process.stdout.close()


@contextlib.contextmanager
def squatter(port: int, record: Path) -> Iterator[Squatter]:
    process = Squatter(port, record)
    try:
        yield process
    finally:
        process.stop()
