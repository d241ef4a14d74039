"""Ollama's wire format: request bodies in, answer objects and model listings out.

Pure: no I/O. The routes in `routes.py` do the talking.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ...engines.base import ChatMessage, Chunk, Embeddings, GenerationResult, SamplingOptions, StatusNote, ToolCall
from ...timestamps import now_rfc3339
from ...images import ImageInput, ImageLimits, decode_base64_image
from ..tool_wire import ollama_tool_calls, wire_tool_calls

# The Ollama API version whose wire format this daemon speaks (clients gate features on it).
OLLAMA_API_VERSION = "0.12.0"


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""  # null: an assistant message that only made calls
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[Any] | None = None  # an assistant's: [{function: {name, arguments: {…}}}]
    tool_name: str | None = None  # a tool message's: the tool whose result it is


# Bounds of the numeric options: beyond them a value is a mistake (or 1e400, which JSON parses
# as infinity and int() cannot take).
INT_LIMIT = 2**31 - 1


class Options(BaseModel):
    """Ollama's `options`. The ones the daemon reads are typed and bounded, so a bad value is a
    400 naming it (and the OpenAPI description, which the fuzzing reads, says so); the others
    Ollama knows (num_gpu, mirostat, …) are accepted and ignored, as Ollama does."""

    model_config = ConfigDict(extra="allow", ser_json_inf_nan="null")
    temperature: float | None = Field(None, ge=-INT_LIMIT, le=INT_LIMIT, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=-INT_LIMIT, le=INT_LIMIT, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-INT_LIMIT, le=INT_LIMIT)
    seed: int | None = Field(None, ge=-INT_LIMIT, le=INT_LIMIT)
    repeat_penalty: float | None = Field(None, ge=-INT_LIMIT, le=INT_LIMIT, allow_inf_nan=False)
    num_predict: int | None = Field(None, ge=-INT_LIMIT, le=INT_LIMIT)
    num_ctx: int | None = Field(None, ge=-INT_LIMIT, le=INT_LIMIT)
    stop: str | list[str] | None = None

    @field_validator("temperature", "top_p", "top_k", "seed", "repeat_penalty", "num_predict", "num_ctx", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # true is 1 to Python, never a number to a user
            raise ValueError("must be a number, not a boolean")
        return value


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    stream: bool = True
    format: Any = None
    options: Options | None = None
    keep_alive: str | float | int | None = None
    think: bool | str | None = None
    # Ours, opt-in: status lines (queued, loading with progress, loaded, generating, done) in the
    # stream before and after the answer's own lines.
    status_events: bool = False


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


def message_images(images: list[str] | None, where: str, limits: ImageLimits) -> tuple[ImageInput, ...]:
    """Ollama's `images`: base64 strings, each checked (llm_service/images.py)."""
    return tuple(decode_base64_image(value, f"{where}[{j}]", limits) for j, value in enumerate(images or ()))


def chat_messages(messages: list[OllamaMessage], limits: ImageLimits = ImageLimits()) -> list[ChatMessage]:
    """The request's messages, tool calls and tool results included (`name` and
    `tool_call_id`, which some clients send on tool messages, are taken too), and their images."""
    out = []
    for i, m in enumerate(messages):
        extra = m.model_extra or {}
        name = m.tool_name or (extra.get("name") if isinstance(extra.get("name"), str) else None)
        call_id = extra.get("tool_call_id") if isinstance(extra.get("tool_call_id"), str) else None
        out.append(ChatMessage(
            m.role, m.content or "", wire_tool_calls(m.tool_calls, f"messages[{i}]") if m.role == "assistant" else (),
            tool_name=name if m.role == "tool" else None, tool_call_id=call_id if m.role == "tool" else None,
            images=message_images(m.images, f"messages[{i}].images", limits),
        ))
    return out


class ModelBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    name: str | None = None  # older clients send `name`


class EmbedBody(BaseModel):
    """`/api/embed`: one input or a list, Ollama's `truncate` (default true) and `dimensions`."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[str] = Field(default_factory=list)
    truncate: bool = True
    dimensions: int | None = Field(None, ge=1, le=65536)
    keep_alive: str | float | int | None = None
    options: Options | None = None


class LegacyEmbeddingsBody(BaseModel):
    """`/api/embeddings`, the older form: one `prompt`, one `embedding`."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    prompt: str = ""
    keep_alive: str | float | int | None = None
    options: Options | None = None


def embed_answer(model: str, embeddings: Embeddings) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "model": model,
        "embeddings": embeddings.vectors,
        "total_duration": ns(embeddings.total_duration),
        "load_duration": ns(embeddings.load_duration),
        "prompt_eval_count": embeddings.prompt_tokens,
    }
    if embeddings.warnings:
        answer["warnings"] = embeddings.warnings
    return answer


class PullBody(ModelBody):
    insecure: bool | None = None
    stream: bool = True


# Where a model comes from on this daemon, said where a client asks for one it lacks.
PULL_MISSING = (
    'pull model manifest: file does not exist: model "{name}" is not on this daemon, and it names no '
    "repository of the model hub. Pull a published folder by its repository (e.g. "
    '"AXERA-TECH/Qwen3-1.7B"), or put the folder beside model-descriptor.json; the daemon picks it '
    "up within seconds (README: Adding a model)."
)


def pull_progress(digest_hex: str, size: int) -> list[dict[str, Any]]:
    """Ollama's progress objects for a model that is already here: every layer is complete."""
    return [
        {"status": "pulling manifest"},
        {"status": f"pulling {digest_hex[:12]}", "digest": f"sha256:{digest_hex}", "total": size, "completed": size},
        {"status": "verifying sha256 digest"},
        {"status": "writing manifest"},
        {"status": "success"},
    ]


def sampling_options(options: Options | None) -> SamplingOptions:
    options = options or Options()
    stop = options.stop or ()
    if isinstance(stop, str):
        stop = (stop,)
    return SamplingOptions(
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        seed=options.seed,
        repeat_penalty=options.repeat_penalty,
        num_predict=options.num_predict,
        num_ctx=options.num_ctx,
        stop=tuple(stop),
    )


def think_flag(value: bool | str | None) -> bool | None:
    if isinstance(value, str):  # gpt-oss style levels ("low", "high") mean "on"
        return value.lower() not in ("", "false", "none", "off")
    return value


def ns(seconds: float | None) -> int:
    return int((seconds or 0.0) * 1e9)


def final_fields(result: GenerationResult) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "done_reason": result.finish_reason,
        "total_duration": ns(result.total_duration),
        "load_duration": ns(result.load_duration),
        "prompt_eval_count": result.prompt_tokens,
        "prompt_eval_duration": ns(result.prompt_eval_duration),
        "eval_count": result.completion_tokens,
        "eval_duration": ns(result.eval_duration),
    }
    if result.warnings:
        fields["warnings"] = result.warnings
    return fields


def status_line(model: str, note: StatusNote) -> bytes:
    """A status line of a stream that asked for them: never mistaken for an answer line (no
    `response` or `message` key: its text is `status_message`; `done` false)."""
    body = {"model": model, "created_at": now_rfc3339(), "status": note.status, "status_message": note.message,
            **note.details, "done": False}
    return (json.dumps(body) + "\n").encode()


def error_line(message: str) -> bytes:
    """The last NDJSON line of a stream that failed after it began."""
    return (json.dumps({"error": message}) + "\n").encode()


class GenerateShapes:
    """Objects of one /api/generate answer, streamed or whole."""

    def __init__(self, model: str) -> None:
        self.model = model

    def chunk(self, item: Chunk) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "created_at": now_rfc3339(), "response": item.content}
        if item.thinking:
            body["thinking"] = item.thinking
        body["done"] = False
        return body

    def final(self, result: GenerationResult, content: str = "", thinking: str = "",
              tool_calls: tuple[ToolCall, ...] = ()) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "created_at": now_rfc3339(), "response": content}
        if thinking:
            body["thinking"] = thinking
        body["done"] = True
        body.update(final_fields(result))
        return body


class ChatShapes:
    """Objects of one /api/chat answer, streamed or whole."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.calls = 0  # tool calls sent so far (Ollama numbers them with `index`)

    def _calls(self, calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
        out = ollama_tool_calls(calls, self.calls)
        self.calls += len(calls)
        return out

    def chunk(self, item: Chunk) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": item.content}
        if item.thinking:
            message["thinking"] = item.thinking
        if item.tool_calls:
            message["tool_calls"] = self._calls(item.tool_calls)
        return {"model": self.model, "created_at": now_rfc3339(), "message": message, "done": False}

    def final(self, result: GenerationResult, content: str = "", thinking: str = "",
              tool_calls: tuple[ToolCall, ...] = ()) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        if tool_calls:
            message["tool_calls"] = self._calls(tool_calls)
        body: dict[str, Any] = {"model": self.model, "created_at": now_rfc3339(), "message": message, "done": True}
        body.update(final_fields(result))
        return body


def digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def details(raw: dict[str, Any]) -> dict[str, Any]:
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
