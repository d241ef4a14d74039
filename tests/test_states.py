"""The runner state machine: every allowed and every forbidden move, history bound, snapshot."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from llm_service.states import (
    ALLOWED_TRANSITIONS,
    IllegalTransition,
    RunnerState,
    StateMachine,
)

S = RunnerState

# Written out independently of the module so a slip in either shows up.
EXPECTED = {
    S.STOPPED: {S.WAITING_FOR_TOKENIZER, S.STARTING},
    S.WAITING_FOR_TOKENIZER: {S.STARTING, S.FAILED, S.STOPPING},
    S.STARTING: {S.INITIALIZING, S.FAILED, S.STOPPING},
    S.INITIALIZING: {S.READY, S.FAILED, S.STOPPING},
    S.READY: {S.PROCESSING, S.RESETTING, S.STOPPING, S.FAILED},
    S.RESETTING: {S.READY, S.FAILED, S.STOPPING},
    S.PROCESSING: {S.OUTPUTTING, S.READY, S.FAILED, S.STOPPING},
    S.OUTPUTTING: {S.READY, S.FAILED, S.STOPPING},
    S.STOPPING: {S.STOPPED},
    S.FAILED: {S.WAITING_FOR_TOKENIZER, S.STARTING, S.STOPPING, S.STOPPED},
}

# A shortest legal path from STOPPED to each state, to put a fresh machine there.
PATH_TO = {
    S.STOPPED: [],
    S.WAITING_FOR_TOKENIZER: [S.WAITING_FOR_TOKENIZER],
    S.STARTING: [S.STARTING],
    S.INITIALIZING: [S.STARTING, S.INITIALIZING],
    S.READY: [S.STARTING, S.INITIALIZING, S.READY],
    S.RESETTING: [S.STARTING, S.INITIALIZING, S.READY, S.RESETTING],
    S.PROCESSING: [S.STARTING, S.INITIALIZING, S.READY, S.PROCESSING],
    S.OUTPUTTING: [S.STARTING, S.INITIALIZING, S.READY, S.PROCESSING, S.OUTPUTTING],
    S.STOPPING: [S.STARTING, S.STOPPING],
    S.FAILED: [S.STARTING, S.FAILED],
}


class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def machine_in(state: RunnerState) -> StateMachine:
    machine = StateMachine(clock=FakeClock())
    for step in PATH_TO[state]:
        machine.transition(step, "setup")
    assert machine.state == state
    return machine


def test_table_matches_specification() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(RunnerState)
    assert {k: set(v) for k, v in ALLOWED_TRANSITIONS.items()} == EXPECTED


def test_failed_is_not_terminal() -> None:
    assert ALLOWED_TRANSITIONS[S.FAILED]


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(RunnerState, RunnerState)))
def test_every_pair(src: RunnerState, dst: RunnerState) -> None:
    machine = machine_in(src)
    allowed = dst in EXPECTED[src]
    assert machine.can(dst) is allowed
    before = len(machine.history)
    if allowed:
        move = machine.transition(dst, "because", code=3)
        assert machine.state == dst
        assert (move.from_state, move.to_state, move.reason) == (src, dst, "because")
        assert move.details == {"code": 3}
        assert machine.history[-1] == move
        assert machine.since == move.at
    else:
        with pytest.raises(IllegalTransition) as info:
            machine.transition(dst, "because")
        message = str(info.value)
        assert str(src) in message and str(dst) in message and "because" in message
        assert machine.state == src
        assert len(machine.history) == before


def test_initial_state_and_since() -> None:
    machine = StateMachine(clock=lambda: 42.0)
    assert machine.state == S.STOPPED
    assert machine.since == 42.0
    assert machine.history == []


def test_history_is_bounded_oldest_first() -> None:
    machine = StateMachine(clock=FakeClock(), history_size=5)
    for i in range(10):
        machine.transition(S.STARTING, f"start {i}")
        machine.transition(S.STOPPING, f"stop {i}")
        machine.transition(S.STOPPED, f"stopped {i}")
    history = machine.history
    assert len(history) == 5
    assert [m.reason for m in history] == ["stop 8", "stopped 8", "start 9", "stop 9", "stopped 9"]
    assert [m.at for m in history] == sorted(m.at for m in history)


def test_history_copy_does_not_alias() -> None:
    machine = machine_in(S.STARTING)
    machine.history.clear()
    assert len(machine.history) == 1


def test_snapshot_is_json_ready() -> None:
    machine = StateMachine(clock=FakeClock(1_700_000_000.0))
    machine.transition(S.STARTING, "request", path=Path("x"), pid=12)
    snap = json.loads(json.dumps(machine.snapshot()))
    assert snap["state"] == "starting"
    assert snap["since_epoch"] == 1_700_000_002.0
    assert snap["since"] == "2023-11-14T22:13:22Z"
    assert snap["history"] == [{
        "at": "2023-11-14T22:13:22Z",
        "at_epoch": 1_700_000_002.0,
        "from": "stopped",
        "to": "starting",
        "reason": "request",
        "details": {"path": "x", "pid": 12},
    }]
