"""HttpEngine: a model served by an OpenAI-compatible upstream (vLLM, llama.cpp, `axllm serve`, …).

The owner loop decides every state transition: it probes the upstream (`/health`, else
`/v1/models`) on start, while failed (with exponential back-off) and now and then while ready.
Requests never change the state; a request that cannot reach the upstream asks the owner for a
fresh probe. Answers are streamed from `/v1/chat/completions` and relayed chunk by chunk, over
kept-alive connections (each answer is read to its end, so its connection goes back to the pool).

The upstream is spoken to with aiohttp, not httpx: a streamed request costs about a quarter of the
CPU (0.2 ms instead of 0.85 ms here, bench/README.md), which is most of the daemon's share of the
first token on this path.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shlex
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import anyio
from pydantic import Field, field_validator

from ..descriptor import EngineConfig, FieldError
from ..states import RunnerState
from ..thinking import ThinkSplitter
from ..structured.output import upstream_response_format
from ..tool_calls import call_from
from ..tools import upstream_messages, upstream_tool_choice
from .base import (
    BadRequest,
    Chunk,
    EmbedOptions,
    Embeddings,
    Engine,
    EngineCapabilities,
    EngineContext,
    EngineError,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    ModelUnavailable,
    PromptFormat,
    RequestTimedOut,
    ToolCall,
)
from .upstream_process import Holder, LaunchSpec, ManagedProcess, progress_in_line

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL


def _load_aiohttp() -> None:
    """Import aiohttp (and its yarl) with the first HTTP engine: a daemon serving only the card
    never loads them (8 MB of RSS, 80 ms of start-up). This module's code runs only for an engine."""
    global aiohttp, URL
    import aiohttp
    from yarl import URL

log = logging.getLogger(__name__)
S = RunnerState

_PROBE_TIMEOUT_S = 5.0
_MIN_PROBE_INTERVAL_S = 0.05  # back-off settings may be 0; never probe in a tight loop
# How long a failed probe of a managed upstream waits for the process's exit to be seen.
_EXIT_GRACE_S = 1.0
_ERROR_BODY_LIMIT = 2000  # characters of an upstream's error body worth quoting
_FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# After [DONE], how long the rest of the body may take before the connection is given up.
_DRAIN_TIMEOUT_S = 1.0
# How often a managed upstream that is coming up is probed (it is known to be on its way).
_LAUNCH_PROBE_INTERVAL_S = 0.2


class HttpConfig(EngineConfig):
    """The descriptor fields of a model served by an OpenAI-compatible upstream.

    Either `base_url` (a server someone else runs) or `command` (a server the daemon launches,
    supervises and stops: a managed upstream, upstream_process.py)."""

    base_url: str | None = None
    upstream_model: str | None = None  # the upstream's name of the model; default: the model's name
    api_key_env: str | None = None  # the NAME of the variable holding the key, never the key
    max_concurrency: int = Field(default=1, ge=1)
    request_timeout_s: float = Field(default=300.0, gt=0)
    retries: int = Field(default=2, ge=0)
    # A managed upstream: argv ("{port}" is filled in; "axm1-llm" is this daemon's own program),
    # more environment, its working folder (relative to the descriptor's), the port it listens
    # on (unset: a free one per launch), and the path that answers 200 once it can serve.
    command: tuple[str, ...] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    health_path: str | None = None

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("command", mode="before")
    @classmethod
    def _command(cls, value: Any) -> Any:
        if isinstance(value, str):  # the descriptor's flat string form: split as a shell would
            value = shlex.split(value)
        if value is not None and (not value or not all(isinstance(part, str) and part for part in value)):
            raise ValueError("must be a non-empty list of arguments (or one command line)")
        return value

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, value: Any) -> Any:
        if isinstance(value, str):  # the flat form: a JSON object in a string
            value = json.loads(value) if value.strip() else {}
        if isinstance(value, dict):
            bad = [name for name in value if not isinstance(name, str) or not _ENV_NAME.fullmatch(name)]
            if bad:
                raise ValueError(f"not environment variable names: {bad}")
            if any(name.startswith("AXM1_") for name in value):
                raise ValueError("AXM1_* variables are the daemon's own and never reach a child")
            return {name: str(v) for name, v in value.items()}
        return value

    @field_validator("health_path")
    @classmethod
    def _health_path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError('must be a path starting with "/", e.g. "/health"')
        return value

    @field_validator("api_key_env")
    @classmethod
    def _api_key_env(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.fullmatch(value):
            raise ValueError("must be the name of an environment variable (the key itself never goes in the file)")
        return value

    def resolved(self, base_dir, model_name: str) -> HttpConfig:
        if self.command is None:
            if self.base_url is None:
                raise FieldError("base_url", "missing: give base_url (a running server) or command (a server the daemon launches)")
            for name in ("env", "cwd", "port"):
                if name in self.model_fields_set:
                    raise FieldError(name, "only used with command (a server the daemon launches)")
        elif self.base_url is not None:
            raise FieldError("base_url", "give base_url or command, not both: a launched server is reached on 127.0.0.1:port")
        update: dict[str, Any] = {"upstream_model": self.upstream_model or model_name}
        if self.command is not None:
            cwd = (Path(base_dir) / (self.cwd or ".")).resolve()
            if not cwd.is_dir():
                raise FieldError("cwd", f"{cwd} is not a folder")
            update["cwd"] = str(cwd)
        return self.model_copy(update=update)

    def launch_spec(self, passthrough: tuple[str, ...] = ()) -> LaunchSpec | None:
        if self.command is None:
            return None
        return LaunchSpec(self.command, tuple(sorted(self.env.items())), self.cwd or ".", self.port, passthrough)


def _api_root(base_url: str) -> str:
    """The server root: users often paste an OpenAI-style base URL that already ends in /v1."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def upstream_error_message(text: str, reason: str = "") -> str:
    """The message inside an upstream's error answer (its body), whichever envelope it uses."""
    text = text[:_ERROR_BODY_LIMIT]
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip() or reason
    if isinstance(body, dict):
        error = body.get("error", body.get("detail"))
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if error is not None:
            return error if isinstance(error, str) else json.dumps(error)
    return text


async def _body_text(response: aiohttp.ClientResponse) -> str:
    return (await response.read()).decode("utf-8", "replace")


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError))


@dataclass(slots=True)
class _ProbeOutcome:
    kind: Literal["ready", "loading", "down"]
    detail: str


class _MalformedChunk(ValueError):
    pass


def _delta_parts(choice: Any) -> tuple[str, str, str | None]:
    """(reasoning, content, finish_reason) of one streamed choice; raises _MalformedChunk."""
    if not isinstance(choice, dict):
        raise _MalformedChunk("a choice is not an object")
    delta = choice.get("delta") or {}
    if not isinstance(delta, dict):
        raise _MalformedChunk("delta is not an object")
    # Servers name reasoning differently; some (this daemon included) send both with one text.
    reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
    content = delta.get("content") or choice.get("text") or ""  # /v1/completions chunks carry `text`
    finish = choice.get("finish_reason")
    if not isinstance(reasoning, str) or not isinstance(content, str):
        raise _MalformedChunk("delta text is not a string")
    if finish is not None and not isinstance(finish, str):
        raise _MalformedChunk("finish_reason is not a string")
    return reasoning, content, finish


class _CallDeltas:
    """An upstream's streamed `tool_calls` deltas, gathered by index until the answer ends:
    the first delta of a call brings its id and name, the next ones pieces of its arguments."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}

    def add(self, deltas: Any) -> None:
        if not isinstance(deltas, list):
            raise _MalformedChunk("tool_calls is not a list")
        for position, delta in enumerate(deltas):
            if not isinstance(delta, dict):
                raise _MalformedChunk("a tool call delta is not an object")
            index = delta.get("index", position)
            function = delta.get("function") or {}
            if not isinstance(index, int) or not isinstance(function, dict):
                raise _MalformedChunk("a tool call delta has no index or function")
            call = self._calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            if isinstance(delta.get("id"), str):
                call["id"] = delta["id"]
            if isinstance(function.get("name"), str):
                call["name"] += function["name"]
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                call["arguments"] += arguments
            elif isinstance(arguments, dict):  # some servers send the object itself
                call["arguments"] = json.dumps(arguments)

    def take(self) -> tuple[list[ToolCall], list[str]]:
        """The gathered calls, and the text of any that is not a valid call (returned as text)."""
        calls, broken = [], []
        for _, call in sorted(self._calls.items()):
            parsed = call_from({"id": call["id"], "name": call["name"], "arguments": call["arguments"] or "{}"}, tagged=True)
            if parsed is None:
                broken.append(call)
            else:
                calls.append(parsed)
        self._calls = {}
        return calls, [f'<tool_call>{{"name": {json.dumps(c["name"])}, "arguments": {c["arguments"]}}}</tool_call>'
                       for c in broken]


class HttpEngine(Engine, Holder):
    kind = "openai-http"
    config_class = HttpConfig

    def __init__(self, spec, context: EngineContext) -> None:
        _load_aiohttp()
        super().__init__(spec, context)
        self.config: HttpConfig = spec.config
        self.upstream_model = self.config.upstream_model or spec.name
        self.capabilities = EngineCapabilities(
            chat_history=True,
            embeddings=False,  # learned when the upstream becomes ready
            per_request_sampling=True,
            max_concurrency=self.config.max_concurrency,
        )
        self._probes_done = 0
        self._session: aiohttp.ClientSession | None = None
        self._session_generation = 0  # tells a probe's result from one of an earlier session
        self._probing = False
        self._next_probe_at = math.inf
        self._backoff = self.settings.backoff_min_s
        self._in_flight = 0
        self._recoveries = 0
        self._upstream_info: dict[str, Any] | None = None  # a worker's GET /info, when it has one
        # A managed upstream: the process, which launch of it we watch, and the load's clock.
        self._managed: ManagedProcess | None = None
        launch = self.config.launch_spec(tuple(self.settings.child_env))
        if launch is not None:
            if context.processes is None:
                raise EngineError(f'model "{spec.name}": managed upstreams need the daemon\'s process registry')
            self._managed = context.processes.get(launch)
            self._managed.hold(self)
        self._launch_generation = 0
        self._launched_at = 0.0
        self._last_progress_at = 0.0
        self._progress: float | None = None
        self._restarts = 0
        self._last_loading_detail: str | None = None
        self._embeddings_refused = "no answer yet"  # why the upstream does not embed, once asked
        self._set_base_url(self.config.base_url or "http://127.0.0.1:0")

    def _set_base_url(self, url: str) -> None:
        self.base_url = _api_root(url)
        root = URL(self.base_url)
        self._urls = {name: root / "v1" / name for name in ("chat/completions", "completions", "embeddings", "models")}
        self._urls["health"] = root / "health"
        self._urls["info"] = root / "info"
        if self.config.health_path:
            self._urls["health"] = root.with_path(self.config.health_path)

    # ---- what a managed upstream tells us (called from its relay and exit watchers) --------------

    def on_line(self, line: str) -> None:
        self.logs.append(line)
        if self._machine.state in (S.STARTING, S.INITIALIZING):
            self._last_progress_at = time.monotonic()  # any output while loading is a sign of progress
            percent = progress_in_line(line)
            if percent is not None:
                self._progress = percent
                self.events.publish("progress", percent=percent, message=line)

    def on_exit(self, generation: int, description: str) -> None:
        self._post(("exited", (generation, description)))

    # ---- Engine interface -------------------------------------------------------------------

    async def start(self) -> None:
        self._post(("start", None))

    async def wait_ready(self, deadline: float | None) -> float:
        began = time.monotonic()
        probes_seen = self._probes_done
        waited_for_load = False
        while True:
            changed = self._state_changed
            state = self._machine.state
            if state is S.READY:
                return time.monotonic() - began if waited_for_load else 0.0
            if state is S.FAILED:
                if self._probes_done > probes_seen:
                    raise ModelUnavailable(self._failure_message())
                # A fresh look, not a stale verdict: the upstream may be back already.
                self._post(("probe", None))
            elif state in (S.STOPPED, S.STOPPING):
                self._post(("start", None))
            else:
                waited_for_load = True
            remaining = math.inf if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimedOut(
                    f'model "{self.spec.name}" was not ready before the request deadline (state {state})'
                )
            with anyio.move_on_after(remaining):
                await changed.wait()

    async def stop(self, reason: str) -> None:
        done = anyio.Event()
        self._post(("stop", (reason, done)))
        await done.wait()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk | GenerationResult]:
        body = self._chat_body(request)
        url = self._urls["chat/completions"]
        if request.raw or request.suffix:
            # Raw prompts and fill-in-the-middle: the upstream's /v1/completions, which applies
            # no chat template; the upstream decides whether it takes `suffix`.
            url = self._urls["completions"]
            del body["messages"]
            body["prompt"] = request.messages[-1].content
            if request.suffix:
                body["suffix"] = request.suffix
        warnings = [] if request.options.num_ctx is None else ["num_ctx: the upstream server fixes its context size"]
        began = time.monotonic()
        self._in_flight += 1
        try:
            for attempt in range(self.config.retries + 1):
                relayed: list[float] = []  # monotonic time of each relayed chunk
                try:
                    # aclosing: when our consumer leaves, the upstream connection closes now, not at GC.
                    async with aclosing(self._stream_chat(url, body, relayed)) as stream:
                        async for item in stream:
                            if isinstance(item, GenerationResult):
                                self._measure(item, began, relayed, warnings)
                            yield item
                    return
                except aiohttp.ConnectionTimeoutError as exc:
                    failure: Exception = exc
                except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                    if _is_timeout(exc):
                        raise RequestTimedOut(
                            f"upstream {self.base_url} sent nothing for {self.config.request_timeout_s:g}s ({type(exc).__name__})"
                        ) from None
                    failure = exc
                except ValueError as exc:  # aiohttp: a line longer than its buffer ("Chunk too big")
                    raise EngineError(f"upstream {self.base_url} sent a stream the daemon cannot read: {exc}", status_code=502) from None
                if relayed:  # half an answer was sent: retrying would repeat it
                    self._request_probe()
                    raise EngineError(
                        f"lost the connection to upstream {self.base_url} in mid-answer: {failure!r}",
                        status_code=502,
                    )
                if attempt < self.config.retries:
                    await anyio.sleep(min(self.settings.backoff_min_s * 2**attempt, self.settings.backoff_max_s))
            self._request_probe()
            raise ModelUnavailable(
                f"upstream {self.base_url} unreachable after {self.config.retries + 1} attempt(s): {failure!r}"
            )
        finally:
            self._in_flight -= 1

    async def embed(self, inputs: list[str], options: EmbedOptions = EmbedOptions()) -> Embeddings:
        if not self.capabilities.embeddings:
            raise BadRequest(
                f'model "{self.spec.name}" does not serve embeddings: its upstream answered a test of '
                f'/v1/embeddings for model "{self.upstream_model}" with {self._embeddings_refused}'
            )
        session = self._require_session()
        body: dict[str, Any] = {"model": self.upstream_model, "input": inputs}
        if options.dimensions is not None:
            body["dimensions"] = options.dimensions  # OpenAI's field; vLLM and our worker take it
        if not options.truncate:
            body["truncate"] = False  # our worker refuses a long input then; others say what they do
        for attempt in range(self.config.retries + 1):
            try:
                async with session.post(self._urls["embeddings"], json=body) as response:
                    text = await _body_text(response)
                    status, reason = response.status, response.reason or ""
                break
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                if attempt == self.config.retries:
                    self._request_probe()
                    raise ModelUnavailable(
                        f"upstream {self.base_url} unreachable after {attempt + 1} attempt(s): {exc!r}"
                    ) from None
                await anyio.sleep(min(self.settings.backoff_min_s * 2**attempt, self.settings.backoff_max_s))
            except (aiohttp.ClientError, TimeoutError) as exc:
                if _is_timeout(exc):
                    raise RequestTimedOut(f"upstream {self.base_url} did not answer within {self.config.request_timeout_s:g}s") from None
                raise EngineError(f"upstream {self.base_url} failed: {exc!r}", status_code=502) from None
        if status != 200:
            raise self._answer_error(status, text, reason)
        try:
            answer = json.loads(text)
            rows = sorted(answer["data"], key=lambda row: row["index"])
            vectors = [[float(x) for x in row["embedding"]] for row in rows]
            prompt_tokens = int((answer.get("usage") or {}).get("prompt_tokens") or 0)
            warnings = [str(w) for w in answer.get("warnings") or []]
        except (ValueError, KeyError, TypeError) as exc:
            raise EngineError(f"upstream {self.base_url} sent a malformed embeddings answer: {exc!r}", status_code=502) from None
        if len(vectors) != len(inputs):
            raise EngineError(f"upstream {self.base_url} sent {len(vectors)} embeddings for {len(inputs)} inputs", status_code=502)
        if options.dimensions is not None and any(len(v) != options.dimensions for v in vectors):
            raise EngineError(f"upstream {self.base_url} did not apply dimensions={options.dimensions}", status_code=502)
        return Embeddings(vectors, prompt_tokens, warnings)

    async def prompt_format(self) -> PromptFormat:
        # raw through /v1/completions; the template (and so tools) is the upstream's own: tools
        # and tool_choice are passed on, and calls it writes as text are recognised too.
        return PromptFormat(raw=True, tools=True)

    def status(self) -> dict[str, Any]:
        status = super().status()
        status.update(
            upstream={"base_url": self.base_url, "model": self.upstream_model},
            in_flight=self._in_flight,
            capabilities=dataclasses.asdict(self.capabilities),
            recoveries=self._recoveries,
        )
        if self._managed is not None:
            status["managed"] = {
                "command": list(self._managed.spec.command),
                "pid": self._managed.pid if self._managed.running else None,
                "port": self._managed.port,
                "launches": self._managed.launches,
                "restarts": self._restarts,
            }
            if self._machine.state in (S.STARTING, S.INITIALIZING):
                status["progress"] = {"percent": self._progress, "message": (self.logs.tail(1) or [""])[0]}
        return status

    def info(self) -> dict[str, Any]:
        info = super().info()
        upstream = self._upstream_info or {}
        info.update(
            device=upstream.get("device"),
            base_model=upstream.get("base_model"),
            adapter=(upstream.get("adapters") or {}).get(self.upstream_model) and self.upstream_model,
            upstream={"base_url": self.base_url, "model": self.upstream_model, "managed": self._managed is not None,
                      "info": self._upstream_info},
        )
        return info

    # ---- the owner loop ---------------------------------------------------------------------

    async def _handle(self, message: tuple[str, Any]) -> None:
        kind, payload = message
        if kind == "start" and self._machine.state is S.STOPPED:
            self._open_session()
            self._set_state(S.STARTING, "start requested")
            if self._managed is not None:
                await self._launch()
            else:
                self._begin_probe()
        elif kind == "probe" and self._machine.state not in (S.STOPPED, S.STOPPING):
            if self._managed is not None and self._machine.state is S.FAILED and not self._managed.running:
                await self._relaunch("brought forward by a request")
            else:
                self._begin_probe()
        elif kind == "probed":
            await self._on_probed(*payload)
        elif kind == "exited":
            self._on_exited(*payload)
        elif kind == "stop":
            reason, done = payload
            await self._stop_now(reason)
            done.set()

    def _next_timer_at(self) -> float | None:
        return None if self._next_probe_at == math.inf else self._next_probe_at

    async def _on_timers(self) -> None:
        if self._managed is not None and self._machine.state is S.FAILED and not self._managed.running:
            await self._relaunch("restart after back-off")
        else:
            self._begin_probe(periodic=True)

    async def _recover(self, error: Exception) -> None:
        self._probing = False
        self._record_error(f"internal error in the engine: {error!r}")
        if self._machine.can(S.FAILED):
            self._set_state(S.FAILED, self.last_error["reason"])
        self._next_probe_at = time.monotonic() + max(self._backoff, _MIN_PROBE_INTERVAL_S)
        self._backoff = min(self._backoff * 2, self.settings.backoff_max_s)
        self._notify()

    async def _on_shutdown(self) -> None:
        await self._close_session()

    def _request_probe(self) -> None:
        self._post(("probe", None))

    async def _stop_now(self, reason: str) -> None:
        if self._machine.state is S.STOPPED:
            return
        self._set_state(S.STOPPING, reason)
        await self._close_session()
        self._next_probe_at = math.inf
        if self._managed is not None:
            self._launch_generation = 0  # its exit is the stop's, not a crash
            await self._managed.release(self)  # the last holder out stops the process
            self._progress = None
        self._set_state(S.STOPPED, reason)

    # ---- a managed upstream's launches ------------------------------------------------------------

    async def _launch(self) -> None:
        assert self._managed is not None
        self._managed.hold(self)
        try:
            self._launch_generation = await self._managed.ensure_running()
        except OSError as exc:
            self._launch_failed(f"cannot start the upstream's command {self._managed.spec.command[0]!r}: {exc}")
            return
        self._set_base_url(self._managed.base_url)
        self._launched_at = self._last_progress_at = time.monotonic()
        self._progress = None
        self._begin_probe()

    async def _relaunch(self, reason: str) -> None:
        self._restarts += 1
        self._set_state(S.STARTING, reason)
        await self._launch()

    def _on_exited(self, generation: int, description: str) -> None:
        if generation != self._launch_generation or self._machine.state in (S.STOPPED, S.STOPPING):
            return  # an earlier launch, or the end of our own stop
        loading = self._machine.state in (S.STARTING, S.INITIALIZING)
        self.metrics.restarted("crash_at_load" if loading else "crash")
        last = " | ".join(line for line in self.logs.tail(3) if not line.startswith("[axm1-llm]"))
        self._launch_failed(
            f"upstream process {description}{' while loading' if loading else ''}"
            + (f"; its last output: {last}" if last else "")
        )

    def _launch_failed(self, reason: str) -> None:
        """The launch is over (exit, no start, no progress): fail now, relaunch after back-off."""
        self._launch_generation = 0
        self._probes_done += 1  # a verdict for the requests waiting on this launch
        self._probing = False
        self._fail(reason)
        self._next_probe_at = time.monotonic() + max(self._backoff, _MIN_PROBE_INTERVAL_S)
        self._backoff = min(self._backoff * 2, self.settings.backoff_max_s)
        self._notify()

    def _load_overdue(self, now: float) -> str | None:
        """Why a managed upstream's load is given up (stall-based, with a cap), or None."""
        if now - self._last_progress_at > self.settings.load_stall_timeout_s:
            return f"no output and no answer on {self._urls['health'].path} for {self.settings.load_stall_timeout_s:g}s"
        if now - self._launched_at > self.settings.load_timeout_cap_s:
            return f"not ready after {self.settings.load_timeout_cap_s:g}s (load_timeout_cap_s)"
        return None

    # ---- probes -------------------------------------------------------------------------------

    def _begin_probe(self, periodic: bool = False) -> None:
        """Probe the upstream in a child task (a slow upstream must not hold up a stop)."""
        if self._probing or self._session is None:
            return
        if periodic and self._machine.state is S.READY and self._in_flight:
            # An answer streaming right now is proof of life; a probe could queue behind it.
            self._next_probe_at = time.monotonic() + max(self.settings.backoff_max_s, _MIN_PROBE_INTERVAL_S)
            return
        self._probing = True
        self._next_probe_at = math.inf
        learn = self._machine.state is not S.READY
        self._start_task(self._probe_task, self._session_generation, learn)

    async def _probe_task(self, generation: int, learn: bool) -> None:
        outcome = await self._probe()
        if outcome.kind == "down" and self._managed is not None and self._machine.state not in (S.STARTING, S.INITIALIZING):
            # Our own process may just have died: let its exit, the real reason, be told first
            # (while it loads, refused connections are expected and the exit is not waited for).
            await self._managed.exited_within(_EXIT_GRACE_S)
        learned = await self._learn() if learn and outcome.kind == "ready" else None
        self._post(("probed", (generation, outcome, learned)))

    async def _on_probed(self, generation: int, outcome: _ProbeOutcome, learned: tuple[bool, dict | None] | None) -> None:
        if generation != self._session_generation:
            return  # stopped (and maybe started again) while it ran
        self._probing = False
        state = self._machine.state
        loading_managed = self._managed is not None and state in (S.STARTING, S.INITIALIZING)
        if self._managed is not None and self._launch_generation == 0:
            return  # the process is gone; its exit has decided
        if loading_managed and outcome.kind != "ready":
            # A server coming up: refused connections and 503s are expected; give up on a stall.
            now = time.monotonic()
            if outcome.kind == "loading":
                if state is S.STARTING:
                    self._set_state(S.INITIALIZING, outcome.detail)
                if outcome.detail != self._last_loading_detail:
                    self._last_progress_at = now
                self._last_loading_detail = outcome.detail
            overdue = self._load_overdue(now)
            if overdue is not None:
                self.metrics.restarted("load_timeout")
                self.logs.append(f"[axm1-llm] giving up the load: {overdue}")
                self._launch_generation = 0
                await self._managed.terminate()
                self._launch_failed(f"upstream did not become ready: {overdue}; last answer: {outcome.detail}")
                return
            self._next_probe_at = now + _LAUNCH_PROBE_INTERVAL_S
            self._notify()
            return
        self._probes_done += 1
        if outcome.kind == "ready":
            if state is S.FAILED:
                self._set_state(S.STARTING, "upstream answers again")
                self._recoveries += 1
            if self._machine.state is S.STARTING:
                self._set_state(S.INITIALIZING, outcome.detail)
            if self._machine.state is S.INITIALIZING:
                if learned is not None:
                    embeddings, info = learned
                    self.capabilities = dataclasses.replace(self.capabilities, embeddings=embeddings)
                    self._upstream_info = info
                if self._managed is not None:
                    self.metrics.load_finished(time.monotonic() - self._launched_at)
                    self._progress = None
                self._set_state(S.READY, outcome.detail)
            self._backoff = self.settings.backoff_min_s
            self._next_probe_at = time.monotonic() + max(self.settings.backoff_max_s, _MIN_PROBE_INTERVAL_S)
        else:
            if outcome.kind == "loading" and state is not S.READY:
                if state is S.FAILED:
                    self._set_state(S.STARTING, "upstream answers again")
                self._set_state(S.INITIALIZING, outcome.detail)
            else:
                self._fail(outcome.detail)
            self._next_probe_at = time.monotonic() + max(self._backoff, _MIN_PROBE_INTERVAL_S)
            self._backoff = min(self._backoff * 2, self.settings.backoff_max_s)
        self._notify()

    async def _probe(self) -> _ProbeOutcome:
        session = self._require_session()
        timeout = aiohttp.ClientTimeout(total=_PROBE_TIMEOUT_S)
        try:
            async with session.get(self._urls["health"], timeout=timeout) as health:
                health_status, health_text, health_reason = health.status, await _body_text(health), health.reason or ""
            if health_status == 200:
                return _ProbeOutcome("ready", f"GET {self._urls['health'].path} answered 200")
            path = self._urls["health"].path
            if health_status == 503:  # llama.cpp's answer while it loads its model
                return _ProbeOutcome("loading", f"GET {path} answered 503: {upstream_error_message(health_text, health_reason)}")
            if self.config.health_path:  # the entry named the path that tells: nothing else does
                return _ProbeOutcome("down", f"upstream {self.base_url}: GET {path} answered {health_status}: "
                                     f"{upstream_error_message(health_text, health_reason)}")
            # No /health (Ollama, OpenAI itself): the model list is the next best sign of life.
            async with session.get(self._urls["models"], timeout=timeout) as models:
                models_status, models_text, models_reason = models.status, await _body_text(models), models.reason or ""
            if models_status == 200:
                return _ProbeOutcome("ready", "GET /v1/models answered 200")
            return _ProbeOutcome(
                "down",
                f"upstream {self.base_url}: GET /health answered {health_status}, "
                f"GET /v1/models answered {models_status}: {upstream_error_message(models_text, models_reason)}",
            )
        except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:  # RuntimeError: session closed by a stop
            return _ProbeOutcome("down", f"upstream {self.base_url} unreachable: {exc!r}")

    async def _learn(self) -> tuple[bool, dict[str, Any] | None]:
        """What a ready upstream offers: embeddings, and its own description (our workers'
        GET /info: device, base model, adapters, memory) where it has one."""
        return await self._offers_embeddings(), await self._fetch_info()

    async def _fetch_info(self) -> dict[str, Any] | None:
        session = self._require_session()
        try:
            async with session.get(self._urls["info"], timeout=aiohttp.ClientTimeout(total=_PROBE_TIMEOUT_S)) as answer:
                if answer.status != 200:
                    return None
                info = json.loads(await _body_text(answer))
                return info if isinstance(info, dict) else None
        except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError):
            return None

    async def _offers_embeddings(self) -> bool:
        """Embeddings are offered only if the upstream actually computes one."""
        session = self._require_session()
        try:
            async with session.post(
                self._urls["embeddings"], json={"model": self.upstream_model, "input": ["ping"]},
                timeout=aiohttp.ClientTimeout(total=_PROBE_TIMEOUT_S),
            ) as answer:
                text = await _body_text(answer)
                if answer.status == 200 and json.loads(text).get("data"):
                    return True
                self._embeddings_refused = f"{answer.status}: {upstream_error_message(text, answer.reason or '')}"
                return False
        except (aiohttp.ClientError, TimeoutError, RuntimeError, ValueError, AttributeError) as exc:
            self._embeddings_refused = repr(exc)
            return False

    def _fail(self, reason: str) -> None:
        self._record_error(reason)
        self.logs.append(f"[axm1-llm] {reason}")
        if self._machine.state is not S.FAILED:
            self._set_state(S.FAILED, reason, retry_in_s=round(self._backoff, 3))

    def _failure_message(self) -> str:
        reason = (self.last_error or {}).get("reason", "upstream not ready")
        return f'model "{self.spec.name}" is unavailable: {reason}'

    def _open_session(self) -> None:
        headers = {}
        if self.config.api_key_env:
            key = os.environ.get(self.config.api_key_env)
            if key:
                headers["Authorization"] = f"Bearer {key}"
            else:
                log.warning("model %s: environment variable %s is not set", self.spec.name, self.config.api_key_env)
        timeout = self.config.request_timeout_s
        self._session_generation += 1
        self._probing = False
        self._session = aiohttp.ClientSession(
            headers=headers,
            # No total bound (the request's deadline is the daemon's); a silent upstream is a timeout.
            timeout=aiohttp.ClientTimeout(total=None, connect=min(timeout, 10.0), sock_read=timeout),
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),  # TCP_NODELAY is aiohttp's default
            raise_for_status=False,
            auto_decompress=True,
            # A relay has no use for an upstream's cookies; the default jar filters them on
            # every request (tens of microseconds on the way to the first token).
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise ModelUnavailable(f'model "{self.spec.name}" is stopped')
        return self._session

    # ---- one chat request -------------------------------------------------------------------

    def _chat_body(self, request: GenerationRequest) -> dict[str, Any]:
        options = request.options
        body: dict[str, Any] = {
            "model": self.upstream_model,
            "messages": upstream_messages(request.messages),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.tools:  # as sent: the upstream applies tools and tool_choice itself
            body["tools"] = request.tools
            if request.tool_choice.mode != "auto" or request.tool_choice.name:
                body["tool_choice"] = upstream_tool_choice(request.tool_choice)
        sampling = {
            "temperature": options.temperature,
            "top_p": options.top_p,
            "top_k": options.top_k,  # not OpenAI's, but vLLM's and llama.cpp's
            "seed": options.seed,
            "repeat_penalty": options.repeat_penalty,  # llama.cpp's name
            "max_tokens": options.num_predict if options.num_predict and options.num_predict > 0 else None,
            "stop": list(options.stop) or None,
        }
        body.update({key: value for key, value in sampling.items() if value is not None})
        if request.structured is not None:
            # vLLM and llama.cpp constrain their sampling with it; the answer is validated anyway.
            body["response_format"] = upstream_response_format(request.structured)
        return body

    async def _stream_chat(self, url: URL, body: dict[str, Any], relayed: list[float]) -> AsyncIterator[Chunk | GenerationResult]:
        """One attempt. Leaving early (consumer gone) closes the upstream connection at once."""
        session = self._require_session()
        async with session.post(url, json=body, headers={"Accept": "text/event-stream"}) as response:
            if response.status == 404 and url == self._urls["completions"]:
                raise BadRequest(f"raw prompts and suffix go to the upstream's /v1/completions; upstream {self.base_url} has none (404)")
            if response.status != 200:
                raise self._answer_error(response.status, await _body_text(response), response.reason or "")
            splitter = ThinkSplitter(starts_in_thinking=False)
            deltas = _CallDeltas()
            finish: str | None = None
            usage: dict[str, Any] | None = None
            done = False
            lines = aiter(response.content)
            async for raw in lines:
                if not raw.startswith(b"data:"):
                    continue  # blank separators, comments, event names
                data = raw[len(b"data:") :].strip().decode("utf-8", "replace")
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                    if not isinstance(chunk, dict):
                        raise _MalformedChunk("not an object")
                    if "error" in chunk:
                        raise EngineError(
                            f"upstream {self.base_url} reported an error: {_error_text(chunk['error'])}", status_code=502
                        )
                    usage = chunk.get("usage") or usage
                    choices = chunk.get("choices") or []
                    if not isinstance(choices, list):
                        raise _MalformedChunk("choices is not a list")
                    parts = [_delta_parts(choice) for choice in choices[:1]]
                    for choice in choices[:1]:
                        if (choice.get("delta") or {}).get("tool_calls") is not None:
                            deltas.add(choice["delta"]["tool_calls"])
                except (ValueError, _MalformedChunk) as exc:
                    raise EngineError(
                        f"upstream {self.base_url} sent a malformed stream chunk ({exc}): {data[:200]!r}",
                        status_code=502,
                    ) from None
                for reasoning, content, finish_reason in parts:
                    thinking, visible = splitter.feed(content) if content else ("", "")
                    if reasoning or thinking or visible:
                        relayed.append(time.monotonic())
                        # OpenAI-compatible servers send about one token per delta.
                        yield Chunk(content=visible, thinking=reasoning + thinking, tokens=1)
                    finish = finish_reason or finish
            if not done and finish is None:
                raise EngineError(f"upstream {self.base_url} ended the stream without finishing the answer", status_code=502)
            if done:
                # Read the body to its end (normally just the last chunk's terminator), so that
                # the connection goes back to the pool instead of being closed.
                with anyio.move_on_after(_DRAIN_TIMEOUT_S):
                    async for _ in lines:
                        pass
            thinking, visible = splitter.flush()
            if thinking or visible:
                relayed.append(time.monotonic())
                yield Chunk(content=visible, thinking=thinking)
            calls, broken = deltas.take()
            if calls or broken:
                relayed.append(time.monotonic())
                # A call that is not valid goes on as text: the tool stage warns about it.
                yield Chunk(content="".join(broken), tool_calls=tuple(calls))
            if finish == "error":
                raise EngineError(f"upstream {self.base_url} ended the answer with an error", status_code=502)
            yield _result(finish, usage, len(relayed))

    def _answer_error(self, status: int, text: str, reason: str) -> EngineError:
        message = f"upstream {self.base_url} answered {status}: {upstream_error_message(text, reason)}"
        if status in (400, 422):  # the client's request, as the upstream judged it
            return BadRequest(message)
        return EngineError(message, status_code=502)

    def _measure(self, result: GenerationResult, began: float, relayed: list[float], warnings: list[str]) -> None:
        now = time.monotonic()
        first = relayed[0] if relayed else now
        result.time_to_first_token = first - began if relayed else None
        result.prompt_eval_duration = first - began
        result.eval_duration = now - first
        result.total_duration = now - began
        result.warnings.extend(warnings)


def _error_text(error: Any) -> str:
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return error if isinstance(error, str) else json.dumps(error)


def _result(finish: str | None, usage: dict[str, Any] | None, relayed_chunks: int) -> GenerationResult:
    result = GenerationResult(finish_reason=_FINISH_REASONS.get(finish or "stop", "stop"))
    if isinstance(usage, dict):
        result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        result.completion_tokens = int(usage.get("completion_tokens") or 0)
    else:
        result.completion_tokens = relayed_chunks
        result.warnings.append("usage: the upstream reported no token counts; completion_tokens counts stream chunks")
    return result
