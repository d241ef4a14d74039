"""Model life cycle through the real daemon: start-up models and readiness, keep_alive unloads,
the card's memory budget, the legacy A runner, and a clean shutdown."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from ax_emulator.scripted import reply_text
from harness.daemon import processes_with_marker, running_daemon
from harness.models import scripted_model, shell_runner_model

WORDS = 6


def _generate(daemon, model, prompt, **extra):
    with daemon.client() as http:
        return http.post("/api/generate", json={"model": model, "prompt": prompt, "stream": False, **extra})


def test_run_on_startup_models_start_and_ready_reflects_them(tmp_path):
    entries = [
        scripted_model(tmp_path, "boot", reply_words=WORDS, fields={"run_on_startup": "true"}),
        scripted_model(tmp_path, "lazy", reply_words=WORDS),
    ]
    with running_daemon(tmp_path, entries) as daemon:
        daemon.wait_state("boot", "ready", timeout=30)
        with daemon.client() as http:
            assert http.get("/ready").status_code == 200
            assert http.get("/api/status/lazy").json()["state"] == "stopped"
        # A failing start-up model makes the daemon not ready, while /health stays up.
        daemon.set_faults(crash_after_tokens=1)
        assert "error" in _generate(daemon, "boot", "boom").json()
        daemon.set_faults(init_fail="connect")
        deadline = time.monotonic() + 15
        while daemon.client().get("/ready").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert daemon.client().get("/health").status_code == 200
        daemon.set_faults()
        daemon.wait_state("boot", "ready", timeout=30)  # restarted by itself, without a request
        assert daemon.client().get("/ready").status_code == 200


def test_keep_alive_unloads_idle_models(tmp_path):
    entries = [scripted_model(tmp_path, "m", reply_words=WORDS, fields={"keep_alive": "1s"})]
    with running_daemon(tmp_path, entries) as daemon:
        assert _generate(daemon, "m", "hi").status_code == 200
        pid = daemon.client().get("/api/status/m").json()["pid"]
        ps = daemon.client().get("/api/ps").json()["models"]
        assert [m["name"] for m in ps] == ["m:latest"] and ps[0]["expires_at"] > "2000"
        daemon.wait_state("m", "stopped", timeout=10)
        assert not daemon.client().get("/api/ps").json()["models"]
        assert not os.path.exists(f"/proc/{pid}")
        # A request-level keep_alive overrides the descriptor's.
        assert _generate(daemon, "m", "again", keep_alive="1h").status_code == 200
        time.sleep(2)
        assert daemon.client().get("/api/status/m").json()["state"] == "ready"


def test_card_memory_budget_unloads_the_least_recently_used_idle_model(tmp_path):
    entries = [
        scripted_model(tmp_path, name, reply_words=WORDS, fields={"npu_memory_mb": "3000"}, tokenizer_port=None)
        for name in ("first", "second", "third")
    ]
    with running_daemon(tmp_path, entries, "--npu-memory-mb", "7000") as daemon:
        for name in ("first", "second"):
            assert _generate(daemon, name, "load").status_code == 200
        assert {m["name"] for m in daemon.client().get("/api/ps").json()["models"]} == {"first:latest", "second:latest"}
        # 3 x 3000 MB do not fit in 7000 MB: the least recently used idle model makes room.
        assert _generate(daemon, "third", "load").json()["response"] == reply_text("load", WORDS, think=False)
        loaded = {m["name"] for m in daemon.client().get("/api/ps").json()["models"]}
        assert loaded == {"second:latest", "third:latest"}
        history = daemon.client().get("/api/status_history/first").json()["history"]
        assert any("making room on the card for third" in t["reason"] for t in history)


def test_legacy_a_runner_answers_every_request_in_its_own_context(tmp_path):
    entries = [scripted_model(tmp_path, "legacy", dialect="a", reply_words=WORDS)]
    with running_daemon(tmp_path, entries) as daemon:
        for prompt in ("a-one", "a-two"):
            body = _generate(daemon, "legacy", prompt).json()
            assert body["response"] == reply_text(prompt, WORDS, think=False), body
        status = daemon.client().get("/api/status/legacy").json()
        assert status["dialect"] == "a"
        assert not any(t["to"] == "resetting" for t in status["history"])


def test_shutdown_stops_every_runner_and_tokenizer(tmp_path):
    entries = [scripted_model(tmp_path, name, reply_words=WORDS) for name in ("x", "y")]
    with running_daemon(tmp_path, entries) as daemon:
        for name in ("x", "y"):
            assert _generate(daemon, name, "hi").status_code == 200
        assert len(processes_with_marker(daemon.marker)) >= 5  # daemon, 2 tokenizers, 2 sh + runners
        assert daemon.stop(signal.SIGTERM) in (0, -signal.SIGTERM, 143)
        deadline = time.monotonic() + 15
        while processes_with_marker(daemon.marker):
            assert time.monotonic() < deadline, processes_with_marker(daemon.marker)
            time.sleep(0.1)
        log = daemon.log()
        assert "Traceback" not in log, log[-3000:]


def test_json_logs_carry_the_request_id(tmp_path):
    entries = [scripted_model(tmp_path, "m", reply_words=WORDS)]
    with running_daemon(tmp_path, entries, "--log-format", "json") as daemon:
        reply = _generate(daemon, "m", "logged")
        request_id = reply.headers["x-request-id"]
        deadline = time.monotonic() + 10
        while True:
            lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
            tagged = [line for line in lines if line.get("request_id") == request_id]
            if tagged or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert tagged, lines[-5:]
        assert any("/api/generate" in line.get("message", "") for line in tagged), tagged


def test_axllm_runner_without_script_or_tokenizer_server(tmp_path):
    """The 2026 runner (`axllm run <dir>`): log style of its own, built-in tokenizer, `/reset`."""
    folder = tmp_path / "qwen3-axllm"
    folder.mkdir()
    tokenizer = Path(__file__).resolve().parent.parent / "model" / "smollm2-135m" / "tokenizer"
    (folder / "config.json").write_text(json.dumps(
        {"tokenizer_path": str(tokenizer), "system_prompt": "Be brief.", "emu_init_seconds": 0,
         "emu_reply_words": WORDS}))
    entry = {"model_name": "axllm", "run_cmd": "ax-emulator run .", "model_path": str(folder), "dialect": "c"}
    with running_daemon(tmp_path, [entry]) as daemon:
        for prompt in ("c-one", "c-two"):
            body = _generate(daemon, "axllm", prompt).json()
            assert body["response"] == reply_text(prompt, WORDS, think=False), body
        status = daemon.wait_state("axllm", "ready")
        assert status["dialect"] == "c"
        history = daemon.client().get("/api/status_history/axllm").json()["history"]
        assert [t["to"] for t in history][:3] == ["starting", "initializing", "ready"]  # no tokenizer to wait for
        assert any(t["to"] == "resetting" for t in history)
        log = daemon.client().get("/api/logs/axllm").json()["lines"]
        assert any(e["line"].endswith("LLM init ok") for e in log), log[-10:]


def test_the_daemon_runs_on_uvloop(tmp_path):
    with running_daemon(tmp_path, [scripted_model(tmp_path, "m", reply_words=WORDS)]) as daemon:
        assert _generate(daemon, "m", "hi").status_code == 200
        maps = Path(f"/proc/{daemon.process.pid}/maps").read_text()
        assert "uvloop" in maps, "the event loop is not uvloop's"


def test_a_card_only_daemon_never_loads_the_http_engines_client(tmp_path):
    """aiohttp (the HTTP engine's upstream client: 8 MB of RSS) is imported with the first HTTP
    engine, so a daemon serving only the card never maps it; one with an upstream entry does."""
    with running_daemon(tmp_path, [scripted_model(tmp_path, "m", reply_words=WORDS)]) as daemon:
        assert _generate(daemon, "m", "hi").status_code == 200
        assert "aiohttp" not in Path(f"/proc/{daemon.process.pid}/maps").read_text()
    upstream = {"model_name": "remote", "engine": "openai-http", "base_url": "http://127.0.0.1:9"}
    (tmp_path / "with-upstream").mkdir()
    with running_daemon(tmp_path / "with-upstream", [upstream]) as daemon:
        assert "aiohttp" in Path(f"/proc/{daemon.process.pid}/maps").read_text()


def test_the_daemon_start_imports_neither_httpx_command_line_client_nor_the_schema_checker():
    """httpx imports its CLI (rich, pygments) whenever they are installed, as they are here; the
    daemon's package blocks that import, and its HTTP client works as before. jsonschema and
    referencing wait for the first request with a schema."""
    import subprocess
    import sys

    code = ("import sys, llm_service.cli, llm_service.app, httpx; "
            "print(sorted(m for m in ('rich', 'pygments', 'httpx._main', 'jsonschema', 'referencing') if sys.modules.get(m)), "
            "httpx.Client is not None)")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0 and ran.stdout.split() == ["[]", "True"], (ran.stdout, ran.stderr)
    found = subprocess.run([sys.executable, "-c", "import rich, pygments, jsonschema"], capture_output=True, timeout=60)
    assert found.returncode == 0  # installed: without the block httpx would import them


def test_fresh_context_restarts_are_counted_apart_from_crashes(tmp_path):
    """A runner without `reset` restarts for every independent request: that is its normal
    service, not a fault, and must not look like one in the status (or trip the README's alert)."""
    entries = [shell_runner_model(tmp_path, "m")]
    with running_daemon(tmp_path, entries) as daemon:
        for prompt in ("one", "two", "three"):
            assert _generate(daemon, "m", prompt).json()["response"] == f"You said: {prompt}"
        status = daemon.client().get("/api/status/m").json()
        assert status["restarts"] == 0
        assert status["fresh_context_restarts"] == 2
        metrics = daemon.client().get("/metrics").text
        assert 'axm1_llm_runner_restarts_total{model="m",reason="fresh_context"} 2.0' in metrics
