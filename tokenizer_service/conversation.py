"""Pure conversation logic of the tokenizer server: no I/O, no tokenizer import."""
from __future__ import annotations

from collections.abc import Callable, Container, Sequence

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# A byte-level tokenizer decodes an incomplete UTF-8 sequence to U+FFFD.
REPLACEMENT_CHAR = "\ufffd"
# A character spans at most 4 tokens; past this many pending ids a U+FFFD is real text (a model
# can emit invalid UTF-8) and is let through rather than holding the reply back for ever.
MAX_PENDING_IDS = 16


def strip_think(reply: str) -> str:
    """The reply without its reasoning block, as it goes back into the conversation.

    Drops everything up to the last `</think>` (covers templates that open the block in the
    generation prompt, so the reply holds only the closing tag), or, when the block was never
    closed (generation stopped while thinking), everything from `<think>` on; then the blank
    the block left. A reply without a block is kept byte for byte.
    """
    close = reply.rfind(THINK_CLOSE)
    if close >= 0:
        return reply[close + len(THINK_CLOSE):].lstrip()
    opening = reply.find(THINK_OPEN)
    if opening >= 0:
        return reply[:opening].lstrip()
    # No reasoning: the reply goes back as it is, as a stock script sends it back.
    return reply


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def prefill_diff(all_ids: Sequence[int], held_ids: Sequence[int]) -> list[int]:
    """The ids of `all_ids` a runner holding `held_ids` in its KV cache still has to prefill.

    Normally `held_ids` is a prefix of `all_ids`; where they diverge (a reply re-tokenized
    differently, think text stripped) the runner cannot rewind, and everything from the first
    difference on is new.
    """
    return list(all_ids[common_prefix_length(all_ids, held_ids):])


class IncrementalDecoder:
    """Turns token ids arriving a few at a time into text pieces that are complete characters.

    Decodes a sliding window (the previous piece's ids plus the new ones) and emits only what
    the new ids add, as vLLM does: this keeps multi-byte characters split across tokens
    together and keeps the leading spaces that SentencePiece tokenizers drop at the start of
    a decode. Ids forming an incomplete character stay pending and the piece is "".
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    @property
    def token_count(self) -> int:
        return len(self._ids)

    def push(self, new_ids: Sequence[int]) -> str:
        self._ids.extend(new_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        text = self._decode(self._ids[self._prefix_offset:])
        pending = len(self._ids) - self._read_offset
        incomplete = text.endswith(REPLACEMENT_CHAR) and pending < MAX_PENDING_IDS
        if len(text) <= len(prefix_text) or incomplete:
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(prefix_text):]


# Fill-in-the-middle tokens by family, in prefix-suffix-middle order: Qwen2.5-Coder, StarCoder
# and SmolLM (where its vocabulary has them), DeepSeek-Coder.
INFILL_STYLES = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>", "<\uff5cfim\u2581end\uff5c>"),
)
# ChatML's turn markers: a model that writes a new turn has ended its own.
CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")


def infill_tokens(vocabulary: Container[str]) -> dict[str, str] | None:
    """The tokenizer's fill-in-the-middle tokens as {prefix, suffix, middle}, or None."""
    for prefix, suffix, middle in INFILL_STYLES:
        if prefix in vocabulary and suffix in vocabulary and middle in vocabulary:
            return {"prefix": prefix, "suffix": suffix, "middle": middle}
    return None


def stop_tokens(eos_token: str | None, chat_template: str) -> list[str]:
    """The texts that end a reply: the end-of-sequence token, and ChatML's turn markers where
    the template writes them (Ollama lists both for ChatML models)."""
    stops = [eos_token] if eos_token else []
    if CHATML_MARKERS[1] in chat_template:
        stops += CHATML_MARKERS
    return list(dict.fromkeys(stops))
