"""What the daemon shows a person (issue 17, section 3): a progress line per loading model when
its output is a terminal, log lines printed above it; none of that in a log file, where each
state change is one line; the polling requests' access lines and httpx's request lines kept out
of the log below debug; `axm1-llm status --watch`."""
from __future__ import annotations

import io
import logging
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from harness.daemon import running_daemon
from harness.models import scripted_model
from harness.net import free_port, wait_until
from harness.paths import AXM1_LLM
from llm_service.events import EventBus
from llm_service.logging_setup import QuietPolling
from llm_service.terminal import ProgressLines, apply, progress_text

ERASE = "\r\x1b[K"


def test_progress_text() -> None:
    text = progress_text("qwen3", {"percent": 43, "step": 3, "total": 7, "message": "init axmodel ok"})
    assert text == "qwen3  loading   43% [#########...........]  3/7  init axmodel ok"
    assert progress_text("up", {"percent": 100}) == "up  loading  100% [####################]"
    assert progress_text("m", {"message": "x" * 300}, width=40).endswith("…")
    assert len(progress_text("m", {"message": "x" * 300}, width=40)) == 40


def test_log_lines_go_above_the_progress_line() -> None:
    stream = io.StringIO()
    lines = ProgressLines(stream)
    lines.setFormatter(logging.Formatter("%(message)s"))
    bus = EventBus()
    apply(bus.publish("progress", "m", percent=50, step=1, total=2, message="half"), lines)
    lines.emit(logging.makeLogRecord({"msg": "a log line"}))
    apply(bus.publish("state", "m", to="ready"), lines)
    lines.emit(logging.makeLogRecord({"msg": "after"}))
    bar = progress_text("m", {"percent": 50, "step": 1, "total": 2, "message": "half"})
    assert stream.getvalue() == (ERASE + bar            # drawn
                                 + ERASE + "a log line\n" + ERASE + bar  # erased, the line, drawn again
                                 + ERASE                # done: erased
                                 + "after\n")           # no line left to keep


def access_record(method: str, path: str, status: int) -> logging.LogRecord:
    return logging.makeLogRecord({"name": "uvicorn.access", "msg": '%s - "%s %s HTTP/%s" %d',
                                  "args": ("127.0.0.1:5", method, path, "1.1", status)})


def test_polling_leaves_no_access_lines_unless_it_fails() -> None:
    quiet = QuietPolling()
    assert not quiet.filter(access_record("GET", "/api/status", 200))
    assert not quiet.filter(access_record("GET", "/api/status/m", 200))
    assert not quiet.filter(access_record("GET", "/health", 200))
    assert not quiet.filter(access_record("GET", "/ui/app.js", 200))
    assert quiet.filter(access_record("GET", "/api/status", 401))  # a failure is news
    assert quiet.filter(access_record("POST", "/api/generate", 200))
    assert quiet.filter(access_record("GET", "/api/tags", 200))
    assert QuietPolling(quiet=False).filter(access_record("GET", "/api/status", 200))


def test_a_load_on_a_terminal_shows_a_progress_line(tmp_path) -> None:
    entry = scripted_model(tmp_path, "tty-model", extra_flags=("--emu_init_seconds 1.5",))
    with running_daemon(tmp_path, [entry], terminal=True) as daemon:
        with daemon.client() as client:
            assert client.post("/api/models/tty-model/load").status_code == 200
            for _ in range(3):
                assert client.get("/api/status").status_code == 200
        time.sleep(0.3)
        log = daemon.log_path.read_bytes().decode(errors="replace")  # as written: \r kept
    bars = re.findall(r"\r\x1b\[Ktty-model  loading +(\d+)% \[[#.]{20}\]", log)
    assert len(bars) >= 3, log[-2000:]
    percents = [int(p) for p in bars]
    assert percents == sorted(percents) and percents[-1] == 100
    assert "model tty-model: ready" in log  # the state change is logged as a line of its own
    assert '"GET /api/status HTTP/1.1" 200' not in log  # polling is quiet
    assert '"POST /api/models/tty-model/load HTTP/1.1" 200' in log
    assert "HTTP Request:" not in log  # httpx's request lines


def test_in_a_log_file_no_progress_line(tmp_path) -> None:
    entry = scripted_model(tmp_path, "file-model", extra_flags=("--emu_init_seconds 0.5",))
    with running_daemon(tmp_path, [entry]) as daemon:
        with daemon.client() as client:
            assert client.post("/api/models/file-model/load").status_code == 200
        log = daemon.log()
    assert "\x1b[K" not in log and "  loading " not in log
    assert "model file-model: initializing" in log and "model file-model: ready" in log


def watch_until(args: list[str], needle: str, count: int, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`axm1-llm status --watch ARGS`, interrupted (SIGINT) once `needle` has shown on `count`
    lines of its output: a loaded machine may take a second to start it, so no fixed sleep.
    Returns its exit status, output and error output."""
    watch = subprocess.Popen([str(AXM1_LLM), "status", "--watch", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(watch.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_until(lambda: sum(needle in line for line in list(lines)) >= count, 30, f"{count} lines with {needle!r}")
    finally:
        watch.send_signal(signal.SIGINT)
        watch.wait(10)
        reader.join(10)
    return watch.returncode, "".join(lines), watch.stderr.read()


def test_status_watch_refreshes_until_interrupted(tmp_path) -> None:
    entry = scripted_model(tmp_path, "watched", fields={"run_on_startup": "true"})
    with running_daemon(tmp_path, [entry]) as daemon:
        daemon.wait_state("watched", "ready")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AXM1_")}
        returncode, out, err = watch_until(["--url", daemon.url, "--interval", "0.2"], "MODEL  ", 3, env)
    assert returncode == 0, err
    tables = out.count("MODEL  ")
    assert tables >= 3, out
    assert out.count("watched  ready") == tables
    assert f"{daemon.url}/api/status at " in out


def test_status_watch_shows_an_unreachable_daemon_and_goes_on() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    returncode, out, err = watch_until(["--url", url, "--interval", "0.2", "--timeout", "1"],
                                       f"cannot reach {url}/api/status", 2)
    assert returncode == 0, err
    assert out.count(f"cannot reach {url}/api/status") >= 2
