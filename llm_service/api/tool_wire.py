"""Tool calls and tool messages in Ollama's and OpenAI's wire formats. Pure: no I/O.

In: an assistant message's `tool_calls` (Ollama: arguments an object; OpenAI: a JSON string)
and `tool` messages (Ollama's `tool_name`; OpenAI's `tool_call_id`, whose call names the tool).
Out: Ollama's `message.tool_calls` (`{id, function: {index, name, arguments: object}}`) and
OpenAI's `tool_calls` (`{id, type: "function", function: {name, arguments: JSON string}}`, in a
stream with `index`).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from ..engines.base import BadRequest, ToolCall
from ..tool_calls import call_from


def wire_tool_calls(raw: Any, where: str) -> tuple[ToolCall, ...]:
    """An assistant message's `tool_calls` as sent by a client, in either API's form."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise BadRequest(f"{where}.tool_calls must be a list")
    calls = []
    for i, item in enumerate(raw):
        call = call_from(item, tagged=True) if isinstance(item, dict) else None
        if call is None:
            raise BadRequest(
                f"{where}.tool_calls[{i}] must be {{function: {{name, arguments}}}} with arguments a JSON object "
                "(or, for OpenAI, a string holding one)"
            )
        calls.append(call)
    return tuple(calls)


def tool_names_by_id(calls: Iterable[ToolCall]) -> dict[str, str]:
    return {call.id: call.name for call in calls if call.id}


def ollama_tool_calls(calls: Sequence[ToolCall], first_index: int = 0) -> list[dict[str, Any]]:
    return [
        {"id": call.id, "function": {"index": first_index + i, "name": call.name, "arguments": call.arguments}}
        for i, call in enumerate(calls)
    ]


def openai_tool_calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    return [
        {"id": call.id, "type": "function",
         "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
        for call in calls
    ]


def openai_tool_call_deltas(calls: Sequence[ToolCall], first_index: int) -> list[dict[str, Any]]:
    """Whole calls as stream deltas: each complete in one delta, with its index."""
    return [{"index": first_index + i, **call} for i, call in enumerate(openai_tool_calls(calls))]
