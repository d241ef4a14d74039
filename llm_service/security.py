"""API keys and request body limits, as pure ASGI middleware.

Pure ASGI rather than Starlette's BaseHTTPMiddleware, which runs the app in a separate task and
so breaks the cancellation of streaming responses when a client disconnects.
Errors are in the client's dialect: Ollama's `{"error": "..."}`, and OpenAI's envelope under `/v1`.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api.errors import error_body
from .settings import DaemonSettings

# Reachable without a key: liveness probes (Docker, systemd, load balancers) carry no secrets.
OPEN_PATHS = frozenset({"/health"})
# The page's static files hold no data; the page asks for the key and sends it on every call.
OPEN_PREFIXES = ("/ui/",)


def is_open(path: str) -> bool:
    """Served without a key: liveness, and the page (its files; its API calls carry the key)."""
    return path in OPEN_PATHS or path == "/ui" or path.startswith(OPEN_PREFIXES)


class _BodyTooLarge(Exception):
    pass


def _digest(key: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison time independent of the key's length.
    return hashlib.sha256(key.encode()).digest()


async def send_error(
    send: Send, path: str, status: int, message: str, code: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Send a complete JSON error response in the dialect of the route at `path`."""
    payload = json.dumps(error_body(path, message, status, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class SecurityMiddleware:
    """Bearer API keys on every route but `OPEN_PATHS`, and a limit on request body size."""

    def __init__(self, app: ASGIApp, *, api_keys: Iterable[str], max_body_bytes: int,
                 body_limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.key_digests = [_digest(key) for key in api_keys]
        self.max_body_bytes = max_body_bytes
        # Paths with a limit of their own (uploads: POST /v1/files takes job_file_max_bytes).
        self.body_limits = dict(body_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = dict(scope["headers"])  # ASGI header names are lower-case bytes
        if self.key_digests and not is_open(path) and not self._authorized(headers):
            await send_error(
                send, path, 401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                "invalid_api_key", [(b"www-authenticate", b"Bearer")],
            )
            return
        limit = self.body_limits.get(path, self.max_body_bytes)
        setting = "job_file_max_bytes" if path in self.body_limits else "max_body_bytes"
        too_large = f"request body too large: the limit is {limit} bytes ({setting})"
        declared = headers.get(b"content-length", b"")
        if declared.isdigit():
            if int(declared) > limit:
                await send_error(send, path, 413, too_large, "request_too_large")
                return
            # The server frames the body by its Content-Length: it cannot grow past it, so the
            # request needs no counting on the way in (nor a wrapper around every chunk sent).
            await self.app(scope, receive, send)
            return
        await self._call_with_body_limit(scope, receive, send, path, too_large, limit)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        offered = _digest(key.strip())
        # Check every key, so the time taken does not tell which (or how many) keys exist.
        matches = [hmac.compare_digest(offered, known) for known in self.key_digests]
        return any(matches)

    async def _call_with_body_limit(
        self, scope: Scope, receive: Receive, send: Send, path: str, too_large: str, limit: int
    ) -> None:
        """Run the app, failing with 413 once a body of undeclared length (chunked) grows past the limit."""
        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if response_started:
                raise  # a response is under way: the server can only drop the connection
            await send_error(send, path, 413, too_large, "request_too_large")


def install_security(app: Any, settings: DaemonSettings) -> None:
    """Add the middleware to a Starlette/FastAPI app (before it starts)."""
    # A multipart upload carries its file and a few hundred bytes of framing and fields.
    upload_limit = getattr(settings, "job_file_max_bytes", settings.max_body_bytes) + 64 * 1024
    app.add_middleware(
        SecurityMiddleware, api_keys=settings.api_keys, max_body_bytes=settings.max_body_bytes,
        body_limits={"/v1/files": max(upload_limit, settings.max_body_bytes)},
    )
