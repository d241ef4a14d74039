"""The generation routes served without FastAPI's request machinery (api/hot_routes.py) must read
bodies exactly as FastAPI does: the same validation errors, the same 400 for undecodable bytes."""
from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from starlette.exceptions import HTTPException

from llm_service.api import ollama, openai
from llm_service.api.hot_routes import HOT_PATHS, hot_routes, parse_body
from llm_service.api.ollama.wire import ChatBody
from llm_service.api.openai.wire import ChatCompletionBody

BODIES = [
    b"",
    b"{",
    b'{"model": "m", "messages": [',
    b"\x80",
    b"\x00\x00\x00\x00\x00",
    b"[" * 100_000,
    b"[]",
    b"null",
    b'"text"',
    b'{"model": ""}',
    b'{"model": "m", "messages": []}',
    b'{"model": "m", "messages": [{"role": "robot", "content": "hi"}]}',
    b'{"model": "m", "messages": [{"role": "user", "content": 5}], "temperature": 9, "max_tokens": 0}',
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}',
]


def fastapi_reading(model: type) -> TestClient:
    """A plain FastAPI route with a `body: Model` parameter: the reference."""
    app = FastAPI()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"errors": comparable(exc.errors())}, status_code=422)

    async def route(body):
        return {"body": body.model_dump()}

    route.__annotations__ = {"body": model}  # a real class, not this module's postponed string
    app.post("/x")(route)
    return TestClient(app)


def comparable(errors) -> list[dict]:
    return [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in errors]


def ours(model: type, raw: bytes) -> tuple[int, object]:
    try:
        return 200, {"body": parse_body(model, raw).model_dump()}
    except RequestValidationError as exc:
        return 422, {"errors": comparable(exc.errors())}
    except HTTPException as exc:
        return exc.status_code, {"detail": exc.detail}


@pytest.mark.parametrize("model", [ChatCompletionBody, ChatBody], ids=["openai", "ollama"])
def test_bodies_are_read_as_fastapi_reads_them(model: type) -> None:
    reference = fastapi_reading(model)
    for raw in BODIES:
        answer = reference.post("/x", content=raw, headers={"content-type": "application/json"})
        status, body = ours(model, raw)
        assert (status, body) == (answer.status_code, answer.json()), raw[:40]


def test_the_four_generation_routes_are_hot() -> None:
    routes = hot_routes([ollama.router, openai.router])
    assert set(routes) == HOT_PATHS
    assert routes["/v1/chat/completions"].body_model is ChatCompletionBody
    assert routes["/api/chat"].body_model is ChatBody


def test_a_missing_hot_route_is_an_error_at_start() -> None:
    with pytest.raises(RuntimeError, match="/v1/completions"):
        hot_routes([ollama.router])
