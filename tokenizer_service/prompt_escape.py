"""Newline escape for prompts sent to a runner, which reads each prompt with `getline`.

A prompt line cannot hold a newline, so the daemon writes `\\` as `\\\\` and a newline as `\\n`
(backslash, n); our tokenizer server restores them before templating. Stdlib only: the daemon
imports this module and must not pull in transformers.
"""
from __future__ import annotations

import re

_ESCAPES = {"\\": "\\\\", "\n": "\\n"}
_UNESCAPES = {"\\\\": "\\", "\\n": "\n"}
_ESCAPED_PAIR = re.compile(r"\\[\\n]")


def escape_prompt_line(text: str) -> str:
    """`text` as one line: backslash → `\\\\`, newline → `\\n`. Inverse of unescape_prompt_line."""
    return "".join(_ESCAPES.get(char, char) for char in text)


def unescape_prompt_line(line: str) -> str:
    """Restore a line written by escape_prompt_line; any other backslash is kept as it is."""
    return _ESCAPED_PAIR.sub(lambda match: _UNESCAPES[match.group()], line)
