"""Async single requests (seed 002's `/agenerate`): any generation body as a job, its id at once,
its result later — polled, or waited for.

    POST /api/jobs      {"endpoint": "/api/generate" | "/api/chat" | "/v1/chat/completions" |
                         "/v1/completions" | "/v1/embeddings", "body": {...}}
    POST /agenerate     an /api/generate body, as a job
    GET  /api/jobs/{id}?wait=30   its status; once done, `result`: the route's own answer

The job is one item of the job store, run by the job runner behind interactive requests, its
answer the one the route gives with `stream: false`; it survives restarts like a batch.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..engines.base import BadRequest, EngineError
from ..timestamps import rfc3339

router = APIRouter()

ASYNC_JOB_KEY = "async"  # the metadata key of an async job (its value: the endpoint)
ENDPOINTS = ("/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions", "/v1/embeddings")
_FINISHED = ("completed", "failed", "cancelled", "expired")
MAX_WAIT_S = 300.0


async def _submit(request: Request, endpoint: str, body: Any) -> JSONResponse:
    from ..jobs.batch_input import BatchRequest

    if endpoint not in ENDPOINTS:
        raise BadRequest(f"endpoint must be one of {', '.join(ENDPOINTS)}, not {endpoint!r}")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise BadRequest("body must be an object with the model")
    if body.get("stream"):
        raise BadRequest("an async job is not streamed: its answer is kept whole (leave stream out)")
    manager = request.app.state.manager
    model = manager.resolve(body["model"])  # 404 now, not a failed job later
    runner = request.app.state.jobs
    job = await runner.call("create_job", endpoint, None, "24h", 86400.0, {ASYNC_JOB_KEY: endpoint})
    job = await runner.call("begin_job", job.id, model, [BatchRequest(1, "request", {**body, "stream": False})], ())
    runner.wake()
    return JSONResponse(await _job_object(runner, job), status_code=202)


async def _job_object(runner: Any, job: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {"id": job.id, "endpoint": job.endpoint, "model": job.model, "status": job.status,
                              "created_at": rfc3339(job.created_at)}
    if job.status in _FINISHED:
        items = await runner.call("job_items", job.id)
        result = items[0].result if items else None
        if result is not None:
            answer["status_code"] = result["status_code"]
            if 200 <= result["status_code"] < 300:
                answer["result"] = result["body"]
            else:
                answer["status"] = "failed"
                answer["error"] = result["body"]
        elif items and items[0].error:
            answer["status"] = "failed" if job.status == "completed" else job.status
            answer["error"] = items[0].error.get("message")
    return answer


@router.post("/api/jobs", status_code=202)
async def submit(request: Request) -> JSONResponse:
    try:
        raw = await request.json()
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    if not isinstance(raw, dict):
        raise BadRequest('send {"endpoint": ..., "body": {...}}')
    return await _submit(request, raw.get("endpoint"), raw.get("body"))


@router.post("/agenerate", status_code=202)
async def agenerate(request: Request) -> JSONResponse:
    try:
        raw = await request.json()
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    return await _submit(request, "/api/generate", raw)


@router.get("/api/jobs/{job_id}")
async def job_status(request: Request, job_id: str, wait: float = 0.0) -> JSONResponse:
    """The job's status; with `wait`, up to that many seconds (at most 300) for it to finish."""
    runner = request.app.state.jobs
    job = await runner.call("get_job", job_id)
    if ASYNC_JOB_KEY not in (job.metadata or {}):
        raise EngineError(f"no async job {job_id!r}", status_code=404)
    if wait > 0 and job.status not in _FINISHED:
        job = await runner.wait_finished(job_id, min(wait, MAX_WAIT_S))
    return JSONResponse(await _job_object(runner, job))
