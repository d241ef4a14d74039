"""API keys and body limits through real uvicorn on a loopback port."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from harness import net
from harness.net import free_port, wait_http
from llm_service.security import install_security
from llm_service.settings import DaemonSettings

KEYS = ["first-key", "second-key"]
LIMIT = 1000


class Harness:
    def __init__(self, url: str) -> None:
        self.url = url
        self.stream_finished = threading.Event()


def make_app(harness_events: threading.Event) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/api/generate")
    async def generate(request: Request) -> dict:
        return {"received": len(await request.body())}

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> dict:
        return {"received": len(await request.body())}

    @app.get("/api/stream")
    async def stream() -> StreamingResponse:
        async def lines():
            try:
                while True:
                    yield b"{}\n"
                    await asyncio.sleep(0.05)
            finally:
                harness_events.set()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    install_security(app, DaemonSettings(api_keys=KEYS, max_body_bytes=LIMIT))
    return app


@pytest.fixture(scope="module")
def server() -> Iterator[Harness]:
    port = free_port()
    harness = Harness(f"http://127.0.0.1:{port}")
    config = uvicorn.Config(make_app(harness.stream_finished), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    wait_http(harness.url + "/health")
    yield harness
    uv.should_exit = True
    thread.join(timeout=10)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_health_needs_no_key(server: Harness) -> None:
    assert net.get(server.url + "/health", timeout=5).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{}, auth("wrong-key"), {"Authorization": "Basic first-key"}, {"Authorization": "Bearer"}],
)
def test_missing_or_wrong_key_is_401_in_ollama_style(server: Harness, headers: dict) -> None:
    reply = net.post(server.url + "/api/generate", json={"model": "m"}, headers=headers, timeout=5)
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"] == "Bearer"
    assert "API key" in reply.json()["error"]


def test_wrong_key_under_v1_is_401_in_openai_style(server: Harness) -> None:
    reply = net.post(server.url + "/v1/chat/completions", json={}, headers=auth("nope"), timeout=5)
    assert reply.status_code == 401
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "invalid_api_key"


@pytest.mark.parametrize("key", KEYS)
def test_each_configured_key_is_accepted(server: Harness, key: str) -> None:
    reply = net.post(server.url + "/api/generate", content=b"x" * 10, headers=auth(key), timeout=5)
    assert reply.status_code == 200
    assert reply.json() == {"received": 10}


def test_body_at_the_limit_passes(server: Harness) -> None:
    reply = net.post(server.url + "/api/generate", content=b"x" * LIMIT, headers=auth(KEYS[0]), timeout=5)
    assert reply.json() == {"received": LIMIT}


def test_declared_length_over_the_limit_is_413(server: Harness) -> None:
    reply = net.post(
        server.url + "/api/generate", content=b"x" * (LIMIT + 1), headers=auth(KEYS[0]), timeout=5
    )
    assert reply.status_code == 413
    assert f"{LIMIT} bytes" in reply.json()["error"]


def test_streamed_body_over_the_limit_is_413(server: Harness) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for _ in range(5):
            yield b"y" * 300

    reply = net.post(
        server.url + "/v1/chat/completions", content=chunks(), headers=auth(KEYS[1]), timeout=5
    )
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "request_too_large"


def test_client_leaving_a_stream_cancels_the_handler(server: Harness) -> None:
    """The middleware must not stand between a disconnect and the streaming handler."""
    server.stream_finished.clear()
    with net.stream("GET", server.url + "/api/stream", headers=auth(KEYS[0]), timeout=5) as reply:
        assert reply.status_code == 200
        next(reply.iter_lines())
    deadline = time.monotonic() + 5
    while not server.stream_finished.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.stream_finished.is_set(), "the stream kept running after its client left"


def test_one_openai_error_shape_for_a_401_wherever_it_is_built(server: Harness) -> None:
    """OpenAI answers a bad key with type invalid_request_error, code invalid_api_key."""
    from llm_service.api.errors import openai_error_body

    wire = net.post(server.url + "/v1/chat/completions", json={}, headers=auth("nope"), timeout=5).json()
    built = openai_error_body(wire["error"]["message"], 401, "invalid_api_key")
    assert built == wire == {"error": {"message": wire["error"]["message"], "type": "invalid_request_error",
                                       "param": None, "code": "invalid_api_key"}}
