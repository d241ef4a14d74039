"""Shared test utilities: real processes on loopback ports, never mocks."""
from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Runners started by tests find `ax-emulator` next to this interpreter, as the daemon arranges.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0) -> httpx.Response:
    """Poll `url` until it answers (any status) or fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return httpx.get(url, timeout=2.0)
        except httpx.HTTPError as exc:
            last = exc
            time.sleep(0.05)
    pytest.fail(f"{url} did not answer within {timeout}s: {last}")


@pytest.fixture(scope="module")
def emulator_tokenizer():
    """Our tokenizer server on the SmolLM2 tokenizer, for runner emulator tests."""
    from emulator_support import TokenizerServer

    server = TokenizerServer()
    yield server
    server.stop()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run the long reliability soak tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak run: pass --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def anyio_backend() -> str:
    """The event loop of `@pytest.mark.anyio` tests: asyncio, as the daemon's."""
    return "asyncio"
