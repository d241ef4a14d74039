"""The daemon's live events: state changes, load progress, queue changes, requests, jobs.

One bounded ring of events with increasing ids, written by whoever has news (`publish` never
blocks and never waits for a reader) and read by `/api/events` (Server-Sent Events), which resumes
from a client's `Last-Event-ID` while that id is still in the ring and says `gap` otherwise.
Readers hold no queue of their own: a slow reader costs nothing but its place in the ring.
"""
from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import anyio

from .timestamps import rfc3339

EVENT_TYPES = ("state", "progress", "queue", "request", "job")


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    type: str
    model: str | None
    at: float
    data: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        # The envelope last: a publisher's field can never pass for the event's own.
        return {**self.data, "id": self.id, "type": self.type, "model": self.model, "at": rfc3339(self.at)}


def sse_frame(event: Event) -> bytes:
    """One event as Server-Sent Events write it (`id`, `event`, one `data` line of JSON)."""
    data = json.dumps(event.as_dict(), separators=(",", ":"), default=str)
    return f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n".encode()


def sse_comment(text: str) -> bytes:
    """A comment line: ignored by clients, it keeps proxies from closing an idle stream."""
    return f": {text}\n\n".encode()


def sse_gap(after: int, oldest_kept: int | None) -> bytes:
    """Said to a client resuming after an event no longer kept: what it missed is gone."""
    data = json.dumps({"after": after, "oldest_kept": oldest_kept})
    return f"event: gap\ndata: {data}\n\n".encode()


def parse_last_event_id(value: str | None) -> int | None:
    """The id a reconnecting client sends; None when absent or not one of ours (start afresh)."""
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() else None


class EventBus:
    def __init__(self, size: int = 2048, clock: Callable[[], float] = time.time) -> None:
        self._ring: deque[Event] = deque(maxlen=max(1, size))
        self._clock = clock
        self._last_id = 0
        self._changed: anyio.Event | None = None

    @property
    def last_id(self) -> int:
        return self._last_id

    @property
    def oldest_id(self) -> int | None:
        return self._ring[0].id if self._ring else None

    def publish(self, type: str, model: str | None, **data: Any) -> Event:
        self._last_id += 1
        event = Event(self._last_id, type, model, self._clock(), data)
        self._ring.append(event)
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        return event

    def for_model(self, model: str) -> ModelEvents:
        return ModelEvents(self, model)

    def read(self, after: int, model: str | None = None,
             types: Collection[str] | None = None) -> tuple[list[Event], bool]:
        """The events after id `after` that pass the filters, and whether some events after
        `after` have already left the ring (the reader missed them)."""
        missed = bool(self._ring) and self._ring[0].id > after + 1
        events = [
            e for e in self._ring
            if e.id > after and (model is None or e.model == model) and (types is None or e.type in types)
        ]
        return events, missed

    async def wait_after(self, after: int, timeout: float) -> bool:
        """Wait until an event with an id above `after` exists (True) or `timeout` passes (False)."""
        if self._last_id > after:
            return True
        if self._changed is None:
            self._changed = anyio.Event()
        with anyio.move_on_after(timeout):
            await self._changed.wait()
        return self._last_id > after


class ModelEvents:
    """The bus as one model's engine and requests publish on it; a replica's (one card of a
    model served on several) name its card in every event (`device`)."""

    __slots__ = ("_bus", "model", "device")

    def __init__(self, bus: EventBus | None, model: str, device: int | None = None) -> None:
        self._bus = bus
        self.model = model
        self.device = device

    def on_device(self, device: int) -> ModelEvents:
        return ModelEvents(self._bus, self.model, device)

    def publish(self, type: str, **data: Any) -> None:
        if self._bus is not None:
            if self.device is not None:
                data["device"] = self.device
            self._bus.publish(type, self.model, **data)


# For engines built without a bus (tests that construct one engine directly).
NO_EVENTS = ModelEvents(None, "")
