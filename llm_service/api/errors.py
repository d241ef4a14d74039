"""Error bodies in the dialect of each wire format, built in one place.

Ollama's routes answer `{"error": "..."}`; OpenAI's (under `/v1`) answer
`{"error": {"message", "type", "param", "code"}}`. The route's path decides, so that the
middleware (401, 413), the exception handlers and the routes all give a client the same shape.
"""
from __future__ import annotations

import errno

import logging
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engines.base import EngineError

log = logging.getLogger(__name__)


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def openai_error_body(message: str, status_code: int, code: str | None, param: str | None = None) -> dict[str, Any]:
    # OpenAI itself answers a bad key (401) with invalid_request_error too.
    kind = "invalid_request_error" if status_code < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def ollama_error_body(message: str) -> dict[str, Any]:
    return {"error": message}


def error_body(path: str, message: str, status_code: int, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The body for an error answered on `path`."""
    if is_openai_path(path):
        return openai_error_body(message, status_code, code, param)
    return ollama_error_body(message)


def engine_error_body(path: str, exc: EngineError) -> dict[str, Any]:
    param = "model" if exc.code == "model_not_found" else getattr(exc, "param", None)
    return error_body(path, exc.message, exc.status_code, exc.code, param)


def error_headers(status_code: int) -> dict[str, str] | None:
    # Busy or restarting: a client may try again shortly.
    return {"Retry-After": "1"} if status_code == 503 else None


def engine_error_response(path: str, exc: EngineError) -> JSONResponse:
    return JSONResponse(engine_error_body(path, exc), status_code=exc.status_code, headers=error_headers(exc.status_code))


def readable_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """The message, and the first field it names (OpenAI's `param`)."""
    parts, param = [], None
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        param = param or where or None
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "invalid request: " + "; ".join(parts), param


async def drain_body(request: Request, limit_s: float = 10.0) -> None:
    """Read and drop what is left of a request's body (bounded in time)."""
    with anyio.move_on_after(limit_s):
        while True:
            message = await request.receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return


# A write that failed for want of room: the device is full, a quota or the file size limit.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def install_error_handlers(app: FastAPI) -> None:
    """Every error a route raises, in its client's dialect; never a 500 for bad input."""

    @app.exception_handler(EngineError)
    async def on_engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return engine_error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = readable_validation_error(exc)
        body = error_body(request.url.path, message, 400, "invalid_request", param)
        return JSONResponse(body, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = error_body(request.url.path, str(exc.detail), exc.status_code)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            # Receiving a body (an upload spooled to disk) or writing a file ran out of room.
            log.error("no space on %s: %s", request.url.path, exc)
            message = f"insufficient storage: the box has no room to take this request ({exc.strerror})"
            return JSONResponse(error_body(request.url.path, message, 507, "insufficient_storage"), status_code=507)
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(error_body(request.url.path, f"internal error: {exc!r}", 500, "internal_error"), status_code=500)
