"""The daemon's side of the tokenizer service (:8101) and of each model's tokenizer server.

Readiness of a tokenizer server is decided by probing its port — never by reading its log, which
is block-buffered when piped (the earlier wrapper waited forever on a log line).

No `httpx` error leaves this module: a call that must succeed raises `TokenizerUnavailable`, a
best-effort call (capabilities, counts) returns None.
"""
from __future__ import annotations

import time
from typing import Any

import anyio
import httpx


class TokenizerUnavailable(Exception):
    """A tokenizer server or the tokenizer service did not do what was asked."""


class TokenizerClient:
    def __init__(self, service_port: int, service_url: str | None = None) -> None:
        self._service_port = service_port
        self._service_url = service_url.rstrip("/") if service_url else None
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0))

    async def aclose(self) -> None:
        await self._http.aclose()

    def service_url(self, tokenizer_ip: str) -> str:
        return self._service_url or f"http://{tokenizer_ip}:{self._service_port}"

    async def start_server(self, name: str, tokenizer_ip: str, body: dict[str, Any]) -> None:
        """Ask the tokenizer service to start (or keep) the model's tokenizer server."""
        url = f"{self.service_url(tokenizer_ip)}/tokenizers/{name}/start"
        try:
            reply = await self._http.post(url, json=body)
        except httpx.HTTPError as exc:
            raise TokenizerUnavailable(f"tokenizer service at {url} unreachable: {exc!r}") from exc
        if reply.status_code >= 400:
            raise TokenizerUnavailable(f"tokenizer service refused to start {name}: {reply.text.strip()}")

    async def stop_server(self, name: str, tokenizer_ip: str) -> None:
        url = f"{self.service_url(tokenizer_ip)}/tokenizers/{name}/stop"
        try:
            await self._http.post(url)
        except httpx.HTTPError:
            pass  # the service is gone too; nothing left to stop

    async def wait_until_serving(self, host: str, port: int, timeout: float) -> None:
        """Probe the tokenizer server's port until it answers HTTP (any status) or time runs out."""
        deadline = time.monotonic() + timeout
        url = f"http://{host}:{port}/bos_id"
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                await self._http.get(url, timeout=1.0)
                return
            except httpx.HTTPError as exc:
                last = exc
            await anyio.sleep(0.1)
        raise TokenizerUnavailable(f"tokenizer server on {host}:{port} did not answer within {timeout:.0f}s ({last!r})")

    async def capabilities(self, host: str, port: int) -> dict[str, Any] | None:
        """Our server's extensions, or None for a stock tokenizer script."""
        try:
            reply = await self._http.get(f"http://{host}:{port}/capabilities")
            data = reply.json()
        except (httpx.HTTPError, ValueError):
            return None
        if reply.status_code != 200 or not isinstance(data, dict) or data.get("server") != "axm1-tokenizer":
            return None
        return data

    async def configure(self, host: str, port: int, **settings: Any) -> None:
        url = f"http://{host}:{port}/config"
        try:
            reply = await self._http.post(url, json=settings)
        except httpx.HTTPError as exc:
            raise TokenizerUnavailable(f"{url} unreachable: {exc!r}") from exc
        if reply.status_code >= 400:
            raise TokenizerUnavailable(f"{url} answered {reply.status_code}: {reply.text.strip()}")

    async def tokenize(self, host: str, port: int, text: str) -> list[int] | None:
        try:
            reply = await self._http.post(f"http://{host}:{port}/tokenize", json={"text": text})
            ids = reply.json().get("token_ids")
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return ids if isinstance(ids, list) else None

    async def stats(self, host: str, port: int, uid: str) -> dict[str, int] | None:
        try:
            reply = await self._http.get(f"http://{host}:{port}/stats", params={"uid": uid})
            data = reply.json()
        except (httpx.HTTPError, ValueError):
            return None
        return data if reply.status_code == 200 and isinstance(data, dict) and "reply_tokens" in data else None
