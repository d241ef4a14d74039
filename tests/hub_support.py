"""A local model hub in Hugging Face's layout, for the real `huggingface_hub` client (HF_ENDPOINT):
repos of small files, the info and resolve routes the client calls, ranges for resumed downloads,
and a fault that cuts a file off part-way once (an interrupted download)."""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from harness.net import free_port

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_INFO = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/?]+))?$")
_TREE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/?]+)(?:/(.*))?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


@dataclass
class LocalHub:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo id -> path -> bytes
    cut_once: dict[tuple[str, str], int] = field(default_factory=dict)  # (repo, path) -> bytes sent, then cut
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, Range header)
    url: str = ""
    _server: ThreadingHTTPServer | None = None

    def add_folder(self, repo: str, folder: Path) -> None:
        self.repos[repo] = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    def start(self) -> LocalHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802 (http.server's names)
                self._serve(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._serve(body=True)

            def _json(self, status: int, value: object, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(value).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, item in (headers or {}).items():
                    self.send_header(key, item)
                self.end_headers()
                self.wfile.write(data)

            def _serve(self, body: bool) -> None:
                path = self.path.split("?")[0]
                hub.requests.append((self.command, path, self.headers.get("Range", "")))
                if tree := _TREE.match(path):
                    files = hub.repos.get(tree.group(1))
                    if files is None:
                        return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    folders = sorted({str(Path(name).parent) for name in files} - {"."})
                    entries = [{"type": "directory", "path": f, "oid": COMMIT[:40], "size": 0} for f in folders]
                    entries += [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest(),
                                 "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}}
                                for name, data in files.items()]
                    return self._json(200, entries)
                if info := _INFO.match(path):
                    files = hub.repos.get(info.group(1))
                    if files is None:
                        return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    siblings = [{"rfilename": name, "size": len(data),
                                 "lfs": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}}
                                for name, data in files.items()]
                    return self._json(200, {"id": info.group(1), "modelId": info.group(1), "sha": COMMIT,
                                            "siblings": siblings, "private": False, "disabled": False})
                resolve = _RESOLVE.match(path)
                if not resolve or resolve.group(1) not in hub.repos:
                    return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                repo, name = resolve.group(1), resolve.group(3)
                data = hub.repos[repo].get(name)
                if data is None:
                    return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                start = 0
                if match := re.match(r"bytes=(\d+)-", self.headers.get("Range", "")):
                    start = int(match.group(1))
                digest = hashlib.sha256(data).hexdigest()
                self.send_response(HTTPStatus.PARTIAL_CONTENT if start else HTTPStatus.OK)
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("ETag", f'"{digest}"')
                self.send_header("X-Linked-Etag", f'"{digest}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if not body:
                    return
                cut = hub.cut_once.pop((repo, name), None)
                if cut is not None:
                    self.wfile.write(data[start:start + cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the download breaks off here
                    return
                self.wfile.write(data[start:])

        port = free_port()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
