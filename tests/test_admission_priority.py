"""AdmissionQueue's two priorities, in-process: interactive requests always go first, a job
item gets a slot only when no interactive request waits, and a job item never preempts."""
from __future__ import annotations

import anyio
import pytest

from llm_service.admission import INTERACTIVE, JOB, AdmissionQueue
from llm_service.engines.base import QueueFull

pytestmark = pytest.mark.anyio


async def _hold(queue: AdmissionQueue, name: str, priority: str, order: list[str],
                release: anyio.Event | None = None) -> None:
    async with queue.slot(name, priority=priority):
        order.append(name)
        if release is not None:
            await release.wait()


async def _settle() -> None:
    for _ in range(10):
        await anyio.sleep(0)


async def test_a_job_item_takes_a_free_slot_at_once():
    queue = AdmissionQueue(max_queue=4)
    async with queue.slot("job-1", priority=JOB) as waited:
        assert waited == pytest.approx(0, abs=0.05)
        assert queue.running == 1


async def test_interactive_requests_go_before_job_items_that_came_first():
    queue = AdmissionQueue(max_queue=8)
    order: list[str] = []
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hold, queue, "first", INTERACTIVE, order, release)
        await _settle()
        tg.start_soon(_hold, queue, "job-a", JOB, order)
        await _settle()
        tg.start_soon(_hold, queue, "job-b", JOB, order)
        await _settle()
        tg.start_soon(_hold, queue, "chat-1", INTERACTIVE, order)
        await _settle()
        tg.start_soon(_hold, queue, "chat-2", INTERACTIVE, order)
        await _settle()
        assert queue.queue_length == 2 and queue.job_queue_length == 2
        assert queue.snapshot()["jobs_waiting"] == 2
        release.set()
    assert order == ["first", "chat-1", "chat-2", "job-a", "job-b"]


async def test_a_running_job_item_is_not_preempted():
    queue = AdmissionQueue(max_queue=8)
    order: list[str] = []
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hold, queue, "job-a", JOB, order, release)
        await _settle()
        tg.start_soon(_hold, queue, "job-b", JOB, order)
        await _settle()
        tg.start_soon(_hold, queue, "chat", INTERACTIVE, order)
        await _settle()
        # The job item keeps its slot; the interactive request waits for it, then goes first.
        assert order == ["job-a"] and queue.running == 1
        assert queue.queue_length == 1 and queue.job_queue_length == 1
        release.set()
    assert order == ["job-a", "chat", "job-b"]


async def test_a_job_item_waits_while_interactive_requests_keep_coming():
    queue = AdmissionQueue(max_queue=8, concurrency=2)
    order: list[str] = []
    gates = {name: anyio.Event() for name in ("c1", "c2", "c3")}
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hold, queue, "c1", INTERACTIVE, order, gates["c1"])
        tg.start_soon(_hold, queue, "c2", INTERACTIVE, order, gates["c2"])
        await _settle()
        tg.start_soon(_hold, queue, "job", JOB, order)
        await _settle()
        tg.start_soon(_hold, queue, "c3", INTERACTIVE, order, gates["c3"])
        await _settle()
        gates["c1"].set()  # one slot frees: the interactive request that waits takes it
        await _settle()
        assert order == ["c1", "c2", "c3"]
        gates["c2"].set()  # the next slot: no interactive request waits, the job item goes
        await _settle()
        assert order == ["c1", "c2", "c3", "job"]
        gates["c3"].set()


async def test_job_items_do_not_count_against_the_queue_limit():
    queue = AdmissionQueue(max_queue=1)
    order: list[str] = []
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hold, queue, "running", INTERACTIVE, order, release)
        await _settle()
        tg.start_soon(_hold, queue, "job", JOB, order)
        tg.start_soon(_hold, queue, "chat", INTERACTIVE, order)
        await _settle()
        with pytest.raises(QueueFull):
            async with queue.slot("one-too-many"):
                pass
        release.set()
    assert order == ["running", "chat", "job"]


async def test_a_cancelled_job_waiter_leaves_the_queue():
    queue = AdmissionQueue(max_queue=4)
    order: list[str] = []
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hold, queue, "running", INTERACTIVE, order, release)
        await _settle()
        scope = anyio.CancelScope()
        tg.start_soon(_hold, queue, "late", INTERACTIVE, order)

        async def job_waiter():
            with scope:
                async with queue.slot("job", priority=JOB):
                    order.append("job")
        tg.start_soon(job_waiter)
        await _settle()
        assert queue.job_queue_length == 1
        scope.cancel()
        await _settle()
        assert queue.job_queue_length == 0
        release.set()
    assert order == ["running", "late"]
    assert queue.idle


async def test_an_unknown_priority_is_refused():
    queue = AdmissionQueue(max_queue=4)
    with pytest.raises(ValueError):
        async with queue.slot("x", priority="urgent"):
            pass
