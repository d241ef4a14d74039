"""How one request reaches a runner: continue the conversation it holds, reset, restart, or refuse.

Pure: a function of the request, of what the runner's context holds, of the runner's dialect and
tokenizer, and of token counts the engine looked up. These are the decisions docs/design.md
describes ("Decisions the daemon makes"), in one place.

A runner reads one line per turn, so a request becomes one prompt line plus what must be set up
before it: a fresh context (a reset, or a restart where the runner has no reset), and the
tokenizer server's settings (system prompt, the history a fresh context opens with, thinking).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from tokenizer_service.prompt_escape import escape_prompt_line

from ...structured.prompt import place_instruction
from ..base import BadRequest, ChatMessage, GenerationRequest, Infill
from .dialects import Dialect

# Options the card fixes at launch (post_config.json); accepted per request but not applied.
FIXED_AT_LAUNCH = ("temperature", "top_p", "top_k", "seed", "repeat_penalty")
# Tokens kept free in the context for the template around a new message.
CONTEXT_MARGIN = 32
# Template tokens a message costs beyond its text, at most.
TOKENS_PER_MESSAGE = 8


@dataclass(frozen=True)
class Turn:
    """A request as a runner takes it: one user line, the history before it, a system prompt."""

    line: str
    history: tuple[ChatMessage, ...]
    system: str | None
    continuable: bool  # a chat may continue the held conversation; /api/generate never does
    thinking: bool | None
    warnings: tuple[str, ...]
    raw: bool = False  # the line goes to the model as it is: an empty context, no chat template


@dataclass(frozen=True)
class Held:
    """What the runner's context holds now."""

    conversation: tuple[ChatMessage, ...] | None  # None: unknown (after an error or an interrupt)
    system: str | None
    remaining: int | None  # tokens left in the context, None: unknown
    raw: bool = False  # the context was opened for raw prompts: empty, no system prompt


@dataclass(frozen=True)
class Runner:
    """What the planner needs to know about the runner and its tokenizer server."""

    dialect: Dialect
    supports_reset: bool
    our_tokenizer: bool  # the project's tokenizer server: history, newlines, thinking, counts
    context_size: int
    raw: bool = False  # our tokenizer server takes raw prompts (its "raw" control)
    infill: Infill | None = None  # its fill-in-the-middle tokens, where it has them
    model: str = "model"  # the model's name, for messages


class Action(StrEnum):
    PROMPT = "prompt"  # write the line now: the context holds what the turn needs
    RESET = "reset"  # clear the KV cache first
    RESTART = "restart"  # no reset: a fresh context costs a restart (a full load)


@dataclass(frozen=True)
class Plan:
    action: Action
    line: str  # the line as the runner must read it (escaped, never a runner command)
    fresh: bool  # the turn starts a new context
    # The conversation the runner holds after this turn, before the answer: history + user line.
    conversation: tuple[ChatMessage, ...]
    system: str | None
    # What the tokenizer server must hold before the action (only keys our server knows).
    tokenizer_settings: dict[str, Any]
    warnings: tuple[str, ...]
    raw: bool = False  # a raw turn: what the runner holds after it is no conversation to continue


def read_turn(request: GenerationRequest, default_system: str | None, runner: Runner) -> Turn:
    """The parts of a request a runner can take; warnings for what it cannot. A suffix the
    model cannot fill in is a BadRequest (Ollama's "does not support insert")."""
    messages = [m for m in request.messages if m.role != "system"]
    if not messages or messages[-1].role != "user":
        raise BadRequest("the last message must come from the user")
    warnings = [
        f"{name}: fixed at launch by the runner's post_config.json, not applied per request"
        for name in FIXED_AT_LAUNCH
        if getattr(request.options, name) is not None
    ]
    num_ctx = request.options.num_ctx
    if num_ctx is not None and num_ctx > runner.context_size:
        warnings.append(
            f"num_ctx {num_ctx}: the model's context on the card is {runner.context_size} tokens, fixed when "
            f"the model was converted; the request runs with {runner.context_size}"
        )
    line = messages[-1].content
    raw = request.raw
    if request.suffix:
        if runner.infill is None or not runner.raw:
            raise BadRequest(f"{runner.model} does not support insert: {_no_insert_reason(runner)}")
        line, raw = runner.infill.prompt(line, request.suffix), True
    elif raw and not runner.raw:
        warnings.append(f"raw: {_templated_anyway(runner)}; the chat template was applied to the prompt")
        raw = False
    if "\n" in line and not runner.our_tokenizer:
        warnings.append("newlines replaced with spaces: the stock tokenizer script cannot restore them")
    system = None if raw else (request.system if request.system is not None else default_system)
    if request.structured is not None:  # the JSON the answer must be: told in the system prompt or the line
        placed = place_instruction(
            request.structured, line, system, raw=raw,
            system_prompt_settable=runner.our_tokenizer and runner.dialect.keeps_context,
            why_not=_no_system_prompt_reason(runner),
        )
        line, system = placed.line, placed.system
        warnings.append(placed.warning)
    return Turn(
        line=line,
        history=() if raw else tuple(messages[:-1]),
        system=system,
        continuable=request.kind == "chat" and not raw,
        thinking=request.think,
        warnings=tuple(warnings),
        raw=raw,
    )


def _templated_anyway(runner: Runner) -> str:
    if runner.dialect.builtin_tokenizer:
        return "the runner's built-in tokenizer applies the chat template to every prompt"
    if not runner.our_tokenizer:
        return "the stock tokenizer script applies the chat template to every prompt"
    return "this tokenizer server cannot encode a prompt without its chat template"


def _no_system_prompt_reason(runner: Runner) -> str:
    if runner.dialect.builtin_tokenizer:
        return "the runner's built-in tokenizer takes no system prompt from the daemon"
    if not runner.our_tokenizer:
        return "the stock tokenizer script takes no system prompt from the daemon"
    return "a legacy runner keeps no context to open with a system prompt"


def _no_insert_reason(runner: Runner) -> str:
    if runner.raw:
        return "its tokenizer has no fill-in-the-middle tokens"
    return _templated_anyway(runner) + ", so a fill-in-the-middle prompt cannot reach the model"


def conversation_key(messages: tuple[ChatMessage, ...]) -> list[tuple[str, str]]:
    """A conversation as the runner sees it: clients do not send think blocks back."""
    out = []
    for m in messages:
        content = m.content
        if m.role == "assistant" and "</think>" in content:
            content = content.split("</think>", 1)[1]
        out.append((m.role, content.strip()))
    return out


def continues(turn: Turn, held: Held) -> bool:
    """The turn is exactly the held conversation plus one new user line."""
    return (
        turn.continuable
        and held.conversation is not None
        and held.system == turn.system
        and conversation_key(held.conversation) == conversation_key(turn.history)
    )


def line_texts(turn: Turn) -> list[str]:
    """What a continued turn adds to the context."""
    return [turn.line]


def conversation_texts(turn: Turn) -> list[str]:
    """What a fresh context for the turn holds."""
    return [m.content for m in turn.history] + [turn.line, turn.system or ""]


def token_bound(texts: list[str]) -> int:
    """An upper bound of the tokens `texts` need: a token never holds less than a byte."""
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) + TOKENS_PER_MESSAGE * len(texts)


def token_guess(texts: list[str]) -> int:
    """A cautious guess without a tokenizer: about 3 bytes a token."""
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) // 3 + TOKENS_PER_MESSAGE * len(texts)


def fits(tokens: int, room: int | None) -> bool:
    return room is None or tokens + CONTEXT_MARGIN <= room


def plan_turn(
    turn: Turn, held: Held, runner: Runner, *, line_tokens: int | None = None, conversation_tokens: int | None = None
) -> Plan:
    """Decide how the turn reaches the runner. `line_tokens` must be given when `continues()`,
    `conversation_tokens` when the turn does not continue or its line does not fit what remains.
    Raises BadRequest when the conversation cannot fit the context at all."""
    warnings = list(turn.warnings)
    history, line = turn.history, turn.line
    ours = runner.our_tokenizer
    if not runner.dialect.keeps_context:
        # Legacy runners start every turn from a clean context: nothing to reset.
        if history and not ours:
            warnings.append("history not sent: the stock tokenizer script cannot take it")
            history = ()
        return _plan(Action.PROMPT, turn, history, line, True, runner, warnings)

    continuing = continues(turn, held) and fits(_given(line_tokens, "line_tokens"), held.remaining)
    if not continuing:
        needed = _given(conversation_tokens, "conversation_tokens")
        if not fits(needed, runner.context_size):
            raise BadRequest(too_long_message(needed, runner.context_size, bool(turn.history)))
        if history and not ours:
            warnings.append("history flattened into the prompt: the tokenizer cannot take it")
            line = "\n".join(f"{m.role}: {m.content}" for m in history) + f"\nuser: {line}"
            history = ()
    # A raw turn needs a context opened empty; any other needs one opened with its system prompt.
    already_fresh = held.conversation == () and held.raw == turn.raw and (turn.raw or held.system == turn.system)
    if continuing or already_fresh:
        action = Action.PROMPT
    elif runner.supports_reset:
        action = Action.RESET
    else:
        action = Action.RESTART
    return _plan(action, turn, history, line, not continuing, runner, warnings)


def too_long_message(needed: int, context_size: int, has_history: bool) -> str:
    """The 400 for a prompt that cannot fit: the count, the context, and what to do."""
    what = "the conversation" if has_history else "the prompt"
    advice = "send fewer or shorter earlier messages, or a shorter prompt" if has_history else "shorten the prompt"
    return (
        f"{what} needs about {needed} tokens, more than the model's context of {context_size} tokens "
        f"(less {CONTEXT_MARGIN} kept for the template and the answer's start): {advice}, or use a model "
        "converted with a longer context (num_ctx cannot enlarge it: the card's context is fixed)"
    )


def _given(value: int | None, name: str) -> int:
    if value is None:
        raise ValueError(f"plan_turn needs {name} for this turn")
    return value


def _plan(
    action: Action, turn: Turn, history: tuple[ChatMessage, ...], line: str, fresh: bool,
    runner: Runner, warnings: list[str],
) -> Plan:
    settings: dict[str, Any] = {}
    if runner.our_tokenizer:
        settings["history"] = [{"role": m.role, "content": m.content} for m in history] if fresh else []
        settings["thinking"] = turn.thinking
        if runner.raw:
            settings["raw"] = turn.raw
        if action is not Action.PROMPT:
            settings["system_prompt"] = turn.system  # installed by the runner's /reset
    return Plan(
        action=action,
        line=runner_line(line, runner),
        fresh=fresh,
        conversation=history + (ChatMessage("user", line),),
        system=turn.system,
        tokenizer_settings=settings,
        warnings=tuple(warnings),
        raw=turn.raw,
    )


def runner_line(text: str, runner: Runner) -> str:
    """`text` as one line the runner reads as a prompt, never as one of its commands."""
    if runner.our_tokenizer:
        line = escape_prompt_line(text)
    else:
        line = text.replace("\r", " ").replace("\n", " ")
    if line.strip() == "" or line.strip() in runner.dialect.reserved_lines:
        line += " "
    return line
