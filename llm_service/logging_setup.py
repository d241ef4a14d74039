"""Logging for the daemon and the tokenizer service: plain text or JSON lines on stderr.

`request_id_var` holds the id of the request being served; every log line written while it is
set carries it, so one request can be followed through the log.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import datetime, timezone

from .terminal import ProgressLines, on_terminal

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged too.
_STANDARD_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {
    "message", "asctime", "color_message",  # uvicorn adds color_message, a copy with ANSI codes
}


class PlainFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = request_id_var.get()
        return f"{line} [request {request_id}]" if request_id else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD_RECORD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class RepeatLimit(logging.Filter):
    """Lets through at most `burst` warnings (or worse) of one message template per `window_s`
    seconds, then one line saying how many were held back: a storm (a client flood, a failing
    accept) must not fill the disk. Info lines (the access log) are not limited."""

    def __init__(self, burst: int = 10, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.window_s, self._clock = burst, window_s, clock
        self._windows: dict[tuple[str, str], tuple[float, int]] = {}  # (logger, template) -> (start, count)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        now = self._clock()
        start, count = self._windows.get(key, (now, 0))
        if now - start >= self.window_s:
            if count > self.burst:
                record.msg = f"{record.msg} [{count - self.burst} more like this in the last {self.window_s:g}s held back]"
            start, count = now, 0
        count += 1
        self._windows[key] = (start, count)
        if len(self._windows) > 1000:  # templates are few; this only bounds a pathological case
            self._windows.clear()
        return count <= self.burst


# Requests that monitors, the page and probes repeat every few seconds: below debug, their
# successful answers leave no access-log line (errors still do).
# The daemon's own polling of the tokenizer service (/tokenizers/…) is among them.
QUIET_PATHS = ("/api/status", "/health", "/ready", "/metrics", "/api/events", "/api/logs/", "/ui", "/tokenizers")


class QuietPolling(logging.Filter):
    def __init__(self, quiet: bool = True) -> None:
        super().__init__()
        self.quiet = quiet

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.quiet or record.name != "uvicorn.access":
            return True
        args = record.args
        # uvicorn's access record: (client, method, path with query, HTTP version, status)
        if not isinstance(args, tuple) or len(args) != 5:
            return True
        _, method, path, _, status = args
        polled = method in ("GET", "HEAD") and str(path).startswith(QUIET_PATHS)
        return not (polled and isinstance(status, int) and status < 400)


def configure_logging(level: str = "info", fmt: str = "plain") -> None:
    """Send every logger (uvicorn's included, run with log_config=None) to stderr in `fmt`; on a
    terminal (plain format), with a progress line per loading model at the bottom."""
    handler = ProgressLines(sys.stderr) if fmt == "plain" and on_terminal(sys.stderr) else logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    handler.addFilter(RepeatLimit())
    debug = level.lower() == "debug"
    handler.addFilter(QuietPolling(quiet=not debug))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's own loggers may have handlers from an earlier configuration; ours is the only one.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    # httpx logs every request it makes at info (the tokenizer service, upstream probes): noise
    # unless one is debugging.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
