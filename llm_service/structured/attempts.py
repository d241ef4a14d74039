"""The attempts at a structured answer: generate, extract and validate, ask again if invalid.

Each attempt is a request of its own through the model manager: it waits for the model's
admission slot like any other and gives it back when its answer is in, so a structured request
never holds the slot for its retries (requests queued meanwhile go first), and its answers
never mix with another request's. A retry (attempt 2, 3, …) is a one-shot request, so the card
answers it in a fresh context, and its last user message carries a note saying which attempt it
is and what was wrong with the previous answer: with sampling fixed at launch (the card's
post_config.json) the same prompt could well get the same answer again. All attempts share the
request's deadline. What the client receives is the valid JSON (re-serialized), or a 502 naming
what was wrong with each attempt.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio

from ..engines.base import ChatMessage, Chunk, EngineError, GenerationRequest, GenerationResult, RequestTimedOut
from .answer import InvalidAnswer, SchemaUnusable, extract
from .prompt import retry_note
from .requests import InvalidSchema

if TYPE_CHECKING:
    from ..models import Completion, ModelManager

log = logging.getLogger(__name__)


class StructuredOutputFailed(EngineError):
    """No attempt gave JSON valid for the request: the model's answer was bad, not the request
    (hence a 5xx, as for a bad answer from an upstream)."""

    status_code = 502
    code = "invalid_model_output"

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


async def complete(manager: ModelManager, model: str, request: GenerationRequest, keep_alive: Any = None) -> Completion:
    """The whole structured answer, within the request's deadline."""
    from ..models import Completion, requested_keep_alive

    spec = request.structured
    assert spec is not None, "complete() is for requests with a structured output"
    attempts = manager.settings.structured_output_retries + 1
    deadline = request.deadline if request.deadline is not None else request.arrived_at + manager.settings.request_deadline_s
    request.deadline = deadline
    entry = manager.entry(model)
    # keep_alive 0 unloads a model once its request is over: after the last attempt, not between.
    unload_after = keep_alive is not None and requested_keep_alive(keep_alive) == 0
    reasons: list[str] = []
    results: list[GenerationResult] = []
    try:
        with anyio.fail_after(max(0.0, deadline - time.monotonic())):
            for attempt in range(1, attempts + 1):
                answer = await manager.complete(
                    model, attempt_request(request, attempt, attempts, reasons[-1] if reasons else None),
                    None if unload_after else keep_alive,
                )
                results.append(answer.result)
                try:
                    extracted = extract(answer.content, spec)
                except SchemaUnusable as exc:
                    raise InvalidSchema(f"invalid JSON schema in {spec.param}: {exc}", spec.param) from None
                except InvalidAnswer as exc:
                    reason = exc.reason
                    if answer.result.finish_reason == "length":
                        reason += " (the answer was cut off at the token limit: num_predict / max_tokens)"
                    reasons.append(reason)
                    entry.metrics.structured_attempt(False)
                    log.info("model %s: structured output attempt %d of %d invalid: %s", model, attempt, attempts, reason)
                    continue
                entry.metrics.structured_attempt(True)
                result = combined_result(results, request, extracted.notes, reasons)
                return Completion(extracted.text, answer.thinking, result)
    except TimeoutError:
        done = f" after {len(reasons)} invalid attempt(s)" if reasons else ""
        raise RequestTimedOut(f"request did not finish within its deadline of {manager.settings.request_deadline_s:.0f}s{done}") from None
    finally:
        if unload_after and entry.admission.idle and entry.engine.is_loaded:
            with anyio.CancelScope(shield=True):
                await manager.unload(entry.spec.name)
    entry.metrics.structured_failed()
    raise StructuredOutputFailed(failure_message(model, spec.kind, reasons, attempts - 1), spec.param)


async def generate(
    manager: ModelManager, model: str, request: GenerationRequest, keep_alive: Any = None
) -> AsyncIterator[Chunk | GenerationResult]:
    """The structured answer as a stream: the validated JSON in one chunk once it is known,
    then the final record. Nothing is sent before (an error is a status, not a stream line)."""
    answer = await complete(manager, model, request, keep_alive)
    yield Chunk(content=answer.content, thinking=answer.thinking, tokens=answer.result.completion_tokens)
    yield answer.result


def attempt_request(request: GenerationRequest, attempt: int, attempts: int, reason: str | None) -> GenerationRequest:
    """The request of attempt `attempt`: the client's own first; a retry is a one-shot request
    (a fresh context) whose last user message carries the retry note — except a raw prompt or
    an infill, which go as the client wrote them."""
    if attempt == 1:
        return request
    messages = list(request.messages)
    if not (request.raw or request.suffix):
        last = max(i for i, m in enumerate(messages) if m.role == "user")
        note = retry_note(attempt, attempts, reason or "it was not valid")
        messages[last] = ChatMessage("user", f"{messages[last].content} {note}")
    return dataclasses.replace(
        request, id=f"{request.id}-{attempt}", messages=messages, kind="generate",
        arrived_at=time.monotonic(), prompt_tokens=0,
    )


def combined_result(
    results: list[GenerationResult], request: GenerationRequest, notes: list[str], reasons: list[str]
) -> GenerationResult:
    """The final record of a structured answer: the last attempt's, with the work of every
    attempt added up (the card did it all) and the notes of how the JSON was found."""
    last = results[-1]
    warnings = list(dict.fromkeys(last.warnings + notes))
    if reasons:
        earlier = "; ".join(f"attempt {i}: {reason}" for i, reason in enumerate(reasons, 1))
        warnings.append(f"structured output: valid after {len(results)} attempts ({earlier})")
    total = time.monotonic() - request.arrived_at
    return dataclasses.replace(
        last,
        prompt_tokens=sum(r.prompt_tokens for r in results),
        completion_tokens=sum(r.completion_tokens for r in results),
        load_duration=sum(r.load_duration for r in results),
        queue_duration=sum(r.queue_duration for r in results),
        prompt_eval_duration=sum(r.prompt_eval_duration for r in results),
        eval_duration=sum(r.eval_duration for r in results),
        total_duration=total,
        time_to_first_token=total,  # the JSON is the first text the client gets
        warnings=warnings,
    )


def failure_message(model: str, kind: str, reasons: list[str], retries: int) -> str:
    what = "JSON valid for the schema" if kind == "schema" else "JSON object"
    tries = f"{len(reasons)} attempt{'s' if len(reasons) != 1 else ''}"
    each = "; ".join(f"attempt {i}: {reason}" for i, reason in enumerate(reasons, 1))
    return f'model "{model}" answered no {what} in {tries} (structured_output_retries={retries}): {each}'
