"""CardEngine: one runner program of the AX-M1 card, driven over its stdin and stdout.

The owner loop (`Engine.run`) decides every state transition and never waits on the network or a
process itself: the stdout/stderr/exit watchers, the tokenizer calls (start-up, `/config`,
`/tokenize`, `/stats`) and kills run beside it and post their results to its inbox, so timers
and stops are handled while they run. Requests never touch the state or the process; they hand
the owner a `_TurnJob` and read its answer stream.

Runner facts this relies on (see the protocol reference): output is block-buffered and read in
chunks; the marker has no newline; `hit eos` ends every turn, including after SIGINT; stdin must
never be closed (the runner would spin on its marker); the dialect's quit command ends it.
"""
from __future__ import annotations

import logging
import math
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from ...children import child_environment, owner_tag
from ...image_files import TurnImages, write_turn_images
from ...states import RunnerState
from ...stop_sequences import StopScanner
from ...thinking import ThinkSplitter
from ...tokenizer_client import TokenizerUnavailable
from ..base import (
    ChatMessage,
    Chunk,
    Engine,
    EngineBug,
    EngineCapabilities,
    EngineContext,
    EngineError,
    GenerationRequest,
    GenerationResult,
    Infill,
    ModelUnavailable,
    PromptFormat,
    RequestTimedOut,
    RunnerCrashed,
    RunnerHung,
    BadRequest,
)
from .config import CardConfig, model_facts_from_flags, script_flags
from .dialects import DIALECTS, Dialect
from .output import (
    Banner,
    ContextUsed,
    FrameLine,
    ImageMarker,
    InputTokens,
    KvCache,
    LogLine,
    Marker,
    PlainLine,
    Progress,
    RunnerError,
    RunnerOutputParser,
    Text,
    Ttft,
    TurnEnd,
    Uid,
    claimed_cmm_mb,
    remain_cmm_mb,
)
from .planner import (
    CONTEXT_MARGIN,
    TOKENS_PER_MESSAGE,
    Action,
    Held,
    Plan,
    Runner,
    Turn,
    continues,
    conversation_texts,
    fits,
    image_tokens,
    images_for_turn,
    line_texts,
    plan_turn,
    read_turn,
    token_bound,
    token_guess,
)
from .process import Exited, Output, RunnerProcess, WriteFailed, describe_exit

log = logging.getLogger(__name__)
S = RunnerState

# The card prints text every 3 tokens: each text flush counts as 3 tokens while streaming.
TOKENS_PER_FLUSH = 3
_RESET_TIMEOUT_S = 30.0
# Tokens the runner's context count may differ from the tokenizer's by (an end token or two).
_CONTEXT_SLACK = 2
_TOKENIZER_CALL_TIMEOUT_S = 5.0
# A vision runner's word that it could not read the image it was given (docs/vlm-runners.md §3).
_IMAGE_NOT_READ = re.compile(r"image prompt\(.*\) not found")
# The context a runner was built with, at start-up (a vision runner's is smaller than the card's 2048 default).
_MAX_TOKEN_LEN = re.compile(r"max_token_len : (\d+)")
# /api/show waits at most this long for a model's tokenizer server to start and say what it knows.
_DESCRIBE_TIMEOUT_S = 20.0


def prompt_format_of(caps: dict[str, Any] | None) -> PromptFormat:
    """The prompt format our tokenizer server's /capabilities tells; nothing for a stock script
    (None) or an older server. Pure."""
    if not caps:
        return PromptFormat()
    template = caps.get("chat_template")
    stop = caps.get("stop")
    infill = caps.get("infill")
    tokens = [infill.get(k) for k in ("prefix", "suffix", "middle")] if isinstance(infill, dict) else []
    raw = "raw" in (caps.get("controls") or ())
    return PromptFormat(
        chat_template=template if isinstance(template, str) and template else None,
        stop=tuple(t for t in stop if isinstance(t, str)) if isinstance(stop, list) else (),
        # Infill prompts reach the model only as raw prompts.
        infill=Infill(*tokens) if raw and len(tokens) == 3 and all(isinstance(t, str) and t for t in tokens) else None,
        raw=raw,
        thinking_switch=caps.get("thinking_switch") is True,
        tools="tools" in (caps.get("controls") or ()) and (caps.get("tools") or {}).get("definitions") == "template",
    )


# ---- messages to the owner loop -------------------------------------------------------------

@dataclass(slots=True)
class _Start:
    reason: str


@dataclass(slots=True)
class _Stop:
    reason: str
    done: anyio.Event


@dataclass(slots=True)
class _Cancel:
    job: _TurnJob


@dataclass(slots=True)
class _TokenizerReady:
    generation: int
    capabilities: dict[str, Any] | None
    applied: dict[str, Any]  # the settings /config installed
    error: str | None
    server: str | None = None  # which server the tokenizer service runs, and why
    # Ends this runner's turn on its tokenizer port, once it has started (TokenizerClient.runner_turn).
    release_turn: Callable[[], None] | None = None


@dataclass(slots=True)
class _Prepared:
    """The head job's plan, with the tokenizer settings already installed for it."""

    job: _TurnJob
    generation: int
    plan: Plan | None
    applied: dict[str, Any]
    error: EngineError | None = None
    tokenizer_down: bool = False


@dataclass(slots=True)
class _ResetAheadPrepared:
    generation: int
    applied: dict[str, Any]
    error: str | None


@dataclass(slots=True)
class _Counted:
    """The tokenizer's account of the turn that the runner's lines said was over (None: none)."""

    job: _TurnJob
    generation: int
    stats: dict[str, Any] | None


@dataclass(eq=False)
class _TurnJob:
    request: GenerationRequest
    send: MemoryObjectSendStream
    splitter: ThinkSplitter
    stops: StopScanner
    phase: str = "new"  # new -> preparing -> (resetting | restarting) -> prompting -> counting
    plan: Plan | None = None
    prompt_written_at: float | None = None
    first_text_at: float | None = None
    answer: list[str] = field(default_factory=list)
    flushes: int = 0
    prompt_tokens: int | None = None
    runner_ttft_ms: float | None = None
    runner_tps: float | None = None
    interrupted: str | None = None  # why we sent SIGINT: cancel | stop | length | hang
    # SIGINT went out before the runner's first text: it may have landed while the runner had not
    # yet read the prompt line, where a Ctrl-C stops nothing; it is sent again at the first text.
    interrupted_before_text: bool = False
    error: EngineError | None = None
    delivered: bool = False  # the final record or an error has been sent
    # The turn's accounting, to tell the runner's end-of-turn lines from an answer that imitates
    # them: the context used before the turn, and the one the `GetKVCache` after `hit eos` said.
    context_before: int | None = None
    turn_end_seen: bool = False
    context_after: int | None = None
    markers_while_counting: int = 0
    # After an imitated end: the rest of the answer is taken from the tokenizer's account.
    text_from_tokenizer: bool = False
    # The turn's images as files a vision runner reads (written and removed by the request).
    images: TurnImages | None = None
    frames_listed: int = 0  # the frames the runner said it read (a folder of frames)

    def deliver(self, item: Any) -> None:
        if self.delivered:
            return
        if isinstance(item, (GenerationResult, BaseException)):
            self.delivered = True
        try:
            self.send.send_nowait(item)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.delivered = True  # the consumer is gone


def _images_described(job: _TurnJob) -> str:
    images = job.plan.images if job.plan is not None else ()
    return "; ".join(image.describe() for image in images) or "none"


class CardEngine(Engine):
    """A model served by the card's runner program through its run script."""

    kind = "ax-runner"
    config_class = CardConfig

    def __init__(self, spec, context: EngineContext) -> None:
        super().__init__(spec, context)
        self.config: CardConfig = spec.config
        self.capabilities = EngineCapabilities(chat_history=True, per_request_sampling=False, max_concurrency=1)
        self._tokenizers = context.tokenizers

        # The runner (owned by the owner loop).
        self._generation = 0  # of the newest launch; messages of older launches are ignored
        self._runner: RunnerProcess | None = None
        self._dying: RunnerProcess | None = None  # killed, its exit not seen yet
        self._parser: RunnerOutputParser | None = None
        self._dialect_name: str | None = None if self.config.dialect == "auto" else self.config.dialect
        self._banner_offers_reset = False
        self._uid: str | None = None
        self._tokenizer_caps: dict[str, Any] | None = None
        self._release_turn: Callable[[], None] | None = None  # this runner's turn on its tokenizer port
        self._tokenizer_probed = False
        self._tokenizer_server: str | None = None  # the tokenizer service's word on what runs
        self._tokenizer_config: dict[str, Any] = {}  # what /config last set on the server
        self._tokenizer_scope: anyio.CancelScope | None = None
        # /capabilities asked for /api/show before the first load (the owner's own copy is
        # _tokenizer_caps, read at every start); and the run script's facts, read once.
        self._described_caps: dict[str, Any] | None = None
        self._describe_lock = anyio.Lock()
        self._script_facts: dict[str, Any] | None = None
        self._progress: dict[str, Any] | None = None
        self._cmm_figures: list[int] = []  # remain_cmm of each load step, this load
        self._load_started: float | None = None
        self.last_load_duration: float | None = None
        self._context: tuple[int, int] | None = None  # (precompute_len, remaining)
        self._runner_max_tokens: int | None = None  # its `max_token_len` at start-up
        self._held: tuple[ChatMessage, ...] | None = None  # the conversation the runner's context holds
        self._held_system: str | None = None
        self._held_raw = False  # the context was opened for raw prompts (empty)
        self._reset_system: str | None = None  # the system prompt the reset under way installs
        self._reset_raw = False  # … or the empty context it opens for a raw prompt
        self._held_tools: list[dict[str, Any]] | None = None  # the tools the held conversation has
        self._reset_tools: list[dict[str, Any]] | None = None  # … and the ones the reset under way installs
        # The system prompt the next launch gives the tokenizer for the runner's init /reset, and
        # what else a job waiting for a restart needs the server to hold (history, thinking).
        self._launch_system: str | None = spec.system_prompt
        self._launch_extra: dict[str, Any] = {}
        self._launch_pending: str | None = None  # a launch waits for the dying runner's exit

        # Jobs and failures.
        self._job: _TurnJob | None = None
        self._pending: deque[_TurnJob] = deque()
        self._preparing = False  # a tokenizer call for the head job or a reset ahead is out
        self._stop_waiters: list[anyio.Event] = []
        self._restarts = 0  # after crashes, hangs, failed loads: faults
        self._fresh_context_restarts = 0  # planned: a runner without reset, for a fresh context
        self._backoff = self.settings.backoff_min_s
        self._failed_at = 0.0

        # Timers (monotonic deadlines; None = off).
        self._restart_at: float | None = None
        self._load_stall_at: float | None = None
        self._load_cap_at: float | None = None
        self._hang_at: float | None = None
        self._interrupt_at: float | None = None
        self._reset_at: float | None = None
        self._stop_term_at: float | None = None
        self._stop_kill_at: float | None = None

    # ---- Engine interface (called by requests and the manager) --------------------------------

    async def start(self) -> None:
        self._post(_Start("start requested"))

    async def wait_ready(self, deadline: float | None) -> float:
        began = time.monotonic()
        loaded_for_us = False
        while True:
            changed = self._state_changed
            state = self._machine.state
            if state is S.READY and not self._pending and self._job is None:
                return (time.monotonic() - began) if loaded_for_us else 0.0
            if state is S.FAILED and self._failed_at > began:
                raise ModelUnavailable(self._failure_message())
            if state in (S.WAITING_FOR_TOKENIZER, S.STARTING, S.INITIALIZING):
                loaded_for_us = True
            if state in (S.STOPPED, S.FAILED, S.STOPPING):
                self._post(_Start("request needs the model"))
            remaining = math.inf if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimedOut(f'model "{self.spec.name}" was not ready before the request deadline (state {state})')
            if state is S.FAILED and self._restart_at is not None:
                # Look again halfway through the back-off, when asking brings the restart forward.
                remaining = min(remaining, max(0.05, (self._restart_at - self._failed_at) / 2 - (time.monotonic() - self._failed_at)))
            with anyio.move_on_after(remaining):
                await changed.wait()

    async def stop(self, reason: str) -> None:
        done = anyio.Event()
        self._post(_Stop(reason, done))
        await done.wait()

    async def close(self) -> None:
        if self.config.tokenizer_py:
            await self._tokenizers.stop_server(self.spec.name, self._tokenizer_host)

    async def generate(self, request: GenerationRequest):
        send, receive = anyio.create_memory_object_stream(math.inf)
        job = _TurnJob(request=request, send=send, splitter=ThinkSplitter(), stops=StopScanner(request.options.stop))
        messages = [m for m in request.messages if m.role != "system"]
        images = images_for_turn(messages)[0] if messages else ()
        if images:
            # Written before the owner sees the job and removed when the request ends, however
            # it ends: the owner only passes the path (llm_service/image_files.py).
            job.images = await anyio.to_thread.run_sync(write_turn_images, self.settings.data_dir, images, request.id)
        try:
            self._post(job)
            async with receive:
                async for item in receive:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    if isinstance(item, GenerationResult):
                        return
        finally:
            if not job.delivered:
                self._post(_Cancel(job))
            if job.images is not None:
                job.images.remove()

    def accepts_images(self) -> bool:
        dialect = self._dialect
        if dialect is not None and dialect.image_marker is not None:
            return True
        return bool(self.model_facts().get("vision")) or self.config.dialect in ("vl", "vl_qwen")

    async def prompt_format(self) -> PromptFormat:
        """What the model's tokenizer server says (our server only): the one the runner talks
        to, as read at its start; before the first load, asked now — the tokenizer service
        starts the server the descriptor names, the runner stays off."""
        dialect = self._dialect
        if not self.config.tokenizer_port or (dialect is not None and dialect.builtin_tokenizer):
            return PromptFormat()
        if self._tokenizer_probed:
            return prompt_format_of(self._tokenizer_caps)
        async with self._describe_lock:
            if self._described_caps is None:
                self._described_caps = await self._ask_capabilities()
        return prompt_format_of(self._described_caps)

    async def _ask_capabilities(self) -> dict[str, Any] | None:
        """The tokenizer server's /capabilities ({} for a stock script), None when it did not
        answer in time (asked again next time)."""
        host, port = self._tokenizer_host, self.config.tokenizer_port
        assert port is not None
        timeout = min(self.settings.tokenizer_timeout_s, _DESCRIBE_TIMEOUT_S)
        with anyio.move_on_after(timeout + 1):
            try:
                if self.config.tokenizer_py:
                    await self._tokenizers.start_server(self.spec.name, host)
                    await self._tokenizers.wait_until_running(self.spec.name, host, port, timeout)
                else:
                    await self._tokenizers.wait_until_serving(host, port, min(timeout, 2.0))
            except TokenizerUnavailable:
                return None
            return await self._tokenizers.capabilities(host, port, self.spec.name) or {}
        return None

    def model_facts(self) -> dict[str, Any]:
        """From the run script's flags: architecture, layers, embedding width (read once)."""
        if self._script_facts is None:
            script = self.config.script_path
            try:
                text = script.read_text(encoding="utf-8", errors="replace") if script is not None else ""
            except OSError:
                text = ""
            self._script_facts = model_facts_from_flags(script_flags(text))
        return dict(self._script_facts)

    def status(self) -> dict[str, Any]:
        status = super().status()
        job = self._job
        precompute, remaining = self._context or (None, None)
        dialect = self._dialect
        if dialect is not None and dialect.builtin_tokenizer:
            newlines = "replaced with spaces: the runner's built-in tokenizer cannot restore them"
        elif self._tokenizer_caps is not None:
            newlines = "restored by the tokenizer server"
        elif self._tokenizer_probed:
            newlines = "replaced with spaces: the stock tokenizer script cannot restore them"
        else:
            newlines = "unknown until the tokenizer server runs"
        status.update(
            progress=self._progress,
            dialect=self._dialect_name or "unknown until the runner starts",
            supports_reset=self._supports_reset,
            pid=self._runner.pid if self._runner else None,
            runner_pid=self._runner.runner_pid() if self._runner else None,
            in_flight=None if job is None else {
                "id": job.request.id,
                "age_s": round(time.monotonic() - job.request.arrived_at, 3),
                "tokens_so_far": job.flushes * TOKENS_PER_FLUSH,
                "phase": job.phase,
            },
            context={
                "used": precompute,
                "remaining": remaining,
                "size": self.spec.context_size,
                "conversation_messages": None if self._held is None else len(self._held),
            },
            restarts=self._restarts,
            fresh_context_restarts=self._fresh_context_restarts,
            last_load_duration_s=self.last_load_duration,
            npu_memory_claimed_mb=self.claimed_npu_memory_mb,
            newlines=newlines,
            tokenizer_server=self._tokenizer_server_status(),
        )
        return status

    def _tokenizer_server_status(self) -> str:
        """Which tokenizer server answers the runner and why; what it cannot take from requests."""
        dialect = self._dialect
        if dialect is not None and dialect.builtin_tokenizer:
            return ("built into the runner: requests' system prompts, history, newlines, tools and raw prompts "
                    "cannot reach it")
        if not self.config.tokenizer_port:
            return "none"
        if not self._tokenizer_probed:
            return "unknown until the tokenizer server runs"
        port = self.config.tokenizer_port
        said = self._tokenizer_server or (
            f"external: the descriptor names no tokenizer_py; the server on port {port} is not ours to start"
            if not self.config.tokenizer_py else "started by the tokenizer service")
        if self._tokenizer_caps is not None and said.startswith("stock:"):
            said += "; the script starts our tokenizer server (it answers /capabilities)"
        if self._tokenizer_caps is None:
            said += ("; it has none of our extensions: a request's system prompt, history, newlines, tools, raw "
                     "prompt and real token counts cannot reach it (each answer's warnings say what was not applied)")
        return said

    # ---- the owner loop's messages --------------------------------------------------------------

    async def _handle(self, message: Any) -> None:
        if isinstance(message, Output):
            if self._runner is not None and message.generation == self._runner.generation:
                await self._on_output(message.data)
        elif isinstance(message, _TurnJob):
            self._pending.append(message)
            await self._advance()
        elif isinstance(message, _Cancel):
            await self._on_cancel(message.job)
        elif isinstance(message, Exited):
            await self._on_exited(message)
        elif isinstance(message, WriteFailed):
            if self._runner is not None and message.generation == self._runner.generation:
                await self._runner_failed(f"could not write to the runner: {message.error}", RunnerCrashed, "crash")
        elif isinstance(message, _Prepared):
            await self._on_prepared(message)
        elif isinstance(message, _Counted):
            await self._on_counted(message)
        elif isinstance(message, _ResetAheadPrepared):
            await self._on_reset_ahead_prepared(message)
        elif isinstance(message, _TokenizerReady):
            if message.generation == self._generation:
                await self._on_tokenizer_ready(message)
        elif isinstance(message, _Start):
            await self._on_start(message.reason)
        elif isinstance(message, _Stop):
            await self._on_stop(message)

    async def _recover(self, error: Exception) -> None:
        self._restarts += 1
        self.metrics.restarted("internal_error")
        self._preparing = False
        self._kill_runner(f"internal error: {error!r}")
        self._fail_all_jobs(EngineBug(self._bug_message(error)))
        state = self._machine.state
        if self._machine.can(S.FAILED):
            self._fail(f"internal error in the engine: {error!r}")
        elif state is S.FAILED:  # e.g. in the restart itself: try again later
            self._restart_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self.settings.backoff_max_s)
        elif state is S.STOPPING:
            self._set_state(S.STOPPED, f"internal error while stopping: {error!r}")
            self._finish_stop()

    async def _on_shutdown(self) -> None:
        if self._tokenizer_scope is not None:
            self._tokenizer_scope.cancel()
        for runner in (self._runner, self._dying):
            if runner is not None:
                await runner.kill_and_wait(self.settings.stop_grace_s)
        self._runner = self._dying = None

    # ---- state -----------------------------------------------------------------------------

    @property
    def _dialect(self) -> Dialect | None:
        return DIALECTS.get(self._dialect_name) if self._dialect_name else None

    @property
    def _supports_reset(self) -> bool:
        dialect = self._dialect
        return dialect is not None and dialect.supports_reset(self._banner_offers_reset)

    @property
    def _our_tokenizer(self) -> bool:
        return self._tokenizer_caps is not None

    @property
    def _tokenizer_host(self) -> str:
        return self.config.tokenizer_ip or "127.0.0.1"

    def holds_conversation_of(self, request: GenerationRequest) -> bool:
        """The runner's context holds this request's conversation: it would continue it (the
        replica a follow-up request should go to)."""
        if self._held is None:
            return False
        remaining = self._context[1] if self._context else self.spec.context_size
        held = Held(self._held, self._held_system, remaining, raw=self._held_raw, tools=self._held_tools)
        try:
            return continues(read_turn(request, self.spec.system_prompt, self._runner_facts()), held)
        except BadRequest:
            return False

    def _runner_facts(self) -> Runner:
        """The runner and its tokenizer server as the planner sees them."""
        caps = self._tokenizer_caps or {}
        form = prompt_format_of(caps)
        controls = caps.get("controls") or ()
        tools = caps.get("tools") if isinstance(caps.get("tools"), dict) else {}
        dialect = self._dialect or DIALECTS["b"]
        context_size = self.spec.context_size
        if dialect.image_marker is not None and self._runner_max_tokens:
            context_size = min(context_size, self._runner_max_tokens)  # a VLM build's own, smaller context
        return Runner(
            dialect, self._supports_reset, self._our_tokenizer, context_size,
            raw=form.raw, infill=form.infill, model=self.spec.name,
            tools=("template" if tools.get("definitions") == "template" else "system_prompt") if "tools" in controls else None,
            turn_control="turn" in controls,
        )

    def _set_state(self, to: RunnerState, reason: str, **details: Any) -> None:
        if to is not S.INITIALIZING:
            self._progress = None
        if self._release_turn is not None and to not in (S.WAITING_FOR_TOKENIZER, S.STARTING, S.INITIALIZING):
            # The runner has its uid (or is gone): another runner on the port may start.
            self._release_turn()
            self._release_turn = None
        super()._set_state(to, reason, **details)

    def _fail(self, reason: str, *, log_tail: bool = True, **details: Any) -> None:
        """Record a failure and schedule a restart with back-off."""
        self._record_error(reason, **details)
        assert self.last_error is not None
        self.last_error["log_tail"] = self.logs.tail(20) if log_tail else []
        self._failed_at = time.monotonic()
        self._restart_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.settings.backoff_max_s)
        self._clear_process_timers()
        self._set_state(S.FAILED, reason, restart_in_s=round(self._restart_at - time.monotonic(), 3), **details)

    def _failure_message(self) -> str:
        err = self.last_error or {}
        tail = [line for line in err.get("log_tail", []) if line.strip()][-5:]
        text = f'model "{self.spec.name}" failed: {err.get("reason", "unknown error")}'
        if tail:
            text += "; runner output: " + " | ".join(tail)
        if self._restart_at is not None:
            text += f"; restarting in {max(0.0, self._restart_at - time.monotonic()):.1f}s"
        return text

    def _fail_all_jobs(self, error: EngineError) -> None:
        if self._job is not None:
            self._job.deliver(error)
            self._job = None
        while self._pending:
            self._pending.popleft().deliver(error)

    # ---- start-up --------------------------------------------------------------------------

    async def _on_start(self, reason: str) -> None:
        state = self._machine.state
        if state is S.FAILED and self._restart_at is not None:
            # A restart is scheduled (the card's memory may still be busy after a crash). A request
            # that needs the model brings it forward once half the back-off has passed: the
            # cause may be gone, and the request should not wait out a long back-off for nothing.
            halfway = self._failed_at + (self._restart_at - self._failed_at) / 2
            if time.monotonic() < halfway:
                return
        if state not in (S.STOPPED, S.FAILED):
            return
        await self._launch(reason)

    async def _launch(self, reason: str) -> None:
        if self._dying is not None:
            self._launch_pending = reason  # the old runner still holds the card: launch at its exit
            return
        self._launch_pending = None
        self._generation += 1
        self._restart_at = None
        self._preparing = False
        self._uid = None
        self._tokenizer_config = {}
        self._context = None
        self._held = ()
        self._held_system = self._launch_system
        self._held_raw = False
        self._held_tools = None
        dialect = self._dialect
        if self.config.tokenizer_port and not (dialect is not None and dialect.builtin_tokenizer):
            self._set_state(S.WAITING_FOR_TOKENIZER, reason, port=self.config.tokenizer_port)
            settings = {"system_prompt": self._launch_system, "thinking": None, "history": [], "raw": False,
                        "tools": None, "turn": [], **self._launch_extra}
            self._launch_extra = {}
            self._held_raw = bool(settings["raw"])  # a server without the control never gets a raw plan
            self._held_tools = settings.get("tools")  # … nor tools
            self._tokenizer_scope = anyio.CancelScope()
            self._start_task(self._prepare_tokenizer, self._generation, self._tokenizer_scope, settings)
        else:
            self._set_state(S.STARTING, reason)
            await self._spawn()

    async def _prepare_tokenizer(self, generation: int, scope: anyio.CancelScope, settings: dict[str, Any]) -> None:
        """Child task: start the model's tokenizer server, wait for it, learn what it offers."""
        config, host = self.config, self._tokenizer_host
        timeout = self.settings.tokenizer_timeout_s
        caps: dict[str, Any] | None = None
        applied: dict[str, Any] = {}
        error: str | None = None
        server: str | None = None
        release_turn: Callable[[], None] | None = None
        with scope:
            try:
                if config.tokenizer_py:
                    # The service starts what the descriptor names for this model, and says when
                    # a socket of that server's own listens on the port (or that another's does).
                    await self._tokenizers.start_server(self.spec.name, host)
                    entry = await self._tokenizers.wait_until_running(
                        self.spec.name, host, config.tokenizer_port, timeout)
                    server = entry.get("server") or None
                else:
                    # No tokenizer_py: a tokenizer server someone else runs on this port.
                    await self._tokenizers.wait_until_serving(host, config.tokenizer_port, timeout)
                caps = await self._tokenizers.capabilities(host, config.tokenizer_port, self.spec.name)
                if caps is not None:
                    # The runner's init /reset picks up the system prompt the descriptor sets.
                    await self._tokenizers.configure(host, config.tokenizer_port, self.spec.name, **settings)
                    applied = settings
                    # Our server may serve other models on this port: it gives the runner about
                    # to start its uid once the port's turn is this model's.
                    release_turn = await self._tokenizers.runner_turn(host, config.tokenizer_port, self.spec.name)
            except TokenizerUnavailable as exc:
                error = str(exc)
        if scope.cancel_called:
            if release_turn is not None:
                release_turn()
            return
        self._post(_TokenizerReady(generation, caps, applied, error, server, release_turn))

    async def _on_tokenizer_ready(self, message: _TokenizerReady) -> None:
        if self._machine.state is not S.WAITING_FOR_TOKENIZER or message.generation != self._generation:
            if message.release_turn is not None:
                message.release_turn()
            return
        self._release_turn = message.release_turn
        if message.error:
            self._fail(f"tokenizer not available: {message.error}", log_tail=False)
            self._fail_all_jobs(ModelUnavailable(self._failure_message()))
            return
        self._tokenizer_caps = message.capabilities
        self._tokenizer_config = dict(message.applied)
        self._tokenizer_probed = True
        self._tokenizer_server = message.server
        self._set_state(S.STARTING, "tokenizer is serving", extensions=message.capabilities is not None)
        await self._spawn()

    def _command(self) -> list[str]:
        config = self.config
        command = list(config.command)
        if config.script_path is not None and len(command) == 2 and config.tokenizer_port:
            # A bare script gets the tokenizer port as $1 (the original wrapper's convention;
            # scripts that hard-code it ignore it). A run_cmd with arguments runs as written.
            command.append(str(config.tokenizer_port))
        return command

    async def _spawn(self) -> None:
        # The runner programs of this environment (e.g. the emulator) come first on PATH.
        path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
        env = child_environment(owner_tag(self.settings.data_dir), self.settings.child_env, {"PATH": path})
        command = self._command()
        self._parser = RunnerOutputParser(self._dialect_name if self.config.dialect != "auto" else None)
        self._cmm_figures = []
        self.claimed_npu_memory_mb = None
        self._load_started = now = time.monotonic()
        stall = self._load_stall_s
        self._load_stall_at = now + stall
        self._load_cap_at = now + max(stall, self.settings.load_timeout_cap_s)
        try:
            self._runner = await RunnerProcess.launch(command, self.config.model_path, env, self._generation)
        except OSError as exc:
            self._fail(f"cannot launch {' '.join(command)}: {exc}")
            self._fail_all_jobs(ModelUnavailable(self._failure_message()))
            return
        self.logs.append(f"[axm1-llm] started {' '.join(command)} (pid {self._runner.pid})")
        assert self._tasks is not None
        self._runner.watch(self._tasks, self._post, self._on_stderr_line, self.settings.stop_grace_s)

    def _on_stderr_line(self, line: str) -> None:
        self.logs.append("[stderr] " + line)

    # ---- runner output -----------------------------------------------------------------------

    async def _on_output(self, data: bytes) -> None:
        assert self._parser is not None
        self._note_liveness()  # any output counts, even bytes that complete no event yet
        events = self._parser.feed(data) if data else self._parser.end_of_stream()
        for event in events:
            await self._on_event(event)

    def _note_liveness(self) -> None:
        """Output moves the load stall deadline and the hang deadline."""
        state = self._machine.state
        now = time.monotonic()
        if state in (S.PROCESSING, S.OUTPUTTING) and self._hang_at is not None:
            self._hang_at = now + self._hang_s
        elif state in (S.STARTING, S.INITIALIZING) and self._load_stall_at is not None:
            self._load_stall_at = now + self._load_stall_s

    async def _on_event(self, event: Any) -> None:
        if self._machine.state is S.STARTING:
            self._set_state(S.INITIALIZING, "runner is loading the model")
        state = self._machine.state
        job = self._job
        if isinstance(event, Text):
            await self._on_text(event.text)
        elif isinstance(event, LogLine):
            self.logs.append(f"[{event.level}][{event.function}][{event.line}]: {event.message}")
            if state is S.INITIALIZING and (match := _MAX_TOKEN_LEN.fullmatch(event.message.strip())):
                self._runner_max_tokens = int(match.group(1))
            elif job is not None and job.images is not None and job.images.frames and event.function == "Encode":
                self._check_frames(job)
        elif isinstance(event, ContextUsed):
            if state in (S.INITIALIZING, S.RESETTING):
                # The system prompt prefilled at start-up already occupies the context.
                self._context = (event.tokens, self.spec.context_size - event.tokens)
        elif isinstance(event, PlainLine):
            if event.text.strip():
                self.logs.append(event.text)
        elif isinstance(event, Progress):
            self.logs.append(f"{event.percent}% {event.step}/{event.total} {event.message}")
            if state is S.INITIALIZING:
                self._progress = {"percent": event.percent, "step": event.step, "total": event.total, "message": event.message}
                self.events.publish("progress", **self._progress)
                if (remaining_mb := remain_cmm_mb(event.message)) is not None:
                    self._cmm_figures.append(remaining_mb)
        elif isinstance(event, Uid):
            self._uid = event.uid
        elif isinstance(event, Banner):
            self._banner_offers_reset = event.supports_reset
        elif isinstance(event, KvCache):
            self._context = (event.precompute_len, event.remaining)
            self.metrics.context(event.precompute_len, self.spec.context_size)
            if job is not None and job.turn_end_seen and job.context_after is None:
                job.context_after = event.precompute_len
        elif isinstance(event, InputTokens):
            if job is not None:
                job.prompt_tokens = event.count
                job.request.prompt_tokens = event.count
        elif isinstance(event, Ttft):
            if job is not None:
                job.runner_ttft_ms = event.ms
        elif isinstance(event, TurnEnd):
            if job is not None and job.phase in ("prompting", "counting"):
                # The latest end counts: an earlier one may have been the answer's imitation.
                job.runner_tps = event.tokens_per_second
                job.turn_end_seen = True
                job.context_after = None
        elif isinstance(event, RunnerError):
            self.logs.append(f"[error:{event.kind}] {event.message}")
            if job is not None and job.images is not None and _IMAGE_NOT_READ.search(event.message):
                job.error = BadRequest(
                    f"the runner of {self.spec.name} could not read the image ({_images_described(job)}): it said "
                    f"\"{event.message}\" and would have answered the text alone; send it as JPEG or PNG"
                )
            if job is not None and event.kind in ("context_overflow", "prompt_too_long"):
                job.error = BadRequest(
                    f"the prompt does not fit the model's context of {self.spec.context_size} tokens (the runner "
                    f"said: {event.message}): shorten the prompt or send fewer earlier messages"
                )
                self._held = None  # what the runner holds now is not reliable
        elif isinstance(event, Marker):
            await self._on_marker()
        elif isinstance(event, ImageMarker):
            self._on_image_marker()
        elif isinstance(event, FrameLine):
            self.logs.append(f"[frame] {event.path}")
            if job is not None:
                job.frames_listed += 1

    async def _on_marker(self) -> None:
        state = self._machine.state
        if self._parser is not None and self._dialect_name is None:
            self._dialect_name = self._parser.dialect
            if self._dialect_name == "vl" and self.model_facts().get("image_directories"):
                self._dialect_name = "vl_qwen"  # a Qwen-VL build: its script sets the encoder's size
        if state is S.INITIALIZING:
            self.last_load_duration = time.monotonic() - (self._load_started or time.monotonic())
            self._load_stall_at = self._load_cap_at = None
            self._backoff = self.settings.backoff_min_s
            self.claimed_npu_memory_mb = claimed_cmm_mb(self._cmm_figures)
            self._set_state(S.READY, "runner is at its prompt", load_seconds=round(self.last_load_duration, 3))
            self.metrics.load_finished(self.last_load_duration)
            await self._advance()
        elif state is S.RESETTING:
            self._reset_at = None
            self._held = ()
            self._held_system = self._reset_system
            self._held_raw = self._reset_raw
            self._held_tools = self._reset_tools
            self._set_state(S.READY, "context reset")
            await self._advance()
        elif state in (S.PROCESSING, S.OUTPUTTING):
            await self._finish_turn()
        elif self._job is not None and self._job.phase == "counting":
            self._job.markers_while_counting += 1  # the end its count is checking may not be the last
        # Otherwise a marker at READY is the runner re-printing it (after an empty line): nothing to do.

    def _check_frames(self, job: _TurnJob) -> None:
        """At the encoder's line: did the runner read every frame of the folder it was given?"""
        assert job.images is not None
        if job.frames_listed != job.images.count and job.error is None:
            job.error = BadRequest(
                f"the runner of {self.spec.name} read {job.frames_listed} of the {job.images.count} images "
                f"({_images_described(job)}); it would have answered without the others: send them as JPEG or PNG"
            )

    def _on_image_marker(self) -> None:
        """A vision runner reads the turn's image path now: the file's, or an empty line."""
        job = self._job
        if self._runner is None:
            return
        path = job.images.path if job is not None and job.phase == "prompting" and job.images is not None else ""
        self._runner.write_line(path)

    async def _on_text(self, text: str) -> None:
        job = self._job
        if job is None or job.phase != "prompting":
            if text.strip():
                self.logs.append(f"[unexpected text] {text!r}")
            return
        if self._machine.state is S.PROCESSING:
            self._set_state(S.OUTPUTTING, "first text from the runner")
            if job.interrupted and job.interrupted_before_text and self._runner is not None:
                job.interrupted_before_text = False
                self._interrupt_at = time.monotonic() + self.settings.stop_grace_s
                self._runner.signal_runner(signal.SIGINT)  # it is generating now: this one counts
        if job.first_text_at is None:
            job.first_text_at = time.monotonic()
        job.flushes += 1
        if job.text_from_tokenizer:
            return  # the runner's copy of text the tokenizer's account already holds
        job.answer.append(text)
        if job.interrupted or job.error is not None:
            return  # draining after SIGINT, or a failed turn: nothing more reaches the client
        await self._relay(job, text)

    async def _relay(self, job: _TurnJob, text: str) -> None:
        """Answer text on its way to the client: thinking split, stop sequences, num_predict."""
        thinking, content = job.splitter.feed(text)
        visible = job.stops.feed(content)
        if thinking or visible:
            job.deliver(Chunk(content=visible, thinking=thinking, tokens=TOKENS_PER_FLUSH))
        num_predict = job.request.options.num_predict
        if job.stops.stopped:
            self._interrupt(job, "stop")
            job.deliver(self._result(job, "stop", final=True))
        elif num_predict and num_predict > 0 and job.flushes * TOKENS_PER_FLUSH >= num_predict:
            self._interrupt(job, "length")
            job.deliver(self._result(job, "length", final=True))

    # ---- turns -------------------------------------------------------------------------------

    async def _advance(self) -> None:
        """Move the head job on when the runner is at its prompt and nothing else is out."""
        if self._machine.state is not S.READY or self._preparing:
            return
        job = self._job
        if job is not None:
            if job.phase not in ("resetting", "restarting"):
                return  # its tokenizer call or its count is out: a message will move it on
            if job.delivered:
                self._job = None  # its client left during the reset or restart
            else:
                self._write_prompt(job)
                return
        while self._pending and self._pending[0].delivered:
            self._pending.popleft()  # its client left while it waited
        if not self._pending:
            return
        job = self._job = self._pending.popleft()
        # Unknown after a reset until the runner reports it: then at most the whole context.
        remaining = self._context[1] if self._context else self.spec.context_size
        held = Held(self._held, self._held_system, remaining, raw=self._held_raw, tools=self._held_tools)
        runner = self._runner_facts()
        try:
            turn = read_turn(job.request, self.spec.system_prompt, runner)
            plan = self._plan_without_tokenizer(turn, held, runner)
        except BadRequest as exc:
            job.deliver(exc)
            self._job = None
            await self._advance()
            return
        changes = {} if plan is None else self._settings_to_install(plan)
        if plan is not None and not changes:
            # The common case: bytes prove the turn fits and the tokenizer holds what it needs.
            # Nothing to wait for: the prompt goes out now, with no task switch on its way.
            await self._execute_plan(job, plan)
            return
        job.phase = "preparing"
        self._preparing = True
        self._start_task(self._prepare, job, self._generation, turn, held, runner, plan, changes)

    def _plan_without_tokenizer(self, turn: Turn, held: Held, runner: Runner) -> Plan | None:
        """The plan when no count needs the tokenizer (bytes prove a fit, or there is no
        tokenizer to ask), else None. Raises BadRequest when the turn cannot fit."""
        line_tokens = conversation_tokens = None
        if not runner.dialect.keeps_context and turn.images:  # a vision turn: does it fit with its images?
            conversation_tokens = self._count_without_tokenizer(
                conversation_texts(turn), runner.context_size - CONTEXT_MARGIN - image_tokens(turn), runner)
            if conversation_tokens is None:
                return None
        elif runner.dialect.keeps_context:
            if continues(turn, held):
                line_tokens = self._count_without_tokenizer(line_texts(turn), held.remaining - CONTEXT_MARGIN, runner)
                if line_tokens is None:
                    return None
            if line_tokens is None or not fits(line_tokens, held.remaining):
                conversation_tokens = self._count_without_tokenizer(
                    conversation_texts(turn), runner.context_size - CONTEXT_MARGIN, runner
                )
                if conversation_tokens is None:
                    return None
        return plan_turn(turn, held, runner, line_tokens=line_tokens, conversation_tokens=conversation_tokens)

    @staticmethod
    def _count_without_tokenizer(texts: list[str], room: int, runner: Runner) -> int | None:
        bound = token_bound(texts)
        if bound <= room:
            return bound  # fits for sure
        return None if runner.our_tokenizer else token_guess(texts)

    def _settings_to_install(self, plan: Plan) -> dict[str, Any]:
        """What /config must change before the plan runs (a restart installs its own)."""
        if plan.action is Action.RESTART:
            return {}
        known = self._tokenizer_config
        return {k: v for k, v in plan.tokenizer_settings.items() if k not in known or known[k] != v}

    async def _prepare(
        self, job: _TurnJob, generation: int, turn: Turn, held: Held, runner: Runner,
        plan: Plan | None, changes: dict[str, Any],
    ) -> None:
        """Child task: count with the tokenizer what bytes could not prove, then install the
        tokenizer settings the plan needs."""
        try:
            if plan is None and not runner.dialect.keeps_context:  # a vision turn (see _plan_without_tokenizer)
                conversation_tokens = await self._count_tokens(
                    conversation_texts(turn), runner.context_size - CONTEXT_MARGIN - image_tokens(turn))
                plan = plan_turn(turn, held, runner, conversation_tokens=conversation_tokens)
                changes = self._settings_to_install(plan)
            elif plan is None:
                line_tokens = conversation_tokens = None
                if continues(turn, held):
                    line_tokens = await self._count_tokens(line_texts(turn), held.remaining - CONTEXT_MARGIN)
                if line_tokens is None or not fits(line_tokens, held.remaining):
                    conversation_tokens = await self._count_tokens(
                        conversation_texts(turn), runner.context_size - CONTEXT_MARGIN
                    )
                plan = plan_turn(turn, held, runner, line_tokens=line_tokens, conversation_tokens=conversation_tokens)
                changes = self._settings_to_install(plan)
        except BadRequest as exc:
            self._post(_Prepared(job, generation, None, {}, exc))
            return
        if changes:
            try:
                await self._configure_tokenizer(changes)
            except TokenizerUnavailable as exc:
                error = ModelUnavailable(f'the tokenizer server of "{self.spec.name}" is not answering ({exc}); the model restarts')
                self._post(_Prepared(job, generation, None, {}, error, tokenizer_down=True))
                return
        self._post(_Prepared(job, generation, plan, changes))

    async def _count_tokens(self, texts: list[str], room: int) -> int:
        """Tokens the texts need (with template overhead), from our tokenizer where their bytes
        cannot prove a fit. In child tasks only."""
        bound = token_bound(texts)
        if bound <= room:
            return bound
        with anyio.move_on_after(_TOKENIZER_CALL_TIMEOUT_S):
            ids = await self._tokenizers.tokenize(self._tokenizer_host, self.config.tokenizer_port, "\n".join(texts),
                                                  self.spec.name)
            if ids is not None:
                return len(ids) + TOKENS_PER_MESSAGE * len(texts)
        return token_guess(texts)

    async def _configure_tokenizer(self, settings: dict[str, Any]) -> None:
        try:
            with anyio.fail_after(_TOKENIZER_CALL_TIMEOUT_S):
                await self._tokenizers.configure(self._tokenizer_host, self.config.tokenizer_port, self.spec.name,
                                                 **settings)
        except TimeoutError:
            raise TokenizerUnavailable(f"/config took longer than {_TOKENIZER_CALL_TIMEOUT_S:.0f}s") from None

    async def _on_prepared(self, message: _Prepared) -> None:
        if message.generation != self._generation:
            return  # the runner it was planned for is gone (the job failed with it)
        self._preparing = False
        self._tokenizer_config.update(message.applied)
        job = message.job
        if job is not self._job or job.delivered:
            if job is self._job:
                self._job = None
            await self._advance()
            return
        if message.error is not None:
            job.deliver(message.error)
            self._job = None
            if message.tokenizer_down:
                await self._runner_failed(message.error.message, ModelUnavailable, "tokenizer")
            else:
                await self._advance()
            return
        if self._machine.state is not S.READY:
            return
        assert message.plan is not None
        await self._execute_plan(job, message.plan)

    async def _execute_plan(self, job: _TurnJob, plan: Plan) -> None:
        job.plan = plan
        if plan.action is Action.PROMPT:
            self._write_prompt(job)
        elif plan.action is Action.RESET:
            job.phase = "resetting"
            self._reset(plan.system, "fresh context for a new conversation", raw=plan.raw,
                        tools=plan.tokenizer_settings.get("tools"), request=job.request.id)
        else:
            job.phase = "restarting"
            self._launch_system = plan.system
            self._launch_extra = {k: v for k, v in plan.tokenizer_settings.items() if k != "system_prompt"}
            self._restart_for_fresh_context("fresh context needs a restart (runner has no reset)")

    def _reset(
        self, system: str | None, reason: str, raw: bool = False, tools: list[dict[str, Any]] | None = None, **details: Any
    ) -> None:
        """Clear the runner's KV cache; the tokenizer server already holds `system` and `tools`
        (or raw mode) for its /reset."""
        dialect = self._dialect
        assert dialect is not None and dialect.reset_command is not None and self._runner is not None
        self._reset_system = system
        self._reset_raw = raw
        self._reset_tools = tools
        self._reset_at = time.monotonic() + _RESET_TIMEOUT_S
        self._context = None  # known again from the runner's reset lines or its next turn
        self._set_state(S.RESETTING, reason, **details)
        self._runner.write_line(dialect.reset_command)

    def _reset_ahead(self) -> None:
        """After a one-shot request, reset while idle, so the next one finds a fresh context."""
        if self._pending or self._job is not None or self._preparing:
            return
        if not self._supports_reset or self._machine.state is not S.READY:
            return
        self._preparing = True
        known = dict(self._tokenizer_config)
        self._start_task(self._prepare_reset_ahead, self._generation, known)

    async def _prepare_reset_ahead(self, generation: int, known: dict[str, Any]) -> None:
        settings: dict[str, Any] = {"system_prompt": self.spec.system_prompt} if self._our_tokenizer else {}
        facts = self._runner_facts()
        if facts.raw:
            settings["raw"] = False
        if facts.tools is not None:
            settings["tools"] = None
        applied = {k: v for k, v in settings.items() if k not in known or known[k] != v}
        error = None
        if applied:
            try:
                await self._configure_tokenizer(applied)
            except TokenizerUnavailable as exc:
                applied, error = {}, str(exc)
        self._post(_ResetAheadPrepared(generation, applied, error))

    async def _on_reset_ahead_prepared(self, message: _ResetAheadPrepared) -> None:
        if message.generation != self._generation:
            return
        self._preparing = False
        self._tokenizer_config.update(message.applied)
        if message.error:
            self.logs.append(f"[axm1-llm] reset ahead of the next request failed: {message.error}")
        elif self._machine.state is S.READY and self._job is None and not self._pending:
            self._reset(self.spec.system_prompt, "fresh context ahead of the next request")
            return
        await self._advance()  # a job came meanwhile: its own plan decides

    def _write_prompt(self, job: _TurnJob) -> None:
        assert job.plan is not None and self._parser is not None and self._runner is not None
        job.phase = "prompting"
        if self._our_tokenizer:
            self._tokenizer_config["history"] = []  # the runner's /encode for this line consumes it
            self._tokenizer_config["turn"] = []  # … and a tool round's messages
        dialect = self._dialect
        frames = (job.images.path + "/").encode() if job.images is not None and job.images.frames else None
        marker = dialect.image_marker if dialect is not None else None
        if marker is not None and self.model_facts().get("video"):
            marker = b"video >> "  # a Qwen-VL build started with --video 1 (docs/vlm-runners.md §3)
        self._parser.begin_turn(marker, frames)
        job.context_before = self._context[0] if self._context else None
        job.prompt_written_at = time.monotonic()
        self._hang_at = job.prompt_written_at + self._hang_s
        self._runner.write_line(job.plan.line)
        # After the write: the runner starts on the prompt while the state change is published.
        self._set_state(S.PROCESSING, "prompt sent", request=job.request.id)

    async def _finish_turn(self) -> None:
        job = self._job
        self._hang_at = self._interrupt_at = None
        self._set_state(S.READY, "turn over")
        if job is None:
            await self._advance()
            return
        if job.error is not None:
            job.deliver(job.error)
        if job.delivered or job.interrupted is not None:
            self._held = None  # interrupted, failed or its client gone: what the runner holds is unsure
            self._job = None
            await self._after_turn(job)
            return
        if self._our_tokenizer and self._uid:
            self._count_turn(job)
        else:
            await self._complete_turn(job, None)

    def _count_turn(self, job: _TurnJob) -> None:
        job.phase = "counting"
        job.markers_while_counting = 0
        self._preparing = True
        assert self._uid is not None
        self._start_task(self._count_real_tokens, job, self._generation, self._uid)

    async def _complete_turn(self, job: _TurnJob, stats: dict[str, Any] | None) -> None:
        """The turn is over: the rest of its text, its record with real counts, what the runner holds."""
        answer = "".join(job.answer)
        told = stats.get("reply_text") if stats else None
        if isinstance(told, str) and len(told) > len(answer) and told.startswith(answer):
            await self._relay(job, told[len(answer):])  # text the runner's lines hid, or a rest
            answer = told
        reason = "length" if self._context is not None and self._context[1] <= 1 else "stop"
        result = self._result(job, reason, final=True)
        if stats is not None:
            result.completion_tokens = stats["reply_tokens"]
            # The runner's own count of what it prefilled this turn is Ollama's meaning;
            # the tokenizer's is the whole conversation.
            result.prompt_tokens = result.prompt_tokens or stats.get("prompt_tokens", 0)
        assert job.plan is not None
        # After a raw prompt the context holds no conversation a chat could continue.
        self._held = None if job.plan.raw else job.plan.conversation + (ChatMessage("assistant", answer),)
        self._held_system = job.plan.system
        self._held_tools = job.plan.tools
        job.deliver(result)
        self._job = None
        await self._after_turn(job)

    def _end_was_imitated(self, job: _TurnJob, stats: dict[str, Any]) -> bool:
        """Did the model's text imitate the runner's end of turn? The runner's `GetKVCache` after
        `hit eos` holds the context before the turn + the tokens it prefilled + the tokens it
        generated (which the tokenizer counted): an answer cannot know that sum."""
        dialect = self._dialect
        if dialect is None or not dialect.keeps_context or job.context_before is None or job.prompt_tokens is None:
            return False  # nothing to check against
        if job.context_after is None:
            return True  # the runner always prints its context after a turn
        expected = job.context_before + job.prompt_tokens + int(stats.get("reply_tokens", 0))
        return abs(job.context_after - expected) > _CONTEXT_SLACK

    def _resume_turn(self, job: _TurnJob) -> None:
        """The runner is still answering: the end seen was part of the answer's text."""
        self.logs.append("[axm1-llm] the runner's end-of-turn lines were part of the answer's text: the turn goes on")
        assert self._parser is not None
        job.phase = "prompting"
        job.turn_end_seen = False
        job.context_after = None
        job.text_from_tokenizer = True
        self._parser.begin_turn()
        self._set_state(S.PROCESSING, "turn resumed: its end was part of the answer", request=job.request.id)
        self._hang_at = time.monotonic() + self._hang_s

    async def _after_turn(self, job: _TurnJob) -> None:
        await self._advance()
        if job.request.kind == "generate":
            self._reset_ahead()

    def _result(self, job: _TurnJob, reason: str, final: bool = False) -> GenerationResult:
        now = time.monotonic()
        if final:
            thinking, content = job.splitter.flush()
            content = job.stops.feed(content) + job.stops.flush()
            if thinking or content:
                job.deliver(Chunk(content=content, thinking=thinking))
        written = job.prompt_written_at or now
        first = job.first_text_at or now
        return GenerationResult(
            finish_reason=reason,  # type: ignore[arg-type]
            prompt_tokens=job.prompt_tokens or 0,
            completion_tokens=job.flushes * TOKENS_PER_FLUSH,
            prompt_eval_duration=max(0.0, first - written),
            eval_duration=max(0.0, now - first),
            total_duration=now - job.request.arrived_at,
            time_to_first_token=None if job.first_text_at is None else job.first_text_at - job.request.arrived_at,
            runner_tokens_per_second=job.runner_tps,
            warnings=list(job.plan.warnings) if job.plan else [],
        )

    async def _count_real_tokens(self, job: _TurnJob, generation: int, uid: str) -> None:
        """Child task: the tokenizer's account of the turn (real token counts, the answer's text)."""
        stats = None
        with anyio.move_on_after(_TOKENIZER_CALL_TIMEOUT_S):
            stats = await self._tokenizers.stats(self._tokenizer_host, self.config.tokenizer_port, uid)
        self._post(_Counted(job, generation, stats))

    async def _on_counted(self, message: _Counted) -> None:
        if message.generation != self._generation:
            return
        self._preparing = False
        job, stats = message.job, message.stats
        if self._job is not job or job.delivered:
            if self._job is job:
                self._job = None
            await self._advance()
            return
        if stats is not None and self._end_was_imitated(job, stats):
            if job.markers_while_counting:
                self._count_turn(job)  # the real end came meanwhile: count again, after it
            else:
                self._resume_turn(job)
            return
        await self._complete_turn(job, stats)

    async def _on_cancel(self, job: _TurnJob) -> None:
        job.delivered = True
        if job in self._pending:
            self._pending.remove(job)
        elif job is self._job:
            if self._machine.state in (S.PROCESSING, S.OUTPUTTING):
                self._interrupt(job, "cancel")
            elif job.phase in ("resetting", "restarting"):
                await self._advance()  # dropped once the reset or restart is over

    def _interrupt(self, job: _TurnJob, why: str) -> None:
        """Stop the current generation; the runner prints its usual tail and its marker."""
        if job.interrupted or self._runner is None:
            return
        job.interrupted = why
        job.interrupted_before_text = self._machine.state is S.PROCESSING
        self._interrupt_at = time.monotonic() + self.settings.stop_grace_s
        self._runner.signal_runner(signal.SIGINT)

    # ---- the runner's end ----------------------------------------------------------------------

    def _kill_runner(self, reason: str) -> None:
        """SIGKILL the runner's group now; its exit arrives as a message."""
        if self._tokenizer_scope is not None:
            self._tokenizer_scope.cancel()
        runner, self._runner = self._runner, None
        self._clear_process_timers()
        if runner is None:
            return
        runner.signal_group(signal.SIGKILL)
        if not runner.exited:
            self._dying = runner
        self.logs.append(f"[axm1-llm] runner killed: {reason}")

    def _restart_for_fresh_context(self, reason: str) -> None:
        """Replace the runner with a fresh one (the current job resumes at READY)."""
        self._fresh_context_restarts += 1
        self.metrics.restarted("fresh_context")
        self._held = None
        self._set_state(S.STOPPING, reason)
        self._kill_runner(reason)
        self._launch_pending = reason
        if self._dying is None:
            self._set_state(S.STOPPED, reason)
            self._post(_Start(reason))

    async def _on_exited(self, message: Exited) -> None:
        how = describe_exit(message.returncode)
        if self._dying is not None and message.generation == self._dying.generation:
            self._dying = None
            self.logs.append(f"[axm1-llm] killed runner {how}")
            if self._machine.state is S.STOPPING:
                self._set_state(S.STOPPED, f"runner {how}")
                if not self._launch_pending:
                    self._finish_stop()
            if self._launch_pending and self._machine.state in (S.STOPPED, S.FAILED):
                await self._launch(self._launch_pending)
            return
        if self._runner is None or message.generation != self._runner.generation:
            return
        self._runner = None
        self.logs.append(f"[axm1-llm] runner {how}")
        state = self._machine.state
        if state is S.STOPPING:
            self._clear_process_timers()
            self._set_state(S.STOPPED, f"runner {how}")
            self._finish_stop()
            return
        if state in (S.STOPPED, S.FAILED):
            return
        self._restarts += 1
        loading = state in (S.STARTING, S.INITIALIZING)
        self.metrics.restarted("crash_at_load" if loading else "crash")
        self._fail(f"runner {how} while {'loading' if loading else 'serving'}", returncode=message.returncode)
        error_type = ModelUnavailable if loading else RunnerCrashed
        self._fail_all_jobs(error_type(self._failure_message()))

    async def _runner_failed(self, reason: str, error_type: type[EngineError], metric_reason: str) -> None:
        """A fault the daemon found (hang, stuck reset, failed load, dead tokenizer): kill the
        runner, fail what waits on it, restart with back-off."""
        self._restarts += 1
        self.metrics.restarted(metric_reason)
        self._kill_runner(reason)
        self._fail(reason)
        self._fail_all_jobs(error_type(self._failure_message()))

    # ---- stop ------------------------------------------------------------------------------

    async def _on_stop(self, message: _Stop) -> None:
        self._stop_waiters.append(message.done)
        self._launch_pending = None
        state = self._machine.state
        if state is S.STOPPED:
            self._finish_stop()
            return
        self._fail_all_jobs(ModelUnavailable(f'model "{self.spec.name}" is stopping: {message.reason}'))
        if state is S.FAILED:
            self._restart_at = None
            self._set_state(S.STOPPED, message.reason)
            self._finish_stop()
            return
        if state is S.STOPPING:
            return
        self._set_state(S.STOPPING, message.reason)
        runner = self._runner
        if runner is None:  # still waiting for the tokenizer
            if self._tokenizer_scope is not None:
                self._tokenizer_scope.cancel()
            self._generation += 1
            if self._dying is None:
                self._set_state(S.STOPPED, message.reason)
                self._finish_stop()
            return
        self._clear_process_timers()
        if state in (S.PROCESSING, S.OUTPUTTING):
            runner.signal_runner(signal.SIGINT)
        dialect = self._dialect
        runner.write_line(dialect.quit_command if dialect else "q")
        now = time.monotonic()
        self._stop_term_at = now + self.settings.stop_grace_s
        self._stop_kill_at = now + 2 * self.settings.stop_grace_s

    def _finish_stop(self) -> None:
        waiters, self._stop_waiters = self._stop_waiters, []
        for done in waiters:
            done.set()

    # ---- timers ------------------------------------------------------------------------------

    def _next_timer_at(self) -> float | None:
        timers = [
            t
            for t in (
                self._restart_at if self._machine.state is S.FAILED else None,
                self._load_stall_at,
                self._load_cap_at,
                self._hang_at,
                self._interrupt_at,
                self._reset_at,
                self._stop_term_at,
                self._stop_kill_at,
            )
            if t is not None
        ]
        return min(timers) if timers else None

    def _clear_process_timers(self) -> None:
        self._load_stall_at = self._load_cap_at = self._hang_at = None
        self._interrupt_at = self._reset_at = None
        self._stop_term_at = self._stop_kill_at = None

    async def _on_timers(self) -> None:
        now = time.monotonic()
        state = self._machine.state
        if state is S.FAILED and self._restart_at is not None and now >= self._restart_at:
            self._restart_at = None
            await self._launch("restart after failure")
            return
        runner = self._runner
        if self._stop_kill_at is not None and now >= self._stop_kill_at:
            self._stop_kill_at = None
            self.logs.append("[axm1-llm] runner ignored its quit command and SIGTERM: SIGKILL")
            if runner is not None:
                runner.signal_group(signal.SIGKILL)
        elif self._stop_term_at is not None and now >= self._stop_term_at:
            self._stop_term_at = None
            self.logs.append("[axm1-llm] runner did not quit on its quit command: SIGTERM")
            if runner is not None:
                runner.signal_group(signal.SIGTERM)
        if state in (S.STARTING, S.INITIALIZING):
            if self._load_cap_at is not None and now >= self._load_cap_at:
                await self._runner_failed(
                    f"load took longer than the cap of {self.settings.load_timeout_cap_s:.0f}s", ModelUnavailable, "load_timeout"
                )
            elif self._load_stall_at is not None and now >= self._load_stall_at:
                await self._runner_failed(f"load made no progress for {self._load_stall_s:.0f}s", ModelUnavailable, "load_timeout")
            return
        if state is S.RESETTING and self._reset_at is not None and now >= self._reset_at:
            await self._runner_failed("runner did not come back after reset", RunnerHung, "hang")
            return
        if self._interrupt_at is not None and now >= self._interrupt_at:
            await self._runner_failed("runner did not stop generating after SIGINT", RunnerHung, "hang")
            return
        if state in (S.PROCESSING, S.OUTPUTTING) and self._hang_at is not None and now >= self._hang_at:
            self._hang_at = None
            job = self._job
            if job is not None:
                job.deliver(RunnerHung(
                    f'runner of "{self.spec.name}" produced no output for {self._hang_s:.0f}s; generation interrupted'
                ))
                self._interrupt(job, "hang")

    @property
    def _load_stall_s(self) -> float:
        """The descriptor's value when it sets one, else the daemon's setting."""
        if "load_timeout_s" in self.config.model_fields_set:
            return self.config.load_timeout_s
        return self.settings.load_stall_timeout_s

    @property
    def _hang_s(self) -> float:
        if "hang_timeout_s" in self.config.model_fields_set:
            return self.config.hang_timeout_s
        return self.settings.hang_timeout_s
