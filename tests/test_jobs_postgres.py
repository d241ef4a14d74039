"""What the PostgreSQL job store adds to the contract (tests/test_jobs_store.py runs that on
both stores): its schema versions, several boxes draining one queue (concurrent claims, each
box only its models), leases (a dead box's items run again elsewhere once its lease expires, a
live box's are never taken), killed processes holding claims, and the errors when the server is
gone, stuck or full. Every test runs a real server (tests/postgres_support.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from postgres_support import PostgresCluster
from test_jobs_store import Clock, drain, started_job

from llm_service.jobs import postgres as postgres_module
from llm_service.jobs.postgres import PostgresJobStore
from llm_service.jobs.store import (
    FileTooLarge,
    JobStateError,
    NotFound,
    SqliteJobStore,
    StoreFull,
    StoreUnavailable,
    open_job_store,
)

ROOT = Path(__file__).resolve().parents[1]
LEASE_S = 1.0  # short leases: a dead box's items come back within a second or so


@pytest.fixture
def url(postgres_cluster) -> str:
    return postgres_cluster.create_database()


@pytest.fixture
def boxes(url):
    """Opens stores on one database, each a box of its own; closes them afterwards."""
    opened: list[PostgresJobStore] = []

    def box(**options) -> PostgresJobStore:
        opened.append(PostgresJobStore(url, **{"lease_s": LEASE_S, **options}))
        return opened[-1]

    yield box
    for one in opened:
        one.close()


def sql(url: str, query: str, params=()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as connection:
        cursor = connection.execute(query, params)
        return cursor.fetchall() if cursor.description else []


def wait_past_lease(seconds: float = LEASE_S) -> None:
    time.sleep(seconds + 0.3)


# -- schema ----------------------------------------------------------------------------------


def test_a_new_database_gets_the_current_schema_once(url, boxes):
    first = boxes()
    job = started_job(first, "a")
    assert sql(url, "SELECT version FROM job_store_schema") == [(postgres_module.schema_version(),)]
    tables = {name for (name,) in sql(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"files", "file_chunks", "jobs", "items", "job_store_schema"} <= tables
    second = boxes()  # a second open must migrate nothing (CREATE TABLE again would raise)
    assert second.get_job(job.id).counts.pending == 1
    assert sql(url, "SELECT COUNT(*) FROM job_store_schema") == [(1,)]


def test_boxes_starting_at_once_on_a_new_database_migrate_it_once(url):
    opened: list[PostgresJobStore] = []
    failures: list[BaseException] = []

    def open_one() -> None:
        try:
            opened.append(PostgresJobStore(url))
        except BaseException as error:  # noqa: BLE001 - reported below
            failures.append(error)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == [] and len(opened) == 4
    assert sql(url, "SELECT version FROM job_store_schema") == [(postgres_module.schema_version(),)]
    for one in opened:
        one.close()


def test_a_later_migration_is_applied_once_and_a_failed_one_not_at_all(url, boxes, monkeypatch):
    job = started_job(boxes(), "a")
    monkeypatch.setattr(postgres_module, "MIGRATIONS",
                        [*postgres_module.MIGRATIONS, "ALTER TABLE jobs ADD COLUMN note TEXT;"])
    for _ in range(2):
        assert boxes().get_job(job.id).status == "in_progress"
    assert sql(url, "SELECT version FROM job_store_schema") == [(2,)]
    assert sql(url, "SELECT column_name FROM information_schema.columns "
                    "WHERE table_name = 'jobs' AND column_name = 'note'") == [("note",)]
    monkeypatch.setattr(postgres_module, "MIGRATIONS", [
        *postgres_module.MIGRATIONS, "CREATE TABLE extra (x INTEGER); ALTER TABLE nothing ADD y INTEGER;"])
    with pytest.raises(StoreUnavailable, match="migrating"):
        boxes()
    assert sql(url, "SELECT version FROM job_store_schema") == [(2,)]
    assert sql(url, "SELECT tablename FROM pg_tables WHERE tablename = 'extra'") == []


def test_a_database_from_a_newer_daemon_is_refused(url, boxes):
    boxes()
    sql(url, "UPDATE job_store_schema SET version = version + 1")
    with pytest.raises(StoreUnavailable, match="newer"):
        boxes()


# -- files -----------------------------------------------------------------------------------


def test_file_bytes_live_in_the_database_in_chunks(url, boxes, monkeypatch):
    monkeypatch.setattr(postgres_module, "CHUNK_BYTES", 1000)
    store = boxes(max_file_bytes=10_000)
    content = bytes(range(256)) * 20  # 5120 bytes: 6 chunks, the last one short
    stored = store.add_file("batch", "in.jsonl", [content[:700], content[700:3000], content[3000:]])
    assert stored.bytes == len(content)
    assert sql(url, "SELECT n, length(data) FROM file_chunks ORDER BY n") == [
        (0, 1000), (1, 1000), (2, 1000), (3, 1000), (4, 1000), (5, 120)]
    assert boxes().file_bytes(stored.id) == content  # another box reads what this one stored
    empty = store.add_file("batch", "empty.jsonl", b"")
    assert store.file_bytes(empty.id) == b""
    with pytest.raises(FileTooLarge):
        store.add_file("batch", "big", [b"x" * 6000, b"x" * 4001])
    assert sql(url, "SELECT COUNT(*) FROM files") == [(2,)]
    assert store.delete_file(stored.id)
    assert sql(url, "SELECT COUNT(*) FROM file_chunks WHERE file_id = %s", (stored.id,)) == [(0,)]
    with pytest.raises(NotFound):
        store.file_bytes(stored.id)


def test_an_upload_that_breaks_off_leaves_nothing(url, boxes):
    store = boxes()

    def chunks():
        yield b"part of it"
        raise ConnectionResetError("the client went away")

    with pytest.raises(ConnectionResetError):
        store.add_file("batch", "in.jsonl", chunks())
    assert sql(url, "SELECT COUNT(*) FROM files") == sql(url, "SELECT COUNT(*) FROM file_chunks") == [(0,)]
    assert store.add_file("batch", "next.jsonl", b"ok").bytes == 2  # the connection still works


def test_a_slow_upload_does_not_hold_up_the_box_s_claims(boxes):
    store = boxes()
    started_job(store, "a")
    reading = threading.Event()

    def slow_chunks():
        yield b"first part\n"
        reading.set()
        time.sleep(2)  # a client on a slow link
        yield b"second part\n"

    uploaded = []
    upload = threading.Thread(target=lambda: uploaded.append(store.add_file("batch", "in", slow_chunks())))
    upload.start()
    assert reading.wait(timeout=10)
    began = time.monotonic()
    item = store.claim_next_item("m")
    assert item.custom_id == "a" and time.monotonic() - began < 1.0
    upload.join(timeout=30)
    assert store.file_bytes(uploaded[0].id) == b"first part\nsecond part\n"


# -- several boxes, one queue ----------------------------------------------------------------


def test_two_boxes_claiming_from_threads_take_every_item_exactly_once(boxes):
    first, second = boxes(), boxes()
    ids = [f"c{n}" for n in range(300)]
    for part in (ids[:100], ids[100:200], ids[200:]):
        started_job(first, *part)
    claims: list[tuple[str, str, str]] = []
    refused: list[str] = []
    lock = threading.Lock()

    def work(box: PostgresJobStore) -> None:
        while (item := box.claim_next_item("m")) is not None:
            with lock:
                claims.append((item.custom_id, box.box_id, item.job_id))
            if not box.record_response(item.job_id, item.line, 200, box.box_id, {"by": box.box_id}):
                with lock:
                    refused.append(item.custom_id)

    threads = [threading.Thread(target=work, args=(box,)) for box in (first, first, first, second, second, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    claimed = [custom_id for custom_id, _, _ in claims]
    assert len(claimed) == len(set(claimed)) == 300 and sorted(claimed) == sorted(ids)
    assert refused == []
    by_box = {box_id for _, box_id, _ in claims}
    assert by_box == {first.box_id, second.box_id}, "both boxes must have drained"
    for job_id in {job_id for _, _, job_id in claims}:
        job = first.get_job(job_id)
        assert (job.status, job.counts.completed) == ("finalizing", 100)
        recorded_by = {custom_id: box for custom_id, box, _ in claims}
        for item in first.job_items(job_id):
            assert item.result["request_id"] == recorded_by[item.custom_id] and item.attempts == 1


def test_jobs_take_turns_across_boxes_as_on_one(boxes):
    first, second = boxes(), boxes()
    a = started_job(first, "a1", "a2", "a3")
    b = started_job(second, "b1", "b2")
    order = []
    for box in (first, second, first, second, first):
        item = box.claim_next_item("m")
        order.append((item.job_id, item.custom_id))
        assert box.record_response(item.job_id, item.line, 200, "r", {})
    assert order == [(a.id, "a1"), (b.id, "b1"), (a.id, "a2"), (b.id, "b2"), (a.id, "a3")]


def test_each_box_claims_only_the_models_it_serves(boxes):
    box_a, box_b = boxes(), boxes()
    started_job(box_a, "a1", "a2", model="model-a")
    started_job(box_a, "b1", model="model-b")
    assert [cid for _, cid in drain(box_a, "model-a")] == ["a1", "a2"]
    assert box_a.claim_next_item("model-a") is None
    b1 = box_b.claim_next_item("model-b")
    assert b1.custom_id == "b1"
    # A claim reaps expired leases of its own model only: box_a's claim leaves box_b's item be.
    wait_past_lease()
    assert box_a.claim_next_item("model-a") is None
    assert box_a.get_job(b1.job_id).counts.running == 1
    assert box_b.record_response(b1.job_id, b1.line, 200, "r", {}) is True


def test_a_dead_box_s_item_runs_again_on_another_box_after_its_lease(url, boxes):
    dying, survivor = boxes(), boxes()
    job = started_job(dying, "a", "b")
    lost = dying.claim_next_item("m")  # then the box "dies": no renewal, no record
    other = survivor.claim_next_item("m")
    assert (lost.custom_id, other.custom_id) == ("a", "b")  # a live lease is not taken
    assert survivor.record_response(job.id, other.line, 200, "r", {})
    assert survivor.claim_next_item("m") is None
    assert survivor.recover_running() == 0  # still leased
    (holder,) = sql(url, "SELECT box FROM items WHERE state = 'running'")
    assert holder == (dying.box_id,)
    wait_past_lease()
    again = survivor.claim_next_item("m")
    assert (again.custom_id, again.line, again.attempt) == ("a", lost.line, 2)
    assert survivor.record_response(job.id, again.line, 200, "second run", {"n": 2}) is True
    # The dead box's late answer (it was only stuck) changes nothing.
    assert dying.record_response(job.id, lost.line, 200, "first run", {"n": 1}) is False
    items = survivor.job_items(job.id)
    assert [(i.custom_id, i.state, i.attempts) for i in items] == [("a", "done", 2), ("b", "done", 1)]
    assert items[0].result["request_id"] == "second run"
    assert survivor.get_job(job.id).status == "finalizing"


def test_a_renewed_lease_keeps_the_item_with_its_box(boxes):
    holder, other = boxes(), boxes()
    job = started_job(holder, "long")
    item = holder.claim_next_item("m")
    deadline = time.monotonic() + 3 * LEASE_S
    while time.monotonic() < deadline:  # the item runs three leases long, renewed meanwhile
        assert holder.renew_lease(job.id, item.line) is True
        assert other.claim_next_item("m") is None
        assert other.recover_running() == 0
        time.sleep(LEASE_S / 3)
    # Only the holder may renew, requeue or record it.
    assert other.renew_lease(job.id, item.line) is False
    assert other.requeue_item(job.id, item.line) is False
    assert other.record_response(job.id, item.line, 200, "not mine", {}) is False
    assert holder.record_response(job.id, item.line, 200, "mine", {}) is True
    assert holder.renew_lease(job.id, item.line) is False  # recorded: nothing to renew
    (recorded,) = holder.job_items(job.id)
    assert (recorded.result["request_id"], recorded.attempts) == ("mine", 1)


def test_a_lease_lost_to_another_box_cannot_be_renewed(boxes):
    slow, fast = boxes(), boxes()
    job = started_job(slow, "a")
    first = slow.claim_next_item("m")
    wait_past_lease()
    taken = fast.claim_next_item("m")
    assert taken.attempt == 2
    assert slow.renew_lease(job.id, first.line) is False  # the runner should stop the item
    assert slow.requeue_item(job.id, first.line) is False
    assert fast.renew_lease(job.id, taken.line) is True


def test_recovery_takes_back_expired_leases_only_and_of_every_model(boxes):
    alive, dead, recovering = boxes(lease_s=30), boxes(), boxes()
    started_job(alive, "live", model="x")
    started_job(dead, "d1", model="y")
    started_job(dead, "d2", model="z")
    live = alive.claim_next_item("x")
    dead.claim_next_item("y")
    dead.claim_next_item("z")
    assert recovering.recover_running() == 0
    wait_past_lease()
    assert recovering.recover_running() == 2  # y and z, not x: its box renews within 30 s
    assert recovering.recover_running() == 0
    assert [i.custom_id for i in (recovering.claim_next_item("y"), recovering.claim_next_item("z"))] == ["d1", "d2"]
    assert recovering.claim_next_item("x") is None
    assert alive.record_response(live.job_id, live.line, 200, "r", {}) is True


def test_an_item_whose_box_dies_at_every_run_fails_at_max_attempts(boxes):
    store = boxes(max_attempts=3)
    job = started_job(store, "poison", "fine")
    for attempt in (1, 2, 3):
        item = boxes().claim_next_item("m")  # a box that claims, then dies
        assert (item.custom_id, item.attempt) == ("poison", attempt)
        wait_past_lease()
    # The next claim reaps the third expired lease: the item fails, and "fine" runs.
    nxt = store.claim_next_item("m")
    assert nxt.custom_id == "fine"
    poison = store.job_items(job.id)[0]
    assert (poison.state, poison.attempts, poison.error["code"]) == ("failed", 3, "internal_error")
    assert "3 times" in poison.error["message"]
    assert store.record_response(job.id, nxt.line, 200, "r", {})
    assert store.get_job(job.id).status == "finalizing"


def test_recover_running_fails_expired_items_at_its_max_attempts(boxes):
    store = boxes()
    job = started_job(store, "a", "b")
    boxes().claim_next_item("m")
    boxes().claim_next_item("m")
    wait_past_lease()
    assert store.recover_running(max_attempts=1) == 0  # both had their one run
    assert [i.state for i in store.job_items(job.id)] == ["failed", "failed"]
    assert store.get_job(job.id).status == "finalizing"


def test_a_cancelled_job_whose_box_died_mid_item_still_finishes(boxes):
    dying, other = boxes(), boxes()
    job = started_job(dying, "a", "b")
    dying.claim_next_item("m")
    assert other.cancel_job(job.id).status == "cancelling"
    assert other.jobs_to_finish() == []  # its item runs, on a box that then dies
    wait_past_lease()
    assert other.claim_next_item("m") is None  # the claim reaps the item: cancelled, not pending
    assert [i.state for i in other.job_items(job.id)] == ["cancelled", "cancelled"]
    assert [j.id for j in other.jobs_to_finish()] == [job.id]
    assert other.finish_job(job.id, None, "file-err").status == "cancelled"


def test_an_expiring_job_whose_box_died_mid_item_still_finalizes(boxes):
    clock = Clock()
    dying, other = boxes(clock=clock), boxes(clock=clock)
    job = started_job(dying, "a", "b", window_s=3600)
    dying.claim_next_item("m")
    clock.now += 3600
    assert other.expire_due() == [job.id]
    assert other.get_job(job.id).status == "in_progress"  # until its running item settles
    wait_past_lease()
    assert other.recover_running() == 0
    assert [i.state for i in other.job_items(job.id)] == ["expired", "expired"]
    assert other.get_job(job.id).status == "finalizing"
    assert other.finish_job(job.id, None, "file-err").status == "expired"


def test_the_last_items_recorded_at_once_by_two_boxes_finalize_the_job(boxes):
    """Each box's transaction sees the other's item still running until it commits: the job's
    row lock makes the second one see the first, or the job would stay in_progress forever."""
    for _ in range(20):
        first, second = boxes(), boxes()
        job = started_job(first, "a", "b")
        one, two = first.claim_next_item("m"), second.claim_next_item("m")
        barrier = threading.Barrier(2)

        def record(box, item):
            barrier.wait()
            box.record_response(item.job_id, item.line, 200, "r", {})

        threads = [threading.Thread(target=record, args=pair) for pair in ((first, one), (second, two))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert first.get_job(job.id).status == "finalizing"
        first.close()
        second.close()


def test_two_boxes_finishing_one_job_at_once_finish_it_once(boxes):
    first, second = boxes(), boxes()
    job = started_job(first, "a")
    drain(first)
    assert [j.id for j in second.jobs_to_finish()] == [job.id]  # both boxes see it to finish
    outcomes: dict[str, str] = {}
    barrier = threading.Barrier(2)

    def finish(box, output):
        barrier.wait()
        try:
            outcomes[output] = box.finish_job(job.id, output, None).status
        except JobStateError:
            outcomes[output] = "refused"

    threads = [threading.Thread(target=finish, args=pair) for pair in ((first, "out-1"), (second, "out-2"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes.values()) == ["completed", "refused"]
    (winner,) = [output for output, status in outcomes.items() if status == "completed"]
    assert first.get_job(job.id).output_file_id == winner
    assert first.jobs_to_finish() == []


_BOX = """
import sys, time
from llm_service.jobs.postgres import PostgresJobStore
store = PostgresJobStore(sys.argv[1], lease_s=float(sys.argv[2]))
print("ready", store.box_id, flush=True)
while True:
    item = store.claim_next_item("m")
    if item is None:
        progress = store.model_progress().get("m")
        if progress is None:
            break  # nothing pending, nothing running anywhere: done
        time.sleep(0.05)  # items other boxes run, or whose dead box's lease has yet to expire
        continue
    print("claimed", item.line, item.attempt, flush=True)
    time.sleep(0.01)  # the item "runs"
    if store.record_response(item.job_id, item.line, 200, store.box_id, {"echo": item.body["prompt"]}):
        print("recorded", item.line, flush=True)
print("done", flush=True)
"""


def _box_process(url: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", _BOX, url, str(LEASE_S)], env=env,
                               stdout=subprocess.PIPE, text=True)
    word, box_id = process.stdout.readline().split()
    assert word == "ready"
    process.box_id = box_id
    return process


def _kill_while_running(box: subprocess.Popen, claims: int) -> str:
    """SIGKILL the box just after its `claims`-th claim, while that item "runs"; its output."""
    seen = []
    for line in box.stdout:
        seen.append(line)
        if line.startswith("claimed ") and sum(x.startswith("claimed ") for x in seen) == claims:
            box.send_signal(signal.SIGKILL)
            break
    box.wait(timeout=30)
    rest = box.stdout.read()
    box.stdout.close()
    return "".join(seen) + rest


def _lines_of(text: str, word: str) -> list[int]:
    return [int(line.split()[1]) for line in text.splitlines() if line.startswith(word + " ")]


def test_a_box_killed_mid_batch_has_its_items_finished_by_the_other_exactly_once(url, boxes):
    setup = boxes()
    job = started_job(setup, *[f"k{n}" for n in range(200)])
    killed, survivor = _box_process(url), _box_process(url)
    killed_out = _kill_while_running(killed, 40)
    survivor_out, _ = survivor.communicate(timeout=120)
    assert survivor.returncode == 0 and survivor_out.rstrip().endswith("done"), survivor_out[-500:]
    items = setup.job_items(job.id)
    assert all(i.state == "done" and i.result["body"] == {"echo": i.custom_id} for i in items)
    recorded_by_killed = set(_lines_of(killed_out, "recorded"))
    recorded_by_survivor = set(_lines_of(survivor_out, "recorded"))
    assert recorded_by_killed and recorded_by_survivor, "the kill must land mid-batch"
    assert not recorded_by_killed & recorded_by_survivor  # no item recorded twice
    for item in items:  # each result is its recorder's: none was written over
        if item.line in recorded_by_killed:
            assert item.result["request_id"] == killed.box_id
        if item.line in recorded_by_survivor:
            assert item.result["request_id"] == survivor.box_id
    # What the killed box held when it died was run again, by the survivor, after the lease.
    orphaned = set(_lines_of(killed_out, "claimed")) - recorded_by_killed
    rerun = {i.line for i in items if i.attempts == 2}
    assert orphaned and orphaned <= rerun | {i.line for i in items if i.result["request_id"] == killed.box_id}
    assert rerun <= set(_lines_of(survivor_out, "claimed"))
    assert all(i.result["request_id"] == survivor.box_id for i in items if i.line in rerun)
    assert setup.get_job(job.id).status == "finalizing"


def test_boxes_killed_again_and_again_end_with_each_result_once(url, boxes):
    setup = boxes()
    job = started_job(setup, *[f"k{n}" for n in range(150)])
    recorded: list[int] = []
    for claims in (20, 35, 25):
        box = _box_process(url)
        recorded += _lines_of(_kill_while_running(box, claims), "recorded")
    assert 0 < setup.get_job(job.id).counts.completed < 150, "the kills must land mid-batch"
    # Each box died holding an item; those whose lease had not yet run out when the next box
    # claimed are still running, the third's at least.
    assert 1 <= setup.get_job(job.id).counts.running <= 3
    wait_past_lease()
    final = boxes()
    drained = drain(final)
    assert len(recorded) == len(set(recorded))
    assert not {cid for _, cid in drained} & {f"k{line - 1}" for line in recorded}
    items = final.job_items(job.id)
    assert [i.custom_id for i in items] == [f"k{n}" for n in range(150)]
    assert all(i.state == "done" and i.result["body"] == {"echo": i.custom_id} for i in items)
    assert max(i.attempts for i in items) >= 2
    assert final.get_job(job.id).status == "finalizing"


# -- when the server fails -------------------------------------------------------------------


@pytest.fixture
def own_cluster():
    """A server of the test's own, to stop, freeze or fill."""
    one = PostgresCluster()
    try:
        one.start()
        yield one
    finally:
        if one.process is not None:
            try:
                os.kill(one.process.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        one.remove()


def test_a_stopped_server_is_store_unavailable_at_once_and_a_restarted_one_serves_again(own_cluster):
    url = own_cluster.create_database()
    store = PostgresJobStore(url, connect_timeout_s=2, statement_timeout_s=5)
    job = started_job(store, "a")
    own_cluster.stop()
    for _ in range(2):  # the broken connection, then a refused one
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match="cannot be reached") as raised:
            store.get_job(job.id)
        assert time.monotonic() - began < 5
        assert "postgresql://" in str(raised.value)
    with pytest.raises(StoreUnavailable):
        PostgresJobStore(url, connect_timeout_s=2)
    own_cluster.start()
    assert store.get_job(job.id).counts.pending == 1  # connects again by itself
    assert store.claim_next_item("m").custom_id == "a"
    store.close()


def test_a_session_the_server_ended_while_idle_is_replaced_without_an_error(url, boxes):
    store = boxes()
    job = started_job(store, "a")
    for _ in range(2):
        (ended,) = sql(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name = %s", (f"axm1-llm jobs {store.box_id}"[:63],))
        assert ended == (True,)
        time.sleep(0.2)
        assert store.get_job(job.id).counts.pending == 1
    item = store.claim_next_item("m")
    sql(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        (f"axm1-llm jobs {store.box_id}"[:63],))
    time.sleep(0.2)
    assert store.record_response(job.id, item.line, 200, "r", {}) is True


def test_a_frozen_server_is_store_unavailable_after_the_timeouts_not_a_hang(own_cluster):
    url = own_cluster.create_database()
    store = PostgresJobStore(url, connect_timeout_s=2, statement_timeout_s=2)
    started_job(store, "a")
    # Rows locked by another session: the statement gives up after statement_timeout_s.
    with psycopg.connect(url, connect_timeout=10) as blocker:
        blocker.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match="timed out"):
            store.claim_next_item("m")
        assert 1.5 < time.monotonic() - began < 10
    assert store.claim_next_item("m").custom_id == "a"
    store.close()
    # A server that accepts no session (stopped with SIGSTOP): connecting gives up.
    os.kill(own_cluster.process.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match="cannot be reached"):
            PostgresJobStore(url, connect_timeout_s=2)
        assert time.monotonic() - began < 10
    finally:
        os.kill(own_cluster.process.pid, signal.SIGCONT)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs for the tablespace (root only)")
def test_a_full_disk_is_store_full_and_keeps_what_was_stored(own_cluster):
    mount = own_cluster.folder / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    try:
        os.chown(mount, *(lambda e: (e.pw_uid, e.pw_gid))(__import__("pwd").getpwnam("postgres")))
        url = own_cluster.create_database()
        dbname = url.split("/")[3].split("?")[0]
        sql(own_cluster.url(), f"CREATE TABLESPACE small LOCATION '{mount}'")
        sql(own_cluster.url(), f'ALTER DATABASE "{dbname}" SET default_tablespace = small')
        store = PostgresJobStore(url, max_file_bytes=64 * 1024 * 1024)
        job = started_job(store, "a")
        kept = store.add_file("batch", "kept.jsonl", b"{}\n")
        noise = os.urandom(256 * 1024)  # incompressible: TOAST cannot squeeze it in
        with pytest.raises(StoreFull, match="full"):
            for _ in range(40):
                store.add_file("batch", "big.jsonl", [noise] * 4)
        # What was stored can still be read. A claim writes row versions: it may need space too.
        assert store.get_job(job.id).counts.pending == 1
        assert store.file_bytes(kept.id) == b"{}\n"
        try:
            claimed = store.claim_next_item("m")
        except StoreFull:
            claimed = None
        subprocess.run(["mount", "-o", "remount,size=32m", str(mount)], check=True)  # space freed
        claimed = claimed or store.claim_next_item("m")
        assert claimed.custom_id == "a"
        assert store.add_file("batch", "after.jsonl", noise).bytes == len(noise)
        store.close()
        sql(own_cluster.url(), f'DROP DATABASE "{dbname}"')
        sql(own_cluster.url(), "DROP TABLESPACE small")
    finally:
        own_cluster.stop()
        subprocess.run(["umount", str(mount)], check=False)


# -- choosing the store ----------------------------------------------------------------------


def test_open_job_store_is_sqlite_by_default_and_postgres_for_a_postgresql_url(tmp_path, url):
    from llm_service.settings import DaemonSettings

    sqlite = open_job_store(tmp_path)
    assert isinstance(sqlite, SqliteJobStore) and sqlite.directory == tmp_path / "jobs"
    sqlite.close()
    settings = DaemonSettings(data_dir=tmp_path, jobs_url=url, jobs_lease_s=7)
    shared = open_job_store(settings)
    assert isinstance(shared, PostgresJobStore) and shared.lease_s == 7
    shared.close()
    shared = open_job_store(settings, lease_s=5)
    assert shared.lease_s == 5
    shared.close()
    shared = open_job_store(tmp_path, url)
    assert shared.lease_s == 60  # the default lease
    shared.close()
    sqlite_lease = open_job_store(settings, jobs_url="")
    assert isinstance(sqlite_lease, SqliteJobStore) and sqlite_lease.lease_s is None
    sqlite_lease.close()
    from_settings = open_job_store(DaemonSettings(data_dir=tmp_path))
    assert isinstance(from_settings, SqliteJobStore)
    from_settings.close()
    with pytest.raises(ValueError, match="postgresql://"):
        open_job_store(tmp_path, "mysql://x/y")
    with pytest.raises(ValueError, match="postgresql://"):
        DaemonSettings(jobs_url="sqlite:///x")
    assert DaemonSettings(jobs_url="").jobs_url is None


def test_the_daemon_does_not_import_psycopg_without_a_postgres_url(tmp_path):
    check = (
        "import sys\n"
        "from pathlib import Path\n"
        "import llm_service.app, llm_service.cli\n"
        "from llm_service.jobs.store import open_job_store\n"
        f"open_job_store(Path({str(tmp_path)!r})).close()\n"
        "print('psycopg' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", check], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_messages_do_not_show_the_password():
    assert postgres_module.describe_url("postgresql://jobs:s3cret@db.example:5433/queue") == (
        "postgresql://jobs@db.example:5433/queue")
    with pytest.raises(StoreUnavailable) as raised:
        PostgresJobStore("postgresql://jobs:s3cret@127.0.0.1:1/queue", connect_timeout_s=1)
    assert "s3cret" not in str(raised.value) and "127.0.0.1:1" in str(raised.value)
