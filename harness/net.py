"""Loopback ports, HTTP clients for them, and waiting for something to answer on one."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from typing import Any, Callable, ContextManager, TypeVar

import httpx

T = TypeVar("T")

# Ports handed out: below the kernel's ephemeral range, where no client connection takes its
# source port between free_port() and the server's bind. Under pytest-xdist each worker draws
# from its own slice, so two workers never hand out the same port.
FIRST_PORT = 20000


# What httpx builds for every client from certifi's CA bundle (~35 ms of CPU each, ten times the
# request on loopback), built once: a test polling every 50 ms with fresh clients would spend most
# of a core on it. Everything here is plain HTTP on loopback; verification stays as httpx has it.
TLS = httpx.create_ssl_context()


def client(**kwargs: Any) -> httpx.Client:
    """`httpx.Client(**kwargs)` on the shared TLS context."""
    return httpx.Client(verify=TLS, **kwargs)


def get(url: str, **kwargs: Any) -> httpx.Response:
    """`httpx.get` on the shared TLS context."""
    return httpx.get(url, verify=TLS, **kwargs)


def post(url: str, **kwargs: Any) -> httpx.Response:
    """`httpx.post` on the shared TLS context."""
    return httpx.post(url, verify=TLS, **kwargs)


def stream(method: str, url: str, **kwargs: Any) -> ContextManager[httpx.Response]:
    """`httpx.stream` on the shared TLS context."""
    return httpx.stream(method, url, verify=TLS, **kwargs)


class WaitFailed(AssertionError):
    """A wait gave up: its deadline passed, or the process that was to answer exited first."""


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_slice() -> range | None:
    """This process's ports, or None to let the kernel pick (no room below its range)."""
    start, end = FIRST_PORT, _ephemeral_start()
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(count) > 0:
        size = (end - start) // int(count)
        start += int(worker[2:]) * size
        end = start + size
    return range(start, end) if end - start >= 200 else None


_slice = _port_slice()
_next = random.randrange(len(_slice)) if _slice else 0  # another run at the same time starts elsewhere


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port free on loopback right now, not handed out by this process before (until its
    slice wraps around)."""
    global _next
    if _slice is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for _ in range(len(_slice)):
        port = _slice[_next % len(_slice)]
        _next += 1
        if _bindable(port):
            return port
    raise OSError(f"no free loopback port in {_slice}")


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `condition()` until it returns something truthy, and return that; raise WaitFailed
    naming `what` (and the last value) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise WaitFailed(f"timed out after {timeout}s waiting for {what}; last: {result!r:.1500}")
        time.sleep(interval)


def wait_http(url: str, timeout: float = 30.0, *, process: subprocess.Popen | None = None,
              output: Callable[[], str] | None = None, ok_only: bool = False) -> httpx.Response:
    """GET `url` until it answers, and return the answer: any status, or with `ok_only` a 2xx.
    Fail early when `process` (the server that is to answer) exits; `output()` is what a failure
    shows of it (its log)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        if process is not None and process.poll() is not None:
            shown = f"\n{output()}" if output else ""
            raise WaitFailed(f"{url}: the server exited with {process.returncode} before answering{shown}")
        try:
            response = get(url, timeout=2.0)
        except httpx.HTTPError as exc:
            last = exc
        else:
            if not ok_only or response.is_success:
                return response
            last = f"status {response.status_code}"
        if time.monotonic() >= deadline:
            shown = f"\n{output()}" if output else ""
            raise WaitFailed(f"{url} did not answer within {timeout}s: {last}{shown}")
        time.sleep(0.05)
