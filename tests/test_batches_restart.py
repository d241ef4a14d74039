"""Batches survive the daemon (issue 15): a 200-item batch, the daemon SIGKILLed several times
while it runs, then stopped politely once, and started again on the same data folder each time;
every custom_id is answered exactly once in the output, with the scripted model's known answer."""
from __future__ import annotations

import io
import json
import signal
import time

import openai

from ax_emulator.scripted import reply_text
from harness.daemon import running_daemon
from harness.models import scripted_model

WORDS = 3
ITEMS = 200
KILLS = 3


def client(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def completed(oai: openai.OpenAI, batch_id: str) -> tuple[str, int]:
    batch = oai.batches.retrieve(batch_id)
    return batch.status, batch.request_counts.completed


def test_a_batch_survives_repeated_sigkills(tmp_path):
    texts = {f"item-{i:03d}": f"restart item {i}" for i in range(ITEMS)}
    lines = b"".join(json.dumps({
        "custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "echo", "messages": [{"role": "user", "content": text}]},
    }).encode() + b"\n" for cid, text in texts.items())

    def entries():
        return [scripted_model(tmp_path, "echo", reply_words=WORDS, tokens_per_second=400)]

    progress: list[int] = []
    with running_daemon(tmp_path, entries()) as daemon:
        oai = client(daemon)
        stored = oai.files.create(file=("restart.jsonl", io.BytesIO(lines)), purpose="batch")
        batch_id = oai.batches.create(input_file_id=stored.id, endpoint="/v1/chat/completions",
                                      completion_window="24h").id
        # Killed as soon as the batch has made some progress.
        deadline = time.monotonic() + 60
        while completed(oai, batch_id)[1] < 10:
            assert time.monotonic() < deadline, "the batch made no progress"
            time.sleep(0.02)
        progress.append(completed(oai, batch_id)[1])
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(10)
    recovered_logs = []
    for _ in range(KILLS - 1):
        with running_daemon(tmp_path, entries()) as daemon:
            oai = client(daemon)
            status, count = completed(oai, batch_id)
            # What was recorded before the kill is there after it.
            assert count >= progress[-1], (count, progress)
            deadline = time.monotonic() + 60
            while completed(oai, batch_id)[1] < count + 20:
                assert time.monotonic() < deadline, "the batch made no progress after a restart"
                time.sleep(0.02)
            progress.append(completed(oai, batch_id)[1])
            assert completed(oai, batch_id)[0] == "in_progress", "killed too late: the batch finished"
            daemon.process.send_signal(signal.SIGKILL)
            daemon.process.wait(10)
            recovered_logs.append(daemon.log())
    # A polite stop (SIGTERM) gives the running item back to the store: the next start finds
    # nothing that was running.
    with running_daemon(tmp_path, entries()) as daemon:
        oai = client(daemon)
        count = completed(oai, batch_id)[1]
        deadline = time.monotonic() + 60
        while completed(oai, batch_id)[1] < count + 20:
            assert time.monotonic() < deadline, "the batch made no progress after a restart"
            time.sleep(0.02)
        assert completed(oai, batch_id)[0] == "in_progress", "stopped too late: the batch finished"
        recovered_logs.append(daemon.log())
    # The last daemon runs the batch to its end.
    with running_daemon(tmp_path, entries()) as daemon:
        oai = client(daemon)
        deadline = time.monotonic() + 240
        while (batch := oai.batches.retrieve(batch_id)).status not in ("completed", "failed", "cancelled", "expired"):
            assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
            time.sleep(0.2)
        assert batch.status == "completed", batch
        assert batch.request_counts.total == ITEMS and batch.request_counts.completed == ITEMS
        assert batch.error_file_id is None
        output = [json.loads(line) for line in oai.files.content(batch.output_file_id).text.splitlines()]
        last_log = daemon.log()
    assert "will run again" not in last_log, last_log[-3000:]
    # The items running at the kills were put back and run again (not lost, not recorded twice).
    assert any("will run again" in log for log in recovered_logs), recovered_logs[-1][-3000:]
    assert len(progress) == KILLS and progress == sorted(progress)
    ids = [line["custom_id"] for line in output]
    assert len(ids) == ITEMS and sorted(ids) == sorted(texts)  # each exactly once
    for line in output:
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["choices"][0]["message"]["content"] == \
            reply_text(texts[line["custom_id"]], WORDS, think=False)
