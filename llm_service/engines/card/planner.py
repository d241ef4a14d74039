"""How one request reaches a runner: continue the conversation it holds, reset, restart, or refuse.

Pure: a function of the request, of what the runner's context holds, of the runner's dialect and
tokenizer, and of token counts the engine looked up. These are the decisions docs/design.md
describes ("Decisions the daemon makes"), in one place.

A runner reads one line per turn, so a request becomes one prompt line plus what must be set up
before it: a fresh context (a reset, or a restart where the runner has no reset), and the
tokenizer server's settings (system prompt, the history a fresh context opens with, thinking,
the tools and the tool results of a tool round).

Tools (llm_service/tools.py): our tokenizer server takes the definitions for the conversation
it opens (its template renders them, or it puts them in the system prompt), and a tool round's
results as the turn's messages (`turn`); the line then carries the results as text. A stock
script cannot take them: the definitions go into the first line of the conversation, in the
Hermes/Qwen form, and a tool round is a user line of `<tool_response>`s. Either way a tool round
that continues the held conversation (which holds the assistant's call as the model wrote it)
is one line, with no re-prefill; the tools are part of what the context holds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from tokenizer_service.prompt_escape import escape_prompt_line
from tokenizer_service.tool_prompt import as_text_messages, assistant_text, responses_text, tools_block, with_tools

from ...structured.prompt import place_instruction
from ...tool_calls import split_calls
from ...tools import call_key, choice_instruction, template_message, tools_for_model
from ..base import BadRequest, ChatMessage, GenerationRequest, Infill
from .dialects import Dialect

if TYPE_CHECKING:
    from ...images import ImageInput

# Options the card fixes at launch (post_config.json); accepted per request but not applied.
FIXED_AT_LAUNCH = ("temperature", "top_p", "top_k", "seed", "repeat_penalty")
# Tokens kept free in the context for the template around a new message.
CONTEXT_MARGIN = 32
# Template tokens a message costs beyond its text, at most.
TOKENS_PER_MESSAGE = 8
# The prompt tokens of one image on the card's VLM runners: 256 placeholders for a 448x448
# encoder, whatever the picture's own size (docs/vlm-runners.md §5; 144 on a 384x384 Qwen3-VL
# build: 256 is the most), plus the tokens around them.
TOKENS_PER_IMAGE = 256 + 4


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
    # The turn's new messages: the user's, or a tool round's results (the line is their text).
    messages: tuple[ChatMessage, ...] = ()
    tools: list[dict[str, Any]] | None = None  # the definitions given to the model
    instruction: str | None = None  # what a required tool_choice adds (system prompt or line)
    images: tuple[ImageInput, ...] = ()  # what the runner reads at its image marker this turn


@dataclass(frozen=True)
class Held:
    """What the runner's context holds now."""

    conversation: tuple[ChatMessage, ...] | None  # None: unknown (after an error or an interrupt)
    system: str | None
    remaining: int | None  # tokens left in the context, None: unknown
    raw: bool = False  # the context was opened for raw prompts: empty, no system prompt
    tools: list[dict[str, Any]] | None = None  # the definitions the conversation was opened with


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
    # How our tokenizer server takes tool definitions: "template" (its template renders them),
    # "system_prompt" (it writes them there); None: it cannot (a stock script, an older server).
    tools: str | None = None
    turn_control: bool = False  # it takes a tool round's messages (`turn`)


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
    tools: list[dict[str, Any]] | None = None  # the definitions the conversation holds after the turn
    images: tuple[ImageInput, ...] = ()  # the turn's images (a vision runner's image marker)


def read_turn(request: GenerationRequest, default_system: str | None, runner: Runner) -> Turn:
    """The parts of a request a runner can take; warnings for what it cannot. A suffix the
    model cannot fill in is a BadRequest (Ollama's "does not support insert")."""
    messages = [m for m in request.messages if m.role != "system"]
    if not messages or messages[-1].role not in ("user", "tool"):
        raise BadRequest("the last message must come from the user, or be a tool's result")
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
    start = turn_start(messages)
    turn_messages = tuple(messages[start:])
    images, image_warnings = turn_images(messages, start, runner)
    warnings.extend(image_warnings)
    line = responses_text(m.content for m in turn_messages) if messages[-1].role == "tool" else messages[-1].content
    tools = tools_for_model(request)
    if tools:
        warnings.extend(_tools_warnings(runner))
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
    if not raw and request.system is not None and request.system != default_system and not runner.our_tokenizer:
        # The runner keeps the system prompt it was started with: plan with that one, and say so.
        warnings.append(f"system prompt not applied: {_no_system_prompt_reason(runner)}; the runner's own "
                        "system prompt stays")
        system = default_system
    instruction = choice_instruction(request.tool_choice) if tools else None
    if instruction and runner.tools is not None:
        # Our tokenizer server writes the tools: the instruction goes with them, in the system prompt.
        system = (system + "\n\n" if system else "") + instruction
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
        history=() if raw else tuple(messages[:start]),
        system=system,
        continuable=request.kind == "chat" and not raw,
        thinking=request.think,
        warnings=tuple(warnings),
        raw=raw,
        messages=turn_messages,
        tools=tools,
        instruction=instruction,
        images=images,
    )


def turn_start(messages: list[ChatMessage]) -> int:
    """Where the turn's new messages begin (system messages left out): the last user message,
    or a tool round's results."""
    start = len(messages) - 1
    while messages[-1].role == "tool" and start > 0 and messages[start - 1].role == "tool":
        start -= 1
    return start


def images_for_turn(messages: list[ChatMessage]) -> tuple[tuple[ImageInput, ...], int | None]:
    """The images the runner reads this turn (`messages` without system messages): the new
    messages' own; where they have none, the latest earlier message's that has some (the runner
    keeps nothing between turns, so a follow-up question about a picture needs it again), with
    that message's index; None: the new messages' own (or no image at all)."""
    start = turn_start(messages)
    new = tuple(image for m in messages[start:] for image in m.images)
    if new:
        return new, None
    for index in range(start - 1, -1, -1):
        if messages[index].images:
            return messages[index].images, index
    return (), None


def turn_images(messages: list[ChatMessage], start: int, runner: Runner) -> tuple[tuple[ImageInput, ...], list[str]]:
    """The images the runner reads this turn (`images_for_turn`: one image a turn, or several as
    frames where the runner takes a folder), and warnings for the others: an earlier message's
    images cannot reach it beside the turn's (it reads one path a turn, and keeps nothing)."""
    total = sum(len(m.images) for m in messages)
    if not total:
        return (), []
    if runner.dialect.image_marker is None:
        raise BadRequest(f"{runner.model} does not support images: its runner takes text only (send the "
                         "images to a vision-language model, one whose run script names an image encoder)")
    images, carried = images_for_turn(messages)
    where = "the last message" if carried is None else f"messages[{carried}]"
    if len(images) > 1 and not runner.dialect.image_directories:
        raise BadRequest(f"{len(images)} images in {where}: {runner.model}'s runner reads one image a turn; send "
                         "one image (or one request per image)")
    warnings = []
    if carried is not None:
        warnings.append(f"images: the runner keeps nothing between turns, so the image(s) of an earlier message "
                        f"({len(images)}) went with this turn again")
    if total > len(images):
        warnings.append(f"images of earlier messages not sent ({total - len(images)}): the runner reads one "
                        "message's images a turn and keeps nothing between turns; their messages' text was sent")
    return images, warnings


def _tools_warnings(runner: Runner) -> list[str]:
    if runner.tools == "template":
        return []
    if runner.tools == "system_prompt":
        return ["tools: this model's chat template does not render tool definitions; they are in its system "
                "prompt, in the Hermes/Qwen form (<tools>…</tools>, calls as <tool_call>…</tool_call>)"]
    if runner.dialect.builtin_tokenizer:
        who = "the runner's built-in tokenizer"
    elif runner.our_tokenizer:
        who = "this tokenizer server"
    else:
        who = "the stock tokenizer script"
    return [f"tools: {who} cannot take tool definitions; they are written into the prompt line, in the "
            "Hermes/Qwen form (<tools>…</tools>, calls as <tool_call>…</tool_call>)"]


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


def conversation_key(messages: tuple[ChatMessage, ...]) -> list[tuple[str, str, tuple[tuple[str, str], ...]]]:
    """A conversation as the runner sees it: clients do not send think blocks back, and an
    assistant's calls count whether they come as the model's text (what the runner holds) or as
    `tool_calls` (what a client sends back)."""
    out = []
    for m in messages:
        content, calls = m.content, ()
        if m.role == "assistant":
            if "</think>" in content:
                content = content.split("</think>", 1)[1]
            content, found = split_calls(content)
            calls = call_key([*m.tool_calls, *found])
        out.append((m.role, content.strip(), calls))
    return out


def continues(turn: Turn, held: Held) -> bool:
    """The turn is exactly the held conversation plus one new user line (or tool round)."""
    return (
        turn.continuable
        and held.conversation is not None
        and held.system == turn.system
        and held.tools == turn.tools
        and conversation_key(held.conversation) == conversation_key(turn.history)
    )


def line_texts(turn: Turn) -> list[str]:
    """What a continued turn adds to the context."""
    return [turn.line, turn.instruction or ""]


def conversation_texts(turn: Turn) -> list[str]:
    """What a fresh context for the turn holds."""
    texts = [m.content for m in turn.history] + [turn.line, turn.system or "", turn.instruction or ""]
    texts += [json.dumps(call.arguments, ensure_ascii=False) for m in turn.history for call in m.tool_calls]
    if turn.tools:
        texts.append(tools_block(turn.tools))
    return texts


def _context_tools(turn: Turn, runner: Runner) -> list[dict[str, Any]] | None:
    """The definitions the context must be opened with (our server takes them at its reset)."""
    return turn.tools if runner.tools is not None else None


def flat_text(message: ChatMessage) -> str:
    """A history message in a flattened prompt line."""
    if message.role == "assistant" and message.tool_calls:
        return "assistant: " + assistant_text(message.content, [(c.name, c.arguments) for c in message.tool_calls])
    if message.role == "tool":
        return "user: " + responses_text([message.content])
    return f"{message.role}: {message.content}"


def token_bound(texts: list[str]) -> int:
    """An upper bound of the tokens `texts` need: a token never holds less than a byte."""
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) + TOKENS_PER_MESSAGE * len(texts)


def token_guess(texts: list[str]) -> int:
    """A cautious guess without a tokenizer: about 3 bytes a token."""
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) // 3 + TOKENS_PER_MESSAGE * len(texts)


def image_tokens(turn: Turn) -> int:
    return TOKENS_PER_IMAGE * len(turn.images)


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
    conversation = history + (turn.messages or (ChatMessage("user", line),))
    ours = runner.our_tokenizer
    system = turn.system
    if not runner.dialect.keeps_context:
        # Legacy runners start every turn from a clean context: nothing to reset.
        if turn.images:  # a vision runner: the whole conversation and the images, every turn
            needed = _given(conversation_tokens, "conversation_tokens") + image_tokens(turn)
            if not fits(needed, runner.context_size):
                raise BadRequest(too_long_message(needed, runner.context_size, bool(turn.history))
                                 + f"; the {len(turn.images)} image(s) take {image_tokens(turn)} of these tokens, "
                                 "whatever their size: send fewer images")
        if history and not ours:
            warnings.append("history not sent: the stock tokenizer script cannot take it")
            history = ()
        if turn.tools and runner.tools is None:
            line = _line_with_tools(line, turn)
        return _plan(Action.PROMPT, turn, history, line, True, runner, warnings, conversation, system)

    continuing = continues(turn, held) and fits(_given(line_tokens, "line_tokens"), held.remaining)
    if not continuing:
        needed = _given(conversation_tokens, "conversation_tokens")
        if not fits(needed, runner.context_size):
            raise BadRequest(too_long_message(needed, runner.context_size, bool(turn.history)))
        if history and not ours:
            warnings.append("history flattened into the prompt: the tokenizer cannot take it")
            line = "\n".join(flat_text(m) for m in history) + f"\nuser: {line}"
            history = ()
            conversation = (ChatMessage("user", line),)
        if turn.tools and runner.tools is None:
            line = _line_with_tools(line, turn)
    elif turn.instruction and runner.tools is None:
        line = f"{turn.instruction}\n\n{line}"  # the tools are in the context; the instruction is per turn
    # A raw turn needs a context opened empty; any other needs one opened with its system prompt
    # (and the tools our tokenizer server writes with it).
    already_fresh = (
        held.conversation == () and held.raw == turn.raw
        and (turn.raw or (held.system == system and held.tools == _context_tools(turn, runner)))
    )
    if continuing or already_fresh:
        action = Action.PROMPT
    elif runner.supports_reset:
        action = Action.RESET
    else:
        action = Action.RESTART
    return _plan(action, turn, history, line, not continuing, runner, warnings, conversation, system)


def _line_with_tools(line: str, turn: Turn) -> str:
    """A conversation's first line where the tokenizer cannot take the definitions: the
    definitions (and a required tool_choice's instruction) first, in the Hermes/Qwen form."""
    head = with_tools(None, turn.tools) or ""
    if turn.instruction:
        head += "\n\n" + turn.instruction
    return f"{head}\n\n{line}"


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
    runner: Runner, warnings: list[str], conversation: tuple[ChatMessage, ...], system: str | None,
) -> Plan:
    settings: dict[str, Any] = {}
    if runner.our_tokenizer:
        settings["history"] = _history_items(history, runner) if fresh else []
        settings["thinking"] = turn.thinking
        if runner.raw:
            settings["raw"] = turn.raw
        if runner.tools is not None:
            settings["tools"] = turn.tools  # installed by the runner's /reset, as the system prompt
        if runner.turn_control:
            tool_round = bool(turn.messages) and turn.messages[-1].role == "tool"
            settings["turn"] = [template_message(m) for m in turn.messages] if tool_round else []
        if action is not Action.PROMPT:
            settings["system_prompt"] = system  # installed by the runner's /reset
    return Plan(
        action=action,
        line=runner_line(line, runner),
        fresh=fresh,
        conversation=conversation,
        system=system,
        tokenizer_settings=settings,
        warnings=tuple(warnings),
        raw=turn.raw,
        tools=turn.tools,
        images=turn.images,
    )


def _history_items(history: tuple[ChatMessage, ...], runner: Runner) -> list[dict[str, Any]]:
    """The history for our tokenizer server; calls and tool results as text where it cannot
    take them (a server without the tools control knows only user and assistant)."""
    items = [template_message(m) for m in history]
    return items if runner.tools is not None else as_text_messages(items)


def runner_line(text: str, runner: Runner) -> str:
    """`text` as one line the runner reads as a prompt, never as one of its commands."""
    if runner.our_tokenizer:
        line = escape_prompt_line(text)
    else:
        line = text.replace("\r", " ").replace("\n", " ")
    if line.strip() == "" or line.strip() in runner.dialect.reserved_lines:
        line += " "
    return line
