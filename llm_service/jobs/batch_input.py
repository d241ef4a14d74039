"""OpenAI Batch API files: the JSONL input parsed into requests, the output and error lines; pure.

An input line is `{"custom_id", "method": "POST", "url", "body"}`. A line that is not a usable
request becomes a `LineError` with its line number, which the job keeps as a failed item and the
error file reports; it never fails the parse, so one bad line never loses the batch. Only what
concerns the whole file (no request at all, too many of them) is a `BatchError`.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")

# OpenAI's own limit on one input file.
MAX_REQUESTS = 50_000

_WINDOW = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")
_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, slots=True)
class BatchRequest:
    line: int  # 1-based, as an editor shows it
    custom_id: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LineError:
    line: int
    code: str
    message: str
    custom_id: str | None = None  # when the line named one


@dataclass(frozen=True, slots=True)
class BatchError:
    """What makes the whole batch fail (OpenAI's `errors.data[]` of a failed batch)."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class ParsedBatch:
    endpoint: str
    model: str | None  # the model every request names; None without a valid request
    requests: tuple[BatchRequest, ...]
    errors: tuple[LineError, ...]
    fatal: BatchError | None = None


def completion_window_seconds(window: str) -> int:
    """`24h` (OpenAI's only value), and any `N` followed by s, m, h or d, in seconds."""
    match = _WINDOW.match(window.strip()) if isinstance(window, str) else None
    if match is None:
        raise ValueError(f"completion_window must be a number followed by s, m, h or d, like 24h: {window!r}")
    return int(match.group(1)) * _WINDOW_UNITS[match.group(2)]


def parse_batch_input(content: bytes, endpoint: str, max_requests: int = MAX_REQUESTS) -> ParsedBatch:
    """The requests of a JSONL input file for a batch on `endpoint`, and its bad lines."""
    if endpoint not in ENDPOINTS:
        return ParsedBatch(endpoint, None, (), (), BatchError(
            "invalid_endpoint", f"endpoint must be one of {', '.join(ENDPOINTS)}, not {endpoint!r}"))
    requests: list[BatchRequest] = []
    errors: list[LineError] = []
    seen: dict[str, int] = {}  # custom_id -> the line that holds it
    model: str | None = None
    # Lines are split as bytes so that a bad byte sequence costs its own line only.
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue  # blank lines (a trailing newline, a spaced-out file) are no requests
        if len(requests) + len(errors) >= max_requests:
            return ParsedBatch(endpoint, model, tuple(requests), tuple(errors), BatchError(
                "too_many_requests", f"the file holds more than {max_requests} requests"))
        parsed = _parse_line(number, raw, endpoint)
        if isinstance(parsed, LineError):
            errors.append(parsed)
            continue
        custom_id, body = parsed
        if custom_id in seen:
            errors.append(LineError(number, "duplicate_custom_id",
                                    f"custom_id {custom_id!r} is already used on line {seen[custom_id]}",
                                    custom_id))
            continue
        # One model per batch, as OpenAI requires: the first valid request names it.
        if model is not None and body["model"] != model:
            errors.append(LineError(number, "mismatched_model",
                                    f"body.model {body['model']!r} differs from the batch's model "
                                    f"{model!r}; a batch holds requests to one model", custom_id))
            continue
        model = body["model"]
        seen[custom_id] = number
        requests.append(BatchRequest(number, custom_id, body))
    fatal = None
    if not requests and not errors:
        fatal = BatchError("empty_file", "the input file holds no requests")
    return ParsedBatch(endpoint, model, tuple(requests), tuple(errors), fatal)


def _parse_line(number: int, raw: bytes, endpoint: str) -> tuple[str, dict[str, Any]] | LineError:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return LineError(number, "invalid_json_line", f"the line is not UTF-8 text (byte {error.start})")
    try:
        line = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as error:
        return LineError(number, "invalid_json_line", f"the line is not JSON: {error}")
    if not isinstance(line, dict):
        return LineError(number, "invalid_json_line", "the line is not a JSON object")
    try:
        # A lone surrogate (\ud800) is valid JSON but no text: it could not be written out.
        json.dumps(line, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return LineError(number, "invalid_json_line", "the line holds a lone surrogate, which is no text")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(number, "invalid_custom_id", "custom_id must be a non-empty string")
    method = line.get("method")
    if method != "POST":
        return LineError(number, "invalid_method", f"method must be POST, not {method!r}", custom_id)
    url = line.get("url")
    if url != endpoint:
        known = url in ENDPOINTS
        return LineError(number, "mismatched_url" if known else "invalid_url",
                         f"url {url!r} differs from the batch's endpoint {endpoint!r}" if known
                         else f"url must be the batch's endpoint {endpoint!r}, not {url!r}", custom_id)
    body = line.get("body")
    if not isinstance(body, dict):
        return LineError(number, "invalid_body", "body must be a JSON object", custom_id)
    if not isinstance(body.get("model"), str) or not body["model"]:
        return LineError(number, "missing_model", "body.model must name the model", custom_id)
    return custom_id, body


def _refuse_constant(name: str) -> Any:
    # NaN and Infinity are no JSON; echoed into an output line they would make it unreadable.
    raise ValueError(f"{name} is not JSON")


def item_request_id(job_id: str, line: int) -> str:
    """The `id` of an item's output line: the same at every rendering of the files (a restart
    while finalizing renders them again)."""
    return "batch_req_" + hashlib.sha256(f"{job_id}\n{line}".encode()).hexdigest()[:24]


def in_error_file(status_code: int) -> bool:
    """OpenAI puts the requests answered with an error status in the error file."""
    return not 200 <= status_code < 300


def response_line(item_id: str, custom_id: str, status_code: int, request_id: str,
                  body: Any) -> str:
    """One line (with its newline) for a request that got an answer, whatever its status."""
    return _jsonl({
        "id": item_id,
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": request_id, "body": body},
        "error": None,
    })


def error_line(item_id: str, custom_id: str | None, code: str, message: str,
               line: int | None = None) -> str:
    """One error-file line for a request that got no answer: a bad input line (with its line
    number), `batch_cancelled`, `batch_expired`, or a failure of the daemon."""
    error: dict[str, Any] = {"code": code, "message": message}
    if line is not None:
        error["line"] = line
    return _jsonl({"id": item_id, "custom_id": custom_id, "response": None, "error": error})


def _jsonl(value: dict[str, Any]) -> str:
    # ensure_ascii=False keeps texts as the model wrote them; JSON escapes any newline in them.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n"
