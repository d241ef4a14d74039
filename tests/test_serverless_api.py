"""The serverless shape (issue 15): /run, /runsync, /status/{id}, /cancel/{id} on the job store
and runner of the Batch API, against the real daemon on scripted card models whose answers are
known exactly."""
from __future__ import annotations

import time
from typing import Any

import pytest

from ax_emulator.scripted import reply_text
from harness.daemon import running_daemon
from harness.models import scripted_model

WORDS = 4


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("serverless")
    entries = [scripted_model(root, "echo", reply_words=WORDS),
               scripted_model(root, "slow", reply_words=40, tokens_per_second=40)]
    with running_daemon(root, entries) as d:
        yield d


@pytest.fixture(scope="module")
def http(daemon):
    with daemon.client(timeout=120) as client:
        yield client


def poll(http, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (body := http.get(f"/status/{job_id}").json())["status"] in ("IN_QUEUE", "IN_PROGRESS"):
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    return body


def test_runsync_answers_one_prompt(http):
    answer = http.post("/runsync", json={"input": {"prompt": "serverless hello"}})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "COMPLETED"
    output = body["output"]
    assert output["text"] == reply_text("serverless hello", WORDS, think=False)  # the first model: echo
    assert output["model_version"] == "echo"
    assert output["token_count"]["prompt"] > 0 and output["token_count"]["completion"] > 0
    assert output["processing_time"] > 0
    assert set(output) == {"text", "processing_time", "model_version", "token_count"}
    assert http.get(f"/status/{body['id']}").json() == body


def test_run_a_batch_then_poll_its_status(http):
    prompts = {"a": "first of three", "b": "second of three", "7": "third of three"}
    started = http.post("/run", json={"input": {"model": "echo", "batch": [
        {"prompt": text, "id": int(key) if key.isdigit() else key} for key, text in prompts.items()]}})
    assert started.status_code == 200, started.text
    assert started.json()["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    body = poll(http, started.json()["id"])
    assert body["status"] == "COMPLETED"
    output = body["output"]
    assert output["batch_size"] == 3
    assert [r["id"] for r in output["results"]] == ["a", "b", "7"]
    for result in output["results"]:
        assert result["text"] == reply_text(prompts[result["id"]], WORDS, think=False)
    total = output["total_token_count"]
    assert total["completion"] == sum(r["token_count"]["completion"] for r in output["results"]) > 0
    assert total["prompt"] == sum(r["token_count"]["prompt"] for r in output["results"]) > 0


def test_cancel_a_running_serverless_batch(http):
    started = http.post("/run", json={"input": {"model": "slow", "batch": [
        {"prompt": f"cancel me {i}", "id": f"c{i}"} for i in range(10)]}}).json()
    deadline = time.monotonic() + 30
    while http.get(f"/status/{started['id']}").json()["status"] == "IN_QUEUE":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cancelled = http.post(f"/cancel/{started['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] in ("IN_PROGRESS", "CANCELLED")
    body = poll(http, started["id"], timeout=30)
    assert body["status"] == "CANCELLED"
    results = body["output"]["results"]
    assert [r["id"] for r in results] == [f"c{i}" for i in range(10)]
    assert any("error" in r for r in results)
    for result in results:
        if "error" not in result:
            assert result["text"] == reply_text(f"cancel me {result['id'][1:]}", 40, think=False)


@pytest.mark.parametrize(("body", "message"), [
    ({"prompt": "no input"}, "input"),
    ({"input": {"prompt": ""}}, "input.prompt"),
    ({"input": {"batch": []}}, "input.batch"),
    ({"input": {"batch": [{"prompt": "x", "id": "1"}, {"prompt": "y", "id": 1}]}}, "used twice"),
    ({"input": {"prompt": "x", "batch": [{"prompt": "y"}]}}, "not both"),
])
def test_bad_requests_are_400s_naming_the_field(http, body, message):
    answer = http.post("/run", json=body)
    assert answer.status_code == 400 and message in answer.json()["error"]


def test_unknown_model_and_job_are_404s(http):
    answer = http.post("/runsync", json={"input": {"model": "nobody", "prompt": "x"}})
    assert answer.status_code == 404 and "nobody" in answer.json()["error"]
    assert http.get("/status/batch_nothere").status_code == 404
    assert http.post("/cancel/batch_nothere").status_code == 404


def test_serverless_jobs_and_openai_batches_keep_apart(daemon, http):
    import openai

    oai = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    job = http.post("/runsync", json={"input": {"prompt": "kept apart"}}).json()
    assert job["status"] == "COMPLETED"
    with pytest.raises(openai.NotFoundError):
        oai.batches.retrieve(job["id"])
    assert job["id"] not in [b.id for b in oai.batches.list()]
    import io
    import json as json_module

    line = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "echo", "messages": [{"role": "user", "content": "a batch"}]}}
    upload = oai.files.create(file=("x.jsonl", io.BytesIO(json_module.dumps(line).encode())), purpose="batch")
    batch = oai.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert http.get(f"/status/{batch.id}").status_code == 404
    assert http.post(f"/cancel/{batch.id}").status_code == 404
