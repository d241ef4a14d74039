"""OpenAI wire format: request bodies in, chunks and answers out, errors in OpenAI's envelope.

Pure: no I/O. The routes in `routes.py` do the talking; error bodies come from `api/errors.py`.
"""
from __future__ import annotations

import base64
import struct
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...engines.base import BadRequest, ChatMessage, Chunk, GenerationResult, SamplingOptions, ToolCall
from ...images import ImageInput, ImageLimits, check_image, decode_data_url
from ..tool_wire import openai_tool_call_deltas, openai_tool_calls, tool_names_by_id, wire_tool_calls

# Thinking goes out under both names: Ollama and vLLM clients read `reasoning`,
# llama.cpp's and many others read `reasoning_content`.
REASONING_KEYS = ("reasoning", "reasoning_content")
INT_LIMIT = 2**31 - 1  # integer fields beyond this are mistakes


class _Lenient(BaseModel):
    # Clients send many fields we do not use (tools, logprobs, user, …); accept and ignore them.
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Lenient):
    include_usage: bool = False


class ContentPart(_Lenient):
    type: str
    text: str | None = None
    image_url: dict[str, Any] | str | None = None  # {"url": "data:image/...;base64,..." | "https://...", "detail"}


class OpenAIMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[Any] | None = None  # an assistant's: [{id, type: function, function: {name, arguments: str}}]
    tool_call_id: str | None = None  # a tool message's: the call it answers
    name: str | None = None


class _Sampling(_Lenient):
    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, le=INT_LIMIT)  # vLLM's extension
    seed: int | None = Field(None, ge=-INT_LIMIT, le=INT_LIMIT)
    max_tokens: int | None = Field(None, ge=1, le=INT_LIMIT)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)


class ChatCompletionBody(_Sampling):
    messages: list[OpenAIMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT_LIMIT)
    reasoning_effort: str | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # accepted; a model may make several calls either way
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {name, schema, strict}};
    # checked by structured/requests.py, whose messages name what is wrong.
    response_format: Any = None


class CompletionBody(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None  # fill in the middle: the text after the prompt


class EmbeddingBody(_Lenient):
    model: str = Field(min_length=1)
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=65536)


def part_url(part: ContentPart, where: str) -> str:
    """The URL of an `image_url` part (the object form, or a bare string some clients send)."""
    value = part.image_url
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise BadRequest(f"{where}: an image_url part needs image_url.url (a data URL or an http(s) URL)")
    return url


def image_urls(body: ChatCompletionBody) -> list[tuple[str, str]]:
    """Every (where, url) of the request's image_url parts, in order."""
    found = []
    for i, m in enumerate(body.messages):
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                if part.type == "image_url":
                    where = f"messages[{i}].content[{j}].image_url"
                    found.append((where, part_url(part, where)))
    return found


def message_text(message: OpenAIMessage) -> str:
    """A message's text: its string, or its text parts joined; an image part is taken by
    `message_images`, any other part is a BadRequest."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.type == "image_url":
            continue
        if part.type != "text":
            raise BadRequest(f'content parts of type "{part.type}" are not supported: the models take text and '
                             "image_url parts")
        texts.append(part.text or "")
    return "".join(texts)


def message_images(message: OpenAIMessage, i: int, limits: ImageLimits, fetched: dict[str, bytes]) -> tuple[ImageInput, ...]:
    """The message's image_url parts, checked: data URLs decoded, http(s) URLs from `fetched`
    (the route fetched them where the settings allow; else it refused them)."""
    if not isinstance(message.content, list):
        return ()
    images = []
    for j, part in enumerate(message.content):
        if part.type != "image_url":
            continue
        where = f"messages[{i}].content[{j}].image_url"
        url = part_url(part, where)
        if url.startswith("data:"):
            images.append(decode_data_url(url, where, limits))
        elif url in fetched:
            images.append(check_image(fetched[url], where, limits))
        else:
            raise BadRequest(f"{where}: only data URLs (data:image/<type>;base64,...) are taken here"
                             + ("; http(s) image URLs are not fetched (setting image_url_fetch is off)"
                                if url.startswith(("http://", "https://")) else ""))
    return tuple(images)


def sampling_options(body: _Sampling, max_tokens: int | None) -> SamplingOptions:
    if body.n != 1:
        raise BadRequest("n must be 1: one answer per request")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingOptions(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        num_predict=max_tokens,
        stop=stop,
    )


def chat_messages(body: ChatCompletionBody, limits: ImageLimits = ImageLimits(),
                  fetched: dict[str, bytes] | None = None) -> list[ChatMessage]:
    messages = []
    names: dict[str, str] = {}  # call id -> function name, from the assistant messages so far
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        calls = wire_tool_calls(m.tool_calls, f"messages[{i}]") if role == "assistant" else ()
        names.update(tool_names_by_id(calls))
        if role == "tool":
            name = m.name or names.get(m.tool_call_id or "")
            messages.append(ChatMessage("tool", message_text(m), tool_name=name, tool_call_id=m.tool_call_id))
        else:
            messages.append(ChatMessage(role, message_text(m), calls, images=message_images(m, i, limits, fetched or {})))
    if messages[-1].role not in ("user", "tool"):
        raise BadRequest('the last message must have the role "user" or "tool"')
    return messages


def completion_prompt(body: CompletionBody) -> str:
    if isinstance(body.prompt, str):
        return body.prompt
    if len(body.prompt) != 1:
        raise BadRequest("prompt must be one string: one answer per request")
    return body.prompt[0]


def wants_thinking(body: ChatCompletionBody) -> bool | None:
    """OpenAI's `reasoning_effort`: "none" turns reasoning off; any other level asks for it."""
    if body.reasoning_effort is None:
        return None
    return body.reasoning_effort.lower() != "none"


def usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def finish_reason(result: GenerationResult, made_calls: bool = False) -> str:
    if made_calls:
        return "tool_calls"
    return "length" if result.finish_reason == "length" else "stop"


class ChatShapes:
    """Objects of one chat completion, streamed (`chat.completion.chunk`) or whole."""

    def __init__(self, completion_id: str, model: str, created: int, include_usage: bool) -> None:
        self.id = completion_id
        self.model = model
        self.created = created
        self.include_usage = include_usage
        self.calls = 0  # tool calls sent so far (their stream index)

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = None  # OpenAI's chunks carry null usage until the last one
        body.update(extra)
        return body

    def role_chunk(self) -> dict[str, Any]:
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])

    def delta_chunk(self, chunk: Chunk) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if chunk.content:
            delta["content"] = chunk.content
        if chunk.thinking:
            delta.update(dict.fromkeys(REASONING_KEYS, chunk.thinking))
        if chunk.tool_calls:
            delta["tool_calls"] = openai_tool_call_deltas(chunk.tool_calls, self.calls)
            self.calls += len(chunk.tool_calls)
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def final_chunks(self, result: GenerationResult) -> list[dict[str, Any]]:
        extra = {"warnings": result.warnings} if result.warnings else {}
        finish = finish_reason(result, self.calls > 0)
        chunks = [self._chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}], **extra)]
        if self.include_usage:
            chunks.append(self._chunk([], usage=usage(result)))
        return chunks

    def whole(self, result: GenerationResult, content: str, thinking: str, tool_calls: tuple[ToolCall, ...] = ()) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if thinking:
            message.update(dict.fromkeys(REASONING_KEYS, thinking))
        if tool_calls:
            message["tool_calls"] = openai_tool_calls(tool_calls)
            message["content"] = content or None  # as OpenAI answers a message that only calls
        body = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish_reason(result, bool(tool_calls))}],
            "usage": usage(result),
        }
        if result.warnings:
            body["warnings"] = result.warnings
        return body


class CompletionShapes:
    """Objects of one legacy text completion (`text_completion`), streamed or whole."""

    def __init__(self, completion_id: str, model: str, created: int, include_usage: bool) -> None:
        self.id = completion_id
        self.model = model
        self.created = created
        self.include_usage = include_usage

    def _body(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        body = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        body.update(extra)
        return body

    @staticmethod
    def _choice(text: str, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def text_chunk(self, text: str) -> dict[str, Any]:
        return self._body([self._choice(text, None)])

    def final_chunks(self, result: GenerationResult) -> list[dict[str, Any]]:
        extra = {"warnings": result.warnings} if result.warnings else {}
        chunks = [self._body([self._choice("", finish_reason(result))], **extra)]
        if self.include_usage:
            chunks.append(self._body([], usage=usage(result)))
        return chunks

    def whole(self, result: GenerationResult, text: str) -> dict[str, Any]:
        body = self._body([self._choice(text, finish_reason(result))], usage=usage(result))
        if result.warnings:
            body["warnings"] = result.warnings
        return body


def embedding_list(model: str, vectors: list[list[float]], prompt_tokens: int, encoding: str,
                   warnings: list[str] = ()) -> dict[str, Any]:
    def encoded(vector: list[float]) -> list[float] | str:
        if encoding == "base64":  # little-endian float32, as OpenAI sends it
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        return vector

    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        **({"warnings": list(warnings)} if warnings else {}),
    }


def model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "axm1-llm"}
