"""Streaming `<think>…</think>` splitter: separates a model's reasoning from its answer.

Chunks come straight from the runner, so a tag can be cut at any character; the splitter holds
back only what could still be the start of a tag. Pure, no I/O.
"""
from __future__ import annotations

from enum import Enum

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"


class _Mode(Enum):
    OPENING = "opening"  # before the first non-blank text: a <think> here opens the block
    THINKING = "thinking"
    CONTENT = "content"


def _partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest proper prefix of `tag` that `text` ends with."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


class ThinkSplitter:
    def __init__(self, starts_in_thinking: bool = False) -> None:
        # starts_in_thinking: the prompt template already opened <think>; the reply only closes it.
        self._mode = _Mode.THINKING if starts_in_thinking else _Mode.OPENING
        self._skip_whitespace = starts_in_thinking  # blanks right after a tag are layout, not text
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        """(thinking, content) decided so far by this chunk."""
        thinking: list[str] = []
        content: list[str] = []
        data, self._held = self._held + text, ""
        while data:
            if self._skip_whitespace:
                data = data.lstrip()
                if not data:
                    break
                self._skip_whitespace = False
            if self._mode is _Mode.OPENING:
                body = data.lstrip()
                if body.startswith(OPEN_TAG):
                    self._mode = _Mode.THINKING
                    self._skip_whitespace = True
                    data = body[len(OPEN_TAG):]
                elif OPEN_TAG.startswith(body):  # blanks, or the tag cut short: wait for more
                    self._held = data
                    break
                else:
                    self._mode = _Mode.CONTENT
            elif self._mode is _Mode.THINKING:
                end = data.find(CLOSE_TAG)
                if end >= 0:
                    thinking.append(data[:end])
                    data = data[end + len(CLOSE_TAG):]
                    self._mode = _Mode.CONTENT
                    self._skip_whitespace = True
                else:
                    keep = _partial_tag_length(data, CLOSE_TAG)
                    thinking.append(data[:len(data) - keep])
                    self._held = data[len(data) - keep:]
                    break
            else:  # a <think> after the opening is plain content
                content.append(data)
                break
        return "".join(thinking), "".join(content)

    def flush(self) -> tuple[str, str]:
        """End of the answer: what was held. An unclosed block is all thinking."""
        held, self._held = self._held, ""
        if self._mode is _Mode.THINKING:
            return held, ""
        self._mode = _Mode.CONTENT
        return "", held
