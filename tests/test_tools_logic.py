"""The pure parts of tool calling, directly: request parsing and tool_choice (llm_service/tools.py),
the stage every answer with tools goes through (tool_stream.py), the card planner's tool rounds,
the text forms (tokenizer_service/tool_prompt.py) and the scripted emulator's call replies."""
from __future__ import annotations

import json

import anyio
import pytest

from ax_emulator.scripted import reply_text, requested_calls
from llm_service.engines.base import (
    BadRequest, ChatMessage, Chunk, GenerationRequest, GenerationResult, ToolCall, ToolChoice,
)
from llm_service.engines.card.dialects import CTX_B
from llm_service.engines.card.planner import (
    Action, Held, Runner, continues, conversation_texts, plan_turn, read_turn, token_bound,
)
from llm_service.tool_stream import ToolChoiceUnmet, ToolStage, answer_with_tools
from llm_service.tools import (
    choice_instruction, parse_tool_choice, parse_tools, tools_for_model, upstream_messages,
)
from tokenizer_service.prompt_escape import escape_prompt_line
from tokenizer_service.tool_prompt import as_text_messages, assistant_text, responses_text, tools_block

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
SYSTEM = "You are a helpful assistant."
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
PARIS = ToolCall("get_weather", {"city": "Paris"})

TEMPLATE = Runner(CTX_B, supports_reset=True, our_tokenizer=True, context_size=2048, tools="template", turn_control=True)
SYSTEM_FORM = Runner(CTX_B, supports_reset=True, our_tokenizer=True, context_size=2048, tools="system_prompt", turn_control=True)
STOCK = Runner(CTX_B, supports_reset=True, our_tokenizer=False, context_size=2048)


def chat(*messages: ChatMessage, tools=(WEATHER,), choice: ToolChoice = ToolChoice()) -> GenerationRequest:
    return GenerationRequest(id="r", messages=list(messages), tools=list(tools) or None, tool_choice=choice)


def user(text: str) -> ChatMessage:
    return ChatMessage("user", text)


def plan(req: GenerationRequest, held: Held, runner: Runner):
    turn = read_turn(req, SYSTEM, runner)
    return turn, plan_turn(turn, held, runner, line_tokens=token_bound([turn.line]),
                           conversation_tokens=token_bound(conversation_texts(turn)))


# ---- request parsing and tool_choice ---------------------------------------------------------


def test_tools_are_checked_and_normalised():
    assert parse_tools(None) is None and parse_tools([]) is None
    assert parse_tools([{"function": {"name": "f", "description": None}}]) == [{"type": "function", "function": {"name": "f"}}]
    for bad, said in [("f", "must be a list"), ([{"type": "code"}], r"tools\[0\]: must be"), ([{"function": {"name": ""}}], "needs a name"),
                      ([{"function": {"name": "f", "parameters": "x"}}], "JSON schema object")]:
        with pytest.raises(BadRequest, match=said):
            parse_tools(bad)


def test_tool_choice_forms():
    tools = parse_tools([WEATHER, TIME])
    assert parse_tool_choice(None, tools) == ToolChoice()
    assert parse_tool_choice("none", tools) == ToolChoice("none")
    assert parse_tool_choice("required", tools) == ToolChoice("required")
    assert parse_tool_choice({"type": "function", "function": {"name": "get_time"}}, tools) == ToolChoice("required", "get_time")
    for bad, said in [("any", "must be"), ({"type": "function"}, "must be"), ("required", "has no tools")]:
        with pytest.raises(BadRequest, match=said):
            parse_tool_choice(bad, tools if said != "has no tools" else None)
    with pytest.raises(BadRequest, match="not among the tools"):
        parse_tool_choice({"function": {"name": "nope"}}, tools)


def test_what_the_model_is_given_for_each_choice():
    both = [WEATHER, TIME]
    assert tools_for_model(chat(user("x"), tools=both)) == both
    assert tools_for_model(chat(user("x"), tools=both, choice=ToolChoice("none"))) is None
    assert tools_for_model(chat(user("x"), tools=both, choice=ToolChoice("required", "get_time"))) == [TIME]
    assert choice_instruction(ToolChoice("required")) == "You must answer with a call of one of the functions."
    assert choice_instruction(ToolChoice("required", "get_time")) == "You must answer with a call of the function get_time."
    assert choice_instruction(ToolChoice()) is None


def test_upstream_messages_give_calls_ids_and_pair_tool_results():
    messages = [user("q"), ChatMessage("assistant", "", (PARIS, ToolCall("get_time", {}, "call_t"))),
                ChatMessage("tool", "12:00", tool_name="get_time"), ChatMessage("tool", "sunny")]
    out = upstream_messages(messages)
    assert out[1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_t", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}
    assert out[2] == {"role": "tool", "content": "12:00", "tool_call_id": "call_t", "name": "get_time"}  # by name
    assert out[3] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1_0"}  # the earliest unanswered


# ---- the stage -------------------------------------------------------------------------------


def test_the_stage_turns_text_into_calls_with_ids():
    stage = ToolStage(chat(user("x")))
    out = stage.feed(Chunk(content="Sure.\n<tool_", tokens=3)) + stage.feed(Chunk(content=CALL_TEXT[6:], tokens=3)) + stage.finish()
    assert [c.content for c in out if c.content] == ["Sure.\n"] and out[0].tokens == 3
    calls = [call for c in out for call in c.tool_calls]
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"})] and calls[0].id.startswith("call_")
    assert stage.satisfied and stage.warnings == []


def test_the_stage_passes_an_engines_own_calls_and_keeps_their_ids():
    stage = ToolStage(chat(user("x")))
    out = stage.feed(Chunk(tool_calls=(ToolCall("get_weather", {}, "call_up"),)))
    assert out == [Chunk(tool_calls=(ToolCall("get_weather", {}, "call_up"),))]


def test_thinking_passes_apart_from_calls():
    stage = ToolStage(chat(user("x")))
    out = stage.feed(Chunk(thinking="hmm", content=CALL_TEXT))
    assert out[0] == Chunk(thinking="hmm") and out[1].tool_calls and not out[1].thinking


def test_a_required_choice_holds_the_answer_until_its_call():
    stage = ToolStage(chat(user("x"), choice=ToolChoice("required")))
    assert stage.feed(Chunk(content="Let me see. ")) == []
    out = stage.feed(Chunk(content=CALL_TEXT))
    assert out[0].content == "Let me see. " and out[1].tool_calls[0].name == "get_weather"
    assert stage.feed(Chunk(content=" done")) == [Chunk(content="done")]


def answer_of(chunks_per_attempt: list[list[Chunk]], req: GenerationRequest):
    """answer_with_tools over a scripted engine: each attempt answers the next list."""
    seen: list[GenerationRequest] = []

    async def generate(attempt: GenerationRequest):
        seen.append(attempt)
        for chunk in chunks_per_attempt[len(seen) - 1]:
            yield chunk
        yield GenerationResult("stop")

    async def run():
        return [item async for item in answer_with_tools(req, generate)]

    return anyio.run(run), seen


def test_a_required_choice_without_a_call_is_asked_again_as_a_follow_up_turn():
    req = chat(user("x"), choice=ToolChoice("required"))
    items, seen = answer_of([[Chunk(content="No tools for me.")], [Chunk(content=CALL_TEXT)]], req)
    assert [c.tool_calls[0].name for c in items if isinstance(c, Chunk)] == ["get_weather"]
    assert isinstance(items[-1], GenerationResult)
    follow_up = seen[1].messages
    assert follow_up[:2] == [user("x"), ChatMessage("assistant", "No tools for me.")]
    assert follow_up[2].role == "user" and follow_up[2].content.startswith("Call one of the functions now.")


def test_a_required_choice_never_met_is_a_422():
    req = chat(user("x"), choice=ToolChoice("required", "get_weather"))
    call_of_another = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    with pytest.raises(ToolChoiceUnmet) as unmet:
        answer_of([[Chunk(content=call_of_another)], [Chunk(content="still no")]], req)
    assert unmet.value.status_code == 422
    assert unmet.value.message.startswith('tool_choice the function "get_weather" asks for a tool call') and "'still no'" in unmet.value.message


def test_malformed_calls_warn_in_the_final_record():
    items, _ = answer_of([[Chunk(content="<tool_call>{oops}</tool_call>")]], chat(user("x")))
    assert items[0].content == "<tool_call>{oops}</tool_call>"
    assert "not a valid call" in items[-1].warnings[0]


# ---- the card planner ------------------------------------------------------------------------


def test_a_tool_round_continues_the_held_conversation_with_its_results_as_the_turn():
    """The runner holds the call as the model wrote it; the client sends it back as tool_calls."""
    held = Held((user("weather?"), ChatMessage("assistant", CALL_TEXT)), SYSTEM, 1800, tools=[WEATHER])
    req = chat(user("weather?"), ChatMessage("assistant", "", (PARIS,)), ChatMessage("tool", "sunny", tool_name="get_weather"))
    turn, result = plan(req, held, TEMPLATE)
    assert continues(turn, held) and result.action is Action.PROMPT and not result.fresh
    assert result.line == escape_prompt_line(responses_text(["sunny"]))
    assert result.tokenizer_settings["turn"] == [{"role": "tool", "content": "sunny", "name": "get_weather"}]
    assert result.tokenizer_settings["tools"] == [WEATHER] and result.tools == [WEATHER]
    assert [m.role for m in result.conversation] == ["user", "assistant", "tool"]


def test_other_tools_or_another_call_mean_a_fresh_context():
    held = Held((user("weather?"), ChatMessage("assistant", CALL_TEXT)), SYSTEM, 1800, tools=[WEATHER])
    answered = [user("weather?"), ChatMessage("assistant", "", (PARIS,)), ChatMessage("tool", "sunny")]
    assert not continues(read_turn(chat(*answered, tools=[WEATHER, TIME]), SYSTEM, TEMPLATE), held)
    other = [user("weather?"), ChatMessage("assistant", "", (ToolCall("get_weather", {"city": "Rome"}),)), ChatMessage("tool", "sunny")]
    turn, result = plan(chat(*other), held, TEMPLATE)
    assert not continues(turn, held) and result.action is Action.RESET
    assert result.tokenizer_settings["history"] == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
    ]
    assert result.tokenizer_settings["system_prompt"] == SYSTEM


def test_tools_on_an_empty_context_without_them_need_a_reset():
    empty = Held((), SYSTEM, 2000)
    _, result = plan(chat(user("hi")), empty, TEMPLATE)
    assert result.action is Action.RESET and result.tokenizer_settings["tools"] == [WEATHER]
    _, same = plan(chat(user("hi")), Held((), SYSTEM, 2000, tools=[WEATHER]), TEMPLATE)
    assert same.action is Action.PROMPT


def test_a_required_choice_puts_its_instruction_in_the_system_prompt_or_the_line():
    req = chat(user("hi"), choice=ToolChoice("required"))
    _, ours = plan(req, Held((), SYSTEM, 2000), SYSTEM_FORM)
    assert ours.system == f"{SYSTEM}\n\nYou must answer with a call of one of the functions."
    assert ours.tokenizer_settings["system_prompt"] == ours.system
    turn, stock = plan(req, Held((), SYSTEM, 2000), STOCK)
    assert stock.line == (tools_block([WEATHER]) + "\n\nYou must answer with a call of one of the functions.\n\nhi").replace("\n", " ")


def test_warnings_say_where_the_definitions_went():
    assert read_turn(chat(user("x")), SYSTEM, TEMPLATE).warnings == ()
    assert "system prompt" in read_turn(chat(user("x")), SYSTEM, SYSTEM_FORM).warnings[0]
    assert "stock tokenizer script" in read_turn(chat(user("x")), SYSTEM, STOCK).warnings[0]
    assert read_turn(chat(user("x"), choice=ToolChoice("none")), SYSTEM, STOCK).warnings == ()


def test_a_stock_script_gets_the_definitions_in_the_first_line_only():
    turn, first = plan(chat(user("weather?")), Held((), SYSTEM, 2000), STOCK)
    assert first.line == (tools_block([WEATHER]) + "\n\nweather?").replace("\n", " ")
    assert first.conversation == (user("weather?"),) and first.tools == [WEATHER] and first.tokenizer_settings == {}
    held = Held(first.conversation + (ChatMessage("assistant", CALL_TEXT),), SYSTEM, 1800, tools=[WEATHER])
    req = chat(user("weather?"), ChatMessage("assistant", "", (PARIS,)), ChatMessage("tool", "sunny"))
    _, round_two = plan(req, held, STOCK)
    assert round_two.action is Action.PROMPT and round_two.line == "<tool_response> sunny </tool_response>"


def test_a_stock_script_gets_a_history_with_calls_flattened():
    req = chat(user("weather?"), ChatMessage("assistant", "", (PARIS,)), ChatMessage("tool", "sunny"), tools=())
    _, result = plan(req, Held((), SYSTEM, 2000), STOCK)
    assert result.line == ('user: weather?\nassistant: ' + CALL_TEXT + '\nuser: <tool_response>\nsunny\n</tool_response>').replace("\n", " ")


# ---- the text forms and the emulator ---------------------------------------------------------


def test_text_forms_of_calls_and_results():
    assert assistant_text("Sure.", [("f", {"a": 1})]) == 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    assert responses_text(["a", "b"]) == "<tool_response>\na\n</tool_response>\n<tool_response>\nb\n</tool_response>"
    assert as_text_messages([{"role": "tool", "content": "a"}, {"role": "tool", "content": "b"}, {"role": "user", "content": "c"}]) == [
        {"role": "user", "content": responses_text(["a", "b"])}, {"role": "user", "content": "c"}]


def test_the_scripted_emulator_answers_call_requests_with_calls():
    assert reply_text('call tool get_weather {"city": "Paris"}', 4, think=False) == CALL_TEXT
    two = reply_text('explain first: call tool a {} then call bare tool b {"x": [1]}', 4, think=False)
    assert two == 'I will call a, b.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n{"name": "b", "arguments": {"x": [1]}}'
    assert reply_text("call broken tool f", 0, think=False) == '<tool_call>\n{"name": "f", "arguments": {\n</tool_call>'
    # A request inside a JSON string (a tool result asking for the next call), escaped for the runner's line.
    nested = escape_prompt_line(json.dumps({"data": 'call tool HassTurnOn {"name": "Kitchen"}'}))
    assert requested_calls(nested) == [("tagged", "HassTurnOn", {"name": "Kitchen"})]
    assert reply_text("no request here", 2, think=False).startswith("You said: no request here.")
    assert reply_text("call tool f", 0, think=True).endswith('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>')
