"""One job queue for several boxes (issue 19, section 3): two daemons on one PostgreSQL database
(`jobs_url`, a throw-away cluster the test starts) drain one 200-item batch together; one is
SIGKILLed midway; the item it was running comes back after its lease, and every custom_id is in
the output exactly once, with the scripted model's known answer."""
from __future__ import annotations

import json
import signal
import time

import openai

from ax_emulator.scripted import reply_text
from harness.daemon import running_daemon
from harness.models import scripted_model

MODEL = "fleet-batch"
WORDS = 3
ITEMS = 200


def served(daemon) -> int:
    status = daemon.get(f"/api/status/{MODEL}")
    return (status.get("jobs") or {}).get("done", 0)


def test_two_daemons_drain_one_queue_and_one_dies(tmp_path, postgres_cluster) -> None:
    url = postgres_cluster.create_database()
    flags = ("--jobs-url", url, "--jobs-lease-s", "2", "--job-poll-s", "0.2")
    boxes = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        entry = scripted_model(tmp_path / name, MODEL, reply_words=WORDS, tokens_per_second=300,
                               fields={"run_on_startup": "true"})
        boxes.append(running_daemon(tmp_path / name, [entry], *flags, leftovers_fail=name == "b"))
    box_a = boxes[0].__enter__()
    try:
        with boxes[1] as box_b:
            for box in (box_a, box_b):
                box.wait_state(MODEL, "ready")
            lines = [json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"model": MODEL, "messages": [{"role": "user", "content": f"item {i}"}]}})
                     for i in range(ITEMS)]
            client_a = openai.OpenAI(base_url=f"{box_a.url}/v1", api_key="none", max_retries=0)
            upload = client_a.files.create(file=("items.jsonl", "\n".join(lines).encode()), purpose="batch")
            batch = client_a.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
            client_b = openai.OpenAI(base_url=f"{box_b.url}/v1", api_key="none", max_retries=0)
            deadline = time.monotonic() + 60
            while client_b.batches.retrieve(batch.id).request_counts.completed < 60 and time.monotonic() < deadline:
                time.sleep(0.1)
            box_a.process.send_signal(signal.SIGKILL)  # midway, with an item of its own running
            box_a.process.wait(10)
            deadline = time.monotonic() + 120
            while (status := client_b.batches.retrieve(batch.id)).status != "completed" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert status.status == "completed", status
            assert status.request_counts.completed == ITEMS and status.request_counts.failed == 0
            output = [json.loads(line) for line in client_b.files.content(status.output_file_id).text.splitlines()]
            ids = [line["custom_id"] for line in output]
            assert sorted(ids) == sorted(f"c{i}" for i in range(ITEMS)) and len(set(ids)) == ITEMS
            for line in output:
                number = line["custom_id"][1:]
                content = line["response"]["body"]["choices"][0]["message"]["content"]
                assert content == reply_text(f"item {number}", WORDS, False)
            assert served(box_b) > 0  # both boxes worked on it
    finally:
        boxes[0].__exit__(None, None, None)
