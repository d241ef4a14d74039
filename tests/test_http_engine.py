"""HttpEngine against real upstream processes on loopback.

The real third-party upstream is `transformers serve` with SmolLM2-135M-Instruct on the CPU; the
fault shapes (error answers, malformed chunks, dropped connections) come from the fake upstream
process, because no real server misbehaves on demand.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from harness.net import free_port
from llm_service.descriptor import ModelSpec
from llm_service.engines.base import (
    BadRequest,
    ChatMessage,
    Chunk,
    EngineError,
    GenerationRequest,
    GenerationResult,
    ModelUnavailable,
    SamplingOptions,
)
from llm_service.engines.base import EngineContext
from llm_service.engines.http import HttpConfig, HttpEngine
from llm_service.admission import AdmissionQueue
from llm_service.metrics import MetricsHub
from llm_service.settings import DaemonSettings
from llm_service.tokenizer_client import TokenizerClient
from upstream_support import FakeUpstream

SETTINGS = DaemonSettings(backoff_min_s=0.05, backoff_max_s=0.4, metrics_dir=None)


def spec_for(base_url: str, **fields: Any) -> ModelSpec:
    config = HttpConfig(base_url=base_url, **fields).resolved(Path("."), "remote")
    return ModelSpec(name="remote", engine="openai-http", config=config)


def chat(text: str, **options: Any) -> GenerationRequest:
    return GenerationRequest(id=f"t{time.monotonic_ns()}", messages=[ChatMessage("user", text)], options=SamplingOptions(**options))


@asynccontextmanager
async def running(spec: ModelSpec) -> AsyncIterator[HttpEngine]:
    """The engine with its owner task, as the model manager runs it."""
    context = EngineContext(SETTINGS, MetricsHub(None, "test").model(spec.name), TokenizerClient(SETTINGS.tokenizer_service_port))
    engine = HttpEngine(spec, context)
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        try:
            yield engine
        finally:
            with anyio.fail_after(10):
                await engine.stop("test over")
            tg.cancel_scope.cancel()


async def collect(engine: HttpEngine, request: GenerationRequest) -> tuple[list[Chunk], GenerationResult]:
    chunks: list[Chunk] = []
    with anyio.fail_after(120):
        async for item in engine.generate(request):
            if isinstance(item, GenerationResult):
                return chunks, item
            chunks.append(item)
    raise AssertionError("the stream ended without a GenerationResult")


async def wait_state(engine: HttpEngine, state: str, timeout: float) -> None:
    with anyio.fail_after(timeout):
        while engine.state != state:
            await anyio.sleep(0.05)


@pytest.fixture
def fake(tmp_path: Path):
    upstream = FakeUpstream(tmp_path).start()
    yield upstream
    upstream.stop()


# ---- the real upstream ----------------------------------------------------------------------


@pytest.mark.slow
def test_streams_a_real_answer_with_real_usage(hf_upstream, checkpoint: Path) -> None:
    spec = spec_for(hf_upstream.base_url, upstream_model=str(checkpoint))

    async def scenario() -> None:
        async with running(spec) as engine:
            assert await engine.wait_ready(time.monotonic() + 30) >= 0
            assert [t["to"] for t in engine.transition_history()] == ["starting", "initializing", "ready"]
            assert engine.capabilities.embeddings is False  # transformers serve has no /v1/embeddings
            chunks, result = await collect(engine, chat("Say hello in one word.", num_predict=6, temperature=0.0))
            text = "".join(c.content for c in chunks)
            assert text.strip(), chunks
            assert len(chunks) > 1, "the answer must be relayed chunk by chunk, not in one piece"
            assert result.finish_reason == "length"
            assert result.completion_tokens == 6
            assert result.prompt_tokens > 5  # chat template + question, counted by the upstream
            assert result.time_to_first_token is not None and 0 < result.time_to_first_token <= result.total_duration
            assert result.warnings == []

    anyio.run(scenario)


def test_upstream_going_down_fails_the_model_and_coming_back_recovers_it(tmp_path: Path) -> None:
    # The fake upstream, stopped and started again on its port: what matters is the server
    # going away and coming back, not which model it serves (a real one costs two loads of torch).
    server = FakeUpstream(tmp_path, words=3).start()
    spec = spec_for(server.base_url + "/v1", upstream_model="fake-upstream-model", retries=1)

    async def scenario() -> None:
        async with running(spec) as engine:
            await engine.wait_ready(time.monotonic() + 30)
            await anyio.to_thread.run_sync(server.stop)
            with pytest.raises(ModelUnavailable, match="unreachable after 2 attempt"):
                await collect(engine, chat("hello", num_predict=2))
            await wait_state(engine, "failed", 5)
            assert "unreachable" in engine.status()["last_error"]["reason"]
            with pytest.raises(ModelUnavailable, match="unavailable"):
                await engine.wait_ready(time.monotonic() + 5)

            await anyio.to_thread.run_sync(server.start)
            await wait_state(engine, "ready", 30)  # found by the background probe, no request needed
            status = engine.status()
            assert status["recoveries"] == 1
            moves = [(m["from"], m["to"]) for m in status["history"]]
            assert moves[-3:] == [("failed", "starting"), ("starting", "initializing"), ("initializing", "ready")]
            chunks, result = await collect(engine, chat("hello", num_predict=3))
            assert result.completion_tokens == 3 and chunks

    try:
        anyio.run(scenario)
    finally:
        server.stop()


# ---- the fake upstream: request shape, faults, disconnects, concurrency -----------------------


def test_sampling_model_name_and_api_key_are_passed_through(fake: FakeUpstream, monkeypatch) -> None:
    monkeypatch.setenv("REMOTE_TEST_KEY", "sk-test-123")
    spec = spec_for(fake.base_url + "/v1/", upstream_model="big-model", api_key_env="REMOTE_TEST_KEY")
    options = dict(temperature=0.3, top_p=0.9, top_k=20, seed=7, num_predict=12, stop=("END",), num_ctx=4096)

    async def scenario() -> None:
        async with running(spec) as engine:
            await engine.wait_ready(time.monotonic() + 10)
            chunks, result = await collect(engine, chat("hi", **options))
            assert "".join(c.content for c in chunks) == "w1 w2 w3 w4 w5 "
            assert (result.prompt_tokens, result.completion_tokens, result.finish_reason) == (7, 5, "stop")
            assert result.warnings == ["num_ctx: the upstream server fixes its context size"]

    anyio.run(scenario)
    [seen] = fake.records()["chat_requests"]
    assert seen["authorization"] == "Bearer sk-test-123"
    body = seen["body"]
    assert body["model"] == "big-model"
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert {k: body[k] for k in ("temperature", "top_p", "top_k", "seed", "max_tokens", "stop")} == {
        "temperature": 0.3, "top_p": 0.9, "top_k": 20, "seed": 7, "max_tokens": 12, "stop": ["END"],
    }


@pytest.mark.parametrize(
    ("mode", "expected_thinking", "expected_content"),
    [("reasoning", "pondering", "the answer"), ("think_inline", "pondering hard", "the answer")],
)
def test_reasoning_fields_and_inline_think_tags_become_thinking(fake: FakeUpstream, mode, expected_thinking, expected_content) -> None:
    fake.configure(chat=mode)

    async def scenario() -> None:
        async with running(spec_for(fake.base_url)) as engine:
            await engine.wait_ready(time.monotonic() + 10)
            chunks, _ = await collect(engine, chat("think"))
            # reasoning and reasoning_content carry one text: relayed once, not twice
            assert "".join(c.thinking for c in chunks) == expected_thinking
            assert "".join(c.content for c in chunks) == expected_content

    anyio.run(scenario)


def test_upstream_error_answer_becomes_502_with_its_message(fake: FakeUpstream) -> None:
    fake.configure(chat="error", error_status=500, error_message="CUDA out of memory")

    async def scenario() -> None:
        async with running(spec_for(fake.base_url)) as engine:
            await engine.wait_ready(time.monotonic() + 10)
            with pytest.raises(EngineError) as caught:
                await collect(engine, chat("hi"))
            assert caught.value.status_code == 502
            assert "CUDA out of memory" in caught.value.message and fake.base_url in caught.value.message
            fake.configure(error_status=400, error_message="max_tokens is too large")
            with pytest.raises(BadRequest, match="max_tokens is too large"):
                await collect(engine, chat("hi"))
            assert engine.state == "ready"  # an error answer proves the upstream is alive

    anyio.run(scenario)


def test_malformed_chunk_is_an_error_naming_the_upstream(fake: FakeUpstream) -> None:
    fake.configure(chat="malformed")

    async def scenario() -> None:
        async with running(spec_for(fake.base_url)) as engine:
            await engine.wait_ready(time.monotonic() + 10)
            relayed = []
            with pytest.raises(EngineError) as caught:
                async for item in engine.generate(chat("hi")):
                    relayed.append(item)
            assert caught.value.status_code == 502
            assert "malformed" in caught.value.message and fake.base_url in caught.value.message
            assert relayed == [Chunk(content="fine ", tokens=1)]  # what came before the bad chunk was relayed

    anyio.run(scenario)


def test_connection_failures_before_the_answer_are_retried_with_backoff(fake: FakeUpstream) -> None:
    fake.configure(drop_first=2)

    async def scenario() -> None:
        async with running(spec_for(fake.base_url, retries=2)) as engine:
            await engine.wait_ready(time.monotonic() + 10)
            began = time.monotonic()
            chunks, result = await collect(engine, chat("hi"))
            assert result.finish_reason == "stop" and chunks
            assert time.monotonic() - began >= 0.05 + 0.1  # back-off: 0.05 s, then 0.1 s

    anyio.run(scenario)
    assert len(fake.records()["chat_requests"]) == 3


def test_connection_lost_mid_answer_is_not_retried(fake: FakeUpstream) -> None:
    fake.configure(chat="drop_mid")

    async def scenario() -> None:
        async with running(spec_for(fake.base_url, retries=3)) as engine:
            await engine.wait_ready(time.monotonic() + 10)
            relayed = []
            with pytest.raises(EngineError, match="mid-answer") as caught:
                async for item in engine.generate(chat("hi")):
                    relayed.append(item)
            assert caught.value.status_code == 502
            assert relayed == [Chunk(content="half ", tokens=1)]

    anyio.run(scenario)
    assert len(fake.records()["chat_requests"]) == 1, "a half-sent answer must never be asked for again"


def test_client_leaving_closes_the_upstream_connection_at_once(fake: FakeUpstream) -> None:
    fake.configure(words=200, delay_s=0.02)

    async def scenario() -> None:
        async with running(spec_for(fake.base_url)) as engine:
            await engine.wait_ready(time.monotonic() + 10)
            stream = engine.generate(chat("a long one"))
            for _ in range(3):
                await stream.__anext__()
            await stream.aclose()  # what the API layer does when its client disconnects
            closed_at = time.time()
            with anyio.fail_after(3):
                while not (await anyio.to_thread.run_sync(fake.records))["disconnects"]:
                    await anyio.sleep(0.05)
            [disconnect] = fake.records()["disconnects"]
            assert disconnect["chunks_sent"] < 50, disconnect
            assert disconnect["at"] - closed_at < 1.0
            assert engine.status()["in_flight"] == 0

    anyio.run(scenario)
    assert fake.records()["completed"] == 0


@pytest.mark.parametrize("max_concurrency", [1, 4])
def test_concurrency_limit_is_what_the_spec_says(fake: FakeUpstream, max_concurrency: int) -> None:
    fake.configure(words=6, delay_s=0.05)
    spec = spec_for(fake.base_url, max_concurrency=max_concurrency)

    async def scenario() -> None:
        async with running(spec) as engine:
            assert engine.capabilities.max_concurrency == max_concurrency
            assert engine.capabilities.per_request_sampling
            await engine.wait_ready(time.monotonic() + 10)
            # The model manager's admission: the queue sized by the engine's capabilities.
            admission = AdmissionQueue(max_queue=16, concurrency=engine.capabilities.max_concurrency)

            async def one(i: int) -> None:
                async with admission.slot(f"r{i}"):
                    await collect(engine, chat(f"request {i}"))

            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(one, i)

    anyio.run(scenario)
    records = fake.records()
    assert records["completed"] == 4
    assert records["max_in_flight"] == max_concurrency


def test_readiness_falls_back_to_models_and_waits_while_the_upstream_loads(fake: FakeUpstream) -> None:
    fake.configure(health=503)

    async def scenario() -> None:
        async with running(spec_for(fake.base_url)) as engine:
            await engine.start()
            await wait_state(engine, "initializing", 5)  # llama.cpp's "Loading model"
            with pytest.raises(EngineError, match="not ready before the request deadline"):
                await engine.wait_ready(time.monotonic() + 0.3)
            await anyio.to_thread.run_sync(lambda: fake.configure(health=404))  # no /health, as Ollama
            assert await engine.wait_ready(time.monotonic() + 5) > 0
            assert engine.status()["history"][-1]["reason"] == "GET /v1/models answered 200"

    anyio.run(scenario)


def test_unreachable_upstream_fails_at_start_and_embeddings_follow_the_upstream(tmp_path: Path) -> None:
    port = free_port()
    spec = spec_for(f"http://127.0.0.1:{port}")

    async def scenario() -> None:
        async with running(spec) as engine:
            with pytest.raises(ModelUnavailable, match=f"127.0.0.1:{port}"):
                await engine.wait_ready(time.monotonic() + 10)
            assert engine.state == "failed"
            upstream = FakeUpstream(tmp_path, port=port, embeddings=True)
            await anyio.to_thread.run_sync(upstream.start)
            try:
                await engine.wait_ready(time.monotonic() + 10)
                assert engine.capabilities.embeddings
                embeddings = await engine.embed(["a", "abc"])
                vectors, tokens = embeddings.vectors, embeddings.prompt_tokens
                assert vectors == [[1.0, 0.5, -1.0], [3.0, 0.5, -1.0]] and tokens == 6
            finally:
                await anyio.to_thread.run_sync(upstream.stop)

    anyio.run(scenario)
