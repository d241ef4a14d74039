"""The prompts of a service's steps: a manifest, its template and the chunker's plan put together;
pure (the template's text and `count_tokens` come from the caller).

Each prompt is counted as rendered, so the summaries a chunk carries are the real ones that fit:
the oldest are dropped first until template + summaries + chunk + maxGenerationLength fit.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .chunker import Chunk, ChunkingError, ChunkLimits, CountTokens
from .manifest import Manifest, chunk_limits, render_template


@dataclass(frozen=True)
class Prompt:
    text: str
    tokens: int
    carried_summaries: int  # how many of the summaries offered it holds (the last ones)


def template_overhead(template: str, source: str, manifest: Manifest, inputs: Mapping[str, str],
                      count_tokens: CountTokens) -> int:
    """Tokens of the template with the chunked field empty and no summaries: what every chunk's
    prompt costs besides the chunk."""
    empty = {**inputs, manifest.chunked_field: ""} if manifest.chunked_field else dict(inputs)
    return count_tokens(render_template(template, source, empty))


def service_limits(template: str, source: str, manifest: Manifest, flavor: str,
                   inputs: Mapping[str, str], count_tokens: CountTokens) -> ChunkLimits:
    """The chunker's limits for this request: the flavor's numbers and the template's cost."""
    return chunk_limits(manifest, flavor, template_overhead(template, source, manifest, inputs, count_tokens))


def combine_costs(template: str, source: str, manifest: Manifest, inputs: Mapping[str, str],
                  count_tokens: CountTokens) -> tuple[int, int]:
    """What a combine prompt costs besides the summaries' own text: once, and per summary (its
    label and separators), measured by rendering it with no summaries and with two empty ones."""
    values = {**inputs, manifest.chunked_field: ""} if manifest.chunked_field else dict(inputs)

    def cost(summaries: list[str]) -> int:
        return count_tokens(render_template(template, source, values, summaries, combine=True,
                                            chunk_count=len(summaries)))

    none = cost([])
    return none, max((cost(["", ""]) - none) // 2, 0)


def chunk_prompt(template: str, source: str, manifest: Manifest, flavor: str, inputs: Mapping[str, str],
                 chunk: Chunk, number: int, count: int, summaries: Sequence[str],
                 count_tokens: CountTokens) -> Prompt:
    """The prompt of chunk `number` (1-based) of `count`, carrying the last of `summaries` (the
    earlier chunks' summaries; none for a plain map) that fit."""
    chosen = manifest.flavors[flavor]
    limit = chosen.summary_turns if manifest.type == "map-reduce" else 0
    carried = list(summaries[-limit:]) if limit else []
    values = dict(inputs)
    if manifest.chunked_field:
        values[manifest.chunked_field] = chunk.text
    while True:
        text = render_template(template, source, values, carried, chunk_number=number, chunk_count=count)
        tokens = count_tokens(text)
        if tokens + chosen.max_generation_length <= chosen.total_context_length:
            return Prompt(text, tokens, len(carried))
        if not carried:
            raise ChunkingError(
                f"chunk {number} of {count}: its prompt is {tokens} tokens; with maxGenerationLength "
                f"({chosen.max_generation_length}) that exceeds totalContextLength "
                f"({chosen.total_context_length}) — the template costs more than it was measured at")
        carried = carried[1:]  # the oldest summary gives way first


def combine_prompt(template: str, source: str, manifest: Manifest, flavor: str, inputs: Mapping[str, str],
                   summaries: Sequence[str], count_tokens: CountTokens) -> Prompt:
    """The prompt combining `summaries` (one batch of `chunker.combine_batches`), the chunked
    field empty and `combine` true; raises ChunkingError when the batch does not fit."""
    chosen = manifest.flavors[flavor]
    values = {**inputs, manifest.chunked_field: ""} if manifest.chunked_field else dict(inputs)
    text = render_template(template, source, values, summaries, combine=True, chunk_count=len(summaries))
    tokens = count_tokens(text)
    if tokens + chosen.max_generation_length > chosen.total_context_length:
        raise ChunkingError(
            f"the combine prompt of {len(summaries)} summaries is {tokens} tokens; with "
            f"maxGenerationLength ({chosen.max_generation_length}) that exceeds totalContextLength "
            f"({chosen.total_context_length}): combine fewer at once")
    return Prompt(text, tokens, len(summaries))
