"""Tools as text, in the Hermes/Qwen form: what a model reads when its chat template cannot take
them itself. Pure: no I/O, no tokenizer.

Shared by our tokenizer server (a template without tool support gets the definitions in its
system prompt, calls and results as text) and the daemon (a stock tokenizer script gets them in
the prompt line). The wording is Qwen2.5's own template's, the form Hermes-style models and the
daemon's recogniser (`llm_service/tool_calls.py`) know.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
RESPONSE_OPEN = "<tool_response>"
RESPONSE_CLOSE = "</tool_response>"

_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def tools_block(tools: Sequence[Mapping[str, Any]]) -> str:
    """The definitions as Qwen2.5's template writes them into its system message."""
    return _TOOLS_HEAD + "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools) + _TOOLS_TAIL


def with_tools(system: str | None, tools: Sequence[Mapping[str, Any]] | None) -> str | None:
    """A system prompt followed by the tools block (the block alone without a system prompt)."""
    if not tools:
        return system
    return (system + "\n\n" if system else "") + tools_block(tools)


def call_text(name: str, arguments: Any) -> str:
    """One call as a model writes it."""
    return f"{CALL_OPEN}\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + f"\n{CALL_CLOSE}"


def assistant_text(content: str, calls: Iterable[tuple[str, Any]]) -> str:
    """An assistant message that made calls, as text: its content, then each call."""
    blocks = [call_text(name, arguments) for name, arguments in calls]
    if not blocks:
        return content
    return (content + "\n" if content else "") + "\n".join(blocks)


def responses_text(contents: Iterable[str]) -> str:
    """Tool results as the user message Qwen's template makes of consecutive tool messages."""
    return "\n".join(f"{RESPONSE_OPEN}\n{content}\n{RESPONSE_CLOSE}" for content in contents)


def calls_of(message: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(name, arguments) of the calls in a message in Hugging Face's chat format
    (`tool_calls: [{type, function: {name, arguments}}]`)."""
    calls = []
    for call in message.get("tool_calls") or ():
        function = call.get("function", call) if isinstance(call, Mapping) else {}
        calls.append((str(function.get("name", "")), function.get("arguments", {})))
    return calls


def as_text_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that knows neither calls nor tool messages: an assistant's calls
    become text in its content, a run of tool messages one user message of `<tool_response>`s."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            text = responses_text([str(message.get("content") or "")])
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_tool_results": True})
        elif role == "assistant" and message.get("tool_calls"):
            out.append({"role": "assistant", "content": assistant_text(str(message.get("content") or ""), calls_of(message))})
        else:
            out.append({"role": role, "content": str(message.get("content") or "")})
    for message in out:
        message.pop("_tool_results", None)
    return out
