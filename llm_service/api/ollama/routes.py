"""Ollama's API on port 11535: generate, chat, tags, ps, show, version, and `/`.

Wire format as Ollama's: NDJSON streaming by default, durations in nanoseconds, errors as
`{"error": "..."}` with a status code before the first byte and as one last NDJSON line after.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Request
from pydantic import ValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ... import __version__
from ...engines.base import (
    BadRequest, ChatMessage, Chunk, EmbedOptions, EngineError, GenerationRequest, ModelNotFound, StatusNote,
)
from ...images import limits_of
from ...models import ModelEntry, requested_keep_alive
from ...names import ollama_name
from ...pull import PullError, delete_folder, hub_repo, pull_folder
from ...tools import parse_tools
from ...timestamps import now_rfc3339, rfc3339_in
from ...structured import attempts as structured_attempts
from ...structured.requests import from_ollama_format
from ..images import check_image_count
from ..streaming import CLIENT_GONE, PrefetchedStream, StreamingAnswer, new_request_id, until_disconnect
from . import wire
from .show import ShowInput, show_answer
from .wire import ChatBody, ChatShapes, GenerateBody, GenerateShapes, ModelBody, PullBody

router = APIRouter()



async def _answer(
    request: Request, model: str, gen_request: GenerationRequest, keep_alive: Any, stream: bool,
    shapes: GenerateShapes | ChatShapes,
) -> Response:
    """Run a generation and answer it as NDJSON or one JSON object."""
    manager = request.app.state.manager
    headers = {"X-Request-Id": gen_request.id}
    if gen_request.status_events and not stream:
        raise BadRequest("status_events come in a stream: send stream true (or leave it out)")
    if gen_request.status_events and gen_request.structured is not None:
        raise BadRequest("status_events cannot be combined with format yet: a structured answer is checked "
                         "whole before it is sent")
    # A structured answer (format) is validated, and asked again when invalid: structured/attempts.py.
    structured = gen_request.structured is not None
    if not stream:
        completed, whole = await until_disconnect(
            request,
            lambda: structured_attempts.complete(manager, model, gen_request, keep_alive) if structured
            else manager.complete(model, gen_request, keep_alive),
        )
        if not completed:
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(shapes.final(whole.result, whole.content, whole.thinking, whole.tool_calls), headers=headers)
    items = (structured_attempts.generate(manager, model, gen_request, keep_alive) if structured
             else manager.generate(model, gen_request, keep_alive=keep_alive))
    return StreamingAnswer(
        items, lambda answer: _ndjson(answer, shapes), deadline=gen_request.deadline,
        error_item=lambda exc: wire.error_line(exc.message), media_type="application/x-ndjson", headers=headers,
    )


async def _ndjson(answer: PrefetchedStream, shapes: GenerateShapes | ChatShapes) -> AsyncIterator[bytes]:
    try:
        async for item in answer.items():
            if isinstance(item, Chunk):
                yield (json.dumps(shapes.chunk(item)) + "\n").encode()
            elif isinstance(item, StatusNote):
                yield wire.status_line(shapes.model, item)
            else:
                yield (json.dumps(shapes.final(item)) + "\n").encode()
    except EngineError as exc:
        yield wire.error_line(exc.message)


def _new_request(messages: list[ChatMessage], body: GenerateBody | ChatBody, kind: str, deadline_s: float) -> GenerationRequest:
    request = GenerationRequest(
        id=new_request_id(),
        messages=messages,
        options=wire.sampling_options(body.options),
        kind=kind,  # type: ignore[arg-type]
        think=wire.think_flag(body.think),
        status_events=body.status_events,
    )
    request.deadline = request.arrived_at + deadline_s
    return request


async def _load_or_unload(request: Request, model: str, keep_alive: Any, kind: str) -> Response:
    """An empty prompt loads the model; with keep_alive 0 it unloads it (Ollama's convention)."""
    manager = request.app.state.manager
    name = manager.resolve(model)
    body: dict[str, Any] = {"model": model, "created_at": now_rfc3339()}
    if kind == "chat":
        body["message"] = {"role": "assistant", "content": ""}
    else:
        body["response"] = ""
    if keep_alive is not None and requested_keep_alive(keep_alive) == 0:
        await manager.unload(name)
        body.update(done=True, done_reason="unload")
        return JSONResponse(body)
    started = time.monotonic()
    deadline = started + manager.settings.request_deadline_s
    completed, _ = await until_disconnect(request, lambda: manager.load(name, keep_alive, deadline))
    if not completed:
        return Response(status_code=CLIENT_GONE)
    body.update(done=True, done_reason="load", total_duration=wire.ns(time.monotonic() - started))
    return JSONResponse(body)


@router.post("/api/generate")
async def generate(request: Request, body: GenerateBody) -> Response:
    if body.raw and (body.template or body.system or body.context):
        raise BadRequest("raw mode does not support template, system, or context")
    check_image_count(request.app.state, body.model, len(body.images or ()))
    images = wire.message_images(body.images, "images", limits_of(request.app.state.settings))
    if not body.prompt and not images:
        return await _load_or_unload(request, body.model, body.keep_alive, "generate")
    gen_request = generate_request(request.app.state.settings, body, images)
    return await _answer(request, body.model, gen_request, body.keep_alive, body.stream, GenerateShapes(body.model))


def generate_request(settings: Any, body: GenerateBody, images: Any = ()) -> GenerationRequest:
    """The generation request of an /api/generate body (the route and async jobs build it here)."""
    messages = []
    if body.system:
        messages.append(ChatMessage("system", body.system))
    messages.append(ChatMessage("user", body.prompt, images=images))
    gen_request = _new_request(messages, body, "generate", settings.request_deadline_s)
    gen_request.raw, gen_request.suffix = body.raw, body.suffix or None
    gen_request.structured = from_ollama_format(body.format)
    return gen_request


@router.post("/api/chat")
async def chat(request: Request, body: ChatBody) -> Response:
    if not body.messages:
        return await _load_or_unload(request, body.model, body.keep_alive, "chat")
    if body.messages[-1].role not in ("user", "tool"):
        raise BadRequest('the last message must have the role "user" or "tool"')
    check_image_count(request.app.state, body.model, sum(len(m.images or ()) for m in body.messages))
    gen_request = chat_request(request.app.state.settings, body)
    return await _answer(request, body.model, gen_request, body.keep_alive, body.stream, ChatShapes(body.model))


def chat_request(settings: Any, body: ChatBody) -> GenerationRequest:
    """The generation request of an /api/chat body (the route and async jobs build it here)."""
    messages = wire.chat_messages(body.messages, limits_of(settings))
    gen_request = _new_request(messages, body, "chat", settings.request_deadline_s)
    gen_request.tools = parse_tools(body.tools)
    gen_request.structured = from_ollama_format(body.format)
    return gen_request


async def answer_body(manager: Any, settings: Any, endpoint: str, raw: dict[str, Any],
                      priority: str = "interactive", deadline: float | None = None) -> tuple[int, str, dict[str, Any]]:
    """(status code, request id, body) that /api/generate or /api/chat answers for `raw`, whole:
    an async job's answer is the one the route gives with stream false; errors as Ollama's."""
    request_id = new_request_id()
    try:
        try:
            body = (GenerateBody if endpoint == "/api/generate" else ChatBody).model_validate(raw)
        except ValidationError as exc:
            return 400, request_id, {"error": f"invalid body: {exc.errors()[0].get('msg')} "
                                              f"({'.'.join(map(str, exc.errors()[0].get('loc', ())))})"}
        if endpoint == "/api/generate":
            if not body.prompt and not body.images:
                raise BadRequest("an async generate needs a prompt (loading and unloading are not jobs)")
            gen_request = generate_request(settings, body, wire.message_images(body.images, "images", limits_of(settings)))
            shapes: GenerateShapes | ChatShapes = GenerateShapes(body.model)
        else:
            if not body.messages or body.messages[-1].role not in ("user", "tool"):
                raise BadRequest('an async chat needs messages, the last with the role "user" or "tool"')
            gen_request = chat_request(settings, body)
            shapes = ChatShapes(body.model)
        gen_request.priority = priority
        gen_request.deadline = deadline or gen_request.deadline
        whole = await (structured_attempts.complete(manager, body.model, gen_request, body.keep_alive)
                       if gen_request.structured is not None
                       else manager.complete(body.model, gen_request, body.keep_alive))
        return 200, gen_request.id, shapes.final(whole.result, whole.content, whole.thinking, whole.tool_calls)
    except EngineError as exc:
        return exc.status_code, request_id, {"error": exc.message}


MIB = 1024 * 1024


def _size_vram(entry: ModelEntry) -> int:
    """The NPU memory the loaded runner claimed (its remain_cmm before and after the load)."""
    return (entry.engine.claimed_npu_memory_mb or 0) * MIB


@router.get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": ollama_name(entry.spec.name),
                "model": ollama_name(entry.spec.name),
                "modified_at": entry.modified_at,
                "size": entry.size_bytes,
                "digest": wire.digest(entry.spec.name),
                "details": wire.details(dict(entry.spec.details)),
            }
            for entry in request.app.state.manager.entries()
        ]
    }


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    models = []
    for entry in request.app.state.manager.entries():
        if not entry.engine.is_loaded:
            continue
        models.append(
            {
                "name": ollama_name(entry.spec.name),
                "model": ollama_name(entry.spec.name),
                "size": entry.size_bytes,
                "digest": wire.digest(entry.spec.name),
                "details": wire.details(dict(entry.spec.details)),
                "expires_at": "0001-01-01T00:00:00Z"
                if entry.expires_at is None
                else rfc3339_in(entry.expires_at - time.monotonic()),
                "size_vram": _size_vram(entry),
                "context_length": entry.spec.context_size,
                "state": entry.engine.state,
            }
        )
    return {"models": models}


@router.post("/api/show")
async def show(request: Request, body: ModelBody) -> dict[str, Any]:
    requested = body.model or body.name
    if not requested:
        raise BadRequest("model is required")
    entry = request.app.state.manager.entry(requested)
    spec = entry.spec
    return show_answer(ShowInput(
        name=ollama_name(spec.name),
        engine=spec.engine,
        details=wire.details(dict(spec.details)),
        context_size=spec.context_size,
        include_thinking=spec.include_thinking,
        modified_at=entry.modified_at,
        form=await entry.engine.prompt_format(),
        facts=entry.engine.model_facts(),
        system=spec.system_prompt,
        embedding=spec.embedding_model,
        vision=entry.engine.accepts_images(),
    ))


def _options_warnings(options: wire.Options | None) -> list[str]:
    given = sorted(k for k, v in (options.model_dump(exclude_none=True) if options else {}).items())
    return [f"options {', '.join(given)}: not applied to embeddings"] if given else []


@router.post("/api/embed")
async def embed(request: Request, body: wire.EmbedBody) -> Response:
    """Vectors for one input or a list (Open WebUI, Continue, LangChain's OllamaEmbeddings)."""
    manager = request.app.state.manager
    inputs = [body.input] if isinstance(body.input, str) else list(body.input)
    if not inputs:  # Ollama loads the model for an empty input
        seconds = await manager.load(body.model, body.keep_alive)
        return JSONResponse({"model": body.model, "embeddings": [], "load_duration": wire.ns(seconds)})
    options = EmbedOptions(dimensions=body.dimensions, truncate=body.truncate)
    completed, result = await until_disconnect(
        request, lambda: manager.embed(body.model, inputs, new_request_id(), options, body.keep_alive))
    if not completed:
        return Response(status_code=CLIENT_GONE)
    result.warnings.extend(_options_warnings(body.options))
    return JSONResponse(wire.embed_answer(body.model, result))


@router.post("/api/embeddings")
async def embeddings_legacy(request: Request, body: wire.LegacyEmbeddingsBody) -> Response:
    """The older form: `prompt` in, `embedding` out."""
    manager = request.app.state.manager
    if not body.prompt:
        await manager.load(body.model, body.keep_alive)
        return JSONResponse({"embedding": []})
    completed, result = await until_disconnect(
        request, lambda: manager.embed(body.model, [body.prompt], new_request_id(), EmbedOptions(), body.keep_alive))
    if not completed:
        return Response(status_code=CLIENT_GONE)
    answer: dict[str, Any] = {"embedding": result.vectors[0]}
    if warnings := result.warnings + _options_warnings(body.options):
        answer["warnings"] = warnings
    return JSONResponse(answer)


@router.post("/api/pull")
async def pull(request: Request, body: PullBody) -> Response:
    """A model the daemon has is "pulled" already: Ollama's progress, ending in success (Home
    Assistant pulls the model it picked before it uses it). One it lacks cannot be fetched yet."""
    requested = body.model or body.name
    if not requested:
        raise BadRequest("model is required")
    try:
        entry = request.app.state.manager.entry(requested)
    except ModelNotFound:
        repo = hub_repo(requested)
        if repo is None:
            raise EngineError(wire.PULL_MISSING.format(name=requested), status_code=404) from None
        return await _pull_from_hub(request, repo, body.stream)
    progress = wire.pull_progress(wire.digest(entry.spec.name), entry.size_bytes)
    if not body.stream:
        return JSONResponse(progress[-1])
    lines = [(json.dumps(item) + "\n").encode() for item in progress]

    async def stream() -> AsyncIterator[bytes]:
        for line in lines:
            yield line

    return StreamingResponse(stream(), media_type="application/x-ndjson")


async def _pull_from_hub(request: Request, repo: str, stream: bool) -> Response:
    """Fetch a published folder into the model directory; discovery then serves it."""
    manager = request.app.state.manager
    settings = request.app.state.settings
    models_dir = Path(settings.descriptor).resolve().parent
    lines: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()  # the download thread's progress
    outcome: dict[str, Any] = {}

    done = threading.Event()

    def work() -> None:
        # A thread of its own, not the request's: a client that goes away leaves the download to
        # finish (the folder then appears), and nothing of it runs on the event loop.
        try:
            pull_folder(repo, models_dir, lines.put, endpoint=settings.hub_endpoint, token=settings.hub_token)
        except PullError as exc:
            outcome["error"] = exc
        finally:
            done.set()

    def finish(line: dict[str, Any]) -> dict[str, Any]:
        if line.get("status") == "success" and not settings.discover_models:
            line["warning"] = "discover_models is off: add a descriptor entry for the folder to serve it"
        return line

    threading.Thread(target=work, name=f"pull {repo}", daemon=True).start()
    if not stream:
        while not done.is_set():
            await anyio.sleep(0.2)
        await manager.reload_descriptor()  # served now, not at the next poll
        if "error" in outcome:
            raise EngineError(outcome["error"].message, status_code=outcome["error"].status_code)
        return JSONResponse(finish({"status": "success"}))

    async def progress() -> AsyncIterator[bytes]:
        while True:
            finished = done.is_set()
            while not lines.empty():
                line = finish(lines.get())
                if line.get("status") == "success":
                    await manager.reload_descriptor()
                yield (json.dumps(line) + "\n").encode()
            if finished:
                break
            await anyio.sleep(0.2)
        if "error" in outcome:
            yield wire.error_line(outcome["error"].message)

    return StreamingResponse(progress(), media_type="application/x-ndjson")


@router.delete("/api/delete")
async def delete(request: Request, body: ModelBody) -> Response:
    """Remove a model folder the daemon found (pulled or dropped in); one the descriptor names
    stays: its entry is the user's to remove."""
    manager = request.app.state.manager
    name = manager.resolve(body.model or body.name or "")
    if name not in manager.found:
        raise BadRequest(f'"{name}" is named in the model descriptor: remove its entry there (its files stay)')
    folder = manager.entry(name).spec.config.model_path
    await manager.unload(name)
    await anyio.to_thread.run_sync(delete_folder, folder)
    await manager.reload_descriptor()
    return JSONResponse({})


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": wire.OLLAMA_API_VERSION, "axm1_llm_version": __version__}


@router.get("/", response_class=PlainTextResponse)
@router.head("/", response_class=PlainTextResponse)
async def root() -> str:
    return "Ollama is running"
