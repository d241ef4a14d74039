"""Service manifests: comments, per-field errors, templates, and a catalog where a broken manifest
disables only itself; pure, plus the two worked examples of services/."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_service.services.chunker import ChunkingError, combine_batches, plan_chunks
from llm_service.services.manifest import (
    Manifest, ManifestError, ManifestFile, check_inputs, check_template, chunk_limits, load_catalog,
    parse_manifest, render_template, strip_json_comments,
)
from llm_service.services.prompts import chunk_prompt, combine_costs, combine_prompt, service_limits

REPO = Path(__file__).resolve().parent.parent


def flavor(**changes: object) -> dict[str, object]:
    values: dict[str, object] = {
        "model": "smollm2-135m", "totalContextLength": 2048, "maxGenerationLength": 256,
        "createNewTurnAfter": 1000, "summaryTurns": 2, "maxNewTurns": 32, "temperature": 0.3, "top_p": 0.9,
    }
    values.update(changes)
    return {key: value for key, value in values.items() if value is not None}


def manifest(**changes: object) -> dict[str, object]:
    values: dict[str, object] = {
        "type": "map-reduce", "description": "summarise", "backend": "local",
        "fields": [{"name": "transcript", "chunked": True}], "flavors": {"small": flavor()},
    }
    values.update(changes)
    return values


def error_of(data: object, source: str = "services/x.json") -> str:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(json.dumps(data), source)
    return str(caught.value)


def test_comments_are_stripped_outside_strings_and_kept_inside() -> None:
    text = """{
      // a line comment
      "type": "single", /* a block
      comment over lines */ "description": "see http://x/y // not a comment /* nor this */",
      "fields": [{"name": "text", "description": "a \\"quoted // part\\" too"}],
      "flavors": {"f": {"model": "m", "totalContextLength": 2048, "maxGenerationLength": 100,
                        "createNewTurnAfter": 500}}  // trailing
    }"""
    parsed = parse_manifest(text, "s.json")
    assert parsed.description == "see http://x/y // not a comment /* nor this */"
    assert parsed.fields[0].description == 'a "quoted // part" too'
    # Line numbers survive: the stripped text has the same lines.
    assert strip_json_comments(text).count("\n") == text.count("\n")


def test_json_error_names_file_line_and_column() -> None:
    text = '{\n  // fine\n  "type": "single",,\n}'
    with pytest.raises(ManifestError, match=r"services/bad\.json: invalid JSON at line 3 column"):
        parse_manifest(text, "services/bad.json")


def test_unclosed_block_comment_is_an_error() -> None:
    with pytest.raises(ManifestError, match=r"comment opened at line 2 is never closed"):
        parse_manifest('{\n /* open\n "type": "single"}', "s.json")


def test_a_good_manifest_and_its_defaults() -> None:
    parsed = parse_manifest(json.dumps(manifest(flavors={"small": flavor(), "big": flavor(model="other")})), "x")
    assert parsed.default_flavor == "small" and parsed.chunked_field == "transcript"
    small = parsed.flavors["small"]
    assert (small.total_context_length, small.max_generation_length, small.create_new_turn_after,
            small.summary_turns, small.max_new_turns) == (2048, 256, 1000, 2, 32)


@pytest.mark.parametrize(("data", "expected"), [
    (manifest(type="chunky"), 'field "type": Input should be \'single\', \'map\' or \'map-reduce\''),
    ({k: v for k, v in manifest().items() if k != "fields"}, 'field "fields": missing'),
    (manifest(flavors={}), 'field "flavors": '),
    (manifest(flavors={"small": flavor(temperature=2.5)}), 'field "flavors.small.temperature": Input should be less than or equal to 2'),
    (manifest(flavors={"small": flavor(top_p=0)}), 'field "flavors.small.top_p": Input should be greater than 0'),
    (manifest(flavors={"small": flavor(totalContextLength=None)}), 'field "flavors.small.totalContextLength": missing'),
    (manifest(flavors={"small": flavor(maxGenerationLength="many")}), 'field "flavors.small.maxGenerationLength": Input should be a valid integer'),
    (manifest(flavors={"small": flavor(maxGenerationLength=2048)}), "maxGenerationLength (2048) must be below totalContextLength (2048)"),
    (manifest(flavors={"small": flavor(createNewTurnAfter=1900)}), "createNewTurnAfter (1900) must be at most totalContextLength - maxGenerationLength (1792)"),
    (manifest(flavors={"small": flavor(summaryTurns=-1)}), 'field "flavors.small.summaryTurns": Input should be greater than or equal to 0'),
    (manifest(flavors={"small": flavor(maxTurns=3)}), 'field "flavors.small.maxTurns": unknown field'),
    (manifest(fields=[{"name": "transcript"}]), 'needs exactly one field with "chunked": true, found 0'),
    (manifest(fields=[{"name": "a", "chunked": True}, {"name": "a"}]), "duplicate name 'a'"),
    (manifest(fields=[{"name": "summaries", "chunked": True}]), 'field "fields[0]": name \'summaries\' is taken'),
    (manifest(fields=[{"name": "two words", "chunked": True}]), 'field "fields[0]": name \'two words\' must be a template variable name'),
    (manifest(type="single"), '"transcript" is chunked but a "single" service'),
    ([manifest()], "expected a JSON object, found list"),
])
def test_each_problem_names_its_field(data: object, expected: str) -> None:
    message = error_of(data)
    assert message.startswith("services/x.json: ")
    assert expected in message


def test_every_wrong_field_is_reported_at_once() -> None:
    message = error_of(manifest(type="x", flavors={"small": flavor(temperature=9, top_p=7)}))
    assert all(name in message for name in ('"type"', '"flavors.small.temperature"', '"flavors.small.top_p"'))


def test_template_renders_fields_and_summaries_and_refuses_unknown_names() -> None:
    template = "{% for s in summaries %}[{{ s }}]{% endfor %} {{ transcript }} ({{ chunk_number }}/{{ chunk_count }})"
    assert render_template(template, "t.txt", {"transcript": "hi"}, ["a", "b"], chunk_number=2,
                           chunk_count=3) == "[a][b] hi (2/3)"
    # A misspelt variable is an error, not an empty string that drops the user's text.
    with pytest.raises(ManifestError, match=r"t\.txt: template error: 'transcrpt' is undefined"):
        render_template("{{ transcrpt }}", "t.txt", {"transcript": "hi"})
    with pytest.raises(ManifestError, match=r"t\.txt: template error at line 2"):
        check_template("ok\n{% if %}", "t.txt")


def test_template_is_sandboxed() -> None:
    with pytest.raises(ManifestError, match="template error"):
        render_template("{{ transcript.__class__.__mro__[1].__subclasses__() }}", "t.txt", {"transcript": "x"})


def test_inputs_are_checked_per_field() -> None:
    parsed = parse_manifest(json.dumps(manifest(fields=[
        {"name": "transcript", "chunked": True}, {"name": "focus", "required": False}])), "x")
    assert check_inputs(parsed, {"transcript": "t"}) == {"transcript": "t", "focus": ""}
    with pytest.raises(ManifestError, match='field "transcript": missing'):
        check_inputs(parsed, {"focus": "x"})
    with pytest.raises(ManifestError, match='field "topic": not an input of this service'):
        check_inputs(parsed, {"transcript": "t", "topic": "x"})
    with pytest.raises(ManifestError, match='field "transcript": must be a string, not int'):
        check_inputs(parsed, {"transcript": 3})


def test_a_broken_manifest_beside_a_good_one_disables_only_itself() -> None:
    manifests = {
        "good.json": ManifestFile(json.dumps(manifest()), 1.0),
        "broken.json": ManifestFile('{"type": "single", // unfinished\n', 1.0),
        "wrong.json": ManifestFile(json.dumps(manifest(flavors={"small": flavor(top_p=5)})), 1.0),
        "lonely.json": ManifestFile(json.dumps(manifest()), 1.0),
        "Bad Name.json": ManifestFile("{}", 1.0),
    }
    catalog = load_catalog(manifests, {"good.txt", "broken.txt", "wrong.txt", "orphan.txt"}, "services")
    assert set(catalog.usable()) == {"good"}
    assert catalog.services["broken"].error.startswith("services/broken.json: invalid JSON at line")
    assert 'field "flavors.small.top_p"' in catalog.services["wrong"].error
    assert catalog.services["lonely"].error == "services/lonely.json: its template services/lonely.txt is missing"
    assert any("Bad Name.json: not a service" in warning for warning in catalog.warnings)
    assert any("orphan.txt: a template without a manifest" in warning for warning in catalog.warnings)


def test_a_reload_parses_only_what_changed() -> None:
    first = load_catalog({"a.json": ManifestFile(json.dumps(manifest()), 1.0),
                          "b.json": ManifestFile(json.dumps(manifest()), 1.0)}, {"a.txt", "b.txt"})
    # Same mtime: kept as it was even though the text differs (the watcher did not see a change).
    second = load_catalog({"a.json": ManifestFile("not read", 1.0),
                           "b.json": ManifestFile(json.dumps(manifest(type="chunky")), 2.0)},
                          {"a.txt", "b.txt"}, previous=first)
    assert second.services["a"] is first.services["a"]
    assert second.services["b"].manifest is None and '"type"' in second.services["b"].error
    # A template removed disables its service even though the manifest did not change.
    third = load_catalog({"a.json": ManifestFile(json.dumps(manifest()), 1.0)}, {"b.txt"}, previous=second)
    assert third.services["a"].error.endswith("services/a.txt is missing") and "b" not in third.services


@pytest.mark.parametrize("name", ["transcript-cleanup", "meeting-summary"])
def test_the_worked_examples_parse_and_render(name: str) -> None:
    folder = REPO / "services"
    text = (folder / f"{name}.json").read_text(encoding="utf-8")
    assert "//" in text  # the examples show the comments a manifest may have
    catalog = load_catalog({f"{name}.json": ManifestFile(text, 0.0)}, {f"{name}.txt"})
    parsed = catalog.usable()[name]
    inputs = check_inputs(parsed, {"transcript": "Alice: We ship on Friday. Bob: Agreed."})
    template = (folder / f"{name}.txt").read_text(encoding="utf-8")
    prompt = render_template(template, name, inputs, ["Earlier: the budget was approved."])
    assert "Alice: We ship on Friday. Bob: Agreed." in prompt
    assert ("the budget was approved" in prompt) == (parsed.type == "map-reduce")
    if parsed.type == "map-reduce":
        combined = render_template(template, name, {**inputs, "transcript": ""}, ["one", "two"], combine=True)
        assert "one" in combined and "two" in combined and "Transcript:" not in combined


def test_chunk_limits_of_a_flavor() -> None:
    summary = parse_manifest(json.dumps(manifest()), "x")
    limits = chunk_limits(summary, "small", template_tokens=90)
    assert (limits.total_context, limits.max_generation, limits.create_new_turn_after,
            limits.summary_turns, limits.max_new_turns, limits.template_tokens) == (2048, 256, 1000, 2, 32, 90)
    assert limits.room(2) == 2048 - 256 - 90 - 2 * 256
    # A clean-up carries no summaries, whatever its flavor says.
    cleanup = parse_manifest(json.dumps(manifest(type="map")), "x")
    assert chunk_limits(cleanup, "small", template_tokens=90).summary_turns == 0


def example(name: str) -> tuple[Manifest, str]:
    folder = REPO / "services"
    parsed = parse_manifest((folder / f"{name}.json").read_text(encoding="utf-8"), name)
    return parsed, (folder / f"{name}.txt").read_text(encoding="utf-8")


def words(text: str) -> int:
    return len(text.split())


def long_transcript(turns: int) -> str:
    return "\n".join(f"{'Alice' if n % 2 else 'Bob'}: " + " ".join(
        f"Point {n}.{k} is about the budget and the plan." for k in range(8)) for n in range(turns))


def test_a_long_meeting_through_the_summary_example_every_prompt_fits() -> None:
    parsed, template = example("meeting-summary")
    inputs = check_inputs(parsed, {"transcript": long_transcript(260)})  # ~19,000 words
    limits = service_limits(template, "meeting-summary.txt", parsed, "card", inputs, words)
    chunks = plan_chunks(inputs["transcript"], limits, words)
    assert len(chunks) > 10
    summaries: list[str] = []
    for number, chunk in enumerate(chunks, start=1):
        prompt = chunk_prompt(template, "t", parsed, "card", inputs, chunk, number, len(chunks), summaries, words)
        assert chunk.text in prompt.text and prompt.tokens + 256 <= 2048
        assert prompt.carried_summaries == min(2, number - 1)
        summaries.append(f"summary {number} " + "word " * 200)
    # Longer summaries than reserved: the oldest gives way, the prompt still fits.
    long_ones = ["old " * 500, "new " * 500]
    prompt = chunk_prompt(template, "t", parsed, "card", inputs, chunks[2], 3, len(chunks), long_ones, words)
    assert prompt.carried_summaries == 1 and "new new" in prompt.text and "old old" not in prompt.text
    assert prompt.tokens + 256 <= 2048
    # The combine step: batches that fit, each batch's prompt within the context.
    fixed, per_summary = combine_costs(template, "t", parsed, inputs, words)
    assert fixed > 10 and per_summary == 2  # "Part N:"
    room = 2048 - 256 - fixed
    batches = combine_batches([words(s) + per_summary for s in summaries], room)
    assert len(batches) > 1 and [i for batch in batches for i in batch] == list(range(len(summaries)))
    for batch in batches:
        combined = combine_prompt(template, "t", parsed, "card", inputs, summaries[batch.start:batch.stop], words)
        assert combined.tokens + 256 <= 2048 and "Combine them" in combined.text
    with pytest.raises(ChunkingError, match="combine fewer at once"):
        combine_prompt(template, "t", parsed, "card", inputs, summaries, words)


def test_the_cleanup_example_carries_no_summaries() -> None:
    parsed, template = example("transcript-cleanup")
    inputs = check_inputs(parsed, {"transcript": long_transcript(40)})
    limits = service_limits(template, "t", parsed, "card", inputs, words)
    assert limits.summary_turns == 0
    chunks = plan_chunks(inputs["transcript"], limits, words)
    prompts = [chunk_prompt(template, "t", parsed, "card", inputs, chunk, n, len(chunks), ["ignored"], words)
               for n, chunk in enumerate(chunks, start=1)]
    assert all(p.carried_summaries == 0 and "ignored" not in p.text and p.tokens + 900 <= 2048 for p in prompts)
