"""Our tokenizer server: the card's uid and stateless tokenizer protocols, plus extensions.

    python -m tokenizer_service.server --host 127.0.0.1 --port 12345 --tokenizer DIR_OR_GGUF

One process speaks both stock protocols on the stock paths: a request carrying `uid` (query or
body) is the session protocol of B runners, one without is the stateless protocol of A runners.
Bodies are the stock ones; unlike the stock scripts, errors come with a real HTTP status code
(400, 404, 405, 500) beside the stock `{"error": "..."}` body. Extensions (see docs/design.md):
`GET /capabilities`, `POST /config`, `POST /tokenize`, `GET /stats`.

Rules this server follows:
- Prompts are rendered with the tokenizer's chat template and encoded without adding special
  tokens (the template writes them), as `apply_chat_template(tokenize=True)` does.
- `/encode` text arrives newline-escaped (tokenizer_service.prompt_escape) and is restored.
- `diff` assumes the runner holds the conversation so far as the template renders it (the
  system prompt after `/reset`; after a turn, everything up to the end of the previous reply).
- `thinking` from `/config` reaches the template as `enable_thinking` only when the template
  reads that variable; otherwise it is ignored.
- Standing in for a folder's stock script (`--default-system-prompt`, `--user-suffix`,
  `--generation-prompt-cut`, read from the script's text by tokenizer_service.stock_script), it
  answers as that script does: a conversation opens with the script's system prompt where none
  is given, every user message gets its suffix (Qwen3's `/no_think`) unless thinking is on, and
  held ids are cut from a render with the generation prompt as the script cuts them, so the
  runner gets the same `token_ids` and `diff`. `GET /reset?uid=U` (the Qwen2.5-era scripts'
  form) reopens the conversation as `POST /reset` without a system prompt does, holding nothing
  (the runner got no ids to prefill: the next `diff` is the whole prompt), and answers
  `{"success": true}`. (The scripts keep the previous conversation's ids as held there, so a
  second conversation's `diff` would be cut at that stale length; this server does not copy that.)
- `raw` from `/config` (until set false): `/reset` opens an empty context (no system prompt)
  and `/encode` encodes the text as it is, without the chat template and without the history;
  special tokens written in the text (a fill-in-the-middle prompt's) become their ids.
- `tools` from `/config` (as `system_prompt`, for the conversation the next `/reset` opens):
  every render of that conversation passes them to the template as `apply_chat_template(...,
  tools=...)` does; a template that does not render them gets them in its system prompt in the
  Hermes/Qwen form (tokenizer_service.tool_prompt). Calls of assistant messages and tool
  messages go to the template as they are where it renders them, else as that form's text.
- `turn` from `/config` (once): the messages the next `/encode` appends instead of a user
  message made of its text — the tool results of a tool round.
- Stateless `/decode` has no session to buffer in: it decodes exactly the ids it is given.
- `/stats`: `prompt_tokens` is the length of the last rendered prompt (all ids), `reply_tokens`
  the number of ids sent to `/decode` since that `/encode`, `reply_text` the text `/decode`
  returned for them: the model's answer as the runner printed it, which the daemon uses to tell
  the runner's framing from an answer that imitates it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tokenizer_service.conversation import IncrementalDecoder, infill_tokens, prefill_diff, stop_tokens, strip_think
from tokenizer_service.prompt_escape import unescape_prompt_line
from tokenizer_service.tool_prompt import as_text_messages, with_tools

CAPABILITIES = {
    "server": "axm1-tokenizer",
    "newline_escape": "backslash",
    "controls": ["system_prompt", "thinking", "history", "raw", "tools", "turn"],
}
HISTORY_ROLES = ("user", "assistant", "tool")
# The image tokens of the two VLM families the card's runners serve (docs/vlm-runners.md):
# (start, placeholder, end); which one a tokenizer has decides where `/encode` puts the block.
IMAGE_TOKENS = {
    "internvl": ("<img>", "<IMG_CONTEXT>", "</img>"),
    "qwen": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
}
INTERNVL_CONTEXT_LEN = {448: 256, 224: 64}
TURN_ROLES = ("user", "tool")
DEFAULT_SESSION_IDLE_SECONDS = 24 * 3600.0
# The tokenizer service passes its session lifetime here, since stock script command lines are fixed.
SESSION_IDLE_ENV = "AXM1_TOKENIZER_SESSION_IDLE_SECONDS"
# ... and its engine setting (`--engine`'s default).
ENGINE_ENV = "AXM1_TOKENIZER_ENGINE"
# The exit status of a server whose tokenizer files do not load or render (`--check-template`): the
# tokenizer service then runs the folder's own script where the descriptor lets it choose (`auto`).
EXIT_UNUSABLE = 3
# Keep-alive connections idle longer than this are closed, so a vanished client frees its thread.
CONNECTION_IDLE_SECONDS = 600


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# tokenizer_class values AutoTokenizer maps to the generic fast tokenizer class.
GENERIC_FAST_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
# Which library a server's tokenizer runs on (`--engine`, `engine` in /capabilities): `tokenizers`
# (tokenizer_service.lite_tokenizer: tokenizers + Jinja2, without transformers) or `transformers`;
# `auto` takes the first where the files allow it and transformers where they do not.
ENGINES = ("auto", "tokenizers", "transformers")


def names_generic_fast_class(folder: Path) -> bool:
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("tokenizer_class") in GENERIC_FAST_CLASSES


def load_transformers_tokenizer(source: Path) -> Any:
    """A transformers tokenizer from a tokenizer folder or a .gguf file (local files only)."""
    # Slow imports, only where needed. AutoTokenizer imports AutoConfig and, through it, torch
    # when installed (over a second); a folder naming the generic fast class loads the same
    # class directly.
    if source.is_dir() and names_generic_fast_class(source):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(source), local_files_only=True)
    from transformers import AutoTokenizer

    if source.is_file():
        return AutoTokenizer.from_pretrained(
            str(source.parent), gguf_file=source.name, local_files_only=True
        )
    return AutoTokenizer.from_pretrained(str(source), local_files_only=True)


def _libc() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its allocator's knobs do not apply
        return None


def one_malloc_arena() -> None:
    """All threads allocate from one heap (glibc's M_ARENA_MAX = 1). This server makes a thread
    per connection and serializes the tokenizer's work behind a lock anyway; with an arena per
    thread, eight concurrent clients grew it by ~9 MB, with one by ~4 MB. Before any thread."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-8, 1)  # M_ARENA_MAX


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim). Loading a
    tokenizer.json parses megabytes of JSON into structures a fraction of that size; the
    allocator keeps the difference (about 16 MB for SmolLM2's) unless told to let it go."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def load_tokenizer(source: Path, engine: str = "auto", template_from: Path | None = None) -> tuple[Any, str | None]:
    """The tokenizer of `source` (a folder or a .gguf file), with the chat template of
    `template_from` if given, and why it runs on transformers (None where it does not).

    `auto` loads it without transformers (tokenizer_service.lite_tokenizer) where the files
    allow it: a folder with tokenizer.json naming the generic fast class, whose chat template
    compiles; else with transformers, imported only then."""
    reason = None
    if engine != "transformers":
        from tokenizer_service.lite_tokenizer import LiteTokenizer, LiteUnsupported, chat_templates, read_config

        try:
            tokenizer = LiteTokenizer(source)
            if template_from is not None:  # its template only (the files' precedence), not its vocabulary
                tokenizer.chat_template = chat_templates(template_from, read_config(template_from))
            return tokenizer, None
        except LiteUnsupported as exc:
            if engine == "tokenizers":
                raise
            reason = str(exc)
    tokenizer = load_transformers_tokenizer(source)
    if template_from is not None:
        tokenizer.chat_template = load_transformers_tokenizer(template_from).chat_template
    return tokenizer, reason or "--engine transformers"


class ChatTokenizer:
    """The tokenizer (a transformers one or tokenizer_service.lite_tokenizer's) behind one lock.

    Fast tokenizers are not safe to call from several threads at once ("Already borrowed"),
    and each call takes well under a millisecond, so serializing them costs nothing.
    """

    def __init__(self, tokenizer: Any, fallback_reason: str | None = None) -> None:
        self._tokenizer = tokenizer
        self.engine = getattr(tokenizer, "engine", "transformers")
        self.fallback_reason = fallback_reason
        self._lock = threading.Lock()
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
        self.chat_template = template
        self.has_thinking_switch = "enable_thinking" in template
        eos = tokenizer.eos_token if isinstance(tokenizer.eos_token, str) else None
        self.stop = stop_tokens(eos, template)
        vocabulary = tokenizer.get_vocab()
        self.infill = infill_tokens(vocabulary)
        self.images = next((family for family, tokens in IMAGE_TOKENS.items()
                            if all(token in vocabulary for token in tokens)), None)
        self._vocabulary_ids = {token: vocabulary[token] for tokens in IMAGE_TOKENS.values()
                                for token in tokens if token in vocabulary}
        self.tools_native, self.calls_native = self._tool_support()

    def _tool_support(self) -> tuple[bool, bool]:
        """Does the template render tool definitions, and assistant calls with tool results?
        Found by rendering probes (a template may also fail on roles it does not know)."""
        probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
        tool = {"type": "function", "function": {"name": "axm1_probe_tool", "description": "probe",
                                                  "parameters": {"type": "object", "properties": {}}}}
        calls = probe + [
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "axm1_probe_call", "arguments": {"axm1_argument": 1}}}]},
            {"role": "tool", "content": "axm1_probe_result", "name": "axm1_probe_call"},
        ]
        try:
            tools = "axm1_probe_tool" in self._tokenizer.apply_chat_template(probe, tools=[tool], tokenize=False)
        except Exception:
            tools = False
        try:
            text = self._tokenizer.apply_chat_template(calls, tokenize=False)
            native_calls = "axm1_probe_call" in text and "axm1_probe_result" in text
        except Exception:
            native_calls = False
        return tools, native_calls

    def facts(self) -> dict[str, Any]:
        """What `/capabilities` tells about the tokenizer: its chat template, the texts that end
        a reply, its fill-in-the-middle tokens (None: it has none)."""
        return {
            # The library the tokenizer runs on, and why it is transformers where it is.
            "engine": self.engine,
            "engine_fallback": self.fallback_reason if self.engine == "transformers" else None,
            "chat_template": self.chat_template or None,
            "stop": list(self.stop),
            "infill": self.infill,
            "images": self.images,
            "thinking_switch": self.has_thinking_switch,
            # How tools reach the model: the template's own form, or ours (tool_prompt.py).
            "tools": {
                "definitions": "template" if self.tools_native else "system_prompt",
                "calls": "template" if self.calls_native else "text",
            },
        }

    @property
    def bos_id(self) -> int:
        return -1 if self._tokenizer.bos_token_id is None else self._tokenizer.bos_token_id

    @property
    def eos_id(self) -> int:
        return -1 if self._tokenizer.eos_token_id is None else self._tokenizer.eos_token_id

    def image_token_id(self, which: int) -> int:
        """The id of the image start (0) or placeholder (1) token; -1 without image tokens,
        as the published scripts answer for a token the tokenizer lacks."""
        if self.images is None:
            return -1
        return self._vocabulary_ids[IMAGE_TOKENS[self.images][which]]

    def with_images(self, text: str, count: int, imgsz: int | None, token_num: int | None) -> str:
        """The user text with the placeholders of `count` images where the family's script puts
        them: InternVL after the question (`\n<img>` + `<IMG_CONTEXT>`×n + `</img>\n` each),
        Qwen-VL before it (`<|vision_start|>` + `<|image_pad|>`×n + `<|vision_end|>` each)."""
        if self.images is None:
            raise ApiError(HTTPStatus.BAD_REQUEST, "img_prompt: this tokenizer has no image tokens")
        start, placeholder, end = IMAGE_TOKENS[self.images]
        if token_num is None:
            if imgsz is None:
                raise ApiError(HTTPStatus.BAD_REQUEST, "img_prompt needs imgsz or img_token_num")
            token_num = INTERNVL_CONTEXT_LEN.get(imgsz) if self.images == "internvl" else (imgsz // 28) ** 2
            if token_num is None:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"imgsz {imgsz}: InternVL encoders take 448 or 224")
        if self.images == "internvl":
            return text + (f"\n{start}" + placeholder * token_num + f"{end}\n") * count
        return (start + placeholder * token_num + end) * count + text

    def template_form(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The messages and tools as this template takes them: calls and tool results as text
        where it does not render them, definitions in the system prompt where it does not."""
        if not self.calls_native and any(m.get("role") == "tool" or m.get("tool_calls") for m in messages):
            messages = as_text_messages(messages)
        if tools and not self.tools_native:
            if messages and messages[0].get("role") == "system":
                messages = [{"role": "system", "content": with_tools(messages[0]["content"], tools)}, *messages[1:]]
            else:
                messages = [{"role": "system", "content": with_tools(None, tools)}, *messages]
            tools = None
        return messages, tools or None

    def render(
        self, messages: list[dict[str, Any]], generation_prompt: bool, thinking: bool | None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Ids of `messages` rendered with the chat template ([] for no messages)."""
        messages, tools = self.template_form(messages, tools)
        if not messages:
            return []
        extra: dict[str, Any] = {}
        if thinking is not None and self.has_thinking_switch:
            extra["enable_thinking"] = thinking
        if tools:
            extra["tools"] = tools
        with self._lock:
            text = self._tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt, **extra
            )
            return self._tokenizer.encode(text, add_special_tokens=False)

    def encode_plain(self, text: str) -> list[int]:
        with self._lock:
            return self._tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        with self._lock:
            return self._tokenizer.decode(ids)


@dataclass(frozen=True)
class StockDefaults:
    """What the folder's stock script does by default, where this server stands in for it
    (tokenizer_service.stock_script reads them from its text)."""

    system_prompt: str | None = None  # a conversation's system prompt when none is given
    user_suffix: str | None = None  # appended to user messages unless thinking is on ("/no_think")
    # Held ids are a render with the generation prompt less this many ids (the scripts'
    # `encode(text)[:-3]`); None: a render without the generation prompt.
    generation_prompt_cut: int | None = None
    # The script serves no POST /reset (the Qwen2.5-era ones): the system prompt a runner sends
    # there never reached the model, the script's own did; so here too (the daemon's still does).
    ignore_runner_system_prompt: bool = False


@dataclass
class Controls:
    """What the daemon set through `/config`; shared by all sessions of this server."""

    system_prompt: str | None = None
    thinking: bool | None = None
    pending_history: list[dict[str, Any]] = field(default_factory=list)
    raw: bool = False  # empty contexts, prompts encoded as they are
    tools: list[dict[str, Any]] | None = None  # for the conversation the next /reset opens
    pending_turn: list[dict[str, Any]] = field(default_factory=list)  # the next /encode's messages


@dataclass
class Session:
    """One runner conversation (uid protocol). Touch only while holding `lock`."""

    decoder: IncrementalDecoder
    lock: threading.Lock = field(default_factory=threading.Lock)
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None  # the definitions every render of it passes
    held_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    reply_text: list[str] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)


class TokenizerServer:
    """The protocol logic, independent of HTTP: each method answers one route."""

    def __init__(
        self, tokenizer: ChatTokenizer, session_idle_seconds: float, stock: bool = False,
        defaults: StockDefaults = StockDefaults(),
    ) -> None:
        self.tokenizer = tokenizer
        self.defaults = defaults
        # Stock mode behaves as the card's own scripts: no extensions for the daemon, prompt text
        # taken verbatim (no newline restore). /tokenize stays: the scripted emulator needs it.
        self.stock = stock
        self.session_idle_seconds = session_idle_seconds
        self.controls = Controls()
        self._controls_lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._sessions_lock = threading.Lock()

    # -- sessions --------------------------------------------------------------------------

    def _forget_idle_sessions(self, now: float) -> None:
        """Free sessions unused for too long (called with _sessions_lock held)."""
        expired = [uid for uid, s in self._sessions.items() if now - s.last_used > self.session_idle_seconds]
        for uid in expired:
            del self._sessions[uid]

    def new_session(self) -> str:
        """A conversation opened with the system prompt (set, else the default), as a stock
        script opens one: a runner that never calls /reset prefills it with its first turn."""
        uid = str(uuid.uuid4())
        now = time.monotonic()
        with self._controls_lock:
            system_prompt = self._opening_system(None)
            raw, tools = self.controls.raw, self.controls.tools
        messages = [] if system_prompt is None or raw else [{"role": "system", "content": system_prompt}]
        session = Session(decoder=IncrementalDecoder(self.tokenizer.decode), last_used=now, messages=messages,
                          tools=None if raw else tools)
        with self._sessions_lock:
            self._forget_idle_sessions(now)
            self._sessions[uid] = session
        return uid

    def _opening_system(self, asked: str | None) -> str | None:
        """The system prompt a conversation opens with: the daemon's, else the runner's, else the
        stock script's default (called with _controls_lock held)."""
        if self.defaults.ignore_runner_system_prompt:
            asked = None
        for prompt in (self.controls.system_prompt, asked, self.defaults.system_prompt):
            if prompt is not None:
                return prompt
        return None

    def _held_ids(self, messages: list[dict[str, Any]], thinking: bool | None,
                  tools: list[dict[str, Any]] | None) -> list[int]:
        """The ids a runner holds after `messages`: as rendered without the generation prompt,
        or, standing in for a stock script, as it computes them (with it, less a fixed cut)."""
        cut = self.defaults.generation_prompt_cut
        if cut is None or not messages:
            return self.tokenizer.render(messages, generation_prompt=False, thinking=thinking, tools=tools)
        ids = self.tokenizer.render(messages, generation_prompt=True, thinking=thinking, tools=tools)
        return ids[:-cut] if cut > 0 else ids

    def _user(self, text: str, thinking: bool | None) -> dict[str, Any]:
        return {"role": "user", "content": self._with_suffix(text, thinking)}

    def _with_suffix(self, text: str, thinking: bool | None) -> str:
        """The stock script's suffix (Qwen3's `/no_think`) unless thinking was asked for."""
        suffix = self.defaults.user_suffix
        return text + suffix if suffix and thinking is not True else text

    def _suffixed(self, messages: list[dict[str, Any]], thinking: bool | None) -> list[dict[str, Any]]:
        return [{**m, "content": self._with_suffix(m["content"], thinking)} if m["role"] == "user" else m
                for m in messages]

    def knows(self, uid: Any) -> bool:
        """Does this model hold the session `uid` (a port's router asks each model it serves)?"""
        with self._sessions_lock:
            return isinstance(uid, str) and uid in self._sessions

    def session(self, uid: Any) -> Session:
        now = time.monotonic()
        with self._sessions_lock:
            self._forget_idle_sessions(now)
            found = self._sessions.get(uid) if isinstance(uid, str) else None
            if found is None:
                raise ApiError(HTTPStatus.NOT_FOUND, f"unknown uid: {uid}")
            found.last_used = now
            return found

    def _take_controls(self) -> tuple[bool | None, list[dict[str, Any]], bool, list[dict[str, Any]]]:
        """The thinking switch, the pending history, raw mode and the pending turn (the pending
        ones handed out once)."""
        with self._controls_lock:
            history, self.controls.pending_history = self.controls.pending_history, []
            turn, self.controls.pending_turn = self.controls.pending_turn, []
            return self.controls.thinking, history, self.controls.raw, turn

    def _prompt_text(self, text: str) -> str:
        return text if self.stock else unescape_prompt_line(text)

    # -- uid protocol ----------------------------------------------------------------------

    def reset(self, uid: Any, system_prompt: str | None, held: bool = True) -> list[int]:
        """Open the session's conversation again. With `held` false (`GET /reset`, which gives
        the runner no ids to prefill) nothing is held: the next `diff` is the whole prompt."""
        session = self.session(uid)
        with self._controls_lock:
            system_prompt = self._opening_system(system_prompt)
            thinking, raw, tools = self.controls.thinking, self.controls.raw, self.controls.tools
        messages = [] if system_prompt is None or raw else [{"role": "system", "content": system_prompt}]
        tools = None if raw else tools
        held_ids = self._held_ids(messages, thinking, tools) if held else []
        with session.lock:
            session.messages, session.held_ids, session.tools = messages, held_ids, tools
            session.decoder = IncrementalDecoder(self.tokenizer.decode)
            session.prompt_tokens = 0
            session.reply_text = []
            return list(session.held_ids)

    def encode_turn(self, uid: Any, text: str, last_reply: str | None) -> tuple[list[int], list[int]]:
        session = self.session(uid)
        thinking, history, raw, turn = self._take_controls()
        if raw:
            return self._encode_raw_turn(session, text, last_reply)
        with session.lock:
            # Built aside and stored at the end, so a failing template leaves the session as it was.
            messages, held_ids, tools = list(session.messages), session.held_ids, session.tools
            if last_reply is not None:
                messages.append({"role": "assistant", "content": strip_think(last_reply)})
                held_ids = self._held_ids(messages, thinking, tools)
            if history:
                after_system = 1 if messages and messages[0]["role"] == "system" else 0
                messages[after_system:after_system] = self._suffixed(history, thinking)
            messages += self._suffixed(turn, thinking) or [self._user(self._prompt_text(text), thinking)]
            all_ids = self.tokenizer.render(messages, generation_prompt=True, thinking=thinking, tools=tools)
            diff = prefill_diff(all_ids, held_ids)
            session.messages, session.held_ids = messages, all_ids
            session.decoder = IncrementalDecoder(self.tokenizer.decode)
            session.prompt_tokens = len(all_ids)
            session.reply_text = []
            return all_ids, diff

    def _encode_raw_turn(self, session: Session, text: str, last_reply: str | None) -> tuple[list[int], list[int]]:
        """Raw mode: the text's own ids after what the context holds (a reply, encoded as printed)."""
        new_ids = self.tokenizer.encode_plain(self._prompt_text(text))
        with session.lock:
            held_ids = list(session.held_ids)
            if last_reply:
                held_ids += self.tokenizer.encode_plain(last_reply)
            all_ids = held_ids + new_ids
            session.held_ids = all_ids
            session.decoder = IncrementalDecoder(self.tokenizer.decode)
            session.prompt_tokens = len(all_ids)
            session.reply_text = []
            return all_ids, new_ids

    def decode_turn(self, uid: Any, ids: list[int]) -> str:
        session = self.session(uid)
        with session.lock:
            piece = session.decoder.push(ids)
            session.reply_text.append(piece)
            return piece

    def stats(self, uid: Any) -> dict[str, Any]:
        session = self.session(uid)
        with session.lock:
            return {
                "prompt_tokens": session.prompt_tokens,
                "reply_tokens": session.decoder.token_count,
                "reply_text": "".join(session.reply_text),
            }

    # -- stateless protocol ----------------------------------------------------------------

    def encode_stateless(self, text: str, images: tuple[int, int | None, int | None] | None = None) -> list[int]:
        """`images`: (count, imgsz, img_token_num) of an `img_prompt` request; their placeholders
        go into the last user message."""
        thinking, history, raw, turn = self._take_controls()
        with self._controls_lock:
            system_prompt, tools = self._opening_system(None), self.controls.tools
        if raw:
            prompt = self._prompt_text(text)
            return self.tokenizer.encode_plain(self.tokenizer.with_images(prompt, *images) if images else prompt)
        messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
        messages += self._suffixed(history, thinking)
        turn = [dict(m) for m in (self._suffixed(turn, thinking) or [self._user(self._prompt_text(text), thinking)])]
        if images:
            last_user = max((i for i, m in enumerate(turn) if m.get("role") == "user"), default=None)
            if last_user is None:
                raise ApiError(HTTPStatus.BAD_REQUEST, "img_prompt: the turn has no user message")
            turn[last_user]["content"] = self.tokenizer.with_images(str(turn[last_user].get("content") or ""), *images)
        messages += turn
        return self.tokenizer.render(messages, generation_prompt=True, thinking=thinking, tools=tools)

    # -- extensions ------------------------------------------------------------------------

    def configure(self, body: dict[str, Any]) -> None:
        """Apply `/config`: keys present change, keys absent stay (null clears a setting)."""
        updates: dict[str, Any] = {}
        if "system_prompt" in body:
            updates["system_prompt"] = optional_field(body, "system_prompt", str)
        if "thinking" in body:
            updates["thinking"] = optional_field(body, "thinking", bool)
        if "history" in body:
            updates["pending_history"] = parse_history(body["history"])
        if "raw" in body:
            updates["raw"] = bool(optional_field(body, "raw", bool))
        if "tools" in body:
            updates["tools"] = parse_tools(body["tools"])
        if "turn" in body:
            updates["pending_turn"] = parse_history(body["turn"], TURN_ROLES, "turn")
        with self._controls_lock:
            for name, value in updates.items():
                setattr(self.controls, name, value)


def required_field(body: dict[str, Any], name: str, kind: type) -> Any:
    if name not in body:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"missing field: {name}")
    return optional_field(body, name, kind)


def optional_field(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"field {name} must be {kind.__name__}")
    return value


def token_ids_field(body: dict[str, Any]) -> list[int]:
    ids = required_field(body, "token_ids", list)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ApiError(HTTPStatus.BAD_REQUEST, "token_ids must be a list of non-negative integers")
    return ids


def parse_history(value: Any, roles: tuple[str, ...] = HISTORY_ROLES, name: str = "history") -> list[dict[str, Any]]:
    """Messages for the template: {role, content}, an assistant's `tool_calls` ([{type:
    function, function: {name, arguments: object}}]) and a tool message's `name` and
    `tool_call_id`; nothing else passes."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{name} must be a list of {{role, content}}")
    history = []
    for item in value:
        if not (isinstance(item, dict) and item.get("role") in roles and isinstance(item.get("content"), str)):
            raise ApiError(
                HTTPStatus.BAD_REQUEST,
                f"{name} items must be {{role: {'|'.join(roles)}, content: str}} "
                "(the system prompt goes in system_prompt)",
            )
        message: dict[str, Any] = {"role": item["role"], "content": item["content"]}
        if item["role"] == "assistant" and item.get("tool_calls"):
            message["tool_calls"] = parse_tool_calls(item["tool_calls"], name)
        if item["role"] == "tool":
            for key in ("name", "tool_call_id"):
                if isinstance(item.get(key), str):
                    message[key] = item[key]
        history.append(message)
    return history


def parse_tool_calls(value: Any, name: str) -> list[dict[str, Any]]:
    calls = []
    for call in value if isinstance(value, list) else [None]:
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments", {}), dict)):
            raise ApiError(HTTPStatus.BAD_REQUEST,
                           f"{name}: tool_calls must be [{{type: function, function: {{name: str, arguments: object}}}}]")
        calls.append({"type": "function", "function": {"name": function["name"], "arguments": function.get("arguments", {})}})
    return calls


def parse_tools(value: Any) -> list[dict[str, Any]] | None:
    """Tool definitions for the template, as `apply_chat_template(tools=...)` takes them."""
    if value is None:
        return None
    if not (isinstance(value, list) and all(isinstance(t, dict) for t in value)):
        raise ApiError(HTTPStatus.BAD_REQUEST, "tools must be a list of {type: function, function: {name, ...}} or null")
    return value or None


class PortModels:
    """The models one port serves, and which of them a call is for.

    Published run scripts hard-code one tokenizer port, so several uid-protocol (B) runners may
    share it. A call naming a model (`?model=`, the daemon's extension calls) goes to it; one
    carrying a uid to the model holding that session; `/get_uid` and any other call to the model
    the daemon announced (`POST /next_runner?model=`) before starting that model's runner, once
    per announcement — the daemon starts one model's runners at a time on a port (several at once
    for a model on several cards). With one model, every call is its own.
    """

    def __init__(self) -> None:
        self._apps: dict[str, TokenizerServer] = {}
        self._next: str | None = None  # announced: whose runners call /get_uid next
        self._announced = 0  # … and how many of them
        self._lock = threading.Lock()

    def add(self, name: str, app: TokenizerServer) -> None:
        with self._lock:
            self._apps[name] = app

    def remove(self, name: str) -> bool:
        """Forget a model; True while others remain."""
        with self._lock:
            self._apps.pop(name, None)
            if self._next == name:
                self._next, self._announced = None, 0
            return bool(self._apps)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._apps)

    def announce(self, name: str | None) -> None:
        with self._lock:
            if len(self._apps) == 1:
                return  # every call is the one model's (a server of its own does not know its name)
            if name not in self._apps:
                raise ApiError(HTTPStatus.NOT_FOUND, f"no model {name!r} on this port (it serves {', '.join(self._apps)})")
            self._announced = self._announced + 1 if self._next == name else 1
            self._next = name

    def pick(self, model: str | None, uid: Any, path: str) -> TokenizerServer:
        with self._lock:
            apps = dict(self._apps)
            announced = self._next
            if path == "/get_uid" and len(apps) > 1 and announced is not None:
                self._announced -= 1  # one announcement, one runner
                if not self._announced:
                    self._next = None
        if not apps:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "this port serves no model")
        if len(apps) == 1:
            return next(iter(apps.values()))
        if model is not None:
            if model not in apps:
                raise ApiError(HTTPStatus.NOT_FOUND, f"no model {model!r} on this port (it serves {', '.join(apps)})")
            return apps[model]
        if uid is not None and path != "/get_uid":
            holder = next((app for app in apps.values() if app.knows(uid)), None)
            if holder is not None:
                return holder
            raise ApiError(HTTPStatus.NOT_FOUND, f"unknown uid: {uid}")
        if announced is None:
            raise ApiError(HTTPStatus.CONFLICT, f"{len(apps)} models share this port ({', '.join(apps)}) and none "
                           "was announced: the daemon announces a model (POST /next_runner?model=) before its runner starts")
        return apps[announced]


class RequestHandler(BaseHTTPRequestHandler):
    # Headers and body leave in separate writes: without TCP_NODELAY a kept-alive client waits
    # for the delayed ACK (~40 ms) on every call.
    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"
    timeout = CONNECTION_IDLE_SECONDS
    server: "HTTPTokenizerServer"

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def _answer(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        try:
            body = self._read_body() if method == "POST" else {}
            reply = self._route(method, url.path, query, body)
            status = HTTPStatus.OK
        except ApiError as exc:
            status, reply = exc.status, {"error": exc.message}
        except Exception as exc:  # a bug or a template failure: answer, keep serving
            status, reply = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(exc).__name__}: {exc}"}
        self._send(status, reply)

    def _read_body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "the JSON body must be an object")
        return body

    def _route(self, method: str, path: str, query: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        uid = query.get("uid", body.get("uid"))
        if path == "/next_runner" and method == "POST":
            self.server.models.announce(query.get("model"))
            return {"ok": True}
        app = self.server.models.pick(query.get("model"), uid, path)
        # /reset takes GET too: the Qwen2.5-era scripts serve `GET /reset?uid=U` (reply: success).
        get_routes = {"/get_uid", "/bos_id", "/eos_id", "/img_start_token", "/img_context_token",
                      "/capabilities", "/stats", "/reset"}
        post_routes = {"/reset", "/encode", "/decode", "/config", "/tokenize"}
        if app.stock:
            get_routes -= {"/capabilities", "/stats"}
            post_routes -= {"/config"}
        if path not in get_routes | post_routes:
            raise ApiError(HTTPStatus.NOT_FOUND, f"unknown path: {path}")
        if (method == "GET") != (path in get_routes) and path != "/reset":
            raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} does not accept {method}")
        if path == "/get_uid":
            return {"uid": app.new_session()}
        if path in ("/bos_id", "/eos_id"):
            if uid is not None:
                app.session(uid)
            key = path[1:]
            return {key: app.tokenizer.bos_id if key == "bos_id" else app.tokenizer.eos_id}
        if path in ("/img_start_token", "/img_context_token"):
            return {path[1:]: app.tokenizer.image_token_id(0 if path == "/img_start_token" else 1)}
        if path == "/capabilities":
            return {**CAPABILITIES, **app.tokenizer.facts(), "stock_defaults": asdict(app.defaults)}
        if path == "/stats":
            return app.stats(uid)
        if path == "/reset" and method == "GET":
            app.reset(uid, None, held=False)
            return {"success": True}
        if path == "/reset":
            return {"token_ids": app.reset(uid, optional_field(body, "system_prompt", str))}
        if path == "/encode":
            text = required_field(body, "text", str)
            if uid is None:
                images = None
                if body.get("img_prompt") is True and optional_field(body, "num_img", int):
                    images = (body["num_img"], optional_field(body, "imgsz", int),
                              optional_field(body, "img_token_num", int))
                return {"token_ids": app.encode_stateless(text, images)}
            # img_prompt is accepted and ignored: this server serves text-only models.
            all_ids, diff = app.encode_turn(uid, text, optional_field(body, "last_reply", str))
            return {"token_ids": all_ids, "diff": diff}
        if path == "/decode":
            ids = token_ids_field(body)
            return {"text": app.tokenizer.decode(ids) if uid is None else app.decode_turn(uid, ids)}
        if path == "/config":
            app.configure(body)
            return {"ok": True}
        return {"token_ids": app.tokenizer.encode_plain(required_field(body, "text", str))}  # /tokenize

    def _send(self, status: HTTPStatus, reply: dict[str, Any]) -> None:
        payload = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # A runner decodes every 3 tokens: log failures only, not the stream of successes.
        if isinstance(code, int) and code >= 400:
            super().log_request(code, size)


class HTTPTokenizerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], models: PortModels) -> None:
        self.models = models
        super().__init__(address, RequestHandler)


def argument_parser() -> argparse.ArgumentParser:
    """This server's options; the shared host (tokenizer_service.host) reads a model's with it too."""
    parser = argparse.ArgumentParser(description="Tokenizer server for AX-M1 runners (uid and stateless protocols).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12345)
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer folder or .gguf file")
    parser.add_argument(
        "--session-idle-seconds",
        type=float,
        default=float(os.environ.get(SESSION_IDLE_ENV, DEFAULT_SESSION_IDLE_SECONDS)),
        help=f"free a uid session unused for this long (default: ${SESSION_IDLE_ENV} or %(default)s)",
    )
    parser.add_argument(
        "--stock",
        action="store_true",
        help="behave as the card's stock tokenizer scripts: no /capabilities, /config or /stats, no newline restore",
    )
    parser.add_argument("--default-system-prompt", help="a conversation's system prompt when none is given "
                        "(a stock script's own, where this server stands in for it)")
    parser.add_argument("--user-suffix", help="appended to every user message unless thinking is on "
                        "(the /no_think of Qwen3's stock scripts)")
    parser.add_argument("--generation-prompt-cut", type=int, help="held ids are a render with the generation "
                        "prompt less this many ids, as the stock scripts' encode(text)[:-N] computes them")
    parser.add_argument("--ignore-runner-system-prompt", action="store_true", help="open conversations with "
                        "the default system prompt, not the one a runner sends to POST /reset (a stock script "
                        "that serves no POST /reset)")
    parser.add_argument("--chat-template-from", type=Path, help="render with the chat template of this tokenizer "
                        "folder (a stock script that encodes with one tokenizer and renders with another's)")
    parser.add_argument("--engine", choices=ENGINES, default=os.environ.get(ENGINE_ENV) or "auto",
                        help="the library the tokenizer runs on: tokenizers (with Jinja2, no transformers), "
                        f"transformers, or auto: tokenizers where the files allow it (default: ${ENGINE_ENV} "
                        "or auto)")
    parser.add_argument("--check-template", action="store_true", help="exit with status "
                        f"{EXIT_UNUSABLE} unless the tokenizer loads and its chat template renders a conversation")
    return parser


class UnusableTokenizer(Exception):
    """The tokenizer files do not load, or their chat template does not render (`--check-template`)."""


def build_app(args: argparse.Namespace) -> TokenizerServer:
    """The protocol logic for one model from its options (tokenizer loaded, memory handed back)."""
    if not args.tokenizer.exists():
        raise UnusableTokenizer(f"tokenizer not found: {args.tokenizer}")
    defaults = StockDefaults(args.default_system_prompt, args.user_suffix, args.generation_prompt_cut,
                             args.ignore_runner_system_prompt)
    try:
        tokenizer = ChatTokenizer(*load_tokenizer(args.tokenizer, args.engine, args.chat_template_from))
        release_free_memory()
        if args.check_template:
            tokenizer.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], True, None)
    except Exception as exc:  # whatever fails here, these files cannot serve the runner
        if not args.check_template:
            raise
        raise UnusableTokenizer(f"cannot use the tokenizer files in {args.tokenizer}: {type(exc).__name__}: {exc}") from exc
    return TokenizerServer(tokenizer, args.session_idle_seconds, stock=args.stock, defaults=defaults)


def main(argv: list[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    if not args.tokenizer.exists():
        print(f"tokenizer not found: {args.tokenizer}", file=sys.stderr)
        return 2
    one_malloc_arena()
    try:
        app = build_app(args)
    except UnusableTokenizer as exc:
        print(exc, file=sys.stderr, flush=True)
        return EXIT_UNUSABLE
    models = PortModels()
    models.add("", app)
    try:
        httpd = HTTPTokenizerServer((args.host, args.port), models)
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"Server running at http://{args.host}:{args.port}", flush=True)
    with httpd:
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
