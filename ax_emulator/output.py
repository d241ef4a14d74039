"""The runner's stdout: byte-exact log lines, the progress bar, and stdio-like buffering.

The real runner writes with printf into glibc's stdout buffer. On a pipe that buffer is only
emptied by an explicit fflush (after each bar update, text chunk, reply tail and prompt marker)
or when it fills up; on a terminal it is emptied at every write. `RunnerOutput` reproduces
exactly that, because readers of the real card depend on (and trip over) those bursts.
"""
from __future__ import annotations

import os
import time

END = "\x1b[0m"
LEVEL_COLOURS = {
    "I": "\x1b[1;30;32m",
    "W": "\x1b[1;30;33m",
    "E": "\x1b[1;30;31m",
    "N": "\x1b[1;30;35m",
}
BAR_COLOUR = "\x1b[1;30;33m"
BAR_MESSAGE_COLOUR = "\x1b[1;30;32m"
BAR_WIDTH = 32
# glibc's buffer size for a pipe: a fuller buffer is written out without an explicit fflush.
STDIO_BUFFER_SIZE = 4096


def log_line(level: str, func: str, line: int, message: str) -> str:
    """One ALOGx line: `ESC[..m[I][%32s][%4d]: message ESC[0m\\n`."""
    return f"{LEVEL_COLOURS[level]}[{level}][{func:>32}][{line:4d}]: {message}{END}\n"


def progress_bar(step: int, total: int, total_seconds: float, message: str, unit: str = "count") -> str:
    """The load bar after `step` of `total` steps (1-based), as cqdm's update prints it.

    The block and blank counts follow the C loops `for (i = 0; i < temp * size; i++)`, which
    round up, so an early bar is one cell wider than the width.
    """
    fraction = step / total
    blocks = _loop_count(fraction * BAR_WIDTH)
    blanks = _loop_count(BAR_WIDTH - fraction * BAR_WIDTH)
    average = total_seconds / step
    rate = 1 / average if average else float("inf")
    return (
        f"{BAR_COLOUR}\r{int(fraction * 100):3d}% | " + "█" * blocks + " " * blanks
        + f" | {step:3d} / {total:3d} [{total_seconds:2.2f}s<{average * total:2.2f}s, {rate:2.2f} {unit}/s] "
        + f"{BAR_MESSAGE_COLOUR}{message}{END}"
    )


def _loop_count(limit: float) -> int:
    """How often `for (int i = 0; i < limit; i++)` runs."""
    count = 0
    while count < limit:
        count += 1
    return count


def clock_log_line(level: str, func: str, line: int, message: str, now: float | None = None) -> str:
    """A log line of the 2026 `axllm` runner: `HH:MM:SS.mmm INF Func:line | message`."""
    now = time.time() if now is None else now
    stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
    return f"{stamp} {level} {func}:{line} | {message}\n"


class RunnerOutput:
    """stdout as the C runtime buffers it; the only writer of fd 1 in the emulator."""

    def __init__(self, fd: int = 1, terminal: bool | None = None):
        self.fd = fd
        self.terminal = os.isatty(fd) if terminal is None else terminal
        self.pending = bytearray()

    def write(self, text: str | bytes) -> None:
        self.pending += text.encode() if isinstance(text, str) else text
        if self.terminal:
            self.flush()
        elif len(self.pending) >= STDIO_BUFFER_SIZE:
            whole_blocks = len(self.pending) - len(self.pending) % STDIO_BUFFER_SIZE
            self._write_out(whole_blocks)

    def log(self, level: str, func: str, line: int, message: str) -> None:
        self.write(log_line(level, func, line, message))

    def flush(self) -> None:
        self._write_out(len(self.pending))

    def discard(self) -> None:
        """What a crash does to the buffer: whatever was not flushed never reaches the reader."""
        self.pending.clear()

    def _write_out(self, count: int) -> None:
        view = memoryview(bytes(self.pending[:count]))
        del self.pending[:count]
        while view:
            try:
                written = os.write(self.fd, view)
            except BrokenPipeError:
                return
            view = view[written:]
