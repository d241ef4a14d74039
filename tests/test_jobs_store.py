"""The job store's contract, run against both stores: SQLite on a real file and PostgreSQL on a
real throw-away server (tests/postgres_support.py). Claims and their fairness, results recorded
exactly once, cancel, expiry, retention, progress, concurrent claims.

Tests marked `sqlite_only` are about the embedded store itself: its schema versions in
PRAGMA user_version, its files folder, recovery after a killed daemon (PostgreSQL's recovery is
by lease expiry instead: tests/test_jobs_postgres.py), and the errors an operator sees when the
disk or the file refuses."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from llm_service.jobs import store as store_module
from llm_service.jobs.batch_input import BatchRequest, LineError
from llm_service.jobs.store import (
    DATABASE_NAME,
    FileTooLarge,
    JobStateError,
    NotFound,
    SqliteJobStore,
    StoreFull,
    StoreUnavailable,
    schema_version,
)

CHAT = "/v1/chat/completions"
DAY = 86400.0


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


BACKENDS = ("sqlite", "postgres")
# A test about the embedded store only: it runs once, on SQLite.
sqlite_only = pytest.mark.sqlite_only


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        only = metafunc.definition.get_closest_marker("sqlite_only") is not None
        metafunc.parametrize("backend", ["sqlite"] if only else BACKENDS, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock):
    """Opens a store (another connection to the same data at each call): SQLite in tmp_path,
    or PostgreSQL in a database of its own on the test process's server."""
    opened = []
    if request.param == "sqlite":
        def open_store(**options):
            opened.append(SqliteJobStore(tmp_path, **{"clock": clock, **options}))
            return opened[-1]
    else:
        from llm_service.jobs.postgres import PostgresJobStore

        url = request.getfixturevalue("postgres_cluster").create_database()

        def open_store(**options):
            opened.append(PostgresJobStore(url, **{"clock": clock, **options}))
            return opened[-1]
    yield open_store
    for one in opened:
        one.close()


@pytest.fixture
def store(backend):
    return backend(max_file_bytes=1000)


def stored_byte_files(store) -> int:
    """How many files' bytes the store keeps: SQLite's byte files, PostgreSQL's chunked files."""
    if isinstance(store, SqliteJobStore):
        return len(list(store.files_dir.iterdir()))
    with store._lock:
        connection = store._connect("counting")
        return connection.execute("SELECT COUNT(DISTINCT file_id) FROM file_chunks").fetchone()[0]


def requests(*custom_ids: str, model: str = "m") -> list[BatchRequest]:
    return [BatchRequest(n, cid, {"model": model, "prompt": cid}) for n, cid in enumerate(custom_ids, 1)]


def started_job(store: SqliteJobStore, *custom_ids: str, model: str = "m", window_s: float = DAY,
                line_errors=()):
    job = store.create_job(CHAT, None, "24h", window_s)
    return store.begin_job(job.id, model, requests(*custom_ids, model=model), line_errors)


def drain(store: SqliteJobStore, model: str = "m") -> list[tuple[str, str]]:
    """Claim and answer until nothing is pending: (job id, custom_id) in claim order."""
    order = []
    while (item := store.claim_next_item(model)) is not None:
        order.append((item.job_id, item.custom_id))
        assert store.record_response(item.job_id, item.line, 200, "r", {"echo": item.body["prompt"]})
    return order


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_each_store_offers_every_call_of_the_interface(backend_name):
    import inspect

    from llm_service.jobs.store import JobStore

    if backend_name == "sqlite":
        implementation = SqliteJobStore
    else:
        from llm_service.jobs.postgres import PostgresJobStore as implementation
    calls = [name for name, value in vars(JobStore).items()
             if callable(value) and not name.startswith("_")]
    assert len(calls) >= 21 and "renew_lease" in calls
    for name in calls:
        assert inspect.signature(getattr(implementation, name)) == inspect.signature(getattr(JobStore, name)), name


# -- schema ----------------------------------------------------------------------------------


@sqlite_only
def test_a_new_store_has_the_current_schema_in_wal_mode(tmp_path, store):
    db = sqlite3.connect(tmp_path / DATABASE_NAME)
    assert db.execute("PRAGMA user_version").fetchone()[0] == schema_version() >= 1
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"files", "jobs", "items"} <= tables
    db.close()


def test_reopening_keeps_the_data_and_applies_no_migration_twice(backend, store):
    job = started_job(store, "a")
    store.close()
    again = backend()
    assert again.get_job(job.id).counts.pending == 1


@sqlite_only
def test_a_later_migration_is_applied_once_over_an_older_file(tmp_path, store, monkeypatch):
    job = started_job(store, "a")
    store.close()
    monkeypatch.setattr(store_module, "MIGRATIONS",
                        [*store_module.MIGRATIONS, "ALTER TABLE jobs ADD COLUMN note TEXT;"])
    for _ in range(2):  # a second open must not add the column again (that would raise)
        newer = SqliteJobStore(tmp_path)
        assert newer.get_job(job.id).status == "in_progress"
        newer.close()
    db = sqlite3.connect(tmp_path / DATABASE_NAME)
    assert db.execute("PRAGMA user_version").fetchone()[0] == schema_version() == 2
    assert "note" in {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    db.close()


@sqlite_only
def test_a_failed_migration_leaves_the_file_at_its_old_version(tmp_path, store, monkeypatch):
    store.close()
    monkeypatch.setattr(store_module, "MIGRATIONS",
                        [*store_module.MIGRATIONS, "CREATE TABLE extra (x); ALTER TABLE nothing ADD y;"])
    with pytest.raises(StoreUnavailable):
        SqliteJobStore(tmp_path)
    db = sqlite3.connect(tmp_path / DATABASE_NAME)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    assert db.execute("SELECT name FROM sqlite_master WHERE name = 'extra'").fetchone() is None
    db.close()


@sqlite_only
def test_a_file_from_a_newer_daemon_is_refused(tmp_path, store):
    store.close()
    db = sqlite3.connect(tmp_path / DATABASE_NAME)
    db.execute(f"PRAGMA user_version = {schema_version() + 1}")
    db.close()
    with pytest.raises(StoreUnavailable, match="newer"):
        SqliteJobStore(tmp_path)


@sqlite_only
def test_a_file_that_is_no_database_is_a_clear_error(tmp_path):
    (tmp_path / DATABASE_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreUnavailable, match="damaged"):
        SqliteJobStore(tmp_path)


# -- files -----------------------------------------------------------------------------------


def test_files_keep_their_bytes_and_metadata(store, clock):
    stored = store.add_file("batch", "in.jsonl", [b"line 1\n", b"line 2\n"])
    assert (stored.purpose, stored.filename, stored.bytes, stored.created_at) == (
        "batch", "in.jsonl", 14, clock.now)
    assert store.get_file(stored.id) == stored
    assert store.file_bytes(stored.id) == b"line 1\nline 2\n"
    assert store.delete_file(stored.id) is True
    assert store.delete_file(stored.id) is False
    with pytest.raises(NotFound):
        store.get_file(stored.id)
    assert stored_byte_files(store) == 0


@sqlite_only
def test_no_space_for_a_file_is_store_full_and_leaves_nothing(store):
    import errno

    def chunks():
        yield b"part"
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StoreFull):
        store.add_file("batch", "in.jsonl", chunks())
    assert list(store.files_dir.iterdir()) == []


def test_a_file_over_the_limit_is_refused_and_leaves_nothing(store):
    store.add_file("batch", "ok", b"x" * 1000)
    with pytest.raises(FileTooLarge):
        store.add_file("batch", "big", [b"x" * 600, b"x" * 401])
    assert stored_byte_files(store) == 1


# -- claims ----------------------------------------------------------------------------------


def test_a_job_runs_its_lines_in_order_then_finalizes(store):
    job = started_job(store, "a", "b", "c")
    assert job.status == "in_progress" and job.counts.total == 3 and job.counts.pending == 3
    first = store.claim_next_item("m")
    assert (first.custom_id, first.line, first.attempt, first.endpoint, first.body) == (
        "a", 1, 1, CHAT, {"model": "m", "prompt": "a"})
    assert store.get_job(job.id).counts.running == 1
    assert store.record_response(job.id, 1, 200, "req-1", {"x": 1})
    assert [cid for _, cid in drain(store)] == ["b", "c"]
    done = store.get_job(job.id)
    assert done.status == "finalizing" and done.counts.completed == 3
    assert [job.id] == [j.id for j in store.jobs_to_finish()]
    finished = store.finish_job(job.id, "file-out", None)
    assert (finished.status, finished.output_file_id, finished.finished_at) == (
        "completed", "file-out", finished.finished_at)
    assert finished.finished_at is not None
    assert store.jobs_to_finish() == []


def test_claims_are_per_model(store):
    started_job(store, "a", model="m")
    started_job(store, "b", model="other")
    assert store.claim_next_item("m").custom_id == "a"
    assert store.claim_next_item("m") is None
    assert store.claim_next_item("other").custom_id == "b"
    assert store.claim_next_item("none") is None


def test_files_are_listed_and_items_timed(store):
    first = store.add_file("batch", "a.jsonl", b"{}")
    second = store.add_file("batch_output", "b.jsonl", b"{}")
    # Oldest first (two files of the same instant: either order).
    assert {f.id for f in store.list_files()} == {first.id, second.id}
    if first.created_at < second.created_at:
        assert [f.id for f in store.list_files()] == [first.id, second.id]
    assert [f.id for f in store.list_files("batch")] == [first.id]
    job = started_job(store, "a", "b")
    assert store.item_times(job.id) == {1: (None, None), 2: (None, None)}
    item = store.claim_next_item("m")
    store.record_response(item.job_id, item.line, 200, "r", {})
    started, finished = store.item_times(job.id)[item.line]
    assert started is not None and finished is not None and finished >= started
    assert store.item_times(job.id)[3 - item.line] == (None, None)


def test_jobs_of_one_model_take_turns(store):
    first = started_job(store, "a1", "a2", "a3")
    second = started_job(store, "b1", "b2")
    order = drain(store)
    assert order == [(first.id, "a1"), (second.id, "b1"), (first.id, "a2"), (second.id, "b2"),
                     (first.id, "a3")]


def test_a_job_added_later_gets_the_next_turn(store):
    first = started_job(store, "a1", "a2", "a3", "a4")
    item = store.claim_next_item("m")
    store.record_response(item.job_id, item.line, 200, "r", {})
    item = store.claim_next_item("m")
    store.record_response(item.job_id, item.line, 200, "r", {})
    late = started_job(store, "z1", "z2")
    assert [cid for _, cid in drain(store)] == ["z1", "a3", "z2", "a4"]
    assert store.get_job(first.id).status == store.get_job(late.id).status == "finalizing"


def test_a_validating_job_has_nothing_to_claim(store):
    store.create_job(CHAT, None, "24h", DAY)
    assert store.claim_next_item("m") is None


def test_bad_lines_are_failed_items_from_the_start(store):
    job = started_job(store, "a", line_errors=[LineError(2, "invalid_json_line", "not JSON")])
    assert (job.counts.total, job.counts.failed, job.counts.pending) == (2, 1, 1)
    drain(store)
    items = store.job_items(job.id)
    assert [(i.line, i.state) for i in items] == [(1, "done"), (2, "failed")]
    assert items[1].error == {"code": "invalid_json_line", "message": "not JSON", "line": 2}
    assert items[0].result == {"status_code": 200, "request_id": "r", "body": {"echo": "a"}}


def test_a_job_of_only_bad_lines_goes_straight_to_finalizing(store):
    job = started_job(store, line_errors=[LineError(1, "invalid_json_line", "x")])
    assert job.status == "finalizing"


def test_a_job_whose_input_cannot_be_used_fails_with_its_errors(store):
    job = store.create_job(CHAT, None, "24h", DAY)
    failed = store.fail_job(job.id, [{"code": "empty_file", "message": "no requests"}])
    assert failed.status == "failed" and failed.errors == ({"code": "empty_file", "message": "no requests"},)
    assert store.begin_job(job.id, "m", requests("a")).counts.total == 0
    with pytest.raises(JobStateError):
        store.fail_job(job.id, [])


# -- exactly once ----------------------------------------------------------------------------


def test_a_result_is_recorded_exactly_once(store):
    job = started_job(store, "a")
    item = store.claim_next_item("m")
    assert store.record_response(job.id, item.line, 200, "first", {"n": 1}) is True
    assert store.record_response(job.id, item.line, 200, "second", {"n": 2}) is False
    assert store.record_error(job.id, item.line, "engine_error", "late") is False
    (recorded,) = store.job_items(job.id)
    assert recorded.result["request_id"] == "first" and recorded.error is None
    assert store.get_job(job.id).counts.completed == 1


def test_a_pending_item_cannot_be_recorded(store):
    job = started_job(store, "a")
    assert store.record_response(job.id, 1, 200, "r", {}) is False
    assert store.get_job(job.id).counts.pending == 1


def test_error_answers_and_failures_count_as_failed(store):
    job = started_job(store, "a", "b")
    first = store.claim_next_item("m")
    assert store.record_response(job.id, first.line, 400, "r", {"error": {"message": "bad"}})
    second = store.claim_next_item("m")
    assert store.record_error(job.id, second.line, "model_unavailable", "the runner crashed")
    counts = store.get_job(job.id).counts
    assert (counts.completed, counts.failed) == (0, 2)
    assert store.job_items(job.id)[1].error == {"code": "model_unavailable", "message": "the runner crashed"}


def test_a_requeued_item_runs_again_with_its_attempts_counted(store):
    started_job(store, "a", "b")
    item = store.claim_next_item("m")
    assert store.requeue_item(item.job_id, item.line) is True
    assert store.requeue_item(item.job_id, item.line) is False
    again = store.claim_next_item("m")
    assert (again.custom_id, again.attempt) == ("a", 2)


def test_a_lease_is_renewable_only_while_its_item_runs(store):
    job = started_job(store, "a", "b")
    assert store.renew_lease(job.id, 1) is False  # pending
    item = store.claim_next_item("m")
    assert store.renew_lease(job.id, item.line) is True
    assert store.renew_lease(job.id, item.line) is True
    assert store.requeue_item(job.id, item.line) is True
    assert store.renew_lease(job.id, item.line) is False
    again = store.claim_next_item("m")
    assert store.record_response(job.id, again.line, 200, "r", {})
    assert store.renew_lease(job.id, again.line) is False  # recorded
    assert store.renew_lease("batch_nope", 1) is False
    assert (store.lease_s is None) == isinstance(store, SqliteJobStore)


# -- restart ---------------------------------------------------------------------------------


@sqlite_only
def test_items_running_when_the_daemon_died_run_again_after_restart(tmp_path, clock):
    before = SqliteJobStore(tmp_path, clock=clock)
    job = started_job(before, "a", "b", "c")
    done = before.claim_next_item("m")
    before.record_response(job.id, done.line, 200, "r", {"echo": "a"})
    interrupted = before.claim_next_item("m")
    assert interrupted.custom_id == "b"
    # No close: the daemon was killed with the item running.
    after = SqliteJobStore(tmp_path, clock=clock)
    assert after.get_job(job.id).counts.running == 1
    assert after.recover_running() == 1
    assert after.get_job(job.id).counts.running == 0
    again = after.claim_next_item("m")
    assert (again.custom_id, again.attempt) == ("b", 2)
    # A late record from before the restart is refused once the new run recorded.
    assert after.record_response(job.id, again.line, 200, "new", {"echo": "b"}) is True
    assert before.record_response(job.id, again.line, 200, "old", {}) is False
    drain(after)
    items = after.job_items(job.id)
    assert [(i.custom_id, i.state) for i in items] == [("a", "done"), ("b", "done"), ("c", "done")]
    assert items[1].result["request_id"] == "new"
    before.close()
    after.close()


@sqlite_only
def test_an_item_running_at_every_death_fails_after_max_attempts(tmp_path, clock):
    first = SqliteJobStore(tmp_path, clock=clock)
    job = started_job(first, "poison", "fine")
    for expected_attempt in (1, 2, 3):
        restarted = SqliteJobStore(tmp_path, clock=clock)
        assert restarted.recover_running(max_attempts=3) == (1 if expected_attempt > 1 else 0)
        item = restarted.claim_next_item("m")
        assert (item.custom_id, item.attempt) == ("poison", expected_attempt)
        restarted.close()  # killed with the item running
    last = SqliteJobStore(tmp_path, clock=clock)
    assert last.recover_running(max_attempts=3) == 0
    poison = last.job_items(job.id)[0]
    assert (poison.state, poison.error["code"]) == ("failed", "internal_error")
    assert "3 times" in poison.error["message"]
    assert last.claim_next_item("m").custom_id == "fine"
    first.close()
    last.close()


@sqlite_only
def test_a_write_refused_for_space_leaves_no_transaction_open(store):
    job = started_job(store, "a")
    store._connection.execute("PRAGMA max_page_count = 1")  # SQLite keeps it at the current size
    with pytest.raises(StoreFull):
        started_job(store, *[f"x{n}" * 50 for n in range(200)])
    assert not store._connection.in_transaction
    store._connection.execute("PRAGMA max_page_count = 1000000")
    assert store.claim_next_item("m").custom_id == "a"
    assert store.get_job(job.id).counts.running == 1


def test_a_job_accepted_before_a_kill_is_there_after_it(backend):
    before = backend()
    validating = before.create_job(CHAT, "file-x", "24h", DAY)
    after = backend()
    assert [j.id for j in after.jobs_in_status("validating")] == [validating.id]


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_stops_pending_items_at_once_and_waits_for_the_running_one(store):
    job = started_job(store, "a", "b", "c")
    running = store.claim_next_item("m")
    cancelling = store.cancel_job(job.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    assert (cancelling.counts.cancelled, cancelling.counts.running) == (2, 1)
    assert store.claim_next_item("m") is None
    assert store.jobs_to_finish() == []
    assert store.record_response(job.id, running.line, 200, "r", {"partial": True})
    assert [j.id for j in store.jobs_to_finish()] == [job.id]
    cancelled = store.finish_job(job.id, "file-out", "file-err")
    assert cancelled.status == "cancelled"
    assert [i.state for i in store.job_items(job.id)] == ["done", "cancelled", "cancelled"]


def test_an_item_given_back_in_a_cancelling_job_is_cancelled_and_the_job_finishes(store):
    """A running item requeued while its job is cancelling (its model stopped) is cancelled:
    pending in a cancelling job, nothing would ever claim it, and the job would never finish."""
    job = started_job(store, "a", "b")
    item = store.claim_next_item("m")
    store.cancel_job(job.id)
    assert store.requeue_item(job.id, item.line) is True
    assert [i.state for i in store.job_items(job.id)] == ["cancelled", "cancelled"]
    assert [j.id for j in store.jobs_to_finish()] == [job.id]
    assert store.finish_job(job.id, None, "file-err").status == "cancelled"


@sqlite_only
def test_an_item_running_when_the_daemon_died_in_a_cancelling_job_is_cancelled(tmp_path, clock):
    before = SqliteJobStore(tmp_path, clock=clock)
    job = started_job(before, "a", "b")
    before.claim_next_item("m")
    before.cancel_job(job.id)
    after = SqliteJobStore(tmp_path, clock=clock)  # the daemon was killed with "a" running
    assert after.recover_running() == 1
    assert [i.state for i in after.job_items(job.id)] == ["cancelled", "cancelled"]
    assert [j.id for j in after.jobs_to_finish()] == [job.id]
    before.close()
    after.close()


def test_cancel_with_nothing_running_is_ready_to_finish(store):
    job = started_job(store, "a")
    store.cancel_job(job.id)
    assert [j.id for j in store.jobs_to_finish()] == [job.id]
    assert store.finish_job(job.id, None, "file-err").status == "cancelled"


def test_cancel_while_validating_and_of_a_finished_job(store):
    job = store.create_job(CHAT, None, "24h", DAY)
    assert store.cancel_job(job.id).status == "cancelled"
    assert store.begin_job(job.id, "m", requests("a")).status == "cancelled"
    assert store.claim_next_item("m") is None
    done = started_job(store, "a")
    drain(store)
    store.finish_job(done.id, None, None)
    assert store.cancel_job(done.id).status == "completed"
    with pytest.raises(NotFound):
        store.cancel_job("batch_nope")


def test_a_job_cannot_finish_with_items_left(store):
    job = started_job(store, "a")
    with pytest.raises(JobStateError):
        store.finish_job(job.id, None, None)


# -- expiry and retention --------------------------------------------------------------------


def test_items_not_done_in_the_completion_window_expire(store, clock):
    job = started_job(store, "a", "b", "c", window_s=3600)
    running = store.claim_next_item("m")
    clock.now += 3599
    assert store.expire_due() == []
    clock.now += 1
    assert store.claim_next_item("m") is None  # past the window nothing new starts
    assert store.expire_due() == [job.id]
    assert store.expire_due() == []
    expiring = store.get_job(job.id)
    assert (expiring.status, expiring.counts.expired, expiring.counts.running) == ("in_progress", 2, 1)
    assert store.record_response(job.id, running.line, 200, "r", {})
    assert store.get_job(job.id).status == "finalizing"
    assert store.finish_job(job.id, "out", "err").status == "expired"


def test_a_job_still_validating_at_its_window_expires(store, clock):
    job = store.create_job(CHAT, None, "1h", 3600)
    clock.now += 3600
    assert store.expire_due() == [job.id]
    assert store.get_job(job.id).status == "expired"


def test_retention_purges_old_finished_jobs_and_files_only(store, clock):
    old_input = store.add_file("batch", "old.jsonl", b"{}")
    old = started_job(store, "a")
    drain(store)
    store.finish_job(old.id, None, None)
    busy_input = store.add_file("batch", "busy.jsonl", b"{}")
    busy = store.create_job(CHAT, busy_input.id, "30d", 30 * DAY)
    busy = store.begin_job(busy.id, "busy", requests("x", model="busy"))
    clock.now += 2 * DAY
    recent = started_job(store, "b")
    drain(store)
    store.finish_job(recent.id, None, None)
    short_lived = store.add_file("batch_output", "out.jsonl", b"{}", expires_at=clock.now + 60)
    assert store.purge(DAY).jobs == 1
    with pytest.raises(NotFound):
        store.get_job(old.id)
    with pytest.raises(NotFound):
        store.get_file(old_input.id)
    assert store.get_job(recent.id).status == "completed"
    assert store.get_job(busy.id).status == "in_progress"
    assert store.file_bytes(busy_input.id) == b"{}"  # an unfinished job still reads it
    assert store.get_file(short_lived.id)
    clock.now += 60
    assert store.purge(DAY) == store_module.PurgeCounts(jobs=0, files=1)
    assert stored_byte_files(store) == 1
    if isinstance(store, SqliteJobStore):
        assert sorted(p.name for p in store.files_dir.iterdir()) == [busy_input.id]


@sqlite_only
def test_purge_sweeps_old_bytes_without_a_row(store):
    orphan = store.files_dir / "file-orphan.partial"
    orphan.write_bytes(b"left by a crash")
    fresh = store.files_dir / "file-fresh.partial"
    fresh.write_bytes(b"an upload going on")
    os.utime(orphan, (0, 0))
    store.purge(DAY)
    assert not orphan.exists() and fresh.exists()


def test_listing_is_newest_first_and_paged(store):
    ids = [store.create_job(CHAT, None, "24h", DAY).id for _ in range(5)]
    first_page = store.list_jobs(limit=2)
    assert [j.id for j in first_page] == [ids[4], ids[3]]
    assert [j.id for j in store.list_jobs(limit=2, after=ids[3])] == [ids[2], ids[1]]
    assert [j.id for j in store.list_jobs(limit=10, after=ids[1])] == [ids[0]]


# -- when the disk refuses -------------------------------------------------------------------


@sqlite_only
def test_a_full_database_is_store_full_and_keeps_what_was_stored(store):
    job = started_job(store, "a")
    pages = store._connection.execute("PRAGMA page_count").fetchone()[0]
    store._connection.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StoreFull):
        started_job(store, *[f"x{n}" * 50 for n in range(200)])
    assert store.get_job(job.id).counts.pending == 1
    assert store.claim_next_item("m").custom_id == "a"


_READ_ONLY_CHECK = """
import os, sys
from pathlib import Path
from llm_service.jobs.store import SqliteJobStore, StoreUnavailable
if os.getuid() == 0:
    os.setgid(65534)
    os.setuid(65534)  # root writes any file: check as nobody, imports done
try:
    store = SqliteJobStore(Path(sys.argv[1]))
    print("read:", [job.id for job in store.list_jobs()] == [sys.argv[2]])
    store.create_job("/v1/completions", None, "24h", 86400)
except StoreUnavailable as error:
    print("StoreUnavailable:", error)
except BaseException as error:
    print("other:", type(error).__name__, error)
else:
    print("written")
"""


@sqlite_only
@pytest.mark.parametrize("folder_writable", [False, True])
def test_a_read_only_database_is_a_clear_store_error(folder_writable):
    # Outside pytest's own temporary folder, which only its owner may enter.
    folder = Path(tempfile.mkdtemp(prefix="jobs-ro-"))
    try:
        first = SqliteJobStore(folder)
        job = first.create_job(CHAT, None, "24h", DAY)
        first.close()
        (folder / DATABASE_NAME).chmod(0o444)
        (folder / "files").chmod(0o555)
        folder.chmod(0o777 if folder_writable else 0o555)
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": root}
        out = subprocess.run([sys.executable, "-c", _READ_ONLY_CHECK, str(folder), job.id], env=env,
                             capture_output=True, text=True, timeout=60, cwd="/")
        lines = out.stdout.splitlines()
        assert lines and lines[-1].startswith("StoreUnavailable:"), out.stdout + out.stderr
        assert "read-only" in lines[-1], lines[-1]
        assert "OperationalError" not in out.stdout and "Traceback" not in out.stderr
        if folder_writable:  # what is stored can still be read
            assert lines[0] == "read: True", out.stdout
    finally:
        for dirpath, _, _ in os.walk(folder):
            os.chmod(dirpath, 0o755)
        subprocess.run(["rm", "-rf", str(folder)], check=False)


# -- progress and concurrent claims ------------------------------------------------------------


def test_model_progress_counts_pending_and_running_items(store, clock):
    first = started_job(store, "a", "b")
    clock.now += 10
    started_job(store, "c")
    started_job(store, "x", model="other")
    running = store.claim_next_item("m")
    assert store.model_progress() == {
        "m": store_module.ModelProgress(pending=2, running=1, oldest_pending_since=first.created_at),
        "other": store_module.ModelProgress(pending=1, running=0, oldest_pending_since=clock.now),
    }
    store.record_response(running.job_id, running.line, 200, "r", {})
    drain(store)
    drain(store, "other")
    assert store.model_progress() == {}


def test_concurrent_claims_from_threads_and_a_second_store_take_each_item_once(backend, store):
    import threading

    ids = [f"c{n}" for n in range(120)]
    started_job(store, *ids[:60])
    started_job(store, *ids[60:])
    other = backend()  # another connection to the same data
    claimed: list[str] = []
    recorded: list[bool] = []
    lock = threading.Lock()

    def work(on) -> None:
        while (item := on.claim_next_item("m")) is not None:
            ok = on.record_response(item.job_id, item.line, 200, "r", {})
            with lock:
                claimed.append(item.custom_id)
                recorded.append(ok)

    threads = [threading.Thread(target=work, args=(s,)) for s in (store, store, other, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert sorted(claimed) == sorted(ids) and all(recorded)


_KILLED_WORKER = """
import sys, time
from pathlib import Path
from llm_service.jobs.store import SqliteJobStore
store = SqliteJobStore(Path(sys.argv[1]))
store.recover_running()
print("ready", flush=True)
while (item := store.claim_next_item("m")) is not None:
    time.sleep(0.005)  # the item "runs"
    store.record_response(item.job_id, item.line, 200, "r", {"echo": item.body["prompt"]})
"""


@sqlite_only
def test_a_store_killed_again_and_again_ends_with_each_result_once(tmp_path):
    import signal
    import time

    setup = SqliteJobStore(tmp_path)
    job = started_job(setup, *[f"k{n}" for n in range(150)])
    setup.close()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for delay in (0.05, 0.11, 0.07, 0.13):
        worker = subprocess.Popen([sys.executable, "-c", _KILLED_WORKER, str(tmp_path)], env=env,
                                  stdout=subprocess.PIPE, text=True)
        assert worker.stdout.readline().strip() == "ready"
        time.sleep(delay)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        worker.stdout.close()
    final = SqliteJobStore(tmp_path)
    final.recover_running()
    assert 0 < final.get_job(job.id).counts.completed < 150, "the kills must land mid-batch"
    drain(final)
    items = final.job_items(job.id)
    assert [i.custom_id for i in items] == [f"k{n}" for n in range(150)]
    assert all(i.state == "done" and i.result["body"] == {"echo": i.custom_id} for i in items)
    assert final.get_job(job.id).status == "finalizing"
    final.close()
