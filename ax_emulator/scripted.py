"""The scripted text engine's replies: a pure function of the user's line (no ML).

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

JSON_DIRECTIVE = re.compile(r"json:(valid|fenced|prose|comma|broken|retry(\d*))[ \t]*")
ATTEMPT = re.compile(r"\battempt (\d+) of \d+", re.IGNORECASE)


def reply_text(user_line: str, words: int, think: bool) -> str:
    """`You said: <line>.` then `words` filler words chosen by the line, so every answer names
    the request it belongs to and the same line always gets the same answer; or the JSON answer
    the line asks for (`json_reply`).

    With `think`, a `<think>…</think>` block comes first, as DeepSeek-R1 and Qwen3 write it.
    """
    answer = json_reply(user_line)
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
