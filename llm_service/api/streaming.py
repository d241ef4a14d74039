"""Request plumbing shared by the Ollama and OpenAI routes: ids, first-item prefetch, disconnects,
and the deadline of a streamed answer.

Errors must carry a status code when they happen before the first byte (404, 503 queue full, a
model that failed to load), so the first item of an answer is fetched before the response starts.
A client that goes away — while queued, loading or generating — cancels its request. The
request's deadline is enforced here, once per request, around whole coroutines: never a timer
per chunk.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..engines.base import EngineError, RequestTimedOut
from ..logging_setup import request_id_var

T = TypeVar("T")

CLIENT_GONE = 499  # nginx's convention for a client that closed the connection first


def new_request_id() -> str:
    """A fresh request id, also made the id every log line of this request carries."""
    request_id = uuid.uuid4().hex[:16]
    request_id_var.set(request_id)
    return request_id


def deadline_error() -> RequestTimedOut:
    return RequestTimedOut("request did not finish within its deadline")


async def until_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
    """Run `work` unless the client disconnects first. Returns (completed, result).

    `work` runs in this task; only the watcher is a child task (one spawn per request, not two).
    """
    gone = False
    failure: Exception | None = None
    result: T | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal gone
            # The body has been read: the next message on the channel can only be the disconnect.
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    gone = True
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch)
        try:
            result = await work()
        except Exception as exc:  # re-raised below as itself, not inside an exception group
            failure = exc
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if gone:
        return False, None
    return True, result


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


class StreamingAnswer(StreamingResponse):
    """A streamed answer: its first item is fetched before the response starts, so that an error
    up to then (404, 503 queue full, a model that failed to load, the deadline) is an ordinary
    error response with its status code, raised to the exception handlers. A client that leaves
    first cancels the request. After the first byte, the deadline ends the answer with one last
    error item.

    The deadline wraps the whole body in one cancel scope, here in a plain coroutine: a scope
    inside the body's async generators would span their `yield`s, which anyio forbids.
    """

    def __init__(
        self,
        items: AsyncIterator[Any],
        render: Callable[[PrefetchedStream], AsyncIterator[bytes]],
        *,
        deadline: float,
        error_item: Callable[[EngineError], bytes],
        media_type: str,
        headers: dict[str, str],
    ) -> None:
        self._answer = PrefetchedStream(items)
        super().__init__(render(self._answer), media_type=media_type, headers=headers)
        self._deadline = deadline
        self._error_item = error_item

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One task group for the whole answer: the first item is awaited and the answer written
        from this task while a child task watches for the disconnect (Starlette does it the other
        way round), so the first item goes out without waiting for a task switch."""
        gone = False
        failure: Exception | None = None
        self._started = False
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                nonlocal gone
                # The body has been read: the next message on the channel can only be the disconnect.
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone = True
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                await self._prefetch()
            except Exception as exc:  # re-raised below as itself, not inside an exception group
                failure = exc
            else:
                await self.stream_response(send)
            tg.cancel_scope.cancel()
        if failure is not None:
            await self._answer.aclose()
            raise failure
        if gone:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
                await self._answer.aclose()
                if not self._started:  # nobody reads it; it records the request as abandoned
                    await send({"type": "http.response.start", "status": CLIENT_GONE, "headers": []})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _prefetch(self) -> None:
        try:
            with anyio.fail_after(max(0.0, self._deadline - time.monotonic())):
                await self._answer.prefetch()
        except TimeoutError:
            raise deadline_error() from None

    async def stream_response(self, send: Send) -> None:
        self._started = True
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        with anyio.move_on_after(max(0.0, self._deadline - time.monotonic())) as scope:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if scope.cancelled_caught:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await send({"type": "http.response.body", "body": self._error_item(deadline_error()), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
