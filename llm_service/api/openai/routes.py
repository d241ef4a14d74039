"""OpenAI's API under /v1: chat completions, completions, models, embeddings.

SSE streaming (`data: {chunk}` … `data: [DONE]`); errors in OpenAI's envelope (built by
`api/errors.py`, which the exception handlers use for every /v1 path) with their status before
the first byte, and as one `data: {"error": …}` event (then `[DONE]`) after it.
"""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from fastapi.responses import JSONResponse, Response

from ...engines.base import ChatMessage, Chunk, EmbedOptions, EngineError, GenerationRequest
from ...models import Completion, ModelEntry
from ...tools import parse_tool_choice, parse_tools
from ...structured import attempts as structured_attempts
from ...structured.requests import from_openai_response_format
from ...images import limits_of
from ..errors import engine_error_body, openai_error_body, readable_validation_error
from ..images import check_image_count, fetch_image_urls
from ..streaming import CLIENT_GONE, PrefetchedStream, StreamingAnswer, new_request_id, until_disconnect
from . import wire

router = APIRouter()


def _sse(body: dict[str, Any] | str) -> bytes:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n".encode()


def _sse_error(exc: EngineError) -> bytes:
    return _sse(openai_error_body(exc.message, exc.status_code, exc.code)) + _sse("[DONE]")


def _new_request(settings: Any, messages: list[ChatMessage], options, kind: str, think: bool | None = None) -> GenerationRequest:
    gen_request = GenerationRequest(id=new_request_id(), messages=messages, options=options, kind=kind, think=think)  # type: ignore[arg-type]
    gen_request.deadline = gen_request.arrived_at + settings.request_deadline_s
    return gen_request


def chat_request(settings: Any, body: wire.ChatCompletionBody,
                 fetched: dict[str, bytes] | None = None) -> tuple[GenerationRequest, wire.ChatShapes]:
    """The generation request of a chat completion body, and the shapes of its answer (the route
    and the batch runner both build them here); `fetched`: the bytes of its http image URLs."""
    gen_request = _new_request(
        settings,
        wire.chat_messages(body, limits_of(settings), fetched),
        wire.sampling_options(body, body.max_completion_tokens or body.max_tokens),
        "chat",
        wire.wants_thinking(body),
    )
    gen_request.tools = parse_tools(body.tools)
    gen_request.tool_choice = parse_tool_choice(body.tool_choice, gen_request.tools)
    gen_request.structured = from_openai_response_format(body.response_format)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    shapes = wire.ChatShapes(f"chatcmpl-{gen_request.id}", body.model, int(time.time()), include_usage)
    return gen_request, shapes


def completion_request(settings: Any, body: wire.CompletionBody) -> tuple[GenerationRequest, wire.CompletionShapes, str]:
    """A legacy completion body's generation request, its answer's shapes and the echoed text."""
    prompt = wire.completion_prompt(body)
    gen_request = _new_request(settings, [ChatMessage("user", prompt)], wire.sampling_options(body, body.max_tokens), "generate")
    gen_request.suffix = body.suffix or None
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    shapes = wire.CompletionShapes(f"cmpl-{gen_request.id}", body.model, int(time.time()), include_usage)
    return gen_request, shapes, prompt if body.echo else ""


def complete_whole(manager: Any, model: str, gen_request: GenerationRequest) -> Any:
    """The whole answer (a coroutine): validated and asked again for a structured request."""
    if gen_request.structured is not None:
        return structured_attempts.complete(manager, model, gen_request)
    return manager.complete(model, gen_request)


async def _answer(
    request: Request,
    model: str,
    gen_request: GenerationRequest,
    stream: bool,
    stream_events: Callable[[PrefetchedStream], AsyncIterator[dict[str, Any]]],
    whole: Callable[[Completion], dict[str, Any]],
    opening: dict[str, Any] | None = None,
) -> Response:
    manager = request.app.state.manager
    headers = {"X-Request-Id": gen_request.id}
    # A structured answer (response_format) is validated, and asked again when invalid: structured/attempts.py.
    structured = gen_request.structured is not None
    if not stream:
        completed, completion = await until_disconnect(request, lambda: complete_whole(manager, model, gen_request))
        if not completed:
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(whole(completion), headers=headers)
    items = structured_attempts.generate(manager, model, gen_request) if structured else manager.generate(model, gen_request)
    return StreamingAnswer(
        items, lambda answer: _sse_stream(stream_events(answer), opening), deadline=gen_request.deadline,
        error_item=_sse_error, media_type="text/event-stream", headers=headers,
    )


async def _sse_stream(events: AsyncIterator[dict[str, Any]], opening: dict[str, Any] | None) -> AsyncIterator[bytes]:
    """The events, then [DONE]. The opening event (the chat role chunk) goes out in one write with
    the first answer event: one less write and wake-up before the client has the first token.
    A client that leaves cancels us; the answer stream closes on the way out."""
    pending = _sse(opening) if opening is not None else b""
    try:
        async for event in events:
            yield pending + _sse(event)
            pending = b""
    except EngineError as exc:
        yield pending + _sse_error(exc)
        return
    yield pending + _sse("[DONE]")


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: wire.ChatCompletionBody) -> Response:
    settings = request.app.state.settings
    urls = wire.image_urls(body)
    check_image_count(request.app.state, body.model, len(urls))
    fetched = await fetch_image_urls(settings, urls)
    gen_request, shapes = chat_request(settings, body, fetched)

    async def events(answer: PrefetchedStream) -> AsyncIterator[dict[str, Any]]:
        async for item in answer.items():
            if isinstance(item, Chunk):
                yield shapes.delta_chunk(item)
            else:
                for chunk in shapes.final_chunks(item):
                    yield chunk

    def whole(completion: Completion) -> dict[str, Any]:
        return shapes.whole(completion.result, completion.content, completion.thinking, completion.tool_calls)

    return await _answer(request, body.model, gen_request, body.stream, events, whole, opening=shapes.role_chunk())


@router.post("/v1/completions")
async def completions(request: Request, body: wire.CompletionBody) -> Response:
    gen_request, shapes, echoed = completion_request(request.app.state.settings, body)

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

    def whole(completion: Completion) -> dict[str, Any]:
        return shapes.whole(completion.result, echoed + completion.content)

    return await _answer(request, body.model, gen_request, body.stream, events, whole)


def _created(entry: ModelEntry) -> int:
    try:
        return int(datetime.fromisoformat(entry.modified_at).timestamp())
    except (TypeError, ValueError):
        return 0


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    entries = request.app.state.manager.entries()
    return {"object": "list", "data": [wire.model_object(e.spec.name, _created(e)) for e in entries]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> Response:
    entry = request.app.state.manager.entry(model_id)
    return JSONResponse(wire.model_object(entry.spec.name, _created(entry)))


@router.post("/v1/embeddings")
async def embeddings(request: Request, body: wire.EmbeddingBody) -> Response:
    manager = request.app.state.manager
    inputs = [body.input] if isinstance(body.input, str) else body.input
    request_id = new_request_id()
    options = EmbedOptions(dimensions=body.dimensions)
    completed, result = await until_disconnect(request, lambda: manager.embed(body.model, inputs, request_id, options))
    if not completed:
        return Response(status_code=CLIENT_GONE)
    return JSONResponse(wire.embedding_list(body.model, result.vectors, result.prompt_tokens, body.encoding_format, result.warnings))


# ---- one request's whole answer, outside HTTP (a batch item) ------------------------------------

_BODIES = {
    "/v1/chat/completions": wire.ChatCompletionBody,
    "/v1/completions": wire.CompletionBody,
    "/v1/embeddings": wire.EmbeddingBody,
}


async def answer_body(manager: Any, settings: Any, endpoint: str, raw: dict[str, Any],
                      priority: str = "interactive", deadline: float | None = None) -> tuple[int, str, dict[str, Any]]:
    """(status code, request id, body) that `endpoint` answers for the JSON body `raw`, not
    streamed: the batch runner's items go through the same builders and the same manager calls
    as the routes above, so an item's answer is the one the route would give. Errors are in
    OpenAI's envelope with their status, as the exception handlers write them. `deadline`
    (monotonic) replaces the route's (arrival + request_deadline_s) for a generation."""
    request_id = new_request_id()
    try:
        try:
            body = _BODIES[endpoint].model_validate(raw)
        except ValidationError as exc:
            message, param = readable_validation_error(RequestValidationError(exc.errors()))
            return 400, request_id, openai_error_body(message, 400, "invalid_request", param)
        if endpoint == "/v1/embeddings":
            inputs = [body.input] if isinstance(body.input, str) else body.input
            result = await manager.embed(body.model, inputs, request_id, EmbedOptions(dimensions=body.dimensions),
                                         priority=priority, deadline=deadline)
            return 200, request_id, wire.embedding_list(body.model, result.vectors, result.prompt_tokens,
                                                        body.encoding_format, result.warnings)
        if endpoint == "/v1/chat/completions":
            gen_request, chat_shapes = chat_request(settings, body)
            gen_request.priority = priority
            gen_request.deadline = deadline or gen_request.deadline
            completion = await complete_whole(manager, body.model, gen_request)
            answer = chat_shapes.whole(completion.result, completion.content, completion.thinking, completion.tool_calls)
        else:
            gen_request, shapes, echoed = completion_request(settings, body)
            gen_request.priority = priority
            gen_request.deadline = deadline or gen_request.deadline
            completion = await complete_whole(manager, body.model, gen_request)
            answer = shapes.whole(completion.result, echoed + completion.content)
        return 200, gen_request.id, answer
    except EngineError as exc:
        return exc.status_code, request_id, engine_error_body(endpoint, exc)
