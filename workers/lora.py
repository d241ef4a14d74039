"""A seeded random LoRA adapter for a causal LM, saved as peft saves a trained one: for the tests
and the demo, where no trained adapter is at hand.

    python -m workers.lora --model smollm2 --out DIR [--seed 0] [--alpha 24]

The same seed, model shapes and settings give the same adapter, byte for byte.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from workers.common import UsageError
from workers.transformers_worker import model_source

# lora_alpha / r scales the random update. With r=8 on SmolLM2's q_proj and v_proj, alpha 16
# leaves its greedy answers as they were and 32 turns them to noise; 24 changes them and they
# stay sentences ("The capital of the UK is London.").
DEFAULT_ALPHA = 24
DEFAULT_TARGETS = ("q_proj", "v_proj")


def make_random_lora(model: str, out_dir: Path | str, *, gguf_file: str | None = None, seed: int = 0,
                     rank: int = 8, alpha: int = DEFAULT_ALPHA,
                     target_modules: Sequence[str] = DEFAULT_TARGETS) -> Path:
    """Save a LoRA adapter with random A and B matrices for `model` (as `--model`/`--gguf-file`
    of the transformers worker take it) in `out_dir`; returns `out_dir`."""
    source = model_source(model, gguf_file)
    path, extra = source.pretrained_args()
    # Only the shapes matter: an adapter holds its own matrices, never the base's weights. So the
    # base is built from its config (random weights) instead of loaded.
    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, **extra))
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        # False: B random too (peft's default makes B zero, an adapter that changes nothing)
        init_lora_weights=False,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)  # here: the LoRA layers draw their initial weights as get_peft_model adds them
    adapted = get_peft_model(base, config)
    adapted.peft_config["default"].base_model_name_or_path = model
    out = Path(out_dir)
    adapted.save_pretrained(out, save_embedding_layers=False)  # no embedding layers: none were adapted
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="as the transformers worker's --model (e.g. smollm2)")
    parser.add_argument("--gguf-file")
    parser.add_argument("--out", required=True, type=Path, help="the folder to save the adapter in")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=DEFAULT_ALPHA)
    args = parser.parse_args(argv)
    try:
        out = make_random_lora(args.model, args.out, gguf_file=args.gguf_file, seed=args.seed,
                               rank=args.rank, alpha=args.alpha)
    except UsageError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
