"""Worker programs: each one model behind a small OpenAI-compatible HTTP server, in its own process.

- `transformers`: a causal LM (a folder or a GGUF) with optional LoRA adapters, `/v1/chat/completions`.
- `embeddings`: a sentence-embedding model (all-MiniLM-L6-v2 by default), `/v1/embeddings`.

They are the only programs of this project that import torch; the daemon never imports this
package (`axm1-llm worker …` imports it inside the command). Importing it is cheap: each kind's
module, with torch, is imported only when that kind is started.
"""
from __future__ import annotations

import importlib
from collections.abc import Sequence

KINDS = {
    "transformers": "workers.transformers_worker",
    "embeddings": "workers.embeddings_worker",
}


def main(kind: str, argv: Sequence[str], prog: str | None = None) -> int:
    """Run the worker `kind` with its own arguments `argv`; returns the exit status."""
    if kind not in KINDS:
        raise SystemExit(f"unknown worker {kind!r}: choose one of {', '.join(KINDS)}")
    module = importlib.import_module(KINDS[kind])
    return module.main(argv, prog=prog or f"axm1-llm worker {kind}")
