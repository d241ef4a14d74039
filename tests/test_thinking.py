"""ThinkSplitter: tags cut at any position give the same split as the whole answer."""
from __future__ import annotations

import itertools

import pytest

from llm_service.thinking import ThinkSplitter

# (answer, starts_in_thinking, expected thinking, expected content)
CASES = [
    ("<think>\n\n</think>\n\nHello! How can I assist you today?", False, "", "Hello! How can I assist you today?"),
    ("<think>\nThe user greets me.\n</think>\n\nHi there.", False, "The user greets me.\n", "Hi there."),
    ("Plain answer without reasoning.", False, "", "Plain answer without reasoning."),
    ("  \n<think>x</think>y", False, "x", "y"),
    ("Use <think> tags like <think>this</think>.", False, "", "Use <think> tags like <think>this</think>."),
    ("<think>still thinking when it stopped", False, "still thinking when it stopped", ""),
    ("reasoning first</think>\n\nthe answer", True, "reasoning first", "the answer"),
    ("\n\nreasoning < / think > </thin </think>done", True, "reasoning < / think > </thin ", "done"),
    ("<thinking>is not the tag</thinking>", False, "", "<thinking>is not the tag</thinking>"),
    ("<thi", False, "", "<thi"),
    ("<think>a</thi", False, "a</thi", ""),
    ("\n", False, "", "\n"),
    ("", False, "", ""),
    ("<think></think>", False, "", ""),
    ("<think>x</think></think>y", False, "x", "</think>y"),
]


def split(chunks: list[str], starts_in_thinking: bool) -> tuple[str, str]:
    splitter = ThinkSplitter(starts_in_thinking)
    thinking, content = "", ""
    for chunk in chunks:
        t, c = splitter.feed(chunk)
        thinking, content = thinking + t, content + c
    t, c = splitter.flush()
    return thinking + t, content + c


@pytest.mark.parametrize(("answer", "starts_in_thinking", "thinking", "content"), CASES)
def test_whole_answer(answer: str, starts_in_thinking: bool, thinking: str, content: str) -> None:
    assert split([answer], starts_in_thinking) == (thinking, content)


@pytest.mark.parametrize(("answer", "starts_in_thinking", "thinking", "content"), CASES)
def test_every_split_position(answer: str, starts_in_thinking: bool, thinking: str, content: str) -> None:
    for a, b in itertools.combinations_with_replacement(range(len(answer) + 1), 2):
        chunks = [answer[:a], answer[a:b], answer[b:]]
        assert split(chunks, starts_in_thinking) == (thinking, content), chunks
    assert split(list(answer), starts_in_thinking) == (thinking, content)


def test_holds_back_only_a_possible_tag() -> None:
    splitter = ThinkSplitter()
    assert splitter.feed("<think>\n\nStep one") == ("Step one", "")
    assert splitter.feed(" and </th") == (" and ", "")
    assert splitter.feed("ink>\n\nAnswer") == ("", "Answer")
    assert splitter.feed(" more <think>") == ("", " more <think>")
    assert splitter.flush() == ("", "")


def test_content_streams_without_delay() -> None:
    splitter = ThinkSplitter()
    assert splitter.feed("Hello") == ("", "Hello")
    assert splitter.feed(" </think") == ("", " </think")
