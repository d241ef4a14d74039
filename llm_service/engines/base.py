"""The one interface the API layer uses for every backend.

An engine serves one model: the card's stdio runner (`CardEngine`) or an OpenAI-compatible
upstream (`HttpEngine`). The API layer builds a `GenerationRequest`, iterates
`Engine.generate()` for `Chunk`s and finally one `GenerationResult`, and never learns which
engine it talks to. Failures are `EngineError`s carrying the HTTP status a client should see.
"""
from __future__ import annotations

import abc
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Literal["system", "user", "assistant", "tool"]
    content: str


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """Per-request options. Engines apply what they can and report the rest."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repeat_penalty: float | None = None
    num_predict: int | None = None  # max new tokens; None or negative = up to the context
    stop: tuple[str, ...] = ()
    num_ctx: int | None = None


@dataclass(slots=True)
class GenerationRequest:
    """One request for text, in chat form. `/api/generate` is a chat of one user message."""

    id: str
    messages: list[ChatMessage]  # the whole conversation, last one from the user
    options: SamplingOptions = field(default_factory=SamplingOptions)
    # Continuing the conversation the runner holds is allowed only for chat requests.
    kind: Literal["chat", "generate"] = "chat"
    # Reasoning wanted in `Chunk.thinking`? None = the model's default (descriptor's include_thinking);
    # False drops it. Engines always split; the model manager applies this.
    think: bool | None = None
    arrived_at: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # monotonic time after which the request fails
    # Set by the engine as soon as the backend has read the prompt: counted even when the
    # answer later ends in an error or an abort.
    prompt_tokens: int = 0

    @property
    def system(self) -> str | None:
        systems = [m.content for m in self.messages if m.role == "system"]
        return "\n".join(systems) if systems else None


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of the answer as it streams: visible text and reasoning text."""

    content: str = ""
    thinking: str = ""
    tokens: int = 0  # generated tokens this chunk stands for (an estimate until the final record)


@dataclass(slots=True)
class GenerationResult:
    """The final record of one generation. Durations in seconds; token counts are real tokens."""

    finish_reason: FinishReason
    prompt_tokens: int = 0
    completion_tokens: int = 0
    load_duration: float = 0.0
    queue_duration: float = 0.0
    prompt_eval_duration: float = 0.0
    eval_duration: float = 0.0
    total_duration: float = 0.0
    time_to_first_token: float | None = None
    runner_tokens_per_second: float | None = None  # the speed the runner itself reported
    # What the engine could not honour, e.g. "temperature: fixed at launch by post_config.json".
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class EngineCapabilities:
    chat_history: bool = True  # can open a context holding a whole history
    embeddings: bool = False
    per_request_sampling: bool = False
    max_concurrency: int = 1


class EngineError(Exception):
    """A failure a client must see, with the HTTP status that fits it."""

    status_code = 500
    code = "engine_error"

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code


class ModelUnavailable(EngineError):
    """The model could not be started or is failing; a restart is scheduled."""

    status_code = 503
    code = "model_unavailable"


class RunnerCrashed(EngineError):
    status_code = 500
    code = "runner_crashed"


class RunnerHung(EngineError):
    status_code = 504
    code = "runner_hung"


class QueueFull(EngineError):
    status_code = 503
    code = "queue_full"

    def __init__(self, message: str = "server busy, please try again.  maximum pending requests exceeded") -> None:
        super().__init__(message)


class RequestTimedOut(EngineError):
    status_code = 504
    code = "request_timeout"


class ModelNotFound(EngineError):
    status_code = 404
    code = "model_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f'model "{name}" not found')


class BadRequest(EngineError):
    status_code = 400
    code = "bad_request"


class Engine(abc.ABC):
    """A backend serving one model."""

    capabilities: EngineCapabilities

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin loading (returns at once; progress shows in `status()`)."""

    @abc.abstractmethod
    async def wait_ready(self, deadline: float | None) -> float:
        """Start if needed and wait until the model can take a request.

        Returns the seconds spent loading on behalf of this caller (Ollama's load_duration).
        Raises `ModelUnavailable` when the model failed, `RequestTimedOut` at the deadline.
        """

    @abc.abstractmethod
    async def stop(self, reason: str) -> None:
        """Stop and release the backend; waits until it is stopped."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk | GenerationResult]:
        """Stream the answer: `Chunk`s, then exactly one `GenerationResult`.

        Closing the iterator early (client gone) cancels the generation on the backend.
        The caller holds a scheduler slot; the engine does not queue.
        """

    @abc.abstractmethod
    def status(self) -> dict[str, Any]:
        """JSON-ready state for /api/status: state name, since, progress, history, errors…"""

    @property
    @abc.abstractmethod
    def state(self) -> str:
        """The current state name (a `RunnerState` value)."""

    @property
    def is_loaded(self) -> bool:
        return self.state not in ("stopped", "failed")

    @property
    def is_busy(self) -> bool:
        return self.state in ("processing", "outputting", "resetting")
