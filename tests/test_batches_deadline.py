"""A batch item waits behind interactive requests for as long as they keep coming (issue 15):
its wait for the slot does not count against request_deadline_s (its job's completion window
bounds it), so a busy model answers the item late, never 504."""
from __future__ import annotations

import io
import json
import threading
import time

import openai

from ax_emulator.scripted import reply_text
from harness.daemon import running_daemon
from harness.models import scripted_model

WORDS = 40  # ~80 tokens at 40 tokens/s: ~2.2 s an answer
DEADLINE_S = 5.0


def test_a_batch_item_outwaits_the_request_deadline_behind_interactive_requests(tmp_path):
    entries = [scripted_model(tmp_path, "slow", reply_words=WORDS, tokens_per_second=40,
                              fields={"run_on_startup": "true", "keep_alive": "-1"})]
    with running_daemon(tmp_path, entries, "--request-deadline-s", str(DEADLINE_S)) as daemon:
        oai = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        daemon.wait_state("slow", "ready", timeout=60)  # loaded: a load would not fit in the short deadline
        started = time.monotonic()
        oai.chat.completions.create(model="slow", messages=[{"role": "user", "content": "warm up"}])
        answer_s = time.monotonic() - started  # one answer's time, the model loaded
        answers: dict[str, str] = {}
        ended: dict[str, float] = {}

        def interactive(text: str) -> None:
            reply = oai.chat.completions.create(model="slow", messages=[{"role": "user", "content": text}])
            answers[text] = reply.choices[0].message.content
            ended[text] = time.monotonic()

        line = {"custom_id": "waits", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "slow", "messages": [{"role": "user", "content": "patient item"}]}}
        stored = oai.files.create(file=("one.jsonl", io.BytesIO(json.dumps(line).encode())), purpose="batch")
        threads = [threading.Thread(target=interactive, args=(f"busy {i}",)) for i in range(3)]
        first_at = time.monotonic()
        threads[0].start()
        time.sleep(0.3)  # the first holds the slot
        submitted = time.monotonic()
        batch = oai.batches.create(input_file_id=stored.id, endpoint="/v1/chat/completions", completion_window="1h")
        # Each next interactive request comes shortly before the one before it ends: each is
        # answered within its deadline, the item waits for all of them.
        for i, thread in enumerate(threads[1:], start=1):
            time.sleep(max(0.0, first_at + i * answer_s * 0.7 - time.monotonic()))
            thread.start()
        for thread in threads:
            thread.join(60)
        assert answers == {f"busy {i}": reply_text(f"busy {i}", WORDS, think=False) for i in range(3)}
        last_interactive_end = max(ended.values())
        assert oai.batches.retrieve(batch.id).request_counts.completed == 0, "the item went before an interactive request"
        deadline = time.monotonic() + 60
        while (done := oai.batches.retrieve(batch.id)).status != "completed":
            assert time.monotonic() < deadline, done
            time.sleep(0.1)
        errors = oai.files.content(done.error_file_id).text if done.error_file_id else ""
        assert done.request_counts.completed == 1, errors
        output = [json.loads(x) for x in oai.files.content(done.output_file_id).text.splitlines()]
        assert output[0]["response"]["body"]["choices"][0]["message"]["content"] == \
            reply_text("patient item", WORDS, think=False)
    # The item waited past request_deadline_s for its slot, and was answered all the same.
    assert last_interactive_end - submitted > DEADLINE_S
