"""The serverless shape: POST /run, /runsync, GET /status/{id}, POST /cancel/{id}.

A request is `{"input": {"prompt": …}}` (one prompt) or `{"input": {"batch": [{"prompt", "id"},
…]}}` (several), with optional `model` (default: the descriptor's first text model),
`max_tokens`, `temperature`, `top_p`, `stop`, `system`. It becomes a job in the same job store,
run by the same runner as OpenAI's batches (so it survives restarts, and waits for interactive
requests): each prompt is a chat completion of one user message. `/run` answers at once with the
job's id; `/runsync` waits for the answer (up to `request_deadline_s`; still running then, it
answers the id and status to poll). Statuses: IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED,
CANCELLED, TIMED_OUT (its completion window ended).

The output of one prompt: `text`, `processing_time` (seconds from the runner taking the item to
its answer: a wait for the model's slot behind interactive requests included), `model_version`,
`token_count: {prompt, completion}`; of a batch: `results[]` (each with its `id`, and `error`
for one that failed), `batch_size`, `total_token_count`. Errors are `{"error": "…"}`.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..engines.base import BadRequest
from ..jobs.runner import JobRunner, JobsError
from .openai.batches import SERVERLESS_KEY

router = APIRouter()

ENDPOINT = "/v1/chat/completions"
SERVERLESS = SERVERLESS_KEY  # the metadata key that marks a serverless job (its value: single | batch)
_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")


def _runner(request: Request) -> JobRunner:
    return request.app.state.jobs


def _default_model(manager: Any) -> str:
    for entry in manager.entries():
        if not entry.spec.embedding_model:
            return entry.spec.name
    raise BadRequest("input.model is required: the descriptor has no text model to default to")


def requests_of(body: Any, default_model: Any) -> tuple[str, str, list[tuple[str, dict[str, Any]]]]:
    """(model, kind, [(id, chat completion body)]) of a serverless request; BadRequest names
    what is wrong. `default_model` is called only when the input names none."""
    if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
        raise BadRequest('the body must be {"input": {"prompt": …}} or {"input": {"batch": [{"prompt", "id"}, …]}}')
    given = body["input"]
    model = given.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise BadRequest("input.model must be a model's name")
    system = given.get("system")
    if system is not None and not isinstance(system, str):
        raise BadRequest("input.system must be a string")
    sampling = {key: given[key] for key in _SAMPLING if key in given}

    def chat_body(prompt: Any, where: str) -> dict[str, Any]:
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest(f"{where} must be a non-empty string")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return {"model": model, "messages": messages, **sampling}

    if "batch" in given:
        if "prompt" in given:
            raise BadRequest("input holds either prompt or batch, not both")
        batch = given["batch"]
        if not isinstance(batch, list) or not batch:
            raise BadRequest("input.batch must be a non-empty list of {prompt, id}")
        model = model or default_model()
        items, seen = [], set()
        for i, entry in enumerate(batch):
            if not isinstance(entry, dict):
                raise BadRequest(f"input.batch[{i}] must be an object {{prompt, id}}")
            item_id = entry.get("id", str(i))
            if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
                raise BadRequest(f"input.batch[{i}].id must be a string or a number")
            item_id = str(item_id)
            if item_id in seen:
                raise BadRequest(f"input.batch[{i}].id {item_id!r} is used twice")
            seen.add(item_id)
            items.append((item_id, chat_body(entry.get("prompt"), f"input.batch[{i}].prompt")))
        for _, item in items:
            item["model"] = model
        return model, "batch", items
    model = model or default_model()
    item = chat_body(given.get("prompt"), "input.prompt")
    item["model"] = model
    return model, "single", [("0", item)]


async def _submit(request: Request) -> Any:
    from ..jobs.batch_input import BatchRequest

    runner = _runner(request)
    manager = request.app.state.manager
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    model, kind, items = requests_of(body, lambda: _default_model(manager))
    resolved = manager.resolve(model)  # 404 for a model the daemon does not have
    job = await runner.call("create_job", ENDPOINT, None, "24h", 86400.0, {SERVERLESS: kind})
    requests = [BatchRequest(line, item_id, item) for line, (item_id, item) in enumerate(items, start=1)]
    job = await runner.call("begin_job", job.id, resolved, requests, ())
    runner.wake()
    return job


_STATUS = {"completed": "COMPLETED", "failed": "FAILED", "cancelled": "CANCELLED", "expired": "TIMED_OUT"}


async def status_object(runner: JobRunner, job: Any) -> dict[str, Any]:
    """The job in the serverless shape, with its output once it is finished."""
    kind = (job.metadata or {}).get(SERVERLESS)
    if kind is None:
        raise JobsError(f"no serverless job {job.id!r}", 404, "not_found")
    body: dict[str, Any] = {"id": job.id}
    if job.status in _STATUS:
        status = _STATUS[job.status]
    elif job.status == "validating" or (job.counts.running == 0 and job.counts.pending == job.counts.total):
        status = "IN_QUEUE"
    else:
        status = "IN_PROGRESS"
    first_start = None
    if status not in ("IN_QUEUE",):
        items = await runner.call("job_items", job.id)
        times = await runner.call("item_times", job.id)
        starts = [started for started, _ in times.values() if started is not None]
        first_start = min(starts) if starts else None
    if first_start is not None:
        body["delayTime"] = int((first_start - job.created_at) * 1000)
    if job.status in _STATUS and job.status != "failed":
        results = [_result(item, times.get(item.line, (None, None))) for item in items]
        if kind == "single":
            result = results[0]
            if "error" in result:
                status = "FAILED" if status == "COMPLETED" else status
                body["error"] = result["error"]
            else:
                result.pop("id", None)
                body["output"] = result
        else:
            total = {"prompt": 0, "completion": 0}
            for result in results:
                for key in total:
                    total[key] += result.get("token_count", {}).get(key, 0)
            body["output"] = {"results": results, "batch_size": len(results), "total_token_count": total}
        if job.finished_at and first_start is not None:
            body["executionTime"] = int((job.finished_at - first_start) * 1000)
    elif job.status == "failed":
        body["error"] = "; ".join(e.get("message", "") for e in job.errors) or "the job failed"
    body["status"] = status
    return body


def _result(item: Any, times: tuple[float | None, float | None]) -> dict[str, Any]:
    started, finished = times
    result: dict[str, Any] = {"id": item.custom_id}
    response = item.result
    if response is not None and 200 <= response["status_code"] < 300:
        answer = response["body"]
        usage = answer.get("usage") or {}
        result.update({
            "text": answer["choices"][0]["message"]["content"] or "",
            "processing_time": round(finished - started, 3) if started and finished else None,
            "model_version": answer.get("model"),
            "token_count": {"prompt": usage.get("prompt_tokens", 0), "completion": usage.get("completion_tokens", 0)},
        })
    elif response is not None:
        error = response["body"].get("error", {}) if isinstance(response["body"], dict) else {}
        result["error"] = error.get("message") if isinstance(error, dict) else str(error)
        result["status_code"] = response["status_code"]
    else:
        codes = {"cancelled": "cancelled before it ran", "expired": "the job timed out before it ran"}
        result["error"] = (item.error or {}).get("message") or codes.get(item.state, "the request failed")
    return result


@router.post("/run")
async def run(request: Request) -> JSONResponse:
    runner = _runner(request)
    job = await _submit(request)
    return JSONResponse(await status_object(runner, job))


@router.post("/runsync")
async def runsync(request: Request) -> JSONResponse:
    runner = _runner(request)
    job = await _submit(request)
    job = await runner.wait_finished(job.id, request.app.state.settings.request_deadline_s)
    return JSONResponse(await status_object(runner, job))


@router.get("/status/{job_id}")
async def status(request: Request, job_id: str) -> JSONResponse:
    runner = _runner(request)
    return JSONResponse(await status_object(runner, await runner.call("get_job", job_id)))


@router.post("/cancel/{job_id}")
async def cancel(request: Request, job_id: str) -> JSONResponse:
    runner = _runner(request)
    job = await runner.call("get_job", job_id)
    await status_object(runner, job)  # 404 for a job that is not a serverless one
    job = await runner.cancel(job_id)
    return JSONResponse(await status_object(runner, job))
