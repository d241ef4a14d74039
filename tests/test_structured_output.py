"""Structured output end to end (issue 13, section 2): Ollama's `format` and OpenAI's
`response_format` through the real daemon, on scripted card models (the emulator answers a
`json:<mode> <value>` line with that value written as the mode says, so every answer is known
exactly) and on an HTTP upstream (the fake upstream answers the same lines), driven by the apps'
own clients: Frigate's review call through the `ollama` package, LangChain's
`with_structured_output` on ChatOllama and ChatOpenAI, and the OpenAI client's `.parse()`."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import ollama
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ax_emulator.scripted import reply_text
from metrics_support import metric
from harness.daemon import running_daemon
from harness.models import scripted_model
from upstream_support import FakeUpstream

WORDS = 4
# The warnings that say where the instruction went (llm_service/structured/prompt.py).
IN_SYSTEM_PROMPT = ("structured output: the card cannot constrain its sampling, so the JSON schema was given to "
                    "the model in the system prompt; the answer was checked against the schema")
IN_SYSTEM_PROMPT_JSON = ("structured output: the card cannot constrain its sampling, so the JSON instruction was "
                         "given to the model in the system prompt; the answer was checked to be one JSON object")
IN_PROMPT_LINE = ("structured output: the card cannot constrain its sampling, so the JSON schema was given to the "
                  "model at the end of the prompt line (the stock tokenizer script takes no system prompt from "
                  "the daemon); the answer was checked against the schema")
FROM_FENCE = "structured output: the JSON was taken out of a code fence in the answer"
FROM_PROSE = "structured output: the JSON was taken out of the text around it in the answer"
COMMA_REMOVED = "structured output: a trailing comma was removed from the answer's JSON"

POINT = {"type": "object", "properties": {"x": {"type": "integer"}, "label": {"type": "string"}},
         "required": ["x", "label"], "additionalProperties": False}


class Point(BaseModel):
    x: int
    label: str


def directive(mode: str, value: Any) -> str:
    return f"json:{mode} {json.dumps(value)}"


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    upstream = FakeUpstream(tmp_path_factory.mktemp("structured-upstream")).start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, fake):
    root = tmp_path_factory.mktemp("structured")
    entries = [
        scripted_model(root, "echo", reply_words=WORDS),
        scripted_model(root, "thinker", reply_words=WORDS, think=True),
        scripted_model(root, "stock", reply_words=WORDS, stock_tokenizer=True),
        # A B runner without `reset`: a fresh context costs a restart.
        scripted_model(root, "plain-b", dialect="b", reply_words=WORDS),
        # Slow enough that a request can queue behind one attempt.
        scripted_model(root, "slow", reply_words=WORDS, tokens_per_second=25),
        {"model_name": "fake-remote", "engine": "openai-http", "base_url": fake.base_url + "/v1",
         "upstream_model": "fake-upstream-model", "retries": "0"},
    ]
    with running_daemon(root, entries) as d:
        yield d


def post(daemon, path: str, body: dict[str, Any]) -> Any:
    """The raw answer (the clients drop `warnings`)."""
    with daemon.client(timeout=120) as http:
        return http.post(path, json=body)


# ---- Ollama: format -------------------------------------------------------------------------


def test_the_daemon_under_test_is_this_checkout(daemon):
    """The daemon runs this interpreter with the environment below: the package it imports is
    the one beside these tests (an editable install of another checkout must not win)."""
    found = subprocess.run([sys.executable, "-c", "import llm_service, ax_emulator; print(llm_service.__file__); print(ax_emulator.__file__)"],
                           env=daemon.env, capture_output=True, text=True, check=True).stdout.split()
    checkout = Path(__file__).resolve().parents[1]
    assert [Path(f).resolve().parents[1] for f in found] == [checkout, checkout]


@pytest.mark.parametrize(("mode", "notes"), [
    ("valid", []), ("fenced", [FROM_FENCE]), ("prose", [FROM_PROSE]), ("comma", [COMMA_REMOVED]),
])
def test_generate_with_a_schema_answers_exactly_the_json(daemon, mode, notes):
    value = {"x": 7, "label": f"seven {mode}"}
    body = post(daemon, "/api/generate", {"model": "echo", "prompt": f"Place it. {directive(mode, value)}",
                                          "format": POINT, "stream": False}).json()
    assert body["response"] == json.dumps(value)
    assert body["done"] is True and body["done_reason"] == "stop"
    assert body["warnings"] == [IN_SYSTEM_PROMPT, *notes]


def test_format_json_asks_for_one_object(client, daemon):
    value = {"anything": [1, 2, {"deep": True}]}
    answer = client.generate(model="echo", prompt=f"Anything. {directive('prose', value)}", format="json")
    assert json.loads(answer.response) == value and answer.response == json.dumps(value)
    body = post(daemon, "/api/generate", {"model": "echo", "prompt": f"Any. {directive('valid', value)}",
                                          "format": "json", "stream": False}).json()
    assert body["warnings"] == [IN_SYSTEM_PROMPT_JSON]
    # An array is JSON, but not the object "json" asks for: asked again, then an error.
    with pytest.raises(ollama.ResponseError) as refused:
        client.generate(model="echo", prompt=f"A list. {directive('valid', [1, 2])}", format="json")
    assert refused.value.status_code == 502
    assert refused.value.error == (
        'model "echo" answered no JSON object in 3 attempts (structured_output_retries=2): '
        "attempt 1: the JSON is an array, not an object; attempt 2: the JSON is an array, not an object; "
        "attempt 3: the JSON is an array, not an object"
    )


def test_chat_with_a_schema_streams_the_validated_json_once(client):
    value = {"x": 3, "label": "streamed"}
    parts = list(client.chat(model="echo", messages=[{"role": "user", "content": f"Stream. {directive('fenced', value)}"}],
                             format=POINT, stream=True))
    assert [p.done for p in parts] == [False, True]
    assert parts[0].message.content == json.dumps(value) and parts[1].message.content == ""
    assert parts[1].eval_count > 0


def test_an_invalid_answer_is_asked_again_in_a_fresh_context(daemon):
    value = {"x": 1, "label": "second time lucky"}
    before = metric(daemon, "axm1_llm_structured_output_attempts_total", model="echo", outcome="invalid")
    body = post(daemon, "/api/chat", {"model": "echo", "messages": [{"role": "user", "content": f"Try. {directive('retry', value)}"}],
                                      "format": POINT, "stream": False}).json()
    assert body["message"]["content"] == json.dumps(value)
    assert body["warnings"][0] == IN_SYSTEM_PROMPT
    note = body["warnings"][1]
    assert note.startswith("structured output: valid after 2 attempts (attempt 1: the answer is not valid JSON: ")
    assert metric(daemon, "axm1_llm_structured_output_attempts_total", model="echo", outcome="invalid") == before + 1
    # The retry was a one-shot request: the runner reset its context before it.
    history = [t for t in daemon.get("/api/status_history/echo")["history"]]
    prompts = [i for i, t in enumerate(history) if t["reason"] == "prompt sent"]
    assert any(t["to"] == "resetting" for t in history[prompts[-2]:prompts[-1]])


def test_an_answer_never_valid_is_a_502_naming_each_attempts_fault(client, daemon, oai):
    failures = metric(daemon, "axm1_llm_structured_output_failures_total", model="echo")
    with pytest.raises(ollama.ResponseError) as broken:
        client.generate(model="echo", prompt=f"Never. {directive('broken', {'x': 1, 'label': 'cut'})}", format=POINT)
    assert broken.value.status_code == 502
    message = broken.value.error
    assert message.startswith('model "echo" answered no JSON valid for the schema in 3 attempts (structured_output_retries=2): '
                              "attempt 1: the answer is not valid JSON: ")
    assert message.count("the answer is not valid JSON") == 3
    with pytest.raises(ollama.ResponseError) as wrong:
        client.chat(model="echo", messages=[{"role": "user", "content": f"Wrong. {directive('valid', {'x': 'one', 'label': 'l'})}"}],
                    format=POINT)
    assert wrong.value.status_code == 502
    assert "attempt 3: the JSON does not match the schema: at $.x: 'one' is not of type 'integer'" in wrong.value.error
    assert metric(daemon, "axm1_llm_structured_output_failures_total", model="echo") == failures + 2
    # OpenAI's envelope, 502, param response_format: its client does not take it for its own mistake.
    with pytest.raises(openai.InternalServerError) as from_v1:
        oai.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": f"V1. {directive('broken', {'x': 2})}"}],
            response_format={"type": "json_object"})
    assert from_v1.value.status_code == 502
    error = from_v1.value.body
    assert error["code"] == "invalid_model_output" and error["param"] == "response_format" and error["type"] == "server_error"
    # A streamed request fails the same way, before its first byte.
    with post_stream(daemon, "/api/generate", {"model": "echo", "prompt": f"S. {directive('broken', {'x': 1})}", "format": "json"}) as reply:
        assert reply.status_code == 502 and json.loads(reply.read())["error"].startswith('model "echo" answered no JSON object')


def post_stream(daemon, path: str, body: dict[str, Any]):
    http = daemon.client(timeout=120)
    return _Closing(http, http.stream("POST", path, json=body))


class _Closing:
    def __init__(self, http, stream) -> None:
        self.http, self.stream = http, stream

    def __enter__(self):
        return self.stream.__enter__()

    def __exit__(self, *exc) -> None:
        self.stream.__exit__(*exc)
        self.http.close()


def test_an_invalid_schema_is_a_400_before_any_generation(client, daemon, oai):
    for fmt, message in [
        ({"type": "objekt"}, "invalid JSON schema in format.type: 'objekt' is not valid under any of the given schemas"),
        ({"properties": {"a": {"$ref": "#/$defs/missing"}}},
         "invalid JSON schema in format: $ref '#/$defs/missing' does not resolve within the schema (remote references are not fetched)"),
    ]:
        with pytest.raises(ollama.ResponseError) as refused:
            client.generate(model="echo", prompt="never generated", format=fmt)
        assert refused.value.status_code == 400 and refused.value.error == message
    # The ollama client refuses other strings itself; the wire gets Ollama's 400.
    reply = post(daemon, "/api/chat", {"model": "echo", "messages": [{"role": "user", "content": "x"}], "format": "yaml"})
    assert reply.status_code == 400 and reply.json() == {"error": "invalid format: 'yaml'; use \"json\" or a JSON schema (an object)"}
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}], response_format={
            "type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object", "required": "x"}}})
    assert bad.value.body["param"] == "response_format" and bad.value.body["code"] == "invalid_json_schema"
    assert bad.value.body["message"].startswith("invalid JSON schema in response_format.json_schema.schema.required: ")
    with pytest.raises(openai.BadRequestError, match="invalid response_format.type: 'xml'"):
        oai.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}], response_format={"type": "xml"})


def test_a_stock_tokenizer_gets_the_schema_in_the_prompt_line(daemon):
    value = {"x": 5, "label": "stock"}
    body = post(daemon, "/api/generate", {"model": "stock", "prompt": f"Stock. {directive('valid', value)}",
                                          "format": POINT, "stream": False}).json()
    assert body["response"] == json.dumps(value)
    assert body["warnings"] == [IN_PROMPT_LINE]
    # A retry carries its note in the line too.
    body = post(daemon, "/api/generate", {"model": "stock", "prompt": f"Again. {directive('retry', value)}",
                                          "format": POINT, "stream": False}).json()
    assert body["response"] == json.dumps(value) and body["warnings"][1].startswith("structured output: valid after 2 attempts")


def test_a_runner_without_reset_restarts_for_each_attempt(client, daemon):
    """The system prompt holding the schema, and each retry, need a fresh context: on a B runner
    without `reset` that is a restart (a full load on the card), counted apart from faults."""
    value = {"x": 6, "label": "restarted"}
    assert client.generate(model="plain-b", prompt="plain first").response == reply_text("plain first", WORDS, think=False)
    before = daemon.get("/api/status/plain-b")["fresh_context_restarts"]
    answer = client.generate(model="plain-b", prompt=f"B. {directive('retry', value)}", format=POINT)
    assert answer.response == json.dumps(value)
    status = daemon.get("/api/status/plain-b")
    assert status["fresh_context_restarts"] == before + 2 and status["restarts"] == 0


def test_thinking_stays_apart_from_the_json(client):
    value = {"x": 9, "label": "pondered"}
    line = f"Think. {directive('valid', value)}"
    answer = client.chat(model="thinker", messages=[{"role": "user", "content": line}], format=POINT, think=True)
    assert answer.message.content == json.dumps(value)
    assert answer.message.thinking.strip() == reply_text(line, WORDS, think=True).split("</think>")[0].removeprefix("<think>").strip()


def test_retries_give_the_slot_back_between_attempts(daemon):
    """A request that queued behind attempt 1 is answered before attempt 2, with its own text."""
    value = {"x": 2, "label": "patient"}
    results: dict[str, Any] = {}

    def structured() -> None:
        results["structured"] = post(daemon, "/api/generate", {
            "model": "slow", "prompt": f"Slow. {directive('retry', value)}", "format": POINT, "stream": False})

    worker = threading.Thread(target=structured)
    worker.start()
    deadline = time.monotonic() + 30
    while daemon.get("/api/status/slow").get("in_flight") is None:
        assert time.monotonic() < deadline, "the structured request never started"
        time.sleep(0.02)
    plain = post(daemon, "/api/generate", {"model": "slow", "prompt": "in between", "stream": False})
    worker.join(60)
    assert plain.json()["response"] == reply_text("in between", WORDS, think=False)
    first = results["structured"]
    assert first.json()["response"] == json.dumps(value)
    ids = [t["details"].get("request") for t in daemon.get("/api/status_history/slow")["history"] if t["reason"] == "prompt sent"]
    structured_id, plain_id = first.headers["X-Request-Id"], plain.headers["X-Request-Id"]
    assert ids[-3:] == [structured_id, plain_id, f"{structured_id}-2"]


def test_keep_alive_zero_unloads_after_the_last_attempt_not_between(client, daemon):
    value = {"x": 4, "label": "then unload"}
    answer = client.generate(model="slow", prompt=f"Unload. {directive('retry', value)}", format=POINT, keep_alive=0)
    assert answer.response == json.dumps(value)
    daemon.wait_state("slow", "stopped")
    history = daemon.get("/api/status_history/slow")["history"]
    last_two = [i for i, t in enumerate(history) if t["reason"] == "prompt sent"][-2:]
    assert not any(t["to"] in ("stopping", "stopped") for t in history[last_two[0]:last_two[1]])


# ---- Frigate's review call --------------------------------------------------------------------

Observation = Annotated[str, StringConstraints(min_length=20, max_length=160)]


class ReviewMetadata(BaseModel):
    """The shape of Frigate's review metadata (frigate/data_processing/post/types.py)."""

    model_config = ConfigDict(extra="ignore")
    observations: list[Observation] = Field(..., min_length=3, max_length=15, description="What happened, in order.")
    title: str = Field(max_length=80, description="Under 10 words.")
    scene: str = Field(min_length=150, max_length=600, description="A chronological narrative.")
    shortSummary: str = Field(min_length=70, max_length=120, description="Two sentences for notifications.")
    confidence: float = Field(ge=0.0, le=1.0, description="0.0 to 1.0.")
    potential_threat_level: int = Field(ge=0, le=2, description="0 normal, 1 suspicious, 2 critical.")
    other_concerns: list[str] | None = Field(default=None, description="Concerns the user listed.")
    time: str | None = Field(default=None, description="Time of activity.")


def frigate_review_schema() -> dict[str, Any]:
    """The schema of Frigate's review call: the model's JSON schema without `time` (filled in by
    Frigate) and, with no concerns configured, without `other_concerns`; additionalProperties
    false for OpenAI's strict mode. It goes as response_format json_schema "review_metadata",
    strict, to an OpenAI provider."""
    schema = ReviewMetadata.model_json_schema()
    schema["properties"].pop("time")
    schema["properties"].pop("other_concerns")
    schema["required"] = [r for r in schema.get("required", []) if r not in ("time", "other_concerns")]
    schema["additionalProperties"] = False
    return schema


def frigate_review_format() -> dict[str, Any]:
    """The same schema as Frigate's Ollama provider sends it as `format`: title, description and
    numeric bounds stripped (`_clean_schema_for_ollama`), property names kept."""
    schema = frigate_review_schema()

    def clean(node: Any, in_properties: bool = False) -> Any:
        if isinstance(node, dict):
            return {k: clean(v, k == "properties") for k, v in node.items()
                    if in_properties or k not in {"title", "description", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}}
        if isinstance(node, list):
            return [clean(item) for item in node]
        return node

    return clean(schema)


REVIEW = {
    "observations": ["A delivery van pulls into the driveway at the start.",
                     "A person in a brown uniform steps out of the van.",
                     "The person leaves a box on the front porch and walks back."],
    "title": "Package delivered to the front porch",
    "scene": ("A delivery van pulls into the driveway and stops. A person in a brown uniform steps out, carries a "
              "box to the front porch, sets it down beside the door and walks back to the van, which then leaves."),
    "shortSummary": "A courier left a package on the front porch. The van came and went within a minute.",
    "confidence": 0.9,
    "potential_threat_level": 0,
}


def review_prompt(line: str) -> str:
    """A review prompt shaped as Frigate's (its sections, no images), with the emulator's line."""
    return (
        "\nYour task is to analyze a sequence of images taken in chronological order from a security camera.\n\n"
        "## Task Instructions\n\nDescribe the scene based on observable actions and movements, and assign a "
        "potential_threat_level (0, 1, or 2).\n\n## Response Field Guidelines\n\nRespond with a JSON object "
        "matching the provided schema.\n\n## Sequence Details\n\n- Camera: front_door\n- Total frames: 0\n"
        f"- Activity started at 10:02 AM and lasted 41 seconds\n- Zones involved: porch\n\n## Objects in Scene\n\n- person\n- car\n\n{line}\n"
    )


@pytest.mark.parametrize("mode", ["valid", "fenced", "retry"])
def test_frigates_review_call(daemon, mode):
    """frigate/genai/ollama.py: `show` at start, then `generate(model, prompt, images=None, format=<its
    schema>, options={...})`; the answer's fences stripped by its regex, then
    `ReviewMetadata.model_validate_json`."""
    client = ollama.Client(host=daemon.url, timeout=120)
    assert client.show("echo").modelfile is not None
    options = {"temperature": 0.5, "repeat_penalty": 1.05, "presence_penalty": 0.3}
    result = client.generate("echo", review_prompt(directive(mode, REVIEW)), images=None, options=options,
                             format=frigate_review_format())
    text = str(result["response"]).strip()
    clean = re.sub(r"\n?```$", "", re.sub(r"^```[a-zA-Z0-9]*\n?", "", text))
    assert ReviewMetadata.model_validate_json(clean) == ReviewMetadata(**REVIEW)
    assert text == json.dumps(REVIEW)


@pytest.mark.parametrize("model", ["echo", "fake-remote"])
def test_frigates_review_call_through_its_openai_provider(daemon, fake, model):
    """frigate/genai/openai.py: one user message of text parts (no images here), response_format
    json_schema "review_metadata", strict; the content stripped, fences removed, validated."""
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)
    response_format = {"type": "json_schema", "json_schema": {"name": "review_metadata", "strict": True,
                                                              "schema": frigate_review_schema()}}
    result = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": [{"type": "text", "text": review_prompt(directive("prose", REVIEW))}]}],
        timeout=120, response_format=response_format)
    content = result.choices[0].message.content.strip()
    clean = re.sub(r"\n?```$", "", re.sub(r"^```[a-zA-Z0-9]*\n?", "", content))
    assert ReviewMetadata.model_validate_json(clean) == ReviewMetadata(**REVIEW)
    if model == "fake-remote":
        assert fake.records()["chat_requests"][-1]["body"]["response_format"] == response_format


def test_frigates_object_description_is_plain_text(client):
    """Its object descriptions go without a format: the plain answer, untouched."""
    prompt = "Analyze the sequence of images containing the person. Describe what the person is doing."
    assert client.generate("echo", prompt, images=None).response == reply_text(prompt, WORDS, think=False)


# ---- OpenAI: response_format and .parse() ----------------------------------------------------


def test_response_format_json_object_and_json_schema(oai, daemon):
    value = {"x": 11, "label": "v1"}
    answer = oai.chat.completions.create(model="echo", messages=[{"role": "user", "content": f"Obj. {directive('prose', value)}"}],
                                         response_format={"type": "json_object"})
    assert answer.choices[0].message.content == json.dumps(value) and answer.choices[0].finish_reason == "stop"
    schema_format = {"type": "json_schema", "json_schema": {"name": "point", "schema": POINT, "strict": True}}
    body = post(daemon, "/v1/chat/completions", {"model": "echo", "messages": [{"role": "user", "content": f"S. {directive('comma', value)}"}],
                                                 "response_format": schema_format}).json()
    assert body["choices"][0]["message"]["content"] == json.dumps(value)
    assert body["warnings"] == [IN_SYSTEM_PROMPT, COMMA_REMOVED]
    text = oai.chat.completions.create(model="echo", messages=[{"role": "user", "content": "plain"}], response_format={"type": "text"})
    assert text.choices[0].message.content == reply_text("plain", WORDS, think=False)


def test_response_format_streamed_is_one_content_delta(oai):
    value = {"x": 12, "label": "streamed v1"}
    chunks = list(oai.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": f"Stream. {directive('retry', value)}"}], stream=True,
        stream_options={"include_usage": True},
        response_format={"type": "json_schema", "json_schema": {"name": "point", "schema": POINT}}))
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert contents == [json.dumps(value)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("api", ["chat.completions.parse", "beta.chat.completions.parse"])
def test_openai_parse_with_a_pydantic_model(oai, api):
    value = {"x": 21, "label": "parsed"}
    parse = oai.chat.completions.parse if api == "chat.completions.parse" else oai.beta.chat.completions.parse
    completion = parse(model="echo", messages=[{"role": "system", "content": "Extract the point."},
                                               {"role": "user", "content": f"Point. {directive('fenced', value)}"}],
                       response_format=Point)
    message = completion.choices[0].message
    assert message.parsed == Point(**value) and message.refusal is None


# ---- LangChain with_structured_output -------------------------------------------------------


@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
def test_langchain_chat_ollama_with_structured_output(daemon, method):
    from langchain_ollama import ChatOllama

    value = {"x": 31, "label": f"ollama {method}"}
    model = ChatOllama(model="echo", base_url=daemon.url).with_structured_output(Point, method=method)
    assert model.invoke(f"Return the point as JSON. {directive('prose', value)}") == Point(**value)
    as_dict = ChatOllama(model="echo", base_url=daemon.url).with_structured_output(POINT, method=method)
    assert as_dict.invoke(f"JSON, please. {directive('valid', value)}") == value


@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
def test_langchain_chat_openai_with_structured_output(daemon, method):
    from langchain_openai import ChatOpenAI

    value = {"x": 41, "label": f"openai {method}"}
    chat = ChatOpenAI(model="echo", base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    structured = chat.with_structured_output(Point, method=method)
    assert structured.invoke(f"Return the point as JSON. {directive('fenced', value)}") == Point(**value)
    raw = chat.with_structured_output(Point, method=method, include_raw=True).invoke(f"Again as JSON. {directive('retry', value)}")
    assert raw["parsed"] == Point(**value) and raw["parsing_error"] is None


def test_langchain_function_calling_reads_the_schema_as_a_tool_call(daemon):
    """with_structured_output(method="function_calling") binds the schema as a tool and reads the
    call's arguments: the tools path (the scripted model calls the tool its line names)."""
    from langchain_ollama import ChatOllama
    from langchain_openai import ChatOpenAI

    value = {"x": 51, "label": "function calling"}
    line = f"Return the point. call tool Point {json.dumps(value)}"
    ollama = ChatOllama(model="echo", base_url=daemon.url).with_structured_output(Point, method="function_calling")
    assert ollama.invoke(line) == Point(**value)
    chat = ChatOpenAI(model="echo", base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert chat.with_structured_output(Point, method="function_calling").invoke(line) == Point(**value)


# ---- an HTTP upstream -------------------------------------------------------------------------


def test_an_upstream_gets_response_format_and_its_answer_is_validated(client, oai, fake, daemon):
    value = {"x": 51, "label": "upstream"}
    line = f"Up. {directive('valid', value)}"
    answer = client.generate(model="fake-remote", prompt=line, format=POINT)
    assert answer.response == json.dumps(value)
    streamed = list(client.generate(model="fake-remote", prompt=line, format=POINT, stream=True))
    assert [part.response for part in streamed] == [json.dumps(value), ""]  # relayed in 8-character chunks upstream
    sent = fake.records()["chat_requests"][-1]["body"]
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "response", "schema": POINT}}
    assert sent["messages"] == [{"role": "user", "content": line}]  # the upstream constrains: no instruction added
    body = post(daemon, "/v1/chat/completions", {
        "model": "fake-remote", "messages": [{"role": "user", "content": f"Obj. {directive('fenced', value)}"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "point", "schema": POINT, "strict": True}}}).json()
    assert body["choices"][0]["message"]["content"] == json.dumps(value) and body["warnings"] == [FROM_FENCE]
    assert fake.records()["chat_requests"][-1]["body"]["response_format"]["json_schema"] == {"name": "point", "schema": POINT, "strict": True}
    parsed = oai.chat.completions.parse(model="fake-remote", messages=[{"role": "user", "content": line}], response_format=Point)
    assert parsed.choices[0].message.parsed == Point(**value)
    assert fake.records()["chat_requests"][-1]["body"]["response_format"]["type"] == "json_schema"


def test_an_upstream_answer_that_is_invalid_is_asked_again(client, fake):
    value = {"x": 52, "label": "upstream retry"}
    answer = client.chat(model="fake-remote", messages=[{"role": "user", "content": f"Up. {directive('retry', value)}"}], format="json")
    assert answer.message.content == json.dumps(value)
    first, second = [r["body"] for r in fake.records()["chat_requests"][-2:]]
    assert first["response_format"] == second["response_format"] == {"type": "json_object"}
    assert second["messages"][-1]["content"].startswith(first["messages"][-1]["content"] + " (This is attempt 2 of 3: ")
    with pytest.raises(ollama.ResponseError) as never:
        client.generate(model="fake-remote", prompt=f"Up. {directive('broken', value)}", format="json")
    assert never.value.status_code == 502 and never.value.error.startswith('model "fake-remote" answered no JSON object in 3 attempts')
