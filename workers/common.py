"""What both workers share: the command line, the device, the model slot loaded in the
background, `/health` `/v1/models` `/info`, OpenAI's error shape, SSE, and uvicorn's start.

torch is imported only inside the functions that need it, so this module stays cheap to import.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llm_service.api.errors import readable_validation_error

T = TypeVar("T")

DEVICES = ("auto", "cpu", "cuda", "mps")
MIB = 1024 * 1024
OWNER = "axm1-llm"


def say(message: str) -> None:
    """One progress line on stderr, the worker's log, flushed: a supervisor reads it as it comes."""
    print(message, file=sys.stderr, flush=True)


class UsageError(Exception):
    """A command line, device or model that cannot work: the worker exits with status 2 at once."""


# ---- errors in OpenAI's shape ---------------------------------------------------------------------

class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status_code: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.code = code
        self.param = param


def error_body(message: str, status_code: int, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    # The envelope of the daemon's /v1 (llm_service.api.errors.openai_error_body); not imported
    # from there because that module pulls in every engine of the daemon.
    kind = "invalid_request_error" if status_code < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status_code == 503 else None  # loading: try again shortly
    return JSONResponse(error_body(exc.message, exc.status_code, exc.code, exc.param), exc.status_code, headers)


def create_app(title: str) -> FastAPI:
    """An app whose every error (ours, a bad body, an unknown route, a bug) is in OpenAI's shape."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = readable_validation_error(exc)
        return error_response(ApiError(400, message, "invalid_request", param))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        say(f"internal error on {request.url.path}: {exc!r}")
        return error_response(ApiError(500, f"internal error: {exc!r}", "internal_error"))

    return app


# ---- the command line -----------------------------------------------------------------------------

def base_parser(prog: str, description: str, model_help: str, default_port: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--served-name", help="the model's name in requests and /v1/models (default: from --model)")
    parser.add_argument(
        "--device", choices=DEVICES, default="auto",
        help="auto: cuda if available, else mps if available, else cpu (default: %(default)s)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    parser.add_argument("--port", type=int, default=default_port, help="port (default: %(default)s; 0: any free one)")
    parser.add_argument(
        "--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
        help="uvicorn's log level; debug also logs every request (default: %(default)s)",
    )
    return parser


def served_name(given: str | None, model: str) -> str:
    """`--served-name`, else the last part of `--model` (a folder's name, or the literal)."""
    return given or Path(model.rstrip("/\\")).name or model


def package_dir(package: str, install_hint: str) -> Path:
    """The folder of an installed package, found without importing it (some such packages import
    plugin frameworks that are not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"package {package} is not installed ({install_hint})")
    return Path(spec.submodule_search_locations[0])


# ---- the device -------------------------------------------------------------------------------------

def pick_device(requested: str, cuda_available: bool, mps_available: bool) -> str:
    """The device `requested` means on this machine; UsageError when it is not there."""
    if requested == "auto":
        return "cuda" if cuda_available else "mps" if mps_available else "cpu"
    if requested == "cuda" and not cuda_available:
        raise UsageError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if requested == "mps" and not mps_available:
        raise UsageError("--device mps: Apple's MPS is not available (torch.backends.mps.is_available() is False)")
    return requested


def resolve_device(requested: str) -> str:
    import torch

    try:
        return pick_device(requested, torch.cuda.is_available(), torch.backends.mps.is_available())
    except UsageError as exc:
        if requested == "cuda" and torch.version.cuda is None:
            raise UsageError(f"{exc}; this torch ({torch.__version__}) is a build without CUDA") from None
        raise


def dtype_name(device: str, bf16_supported: bool) -> str:
    """Half precision on a GPU (bfloat16 where the GPU has it: float16's range overflows in some
    models), float32 on the CPU, where half precision is slower, not faster."""
    if device == "cuda":
        return "bfloat16" if bf16_supported else "float16"
    if device == "mps":
        return "float16"
    return "float32"


def device_dtype_name(device: str) -> str:
    import torch

    return dtype_name(device, device == "cuda" and torch.cuda.is_bf16_supported())


def quiet_transformers() -> None:
    """Our own progress lines only: no progress bars, and no per-call warnings (flags a model
    ignores, pad ids, over-long inputs, which the answers report) flooding the log."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def _mib(size: float | None) -> float | None:
    return None if size is None else round(size / MIB, 1)


def process_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def system_memory() -> tuple[int | None, int | None]:
    """(total, available) RAM in bytes: the 'device' memory of the CPU (and of MPS, which shares it)."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                name, _, value = line.partition(":")
                fields[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return fields.get("MemTotal"), fields.get("MemAvailable")


def memory_figures(model: Any, device: str) -> dict[str, float | None]:
    """What the model takes and what the device has left, in MiB; null where a device has no such figure."""
    import torch

    tensors = [*model.parameters(), *model.buffers()]
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    allocated = None
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        allocated = torch.cuda.memory_allocated()
    else:
        total, free = system_memory()
        if device == "mps":
            allocated = torch.mps.current_allocated_memory()
    return {
        "device_total_mib": _mib(total),
        "device_free_mib": _mib(free),
        "model_mib": _mib(model_bytes),
        "allocated_mib": _mib(allocated),
        "process_rss_mib": _mib(process_rss_bytes()),
    }


# ---- the model, loaded in the background -----------------------------------------------------------

class ModelSlot(Generic[T]):
    """The worker's model: loaded in a thread once the server listens, so /health can say 503
    ("loading") meanwhile instead of the port refusing connections."""

    def __init__(self) -> None:
        self.value: T | None = None
        self.error: str | None = None
        self.load_seconds: float | None = None

    @property
    def loaded(self) -> bool:
        return self.value is not None

    def start(self, load: Callable[[], T], on_failure: Callable[[], None]) -> None:
        def run() -> None:
            began = time.monotonic()
            try:
                value = load()
            except Exception as exc:  # noqa: BLE001 (any failure ends the worker, said on stderr)
                self.error = f"{type(exc).__name__}: {exc}"
                say(f"loading the model failed: {self.error}")
                on_failure()
                return
            self.load_seconds = round(time.monotonic() - began, 2)
            self.value = value
            say(f"model loaded in {self.load_seconds:.1f} s")

        threading.Thread(target=run, name="model-loader", daemon=True).start()

    def get(self) -> T:
        if self.value is None:
            if self.error:
                raise ApiError(503, f"the model failed to load: {self.error}", "model_failed")
            raise ApiError(503, "the model is still loading; try again shortly", "model_loading")
        return self.value


def model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": OWNER}


def add_common_routes(app: FastAPI, slot: ModelSlot[Any], names: Sequence[str],
                      info: Callable[[], dict[str, Any]]) -> None:
    """`/health` (200 only once loaded), `/v1/models` (`names`: the first is the base model) and `/info`."""
    created = int(time.time())

    @app.get("/health")
    async def health() -> JSONResponse:
        if slot.loaded:
            return JSONResponse({"status": "ok"})
        if slot.error:
            return JSONResponse({"status": "failed", "error": slot.error}, 503)
        return JSONResponse({"status": "loading"}, 503, {"Retry-After": "1"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_object(name, created) for name in names]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name not in names:
            raise ApiError(404, f"model {name!r} not found", "model_not_found", "model")
        return model_object(name, created)

    @app.get("/info")
    async def info_route() -> dict[str, Any]:
        return {"loaded": slot.loaded, "load_seconds": slot.load_seconds, "error": slot.error, **info()}


def check_model_name(requested: str, names: Sequence[str]) -> None:
    if requested not in names:
        raise ApiError(
            404, f"model {requested!r} not found; this worker serves {', '.join(map(repr, names))}",
            "model_not_found", "model",
        )


# ---- server-sent events ----------------------------------------------------------------------------

SSE_DONE = b"data: [DONE]\n\n"


def sse_event(item: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class EventStream(StreamingResponse):
    """An SSE answer whose body generator is closed as soon as the response ends, also when the
    client left mid-stream: starlette then just stops iterating it, and its cleanup (stopping the
    generation) would wait for the garbage collector."""

    def __init__(self, body: Any) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def watch_disconnect(request: Request, on_disconnect: Callable[[], None]) -> None:
    """Call `on_disconnect` when the client goes away. The body has been read, so the next message
    can only be the disconnect (uvicorn also sends it once the answer is complete: harmless)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    on_disconnect()


# ---- uvicorn ---------------------------------------------------------------------------------------

class _WorkerServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_listening: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_listening = on_listening

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)  # exits (status 1) when the port cannot be bound
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        say(f"listening on http://{host}:{port}")
        self._on_listening()


def run_server(app: FastAPI, slot: ModelSlot[Any], load: Callable[[], Any], host: str, port: int,
               log_level: str) -> int:
    """Listen, then load the model in the background; serve until a failed load (exit status 1) or
    SIGTERM/SIGINT, which uvicorn re-raises once it has shut down (as for `axm1-llm serve`)."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level,
        access_log=log_level == "debug",  # /health polls would drown the log
        # SIGTERM: a generation still streaming after 1 s is cut (its client sees the stream end
        # without [DONE]) rather than holding up the exit
        timeout_graceful_shutdown=1,
    )
    server: _WorkerServer

    def stop() -> None:
        server.should_exit = True

    server = _WorkerServer(config, lambda: slot.start(load, on_failure=stop))
    server.run()
    return 1 if slot.error else 0


def exit_usage(parser: argparse.ArgumentParser, exc: UsageError) -> int:
    """A usage error without the (long) usage text, as `axm1-llm` reports its own: exit status 2."""
    parser.exit(2, f"{parser.prog}: error: {exc}\n")
    return 2  # not reached
