"""The scripted text engine's replies: a pure function of the user's line (no ML).

An ordinary line is echoed: `You said: <line>.` and filler words. A line that asks for tool
calls is answered with the calls, in the forms real models write them, so that tests know every
answer exactly:

- `call tool NAME {json}` → the Hermes/Qwen form, one block per request:
  `<tool_call>\\n{"name": "NAME", "arguments": {json}}\\n</tool_call>` (blocks joined by "\\n");
- `call bare tool NAME {json}` → a bare JSON object, as small models write it:
  `{"name": "NAME", "arguments": {json}}` on a line of its own;
- `call broken tool NAME` → a malformed call: `<tool_call>\\n{"name": "NAME", "arguments": {\\n</tool_call>`.

`{json}` is a JSON object right after the name (absent: `{}`); it is found in the line as read,
or with the line's escapes undone (our tokenizer server's newline escape doubles backslashes,
and a request nested in a JSON string has its quotes escaped — a tool result asking for the
next call, say). Requests are answered in the order they appear. `explain first` anywhere in
the line puts `I will call NAME, NAME.` on a line before the calls. With `think`, the
`<think>…</think>` block comes first, as for an echo.

JSON answers, for the daemon's structured output: a line holding `json:<mode>` followed by a
JSON value (`… json:fenced {"title": "x"} …`) is answered with that value, written the way the
mode says, instead of the echo. What else the line holds does not matter (the daemon may add
its JSON instruction after the user's text, with a stock tokenizer script). Modes, for the
value V:

- `valid`: `json.dumps(V)`, nothing else.
- `fenced`: V indented in a Markdown code fence: ```` ```json\\n<V, indent 2>\\n``` ````.
- `prose`: `Sure! Here is the JSON you asked for: <json.dumps(V)> Let me know if you need anything else.`
- `comma`: V indented, with a trailing comma before its last closing bracket (an object or
  array that is not empty; else as `valid`): the fault the daemon repairs.
- `broken`: `json.dumps(V)` without its last character: never valid JSON.
- `retry` / `retryN`: `broken` for the first N attempts (default 1), then `valid`.

Which attempt it is comes from the line: the daemon's retry note says "attempt K of M"
(llm_service/structured/prompt.py, RETRY_NOTE); a line without it is attempt 1. So a retry,
though a fresh context, is answered deterministically, and tests know every answer exactly:
`reply_text` of the line as the runner read it.
"""
from __future__ import annotations

import json
import random
import re

FILLER_WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
    "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
    "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu",
)

_CALL_REQUEST = re.compile(r"call (bare |broken )?tool ([A-Za-z_][\w.\-]*)")
_EXPLAIN = "explain first"


def _arguments(line: str, at: int) -> dict:
    """The JSON object written at `at` (after blanks), trying the line's escapes undone."""
    rest = line[at:].lstrip(" ")
    decoder = json.JSONDecoder()
    for text in (rest, rest.replace("\\\\", "\\"), rest.replace("\\\\", "\\").replace('\\"', '"')):
        if not text.startswith("{"):
            continue
        try:
            value, _ = decoder.raw_decode(text)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def requested_calls(line: str) -> list[tuple[str, str, dict]]:
    """(form, name, arguments) of each call the line asks for; form: "tagged", "bare", "broken"."""
    calls = []
    for match in _CALL_REQUEST.finditer(line):
        form = {"bare ": "bare", "broken ": "broken"}.get(match.group(1) or "", "tagged")
        calls.append((form, match.group(2), {} if form == "broken" else _arguments(line, match.end())))
    return calls


def call_reply(calls: list[tuple[str, str, dict]], explain: bool) -> str:
    parts = []
    for form, name, arguments in calls:
        body = json.dumps({"name": name, "arguments": arguments})
        if form == "bare":
            parts.append(body)
        elif form == "broken":
            parts.append(f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {{\n</tool_call>')
        else:
            parts.append(f"<tool_call>\n{body}\n</tool_call>")
    head = f"I will call {', '.join(name for _, name, _ in calls)}.\n" if explain else ""
    return head + "\n".join(parts)


JSON_DIRECTIVE = re.compile(r"json:(valid|fenced|prose|comma|broken|retry(\d*))[ \t]*")
ATTEMPT = re.compile(r"\battempt (\d+) of \d+", re.IGNORECASE)


def reply_text(user_line: str, words: int, think: bool) -> str:
    """`You said: <line>.` then `words` filler words chosen by the line, so every answer names
    the request it belongs to and the same line always gets the same answer; or the tool calls
    the line asks for, or the JSON answer it asks for (`json_reply`; see the module's doc).

    With `think`, a `<think>…</think>` block comes first, as DeepSeek-R1 and Qwen3 write it.
    """
    calls = requested_calls(user_line)
    answer = call_reply(calls, _EXPLAIN in user_line) if calls else json_reply(user_line)
    if answer is None:
        chooser = random.Random(user_line)
        filler = " ".join(chooser.choice(FILLER_WORDS) for _ in range(words))
        answer = f"You said: {user_line}." + (f" {filler}." if words > 0 else "")
    if think:
        return f"<think>\nThe user wrote {len(user_line)} characters; I echo them.\n</think>\n\n{answer}"
    return answer


def json_reply(user_line: str) -> str | None:
    """The JSON answer a `json:<mode> <value>` line asks for; None for any other line."""
    match = JSON_DIRECTIVE.search(user_line)
    if match is None:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(user_line, match.end())
    except json.JSONDecodeError:
        return None
    mode, retries = match.group(1), match.group(2)
    if mode.startswith("retry"):
        attempt_match = ATTEMPT.search(user_line)
        attempt = int(attempt_match.group(1)) if attempt_match else 1
        mode = "broken" if attempt <= int(retries or 1) else "valid"
    compact = json.dumps(value)
    if mode == "fenced":
        return "```json\n" + json.dumps(value, indent=2) + "\n```"
    if mode == "prose":
        return f"Sure! Here is the JSON you asked for: {compact} Let me know if you need anything else."
    if mode == "comma" and isinstance(value, (dict, list)) and value:
        indented = json.dumps(value, indent=2)
        return indented[:-2] + ",\n" + indented[-1]
    if mode == "broken":
        return compact[:-1]
    return compact


def vision_reply_text(user_line: str, images: list[str], words: int, think: bool) -> str:
    """The vision dialects' answer: one `[image N: WxH FORMAT sha256:…]` per image it was
    given (`images`: those descriptions, in order), then `reply_text` of the line; so a reply
    names the picture that reached the runner as well as the request."""
    answer = reply_text(user_line, words, think)
    return " ".join(images) + " " + answer if images else answer
