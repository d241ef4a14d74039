"""The job store as the daemon opens it (issue 15): not at all until a batch is asked for (the
daemon's idle memory), a store that cannot be opened answers 503 while the interactive API
serves on, and the store's errors in OpenAI's shape with their statuses."""
from __future__ import annotations

import io
import json
from pathlib import Path

import openai
import pytest

from ax_emulator.scripted import reply_text
from harness.daemon import running_daemon
from harness.models import scripted_model
from llm_service.jobs import store as job_store
from llm_service.jobs.runner import translated

WORDS = 3


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_the_store_opens_only_when_a_batch_is_asked_for_and_a_broken_one_is_a_503(tmp_path):
    with running_daemon(tmp_path, [scripted_model(tmp_path, "echo", reply_words=WORDS)],
                        "--job-file-max-bytes", "2000", "--max-body-bytes", "1000") as daemon:
        oai = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        jobs_dir = tmp_path / "data" / "jobs"
        assert daemon.get("/api/status")["jobs"] == {"store_open": False}
        assert not (jobs_dir / job_store.DATABASE_NAME).exists()
        assert "_sqlite3" not in _maps(daemon.process.pid)  # sqlite3 not even imported
        # A store that cannot be made (its folder is a file): 503 in OpenAI's shape ...
        jobs_dir.parent.mkdir(parents=True, exist_ok=True)
        jobs_dir.write_text("not a folder")
        with pytest.raises(openai.APIStatusError) as unavailable:
            oai.batches.list()
        assert unavailable.value.status_code == 503
        assert unavailable.value.code == "store_unavailable" and unavailable.value.type == "server_error"
        # ... and the interactive API serves on.
        answer = oai.chat.completions.create(model="echo", messages=[{"role": "user", "content": "still here"}])
        assert answer.choices[0].message.content == reply_text("still here", WORDS, think=False)
        # Once the operator fixes it, the next request opens the store.
        jobs_dir.unlink()
        stored = oai.files.create(file=("in.jsonl", io.BytesIO(json.dumps({
            "custom_id": "one", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "echo", "messages": [{"role": "user", "content": "stored line"}]}}).encode())),
            purpose="batch")
        assert (jobs_dir / job_store.DATABASE_NAME).exists()
        assert daemon.get("/api/status")["jobs"] == {"store_open": True}
        assert "_sqlite3" in _maps(daemon.process.pid)
        batch = oai.batches.create(input_file_id=stored.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert batch.request_counts.total == 1
        # Uploads have job_file_max_bytes as their limit, not max_body_bytes (1000 here) ...
        assert oai.files.create(file=("ok.jsonl", io.BytesIO(b"x" * 1500)), purpose="batch").bytes == 1500
        # ... and a larger file is a 413, whether the route or the body limit sees it first.
        for size in (2500, 200_000):
            with pytest.raises(openai.APIStatusError) as too_large:
                oai.files.create(file=("big.jsonl", io.BytesIO(b"x" * size)), purpose="batch")
            assert too_large.value.status_code == 413, size
            assert "job_file_max_bytes" in too_large.value.message
    # A daemon started where a jobs database exists opens it at start (to run what is left).
    with running_daemon(tmp_path, [scripted_model(tmp_path, "echo", reply_words=WORDS)]) as daemon:
        from harness.net import wait_until

        wait_until(lambda: daemon.get("/api/status")["jobs"]["store_open"] or None, 20, "the store to open")
        oai = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert oai.batches.retrieve(batch.id).id == batch.id


def test_the_runner_knows_the_stores_file_name_without_importing_it():
    from llm_service.jobs import runner

    assert runner.DATABASE_NAME == job_store.DATABASE_NAME


@pytest.mark.parametrize(("error", "status", "code"), [
    (job_store.StoreFull("disk full"), 507, "insufficient_storage"),
    (job_store.StoreUnavailable("read-only"), 503, "store_unavailable"),
    (job_store.NotFound("no batch 'x'"), 404, "not_found"),
    (job_store.FileTooLarge(10), 413, "file_too_large"),
])
def test_store_errors_have_their_statuses(error, status, code):
    translated_error = translated(error)
    assert (translated_error.status_code, translated_error.code) == (status, code)


def test_a_full_disk_refuses_uploads_and_the_interactive_api_keeps_serving(tmp_path):
    """The daemon may write no file over 1.5 MB (as on a full disk: EFBIG, the write fails; Python
    ignores SIGXFSZ): a bigger upload is a 507, what was stored before is intact, and generation
    goes on."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_500_000, 1_500_000))

    entry = scripted_model(tmp_path, "echo", reply_words=WORDS, fields={"run_on_startup": "true"})
    with running_daemon(tmp_path, [entry], preexec=limit) as daemon:
        oai = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                           "body": {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}})
        kept = oai.files.create(file=("small.jsonl", io.BytesIO(line.encode())), purpose="batch")
        filler = "\n".join(line.replace('"a"', f'"f{i}"') for i in range(12_000)).encode()  # ~2 MB
        assert len(filler) > 1_500_000
        with pytest.raises(openai.APIStatusError) as full:
            oai.files.create(file=("big.jsonl", io.BytesIO(filler)), purpose="batch")
        assert full.value.status_code == 507, full.value
        assert oai.files.retrieve(kept.id).bytes == len(line)
        assert oai.files.content(kept.id).text == line
        answer = oai.chat.completions.create(model="echo", messages=[{"role": "user", "content": "still here"}])
        assert answer.choices[0].message.content.startswith("You said: still here.")
