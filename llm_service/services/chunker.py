"""Inputs longer than a model's context, split into chunks ("virtual turns") that each fit; pure.

The context of one chunk's prompt must hold

    template + carried summaries + chunk + maxGenerationLength  <=  totalContextLength

The flavor's numbers mean:

- `createNewTurnAfter`: the tokens of input after which a new virtual turn starts — the size a
  chunk aims at (never more than what fits).
- `summaryTurns`: how many earlier summaries a chunk's prompt carries (map-reduce; 0 for a plain
  map). Each is reserved at `summary_tokens` (default `maxGenerationLength`: a summary is one
  generation). When a chunk of the intended size would not fit with all of them, fewer are
  carried — the summaries give way before the chunk shrinks, and a single long sentence alone in
  its chunk may carry none.
- `maxNewTurns`: the most chunks an input may become. Beyond it the chunks grow to what the
  context holds (carrying fewer summaries) before the input is refused (`TooManyTurns`).

Splits fall at the strongest boundary that leaves the chunk at least half full: a turn (a speaker
line `Name:`, or a blank line in text without speakers), then a paragraph (a blank line within a
speaker's turn, or a line ending a sentence), then a sentence. Every sentence is in exactly one
chunk, in order; a chunk is a slice of the input as written. A sentence that cannot fit even
alone and without summaries raises `SentenceTooLong`, naming where it is and its size.

`count_tokens` is the model's tokenizer (or an estimate); it is called once per sentence and once
per chunk tried, the chunk's own count deciding whether it fits (a tokenizer need not add up).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum

CountTokens = Callable[[str], int]

# A chunk is cut at the strongest boundary that leaves it at least this full.
MIN_FILL = 0.5


class Boundary(IntEnum):
    """What separates a sentence from the one before it; stronger boundaries are better cuts."""

    SENTENCE = 1
    PARAGRAPH = 2
    TURN = 3


# A speaker line: an optional [timestamp], a name of up to four capitalised words (or numbers:
# "Speaker 2"), a colon. Lower-case words keep prose such as "The plan is simple:" out.
_SPEAKER_LINE = re.compile(
    r"^[ \t]*(?:\[[\d:.,]+\][ \t]*)?[A-Z][\w'.\-]*(?:[ \t](?:[A-Z][\w'.\-]*|\d+)){0,3}[ \t]*:(?=\s|$)",
    re.MULTILINE)
# A period after these ends no sentence.
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "vs", "etc", "e.g", "i.e",
                            "approx", "fig"})
_BLANK_LINE = re.compile(r"\n[ \t]*\n\s*")
# The end of a sentence: its punctuation (and closing quotes/brackets), then the space after it.
_LAST_WORD = re.compile(r"[(\[\"']*([\w.]+)$")
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(\s+)")


@dataclass(frozen=True)
class Sentence:
    start: int  # offsets into the input text
    end: int
    boundary: Boundary  # what separates it from the sentence before (TURN for the first)
    tokens: int


@dataclass(frozen=True)
class Chunk:
    """One virtual turn: a slice of the input, whole sentences only."""

    text: str
    start: int  # offsets into the input
    end: int
    first_sentence: int  # indexes into the input's sentences, end exclusive
    end_sentence: int
    tokens: int
    # The earlier summaries this chunk's prompt can carry (at most summaryTurns).
    carried_summaries: int


@dataclass(frozen=True)
class ChunkLimits:
    """The flavor's context arithmetic, with what the template itself costs."""

    total_context: int
    max_generation: int
    create_new_turn_after: int
    summary_turns: int = 0
    max_new_turns: int = 64
    template_tokens: int = 0  # the rendered template with an empty chunk and no summaries
    summary_tokens: int | None = None  # the reserve per carried summary; None: max_generation

    @property
    def per_summary(self) -> int:
        return self.max_generation if self.summary_tokens is None else self.summary_tokens

    def room(self, carried: int) -> int:
        """Tokens left for the chunk when its prompt carries `carried` summaries."""
        return (self.total_context - self.max_generation - self.template_tokens
                - carried * self.per_summary)

    def carried_for(self, chunk_tokens: int) -> int:
        """The most summaries (up to summary_turns) a chunk of this size leaves room for."""
        return next((k for k in range(self.summary_turns, -1, -1) if chunk_tokens <= self.room(k)), 0)


class ChunkingError(ValueError):
    """An input that cannot be split to fit; the message says why and where."""


class SentenceTooLong(ChunkingError):
    def __init__(self, index: int, offset: int, tokens: int, room: int, excerpt: str) -> None:
        super().__init__(
            f"sentence {index + 1} (at character {offset}, starting {excerpt!r}) is {tokens} tokens; "
            f"at most {room} fit beside the template and maxGenerationLength: split it or pick a "
            "flavor with a longer context")
        self.index, self.offset, self.tokens, self.room = index, offset, tokens, room


class TooManyTurns(ChunkingError):
    def __init__(self, chunks: int, max_new_turns: int, tokens: int) -> None:
        super().__init__(
            f"the input ({tokens} tokens) needs {chunks} chunks even at the largest size the "
            f"context holds; maxNewTurns allows {max_new_turns}")
        self.chunks, self.max_new_turns, self.tokens = chunks, max_new_turns, tokens


def split_sentences(text: str, count_tokens: CountTokens) -> list[Sentence]:
    """The input's sentences, each with the boundary before it and its token count."""
    has_speakers = _SPEAKER_LINE.search(text) is not None
    # Where a new segment begins, and how strongly: speaker lines and blank lines always cut.
    breaks: dict[int, Boundary] = {}
    label_ends: dict[int, int] = {}  # speaker labels (start → end): "Dr. Chen:" holds no sentence end
    for match in _BLANK_LINE.finditer(text):
        breaks[match.end()] = Boundary.PARAGRAPH if has_speakers else Boundary.TURN
    if has_speakers:
        for match in _SPEAKER_LINE.finditer(text):
            breaks[match.start() + len(match.group()) - len(match.group().lstrip())] = Boundary.TURN
            label_ends[match.start()] = match.end()
    for match in _SENTENCE_END.finditer(text):
        before = _LAST_WORD.search(text, max(0, match.start() - 12), match.start())
        if match.group().startswith(".") and before and before.group(1).lower() in _ABBREVIATIONS:
            continue
        line_start = text.rfind("\n", 0, match.start()) + 1  # a label begins its line
        if match.start() < label_ends.get(line_start, -1):
            continue
        boundary = Boundary.PARAGRAPH if "\n" in match.group(1) else Boundary.SENTENCE
        breaks[match.end()] = max(breaks.get(match.end(), boundary), boundary)
    sentences: list[Sentence] = []
    cuts = sorted(position for position in breaks if 0 < position < len(text))
    pending = Boundary.TURN
    for start, end in zip([0, *cuts], [*cuts, len(text)]):
        piece = text[start:end]
        stripped = piece.strip()
        if stripped:
            begin = start + (len(piece) - len(piece.lstrip()))
            sentences.append(Sentence(begin, begin + len(stripped), pending if sentences else Boundary.TURN,
                                      count_tokens(stripped)))
            pending = Boundary.SENTENCE
        pending = max(pending, breaks.get(end, Boundary.SENTENCE))
    return sentences


def plan_chunks(text: str, limits: ChunkLimits, count_tokens: CountTokens) -> list[Chunk]:
    """The chunks of `text` (see the module's docstring for the rules)."""
    sentences = split_sentences(text, count_tokens)
    if not sentences:
        return []
    largest_room = limits.room(0)
    if largest_room <= 0:
        raise ChunkingError(
            f"the template ({limits.template_tokens} tokens) and maxGenerationLength "
            f"({limits.max_generation}) leave no room for input in {limits.total_context} tokens")
    for index, sentence in enumerate(sentences):
        if sentence.tokens > largest_room:
            raise SentenceTooLong(index, sentence.start, sentence.tokens, largest_room,
                                  text[sentence.start:sentence.start + 40])
    # The summaries give way before the chunk shrinks below the size it aims at.
    carried = next((k for k in range(limits.summary_turns, -1, -1)
                    if limits.room(k) >= limits.create_new_turn_after), 0)
    targets = [min(limits.create_new_turn_after, limits.room(carried))]
    targets += [limits.room(k) for k in range(carried, -1, -1)]  # maxNewTurns: grow the chunks
    chunks: list[Chunk] = []
    for target in dict.fromkeys(targets):  # each size once, in order
        chunks = _fill(text, sentences, target, limits, count_tokens)
        if len(chunks) <= limits.max_new_turns:
            return chunks
    raise TooManyTurns(len(chunks), limits.max_new_turns, sum(s.tokens for s in sentences))


def _fill(text: str, sentences: Sequence[Sentence], target: int, limits: ChunkLimits,
          count_tokens: CountTokens) -> list[Chunk]:
    chunks: list[Chunk] = []
    start = 0
    while start < len(sentences):
        end = _cut(sentences, start, target)
        while True:  # the chunk's own count decides: a tokenizer need not add up over sentences
            body = text[sentences[start].start:sentences[end - 1].end]
            tokens = count_tokens(body)
            # A lone sentence longer than the target may take the whole room, carrying fewer summaries.
            if tokens <= (target if end - start > 1 else limits.room(0)):
                break
            if end - start == 1:
                raise SentenceTooLong(start, sentences[start].start, tokens, limits.room(0),
                                      body[:40])
            end = _cut(sentences, start, target, before=end - 1)
        chunks.append(Chunk(body, sentences[start].start, sentences[end - 1].end, start, end, tokens,
                            limits.carried_for(tokens)))
        start = end
    return chunks


def _cut(sentences: Sequence[Sentence], start: int, target: int, before: int | None = None) -> int:
    """Where the chunk beginning at `start` ends (exclusive): at least one sentence, at most up to
    `before`, filled up to `target` tokens, ending before the strongest boundary that leaves it
    at least MIN_FILL full."""
    limit = len(sentences) if before is None else before
    fill, end = 0, start
    fills: list[tuple[int, int]] = []  # (end, tokens up to it)
    while end < limit and (end == start or fill + sentences[end].tokens <= target):
        fill += sentences[end].tokens
        end += 1
        fills.append((end, fill))
    if end == len(sentences):
        return end  # the rest fits: no boundary to choose
    # A cut at `position` falls on the boundary before sentence `position`.
    full_enough = [position for position, tokens in fills if tokens >= MIN_FILL * target]
    if not full_enough:
        return end
    best = max(sentences[position].boundary for position in full_enough)
    return max(position for position in full_enough if sentences[position].boundary == best)


def summaries_to_carry(summaries: Sequence[str], room: int, limit: int, count_tokens: CountTokens) -> list[str]:
    """The last summaries (at most `limit`) that fit in `room` tokens together, in their order:
    at run time the summaries' real sizes decide, falling back to fewer when they are long."""
    carried: list[str] = []
    used = 0
    for summary in reversed(summaries[len(summaries) - limit:] if limit > 0 else []):
        tokens = count_tokens(summary)
        if used + tokens > room:
            break
        carried.insert(0, summary)
        used += tokens
    return carried


@dataclass(frozen=True)
class MapReducePlan:
    """A summary of a long input: each chunk summarised with the summaries before it (up to its
    `carried_summaries`), then the summaries combined (`combine_batches`) until one is left."""

    chunks: tuple[Chunk, ...]
    combine_room: int  # tokens the summaries may take in a combine prompt

    @property
    def needs_combine(self) -> bool:
        return len(self.chunks) > 1


def plan_map_reduce(text: str, limits: ChunkLimits, count_tokens: CountTokens,
                    combine_template_tokens: int | None = None) -> MapReducePlan:
    """The map-reduce plan; `combine_template_tokens` is the template rendered for the combine
    step without summaries (default: the chunks' template cost)."""
    overhead = limits.template_tokens if combine_template_tokens is None else combine_template_tokens
    room = limits.total_context - limits.max_generation - overhead
    return MapReducePlan(tuple(plan_chunks(text, limits, count_tokens)), room)


def combine_batches(summary_tokens: Sequence[int], room: int) -> list[range]:
    """Consecutive summaries grouped so that each group fits `room`; one group means the final
    combine. Each group's combined summary replaces it for the next round. Raises ChunkingError
    when one summary alone does not fit."""
    batches: list[range] = []
    start, used = 0, 0
    for index, tokens in enumerate(summary_tokens):
        if tokens > room:
            raise ChunkingError(f"summary {index + 1} is {tokens} tokens; a combine prompt holds {room}")
        if used + tokens > room:
            batches.append(range(start, index))
            start, used = index, 0
        used += tokens
    if summary_tokens:
        batches.append(range(start, len(summary_tokens)))
    if len(batches) > 1 and all(len(batch) == 1 for batch in batches):
        raise ChunkingError("no two summaries fit one combine prompt together: the combine would never end")
    return batches


def join_cleaned(outputs: Sequence[str], min_overlap_words: int = 4, max_overlap_words: int = 80) -> str:
    """The cleaned chunks joined in order, a paragraph apart. Where a chunk's output begins by
    repeating the end of the one before (a model restating its context), the repeat is dropped:
    the longest run of at least `min_overlap_words` words, compared without case and punctuation.
    """
    joined: list[str] = []
    for output in outputs:
        text = output.strip()
        if joined and text:
            text = _without_repeated_start(joined[-1], text, min_overlap_words, max_overlap_words)
        if text:
            joined.append(text)
    return "\n\n".join(joined)


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", "", text.lower()).split()


def _without_repeated_start(previous: str, text: str, least: int, most: int) -> str:
    tail = _words(previous)[-most:]
    spans = [match.end() for match in re.finditer(r"\S+", text)]  # where each word of `text` ends
    head = _words(" ".join(text.split()[:most]))
    if len(head) != min(len(spans), most):  # a "word" of pure punctuation: compare nothing
        return text
    for size in range(min(len(tail), len(head)), least - 1, -1):
        if tail[-size:] == head[:size]:
            return text[spans[size - 1]:].lstrip()
    return text
