"""Managed upstreams: the server processes (vLLM, llama.cpp's server, our workers, …) that the
daemon launches itself for HTTP-engine models whose descriptor entry carries a `command`.

A `ManagedProcess` is one such server: launched in its own process group with the children's
environment (children.py: allow-list, owner tag, parent-death signal), its stdout and stderr
relayed line by line to whoever holds it, its exit reported to them, and stopped with SIGTERM,
then SIGKILL after the grace. It decides nothing about readiness or restarts: the engines that
hold it do (engines/http.py), exactly as a card engine decides about its runner.

Several models may name the same launch (a base model and its LoRA adapters served by one
worker): `ManagedProcesses` hands them one shared process, which runs while any of them holds it.

`expand_command` and `progress_in_line` are pure.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from ..children import child_environment, die_with_parent
from .card.process import describe_exit

log = logging.getLogger(__name__)

_READ_SIZE = 65536
_LINE_LIMIT = 4000  # characters of one log line kept; a server printing megabytes stays bounded
# "Loading checkpoint shards:  50%|", "loading model 3/12", "progress 42.5%": what servers print.
_PERCENT = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d+)?)\s?%")
_STEPS = re.compile(r"(?<![\d/])(\d{1,6})\s?/\s?(\d{1,6})(?![\d/])")
# This daemon's own program: a descriptor may name it without knowing where it is installed.
OWN_PROGRAM = "axm1-llm"


def own_program() -> list[str]:
    return [sys.executable, "-m", "llm_service.cli"]


def expand_command(argv: Sequence[str], env: Mapping[str, str], *, port: int, host: str = "127.0.0.1") -> tuple[list[str], dict[str, str]]:
    """The command and extra environment of one launch: `{port}` and `{host}` filled in (the
    port is picked per launch when the descriptor gives none), `axm1-llm` as argv[0] meaning
    this daemon's own installation. Other braces are left alone (a JSON argument, say)."""

    def fill(text: str) -> str:
        return text.replace("{port}", str(port)).replace("{host}", host)

    command = [fill(part) for part in argv]
    if command and command[0] == OWN_PROGRAM:
        command = own_program() + command[1:]
    return command, {name: fill(value) for name, value in env.items()}


def progress_in_line(line: str) -> float | None:
    """A load's progress (0-100) if the line shows one: a percentage, else "i/n"."""
    percents = _PERCENT.findall(line)
    if percents:
        value = float(percents[-1])
        return value if value <= 100 else None
    steps = _STEPS.findall(line)
    if steps:
        done, total = (int(x) for x in steps[-1])
        if 0 < total and done <= total:
            return round(100.0 * done / total, 1)
    return None


def free_loopback_port() -> int:
    """A port free right now on loopback (the kernel's choice). The server binds it a moment
    later; a race is possible and shows as a launch failure, retried with back-off."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """What identifies one managed server; models with equal specs share the process."""

    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str
    port: int | None  # None: a free port at each launch
    passthrough: tuple[str, ...] = ()  # more variable names the child may inherit (settings)

    def describe(self) -> str:
        return " ".join(self.command)


class Holder:
    """What a holder (an engine) gets told: each line the server prints, and its exit."""

    def on_line(self, line: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def on_exit(self, generation: int, description: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class ManagedProcess:
    """One server process, launched on demand and shared by its holders."""

    def __init__(self, spec: LaunchSpec, owner: str, tasks: TaskGroup, stop_grace_s: float) -> None:
        self.spec = spec
        self._owner = owner
        self._tasks = tasks
        self._stop_grace_s = stop_grace_s
        self._holders: dict[int, Holder] = {}
        self._process: asyncio.subprocess.Process | None = None
        self._exited: anyio.Event | None = None
        self._lock = anyio.Lock()
        self.generation = 0
        self.port: int | None = None
        self.pid: int | None = None
        self.launches = 0

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def exited_within(self, seconds: float) -> bool:
        """Whether the running launch has exited, waiting up to `seconds` for its exit to be seen.
        (A connection refused by a killed server can reach the daemon before the process's exit
        does; holders are told of an exit before this returns True.)"""
        exited = self._exited
        if exited is None:
            return False
        with anyio.move_on_after(seconds):
            await exited.wait()
        return exited.is_set()

    def hold(self, holder: Holder) -> None:
        self._holders[id(holder)] = holder

    async def ensure_running(self) -> int:
        """Launch unless it runs; returns the launch's generation. Raises OSError if it cannot start."""
        async with self._lock:
            if self.running:
                return self.generation
            self.port = self.spec.port or free_loopback_port()
            command, extra_env = expand_command(self.spec.command, dict(self.spec.env), port=self.port)
            env = child_environment(self._owner, self.spec.passthrough, extra_env)
            self.generation += 1
            self.launches += 1
            self._broadcast_line(f"[axm1-llm] launching (port {self.port}): {' '.join(command)}")
            process = await asyncio.create_subprocess_exec(
                *command,
                cwd=self.spec.cwd,
                env=env,
                start_new_session=True,  # its own process group: a stop reaches what it spawns
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                limit=_READ_SIZE,
                preexec_fn=die_with_parent,
            )
            self._process, self.pid = process, process.pid
            self._exited = anyio.Event()
            generation = self.generation
            for stream in (process.stdout, process.stderr):
                self._tasks.start_soon(self._relay, stream)
            self._tasks.start_soon(self._watch_exit, process, generation, self._exited)
            return generation

    async def release(self, holder: Holder) -> None:
        """The holder is done with it; the last one out stops the process."""
        self._holders.pop(id(holder), None)
        if not self._holders:
            await self.terminate()

    async def terminate(self) -> None:
        """SIGTERM to the group, SIGKILL after the grace; returns once it has exited."""
        async with self._lock:
            process, exited = self._process, self._exited
            if process is None or exited is None:
                return
            if process.returncode is None:
                self._signal_group(process.pid, signal.SIGTERM)
                with anyio.move_on_after(self._stop_grace_s):
                    await exited.wait()
                if not exited.is_set():
                    self._broadcast_line(f"[axm1-llm] no exit {self._stop_grace_s:g}s after SIGTERM: SIGKILL")
                    self._signal_group(process.pid, signal.SIGKILL)
                    with anyio.move_on_after(5):
                        await exited.wait()
            self._process = None

    def kill_now(self) -> None:
        """The daemon is going down: no grace (the next start-up sweeps what is left)."""
        if self._process is not None and self._process.returncode is None:
            self._signal_group(self._process.pid, signal.SIGKILL)

    @staticmethod
    def _signal_group(pid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _broadcast_line(self, line: str) -> None:
        for holder in list(self._holders.values()):
            holder.on_line(line)

    async def _relay(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        pending = b""
        try:
            while data := await stream.read(_READ_SIZE):
                pending += data
                *lines, pending = pending.replace(b"\r", b"\n").split(b"\n")
                for raw in lines:
                    if raw.strip():
                        self._broadcast_line(raw[:_LINE_LIMIT].decode("utf-8", "replace"))
                if len(pending) > _LINE_LIMIT:  # a line without end: keep its start only
                    self._broadcast_line(pending[:_LINE_LIMIT].decode("utf-8", "replace"))
                    pending = b""
        except (OSError, RuntimeError, ValueError):
            pass
        if pending.strip():
            self._broadcast_line(pending[:_LINE_LIMIT].decode("utf-8", "replace"))

    async def _watch_exit(self, process: asyncio.subprocess.Process, generation: int, exited: anyio.Event) -> None:
        returncode = await process.wait()
        # What it spawned dies with it, so a restart never finds the port or the GPU taken.
        self._signal_group(process.pid, signal.SIGKILL)
        exited.set()
        description = describe_exit(returncode)
        for holder in list(self._holders.values()):
            holder.on_exit(generation, description)


class ManagedProcesses:
    """The daemon's managed servers, one per distinct launch, shared by the models naming it."""

    def __init__(self, owner: str, stop_grace_s: float) -> None:
        self._owner = owner
        self._stop_grace_s = stop_grace_s
        self._processes: dict[LaunchSpec, ManagedProcess] = {}
        self._tasks: TaskGroup | None = None

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Hosts the watchers of every managed process; runs for the daemon's life."""
        try:
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self.kill_all()

    def get(self, spec: LaunchSpec) -> ManagedProcess:
        process = self._processes.get(spec)
        if process is None:
            assert self._tasks is not None, "ManagedProcesses.run is not running"
            process = self._processes[spec] = ManagedProcess(spec, self._owner, self._tasks, self._stop_grace_s)
        return process

    def kill_all(self) -> None:
        for process in self._processes.values():
            process.kill_now()

    def status(self) -> list[dict[str, Any]]:
        return [
            {"command": p.spec.describe(), "pid": p.pid if p.running else None, "port": p.port, "launches": p.launches}
            for p in self._processes.values()
        ]
