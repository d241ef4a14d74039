"""One process serving the tokenizers of every model that runs our server (the shared host).

    python -m tokenizer_service.host      (driven by the tokenizer service over stdin/stdout)

A tokenizer server per model costs a Python interpreter, its libraries and a copy of the
allocator's slack each (~50 MB RSS); one process holding every model's tokenizer pays that once.
It listens on each model's port; models whose runners share a port (the 12345 every published
run script hard-codes) share its listener, and tokenizer_service.server.PortModels tells their
calls apart.

The control channel is one JSON object per line, answered in order on stdout (logs go to stderr):
    {"op": "add", "name": N, "host": H, "port": P, "arguments": [server options]}
        → {"name": N, "ok": true} | {"name": N, "ok": false, "unusable": bool, "error": "..."}
    {"op": "remove", "name": N} → {"name": N, "ok": true}
`arguments` are tokenizer_service.server's options (`--tokenizer DIR …`). `unusable`: the
tokenizer files do not load or render, what a server of its own says by exiting with
EXIT_UNUSABLE. The host exits when its stdin closes: the service that drives it is gone.
"""
from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass
from typing import Any

from tokenizer_service.server import (
    HTTPTokenizerServer,
    PortModels,
    UnusableTokenizer,
    argument_parser,
    build_app,
    one_malloc_arena,
)


@dataclass
class Listener:
    server: HTTPTokenizerServer
    thread: threading.Thread
    models: PortModels


class Host:
    """The listeners and the models on each; driven by one control thread."""

    def __init__(self) -> None:
        self._listeners: dict[tuple[str, int], Listener] = {}
        self._where: dict[str, tuple[str, int]] = {}  # model → its listener's address

    def add(self, name: str, host: str, port: int, arguments: list[str]) -> dict[str, Any]:
        self.remove(name)  # a model added again (its options changed) replaces itself
        try:
            args = argument_parser().parse_args([*arguments, "--host", host, "--port", str(port)])
        except SystemExit:
            return {"name": name, "ok": False, "unusable": False, "error": f"bad server options: {arguments}"}
        try:
            app = build_app(args)
        except UnusableTokenizer as exc:
            return {"name": name, "ok": False, "unusable": True, "error": str(exc)}
        except Exception as exc:  # a load that fails without --check-template
            return {"name": name, "ok": False, "unusable": False, "error": f"{type(exc).__name__}: {exc}"}
        address = (host, port)
        listener = self._listeners.get(address)
        if listener is None:
            models = PortModels()
            try:
                server = HTTPTokenizerServer(address, models)
            except OSError as exc:
                return {"name": name, "ok": False, "unusable": False, "error": f"cannot listen on {host}:{port}: {exc}"}
            thread = threading.Thread(target=server.serve_forever, name=f"port {port}", daemon=True)
            listener = self._listeners[address] = Listener(server, thread, models)
            thread.start()
        listener.models.add(name, app)
        self._where[name] = address
        print(f"{name}: serving on http://{host}:{port} (with {', '.join(listener.models.names())})",
              file=sys.stderr, flush=True)
        return {"name": name, "ok": True}

    def remove(self, name: str) -> dict[str, Any]:
        address = self._where.pop(name, None)
        listener = self._listeners.get(address) if address else None
        if listener is not None and not listener.models.remove(name):
            # The last model on this port: free the port (a swapped-in stock script may need it).
            listener.server.shutdown()
            listener.server.server_close()
            del self._listeners[address]
        return {"name": name, "ok": True}

    def answer(self, line: str) -> dict[str, Any]:
        try:
            command = json.loads(line)
            op, name = command["op"], str(command["name"])
            if op == "add":
                return self.add(name, str(command["host"]), int(command["port"]), [str(a) for a in command["arguments"]])
            if op == "remove":
                return self.remove(name)
            return {"name": name, "ok": False, "unusable": False, "error": f"unknown op {op!r}"}
        except (ValueError, KeyError, TypeError) as exc:
            return {"name": None, "ok": False, "unusable": False, "error": f"bad command {line.strip()!r}: {exc}"}


def main() -> int:
    one_malloc_arena()
    host = Host()
    for line in sys.stdin:
        if line.strip():
            sys.stdout.write(json.dumps(host.answer(line)) + "\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
