"""The runner generations of the card, as one table: what the parser, the planner and the engine
need to know about each (see the protocol reference, section 1).

A new generation of runner is one entry here, plus its emulator dialect and transcripts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Dialect:
    name: str
    marker: bytes  # the prompt marker (no newline)
    log_style: Literal["ab", "c"]  # `[I][func][line]: msg` or `HH:MM:SS.mmm INF Func:line | msg`
    quit_command: str
    reset_command: str | None  # None: the KV cache cannot be cleared without a restart
    # B builds accept `reset` only when their banner says so; later builds print it.
    reset_needs_banner: bool
    keeps_context: bool  # False: every turn starts from a clean KV cache (legacy A)
    builtin_tokenizer: bool  # True: no tokenizer server; newlines cannot be restored
    launched_by_script: bool  # False: started as a program (`axllm run <dir>`), not a run script
    # Lines the runner reads as commands: a prompt equal to one gets a trailing space.
    reserved_lines: frozenset[str]
    # Plain lines printed at start-up by this generation only (detection before the marker).
    startup_hints: tuple[str, ...] = ()
    # Vision-language runners: the second marker they print after the text line, before reading
    # the path of an image file (an empty line: no image); None for text-only runners.
    image_marker: bytes | None = None
    # A directory path at the image marker means all its images, as frames (the Qwen-VL builds).
    image_directories: bool = False

    def supports_reset(self, banner_offers_reset: bool) -> bool:
        return self.reset_command is not None and (banner_offers_reset or not self.reset_needs_banner)


LEGACY_A = Dialect(
    name="a", marker=b">> ", log_style="ab", quit_command="q", reset_command=None, reset_needs_banner=False,
    keeps_context=False, builtin_tokenizer=False, launched_by_script=True,
    reserved_lines=frozenset({"q"}), startup_hints=("build time:",),
)
CTX_B = Dialect(
    name="b", marker=b"prompt >> ", log_style="ab", quit_command="q", reset_command="reset", reset_needs_banner=True,
    keeps_context=True, builtin_tokenizer=False, launched_by_script=True,
    reserved_lines=frozenset({"q", "reset", "dd"}),
)
AXLLM_C = Dialect(
    name="c", marker=b"prompt >> ", log_style="c", quit_command="/q", reset_command="/reset", reset_needs_banner=False,
    keeps_context=True, builtin_tokenizer=True, launched_by_script=False,
    reserved_lines=frozenset({"q", "/q", "/exit", "/reset", "/dd", "/pp"}),
)
# The vision-language runners (docs/vlm-runners.md): a B runner's log and marker, then
# `image >> ` for the image's path; a stateless tokenizer, no memory between turns, no reset.
# `img_start_token: N` at start-up tells them apart; the Qwen-VL builds (their run script has
# `--img_width`) also take a directory of frames: `vl_qwen`, else `vl`.
VISION = Dialect(
    name="vl", marker=b"prompt >> ", log_style="ab", quit_command="q", reset_command=None, reset_needs_banner=False,
    keeps_context=False, builtin_tokenizer=False, launched_by_script=True,
    reserved_lines=frozenset({"q"}), startup_hints=("img_start_token:",), image_marker=b"image >> ",
)
VISION_QWEN = Dialect(
    name="vl_qwen", marker=b"prompt >> ", log_style="ab", quit_command="q", reset_command=None,
    reset_needs_banner=False, keeps_context=False, builtin_tokenizer=False, launched_by_script=True,
    reserved_lines=frozenset({"q"}), image_marker=b"image >> ", image_directories=True,
)

DIALECTS: dict[str, Dialect] = {d.name: d for d in (LEGACY_A, CTX_B, AXLLM_C, VISION, VISION_QWEN)}
# Markers longest first: a line is checked against each in turn.
MARKERS: tuple[bytes, ...] = tuple(sorted({d.marker for d in DIALECTS.values()}, key=len, reverse=True))


def dialects_with_marker(marker: bytes) -> tuple[Dialect, ...]:
    """The generations printing this marker, most common first (`prompt >> ` is B's or C's)."""
    return tuple(d for d in (CTX_B, AXLLM_C, VISION, VISION_QWEN, LEGACY_A) if d.marker == marker)


def dialect_of_startup_line(text: str) -> Dialect | None:
    """The generation a plain start-up line belongs to, if only one prints it."""
    return next((d for d in DIALECTS.values() if any(text.startswith(h) for h in d.startup_hints)), None)


def dialect_of_log_style(style: str) -> Dialect | None:
    """The generation a log style belongs to, if only one uses it."""
    owners = [d for d in DIALECTS.values() if d.log_style == style]
    return owners[0] if len(owners) == 1 else None
