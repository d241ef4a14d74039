"""A finished job's output and error files from its items, in OpenAI's line shapes; pure.

Rendered again from the stored items when a restart interrupts finalizing, so every line's
content (its `id` included) depends on the items alone.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .batch_input import error_line, in_error_file, item_request_id, response_line
from .store import DONE, ITEM_CANCELLED, ITEM_EXPIRED, ITEM_FAILED, Item

# What the error file says of items that never ran, in OpenAI's codes.
_NOT_RUN = {
    ITEM_CANCELLED: ("batch_cancelled", "the batch was cancelled before this request ran"),
    ITEM_EXPIRED: ("batch_expired", "the request could not run before the completion window ended"),
}


@dataclass(frozen=True, slots=True)
class OutputFiles:
    output: str  # JSONL; empty when no request succeeded
    errors: str  # JSONL; empty when none failed


def render_output_files(job_id: str, items: Iterable[Item]) -> OutputFiles:
    """Every settled item once, in input line order: answers with a 2xx status in the output
    file; error answers, failures, bad lines, cancelled and expired items in the error file."""
    output: list[str] = []
    errors: list[str] = []
    for item in sorted(items, key=lambda i: i.line):
        item_id = item_request_id(job_id, item.line)
        if item.result is not None and item.state in (DONE, ITEM_FAILED):
            text = response_line(item_id, item.custom_id or "", item.result["status_code"],
                                 item.result.get("request_id", ""), item.result.get("body"))
            (errors if in_error_file(item.result["status_code"]) else output).append(text)
        elif item.state == ITEM_FAILED:
            error = item.error or {"code": "internal_error", "message": "the request failed"}
            errors.append(error_line(item_id, item.custom_id, error.get("code", "internal_error"),
                                     error.get("message", ""), error.get("line")))
        elif item.state in _NOT_RUN:
            code, message = _NOT_RUN[item.state]
            errors.append(error_line(item_id, item.custom_id, code, message))
        else:
            raise ValueError(f"item {item.line} of {job_id} is {item.state}, not settled")
    return OutputFiles("".join(output), "".join(errors))
