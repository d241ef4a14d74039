"""The batch runner's finishing, in-process on a real SQLite job store (issue 15): the output
files of a settled job, written once even when a stop interrupted finishing after the files."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from llm_service.jobs.batch_input import BatchRequest
from llm_service.jobs.output_files import render_output_files
from llm_service.jobs.runner import JobRunner

pytestmark = pytest.mark.anyio


def _runner(tmp_path) -> JobRunner:
    settings = SimpleNamespace(data_dir=tmp_path, job_file_max_bytes=1 << 20, job_max_attempts=3)
    return JobRunner(settings, manager=None, metrics=None)


async def _settled_job(runner: JobRunner):
    store = await runner.store()
    job = store.create_job("/v1/chat/completions", None, "24h", 86400)
    store.begin_job(job.id, "echo", [BatchRequest(1, "a", {"model": "echo"}), BatchRequest(2, "b", {"model": "echo"})])
    for line in (1, 2):
        item = store.claim_next_item("echo")
        assert item is not None and item.line == line
        if line == 1:
            store.record_response(job.id, 1, 200, "r1", {"answer": "one"})
        else:
            store.record_error(job.id, 2, "internal_error", "it broke")
    return store, store.get_job(job.id)


async def test_a_settled_job_gets_its_files_and_its_status(tmp_path):
    runner = _runner(tmp_path)
    store, job = await _settled_job(runner)
    assert job.status == "finalizing"
    await runner._finish(job)
    done = store.get_job(job.id)
    assert done.status == "completed"
    output = [json.loads(x) for x in store.file_bytes(done.output_file_id).decode().splitlines()]
    errors = [json.loads(x) for x in store.file_bytes(done.error_file_id).decode().splitlines()]
    assert [x["custom_id"] for x in output] == ["a"] and output[0]["response"]["body"] == {"answer": "one"}
    assert [x["custom_id"] for x in errors] == ["b"] and errors[0]["error"]["code"] == "internal_error"
    store.close()


async def test_finishing_again_after_a_stop_reuses_the_files_already_written(tmp_path):
    runner = _runner(tmp_path)
    store, job = await _settled_job(runner)
    # A stop after the files were written, before the job was finished: the files are there.
    files = render_output_files(job.id, store.job_items(job.id))
    left = store.add_file("batch_output", f"{job.id}_output.jsonl", files.output.encode())
    await runner._finish(job)
    done = store.get_job(job.id)
    assert done.output_file_id == left.id
    names = [f.filename for f in store.list_files("batch_output")]
    assert sorted(names) == sorted([f"{job.id}_output.jsonl", f"{job.id}_error.jsonl"])  # each once
    store.close()
