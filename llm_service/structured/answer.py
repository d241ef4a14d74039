"""A model's answer → the JSON value it holds, valid for the request's schema, or why not. Pure.

Where the JSON is looked for, in this order (the first value that is valid wins):
1. the whole answer, trimmed;
2. the inside of each Markdown code fence (```json … ```, ``` … ```);
3. each object or array in the surrounding prose: from a `{` or `[`, to its matching bracket
   (strings and their escapes followed, so brackets inside strings do not count).

One repair is made, because it is safe: a trailing comma before `}` or `]` (outside strings) is
removed. JSON never allows one, and removing it changes no other token, so the value is the one
the model wrote. Nothing else is guessed at — single quotes, unquoted keys, comments, Python's
True/None, a value cut short: each could change what the model meant, and the answer is refused
(then asked again). NaN and Infinity are refused (not JSON, and most clients cannot parse
them), and so are duplicate keys (parsers disagree on which one wins).

The client receives the value re-serialized (`json.dumps`, non-ASCII kept): exactly what was
validated, whatever whitespace or fence the model put around it.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..json_text import StringScanner
from .output import StructuredOutput

# A fence's opening line: ``` with an optional language word; the block ends at the next ```.
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\r?\n(.*?)(?:\r?\n)?```", re.DOTALL)
# How much of a wrong answer a reason quotes.
QUOTE_CHARS = 80
# Candidates looked at in one answer, at most (an answer of thousands of brackets stays cheap).
MAX_CANDIDATES = 64
# A value nested at most this deeply that still exhausts the recursion limit has a schema to blame.
SHALLOW = 50


class InvalidAnswer(ValueError):
    """The answer holds no JSON valid for the request; `reason` says what was wrong, in words a
    client (and the model, in a retry's note) can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SchemaUnusable(ValueError):
    """The schema itself cannot be applied (a $ref that resolves nowhere): the client's error."""


@dataclass(frozen=True)
class Extracted:
    value: Any
    text: str  # what the client receives: the value as JSON
    notes: list[str] = field(default_factory=list)  # how it was found or repaired, for `warnings`


def extract(answer: str, spec: StructuredOutput) -> Extracted:
    """The first JSON value in `answer` that is valid for `spec`. Raises InvalidAnswer, whose
    reason is, in this order: what is wrong with the first JSON found, why the answer as a
    whole is not JSON, why its first bracket starts no JSON, or that it holds none."""
    wrong_value: str | None = None
    not_json: str | None = None
    for where, text in _candidates(answer):
        try:
            value, repaired = _parse(text)
        except ValueError as exc:
            if where == "whole" and _looks_like_json(text):
                not_json = f"the answer is not valid JSON: {exc}"
            continue
        problem = problem_with(value, spec)
        if problem is None:
            notes = []
            if where == "fence":
                notes.append("structured output: the JSON was taken out of a code fence in the answer")
            elif where == "prose":
                notes.append("structured output: the JSON was taken out of the text around it in the answer")
            if repaired:
                notes.append("structured output: a trailing comma was removed from the answer's JSON")
            return Extracted(value, json.dumps(value, ensure_ascii=False), notes)
        wrong_value = wrong_value or problem
    if wrong_value or not_json:
        raise InvalidAnswer(wrong_value or not_json or "")
    if not answer.strip():
        raise InvalidAnswer("the answer is empty")
    broken = _first_broken_value(answer)
    if broken is not None:
        raise InvalidAnswer(f"the answer is not valid JSON: {broken}")
    raise InvalidAnswer(f"the answer holds no JSON {'object' if spec.kind == 'json' else 'value'}: {_quote(answer)}")


def problem_with(value: Any, spec: StructuredOutput) -> str | None:
    """Why `value` is not what `spec` asks for; None when it is. Raises SchemaUnusable."""
    if spec.kind == "json":
        if not isinstance(value, dict):
            return f"the JSON is {_kind_of(value)}, not an object"
        return None
    from referencing.exceptions import Unresolvable  # loaded with the schema's validator already

    try:
        errors = list(spec.validator.iter_errors(value))
    except Unresolvable as exc:
        raise SchemaUnusable(f"the schema's $ref cannot be resolved: {exc}") from None
    except RecursionError:
        if _depth(value) > SHALLOW:
            return "the JSON is nested too deeply to be checked against the schema"
        raise SchemaUnusable("the schema refers to itself without end ($ref)") from None
    except Exception as exc:  # a schema the validator accepted but cannot apply to this value
        raise SchemaUnusable(f"the schema cannot be applied: {exc!r}") from None
    if not errors:
        return None
    from jsonschema.exceptions import best_match  # loaded by the schema's validator already

    error = best_match(errors)
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"the JSON does not match the schema: at {error.json_path}: {error.message}{more}"


# ---- finding the JSON -------------------------------------------------------------------------


def _candidates(answer: str) -> Iterator[tuple[str, str]]:
    """(where, text) of each place the JSON may be, in order."""
    seen: set[str] = set()
    count = 0

    def new(text: str) -> bool:
        nonlocal count
        text = text.strip()
        if not text or text in seen or count >= MAX_CANDIDATES:
            return False
        seen.add(text)
        count += 1
        return True

    whole = answer.strip()
    if new(whole):
        yield "whole", whole
    for match in _FENCE.finditer(answer):
        inside = match.group(2).strip()
        if new(inside):
            yield "fence", inside
    for start, end in _bracketed_spans(answer):
        span = answer[start:end]
        if new(span):
            yield "prose", span


def _bracketed_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each outermost `{…}` / `[…]` whose brackets match, in order. One pass:
    strings (with their escapes) are followed inside brackets only, so a quote in the prose
    around does not count; a bracket that closes the wrong one starts the search afresh."""
    closing = {"{": "}", "[": "]"}
    pairs: list[tuple[int, int]] = []
    spans: list[tuple[int, int]] = []
    stack: list[tuple[int, str]] = []  # (position, the bracket that closes it)
    strings = StringScanner()
    for i, char in enumerate(text):
        if strings.in_string:
            strings.consumed(char)
        elif char in closing:
            stack.append((i, closing[char]))
        elif not stack:
            continue  # prose: only brackets matter, and its quotes open no string
        elif strings.consumed(char):
            continue  # a string opens
        elif char in "}]":
            opened, expected = stack.pop()
            if char != expected:
                stack.clear()
            else:
                pairs.append((opened, i + 1))
    # The outermost complete pairs: a pair inside an opening that never closes still counts.
    for opened, end in sorted(pairs, key=lambda pair: (pair[0], -pair[1])):
        if not spans or opened >= spans[-1][1]:
            spans.append((opened, end))
            if len(spans) >= MAX_CANDIDATES:
                break
    return spans


def _next_open(text: str, position: int) -> int:
    starts = [i for i in (text.find("{", position), text.find("[", position)) if i >= 0]
    return min(starts) if starts else -1


# ---- parsing --------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {json.dumps(key, ensure_ascii=False)} appears twice in one object")
        result[key] = value
    return result


def loads_strict(text: str) -> Any:
    """json.loads without NaN/Infinity and without duplicate keys."""
    return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)


def _parse(text: str) -> tuple[Any, bool]:
    """The value of `text`, and whether a trailing comma had to be removed. Raises ValueError."""
    try:
        return loads_strict(text), False
    except RecursionError:
        raise ValueError("the JSON is nested too deeply to be read") from None
    except json.JSONDecodeError as first:
        repaired = remove_trailing_commas(text)
        if repaired is None:
            raise ValueError(_decode_error(first)) from None
        try:
            return loads_strict(repaired), True
        except (json.JSONDecodeError, RecursionError):
            raise ValueError(_decode_error(first)) from None


def remove_trailing_commas(text: str) -> str | None:
    """`text` without the commas that stand (whitespace aside) right before `}` or `]` outside
    strings; None when there is none."""
    out: list[str] = []
    removed = False
    strings = StringScanner()
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if strings.consumed(char):
            pass
        elif char == ",":
            j = i + 1
            while j < n and text[j] in " \t\r\n":
                j += 1
            if j < n and text[j] in "}]":
                removed = True
                i += 1
                continue
        out.append(char)
        i += 1
    return "".join(out) if removed else None


def _decode_error(exc: json.JSONDecodeError) -> str:
    return f"{exc.msg} at line {exc.lineno} column {exc.colno}"


def _looks_like_json(text: str) -> bool:
    return text[:1] in ("{", "[", '"') or text[:1].isdigit() or text[:1] == "-"


def _first_broken_value(answer: str) -> str | None:
    """Why the first `{`/`[` of the answer does not start valid JSON (it never closes, say)."""
    start = _next_open(answer, 0)
    if start < 0:
        return None
    try:
        json.JSONDecoder().raw_decode(answer, start)
    except json.JSONDecodeError as exc:
        return f"{_decode_error(exc)} (the JSON starting at character {start + 1} never ends or is malformed)"
    return None


def _depth(value: Any) -> int:
    """How deeply arrays and objects nest in `value` (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)
    return deepest


def _kind_of(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _quote(text: str) -> str:
    text = " ".join(text.split())
    return json.dumps(text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 1] + "…", ensure_ascii=False)
