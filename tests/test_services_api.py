"""Prompt services end to end (issue 16): the real daemon with a services folder, scripted card
models whose runner echoes the prompt it read (`--emu_echo unescaped`: `You said: <prompt>.`), so
every answer is known exactly and proves what reached the model; real HTTP."""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from tokenizers import Tokenizer

from harness.daemon import running_daemon
from harness.models import scripted_model
from harness.net import wait_until
from harness.paths import REPO_ROOT, TOKENIZER_DIR
from llm_service.services.chunker import split_sentences
from llm_service.services.manifest import parse_manifest, render_template

ECHO = "scripted-echo"  # the model the examples' "scripted" flavor names
SLOW = "slow-echo"
TOKENIZER = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))


CARD_SAMPLING = [f"{name}: fixed at launch by the runner's post_config.json, not applied per request"
                 for name in ("temperature", "top_p")]


def tokens(text: str) -> int:
    return len(TOKENIZER.encode(text, add_special_tokens=False).ids)


def echo_of(prompt: str) -> str:
    """What the scripted runner answers a prompt (no filler words)."""
    return f"You said: {prompt}."


NAMES = ["Alice", "Bob", "Carol", "Dan"]
WORDS = ("budget", "roadmap", "release", "customer", "latency", "hiring", "review", "testing", "design",
         "migration", "security", "vendor", "training", "metrics", "support", "pricing")


def transcript(target_tokens: int, seed: int = 7) -> str:
    """A meeting transcript of about `target_tokens` tokens: speaker turns of a few numbered
    sentences (each sentence unique: `S<n>`), paragraphs within some turns."""
    chooser = random.Random(seed)
    lines: list[str] = []
    number = 0
    total = 0
    while total < target_tokens:
        sentences = []
        for _ in range(chooser.randint(1, 5)):
            number += 1
            words = " ".join(chooser.choice(WORDS) for _ in range(chooser.randint(6, 18)))
            sentences.append(f"S{number} we talked about {words}.")
        body = " ".join(sentences)
        if chooser.random() < 0.15:
            body += "\n\n" + f"S{number + 1} and one more point on {chooser.choice(WORDS)}."
            number += 1
        line = f"{chooser.choice(NAMES)}: {body}"
        lines.append(line)
        total += tokens(line) + 1
    return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


MINI_TEMPLATE = "Part {{ chunk_number }} of {{ chunk_count }}:\n{{ text }}"


def mini_manifest(model: str = ECHO, **flavor: Any) -> str:
    values = {"model": model, "totalContextLength": 512, "maxGenerationLength": 200,
              "createNewTurnAfter": 120, "summaryTurns": 0, "maxNewTurns": 64, "temperature": 0, "top_p": 1}
    values.update(flavor)
    return json.dumps({"type": "map", "description": "echo each part", "fields": [{"name": "text", "chunked": True}],
                       "flavors": {"scripted": values, "slow": {**values, "model": SLOW}}})


@pytest.fixture(scope="module")
def services_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("services")
    for name in ("meeting-summary", "transcript-cleanup"):
        for suffix in (".json", ".txt"):
            shutil.copy(REPO_ROOT / "services" / f"{name}{suffix}", folder)
    write(folder / "mini.json", mini_manifest())
    write(folder / "mini.txt", MINI_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, services_dir):
    root = tmp_path_factory.mktemp("services-daemon")
    echo_flags = ("--emu_echo unescaped",)
    entries = [
        scripted_model(root, ECHO, reply_words=0, tokens_per_second=0, extra_flags=echo_flags),
        # A second copy, slow enough that a client can leave in the middle of a generation.
        scripted_model(root, SLOW, reply_words=0, tokens_per_second=20, extra_flags=echo_flags),
    ]
    with running_daemon(root, entries, "--services-dir", str(services_dir)) as d:
        yield d


def post(daemon, name: str, body: dict[str, Any], timeout: float = 300) -> httpx.Response:
    with daemon.client(timeout=timeout) as http:
        return http.post(f"/api/services/{name}", json=body)


def stream_events(daemon, name: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with daemon.client(timeout=300) as http:
        with http.stream("POST", f"/api/services/{name}", json={**body, "stream": True}) as reply:
            assert reply.status_code == 200, reply.read()
            assert reply.headers["content-type"].startswith("application/x-ndjson")
            return [json.loads(line) for line in reply.iter_lines() if line]


# ---- listing -------------------------------------------------------------------------------


def test_the_list_shows_the_examples_with_their_fields_and_flavors(daemon):
    listing = daemon.get("/api/services")
    by_name = {s["name"]: s for s in listing["services"]}
    assert {"meeting-summary", "transcript-cleanup", "mini"} <= set(by_name)
    summary = by_name["meeting-summary"]
    assert summary["enabled"] is True and summary["error"] is None and summary["type"] == "map-reduce"
    assert [f["name"] for f in summary["fields"]] == ["transcript", "focus"]
    assert summary["fields"][0]["chunked"] is True and summary["fields"][1]["required"] is False
    assert list(summary["flavors"]) == ["card", "scripted"] and summary["default_flavor"] == "card"
    assert summary["flavors"]["scripted"]["model"] == ECHO
    assert summary["flavors"]["card"]["totalContextLength"] == 2048
    assert summary["modified_at"].endswith("Z")


def test_one_service_and_an_unknown_one(daemon):
    with daemon.client() as http:
        one = http.get("/api/services/transcript-cleanup")
        missing = http.get("/api/services/nope")
    assert one.status_code == 200 and one.json()["type"] == "map"
    assert missing.status_code == 404
    assert missing.json()["error"].startswith('service "nope" not found (services: ')


def test_swagger_documents_the_routes_with_their_bodies(daemon):
    schema = daemon.get("/openapi.json")
    post_op = schema["paths"]["/api/services/{name}"]["post"]
    assert post_op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ServiceBody")
    assert post_op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ServiceAnswer")
    assert "/api/services" in schema["paths"]
    assert set(schema["components"]["schemas"]["ServiceBody"]["properties"]) == {"fields", "flavor", "stream"}


# ---- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "body", "status", "error"), [
    ("nope", {"fields": {"text": "x."}}, 404, 'service "nope" not found'),
    ("mini", {"fields": {"text": "Hello there."}, "flavor": "huge"}, 400,
     'flavor "huge": not a flavor of service "mini" (it has: scripted, slow)'),
    ("mini", {"fields": {"text": "Hello.", "colour": "red"}}, 400,
     'field "colour": not an input of this service (it has: text)'),
    ("mini", {"fields": {}}, 400, 'field "text": missing'),
    ("mini", {"fields": {"text": 3}}, 400, 'field "text": must be a string, not int'),
    ("mini", {"fields": {"text": "  \n"}}, 400, 'field "text": empty'),
    ("mini", {"fields": {"text": "x."}, "temperature": 1}, 400, "invalid request: temperature:"),
])
def test_client_errors_have_their_status_and_say_what_is_wrong(daemon, name, body, status, error):
    for stream in (False, True):
        reply = post(daemon, name, {**body, "stream": stream})
        assert reply.status_code == status, reply.text
        assert reply.json()["error"].startswith(error), reply.json()


def test_a_sentence_that_cannot_fit_is_a_400_naming_its_position(daemon):
    long_sentence = " ".join(["word"] * 400) + "."
    text = "A short start. Another short one.\n\nBob: " + long_sentence + " The end."
    reply = post(daemon, "mini", {"fields": {"text": text}})
    assert reply.status_code == 400
    message = reply.json()["error"]
    offset = text.index("Bob:")  # the speaker's label belongs to the turn's first sentence
    assert message.startswith(f'field "text": sentence 3 (at character {offset}, starting \'Bob: word word'), message
    assert "tokens; at most" in message and "split it or pick a flavor with a longer context" in message


# ---- runs ----------------------------------------------------------------------------------


def test_a_small_map_run_sends_each_chunk_and_joins_the_echoes(daemon):
    sentences = [f"Sentence number {i} talks about {WORDS[i % len(WORDS)]} and more things." for i in range(30)]
    text = " ".join(sentences)
    answer = post(daemon, "mini", {"fields": {"text": text}, "flavor": "scripted"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["done"] is True and body["tokenizer"] == "tokenizer" and body["model"] == ECHO
    chunks = body["chunks"]
    assert len(chunks) >= 3
    expected = []
    for chunk in chunks:
        part = text[chunk["start"]:chunk["end"]]
        prompt = render_template(MINI_TEMPLATE, "mini.txt", {"text": part}, chunk_number=chunk["chunk"],
                                 chunk_count=len(chunks))
        expected.append(echo_of(prompt))
        assert chunk["finish_reason"] == "stop"
        assert chunk["prompt_tokens"] + 200 <= 512 and chunk["model_prompt_tokens"] + 200 <= 512
    assert body["response"] == "\n\n".join(expected)
    # The card's own word on the flavor's sampling, passed on once however many chunks said it.
    assert body["warnings"] == CARD_SAMPLING


def test_flavor_choice_runs_on_the_flavors_model(daemon):
    text = "One short sentence. And a second one."
    slow = post(daemon, "mini", {"fields": {"text": text}, "flavor": "slow"}).json()
    assert slow["model"] == SLOW and slow["flavor"] == "slow"
    default = post(daemon, "mini", {"fields": {"text": text}}).json()
    assert default["model"] == ECHO and default["flavor"] == "scripted"
    assert slow["response"] == default["response"] == echo_of("Part 1 of 1:\n" + text)


def test_streaming_gives_a_plan_then_start_and_done_per_chunk_then_the_answer(daemon):
    text = " ".join(f"Point {i} is about {WORDS[i % 16]} and {WORDS[(i * 3) % 16]} today." for i in range(25))
    events = stream_events(daemon, "mini", {"fields": {"text": text}})
    plan, *steps, final = events
    assert plan["event"] == "plan" and plan["chunks"] >= 2 and plan["tokenizer"] == "tokenizer"
    assert [e["event"] for e in steps] == ["chunk_start", "chunk_done"] * plan["chunks"]
    assert [e["chunk"] for e in steps] == [n for n in range(1, plan["chunks"] + 1) for _ in (0, 1)]
    assert final["done"] is True and len(final["chunks"]) == plan["chunks"]
    assert final["response"] == "\n\n".join(e["response"] for e in steps if e["event"] == "chunk_done")
    whole = post(daemon, "mini", {"fields": {"text": text}}).json()
    assert whole["response"] == final["response"]
