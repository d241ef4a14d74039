"""What a person at the daemon's terminal sees: each model's load as one progress line that
updates in place (only when stderr is a terminal), with log lines printed above it.

Not on a terminal (systemd, Docker, a file) nothing here runs: the engines log one line per state
change, which is what a journal wants.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from .events import EventBus, Event

# States after which a model's progress line is done.
_LOAD_ENDS = frozenset({"ready", "failed", "stopping", "stopped"})
_ERASE_LINE = "\r\x1b[K"


def progress_text(model: str, progress: dict[str, Any], width: int = 100) -> str:
    """`qwen3-1.7b  loading  43% [#########...........]  3/7  init post axmodel ok`, at most
    `width` characters."""
    percent = progress.get("percent")
    parts = [model, "loading"]
    if isinstance(percent, (int, float)):
        filled = round(max(0, min(100, percent)) / 5)
        parts.append(f"{percent:3.0f}% [{'#' * filled}{'.' * (20 - filled)}]")
    if progress.get("total"):
        parts.append(f"{progress.get('step', '?')}/{progress['total']}")
    if progress.get("message"):
        parts.append(str(progress["message"]).strip())
    text = "  ".join(parts)
    return text if len(text) <= width else text[: width - 1] + "…"


class ProgressLines(logging.StreamHandler):
    """A log handler for a terminal that keeps one line per loading model at the bottom: a log
    record erases it, prints itself, and draws it again."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._lines: dict[str, str] = {}

    def show(self, model: str, text: str) -> None:
        self._lines[model] = text
        self._redraw()

    def done(self, model: str) -> None:
        if self._lines.pop(model, None) is not None:
            self._redraw()

    def _redraw(self) -> None:
        with self.lock:  # the handler's own lock: log records and progress do not interleave
            self.stream.write(_ERASE_LINE + "   ".join(self._lines.values()))
            self.stream.flush()

    def emit(self, record: logging.LogRecord) -> None:
        if not self._lines:
            super().emit(record)
            return
        with self.lock:
            self.stream.write(_ERASE_LINE)
        super().emit(record)
        self._redraw()


def on_terminal(stream: TextIO = sys.stderr) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def apply(event: Event, lines: ProgressLines) -> None:
    """One event's effect on the progress lines."""
    if event.model is None:
        return
    if event.type == "progress":
        lines.show(event.model, progress_text(event.model, event.data))
    elif event.type == "state" and event.data.get("to") in _LOAD_ENDS:
        lines.done(event.model)


async def follow_loads(bus: EventBus, lines: ProgressLines) -> None:
    """Keep the progress lines in step with the events, for the daemon's life."""
    position = bus.last_id
    while True:
        await bus.wait_after(position, 60)
        events, _ = bus.read(position, types=("progress", "state"))
        position = bus.last_id
        for event in events:
            apply(event, lines)


def progress_handler() -> ProgressLines | None:
    """The root logger's progress-line handler, when logging was set up on a terminal."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ProgressLines):
            return handler
    return None
