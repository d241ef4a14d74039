"""The runner's HTTP tokenizer client: the uid protocol (B) and the stateless one (A).

Plain http.client keeps the emulator's start-up fast (no third-party HTTP stack to import).
"""
from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit


class TokenizerUnreachable(Exception):
    """The tokenizer server did not answer (refused, reset, timed out or sent garbage)."""


class HttpTokenizer:
    def __init__(self, url: str, timeout: float = 30.0):
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            connection.request(method, path, body=payload, headers=headers)
            reply = json.loads(connection.getresponse().read() or b"{}")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise TokenizerUnreachable(f"{method} {path}: {exc}") from exc
        finally:
            connection.close()
        if isinstance(reply, dict) and "error" in reply:
            raise TokenizerUnreachable(f"{method} {path}: {reply['error']}")
        return reply

    def tokenize(self, text: str) -> list[int]:
        """Our server's extension: plain encoding without chat template (the scripted engine)."""
        return self.request("POST", "/tokenize", {"text": text})["token_ids"]


class UidTokenizer(HttpTokenizer):
    """B generation: one conversation per uid, kept by the server."""

    uid = ""

    def open_session(self) -> str:
        self.uid = self.request("GET", "/get_uid")["uid"]
        return self.uid

    def bos_id(self) -> int:
        return self.request("GET", f"/bos_id?uid={self.uid}")["bos_id"]

    def eos_id(self) -> int:
        return self.request("GET", f"/eos_id?uid={self.uid}")["eos_id"]

    def reset(self, system_prompt: str) -> list[int]:
        return self.request("POST", "/reset", {"uid": self.uid, "system_prompt": system_prompt})["token_ids"]

    def encode(self, text: str, last_reply: str) -> tuple[list[int], list[int]]:
        """(all token ids of the conversation, the new ones still to prefill)."""
        reply = self.request("POST", "/encode", {"uid": self.uid, "text": text, "last_reply": last_reply})
        return reply["token_ids"], reply["diff"]

    def decode(self, token_ids: list[int]) -> str:
        return self.request("POST", "/decode", {"uid": self.uid, "token_ids": token_ids})["text"]

    def tokenize(self, text: str) -> list[int]:
        # With the uid: a server serving several models on this port knows whose tokenizer it is.
        return self.request("POST", "/tokenize", {"text": text, "uid": self.uid})["token_ids"]


class StatelessTokenizer(HttpTokenizer):
    """A generation: no session; the server wraps every text in its fixed chat template."""

    def bos_id(self) -> int:
        return self.request("GET", "/bos_id")["bos_id"]

    def eos_id(self) -> int:
        return self.request("GET", "/eos_id")["eos_id"]

    def encode(self, text: str) -> list[int]:
        return self.request("POST", "/encode", {"text": text})["token_ids"]

    def decode(self, token_ids: list[int]) -> str:
        return self.request("POST", "/decode", {"token_ids": token_ids})["text"]


class VisionTokenizer(StatelessTokenizer):
    """The vision runners' client: the stateless protocol, the image tokens, and `/encode`
    with `img_prompt` (the server puts the image placeholders into the prompt)."""

    def img_start_token(self) -> int:
        return self.request("GET", "/img_start_token")["img_start_token"]

    def img_context_token(self) -> int:
        return self.request("GET", "/img_context_token")["img_context_token"]

    def encode_turn(self, text: str, num_img: int, imgsz: int, img_token_num: int) -> list[int]:
        """The InternVL runner sends `imgsz`, the Qwen tokenizer script reads `img_token_num`:
        both are sent, so either script (and ours) can answer."""
        body = {"text": text, "img_prompt": num_img > 0, "imgsz": imgsz, "num_img": num_img,
                "img_token_num": img_token_num}
        token_ids = self.request("POST", "/encode", body)["token_ids"]
        if not isinstance(token_ids, list):
            raise TokenizerUnreachable(f"POST /encode: token_ids {token_ids!r}")
        return token_ids
