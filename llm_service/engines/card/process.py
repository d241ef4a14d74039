"""One launch of a run script: its process group, its pipes, and the tasks that watch them.

The script runs in a process group of its own (`start_new_session`), so stopping reaches the
whole tree. Three watchers post to the engine's inbox and never decide anything themselves:
stdout in raw chunks (the runner's output is block-buffered and its marker has no newline),
stderr in lines, and the exit. Exit is watched apart from stdout: a child the script left
behind may hold stdout open long after the runner died.

A line to stdin is written at once (asyncio's pipe transport writes what the pipe takes and
buffers the rest, never blocking); a writer task only drains that buffer and reports a broken
pipe, so the owner loop never waits on the runner and a prompt reaches it without a task switch.
asyncio's subprocess API is used directly for that synchronous write; the daemon runs on asyncio.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup

from ...children import die_with_parent

log = logging.getLogger(__name__)

_READ_SIZE = 65536


@dataclass(slots=True)
class Output:
    generation: int
    data: bytes  # b"" at the end of stdout


@dataclass(slots=True)
class Exited:
    generation: int
    returncode: int | None


@dataclass(slots=True)
class WriteFailed:
    generation: int
    error: str


def describe_exit(returncode: int | None) -> str:
    """How a process ended, naming the signal (also when /bin/sh reports one as 128+N)."""
    if returncode is None:
        return "ended with an unknown status"
    signum = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    try:
        name = signal.Signals(signum).name if signum else ""
    except ValueError:
        name = ""
    if returncode < 0:
        return f"killed by signal {name or -returncode}"
    if name:
        return f"exited with status {returncode} (killed by signal {name})"
    return f"exited with status {returncode}"


class RunnerProcess:
    """A running run script. `generation` tells its messages from those of earlier launches."""

    def __init__(self, process: asyncio.subprocess.Process, generation: int, command: list[str]) -> None:
        self.process = process
        self.generation = generation
        self.command = command
        self.exited = False
        self._written = anyio.Event()  # set when lines wait in the pipe's buffer for the drain
        self._closed = False

    @classmethod
    async def launch(cls, command: list[str], cwd: Path, env: dict[str, str], generation: int) -> RunnerProcess:
        """Start the command; raises OSError when it cannot be started."""
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=str(cwd),
            env=env,
            start_new_session=True,  # its own process group: stop and kill reach the whole tree
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            limit=_READ_SIZE,
            preexec_fn=die_with_parent,
        )
        return cls(process, generation, command)

    @property
    def pid(self) -> int:
        return self.process.pid

    def runner_pid(self) -> int:
        """The runner program's pid: the child of /bin/sh running the script (or sh itself)."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                children = f.read().split()
        except OSError:
            return self.pid
        return int(children[0]) if children else self.pid

    def watch(self, tasks: TaskGroup, post: Callable[[Any], None], on_stderr: Callable[[str], None], exit_grace_s: float) -> None:
        """Start the watchers; every message they post carries this launch's generation."""
        stdout_done = anyio.Event()
        tasks.start_soon(self._read_stdout, post, stdout_done)
        tasks.start_soon(self._read_stderr, on_stderr)
        tasks.start_soon(self._watch_exit, post, stdout_done, exit_grace_s)
        tasks.start_soon(self._drain_stdin, post)

    def write_line(self, line: str) -> None:
        """Write one line to the runner's stdin now (never blocks; order is kept)."""
        stdin = self.process.stdin
        if self._closed or stdin is None or stdin.is_closing():
            return  # the exit watcher reports the end
        stdin.write(line.encode("utf-8", "surrogateescape") + b"\n")
        self._written.set()

    def signal_runner(self, sig: signal.Signals) -> None:
        if self.exited:
            return
        try:
            os.kill(self.runner_pid(), sig)
        except ProcessLookupError:
            pass

    def signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def kill_and_wait(self, timeout: float) -> None:
        """SIGKILL to the whole group, then reap and close the pipes (the daemon is stopping)."""
        self.signal_group(signal.SIGKILL)
        with anyio.move_on_after(timeout):
            await self.process.wait()
        self._close()

    # ---- watchers ----------------------------------------------------------------------------

    async def _read_stdout(self, post: Callable[[Any], None], done: anyio.Event) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        try:
            while data := await stdout.read(_READ_SIZE):
                post(Output(self.generation, data))
        except (OSError, RuntimeError):  # the pipe closed under us
            pass
        finally:
            post(Output(self.generation, b""))
            done.set()

    async def _read_stderr(self, on_line: Callable[[str], None]) -> None:
        stderr = self.process.stderr
        assert stderr is not None
        pending = b""
        try:
            while data := await stderr.read(_READ_SIZE):
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    on_line(line.decode("utf-8", "replace"))
        except (OSError, RuntimeError):
            pass
        if pending:
            on_line(pending.decode("utf-8", "replace"))

    async def _watch_exit(self, post: Callable[[Any], None], stdout_done: anyio.Event, grace_s: float) -> None:
        returncode = await self.process.wait()
        self.exited = True
        # Whatever the script left in its group dies with it; then stdout ends, with its last bytes.
        self.signal_group(signal.SIGKILL)
        with anyio.move_on_after(grace_s):
            await stdout_done.wait()
        self._close()
        post(Exited(self.generation, returncode))

    async def _drain_stdin(self, post: Callable[[Any], None]) -> None:
        """Wait while the pipe's buffer is full (the runner is not reading); report a broken pipe."""
        stdin = self.process.stdin
        assert stdin is not None
        while not self._closed:
            await self._written.wait()
            self._written = anyio.Event()
            try:
                await stdin.drain()
            except (ConnectionError, RuntimeError, OSError) as exc:
                if not self._closed:
                    post(WriteFailed(self.generation, repr(exc)))
                return

    def _close(self) -> None:
        """Close our ends of the pipes (the process has exited or is being killed)."""
        if self._closed:
            return
        self._closed = True
        self._written.set()  # the drain task ends
        if self.process.stdin is not None:
            self.process.stdin.close()
        # asyncio has no public close for a subprocess's pipes; a child the script left behind may
        # hold stdout open, and only closing the transport releases our end.
        transport = getattr(self.process, "_transport", None)
        if transport is not None:
            transport.close()
