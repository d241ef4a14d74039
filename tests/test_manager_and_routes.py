"""The model manager and the routes with in-process engines: admission, deadlines, keep_alive,
card memory, thinking, embeddings, and an engine's own bug, each in milliseconds. The same
behaviours run end to end against real runners in test_daemon_*.py."""
from __future__ import annotations

import time

import anyio
import pytest

from inprocess_support import inprocess_model, running_app

pytestmark = pytest.mark.anyio


def echo(prompt: str, words: int = 4) -> str:
    return f"You said: {prompt}." + "".join(f" w{i + 1}" for i in range(words))


async def generate(app, model: str, prompt: str, **extra):
    return await app.http.post("/api/generate", json={"model": model, "prompt": prompt, "stream": False, **extra})


async def test_answers_and_model_listings(tmp_path):
    entries = [inprocess_model("m", run_on_startup="true", npu_memory_mb=100, aliases=["mm"])]
    async with running_app(tmp_path, entries) as app:
        reply = await generate(app, "m", "hello")
        assert reply.status_code == 200 and reply.json()["response"] == echo("hello")
        assert reply.json()["eval_count"] == 5 and reply.headers["x-request-id"]
        assert (await generate(app, "mm", "alias")).json()["response"] == echo("alias")
        assert (await generate(app, "m:latest", "tag")).json()["response"] == echo("tag")
        tags = (await app.http.get("/api/tags")).json()["models"]
        # No folder on disk, no runner claiming card memory: both sizes are 0, not the descriptor's budget.
        assert [(t["name"], t["size"]) for t in tags] == [("m:latest", 0)]
        ps = (await app.http.get("/api/ps")).json()["models"]
        assert ps[0]["name"] == "m:latest" and ps[0]["size_vram"] == 0
        assert (await app.http.get("/v1/models")).json()["data"][0]["id"] == "m"
        show = (await app.http.post("/api/show", json={"model": "m"})).json()
        assert show["model_info"]["llm.context_length"] == 2048
        missing = await generate(app, "nope", "x")
        assert missing.status_code == 404 and missing.json() == {"error": 'model "nope" not found'}
        missing = await app.http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


async def test_requests_are_served_one_at_a_time_in_arrival_order(tmp_path):
    entries = [inprocess_model("m", chunk_delay_s=0.01)]
    async with running_app(tmp_path, entries) as app:
        finished: list[int] = []

        async def ask(i: int) -> None:
            await anyio.sleep(i * 0.005)  # arrival order
            reply = await generate(app, "m", f"client {i}")
            assert reply.json()["response"] == echo(f"client {i}")
            finished.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(ask, i)
        assert finished == list(range(6))


async def test_a_full_queue_is_503_with_retry_after(tmp_path):
    entries = [inprocess_model("m", chunk_delay_s=0.05, run_on_startup="true")]
    async with running_app(tmp_path, entries, queue_size=1) as app:
        replies = []

        async def ask() -> None:
            replies.append(await generate(app, "m", "x"))

        async with anyio.create_task_group() as tg:
            for _ in range(3):  # one runs, one waits, one is refused
                tg.start_soon(ask)
                await anyio.sleep(0.01)
        codes = sorted(r.status_code for r in replies)
        assert codes == [200, 200, 503]
        refused = next(r for r in replies if r.status_code == 503)
        assert refused.headers["retry-after"] == "1" and "maximum pending requests" in refused.json()["error"]


async def test_the_deadline_ends_a_stream_with_an_error_line_and_a_whole_answer_with_504(tmp_path):
    entries = [inprocess_model("m", chunk_delay_s=0.2, reply_words=50, run_on_startup="true")]
    async with running_app(tmp_path, entries, request_deadline_s=0.5) as app:
        started = time.monotonic()
        lines = await app.ndjson("/api/generate", {"model": "m", "prompt": "slow"})
        assert "deadline" in lines[-1]["error"] and time.monotonic() - started < 3
        assert lines[0]["response"].startswith("You said")
        reply = await generate(app, "m", "slow")
        assert reply.status_code == 504 and "deadline" in reply.json()["error"]
        sse = await app.http.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True})
        events = [line for line in sse.text.splitlines() if line.startswith("data:")]
        assert "deadline" in events[-2] and events[-1] == "data: [DONE]"


async def test_an_engine_bug_fails_its_request_restarts_that_model_and_no_other(tmp_path):
    entries = [inprocess_model("m", chunk_delay_s=0.05, run_on_startup="true"), inprocess_model("other")]
    async with running_app(tmp_path, entries) as app:
        assert (await generate(app, "m", "before")).status_code == 200

        async def ask_then_break() -> None:
            await anyio.sleep(0.08)
            app.engine("m").faults.bug_in_loop = True
            await app.engine("m").start()  # any message reaches the owner loop

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask_then_break)
            reply = await generate(app, "m", "during")
        assert reply.status_code == 500 and "internal error in the engine" in reply.json()["error"]
        assert app.engine("m").state in ("failed", "starting", "initializing", "ready")
        assert (await generate(app, "other", "unaffected")).json()["response"] == echo("unaffected")
        assert (await generate(app, "m", "after")).json()["response"] == echo("after")  # restarted by itself
        history = [t["to"] for t in (await app.http.get("/api/status_history/m")).json()["history"]]
        assert history[-3:] == ["starting", "initializing", "ready"] and "failed" in history


async def test_a_failed_load_is_503_naming_the_reason_and_ready_says_so(tmp_path):
    entries = [inprocess_model("m", run_on_startup="true")]
    async with running_app(tmp_path, entries) as app:
        await generate(app, "m", "warm")
        app.engine("m").faults.fail_load = "weights missing"
        await app.http.post("/api/generate", json={"model": "m", "keep_alive": 0})  # unload
        reply = await generate(app, "m", "x")
        assert reply.status_code == 503 and "weights missing" in reply.json()["error"]
        assert (await app.http.get("/ready")).status_code == 503
        app.engine("m").faults.fail_load = None
        with anyio.fail_after(5):
            while (await generate(app, "m", "back")).status_code != 200:
                await anyio.sleep(0.05)
        assert (await app.http.get("/ready")).status_code == 200


async def test_a_crash_mid_answer_ends_the_stream_with_an_error_after_the_partial_text(tmp_path):
    async with running_app(tmp_path, [inprocess_model("m", reply_words=10)]) as app:
        app.engine("m").faults.crash_after_chunks = 3
        lines = await app.ndjson("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "c"}]})
        assert "crashed" in lines[-1]["error"]
        assert "".join(line["message"]["content"] for line in lines[:-1]) == "You said: c. w1 w2"


async def test_keep_alive_zero_unloads_after_the_answer_and_a_bad_one_is_400(tmp_path):
    async with running_app(tmp_path, [inprocess_model("m")]) as app:
        assert (await generate(app, "m", "x", keep_alive=0)).status_code == 200
        with anyio.fail_after(5):
            while app.engine("m").state != "stopped":
                await anyio.sleep(0.01)
        bad = await generate(app, "m", "x", keep_alive="soon")
        assert bad.status_code == 400 and "keep_alive" in bad.json()["error"]


async def test_card_memory_unloads_the_least_recently_used_idle_model(tmp_path):
    entries = [inprocess_model(name, npu_memory_mb=3000) for name in ("a", "b", "c")]
    async with running_app(tmp_path, entries, npu_memory_mb=7000) as app:
        for name in ("a", "b", "c"):
            assert (await generate(app, name, name)).status_code == 200
        states = {name: app.engine(name).state for name in ("a", "b", "c")}
        assert states == {"a": "stopped", "b": "ready", "c": "ready"}


async def test_thinking_is_split_and_dropped_on_request(tmp_path):
    entries = [inprocess_model("t", thinking="pondering", include_thinking="true")]
    async with running_app(tmp_path, entries) as app:
        body = (await generate(app, "t", "q")).json()
        assert body["thinking"] == "pondering" and body["response"] == echo("q")
        assert "thinking" not in (await generate(app, "t", "q", think=False)).json()


async def test_embeddings_are_admitted_limited_and_counted_like_generations(tmp_path):
    entries = [inprocess_model("e", embedding_dim=4), inprocess_model("plain")]
    async with running_app(tmp_path, entries, max_prompt_chars=20) as app:
        reply = await app.http.post("/v1/embeddings", json={"model": "e", "input": ["one two", "three"]})
        assert reply.status_code == 200, reply.text
        data = reply.json()
        assert [len(row["embedding"]) for row in data["data"]] == [4, 4] and data["usage"]["prompt_tokens"] == 3
        too_long = await app.http.post("/v1/embeddings", json={"model": "e", "input": "x" * 21})
        assert too_long.status_code == 400 and "max_prompt_chars" in too_long.json()["error"]["message"]
        none = await app.http.post("/v1/embeddings", json={"model": "plain", "input": "x"})
        assert none.status_code == 400 and "does not serve embeddings" in none.json()["error"]["message"]
        metrics = (await app.http.get("/metrics")).text
        assert 'axm1_llm_requests_finished_total{finished_reason="stop",model="e"} 1.0' in metrics
        assert 'axm1_llm_prompt_tokens_total{model="e"} 3.0' in metrics


async def test_ollamas_embed_routes_and_embedding_models(tmp_path):
    entries = [inprocess_model("e", embedding_dim=4, embedding_model="true", keep_alive="-1"), inprocess_model("plain")]
    async with running_app(tmp_path, entries) as app:
        both = (await app.http.post("/api/embed", json={"model": "e", "input": ["one two", "three"]})).json()
        direct = (await app.http.post("/v1/embeddings", json={"model": "e", "input": ["one two", "three"]})).json()
        assert both["embeddings"] == [row["embedding"] for row in direct["data"]] and both["model"] == "e"
        assert both["prompt_eval_count"] == 3 and both["total_duration"] > 0 and "load_duration" in both
        one = (await app.http.post("/api/embed", json={"model": "e:latest", "input": "three"})).json()
        assert one["embeddings"] == [both["embeddings"][1]]
        legacy = (await app.http.post("/api/embeddings", json={"model": "e", "prompt": "three"})).json()
        assert legacy == {"embedding": both["embeddings"][1]}
        short = (await app.http.post("/api/embed", json={"model": "e", "input": "three", "dimensions": 2})).json()
        assert short["embeddings"] == [both["embeddings"][1][:2]]
        noted = (await app.http.post("/api/embed", json={"model": "e", "input": "x", "options": {"num_ctx": 512}})).json()
        assert noted["warnings"] == ["options num_ctx: not applied to embeddings"]
        # An embedding model makes no text; a chat model makes no vectors: both clear 400s.
        chat = await app.http.post("/api/chat", json={"model": "e", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 400 and "is an embedding model" in chat.json()["error"]
        v1 = await app.http.post("/v1/chat/completions", json={"model": "e", "messages": [{"role": "user", "content": "hi"}]})
        assert v1.status_code == 400 and "is an embedding model" in v1.json()["error"]["message"]
        refused = await app.http.post("/api/embed", json={"model": "plain", "input": "x"})
        assert refused.status_code == 400 and "does not serve embeddings" in refused.json()["error"]
        show = (await app.http.post("/api/show", json={"model": "e"})).json()
        assert show["capabilities"] == ["embedding"]
        assert (await app.http.post("/api/show", json={"model": "plain"})).json()["capabilities"] == ["completion"]
