"""uvicorn's HTTP protocol with the limits a small box needs against idle, slow and huge requests.

uvicorn (with httptools) bounds neither a request's headers nor the time they take, nor the
number of connections: idle connections can use up the file descriptors (then `accept()` fails in
a loop, a runner restart fails for want of a pipe, and everyone is locked out). This protocol:

- refuses a connection beyond `max_connections` at once with 503 (kept below the fd limit, so
  the daemon always has descriptors for runners, pipes and files);
- gives a request `header_timeout_s` to send its headers (from the connection, or from the end of
  the previous answer) and `body_timeout_s` for its body, else closes it with 408;
- answers 431 to more than `max_headers` headers or `max_header_bytes` of request line + headers.

Keep-alive idleness is uvicorn's own `timeout_keep_alive`.
"""
from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("llm_service.server")

# Descriptors kept free for what is not a client connection: runners' pipes, tokenizer and
# upstream connections, metric files, the descriptor.
FD_RESERVE = 128


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    header_timeout_s: float
    body_timeout_s: float
    max_headers: int
    max_header_bytes: int


def default_max_connections() -> int:
    """Below the soft limit of open files, with a reserve for everything else."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(16, min(4096, soft - FD_RESERVE))


def _response(status: str, message: str, extra: bytes = b"") -> bytes:
    body = message.encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n".encode() + extra + b"\r\n" + body
    )


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """The protocol class for `uvicorn.Config(http=...)`, with these limits."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._refused = False
            self._rejected = False
            self._header_bytes = 0
            self._header_count = 0
            self._timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= limits.max_connections:
                self._refused = True
                log.warning("refusing a connection: %d are open (max_connections)", len(self.connections))
                transport.write(_response("503 Service Unavailable", "too many connections; try again shortly\n", b"retry-after: 1\r\n"))
                transport.close()
                return
            super().connection_made(transport)
            self._arm(limits.header_timeout_s, "headers")

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused or self._rejected:
                return
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._header_bytes = self._header_count = 0

        def on_url(self, url: bytes) -> None:
            self._header_bytes += len(url)
            if not self._rejected and self._over_limits():
                return
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_bytes += len(name) + len(value) + 4
            self._header_count += 1
            if self._rejected or self._over_limits():
                return
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self._rejected:
                return
            self._arm(limits.body_timeout_s, "body")
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._rejected:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self._rejected:
                return
            self._disarm()
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm(limits.header_timeout_s, "headers")

        # ---- limits ------------------------------------------------------------------------

        def _over_limits(self) -> bool:
            if self._header_count > limits.max_headers or self._header_bytes > limits.max_header_bytes:
                self._reject(
                    "431 Request Header Fields Too Large",
                    f"request headers too large: the limits are {limits.max_headers} headers and "
                    f"{limits.max_header_bytes} bytes\n",
                )
                return True
            return False

        def _reject(self, status: str, message: str) -> None:
            self._rejected = True
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(_response(status, message))
                self.transport.close()

        def _arm(self, seconds: float, what: str) -> None:
            self._disarm()
            self._timer = self.loop.call_later(seconds, self._timed_out, what, seconds)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _timed_out(self, what: str, seconds: float) -> None:
            self._timer = None
            if self.cycle is not None and not self.cycle.response_complete and what == "headers":
                return  # an answer is under way (a pipelined or long request): not idle
            self._reject("408 Request Timeout", f"request {what} not received within {seconds:g}s\n")

    return GuardedHttpToolsProtocol
