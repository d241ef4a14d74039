"""Tools through our tokenizer server (a real process): `/config {tools, turn}`, a template that
renders tools itself (Qwen2.5's) and one that does not (SmolLM2's: the server writes them in the
system prompt in the Hermes/Qwen form, calls and results as that form's text)."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from harness import net
from harness.models import tools_tokenizer
from tokenizer_service.tool_prompt import as_text_messages, with_tools
from tokenizer_support import SMOLLM2_TOKENIZER, tokenizer_server

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
REPLY_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def post(http: httpx.Client, path: str, body: dict) -> dict:
    reply = http.post(path, json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def load(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def ids(tokenizer, messages, generation_prompt=True, tools=None) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module", params=["smollm2", "qwen2.5-template"])
def served(request, tmp_path_factory):
    """(base URL, tokenizer, renders tools itself?)"""
    folder = SMOLLM2_TOKENIZER if request.param == "smollm2" else tools_tokenizer(tmp_path_factory.mktemp("qwen"))
    with tokenizer_server(folder) as base_url:
        yield base_url, load(folder), request.param != "smollm2"


@pytest.fixture()
def http(served):
    with net.client(base_url=served[0], timeout=10.0) as client:
        post(client, "/config", {"system_prompt": None, "thinking": None, "history": [], "raw": False, "tools": None, "turn": []})
        yield client


def expected(tokenizer, native: bool, messages, generation_prompt=True, tools=None) -> list[int]:
    """What the server must render: the template's own form where it has one, ours otherwise."""
    if native:
        return ids(tokenizer, messages, generation_prompt, tools)
    messages = as_text_messages(messages)
    if tools and messages[0]["role"] == "system":
        messages = [{"role": "system", "content": with_tools(messages[0]["content"], tools)}, *messages[1:]]
    elif tools:
        messages = [{"role": "system", "content": with_tools(None, tools)}, *messages]
    return ids(tokenizer, messages, generation_prompt)


def test_capabilities_say_how_tools_reach_the_model(http, served):
    caps = http.get("/capabilities").json()
    assert {"tools", "turn"} <= set(caps["controls"])
    native = served[2]
    assert caps["tools"] == ({"definitions": "template", "calls": "template"} if native
                             else {"definitions": "system_prompt", "calls": "text"})


def test_tools_open_the_next_conversation_and_a_tool_round_is_its_turn(http, served):
    """The runner's sequence: /reset (system + tools), /encode of the question, then the tool
    round (the reply as the model wrote it, the result as the turn's message): its diff is the
    result's turn only, the conversation so far is held."""
    _, tokenizer, native = served
    post(http, "/config", {"system_prompt": "S", "tools": TOOLS})
    uid = http.get("/get_uid").json()["uid"]
    system = [{"role": "system", "content": "S"}]
    held = post(http, "/reset", {"uid": uid, "system_prompt": "runner's"})["token_ids"]
    assert held == expected(tokenizer, native, system, generation_prompt=False, tools=TOOLS)
    first = post(http, "/encode", {"uid": uid, "text": "weather?"})
    question = system + [{"role": "user", "content": "weather?"}]
    assert first["token_ids"] == expected(tokenizer, native, question, tools=TOOLS)
    result = {"role": "tool", "content": '{"sky": "clear"}', "name": "get_weather"}
    post(http, "/config", {"turn": [result]})
    second = post(http, "/encode", {"uid": uid, "text": "<tool_response> line, not used", "last_reply": REPLY_TEXT})
    held_after_reply = expected(tokenizer, native, question + [{"role": "assistant", "content": REPLY_TEXT}], False, TOOLS)
    assert second["token_ids"][:len(held_after_reply)] == held_after_reply
    assert second["diff"] == second["token_ids"][len(held_after_reply):]
    tail = tokenizer.decode(second["diff"])
    assert tail == '<|im_start|>user\n<tool_response>\n{"sky": "clear"}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
    # The turn is used once: the next line is a user message again.
    third = post(http, "/encode", {"uid": uid, "text": "thanks", "last_reply": "It is clear."})
    assert tokenizer.decode(third["diff"]).startswith("<|im_start|>user\nthanks<|im_end|>")


def test_a_history_with_calls_and_results_renders_as_the_template_or_as_text(http, served):
    _, tokenizer, native = served
    history = [{"role": "user", "content": "weather?"}, CALL, {"role": "tool", "content": "sunny", "name": "get_weather"},
               {"role": "assistant", "content": "It is sunny."}]
    post(http, "/config", {"system_prompt": "S", "tools": TOOLS, "history": history})
    uid = http.get("/get_uid").json()["uid"]
    post(http, "/reset", {"uid": uid})
    turn = post(http, "/encode", {"uid": uid, "text": "and tomorrow?"})
    messages = [{"role": "system", "content": "S"}, *history, {"role": "user", "content": "and tomorrow?"}]
    assert turn["token_ids"] == expected(tokenizer, native, messages, tools=TOOLS)
    text = tokenizer.decode(turn["token_ids"])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text and '"name": "get_weather", "description"' in text


def test_tools_reach_the_stateless_protocol_and_null_clears_them(http, served):
    _, tokenizer, native = served
    post(http, "/config", {"tools": TOOLS})
    with_definitions = post(http, "/encode", {"text": "hi"})["token_ids"]
    assert with_definitions == expected(tokenizer, native, [{"role": "user", "content": "hi"}], tools=TOOLS)
    assert "get_weather" in tokenizer.decode(with_definitions)
    post(http, "/config", {"tools": None})
    assert "get_weather" not in tokenizer.decode(post(http, "/encode", {"text": "hi"})["token_ids"])


@pytest.mark.parametrize(("body", "said"), [
    ({"tools": "get_weather"}, "tools must be a list"),
    ({"turn": [{"role": "assistant", "content": "x"}]}, "turn items must be {role: user|tool"),
    ({"history": [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]},
     "tool_calls must be"),
])
def test_bad_tool_settings_are_400s(http, body, said):
    reply = http.post("/config", json=body)
    assert reply.status_code == 400 and said in reply.json()["error"]
