"""Prompt services (issue 16): `GET /api/services`, `GET /api/services/{name}`, `POST /api/services/{name}`.

The folder (`services_dir`) is watched by `services.folder.ServiceFolder`; a request runs through
`services.run.run_service`. Errors are Ollama's `{"error": "..."}` with a status code before the
first byte, and one last `{"error": ...}` line of a stream after it. A streamed answer is NDJSON:
a `plan` event, a `chunk_start` and a `chunk_done` event per step, then the answer with
`done: true`, as Ollama streams end with their final object.
"""
from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from ..engines.base import BadRequest, EngineError
from ..services.folder import ServiceFolder
from ..services.manifest import Service
from ..services.run import SERVICE_ENDPOINT, SERVICE_JOB_KEY, ServiceNotFound, resolve_request, run_service
from ..timestamps import rfc3339
from .ollama.wire import error_line
from .streaming import CLIENT_GONE, PrefetchedStream, StreamingAnswer, new_request_id, until_disconnect

router = APIRouter(tags=["services"])


class FieldInfo(BaseModel):
    name: str
    description: str = ""
    required: bool = True
    chunked: bool = False


class FlavorInfo(BaseModel):
    model: str
    totalContextLength: int
    maxGenerationLength: int
    createNewTurnAfter: int
    summaryTurns: int
    maxNewTurns: int
    temperature: float
    top_p: float


class ServiceInfo(BaseModel):
    name: str
    enabled: bool = Field(description="false: the manifest is broken; `error` says why")
    error: str | None = None
    modified_at: str | None = Field(None, description="when the manifest last changed")
    type: Literal["single", "map", "map-reduce"] | None = None
    description: str = ""
    backend: str | None = None
    fields: list[FieldInfo] = []
    flavors: dict[str, FlavorInfo] = {}
    default_flavor: str | None = None


class ServiceList(BaseModel):
    folder: str
    services: list[ServiceInfo]
    warnings: list[str] = Field(description="files of the folder that are not services, or the folder's own problem")


class ServiceBody(BaseModel):
    """What a client sends: the service's input fields, and how to run it."""

    model_config = ConfigDict(extra="forbid")

    fields: dict[str, Any] = Field(default_factory=dict, description="the service's input fields by name "
                                   "(GET /api/services/{name} lists them)")
    flavor: str | None = Field(None, description="which of the service's flavors (models) runs it; default: its first")
    stream: bool = Field(False, description="true: NDJSON events per chunk, then the answer with done: true")
    job: bool = Field(False, description="true: run it as a job behind interactive requests; the answer is "
                      "an id at once, the result is kept (GET /api/services/jobs/{id})")


class StepInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    step: Literal["map", "combine"]
    prompt_tokens: int = Field(description="the prompt as counted for the context (chat framing included)")
    model_prompt_tokens: int | None = Field(None, description="the prompt tokens the model reported")
    completion_tokens: int | None = None
    seconds: float | None = None
    finish_reason: str | None = None


class ServiceAnswer(BaseModel):
    done: bool = True
    service: str
    flavor: str
    model: str
    type: str
    response: str = Field(description="the answer: the cleaned text, the summary, or the single answer")
    chunks: list[StepInfo] = Field(description="each chunk of the chunked field: where it is "
                                   "(start, end: characters; sentences), its tokens and its generation")
    combine: list[StepInfo] = Field(description="the combine steps of a map-reduce service")
    tokenizer: Literal["tokenizer", "estimate"]
    warnings: list[str]
    total_duration: float = Field(description="seconds")


def _folder(request: Request) -> ServiceFolder:
    return request.app.state.services


def _info(folder: ServiceFolder, service: Service) -> ServiceInfo:
    modified = folder.modified_ns(service.name)
    info = ServiceInfo(name=service.name, enabled=service.manifest is not None, error=service.error,
                       modified_at=None if modified is None else rfc3339(modified / 1e9))
    manifest = service.manifest
    if manifest is not None:
        info.type = manifest.type
        info.description = manifest.description
        info.backend = manifest.backend
        info.fields = [FieldInfo(**item.model_dump()) for item in manifest.fields]
        info.flavors = {name: FlavorInfo(**flavor.model_dump(by_alias=True)) for name, flavor in manifest.flavors.items()}
        info.default_flavor = manifest.default_flavor
    return info


@router.get("/api/services", response_model=ServiceList)
async def list_services(request: Request) -> ServiceList:
    folder = _folder(request)
    catalog = folder.catalog
    warnings = ([folder.folder_error] if folder.folder_error else []) + list(catalog.warnings)
    return ServiceList(folder=folder.label, services=[_info(folder, s) for s in catalog.services.values()],
                       warnings=warnings)


@router.get("/api/services/{name}", response_model=ServiceInfo)
async def show_service(request: Request, name: str) -> ServiceInfo:
    folder = _folder(request)
    service = folder.catalog.services.get(name)
    if service is None:
        raise ServiceNotFound(name, sorted(folder.catalog.services))
    return _info(folder, service)


@router.post("/api/services/{name}", response_model=ServiceAnswer,
             responses={200: {"content": {"application/x-ndjson": {}},
                              "description": "the answer; with stream: NDJSON events, the answer last"}})
async def run(request: Request, name: str, body: ServiceBody) -> Response:
    manager = request.app.state.manager
    if body.job:
        return await _submit_job(request, name, body)
    request_id = new_request_id()
    headers = {"X-Request-Id": request_id}
    events = run_service(manager, _folder(request), name, body.fields, body.flavor, request_id)
    if not body.stream:
        async def whole() -> dict[str, Any]:
            final: dict[str, Any] = {}
            try:
                async for event in events:
                    final = event
            finally:
                await events.aclose()
            return final

        completed, answer = await until_disconnect(request, whole)
        if not completed:
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(answer, headers=headers)
    # Each step has the request deadline of its own (services.run): none for the whole stream.
    return StreamingAnswer(events, _ndjson, deadline=math.inf, error_item=lambda exc: error_line(exc.message),
                           media_type="application/x-ndjson", headers=headers)


async def _submit_job(request: Request, name: str, body: ServiceBody) -> Response:
    """The service as a job of the job store (its result kept there): checked now, so that a bad
    request is a 4xx at once, then run by the job runner at job priority."""
    from ..jobs.batch_input import BatchRequest

    if body.stream:
        raise BadRequest("a service run as a job is not streamed: send stream false, then poll its job")
    manager = request.app.state.manager
    manifest, flavor, _, _, _ = resolve_request(_folder(request), name, body.fields, body.flavor)
    model = manager.resolve(manifest.flavors[flavor].model)
    runner = request.app.state.jobs
    job = await runner.call("create_job", SERVICE_ENDPOINT, None, "24h", 86400.0, {SERVICE_JOB_KEY: name})
    item = {"service": name, "fields": body.fields, "flavor": flavor}
    job = await runner.call("begin_job", job.id, model, [BatchRequest(1, name, item)], ())
    runner.wake()
    return JSONResponse(await _job_object(runner, job), status_code=202)


async def _job_object(runner: Any, job: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {"id": job.id, "service": (job.metadata or {}).get(SERVICE_JOB_KEY), "model": job.model,
                              "status": job.status, "created_at": rfc3339(job.created_at)}
    if job.status in ("completed", "failed", "cancelled", "expired"):
        items = await runner.call("job_items", job.id)
        result = items[0].result if items else None
        if result is not None and 200 <= result["status_code"] < 300:
            answer["result"] = result["body"]
        elif result is not None:
            answer["status"] = "failed"
            answer["error"] = result["body"].get("error") if isinstance(result["body"], dict) else str(result["body"])
        elif items and items[0].error:
            answer["error"] = items[0].error.get("message")
    return answer


@router.get("/api/services/jobs/{job_id}")
async def service_job(request: Request, job_id: str) -> JSONResponse:
    """A service run as a job: its status, and once done its result (the answer a synchronous
    call gives) or its error."""
    runner = request.app.state.jobs
    job = await runner.call("get_job", job_id)
    if SERVICE_JOB_KEY not in (job.metadata or {}):
        raise EngineError(f"no service job {job_id!r}", status_code=404)
    return JSONResponse(await _job_object(runner, job))


async def _ndjson(answer: PrefetchedStream) -> AsyncIterator[bytes]:
    try:
        async for event in answer.items():
            yield (json.dumps(event) + "\n").encode()
    except EngineError as exc:
        yield error_line(exc.message)
