"""Managed upstreams, end to end: the real daemon launches an OpenAI-compatible server (the fake
upstream process here, a real worker in test_managed_workers.py) from the descriptor's `command`,
waits for its health, relays its output, restarts it after a crash, stops it after keep_alive or
on unload, swaps models under a GPU memory budget, and never leaves it behind."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from harness.net import wait_until
from harness.daemon import running_daemon
from upstream_support import FAKE_UPSTREAM


def managed_entry(name: str, **fields: Any) -> dict[str, Any]:
    """A model served by the fake upstream, launched by the daemon; `config` sets its behaviour.
    Models naming the same launch share one process: the model's name in the config keeps
    them apart."""
    config = {"model": name, **fields.pop("config", {})}
    entry = {
        "model_name": name,
        "engine": "openai-http",
        "command": [sys.executable, str(FAKE_UPSTREAM), "--port", "{port}", "--config", json.dumps(config)],
        "keep_alive": "-1",
        "retries": "0",
    }
    entry.update(fields)
    return entry


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def states_seen(daemon, model: str) -> list[str]:
    return [t["to"] for t in daemon.get(f"/api/status_history/{model}")["history"]]


def chat(client: openai.OpenAI, model: str, text: str = "hello") -> str:
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}])
    return answer.choices[0].message.content.strip()  # the fake upstream sends "w1 w2 … wN "


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("managed")
    entries = [
        managed_entry("loader", config={"load_s": 1.0, "words": 4}),
        managed_entry("streamer", config={"words": 40, "delay_s": 0.05}),
        managed_entry("brief", keep_alive="1s"),
        managed_entry("gpu-a", gpu_memory_mb="600"),
        managed_entry("gpu-b", gpu_memory_mb="600"),
        managed_entry("missing", command=["/nonexistent/bin/server", "--port", "{port}"]),
        managed_entry("stalled", config={"listen": False}),
        # Two models naming one launch (a base and its adapter on one worker) share the process.
        managed_entry("base", upstream_model="base"),
        managed_entry("adapter", upstream_model="adapter"),
    ]
    entries[-1]["command"] = entries[-2]["command"]
    with running_daemon(root, entries, "--gpu-memory-mb", "1000", "--load-stall-timeout-s", "2") as d:
        yield d


@pytest.fixture(scope="module")
def client(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_launched_on_demand_with_load_progress_then_served(daemon, client) -> None:
    assert daemon.get("/api/status/loader")["state"] == "stopped"
    assert chat(client, "loader") == "w1 w2 w3 w4"
    status = daemon.get("/api/status/loader")
    assert status["state"] == "ready" and alive(status["managed"]["pid"])
    assert states_seen(daemon, "loader")[:3] == ["starting", "initializing", "ready"]
    lines = [e["line"] for e in daemon.get("/api/logs/loader")["lines"]]
    assert any(line.startswith("[axm1-llm] launching (port") for line in lines)
    assert "loading weights 4/4" in lines  # the server's own output, relayed into the model's log
    info = daemon.get("/api/models/loader")
    assert info["loaded"] is True and info["engine"] == "openai-http" and info["upstream"]["managed"] is True


def test_kill_9_mid_answer_is_an_explicit_error_then_a_restart_serves(daemon, client) -> None:
    chat(client, "streamer")
    first_pid = daemon.get("/api/status/streamer")["managed"]["pid"]
    received = []
    with pytest.raises(openai.APIError) as failure:
        stream = client.chat.completions.create(
            model="streamer", messages=[{"role": "user", "content": "long"}], stream=True
        )
        for chunk in stream:
            received.append(chunk.choices[0].delta.content if chunk.choices else "")
            if len(received) == 3:
                os.kill(first_pid, signal.SIGKILL)
    assert "lost the connection" in str(failure.value) or "upstream" in str(failure.value)
    assert 3 <= len(received) < 40
    # The broken connection can reach the client before the daemon has reaped the process.
    wait_until(lambda: "killed by signal SIGKILL" in json.dumps(daemon.get("/api/status/streamer")["history"]), 15,
               "the history to record the SIGKILL")
    assert "failed" in states_seen(daemon, "streamer")
    # The next request is served by a new process.
    answer = chat(client, "streamer")
    assert answer.split() == [f"w{i}" for i in range(1, 41)]
    status = daemon.get("/api/status/streamer")
    assert status["managed"]["pid"] != first_pid and status["managed"]["restarts"] >= 1
    assert not alive(first_pid)
    metrics = httpx.get(daemon.url + "/metrics").text
    assert 'model="streamer",reason="crash"' in metrics


def test_keep_alive_stops_the_process(daemon, client) -> None:
    assert chat(client, "brief") == "w1 w2 w3 w4 w5"
    pid = daemon.get("/api/status/brief")["managed"]["pid"]
    assert alive(pid)
    daemon.wait_state("brief", "stopped", timeout=15)
    wait_until(lambda: not alive(pid), 10, "the upstream process to end after keep_alive")
    assert states_seen(daemon, "brief")[-2:] == ["stopping", "stopped"]


def test_swap_under_the_gpu_memory_budget(daemon, client) -> None:
    chat(client, "gpu-a")
    pid_a = daemon.get("/api/status/gpu-a")["managed"]["pid"]
    chat(client, "gpu-b")  # 600 + 600 > 1000: gpu-a, idle, makes room
    assert daemon.get("/api/status/gpu-a")["state"] == "stopped" and not alive(pid_a)
    assert daemon.get("/api/status/gpu-b")["state"] == "ready"
    chat(client, "gpu-a")
    assert daemon.get("/api/status/gpu-b")["state"] == "stopped"
    assert "making room on GPU 0 for gpu-a" in json.dumps(daemon.get("/api/status/gpu-b")["history"])


def test_a_command_that_cannot_start_fails_clearly(daemon, client) -> None:
    with pytest.raises(openai.APIStatusError) as failure:
        chat(client, "missing")
    assert failure.value.status_code == 503
    assert "cannot start the upstream's command '/nonexistent/bin/server'" in str(failure.value)
    assert daemon.get("/api/status/missing")["state"] == "failed"


def test_a_load_without_progress_is_given_up_and_the_process_ended(daemon, client) -> None:
    began = time.monotonic()
    with pytest.raises(openai.APIStatusError) as failure:
        chat(client, "stalled")
    assert failure.value.status_code == 503
    assert "did not become ready: no output and no answer on /health for 2s" in str(failure.value)
    assert time.monotonic() - began < 30
    lines = [e["line"] for e in daemon.get("/api/logs/stalled")["lines"]]
    assert "starting, but never listening" in lines
    pid = daemon.get("/api/status/stalled")["managed"]["pid"]
    assert pid is None or not alive(pid)
    httpx.post(daemon.url + "/api/models/stalled/unload", timeout=30)  # no more relaunches


def test_models_naming_one_launch_share_the_process(daemon, client) -> None:
    chat(client, "base")
    chat(client, "adapter")
    base, adapter = daemon.get("/api/status/base"), daemon.get("/api/status/adapter")
    assert base["managed"]["pid"] == adapter["managed"]["pid"] and alive(base["managed"]["pid"])
    pid = base["managed"]["pid"]
    answer = httpx.post(daemon.url + "/api/models/base/unload", timeout=30).json()
    assert answer == {"model": "base", "loaded": False, "info": answer["info"]} and answer["info"]["state"] == "stopped"
    assert alive(pid)  # the adapter still holds it
    assert chat(client, "adapter") == "w1 w2 w3 w4 w5"
    httpx.post(daemon.url + "/api/models/adapter/unload", timeout=30).raise_for_status()
    wait_until(lambda: not alive(pid), 10, "the shared process to end with its last holder")


def test_explicit_load_and_info(daemon) -> None:
    httpx.post(daemon.url + "/api/models/loader/unload", timeout=30).raise_for_status()
    assert daemon.get("/api/models/loader")["loaded"] is False
    answer = httpx.post(daemon.url + "/api/models/loader/load", json={"keep_alive": "10m"}, timeout=60).json()
    assert answer["loaded"] is True and answer["load_duration"] >= 0.9  # its load takes a second
    assert answer["info"]["keep_alive_expires_at"] is not None
    assert httpx.post(daemon.url + "/api/models/nope/load", timeout=10).status_code == 404
    bad = httpx.post(daemon.url + "/api/models/loader/load", json={"keep_alive": "soon"}, timeout=10)
    assert bad.status_code == 400 and "keep_alive" in bad.text


def test_sigkill_of_the_daemon_leaves_no_upstream(tmp_path: Path) -> None:
    with running_daemon(tmp_path, [managed_entry("m")]) as d:
        httpx.post(d.url + "/api/models/m/load", timeout=60).raise_for_status()
        pid = d.get("/api/status/m")["managed"]["pid"]
        assert alive(pid)
        d.stop(signal.SIGKILL)
        wait_until(lambda: not alive(pid), 10, "the upstream to die with the daemon")
