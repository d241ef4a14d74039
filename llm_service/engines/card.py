"""CardEngine: one runner program of the AX-M1 card, driven over its stdin and stdout.

One owner task (`run`) decides every state transition. Everything else — the stdout reader, the
tokenizer start-up, requests, stop calls, timers — only sends it messages. Requests never touch
the state or the process directly; they hand the owner a `_TurnJob` and read its answer stream.

Runner facts this relies on (see the protocol reference): output is block-buffered and read in
chunks; the marker has no newline; `hit eos` ends every turn, including after SIGINT; stdin must
never be closed (the runner would spin on its marker); `q` (or `/q` for `axllm`) quits.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import Process, TaskGroup
from anyio.streams.memory import MemoryObjectSendStream

from tokenizer_service.prompt_escape import escape_prompt_line

from ..descriptor import ModelSpec
from ..runner_log import LogRing
from ..runner_output import (
    Banner,
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
)
from ..states import RunnerState, StateMachine
from ..stop_sequences import StopScanner
from ..thinking import ThinkSplitter
from ..tokenizer_client import TokenizerClient, TokenizerUnavailable
from .base import (
    BadRequest,
    ChatMessage,
    Chunk,
    Engine,
    EngineCapabilities,
    EngineError,
    GenerationRequest,
    GenerationResult,
    ModelUnavailable,
    RequestTimedOut,
    RunnerCrashed,
    RunnerHung,
)

log = logging.getLogger(__name__)
S = RunnerState

# Options the card fixes at launch (post_config.json); accepted per request but not applied.
_FIXED_AT_LAUNCH = ("temperature", "top_p", "top_k", "seed", "repeat_penalty")
# The card prints text every 3 tokens: each text flush counts as 3 tokens while streaming.
_TOKENS_PER_FLUSH = 3
# Tokens kept free in the context for the template around a new message.
_CONTEXT_MARGIN = 32
_RESET_TIMEOUT_S = 30.0
_TOKENIZER_CALL_TIMEOUT_S = 5.0


# ---- messages to the owner task -------------------------------------------------------------

@dataclass(slots=True)
class _Start:
    reason: str


@dataclass(slots=True)
class _Stop:
    reason: str
    done: anyio.Event


@dataclass(slots=True)
class _TokenizerReady:
    generation: int
    capabilities: dict[str, Any] | None
    error: str | None


@dataclass(slots=True)
class _Output:
    generation: int
    events: list


@dataclass(slots=True)
class _Exited:
    generation: int
    returncode: int | None


@dataclass(slots=True)
class _Cancel:
    job: "_TurnJob"


@dataclass(eq=False)
class _TurnJob:
    request: GenerationRequest
    send: MemoryObjectSendStream
    splitter: ThinkSplitter
    stops: StopScanner
    phase: str = "new"  # new -> (resetting | restarting) -> prompting
    line: str = ""
    history: list[ChatMessage] = field(default_factory=list)
    system: str | None = None
    fresh: bool = False
    prompt_written_at: float | None = None
    first_text_at: float | None = None
    answer: list[str] = field(default_factory=list)
    flushes: int = 0
    prompt_tokens: int | None = None
    runner_ttft_ms: float | None = None
    runner_tps: float | None = None
    turn_ended: bool = False
    interrupted: str | None = None  # why we sent SIGINT: cancel | stop | length | hang
    error: EngineError | None = None
    delivered: bool = False  # the final record or an error has been sent
    warnings: list[str] = field(default_factory=list)

    def deliver(self, item: Any) -> None:
        if self.delivered:
            return
        if isinstance(item, (GenerationResult, BaseException)):
            self.delivered = True
        try:
            self.send.send_nowait(item)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.delivered = True  # the consumer is gone


def _normalized(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    """Conversation identity as the runner sees it: think blocks are not sent back by clients."""
    out = []
    for m in messages:
        content = m.content
        if m.role == "assistant" and "</think>" in content:
            content = content.split("</think>", 1)[1]
        out.append((m.role, content.strip()))
    return out


def _signal_name(returncode: int | None) -> str:
    if returncode is None:
        return "ended with an unknown status"
    signum = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    try:
        name = signal.Signals(signum).name if signum else ""
    except ValueError:
        name = ""
    if returncode < 0:
        return f"killed by signal {name or -returncode}"
    if name:  # /bin/sh reports a child killed by signal N as status 128+N
        return f"exited with status {returncode} (killed by signal {name})"
    return f"exited with status {returncode}"


class CardEngine(Engine):
    """A model served by the card's runner program through its run script."""

    def __init__(self, spec: ModelSpec, settings: Any, tokenizers: TokenizerClient, metrics: Any = None) -> None:
        self.spec = spec
        self.settings = settings
        self.capabilities = EngineCapabilities(chat_history=True, per_request_sampling=False, max_concurrency=1)
        self._tokenizers = tokenizers
        self._metrics = metrics
        self._machine = StateMachine()
        self._state_changed = anyio.Event()
        self.logs = LogRing(getattr(settings, "runner_log_lines", 500))
        send, receive = anyio.create_memory_object_stream(math.inf)
        self._inbox_send, self._inbox = send, receive
        self._tg: TaskGroup | None = None

        # Runner process (owned by the owner task).
        self._generation = 0
        self._process: Process | None = None
        self._parser: RunnerOutputParser | None = None
        self._dialect: str | None = None if spec.dialect == "auto" else spec.dialect
        self._supports_reset = False
        self._uid: str | None = None
        self._tokenizer_caps: dict[str, Any] | None = None
        self._tokenizer_probed = False
        self._tokenizer_config: dict[str, Any] = {}  # what /config last set on the server
        self._tokenizer_scope: anyio.CancelScope | None = None
        self._progress: dict[str, Any] | None = None
        self._load_started: float | None = None
        self.last_load_duration: float | None = None
        self._context: tuple[int, int] | None = None  # (precompute_len, remaining)
        self._held: list[ChatMessage] | None = None  # the conversation the runner's context holds
        self._held_system: str | None = None
        self._reset_system: str | None = None  # the system prompt the reset under way installs
        # The system prompt the next launch gives the tokenizer for the runner's init /reset.
        self._launch_system: str | None = spec.system_prompt

        # Jobs and failures.
        self._job: _TurnJob | None = None
        self._pending: deque[_TurnJob] = deque()
        self._stop_waiters: list[anyio.Event] = []
        self._last_error: dict[str, Any] | None = None
        self._restarts = 0
        self._backoff = settings.backoff_min_s
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

    @property
    def state(self) -> str:
        return self._machine.state.value

    async def start(self) -> None:
        self._inbox_send.send_nowait(_Start("start requested"))

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
                self._inbox_send.send_nowait(_Start("request needs the model"))
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise RequestTimedOut(f'model "{self.spec.name}" was not ready before the request deadline (state {state})')
            with anyio.move_on_after(remaining if remaining is not None else math.inf):
                await changed.wait()

    async def stop(self, reason: str) -> None:
        done = anyio.Event()
        self._inbox_send.send_nowait(_Stop(reason, done))
        await done.wait()

    async def generate(self, request: GenerationRequest):
        send, receive = anyio.create_memory_object_stream(math.inf)
        job = _TurnJob(
            request=request,
            send=send,
            splitter=ThinkSplitter(),
            stops=StopScanner(request.options.stop),
        )
        self._inbox_send.send_nowait(job)
        try:
            async with receive:
                async for item in receive:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    if isinstance(item, GenerationResult):
                        return
        finally:
            if not job.delivered:
                self._inbox_send.send_nowait(_Cancel(job))

    def status(self) -> dict[str, Any]:
        snap = self._machine.snapshot()
        job = self._job
        precompute, remaining = self._context or (None, None)
        if self._dialect == "c":
            newlines = "replaced with spaces: the runner's built-in tokenizer cannot restore them"
        elif self._tokenizer_caps is not None:
            newlines = "restored by the tokenizer server"
        elif self._tokenizer_probed:
            newlines = "replaced with spaces: the stock tokenizer script cannot restore them"
        else:
            newlines = "unknown until the tokenizer server runs"
        return {
            "name": self.spec.name,
            "engine": "ax-runner",
            "state": snap["state"],
            "since": snap["since"],
            "since_epoch": snap.get("since_epoch"),
            "progress": self._progress,
            "dialect": self._dialect or "unknown until the runner starts",
            "supports_reset": self._supports_reset,
            "pid": self._process.pid if self._process else None,
            "runner_pid": self._runner_pid() if self._process else None,
            "in_flight": None
            if job is None
            else {
                "id": job.request.id,
                "age_s": round(time.monotonic() - job.request.arrived_at, 3),
                "tokens_so_far": job.flushes * _TOKENS_PER_FLUSH,
                "phase": job.phase,
            },
            "context": {
                "used": precompute,
                "remaining": remaining,
                "size": self.spec.context_size,
                "conversation_messages": None if self._held is None else len(self._held),
            },
            "restarts": self._restarts,
            "last_error": self._last_error,
            "last_load_duration_s": self.last_load_duration,
            "newlines": newlines,
            "history": snap["history"][-50:],
        }

    def transition_history(self) -> list[dict[str, Any]]:
        """Every recorded transition (bounded), oldest first."""
        return [t.as_dict() for t in self._machine.history]

    # ---- the owner task ---------------------------------------------------------------------

    async def run(self) -> None:
        """The owner loop. Runs for the engine's life inside the manager's task group."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                while True:
                    timeout = self._seconds_to_next_timer()
                    message = None
                    with anyio.move_on_after(timeout):
                        message = await self._inbox.receive()
                    if message is None:
                        await self._on_timers()
                    else:
                        await self._handle(message)
            finally:
                with anyio.CancelScope(shield=True):
                    await self._kill_now("daemon shutting down")
                tg.cancel_scope.cancel()

    async def _handle(self, message: Any) -> None:
        if isinstance(message, _Output):
            if message.generation == self._generation:
                self._note_liveness()
                for event in message.events:
                    await self._on_event(event)
        elif isinstance(message, _TurnJob):
            self._pending.append(message)
            await self._advance()
        elif isinstance(message, _Cancel):
            await self._on_cancel(message.job)
        elif isinstance(message, _Exited):
            if message.generation == self._generation:
                await self._on_exit(message.returncode)
        elif isinstance(message, _TokenizerReady):
            if message.generation == self._generation:
                await self._on_tokenizer_ready(message)
        elif isinstance(message, _Start):
            await self._on_start(message.reason)
        elif isinstance(message, _Stop):
            await self._on_stop(message)

    # ---- state -----------------------------------------------------------------------------

    def _set_state(self, to: RunnerState, reason: str, **details: Any) -> None:
        if self._machine.state is to:
            return
        self._machine.transition(to, reason, **details)
        log.info("model %s: %s (%s)", self.spec.name, to.value, reason)
        if to is not S.INITIALIZING:
            self._progress = None
        if self._metrics is not None:
            self._metrics.set_state(to.value)
        changed, self._state_changed = self._state_changed, anyio.Event()
        changed.set()

    def _fail(self, reason: str, *, log_tail: bool = True, **details: Any) -> None:
        """Record a failure and schedule a restart with back-off."""
        self._last_error = {
            "at": time.time(),
            "reason": reason,
            "details": details,
            "log_tail": self.logs.tail(20) if log_tail else [],
        }
        self._failed_at = time.monotonic()
        self._restart_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.settings.backoff_max_s)
        self._clear_process_timers()
        self._set_state(S.FAILED, reason, restart_in_s=round(self._restart_at - time.monotonic(), 3), **details)

    def _failure_message(self) -> str:
        err = self._last_error or {}
        tail = [line for line in err.get("log_tail", []) if line.strip()][-5:]
        text = f'model "{self.spec.name}" failed: {err.get("reason", "unknown error")}'
        if tail:
            text += "; runner output: " + " | ".join(tail)
        if self._restart_at is not None:
            text += f"; restarting in {max(0.0, self._restart_at - time.monotonic()):.1f}s"
        return text

    # ---- start-up --------------------------------------------------------------------------

    async def _on_start(self, reason: str) -> None:
        state = self._machine.state
        if state is S.FAILED and self._restart_at is not None and time.monotonic() < self._restart_at:
            return  # the restart is already scheduled (card memory may still be busy)
        if state not in (S.STOPPED, S.FAILED):
            return
        await self._launch(reason)

    async def _launch(self, reason: str) -> None:
        self._generation += 1
        self._restart_at = None
        self._uid = None
        self._tokenizer_config = {}
        self._context = None
        self._held = []
        self._held_system = self._launch_system
        if self.spec.tokenizer_port and self._dialect != "c":
            self._set_state(S.WAITING_FOR_TOKENIZER, reason, port=self.spec.tokenizer_port)
            self._tokenizer_scope = anyio.CancelScope()
            assert self._tg is not None
            self._tg.start_soon(self._prepare_tokenizer, self._generation, self._tokenizer_scope)
        else:
            self._set_state(S.STARTING, reason)
            await self._spawn()

    async def _prepare_tokenizer(self, generation: int, scope: anyio.CancelScope) -> None:
        spec = self.spec
        host = spec.tokenizer_ip or "127.0.0.1"
        caps: dict[str, Any] | None = None
        error: str | None = None
        with scope:
            try:
                if spec.tokenizer_py:
                    await self._tokenizers.start_server(
                        spec.name,
                        host,
                        {
                            "tokenizer_path": str(spec.tokenizer_path or spec.model_path),
                            "tokenizer_py": spec.tokenizer_py,
                            "port": spec.tokenizer_port,
                        },
                    )
                await self._tokenizers.wait_until_serving(host, spec.tokenizer_port, self.settings.tokenizer_timeout_s)
                caps = await self._tokenizers.capabilities(host, spec.tokenizer_port)
                if caps is not None:
                    # The runner's init /reset picks up the system prompt the descriptor sets.
                    initial = {"system_prompt": self._launch_system, "thinking": None, "history": []}
                    await self._tokenizers.configure(host, spec.tokenizer_port, **initial)
                    self._tokenizer_config = initial
            except (TokenizerUnavailable, OSError) as exc:
                error = str(exc)
        if not scope.cancel_called:
            self._inbox_send.send_nowait(_TokenizerReady(generation, caps, error))

    async def _on_tokenizer_ready(self, message: _TokenizerReady) -> None:
        if self._machine.state is not S.WAITING_FOR_TOKENIZER:
            return
        if message.error:
            self._fail(f"tokenizer not available: {message.error}", log_tail=False)
            self._fail_all_jobs(ModelUnavailable(self._failure_message()))
            return
        self._tokenizer_caps = message.capabilities
        self._tokenizer_probed = True
        self._set_state(S.STARTING, "tokenizer is serving", extensions=message.capabilities is not None)
        await self._spawn()

    def _command(self) -> list[str]:
        spec = self.spec
        if spec.script_path is None:  # e.g. `axllm run .` for the 2026 runner
            return ["/bin/sh", "-c", spec.run_cmd]
        # $1 is the tokenizer port (the original wrapper's convention); scripts may ignore it.
        return ["/bin/sh", str(spec.script_path), str(spec.tokenizer_port or "")]

    async def _spawn(self) -> None:
        env = dict(os.environ)
        # The runner programs of this environment (e.g. the emulator) come first on PATH.
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        command = self._command()
        self._parser = RunnerOutputParser(None if self.spec.dialect == "auto" else self.spec.dialect)
        self._load_started = time.monotonic()
        now = self._load_started
        stall = self._load_stall_s
        self._load_stall_at = now + stall
        self._load_cap_at = now + max(stall, self.settings.load_timeout_cap_s)
        try:
            self._process = await anyio.open_process(
                command,
                cwd=str(self.spec.model_path),
                env=env,
                start_new_session=True,  # its own process group: stop and kill reach the whole tree
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            self._fail(f"cannot launch {' '.join(command)}: {exc}")
            self._fail_all_jobs(ModelUnavailable(self._failure_message()))
            return
        self.logs.append(f"[axm1-llm] started {' '.join(command)} (pid {self._process.pid})")
        assert self._tg is not None
        self._tg.start_soon(self._read_stdout, self._generation, self._process, self._parser)
        self._tg.start_soon(self._read_stderr, self._process)

    async def _read_stdout(self, generation: int, process: Process, parser: RunnerOutputParser) -> None:
        assert process.stdout is not None
        send = self._inbox_send.send_nowait
        try:
            while True:
                try:
                    data = await process.stdout.receive(65536)
                except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                    break
                events = parser.feed(data)
                if events:
                    send(_Output(generation, events))
                else:
                    send(_Output(generation, []))  # output without events still proves liveness
            tail = parser.end_of_stream()
            if tail:
                send(_Output(generation, tail))
        finally:
            with anyio.CancelScope(shield=True):
                returncode = await process.wait()
            send(_Exited(generation, returncode))

    async def _read_stderr(self, process: Process) -> None:
        assert process.stderr is not None
        pending = b""
        try:
            async for data in process.stderr:
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self.logs.append("[stderr] " + line.decode("utf-8", "replace"))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        if pending:
            self.logs.append("[stderr] " + pending.decode("utf-8", "replace"))

    # ---- runner output -----------------------------------------------------------------------

    def _note_liveness(self) -> None:
        """Any output counts: it moves the load stall deadline and the hang deadline."""
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
        if isinstance(event, Text):
            await self._on_text(event.text)
            return
        if isinstance(event, LogLine):
            self.logs.append(f"[{event.level}][{event.function}][{event.line}]: {event.message}")
            if event.message.startswith("precompute_len:") and state in (S.INITIALIZING, S.RESETTING):
                # The system prompt prefilled at start-up already occupies the context.
                used = int(event.message.split(":", 1)[1].split(",")[0])
                self._context = (used, self.spec.context_size - used)
        elif isinstance(event, PlainLine):
            if event.text.strip():
                self.logs.append(event.text)
        elif isinstance(event, Progress):
            self.logs.append(f"{event.percent}% {event.step}/{event.total} {event.message}")
            if state is S.INITIALIZING:
                self._progress = {"percent": event.percent, "step": event.step, "total": event.total, "message": event.message}
        elif isinstance(event, Uid):
            self._uid = event.uid
        elif isinstance(event, Banner):
            self._supports_reset = event.supports_reset
        elif isinstance(event, KvCache):
            self._context = (event.precompute_len, event.remaining)
            if self._metrics is not None:
                self._metrics.context(event.precompute_len, self.spec.context_size)
        elif isinstance(event, InputTokens):
            if self._job is not None:
                self._job.prompt_tokens = event.count
                self._job.request.prompt_tokens = event.count
        elif isinstance(event, Ttft):
            if self._job is not None:
                self._job.runner_ttft_ms = event.ms
        elif isinstance(event, TurnEnd):
            if self._job is not None:
                self._job.turn_ended = True
                self._job.runner_tps = event.tokens_per_second
        elif isinstance(event, RunnerError):
            self.logs.append(f"[error:{event.kind}] {event.message}")
            if self._job is not None and event.kind in ("context_overflow", "prompt_too_long"):
                self._job.error = BadRequest(f"the prompt does not fit the model's context: {event.message}")
                self._held = None  # what the runner holds now is not reliable
        elif isinstance(event, Marker):
            await self._on_marker()

    async def _on_marker(self) -> None:
        state = self._machine.state
        if self._parser is not None and self._dialect is None:
            self._dialect = self._parser.dialect
        if state is S.INITIALIZING:
            self.last_load_duration = time.monotonic() - (self._load_started or time.monotonic())
            self._load_stall_at = self._load_cap_at = None
            self._backoff = self.settings.backoff_min_s
            self._set_state(S.READY, "runner is at its prompt", load_seconds=round(self.last_load_duration, 3))
            if self._metrics is not None:
                self._metrics.load_finished(self.last_load_duration)
            await self._advance()
        elif state is S.RESETTING:
            self._reset_at = None
            self._held = []
            self._held_system = self._reset_system
            self._set_state(S.READY, "context reset")
            await self._advance()
        elif state in (S.PROCESSING, S.OUTPUTTING):
            await self._finish_turn()
        # At READY a marker is the runner re-printing it (e.g. after an empty line): nothing to do.

    async def _on_text(self, text: str) -> None:
        job = self._job
        if job is None or job.phase != "prompting":
            if text.strip():
                self.logs.append(f"[unexpected text] {text!r}")
            return
        if self._machine.state is S.PROCESSING:
            self._set_state(S.OUTPUTTING, "first text from the runner")
        if job.first_text_at is None:
            job.first_text_at = time.monotonic()
        job.flushes += 1
        job.answer.append(text)
        if job.interrupted:
            return  # draining after SIGINT: nothing more reaches the client
        thinking, content = job.splitter.feed(text)
        visible = job.stops.feed(content)
        if thinking or visible:
            job.deliver(Chunk(content=visible, thinking=thinking, tokens=_TOKENS_PER_FLUSH))
        if job.stops.stopped:
            await self._interrupt(job, "stop")
            job.deliver(self._result(job, "stop", final=True))
        elif job.request.options.num_predict and job.request.options.num_predict > 0:
            if job.flushes * _TOKENS_PER_FLUSH >= job.request.options.num_predict:
                await self._interrupt(job, "length")
                job.deliver(self._result(job, "length", final=True))

    # ---- turns -------------------------------------------------------------------------------

    async def _advance(self) -> None:
        """Start or continue the next job when the runner is at its prompt."""
        if self._machine.state is not S.READY:
            return
        if self._job is not None and self._job.delivered and self._job.phase != "prompting":
            self._job = None  # its client left during a reset or restart
        if self._job is None:
            while self._pending and self._pending[0].delivered:
                self._pending.popleft()  # its client left while it waited
            if not self._pending:
                return
            self._job = self._pending.popleft()
        job = self._job
        try:
            if job.phase == "new":
                await self._plan(job)
                if job.phase != "prompting":
                    return  # waiting for a reset or a restart to complete
            elif job.phase in ("resetting", "restarting"):
                job.phase = "prompting"
            await self._write_prompt(job)
        except EngineError as exc:
            job.deliver(exc)
            self._job = None
            await self._advance()

    async def _plan(self, job: _TurnJob) -> None:
        request = job.request
        messages = [m for m in request.messages if m.role != "system"]
        if not messages or messages[-1].role != "user":
            raise BadRequest("the last message must come from the user")
        job.line = messages[-1].content
        job.history = messages[:-1]
        job.system = request.system if request.system is not None else self.spec.system_prompt
        job.warnings = [
            f"{name}: fixed at launch by the runner's post_config.json, not applied per request"
            for name in _FIXED_AT_LAUNCH
            if getattr(request.options, name) is not None
        ]
        ours = self._tokenizer_caps is not None
        if "\n" in job.line and not ours:
            job.warnings.append("newlines replaced with spaces: the stock tokenizer script cannot restore them")

        if self._dialect == "a":
            job.fresh = True  # legacy runners keep no context between turns
            if job.history and not ours:
                job.warnings.append("history not sent: the stock tokenizer script cannot take it")
            job.phase = "prompting"
            return

        continuing = (
            request.kind == "chat"
            and self._held is not None
            and self._held_system == job.system
            and _normalized(self._held) == _normalized(job.history)
        )
        if continuing and self._context is not None:
            needed = await self._estimate_tokens([job.line], room=self._context[1] - _CONTEXT_MARGIN)
            if needed + _CONTEXT_MARGIN > self._context[1]:
                continuing = False  # would overflow: open a fresh context holding the history
        if not continuing:
            self._launch_system = job.system
            needed = await self._estimate_tokens(
                [m.content for m in job.history] + [job.line, job.system or ""],
                room=self.spec.context_size - _CONTEXT_MARGIN,
            )
            if needed + _CONTEXT_MARGIN > self.spec.context_size:
                raise BadRequest(
                    f"the conversation needs about {needed} tokens, more than the context of "
                    f'"{self.spec.name}" ({self.spec.context_size} tokens)'
                )
            if job.history and not ours:
                job.warnings.append("history flattened into the prompt: the tokenizer cannot take it")
                job.line = "\n".join(f"{m.role}: {m.content}" for m in job.history) + f"\nuser: {job.line}"
                job.history = []
        job.fresh = not continuing
        already_fresh = self._held == [] and self._held_system == job.system
        if continuing or already_fresh:
            job.phase = "prompting"
            return
        if self._can_reset:
            job.phase = "resetting"
            await self._reset(job.system, "fresh context for a new conversation", request=request.id)
        else:
            await self._configure_tokenizer(system_prompt=job.system)
            # This runner cannot reset its KV cache: a fresh context costs a restart (a full load).
            job.phase = "restarting"
            self._held = None
            await self._restart_process("fresh context needs a restart (runner has no reset)")

    @property
    def _can_reset(self) -> bool:
        return self._supports_reset or self._dialect == "c"

    async def _reset(self, system: str | None, reason: str, **details: Any) -> None:
        """Clear the runner's KV cache; the tokenizer server installs `system` at its /reset."""
        await self._configure_tokenizer(system_prompt=system)
        self._reset_system = system
        self._reset_at = time.monotonic() + _RESET_TIMEOUT_S
        self._context = None  # known again from the runner's reset lines or its next turn
        self._set_state(S.RESETTING, reason, **details)
        await self._write_line("/reset" if self._dialect == "c" else "reset")

    async def _reset_ahead(self) -> None:
        """After a one-shot request, reset while idle, so the next one finds a fresh context."""
        if self._pending or not self._can_reset or self._machine.state is not S.READY:
            return
        try:
            await self._reset(self.spec.system_prompt, "fresh context ahead of the next request")
        except EngineError as exc:
            self.logs.append(f"[axm1-llm] reset ahead of the next request failed: {exc.message}")

    async def _write_prompt(self, job: _TurnJob) -> None:
        ours = self._tokenizer_caps is not None
        if ours:
            await self._configure_tokenizer(
                history=[{"role": m.role, "content": m.content} for m in job.history] if job.fresh else [],
                thinking=job.request.think,
            )
        line = escape_prompt_line(job.line) if ours else job.line.replace("\r", " ").replace("\n", " ")
        if line.strip() in ("", "q", "/q", "/exit", "reset", "dd", "/reset", "/dd", "/pp"):
            line = line + " "  # never let a prompt be taken for a runner command or an empty line
        job.phase = "prompting"
        assert self._parser is not None
        self._parser.begin_turn()
        self._tokenizer_config["history"] = []  # the runner's /encode for this line consumes it
        self._set_state(S.PROCESSING, "prompt sent", request=job.request.id)
        job.prompt_written_at = time.monotonic()
        self._hang_at = job.prompt_written_at + self._hang_s
        await self._write_line(line)

    async def _finish_turn(self) -> None:
        job = self._job
        self._job = None
        self._hang_at = self._interrupt_at = None
        if job is not None:
            if job.error is not None:
                job.deliver(job.error)
            elif not job.delivered:
                reason = "length" if self._context is not None and self._context[1] <= 1 else "stop"
                result = self._result(job, reason, final=True)
                await self._count_real_tokens(job, result)
                job.deliver(result)
            if job.error is None and job.interrupted is None:
                self._held = job.history + [ChatMessage("user", job.line), ChatMessage("assistant", "".join(job.answer))]
                self._held_system = job.system
            else:
                self._held = None
        self._set_state(S.READY, "turn over")
        await self._advance()
        if job is not None and job.request.kind == "generate":
            await self._reset_ahead()

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
            completion_tokens=job.flushes * _TOKENS_PER_FLUSH,
            prompt_eval_duration=max(0.0, first - written),
            eval_duration=max(0.0, now - first),
            total_duration=now - job.request.arrived_at,
            time_to_first_token=None if job.first_text_at is None else job.first_text_at - job.request.arrived_at,
            runner_tokens_per_second=job.runner_tps,
            warnings=list(job.warnings),
        )

    async def _count_real_tokens(self, job: _TurnJob, result: GenerationResult) -> None:
        """Replace the streaming estimate (3 tokens a flush) with real counts where possible."""
        if self._tokenizer_caps is None:
            return
        host, port = self._tokenizer_host, self.spec.tokenizer_port
        with anyio.move_on_after(_TOKENIZER_CALL_TIMEOUT_S):
            stats = await self._tokenizers.stats(host, port, self._uid) if self._uid else None
            if stats is not None:
                result.completion_tokens = stats["reply_tokens"]
                # The runner's own count of what it prefilled this turn is Ollama's meaning;
                # the tokenizer's is the whole conversation.
                result.prompt_tokens = result.prompt_tokens or stats.get("prompt_tokens", 0)
                return
            ids = await self._tokenizers.tokenize(host, port, "".join(job.answer))
            if ids is not None:
                result.completion_tokens = len(ids)

    async def _estimate_tokens(self, texts: list[str], room: int) -> int:
        """Tokens the texts need (with template overhead), asking the tokenizer only when needed."""
        text = "\n".join(t for t in texts if t)
        if not text:
            return 0
        upper_bound = len(text.encode()) + 8 * len(texts)  # a token never holds less than a byte
        if upper_bound <= room:
            return upper_bound  # fits for sure: no round trip on the way to the first token
        if self._tokenizer_caps is not None:
            with anyio.move_on_after(_TOKENIZER_CALL_TIMEOUT_S):
                ids = await self._tokenizers.tokenize(self._tokenizer_host, self.spec.tokenizer_port, text)
                if ids is not None:
                    return len(ids) + 8 * len(texts)
        return len(text.encode()) // 3 + 8 * len(texts)  # a cautious guess: about 3 bytes a token

    @property
    def _load_stall_s(self) -> float:
        """The descriptor's value when it sets one, else the daemon's setting."""
        if "load_timeout_s" in self.spec.model_fields_set:
            return self.spec.load_timeout_s
        return self.settings.load_stall_timeout_s

    @property
    def _hang_s(self) -> float:
        if "hang_timeout_s" in self.spec.model_fields_set:
            return self.spec.hang_timeout_s
        return self.settings.hang_timeout_s

    @property
    def _tokenizer_host(self) -> str:
        return self.spec.tokenizer_ip or "127.0.0.1"

    async def _configure_tokenizer(self, **settings: Any) -> None:
        """Send the settings that differ from what the tokenizer server already holds."""
        if self._tokenizer_caps is None:
            return
        changed = {k: v for k, v in settings.items() if k not in self._tokenizer_config or self._tokenizer_config[k] != v}
        if not changed:
            return
        try:
            with anyio.fail_after(_TOKENIZER_CALL_TIMEOUT_S):
                await self._tokenizers.configure(self._tokenizer_host, self.spec.tokenizer_port, **changed)
        except (TimeoutError, TokenizerUnavailable, OSError) as exc:
            self._tokenizer_config.clear()
            raise ModelUnavailable(f'tokenizer of "{self.spec.name}" did not take its settings: {exc}') from exc
        self._tokenizer_config.update(changed)

    async def _on_cancel(self, job: _TurnJob) -> None:
        job.delivered = True
        if job in self._pending:
            self._pending.remove(job)
        elif job is self._job:
            if self._machine.state in (S.PROCESSING, S.OUTPUTTING):
                await self._interrupt(job, "cancel")
            else:
                await self._advance()  # a reset or restart for it may still finish; then it is dropped

    async def _interrupt(self, job: _TurnJob, why: str) -> None:
        """Stop the current generation; the runner prints its usual tail and its marker."""
        if job.interrupted:
            return
        job.interrupted = why
        self._interrupt_at = time.monotonic() + self.settings.stop_grace_s
        self._signal_runner(signal.SIGINT)

    # ---- process control ---------------------------------------------------------------------

    def _runner_pid(self) -> int | None:
        """The runner program's pid: the child of /bin/sh running the script (or sh itself)."""
        if self._process is None:
            return None
        pid = self._process.pid
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = f.read().split()
        except OSError:
            return pid
        return int(children[0]) if children else pid

    def _signal_runner(self, sig: signal.Signals) -> None:
        pid = self._runner_pid()
        if pid is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._process is None:
            return
        try:
            os.killpg(self._process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def _write_line(self, line: str) -> None:
        process = self._process
        if process is None or process.stdin is None:
            raise ModelUnavailable(f'model "{self.spec.name}" has no running runner')
        try:
            with anyio.fail_after(_TOKENIZER_CALL_TIMEOUT_S):
                await process.stdin.send(line.encode("utf-8") + b"\n")
        except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise ModelUnavailable(f'could not write to the runner of "{self.spec.name}": {exc!r}') from exc

    async def _restart_process(self, reason: str) -> None:
        """Replace the runner with a fresh one (the current job stays and resumes at READY)."""
        self._restarts += 1
        if self._metrics is not None:
            self._metrics.restarted("fresh_context")
        self._set_state(S.STOPPING, reason)
        await self._kill_now(reason)
        self._set_state(S.STOPPED, reason)
        await self._launch(reason)

    async def _kill_now(self, reason: str) -> None:
        if self._tokenizer_scope is not None:
            self._tokenizer_scope.cancel()
        process = self._process
        if process is None:
            return
        self._generation += 1  # whatever the old process still says is ignored
        self._signal_group(signal.SIGKILL)
        with anyio.move_on_after(5):
            await process.wait()
            await process.aclose()
        self._process = None
        self._clear_process_timers()
        self.logs.append(f"[axm1-llm] runner killed: {reason}")

    def _clear_process_timers(self) -> None:
        self._load_stall_at = self._load_cap_at = self._hang_at = None
        self._interrupt_at = self._reset_at = None
        self._stop_term_at = self._stop_kill_at = None

    async def _on_exit(self, returncode: int | None) -> None:
        process, self._process = self._process, None
        if process is not None:
            with anyio.move_on_after(1):
                await process.aclose()
        how = _signal_name(returncode)
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
        during = "loading" if state in (S.STARTING, S.INITIALIZING) else "serving"
        if self._metrics is not None:
            self._metrics.restarted("crash_at_load" if during == "loading" else "crash")
        self._fail(f"runner {how} while {during}", returncode=returncode)
        error_type = ModelUnavailable if during == "loading" else RunnerCrashed
        self._fail_all_jobs(error_type(self._failure_message()))

    def _fail_all_jobs(self, error: EngineError) -> None:
        if self._job is not None:
            self._job.deliver(error)
            self._job = None
        while self._pending:
            self._pending.popleft().deliver(error)

    # ---- stop ------------------------------------------------------------------------------

    async def _on_stop(self, message: _Stop) -> None:
        self._stop_waiters.append(message.done)
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
        if self._process is None:  # still waiting for the tokenizer
            if self._tokenizer_scope is not None:
                self._tokenizer_scope.cancel()
            self._generation += 1
            self._set_state(S.STOPPED, message.reason)
            self._finish_stop()
            return
        self._clear_process_timers()
        if state in (S.PROCESSING, S.OUTPUTTING):
            self._signal_runner(signal.SIGINT)
        try:
            await self._write_line("/q" if self._dialect == "c" else "q")
        except ModelUnavailable:
            pass
        now = time.monotonic()
        self._stop_term_at = now + self.settings.stop_grace_s
        self._stop_kill_at = now + 2 * self.settings.stop_grace_s

    def _finish_stop(self) -> None:
        waiters, self._stop_waiters = self._stop_waiters, []
        for done in waiters:
            done.set()

    # ---- timers ------------------------------------------------------------------------------

    def _timers(self) -> list[float]:
        return [
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

    def _seconds_to_next_timer(self) -> float:
        timers = self._timers()
        return max(0.0, min(timers) - time.monotonic()) if timers else math.inf

    async def _on_timers(self) -> None:
        now = time.monotonic()
        state = self._machine.state
        if state is S.FAILED and self._restart_at is not None and now >= self._restart_at:
            self._restart_at = None
            await self._launch("restart after failure")
            return
        if self._stop_kill_at is not None and now >= self._stop_kill_at:
            self._stop_kill_at = None
            self.logs.append("[axm1-llm] runner ignored q and SIGTERM: SIGKILL")
            self._signal_group(signal.SIGKILL)
        elif self._stop_term_at is not None and now >= self._stop_term_at:
            self._stop_term_at = None
            self.logs.append("[axm1-llm] runner did not quit on q: SIGTERM")
            self._signal_group(signal.SIGTERM)
        if state in (S.STARTING, S.INITIALIZING):
            if self._load_cap_at is not None and now >= self._load_cap_at:
                await self._load_failed(f"load took longer than the cap of {self.settings.load_timeout_cap_s:.0f}s")
            elif self._load_stall_at is not None and now >= self._load_stall_at:
                stall = self._load_stall_s
                await self._load_failed(f"load made no progress for {stall:.0f}s")
            return
        if state is S.RESETTING and self._reset_at is not None and now >= self._reset_at:
            await self._hard_failure("runner did not come back after reset", RunnerHung)
            return
        if self._interrupt_at is not None and now >= self._interrupt_at:
            await self._hard_failure("runner did not stop generating after SIGINT", RunnerHung)
            return
        if state in (S.PROCESSING, S.OUTPUTTING) and self._hang_at is not None and now >= self._hang_at:
            self._hang_at = None
            job = self._job
            hang = self._hang_s
            if job is not None:
                job.deliver(RunnerHung(f'runner of "{self.spec.name}" produced no output for {hang:.0f}s; generation interrupted'))
                await self._interrupt(job, "hang")

    async def _load_failed(self, reason: str) -> None:
        self._restarts += 1
        if self._metrics is not None:
            self._metrics.restarted("load_timeout")
        await self._kill_now(reason)
        self._fail(reason)
        self._fail_all_jobs(ModelUnavailable(self._failure_message()))

    async def _hard_failure(self, reason: str, error_type: type[EngineError]) -> None:
        self._restarts += 1
        if self._metrics is not None:
            self._metrics.restarted("hang")
        await self._kill_now(reason)
        self._fail(reason)
        self._fail_all_jobs(error_type(self._failure_message()))
