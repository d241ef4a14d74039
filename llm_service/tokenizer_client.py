"""The daemon's side of the tokenizer service (:8101) and of each model's tokenizer server.

Readiness of a tokenizer server the service starts is the service's word (`running`: a socket of
that server's own listens on its port; `blocked`: another process's does). A model without
`tokenizer_py` has an external tokenizer server, whose port the daemon probes itself. Neither is
ever read from a log, which is block-buffered when piped (the earlier wrapper waited forever on a
log line).

Calls to the service carry its shared secret (`Authorization: Bearer`).

No `httpx` error leaves this module: a call that must succeed raises `TokenizerUnavailable`, a
best-effort call (capabilities, counts) returns None.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import anyio
import httpx


class TokenizerUnavailable(Exception):
    """A tokenizer server or the tokenizer service did not do what was asked."""


def _model(name: str | None) -> dict[str, str]:
    return {"model": name} if name is not None else {}


class PortTurn:
    """Whose runners may start on one tokenizer port now: any number of one model's (the replicas
    of a model on several cards start together), none of another's until they are all started."""

    def __init__(self) -> None:
        self.model: str | None = None
        self.holders = 0
        self._changed = anyio.Event()

    async def acquire(self, model: str) -> None:
        while self.holders and self.model != model:
            await self._changed.wait()
        self.model = model
        self.holders += 1

    def release(self) -> None:
        self.holders -= 1
        if not self.holders:
            self.model = None
            changed, self._changed = self._changed, anyio.Event()
            changed.set()


class TokenizerClient:
    def __init__(self, service_port: int, service_url: str | None = None, secret: str | None = None) -> None:
        # One runner start at a time per tokenizer port: our server gives the next /get_uid on
        # a port to the model announced last (see `runner_turn`).
        self._turns: dict[tuple[str, int], PortTurn] = {}
        self._service_port = service_port
        self._service_url = service_url.rstrip("/") if service_url else None
        self._service_headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0))

    async def aclose(self) -> None:
        await self._http.aclose()

    def service_url(self, tokenizer_ip: str) -> str:
        return self._service_url or f"http://{tokenizer_ip}:{self._service_port}"

    async def _service_call(self, method: str, name: str, path: str, tokenizer_ip: str) -> dict[str, Any]:
        """One call to the tokenizer service about model `name`; its JSON reply, or TokenizerUnavailable."""
        url = f"{self.service_url(tokenizer_ip)}/tokenizers/{quote(name, safe='')}{path}"
        try:
            reply = await self._http.request(method, url, headers=self._service_headers)
            data = reply.json()
        except httpx.HTTPError as exc:
            raise TokenizerUnavailable(f"tokenizer service at {url} unreachable: {exc!r}") from exc
        except ValueError:
            data = None
        if reply.status_code >= 400 or not isinstance(data, dict):
            said = data.get("error") if isinstance(data, dict) else None
            raise TokenizerUnavailable(
                f"tokenizer service refused {method} {path or '/'} for {name} ({reply.status_code}): "
                f"{said or reply.text.strip()[:500]}"
            )
        return data

    async def start_server(self, name: str, tokenizer_ip: str) -> dict[str, Any]:
        """Ask the tokenizer service to start (or keep) the model's tokenizer server: the one the
        descriptor names for it. Returns the server's state."""
        return await self._service_call("POST", name, "/start", tokenizer_ip)

    async def wait_until_running(self, name: str, tokenizer_ip: str, port: int, timeout: float) -> dict[str, Any]:
        """Poll the service until the model's server is `running`: its own socket listens on
        `port` and answers; returns its entry. A port another process holds fails at once, with
        the service's word."""
        deadline = time.monotonic() + timeout
        while True:
            server = await self._service_call("GET", name, "", tokenizer_ip)
            state = server.get("state")
            if server.get("port") != port:
                raise TokenizerUnavailable(
                    f"the tokenizer service runs {name} on port {server.get('port')}, not {port}: "
                    "the daemon and the service must read the same descriptor"
                )
            if state == "running":
                return server
            if state == "blocked":
                raise TokenizerUnavailable(server.get("detail") or f"port {port} is taken by another process")
            if state == "stopped" or time.monotonic() >= deadline:
                tail = [line for line in server.get("log_tail") or [] if line.strip()][-5:]
                raise TokenizerUnavailable(
                    f"tokenizer server of {name} on port {port} not running after {timeout:.0f}s "
                    f"(state {state}, restarts {server.get('restarts')}, last exit {server.get('last_exit')})"
                    + ("; its output: " + " | ".join(tail) if tail else "")
                )
            await anyio.sleep(0.1)

    async def stop_server(self, name: str, tokenizer_ip: str) -> None:
        try:
            await self._service_call("POST", name, "/stop", tokenizer_ip)
        except TokenizerUnavailable:
            pass  # the service is gone too, or never had it: nothing left to stop

    async def wait_until_serving(self, host: str, port: int, timeout: float) -> None:
        """Probe an external tokenizer server's port (a model without `tokenizer_py`: someone
        else runs it) until it answers HTTP (any status) or time runs out."""
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

    async def capabilities(self, host: str, port: int, model: str | None = None) -> dict[str, Any] | None:
        """Our server's extensions, or None for a stock tokenizer script. `model` names the
        model meant where several share the port (our server ignores it where one is alone)."""
        try:
            reply = await self._http.get(f"http://{host}:{port}/capabilities", params=_model(model))
            data = reply.json()
        except (httpx.HTTPError, ValueError):
            return None
        if reply.status_code != 200 or not isinstance(data, dict) or data.get("server") != "axm1-tokenizer":
            return None
        return data

    async def configure(self, host: str, port: int, model: str | None = None, **settings: Any) -> None:
        url = f"http://{host}:{port}/config"
        try:
            reply = await self._http.post(url, json=settings, params=_model(model))
        except httpx.HTTPError as exc:
            raise TokenizerUnavailable(f"{url} unreachable: {exc!r}") from exc
        if reply.status_code >= 400:
            raise TokenizerUnavailable(f"{url} answered {reply.status_code}: {reply.text.strip()}")

    async def tokenize(self, host: str, port: int, text: str, model: str | None = None) -> list[int] | None:
        try:
            reply = await self._http.post(f"http://{host}:{port}/tokenize", json={"text": text}, params=_model(model))
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

    async def runner_turn(self, host: str, port: int, model: str) -> Callable[[], None]:
        """Wait for this port's turn, then tell our server that the next runner to call
        `/get_uid` there is `model`'s. Runners sharing a port (the 12345 every published run
        script hard-codes) are told apart by their uid, and a runner asks for its uid as it
        starts: the caller calls the returned release once its runner has started (or failed),
        and not before, so no other model's runner takes that uid (PortTurn)."""
        turn = self._turns.setdefault((host, port), PortTurn())
        await turn.acquire(model)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                turn.release()

        url = f"http://{host}:{port}/next_runner"
        try:
            reply = await self._http.post(url, params=_model(model))
            if reply.status_code >= 400:
                raise TokenizerUnavailable(f"{url} answered {reply.status_code}: {reply.text.strip()}")
        except httpx.HTTPError as exc:
            release()
            raise TokenizerUnavailable(f"{url} unreachable: {exc!r}") from exc
        except BaseException:
            release()
            raise
        return release
