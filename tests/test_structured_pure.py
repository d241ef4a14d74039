"""Structured output's pure parts, directly: finding, repairing and validating the JSON of an
answer, reading `format` / `response_format`, where the card's planner puts the instruction, the
retry note, and the scripted emulator's JSON answers that the end-to-end tests rely on."""
from __future__ import annotations

import json

import pytest

from ax_emulator.scripted import json_reply, reply_text
from llm_service.engines.base import ChatMessage, GenerationRequest
from llm_service.engines.card.dialects import DIALECTS
from llm_service.engines.card.planner import Runner, read_turn
from llm_service.structured.answer import InvalidAnswer, extract, remove_trailing_commas
from llm_service.structured.attempts import attempt_request, combined_result, failure_message
from llm_service.structured.output import StructuredOutput, upstream_response_format
from llm_service.structured.prompt import NOTE_REASON_CHARS, instruction, place_instruction, retry_note
from llm_service.structured.requests import InvalidSchema, from_ollama_format, from_openai_response_format
from llm_service.engines.base import GenerationResult

POINT = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"], "additionalProperties": False}
SCHEMA = StructuredOutput("schema", POINT)
JSON = StructuredOutput("json")


# ---- extraction -------------------------------------------------------------------------------


@pytest.mark.parametrize(("answer", "notes"), [
    ('{"x": 1}', []),
    ('  \n{"x":1}\n ', []),
    ('```json\n{\n  "x": 1\n}\n```', ["code fence"]),
    ('```\n{"x": 1}\n```', ["code fence"]),
    ('Sure! Here it is: {"x": 1} Anything else?', ["text around it"]),
    ('Here:\n```json\n{"x": 1}\n```\nDone.', ["code fence"]),
    ('{"x": 1} // a comment is text around it', ["text around it"]),
    ('{"x": 1,}', ["trailing comma"]),
    ('{\n  "x": 1,\n}', ["trailing comma"]),
    ('The answer {"x": 1 , } is this', ["text around it", "trailing comma"]),
])
def test_the_json_is_found_where_models_put_it(answer, notes):
    found = extract(answer, SCHEMA)
    assert found.value == {"x": 1} and found.text == '{"x": 1}'
    assert len(found.notes) == len(notes) and all(n in note for n, note in zip(notes, found.notes))


def test_the_first_valid_value_wins_and_brackets_in_strings_do_not_count():
    answer = 'An example: {"y": "not it"}; the answer: {"x": 2, "s": "a } and a ] inside"} end'
    assert extract(answer, StructuredOutput("json")).value == {"y": "not it"}
    schema = StructuredOutput("schema", {"type": "object", "required": ["x"]})
    assert extract(answer, schema).value == {"x": 2, "s": "a } and a ] inside"}


def test_non_ascii_is_kept_as_it_is():
    assert extract('{"label": "café ☕"}', JSON).text == '{"label": "café ☕"}'


@pytest.mark.parametrize(("answer", "reason"), [
    ("", "the answer is empty"),
    ("I cannot do that.", 'the answer holds no JSON value: "I cannot do that."'),
    ('{"x": 1', "the answer is not valid JSON: Expecting ',' delimiter at line 1 column 8"),
    ('Sure: {"x": 1', "the answer is not valid JSON: Expecting ',' delimiter at line 1 column 14 (the JSON starting at character 7 never ends or is malformed)"),
    ('{"x": "one"}', "the JSON does not match the schema: at $.x: 'one' is not of type 'integer'"),
    ('{"x": 1, "y": 2}', "the JSON does not match the schema: at $: Additional properties are not allowed ('y' was unexpected)"),
    ("{}", "the JSON does not match the schema: at $: 'x' is a required property"),
    ('{"x": NaN}', "the answer is not valid JSON: NaN is not a JSON number"),
    ('{"x": 1, "x": 2}', 'the answer is not valid JSON: the key "x" appears twice in one object'),
    ("{'x': 1}", "the answer is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
])
def test_what_is_wrong_is_said(answer, reason):
    with pytest.raises(InvalidAnswer) as invalid:
        extract(answer, SCHEMA)
    assert invalid.value.reason == reason


def test_a_wrong_value_is_said_before_a_parse_failure():
    with pytest.raises(InvalidAnswer, match=r"^the JSON does not match the schema: at \$.x"):
        extract('{"x": "a"} and then {"x": ', SCHEMA)


def test_json_mode_wants_one_object():
    # Outermost values only: the object inside the array is not taken for the answer.
    assert extract('[{"x": 1}] or {"z": 0}', JSON).value == {"z": 0}
    for answer, kind in (("[1, 2]", "an array"), ('"text"', "a string"), ("42", "a number"), ("null", "null")):
        with pytest.raises(InvalidAnswer, match=f"^the JSON is {kind}, not an object$"):
            extract(answer, JSON)


def test_only_trailing_commas_outside_strings_are_removed():
    assert remove_trailing_commas('{"a": [1, 2,], "b": ", }",\n}') == '{"a": [1, 2], "b": ", }"\n}'
    assert remove_trailing_commas('{"a": "x\\", }"}') is None  # the comma is inside the string
    assert remove_trailing_commas('{"a": 1}') is None


def test_format_of_strings_is_checked():
    dated = StructuredOutput("schema", {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}})
    assert extract('{"d": "2025-03-01"}', dated).value == {"d": "2025-03-01"}
    with pytest.raises(InvalidAnswer, match="is not a 'date'"):
        extract('{"d": "yesterday"}', dated)


# ---- requests ---------------------------------------------------------------------------------


def test_ollama_format():
    assert from_ollama_format(None) is None and from_ollama_format("") is None
    assert from_ollama_format("json").kind == "json"
    spec = from_ollama_format(POINT)
    assert spec.kind == "schema" and spec.schema == POINT and spec.param == "format"
    for bad in ("yaml", 3, True, ["json"]):
        with pytest.raises(InvalidSchema) as refused:
            from_ollama_format(bad)
        assert refused.value.status_code == 400 and refused.value.param == "format"


def test_openai_response_format():
    assert from_openai_response_format(None) is None
    assert from_openai_response_format({"type": "text"}) is None
    assert from_openai_response_format({"type": "json_object"}).kind == "json"
    spec = from_openai_response_format({"type": "json_schema", "json_schema": {
        "name": "point", "description": "a point on a line", "schema": POINT, "strict": True}})
    assert (spec.kind, spec.name, spec.description, spec.strict, spec.param) == ("schema", "point", "a point on a line", True, "response_format")
    assert from_openai_response_format({"type": "json_schema", "json_schema": {"name": "any"}}).kind == "json"
    for bad, message in [
        ("json", "invalid response_format: 'json'; it must be an object with a type"),
        ({"type": "xml"}, "invalid response_format.type: 'xml'"),
        ({"type": "json_schema"}, "response_format.json_schema is required"),
        ({"type": "json_schema", "json_schema": {"schema": []}}, "response_format.json_schema.schema must be a JSON schema"),
        ({"type": "json_schema", "json_schema": {"schema": POINT, "strict": "yes"}}, "response_format.json_schema.strict must be a boolean"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": 5}}}, "invalid JSON schema in response_format.json_schema.schema.type: 5 is not valid"),
    ]:
        with pytest.raises(InvalidSchema) as refused:
            from_openai_response_format(bad)
        assert refused.value.message.startswith(message) and refused.value.param == "response_format"


def test_refs_must_resolve_within_the_schema():
    ok = {"$defs": {"p": POINT}, "type": "object", "properties": {"p": {"$ref": "#/$defs/p"}}}
    assert from_ollama_format(ok).schema == ok
    draft7 = {"$schema": "http://json-schema.org/draft-07/schema#", "definitions": {"p": POINT}, "$ref": "#/definitions/p"}
    assert extract('{"x": 3}', from_ollama_format(draft7)).value == {"x": 3}
    for ref in ("#/$defs/nowhere", "https://example.invalid/schema.json"):
        with pytest.raises(InvalidSchema, match="does not resolve within the schema"):
            from_ollama_format({"properties": {"p": {"$ref": ref}}})


def test_upstream_response_format():
    assert upstream_response_format(JSON) == {"type": "json_object"}
    assert upstream_response_format(SCHEMA) == {"type": "json_schema", "json_schema": {"name": "response", "schema": POINT}}
    named = StructuredOutput("schema", POINT, name="point", description="d", strict=False)
    assert upstream_response_format(named)["json_schema"] == {"name": "point", "schema": POINT, "description": "d", "strict": False}


# ---- the prompt -------------------------------------------------------------------------------


def test_instruction_is_one_line_holding_the_schema():
    text = instruction(SCHEMA)
    assert "\n" not in text and json.dumps(POINT, separators=(",", ":")) in text
    assert "\n" not in instruction(JSON) and "JSON object" in instruction(JSON)
    described = StructuredOutput("schema", POINT, description="The point to plot.")
    assert instruction(described).endswith(" It is The point to plot.")


def test_placement_system_prompt_or_line_or_nothing_for_raw():
    placed = place_instruction(SCHEMA, "hi", "Be brief.", raw=False, system_prompt_settable=True)
    assert placed.line == "hi" and placed.system == "Be brief.\n\n" + instruction(SCHEMA)
    assert "in the system prompt" in placed.warning
    alone = place_instruction(SCHEMA, "hi", None, raw=False, system_prompt_settable=True)
    assert alone.system == instruction(SCHEMA)
    line = place_instruction(SCHEMA, "hi", "Be brief.", raw=False, system_prompt_settable=False, why_not="because")
    assert line.line == "hi " + instruction(SCHEMA) and line.system == "Be brief."
    assert "at the end of the prompt line (because)" in line.warning
    raw = place_instruction(SCHEMA, "hi", None, raw=True, system_prompt_settable=True)
    assert (raw.line, raw.system) == ("hi", None) and raw.warning.startswith("structured output: raw prompt sent as it is")


def _runner(dialect: str, ours: bool) -> Runner:
    return Runner(DIALECTS[dialect], supports_reset=True, our_tokenizer=ours, context_size=2048)


def test_the_planner_places_the_instruction_by_tokenizer():
    request = GenerationRequest(id="r", messages=[ChatMessage("user", "hi")], structured=SCHEMA)
    ours = read_turn(request, "Default.", _runner("b", True))
    assert ours.line == "hi" and ours.system == "Default.\n\n" + instruction(SCHEMA)
    stock = read_turn(request, "Default.", _runner("b", False))
    assert stock.line == "hi " + instruction(SCHEMA) and stock.system == "Default."
    assert "the stock tokenizer script takes no system prompt" in stock.warnings[-1]
    legacy = read_turn(request, None, _runner("a", True))
    assert legacy.line.endswith(instruction(SCHEMA)) and "legacy runner" in legacy.warnings[-1]
    plain = read_turn(GenerationRequest(id="p", messages=[ChatMessage("user", "hi")]), "Default.", _runner("b", True))
    assert (plain.line, plain.system, plain.warnings) == ("hi", "Default.", ())


# ---- attempts -----------------------------------------------------------------------------------


def test_a_retry_is_a_one_shot_request_carrying_its_note():
    request = GenerationRequest(id="abc", messages=[ChatMessage("system", "s"), ChatMessage("user", "q")], structured=SCHEMA)
    assert attempt_request(request, 1, 3, None) is request
    retry = attempt_request(request, 2, 3, "the answer is empty")
    assert retry.id == "abc-2" and retry.kind == "generate" and retry.structured is SCHEMA
    assert retry.messages[0] == ChatMessage("system", "s")
    assert retry.messages[1].content == "q " + retry_note(2, 3, "the answer is empty")
    assert request.messages[1].content == "q"  # the client's request is left as it was
    raw = GenerationRequest(id="raw", messages=[ChatMessage("user", "q")], raw=True, structured=SCHEMA)
    assert attempt_request(raw, 2, 3, "x").messages == raw.messages


def test_the_retry_note_names_the_attempt_and_the_fault_briefly():
    note = retry_note(2, 3, "the answer is not valid JSON:\nExpecting value")
    assert note.startswith("(This is attempt 2 of 3: your previous answer was rejected: the answer is not valid JSON: Expecting value.")
    assert len(retry_note(3, 3, "x" * 1000)) < NOTE_REASON_CHARS + 120


def test_the_combined_record_adds_up_every_attempt():
    request = GenerationRequest(id="r", messages=[ChatMessage("user", "q")])
    first = GenerationResult("stop", prompt_tokens=10, completion_tokens=5, eval_duration=1.0, warnings=["w"])
    second = GenerationResult("stop", prompt_tokens=12, completion_tokens=6, eval_duration=2.0, warnings=["w"])
    result = combined_result([first, second], request, ["structured output: note"], ["the answer is empty"])
    assert (result.prompt_tokens, result.completion_tokens, result.eval_duration) == (22, 11, 3.0)
    assert result.warnings == ["w", "structured output: note",
                               "structured output: valid after 2 attempts (attempt 1: the answer is empty)"]
    assert failure_message("m", "schema", ["a", "b"], 1) == \
        'model "m" answered no JSON valid for the schema in 2 attempts (structured_output_retries=1): attempt 1: a; attempt 2: b'


# ---- the scripted emulator's JSON answers ----------------------------------------------------


def test_scripted_json_answers():
    value = {"x": 1, "label": "l"}
    line = f'Place it. json:MODE {json.dumps(value)} and then some words'
    assert json_reply(line.replace("MODE", "valid")) == json.dumps(value)
    assert json_reply(line.replace("MODE", "fenced")) == "```json\n" + json.dumps(value, indent=2) + "\n```"
    assert json.dumps(value) in json_reply(line.replace("MODE", "prose")) and json_reply(line.replace("MODE", "prose")).startswith("Sure!")
    assert json_reply(line.replace("MODE", "comma")) == '{\n  "x": 1,\n  "label": "l",\n}'
    assert json_reply(line.replace("MODE", "broken")) == json.dumps(value)[:-1]
    retry = line.replace("MODE", "retry")
    assert json_reply(retry) == json.dumps(value)[:-1]
    assert json_reply(retry + " " + retry_note(2, 3, "x")) == json.dumps(value)
    retry2 = line.replace("MODE", "retry2")
    assert json_reply(retry2 + " " + retry_note(2, 3, "x")) == json.dumps(value)[:-1]
    assert json_reply(retry2 + " " + retry_note(3, 3, "x")) == json.dumps(value)
    assert json_reply("no directive here") is None and json_reply("json:valid but no value") is None
    assert reply_text(line.replace("MODE", "valid"), 5, think=False) == json.dumps(value)
    assert reply_text("plain", 2, think=False).startswith("You said: plain.")


@pytest.mark.parametrize("mode", ["valid", "fenced", "prose", "comma"])
def test_every_scripted_mode_but_broken_extracts_to_its_value(mode):
    value = {"x": 4}
    assert extract(json_reply(f"json:{mode} {json.dumps(value)}"), SCHEMA).value == value
    with pytest.raises(InvalidAnswer):
        extract(json_reply(f"json:broken {json.dumps(value)}"), SCHEMA)


def test_a_stray_bracket_or_quote_in_the_prose_does_not_hide_the_json():
    assert extract('Use { carefully: {"x": 1}', SCHEMA).value == {"x": 1}
    assert extract('He said "hi and then {"x": 1}', SCHEMA).value == {"x": 1}
    assert extract('oops ] then {"x": 1}', SCHEMA).value == {"x": 1}


def test_hostile_answers_are_refused_quickly():
    import time

    for answer in ("[" * 100_000, "{" * 100_000 + "x", "a [" * 50_000, "```" * 30_000, '"' * 100_000):
        began = time.monotonic()
        with pytest.raises(InvalidAnswer):
            extract(answer, SCHEMA)
        assert time.monotonic() - began < 2, answer[:10]
    deep = '{"a": ' * 5000 + "{}" + "}" * 5000
    with pytest.raises(InvalidAnswer, match="nested too deeply"):
        extract(deep, StructuredOutput("json"))


@pytest.mark.parametrize(("schema", "message"), [
    ({"$ref": "#"}, "the schema refers to itself without end ($ref)"),
    ({"allOf": [{"$ref": "#"}]}, "the schema refers to itself without end ($ref)"),
    ({"$dynamicRef": "#nowhere"}, "the schema's $ref cannot be resolved"),
    ({"$schema": 5}, "invalid JSON schema in format: "),
])
def test_schemas_that_cannot_validate_anything_are_refused(schema, message):
    with pytest.raises(InvalidSchema) as refused:
        from_ollama_format(schema)
    assert message in refused.value.message and refused.value.status_code == 400


def test_a_recursive_schema_for_trees_is_fine():
    tree = {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#"}}}}
    spec = from_ollama_format(tree)
    assert extract('{"children": [{"children": []}, {}]}', spec).value == {"children": [{"children": []}, {}]}
