"""The runner's life-cycle state machine: the states, the allowed moves, and a bounded history.

Pure: no I/O, time comes from an injected clock. One owner task drives it; readers only look.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Callable, Mapping

from .timestamps import rfc3339


class RunnerState(StrEnum):
    STOPPED = "stopped"
    WAITING_FOR_TOKENIZER = "waiting_for_tokenizer"
    STARTING = "starting"
    INITIALIZING = "initializing"
    READY = "ready"
    RESETTING = "resetting"
    PROCESSING = "processing"
    OUTPUTTING = "outputting"
    STOPPING = "stopping"
    FAILED = "failed"


S = RunnerState
# The states in which a model is loaded and answering or able to answer.
SERVING_STATES: frozenset[str] = frozenset({S.READY, S.RESETTING, S.PROCESSING, S.OUTPUTTING})
# FAILED is not terminal: it means "the last attempt failed; a restart is scheduled".
ALLOWED_TRANSITIONS: Mapping[RunnerState, frozenset[RunnerState]] = MappingProxyType({
    S.STOPPED:               frozenset({S.WAITING_FOR_TOKENIZER, S.STARTING}),
    S.WAITING_FOR_TOKENIZER: frozenset({S.STARTING, S.FAILED, S.STOPPING}),
    S.STARTING:              frozenset({S.INITIALIZING, S.FAILED, S.STOPPING}),
    S.INITIALIZING:          frozenset({S.READY, S.FAILED, S.STOPPING}),
    S.READY:                 frozenset({S.PROCESSING, S.RESETTING, S.STOPPING, S.FAILED}),
    S.RESETTING:             frozenset({S.READY, S.FAILED, S.STOPPING}),
    S.PROCESSING:            frozenset({S.OUTPUTTING, S.READY, S.FAILED, S.STOPPING}),
    S.OUTPUTTING:            frozenset({S.READY, S.FAILED, S.STOPPING}),
    S.STOPPING:              frozenset({S.STOPPED}),
    S.FAILED:                frozenset({S.WAITING_FOR_TOKENIZER, S.STARTING, S.STOPPING, S.STOPPED}),
})
del S


def _json_ready(value: Any) -> Any:
    # Details come from the supervisor (exit codes, paths, exceptions): keep JSON types, stringify the rest.
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return str(value)


@dataclass(frozen=True)
class Transition:
    at: float
    from_state: RunnerState
    to_state: RunnerState
    reason: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": rfc3339(self.at),
            "at_epoch": self.at,
            "from": str(self.from_state),
            "to": str(self.to_state),
            "reason": self.reason,
            "details": {key: _json_ready(value) for key, value in self.details.items()},
        }


class IllegalTransition(Exception):
    def __init__(self, from_state: RunnerState, to_state: RunnerState, reason: str) -> None:
        super().__init__(f"illegal transition {from_state} -> {to_state} (reason: {reason})")
        self.from_state = from_state
        self.to_state = to_state
        self.reason = reason


class StateMachine:
    def __init__(self, clock: Callable[[], float] = time.time, history_size: int = 200) -> None:
        if history_size < 1:
            raise ValueError("history_size must be at least 1")
        self._clock = clock
        self._state = RunnerState.STOPPED
        self._since = clock()
        self._history: deque[Transition] = deque(maxlen=history_size)

    @property
    def state(self) -> RunnerState:
        return self._state

    @property
    def since(self) -> float:
        return self._since

    @property
    def history(self) -> list[Transition]:
        return list(self._history)

    def can(self, to: RunnerState) -> bool:
        return to in ALLOWED_TRANSITIONS[self._state]

    def transition(self, to: RunnerState, reason: str, **details: Any) -> Transition:
        to = RunnerState(to)
        if not self.can(to):
            raise IllegalTransition(self._state, to, reason)
        now = self._clock()
        move = Transition(now, self._state, to, reason, MappingProxyType(dict(details)))
        self._history.append(move)
        self._state = to
        self._since = now
        return move

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": str(self._state),
            "since": rfc3339(self._since),
            "since_epoch": self._since,
            "history": [move.as_dict() for move in self._history],
        }
