"""Async single requests (issue 15, seed 002's /agenerate): an /api/generate, /api/chat or /v1
body as a job, its id at once, its answer later — the very answer the route gives with stream
false — polled or waited for; bad bodies refused at once."""
from __future__ import annotations

import pytest

from ax_emulator.scripted import reply_text
from harness.daemon import running_daemon
from harness.models import scripted_model

MODEL = "async-model"
WORDS = 5


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("async")
    entry = scripted_model(root, MODEL, reply_words=WORDS, tokens_per_second=200, fields={"run_on_startup": "true"})
    with running_daemon(root, [entry]) as d:
        d.wait_state(MODEL, "ready")
        yield d


def test_agenerate_answers_as_generate(daemon) -> None:
    with daemon.client() as client:
        submitted = client.post("/agenerate", json={"model": MODEL, "prompt": "later please"})
        assert submitted.status_code == 202, submitted.text
        job = submitted.json()
        assert job["endpoint"] == "/api/generate" and job["model"] == MODEL
        done = client.get(f"/api/jobs/{job['id']}", params={"wait": 30}).json()
        assert done["status"] == "completed" and done["status_code"] == 200
        assert done["result"]["response"] == reply_text("later please", WORDS, False)
        direct = client.post("/api/generate", json={"model": MODEL, "prompt": "later please", "stream": False}).json()
        assert set(done["result"]) == set(direct) and done["result"]["done"] is True


@pytest.mark.parametrize("endpoint, body, text", [
    ("/api/chat", {"messages": [{"role": "user", "content": "chat later"}]},
     lambda r: r["message"]["content"]),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "openai later"}]},
     lambda r: r["choices"][0]["message"]["content"]),
    ("/v1/completions", {"prompt": "completion later"}, lambda r: r["choices"][0]["text"]),
])
def test_any_route_as_a_job(daemon, endpoint, body, text) -> None:
    with daemon.client() as client:
        job = client.post("/api/jobs", json={"endpoint": endpoint, "body": {"model": MODEL, **body}}).json()
        done = client.get(f"/api/jobs/{job['id']}", params={"wait": 30}).json()
        assert done["status"] == "completed", done
        said = body.get("prompt") or body["messages"][0]["content"]
        assert text(done["result"]) == reply_text(said, WORDS, False)


def test_bad_async_requests(daemon) -> None:
    with daemon.client() as client:
        assert client.post("/agenerate", json={"model": "nope", "prompt": "x"}).status_code == 404
        assert client.post("/agenerate", json={"prompt": "x"}).status_code == 400
        assert client.post("/agenerate", json={"model": MODEL, "prompt": "x", "stream": True}).status_code == 400
        assert client.post("/api/jobs", json={"endpoint": "/api/pull", "body": {"model": MODEL}}).status_code == 400
        # A body the route would refuse: the job fails with the route's own error.
        job = client.post("/agenerate", json={"model": MODEL, "prompt": ""}).json()
        failed = client.get(f"/api/jobs/{job['id']}", params={"wait": 30}).json()
        assert failed["status"] == "failed" and failed["status_code"] == 400 and "prompt" in failed["error"]["error"]
        # Not a batch, and a batch id is not an async job.
        assert client.get(f"/v1/batches/{job['id']}").status_code == 404
        assert client.get("/api/jobs/batch_nope").status_code == 404
