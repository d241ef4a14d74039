"""Real model servers launched by the daemon as managed upstreams: our transformers worker (with a
LoRA adapter sharing its base) and embedding worker, and Hugging Face's `transformers serve` —
through the official `openai` client, with a kill -9 in mid-answer, and `/api/status` through
start, crash, restart and unload."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from harness.daemon import running_daemon
from harness.net import wait_until
from test_managed_upstreams import alive, states_seen
from upstream_support import OFFLINE, TRANSFORMERS_CLI

pytestmark = pytest.mark.slow

ONE_THREAD = {"OMP_NUM_THREADS": "1", **OFFLINE}  # the test machines are small and shared


def kill_mid_answer(client: openai.OpenAI, daemon, model: str) -> tuple[int, list[str], BaseException]:
    """Stream a long answer and SIGKILL the server after its third chunk; returns its pid, the
    chunks received and the error the client got."""
    pid = daemon.get(f"/api/status/{model}")["managed"]["pid"]
    received: list[str] = []
    try:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Tell me a long story about a cat."}],
            stream=True, max_tokens=200, temperature=0,
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
                if len(received) == 3:
                    os.kill(pid, signal.SIGKILL)
    except openai.APIError as exc:
        return pid, received, exc
    raise AssertionError(f"the answer ended without an error after the kill: {received!r}")


def assert_crash_then_restart(client: openai.OpenAI, daemon, model: str, messages: list[dict[str, Any]]) -> None:
    pid, received, error = kill_mid_answer(client, daemon, model)
    assert len(received) >= 3 and "upstream" in str(error)
    history = daemon.get(f"/api/status/{model}")["history"]
    assert any(t["to"] == "failed" and "killed by signal SIGKILL" in t["reason"] for t in history), history
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content
    status = daemon.get(f"/api/status/{model}")
    assert status["state"] == "ready" and status["managed"]["pid"] != pid and not alive(pid)
    seen = states_seen(daemon, model)
    assert seen[:3] == ["starting", "initializing", "ready"] and "failed" in seen


@pytest.fixture(scope="module")
def transformers_serve_daemon(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("managed-transformers-serve")
    entry = {
        "model_name": "smol-served", "engine": "openai-http",
        "command": [str(TRANSFORMERS_CLI), "serve", "--host", "127.0.0.1", "--port", "{port}", "--device", "cpu",
                    str(checkpoint)],
        "env": {**ONE_THREAD, "HF_HUB_CACHE": str(root / "hf-cache")},
        "upstream_model": str(checkpoint), "keep_alive": "-1", "retries": "0",
    }
    with running_daemon(root, [entry], "--load-stall-timeout-s", "120") as d:
        yield d


def test_transformers_serve_launched_streamed_killed_and_restarted(transformers_serve_daemon) -> None:
    daemon = transformers_serve_daemon
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=180)
    assert daemon.get("/api/status/smol-served")["state"] == "stopped"
    messages = [{"role": "user", "content": "Say hello."}]
    chunks = list(client.chat.completions.create(model="smol-served", messages=messages, max_tokens=8,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert_crash_then_restart(client, daemon, "smol-served", messages)
    httpx.post(daemon.url + "/api/models/smol-served/unload", timeout=60).raise_for_status()
    status = daemon.get("/api/status/smol-served")
    assert status["state"] == "stopped" and status["managed"]["pid"] is None
