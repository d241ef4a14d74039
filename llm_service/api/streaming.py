"""Request plumbing shared by the Ollama and OpenAI routes: ids, first-item prefetch, disconnects.

Errors must carry a status code when they happen before the first byte (404, 503 queue full, a
model that failed to load), so the first item of an answer is fetched before the response starts.
A client that goes away — while queued, loading or generating — cancels its request.
"""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from starlette.requests import Request

from ..engines.base import Chunk, EngineError
from ..logging_setup import request_id_var

T = TypeVar("T")


def new_request_id() -> str:
    """A fresh request id, also made the id every log line of this request carries."""
    request_id = uuid.uuid4().hex[:16]
    request_id_var.set(request_id)
    return request_id


async def until_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
    """Run `work` unless the client disconnects first. Returns (completed, result)."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            # The body has been read: the next message on the channel can only be the disconnect.
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    tg.cancel_scope.cancel()
                    return

        async def run() -> None:
            try:
                outcome.append(await work())
            except Exception as exc:  # re-raised below as itself, not inside an exception group
                failure.append(exc)
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        tg.start_soon(run)
    if failure:
        raise failure[0]
    return (True, outcome[0]) if outcome else (False, None)


class PrefetchedStream:
    """An answer stream whose first item is already known (or that ended with nothing)."""

    def __init__(self, stream: AsyncIterator[Any]) -> None:
        self._stream = stream
        self.first: Any = None
        self.exhausted = False

    async def prefetch(self) -> None:
        try:
            self.first = await self._stream.__anext__()
        except StopAsyncIteration:
            self.exhausted = True

    async def items(self) -> AsyncIterator[Any]:
        try:
            if self.exhausted:
                return
            yield self.first
            async for item in self._stream:
                yield item
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._stream.aclose()  # type: ignore[attr-defined]


async def collect(answer: PrefetchedStream, whole: Callable[[Any, str, str], T]) -> T:
    """A non-streaming answer: `whole(final_record, content, thinking)` of the gathered chunks."""
    content: list[str] = []
    thinking: list[str] = []
    async for item in answer.items():
        if isinstance(item, Chunk):
            content.append(item.content)
            thinking.append(item.thinking)
        else:
            return whole(item, "".join(content), "".join(thinking))
    raise EngineError("the answer ended without its final record")


async def open_stream(request: Request, stream: AsyncIterator[Any]) -> PrefetchedStream | None:
    """Prefetch the first item while watching for a disconnect. None when the client left."""
    prefetched = PrefetchedStream(stream)
    try:
        completed, _ = await until_disconnect(request, prefetched.prefetch)
    except BaseException:
        await prefetched.aclose()
        raise
    if not completed:
        await prefetched.aclose()
        return None
    return prefetched
