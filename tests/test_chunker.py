"""The chunker: boundaries, fits, fallbacks and errors, and the map-reduce and clean-up plans; pure.

Tokens are whitespace words here, so every count can be worked out by hand.
"""
from __future__ import annotations

import random
import re

import pytest

from llm_service.services.chunker import (
    Boundary, ChunkingError, ChunkLimits, SentenceTooLong, TooManyTurns, combine_batches,
    join_cleaned, plan_chunks, plan_map_reduce, split_sentences, summaries_to_carry,
)


def words(text: str) -> int:
    return len(text.split())


def sentence(marker: int, size: int) -> str:
    """A sentence of `size` words whose first word is its unique marker."""
    return " ".join([f"s{marker:05d}", *["word"] * (size - 1)]) + "."


def transcript(total_tokens: int, seed: int = 16) -> tuple[str, list[str]]:
    """Speaker turns of 1-4 paragraphs of 1-6 sentences; the text and its markers in order."""
    rng = random.Random(seed)
    speakers = ["Alice", "Bob", "Dr. Chen", "Maria Lopez"]
    turns, markers, tokens = [], [], 0
    while tokens < total_tokens:
        paragraphs = []
        for _ in range(rng.randint(1, 4)):
            sentences = []
            for _ in range(rng.randint(1, 6)):
                size = rng.randint(3, 25)
                sentences.append(sentence(len(markers), size))
                markers.append(f"s{len(markers):05d}")
                tokens += size
            paragraphs.append(" ".join(sentences))
        turns.append(f"{rng.choice(speakers)}: " + "\n\n".join(paragraphs))
    return "\n".join(turns), markers


CARD = ChunkLimits(total_context=2048, max_generation=256, create_new_turn_after=1100, summary_turns=2,
                   max_new_turns=64, template_tokens=120)


def fits(chunk_tokens: int, carried: int, limits: ChunkLimits) -> bool:
    return (limits.template_tokens + carried * limits.per_summary + chunk_tokens
            + limits.max_generation <= limits.total_context)


def test_a_20000_token_transcript_every_chunk_fits_every_sentence_once_in_order() -> None:
    text, markers = transcript(20_000)
    assert words(text) >= 20_000
    chunks = plan_chunks(text, CARD, words)
    assert 15 <= len(chunks) <= 25  # about 20,000 / 1,100
    seen = []
    for number, chunk in enumerate(chunks):
        assert chunk.text == text[chunk.start:chunk.end]
        assert chunk.tokens == words(chunk.text) <= CARD.create_new_turn_after
        assert chunk.carried_summaries == 2 and fits(chunk.tokens, chunk.carried_summaries, CARD)
        if number:  # nothing but whitespace between chunks: no text lost or doubled
            assert text[chunks[number - 1].end:chunk.start].strip() == ""
        seen += re.findall(r"s\d{5}", chunk.text)
    assert seen == markers
    assert text[:chunks[0].start].strip() == "" and text[chunks[-1].end:].strip() == ""
    # Turns are at most ~500 words here, so there is always a turn boundary past half a chunk.
    assert all(re.match(r"(Alice|Bob|Dr\. Chen|Maria Lopez): ", chunk.text) for chunk in chunks)


def test_boundaries_turn_paragraph_sentence() -> None:
    text = "Alice: One two. Three four.\n\nFive six.\nBob: Seven.\n\nEight nine. Ten."
    found = [(text[s.start:s.end], s.boundary) for s in split_sentences(text, words)]
    assert found == [
        ("Alice: One two.", Boundary.TURN), ("Three four.", Boundary.SENTENCE),
        ("Five six.", Boundary.PARAGRAPH), ("Bob: Seven.", Boundary.TURN),
        ("Eight nine.", Boundary.PARAGRAPH), ("Ten.", Boundary.SENTENCE),
    ]


def test_abbreviations_and_speaker_labels_end_no_sentence_and_prose_colons_are_no_speakers() -> None:
    text = "Dr. Chen: I met Mr. Smith, e.g. at lunch. I said no. Fine.\nThe plan is simple: we ship."
    found = [(text[s.start:s.end], s.boundary) for s in split_sentences(text, words)]
    assert found == [
        ("Dr. Chen: I met Mr. Smith, e.g. at lunch.", Boundary.TURN), ("I said no.", Boundary.SENTENCE),
        ("Fine.", Boundary.SENTENCE), ("The plan is simple: we ship.", Boundary.PARAGRAPH),
    ]


def test_without_speakers_blank_lines_are_turns_and_sentence_ending_lines_paragraphs() -> None:
    text = "First thing. Second\nline wraps here.\nNew line.\n\nNext block."
    found = [(text[s.start:s.end], s.boundary) for s in split_sentences(text, words)]
    assert found == [
        ("First thing.", Boundary.TURN), ("Second\nline wraps here.", Boundary.SENTENCE),
        ("New line.", Boundary.PARAGRAPH), ("Next block.", Boundary.TURN),
    ]


def limits(target: int, **changes: int) -> ChunkLimits:
    values = dict(total_context=1000, max_generation=100, create_new_turn_after=target)
    values.update(changes)
    return ChunkLimits(**values)


def first_chunk(text: str, target: int) -> str:
    return plan_chunks(text, limits(target), words)[0].text


def test_a_turn_is_preferred_to_a_paragraph_and_a_paragraph_to_a_sentence() -> None:
    # Target 10. A turn after 6 words, a paragraph after 8, a sentence after 9: the turn wins.
    text = "A: a a. b b b.\nB: c.\n\nd. e. f f f f."
    assert first_chunk(text, 10) == "A: a a. b b b."
    # No turn boundary: the paragraph after 8 words beats the sentence after 9.
    text = "A: a a. b b b. c c.\n\nd. e. f f f f."
    assert first_chunk(text, 10) == "A: a a. b b b. c c."
    # Only sentences: as full as the target allows.
    text = "A: a a. b b b. c c. d. e. f f f f."
    assert first_chunk(text, 10) == "A: a a. b b b. c c. d. e."


def test_a_boundary_that_leaves_the_chunk_less_than_half_full_is_not_taken() -> None:
    # The turn comes after 2 of 10 words: too early; the paragraph after 6 is taken instead.
    text = "A: a.\nB: b b b b.\n\nc c. d d d. e."
    assert first_chunk(text, 10) == "A: a.\nB: b b b b."
    # …and with the paragraph also too early, the chunk fills up to the target.
    text = "A: a.\nB: b.\n\nc c c c c c. d d d."
    assert first_chunk(text, 10) == "A: a.\nB: b.\n\nc c c c c c."


def test_summaries_give_way_before_the_chunk_shrinks() -> None:
    # room(k) = 2048 - 256 - 100 - 256k: 1692, 1436, 1180, 924. Three summaries would leave 924
    # for chunks meant to be 1100 long: two are carried instead.
    close = ChunkLimits(total_context=2048, max_generation=256, create_new_turn_after=1100,
                        summary_turns=3, template_tokens=100)
    text, markers = transcript(6000, seed=1)
    chunks = plan_chunks(text, close, words)
    assert max(chunk.tokens for chunk in chunks) > 924  # the chunks kept their intended size
    for chunk in chunks:
        assert fits(chunk.tokens, chunk.carried_summaries, close)
        assert chunk.carried_summaries == (3 if chunk.tokens <= 924 else 2)
    assert [m for chunk in chunks for m in re.findall(r"s\d{5}", chunk.text)] == markers


def test_a_long_sentence_alone_in_its_chunk_carries_fewer_summaries() -> None:
    text = " ".join([sentence(0, 300), sentence(1, 1500), sentence(2, 1300), sentence(3, 10)])
    chunks = plan_chunks(text, CARD, words)  # room(k): 1672, 1416, 1160
    assert [(c.tokens, c.carried_summaries) for c in chunks] == [(300, 2), (1500, 0), (1300, 1), (10, 2)]


def test_a_sentence_that_cannot_fit_even_alone_is_refused_with_its_place_and_size() -> None:
    text = sentence(0, 50) + " " + sentence(1, 30) + "\nBob: " + sentence(2, 1700)
    with pytest.raises(SentenceTooLong) as caught:
        plan_chunks(text, CARD, words)
    error = caught.value
    assert (error.index, error.tokens, error.room) == (2, 1701, 1672)  # "Bob:" counts too
    assert error.offset == text.index("Bob: ")
    assert "sentence 3 (at character" in str(error) and "1701 tokens" in str(error)
    assert "at most 1672 fit" in str(error)


def test_max_new_turns_grows_the_chunks_then_refuses() -> None:
    text, markers = transcript(5000, seed=2)
    small = limits(500, total_context=2048, max_generation=256, max_new_turns=64)
    assert len(plan_chunks(text, small, words)) >= 10
    capped = limits(500, total_context=2048, max_generation=256, max_new_turns=4)
    chunks = plan_chunks(text, capped, words)
    assert len(chunks) <= 4 and all(chunk.tokens <= 1792 for chunk in chunks)
    assert [m for chunk in chunks for m in re.findall(r"s\d{5}", chunk.text)] == markers
    with pytest.raises(TooManyTurns, match=r"needs \d+ chunks .* maxNewTurns allows 2"):
        plan_chunks(text, limits(500, total_context=2048, max_generation=256, max_new_turns=2), words)


def test_the_chunks_own_count_decides_when_the_tokenizer_does_not_add_up() -> None:
    # Each line break costs a token of its own that no sentence counted.
    def with_newlines(text: str) -> int:
        return words(text) + text.count("\n")

    text, markers = transcript(8000, seed=3)
    chunks = plan_chunks(text, CARD, with_newlines)
    assert all(chunk.tokens == with_newlines(chunk.text) <= CARD.create_new_turn_after for chunk in chunks)
    assert [m for chunk in chunks for m in re.findall(r"s\d{5}", chunk.text)] == markers


def test_a_template_that_leaves_no_room_is_refused() -> None:
    crowded = ChunkLimits(total_context=2048, max_generation=1000, create_new_turn_after=500, template_tokens=1048)
    with pytest.raises(ChunkingError, match=r"the template \(1048 tokens\) and maxGenerationLength \(1000\) leave no room"):
        plan_chunks("Some text.", crowded, words)


def test_empty_input_has_no_chunks() -> None:
    assert plan_chunks("  \n\n ", CARD, words) == []


def test_summaries_to_carry_takes_the_last_that_fit() -> None:
    summaries = ["a " * 100, "b " * 50, "c " * 80]
    assert summaries_to_carry(summaries, room=1000, limit=2, count_tokens=words) == summaries[1:]
    assert summaries_to_carry(summaries, room=100, limit=2, count_tokens=words) == summaries[2:]
    assert summaries_to_carry(summaries, room=50, limit=2, count_tokens=words) == []
    assert summaries_to_carry(summaries, room=1000, limit=0, count_tokens=words) == []
    assert summaries_to_carry(summaries, room=1000, limit=9, count_tokens=words) == summaries


def test_map_reduce_plan_and_combine_batches() -> None:
    text, _ = transcript(5000, seed=4)
    plan = plan_map_reduce(text, CARD, words, combine_template_tokens=80)
    assert plan.needs_combine and plan.combine_room == 2048 - 256 - 80
    assert plan.chunks == tuple(plan_chunks(text, CARD, words))
    assert combine_batches([200] * 5, room=1000) == [range(0, 5)]
    assert combine_batches([400, 400, 400, 100, 700], room=1000) == [range(0, 2), range(2, 4), range(4, 5)]
    assert combine_batches([], room=1000) == []
    with pytest.raises(ChunkingError, match="summary 2 is 1200 tokens"):
        combine_batches([100, 1200], room=1000)
    with pytest.raises(ChunkingError, match="would never end"):
        combine_batches([600, 600], room=1000)


def test_cleaned_outputs_are_joined_in_order_without_repeated_overlaps() -> None:
    outputs = [
        "Alice: We ship on Friday, and the tests are green.",
        "the tests are green. Bob: Then we tag it.",  # restates the last 4 words
        "Bob: Yes. Yes.",  # a short repeat is not an overlap
        "",
    ]
    assert join_cleaned(outputs) == (
        "Alice: We ship on Friday, and the tests are green.\n\nBob: Then we tag it.\n\nBob: Yes. Yes.")
    assert join_cleaned(["a b c", "c d e"]) == "a b c\n\nc d e"
