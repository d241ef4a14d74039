"""A bounded ring of a runner's own output lines, readable and followable over HTTP.

Users see why a model failed without shell access (`GET /api/logs/{model}`). Bounded in lines and
in characters: a runner printing megabytes per line must not grow the daemon's memory, so a long
line is kept truncated with a marker saying how much was cut.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator

import anyio


MAX_LINE_CHARS = 4096
MAX_TOTAL_CHARS = 1024 * 1024


def truncated(line: str, limit: int = MAX_LINE_CHARS) -> str:
    if len(line) <= limit:
        return line
    return f"{line[:limit]} … [{len(line) - limit} more characters cut]"


class LogRing:
    def __init__(self, size: int = 500, max_chars: int = MAX_TOTAL_CHARS) -> None:
        self._lines: deque[tuple[int, float, str]] = deque()
        self._max_lines = max(1, size)
        self._max_chars = max_chars
        self._chars = 0
        self._next_seq = 0
        self._appended = anyio.Event()

    def append(self, line: str) -> None:
        line = truncated(line)
        self._lines.append((self._next_seq, time.time(), line))
        self._chars += len(line)
        while len(self._lines) > self._max_lines or (self._chars > self._max_chars and len(self._lines) > 1):
            self._chars -= len(self._lines.popleft()[2])
        self._next_seq += 1
        self._appended.set()
        self._appended = anyio.Event()

    def tail(self, count: int | None = None) -> list[str]:
        lines = [text for _, _, text in self._lines]
        return lines if count is None else lines[-count:]

    def entries(self) -> list[dict]:
        return [{"seq": seq, "time": at, "line": text} for seq, at, text in self._lines]

    async def follow(self, after_seq: int = -1) -> AsyncIterator[tuple[int, float, str]]:
        """Yield lines with a sequence number above `after_seq`, then new ones as they come."""
        while True:
            appended = self._appended
            for seq, at, text in list(self._lines):
                if seq > after_seq:
                    after_seq = seq
                    yield seq, at, text
            await appended.wait()
