"""Device memory budgets: which idle models to unload so that another one fits. Pure.

The card has one budget (its CMM, `npu_memory_mb`); each GPU has its own (`gpu_memory_mb` per
device in the settings, a model's share in its descriptor entry). A model that does not fit
unloads the least recently used idle models on the same device until it does; busy models are
never unloaded.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Holding:
    """A loaded model's claim on one device."""

    name: str
    megabytes: int
    last_used: float
    idle: bool  # nothing queued, nothing streaming: may be unloaded


@dataclass(frozen=True, slots=True)
class RoomPlan:
    victims: tuple[str, ...]  # unload these, in this order
    fits: bool  # after that, the model fits
    free_after: int  # MB free once the victims are gone


def plan_room(need: int, budget: int, loaded: Iterable[Holding]) -> RoomPlan:
    """Least recently used idle models first, only as many as needed."""
    holdings = sorted(loaded, key=lambda h: h.last_used)
    used = sum(h.megabytes for h in holdings)
    victims: list[str] = []
    for holding in holdings:
        if used + need <= budget:
            break
        if holding.idle and holding.megabytes:
            victims.append(holding.name)
            used -= holding.megabytes
    if used + need > budget:
        return RoomPlan((), False, budget - used)  # unloading would not be enough: unload nothing
    return RoomPlan(tuple(victims), True, budget - used)
