"""The daemon's ASGI application: routes, error shapes, and the model manager's life cycle."""
from __future__ import annotations

import gc
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__, image_files
from .api import async_jobs, models, ollama, openai, serverless, services, status
from .api.errors import install_error_handlers
from .api.hot_routes import HotRoutesMiddleware
from .api.openai import batches
from .jobs.runner import JobRunner
from .metrics import MetricsHub
from .models import ModelManager
from .security import install_security
from .terminal import follow_loads, progress_handler
from .services.folder import ServiceFolder
from .tokenizer_client import TokenizerClient


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

    # Uploads keep their own Content-Type (multipart/form-data with its boundary).
    KEEP_CONTENT_TYPE = frozenset({"/v1/files"})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope.get("method") in ("POST", "PUT", "PATCH")
                and scope.get("path") not in self.KEEP_CONTENT_TYPE):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            headers.append((b"content-type", b"application/json"))
            # In place: the router records the matched route in this same scope for the metrics.
            scope["headers"] = headers
        await self.app(scope, receive, send)


def create_app(settings: Any) -> FastAPI:
    hub = MetricsHub(settings.metrics_dir or None, __version__)
    tokenizers = TokenizerClient(
        settings.tokenizer_service_port, settings.tokenizer_service_url, settings.tokenizer_service_secret
    )
    manager = ModelManager(settings, hub, tokenizers)
    service_folder = ServiceFolder(settings.services_dir, settings.descriptor_poll_s)

    async def metrics_heartbeat() -> None:
        # Files are written on events; an idle daemon's would stop changing, and their age could
        # not tell an idle daemon from a dead one (the Axm1LlmMetricsStale alert).
        while True:
            await anyio.sleep(settings.metrics_heartbeat_s)
            hub.write_all_soon()
    jobs = JobRunner(settings, manager, hub, service_folder)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        image_files.sweep(settings.data_dir)  # a killed daemon's image files (llm_service/image_files.py)
        async with anyio.create_task_group() as tg:
            await tg.start(manager.run)
            if (lines := progress_handler()) is not None:
                tg.start_soon(follow_loads, manager.events, lines)
            await tg.start(service_folder.run)
            tg.start_soon(metrics_heartbeat)
            await tg.start(jobs.run)
            # What start-up made (modules, routes, schemas, models) lives as long as the daemon:
            # out of the collector's sight, a full collection no longer walks it. It did, in a
            # 20–70 ms pause of the event loop every few seconds under load (requests stalled).
            gc.freeze()
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):
                    # The batch runner first: its running items go back to the store before
                    # the engines stop (their errors would otherwise be recorded as answers).
                    await jobs.shutdown()
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
    app.state.services = service_folder
    app.state.jobs = jobs
    app.include_router(ollama.router)
    app.include_router(status.router)
    app.include_router(models.router)
    app.include_router(openai.router)
    # The page (/ui): static files in the package, no build step, no CDN.
    app.mount("/ui", StaticFiles(directory=Path(__file__).parent / "ui", html=True), name="ui")
    app.include_router(services.router)
    app.include_router(batches.router)
    app.include_router(serverless.router)
    app.include_router(async_jobs.router)
    install_error_handlers(app)
    # Innermost of ours, so that keys, body limits and the HTTP metrics apply to it as to the rest.
    app.add_middleware(HotRoutesMiddleware, routers=[ollama.router, openai.router], exception_handlers=app.exception_handlers)
    install_security(app, settings)
    app.add_middleware(JsonBodiesByDefault)
    app.add_middleware(HttpMetricsMiddleware, metrics=hub)
    return app
