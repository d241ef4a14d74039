"""The tool-call recogniser (llm_service/tool_calls.py) on its own: every answer is fed whole,
byte by byte and split at every position, and must give the same text and calls each way."""
from __future__ import annotations

import pytest

from llm_service.engines.base import ToolCall
from llm_service.tool_calls import ToolCallParser, parse_calls, split_calls

TOOLS = ("get_weather", "HassTurnOn")


def feed_all(pieces: list[str], tools=TOOLS) -> tuple[str, list[ToolCall], list[str], list]:
    parser = ToolCallParser(tools)
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.flush()
    text = "".join(e for e in events if isinstance(e, str))
    return text, [e for e in events if isinstance(e, ToolCall)], parser.warnings, events


def every_split(answer: str, tools=TOOLS) -> tuple[str, list[ToolCall], list[str]]:
    """The result of the whole answer, checked to be the same byte by byte and at every split."""
    text, calls, warnings, _ = feed_all([answer], tools)
    assert feed_all(list(answer), tools)[:3] == (text, calls, warnings)
    for cut in range(1, len(answer)):
        assert feed_all([answer[:cut], answer[cut:]], tools)[:3] == (text, calls, warnings), f"split at {cut}"
    return text, calls, warnings


def call(tool: str, **arguments) -> ToolCall:
    return ToolCall(tool, arguments)


@pytest.mark.parametrize(("answer", "text", "calls"), [
    # Qwen's own form, with the newlines its template writes
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "", [call("get_weather", city="Paris")]),
    # text before and after; the blanks right after a call are layout
    ('Sure.\n<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>\n  Done.', "Sure.\nDone.", [call("get_weather")]),
    # several blocks, and several objects in one block
    ('<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n<tool_call>{"name": "b", "arguments": {}}</tool_call>',
     "", [call("a", x=1), call("b")]),
    ('<tool_call>\n{"name": "a", "arguments": {}}\n{"name": "b", "arguments": {}}\n</tool_call>', "", [call("a"), call("b")]),
    # a closing tag inside a JSON string is data
    ('<tool_call>{"name": "a", "arguments": {"t": "</tool_call>"}}</tool_call>', "", [call("a", t="</tool_call>")]),
    # arguments as a JSON string, `parameters`, OpenAI's nesting, no arguments at all (tagged)
    ('<tool_call>{"name": "a", "arguments": "{\\"n\\": 2}"}</tool_call>', "", [call("a", n=2)]),
    ('<tool_call>{"type": "function", "function": {"name": "a", "parameters": {"n": 3}}}</tool_call>', "", [call("a", n=3)]),
    ('<tool_call>{"name": "a"}</tool_call>', "", [call("a")]),
    # a block the answer ends in without its closing tag counts when its JSON is complete
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n', "", [call("get_weather", city="Oslo")]),
    # bare JSON at the start, at a line's start, in a fence, in a list, `parameters` (Llama 3.2)
    ('{"name": "get_weather", "arguments": {"city": "Rome"}}', "", [call("get_weather", city="Rome")]),
    ('  \n{"name": "HassTurnOn", "parameters": {"name": "kitchen"}}', "", [call("HassTurnOn", name="kitchen")]),
    ('Turning it on.\n{"name": "HassTurnOn", "arguments": {}}\nok', "Turning it on.\nok", [call("HassTurnOn")]),
    ('```json\n{"name": "HassTurnOn", "arguments": {"area": "hall"}}\n```', "", [call("HassTurnOn", area="hall")]),
    ('[{"name": "HassTurnOn", "arguments": {}}, {"name": "get_weather", "arguments": {}}]', "",
     [call("HassTurnOn"), call("get_weather")]),
    ('{"name": "HassTurnOn", "arguments": {"a": "}"}}\n{"name": "HassTurnOn", "arguments": {}}', "",
     [call("HassTurnOn", a="}"), call("HassTurnOn")]),
])
def test_calls_are_found_however_the_answer_is_cut(answer, text, calls):
    assert every_split(answer) == (text, calls, [])


@pytest.mark.parametrize("answer", [
    "Plain text, no call at all.",
    "a < b, and <tool_ca is not a tag",
    '{"name": "Bob", "arguments": {}}',  # bare, but no tool of the request is named Bob
    '{"city": "Paris", "temperature": 21}',  # a JSON answer: its first key shows it is no call
    'text first {"name": "get_weather", "arguments": {}}',  # bare only at a line's start
    "```python\nprint(1)\n```",
    "  \n\n",
    '[1, 2, 3]',
])
def test_text_that_is_no_call_comes_back_unchanged(answer):
    assert every_split(answer) == (answer, [], [])


@pytest.mark.parametrize(("answer", "what"), [
    ('<tool_call>\n{"name": "get_weather", "arguments": {\n</tool_call>', "not a valid call"),
    ('<tool_call>not json at all</tool_call> after', "not a valid call"),
    ('<tool_call>{"arguments": {}}</tool_call>', "not a valid call"),  # no name
    ('<tool_call>{"name": "a", "arguments": {"x": 1', "unclosed"),
    ('{"name": "get_weather", "arguments": {"city": "Par', "unfinished"),
])
def test_a_malformed_call_is_text_with_a_warning(answer, what):
    text, calls, warnings = every_split(answer)
    assert text == answer and calls == []
    assert len(warnings) == 1 and what in warnings[0] and "returned as text" in warnings[0]


def test_text_streams_before_a_call_and_the_call_waits_until_it_is_complete():
    parser = ToolCallParser(TOOLS)
    assert parser.feed("Let me check. ") == ["Let me check. "]
    assert parser.feed("<tool") == []  # maybe a tag: held
    assert parser.feed('_call>{"name": "get_weather", ') == []
    assert parser.feed('"arguments": {"city": "Paris"}}') == []
    assert parser.feed("</tool_call>") == [call("get_weather", city="Paris")]
    assert parser.feed(" Anything else?") == ["Anything else?"]
    assert parser.flush() == [] and parser.calls == 1


def test_a_json_answer_streams_once_its_first_key_shows_it_is_no_call():
    parser = ToolCallParser(TOOLS)
    assert parser.feed('{"tem') == []
    assert parser.feed('perature": 21') == ['{"temperature": 21']
    assert parser.feed(', "unit": "C"}') == [', "unit": "C"}']


def test_events_keep_their_order():
    _, _, _, events = feed_all(['A\n<tool_call>{"name": "a", "arguments": {}}</tool_call>B<tool_call>{"name": "b"}</tool_call>'])
    assert events == ["A\n", call("a"), "B", call("b")]


def test_without_tool_names_any_bare_name_counts_and_bare_can_be_off():
    assert split_calls('{"name": "anything", "arguments": {}}') == ("", [call("anything")])
    parser = ToolCallParser(TOOLS, bare=False)
    assert parser.feed('{"name": "get_weather", "arguments": {}}') + parser.flush() == ['{"name": "get_weather", "arguments": {}}']


def test_parse_calls_of_a_block_and_of_a_bare_candidate():
    assert parse_calls('{"name": "a", "arguments": {}}; {"name": "b", "arguments": {}}', tagged=True) == [call("a"), call("b")]
    assert parse_calls('{"name": "a"}', tagged=False) is None  # bare needs arguments
    assert parse_calls('{"name": "a", "arguments": [1]}', tagged=True) is None  # arguments must be an object
    assert parse_calls('{"name": "a", "arguments": "not json"}', tagged=True) is None
    assert parse_calls("", tagged=True) is None
