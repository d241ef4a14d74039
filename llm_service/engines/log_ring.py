"""A bounded ring of a runner's own output lines, readable and followable over HTTP.

Users see why a model failed without shell access (`GET /api/logs/{model}`).
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator

import anyio


class LogRing:
    def __init__(self, size: int = 500) -> None:
        self._lines: deque[tuple[int, float, str]] = deque(maxlen=max(1, size))
        self._next_seq = 0
        self._appended = anyio.Event()

    def append(self, line: str) -> None:
        self._lines.append((self._next_seq, time.time(), line))
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
