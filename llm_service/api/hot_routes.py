"""The generation routes without FastAPI's per-request machinery.

A generation request spends most of the daemon's share of its first token in the framework, not
in our code: FastAPI's middleware, router and request handling cost about 0.3 ms per request on
this kind of host (`bench/README.md`, "HTTP engine path"), more than everything between the route
and the upstream. So the four routes whose first token users wait for are served here, by the same
endpoint functions and the same body models, with the same error bodies:

- the body is read and validated as FastAPI does it (JSON, then the route's pydantic model;
  errors located under `body`), and a failure raises the same `RequestValidationError`;
- an exception before the response starts goes to the app's own exception handlers
  (`api/errors.py`); anything else goes on to the server's error middleware, as before;
- the route is recorded in the scope for the HTTP metrics, as the router would.

This middleware sits inside the daemon's own (security, metrics), so API keys and body limits
apply unchanged; every other route, and these paths with other methods, go on to FastAPI. The
routes stay declared with FastAPI, which documents them in OpenAPI.
"""
from __future__ import annotations

import json
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pydantic
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute, APIRouter
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HOT_PATHS = frozenset({"/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions"})


@dataclass(frozen=True)
class HotRoute:
    route: APIRoute
    endpoint: Callable[[Request, Any], Awaitable[Response]]
    body_model: type[pydantic.BaseModel]


def hot_routes(routers: list[APIRouter]) -> dict[str, HotRoute]:
    """The POST routes of HOT_PATHS, each an endpoint `(request, body)` with a body model."""
    found = {}
    for router in routers:
        for route in router.routes:
            if isinstance(route, APIRoute) and route.path in HOT_PATHS and "POST" in route.methods:
                body_model = typing.get_type_hints(route.endpoint)["body"]
                found[route.path] = HotRoute(route, route.endpoint, body_model)
    missing = HOT_PATHS - found.keys()
    if missing:
        raise RuntimeError(f"hot routes not declared: {sorted(missing)}")
    return found


def parse_body(body_model: type[pydantic.BaseModel], raw: bytes) -> pydantic.BaseModel:
    """The body as FastAPI makes it for a `body: Model` parameter, with FastAPI's errors."""
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error", "input": {},
              "ctx": {"error": exc.msg}}],
            body=exc.doc,
        ) from None
    except Exception:  # bytes that are no text at all, nesting too deep: FastAPI's 400
        raise HTTPException(status_code=400, detail="There was an error parsing the body") from None
    try:
        return body_model.model_validate(value, from_attributes=True)  # as FastAPI validates: its messages
    except pydantic.ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        raise RequestValidationError(errors, body=value) from None


class HotRoutesMiddleware:
    """Serves HOT_PATHS' POSTs directly (see the module's docstring); the rest goes to `app`."""

    def __init__(self, app: ASGIApp, *, routers: list[APIRouter], exception_handlers: dict[Any, Any]) -> None:
        self.app = app
        self.routes = hot_routes(routers)
        # What FastAPI's ExceptionMiddleware handles; Exception and 500 belong to the server's
        # error middleware further out, which sees an unexpected exception as before.
        self.handlers = exception_handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hot = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if hot is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = hot.route
        started = False

        async def noting_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        request = Request(scope, receive)
        try:
            body = parse_body(hot.body_model, await request.body())
            response = await hot.endpoint(request, body)
            await response(scope, receive, noting_send)
        except Exception as exc:
            handler = None if started else self._handler(exc)
            if handler is None:
                raise
            await (await handler(request, exc))(scope, receive, send)

    def _handler(self, exc: Exception) -> Callable[[Request, Exception], Awaitable[Response]] | None:
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            if cls in self.handlers:
                return self.handlers[cls]
        return None
