"""Running a service: flavor → model, token counts from the model's tokenizer, the chunker's plan,
each step through `ModelManager.complete` (the path of /api/generate: admission, queue, deadline),
and the answer. The logic is in `manifest.py`, `chunker.py` and `prompts.py`; this is the I/O.

`run_service` yields JSON-ready events, in order:

- `{"event": "plan", ...}` once, after the input is checked and split (every client error —
  unknown service, flavor or field, a sentence that cannot fit — is raised before it, so that it
  reaches the client with its status code);
- `{"event": "chunk_start" | "chunk_done", "step": "map" | "combine", ...}` around each generation;
- the answer, `{"done": true, "response": ..., "chunks": [...], "combine": [...], "warnings": [...]}`.

Counting: the chunker is synchronous, the tokenizer server is HTTP; the planning therefore runs in
a worker thread whose `count_tokens` calls back into the event loop (each text counted once). A
model without a tokenizer server the daemon can ask (an HTTP upstream, a stock tokenizer script
without `/tokenize`) gets a byte estimate, said in `warnings`. Every prompt's count adds the chat
framing the runner puts around it (system prompt, role markers).

Each generation has the daemon's request deadline of its own; a client that goes away cancels the
generation running (the manager closes it on its backend) and nothing after it runs.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread

from ..engines.base import (
    BadRequest, ChatMessage, EngineError, GenerationRequest, ModelUnavailable, SamplingOptions,
)
from ..engines.card.planner import TOKENS_PER_MESSAGE
from ..tokenizer_client import TokenizerUnavailable
from .chunker import Chunk, ChunkingError, combine_batches, join_cleaned, plan_chunks
from .folder import ServiceFolder
from .manifest import Flavor, Manifest, ManifestError, check_inputs, check_template, render_template
from .prompts import Prompt, chunk_prompt, combine_costs, combine_prompt, service_limits

T = TypeVar("T")

# Bytes per token of the estimate where no tokenizer can be asked (cautious: English text runs
# at about 4 bytes a token in SmolLM2's and Llama's tokenizers).
ESTIMATE_BYTES_PER_TOKEN = 3
# What a runner adds around a one-message prompt: a role marker per message (system and user),
# and the system prompt; one the descriptor does not name is reserved at this many tokens.
UNKNOWN_SYSTEM_PROMPT_TOKENS = 32
# Combine rounds before giving up (each round at least halves the summaries in practice).
MAX_COMBINE_ROUNDS = 16


class ServiceNotFound(EngineError):
    status_code = 404
    code = "service_not_found"

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f'service "{name}" not found (services: {", ".join(known) or "none"})')


class ServiceUnavailable(EngineError):
    status_code = 503
    code = "service_unavailable"


def estimate_tokens(text: str) -> int:
    """The byte estimate: a token per ESTIMATE_BYTES_PER_TOKEN bytes, rounded up."""
    size = len(text.encode("utf-8", "surrogatepass"))
    return -(-size // ESTIMATE_BYTES_PER_TOKEN)


class TokenCounter:
    """Token counts of one model: its tokenizer server's `/tokenize`, or the byte estimate.

    `count` is synchronous, for the chunker, and may only be called from a worker thread started
    by `in_thread`; counts are kept, so a text is sent to the tokenizer once."""

    def __init__(self, tokenize: Callable[[str], Any] | None, source: str, warnings: list[str]) -> None:
        self._tokenize = tokenize
        self.source = source  # "tokenizer" or "estimate"
        self.warnings = warnings
        self.framing = 2 * TOKENS_PER_MESSAGE
        self._counts: dict[str, int] = {}

    async def count_async(self, text: str) -> int:
        known = self._counts.get(text)
        if known is not None:
            return known
        if self._tokenize is None:
            tokens = estimate_tokens(text)
        else:
            ids = await self._tokenize(text)
            if ids is None:
                raise ModelUnavailable("the model's tokenizer server stopped answering /tokenize while the "
                                       "service was counting its input")
            tokens = len(ids)
        self._counts[text] = tokens
        return tokens

    def count(self, text: str) -> int:
        known = self._counts.get(text)
        if known is not None:
            return known
        return anyio.from_thread.run(self.count_async, text)

    def count_prompt(self, text: str) -> int:
        """A whole prompt as the runner reads it: the text and the chat framing around it."""
        return self.count(text) + self.framing

    async def in_thread(self, work: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(work)


async def token_counter(manager: Any, model: str) -> TokenCounter:
    """The counter for `model` (a descriptor name): its tokenizer server, started through the
    tokenizer service when the descriptor names its script, else the byte estimate."""
    entry = manager.entry(model)
    spec = entry.spec
    config = spec.config
    port = getattr(config, "tokenizer_port", None)
    # A card runner whose dialect tokenizes by itself (axllm) has no server to ask.
    dialect = getattr(entry.engine, "_dialect", None)
    if not port or (dialect is not None and getattr(dialect, "builtin_tokenizer", False)):
        counter = TokenCounter(None, "estimate", [
            f'token counts are estimated ({ESTIMATE_BYTES_PER_TOKEN} bytes a token): model "{spec.name}" '
            "has no tokenizer server the daemon can ask"])
    else:
        tokenizers = manager.tokenizers
        host = getattr(config, "tokenizer_ip", None) or "127.0.0.1"
        timeout = manager.settings.tokenizer_timeout_s
        try:
            with anyio.fail_after(timeout + 5):
                if getattr(config, "tokenizer_py", None):
                    await tokenizers.start_server(spec.name, host)
                    await tokenizers.wait_until_running(spec.name, host, port, timeout)
                else:
                    await tokenizers.wait_until_serving(host, port, timeout)
        except (TokenizerUnavailable, TimeoutError) as exc:
            raise ModelUnavailable(f'the tokenizer server of "{spec.name}" is not answering, so the service '
                                   f"cannot count tokens: {exc}") from None

        async def tokenize(text: str) -> list[int] | None:
            return await tokenizers.tokenize(host, port, text)

        if await tokenize("probe") is None:  # a stock tokenizer script: no /tokenize
            counter = TokenCounter(None, "estimate", [
                f'token counts are estimated ({ESTIMATE_BYTES_PER_TOKEN} bytes a token): the tokenizer '
                f'server of "{spec.name}" has no /tokenize'])
        else:
            counter = TokenCounter(tokenize, "tokenizer", [])
    if spec.system_prompt is not None:
        counter.framing += await counter.count_async(spec.system_prompt)
    else:
        counter.framing += UNKNOWN_SYSTEM_PROMPT_TOKENS
    return counter


@dataclass
class _Run:
    """What one service request works with."""

    manager: Any
    service: str
    manifest: Manifest
    flavor_name: str
    flavor: Flavor
    model: str
    values: dict[str, str]
    template: str
    source: str
    counter: TokenCounter
    request_id: str
    warnings: list[str] = field(default_factory=list)
    steps: int = 0
    priority: str = "interactive"  # "job": a service run as a job, behind interactive requests
    deadline: float | None = None  # a job's: its completion window; else each step has its own

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


SERVICE_JOB_KEY = "service"  # the metadata key of a job that runs a service (its value: the name)
SERVICE_ENDPOINT = "/api/services"  # the endpoint such a job records


async def service_answer(manager: Any, folder: ServiceFolder, body: Mapping[str, Any], request_id: str,
                         deadline: float | None) -> tuple[int, str, dict[str, Any]]:
    """(status code, request id, body) of a service run as a job item: the final answer, or
    the error a client would have seen."""
    final: dict[str, Any] = {}
    events = run_service(manager, folder, str(body.get("service")), body.get("fields") or {}, body.get("flavor"),
                         request_id, priority="job", deadline=deadline)
    try:
        async for event in events:
            final = event
    except EngineError as exc:
        return exc.status_code, request_id, {"error": exc.message}
    finally:
        await events.aclose()
    return 200, request_id, final


def resolve_request(folder: ServiceFolder, name: str, fields: Mapping[str, Any],
                    flavor: str | None) -> tuple[Manifest, str, dict[str, str], str, str]:
    """The service, flavor, inputs and template of a request; raises the client's errors."""
    service = folder.catalog.services.get(name)
    if service is None:
        raise ServiceNotFound(name, sorted(folder.catalog.services))
    if service.manifest is None:
        raise ServiceUnavailable(f'service "{name}" is disabled: {service.error}')
    manifest = service.manifest
    flavor_name = flavor if flavor is not None else manifest.default_flavor
    if flavor_name not in manifest.flavors:
        raise BadRequest(f'flavor "{flavor_name}": not a flavor of service "{name}" '
                         f'(it has: {", ".join(manifest.flavors)})')
    try:
        values = check_inputs(manifest, fields)
    except ManifestError as exc:
        raise BadRequest(str(exc)) from None
    try:
        template, source = folder.template(name)
    except (OSError, UnicodeDecodeError) as exc:
        raise ServiceUnavailable(f'service "{name}": its template {folder.label}/{name}.txt cannot be read: {exc}') from None
    try:
        check_template(template, source)
    except ManifestError as exc:
        raise ServiceUnavailable(f'service "{name}" is disabled: {exc}') from None
    chunked = manifest.chunked_field
    if chunked is not None and not values[chunked].strip():
        raise BadRequest(f'field "{chunked}": empty: there is nothing to {"summarise" if manifest.type == "map-reduce" else "clean up"}')
    return manifest, flavor_name, values, template, source


async def run_service(manager: Any, folder: ServiceFolder, name: str, fields: Mapping[str, Any],
                      flavor: str | None, request_id: str, *, priority: str = "interactive",
                      deadline: float | None = None) -> AsyncIterator[dict[str, Any]]:
    """The events of one service request (see the module's docstring)."""
    started = time.monotonic()
    manifest, flavor_name, values, template, source = resolve_request(folder, name, fields, flavor)
    chosen = manifest.flavors[flavor_name]
    try:
        model = manager.resolve(chosen.model)
    except EngineError as exc:
        raise EngineError(f'service "{name}", flavor "{flavor_name}": {exc.message}',
                          status_code=exc.status_code) from None
    counter = await token_counter(manager, model)
    run = _Run(manager, name, manifest, flavor_name, chosen, model, values, template, source, counter, request_id,
               priority=priority, deadline=deadline)
    for warning in counter.warnings:
        run.warn(warning)
    chunks = await counter.in_thread(lambda: _plan(run))
    yield {"event": "plan", "service": name, "flavor": flavor_name, "model": model, "type": manifest.type,
           "chunks": len(chunks), "tokenizer": counter.source, "warnings": list(run.warnings)}
    records: list[dict[str, Any]] = []
    outputs: list[str] = []
    for number, chunk in enumerate(chunks, 1):
        summaries = outputs if manifest.type == "map-reduce" else []
        prompt = await counter.in_thread(lambda: _chunk_prompt(run, chunk, number, len(chunks), summaries))
        record: dict[str, Any] = {
            "step": "map", "chunk": number, "chunks": len(chunks),
            "start": chunk.start, "end": chunk.end, "sentences": [chunk.first_sentence, chunk.end_sentence],
            "input_tokens": chunk.tokens, "prompt_tokens": prompt.tokens,
            "carried_summaries": prompt.carried_summaries,
        }
        yield {"event": "chunk_start", **record}
        output = await _generate(run, prompt, record, f"chunk {number} of {len(chunks)}")
        outputs.append(output)
        records.append(record)
        yield {"event": "chunk_done", **record, "response": output}
    combines: list[dict[str, Any]] = []
    if manifest.type == "map-reduce":
        async for event in _combine(run, outputs, combines):
            yield event
        response = outputs[0]  # _combine left the one summary there
    elif manifest.type == "map":
        response = join_cleaned(outputs)
    else:
        response = outputs[0] if outputs else ""
    yield {
        "done": True, "service": name, "flavor": flavor_name, "model": model, "type": manifest.type,
        "response": response, "chunks": records, "combine": [{k: v for k, v in c.items() if k != "response"} for c in combines],
        "tokenizer": counter.source, "warnings": run.warnings,
        "total_duration": round(time.monotonic() - started, 6),
    }


def _plan(run: _Run) -> list[Chunk]:
    """The chunks of the request (a "single" service: one pseudo-chunk, its prompt the whole
    template); in the worker thread."""
    manifest, count = run.manifest, run.counter
    try:
        if manifest.chunked_field is None:
            text = render_template(run.template, run.source, run.values)
            return [Chunk(text, 0, 0, 0, 0, 0, 0)]
        limits = service_limits(run.template, run.source, manifest, run.flavor_name, run.values, count.count_prompt)
        return plan_chunks(run.values[manifest.chunked_field], limits, count.count)
    except ChunkingError as exc:  # SentenceTooLong and TooManyTurns among them: the input's fault
        raise BadRequest(f'field "{manifest.chunked_field}": {exc}') from None
    except ManifestError as exc:
        raise ServiceUnavailable(f'service "{run.service}": {exc}') from None


def _chunk_prompt(run: _Run, chunk: Chunk, number: int, count: int, summaries: list[str]) -> Prompt:
    try:
        if run.manifest.chunked_field is None:
            tokens = run.counter.count_prompt(chunk.text)
            if tokens + run.flavor.max_generation_length > run.flavor.total_context_length:
                raise BadRequest(
                    f"the prompt is {tokens} tokens; with maxGenerationLength ({run.flavor.max_generation_length}) "
                    f"that exceeds totalContextLength ({run.flavor.total_context_length})")
            return Prompt(chunk.text, tokens, 0)
        return chunk_prompt(run.template, run.source, run.manifest, run.flavor_name, run.values, chunk,
                            number, count, summaries, run.counter.count_prompt)
    except ChunkingError as exc:
        raise BadRequest(str(exc)) from None
    except ManifestError as exc:
        raise ServiceUnavailable(f'service "{run.service}": {exc}') from None


async def _combine(run: _Run, summaries: list[str], records: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Combine the summaries in rounds until one is left; `summaries` ends holding it."""
    count = run.counter
    rounds = 0
    while len(summaries) > 1:
        rounds += 1
        if rounds > MAX_COMBINE_ROUNDS:
            raise EngineError(f"the summaries did not combine into one in {MAX_COMBINE_ROUNDS} rounds")
        none, per_summary = await count.in_thread(lambda: combine_costs(
            run.template, run.source, run.manifest, run.values, count.count_prompt))
        room = run.flavor.total_context_length - run.flavor.max_generation_length - none
        sizes = [await count.count_async(summary) + per_summary for summary in summaries]
        try:
            batches = combine_batches(sizes, room)
        except ChunkingError as exc:
            raise EngineError(f"combining the summaries: {exc}") from None
        combined: list[str] = []
        for number, batch in enumerate(batches, 1):
            part = summaries[batch.start:batch.stop]
            try:
                prompt = await count.in_thread(lambda: combine_prompt(
                    run.template, run.source, run.manifest, run.flavor_name, run.values, part, count.count_prompt))
            except ChunkingError as exc:
                raise EngineError(f"combining the summaries: {exc}") from None
            record: dict[str, Any] = {"step": "combine", "round": rounds, "batch": number, "batches": len(batches),
                                      "summaries": [batch.start + 1, batch.stop], "prompt_tokens": prompt.tokens}
            yield {"event": "chunk_start", **record}
            output = await _generate(run, prompt, record, f"combine round {rounds}, batch {number} of {len(batches)}")
            combined.append(output)
            records.append({**record, "response": output})
            yield {"event": "chunk_done", **record, "response": output}
        summaries[:] = combined


async def _generate(run: _Run, prompt: Prompt, record: dict[str, Any], label: str) -> str:
    """One step through the manager, as /api/generate runs it; fills `record` with its figures."""
    flavor = run.flavor
    run.steps += 1
    request = GenerationRequest(
        id=f"{run.request_id}-{run.steps}",
        messages=[ChatMessage("user", prompt.text)],
        options=SamplingOptions(temperature=flavor.temperature, top_p=flavor.top_p,
                                num_predict=flavor.max_generation_length),
        kind="generate", think=False, priority=run.priority,
    )
    request.deadline = run.deadline or request.arrived_at + run.manager.settings.request_deadline_s
    started = time.monotonic()
    completion = await run.manager.complete(run.model, request)
    result = completion.result
    record.update(
        seconds=round(time.monotonic() - started, 6),
        model_prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
        finish_reason=result.finish_reason,
    )
    for warning in result.warnings:
        run.warn(warning)
    if result.finish_reason == "length":
        run.warn(f"{label}: the answer reached maxGenerationLength ({flavor.max_generation_length} tokens) "
                 "and was cut there")
    return completion.content.strip()
