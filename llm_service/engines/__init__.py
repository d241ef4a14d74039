"""The registry of engine kinds: the descriptor's `engine` value names one of these classes.

Each class brings its descriptor fields (`config_class`) and is built as `cls(spec, context)`.
Adding an engine is one module defining an `Engine` subclass, plus one line here.
"""
from __future__ import annotations

from ..descriptor import EngineConfig, ModelSpec
from .base import Engine, EngineContext
from .card import CardEngine
from .http import HttpEngine
from .inprocess import InProcessEngine

ENGINES: dict[str, type[Engine]] = {
    engine.kind: engine
    for engine in (
        CardEngine,
        HttpEngine,
        InProcessEngine,
    )
}
ENGINE_CONFIGS: dict[str, type[EngineConfig]] = {kind: engine.config_class for kind, engine in ENGINES.items()}


def create_engine(spec: ModelSpec, context: EngineContext) -> Engine:
    if len(getattr(spec.config, "devices", ())) > 1:
        from .replicas import ReplicaEngine  # one card model on several cards

        return ReplicaEngine(spec, context)
    return ENGINES[spec.engine](spec, context)
