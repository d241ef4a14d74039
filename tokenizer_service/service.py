"""The tokenizer service (:8101): starts and supervises each model's tokenizer server.

    axm1-llm tokenizer-service --descriptor model/model-descriptor.json   (secret: AXM1_TOKENIZER_SERVICE_SECRET)

It starts only what the model descriptor names: a start request carries a model's name, and the
folder, script, address and port come from that model's entry (`tokenizer_path`, `tokenizer_py`,
`tokenizer_ip`, `tokenizer_port`), read again at every start so a changed descriptor takes effect.
Every route but `/health` needs `Authorization: Bearer <secret>`: anyone on the box can reach a
loopback port, and a start runs a program as this service's user.

Which server runs is the entry's `tokenizer_server` (tokenizer_service.stock_script): the
folder's script, or ours on the tokenizer files it loads, with its defaults. Each server runs as
`<python> <tokenizer_py> --host <host> --port <port>` (or `<python> -m tokenizer_service.server
--tokenizer DIR … --host <host> --port <port>`) in its folder, in a
session and process group of its own, so stopping it (SIGTERM to the group, SIGKILL after a
grace) takes anything it spawned too; on Linux the kernel also kills it if this service dies
without cleaning up. A server that exits is restarted with a growing back-off.

A server is `running` only when the socket listening on its port belongs to a process of its own
session (found in /proc: the socket's inode in /proc/net/tcp{,6}, held open in /proc/<pid>/fd).
Prompts and system prompts go to that port, so a port that another process listens on — before
our server starts, or instead of it — is `blocked`, named with that process, and re-checked; our
server starts when the port is free again. A tokenizer someone else runs is declared by giving
its model no `tokenizer_py`: this service is then not involved (the daemon probes the port).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from llm_service.children import child_environment, die_with_parent, owner_tag
from llm_service.descriptor import load_descriptor
from llm_service.discovery import this_host
from tokenizer_service.server import ENGINE_ENV, EXIT_UNUSABLE, SESSION_IDLE_ENV
from tokenizer_service.settings import TokenizerServiceSettings
from tokenizer_service.stock_script import CannotChoose, ServerChoice, choose_server, folder_facts, server_arguments

log = logging.getLogger("tokenizer_service")

LOG_TAIL_LINES = 50
STOP_GRACE_SECONDS = 5.0
# A server that ran this long before exiting was healthy: its next restart starts the back-off over.
STABLE_RUN_SECONDS = 60.0
BLOCKED_RECHECK_SECONDS = 2.0
READY_POLL_SECONDS = 0.1
PROBE_TIMEOUT_SECONDS = 1.0
# Even with a zero back-off setting, a script that dies at once must not spin the CPU.
MIN_RESTART_DELAY_SECONDS = 0.1
PROC = Path("/proc")
TCP_LISTEN = "0A"  # the `st` column of /proc/net/tcp for a listening socket
CMDLINE_CHARS = 200
# Reachable without the secret: liveness probes (Docker, systemd) carry no secrets.
OPEN_PATHS = frozenset({"/health"})
BUILTIN_MODULE = ("-m", "tokenizer_service.server")  # how server_arguments starts our server
HOST_MODULE = ("-m", "tokenizer_service.host")


class ServerState(StrEnum):
    STARTING = "starting"  # spawned; its port does not yet answer from a socket of its own
    RUNNING = "running"  # its own socket listens on the port, and answers HTTP
    BACKOFF = "backoff"  # exited; waiting before the next start
    BLOCKED = "blocked"  # another process listens on the port; re-checked
    STOPPED = "stopped"


@dataclass(frozen=True)
class ServerSpec:
    """What to run for one model, as its descriptor entry says, and where it listens."""

    folder: Path
    script: Path
    host: str
    port: int
    # What runs after the interpreter: the script, or our server standing in for it; and why.
    arguments: tuple[str, ...] = ()
    choice: str = ""
    # What runs instead when ours finds the files unusable (exits with EXIT_UNUSABLE): `auto`'s script.
    fallback: ServerSpec | None = None
    # The folder's runner speaks the uid protocol (its script serves /get_uid): with our server,
    # it may share its port with other such models (tokenizer_service.server.PortModels).
    uid_protocol: bool = False
    # Ours, but in a process of its own: the shared host hung loading this model's tokenizer.
    own_process: bool = False

    def command(self, python: str) -> list[str]:
        return [python, *(self.arguments or (str(self.script),)), "--host", self.host, "--port", str(self.port)]

    @property
    def hosted(self) -> bool:
        """Our server: it runs in the shared host process (tokenizer_service.host)."""
        return self.arguments[:2] == BUILTIN_MODULE and not self.own_process

    @property
    def server_options(self) -> list[str]:
        return list(self.arguments[len(BUILTIN_MODULE):])

    def may_share_port_with(self, other: ServerSpec) -> bool:
        return self.hosted and other.hosted and self.uid_protocol and other.uid_protocol


class RefusedStart(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def spec_from_descriptor(descriptor: Path, name: str, discover_host: str | None = None) -> ServerSpec:
    """The tokenizer server the descriptor names for model `name` (or, with `discover_host`, a
    model folder found beside it, as the daemon finds it), its paths checked by the descriptor's
    own parser (the script lies inside its folder); refuse anything else."""
    result = load_descriptor(descriptor, discover_host)
    if result.file_error:
        raise RefusedStart(400, f"cannot start a tokenizer: {result.file_error}")
    spec = result.models.get(name)
    if spec is None:
        if name in result.errors:
            raise RefusedStart(400, f"the descriptor's entry for {name!r} is invalid: {result.errors[name]}")
        raise RefusedStart(404, f"no model named {name!r} in {descriptor}")
    config = spec.config
    if not getattr(config, "tokenizer_py", None):
        raise RefusedStart(
            400, f"model {name!r} has no tokenizer_py in {descriptor}: its tokenizer server, if any, "
            "is not one this service starts",
        )
    if config.tokenizer_port is None:
        raise RefusedStart(400, f"model {name!r} has no tokenizer_port in {descriptor}")
    folder = config.tokenizer_path or config.model_path
    script = (folder / config.tokenizer_py).resolve()
    try:
        text = script.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise RefusedStart(400, f"cannot read the tokenizer script of {name!r}: {exc}") from None
    facts = folder_facts(folder, text)
    try:
        choice = choose_server(config.tokenizer_server, facts)
    except CannotChoose as exc:
        raise RefusedStart(400, f"model {name!r}: {exc}") from None
    # The published uid scripts serve /get_uid (and are named *_uid.py); the stateless ones do not.
    uid_protocol = "/get_uid" in text or script.name.endswith("_uid.py")
    stock = ServerSpec(folder, script, config.tokenizer_ip, config.tokenizer_port, (), choice.describe(),
                       uid_protocol=uid_protocol)
    if choice.server is not ServerChoice.BUILTIN:
        return stock
    assert facts.tokenizer_dir is not None
    arguments = tuple(server_arguments(facts))
    fallback = None
    if ServerChoice(config.tokenizer_server) is ServerChoice.AUTO:
        why = f"stock: the folder's own script runs: our server cannot use {facts.tokenizer_dir.name}/"
        fallback = replace(stock, choice=why)
    return replace(stock, arguments=arguments, fallback=fallback)


def sharing_refusal(spec: ServerSpec, other: ServerSpec) -> str:
    """Why two models cannot share their port (models the daemon then swaps on it)."""
    if not (spec.hosted and other.hosted):
        return ": only our tokenizer server serves several models on one port, and a folder's own script runs here"
    return ": the runners do not both speak the uid protocol, whose uid tells their calls apart"


# ---- who listens on a port (Linux /proc) ---------------------------------------------------------


def listening_inodes(port: int, tables: Iterable[str]) -> set[int]:
    """Inodes of the sockets listening on `port` on any address, from the text of /proc/net/tcp
    and /proc/net/tcp6 (`sl local_address rem_address st … inode`, addresses as HEX:PORT)."""
    inodes = set()
    for table in tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 10 or fields[3] != TCP_LISTEN:
                continue
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[9] != "0":
                inodes.add(int(fields[9]))
    return inodes


def tcp_tables(proc: Path = PROC) -> list[str]:
    tables = []
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):  # no IPv6 on this box
            tables.append((proc / "net" / name).read_text())
    return tables


def socket_inodes(pid: int, proc: Path = PROC) -> set[int]:
    """The sockets process `pid` holds open (its fd links read `socket:[inode]`); none when it is
    gone or not ours to inspect."""
    inodes = set()
    fd_dir = proc / str(pid) / "fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return inodes
    for fd in fds:
        with contextlib.suppress(OSError):
            link = os.readlink(fd_dir / fd)
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    return inodes


def _stat_fields(pid: int, proc: Path) -> list[str] | None:
    """/proc/<pid>/stat after the command name (which may hold spaces and parentheses):
    state, ppid, pgrp, session, …"""
    try:
        return (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pids(proc: Path = PROC) -> list[int]:
    return [int(entry.name) for entry in proc.iterdir() if entry.name.isdigit()]


def session_members(session: int, proc: Path = PROC) -> list[int]:
    """The processes of a session. A server is started as a session leader, and what it spawns
    stays in its session even when re-parented, so this is its process tree."""
    return [pid for pid in pids(proc) if (fields := _stat_fields(pid, proc)) and int(fields[3]) == session]


def holders(inodes: set[int], proc: Path = PROC) -> list[int]:
    """The processes (among those we may inspect) that hold one of the sockets `inodes`."""
    return [pid for pid in pids(proc) if socket_inodes(pid, proc) & inodes]


def cmdline(pid: int, proc: Path = PROC) -> str:
    try:
        text = (proc / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
    return text if len(text) <= CMDLINE_CHARS else text[: CMDLINE_CHARS - 1] + "…"


def taken_message(port: int, pids_: list[int], proc: Path = PROC) -> str:
    if not pids_:
        who = "pid unknown: a process this service may not inspect"
    else:
        who = "; ".join(f"pid {pid}: {cmdline(pid, proc)}" for pid in pids_[:3])
    return f"port {port} is taken by another process ({who})"


def inspect_port(port: int, session: int | None, proc: Path = PROC) -> tuple[bool, str | None]:
    """Who listens on `port`: (a process of `session` does, the message naming another process
    that does — None when none does). Every listening socket on the port counts, whatever its
    address: a client of 127.0.0.1 or of "localhost" may reach any of them."""
    inodes = listening_inodes(port, tcp_tables(proc))
    if not inodes:
        return False, None
    ours: set[int] = set()
    if session is not None:
        for pid in session_members(session, proc):
            ours |= socket_inodes(pid, proc)
    foreign = inodes - ours
    if not foreign:
        return True, None
    return bool(inodes & ours), taken_message(port, holders(foreign, proc), proc)


async def answers_http(host: str, port: int) -> bool:
    """Does the port answer an HTTP request (any status)? Asked only once the socket is known to
    be ours. A bare request on a stream: an HTTP client costs more to build than the probe."""
    writer = None
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /bos_id HTTP/1.0\r\nHost: tokenizer\r\n\r\n")
            await writer.drain()
            return (await reader.readline()).startswith(b"HTTP/")
    except (OSError, TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.close()


# ---- supervision ----------------------------------------------------------------------------


@dataclass
class ManagedServer:
    """One model's tokenizer server. Its state changes only in its own supervision task."""

    name: str
    spec: ServerSpec  # what runs: the spec asked for, or its fallback
    requested: ServerSpec | None = None  # what the descriptor asked for (the spec, unless set)
    ran: bool = False  # it reached RUNNING at least once
    state: ServerState = ServerState.STARTING
    detail: str | None = None  # why it is blocked
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
            "host": self.spec.host,
            "port": self.spec.port,
            "server": self.spec.choice,
            # Our server runs in the one shared host process; a folder's script in its own.
            "process": "shared" if self.spec.hosted else "own",
            "pid": self.process.pid if self.process and self.process.returncode is None else None,
            "state": self.state.value,
            "detail": self.detail,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "log_tail": list(self.log_tail),
        }

    def block(self, detail: str) -> None:
        if detail != self.detail:
            log.warning("tokenizer %s: %s", self.name, detail)
        self.state, self.detail = ServerState.BLOCKED, detail


class HostGone(Exception):
    """The shared host process exited before it answered, or hung (`hung`) and was stopped."""

    def __init__(self, message: str, hung: bool = False) -> None:
        super().__init__(message)
        self.hung = hung


class SharedHost:
    """The one process running our server for every model that has it (tokenizer_service.host):
    started when the first such model starts, stopped when the last one stops. Commands go one at
    a time and are answered in order."""

    def __init__(self, python: str, environment: Any, stop_grace_seconds: float, answer_timeout_seconds: float) -> None:
        self.python = python
        self._environment = environment  # () -> the environment to start it with
        self.stop_grace_seconds = stop_grace_seconds
        # A tokenizer that never finishes loading (a file that blocks its reader, a hung disk)
        # must not hold every other model's start behind this one's command.
        self.answer_timeout_seconds = answer_timeout_seconds
        self.process: asyncio.subprocess.Process | None = None
        self.exited = asyncio.Event()
        self.log_tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.models: set[str] = set()
        self._lock = asyncio.Lock()
        self._reply: asyncio.Future[dict[str, Any]] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def _ensure_running(self) -> None:
        if self.running:
            return
        self.exited = asyncio.Event()
        self.models.clear()
        self.process = await asyncio.create_subprocess_exec(
            self.python, *HOST_MODULE, env=self._environment(), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, preexec_fn=die_with_parent,
        )
        log.info("tokenizer host started: pid %s", self.process.pid)
        process, exited = self.process, self.exited
        self._tasks = [asyncio.create_task(self._read_replies(process)),
                       asyncio.create_task(self._read_log(process)),
                       asyncio.create_task(self._watch_exit(process, exited))]

    async def _read_replies(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            with contextlib.suppress(ValueError):
                reply = json.loads(line)
                if self._reply is not None and not self._reply.done():
                    self._reply.set_result(reply)

    async def _read_log(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            if text := line.decode("utf-8", errors="replace").rstrip():
                self.log_tail.append(text)

    async def _watch_exit(self, process: asyncio.subprocess.Process, exited: asyncio.Event) -> None:
        code = await process.wait()
        if self.models:
            log.warning("tokenizer host (pid %s) exited with %s, serving %s", process.pid, code, ", ".join(sorted(self.models)))
        exited.set()

    async def command(self, payload: dict[str, Any]) -> dict[str, Any]:
        async with self._lock:
            if payload["op"] == "add":
                await self._ensure_running()
            elif not self.running:
                return {"name": payload["name"], "ok": True}  # nothing to remove from
            process, exited = self.process, self.exited
            assert process is not None and process.stdin is not None
            self._reply = asyncio.get_running_loop().create_future()
            try:
                process.stdin.write(json.dumps(payload).encode() + b"\n")
                await process.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass  # it is exiting: the wait below says so
            gone = asyncio.create_task(exited.wait())
            await asyncio.wait({self._reply, gone}, timeout=self.answer_timeout_seconds,
                               return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not self._reply.done() and not exited.is_set():
                log.warning("tokenizer host (pid %s) did not answer %s %s within %.0fs: stopping it",
                            process.pid, payload["op"], payload["name"], self.answer_timeout_seconds)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)  # hung: no grace to wait out
                await self._stop()
                raise HostGone(f"the tokenizer host did not answer {payload['op']} of {payload['name']} within "
                               f"{self.answer_timeout_seconds:.0f}s", hung=True)
            if not self._reply.done():
                tail = " | ".join(list(self.log_tail)[-3:])
                raise HostGone(f"the tokenizer host exited ({process.returncode})" + (f": {tail}" if tail else ""))
            reply = self._reply.result()
            name = payload["name"]
            if payload["op"] == "add" and reply.get("ok"):
                self.models.add(name)
            elif payload["op"] == "remove":
                self.models.discard(name)
                if not self.models:
                    await self._stop()  # nobody left to serve: free its memory
            return reply

    async def close(self) -> None:
        async with self._lock:
            self.models.clear()
            await self._stop()

    async def _stop(self) -> None:
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            assert process.stdin is not None
            process.stdin.close()  # it exits at the end of its input
            try:
                await asyncio.wait_for(process.wait(), self.stop_grace_seconds)
            except TimeoutError:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.process = None


class Outcome(StrEnum):
    """How one run of a model's server ended, for its supervision loop."""

    AGAIN = "again"  # go round at once (blocked port re-checked, or fell back to the script)
    EXITED = "exited"  # it ended: back off, then start it again
    STOPPED = "stopped"  # a stop was asked for


class TokenizerSupervisor:
    def __init__(
        self,
        descriptor: Path,
        python: str = sys.executable,
        session_idle_seconds: float | None = None,
        backoff_min_seconds: float = 1.0,
        backoff_max_seconds: float = 30.0,
        stop_grace_seconds: float = STOP_GRACE_SECONDS,
        owner: str = "",
        child_env: list[str] | tuple[str, ...] = (),
        discover_host: str | None = None,
        engine: str = "auto",
        host_answer_timeout_seconds: float = 60.0,
    ) -> None:
        self.descriptor = descriptor
        self.engine = engine
        self.discover_host = discover_host
        self.python = python
        self.session_idle_seconds = session_idle_seconds
        self.backoff_min_seconds = backoff_min_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.stop_grace_seconds = stop_grace_seconds
        self._servers: dict[str, ManagedServer] = {}
        self._lock = asyncio.Lock()  # serializes start/stop requests
        self.owner = owner or owner_tag(Path("data"))
        self.child_env = tuple(child_env)
        self.host = SharedHost(python, self._environment, stop_grace_seconds, host_answer_timeout_seconds)

    def snapshots(self) -> list[dict[str, Any]]:
        return [server.snapshot() for server in self._servers.values()]

    def snapshot(self, name: str) -> dict[str, Any] | None:
        server = self._servers.get(name)
        return server.snapshot() if server is not None else None

    async def start(self, name: str) -> dict[str, Any]:
        spec = spec_from_descriptor(self.descriptor, name, self.discover_host)
        async with self._lock:
            current = self._servers.get(name)
            if current is not None and current.requested == spec and current.state != ServerState.STOPPED:
                return current.snapshot()
            for other in self._servers.values():
                if other.name != name and other.spec.port == spec.port and other.state != ServerState.STOPPED:
                    if not spec.may_share_port_with(other.spec):
                        raise RefusedStart(400, f"port {spec.port} is already used by tokenizer {other.name!r}"
                                           f"{sharing_refusal(spec, other.spec)}")
            if current is not None:
                await self._stop(current)
            server = ManagedServer(name, spec, requested=spec)
            self._servers[name] = server
            server.task = asyncio.create_task(self._supervise(server), name=f"tokenizer {name}")
        # Spawning takes milliseconds; wait for it so the reply carries the pid (or the block).
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
            await self.host.close()

    async def _stop(self, server: ManagedServer) -> None:
        server.stop_requested.set()
        if server.task is not None:
            await server.task

    async def _supervise(self, server: ManagedServer) -> None:
        backoff = self.backoff_min_seconds
        try:
            while not server.stop_requested.is_set():
                started = time.monotonic()
                run = self._run_hosted if server.spec.hosted else self._run_process
                outcome = await run(server)
                if outcome is Outcome.STOPPED:
                    break
                if outcome is Outcome.AGAIN:
                    continue
                if time.monotonic() - started >= STABLE_RUN_SECONDS:
                    backoff = self.backoff_min_seconds
                server.state = ServerState.BACKOFF
                server.first_attempt_done.set()
                await self._sleep_unless_stopped(server, backoff)
                backoff = min(max(backoff * 2, MIN_RESTART_DELAY_SECONDS), self.backoff_max_seconds)
                server.restarts += 1
        finally:
            if server.spec.hosted:
                with contextlib.suppress(HostGone):
                    await self.host.command({"op": "remove", "name": server.name})
                server.process = None
            else:
                await self._terminate(server)
            server.state = ServerState.STOPPED
            server.first_attempt_done.set()

    async def _blocked(self, server: ManagedServer, session: int | None) -> bool:
        """Does a process not of `session` listen on the server's port? (Then it is BLOCKED and
        re-checked after a while.)"""
        _, taken = await asyncio.to_thread(inspect_port, server.spec.port, session)
        if taken is None:
            server.detail = None
            return False
        server.block(taken)
        server.first_attempt_done.set()
        await self._sleep_unless_stopped(server, BLOCKED_RECHECK_SECONDS)
        return True

    async def _run_process(self, server: ManagedServer) -> Outcome:
        """A server of its own (the folder's script): spawn it, and wait until it exits or is stopped."""
        # Before we spawn, whoever listens on the port is not ours.
        if await self._blocked(server, None):
            return Outcome.AGAIN
        try:
            await self._spawn(server)
        except OSError as exc:
            server.log_tail.append(f"cannot start {server.spec.script}: {exc}")
            server.last_exit = None
            return Outcome.EXITED
        server.state = ServerState.STARTING
        server.first_attempt_done.set()
        await self._wait_exit_or_stop(server)
        if server.stop_requested.is_set():
            return Outcome.STOPPED
        server.last_exit = server.process.returncode
        if self._fall_back(server):
            return Outcome.AGAIN
        log.warning("tokenizer %s exited with %s; restarting", server.name, server.last_exit)
        return Outcome.EXITED

    async def _run_hosted(self, server: ManagedServer) -> Outcome:
        """Our server, in the shared host: add the model to it, and wait until it is stopped or
        the host exits. Other models on the same port are the host's own listener, not a block."""
        host, spec = self.host, server.spec
        if await self._blocked(server, host.process.pid if host.running and host.process else None):
            return Outcome.AGAIN
        server.state = ServerState.STARTING
        try:
            reply = await host.command({"op": "add", "name": server.name, "host": spec.host, "port": spec.port,
                                        "arguments": spec.server_options})
        except HostGone as exc:
            server.log_tail.append(str(exc))
            server.last_exit = None
            if exc.hung:
                # Whatever hangs loading it would hang the host again, and every model with it:
                # this one runs apart from now on (the host restarts for the others).
                server.spec = replace(spec, own_process=True,
                                      choice=f"{spec.choice} (in a process of its own: {exc})")
                log.warning("tokenizer %s: %s", server.name, server.spec.choice)
                return Outcome.AGAIN
            return Outcome.EXITED
        if not reply.get("ok"):
            server.log_tail.append(str(reply.get("error")))
            server.last_exit = EXIT_UNUSABLE if reply.get("unusable") else 1
            if self._fall_back(server):
                return Outcome.AGAIN
            log.warning("tokenizer %s: the host cannot serve it: %s", server.name, reply.get("error"))
            return Outcome.EXITED
        server.process, exited = host.process, host.exited
        server.state, server.detail, server.ran = ServerState.RUNNING, None, True
        server.first_attempt_done.set()
        log.info("tokenizer %s is serving on port %s (shared host, pid %s)", server.name, spec.port,
                 server.process.pid if server.process else None)
        stop = asyncio.create_task(server.stop_requested.wait())
        gone = asyncio.create_task(exited.wait())
        await asyncio.wait({stop, gone}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        gone.cancel()
        if server.stop_requested.is_set():
            return Outcome.STOPPED
        server.last_exit = server.process.returncode if server.process else None
        server.process = None
        log.warning("tokenizer %s: the shared host exited with %s; restarting", server.name, server.last_exit)
        return Outcome.EXITED

    @staticmethod
    def _fall_back(server: ManagedServer) -> bool:
        """Our server found the tokenizer files unusable before it ever ran: under `auto`, the
        folder's script runs instead (at once), and the entry says why."""
        fallback = server.spec.fallback
        if fallback is None or server.ran or server.last_exit != EXIT_UNUSABLE:
            return False
        said = next((line for line in reversed(server.log_tail) if line.strip()), "no output")
        server.spec = replace(fallback, choice=f"{fallback.choice} ({said})")
        log.warning("tokenizer %s: %s", server.name, server.spec.choice)
        return True

    def _environment(self) -> dict[str, str]:
        env = child_environment(self.owner, self.child_env)
        if self.session_idle_seconds is not None:
            env[SESSION_IDLE_ENV] = str(self.session_idle_seconds)
        env[ENGINE_ENV] = self.engine
        return env

    async def _spawn(self, server: ManagedServer) -> None:
        spec = server.spec
        env = self._environment()
        server.process = await asyncio.create_subprocess_exec(
            *spec.command(self.python),
            cwd=spec.folder,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # A session of its own: its process group is stopped as a whole, and its session
            # id tells its processes from others listening on its port.
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.info("tokenizer %s started: pid %s on %s:%s (%s)", server.name, server.process.pid, spec.host, spec.port,
                 spec.choice)

    async def _watch_readiness(self, server: ManagedServer) -> None:
        """STARTING → RUNNING once the port listens on a socket of the server's own session and
        answers; BLOCKED while another process listens there (our server then usually exits,
        unable to bind). Not watched after RUNNING: a listening socket cannot be taken over
        (our servers do not set SO_REUSEPORT, without which no second socket binds the port)."""
        assert server.process is not None
        session = server.process.pid
        while True:
            ours, taken = await asyncio.to_thread(inspect_port, server.spec.port, session)
            if taken is not None:
                server.block(taken)
            elif ours and await answers_http(server.spec.host, server.spec.port):
                server.state, server.detail, server.ran = ServerState.RUNNING, None, True
                log.info("tokenizer %s is serving on port %s", server.name, server.spec.port)
                return
            await asyncio.sleep(READY_POLL_SECONDS)

    async def _wait_exit_or_stop(self, server: ManagedServer) -> None:
        assert server.process is not None
        reader = asyncio.create_task(self._collect_output(server))
        readiness = asyncio.create_task(self._watch_readiness(server))
        exited = asyncio.create_task(server.process.wait())
        stop = asyncio.create_task(server.stop_requested.wait())
        await asyncio.wait({exited, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        readiness.cancel()
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


# ---- the HTTP API ---------------------------------------------------------------------------


def _digest(secret: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison time independent of the secret's length.
    return hashlib.sha256(secret.encode()).digest()


class RequireSecret:
    """`Authorization: Bearer <secret>` on every route but OPEN_PATHS (pure ASGI), else 401."""

    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app = app
        self.expected = _digest(f"Bearer {secret}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(_digest(given), self.expected):
                body = json.dumps({"error": "missing or wrong secret: send 'Authorization: Bearer <secret>' "
                                            "(the tokenizer service's secret)"}).encode()
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(settings: TokenizerServiceSettings) -> FastAPI:
    if not settings.secret or settings.descriptor is None:
        raise ValueError("the tokenizer service needs a secret and a descriptor")
    supervisor = TokenizerSupervisor(
        settings.descriptor,
        python=settings.python,
        session_idle_seconds=settings.session_idle_s,
        backoff_min_seconds=settings.restart_backoff_min_s,
        backoff_max_seconds=settings.restart_backoff_max_s,
        owner=owner_tag(settings.data_dir),
        child_env=settings.child_env,
        discover_host=this_host(settings.host_kind) if settings.discover_models else None,
        engine=settings.engine,
        host_answer_timeout_seconds=settings.host_answer_timeout_s,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await supervisor.stop_all()

    app = FastAPI(title="axm1-llm tokenizer service", lifespan=lifespan)
    # Routes take `{name:path}`: a model's name may hold a slash ("org/model").
    app.state.supervisor = supervisor

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/tokenizers")
    async def list_tokenizers() -> list[dict[str, Any]]:
        return supervisor.snapshots()

    @app.get("/tokenizers/{name:path}", response_model=None)
    async def get_tokenizer(name: str) -> dict[str, Any] | JSONResponse:
        snapshot = supervisor.snapshot(name)
        return snapshot if snapshot is not None else error(404, f"no tokenizer named {name!r}")

    @app.post("/tokenizers/{name:path}/start", response_model=None)
    async def start_tokenizer(name: str) -> dict[str, Any] | JSONResponse:
        # No body: what runs comes from the descriptor alone.
        try:
            return await supervisor.start(name)
        except RefusedStart as exc:
            return error(exc.status, str(exc))

    @app.post("/tokenizers/{name:path}/stop", response_model=None)
    async def stop_tokenizer(name: str) -> dict[str, Any] | JSONResponse:
        stopped = await supervisor.stop(name)
        return stopped if stopped is not None else error(404, f"no tokenizer named {name!r}")

    app.add_middleware(RequireSecret, secret=settings.secret)
    return app


def main(argv: list[str] | None = None) -> int:
    """`python -m tokenizer_service.service ARGS` is `axm1-llm tokenizer-service ARGS`."""
    from llm_service.cli import main as cli_main

    return cli_main(["tokenizer-service", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
