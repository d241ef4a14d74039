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

WORDS = 4


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("batches")
    entries = [
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
