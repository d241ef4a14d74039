"""The daemon's ASGI application: routes, error shapes, and the model manager's life cycle."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .api import ollama, openai, status
from .engines.base import EngineError, QueueFull
from .metrics import MetricsHub
from .models import ModelManager
from .security import install_security
from .tokenizer_client import TokenizerClient

log = logging.getLogger(__name__)


def readable_validation_error(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "invalid request: " + "; ".join(parts)


def _is_openai_path(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def engine_error_response(exc: EngineError) -> JSONResponse:
    headers = {"Retry-After": "1"} if isinstance(exc, QueueFull) or exc.status_code == 503 else None
    return JSONResponse({"error": exc.message}, status_code=exc.status_code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Ollama's error shape: {"error": "..."}; never a 500 for bad input."""

    @app.exception_handler(EngineError)
    async def on_engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return engine_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": readable_validation_error(exc)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"error": f"internal error: {exc!r}"}, status_code=500)


class HttpMetricsMiddleware:
    """Counts requests by route template (never the raw path) and status."""

    def __init__(self, app: ASGIApp, metrics: MetricsHub) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status_code = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_http(template, scope.get("method", ""), status_code)


class JsonBodiesByDefault:
    """Read every request body as JSON, whatever its Content-Type, as Ollama does.

    `curl -d '{...}'` sends `application/x-www-form-urlencoded`; Ollama's own examples rely on it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") in ("POST", "PUT", "PATCH"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            headers.append((b"content-type", b"application/json"))
            # In place: the router records the matched route in this same scope for the metrics.
            scope["headers"] = headers
        await self.app(scope, receive, send)


def create_app(settings: Any) -> FastAPI:
    hub = MetricsHub(settings.metrics_dir or None, __version__)
    tokenizers = TokenizerClient(settings.tokenizer_service_port, settings.tokenizer_service_url)
    manager = ModelManager(settings, hub, tokenizers)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with anyio.create_task_group() as tg:
            await tg.start(manager.run)
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):
                    await manager.shutdown()
                    hub.write_all()
                tg.cancel_scope.cancel()
        await tokenizers.aclose()

    app = FastAPI(
        title="axm1-llm",
        version=__version__,
        description="Ollama and OpenAI APIs in front of the AX-M1 card's runner programs.",
        lifespan=lifespan,
    )
    app.state.manager = manager
    app.state.metrics = hub
    app.state.settings = settings
    app.include_router(ollama.router)
    app.include_router(status.router)
    install_error_handlers(app)
    app.include_router(openai.router)
    openai.install_openai_error_handlers(app)
    install_security(app, settings)
    app.add_middleware(JsonBodiesByDefault)
    app.add_middleware(HttpMetricsMiddleware, metrics=hub)
    return app
