"""Ollama's API on port 11535: generate, chat, tags, ps, show, version, and `/`.

Wire format as Ollama's: NDJSON streaming by default, durations in nanoseconds, errors as
`{"error": "..."}` with a status code before the first byte and as one last NDJSON line after.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..engines.base import (
    BadRequest,
    ChatMessage,
    Chunk,
    EngineError,
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
)
from ..models import requested_keep_alive
from ..states import rfc3339
from .streaming import PrefetchedStream, collect, new_request_id, open_stream, until_disconnect

router = APIRouter()

# The Ollama API version whose wire format this daemon speaks (clients gate features on it).
OLLAMA_API_VERSION = "0.12.0"


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    stream: bool = True
    format: Any = None
    options: dict[str, Any] | None = None
    keep_alive: str | float | int | None = None
    think: bool | str | None = None


class GenerateBody(_Common):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None


class ChatBody(_Common):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[Any] | None = None


class ModelBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    name: str | None = None  # older clients send `name`


def now_rfc3339() -> str:
    return rfc3339(time.time())


def sampling_options(options: dict[str, Any] | None) -> SamplingOptions:
    """Ollama's `options` object; unknown keys are accepted and ignored, as Ollama does."""
    options = options or {}
    stop = options.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    try:
        return SamplingOptions(
            temperature=_number(options, "temperature", float),
            top_p=_number(options, "top_p", float),
            top_k=_number(options, "top_k", int),
            seed=_number(options, "seed", int),
            repeat_penalty=_number(options, "repeat_penalty", float),
            num_predict=_number(options, "num_predict", int),
            num_ctx=_number(options, "num_ctx", int),
            stop=tuple(str(s) for s in stop),
        )
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"invalid options: {exc}") from None


def _number(options: dict[str, Any], name: str, kind: type) -> Any:
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"options.{name} must be a number")
    return kind(value)


def _think(value: bool | str | None) -> bool | None:
    if isinstance(value, str):  # gpt-oss style levels ("low", "high") mean "on"
        return value.lower() not in ("", "false", "none", "off")
    return value


def _ns(seconds: float | None) -> int:
    return int((seconds or 0.0) * 1e9)


def final_fields(result: GenerationResult) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "done_reason": result.finish_reason,
        "total_duration": _ns(result.total_duration),
        "load_duration": _ns(result.load_duration),
        "prompt_eval_count": result.prompt_tokens,
        "prompt_eval_duration": _ns(result.prompt_eval_duration),
        "eval_count": result.completion_tokens,
        "eval_duration": _ns(result.eval_duration),
    }
    if result.warnings:
        fields["warnings"] = result.warnings
    return fields


def _check_unsupported(images: list[str] | None, messages: list[OllamaMessage] = ()) -> None:
    if images or any(m.images for m in messages):
        raise BadRequest("images are not supported: the card's runners take text only")


async def _answer(
    request: Request,
    model: str,
    gen_request: GenerationRequest,
    keep_alive: Any,
    stream: bool,
    shape,
) -> Response:
    """Run a generation and answer it as NDJSON or one JSON object; `shape` builds each object."""
    manager = request.app.state.manager
    answer = await open_stream(request, manager.generate(model, gen_request, keep_alive=keep_alive))
    if answer is None:
        return Response(status_code=499)
    headers = {"X-Request-Id": gen_request.id}
    if stream:
        return StreamingResponse(_ndjson(answer, shape), media_type="application/x-ndjson", headers=headers)
    completed, body = await until_disconnect(request, lambda: collect(answer, shape))
    if not completed:
        return Response(status_code=499)
    return JSONResponse(body, headers=headers)


async def _ndjson(answer: PrefetchedStream, shape) -> AsyncIterator[bytes]:
    try:
        async for item in answer.items():
            yield (json.dumps(shape(item)) + "\n").encode()
    except EngineError as exc:
        yield (json.dumps({"error": exc.message}) + "\n").encode()


def _generate_shape(model: str):
    def shape(item: Chunk | GenerationResult, content: str = "", thinking: str = "") -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "created_at": now_rfc3339()}
        if isinstance(item, Chunk):
            body["response"] = item.content
            if item.thinking:
                body["thinking"] = item.thinking
            body["done"] = False
            return body
        body["response"] = content
        if thinking:
            body["thinking"] = thinking
        body["done"] = True
        body.update(final_fields(item))
        return body

    return shape


def _chat_shape(model: str):
    def shape(item: Chunk | GenerationResult, content: str = "", thinking: str = "") -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "created_at": now_rfc3339()}
        if isinstance(item, Chunk):
            message = {"role": "assistant", "content": item.content}
            if item.thinking:
                message["thinking"] = item.thinking
            body["message"] = message
            body["done"] = False
            return body
        message = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        body["message"] = message
        body["done"] = True
        body.update(final_fields(item))
        return body

    return shape


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
    completed, _ = await until_disconnect(request, lambda: manager.load(name, keep_alive, started + manager.settings.request_deadline_s))
    if not completed:
        return Response(status_code=499)
    body.update(done=True, done_reason="load", total_duration=_ns(time.monotonic() - started))
    return JSONResponse(body)


@router.post("/api/generate")
async def generate(request: Request, body: GenerateBody) -> Response:
    if body.raw and (body.template or body.system or body.context):
        raise BadRequest("raw mode does not support template, system, or context")
    _check_unsupported(body.images)
    if not body.prompt:
        return await _load_or_unload(request, body.model, body.keep_alive, "generate")
    messages = []
    if body.system:
        messages.append(ChatMessage("system", body.system))
    messages.append(ChatMessage("user", body.prompt))
    gen_request = GenerationRequest(
        id=new_request_id(),
        messages=messages,
        options=sampling_options(body.options),
        kind="generate",
        think=_think(body.think),
    )
    return await _answer(request, body.model, gen_request, body.keep_alive, body.stream, _generate_shape(body.model))


@router.post("/api/chat")
async def chat(request: Request, body: ChatBody) -> Response:
    _check_unsupported(None, body.messages)
    if not body.messages:
        return await _load_or_unload(request, body.model, body.keep_alive, "chat")
    if body.messages[-1].role != "user":
        raise BadRequest("the last message must have the role \"user\"")
    gen_request = GenerationRequest(
        id=new_request_id(),
        messages=[ChatMessage(m.role, m.content) for m in body.messages],
        options=sampling_options(body.options),
        kind="chat",
        think=_think(body.think),
    )
    return await _answer(request, body.model, gen_request, body.keep_alive, body.stream, _chat_shape(body.model))


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _details(raw: dict[str, Any]) -> dict[str, Any]:
    families = raw.get("families")
    if isinstance(families, str):
        families = [f.strip() for f in families.split(",") if f.strip()]
    return {
        "parent_model": "",
        "format": raw.get("format", "axmodel"),
        "family": raw.get("family", ""),
        "families": families or ([raw["family"]] if raw.get("family") else None),
        "parameter_size": raw.get("parameter_size", ""),
        "quantization_level": raw.get("quantization_level", ""),
    }


@router.get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    models = []
    for model in request.app.state.manager.list_models():
        models.append(
            {
                "name": model["name"],
                "model": model["name"],
                "modified_at": model["modified_at"],
                "size": (model["npu_memory_mb"] or 0) * 1024 * 1024,
                "digest": _digest(model["name"]),
                "details": _details(model["details"]),
            }
        )
    return {"models": models}


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    models = request.app.state.manager.loaded()
    for model in models:
        model["details"] = _details(model["details"])
    return {"models": models}


@router.post("/api/show")
async def show(request: Request, body: ModelBody) -> dict[str, Any]:
    requested = body.model or body.name
    if not requested:
        raise BadRequest("model is required")
    manager = request.app.state.manager
    name = manager.resolve(requested)
    model = next(m for m in manager.list_models() if m["name"] == name)
    details = _details(model["details"])
    capabilities = ["completion"]
    if model["include_thinking"]:
        capabilities.append("thinking")
    return {
        "modelfile": f"# served by axm1-llm from the card's runner ({model['engine']})\nFROM {name}\n",
        "parameters": "",
        "template": "{{ .Prompt }}",
        "details": details,
        "model_info": {
            "general.architecture": details["family"] or "unknown",
            "general.basename": name,
            f"{details['family'] or 'llm'}.context_length": model["context_size"],
        },
        "capabilities": capabilities,
        "modified_at": model["modified_at"],
    }


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": OLLAMA_API_VERSION, "axm1_llm_version": __version__}


@router.get("/", response_class=PlainTextResponse)
@router.head("/", response_class=PlainTextResponse)
async def root() -> str:
    return "Ollama is running"
