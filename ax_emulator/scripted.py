"""The scripted text engine's replies: a pure function of the user's line (no ML)."""
from __future__ import annotations

import random

FILLER_WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
    "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
    "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu",
)


def reply_text(user_line: str, words: int, think: bool) -> str:
    """`You said: <line>.` then `words` filler words chosen by the line, so every answer names
    the request it belongs to and the same line always gets the same answer.

    With `think`, a `<think>…</think>` block comes first, as DeepSeek-R1 and Qwen3 write it.
    """
    chooser = random.Random(user_line)
    filler = " ".join(chooser.choice(FILLER_WORDS) for _ in range(words))
    answer = f"You said: {user_line}." + (f" {filler}." if words > 0 else "")
    if think:
        return f"<think>\nThe user wrote {len(user_line)} characters; I echo them.\n</think>\n\n{answer}"
    return answer
