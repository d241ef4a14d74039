"""The OpenAI API under /v1, end to end: the real daemon (`axm1-llm serve`) with card models on
the emulator and openai-http models pointed at real upstream processes, and the official `openai`
package as the client."""
from __future__ import annotations

import base64
import json
import struct
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from ax_emulator.scripted import reply_text
from harness import net
from harness.daemon import running_daemon
from harness.models import scripted_model
from fake_upstreams import DEFAULTS as FAKE_DEFAULTS
from upstream_support import FakeUpstream

WORDS = 8
FAKE_CONFIG = {"embeddings": True}


@pytest.fixture(scope="module")
def upstreams(hf_upstream, tmp_path_factory: pytest.TempPathFactory):
    fake = FakeUpstream(tmp_path_factory.mktemp("openai-upstreams"), **FAKE_CONFIG).start()
    yield hf_upstream, fake
    fake.stop()


@pytest.fixture(scope="module")
def daemon(upstreams, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    real, fake = upstreams
    root = tmp_path_factory.mktemp("openai-daemon")
    entries = [
        scripted_model(root, "echo", reply_words=WORDS, fields={"aliases": ["echo-alias"]}),
        scripted_model(root, "thinker", reply_words=WORDS, think=True),
        {"model_name": "smol-remote", "engine": "openai-http", "base_url": real.base_url,
         "upstream_model": str(checkpoint), "max_concurrency": "1"},
        {"model_name": "fake-remote", "engine": "openai-http", "base_url": fake.base_url + "/v1",
         "upstream_model": "fake-upstream-model", "max_concurrency": "1", "retries": "0"},
    ]
    with running_daemon(root, entries, "--queue-size", "1") as d:
        yield d


@pytest.fixture
def fake(upstreams):
    """The fake upstream, back to its defaults after the test."""
    yield upstreams[1]
    upstreams[1].configure(**{**FAKE_DEFAULTS, **FAKE_CONFIG})


@pytest.fixture
def client(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def sse_events(reply: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE answer, checked for the framing on the way."""
    raw = reply.read().decode()
    assert raw.endswith("data: [DONE]\n\n"), raw[-300:]
    events = [block for block in raw.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events), raw[:500]
    return [block[len("data: "):] for block in events]


# ---- chat completions -----------------------------------------------------------------------


def test_chat_not_streaming_returns_the_models_text_and_real_usage(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "marker-31 hi"}])
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.model == "echo"
    [choice] = answer.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == reply_text("marker-31 hi", WORDS, think=False)
    assert choice.finish_reason == "stop"
    assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_chat_streaming_sends_deltas_then_finish_then_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="echo-alias",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "marker-32"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply_text("marker-32", WORDS, think=False)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 2, "streamed in pieces"
    *_, finish, last = chunks
    assert finish.choices[0].finish_reason == "stop"
    assert last.choices == [] and last.usage.completion_tokens > 0 and last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_framing_and_request_id(daemon) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": "marker-33"}], "stream": True}
    with net.stream("POST", daemon.url + "/v1/chat/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        assert reply.headers["x-request-id"]
        events = sse_events(reply)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "usage" not in chunks[-1], "no usage chunk unless stream_options.include_usage asks for it"
    assert len({c["id"] for c in chunks}) == 1


def test_thinking_goes_out_as_reasoning_and_reasoning_content(client: openai.OpenAI) -> None:
    full = reply_text("marker-34", WORDS, think=True)
    thinking, content = full.split("</think>")
    thinking = thinking.removeprefix("<think>").strip()

    answer = client.chat.completions.create(model="thinker", messages=[{"role": "user", "content": "marker-34"}])
    message = answer.choices[0].message.model_extra
    assert message["reasoning"] == message["reasoning_content"]
    assert message["reasoning"].strip() == thinking
    assert answer.choices[0].message.content.strip() == content.strip()

    chunks = list(client.chat.completions.create(
        model="thinker", messages=[{"role": "user", "content": "marker-34"}], stream=True))
    deltas = [c.choices[0].delta.model_extra for c in chunks if c.choices]
    streamed = "".join(d.get("reasoning") or "" for d in deltas)
    assert streamed == "".join(d.get("reasoning_content") or "" for d in deltas)
    assert streamed.strip() == thinking

    plain = client.chat.completions.create(
        model="thinker", messages=[{"role": "user", "content": "marker-34"}], reasoning_effort="none")
    assert "reasoning" not in (plain.choices[0].message.model_extra or {})
    assert plain.choices[0].message.content.strip() == content.strip()


# ---- completions, models ----------------------------------------------------------------------


def test_completions_streaming_and_not(client: openai.OpenAI) -> None:
    expected = reply_text("marker-35", WORDS, think=False)
    answer = client.completions.create(model="echo", prompt="marker-35")
    assert answer.object == "text_completion"
    assert answer.choices[0].text == expected and answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens > 0

    chunks = list(client.completions.create(model="echo", prompt="marker-35", stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0

    echoed = client.completions.create(model="echo", prompt="marker-35", echo=True)
    assert echoed.choices[0].text == "marker-35" + expected


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert sorted(ids) == ["echo", "fake-remote", "smol-remote", "thinker"]
    model = client.models.retrieve("echo-alias")
    assert model.id == "echo" and model.object == "model" and model.owned_by == "axm1-llm"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.body["code"] == "model_not_found"


# ---- errors ------------------------------------------------------------------------------------


def test_unknown_model_is_404_in_openais_envelope(client: openai.OpenAI, daemon) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404
    assert caught.value.body == {
        "message": 'model "missing" not found', "type": "invalid_request_error", "param": "model", "code": "model_not_found",
    }


def test_invalid_bodies_are_400_in_openais_envelope_only_under_v1(client: openai.OpenAI, daemon) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}], temperature=7)
    assert caught.value.body["param"] == "temperature" and caught.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="last message"):
        client.chat.completions.create(model="echo", messages=[{"role": "assistant", "content": "x"}])

    not_json = net.post(daemon.url + "/v1/chat/completions", content=b"{oops", timeout=10,
                          headers={"content-type": "application/json"})
    assert not_json.status_code == 400
    assert set(not_json.json()["error"]) == {"message", "type", "param", "code"}
    # The Ollama routes keep their own shape: the override is for /v1 only.
    ollama_style = net.post(daemon.url + "/api/generate", json={"prompt": "x"}, timeout=10)
    assert ollama_style.status_code == 400 and isinstance(ollama_style.json()["error"], str)


def test_embeddings_from_an_upstream_that_has_them_and_400_for_one_that_has_not(client: openai.OpenAI, daemon) -> None:
    vectors = client.embeddings.create(model="fake-remote", input=["a", "abc"])  # the client asks for base64
    assert [d.embedding for d in vectors.data] == [[1.0, 0.5, -1.0], [3.0, 0.5, -1.0]]
    assert vectors.usage.prompt_tokens == 6
    plain = net.post(daemon.url + "/v1/embeddings", json={"model": "fake-remote", "input": "ab"}, timeout=30)
    assert plain.json()["data"][0]["embedding"] == [2.0, 0.5, -1.0]
    packed = net.post(daemon.url + "/v1/embeddings", timeout=30,
                        json={"model": "fake-remote", "input": "ab", "encoding_format": "base64"})
    assert struct.unpack("<3f", base64.b64decode(packed.json()["data"][0]["embedding"])) == (2.0, 0.5, -1.0)
    for model in ("echo", "smol-remote"):
        with pytest.raises(openai.BadRequestError, match="does not serve embeddings"):
            client.embeddings.create(model=model, input="x")


def test_error_after_streaming_began_is_one_error_event_then_done(daemon, fake: FakeUpstream) -> None:
    fake.configure(chat="drop_mid")
    body = {"model": "fake-remote", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with net.stream("POST", daemon.url + "/v1/chat/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        events = sse_events(reply)
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "half "
    error = chunks[-1]["error"]
    assert "mid-answer" in error["message"] and error["type"] == "server_error"


def test_upstream_error_answer_is_502_with_its_message(client: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.configure(chat="error", error_status=500, error_message="upstream exploded")
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="fake-remote", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 502 and "upstream exploded" in caught.value.message


def test_full_queue_is_503_with_retry_after(client: openai.OpenAI, daemon, fake: FakeUpstream) -> None:
    fake.configure(words=40, delay_s=0.05)
    messages = [{"role": "user", "content": "x"}]
    workers = [threading.Thread(target=client.chat.completions.create, kwargs={"model": "fake-remote", "messages": messages})
               for _ in range(2)]
    for worker in workers:
        worker.start()
        time.sleep(0.3)  # in order: the first runs (max_concurrency 1), the second waits
    queue = net.get(daemon.url + "/api/status/fake-remote", timeout=5).json()["queue"]
    assert (queue["running"], queue["length"]) == (1, 1), queue
    reply = net.post(daemon.url + "/v1/chat/completions", json={"model": "fake-remote", "messages": messages}, timeout=10)
    assert reply.status_code == 503 and reply.headers["retry-after"]
    assert reply.json()["error"]["code"] == "queue_full"
    for worker in workers:
        worker.join(30)
    assert fake.records()["max_in_flight"] == 1


# ---- sampling and disconnects, seen from the upstream -----------------------------------------


def test_sampling_fields_reach_the_upstream(client: openai.OpenAI, fake: FakeUpstream) -> None:
    before = len(fake.records()["chat_requests"])
    client.chat.completions.create(
        model="fake-remote", messages=[{"role": "user", "content": "x"}],
        temperature=0.2, top_p=0.8, seed=11, max_completion_tokens=9, stop=["STOP"],
    )
    client.chat.completions.create(model="fake-remote", messages=[{"role": "user", "content": "x"}], max_tokens=4, stop="END")
    first, second = [r["body"] for r in fake.records()["chat_requests"][before:]]
    assert first["model"] == "fake-upstream-model"
    assert {k: first[k] for k in ("temperature", "top_p", "seed", "max_tokens", "stop")} == {
        "temperature": 0.2, "top_p": 0.8, "seed": 11, "max_tokens": 9, "stop": ["STOP"]}
    assert (second["max_tokens"], second["stop"]) == (4, ["END"])


def test_streamed_answers_reuse_one_upstream_connection(daemon, fake: FakeUpstream) -> None:
    """Ten answers one after another travel over one kept-alive connection to the upstream
    (against a TLS upstream, a new connection each time would cost a handshake per request)."""
    before = len(fake.records()["chat_requests"])
    body = {"model": "fake-remote", "messages": [{"role": "user", "content": "x"}], "stream": True}
    for _ in range(10):
        with net.stream("POST", daemon.url + "/v1/chat/completions", json=body, timeout=30) as reply:
            assert reply.status_code == 200
            reply.read()
    ports = {r["peer_port"] for r in fake.records()["chat_requests"][before:]}
    assert len(ports) == 1, f"{len(ports)} upstream connections for 10 requests"


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_reaches_the_upstream(daemon, fake: FakeUpstream, stream: bool) -> None:
    fake.configure(words=300, delay_s=0.02)
    before = len(fake.records()["disconnects"])
    body = {"model": "fake-remote", "messages": [{"role": "user", "content": "x"}], "stream": stream}
    if stream:
        with net.stream("POST", daemon.url + "/v1/chat/completions", json=body, timeout=30) as reply:
            for _ in zip(range(3), reply.iter_lines()):
                pass
    else:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
            net.post(daemon.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
    deadline = time.monotonic() + 5
    while len(fake.records()["disconnects"]) == before:
        assert time.monotonic() < deadline, "the upstream kept generating for a client that had left"
        time.sleep(0.05)
    assert fake.records()["disconnects"][-1]["chunks_sent"] < 250


# ---- the real upstream through the daemon -------------------------------------------------------


@pytest.mark.slow
def test_real_upstream_through_the_daemon(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    answer = client.chat.completions.create(model="smol-remote", messages=messages, max_tokens=5, temperature=0)
    assert answer.choices[0].message.content.strip()
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 5 and answer.usage.prompt_tokens > 5

    chunks = list(client.chat.completions.create(
        model="smol-remote", messages=messages, max_tokens=5, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert chunks[-1].usage.completion_tokens == 5
