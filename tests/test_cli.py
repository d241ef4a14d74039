"""The `axm1-llm` command as a user runs it: a real process, real HTTP for `status`."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI

from harness.net import free_port, wait_http
from llm_service.security import install_security
from llm_service.settings import DaemonSettings

AXM1 = str(Path(sys.executable).parent / "axm1-llm")
STATUS_KEY = "status-test-key"


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AXM1_")}
    return subprocess.run(
        [AXM1, *argv], capture_output=True, text=True, timeout=60, env={**clean, **(env or {})}
    )


def test_serve_help_lists_every_setting_with_its_default() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())  # argparse wraps lines
    for name, field in DaemonSettings.model_fields.items():
        assert f"--{name.replace('_', '-')}" in help_text
        assert f"env AXM1_{name.upper()};" in help_text
    assert "default: 127.0.0.1]" in help_text
    assert "default: 11535]" in help_text


def test_serve_refuses_a_missing_descriptor(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model-descriptor.json"
    result = run_cli("serve", "--descriptor", str(missing), "--port", str(free_port()))
    assert result.returncode == 2
    assert f"model descriptor not found: {missing}" in result.stderr


def test_serve_refuses_a_bad_value_naming_the_flag(tmp_path: Path) -> None:
    result = run_cli("serve", "--queue-size", "many")
    assert result.returncode == 2
    assert "--queue-size" in result.stderr


def test_serve_names_an_unknown_config_key(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("hangtimeout: 5\n")
    result = run_cli("serve", env={"AXM1_CONFIG": str(config)})
    assert result.returncode == 2
    assert "unknown setting 'hangtimeout'" in result.stderr


def status_body(now: float) -> dict:
    """The shape the daemon's /api/status sends (see CardEngine.status and ModelManager.model_status),
    with the model ready since ~2 minutes before `now`."""
    return {
        "models": [
            {
                "name": "qwen3-1.7b",
                "state": "ready",
                "since": "2026-12-02T10:00:00Z",
                "since_epoch": now - 125,
                "progress": {"percent": 100, "step": 31, "total": 31, "message": "init post axmodel ok"},
                "queue": {"length": 3, "running": 1, "max": 512, "concurrency": 1, "waiting": []},
                "context": {"used": 46, "remaining": 2002, "size": 2048, "conversation_messages": 2},
                "restarts": 2,
                "fresh_context_restarts": 0,
                "last_error": {"at": now - 200, "reason": "runner exited with status 255 while loading",
                               "details": {"returncode": 255}, "log_tail": ["lLaMa.Init failed"]},
            },
            {"name": "bare-model"},  # every other key missing
        ]
    }


@pytest.fixture(scope="module")
def status_daemon() -> Iterator[str]:
    app = FastAPI()
    body = status_body(time.time())  # now, not at import: a parallel run may start this module late

    @app.get("/api/status")
    async def status() -> dict:
        return body

    install_security(app, DaemonSettings(api_keys=[STATUS_KEY]))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/api/status")
    yield url
    server.should_exit = True
    thread.join(timeout=10)


def test_status_prints_a_table_using_the_key_from_the_environment(status_daemon: str) -> None:
    result = run_cli("status", "--url", status_daemon, env={"AXM1_API_KEYS": STATUS_KEY})
    assert result.returncode == 0, result.stderr
    header, first, second = result.stdout.splitlines()
    assert header.split()[:4] == ["MODEL", "STATE", "SINCE", "PROGRESS"]
    name, state, age, ago, *rest = first.split()[:7]
    # The fixture's `since` lies ~2 minutes back when it starts; a slow run may read it later.
    assert [name, state, ago, *rest] == ["qwen3-1.7b", "ready", "ago", "31/31", "3", "46/2048"]
    assert age in ("2m", "3m", "4m"), age
    assert first.endswith("runner exited with status 255 while loading")
    assert second.split()[:2] == ["bare-model", "?"]


def test_status_with_a_wrong_key_reports_the_refusal(status_daemon: str) -> None:
    result = run_cli("status", "--url", status_daemon, "--api-key", "wrong")
    assert result.returncode == 1
    assert "401" in result.stderr


def test_status_reports_an_unreachable_daemon() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli("status", "--url", url, "--timeout", "2")
    assert result.returncode == 1
    assert f"cannot reach {url}/api/status" in result.stderr
