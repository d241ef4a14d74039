"""OpenAI's Files and Batch APIs under /v1: files, batches, their objects in OpenAI's shapes.

The job store and the runner are `jobs/` (the store is opened by the first request here when no
jobs database existed yet). Errors are OpenAI's envelope: a missing file or batch 404, a bad
request 400, a file over job_file_max_bytes 413, a full disk 507, a store that cannot be used 503
(the interactive API serves on either way). A bad JSONL line never fails a request: it is an
error-file line with its line number.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ...jobs.runner import JobRunner, JobsError
from ..errors import DISK_FULL, drain_body

router = APIRouter()

BATCH_PURPOSES = ("batch", "batch_output")
# OpenAI accepts these purposes; this daemon runs only batches, but stores any of them.
UPLOAD_PURPOSES = ("batch", "fine-tune", "assistants", "vision", "user_data", "evals")


def _runner(request: Request) -> JobRunner:
    return request.app.state.jobs


def _ts(value: float | None) -> int | None:
    return None if value is None else int(value)


def file_object(stored: Any) -> dict[str, Any]:
    return {
        "id": stored.id,
        "object": "file",
        "bytes": stored.bytes,
        "created_at": int(stored.created_at),
        "expires_at": _ts(stored.expires_at),
        "filename": stored.filename,
        "purpose": stored.purpose,
        "status": "processed",
        "status_details": None,
    }


def batch_object(job: Any) -> dict[str, Any]:
    finished = _ts(job.finished_at)
    status = job.status
    counts = job.counts
    return {
        "id": job.id,
        "object": "batch",
        "endpoint": job.endpoint,
        "model": job.model,
        "errors": {"object": "list", "data": list(job.errors)} if job.errors else None,
        "input_file_id": job.input_file_id,
        "completion_window": job.completion_window,
        "status": status,
        "output_file_id": job.output_file_id,
        "error_file_id": job.error_file_id,
        "created_at": int(job.created_at),
        "in_progress_at": _ts(job.in_progress_at),
        "expires_at": _ts(job.expires_at),
        "finalizing_at": _ts(job.finalizing_at),
        "completed_at": finished if status == "completed" else None,
        "failed_at": finished if status == "failed" else None,
        "expired_at": finished if status == "expired" else None,
        "cancelling_at": _ts(job.cancelling_at),
        "cancelled_at": finished if status == "cancelled" else None,
        # OpenAI's three counts; items cancelled or expired before they ran count as failed.
        "request_counts": {
            "total": counts.total,
            "completed": counts.completed,
            "failed": counts.failed + counts.cancelled + counts.expired,
        },
        "metadata": job.metadata or None,
    }


# ---- files -------------------------------------------------------------------------------------


@router.post("/v1/files")
async def create_file(request: Request) -> Response:
    runner = _runner(request)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise JobsError("upload the file as multipart/form-data with the fields `file` and `purpose`", 400,
                        "invalid_request")
    limit = request.app.state.settings.job_file_max_bytes
    # python-multipart is imported here, by the first upload (the daemon's idle memory).
    try:
        form = await request.form(max_files=1, max_fields=8)
    except OSError as exc:  # spooling the upload to disk ran out of room
        if exc.errno not in DISK_FULL:
            raise
        await drain_body(request)  # the client then reads this answer, not a reset connection
        raise JobsError(f"insufficient storage: no room to receive the upload ({exc.strerror})", 507,
                        "insufficient_storage") from None
    try:
        purpose = form.get("purpose")
        upload = form.get("file")
        if not isinstance(purpose, str) or purpose not in UPLOAD_PURPOSES:
            raise JobsError(f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}, not {purpose!r}", 400,
                            "invalid_request", "purpose")
        if upload is None or isinstance(upload, str):
            raise JobsError("the field `file` must be a file", 400, "invalid_request", "file")
        if upload.size is not None and upload.size > limit:
            raise JobsError(f"the file is larger than {limit} bytes (job_file_max_bytes)", 413, "file_too_large", "file")
        filename = upload.filename or "upload.jsonl"
        source = upload.file  # spooled to disk by the form parser: copied in chunks, never whole
        source.seek(0)
        chunks = iter(lambda: source.read(1024 * 1024), b"")
        stored = await runner.call("add_file", purpose, filename, chunks)
    finally:
        await form.close()
    return JSONResponse(file_object(stored))


@router.get("/v1/files")
async def list_files(request: Request, purpose: str | None = None, limit: int = 10000, after: str | None = None,
                     order: str = "desc") -> dict[str, Any]:
    files = await _runner(request).call("list_files", purpose or None)
    # Oldest first from the store; OpenAI lists newest first unless order=asc.
    if order != "asc":
        files.reverse()
    if after:
        ids = [f.id for f in files]
        files = files[ids.index(after) + 1:] if after in ids else []
    page = files[:max(1, min(limit, 10000))]
    return {"object": "list", "data": [file_object(f) for f in page], "has_more": len(files) > len(page),
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}


@router.get("/v1/files/{file_id}")
async def get_file(request: Request, file_id: str) -> dict[str, Any]:
    return file_object(await _runner(request).call("get_file", file_id))


@router.get("/v1/files/{file_id}/content")
async def file_content(request: Request, file_id: str) -> Response:
    runner = _runner(request)
    stored = await runner.call("get_file", file_id)
    data = await runner.call("file_bytes", file_id)
    return Response(data, media_type="application/jsonl" if stored.filename.endswith(".jsonl") else "application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, file_id: str) -> dict[str, Any]:
    deleted = await _runner(request).call("delete_file", file_id)
    if not deleted:
        raise JobsError(f"no file {file_id!r}", 404, "not_found")
    return {"id": file_id, "object": "file", "deleted": True}


# ---- batches -----------------------------------------------------------------------------------


async def _batch_body(request: Request) -> dict[str, Any]:
    """POST /v1/batches's body, checked by hand (a pydantic model here costs idle memory)."""
    try:
        body = await request.json()
    except ValueError:
        raise JobsError("invalid request: the body is not JSON", 400, "invalid_request") from None
    if not isinstance(body, dict):
        raise JobsError("invalid request: the body must be a JSON object", 400, "invalid_request")
    for name in ("input_file_id", "endpoint"):
        if not isinstance(body.get(name), str) or not body[name]:
            raise JobsError(f"invalid request: {name} must be a non-empty string", 400, "invalid_request", name)
    window = body.get("completion_window", "24h")
    if not isinstance(window, str):
        raise JobsError("invalid request: completion_window must be a string", 400, "invalid_request",
                        "completion_window")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict)
                                 or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise JobsError("invalid request: metadata must map strings to strings", 400, "invalid_request", "metadata")
    if metadata is not None and len(metadata) > 16:
        raise JobsError("metadata holds at most 16 pairs", 400, "invalid_request", "metadata")
    return {"input_file_id": body["input_file_id"], "endpoint": body["endpoint"], "completion_window": window,
            "metadata": metadata}


@router.post("/v1/batches")
async def create_batch(request: Request) -> dict[str, Any]:
    from ...jobs.batch_input import ENDPOINTS, completion_window_seconds

    runner = _runner(request)
    body = await _batch_body(request)
    if body["endpoint"] not in ENDPOINTS:
        raise JobsError(f"endpoint must be one of {', '.join(ENDPOINTS)}, not {body['endpoint']!r}", 400,
                        "invalid_request", "endpoint")
    try:
        window_s = completion_window_seconds(body["completion_window"])
    except ValueError as exc:
        raise JobsError(str(exc), 400, "invalid_request", "completion_window") from None
    stored = await runner.call("get_file", body["input_file_id"])
    if stored.purpose != "batch":
        raise JobsError(f"file {stored.id} has purpose {stored.purpose!r}, not 'batch'", 400, "invalid_request",
                        "input_file_id")
    job = await runner.call("create_job", body["endpoint"], body["input_file_id"], body["completion_window"],
                            window_s, body["metadata"])
    job = await runner.validate(job.id)
    return batch_object(job)


# Jobs of the serverless shape (api/serverless.py) carry this metadata key; /v1/batches does not
# show them, as /status/{id} does not show batches.
SERVERLESS_KEY = "serverless"


def _is_batch(job: Any) -> bool:
    """Serverless jobs, prompt services run as jobs and async requests share the store; they are
    not batches."""
    from ...services.run import SERVICE_JOB_KEY
    from ..async_jobs import ASYNC_JOB_KEY

    metadata = job.metadata or {}
    return not {SERVERLESS_KEY, SERVICE_JOB_KEY, ASYNC_JOB_KEY} & metadata.keys()


async def _batch(runner: JobRunner, batch_id: str) -> Any:
    job = await runner.call("get_job", batch_id)
    if not _is_batch(job):
        raise JobsError(f"no batch {batch_id!r}", 404, "not_found")
    return job


@router.get("/v1/batches")
async def list_batches(request: Request, limit: int = 20, after: str | None = None) -> dict[str, Any]:
    runner = _runner(request)
    limit = max(1, min(limit, 100))
    if after is not None:
        await _batch(runner, after)  # 404 for an unknown cursor
    found: list[Any] = []
    cursor = after
    while len(found) <= limit:
        jobs = await runner.call("list_jobs", limit + 1, cursor)
        found += [job for job in jobs if _is_batch(job)]
        if len(jobs) <= limit:
            break
        cursor = jobs[-1].id
    page = found[:limit]
    return {"object": "list", "data": [batch_object(j) for j in page], "has_more": len(found) > limit,
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}


@router.get("/v1/batches/{batch_id}")
async def get_batch(request: Request, batch_id: str) -> dict[str, Any]:
    return batch_object(await _batch(_runner(request), batch_id))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str) -> dict[str, Any]:
    runner = _runner(request)
    await _batch(runner, batch_id)
    return batch_object(await runner.cancel(batch_id))
