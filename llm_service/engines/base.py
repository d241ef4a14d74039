"""The one contract between the model manager and the API on one side and every backend on the other.

An engine serves one model: the card's stdio runner, an OpenAI-compatible upstream, an in-process
engine for tests. The API layer builds a `GenerationRequest`, iterates `Engine.generate()` for
`Chunk`s and finally one `GenerationResult`, and never learns which engine it talks to. Failures
are `EngineError`s carrying the HTTP status a client should see.

Every engine is built as `Engine(spec, context)` and owns its state through one owner task
(`run`, the loop below): requests, timers and child tasks only post messages to its inbox. An
unexpected exception in the loop never ends it: `recover` fails the requests in flight with a
clear error and the engine restarts with back-off.
"""
from __future__ import annotations

import abc
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import anyio
from anyio.abc import TaskGroup

from ..descriptor import EngineConfig, ModelSpec
from ..events import NO_EVENTS, ModelEvents
from ..states import SERVING_STATES, RunnerState, StateMachine
from .log_ring import LogRing

if TYPE_CHECKING:  # the metrics module imports this one
    from ..metrics import ModelMetrics
    from ..settings import DaemonSettings
    from ..structured.output import StructuredOutput
    from ..images import ImageInput
    from ..tokenizer_client import TokenizerClient
    from .upstream_process import ManagedProcesses

log = logging.getLogger(__name__)
S = RunnerState

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call of one of the request's tools, as the model made it (arguments: a JSON object)."""

    name: str
    arguments: dict[str, Any]
    id: str = ""  # the client's or upstream's id ("call_…"); "" where none was given


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """OpenAI's `tool_choice`: auto (the model decides), none (no tools given to the model),
    required (some call), or `name` set (a call of that function; mode "required")."""

    mode: Literal["auto", "none", "required"] = "auto"
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's calls
    tool_name: str | None = None  # a tool message: the tool whose result it is, where known
    tool_call_id: str | None = None  # a tool message: the call it answers, where given
    # Ollama's `images` of the message, OpenAI's `image_url` parts: checked (llm_service/images.py).
    images: tuple[ImageInput, ...] = ()


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
    # /api/generate's raw: the prompt reaches the model as it is, without the chat template.
    raw: bool = False
    # Fill in the middle: the text after the prompt (Ollama's and OpenAI's `suffix`); the model
    # writes what goes between. None (or "") = an ordinary completion.
    suffix: str | None = None
    # Tools the model may call (OpenAI's and Ollama's `tools`: [{type: function, function: {name,
    # description, parameters}}]), and how (tool_choice). None = no tools (llm_service/tools.py).
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    # The answer must be JSON (Ollama's format, OpenAI's response_format); None: free text. The
    # card's planner puts the instruction in front of the model, the HTTP engine passes
    # response_format on; structured/attempts.py validates and retries.
    structured: StructuredOutput | None = None
    # The client asked for StatusNotes in its stream (queued, loading, loaded, generating, done).
    status_events: bool = False
    # Admission priority (admission.py): "interactive" (every API route) or "job" (a batch
    # item: served only when no interactive request waits, never preempting one).
    priority: str = "interactive"

    @property
    def system(self) -> str | None:
        systems = [m.content for m in self.messages if m.role == "system"]
        return "\n".join(systems) if systems else None


@dataclass(frozen=True, slots=True)
class StatusNote:
    """What the request is waiting for, for clients that asked (`status_events`): `queued`,
    `loading` (with the load's progress), `loaded`, `generating`, `done`. Never sent otherwise."""

    status: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of the answer as it streams: visible text and reasoning text."""

    content: str = ""
    thinking: str = ""
    tokens: int = 0  # generated tokens this chunk stands for (an estimate until the final record)
    tool_calls: tuple[ToolCall, ...] = ()  # complete calls (never together with thinking)


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
class EmbedOptions:
    """What a client may ask of an embedding besides its inputs."""

    dimensions: int | None = None  # keep the first N dimensions (re-normalised); None: all
    truncate: bool = True  # False: an input longer than the model takes is an error, not cut


@dataclass(slots=True)
class Embeddings:
    vectors: list[list[float]]  # in the order of the inputs
    prompt_tokens: int
    warnings: list[str] = field(default_factory=list)
    load_duration: float = 0.0  # set by the manager
    total_duration: float = 0.0


@dataclass(frozen=True, slots=True)
class Infill:
    """A tokenizer's fill-in-the-middle tokens (prefix-suffix-middle order)."""

    prefix: str
    suffix: str
    middle: str

    def prompt(self, before: str, after: str) -> str:
        """The prompt that asks for the text between `before` and `after`."""
        return f"{self.prefix}{before}{self.suffix}{after}{self.middle}"


@dataclass(frozen=True, slots=True)
class PromptFormat:
    """How the model's prompts are written, as far as its engine knows (for /api/show)."""

    chat_template: str | None = None  # the tokenizer's own chat template (Jinja); None: unknown
    stop: tuple[str, ...] = ()  # texts that end a reply
    infill: Infill | None = None  # None: the model cannot fill in the middle (no `insert`)
    raw: bool = False  # a prompt can reach the model without the chat template
    thinking_switch: bool = False  # the template turns reasoning on and off
    tools: bool = False  # tool definitions reach the model in its own template's form (or upstream's)


@dataclass(frozen=True, slots=True)
class EngineCapabilities:
    chat_history: bool = True  # can open a context holding a whole history
    embeddings: bool = False
    per_request_sampling: bool = False
    max_concurrency: int = 1


@dataclass(frozen=True)
class EngineContext:
    """What every engine gets besides its spec: the daemon's settings, the model's metrics, and
    the client of the tokenizer service."""

    settings: DaemonSettings
    metrics: ModelMetrics
    tokenizers: TokenizerClient
    # The managed upstreams (servers the daemon launches); None where nothing may be launched.
    processes: ManagedProcesses | None = None
    # Where the engine's state changes and load progress are published (/api/events).
    events: ModelEvents = NO_EVENTS


# ---- errors a client sees -------------------------------------------------------------------

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


class EngineBug(EngineError):
    """An unexpected exception inside an engine: the request fails, the engine restarts."""

    status_code = 500
    code = "internal_error"


# ---- messages of the owner loop that every engine shares ---------------------------------------

@dataclass(slots=True)
class _TaskFailed:
    """A child task of the owner loop raised: handled like an exception in the loop itself."""

    error: BaseException


# ---- the contract -----------------------------------------------------------------------------

class Engine(abc.ABC):
    """A backend serving one model. Subclasses set `kind` (the descriptor's `engine` value) and
    `config_class` (the descriptor fields they read), and are listed in the registry."""

    kind: ClassVar[str]
    config_class: ClassVar[type[EngineConfig]]

    def __init__(self, spec: ModelSpec, context: EngineContext) -> None:
        self.spec = spec
        self.context = context
        self.settings = context.settings
        self.metrics = context.metrics
        self.events = context.events
        # Where a transition goes besides the event stream: the model's state gauge. A replica
        # (one card of a model on several) reports its model's combined state (engines/replicas.py).
        self.report_state: Callable[[RunnerState], None] = lambda to: self.metrics.set_state(to.value)
        self.capabilities = EngineCapabilities()
        self.logs = LogRing(context.settings.runner_log_lines)
        self.last_error: dict[str, Any] | None = None
        # NPU memory (MiB) the loaded backend claimed, as it reported it; None: no figure.
        self.claimed_npu_memory_mb: int | None = None
        self._machine = StateMachine()
        self._state_changed = anyio.Event()
        self._inbox_send, self._inbox = anyio.create_memory_object_stream[Any](math.inf)
        self._tasks: TaskGroup | None = None

    # ---- what the manager and the routes call ----------------------------------------------

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

    async def close(self) -> None:
        """The model left the descriptor: release what outlives a stop. Called after `stop`."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk | GenerationResult]:
        """Stream the answer: `Chunk`s, then exactly one `GenerationResult`.

        Closing the iterator early (client gone) cancels the generation on the backend.
        The caller holds an admission slot; the engine does not queue.
        """

    async def embed(self, inputs: list[str], options: EmbedOptions = EmbedOptions()) -> Embeddings:
        """Vectors for `inputs`. The caller holds an admission slot and has waited for ready."""
        raise BadRequest(f'model "{self.spec.name}" does not serve embeddings')

    async def prompt_format(self) -> PromptFormat:
        """What the engine knows of the model's prompt format; it may ask its backend (never
        loads the model). Default: nothing known."""
        return PromptFormat()

    def model_facts(self) -> dict[str, Any]:
        """What the engine knows of the model itself for /api/show's model_info, in Ollama's
        keys without the architecture prefix (`embedding_length`, …); default: nothing."""
        return {}

    def accepts_images(self) -> bool:
        """The model reads images with its prompt (a vision-language runner); default: no."""
        return False

    def status(self) -> dict[str, Any]:
        """JSON-ready state for /api/status; engines add their own keys."""
        snap = self._machine.snapshot()
        return {
            "name": self.spec.name,
            "engine": self.kind,
            "state": snap["state"],
            "since": snap["since"],
            "since_epoch": snap["since_epoch"],
            "last_error": self.last_error,
            "history": snap["history"][-50:],
        }

    def info(self) -> dict[str, Any]:
        """What the model is and where it runs (GET /api/models/{name}); engines fill in what
        they know: device, base model, adapter."""
        return {
            "name": self.spec.name,
            "engine": self.kind,
            "loaded": self.state in SERVING_STATES,
            "state": self.state,
            "device": None,
            "base_model": None,
            "adapter": None,
        }

    def transition_history(self) -> list[dict[str, Any]]:
        """Every recorded transition (bounded), oldest first."""
        return [t.as_dict() for t in self._machine.history]

    @property
    def state(self) -> str:
        return self._machine.state.value

    @property
    def is_loaded(self) -> bool:
        return self.state not in ("stopped", "failed")

    @property
    def is_busy(self) -> bool:
        return self.state in ("processing", "outputting", "resetting")

    # ---- the owner loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """The owner loop. Runs for the engine's life inside the manager's task group."""
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            try:
                while True:
                    message = None
                    with anyio.move_on_after(self._seconds_to_next_timer()):
                        message = await self._inbox.receive()
                    try:
                        if message is None:
                            await self._on_timers()
                        elif isinstance(message, _TaskFailed):
                            raise message.error
                        else:
                            await self._handle(message)
                    except Exception as exc:  # a bug, not a fault of the backend: contain it
                        log.exception("model %s: unexpected error in its engine", self.spec.name)
                        self.logs.append(f"[axm1-llm] internal error: {exc!r}")
                        await self._recover(exc)
            finally:
                with anyio.CancelScope(shield=True):
                    await self._on_shutdown()
                tasks.cancel_scope.cancel()

    def _post(self, message: Any) -> None:
        self._inbox_send.send_nowait(message)

    def _start_task(self, work: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run `work` beside the owner loop; an exception in it reaches the loop as its own."""

        async def contained() -> None:
            try:
                await work(*args)
            except Exception as exc:
                self._post(_TaskFailed(exc))

        assert self._tasks is not None, "the owner loop is not running"
        self._tasks.start_soon(contained)

    @abc.abstractmethod
    async def _handle(self, message: Any) -> None:
        """One message of the inbox."""

    def _next_timer_at(self) -> float | None:
        """Monotonic time of the next timer, None for none."""
        return None

    async def _on_timers(self) -> None:
        """Called when the time of `_next_timer_at` has come."""

    @abc.abstractmethod
    async def _recover(self, error: Exception) -> None:
        """After an unexpected exception: fail what is in flight with a clear error (`EngineBug`),
        and bring the engine back (restart with back-off). Must not raise."""

    async def _on_shutdown(self) -> None:
        """The daemon stops: release processes and connections now (shielded)."""

    def _seconds_to_next_timer(self) -> float:
        at = self._next_timer_at()
        return math.inf if at is None else max(0.0, at - time.monotonic())

    # ---- state ------------------------------------------------------------------------------

    def _set_state(self, to: RunnerState, reason: str, **details: Any) -> None:
        if self._machine.state is to:
            return
        move = self._machine.transition(to, reason, **details)
        log.info("model %s: %s (%s)", self.spec.name, to.value, reason)
        self.report_state(to)
        self.events.publish("state", **{k: v for k, v in move.as_dict().items() if k not in ("at", "at_epoch")})
        self._notify()

    def _notify(self) -> None:
        """Wake everyone waiting for a change (a transition, or a probe's verdict)."""
        changed, self._state_changed = self._state_changed, anyio.Event()
        changed.set()

    def _record_error(self, reason: str, **details: Any) -> None:
        self.last_error = {"at": time.time(), "reason": reason, "details": details}

    def _bug_message(self, error: Exception) -> str:
        return f'internal error in the engine of model "{self.spec.name}": {error!r}; the model restarts'
