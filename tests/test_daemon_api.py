"""The daemon end to end: real `axm1-llm serve`, real emulator runners behind real run scripts,
real tokenizer servers, real HTTP clients (httpx and the official `ollama` package)."""
from __future__ import annotations

import json
import threading

import ollama
import pytest

from ax_emulator.scripted import reply_text
from tokenizer_service.prompt_escape import escape_prompt_line
from harness import net
from harness.daemon import running_daemon
from harness.models import scripted_model

WORDS = 8


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("daemon-api")
    entries = [
        scripted_model(root, "echo", reply_words=WORDS, fields={"aliases": ["echo-alias"], "npu_memory_mb": "600"}),
        scripted_model(root, "thinker", reply_words=WORDS, think=True),
        # A plain B runner (no reset command) whose script hard-codes its tokenizer port.
        scripted_model(root, "plain-b", dialect="b", reply_words=WORDS, port_from_dollar1=False),
    ]
    with running_daemon(root, entries) as d:
        yield d


def test_generate_not_streaming_is_exactly_the_models_text(daemon):
    with daemon.client() as http:
        reply = http.post("/api/generate", json={"model": "echo", "prompt": "marker-17 hello", "stream": False})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["response"] == reply_text("marker-17 hello", WORDS, think=False)
    assert body["done"] is True and body["done_reason"] == "stop"
    assert body["eval_count"] > 0 and body["prompt_eval_count"] > 0
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(body[key], int) and body[key] >= 0
    assert body["total_duration"] > body["eval_duration"]


def test_body_is_json_whatever_its_content_type(daemon):
    """`curl -d` sends a form content type; Ollama reads the body as JSON anyway."""
    with daemon.client() as http:
        reply = http.post(
            "/api/generate",
            content=json.dumps({"model": "echo", "prompt": "curl-style", "stream": False}),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
    assert reply.status_code == 200, reply.text
    assert reply.json()["response"] == reply_text("curl-style", WORDS, think=False)


def test_generate_streams_ndjson_ending_with_done(daemon):
    with daemon.client() as http, http.stream(
        "POST", "/api/generate", json={"model": "echo", "prompt": "stream-marker"}
    ) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("application/x-ndjson")
        objects = [json.loads(line) for line in reply.iter_lines() if line]
    assert all(o["done"] is False for o in objects[:-1]) and objects[-1]["done"] is True
    assert len(objects) > 2, "the answer must arrive in several chunks"
    text = "".join(o["response"] for o in objects)
    assert text == reply_text("stream-marker", WORDS, think=False)
    assert "\x1b" not in text and "hit eos" not in text and "prompt >>" not in text


def test_prompt_newlines_travel_as_one_escaped_line(daemon):
    """The runner reads one line per turn: the daemon escapes the newlines (our tokenizer server
    restores them before templating — see the tokenizer tests), so the prompt stays ONE turn."""
    prompt = "line one\nline two\\n not a newline"
    with daemon.client() as http:
        body = http.post("/api/generate", json={"model": "echo", "prompt": prompt, "stream": False}).json()
    # The scripted runner echoes the line it read: exactly one line, the escaped prompt.
    assert body["response"] == reply_text(escape_prompt_line(prompt), WORDS, think=False)


def test_thinking_is_split_into_its_own_field(daemon):
    with daemon.client() as http:
        body = http.post("/api/chat", json={
            "model": "thinker", "messages": [{"role": "user", "content": "think-marker"}], "stream": False,
        }).json()
        hidden = http.post("/api/chat", json={
            "model": "thinker", "messages": [{"role": "user", "content": "think-marker"}], "stream": False,
            "think": False,
        }).json()
    full = reply_text("think-marker", WORDS, think=True)
    thinking, answer = full.split("</think>")
    assert body["message"]["content"] == answer.strip()
    assert body["message"]["thinking"].strip() == thinking.replace("<think>", "").strip()
    assert hidden["message"]["content"] == answer.strip()
    assert "thinking" not in hidden["message"]


def test_chat_continues_the_conversation_the_runner_holds(daemon):
    with daemon.client() as http:
        first = http.post("/api/chat", json={
            "model": "echo", "messages": [{"role": "user", "content": "turn-one"}], "stream": False,
        }).json()
        resets_before = [t for t in http.get("/api/status/echo").json()["history"] if t["to"] == "resetting"]
        second = http.post("/api/chat", json={
            "model": "echo", "stream": False, "messages": [
                {"role": "user", "content": "turn-one"},
                {"role": "assistant", "content": first["message"]["content"]},
                {"role": "user", "content": "turn-two"},
            ],
        }).json()
        resets_after = [t for t in http.get("/api/status/echo").json()["history"] if t["to"] == "resetting"]
    assert second["message"]["content"] == reply_text("turn-two", WORDS, think=False)
    assert len(resets_after) == len(resets_before), "a continued chat must not reset the context"


def test_independent_requests_get_a_fresh_context(daemon):
    with daemon.client() as http:
        http.post("/api/generate", json={"model": "echo", "prompt": "one", "stream": False})
        before = http.get("/api/status/echo").json()["history"]
        http.post("/api/generate", json={"model": "echo", "prompt": "two", "stream": False})
        after = http.get("/api/status/echo").json()["history"]
    new = [t for t in after if t not in before]
    assert any(t["to"] == "resetting" for t in new), new


def test_plain_b_runner_restarts_for_a_fresh_context(daemon):
    """A runner without `reset` (and a script with a hard-coded port) still answers each
    request in a fresh context — at the cost of a restart."""
    with daemon.client() as http:
        a = http.post("/api/generate", json={"model": "plain-b", "prompt": "pb-one", "stream": False}).json()
        b = http.post("/api/generate", json={"model": "plain-b", "prompt": "pb-two", "stream": False}).json()
        status = http.get("/api/status/plain-b").json()
    assert a["response"] == reply_text("pb-one", WORDS, think=False)
    assert b["response"] == reply_text("pb-two", WORDS, think=False)
    assert status["supports_reset"] is False
    assert any("fresh context needs a restart" in t["reason"] for t in status["history"])


def test_twenty_concurrent_clients_each_get_their_own_answer(daemon):
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        with net.client(base_url=daemon.url, timeout=120) as http:
            body = http.post("/api/generate", json={"model": "echo", "prompt": f"client-{i}-marker", "stream": False}).json()
            results[i] = body.get("response", body.get("error"))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == 20
    for i, text in results.items():
        assert text == reply_text(f"client-{i}-marker", WORDS, think=False)


def test_errors_have_ollama_shape_and_status(daemon):
    with daemon.client() as http:
        missing = http.post("/api/generate", json={"model": "nope", "prompt": "x"})
        assert missing.status_code == 404 and missing.json() == {"error": 'model "nope" not found'}
        invalid = http.post("/api/generate", content=b"{not json")
        assert invalid.status_code == 400 and "error" in invalid.json()
        no_model = http.post("/api/chat", json={"messages": []})
        assert no_model.status_code == 400 and "model" in no_model.json()["error"]
        raw = http.post("/api/generate", json={"model": "echo", "prompt": "x", "raw": True, "system": "s"})
        assert raw.status_code == 400
        too_long = http.post("/api/generate", json={"model": "echo", "prompt": "x" * 200_001})
        assert too_long.status_code == 400 and "max_prompt_chars" in too_long.json()["error"]
        too_big = http.post("/api/generate", json={"model": "echo", "prompt": "x" * 9_000_000})
        assert too_big.status_code == 413 and "error" in too_big.json()
        bad_option = http.post("/api/generate", json={"model": "echo", "prompt": "x", "options": {"temperature": "hot"}})
        assert bad_option.status_code == 400


def test_alias_and_latest_tag_resolve(daemon):
    with daemon.client() as http:
        for name in ("echo-alias", "echo:latest"):
            body = http.post("/api/generate", json={"model": name, "prompt": "alias-x", "stream": False}).json()
            assert body["response"] == reply_text("alias-x", WORDS, think=False)


def test_load_and_unload_with_empty_prompt(daemon):
    with daemon.client() as http:
        loaded = http.post("/api/generate", json={"model": "thinker"}).json()
        assert loaded["done_reason"] == "load"
        assert any(m["name"] == "thinker:latest" for m in http.get("/api/ps").json()["models"])
        unloaded = http.post("/api/generate", json={"model": "thinker", "keep_alive": 0}).json()
        assert unloaded["done_reason"] == "unload"
        assert not any(m["name"] == "thinker:latest" for m in http.get("/api/ps").json()["models"])
        assert http.get("/api/status/thinker").json()["state"] == "stopped"


def test_status_shows_states_history_queue_and_context(daemon):
    with daemon.client() as http:
        http.post("/api/generate", json={"model": "echo", "prompt": "status-x", "stream": False})
        status = daemon.wait_state("echo", "ready")  # the runner resets ahead of the next request
        everything = http.get("/api/status").json()
        history = http.get("/api/status_history/echo").json()
    assert {"queue", "context", "restarts", "last_error", "pid", "history", "since"} <= set(status)
    assert status["context"]["used"] > 0 and status["context"]["remaining"] < 2048
    names = [t["to"] for t in history["history"]]
    for state in ("waiting_for_tokenizer", "starting", "initializing", "ready", "processing", "outputting"):
        assert state in names
    assert {m["name"] for m in everything["models"]} >= {"echo", "thinker", "plain-b"}
    assert status["history"] == history["history"][-len(status["history"]):]


def test_liveness_and_readiness(daemon):
    with daemon.client() as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/").text == "Ollama is running"
        assert http.get("/ready").status_code == 200  # no run_on_startup model here


def test_official_ollama_client(daemon):
    client = ollama.Client(host=daemon.url)
    generated = client.generate(model="echo", prompt="ollama-gen")
    assert generated.response == reply_text("ollama-gen", WORDS, think=False)
    assert generated.done and generated.eval_count > 0
    streamed = "".join(part.response for part in client.generate(model="echo", prompt="ollama-stream", stream=True))
    assert streamed == reply_text("ollama-stream", WORDS, think=False)
    chat = client.chat(model="echo", messages=[{"role": "user", "content": "ollama-chat"}])
    assert chat.message.content == reply_text("ollama-chat", WORDS, think=False)
    parts = list(client.chat(model="echo", messages=[{"role": "user", "content": "ollama-chat-s"}], stream=True))
    assert "".join(p.message.content for p in parts) == reply_text("ollama-chat-s", WORDS, think=False)
    assert parts[-1].done and parts[-1].done_reason == "stop"
    listed = {m.model for m in client.list().models}
    assert {"echo:latest", "thinker:latest", "plain-b:latest"} <= listed
    assert "echo:latest" in {m.model for m in client.ps().models}
    shown = client.show("thinker")
    assert "thinking" in shown.capabilities and "completion" in shown.capabilities
    with pytest.raises(ollama.ResponseError) as missing:
        client.generate(model="absent", prompt="x")
    assert missing.value.status_code == 404


def test_a_stock_tokenizer_script_is_served_with_what_it_can_do(tmp_path):
    """With a tokenizer script that has none of our extensions, newlines cannot be restored and a
    history cannot be injected: the daemon replaces and flattens, and says so."""
    entry = scripted_model(tmp_path, "stock", reply_words=WORDS, stock_tokenizer=True)
    with running_daemon(tmp_path, [entry]) as daemon, daemon.client() as http:
        body = http.post("/api/generate", json={"model": "stock", "prompt": "two\nlines", "stream": False}).json()
        assert body["response"] == reply_text("two lines", WORDS, think=False)
        assert any("newlines replaced" in w for w in body["warnings"])
        status = http.get("/api/status/stock").json()
        assert status["newlines"].startswith("replaced with spaces")
        chat = http.post("/api/chat", json={"model": "stock", "stream": False, "messages": [
            {"role": "user", "content": "earlier"},
            {"role": "assistant", "content": "an answer the runner never saw"},
            {"role": "user", "content": "now"},
        ]}).json()
        assert any("history flattened" in w for w in chat["warnings"])
        assert "now" in chat["message"]["content"] and "earlier" in chat["message"]["content"]
