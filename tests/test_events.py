"""Live events (issue 17, section 1): the bus as pure logic, then `/api/events` on a real daemon
with a scripted card model: a load's transitions and progress, requests with their token counts,
queue changes, filters, resume with Last-Event-ID, the gap when it is too old, heartbeats."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import anyio
import openai
import httpx
import pytest

from harness.daemon import running_daemon
from harness.models import scripted_model
from llm_service.events import EventBus, parse_last_event_id, sse_frame, sse_gap

MODEL = "scripted-events"


# ---- the bus ----------------------------------------------------------------------------------

def test_ids_increase_and_filters_apply() -> None:
    bus = EventBus(size=10, clock=lambda: 0.0)
    bus.publish("state", "a", to="starting")
    bus.publish("request", "b", phase="queued")
    bus.publish("state", "b", to="ready")
    events, missed = bus.read(0)
    assert [e.id for e in events] == [1, 2, 3] and not missed
    assert [e.id for e in bus.read(0, model="b")[0]] == [2, 3]
    assert [e.id for e in bus.read(0, types={"state"})[0]] == [1, 3]
    assert [e.id for e in bus.read(2)[0]] == [3]
    assert bus.read(3) == ([], False)


def test_a_reader_behind_the_ring_is_told_it_missed_events() -> None:
    bus = EventBus(size=3)
    for i in range(5):
        bus.publish("queue", "a", waiting=i)
    events, missed = bus.read(1)  # 2 has left the ring: ids 3, 4, 5 remain
    assert missed and [e.id for e in events] == [3, 4, 5] and bus.oldest_id == 3
    assert bus.read(2) == (events, False)  # 2 was read: nothing was missed


def test_frames_are_server_sent_events() -> None:
    bus = EventBus(clock=lambda: 1_700_000_000.0)
    frame = sse_frame(bus.publish("state", "m", to="ready", reason="loaded")).decode()
    head, data = frame.split("data: ")
    assert head == "id: 1\nevent: state\n" and frame.endswith("\n\n")
    assert json.loads(data) == {"id": 1, "type": "state", "model": "m", "at": "2023-11-14T22:13:20Z",
                                "to": "ready", "reason": "loaded"}
    assert sse_gap(4, 9) == b'event: gap\ndata: {"after": 4, "oldest_kept": 9}\n\n'
    assert parse_last_event_id(" 12 ") == 12
    assert parse_last_event_id("abc") is None and parse_last_event_id(None) is None


@pytest.mark.anyio
async def test_waiters_wake_on_publish_and_time_out_otherwise() -> None:
    bus = EventBus()
    assert await bus.wait_after(0, 0.01) is False
    async with anyio.create_task_group() as tg:
        async def publish_soon() -> None:
            await anyio.sleep(0.05)
            bus.publish("state", "m")
        tg.start_soon(publish_soon)
        started = time.monotonic()
        assert await bus.wait_after(0, 5) is True
        assert time.monotonic() - started < 2
    assert await bus.wait_after(0, 5) is True  # already there: no wait


# ---- on the daemon ------------------------------------------------------------------------------

class EventReader:
    """Reads /api/events in a thread into a list of (event type, data) and comments."""

    def __init__(self, base_url: str, query: str = "", headers: dict[str, str] | None = None) -> None:
        self.events: list[tuple[str, dict]] = []
        self.comments: list[str] = []
        self.status: int | None = None
        self._stop = threading.Event()
        self._url = f"{base_url}/api/events{query}"
        self._headers = headers or {}
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._opened = threading.Event()

    def __enter__(self) -> EventReader:
        self._thread.start()
        assert self._opened.wait(10), "the event stream did not open"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _read(self) -> None:
        with httpx.stream("GET", self._url, headers=self._headers, timeout=httpx.Timeout(30, read=None)) as r:
            self.status = r.status_code
            kind = "message"
            for line in r.iter_lines():
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    self._opened.set()
                elif line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    self.events.append((kind, json.loads(line[6:])))
                if self._stop.is_set():
                    return

    def wait_for(self, predicate, timeout: float = 30.0) -> tuple[str, dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in list(self.events):
                if predicate(*event):
                    return event
            time.sleep(0.02)
        raise AssertionError(f"no such event in {self.events}")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("events")
    entry = scripted_model(root, MODEL, reply_words=6, tokens_per_second=20,
                           fields={"run_on_startup": "false"})
    with running_daemon(root, [entry], "--events-kept", "40", "--events-heartbeat-s", "0.3") as d:
        yield d


def test_a_load_shows_its_transitions_and_progress(daemon) -> None:
    with EventReader(daemon.url, f"?model={MODEL}") as reader:
        with daemon.client() as client:
            assert client.post(f"/api/models/{MODEL}/load").status_code == 200
        reader.wait_for(lambda kind, data: kind == "state" and data["to"] == "ready")
    states = [(d["from"], d["to"]) for kind, d in reader.events if kind == "state"]
    assert states == [("stopped", "waiting_for_tokenizer"), ("waiting_for_tokenizer", "starting"),
                      ("starting", "initializing"), ("initializing", "ready")]
    assert all(d["reason"] for kind, d in reader.events if kind == "state")
    percents = [d["percent"] for kind, d in reader.events if kind == "progress"]
    assert percents and percents == sorted(percents) and all(0 <= p <= 100 for p in percents)
    assert {d["model"] for _, d in reader.events} == {MODEL}


def test_requests_and_the_queue(daemon) -> None:
    with EventReader(daemon.url, "?types=request,queue") as reader:
        results = []

        def ask(i: int) -> None:
            with daemon.client() as client:
                results.append(client.post("/api/generate", json={"model": MODEL, "prompt": f"hello {i}",
                                                                   "stream": False}).json())
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        finished = [d for kind, d in reader.events if kind == "request" and d["phase"] == "finished"]
        deadline = time.monotonic() + 10
        while len(finished) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            finished = [d for kind, d in reader.events if kind == "request" and d["phase"] == "finished"]
    assert len(results) == 2
    assert sorted(d["completion_tokens"] for d in finished) == sorted(r["eval_count"] for r in results)
    assert all(d["reason"] == "stop" and d["tokens_per_second"] > 0 for d in finished)
    phases = [d["phase"] for kind, d in reader.events if kind == "request"]
    assert phases.count("queued") == 2 and phases.count("started") == 2
    queue = [(d["waiting"], d["running"]) for kind, d in reader.events if kind == "queue"]
    assert (1, 1) in queue, queue  # the second request waited while the first ran
    assert queue[-1] == (0, 0)
    assert {kind for kind, _ in reader.events} == {"request", "queue"}


def test_resume_with_last_event_id_and_the_gap(daemon) -> None:
    with EventReader(daemon.url) as reader:
        with daemon.client() as client:
            client.post("/api/generate", json={"model": MODEL, "prompt": "one", "stream": False})
        first = reader.wait_for(lambda kind, data: kind == "request" and data["phase"] == "finished")
    # Resume just before that event: it comes again, and nothing before it.
    with EventReader(daemon.url, headers={"Last-Event-ID": str(first[1]["id"] - 1)}) as again:
        resumed = again.wait_for(lambda kind, data: kind == "request")
    assert resumed[1] == first[1]
    assert all(d["id"] >= first[1]["id"] for kind, d in again.events if kind != "gap")
    # 40 events are kept: after some more requests, id 1 is long gone.
    with daemon.client() as client:
        for i in range(8):
            client.post("/api/generate", json={"model": MODEL, "prompt": f"more {i}", "stream": False})
    with EventReader(daemon.url, headers={"Last-Event-ID": "1"}) as old:
        kind, data = old.wait_for(lambda kind, data: kind == "gap")
    assert data["after"] == 1 and data["oldest_kept"] > 2
    assert old.events[0][0] == "gap"


def test_heartbeats_and_bad_filters(daemon) -> None:
    with EventReader(daemon.url, "?types=job") as reader:
        time.sleep(1.0)
    assert reader.comments.count("keep-alive") >= 2 and reader.events == []
    with daemon.client() as client:
        r = client.get("/api/events", params={"types": "state,nonsense"})
        assert r.status_code == 400 and "nonsense" in r.text
        assert client.get("/api/events", params={"model": "no-such-model"}).status_code == 404


# ---- status lines in a generation stream (opt-in) -----------------------------------------------

def stream_lines(daemon, path: str, body: dict) -> list[dict]:
    with daemon.client() as client, client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line) for line in r.iter_lines() if line.strip()]


def test_a_stream_can_carry_status_lines_through_a_load(daemon) -> None:
    with daemon.client() as client:
        assert client.post(f"/api/models/{MODEL}/unload").status_code == 200
    lines = stream_lines(daemon, "/api/chat", {"model": MODEL, "status_events": True,
                                              "messages": [{"role": "user", "content": "status please"}]})
    statuses = [line["status"] for line in lines if "status" in line]
    assert statuses[0] == "loading" and statuses[-3:] == ["loaded", "generating", "done"], statuses
    progress = [line["progress"]["percent"] for line in lines if line.get("status") == "loading" and "progress" in line]
    assert progress and progress == sorted(progress) and progress[-1] == 100
    loaded = next(line for line in lines if line.get("status") == "loaded")
    assert loaded["status_message"] == "Model loaded on npu" and loaded["load_duration"] > 0
    # The answer's own lines are exactly the usual ones, between "generating" and "done".
    first_answer = next(i for i, line in enumerate(lines) if "message" in line)
    assert lines[first_answer - 1]["status"] == "generating"
    assert all("status" not in line for line in lines[first_answer:-2])
    assert lines[-2]["status"] == "done" and lines[-1]["done"] is True and "status" not in lines[-1]
    text = "".join(line["message"]["content"] for line in lines if "message" in line)
    assert text.startswith("You said: status please.")
    assert all(line["done"] is False for line in lines if "status" in line)


def test_status_lines_on_a_loaded_model_and_while_queued(daemon) -> None:
    results: dict[int, list[dict]] = {}

    def ask(i: int) -> None:
        results[i] = stream_lines(daemon, "/api/generate", {"model": MODEL, "prompt": f"queued {i}",
                                                             "status_events": True})
    first = threading.Thread(target=ask, args=(0,))
    first.start()
    time.sleep(0.15)  # the first is answering (6 words at 20 tokens/s)
    ask(1)
    first.join(30)
    assert [line["status"] for line in results[0] if "status" in line] == ["generating", "done"]
    second = [line for line in results[1] if "status" in line]
    assert [line["status"] for line in second] == ["queued", "generating", "done"], second
    assert second[0]["ahead"] == 1
    # Without the opt-in, not one status line.
    plain = stream_lines(daemon, "/api/generate", {"model": MODEL, "prompt": "plain"})
    assert all("status" not in line for line in plain)


def test_status_lines_need_a_stream_and_no_format(daemon) -> None:
    with daemon.client() as client:
        r = client.post("/api/generate", json={"model": MODEL, "prompt": "x", "stream": False, "status_events": True})
        assert r.status_code == 400 and "stream" in r.json()["error"]
        r = client.post("/api/generate", json={"model": MODEL, "prompt": "x", "format": "json", "status_events": True})
        assert r.status_code == 400 and "format" in r.json()["error"]


def test_a_batch_shows_its_progress(daemon) -> None:
    lines = [json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": MODEL, "messages": [{"role": "user", "content": f"item {i}"}]}})
             for i in range(3)]
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="none")
    with EventReader(daemon.url, "?types=job") as reader:
        upload = client.files.create(file=("items.jsonl", "\n".join(lines).encode()), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        reader.wait_for(lambda kind, data: data.get("status") == "completed")
    mine = [d for _, d in reader.events if d["job_id"] == batch.id]
    assert mine[0]["status"] == "in_progress" and mine[0]["total"] == 3
    assert sorted(d["line"] for d in mine if "item" in d) == [1, 2, 3]
    assert all(d["item"] == "completed" for d in mine if "item" in d)
    assert mine[-1] | {"at": None, "id": None} == {"job_id": batch.id, "status": "completed", "total": 3, "completed": 3,
                                                   "failed": 0, "type": "job", "model": MODEL, "at": None, "id": None}
