"""Following JSON strings through text, one character at a time. Pure.

The tool-call recogniser and the structured-output extractor both look for structure (a closing
tag, brackets, a trailing comma) in a model's text, and must not count what stands inside a JSON
string: this is the one place that knows where strings and their escapes begin and end.
"""
from __future__ import annotations


class StringScanner:
    __slots__ = ("in_string", "_escaped")

    def __init__(self) -> None:
        self.in_string = False
        self._escaped = False

    def consumed(self, char: str) -> bool:
        """Whether `char` belongs to a string (its quotes included); the caller then skips it."""
        if self.in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self.in_string = False
            return True
        if char == '"':
            self.in_string = True
            return True
        return False
