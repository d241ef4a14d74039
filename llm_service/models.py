"""ModelManager: the descriptor's models, their engines and queues, keep_alive and card memory.

The API layer calls `generate()`, `complete()` or `embed()` and never learns which engine serves
a model. The manager owns request-level bookkeeping that is the same for every engine:
admission, the deadline, readiness, the thinking filter, keep_alive and the request metrics.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .admission import AdmissionQueue
from .memory import Holding, plan_room
from .descriptor import DescriptorResult, ModelSpec, diff_specs, load_descriptor, parse_keep_alive
from .children import owner_tag
from .engines import create_engine
from .discovery import signature as discovery_signature, this_host
from .events import EventBus, ModelEvents
from .engines.upstream_process import ManagedProcesses
from .engines.base import (
    BadRequest,
    Chunk,
    EmbedOptions,
    Embeddings,
    Engine,
    EngineContext,
    EngineError,
    GenerationRequest,
    GenerationResult,
    ModelNotFound,
    ModelUnavailable,
    RequestTimedOut,
    StatusNote,
    ToolCall,
)
from .metrics import MetricsHub, ModelMetrics
from .states import SERVING_STATES
from .model_files import folder_size
from .names import matches, resolve_name
from .timestamps import rfc3339, rfc3339_in
from .tokenizer_client import TokenizerClient, TokenizerUnavailable
from .tool_stream import answer_stream
from .tools import client_texts

log = logging.getLogger(__name__)

# An engine whose owner loop itself ended by an exception is started again after this long.
_ENGINE_LOOP_RESTART_S = 1.0


@dataclass(eq=False)
class ModelEntry:
    spec: ModelSpec
    engine: Engine
    admission: AdmissionQueue
    metrics: ModelMetrics
    events: ModelEvents
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    modified_at: str = field(default_factory=lambda: rfc3339(time.time()))
    last_used: float = 0.0
    expires_at: float | None = None  # monotonic; None = stays loaded
    size_bytes: int = 0  # the model's folders on disk, read once per descriptor load
    published_queue: tuple[int, int] = (0, 0)  # (waiting, running) as last published
    waiting_for: str | None = None  # what a load of this model waits for (a shared tokenizer port)

    def would_wait(self) -> bool:
        """A request arriving now would wait in the queue."""
        admission = self.admission
        return admission.running >= admission.concurrency or admission.queue_length > 0

    def publish_queue(self, arriving: bool = False) -> None:
        """Publish the queue's figures when they changed; `arriving`: a request is about to join
        the queue if it has to wait (the queue has no hook of its own)."""
        admission = self.admission
        now = (admission.queue_length + (arriving and self.would_wait()), admission.running)
        if now != self.published_queue:
            self.published_queue = now
            self.events.publish("queue", waiting=now[0], running=now[1])


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole answer: the text, the reasoning, and the final record."""

    content: str
    thinking: str
    result: GenerationResult
    tool_calls: tuple[ToolCall, ...] = ()


def requested_keep_alive(value: Any) -> float | None:
    """A request's keep_alive in seconds (None = forever); a bad value is the client's error."""
    try:
        return parse_keep_alive(value)
    except ValueError as exc:
        raise BadRequest(f"invalid keep_alive: {exc}") from None


class ModelManager:
    def __init__(self, settings: Any, metrics: MetricsHub, tokenizers: TokenizerClient) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tokenizers = tokenizers
        self.events = EventBus(settings.events_kept)
        self._entries: dict[str, ModelEntry] = {}
        self._aliases: dict[str, str] = {}
        self.disabled: dict[str, str] = {}  # model (or entry #i) -> why it is not served
        self.descriptor_error: str | None = None
        self.descriptor_warnings: list[str] = []
        self.found: list[str] = []  # models served from folders found without an entry
        self._descriptor_fingerprint: bytes | None = None
        self._tg: TaskGroup | None = None
        self._room_lock = anyio.Lock()
        self._default_keep_alive = parse_keep_alive(settings.default_keep_alive)
        # The servers launched for managed upstreams; they never outlive the manager.
        self.processes = ManagedProcesses(owner_tag(settings.data_dir), settings.stop_grace_s)

    # ---- life cycle -------------------------------------------------------------------------

    async def run(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self.processes.run)
            await self.reload_descriptor()
            tg.start_soon(self._watch_descriptor)
            tg.start_soon(self._reap_idle)
            task_status.started()

    async def shutdown(self) -> None:
        """Stop every engine politely (for runners: quit, then SIGTERM, then SIGKILL), then end
        the tasks. Bounded: an engine that does not stop in time is cancelled (its loop kills
        what it runs on the way out)."""
        with anyio.move_on_after(3 * self.settings.stop_grace_s + 5):
            async with anyio.create_task_group() as tg:
                for entry in list(self._entries.values()):
                    tg.start_soon(entry.engine.stop, "daemon shutting down")
        for entry in self._entries.values():
            entry.scope.cancel()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    async def reload_descriptor(self) -> None:
        path = Path(self.settings.descriptor)
        host = this_host(self.settings.host_kind) if self.settings.discover_models else None
        try:
            digest = hashlib.sha256(path.read_bytes())
        except OSError:
            digest = hashlib.sha256(b"")
        if host is not None:  # a model folder added, removed or changed is a change too
            digest.update(await anyio.to_thread.run_sync(discovery_signature, path.parent))
        fingerprint = digest.digest()
        if fingerprint == self._descriptor_fingerprint:
            return
        self._descriptor_fingerprint = fingerprint
        await self.apply(await anyio.to_thread.run_sync(load_descriptor, path, host))

    async def apply(self, result: DescriptorResult) -> None:
        self.descriptor_warnings = list(result.warnings)
        if result.file_error:
            # A broken file must not take down the models that run: keep them, say what is wrong.
            self.descriptor_error = result.file_error
            log.error("descriptor: %s", result.file_error)
            return
        self.descriptor_error = None
        for name in set(result.found) - set(self.found):
            log.info("model %s: served from its folder, found without a descriptor entry", name)
        self.found = list(result.found)
        self.disabled = dict(result.errors)
        for error in result.errors.values():
            log.error("descriptor: %s", error)
        current = {name: entry.spec for name, entry in self._entries.items()}
        diff = diff_specs(current, result.models)
        for name in diff.removed:
            await self._remove(name, "removed from the descriptor")
        for name in diff.changed:
            await self._remove(name, "changed in the descriptor")
            await self._add(result.models[name])
        for name in diff.added:
            await self._add(result.models[name])
        self._aliases = {alias: name for name, entry in self._entries.items() for alias in entry.spec.aliases}

    async def _add(self, spec: ModelSpec) -> None:
        metrics = self.metrics.model(spec.name)
        events = self.events.for_model(spec.name)
        engine = create_engine(spec, EngineContext(self.settings, metrics, self.tokenizers, self.processes, events))
        entry = ModelEntry(
            spec=spec,
            engine=engine,
            admission=AdmissionQueue(self.settings.queue_size, engine.capabilities.max_concurrency),
            metrics=metrics,
            events=events,
        )
        entry.expires_at = None if spec.run_on_startup else 0.0
        entry.size_bytes = await anyio.to_thread.run_sync(folder_size, spec.config.folders())
        metrics.npu_memory(spec.npu_memory_mb)
        metrics.context(0, spec.context_size)
        metrics.set_state(engine.state)
        self._entries[spec.name] = entry
        assert self._tg is not None
        self._tg.start_soon(self._run_engine, entry)
        if spec.run_on_startup:
            await engine.start()

    async def _run_engine(self, entry: ModelEntry) -> None:
        """The engine's owner loop for the model's life; started again if it ever ends by an
        exception (the loop contains its own; this is the last line of defence)."""
        with entry.scope:
            while True:
                try:
                    await entry.engine.run()
                    return
                except Exception:
                    log.exception("model %s: the engine's loop ended; starting it again", entry.spec.name)
                await anyio.sleep(_ENGINE_LOOP_RESTART_S)

    async def _remove(self, name: str, reason: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is None:
            return
        await entry.engine.stop(reason)
        entry.scope.cancel()
        self.metrics.remove_model(name)
        await entry.engine.close()

    async def _watch_descriptor(self) -> None:
        while True:
            await anyio.sleep(self.settings.descriptor_poll_s)
            try:
                await self.reload_descriptor()
            except Exception:  # a reload bug must not end the watcher
                log.exception("descriptor reload failed")

    async def _reap_idle(self) -> None:
        while True:
            await anyio.sleep(0.5)
            now = time.monotonic()
            for entry in list(self._entries.values()):
                if (
                    entry.expires_at is not None
                    and entry.expires_at <= now
                    and entry.engine.is_loaded
                    and entry.admission.idle
                    and not entry.engine.is_busy
                ):
                    entry.expires_at = None if entry.spec.run_on_startup else 0.0
                    log.info("model %s: keep_alive expired, unloading", entry.spec.name)
                    await entry.engine.stop("keep_alive expired")

    # ---- lookup -----------------------------------------------------------------------------

    def resolve(self, name: str) -> str:
        """The descriptor name of a model, from any name a client uses for it (names.py)."""
        found = resolve_name(name, self._entries, self._aliases)
        if found is not None:
            return found
        disabled = matches(name, self.disabled)
        if disabled is not None:
            raise ModelUnavailable(f'model "{name}" is disabled: {self.disabled[disabled]}')
        raise ModelNotFound(name)

    def entry(self, name: str) -> ModelEntry:
        return self._entries[self.resolve(name)]

    def engine(self, name: str) -> Engine:
        return self.entry(name).engine

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    # ---- requests ---------------------------------------------------------------------------

    def _keep_alive_for(self, entry: ModelEntry, requested: Any) -> float | None:
        if requested is not None:
            return requested_keep_alive(requested)
        if "keep_alive" in entry.spec.model_fields_set:
            return entry.spec.keep_alive
        return None if entry.spec.run_on_startup else self._default_keep_alive

    async def load(self, name: str, keep_alive: Any = None, deadline: float | None = None) -> float:
        """Load a model (Ollama's empty prompt). Returns the load seconds."""
        entry = self.entry(name)
        seconds = self._keep_alive_for(entry, keep_alive)
        await self._make_room(entry, deadline)
        entry.expires_at = None  # an expired keep_alive must not stop it while it loads
        try:
            return await entry.engine.wait_ready(deadline)
        finally:
            self._touch(entry, seconds)

    async def unload(self, name: str) -> None:
        entry = self.entry(name)
        await entry.engine.stop("unload requested")
        entry.expires_at = None if entry.spec.run_on_startup else 0.0

    def _touch(self, entry: ModelEntry, keep_alive_s: float | None) -> None:
        entry.last_used = time.monotonic()
        entry.expires_at = None if keep_alive_s is None else entry.last_used + keep_alive_s

    def _budgets(self, entry: ModelEntry) -> list[tuple[str, int, int, Callable[[ModelSpec], int]]]:
        """(device, what this model needs, the device's budget, a model's claim) for each device
        budget this model counts against."""
        spec = entry.spec
        budgets: list[tuple[str, int, int, Callable[[ModelSpec], int]]] = []
        if spec.npu_memory_mb:
            # Each card has its own memory: a model on cards 0 and 1 (replicas) claims on both.
            for card in cards_of(spec):
                label = f"card {card}" if getattr(spec.config, "devices", ()) else "the card"
                budgets.append((label, spec.npu_memory_mb, self.settings.npu_memory_mb,
                                lambda s, card=card: (s.npu_memory_mb or 0) if card in cards_of(s) else 0))
        if spec.gpu_memory_mb and self.settings.gpu_memory_mb:
            device = spec.gpu_device
            budgets.append((f"GPU {device}", spec.gpu_memory_mb, self.settings.gpu_memory_mb,
                            lambda s: (s.gpu_memory_mb or 0) if s.gpu_device == device else 0))
        return budgets

    async def _take_port(self, entry: ModelEntry, deadline: float | None) -> None:
        """Published run scripts hard-code one tokenizer port (12345): models that share it are
        served one at a time, swapped like card memory. Once the model holding the port is idle,
        it is unloaded and the tokenizer servers on that port are stopped; until then this
        request waits (its deadline applies) and the status says for whom."""
        port = tokenizer_port_of(entry.spec)
        if port is None or entry.engine.is_loaded:
            return
        sharing = [e for e in self._entries.values() if e is not entry and tokenizer_port_of(e.spec) == port]
        if not sharing:
            return
        if any(e.engine.is_loaded for e in sharing) and await self._serve_beside(entry, port[0]):
            return
        try:
            while busy := [e for e in sharing if e.engine.is_loaded and not (e.admission.idle and not e.engine.is_busy)]:
                entry.waiting_for = f"port {port[1]} is held by {busy[0].spec.name}"
                if deadline is not None and time.monotonic() >= deadline:
                    raise RequestTimedOut(f'"{entry.spec.name}" waited for its tokenizer port: {entry.waiting_for}')
                await anyio.sleep(0.1)
        finally:
            entry.waiting_for = None
        for other in sharing:
            if other.engine.is_loaded:
                log.info("unloading %s: %s needs the tokenizer port %d", other.spec.name, entry.spec.name, port[1])
                await other.engine.stop(f"tokenizer port {port[1]} needed by {entry.spec.name}")
            await self.tokenizers.stop_server(other.spec.name, port[0])

    async def _serve_beside(self, entry: ModelEntry, tokenizer_ip: str) -> bool:
        """Can this model's tokenizer serve beside those loaded on its port? The tokenizer service
        starts it there when our server runs them all and their runners speak the uid protocol
        (tokenizer_service.server.PortModels); it refuses otherwise, and they are swapped."""
        try:
            await self.tokenizers.start_server(entry.spec.name, tokenizer_ip)
        except TokenizerUnavailable as exc:
            log.info("%s cannot share its tokenizer port: %s", entry.spec.name, exc)
            return False
        return True

    async def _make_room(self, entry: ModelEntry, deadline: float | None = None) -> None:
        """Stop least recently used idle models until this one fits in each device's memory, and
        take the tokenizer port it shares with others."""
        if entry.engine.is_loaded:
            return
        await self._take_port(entry, deadline)
        budgets = self._budgets(entry)
        if not budgets:
            return
        async with self._room_lock:
            for device, need, budget, claim in budgets:
                others = [e for e in self._entries.values() if e is not entry and e.engine.is_loaded and claim(e.spec)]
                plan = plan_room(need, budget, [
                    Holding(e.spec.name, claim(e.spec), e.last_used, e.admission.idle and not e.engine.is_busy)
                    for e in others
                ])
                if not plan.fits:
                    raise ModelUnavailable(
                        f'{device} memory: "{entry.spec.name}" needs {need} MB, {plan.free_after} MB can be freed '
                        "and the models holding the rest are busy"
                    )
                for name in plan.victims:
                    log.info("unloading %s to make room for %s on %s", name, entry.spec.name, device)
                    await self._entries[name].engine.stop(f"making room on {device} for {entry.spec.name}")

    def _deadline(self, request: GenerationRequest) -> float:
        if request.deadline is None:
            request.deadline = request.arrived_at + self.settings.request_deadline_s
        return request.deadline

    def _timed_out(self) -> RequestTimedOut:
        return RequestTimedOut(f"request did not finish within its deadline of {self.settings.request_deadline_s:.0f}s")

    def _check_input(self, texts: list[str], *, prompt: bool = True) -> None:
        """Text from a client, checked before anything reaches an engine: valid Unicode (JSON can
        carry a lone surrogate, which no engine can encode) and, for a prompt, within
        max_prompt_chars."""
        chars = 0
        for text in texts:
            chars += len(text)
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise BadRequest(
                    f"invalid text: {exc.reason} at character {exc.start} ({text[exc.start]!r}); "
                    "send valid Unicode (a lone surrogate is not)"
                ) from None
        if prompt and chars > self.settings.max_prompt_chars:
            raise BadRequest(
                f"prompt too long: {chars} characters, the limit is {self.settings.max_prompt_chars} (max_prompt_chars)"
            )

    async def generate(
        self, name: str, request: GenerationRequest, keep_alive: Any = None
    ) -> AsyncIterator[Chunk | GenerationResult]:
        """The answer as it streams. The deadline bounds the wait for a slot and for the model;
        after the first chunk the consumer enforces it (`complete()` does, and the streaming
        response does), so that no timer is armed per chunk."""
        entry = self.entry(name)
        if entry.spec.embedding_model:
            raise BadRequest(
                f'"{entry.spec.name}" is an embedding model: it computes vectors (/api/embed, /v1/embeddings), not text'
            )
        keep_alive_s = self._keep_alive_for(entry, keep_alive)
        self._check_input([m.content for m in request.messages] + ([request.suffix] if request.suffix else [])
                          + client_texts(request))
        self._check_input(list(request.options.stop), prompt=False)
        metrics = entry.metrics
        deadline = self._deadline(request)
        want_thinking = request.think if request.think is not None else entry.spec.include_thinking
        metrics.request_queued()
        events = entry.events
        events.publish("request", request_id=request.id, phase="queued")
        entry.publish_queue(arriving=True)
        if request.status_events and entry.would_wait():
            ahead = entry.admission.queue_length + entry.admission.running
            yield StatusNote("queued", f"Waiting: {ahead} request(s) ahead", {"ahead": ahead})
        queued = True
        finished_reason = "abort"
        result: GenerationResult | None = None
        try:
            async with entry.admission.slot(request.id, deadline, request.priority) as waited:
                queued = False
                metrics.request_dequeued(waited)
                metrics.request_started()
                events.publish("request", request_id=request.id, phase="started", queued_s=round(waited, 3))
                entry.publish_queue()
                relayed_tokens = 0
                try:
                    await self._make_room(entry, deadline)
                    if request.status_events:
                        load_seconds = 0.0
                        async for note in self._wait_ready_with_notes(entry, deadline):
                            if isinstance(note, float):
                                load_seconds = note
                            else:
                                yield note
                        yield StatusNote("generating", "Generating…")
                    else:
                        load_seconds = await entry.engine.wait_ready(deadline)
                    first_at = last_at = None
                    async with closing_stream(answer_stream(request, entry.engine.generate)) as stream:
                        async for item in stream:
                            now = time.monotonic()
                            if isinstance(item, GenerationResult):
                                result = item
                                item.load_duration = load_seconds
                                item.queue_duration = waited
                                item.total_duration = now - request.arrived_at
                                finished_reason = item.finish_reason
                                if item.eval_duration > 0 and item.completion_tokens:
                                    metrics.runner_speed(item.runner_tokens_per_second, item.completion_tokens / item.eval_duration)
                                if request.status_events:
                                    yield StatusNote("done", "Done", {"finish_reason": item.finish_reason})
                                yield item
                                break
                            relayed_tokens += item.tokens
                            if not want_thinking and item.thinking:
                                if not item.content:
                                    continue
                                item = Chunk(content=item.content)
                            if first_at is None:
                                metrics.first_token(now - request.arrived_at)
                                first_at = now
                            else:
                                metrics.inter_token(now - last_at)
                            last_at = now
                            yield item
                except EngineError:
                    finished_reason = "error"
                    raise
                finally:
                    # An answer cut short (error, client gone) still used the card: count what it read and wrote.
                    prompt_tokens = result.prompt_tokens if result else request.prompt_tokens
                    completion_tokens = result.completion_tokens if result else relayed_tokens
                    seconds = time.monotonic() - request.arrived_at
                    metrics.request_finished(finished_reason, prompt_tokens, completion_tokens, seconds)
                    speed = (completion_tokens / result.eval_duration
                             if result is not None and result.eval_duration > 0 else None)
                    events.publish("request", request_id=request.id, phase="finished", reason=finished_reason,
                                   prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                   seconds=round(seconds, 3),
                                   tokens_per_second=None if speed is None else round(speed, 2))
                    self._touch(entry, keep_alive_s)
                    if keep_alive_s == 0 and self._tg is not None:
                        self._tg.start_soon(self._unload_when_idle, entry)
        except EngineError as exc:
            if queued:  # refused by the queue (full, or its deadline passed while waiting)
                metrics.request_dequeued(None)
                events.publish("request", request_id=request.id, phase="refused", reason=str(exc))
                queued = False
            raise
        finally:
            if queued:  # the client left while waiting in the queue
                metrics.request_dequeued(None)
                events.publish("request", request_id=request.id, phase="left_queue")
            entry.publish_queue()

    async def _wait_ready_with_notes(self, entry: ModelEntry, deadline: float) -> AsyncIterator[StatusNote | float]:
        """`engine.wait_ready`, telling the load as it goes: `loading` notes with the progress the
        engine publishes, then `loaded`; last, the seconds loaded for this request (a float).
        The wait runs as a task of its own so that the notes flow while it waits."""
        engine = entry.engine
        if engine.state in SERVING_STATES:
            yield await engine.wait_ready(deadline)
            return
        assert self._tg is not None
        outcome: dict[str, Any] = {}
        finished = anyio.Event()
        scope = anyio.CancelScope()

        async def wait() -> None:
            with scope:
                try:
                    outcome["seconds"] = await engine.wait_ready(deadline)
                except Exception as exc:  # raised in the request's own task below
                    outcome["error"] = exc
            finished.set()

        position = self.events.last_id
        self._tg.start_soon(wait)
        try:
            yield StatusNote("loading", "Loading…", {"state": engine.state})
            while not finished.is_set():
                with anyio.move_on_after(0.1):  # a load takes seconds: ten looks a second are plenty
                    await finished.wait()
                found, _ = self.events.read(position, entry.spec.name, ("progress",))
                position = self.events.last_id
                for event in found:
                    yield StatusNote("loading", str(event.data.get("message") or "Loading…"), {"progress": event.data})
        finally:
            scope.cancel()  # the client went away: stop waiting (the load itself goes on)
        if "error" in outcome:
            raise outcome["error"]
        info = engine.info()
        device = info.get("device") or ("npu" if entry.spec.engine == "ax-runner" else None)
        seconds = outcome.get("seconds", 0.0)
        yield StatusNote("loaded", f"Model loaded on {device}" if device else "Model loaded",
                         {"load_duration": round(seconds, 3), "device": device})
        yield seconds

    async def complete(self, name: str, request: GenerationRequest, keep_alive: Any = None) -> Completion:
        """The whole answer, within the request's deadline."""
        content: list[str] = []
        thinking: list[str] = []
        calls: list[ToolCall] = []
        deadline = self._deadline(request)
        try:
            with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                async with closing_stream(self.generate(name, request, keep_alive)) as stream:
                    async for item in stream:
                        if isinstance(item, Chunk):
                            content.append(item.content)
                            thinking.append(item.thinking)
                            calls.extend(item.tool_calls)
                        else:
                            return Completion("".join(content), "".join(thinking), item, tuple(calls))
        except TimeoutError:
            raise self._timed_out() from None
        raise EngineError("the answer ended without its final record")

    async def embed(
        self, name: str, inputs: list[str], request_id: str, options: EmbedOptions = EmbedOptions(), keep_alive: Any = None,
        priority: str = "interactive", deadline: float | None = None,
    ) -> Embeddings:
        """Vectors for `inputs`, admitted, loaded, limited and counted like a generation;
        `deadline` (monotonic) replaces arrival + request_deadline_s (a batch item's)."""
        entry = self.entry(name)
        self._check_input(inputs)
        keep_alive_s = self._keep_alive_for(entry, keep_alive)
        arrived = time.monotonic()
        deadline = deadline or arrived + self.settings.request_deadline_s
        metrics = entry.metrics
        metrics.request_queued()
        queued = True
        reason, tokens = "abort", 0
        try:
            with anyio.fail_after(max(0.0, deadline - arrived)):
                async with entry.admission.slot(request_id, deadline, priority) as waited:
                    queued = False
                    metrics.request_dequeued(waited)
                    metrics.request_started()
                    try:
                        await self._make_room(entry, deadline)
                        load_duration = await entry.engine.wait_ready(deadline)
                        embeddings = await entry.engine.embed(inputs, options)
                        reason, tokens = "stop", embeddings.prompt_tokens
                        embeddings.load_duration = load_duration
                        embeddings.total_duration = time.monotonic() - arrived
                        return embeddings
                    except EngineError:
                        reason = "error"
                        raise
                    finally:
                        metrics.request_finished(reason, tokens, 0, time.monotonic() - arrived)
                        self._touch(entry, keep_alive_s)
                        if keep_alive_s == 0 and self._tg is not None:
                            self._tg.start_soon(self._unload_when_idle, entry)
        except TimeoutError:
            raise self._timed_out() from None
        finally:
            if queued:
                metrics.request_dequeued(None)

    async def _unload_when_idle(self, entry: ModelEntry) -> None:
        if entry.admission.idle:
            await entry.engine.stop("keep_alive 0")

    # ---- status -----------------------------------------------------------------------------

    def model_status(self, name: str) -> dict[str, Any]:
        entry = self.entry(name)
        status = entry.engine.status()
        status["queue"] = entry.admission.snapshot()
        if entry.waiting_for:
            status["waiting_for"] = entry.waiting_for
        status["run_on_startup"] = entry.spec.run_on_startup
        status["aliases"] = list(entry.spec.aliases)
        status["npu_memory_mb"] = entry.spec.npu_memory_mb
        if entry.spec.gpu_memory_mb is not None:
            status["gpu_memory_mb"] = entry.spec.gpu_memory_mb
            status["gpu_device"] = entry.spec.gpu_device
        status["expires_at"] = (
            None
            if entry.expires_at is None or not entry.engine.is_loaded
            else rfc3339_in(entry.expires_at - time.monotonic())
        )
        return status

    def model_info(self, name: str) -> dict[str, Any]:
        """What the model is, whether it is loaded, and where (GET /api/models/{name})."""
        entry = self.entry(name)
        info = entry.engine.info()
        spec = entry.spec
        if info.get("device") is None:
            info["device"] = "npu" if spec.npu_memory_mb is not None or spec.engine == "ax-runner" else None
        info["memory_mb"] = {"npu": spec.npu_memory_mb, "gpu": spec.gpu_memory_mb, "gpu_device": spec.gpu_device}
        info["keep_alive_expires_at"] = self.model_status(name)["expires_at"]
        return info

    def status(self) -> dict[str, Any]:
        models = [self.model_status(name) for name in self._entries]
        for model in models:  # the overview stays small; /api/status/{model} has more
            model["history"] = model.get("history", [])[-5:]
        models += [{"name": name, "state": "disabled", "last_error": {"reason": error}} for name, error in self.disabled.items()]
        return {
            "models": models,
            "descriptor": {
                "path": str(self.settings.descriptor),
                "error": self.descriptor_error,
                "warnings": self.descriptor_warnings,
                "found": self.found,
            },
            "metrics": {"dir": None if self.metrics.metrics_dir is None else str(self.metrics.metrics_dir),
                        "problems": self.metrics.problems()},
        }

    def model_readiness(self, name: str) -> dict[str, Any]:
        """One model's health and readiness (GET /health/{model}, /ready/{model})."""
        entry = self.entry(name)
        queue = entry.admission
        healthy, ready, why = model_verdict(entry.engine.state, queue.queue_length, queue.max_queue)
        return {"model": entry.spec.name, "healthy": healthy, "ready": ready, "state": entry.engine.state,
                "reason": why, "queue": {"waiting": queue.queue_length, "running": queue.running,
                                         "max": queue.max_queue}}

    def readiness(self) -> tuple[bool, list[str], list[str]]:
        """Ready when every run_on_startup model serves and none is failed; and what is wrong
        without stopping the service (metric files that cannot be written)."""
        problems = []
        for name, entry in self._entries.items():
            state = entry.engine.state
            if state == "failed":
                problems.append(f"{name}: failed")
            elif entry.spec.run_on_startup and state not in SERVING_STATES:
                problems.append(f"{name}: {state}")
        return not problems, problems, self.metrics.problems()


def cards_of(spec: ModelSpec) -> tuple[int, ...]:
    """The cards a model's runners use: its `devices` (replicas), else the first card."""
    return tuple(getattr(spec.config, "devices", ())) or (0,)


def tokenizer_port_of(spec: ModelSpec) -> tuple[str, int] | None:
    """The (host, port) of the tokenizer server a card model's folder starts, if it starts one."""
    config = spec.config
    port = getattr(config, "tokenizer_port", None)
    if port is None or not getattr(config, "tokenizer_py", None):
        return None
    return getattr(config, "tokenizer_ip", "127.0.0.1"), port


def model_verdict(state: str, waiting: int, max_queue: int) -> tuple[bool, bool, str]:
    """(healthy, ready, why) of one model, for routers in front of several daemons: healthy = it
    serves or can load (not failed); ready = it answers now without a load and its queue has room.
    Pure."""
    if state == "failed":
        return False, False, "failed: a restart is scheduled"
    if waiting >= max_queue:
        return True, False, f"queue full ({waiting} waiting)"
    if state in SERVING_STATES:
        return True, True, f"{state}, {waiting} waiting"
    if state in ("stopped", "stopping"):
        return True, False, f"{state}: loads on the next request"
    return True, False, f"loading ({state})"


class closing_stream:
    """`async with` for an answer stream: closed on the way out even when the consumer leaves
    (the engine cancels the generation on its backend at once, not when the GC gets to it)."""

    def __init__(self, stream: AsyncIterator[Any]) -> None:
        self._stream = stream

    async def __aenter__(self) -> AsyncIterator[Any]:
        return self._stream

    async def __aexit__(self, *exc_info: Any) -> None:
        with anyio.CancelScope(shield=True):
            await self._stream.aclose()  # type: ignore[attr-defined]
