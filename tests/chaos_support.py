"""Helpers of the reliability suite: clients that classify every answer, fault phases, and
finding (and killing) the daemon's children by the test run's environment marker."""
from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ax_emulator.scripted import reply_text
from harness import net
from harness.daemon import processes_with_marker

LOG_TRACES = ("\x1b", "[I][", "[N][", "[E][", "[W][", "hit eos", "prompt >>", "GetKVCache", "SetKVCache", "ttft:")
MARKER_PATTERN = re.compile(r"chaos-\d{4}")


def marker(i: int) -> str:
    return f"chaos-{i:04d}"


@dataclass
class Outcome:
    index: int
    model: str
    kind: str  # generate | chat
    stream: bool
    disconnect: bool
    result: str = "lost"  # complete | error | disconnected | lost
    status: int | None = None
    text: str = ""
    error: str = ""
    problem: str = ""  # why an answer counts as lost or wrong
    phases: set[str] = field(default_factory=set)  # fault phases seen while it ran

    @property
    def prompt(self) -> str:
        return f"{marker(self.index)} please answer"


def _error_of(body: object) -> str | None:
    """The Ollama error shape: exactly {"error": "<non-empty text>"}."""
    if isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str) and body["error"]:
        return body["error"]
    return None


def ask(url: str, outcome: Outcome, timeout: float = 60.0) -> Outcome:
    """Send one request and classify what came back; never raises for what the daemon did."""
    if outcome.kind == "generate":
        path, body = "/api/generate", {"model": outcome.model, "prompt": outcome.prompt}
    else:
        path, body = "/api/chat", {"model": outcome.model, "messages": [{"role": "user", "content": outcome.prompt}]}
    body["stream"] = outcome.stream
    key = "response" if outcome.kind == "generate" else "message"

    def piece(obj: dict) -> str:
        value = obj.get(key)
        return (value.get("content") or "") if isinstance(value, dict) else (value or "")

    try:
        with net.client(base_url=url, timeout=timeout) as http:
            if not outcome.stream:
                reply = http.post(path, json=body)
                outcome.status = reply.status_code
                data = reply.json()
                if reply.status_code == 200:
                    if data.get("done") is True:
                        outcome.result, outcome.text = "complete", piece(data)
                    else:
                        outcome.problem = f"200 without done: {reply.text[:300]}"
                elif reply.status_code >= 400 and _error_of(data):
                    outcome.result, outcome.error = "error", _error_of(data)
                else:
                    outcome.problem = f"status {reply.status_code} body {reply.text[:300]}"
                return outcome
            with http.stream("POST", path, json=body) as reply:
                outcome.status = reply.status_code
                if reply.status_code != 200:
                    data = json.loads(reply.read())
                    if reply.status_code >= 400 and _error_of(data):
                        outcome.result, outcome.error = "error", _error_of(data)
                    else:
                        outcome.problem = f"status {reply.status_code} body {data!r:.300}"
                    return outcome
                objects = []
                for line in reply.iter_lines():
                    if not line:
                        continue
                    obj = json.loads(line)
                    objects.append(obj)
                    if outcome.disconnect and len(objects) == 1 and not obj.get("done") and "error" not in obj:
                        outcome.result, outcome.text = "disconnected", piece(obj)
                        return outcome  # leaving the block closes the connection mid-answer
            outcome.text = "".join(piece(o) for o in objects if "error" not in o)
            errors = [i for i, o in enumerate(objects) if "error" in o]
            if errors:
                if errors != [len(objects) - 1] or _error_of(objects[-1]) is None:
                    outcome.problem = f"error line not last or malformed: {objects[-3:]}"
                else:
                    outcome.result, outcome.error = "error", objects[-1]["error"]
            elif objects and objects[-1].get("done") is True and all(o.get("done") is False for o in objects[:-1]):
                outcome.result = "complete"
            else:
                outcome.problem = f"stream ended without done or error: {objects[-3:]}"
    except (httpx.HTTPError, json.JSONDecodeError, ValueError) as exc:
        outcome.problem = f"{type(exc).__name__}: {exc}"
    return outcome


def check(outcome: Outcome, words: int, garbage_phase: str = "garbage") -> str | None:
    """Why this outcome breaks the contract, or None."""
    if outcome.result == "lost":
        return f"lost: {outcome.problem}"
    foreign = {m for m in MARKER_PATTERN.findall(outcome.text + outcome.error) if m != marker(outcome.index)}
    if foreign:
        return f"carries another request's marker {sorted(foreign)}: {outcome.text[:200]!r}"
    traces = [t for t in LOG_TRACES if t in outcome.text]
    if garbage_phase in outcome.phases and "\x1b" in outcome.text:
        # The garbage fault writes random bytes as the model's text; an ESC among them is text
        # (escape sequences in an answer stay in it), not a log line that leaked.
        traces.remove("\x1b")
    if traces:
        return f"runner log traces {traces} in the answer: {outcome.text[:300]!r}"
    if outcome.result == "complete" and garbage_phase not in outcome.phases:
        expected = reply_text(outcome.prompt, words, think=False)
        if outcome.text != expected:
            return f"wrong answer {outcome.text[:200]!r} != {expected[:200]!r}"
    if outcome.result == "disconnected" and outcome.text and not reply_text(outcome.prompt, words, False).startswith(
        outcome.text
    ) and garbage_phase not in outcome.phases:
        return f"first chunk is not the start of its answer: {outcome.text!r}"
    return None


def children(marker_value: str, needle: str) -> list[int]:
    """Pids of this test daemon's descendants whose command line contains `needle`."""
    return [pid for pid, cmdline in processes_with_marker(marker_value) if needle in cmdline]


def kill_all(pids: list[int], sig: int = signal.SIGKILL) -> int:
    killed = 0
    for pid in pids:
        try:
            os.kill(pid, sig)
            killed += 1
        except ProcessLookupError:
            pass
    return killed


def wait_answer(url: str, model: str, prompt: str, words: int, timeout: float = 60.0) -> float:
    """Ask until `model` gives the exact answer; returns the seconds it took. Bounded by `timeout`."""
    started = time.monotonic()
    deadline = started + timeout
    last = ""
    with net.client(base_url=url, timeout=30) as http:
        while time.monotonic() < deadline:
            try:
                reply = http.post("/api/generate", json={"model": model, "prompt": prompt, "stream": False})
                if reply.status_code == 200 and reply.json().get("response") == reply_text(prompt, words, False):
                    return time.monotonic() - started
                last = reply.text[:300]
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
    raise AssertionError(f"{model} did not answer correctly within {timeout}s; last: {last}")


def metric_files(metrics_dir: Path) -> list[Path]:
    return sorted(metrics_dir.glob("*.prom"))
