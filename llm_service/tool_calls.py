"""Tool calls in a model's text, recognised as the text streams. Pure, no I/O.

Two forms, whatever the tokenizer or engine:
- Hermes/Qwen: `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, one or several, anywhere
  in the answer (a block may hold several objects, or a list of them; a block the answer ends in
  without its closing tag counts when its JSON is complete).
- Bare JSON, as small models write it: an object `{"name": …, "arguments"|"parameters": {…}}`
  (or a list of them) that starts the answer or a line, optionally in a ``` fence. Only a name
  among the request's tools makes it a call; anything else is the answer's text.

`ToolCallParser.feed(text)` returns events in order — `str` (text to stream now) and `ToolCall`
— holding back only what may still become a call: a cut `<tool_call>` tag, a call block until it
closes, a bare candidate until its JSON closes (or its first key shows it is no call). `flush()`
at the end releases what is held. A block that is not a valid call comes back as its text, with
a line in `warnings`: never an exception.

Chunks come straight from a runner, so every boundary may fall anywhere; the tests feed answers
whole, byte by byte and split at every position and expect the same events.
"""
from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

from .engines.base import ToolCall
from .json_text import StringScanner
from tokenizer_service.tool_prompt import CALL_CLOSE, CALL_OPEN

Event = str | ToolCall

_MISSING = object()
_FENCE = "```"
# Fence info strings after which a bare call may follow.
_FENCE_INFOS = ("", "json", "tool_call", "tool_code")
# The first key of an object that may be a call; any other shows at once that it is none.
_CALL_KEYS = ("name", "function", "type", "arguments", "parameters", "id")
_FIRST_KEY = re.compile(r'\s*"((?:[^"\\]|\\.)*)"')
_WHITESPACE = " \t\r\n"


def _partial_length(text: str, tag: str) -> int:
    """Length of the longest proper prefix of `tag` that `text` ends with."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


def _arguments(value: Any) -> dict[str, Any] | None:
    if isinstance(value, str):  # some models (and OpenAI's wire) write the arguments as a JSON string
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


def call_from(item: Any, *, tagged: bool) -> ToolCall | None:
    """A call from one decoded object: `{name, arguments|parameters}`, or OpenAI's
    `{type: function, function: {name, arguments}}`. Tagged (inside `<tool_call>`), missing
    arguments mean none; bare, an object needs them to be a call."""
    if not isinstance(item, dict):
        return None
    call_id = item.get("id") if isinstance(item.get("id"), str) else ""
    if isinstance(item.get("function"), dict):
        item = item["function"]
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    value = item.get("arguments", item.get("parameters", _MISSING))
    if value is _MISSING:
        if not tagged:
            return None
        value = {}
    arguments = _arguments(value)
    if arguments is None:
        return None
    return ToolCall(name=name.strip(), arguments=arguments, id=call_id)


def _json_values(text: str) -> list[Any] | None:
    """The JSON values `text` holds one after another (separated by blanks, commas or
    semicolons); None when any part is not JSON."""
    decoder = json.JSONDecoder()
    values, at = [], 0
    while True:
        while at < len(text) and text[at] in _WHITESPACE + ",;":
            at += 1
        if at >= len(text):
            return values
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        values.append(value)


def parse_calls(text: str, *, tagged: bool, tool_names: Collection[str] | None = None) -> list[ToolCall] | None:
    """The calls `text` holds (a call block's body, or a bare candidate), or None when it is not
    one or more valid calls. A bare call must name one of `tool_names` (when given)."""
    values = _json_values(text.strip())
    if not values:
        return None
    items: list[Any] = []
    for value in values:
        items.extend(value if isinstance(value, list) else [value])
    calls = []
    for item in items:
        call = call_from(item, tagged=tagged)
        if call is None or (not tagged and tool_names is not None and call.name not in tool_names):
            return None
        calls.append(call)
    return calls or None


class _JsonScan:
    """Where a JSON object or list that starts a text ends, found incrementally."""

    def __init__(self) -> None:
        self.position = 0
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.found: int | None = None

    def end(self, text: str) -> int | None:
        """The index just past the value, or None while it is still open."""
        if self.found is not None:
            return self.found
        for i in range(self.position, len(text)):
            char = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.found = i + 1
                    return self.found
        self.position = len(text)
        return None


class ToolCallParser:
    """Streaming recogniser of tool calls in an answer's visible text (see the module's doc)."""

    def __init__(self, tool_names: Collection[str] | None = None, *, bare: bool = True) -> None:
        self.tool_names = None if tool_names is None else frozenset(tool_names)
        self.bare = bare  # recognise bare JSON calls (at the answer's or a line's start)
        self.warnings: list[str] = []
        self.calls = 0
        self._held = ""
        self._mode = "text"  # text | block | bare
        self._line_start = True  # the answer's or a line's start: a bare call may begin here
        self._after_call = False  # blanks right after a call are layout, not text
        self._scan = _JsonScan()
        self._bare_from = 0  # in bare mode: where the JSON starts in _held
        self._fenced = False

    def feed(self, text: str) -> list[Event]:
        self._held += text
        return self._drain(final=False)

    def flush(self) -> list[Event]:
        return self._drain(final=True)

    # ---- the state machine ---------------------------------------------------------------

    def _drain(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while True:
            if self._mode == "block":
                done = self._in_block(events, final)
            elif self._mode == "bare":
                done = self._in_bare(events, final)
            else:
                done = self._in_text(events, final)
            if done:
                break
        return [e for e in events if not (isinstance(e, str) and not e)]

    def _emit_text(self, events: list[Event], text: str) -> None:
        if text:
            events.append(text)
            self._after_call = False

    def _emit_calls(self, events: list[Event], calls: list[ToolCall]) -> None:
        events.extend(calls)
        self.calls += len(calls)
        self._after_call = True
        self._line_start = True

    def _in_text(self, events: list[Event], final: bool) -> bool:
        held = self._held
        if self._after_call:
            stripped = held.lstrip(_WHITESPACE)
            if not stripped and not final:
                self._held = held
                return True
            held = self._held = stripped
            if not held:
                return True
        if self._line_start and self.bare:
            decided = self._at_line_start(events, final)
            if decided is not None:
                return decided
            held = self._held
        tag = held.find(CALL_OPEN)
        newline = held.find("\n")
        if newline >= 0 and (tag < 0 or newline < tag):
            self._emit_text(events, held[: newline + 1])
            self._held = held[newline + 1:]
            self._line_start = True
            return False
        if tag >= 0:
            self._emit_text(events, held[:tag])
            self._held = held[tag + len(CALL_OPEN):]
            self._mode = "block"
            return False
        keep = 0 if final else _partial_length(held, CALL_OPEN)
        self._emit_text(events, held[: len(held) - keep])
        self._held = held[len(held) - keep:]
        if held[: len(held) - keep]:
            self._line_start = False
        return True

    def _at_line_start(self, events: list[Event], final: bool) -> bool | None:
        """At a line's start: begin a bare candidate, wait for more, or go on as text (None)."""
        held = self._held
        body = held.lstrip(_WHITESPACE)
        start = len(held) - len(body)
        if not body:
            if final:
                self._emit_text(events, held)
                self._held = ""
            return True  # blanks: wait for what follows them
        if body[0] in "{[":
            self._begin_bare(start, fenced=False)
            return False
        if body.startswith(_FENCE):
            newline = body.find("\n")
            if newline < 0:
                if final:
                    self._line_start = False
                    return None
                return True  # the fence's info string is not complete yet
            info = body[len(_FENCE):newline].strip().lower()
            after = body[newline + 1:]
            rest = after.lstrip(_WHITESPACE)
            if info in _FENCE_INFOS:
                if not rest and not final:
                    return True
                if rest[:1] in ("{", "["):
                    self._begin_bare(start + newline + 1 + (len(after) - len(rest)), fenced=True)
                    return False
            self._line_start = False
            return None
        if _FENCE.startswith(body) and not final:
            return True  # may become a fence
        self._line_start = False
        return None

    def _begin_bare(self, json_start: int, fenced: bool) -> None:
        self._mode = "bare"
        self._bare_from = json_start
        self._fenced = fenced
        self._scan = _JsonScan()

    def _release_bare(self) -> bool:
        """The candidate is no call: what is held is text again, scanned as text from its start
        (a call block after it still counts). Returns False: go on draining."""
        self._mode = "text"
        self._line_start = False
        return False

    def _in_bare(self, events: list[Event], final: bool) -> bool:
        held = self._held
        candidate = held[self._bare_from:]
        if not self._may_be_call(candidate):
            return self._release_bare()
        end = self._scan.end(candidate)
        if end is None:
            if not final:
                return True
            if '"name"' in candidate:
                self.warnings.append(_malformed_warning("an unfinished tool call (JSON)", candidate))
            return self._release_bare()
        after = candidate[end:]
        closing = 0
        if self._fenced:
            rest = after.lstrip(_WHITESPACE)
            if not rest.startswith(_FENCE):
                if (not rest or _FENCE.startswith(rest)) and not final:
                    return True  # the closing fence may be on its way
                return self._release_bare()
            closing = len(after) - len(rest) + len(_FENCE)
        calls = parse_calls(candidate[:end], tagged=False, tool_names=self.tool_names)
        if calls is None:
            return self._release_bare()
        self._mode = "text"
        self._emit_calls(events, calls)
        self._held = after[closing:]
        return False

    def _may_be_call(self, candidate: str) -> bool:
        """Could this JSON still be a call? Decided on its first key, as soon as it shows."""
        text = candidate
        if text.startswith("["):
            text = text[1:].lstrip(_WHITESPACE)
            if not text:
                return True
            if text[0] != "{":
                return False
        text = text[1:]
        if not text.lstrip(_WHITESPACE):
            return True
        if text.lstrip(_WHITESPACE)[0] != '"':
            return False
        key = _FIRST_KEY.match(text)
        if key is None:
            return True  # the key is not complete yet
        return key.group(1) in _CALL_KEYS

    def _in_block(self, events: list[Event], final: bool) -> bool:
        held = self._held
        close = _close_outside_strings(held)
        if close < 0 and final:
            close = held.find(CALL_CLOSE)  # unbalanced quotes: the first closing tag it is
        if close < 0 and not final:
            return True
        body = held if close < 0 else held[:close]
        self._held = "" if close < 0 else held[close + len(CALL_CLOSE):]
        self._mode = "text"
        calls = parse_calls(body, tagged=True)
        if calls is not None:
            self._emit_calls(events, calls)
            return False
        text = CALL_OPEN + body + ("" if close < 0 else CALL_CLOSE)
        what = "an unclosed <tool_call> block" if close < 0 else "a <tool_call> block that is not a valid call"
        self.warnings.append(_malformed_warning(what, body))
        self._line_start = False
        self._emit_text(events, text)
        return False


def _close_outside_strings(text: str) -> int:
    """Where the block's closing tag is, not counting one inside a JSON string; -1: not yet."""
    strings = StringScanner()
    for at, char in enumerate(text):
        if not strings.consumed(char) and char == "<" and text.startswith(CALL_CLOSE, at):
            return at
    return -1


def _malformed_warning(what: str, body: str) -> str:
    excerpt = body.strip()
    if len(excerpt) > 120:
        excerpt = excerpt[:117] + "..."
    return (f"tool call: the model wrote {what} ({excerpt!r}); it is returned as text "
            '(a call is {"name": ..., "arguments": {...}})')


def split_calls(text: str, tool_names: Collection[str] | None = None) -> tuple[str, list[ToolCall]]:
    """The text and the calls of a whole answer, as the streaming parser finds them."""
    parser = ToolCallParser(tool_names)
    events = parser.feed(text) + parser.flush()
    return "".join(e for e in events if isinstance(e, str)), [e for e in events if isinstance(e, ToolCall)]
