"""The daemon's own routes: model states, liveness and readiness, runner logs, metrics."""
from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

router = APIRouter()


_NO_JOBS = {"queued": 0, "running": 0, "done": 0}


@router.get("/api/status")
async def status_all(request: Request) -> dict[str, Any]:
    """The models' states; with each, its batch items (queued, running, done since start)."""
    body = request.app.state.manager.status()
    jobs = request.app.state.jobs.status()
    for model in body["models"]:
        model["jobs"] = {**_NO_JOBS, **jobs["models"].get(model["name"], {})}
    body["jobs"] = {"store_open": jobs["store_open"]}
    return body


@router.get("/api/status/{model:path}")
async def status_one(request: Request, model: str) -> dict[str, Any]:
    body = request.app.state.manager.model_status(model)
    body["jobs"] = {**_NO_JOBS, **request.app.state.jobs.status()["models"].get(body.get("name", model), {})}
    return body


@router.get("/api/status_history/{model:path}")
async def status_history(request: Request, model: str) -> dict[str, Any]:
    engine = request.app.state.manager.engine(model)
    return {"model": engine.spec.name, "state": engine.state, "history": engine.transition_history()}


@router.get("/health")
async def health() -> dict[str, str]:
    """The daemon is alive. Whether models serve is /ready's and /api/status's business."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    ok, problems, warnings = request.app.state.manager.readiness()
    return JSONResponse({"ready": ok, "problems": problems, "warnings": warnings}, status_code=200 if ok else 503)


@router.get("/api/logs/{model:path}")
async def logs(request: Request, model: str, follow: bool = False, after: int = -1) -> Response:
    """The runner's own output (bounded ring). `follow=true` streams new lines as NDJSON."""
    ring = request.app.state.manager.engine(model).logs
    if not follow:
        return JSONResponse({"model": model, "lines": [e for e in ring.entries() if e["seq"] > after]})

    async def lines():
        async for seq, at, text in ring.follow(after):
            yield (json.dumps({"seq": seq, "time": at, "line": text}) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
