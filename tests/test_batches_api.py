"""OpenAI's Files and Batch APIs end to end (issue 15): the official `openai` client against the
real daemon on scripted card models, whose answers are known exactly (ax_emulator/scripted.py):
upload, create, poll, read the output; bad lines in the error file; cancel; list paging; an
interactive request served before the rest of a running batch."""
from __future__ import annotations

import io
import json
import threading
import time
from typing import Any

import openai
import pytest

from ax_emulator.scripted import reply_text
from harness.daemon import running_daemon
from harness.models import scripted_model
from upstream_support import FakeUpstream

WORDS = 4


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    upstream = FakeUpstream(tmp_path_factory.mktemp("batches-upstream"), embeddings=True).start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, fake):
    root = tmp_path_factory.mktemp("batches")
    entries = [
        {"model_name": "fake-remote", "engine": "openai-http", "base_url": fake.base_url + "/v1",
         "upstream_model": "fake-upstream-model", "retries": "0"},
        scripted_model(root, "echo", reply_words=WORDS),
        # Slow enough that an interactive request arrives while an item runs.
        scripted_model(root, "slow", reply_words=40, tokens_per_second=40),
    ]
    with running_daemon(root, entries) as d:
        yield d


def chat_line(custom_id: str, text: str, model: str = "echo", **extra: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": text}], **extra}}


def jsonl(lines: list[Any]) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def upload(oai: openai.OpenAI, content: bytes, name: str = "input.jsonl"):
    return oai.files.create(file=(name, io.BytesIO(content)), purpose="batch")


def wait_batch(oai: openai.OpenAI, batch_id: str, timeout: float = 120.0,
               statuses: tuple[str, ...] = ("completed", "failed", "cancelled", "expired")):
    deadline = time.monotonic() + timeout
    while True:
        batch = oai.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status}: {batch}"
        time.sleep(0.2)


def lines_of(oai: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in oai.files.content(file_id).text.splitlines()]


def test_a_chat_batch_answers_every_line_with_the_routes_answer(oai):
    texts = {f"req-{i}": f"batch line {i}" for i in range(6)}
    stored = upload(oai, jsonl([chat_line(cid, text) for cid, text in texts.items()]))
    assert stored.object == "file" and stored.purpose == "batch" and stored.bytes > 0
    assert oai.files.retrieve(stored.id).filename == "input.jsonl"
    batch = oai.batches.create(input_file_id=stored.id, endpoint="/v1/chat/completions",
                               completion_window="24h", metadata={"run": "one"})
    assert batch.object == "batch" and batch.status in ("validating", "in_progress", "finalizing", "completed")
    assert batch.metadata == {"run": "one"}
    done = wait_batch(oai, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.total == 6 and done.request_counts.completed == 6 and done.request_counts.failed == 0
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.error_file_id is None
    output = lines_of(oai, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(texts)
    for line in output:
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == "echo"
        assert body["choices"][0]["message"]["content"] == reply_text(texts[line["custom_id"]], WORDS, think=False)
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] > 0
        assert body["id"] == f"chatcmpl-{line['response']['request_id']}"
    # The same request through the route answers the same text.
    direct = oai.chat.completions.create(model="echo", messages=[{"role": "user", "content": texts["req-0"]}])
    assert direct.choices[0].message.content == reply_text(texts["req-0"], WORDS, think=False)


def test_bad_lines_go_to_the_error_file_with_their_line_numbers(oai):
    lines = [
        chat_line("good-1", "first good line"),
        b"{this is not json",
        {"method": "POST", "url": "/v1/chat/completions", "body": {"model": "echo"}},  # no custom_id
        b"",  # blank lines are no requests, but count for the numbering
        chat_line("good-1", "a duplicate custom_id"),
        {"custom_id": "wrong-url", "method": "POST", "url": "/v1/embeddings", "body": {"model": "echo"}},
        chat_line("bad-body", "no messages", messages=[]),  # valid line, but the route answers 400
        chat_line("good-2", "second good line"),
    ]
    batch = oai.batches.create(input_file_id=upload(oai, jsonl(lines)).id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    done = wait_batch(oai, batch.id)
    assert done.status == "completed"
    assert done.request_counts.total == 7 and done.request_counts.completed == 2 and done.request_counts.failed == 5
    output = {line["custom_id"]: line for line in lines_of(oai, done.output_file_id)}
    assert set(output) == {"good-1", "good-2"}
    assert output["good-1"]["response"]["body"]["choices"][0]["message"]["content"] == \
        reply_text("first good line", WORDS, think=False)
    errors = lines_of(oai, done.error_file_id)
    by_line = {line["error"]["line"]: line for line in errors if line["error"]}
    assert by_line[2]["error"]["code"] == "invalid_json_line" and by_line[2]["custom_id"] is None
    assert by_line[3]["error"]["code"] == "invalid_custom_id"
    assert by_line[5]["error"]["code"] == "duplicate_custom_id" and by_line[5]["custom_id"] == "good-1"
    assert by_line[6]["error"]["code"] == "mismatched_url" and by_line[6]["custom_id"] == "wrong-url"
    # A request the route refuses is answered in the error file with the route's own 400.
    refused = [line for line in errors if line["custom_id"] == "bad-body"]
    assert len(refused) == 1 and refused[0]["error"] is None
    assert refused[0]["response"]["status_code"] == 400
    assert refused[0]["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert "messages" in refused[0]["response"]["body"]["error"]["message"]
    assert len(errors) == 5


def test_a_batch_whose_file_holds_no_request_fails_with_its_reason(oai):
    batch = oai.batches.create(input_file_id=upload(oai, b"\n\n").id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    assert batch.status == "failed"
    assert batch.errors.data[0].code == "empty_file"
    assert batch.failed_at and batch.output_file_id is None


def test_a_batch_for_an_unknown_model_fails_naming_it(oai):
    batch = oai.batches.create(input_file_id=upload(oai, jsonl([chat_line("x", "hi", model="nobody")])).id,
                               endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "failed"
    assert batch.errors.data[0].code == "model_not_found" and "nobody" in batch.errors.data[0].message
    assert batch.errors.data[0].line == 1


def test_openai_errors_for_missing_objects_and_bad_requests(oai):
    with pytest.raises(openai.NotFoundError) as missing:
        oai.batches.retrieve("batch_doesnotexist")
    assert missing.value.code == "not_found" and missing.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve("file-doesnotexist")
    with pytest.raises(openai.NotFoundError):
        oai.batches.create(input_file_id="file-doesnotexist", endpoint="/v1/chat/completions", completion_window="24h")
    stored = upload(oai, jsonl([chat_line("a", "b")]))
    with pytest.raises(openai.BadRequestError) as bad:
        oai.batches.create(input_file_id=stored.id, endpoint="/v1/responses", completion_window="24h")
    assert "endpoint" in str(bad.value)
    with pytest.raises(openai.BadRequestError):
        oai.batches.create(input_file_id=stored.id, endpoint="/v1/chat/completions", completion_window="tomorrow")
    assert oai.files.delete(stored.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        oai.files.content(stored.id)


def test_list_paging_newest_first(oai):
    stored = upload(oai, jsonl([chat_line("p", "paging")]))
    made = [oai.batches.create(input_file_id=stored.id, endpoint="/v1/chat/completions",
                               completion_window="24h").id for _ in range(5)]
    first = oai.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2]
    assert first.has_more is True
    raw = oai.batches.with_raw_response.list(limit=2).parse()
    assert raw.data[0].id == made[-1]
    second = oai.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in second.data] == made[::-1][2:4]
    # The client's auto-paging walks every batch once, newest first.
    every = [b.id for b in oai.batches.list(limit=3)]
    assert every[:5] == made[::-1] and len(every) == len(set(every))
    body = oai.get("/batches", cast_to=object, options={"params": {"limit": 2}})
    assert body["object"] == "list" and body["first_id"] == made[-1] and body["last_id"] == made[-2]
    for batch_id in made:
        wait_batch(oai, batch_id)


def slow_batch(oai, n: int, prefix: str):
    texts = {f"{prefix}-{i}": f"{prefix} slow line {i}" for i in range(n)}
    batch = oai.batches.create(input_file_id=upload(oai, jsonl([chat_line(c, t, model="slow") for c, t in texts.items()])).id,
                               endpoint="/v1/chat/completions", completion_window="24h")
    return batch, texts


def wait_completed(oai, batch_id: str, at_least: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while (count := oai.batches.retrieve(batch_id).request_counts.completed) < at_least:
        assert time.monotonic() < deadline, f"batch {batch_id}: {count} completed, waited for {at_least}"
        time.sleep(0.05)
    return count


def test_cancel_stops_pending_items_and_the_running_one(oai, daemon):
    batch, texts = slow_batch(oai, 12, "cancel")
    wait_completed(oai, batch.id, 1)
    cancelling = oai.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    assert cancelling.cancelling_at is not None
    done = wait_batch(oai, batch.id, timeout=30)
    assert done.status == "cancelled" and done.cancelled_at is not None
    counts = done.request_counts
    assert counts.total == 12 and 1 <= counts.completed < 12 and counts.completed + counts.failed == 12
    output = lines_of(oai, done.output_file_id)
    errors = lines_of(oai, done.error_file_id)
    seen = [line["custom_id"] for line in output + errors]
    assert sorted(seen) == sorted(texts)  # every custom_id exactly once
    for line in output:
        assert line["response"]["body"]["choices"][0]["message"]["content"] == \
            reply_text(texts[line["custom_id"]], 40, think=False)
    codes = {line["error"]["code"] for line in errors}
    assert codes <= {"batch_cancelled"} and "batch_cancelled" in codes
    # The model is free at once: the card is not still writing the cancelled item's answer.
    status = daemon.get("/api/status/slow")
    assert status["jobs"]["queued"] == 0 and status["jobs"]["running"] == 0
    started = time.monotonic()
    answer = oai.chat.completions.create(model="slow", messages=[{"role": "user", "content": "after cancel"}])
    assert answer.choices[0].message.content == reply_text("after cancel", 40, think=False)
    # A cancelled batch is cancelled once: cancelling it again changes nothing.
    assert oai.batches.cancel(batch.id).status == "cancelled"
    assert time.monotonic() - started < 30


def test_interactive_requests_go_before_the_batch_items_waiting(oai, daemon):
    batch, texts = slow_batch(oai, 10, "prio")
    wait_completed(oai, batch.id, 1)
    sent_at_count = oai.batches.retrieve(batch.id).request_counts.completed
    b_done: dict[str, Any] = {}

    def second_request() -> None:
        answer = oai.chat.completions.create(model="slow", messages=[{"role": "user", "content": "second interactive"}])
        b_done["content"] = answer.choices[0].message.content
        b_done["count"] = oai.batches.retrieve(batch.id).request_counts.completed

    stream = oai.chat.completions.create(model="slow", messages=[{"role": "user", "content": "first interactive"}],
                                         stream=True)
    pieces, b_thread = [], None
    first_token_count = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first_token_count is None:
                # The first request waited for the item that was running, not for the batch.
                first_token_count = oai.batches.retrieve(batch.id).request_counts.completed
                # While it runs, the runner's next item waits for the slot; a second interactive
                # request, sent now, must still go before it.
                b_thread = threading.Thread(target=second_request)
                b_thread.start()
                time.sleep(0.3)
                status = daemon.get("/api/status/slow")
                assert status["queue"]["jobs_waiting"] == 1 and status["queue"]["length"] == 1, status["queue"]
            pieces.append(chunk.choices[0].delta.content)
    a_done_count = oai.batches.retrieve(batch.id).request_counts.completed
    b_thread.join(60)
    assert "".join(pieces) == reply_text("first interactive", 40, think=False)
    assert b_done["content"] == reply_text("second interactive", 40, think=False)
    assert first_token_count <= sent_at_count + 2  # at most the item running when it was sent
    assert b_done["count"] == a_done_count, "a batch item ran between the two interactive requests"
    done = wait_batch(oai, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 10
    assert sorted(line["custom_id"] for line in lines_of(oai, done.output_file_id)) == sorted(texts)


def test_status_and_metrics_show_the_batch_progress(oai, daemon):
    batch, _ = slow_batch(oai, 4, "progress")
    wait_completed(oai, batch.id, 1)
    status = daemon.get("/api/status")
    slow = next(m for m in status["models"] if m["name"] == "slow")
    assert slow["jobs"]["queued"] + slow["jobs"]["running"] >= 1 and slow["jobs"]["done"] >= 1
    assert status["jobs"]["store_open"] is True
    metrics = daemon.client().get("/metrics").text
    assert 'axm1_llm_job_items_total{model="slow",state="completed"}' in metrics
    assert 'axm1_llm_job_items_pending{model="slow"}' in metrics
    assert 'axm1_llm_job_oldest_pending_age_seconds{model="slow"}' in metrics
    wait_batch(oai, batch.id)
    after = daemon.get("/api/status/slow")["jobs"]
    assert after["queued"] == 0 and after["running"] == 0 and after["done"] >= 4


def test_a_batch_past_its_completion_window_expires_keeping_what_ran(oai):
    texts = {f"exp-{i}": f"expiring slow line {i}" for i in range(12)}
    stored = upload(oai, jsonl([chat_line(c, t, model="slow") for c, t in texts.items()]))
    batch = oai.batches.create(input_file_id=stored.id, endpoint="/v1/chat/completions", completion_window="3s")
    done = wait_batch(oai, batch.id, timeout=60)
    assert done.status == "expired" and done.expired_at is not None
    assert done.expires_at - done.created_at == 3
    counts = done.request_counts
    assert counts.total == 12 and counts.completed < 12 and counts.completed + counts.failed == 12
    output = lines_of(oai, done.output_file_id)
    errors = lines_of(oai, done.error_file_id)
    assert sorted(line["custom_id"] for line in output + errors) == sorted(texts)
    for line in output:
        assert line["response"]["body"]["choices"][0]["message"]["content"] == \
            reply_text(texts[line["custom_id"]], 40, think=False)
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}


def test_a_completions_batch_answers_as_the_completions_route(oai):
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "echo", "prompt": f"complete me {i}", "echo": i == 1}} for i in range(3)]
    batch = oai.batches.create(input_file_id=upload(oai, jsonl(lines)).id, endpoint="/v1/completions",
                               completion_window="24h")
    done = wait_batch(oai, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 3
    output = {line["custom_id"]: line["response"]["body"] for line in lines_of(oai, done.output_file_id)}
    for i in range(3):
        body = output[f"c{i}"]
        assert body["object"] == "text_completion"
        direct = oai.completions.create(model="echo", prompt=f"complete me {i}", echo=i == 1)
        assert body["choices"][0]["text"] == direct.choices[0].text
        expected = reply_text(f"complete me {i}", WORDS, think=False)
        assert body["choices"][0]["text"] == (f"complete me {i}" + expected if i == 1 else expected)


def test_a_batch_body_that_is_not_one_is_a_400_in_openais_shape(daemon):
    with daemon.client() as http:
        for body, param in (({"endpoint": "/v1/chat/completions"}, "input_file_id"),
                            ({"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "metadata": {"a": 1}},
                             "metadata"),
                            ([1, 2], None)):
            answer = http.post("/v1/batches", json=body)
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == param
        answer = http.post("/v1/files", content=b'{"purpose": "batch"}')
        assert answer.status_code == 400 and "multipart" in answer.json()["error"]["message"]
        answer = http.post("/v1/files", files={"file": ("x.jsonl", b"{}")}, data={"purpose": "nonsense"})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "purpose"


def test_an_embeddings_batch_answers_as_the_embeddings_route(oai):
    lines = [{"custom_id": "e1", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "fake-remote", "input": ["a", "abc"]}},
             {"custom_id": "e2", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "fake-remote", "input": "ab", "encoding_format": "base64"}}]
    batch = oai.batches.create(input_file_id=upload(oai, jsonl(lines)).id, endpoint="/v1/embeddings",
                               completion_window="24h")
    done = wait_batch(oai, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 2
    output = {line["custom_id"]: line["response"]["body"] for line in lines_of(oai, done.output_file_id)}
    assert [d["embedding"] for d in output["e1"]["data"]] == [[1.0, 0.5, -1.0], [3.0, 0.5, -1.0]]
    assert output["e1"]["object"] == "list" and output["e1"]["model"] == "fake-remote"
    direct = oai.with_raw_response.embeddings.create(model="fake-remote", input="ab", encoding_format="base64")
    assert output["e2"]["data"] == json.loads(direct.text)["data"]


def test_files_are_listed_newest_first_and_by_purpose(oai):
    made = [upload(oai, jsonl([chat_line(f"l{i}", "listed")]), name=f"list-{i}.jsonl").id for i in range(3)]
    listed = [f.id for f in oai.files.list(purpose="batch")]
    assert listed[:3] == made[::-1]
    assert all(f.purpose == "batch" for f in oai.files.list(purpose="batch"))
    page = oai.files.with_raw_response.list(purpose="batch", limit=2).http_response.json()
    assert [f["id"] for f in page["data"]] == made[::-1][:2] and page["has_more"] is True
    after = oai.get("/files", cast_to=object, options={"params": {"purpose": "batch", "limit": 1, "after": made[2]}})
    assert [f["id"] for f in after["data"]] == [made[1]]
