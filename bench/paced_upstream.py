"""A fast OpenAI-compatible upstream that streams on a fixed schedule, for the HTTP-path benchmark.

Run: `python -m bench.paced_upstream --port N`. It must never be the bottleneck, so it is a small
asyncio HTTP/1.1 server (keep-alive, uvloop when installed) rather than a framework.

The daemon's HTTP engine forwards the messages but drops unknown request fields, so the pace is
read from the last user message: "bench id=a1 chunks=300 rate=300". Chunk i carries the content
" w<i>" and is written at t0 + i/rate (t0 = chunk 0, written as soon as the request is read): an
absolute schedule, so a late wake-up does not delay the chunks after it. Just before each write
the CLOCK_MONOTONIC ns are noted; `GET /_records?id=a1` returns them once (then forgets them), so
a client can compute lag = its arrival of " w<i>" − the upstream's write of chunk i.

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (SSE with `stream: true`, one
JSON answer otherwise), GET /_records?id=…, GET /_stats (connections, those with chats, chats);
anything else is 404 (the daemon probes /v1/embeddings: a 404 tells it there are none).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

MODEL = "paced"
DEFAULT_PACE = {"id": "-", "chunks": 10, "rate": 1000.0}
PACE_FIELD = re.compile(r"(id|chunks|rate)=([\w.]+)")
RECORDS: dict[str, dict[str, Any]] = {}  # request id -> what the upstream did, until fetched
# Does the client reuse its connections? chat_connections: those that carried a chat request.
STATS = {"connections": 0, "chat_connections": 0, "chat_requests": 0}


def chunk_content(index: int) -> str:
    """The text of chunk `index`, distinct for every chunk so that a client can tell which arrived."""
    return f" w{index}"


def pace_of(body: dict[str, Any]) -> dict[str, Any]:
    """id, chunks and rate from the last user message (defaults for whatever is missing)."""
    users = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    text = users[-1].get("content") if users else ""
    found = dict(PACE_FIELD.findall(text if isinstance(text, str) else ""))
    return {"id": found.get("id", DEFAULT_PACE["id"]),
            "chunks": int(found.get("chunks", DEFAULT_PACE["chunks"])),
            "rate": float(found.get("rate", DEFAULT_PACE["rate"]))}


def usage(chunks: int) -> dict[str, int]:
    return {"prompt_tokens": 1, "completion_tokens": chunks, "total_tokens": 1 + chunks}


def completion_chunk(request_id: str, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": f"paced-{request_id}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": MODEL, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def sse(payload: dict[str, Any] | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return b"data: %s\n\n" % text.encode()


def http_chunk(data: bytes) -> bytes:
    """One piece of a chunked body (b"" is the terminating piece)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def response_head(status: int, content_type: str, keep_alive: bool, length: int | None = None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n{framing}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n").encode()


class Connection(asyncio.Protocol):
    """One client connection: requests are answered one after another (keep-alive, pipelining)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False  # an answer is being streamed; later requests wait in the buffer
        self.chats = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        STATS["connections"] += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:  # one write per chunk must leave at once, not wait for an ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.next_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self.buffer.clear()

    def next_request(self) -> None:
        while not self.busy and self.transport is not None and not self.transport.is_closing():
            request = self.take_request()
            if request is None:
                return
            self.answer(*request)

    def take_request(self) -> tuple[str, str, bytes, bool] | None:
        """(method, target, body, keep-alive) of the next complete request in the buffer."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        request_line, *header_lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        length = int(headers.get("content-length") or 0)  # clients here send no chunked bodies
        if len(self.buffer) < end + 4 + length:
            return None
        body = bytes(self.buffer[end + 4:end + 4 + length])
        del self.buffer[:end + 4 + length]
        method, target, version = request_line.split(" ", 2)
        keep_alive = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        return method, target, body, keep_alive

    def answer(self, method: str, target: str, body: bytes, keep_alive: bool) -> None:
        url = urlsplit(target)
        if method == "POST" and url.path == "/v1/chat/completions":
            self.chat(json.loads(body or b"{}"), keep_alive)
        elif method == "GET" and url.path == "/health":
            self.send_json(200, {"status": "ok"}, keep_alive)
        elif method == "GET" and url.path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]},
                           keep_alive)
        elif method == "GET" and url.path == "/_records":
            request_id = parse_qs(url.query).get("id", [""])[0]
            self.send_json(200, RECORDS.pop(request_id, {}), keep_alive)
        elif method == "GET" and url.path == "/_stats":
            self.send_json(200, STATS, keep_alive)
        else:
            self.send_json(404, {"detail": "Not Found"}, keep_alive)

    def send_json(self, status: int, payload: Any, keep_alive: bool) -> None:
        data = json.dumps(payload).encode()
        self.transport.write(response_head(status, "application/json", keep_alive, len(data)) + data)
        self.finish(keep_alive)

    def finish(self, keep_alive: bool) -> None:
        if not keep_alive:
            self.transport.close()

    def chat(self, body: dict[str, Any], keep_alive: bool) -> None:
        received_ns = time.monotonic_ns()
        STATS["chat_requests"] += 1
        STATS["chat_connections"] += self.chats == 0
        self.chats += 1
        pace = pace_of(body)
        if not body.get("stream"):
            content = "".join(chunk_content(i) for i in range(pace["chunks"]))
            self.send_json(200, {
                "id": f"paced-{pace['id']}", "object": "chat.completion", "created": int(time.time()), "model": MODEL,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": usage(pace["chunks"])}, keep_alive)
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.busy = True
        asyncio.get_running_loop().create_task(self.stream(pace, include_usage, keep_alive, received_ns))

    async def stream(self, pace: dict[str, Any], include_usage: bool, keep_alive: bool, received_ns: int) -> None:
        request_id, chunks, rate = pace["id"], pace["chunks"], pace["rate"]
        record = {"request_ns": received_ns, "rate": rate, "chunks": chunks, "t0_ns": None, "writes_ns": []}
        RECORDS[request_id] = record
        write = self.transport.write
        write(response_head(200, "text/event-stream", keep_alive) + http_chunk(sse(
            completion_chunk(request_id, {"role": "assistant", "content": ""}))))
        # Only the index changes from chunk to chunk: format one template instead of json.dumps each time.
        before, after = json.dumps(completion_chunk(request_id, {"content": "\0"})).encode().split(b"\\u0000")
        writes = record["writes_ns"]
        t0 = time.monotonic()
        record["t0_ns"] = int(t0 * 1e9)
        for i in range(chunks):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.transport.is_closing():  # the client left: stop, as a real server would
                record["abandoned_at_chunk"] = i
                return
            writes.append(time.monotonic_ns())  # before the write, so no arrival can precede it
            write(http_chunk(b"data: " + before + chunk_content(i).encode() + after + b"\n\n"))
        tail = sse(completion_chunk(request_id, {}, "stop"))
        if include_usage:
            tail += sse({**completion_chunk(request_id, {}), "choices": [], "usage": usage(chunks)})
        write(http_chunk(tail + sse("[DONE]")) + http_chunk(b""))
        self.busy = False
        self.finish(keep_alive)
        self.next_request()


async def serve(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Connection, host, port, backlog=256)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
