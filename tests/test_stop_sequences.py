"""StopScanner, directly: text is released only once it cannot start a stop sequence, and nothing
from the first stop sequence on is ever released."""
from __future__ import annotations

from llm_service.stop_sequences import StopScanner


def scan(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool]:
    scanner = StopScanner(stops)
    out = "".join(scanner.feed(piece) for piece in pieces) + scanner.flush()
    return out, scanner.stopped


def test_no_stops_passes_everything_at_once():
    scanner = StopScanner(())
    assert scanner.feed("abc") == "abc" and scanner.flush() == ""


def test_a_stop_split_across_chunks_is_found_and_withheld():
    assert scan(("END",), ["hello E", "N", "D and more"]) == ("hello ", True)


def test_a_partial_match_is_held_back_until_it_cannot_be_a_stop():
    scanner = StopScanner(("END",))
    assert scanner.feed("abc EN") == "abc "
    assert scanner.feed("x") == "ENx"
    assert not scanner.stopped


def test_the_held_partial_is_released_at_the_end():
    assert scan(("END",), ["tail E"]) == ("tail E", False)


def test_the_earliest_of_several_stops_wins():
    assert scan(("two", "one"), ["zero one two"]) == ("zero ", True)


def test_after_a_stop_nothing_more_comes_out():
    scanner = StopScanner(("!",))
    assert scanner.feed("hi! there") == "hi"
    assert scanner.feed("more") == "" and scanner.flush() == ""


def test_empty_stop_strings_are_ignored():
    assert scan(("",), ["text"]) == ("text", False)
