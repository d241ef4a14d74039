"""The daemon's ASGI app in the test process, with in-process engines: routes, admission, the
model manager and their error shapes tested in milliseconds. The end-to-end tests run the real
daemon, runners and upstreams as processes; these do not replace them."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from llm_service.app import create_app
from llm_service.engines.inprocess import InProcessEngine
from llm_service.models import ModelManager
from llm_service.settings import DaemonSettings


def inprocess_model(name: str, **fields: Any) -> dict[str, Any]:
    """A descriptor entry of the in-process engine, in the descriptor's string format."""
    return {"model_name": name, "engine": "in-process", **{k: str(v) if not isinstance(v, (dict, list)) else v
                                                          for k, v in fields.items()}}


@dataclass
class App:
    http: httpx.AsyncClient
    manager: ModelManager
    metrics_dir: Path

    def engine(self, name: str) -> InProcessEngine:
        engine = self.manager.engine(name)
        assert isinstance(engine, InProcessEngine)
        return engine

    async def ndjson(self, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        reply = await self.http.post(path, json=body)
        assert reply.status_code == 200, reply.text
        return [json.loads(line) for line in reply.text.splitlines() if line]


@asynccontextmanager
async def running_app(tmp_path: Path, entries: list[dict[str, Any]], **settings: Any) -> AsyncIterator[App]:
    descriptor = tmp_path / "model-descriptor.json"
    descriptor.write_text(json.dumps(entries))
    values = dict(
        descriptor=descriptor, metrics_dir=tmp_path / "metrics", backoff_min_s=0.05, backoff_max_s=0.2,
        stop_grace_s=0.5, descriptor_poll_s=60,
    )
    values.update(settings)
    app = create_app(DaemonSettings(**values))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://daemon", timeout=30) as http:
            yield App(http, app.state.manager, tmp_path / "metrics")
