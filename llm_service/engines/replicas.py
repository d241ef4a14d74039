"""One model on several cards: replicas behind one name, one queue, N slots.

A card entry with `"devices": [0, 1]` is served by one `CardEngine` per card, each running the
folder's run script with its `--devices` flag set to that card (a copy of the script in the data
folder; the runner and everything else are as published). The manager sees one engine taking N
requests at once (its admission queue holds the rest); each request goes to a free replica: the
one whose context holds its conversation if that one is free, else a ready one, else any. A
replica that crashes fails its own request only; the others keep serving.
"""
from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import anyio

from ..descriptor import ModelSpec
from ..states import SERVING_STATES
from .base import (
    Chunk, Engine, EngineCapabilities, EngineContext, EngineError, GenerationRequest, GenerationResult, PromptFormat,
)
from .card import CardEngine
from .card.config import CardConfig
from .log_ring import LogRing

_DEVICES_FLAG = re.compile(r"(--devices[ =]+)([\"']?)[0-9][0-9,]*\2")
# The state the model shows: the best any replica is in (a request can be served while one is).
_STATE_ORDER = ("ready", "outputting", "processing", "resetting", "initializing", "starting",
                "waiting_for_tokenizer", "stopping", "failed", "stopped")


def script_for_device(text: str, device: int) -> str:
    """The run script with its `--devices` flag naming `device` alone. Pure."""
    rewritten, count = _DEVICES_FLAG.subn(lambda m: f"{m.group(1)}{device}", text)
    if count == 0:
        raise ValueError("the run script has no --devices flag to pick a card with")
    return rewritten


def model_state(states: list[str]) -> str:
    return min(states, key=lambda s: _STATE_ORDER.index(s) if s in _STATE_ORDER else len(_STATE_ORDER))


class _DeviceLog:
    """A replica's log lines, into the model's one ring, each naming its card."""

    def __init__(self, ring: LogRing, device: int) -> None:
        self._ring, self._prefix = ring, f"[card {device}] "

    def append(self, text: str) -> None:
        self._ring.append(self._prefix + text)

    def tail(self, count: int | None = None) -> list[str]:  # the model's last lines, every card's
        return self._ring.tail(count)


class ReplicaEngine(Engine):
    kind: ClassVar[str] = "ax-runner-replicas"  # built by create_engine, never named in a descriptor
    config_class: ClassVar[type] = CardConfig

    def __init__(self, spec: ModelSpec, context: EngineContext) -> None:
        super().__init__(spec, context)
        config: CardConfig = spec.config  # type: ignore[assignment]
        self.devices = tuple(config.devices)
        folder = Path(context.settings.data_dir) / "replicas" / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        self.replicas: list[CardEngine] = []
        script_text = config.script_path.read_text(encoding="utf-8", errors="replace") if config.script_path else ""
        for device in self.devices:
            command = config.command
            if config.script_path is not None:
                script = folder / f"{config.script_path.stem}.card{device}.sh"
                script.write_text(script_for_device(script_text, device))
                command = tuple(str(script) if word == str(config.script_path) else word for word in command)
            replica_spec = spec.model_copy(update={"config": config.model_copy(update={"command": command})})
            replica = CardEngine(replica_spec, context)
            replica.logs = _DeviceLog(self.logs, device)  # type: ignore[assignment]
            replica.events = self.events.on_device(device)
            # The model's state gauge shows the replicas' combined state, not the last one to move.
            replica.report_state = lambda _: self.metrics.set_state(self.state)
            self.replicas.append(replica)
        self.capabilities = replace(self.replicas[0].capabilities, max_concurrency=len(self.replicas))
        self._busy: set[int] = set()  # replicas answering a request now (indexes)
        self._last_used = [0.0] * len(self.replicas)

    # ---- the replicas' life -----------------------------------------------------------------

    async def run(self) -> None:
        """No owner loop of its own: each replica runs its own, and recovers on its own."""
        async with anyio.create_task_group() as tg:
            for replica in self.replicas:
                tg.start_soon(replica.run)

    async def _handle(self, message: Any) -> None:  # nothing is posted to this engine's inbox
        raise AssertionError(f"replicas of {self.spec.name} got a message: {message!r}")

    async def _recover(self, error: Exception) -> None:
        pass

    async def start(self) -> None:
        for replica in self.replicas:
            await replica.start()

    async def wait_ready(self, deadline: float | None) -> float:
        """Ready when one replica is: the request's own replica is waited for in generate()."""
        began = time.monotonic()
        if not any(r.state in SERVING_STATES for r in self.replicas):
            await self.start()
            with anyio.fail_after(None if deadline is None else max(0.0, deadline - time.monotonic())):
                async with anyio.create_task_group() as tg:
                    async def first(replica: CardEngine) -> None:
                        try:
                            await replica.wait_ready(deadline)
                        except EngineError:
                            return
                        tg.cancel_scope.cancel()
                    for replica in self.replicas:
                        tg.start_soon(first, replica)
            if not any(r.state in SERVING_STATES for r in self.replicas):
                return await self.replicas[0].wait_ready(deadline)  # raises the first card's reason
            return time.monotonic() - began
        return 0.0

    async def stop(self, reason: str) -> None:
        for replica in self.replicas:
            await replica.stop(reason)

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.close()

    # ---- requests ----------------------------------------------------------------------------

    def _choose(self, request: GenerationRequest) -> int:
        free = [i for i in range(len(self.replicas)) if i not in self._busy]
        if not free:  # the admission queue allows one request per replica
            raise EngineError("no free replica (more requests than cards were admitted)")
        for i in free:
            if self.replicas[i].holds_conversation_of(request):
                return i  # its context holds the conversation: no reset, no prefill again
        # A new conversation: the least recently used ready replica, so that each card keeps the
        # conversation it had as long as possible.
        ready = [i for i in free if self.replicas[i].state in SERVING_STATES]
        return min(ready or free, key=lambda i: self._last_used[i])

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk | GenerationResult]:
        index = self._choose(request)
        self._busy.add(index)
        self._last_used[index] = time.monotonic()
        replica = self.replicas[index]
        try:
            await replica.wait_ready(request.deadline)
            stream = replica.generate(request)
            try:
                async for item in stream:
                    yield item
            finally:
                await stream.aclose()
        finally:
            self._busy.discard(index)

    async def prompt_format(self) -> PromptFormat:
        return await self.replicas[0].prompt_format()

    def model_facts(self) -> dict[str, Any]:
        return self.replicas[0].model_facts()

    # ---- what status shows ----------------------------------------------------------------

    @property
    def state(self) -> str:
        return model_state([r.state for r in self.replicas])

    @property
    def is_loaded(self) -> bool:
        return any(r.is_loaded for r in self.replicas)

    @property
    def is_busy(self) -> bool:
        return bool(self._busy) or any(r.is_busy for r in self.replicas)

    @property
    def claimed_npu_memory_mb(self) -> int | None:  # type: ignore[override]
        claims = [r.claimed_npu_memory_mb for r in self.replicas if r.claimed_npu_memory_mb is not None]
        return sum(claims) if claims else None

    @claimed_npu_memory_mb.setter
    def claimed_npu_memory_mb(self, value: int | None) -> None:
        pass  # the replicas' own figures are summed above

    def status(self) -> dict[str, Any]:
        replicas = []
        for device, replica in zip(self.devices, self.replicas):
            one = replica.status()
            one.pop("history", None)
            replicas.append({"device": device, **one})
        first = replicas[0]
        return {
            "name": self.spec.name, "engine": "ax-runner", "state": self.state,
            "since": min(r["since"] for r in replicas), "since_epoch": min(r["since_epoch"] for r in replicas),
            "last_error": next((r["last_error"] for r in replicas if r.get("last_error")), None),
            "history": self.transition_history()[-50:],
            "devices": list(self.devices), "replicas": replicas,
            "in_flight": [r["in_flight"] for r in replicas if r.get("in_flight")] or None,
            "context": first.get("context"), "restarts": sum(r.get("restarts", 0) for r in replicas),
            "progress": next((r["progress"] for r in replicas if r.get("progress")), None),
        }

    def transition_history(self) -> list[dict[str, Any]]:
        moves = [{**t, "device": d} for d, r in zip(self.devices, self.replicas) for t in r.transition_history()]
        return sorted(moves, key=lambda t: t["at_epoch"])

    def info(self) -> dict[str, Any]:
        info = self.replicas[0].info()
        info.update(loaded=self.is_loaded, state=self.state, device=f"npu:{','.join(map(str, self.devices))}")
        return info
