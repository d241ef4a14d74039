"""InProcessEngine: a model answered inside the daemon, for tests of the manager and the routes.

No process, no network: it echoes the last user message (`You said: <text>.` and `reply_words`
numbered words, one chunk each), so every answer proves which request it belongs to, and it
runs the same contract as the real engines: a load that takes `load_s`, a state machine, stops,
embeddings, per-request options. A test reaches the engine object and sets `faults` to make it
fail on demand, in milliseconds. The end-to-end tests run the real engines against real processes.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from pydantic import Field

from ..descriptor import EngineConfig
from ..states import RunnerState
from ..stop_sequences import StopScanner
from ..thinking import ThinkSplitter
from .base import (
    Chunk,
    EmbedOptions,
    Embeddings,
    Engine,
    EngineBug,
    EngineCapabilities,
    EngineContext,
    EngineError,
    GenerationRequest,
    GenerationResult,
    ModelUnavailable,
    RequestTimedOut,
    RunnerCrashed,
)

S = RunnerState


class InProcessConfig(EngineConfig):
    reply_words: int = Field(default=4, ge=0)
    chunk_delay_s: float = Field(default=0.0, ge=0)
    load_s: float = Field(default=0.0, ge=0)
    thinking: str = ""  # reasoning sent (inside <think>) before every answer
    embedding_dim: int = Field(default=0, ge=0)  # 0: no embeddings
    max_concurrency: int = Field(default=1, ge=1)


@dataclass
class Faults:
    """What a test makes go wrong; read at each load, chunk and message."""

    fail_load: str | None = None  # the next loads fail with this reason
    crash_after_chunks: int | None = None  # answers fail (as a crash) after this many chunks
    hang_after_chunks: int | None = None  # answers stop producing after this many chunks
    bug_in_loop: bool = False  # the next message of the owner loop raises (an engine bug)


def reply_words(prompt: str, words: int) -> list[str]:
    """The answer to `prompt`, as the pieces it streams in."""
    return [f"You said: {prompt}."] + [f" w{i + 1}" for i in range(words)]


def embedding(text: str, dim: int) -> list[float]:
    """A deterministic unit-free vector for `text`."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return [(digest[i % len(digest)] - 128) / 128 for i in range(dim)]


class InProcessEngine(Engine):
    kind = "in-process"
    config_class = InProcessConfig

    def __init__(self, spec, context: EngineContext) -> None:
        super().__init__(spec, context)
        self.config: InProcessConfig = spec.config
        self.capabilities = EngineCapabilities(
            embeddings=self.config.embedding_dim > 0, per_request_sampling=True, max_concurrency=self.config.max_concurrency
        )
        self.faults = Faults()
        self.loads = 0
        self._ready_at: float | None = None
        self._restart_at: float | None = None
        self._failed_at = 0.0
        self._ready_since = 0.0
        self._in_flight: dict[str, _InFlight] = {}

    async def start(self) -> None:
        self._post(("start", None))

    async def wait_ready(self, deadline: float | None) -> float:
        began = time.monotonic()
        while True:
            changed = self._state_changed
            state = self._machine.state
            if state is S.READY:
                return time.monotonic() - began if self.loads and self._ready_since > began else 0.0
            if state is S.FAILED and self._failed_at > began:
                raise ModelUnavailable(f'model "{self.spec.name}" failed: {(self.last_error or {}).get("reason")}')
            if state in (S.STOPPED, S.FAILED):
                self._post(("start", None))
            remaining = math.inf if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimedOut(f'model "{self.spec.name}" was not ready before the request deadline (state {state})')
            with anyio.move_on_after(remaining):
                await changed.wait()

    async def stop(self, reason: str) -> None:
        done = anyio.Event()
        self._post(("stop", (reason, done)))
        await done.wait()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk | GenerationResult]:
        if self._machine.state is not S.READY:
            raise ModelUnavailable(f'model "{self.spec.name}" is {self.state}')
        began = time.monotonic()
        prompt = request.messages[-1].content
        pieces = reply_words(prompt, self.config.reply_words)
        if self.config.thinking:
            pieces = [f"<think>{self.config.thinking}</think>"] + pieces
        limit = request.options.num_predict if request.options.num_predict and request.options.num_predict > 0 else None
        splitter, stops = ThinkSplitter(), StopScanner(request.options.stop)
        finish = "stop"
        sent = 0
        first_at = None
        answer = self._in_flight[request.id] = _InFlight()
        request.prompt_tokens = len(prompt.split()) + 1
        try:
            for index, piece in enumerate(pieces):
                if self.config.chunk_delay_s:
                    await anyio.sleep(self.config.chunk_delay_s)
                await self._check(answer, index)
                thinking, content = splitter.feed(piece)
                visible = stops.feed(content)
                first_at = first_at or time.monotonic()
                sent += 1
                if thinking or visible:
                    yield Chunk(content=visible, thinking=thinking, tokens=1)
                if stops.stopped:
                    break
                if limit is not None and sent >= limit:
                    finish = "length"
                    break
            thinking, content = splitter.flush()
            content = stops.feed(content) + stops.flush()
            if thinking or content:
                yield Chunk(content=content, thinking=thinking)
            now = time.monotonic()
            first_at = first_at or now
            yield GenerationResult(
                finish_reason=finish,  # type: ignore[arg-type]
                prompt_tokens=request.prompt_tokens,
                completion_tokens=sent,
                prompt_eval_duration=first_at - began,
                eval_duration=now - first_at,
                total_duration=now - began,
                time_to_first_token=first_at - began,
            )
        finally:
            del self._in_flight[request.id]

    async def embed(self, inputs: list[str], options: EmbedOptions = EmbedOptions()) -> Embeddings:
        if not self.capabilities.embeddings:
            return await super().embed(inputs, options)
        vectors = [embedding(text, self.config.embedding_dim) for text in inputs]
        if options.dimensions is not None:
            vectors = [vector[: options.dimensions] for vector in vectors]
        return Embeddings(vectors, sum(len(text.split()) for text in inputs))

    def status(self) -> dict[str, Any]:
        status = super().status()
        status.update(in_flight=len(self._in_flight), loads=self.loads)
        return status

    async def _check(self, answer: _InFlight, index: int) -> None:
        faults = self.faults
        if faults.crash_after_chunks is not None and index >= faults.crash_after_chunks:
            raise RunnerCrashed(f'model "{self.spec.name}" crashed (fault injected after {index} chunks)')
        if faults.hang_after_chunks is not None and index >= faults.hang_after_chunks:
            await answer.ended.wait()  # until a stop or a recovery ends it (or the client leaves)
        if answer.error is not None:
            raise answer.error

    # ---- the owner loop ---------------------------------------------------------------------

    async def _handle(self, message: tuple[str, Any]) -> None:
        if self.faults.bug_in_loop:
            self.faults.bug_in_loop = False
            raise RuntimeError("a bug in the engine (fault injected)")
        kind, payload = message
        state = self._machine.state
        if kind == "start" and state in (S.STOPPED, S.FAILED):
            if state is S.FAILED and self._restart_at is not None:
                return  # a restart is scheduled
            self._begin_load("start requested")
        elif kind == "stop":
            reason, done = payload
            self._end_all(ModelUnavailable(f'model "{self.spec.name}" is stopping: {reason}'))
            self._ready_at = self._restart_at = None
            if state is not S.STOPPED:
                if self._machine.can(S.STOPPING):
                    self._set_state(S.STOPPING, reason)
                self._set_state(S.STOPPED, reason)
            done.set()

    def _begin_load(self, reason: str) -> None:
        self._restart_at = None
        self._set_state(S.STARTING, reason)
        self._set_state(S.INITIALIZING, "loading in process")
        self._ready_at = time.monotonic() + self.config.load_s

    def _next_timer_at(self) -> float | None:
        return self._ready_at if self._ready_at is not None else self._restart_at

    async def _on_timers(self) -> None:
        now = time.monotonic()
        if self._ready_at is not None and now >= self._ready_at:
            self._ready_at = None
            if self.faults.fail_load:
                self._failed(self.faults.fail_load)
                return
            self.loads += 1
            self._ready_since = now
            self._set_state(S.READY, "loaded")
        elif self._restart_at is not None and now >= self._restart_at:
            self._begin_load("restart after failure")

    async def _recover(self, error: Exception) -> None:
        self._end_all(EngineBug(self._bug_message(error)))
        self._ready_at = None
        if self._machine.can(S.FAILED):
            self._failed(f"internal error in the engine: {error!r}")

    def _failed(self, reason: str) -> None:
        self._record_error(reason)
        self._failed_at = time.monotonic()
        self._restart_at = self._failed_at + self.settings.backoff_min_s
        self._set_state(S.FAILED, reason)

    def _end_all(self, error: EngineError) -> None:
        for answer in self._in_flight.values():
            answer.error = error
            answer.ended.set()


@dataclass(eq=False)
class _InFlight:
    error: EngineError | None = None
    ended: anyio.Event = field(default_factory=anyio.Event)
