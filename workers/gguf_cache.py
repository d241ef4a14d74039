"""GGUF weights as a dense checkpoint, converted once and kept.

transformers reads a GGUF file in pure Python: a load of SmolLM2-135M costs ~20 s of CPU (the
metadata is parsed twice, a tensor name map is built for every tensor, the tokenizer is rebuilt
from the vocabulary), on every start of a worker or of the emulator's real model. The same
weights saved as a dense float32 checkpoint load in about a second. So the first load converts
the file into the cache and every later one loads the dense copy: the same tensors, config and
tokenizer, read faster.

The cache is `$XDG_CACHE_HOME/axm1-llm/gguf` (`~/.cache/…` without it), one folder per GGUF file,
named by the file's name, place, size and modification time (a replaced file is converted again).
A conversion goes to a temporary folder renamed into place when complete, under a lock, so that
processes starting together convert once and never read half a folder. When the cache cannot be
written the caller loads the GGUF itself, as before.

Imports torch: only for the worker processes and the emulator, never the daemon.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
from pathlib import Path

COMPLETE = "config.json"  # written by save_pretrained; the folder is renamed into place after it


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "axm1-llm" / "gguf"


def cache_name(gguf: Path) -> str:
    """One name per GGUF file and version of it: its stem, and a digest of its resolved path, size
    and modification time (hashing the file itself would cost seconds for a large one)."""
    resolved = gguf.resolve()
    stat = resolved.stat()
    digest = hashlib.sha256(f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{resolved.stem}-{digest}"


def convert(gguf: Path, out_dir: Path) -> None:
    """GGUF -> a dense float32 checkpoint with its tokenizer and chat template in `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the weights below are dense: nothing left to dequantize
    config.architectures = [type(loaded).__name__]
    dense = AutoModelForCausalLM.from_config(config)
    dense.load_state_dict(loaded.state_dict())
    dense.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out_dir)


def dense_checkpoint(gguf: Path, root: Path | None = None) -> Path | None:
    """The dense copy of `gguf`, converted now if it is not in the cache yet; None when the cache
    cannot be written (the reason goes to stderr, the caller loads the GGUF itself)."""
    root = cache_root() if root is None else root
    out = root / cache_name(gguf)
    if (out / COMPLETE).is_file():
        return out
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f"{out.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the folder
            if not (out / COMPLETE).is_file():
                partial = root / f"{out.name}.partial"
                shutil.rmtree(partial, ignore_errors=True)  # left by a conversion that was killed
                print(f"converting {gguf} once into {out} (later loads read the dense copy) …", file=sys.stderr, flush=True)
                try:
                    convert(gguf, partial)
                except Exception as exc:  # noqa: BLE001 - a file the cache cannot convert still loads without it
                    shutil.rmtree(partial, ignore_errors=True)
                    print(f"{gguf} could not be converted ({exc!r}); loading it itself", file=sys.stderr, flush=True)
                    return None
                partial.rename(out)
    except OSError as exc:
        print(f"the GGUF cache {root} is not usable ({exc}); loading {gguf} itself", file=sys.stderr, flush=True)
        return None
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m workers.gguf_cache FILE.gguf`: convert now (if needed) and print the folder."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m workers.gguf_cache FILE.gguf", file=sys.stderr)
        return 2
    out = dense_checkpoint(Path(args[0]))
    if out is None:
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
