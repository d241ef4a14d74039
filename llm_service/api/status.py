"""The daemon's own routes: model states, liveness and readiness, runner logs, metrics."""
from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engines.base import BadRequest, ModelUnavailable
from ..events import EVENT_TYPES, parse_last_event_id, sse_comment, sse_frame, sse_gap

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


def _verdict(request: Request, model: str, key: str) -> JSONResponse:
    try:
        verdict = request.app.state.manager.model_readiness(model)
    except ModelUnavailable as exc:  # disabled in the descriptor
        return JSONResponse({"model": model, "healthy": False, "ready": False, "reason": exc.message},
                            status_code=503, headers={"Retry-After": "30"})
    ok = verdict[key]
    return JSONResponse(verdict, status_code=200 if ok else 503, headers=None if ok else {"Retry-After": "1"})


@router.get("/health/{model:path}")
async def model_health(request: Request, model: str) -> JSONResponse:
    """The model serves or can load (200), or it has failed or is disabled (503): for a router's
    health checks, per model."""
    return _verdict(request, model, "healthy")


@router.get("/ready/{model:path}")
async def model_ready(request: Request, model: str) -> JSONResponse:
    """The model answers now, without a load, and its queue has room (200); else 503 with
    Retry-After and the reason."""
    return _verdict(request, model, "ready")


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


@router.get("/api/events")
async def events(
    request: Request,
    model: str | None = None,
    types: str | None = None,
    last_event_id: str | None = Header(None, description="resume after this event (EventSource sends it)"),
) -> StreamingResponse:
    """Live events as Server-Sent Events: `state` (every transition with its reason), `progress`
    (a load's percent, step, message), `queue` (waiting and running per model), `request`
    (queued, started, finished with token counts and speed, refused, left_queue). `model` and
    `types` (comma-separated) filter; a client that reconnects with `Last-Event-ID` gets what it
    missed while it is still kept, else a `gap` event first (read /api/status again)."""
    manager = request.app.state.manager
    bus = manager.events
    wanted = None
    if types:
        wanted = {t.strip() for t in types.split(",") if t.strip()}
        unknown = sorted(wanted - set(EVENT_TYPES))
        if unknown:
            raise BadRequest(f"unknown event types {', '.join(unknown)}; known: {', '.join(EVENT_TYPES)}")
    name = manager.resolve(model) if model else None
    after = parse_last_event_id(last_event_id)
    heartbeat_s = request.app.state.settings.events_heartbeat_s

    async def stream():
        position = bus.last_id if after is None else after
        yield sse_comment("axm1-llm events")  # the headers go out now, not with the first event
        while True:
            found, missed = bus.read(position, name, wanted)
            if missed:
                yield sse_gap(position, bus.oldest_id)
            for event in found:
                yield sse_frame(event)
            position = bus.last_id
            if not await bus.wait_after(position, heartbeat_s):
                yield sse_comment("keep-alive")

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)
