"""OpenAI's API under /v1: chat completions, completions, models, embeddings.

SSE streaming (`data: {chunk}` … `data: [DONE]`); errors in OpenAI's envelope with their status
before the first byte, and as one `data: {"error": …}` event (then `[DONE]`) after it.
"""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import openai_format as fmt
from ..engines.base import BadRequest, ChatMessage, Chunk, EngineError, GenerationRequest, GenerationResult
from .streaming import PrefetchedStream, collect, new_request_id, open_stream, until_disconnect

router = APIRouter()

_CLIENT_GONE = 499  # nginx's convention, as the Ollama routes use it


def openai_error(exc: EngineError, param: str | None = None) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status_code == 503 else None
    return JSONResponse(
        fmt.error_body(exc.message, exc.status_code, exc.code, param), status_code=exc.status_code, headers=headers
    )


def _sse(body: dict[str, Any] | str) -> bytes:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n".encode()


async def _answer(
    request: Request,
    model: str,
    gen_request: GenerationRequest,
    stream: bool,
    stream_events: Callable[[PrefetchedStream], AsyncIterator[dict[str, Any]]],
    whole: Callable[[GenerationResult, str, str], dict[str, Any]],
) -> Response:
    manager = request.app.state.manager
    try:
        answer = await open_stream(request, manager.generate(model, gen_request))
    except EngineError as exc:
        return openai_error(exc, "model" if exc.code == "model_not_found" else None)
    if answer is None:
        return Response(status_code=_CLIENT_GONE)
    headers = {"X-Request-Id": gen_request.id}
    if stream:
        return StreamingResponse(_sse_stream(stream_events(answer)), media_type="text/event-stream", headers=headers)
    try:
        completed, body = await until_disconnect(request, lambda: collect(answer, whole))
    except EngineError as exc:
        return openai_error(exc)
    if not completed:
        return Response(status_code=_CLIENT_GONE)
    return JSONResponse(body, headers=headers)


async def _sse_stream(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """The events, then [DONE]. A client that leaves cancels us; the answer stream closes on the way out."""
    try:
        async for event in events:
            yield _sse(event)
    except EngineError as exc:
        yield _sse(fmt.error_body(exc.message, exc.status_code, exc.code))
    yield _sse("[DONE]")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: fmt.ChatCompletionBody) -> Response:
    try:
        gen_request = GenerationRequest(
            id=new_request_id(),
            messages=fmt.chat_messages(body),
            options=fmt.sampling_options(body, body.max_completion_tokens or body.max_tokens),
            kind="chat",
            think=fmt.wants_thinking(body),
        )
    except BadRequest as exc:
        return openai_error(exc)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    shapes = fmt.ChatShapes(f"chatcmpl-{gen_request.id}", body.model, int(time.time()), include_usage)

    async def events(answer: PrefetchedStream) -> AsyncIterator[dict[str, Any]]:
        yield shapes.role_chunk()
        async for item in answer.items():
            if isinstance(item, Chunk):
                yield shapes.delta_chunk(item)
            else:
                for chunk in shapes.final_chunks(item):
                    yield chunk

    return await _answer(request, body.model, gen_request, body.stream, events, shapes.whole)


@router.post("/v1/completions")
async def completions(request: Request, body: fmt.CompletionBody) -> Response:
    try:
        prompt = fmt.completion_prompt(body)
        gen_request = GenerationRequest(
            id=new_request_id(),
            messages=[ChatMessage("user", prompt)],
            options=fmt.sampling_options(body, body.max_tokens),
            kind="generate",
        )
    except BadRequest as exc:
        return openai_error(exc)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    shapes = fmt.CompletionShapes(f"cmpl-{gen_request.id}", body.model, int(time.time()), include_usage)
    echoed = prompt if body.echo else ""

    async def events(answer: PrefetchedStream) -> AsyncIterator[dict[str, Any]]:
        if echoed:
            yield shapes.text_chunk(echoed)
        async for item in answer.items():
            if isinstance(item, Chunk):
                if item.content:  # the legacy format has no place for reasoning
                    yield shapes.text_chunk(item.content)
            else:
                for chunk in shapes.final_chunks(item):
                    yield chunk

    def whole(result: GenerationResult, content: str, thinking: str) -> dict[str, Any]:
        return shapes.whole(result, echoed + content)

    return await _answer(request, body.model, gen_request, body.stream, events, whole)


def _created(modified_at: str) -> int:
    try:
        return int(datetime.fromisoformat(modified_at).timestamp())
    except (TypeError, ValueError):
        return 0


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    models = request.app.state.manager.list_models()
    return {"object": "list", "data": [fmt.model_object(m["name"], _created(m["modified_at"])) for m in models]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> Response:
    manager = request.app.state.manager
    try:
        name = manager.resolve(model_id)
    except EngineError as exc:
        return openai_error(exc, "model")
    model = next(m for m in manager.list_models() if m["name"] == name)
    return JSONResponse(fmt.model_object(name, _created(model["modified_at"])))


@router.post("/v1/embeddings")
async def embeddings(request: Request, body: fmt.EmbeddingBody) -> Response:
    manager = request.app.state.manager
    inputs = [body.input] if isinstance(body.input, str) else body.input
    try:
        name = manager.resolve(body.model)
        engine = manager.engine(name)
        if not hasattr(engine, "embed"):
            raise BadRequest(f'model "{name}" does not serve embeddings')

        async def work() -> tuple[list[list[float]], int]:
            # What an upstream serves is known once it answers, so load before asking.
            await manager.load(name, deadline=time.monotonic() + manager.settings.request_deadline_s)
            if not engine.capabilities.embeddings:
                raise BadRequest(f'model "{name}" does not serve embeddings (its upstream has no /v1/embeddings)')
            async with manager.entry(name).scheduler.slot(new_request_id()):
                return await engine.embed(inputs)

        completed, outcome = await until_disconnect(request, work)
    except EngineError as exc:
        return openai_error(exc, "model" if exc.code == "model_not_found" else None)
    if not completed:
        return Response(status_code=_CLIENT_GONE)
    vectors, prompt_tokens = outcome
    return JSONResponse(fmt.embedding_list(body.model, vectors, prompt_tokens, body.encoding_format))


def _is_openai_path(request: Request) -> bool:
    return request.url.path == "/v1" or request.url.path.startswith("/v1/")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    parts, param = [], None
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        param = param or where or None
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "invalid request: " + "; ".join(parts), param


def install_openai_error_handlers(app: FastAPI) -> None:
    """OpenAI's error envelope on /v1 paths; every other path keeps the handler it had."""
    previous_validation = app.exception_handlers.get(RequestValidationError, request_validation_exception_handler)
    previous_http = app.exception_handlers.get(StarletteHTTPException, http_exception_handler)
    previous_engine = app.exception_handlers.get(EngineError)

    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        if not _is_openai_path(request):
            return await previous_validation(request, exc)
        message, param = _validation_message(exc)
        return JSONResponse(fmt.error_body(message, 400, "invalid_request", param), status_code=400)

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if not _is_openai_path(request):
            return await previous_http(request, exc)
        body = fmt.error_body(str(exc.detail), exc.status_code, None)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def on_engine_error(request: Request, exc: EngineError) -> Response:
        if not _is_openai_path(request) and previous_engine is not None:
            return await previous_engine(request, exc)
        return openai_error(exc)

    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(EngineError, on_engine_error)
