"""A fleet behind LiteLLM's proxy (issue 19, section 2): the shipped deploy/litellm/config.yaml,
pointed at two real daemons on the scripted model, in front of a real `litellm` proxy process
(its own venv, which ./run test sets up). Requests spread over both boxes; one box SIGKILLed →
every request still answers, from the other; the box back on its port → traffic returns. And the
daemon's side of it: per-model /health and /ready, 503 with Retry-After when the queue is full."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from ax_emulator.scripted import reply_text
from harness.daemon import running_daemon
from harness.models import scripted_model
from harness.net import free_port, wait_until
from harness.paths import REPO_ROOT as ROOT
from llm_service.models import model_verdict

MODEL = "fleet-model"
WORDS = 4
LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"
CONFIG = ROOT / "deploy" / "litellm" / "config.yaml"
ROUTER_KEY = "sk-fleet-test-key"


# ---- the daemon's side ------------------------------------------------------------------------

def test_model_verdicts() -> None:
    assert model_verdict("ready", 0, 4) == (True, True, "ready, 0 waiting")
    assert model_verdict("outputting", 2, 4) == (True, True, "outputting, 2 waiting")
    assert model_verdict("outputting", 4, 4) == (True, False, "queue full (4 waiting)")
    assert model_verdict("stopped", 0, 4) == (True, False, "stopped: loads on the next request")
    assert model_verdict("initializing", 0, 4) == (True, False, "loading (initializing)")
    assert model_verdict("failed", 0, 4) == (False, False, "failed: a restart is scheduled")


def test_health_and_ready_per_model_and_a_full_queue(tmp_path) -> None:
    entries = [scripted_model(tmp_path, MODEL, reply_words=40, tokens_per_second=40, fields={"run_on_startup": "true"}),
               scripted_model(tmp_path, "idle-model")]
    with running_daemon(tmp_path, entries, "--queue-size", "1") as daemon:
        daemon.wait_state(MODEL, "ready")
        with daemon.client() as client:
            ready = client.get(f"/ready/{MODEL}")
            assert ready.status_code == 200 and ready.json()["ready"] is True
            idle = client.get("/ready/idle-model")
            assert idle.status_code == 503 and idle.headers["retry-after"] and "loads on the next request" in idle.json()["reason"]
            assert client.get("/health/idle-model").status_code == 200
            assert client.get("/ready/no-such-model").status_code == 404
            # One answering, one waiting: the queue (1) is full, the next is refused as busy.
            with ThreadPoolExecutor(2) as pool:
                running = [pool.submit(client.post, "/v1/completions", json={"model": MODEL, "prompt": f"p{i}"})
                           for i in range(2)]
                wait_until(lambda: daemon.get(f"/api/status/{MODEL}")["queue"]["length"] == 1, 10, "a waiter")
                refused = client.post("/v1/completions", json={"model": MODEL, "prompt": "one too many"})
                full = client.get(f"/ready/{MODEL}")
                assert [f.result().status_code for f in running] == [200, 200]
            assert refused.status_code == 503 and refused.headers["retry-after"]
            assert full.status_code == 503 and full.json()["reason"] == "queue full (1 waiting)"
            assert full.json()["healthy"] is True


# ---- behind LiteLLM ---------------------------------------------------------------------------

def router_config(path: Path, boxes: list[str]) -> Path:
    """The shipped config with its two example boxes replaced by ours, and cooldowns short
    enough for a test."""
    config = yaml.safe_load(CONFIG.read_text())
    template = config["model_list"][0]
    config["model_list"] = []
    for url in boxes:
        entry = {"model_name": MODEL, "litellm_params": dict(template["litellm_params"])}
        entry["litellm_params"].update(model=f"openai/{MODEL}", api_base=f"{url}/v1", api_key="none")
        config["model_list"].append(entry)
    config["router_settings"]["cooldown_time"] = 3
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def litellm_proxy(tmp_path):
    if not LITELLM.exists():
        pytest.fail(f"{LITELLM} is missing: ./run test sets it up (setup_litellm)")
    started: list[subprocess.Popen] = []

    def start(boxes: list[str]) -> str:
        port = free_port()
        log = open(tmp_path / "litellm.log", "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "LITELLM", "AXM1_"))}
        env.update(LITELLM_LOG="ERROR", NO_DOCS="True", DISABLE_ADMIN_UI="True", LITELLM_TELEMETRY="False",
                   LITELLM_MASTER_KEY=ROUTER_KEY)
        process = subprocess.Popen([str(LITELLM), "--config", str(router_config(tmp_path / "router.yaml", boxes)),
                                    "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        started.append(process)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert process.poll() is None, (tmp_path / "litellm.log").read_text()[-3000:]
            try:
                return httpx.get(f"{url}/health/liveliness", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        wait_until(up, 120, "the litellm proxy to listen")
        return url

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def served(daemon) -> int:
    """Completions the daemon answered (its own request counter)."""
    text = httpx.get(f"{daemon.url}/metrics", timeout=5).text
    return int(sum(float(v) for v in re.findall(
        rf'axm1_llm_requests_finished_total\{{[^}}]*finished_reason="stop"[^}}]*\}} ([0-9.e+]+)', text)))


def ask_many(client: openai.OpenAI, prompts: list[str], workers: int = 4) -> list[str]:
    def one(prompt: str) -> str:
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}])
        return answer.choices[0].message.content
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, prompts))


def test_requests_spread_fail_over_and_come_back(tmp_path, litellm_proxy) -> None:
    box_a_port = free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    entry = {"run_on_startup": "true"}
    a_entry = scripted_model(tmp_path / "a", MODEL, reply_words=WORDS, tokens_per_second=100, fields=entry)
    b_entry = scripted_model(tmp_path / "b", MODEL, reply_words=WORDS, tokens_per_second=100, fields=entry)
    with running_daemon(tmp_path / "b", [b_entry]) as box_b:
        box_a_cm = running_daemon(tmp_path / "a", [a_entry], port=box_a_port, leftovers_fail=False)
        box_a = box_a_cm.__enter__()
        try:
            for box in (box_a, box_b):
                box.wait_state(MODEL, "ready")
            router = litellm_proxy([box_a.url, box_b.url])
            client = openai.OpenAI(base_url=f"{router}/v1", api_key=ROUTER_KEY, max_retries=0, timeout=60)

            prompts = [f"spread {i}" for i in range(16)]
            assert ask_many(client, prompts) == [reply_text(p, WORDS, False) for p in prompts]
            a_before, b_before = served(box_a), served(box_b)
            assert a_before > 0 and b_before > 0 and a_before + b_before == 16, (a_before, b_before)

            # Box A dies: every request is still answered (LiteLLM retries on box B).
            box_a.process.send_signal(signal.SIGKILL)
            box_a.process.wait(10)
            prompts = [f"failover {i}" for i in range(10)]
            started = time.monotonic()
            assert ask_many(client, prompts) == [reply_text(p, WORDS, False) for p in prompts]
            # What the client saw (printed for the record, `pytest -s`): answers, no errors.
            print(f"\nfailover: 10 requests after box A's SIGKILL answered in {time.monotonic() - started:.2f} s")
            assert served(box_b) == b_before + 10
        finally:
            box_a_cm.__exit__(None, None, None)

        # Box A back on its port: after the cooldown, traffic reaches it again.
        (tmp_path / "a2").mkdir()
        a2_entry = scripted_model(tmp_path / "a2", MODEL, reply_words=WORDS, tokens_per_second=100, fields=entry)
        with running_daemon(tmp_path / "a2", [a2_entry], port=box_a_port) as box_a2:
            box_a2.wait_state(MODEL, "ready")
            time.sleep(3.5)  # the router's cooldown of box A (3 s in this config)
            prompts = [f"back {i}" for i in range(16)]
            assert ask_many(client, prompts) == [reply_text(p, WORDS, False) for p in prompts]
            assert served(box_a2) > 0, "no traffic returned to the box that came back"
