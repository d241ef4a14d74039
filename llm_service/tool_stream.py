"""Tool calls in an answer as it streams, for every engine: the recogniser (`tool_calls.py`)
applied to the text, calls an engine reports itself (an upstream's `tool_calls` deltas) passed
on, ids given, and `tool_choice` required/named enforced (tools.py says how).

`ToolStage` is pure (one answer's chunks in, chunks out); `answer_with_tools` wraps an engine's
answer stream with it and makes the retry a forced choice may need.
"""
from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from .engines.base import ChatMessage, Chunk, EngineError, GenerationRequest, GenerationResult, ToolCall
from .tool_calls import ToolCallParser
from .tools import (
    TOOL_CHOICE_ATTEMPTS,
    forced,
    new_call_id,
    retry_request_text,
    satisfies,
    tool_names,
    tools_for_model,
)


class ToolChoiceUnmet(EngineError):
    """tool_choice asked for a call and the model would not make one."""

    status_code = 422
    code = "tool_choice_unmet"


class ToolStage:
    """One answer's chunks through the recogniser. Pure."""

    def __init__(self, request: GenerationRequest) -> None:
        tools = tools_for_model(request)
        self.choice = request.tool_choice
        self.parser = ToolCallParser(tool_names(tools)) if tools else None
        self.forced = forced(self.choice) and tools is not None
        self.calls: list[ToolCall] = []
        self.text: list[str] = []  # the visible text as the engine gave it (a retry's history)
        self._held: list[Chunk] = []  # a forced choice: everything until its call appears

    @property
    def warnings(self) -> list[str]:
        return list(self.parser.warnings) if self.parser else []

    @property
    def satisfied(self) -> bool:
        return not self.forced or satisfies(self.choice, self.calls)

    def feed(self, chunk: Chunk) -> list[Chunk]:
        self.text.append(chunk.content)
        out: list[Chunk] = []
        if chunk.thinking:
            out.append(Chunk(thinking=chunk.thinking))
        if self.parser is not None and chunk.content:
            out += self._chunks(self.parser.feed(chunk.content))
        elif chunk.content:
            out.append(Chunk(content=chunk.content))
        if chunk.tool_calls:  # an engine's own calls (an upstream's deltas)
            out.append(self._call_chunk(list(chunk.tool_calls)))
        if out:
            out[0] = dataclasses.replace(out[0], tokens=chunk.tokens)
        return self._release(out)

    def finish(self) -> list[Chunk]:
        """The end of the answer: what the recogniser held; a forced choice's held chunks only
        when it was met (else `satisfied` is False and they are dropped for a retry)."""
        out = self._chunks(self.parser.flush()) if self.parser is not None else []
        released = self._release(out)
        if not self.satisfied:
            self._held = []
        return released

    def _release(self, out: list[Chunk]) -> list[Chunk]:
        if self.forced and not self.satisfied:
            self._held += out
            return []
        if self._held:
            out, self._held = self._held + out, []
        return out

    def _chunks(self, events: list[str | ToolCall]) -> list[Chunk]:
        out: list[Chunk] = []
        for event in events:
            if isinstance(event, str):
                if out and not out[-1].tool_calls:
                    out[-1] = Chunk(content=out[-1].content + event)
                else:
                    out.append(Chunk(content=event))
            elif out and out[-1].tool_calls:
                out[-1] = self._call_chunk(list(out[-1].tool_calls) + [event], known=len(out[-1].tool_calls))
            else:
                out.append(self._call_chunk([event]))
        return out

    def _call_chunk(self, calls: list[ToolCall], known: int = 0) -> Chunk:
        """Calls with their ids (`call_…` where the model or upstream gave none), counted."""
        fresh = [c if c.id else dataclasses.replace(c, id=new_call_id()) for c in calls[known:]]
        self.calls += fresh
        return Chunk(tool_calls=tuple(calls[:known]) + tuple(fresh))


def answer_stream(
    request: GenerationRequest, generate: Callable[[GenerationRequest], AsyncIterator[Chunk | GenerationResult]]
) -> AsyncIterator[Chunk | GenerationResult]:
    """The engine's answer, through the tool stage when the request has tools (else untouched:
    nothing is added on the path of an ordinary answer)."""
    if not request.tools:
        return generate(request)
    return answer_with_tools(request, generate)


async def answer_with_tools(
    request: GenerationRequest, generate: Callable[[GenerationRequest], AsyncIterator[Chunk | GenerationResult]]
) -> AsyncIterator[Chunk | GenerationResult]:
    """`generate(request)`'s answer with its tool calls recognised. A forced choice whose answer
    has no call is asked again once, as a follow-up turn; then it is a ToolChoiceUnmet."""
    attempt = request
    last = ""
    for _ in range(TOOL_CHOICE_ATTEMPTS):
        stage = ToolStage(request)
        async with aclosing(generate(attempt)) as stream:
            async for item in stream:
                if isinstance(item, Chunk):
                    for out in stage.feed(item):
                        yield out
                    continue
                for out in stage.finish():
                    yield out
                if stage.satisfied:
                    item.warnings.extend(stage.warnings)
                    yield item
                    return
                break
        last = "".join(stage.text)
        attempt = dataclasses.replace(
            request,
            messages=[*request.messages, ChatMessage("assistant", last), ChatMessage("user", retry_request_text(request.tool_choice))],
            prompt_tokens=0,
        )
    choice = request.tool_choice
    what = f'the function "{choice.name}"' if choice.name else '"required"'
    excerpt = last.strip()[:200] or "(nothing)"
    raise ToolChoiceUnmet(
        f"tool_choice {what} asks for a tool call, and the model answered without one "
        f"{TOOL_CHOICE_ATTEMPTS} times (asked again after the first); its last answer: {excerpt!r}. "
        "The model cannot be made to call a tool: its sampling is not constrained"
    )
