"""The card engine's turn planner, directly: how each request reaches a runner (continue, reset,
restart, refuse) and what the tokenizer server must hold first. The decisions of docs/design.md."""
from __future__ import annotations

import pytest

from llm_service.engines.base import BadRequest, ChatMessage, GenerationRequest, Infill, SamplingOptions
from llm_service.engines.card.dialects import AXLLM_C, CTX_B, LEGACY_A
from llm_service.engines.card.planner import (
    CONTEXT_MARGIN,
    Action,
    Held,
    Runner,
    continues,
    conversation_texts,
    plan_turn,
    read_turn,
    runner_line,
    token_bound,
)

OURS = Runner(CTX_B, supports_reset=True, our_tokenizer=True, context_size=2048)
NO_RESET = Runner(CTX_B, supports_reset=False, our_tokenizer=True, context_size=2048)
STOCK = Runner(CTX_B, supports_reset=True, our_tokenizer=False, context_size=2048)
FIM = Infill("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
CODER = Runner(CTX_B, supports_reset=True, our_tokenizer=True, context_size=2048, raw=True, infill=FIM, model="coder")
NO_FIM = Runner(CTX_B, supports_reset=True, our_tokenizer=True, context_size=2048, raw=True, model="smol")
SYSTEM = "You are a helpful assistant."
U, A = "user", "assistant"


def request(*messages: tuple[str, str], kind: str = "chat", think: bool | None = None, raw: bool = False,
            suffix: str | None = None, **options) -> GenerationRequest:
    return GenerationRequest(
        id="r1", messages=[ChatMessage(role, text) for role, text in messages], kind=kind, think=think,
        options=SamplingOptions(**options), raw=raw, suffix=suffix,
    )


def turn_of(req: GenerationRequest, runner: Runner = OURS):
    return read_turn(req, SYSTEM, runner)


def held(*messages: tuple[str, str], system: str | None = SYSTEM, remaining: int | None = 1900, raw: bool = False) -> Held:
    return Held(tuple(ChatMessage(r, t) for r, t in messages), system, remaining, raw)


def plan(req: GenerationRequest, now: Held, runner: Runner = OURS):
    turn = turn_of(req, runner)
    return plan_turn(turn, now, runner, line_tokens=token_bound([turn.line]),
                     conversation_tokens=token_bound(conversation_texts(turn)))


def test_a_chat_extending_the_held_conversation_is_one_new_line():
    now = held((U, "hi"), (A, "hello"))
    result = plan(request((U, "hi"), (A, "hello"), (U, "and now?")), now)
    assert result.action is Action.PROMPT and not result.fresh
    assert result.line == "and now?"
    assert result.tokenizer_settings == {"history": [], "thinking": None}
    assert [m.content for m in result.conversation] == ["hi", "hello", "and now?"]


def test_think_blocks_are_not_part_of_the_conversation_clients_send_back():
    now = held((U, "hi"), (A, "<think>hmm</think>hello"))
    assert continues(turn_of(request((U, "hi"), (A, "hello"), (U, "more"))), now)


def test_another_conversation_resets_and_installs_its_history_and_system_prompt():
    now = held((U, "hi"), (A, "hello"))
    result = plan(request(("system", "Be brief."), (U, "x"), (A, "y"), (U, "z")), now)
    assert result.action is Action.RESET and result.fresh
    assert result.tokenizer_settings == {
        "history": [{"role": U, "content": "x"}, {"role": A, "content": "y"}],
        "thinking": None,
        "system_prompt": "Be brief.",
    }
    assert result.system == "Be brief."


def test_a_runner_without_reset_restarts_for_a_fresh_context():
    result = plan(request((U, "other")), held((U, "hi"), (A, "hello")), NO_RESET)
    assert result.action is Action.RESTART and result.tokenizer_settings["system_prompt"] == SYSTEM


def test_an_already_fresh_context_takes_the_line_at_once():
    result = plan(request((U, "first"), kind="generate", think=False), held(), NO_RESET)
    assert result.action is Action.PROMPT and result.fresh
    assert result.tokenizer_settings == {"history": [], "thinking": False}


def test_a_one_shot_request_never_continues_a_conversation():
    now = held((U, "hi"), (A, "hello"))
    assert not continues(turn_of(request((U, "hi"), kind="generate")), now)
    assert plan(request((U, "hi"), kind="generate"), now).action is Action.RESET


def test_a_line_that_does_not_fit_what_remains_opens_a_fresh_context_with_the_history():
    now = held((U, "hi"), (A, "hello"), remaining=CONTEXT_MARGIN + 5)
    turn = turn_of(request((U, "hi"), (A, "hello"), (U, "a longer question")))
    result = plan_turn(turn, now, OURS, line_tokens=20, conversation_tokens=60)
    assert result.action is Action.RESET and result.fresh
    assert [m["content"] for m in result.tokenizer_settings["history"]] == ["hi", "hello"]


def test_a_conversation_larger_than_the_context_is_refused():
    turn = turn_of(request((U, "x" * 10)))
    with pytest.raises(BadRequest) as refused:
        plan_turn(turn, held((U, "other"), (A, "y")), OURS, conversation_tokens=2100)
    # The count, the context, and what to do.
    assert refused.value.message.startswith(
        "the prompt needs about 2100 tokens, more than the model's context of 2048 tokens")
    assert "shorten the prompt" in refused.value.message and "num_ctx cannot enlarge it" in refused.value.message
    with pytest.raises(BadRequest, match="the conversation needs about 2100 tokens.*send fewer or shorter earlier messages"):
        plan_turn(turn_of(request((U, "x"), (A, "y"), (U, "z"))), held(), OURS, conversation_tokens=2100)
    # In a fresh context too: the line alone does not fit what remains there.
    with pytest.raises(BadRequest, match="needs about 2100 tokens"):
        plan_turn(turn, held(remaining=2000), OURS, line_tokens=2090, conversation_tokens=2100)


def test_counts_the_decision_needs_must_be_given():
    with pytest.raises(ValueError, match="conversation_tokens"):
        plan_turn(turn_of(request((U, "x"))), held((U, "other"), (A, "y")), OURS)
    with pytest.raises(ValueError, match="line_tokens"):
        plan_turn(turn_of(request((U, "hi"), (A, "y"), (U, "z"))), held((U, "hi"), (A, "y")), OURS)


def test_a_stock_tokenizer_gets_the_history_flattened_and_newlines_as_spaces_with_warnings():
    result = plan(request((U, "x"), (A, "y"), (U, "two\nlines")), held(), STOCK)
    assert result.line == "user: x assistant: y user: two lines"
    assert result.tokenizer_settings == {}
    assert "history flattened into the prompt: the tokenizer cannot take it" in result.warnings
    assert "newlines replaced with spaces: the stock tokenizer script cannot restore them" in result.warnings


def test_our_tokenizer_gets_newlines_escaped():
    assert plan(request((U, "a\\b\nc")), held()).line == "a\\\\b\\nc"


def test_a_legacy_runner_takes_every_turn_fresh_and_cannot_take_a_history_from_a_stock_script():
    legacy = Runner(LEGACY_A, supports_reset=False, our_tokenizer=False, context_size=1024)
    turn = turn_of(request((U, "x"), (A, "y"), (U, "z")), legacy)
    result = plan_turn(turn, held(), legacy)  # no counts needed: the runner refuses what does not fit
    assert result.action is Action.PROMPT and result.fresh and result.line == "z"
    assert "history not sent: the stock tokenizer script cannot take it" in result.warnings


@pytest.mark.parametrize(("runner", "text", "line"), [
    (OURS, "q", "q "), (OURS, "reset", "reset "), (OURS, "dd", "dd "), (OURS, "", " "), (OURS, "quit", "quit"),
    (Runner(AXLLM_C, True, False, 2048), "/q", "/q "), (Runner(AXLLM_C, True, False, 2048), "/reset", "/reset "),
])
def test_a_prompt_is_never_taken_for_a_runner_command(runner, text, line):
    assert runner_line(text, runner) == line


def test_options_fixed_at_launch_are_reported_not_applied():
    turn = turn_of(request((U, "x"), temperature=0.2, seed=3, num_predict=5))
    assert turn.warnings == (
        "temperature: fixed at launch by the runner's post_config.json, not applied per request",
        "seed: fixed at launch by the runner's post_config.json, not applied per request",
    )


def test_the_last_message_must_come_from_the_user():
    with pytest.raises(BadRequest, match="last message must come from the user"):
        read_turn(request((U, "x"), (A, "y")), SYSTEM, OURS)


def test_the_descriptor_system_prompt_is_the_default_and_a_request_overrides_it():
    assert turn_of(request((U, "x"))).system == SYSTEM
    assert turn_of(request(("system", "Other."), (U, "x"))).system == "Other."


def test_num_ctx_beyond_the_cards_context_is_a_warning():
    assert turn_of(request((U, "x"), num_ctx=8192)).warnings == (
        "num_ctx 8192: the model's context on the card is 2048 tokens, fixed when the model was converted; "
        "the request runs with 2048",)
    assert turn_of(request((U, "x"), num_ctx=2048)).warnings == ()
    assert turn_of(request((U, "x"), num_ctx=512)).warnings == ()


def test_a_raw_prompt_opens_an_empty_context_and_leaves_nothing_to_continue():
    turn = turn_of(request(("system", "ignored"), (U, "<|im_start|>user\nhi"), kind="generate", raw=True), CODER)
    assert turn.raw and turn.system is None and not turn.continuable
    result = plan(request((U, "<|im_start|>user\nhi"), kind="generate", raw=True), held(), CODER)
    assert result.action is Action.RESET and result.raw
    assert result.tokenizer_settings == {"history": [], "thinking": None, "raw": True, "system_prompt": None}
    assert result.line == "<|im_start|>user\\nhi"  # the newline escape still applies
    # An empty raw context takes the next raw prompt at once; an ordinary one needs a reset again.
    empty_raw = held(system=None, raw=True)
    assert plan(request((U, "again"), kind="generate", raw=True), empty_raw, CODER).action is Action.PROMPT
    again = plan(request((U, "templated"), kind="generate"), empty_raw, CODER)
    assert again.action is Action.RESET and again.tokenizer_settings["raw"] is False and not again.raw


def test_raw_without_a_tokenizer_that_can_take_it_is_templated_with_a_warning():
    turn = turn_of(request((U, "x"), kind="generate", raw=True), STOCK)
    assert not turn.raw and turn.system == SYSTEM
    assert turn.warnings == ("raw: the stock tokenizer script applies the chat template to every prompt; "
                             "the chat template was applied to the prompt",)
    builtin = Runner(AXLLM_C, True, False, 2048)
    assert "raw: the runner's built-in tokenizer applies the chat template" in turn_of(
        request((U, "x"), kind="generate", raw=True), builtin).warnings[0]


def test_a_suffix_becomes_a_fill_in_the_middle_prompt():
    turn = turn_of(request((U, "def add(a, b):\n    "), kind="generate", suffix="\n\nprint(add(1, 2))"), CODER)
    assert turn.raw and turn.line == "<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n\nprint(add(1, 2))<|fim_middle|>"
    result = plan(request((U, "def f("), kind="generate", suffix=")"), held(), CODER)
    assert result.line == "<|fim_prefix|>def f(<|fim_suffix|>)<|fim_middle|>" and result.tokenizer_settings["raw"]
    # An empty suffix is no suffix (as Ollama has it).
    assert not turn_of(request((U, "x"), kind="generate", suffix=""), CODER).raw


@pytest.mark.parametrize(("runner", "why"), [
    (NO_FIM, "smol does not support insert: its tokenizer has no fill-in-the-middle tokens"),
    (STOCK, "model does not support insert: the stock tokenizer script applies the chat template to every prompt, "
            "so a fill-in-the-middle prompt cannot reach the model"),
])
def test_a_suffix_the_model_cannot_fill_in_is_refused(runner, why):
    with pytest.raises(BadRequest) as refused:
        turn_of(request((U, "x"), kind="generate", suffix="y"), runner)
    assert refused.value.message == why
