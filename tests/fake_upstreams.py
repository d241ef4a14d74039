"""A deliberately misbehaving OpenAI-compatible upstream, run as its own process on loopback.

No real server fails on demand, so the fault shapes live here: error answers, malformed SSE
chunks, connections dropped before or in the middle of an answer, a /health that is missing or
says "loading". It also records what it saw (request bodies, headers, how many answers were in
flight at once, which clients hung up), for the tests to read at `GET /_records`.

Run: `python fake_upstreams.py --port N`; `POST /_config` with a JSON object changes behaviour:
  chat:        "stream" (default) | "error" | "malformed" | "drop_mid" | "think_inline" | "reasoning"
  error_status, error_message: the answer of "error"
  drop_first:  this many chat requests are dropped (socket closed) before any answer byte
  words, delay_s: the streamed answer: words "w1 w2 …", one chunk each, delay_s apart
  health:      200 | 404 | 503 (404 = no /health, as Ollama)
  embeddings:  true | false
  completions: true (default) | false — /v1/completions streams `prompt[<prompt>]` and, with a
               suffix, `suffix[<suffix>]`, as two `text` chunks (false: 404, as a chat-only server)
  tools_reply: how a chat request that carries `tools` is answered (one whose last message is a
               tool result gets the text `result[<its content>]` instead, ending a tool loop):
               "deltas" (default) — one call of the first tool (or of the one `tool_choice`
               names) as OpenAI streams it: a delta with its id and name, then the arguments in
               two pieces, finish_reason "tool_calls"; "text" — the call written as text in the
               content (`<tool_call>{...}</tool_call>`, as a server without a tool parser
               answers); "none" — the usual words, no call
  tool_arguments: the arguments of that call (default {})
  text_before_call: content streamed before the call (default "")
A chat whose last user message holds a `json:<mode> <value>` directive is answered with the
scripted emulator's JSON for it (ax_emulator/scripted.py `json_reply`), in chunks of 8
characters, as a server that honours `response_format` might send it (or not: `broken`); the
body's `response_format` is recorded like the rest.
At start (in --config only): "load_s" seconds of loading — /health answers 503 and a line
"loading weights i/4" goes to stderr at each quarter — or "listen": false, a server that prints
a line and never listens (a stalled load).
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's emulator
from ax_emulator.scripted import json_reply  # noqa: E402

DEFAULTS: dict[str, Any] = {
    "chat": "stream",
    "error_status": 500,
    "error_message": "the fake upstream was told to fail",
    "drop_first": 0,
    "words": 5,
    "delay_s": 0.0,
    "health": 200,
    "embeddings": False,
    "completions": True,
    "tools_reply": "deltas",
    "tool_arguments": {},
    "text_before_call": "",
}


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.config = dict(DEFAULTS)
        self.chat_requests: list[dict[str, Any]] = []
        self.completion_requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.disconnects: list[dict[str, Any]] = []
        self.completed = 0

    def records(self) -> dict[str, Any]:
        with self.lock:
            return {
                "config": self.config,
                "chat_requests": self.chat_requests,
                "completion_requests": self.completion_requests,
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "disconnects": self.disconnects,
                "completed": self.completed,
            }


STATE = State()


def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "fake-1",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "fake",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def _json_answer(body: dict[str, Any]) -> str | None:
    """The scripted JSON answer the last user message asks for, if it asks for one."""
    users = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    content = users[-1].get("content") if users else None
    return json_reply(content) if isinstance(content, str) else None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read /_records
        pass

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def _write_chunk(self, data: bytes) -> None:
        """One piece of a chunked body."""
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _event(self, payload: dict[str, Any] | str) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        self._write_chunk(f"data: {text}\n\n".encode())

    def do_GET(self) -> None:
        config = STATE.config
        if self.path == "/_records":
            self._json(200, STATE.records())
        elif self.path == "/health":
            status = config["health"]
            if status == 200:
                self._json(200, {"status": "ok"})
            elif status == 503:
                self._json(503, {"error": {"message": "Loading model", "code": 503}})
            else:
                self._json(status, {"detail": "Not Found"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
        else:
            self._json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        body = self._body()
        if self.path == "/_config":
            with STATE.lock:
                STATE.config.update(body)
            self._json(200, STATE.config)
        elif self.path == "/v1/embeddings":
            if not STATE.config["embeddings"]:
                self._json(404, {"detail": "Not Found"})
                return
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            data = [{"object": "embedding", "index": i, "embedding": [float(len(text)), 0.5, -1.0]} for i, text in enumerate(inputs)]
            self._json(200, {"object": "list", "data": data, "usage": {"prompt_tokens": len(inputs) * 3, "total_tokens": len(inputs) * 3}})
        elif self.path == "/v1/chat/completions":
            self._chat(body)
        elif self.path == "/v1/completions" and STATE.config["completions"]:
            self._completion(body)
        else:
            self._json(404, {"detail": "Not Found"})

    def _chat(self, body: dict[str, Any]) -> None:
        with STATE.lock:
            config = dict(STATE.config)
            number = len(STATE.chat_requests)
            STATE.chat_requests.append(
                {"body": body, "authorization": self.headers.get("Authorization"), "peer_port": self.client_address[1]}
            )
            drop = config["drop_first"] > 0
            if drop:
                STATE.config["drop_first"] -= 1
        if drop:
            self._hang_up()
            return
        mode = config["chat"]
        if mode == "error":
            self._json(config["error_status"], {"error": {"message": config["error_message"], "type": "server_error"}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with STATE.lock:
            STATE.in_flight += 1
            STATE.max_in_flight = max(STATE.max_in_flight, STATE.in_flight)
        sent = 0
        try:
            self._event(chunk({"role": "assistant", "content": ""}))
            if mode == "malformed":
                self._event(chunk({"content": "fine "}))
                self._event('{"choices": [{"delta": {"content": "broken')
            elif mode == "drop_mid":
                self._event(chunk({"content": "half "}))
                self._hang_up()
                return
            elif mode == "think_inline":
                for piece in ("<thi", "nk>pondering", " hard</think>", "the answer"):
                    self._event(chunk({"content": piece}))
            elif (answer := _json_answer(body)) is not None:
                for start in range(0, len(answer), 8):
                    time.sleep(config["delay_s"])
                    self._event(chunk({"content": answer[start:start + 8]}))
                    sent += 1
            elif mode == "reasoning":
                self._event(chunk({"reasoning_content": "pondering", "reasoning": "pondering"}))
                self._event(chunk({"content": "the answer"}))
            elif body.get("tools") and (body.get("messages") or [{}])[-1].get("role") == "tool":
                self._event(chunk({"content": f"result[{body['messages'][-1].get('content')}]"}))
            elif body.get("tools") and config["tools_reply"] != "none":
                self._tool_call(body, config)
                return
            else:
                for i in range(config["words"]):
                    time.sleep(config["delay_s"])
                    self._event(chunk({"content": f"w{i + 1} "}))
                    sent += 1
            self._event(chunk({}, "stop"))
            self._event(chunk({}, None, {"prompt_tokens": 7, "completion_tokens": max(sent, 1), "total_tokens": 7 + max(sent, 1)}))
            self._event("[DONE]")
            self._write_chunk(b"")
            with STATE.lock:
                STATE.completed += 1
        except (BrokenPipeError, ConnectionResetError):
            with STATE.lock:
                STATE.disconnects.append({"request": number, "chunks_sent": sent, "at": time.time()})
            self.close_connection = True
        finally:
            with STATE.lock:
                STATE.in_flight -= 1

    def _tool_call(self, body: dict[str, Any], config: dict[str, Any]) -> None:
        """One call of the first tool (or the named one), as deltas or as text; then the end."""
        choice = body.get("tool_choice")
        name = choice["function"]["name"] if isinstance(choice, dict) else body["tools"][0]["function"]["name"]
        arguments = json.dumps(config["tool_arguments"])
        if config["text_before_call"]:
            self._event(chunk({"content": config["text_before_call"]}))
        if config["tools_reply"] == "text":
            self._event(chunk({"content": '<tool_call>{"name": "%s", "arguments": ' % name}))
            self._event(chunk({"content": arguments + "}</tool_call>"}))
            finish = "stop"
        else:
            self._event(chunk({"tool_calls": [{"index": 0, "id": "call_fake_1", "type": "function",
                                               "function": {"name": name, "arguments": ""}}]}))
            half = len(arguments) // 2
            for piece in (arguments[:half], arguments[half:]):
                self._event(chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
            finish = "tool_calls"
        self._event(chunk({}, finish))
        self._event(chunk({}, None, {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}))
        self._event("[DONE]")
        self._write_chunk(b"")
        with STATE.lock:
            STATE.completed += 1

    def _completion(self, body: dict[str, Any]) -> None:
        """The legacy completions endpoint: the prompt as it came, no chat template."""
        with STATE.lock:
            STATE.completion_requests.append({"body": body})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        pieces = [f"prompt[{body.get('prompt')}]"] + ([f"suffix[{body['suffix']}]"] if "suffix" in body else [])
        for piece in pieces:
            self._event({"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": piece, "finish_reason": None}]})
        self._event({"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": "", "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": len(pieces), "total_tokens": 3 + len(pieces)}})
        self._event("[DONE]")
        self._write_chunk(b"")

    def _hang_up(self) -> None:
        """Close the connection now, with no answer or in the middle of one."""
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--config", default="{}", help="JSON object overriding the defaults")
    args = parser.parse_args()
    config = json.loads(args.config)
    STATE.config.update(config)
    if config.get("listen") is False:
        print("starting, but never listening", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    load_s = float(config.get("load_s", 0))
    if load_s:
        STATE.config["health"] = 503
        threading.Thread(target=_load, args=(load_s,), daemon=True).start()
    server.serve_forever()


def _load(seconds: float) -> None:
    for step in range(1, 5):
        time.sleep(seconds / 4)
        print(f"loading weights {step}/4", file=sys.stderr, flush=True)
    with STATE.lock:
        STATE.config["health"] = 200


if __name__ == "__main__":
    main()
