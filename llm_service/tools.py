"""Tools in a request: their definitions, `tool_choice`, and tool messages, as every engine and
route needs them. Pure, no I/O.

How `tool_choice` is applied on a model that cannot constrain its sampling (the card's runners,
and any model behind our tokenizer server):
- `auto`: the definitions reach the model; calls in its answer are recognised.
- `none`: the definitions are not given to the model at all and nothing is recognised as a call.
- `required`: the definitions, and an instruction in the system prompt to answer with a call.
  The answer is held back until it holds a call; one without is retried once, as a follow-up
  turn asking for the call (the runner continues its conversation: no re-prefill), and then
  fails with a 422 that says so (`tool_stream.ToolChoiceUnmet`).
- a named function: as `required`, with only that function's definition given, and only a call
  of it counts.
HTTP upstreams get `tools` and `tool_choice` as sent: the upstream applies them; the same check
of the answer applies.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from .engines.base import BadRequest, ChatMessage, GenerationRequest, ToolCall, ToolChoice
from tokenizer_service.tool_prompt import CALL_CLOSE, CALL_OPEN

# Answers a `required` or named tool_choice gets before it fails: the first and one retry.
TOOL_CHOICE_ATTEMPTS = 2


def parse_tools(raw: Any) -> list[dict[str, Any]] | None:
    """The request's `tools`, checked and in the one form templates and upstreams take:
    `[{"type": "function", "function": {"name", "description"?, "parameters"?}}]`."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise BadRequest("tools must be a list of {type: function, function: {name, description, parameters}}")
    tools = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(tool.get("function"), dict):
            raise BadRequest(f"tools[{i}]: must be {{type: function, function: {{name, description, parameters}}}}")
        function = dict(tool["function"])
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise BadRequest(f"tools[{i}].function.name: a function needs a name")
        if "parameters" in function and function["parameters"] is not None and not isinstance(function["parameters"], dict):
            raise BadRequest(f"tools[{i}].function.parameters: must be a JSON schema object")
        tools.append({"type": "function", "function": {k: v for k, v in function.items() if v is not None}})
    return tools or None


def parse_tool_choice(raw: Any, tools: list[dict[str, Any]] | None) -> ToolChoice:
    """OpenAI's `tool_choice`: "auto", "none", "required", or {type: function, function: {name}}."""
    if raw is None:
        return ToolChoice()
    if isinstance(raw, str):
        if raw not in ("auto", "none", "required"):
            raise BadRequest(f'tool_choice must be "auto", "none", "required" or a named function, not {raw!r}')
        choice = ToolChoice(mode=raw)  # type: ignore[arg-type]
    elif isinstance(raw, dict) and isinstance((raw.get("function") or {}).get("name"), str):
        choice = ToolChoice(mode="required", name=raw["function"]["name"])
    else:
        raise BadRequest('tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}')
    if choice.mode == "required" and not tools:
        raise BadRequest("tool_choice requires a tool call, but the request has no tools")
    if choice.name is not None and choice.name not in tool_names(tools or []):
        raise BadRequest(f'tool_choice names the function "{choice.name}", which is not among the tools')
    return choice


def tool_names(tools: Sequence[dict[str, Any]]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def tools_for_model(request: GenerationRequest) -> list[dict[str, Any]] | None:
    """The definitions the model is given: none for `none`, only the named one for a named choice."""
    if not request.tools or request.tool_choice.mode == "none":
        return None
    if request.tool_choice.name is not None:
        return [t for t in request.tools if t["function"]["name"] == request.tool_choice.name]
    return request.tools


def recognises_calls(request: GenerationRequest) -> bool:
    """Calls in the answer are looked for whenever the model was given tools."""
    return tools_for_model(request) is not None


def forced(choice: ToolChoice) -> bool:
    return choice.mode == "required"


def choice_instruction(choice: ToolChoice) -> str | None:
    """What the system prompt adds for `required` and a named function (None otherwise)."""
    if choice.name is not None:
        return f"You must answer with a call of the function {choice.name}."
    if choice.mode == "required":
        return "You must answer with a call of one of the functions."
    return None


def retry_request_text(choice: ToolChoice) -> str:
    """The follow-up turn after an answer without the call a `required` choice asks for."""
    which = f"the function {choice.name}" if choice.name else "one of the functions"
    name = f'"{choice.name}"' if choice.name else "<function-name>"
    return (f"Call {which} now. Answer with only the call: "
            f'{CALL_OPEN}{{"name": {name}, "arguments": <args-json-object>}}{CALL_CLOSE}')


def satisfies(choice: ToolChoice, calls: Sequence[ToolCall]) -> bool:
    if not forced(choice):
        return True
    return any(choice.name is None or call.name == choice.name for call in calls)


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def canonical_arguments(arguments: Any) -> str:
    """Arguments compared as JSON, whatever their key order or form (object or JSON string)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return arguments
    return json.dumps(arguments, sort_keys=True, ensure_ascii=False)


def call_key(calls: Sequence[ToolCall]) -> tuple[tuple[str, str], ...]:
    return tuple((call.name, canonical_arguments(call.arguments)) for call in calls)


def client_texts(request: GenerationRequest) -> list[str]:
    """Text a client sent besides message contents: call arguments and tool definitions (checked
    like the prompt: valid Unicode, within max_prompt_chars)."""
    texts = [call.name + json.dumps(call.arguments, ensure_ascii=False) for m in request.messages for call in m.tool_calls]
    texts += [(m.tool_name or "") + (m.tool_call_id or "") for m in request.messages if m.role == "tool"]
    if request.tools:
        texts.append(json.dumps(request.tools, ensure_ascii=False))
    return texts


def template_message(message: ChatMessage) -> dict[str, Any]:
    """A message in Hugging Face's chat-template form (what our tokenizer server renders)."""
    item: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        item["tool_calls"] = [
            {"type": "function", "function": {"name": call.name, "arguments": call.arguments}} for call in message.tool_calls
        ]
    if message.role == "tool":
        if message.tool_name:
            item["name"] = message.tool_name
        if message.tool_call_id:
            item["tool_call_id"] = message.tool_call_id
    return item


def upstream_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages for an OpenAI-compatible upstream. Calls without an id get one, and a tool
    message without `tool_call_id` (Ollama's clients send none) answers the earliest call of
    the assistant message before it that no earlier tool message answered (matched by name
    where it has one), as templates that pair them (Mistral's) require."""
    out: list[dict[str, Any]] = []
    open_calls: list[tuple[str, str]] = []  # (id, name) of the last assistant's unanswered calls
    for i, message in enumerate(messages):
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.role == "assistant" and message.tool_calls:
            calls = []
            for j, call in enumerate(message.tool_calls):
                call_id = call.id or f"call_{i}_{j}"
                calls.append({"id": call_id, "type": "function",
                              "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}})
            item["tool_calls"] = calls
            item["content"] = message.content or None
            open_calls = [(c["id"], c["function"]["name"]) for c in calls]
        elif message.role == "tool":
            call_id = message.tool_call_id
            if call_id is None and open_calls:
                match = next((c for c in open_calls if c[1] == message.tool_name), open_calls[0])
                call_id = match[0]
            if call_id is not None:
                item["tool_call_id"] = call_id
                open_calls = [c for c in open_calls if c[0] != call_id]
            if message.tool_name:
                item["name"] = message.tool_name
        out.append(item)
    return out


def upstream_tool_choice(choice: ToolChoice) -> Any:
    if choice.name is not None:
        return {"type": "function", "function": {"name": choice.name}}
    return choice.mode
