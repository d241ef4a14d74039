"""The daemon's own model routes, the same for every engine: what a model is and whether it is
loaded (device, base model, adapter), and explicit load and unload — besides Ollama's empty
prompt and `keep_alive: 0`, which do the same through /api/generate."""
from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

router = APIRouter()


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep_alive: str | int | float | None = None  # Ollama's syntax; unset = the model's default


@router.get("/api/models/{model:path}/info")
@router.get("/api/models/{model:path}")
async def model_info(request: Request, model: str) -> dict[str, Any]:
    return request.app.state.manager.model_info(model)


@router.post("/api/models/{model:path}/load")
async def load(request: Request, model: str, body: LoadRequest | None = None) -> dict[str, Any]:
    manager = request.app.state.manager
    began = time.monotonic()
    deadline = began + manager.settings.request_deadline_s
    load_seconds = await manager.load(model, body.keep_alive if body else None, deadline)
    return {"model": manager.resolve(model), "loaded": True, "load_duration": round(load_seconds, 6),
            "info": manager.model_info(model)}


@router.post("/api/models/{model:path}/unload")
async def unload(request: Request, model: str) -> dict[str, Any]:
    manager = request.app.state.manager
    await manager.unload(model)
    return {"model": manager.resolve(model), "loaded": False, "info": manager.model_info(model)}
