"""Per-model admission: a bounded FIFO queue in front of N slots, in two priorities.

A card runner takes one request at a time (N = 1); an HTTP upstream may take more. Interactive
requests (every API route) are served strictly in arrival order, and always before job items
(the batch runner's, priority JOB): a job item gets a slot only when it is free and no
interactive request waits, and one that holds a slot is never preempted, so an interactive
request waits at most for the item in progress. A waiter that is cancelled (its client went
away) or whose deadline passes leaves the queue without touching the request that is running.
Only interactive waiters count against `max_queue`: the job runner sends one item at a time.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from .engines.base import QueueFull, RequestTimedOut

INTERACTIVE = "interactive"
JOB = "job"
PRIORITIES = (INTERACTIVE, JOB)


@dataclass(slots=True, eq=False)
class _Waiter:
    request_id: str
    arrived_at: float
    granted: anyio.Event = field(default_factory=anyio.Event)


class AdmissionQueue:
    def __init__(self, max_queue: int, concurrency: int = 1, clock=time.monotonic) -> None:
        self.max_queue = max_queue
        self.concurrency = max(1, concurrency)
        self._clock = clock
        self._waiters: deque[_Waiter] = deque()  # interactive, in arrival order
        self._job_waiters: deque[_Waiter] = deque()  # job items, served when none above waits
        self._running: dict[str, float] = {}  # request id -> when it got its slot

    @property
    def queue_length(self) -> int:
        """Interactive requests waiting (what queue_size bounds)."""
        return len(self._waiters)

    @property
    def job_queue_length(self) -> int:
        return len(self._job_waiters)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def idle(self) -> bool:
        return not self._waiters and not self._job_waiters and not self._running

    def snapshot(self) -> dict:
        now = self._clock()
        return {
            "length": len(self._waiters),
            "running": len(self._running),
            "max": self.max_queue,
            "concurrency": self.concurrency,
            "waiting": [
                {"id": w.request_id, "position": i + 1, "age_s": round(now - w.arrived_at, 3)}
                for i, w in enumerate(self._waiters)
            ],
            "jobs_waiting": len(self._job_waiters),
        }

    @asynccontextmanager
    async def slot(self, request_id: str, deadline: float | None = None,
                   priority: str = INTERACTIVE) -> AsyncIterator[float]:
        """Hold a slot for the body of the `async with`; yields the seconds waited.

        Raises QueueFull when the queue is full, RequestTimedOut when `deadline` (monotonic)
        passes in the queue."""
        if priority not in PRIORITIES:
            raise ValueError(f"unknown priority {priority!r}")
        arrived = self._clock()
        try:
            with anyio.fail_after(None if deadline is None else max(0.0, deadline - time.monotonic())):
                await self._acquire(request_id, arrived, priority == JOB)
        except TimeoutError:
            raise RequestTimedOut(
                f"request waited {self._clock() - arrived:.0f}s in the queue and reached its deadline"
            ) from None
        try:
            yield self._clock() - arrived
        finally:
            self._release(request_id)

    async def _acquire(self, request_id: str, arrived: float, job: bool) -> None:
        free = len(self._running) < self.concurrency
        if free and not self._waiters and not (job and self._job_waiters):
            self._running[request_id] = arrived
            return
        if not job and len(self._waiters) >= self.max_queue:
            raise QueueFull()
        waiter = _Waiter(request_id, arrived)
        queue = self._job_waiters if job else self._waiters
        queue.append(waiter)
        try:
            await waiter.granted.wait()
        except BaseException:
            if waiter.granted.is_set():
                # The slot was handed to us just as we were cancelled: pass it on.
                self._release(request_id)
            else:
                queue.remove(waiter)
            raise

    def _release(self, request_id: str) -> None:
        self._running.pop(request_id, None)
        while len(self._running) < self.concurrency and (self._waiters or self._job_waiters):
            # Interactive requests first; a job item only when none waits.
            waiter = (self._waiters or self._job_waiters).popleft()
            self._running[waiter.request_id] = self._clock()
            waiter.granted.set()
