"""The tokenizer service (:8101): starts and supervises each model's tokenizer server.

    python -m tokenizer_service.service --host 127.0.0.1 --port 8101

Each server runs as `<python> <tokenizer_py> --host <host> --port <port>` in `tokenizer_path`, in a
process group of its own, so stopping it (SIGTERM to the group, SIGKILL after a grace) takes
anything it spawned too; on Linux the kernel also kills it if this service dies without cleaning
up. A server that exits is restarted with a growing back-off. A port already answered by a
tokenizer this service did not start (one run by hand) is reported as `external` and re-checked,
and ours is started when it goes away. Readiness is the caller's business: it probes the port.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from llm_service.children import child_environment, die_with_parent, owner_tag
from tokenizer_service.server import SESSION_IDLE_ENV
from tokenizer_service.settings import TokenizerServiceSettings

log = logging.getLogger("tokenizer_service")

LOG_TAIL_LINES = 50
STOP_GRACE_SECONDS = 5.0
# A server that ran this long before exiting was healthy: its next restart starts the back-off over.
STABLE_RUN_SECONDS = 60.0
EXTERNAL_RECHECK_SECONDS = 2.0
PROBE_TIMEOUT_SECONDS = 1.0
# Even with a zero back-off setting, a script that dies at once must not spin the CPU.
MIN_RESTART_DELAY_SECONDS = 0.1


class ServerState(StrEnum):
    STARTING = "starting"  # spawned; the caller probes the port for readiness
    BACKOFF = "backoff"  # exited; waiting before the next start
    EXTERNAL = "external"  # the port is served by a tokenizer we did not start
    STOPPED = "stopped"


class StartRequest(BaseModel):
    tokenizer_path: str
    tokenizer_py: str
    port: int
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class ServerSpec:
    """What to run for one model: a script confined to its folder, and where it listens."""

    folder: Path
    script: Path
    host: str
    port: int


class RefusedStart(Exception):
    pass


def confine_script(tokenizer_path: str, tokenizer_py: str) -> tuple[Path, Path]:
    """The folder and the script inside it, both resolved; refuse a script outside the folder."""
    folder = Path(tokenizer_path).resolve()
    if not folder.is_dir():
        raise RefusedStart(f"tokenizer_path is not a folder: {tokenizer_path}")
    script = (folder / tokenizer_py).resolve()
    if not script.is_relative_to(folder):
        raise RefusedStart(f"tokenizer_py {tokenizer_py!r} resolves outside tokenizer_path {tokenizer_path!r}")
    if not script.is_file():
        raise RefusedStart(f"tokenizer_py not found: {script}")
    return folder, script


async def probe_tokenizer(host: str, port: int) -> bool:
    """Does something answer HTTP with JSON on host:port, as every tokenizer server does?"""
    try:
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_SECONDS) as http:
            reply = await http.get(f"http://{host}:{port}/bos_id")
        return isinstance(reply.json(), dict)
    except (httpx.HTTPError, ValueError):
        return False


@dataclass
class ManagedServer:
    """One model's tokenizer server. Its state changes only in its own supervision task."""

    name: str
    spec: ServerSpec
    state: ServerState = ServerState.STARTING
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    last_exit: int | None = None
    log_tail: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_TAIL_LINES))
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    first_attempt_done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "port": self.spec.port,
            "pid": self.process.pid if self.process and self.process.returncode is None else None,
            "state": self.state.value,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "log_tail": list(self.log_tail),
        }


class TokenizerSupervisor:
    def __init__(
        self,
        python: str = sys.executable,
        session_idle_seconds: float | None = None,
        backoff_min_seconds: float = 1.0,
        backoff_max_seconds: float = 30.0,
        stop_grace_seconds: float = STOP_GRACE_SECONDS,
        owner: str = "",
        child_env: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.python = python
        self.session_idle_seconds = session_idle_seconds
        self.backoff_min_seconds = backoff_min_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.stop_grace_seconds = stop_grace_seconds
        self._servers: dict[str, ManagedServer] = {}
        self._lock = asyncio.Lock()  # serializes start/stop requests
        self.owner = owner or owner_tag(Path("data"))
        self.child_env = tuple(child_env)

    def snapshots(self) -> list[dict[str, Any]]:
        return [server.snapshot() for server in self._servers.values()]

    async def start(self, name: str, request: StartRequest) -> dict[str, Any]:
        folder, script = confine_script(request.tokenizer_path, request.tokenizer_py)
        spec = ServerSpec(folder, script, request.host, request.port)
        async with self._lock:
            current = self._servers.get(name)
            if current is not None and current.spec == spec and current.state != ServerState.STOPPED:
                return current.snapshot()
            for other in self._servers.values():
                same_port = (other.spec.host, other.spec.port) == (spec.host, spec.port)
                if other.name != name and same_port and other.state != ServerState.STOPPED:
                    raise RefusedStart(f"port {spec.port} is already used by tokenizer {other.name!r}")
            if current is not None:
                await self._stop(current)
            server = ManagedServer(name, spec)
            self._servers[name] = server
            server.task = asyncio.create_task(self._supervise(server), name=f"tokenizer {name}")
        # Spawning takes milliseconds; wait for it so the reply carries the pid.
        await server.first_attempt_done.wait()
        return server.snapshot()

    async def stop(self, name: str) -> dict[str, Any] | None:
        async with self._lock:
            server = self._servers.get(name)
            if server is None:
                return None
            await self._stop(server)
            return {"name": name, "state": server.state.value}

    async def stop_all(self) -> None:
        async with self._lock:
            await asyncio.gather(*(self._stop(server) for server in self._servers.values()))

    async def _stop(self, server: ManagedServer) -> None:
        server.stop_requested.set()
        if server.task is not None:
            await server.task

    async def _supervise(self, server: ManagedServer) -> None:
        backoff = self.backoff_min_seconds
        try:
            while not server.stop_requested.is_set():
                if await probe_tokenizer(server.spec.host, server.spec.port):
                    server.state = ServerState.EXTERNAL
                    server.first_attempt_done.set()
                    await self._sleep_unless_stopped(server, EXTERNAL_RECHECK_SECONDS)
                    continue
                started = time.monotonic()
                try:
                    await self._spawn(server)
                except OSError as exc:
                    server.log_tail.append(f"cannot start {server.spec.script}: {exc}")
                    server.last_exit = None
                else:
                    server.state = ServerState.STARTING
                    server.first_attempt_done.set()
                    await self._wait_exit_or_stop(server)
                    if server.stop_requested.is_set():
                        break
                    server.last_exit = server.process.returncode
                    log.warning("tokenizer %s exited with %s; restarting in %.1fs", server.name, server.last_exit, backoff)
                if time.monotonic() - started >= STABLE_RUN_SECONDS:
                    backoff = self.backoff_min_seconds
                server.state = ServerState.BACKOFF
                server.first_attempt_done.set()
                await self._sleep_unless_stopped(server, backoff)
                backoff = min(max(backoff * 2, MIN_RESTART_DELAY_SECONDS), self.backoff_max_seconds)
                server.restarts += 1
        finally:
            await self._terminate(server)
            server.state = ServerState.STOPPED
            server.first_attempt_done.set()

    async def _spawn(self, server: ManagedServer) -> None:
        spec = server.spec
        env = child_environment(self.owner, self.child_env)
        if self.session_idle_seconds is not None:
            env[SESSION_IDLE_ENV] = str(self.session_idle_seconds)
        server.process = await asyncio.create_subprocess_exec(
            self.python, str(spec.script), "--host", spec.host, "--port", str(spec.port),
            cwd=spec.folder,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as a whole
            preexec_fn=die_with_parent,
        )
        log.info("tokenizer %s started: pid %s on %s:%s", server.name, server.process.pid, spec.host, spec.port)

    async def _wait_exit_or_stop(self, server: ManagedServer) -> None:
        assert server.process is not None
        reader = asyncio.create_task(self._collect_output(server))
        exited = asyncio.create_task(server.process.wait())
        stop = asyncio.create_task(server.stop_requested.wait())
        await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not exited.done():
            await self._terminate(server)
        await exited
        # Leftovers of the group (children of the script) must not outlive it.
        self._signal_group(server.process, signal.SIGKILL)
        await reader

    async def _collect_output(self, server: ManagedServer) -> None:
        assert server.process is not None and server.process.stdout is not None
        pending = ""
        while chunk := await server.process.stdout.read(4096):
            pending += chunk.decode("utf-8", errors="replace").replace("\r", "\n")
            *lines, pending = pending.split("\n")
            server.log_tail.extend(line for line in lines if line)
        if pending:
            server.log_tail.append(pending)

    async def _terminate(self, server: ManagedServer) -> None:
        process = server.process
        if process is None or process.returncode is not None:
            return
        self._signal_group(process, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.stop_grace_seconds)
        except TimeoutError:
            self._signal_group(process, signal.SIGKILL)
            await process.wait()
        self._signal_group(process, signal.SIGKILL)

    @staticmethod
    def _signal_group(process: asyncio.subprocess.Process, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)

    @staticmethod
    async def _sleep_unless_stopped(server: ManagedServer, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.stop_requested.wait(), seconds)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(settings: TokenizerServiceSettings | None = None) -> FastAPI:
    settings = settings or TokenizerServiceSettings()
    supervisor = TokenizerSupervisor(
        python=settings.python,
        session_idle_seconds=settings.session_idle_s,
        backoff_min_seconds=settings.restart_backoff_min_s,
        backoff_max_seconds=settings.restart_backoff_max_s,
        owner=owner_tag(settings.data_dir),
        child_env=settings.child_env,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await supervisor.stop_all()

    app = FastAPI(title="axm1-llm tokenizer service", lifespan=lifespan)
    app.state.supervisor = supervisor

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/tokenizers")
    async def list_tokenizers() -> list[dict[str, Any]]:
        return supervisor.snapshots()

    @app.post("/tokenizers/{name}/start", response_model=None)
    async def start_tokenizer(name: str, request: StartRequest) -> dict[str, Any] | JSONResponse:
        try:
            return await supervisor.start(name, request)
        except RefusedStart as exc:
            return error(400, str(exc))

    @app.post("/tokenizers/{name}/stop", response_model=None)
    async def stop_tokenizer(name: str) -> dict[str, Any] | JSONResponse:
        stopped = await supervisor.stop(name)
        return stopped if stopped is not None else error(404, f"no tokenizer named {name!r}")

    return app


def run_service(settings: TokenizerServiceSettings) -> None:
    """Serve the tokenizer service with uvicorn until SIGINT/SIGTERM, then stop every server."""
    import uvicorn

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tokenizer service: supervises per-model tokenizer servers.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--python", default=sys.executable, help="interpreter for the tokenizer scripts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    run_service(TokenizerServiceSettings(host=args.host, port=args.port, python=args.python))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
