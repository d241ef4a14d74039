"""Tools end to end (issue 13, section 1): the real daemon with scripted card models and a fake
OpenAI-compatible upstream, driven as the apps drive it — Home Assistant's Assist loop with the
`ollama` client, Continue's agent request, LangChain's `bind_tools` on both APIs, the OpenAI
client with `tool_choice`. The scripted emulator answers `call tool NAME {json}` in its line with
that call (ax_emulator/scripted.py), so every answer is known exactly.

Models: `echo` (SmolLM2's template, which knows no tools: the tokenizer server writes them in
the system prompt), `qwen` (Qwen2.5's template, which renders them itself), `stock` (a stock
tokenizer script: the definitions go into the prompt line), `plain-b` (a runner without reset),
`fake-remote` (an upstream that
answers with OpenAI's tool_calls deltas, or with the call written as text).
"""
from __future__ import annotations

import json
from typing import Any

import anyio
import ollama
import openai
import pytest
from tokenizers import Tokenizer

from ax_emulator.scripted import reply_text
from harness.daemon import running_daemon
from harness.models import scripted_model, tools_tokenizer
from harness.paths import TOKENIZER_DIR
from tokenizer_service.prompt_escape import escape_prompt_line
from tokenizer_service.tool_prompt import responses_text
from upstream_support import FakeUpstream

WORDS = 6
TEMPLATE_WARNING = ("tools: this model's chat template does not render tool definitions; they are in its system prompt, "
                    "in the Hermes/Qwen form (<tools>…</tools>, calls as <tool_call>…</tool_call>)")
STOCK_WARNING = ("tools: the stock tokenizer script cannot take tool definitions; they are written into the prompt line, "
                 "in the Hermes/Qwen form (<tools>…</tools>, calls as <tool_call>…</tool_call>)")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    upstream = FakeUpstream(tmp_path_factory.mktemp("tools-upstream")).start()
    yield upstream
    upstream.stop()


@pytest.fixture
def fake_defaults(fake):
    yield fake
    fake.configure(tools_reply="deltas", tool_arguments={}, text_before_call="")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, fake):
    root = tmp_path_factory.mktemp("tools")
    entries = [
        scripted_model(root, "echo", reply_words=WORDS),
        scripted_model(root, "qwen", reply_words=WORDS, tokenizer_dir=tools_tokenizer(root / "tokenizers" / "qwen")),
        scripted_model(root, "stock", reply_words=WORDS, stock_tokenizer=True),
        # A B runner without `reset`: a context opened with tools costs a restart, once.
        scripted_model(root, "plain-b", dialect="b", reply_words=WORDS),
        scripted_model(root, "thinker", reply_words=WORDS, think=True),
        {"model_name": "fake-remote", "engine": "openai-http", "base_url": fake.base_url + "/v1",
         "upstream_model": "fake-upstream-model", "retries": "0"},
    ]
    with running_daemon(root, entries) as d:
        yield d


def tool_round_line(contents: list[str], model: str) -> str:
    """The line a runner reads in a tool round: the results as `<tool_response>`s; our tokenizer
    server escapes its newlines, a stock script gets spaces."""
    text = responses_text(contents)
    return text.replace("\n", " ") if model == "stock" else escape_prompt_line(text)


def echo(line: str) -> str:
    return reply_text(line, WORDS, think=False)


def turn_tokens(text: str) -> int:
    return len(Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json")).encode(text, add_special_tokens=False).ids)


def transitions(daemon, model: str) -> list[str]:
    return [t["reason"] for t in daemon.get(f"/api/status_history/{model}")["history"]]


def wire_post(daemon, path: str, body: dict[str, Any]) -> dict[str, Any]:
    with daemon.client() as http:
        reply = http.post(path, json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def wire_stream(daemon, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The objects of a streamed answer (NDJSON, or SSE without [DONE])."""
    with daemon.client() as http, http.stream("POST", path, json=body) as reply:
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line]
    if path.startswith("/v1"):
        assert lines[-1] == "data: [DONE]"
        return [json.loads(line[len("data: "):]) for line in lines[:-1]]
    return [json.loads(line) for line in lines]


# ---- Home Assistant's Assist -----------------------------------------------------------------
# homeassistant/components/ollama/entity.py: the intent tools in Ollama's form, the chat log as
# ollama.Message objects, client.chat(stream=True, keep_alive=-1, options={"num_ctx": 8192})
# in a loop of at most 10 rounds that ends when no tool result is left unanswered.

HA_MAX_TOOL_ITERATIONS = 10
HA_SYSTEM = (
    "You are a voice assistant for Home Assistant.\nAnswer questions about the world truthfully.\n"
    "Answer in plain text. Keep it simple and to the point.\n"
    "When controlling Home Assistant always call the intent tools. Use HassTurnOn to lock and HassTurnOff to "
    "unlock a lock. When controlling a device, prefer passing just name and domain. When controlling an area, "
    "prefer passing just area name and domain.\nYou ARE equipped to answer questions about the current state of "
    "the home using the `GetLiveContext` tool. This is a primary function. Do not state you lack the functionality "
    "if the question requires live data.\nCurrent time is 08:15:00. Today's date is 2026-03-14."
)
_TARGET = {
    "name": {"type": "string"}, "area": {"type": "string"}, "floor": {"type": "string"},
    "domain": {"type": "array", "items": {"type": "string", "enum": ["fan", "light", "switch"]}},
    "device_class": {"type": "array", "items": {"type": "string", "enum": ["outlet", "switch"]}},
}
HA_TOOLS = [
    {"type": "function", "function": {"name": "HassTurnOn", "parameters": {"type": "object", "properties": _TARGET, "required": []},
                                      "description": "Turns on/opens/presses a device or entity. For locks, this performs a 'lock' action."}},
    {"type": "function", "function": {"name": "HassTurnOff", "parameters": {"type": "object", "properties": _TARGET, "required": []},
                                      "description": "Turns off/closes a device or entity. For locks, this performs an 'unlock' action."}},
    {"type": "function", "function": {"name": "HassLightSet", "description": "Sets the brightness percentage or color of a light",
                                      "parameters": {"type": "object", "properties": {
                                          **_TARGET, "brightness": {"type": "integer", "minimum": 0, "maximum": 100},
                                          "color": {"type": "string"}}, "required": []}}},
    {"type": "function", "function": {"name": "GetLiveContext", "parameters": {"type": "object", "properties": {}, "required": []},
                                      "description": "Provides real-time information about the CURRENT state, value, or mode of "
                                                     "devices, sensors, entities, or areas."}},
]


class FakeHome:
    """The tools HA would run, on a home of one light."""

    def __init__(self, live_context_note: str = "") -> None:
        self.light_on = False
        self.note = live_context_note
        self.ran: list[tuple[str, dict]] = []

    def run(self, name: str, args: dict) -> dict:
        self.ran.append((name, args))
        if name == "GetLiveContext":
            state = "on" if self.light_on else "off"
            return {"success": True, "result": f"Live Context: - names: Kitchen Light\n  domain: light\n  state: '{state}'\n{self.note}"}
        if name == "HassTurnOn" and args.get("name") == "Kitchen Light":
            self.light_on = True
            return {"speech": {}, "response_type": "action_done", "speech_slots": {},
                    "data": {"targets": [], "success": [{"name": "Kitchen Light", "type": "entity", "id": "light.kitchen"}], "failed": []}}
        return {"error": "MatchFailedError", "error_text": f"no device for {name} {args}"}


def _ha_args(arguments: dict) -> dict:
    """entity._parse_tool_args: JSON strings repaired, empty values dropped."""
    out = {}
    for key, value in arguments.items():
        if value is None or value == "":
            continue
        if isinstance(value, str) and value[:1] + value[-1:] in ("[]", "{}"):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    return out


async def ha_assist(url: str, model: str, text: str, home: FakeHome) -> tuple[list[ollama.Message], list[ollama.ChatResponse]]:
    """One Assist turn as HA's Ollama conversation agent runs it; returns the chat log and the
    last chunk (done) of each round."""
    client = ollama.AsyncClient(host=url)
    messages = [ollama.Message(role="system", content=HA_SYSTEM), ollama.Message(role="user", content=text)]
    finals = []
    for _ in range(HA_MAX_TOOL_ITERATIONS):
        stream = await client.chat(model=model, messages=list(messages), tools=HA_TOOLS, stream=True,
                                   keep_alive=-1, options={"num_ctx": 8192})
        content, thinking, calls = "", "", []
        async for response in stream:
            message = response["message"]
            if (tool_calls := message.get("tool_calls")) is not None:
                calls += [(c["function"]["name"], _ha_args(c["function"]["arguments"])) for c in tool_calls]
            content += message.get("content") or ""
            thinking += message.get("thinking") or ""
            if response.get("done"):
                finals.append(response)
        messages.append(ollama.Message(
            role="assistant", content=content, thinking=thinking or None,
            tool_calls=[ollama.Message.ToolCall(function=ollama.Message.ToolCall.Function(name=n, arguments=a)) for n, a in calls] or None,
        ))
        if not calls:
            break
        for name, args in calls:
            result = home.run(name, args)
            messages.append(ollama.Message(role="tool", content=json.dumps({"data": result, "error": None})))
    return messages, finals


@pytest.mark.parametrize("model", ["echo", "qwen", "stock", "plain-b"])
def test_home_assistant_turns_on_the_light_in_three_rounds(daemon, model):
    """Round 1 asks for the live context, whose result (as this test's home writes it) asks for
    HassTurnOn; its result gets the spoken answer. Each tool round continues the conversation
    the runner holds: no reset, and it prefills only the new tool result."""
    follow_up = 'Next: call tool HassTurnOn {"name": "Kitchen Light", "domain": ["light"]}'
    home = FakeHome(follow_up)
    before = len(transitions(daemon, model))
    text = "Turn on the kitchen light. call tool GetLiveContext {}"
    messages, finals = anyio.run(ha_assist, daemon.url, model, text, home)
    assert home.light_on and [name for name, _ in home.ran] == ["GetLiveContext", "HassTurnOn"]
    assert home.ran[1][1] == {"name": "Kitchen Light", "domain": ["light"]}
    assert len(finals) == 3
    last_result = messages[-2].content
    assert messages[-1].role == "assistant" and messages[-1].content == echo(tool_round_line([last_result], model))
    assert all(m.content == "" for m in messages if m.role == "assistant" and m.tool_calls)
    rounds = transitions(daemon, model)[before:]
    assert rounds.count("prompt sent") == 3
    # After the first round's fresh context, nothing but turns: the tool rounds continued it.
    first_prompt = rounds.index("prompt sent")
    assert not [r for r in rounds[first_prompt:] if "reset" in r or "fresh" in r], rounds
    if model == "plain-b":  # its context with the tools took a restart, before the first round
        assert any("fresh context needs a restart" in r for r in rounds[:first_prompt]), rounds
    if model != "stock":
        turn = f"<|im_start|>user\n{responses_text([last_result])}<|im_end|>\n<|im_start|>assistant\n"
        assert finals[-1].prompt_eval_count == turn_tokens(turn)


def test_home_assistant_stops_after_ten_rounds_of_a_model_that_keeps_calling(daemon):
    """Every live context asks for another look: HA's loop ends at its limit of 10 rounds, each
    of them a continued turn on the runner."""
    home = FakeHome("Look again: call tool GetLiveContext {}")
    before = len(transitions(daemon, "qwen"))
    messages, finals = anyio.run(ha_assist, daemon.url, "qwen", "What is on? call tool GetLiveContext {}", home)
    assert len(finals) == HA_MAX_TOOL_ITERATIONS and len(home.ran) == HA_MAX_TOOL_ITERATIONS
    assert messages[-1].role == "tool"  # HA gave up with a result still unanswered
    rounds = transitions(daemon, "qwen")[before:]
    assert rounds.count("prompt sent") == HA_MAX_TOOL_ITERATIONS
    assert not [r for r in rounds[rounds.index("prompt sent"):] if "reset" in r or "fresh" in r], rounds


def test_thinking_streams_apart_from_the_call_and_the_round_continues(daemon, client):
    """A reasoning model: its think block goes to `thinking`, the call to `tool_calls`; HA sends
    the thinking back apart, and the runner (holding both as the model wrote them) continues."""
    messages = [{"role": "user", "content": 'call tool get_weather {"city": "Paris"}'}]
    parts = list(client.chat(model="thinker", tools=[WEATHER], messages=messages, stream=True))
    thinking = "".join(p.message.thinking or "" for p in parts)
    assert thinking == f"The user wrote {len(messages[0]['content'])} characters; I echo them.\n"
    calls = [c for p in parts for c in p.message.tool_calls or ()]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert "".join(p.message.content or "" for p in parts) == ""
    before = len(transitions(daemon, "thinker"))
    messages += [{"role": "assistant", "content": "", "thinking": thinking,
                  "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                 {"role": "tool", "content": "sunny"}]
    second = client.chat(model="thinker", tools=[WEATHER], messages=messages)
    assert second.message.content.startswith("You said: <tool_response>")
    assert transitions(daemon, "thinker")[before:] == ["prompt sent", "first text from the runner", "turn over"]


def test_home_assistant_through_an_upstream_gets_its_tool_calls_deltas(daemon, fake_defaults):
    fake_defaults.configure(tool_arguments={"name": "Kitchen Light", "domain": ["light"]})
    home = FakeHome()
    messages, finals = anyio.run(ha_assist, daemon.url, "fake-remote", "Turn on the kitchen light", home)
    assert home.light_on and home.ran == [("HassTurnOn", {"name": "Kitchen Light", "domain": ["light"]})]
    assert messages[-1].content == f"result[{messages[-2].content}]" and len(finals) == 2
    sent = fake_defaults.records()["chat_requests"][-1]["body"]
    # The tools as the ollama client sends them (its model of a schema keeps fewer keywords).
    assert [t["function"]["name"] for t in sent["tools"]] == [t["function"]["name"] for t in HA_TOOLS]
    assert sent["tools"][0] == HA_TOOLS[0] and "tool_choice" not in sent
    assistant, result = sent["messages"][-2:]
    # HA sends no ids back: the daemon pairs the tool result with the call it answers.
    assert assistant["tool_calls"][0]["function"] == {"name": "HassTurnOn", "arguments": '{"name": "Kitchen Light", "domain": ["light"]}'}
    assert result == {"role": "tool", "content": messages[-2].content, "tool_call_id": assistant["tool_calls"][0]["id"]}


def test_home_assistant_gets_the_warning_num_ctx_and_tools_in_the_system_prompt(daemon):
    body = {"model": "echo", "stream": False, "keep_alive": -1, "options": {"num_ctx": 8192}, "tools": HA_TOOLS,
            "messages": [{"role": "system", "content": HA_SYSTEM}, {"role": "user", "content": "call tool GetLiveContext {}"}]}
    answer = wire_post(daemon, "/api/chat", body)
    assert answer["message"]["tool_calls"][0]["function"] == {"index": 0, "name": "GetLiveContext", "arguments": {}}
    assert answer["message"]["tool_calls"][0]["id"].startswith("call_")
    assert TEMPLATE_WARNING in answer["warnings"] and any(w.startswith("num_ctx 8192") for w in answer["warnings"])
    qwen = wire_post(daemon, "/api/chat", {**body, "model": "qwen"})
    assert not any(w.startswith("tools:") for w in qwen.get("warnings", []))
    stock = wire_post(daemon, "/api/chat", {**body, "model": "stock"})
    assert STOCK_WARNING in stock["warnings"]


# ---- the wire: streaming, forms, malformed calls --------------------------------------------


def test_ollama_streams_text_before_a_call_and_the_call_as_one_chunk(daemon):
    line = 'explain first call tool get_weather {"city": "Paris"} call tool get_time {"city": "Paris"}'
    objects = wire_stream(daemon, "/api/chat", {"model": "qwen", "tools": [WEATHER, TIME],
                                                "messages": [{"role": "user", "content": line}]})
    with_calls = [o for o in objects if o["message"].get("tool_calls")]
    text = "".join(o["message"]["content"] for o in objects)
    assert text == "I will call get_weather, get_time.\n"
    assert objects.index(with_calls[0]) > 0 and objects[0]["message"]["content"]  # the text came first
    calls = [c for o in with_calls for c in o["message"]["tool_calls"]]
    assert [c["function"] for c in calls] == [
        {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}},
        {"index": 1, "name": "get_time", "arguments": {"city": "Paris"}},
    ]
    assert len({c["id"] for c in calls}) == 2
    assert objects[-1]["done"] is True and objects[-1]["done_reason"] == "stop"


def test_openai_streams_tool_call_deltas_and_finishes_with_tool_calls(daemon, oai):
    line = 'call tool get_weather {"city": "Oslo"}'
    chunks = wire_stream(daemon, "/v1/chat/completions", {"model": "echo", "stream": True, "tools": [WEATHER],
                                                          "messages": [{"role": "user", "content": line}]})
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert len(calls) == 1 and len(calls[0]) == 1
    call = calls[0][0]
    assert call["index"] == 0 and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["warnings"] == [TEMPLATE_WARNING]
    # The openai client puts the deltas together.
    stream = oai.chat.completions.create(model="echo", messages=[{"role": "user", "content": line}], tools=[WEATHER], stream=True)
    with stream:
        parts = list(stream)
    assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == "tool_calls"
    streamed = [tc for p in parts if p.choices and p.choices[0].delta.tool_calls for tc in p.choices[0].delta.tool_calls]
    assert streamed[0].function.name == "get_weather" and json.loads(streamed[0].function.arguments) == {"city": "Oslo"}


@pytest.mark.parametrize("model", ["echo", "stock"])
def test_a_bare_json_call_is_recognised_as_small_models_write_it(client, model):
    answer = client.chat(model=model, tools=[WEATHER], messages=[{"role": "user", "content": 'call bare tool get_weather {"city": "Rome"}'}])
    assert answer.message.content == ""
    assert [(c.function.name, dict(c.function.arguments)) for c in answer.message.tool_calls] == [("get_weather", {"city": "Rome"})]


def test_a_malformed_call_comes_back_as_text_with_a_warning(daemon, client, oai):
    body = {"model": "echo", "tools": [WEATHER], "messages": [{"role": "user", "content": "call broken tool get_weather"}]}
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {\n</tool_call>'
    answer = wire_post(daemon, "/api/chat", {**body, "stream": False})
    assert answer["message"] == {"role": "assistant", "content": broken}
    assert any("not a valid call" in w and "returned as text" in w for w in answer["warnings"])
    streamed = wire_stream(daemon, "/api/chat", body)
    assert "".join(o["message"]["content"] for o in streamed) == broken and not any(o["message"].get("tool_calls") for o in streamed)
    completion = oai.chat.completions.create(model="echo", tools=[WEATHER], messages=body["messages"])
    assert completion.choices[0].message.content == broken and completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.tool_calls is None


def test_without_tools_a_call_written_by_the_model_is_plain_text(client):
    line = 'call tool get_weather {"city": "Paris"}'
    answer = client.chat(model="echo", messages=[{"role": "user", "content": line}])
    assert answer.message.content == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert not answer.message.tool_calls


def test_a_tool_result_as_the_last_message_continues_the_conversation(daemon, client):
    """Round 2 sends the call back as `tool_calls` (Ollama's form) and the result: the runner
    holds the call as the model wrote it, so the round is one line, with no reset."""
    messages = [{"role": "user", "content": 'weather in Paris? call tool get_weather {"city": "Paris"}'}]
    first = client.chat(model="echo", tools=[WEATHER], messages=messages)
    before = len(transitions(daemon, "echo"))
    result = '{"temperature": 21, "sky": "clear"}'
    messages += [first.message.model_dump(exclude_none=True), {"role": "tool", "content": result, "tool_name": "get_weather"}]
    second = client.chat(model="echo", tools=[WEATHER], messages=messages)
    assert second.message.content == echo(tool_round_line([result], "echo"))
    assert transitions(daemon, "echo")[before:] == ["prompt sent", "first text from the runner", "turn over"]
    turn = f"<|im_start|>user\n{responses_text([result])}<|im_end|>\n<|im_start|>assistant\n"
    assert second.prompt_eval_count == turn_tokens(turn)


def test_several_tool_results_are_one_round(client):
    line = 'call tool get_weather {"city": "Paris"} call tool get_time {"city": "Paris"}'
    messages = [{"role": "user", "content": line}]
    first = client.chat(model="qwen", tools=[WEATHER, TIME], messages=messages)
    assert [c.function.name for c in first.message.tool_calls] == ["get_weather", "get_time"]
    results = ['{"temperature": 21}', '{"time": "08:15"}']
    messages += [first.message.model_dump(exclude_none=True)] + [{"role": "tool", "content": r} for r in results]
    second = client.chat(model="qwen", tools=[WEATHER, TIME], messages=messages)
    assert second.message.content == echo(tool_round_line(results, "qwen"))


def test_a_history_with_tool_calls_opens_a_fresh_context_the_template_renders(daemon, client):
    """A conversation the runner does not hold: the history (calls and results) goes to the
    tokenizer server, whose template renders it; the line is the last round's results."""
    result = '{"temperature": 3}'
    history = [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": result},
    ]
    for model in ("qwen", "echo", "stock"):
        answer = client.chat(model=model, tools=[WEATHER], messages=history)
        if model == "stock":  # the history flattened into the line, after the definitions
            assert answer.message.content.startswith("You said: # Tools ")
            assert ' user: weather in Oslo? assistant: user: <tool_response> {"temperature": 3} </tool_response>.' \
                in answer.message.content
            # The echo repeats the earlier call as the line wrote it, which is recognised as a call.
            assert [c.function.name for c in answer.message.tool_calls] == ["get_weather"]
        else:
            assert answer.message.content == echo(tool_round_line([result], model))


def test_show_lists_tools_for_models_whose_template_or_upstream_takes_them(client):
    assert "tools" in client.show("qwen").capabilities
    assert "tools" in client.show("fake-remote").capabilities
    assert "tools" not in client.show("echo").capabilities
    assert "tools" not in client.show("stock").capabilities


def test_bad_tools_and_tool_messages_are_400s(daemon):
    with daemon.client() as http:
        for body, said in [
            ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "needs a name"),
            ({"tools": "get_weather"}, "tools: Input should be a valid list"),
            ({"messages": [{"role": "user", "content": "x"},
                           {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]},
                           {"role": "tool", "content": "r"}]}, "tool_calls[0]"),
            ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, '"user" or "tool"'),
            ({"messages": [{"role": "user", "content": "x"},
                           {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f\ud800", "arguments": {}}}]},
                           {"role": "tool", "content": "r"}]}, "invalid text"),
        ]:
            body = {"model": "echo", "messages": [{"role": "user", "content": "x"}], **body}
            reply = http.post("/api/chat", content=json.dumps(body))  # \ud800 escaped: valid JSON, no text
            assert reply.status_code == 400 and said in reply.json()["error"], (body, reply.text)
        reply = http.post("/v1/chat/completions", json={"model": "echo", "tool_choice": "required",
                                                        "messages": [{"role": "user", "content": "x"}]})
        assert reply.status_code == 400 and "has no tools" in reply.json()["error"]["message"]
        reply = http.post("/v1/chat/completions", json={"model": "echo", "tools": [WEATHER],
                                                        "tool_choice": {"type": "function", "function": {"name": "nope"}},
                                                        "messages": [{"role": "user", "content": "x"}]})
        assert reply.status_code == 400 and "not among the tools" in reply.json()["error"]["message"]


# ---- Continue's agent mode -------------------------------------------------------------------
# core/llm/llms/Ollama.ts: tools only with a user message last, and then `stream: false`; the
# calls come back with their arguments JSON.stringify'd; the next request carries the tool
# result (role "tool") and the assistant message without its calls.


@pytest.mark.parametrize("model", ["qwen", "fake-remote"])
def test_continue_agent_mode_calls_a_tool_and_answers_with_its_result(daemon, fake_defaults, model):
    fake_defaults.configure(tool_arguments={"filepath": "README.md"})
    tools = [{"type": "function", "function": {"name": "read_file", "description": "Use this tool to read a file",
                                               "parameters": {"type": "object", "required": ["filepath"],
                                                              "properties": {"filepath": {"type": "string"}}}}}]
    options = {"num_ctx": 2048, "num_predict": 512, "stop": ["<|im_end|>"]}
    messages = [{"role": "system", "content": "You are an agent in the user's IDE."},
                {"role": "user", "content": 'What is in README.md? call tool read_file {"filepath": "README.md"}'}]
    first = wire_post(daemon, "/api/chat", {"model": model, "messages": messages, "options": options,
                                            "keep_alive": 1800, "stream": False, "tools": tools})
    call = first["message"]["tool_calls"][0]["function"]
    assert call["name"] == "read_file" and json.dumps(call["arguments"]) == '{"filepath": "README.md"}'
    result = "# axm1-llm\nTurns an edge box into an LLM server."
    messages += [{"role": "assistant", "content": first["message"]["content"]}, {"role": "tool", "content": result}]
    objects = wire_stream(daemon, "/api/chat", {"model": model, "messages": messages, "options": options, "keep_alive": 1800})
    # No tools in this round (Continue sends them only with a user message last): the upstream
    # answers with its usual words.
    expected = "w1 w2 w3 w4 w5 " if model == "fake-remote" else echo(tool_round_line([result], model))
    assert "".join(o["message"]["content"] for o in objects) == expected


# ---- LangChain bind_tools --------------------------------------------------------------------


def _weather_tool():
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city now."""
        return json.dumps({"city": city, "temperature": 21})

    return get_weather


@pytest.mark.parametrize("model", ["qwen", "echo", "fake-remote"])
def test_langchain_chat_ollama_bind_tools(daemon, fake_defaults, model):
    from langchain_core.messages import HumanMessage
    from langchain_ollama import ChatOllama

    fake_defaults.configure(tool_arguments={"city": "Paris"})
    weather = _weather_tool()
    llm = ChatOllama(model=model, base_url=daemon.url).bind_tools([weather])
    messages = [HumanMessage('How warm is it in Paris? call tool get_weather {"city": "Paris"}')]
    reply = llm.invoke(messages)
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("get_weather", {"city": "Paris"})]
    messages += [reply, weather.invoke(reply.tool_calls[0])]
    final = llm.invoke(messages)
    expected = f"result[{messages[-1].content}]" if model == "fake-remote" else echo(tool_round_line([messages[-1].content], model))
    assert final.content == expected and not final.tool_calls


@pytest.mark.parametrize("model", ["qwen", "fake-remote"])
def test_langchain_chat_openai_bind_tools(daemon, fake_defaults, model):
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    fake_defaults.configure(tool_arguments={"city": "Paris"})
    weather = _weather_tool()
    llm = ChatOpenAI(model=model, base_url=daemon.url + "/v1", api_key="unused", max_retries=0).bind_tools([weather])
    messages = [HumanMessage('How warm is it in Paris? call tool get_weather {"city": "Paris"}')]
    reply = llm.invoke(messages)
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    messages += [reply, weather.invoke(reply.tool_calls[0])]
    final = llm.invoke(messages)
    expected = f"result[{messages[-1].content}]" if model == "fake-remote" else echo(tool_round_line([messages[-1].content], model))
    assert final.content == expected and not final.tool_calls
    if model == "fake-remote":
        sent = fake_defaults.records()["chat_requests"][-1]["body"]["messages"]
        assert sent[-1]["role"] == "tool" and sent[-1]["tool_call_id"] == reply.tool_calls[0]["id"] == "call_fake_1"


# ---- the OpenAI client and tool_choice -------------------------------------------------------


@pytest.mark.parametrize("model", ["qwen", "fake-remote"])
def test_openai_tool_choice_required_gets_a_call(oai, fake_defaults, model):
    fake_defaults.configure(tool_arguments={"city": "Rome"})
    completion = oai.chat.completions.create(
        model=model, tools=[TIME, WEATHER], tool_choice="required",
        messages=[{"role": "user", "content": 'Time in Rome? call tool get_time {"city": "Rome"}'}])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [("get_time", {"city": "Rome"})]
    assert choice.message.tool_calls[0].id.startswith("call_") and choice.message.tool_calls[0].type == "function"
    if model == "fake-remote":  # the upstream applies tool_choice itself
        assert fake_defaults.records()["chat_requests"][-1]["body"]["tool_choice"] == "required"


def test_openai_tool_choice_required_without_a_call_is_asked_again_then_a_422(daemon, oai):
    """The answer held no call: the daemon asks once more, in the same conversation (one more
    line, no reset), then fails with what the model said."""
    before = len(transitions(daemon, "echo"))
    with pytest.raises(openai.UnprocessableEntityError) as unmet:
        oai.chat.completions.create(model="echo", tools=[WEATHER], tool_choice="required",
                                    messages=[{"role": "user", "content": "just chat"}])
    message = unmet.value.body["message"]
    assert message.startswith('tool_choice "required" asks for a tool call, and the model answered without one 2 times')
    assert "You said: Call one of the functions now." in message
    assert unmet.value.body["code"] == "tool_choice_unmet"
    rounds = transitions(daemon, "echo")[before:]
    assert rounds.count("prompt sent") == 2 and rounds[-3:] == ["prompt sent", "first text from the runner", "turn over"]
    # Streamed: nothing was sent before the verdict, so it is still a plain 422.
    with daemon.client() as http:
        reply = http.post("/v1/chat/completions", json={"model": "echo", "stream": True, "tools": [WEATHER], "tool_choice": "required",
                                                        "messages": [{"role": "user", "content": "just chat"}]})
    assert reply.status_code == 422 and reply.json()["error"]["code"] == "tool_choice_unmet"


def test_openai_tool_choice_names_a_function(oai):
    named = {"type": "function", "function": {"name": "get_weather"}}
    completion = oai.chat.completions.create(model="echo", tools=[WEATHER, TIME], tool_choice=named,
                                             messages=[{"role": "user", "content": 'call tool get_weather {"city": "Lima"}'}])
    assert completion.choices[0].message.tool_calls[0].function.name == "get_weather"
    # A call of another function does not count.
    with pytest.raises(openai.UnprocessableEntityError, match='tool_choice the function "get_weather"'):
        oai.chat.completions.create(model="echo", tools=[WEATHER, TIME], tool_choice=named,
                                    messages=[{"role": "user", "content": 'call tool get_time {"city": "Lima"}'}])


def test_openai_tool_choice_none_gives_the_model_no_tools(oai):
    line = 'call tool get_weather {"city": "Paris"}'
    none = oai.chat.completions.create(model="echo", tools=[WEATHER], tool_choice="none", messages=[{"role": "user", "content": line}])
    plain = oai.chat.completions.create(model="echo", messages=[{"role": "user", "content": line}])
    assert none.choices[0].message.content == plain.choices[0].message.content  # the call's text, as the model wrote it
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "stop"
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens  # no definitions reached the model


def test_openai_tool_messages_name_their_call_by_id(oai):
    messages = [{"role": "user", "content": 'call tool get_weather {"city": "Paris"}'}]
    first = oai.chat.completions.create(model="stock", tools=[WEATHER], messages=messages)
    call = first.choices[0].message.tool_calls[0]
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    second = oai.chat.completions.create(model="stock", tools=[WEATHER], messages=messages)
    assert second.choices[0].message.content == echo(tool_round_line(["sunny"], "stock"))
    assert second.warnings[0] == STOCK_WARNING  # type: ignore[attr-defined]


# ---- HTTP upstreams -------------------------------------------------------------------------


def test_an_upstream_gets_tools_tool_choice_and_tool_messages_as_sent(daemon, oai, fake_defaults):
    fake_defaults.configure(tool_arguments={"city": "Bern"})
    named = {"type": "function", "function": {"name": "get_time"}}
    completion = oai.chat.completions.create(model="fake-remote", tools=[WEATHER, TIME], tool_choice=named,
                                             messages=[{"role": "user", "content": "time in Bern?"}])
    call = completion.choices[0].message.tool_calls[0]
    assert (call.id, call.function.name, call.function.arguments) == ("call_fake_1", "get_time", '{"city": "Bern"}')
    sent = fake_defaults.records()["chat_requests"][-1]["body"]
    assert sent["model"] == "fake-upstream-model" and sent["tools"] == [WEATHER, TIME] and sent["tool_choice"] == named


def test_an_upstream_that_writes_the_call_as_text_is_recognised_too(daemon, client, fake_defaults):
    fake_defaults.configure(tools_reply="text", tool_arguments={"city": "Bern"}, text_before_call="Checking. ")
    objects = wire_stream(daemon, "/api/chat", {"model": "fake-remote", "tools": [WEATHER],
                                                "messages": [{"role": "user", "content": "weather?"}]})
    assert "".join(o["message"]["content"] for o in objects) == "Checking. "
    calls = [c["function"] for o in objects for c in o["message"].get("tool_calls", [])]
    assert calls == [{"index": 0, "name": "get_weather", "arguments": {"city": "Bern"}}]
    fake_defaults.configure(tools_reply="deltas", text_before_call="Checking. ")
    answer = client.chat(model="fake-remote", tools=[WEATHER], messages=[{"role": "user", "content": "weather?"}])
    assert answer.message.content == "Checking. " and answer.message.tool_calls[0].function.name == "get_weather"
