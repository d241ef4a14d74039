"""How a model that cannot be constrained is told what to answer: the JSON instruction, where it
goes on the card, and the note a retry carries. Pure.

The instruction goes into the system prompt where the daemon can set one (our tokenizer server),
else at the end of the prompt line (a stock tokenizer script, the `axllm` runner's built-in
tokenizer). It is one line: a prompt line cannot hold a newline on a stock script.
"""
from __future__ import annotations

from dataclasses import dataclass

from .output import StructuredOutput

# A retry's note says "attempt N of M" in these words; the scripted emulator reads them
# (ax_emulator/scripted.py) to answer a retry differently from the first attempt.
RETRY_NOTE = "(This is attempt {attempt} of {attempts}: your previous answer was rejected: {reason}. Reply with only the JSON.)"
# The reason quoted in a retry note is cut to this many characters.
NOTE_REASON_CHARS = 300


def instruction(spec: StructuredOutput) -> str:
    """What the model is asked: one line."""
    if spec.kind == "json":
        return "Answer with one JSON object and nothing else: no prose, no code fences."
    about = f" It is {spec.description.strip().rstrip('.')}." if spec.description and spec.description.strip() else ""
    return (
        "Answer with one JSON value and nothing else (no prose, no code fences); it must be valid for "
        f"this JSON schema: {spec.schema_text}{about}"
    )


def retry_note(attempt: int, attempts: int, reason: str) -> str:
    """The note appended to the last user message of attempt `attempt` (2, 3, …) of `attempts`."""
    if len(reason) > NOTE_REASON_CHARS:
        reason = reason[: NOTE_REASON_CHARS - 1] + "…"
    return RETRY_NOTE.format(attempt=attempt, attempts=attempts, reason=reason.replace("\n", " "))


@dataclass(frozen=True)
class Placed:
    line: str
    system: str | None
    warning: str


def place_instruction(
    spec: StructuredOutput, line: str, system: str | None, *, raw: bool, system_prompt_settable: bool,
    why_not: str = "the stock tokenizer script takes no system prompt",
) -> Placed:
    """The prompt line and system prompt of a card turn that must answer JSON, and the warning
    that says where the instruction went. `system_prompt_settable`: our tokenizer server takes
    the system prompt of a fresh context; else `why_not` says why it is not."""
    what = "JSON schema" if spec.kind == "schema" else "JSON instruction"
    checked = "the answer was checked" + (" against the schema" if spec.kind == "schema" else " to be one JSON object")
    if raw:
        return Placed(line, system, f"structured output: raw prompt sent as it is, without the {what}; {checked}")
    text = instruction(spec)
    if system_prompt_settable:
        system = text if not system else f"{system}\n\n{text}"
        where = "in the system prompt"
    else:
        line = f"{line} {text}" if line else text
        where = f"at the end of the prompt line ({why_not})"
    return Placed(
        line, system, f"structured output: the card cannot constrain its sampling, so the {what} was given to the "
        f"model {where}; {checked}",
    )
