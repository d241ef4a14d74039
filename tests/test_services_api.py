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

from metrics_support import metric
from harness.daemon import running_daemon
from harness.models import scripted_model
from harness.net import wait_until
from harness.paths import REPO_ROOT, TOKENIZER_DIR
from llm_service.services.chunker import split_sentences
from llm_service.services.manifest import parse_manifest, render_template
from llm_service.services.run import ESTIMATE_BYTES_PER_TOKEN
from upstream_support import FakeUpstream

ECHO = "scripted-echo"  # the model the examples' "scripted" flavor names
SLOW = "slow-echo"
REMOTE = "fake-remote"
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
    remote = json.loads(mini_manifest())
    remote["flavors"] = {"remote": {**remote["flavors"]["scripted"], "model": REMOTE}}
    write(folder / "remote-mini.json", json.dumps(remote))
    write(folder / "remote-mini.txt", MINI_TEMPLATE)
    write(folder / "greeting.json", json.dumps({
        "type": "single", "description": "one prompt", "fields": [{"name": "who"}],
        "flavors": {"scripted": {"model": ECHO, "totalContextLength": 256, "maxGenerationLength": 64,
                                 "createNewTurnAfter": 64, "temperature": 0, "top_p": 1}}}))
    write(folder / "greeting.txt", "Say hello to {{ who }}.")
    ghost = json.loads(mini_manifest())
    ghost["flavors"] = {"gone": {**ghost["flavors"]["scripted"], "model": "no-such-model"}}
    write(folder / "ghost.json", json.dumps(ghost))
    write(folder / "ghost.txt", MINI_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    upstream = FakeUpstream(tmp_path_factory.mktemp("services-upstream")).start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, services_dir, fake):
    root = tmp_path_factory.mktemp("services-daemon")
    echo_flags = ("--emu_echo unescaped",)
    entries = [
        scripted_model(root, ECHO, reply_words=0, tokens_per_second=0, extra_flags=echo_flags),
        # A second copy, slow enough that a client can leave in the middle of a generation.
        scripted_model(root, SLOW, reply_words=0, tokens_per_second=20, extra_flags=echo_flags),
        # An HTTP upstream: no tokenizer server, so the byte estimate.
        {"model_name": REMOTE, "engine": "openai-http", "base_url": fake.base_url + "/v1",
         "upstream_model": "fake-upstream-model", "retries": "0"},
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
    assert set(schema["components"]["schemas"]["ServiceBody"]["properties"]) == {"fields", "flavor", "stream", "job"}


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
    ("mini", {"fields": "text"}, 400, "invalid request: fields:"),
    ("ghost", {"fields": {"text": "Hello."}}, 404, 'service "ghost", flavor "gone": model "no-such-model" not found'),
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


def test_a_single_service_renders_its_template_once(daemon):
    body = post(daemon, "greeting", {"fields": {"who": "the team"}}).json()
    assert body["type"] == "single" and body["response"] == echo_of("Say hello to the team.")
    assert len(body["chunks"]) == 1 and body["combine"] == []


def test_a_model_without_a_tokenizer_server_is_counted_by_bytes_and_says_so(daemon, fake):
    text = " ".join(f"Remote point {i} is about {WORDS[i % 16]} and {WORDS[(i * 7) % 16]}." for i in range(30))
    seen = len(fake.records()["chat_requests"])
    body = post(daemon, "remote-mini", {"fields": {"text": text}}).json()
    assert body["tokenizer"] == "estimate" and body["model"] == REMOTE
    assert body["warnings"][0] == (f"token counts are estimated ({ESTIMATE_BYTES_PER_TOKEN} bytes a token): "
                                   f'model "{REMOTE}" has no tokenizer server the daemon can ask')
    chunks = body["chunks"]
    assert len(chunks) >= 3
    # Each chunk's prompt reached the upstream as rendered, in order.
    requests = fake.records()["chat_requests"][seen:]
    assert [r["body"]["messages"][-1]["content"] for r in requests] == [
        render_template(MINI_TEMPLATE, "t", {"text": text[c["start"]:c["end"]]}, chunk_number=c["chunk"],
                        chunk_count=len(chunks)) for c in chunks]
    for chunk in chunks:
        assert chunk["input_tokens"] == -(-len(text[chunk["start"]:chunk["end"]].encode()) // ESTIMATE_BYTES_PER_TOKEN)


# ---- 20,000 tokens through the examples ----------------------------------------------------


@pytest.fixture(scope="module")
def long_transcript() -> str:
    text = transcript(20_000)
    assert 20_000 <= tokens(text) <= 20_400
    return text


def check_partition(text: str, chunks: list[dict[str, Any]]) -> None:
    """Every sentence of the input in exactly one chunk, in order, each chunk a slice of whole
    sentences (the chunker's own sentence split: token counts do not move its boundaries)."""
    sentences = split_sentences(text, lambda _: 1)
    covered = [index for chunk in chunks for index in range(*chunk["sentences"])]
    assert covered == list(range(len(sentences)))
    for chunk in chunks:
        first, end = chunk["sentences"]
        assert chunk["start"] == sentences[first].start and chunk["end"] == sentences[end - 1].end
    assert all(not text[a["end"]:b["start"]].strip() for a, b in zip(chunks, chunks[1:]))


def example(name: str) -> tuple[Any, str]:
    manifest = parse_manifest((REPO_ROOT / "services" / f"{name}.json").read_text(), name)
    return manifest, (REPO_ROOT / "services" / f"{name}.txt").read_text()


def test_20000_tokens_through_the_cleanup_service(daemon, long_transcript):
    manifest, template = example("transcript-cleanup")
    flavor = manifest.flavors["scripted"]
    text = long_transcript
    body = post(daemon, "transcript-cleanup", {"fields": {"transcript": text, "language": "English"},
                                               "flavor": "scripted"}).json()
    assert body["done"] is True and body["tokenizer"] == "tokenizer" and body["model"] == ECHO, body
    chunks = body["chunks"]
    assert 20_000 // flavor.create_new_turn_after <= len(chunks) <= flavor.max_new_turns
    check_partition(text, chunks)
    expected = []
    for chunk in chunks:
        # Within the context, by our count and by the model's own.
        assert chunk["prompt_tokens"] + flavor.max_generation_length <= flavor.total_context_length
        assert chunk["model_prompt_tokens"] + flavor.max_generation_length <= flavor.total_context_length
        assert chunk["model_prompt_tokens"] <= chunk["prompt_tokens"]  # the framing reserve is enough
        assert chunk["input_tokens"] <= flavor.create_new_turn_after
        assert chunk["carried_summaries"] == 0 and chunk["finish_reason"] == "stop"
        prompt = render_template(template, "t", {"transcript": text[chunk["start"]:chunk["end"]], "language": "English"},
                                 chunk_number=chunk["chunk"], chunk_count=len(chunks))
        expected.append(echo_of(prompt))
    # Each chunk's prompt reached the model whole (the echo), and the outputs are joined in order.
    assert body["response"] == "\n\n".join(expected)
    assert body["warnings"] == CARD_SAMPLING


def test_20000_tokens_through_the_summary_service(daemon, long_transcript):
    manifest, template = example("meeting-summary")
    flavor = manifest.flavors["scripted"]
    text = long_transcript
    events = stream_events(daemon, "meeting-summary", {"fields": {"transcript": text}, "flavor": "scripted"})
    plan, final = events[0], events[-1]
    assert plan["event"] == "plan" and final["done"] is True
    chunks = final["chunks"]
    assert plan["chunks"] == len(chunks) >= 20_000 // flavor.create_new_turn_after
    check_partition(text, chunks)
    done = [e for e in events if e.get("event") == "chunk_done"]
    maps = [e for e in done if e["step"] == "map"]
    combines = [e for e in done if e["step"] == "combine"]
    assert len(maps) == len(chunks) and combines
    summaries: list[str] = []
    for event, chunk in zip(maps, chunks):
        assert chunk["prompt_tokens"] + flavor.max_generation_length <= flavor.total_context_length
        assert chunk["model_prompt_tokens"] + flavor.max_generation_length <= flavor.total_context_length
        assert chunk["model_prompt_tokens"] <= chunk["prompt_tokens"]
        # The echo is longer than maxGenerationLength: cut there (the card engine stops at the
        # first text flush past num_predict; at the emulator's unpaced speed that can be later).
        assert chunk["finish_reason"] == "length" and chunk["completion_tokens"] >= flavor.max_generation_length
        carried = chunk["carried_summaries"]
        assert carried <= min(flavor.summary_turns, len(summaries))
        prompt = render_template(template, "t", {"transcript": text[chunk["start"]:chunk["end"]], "focus": ""},
                                 summaries[len(summaries) - carried:] if carried else [],
                                 chunk_number=chunk["chunk"], chunk_count=len(chunks))
        # The summary is the echo of this prompt, cut at maxGenerationLength: its start proves
        # the carried summaries and the part's header reached the model.
        assert len(event["response"]) > 100 and echo_of(prompt).startswith(event["response"])
        summaries.append(event["response"])
    # At least one chunk carried the last summaryTurns summaries.
    assert any(c["carried_summaries"] == flavor.summary_turns for c in chunks)
    for step in final["combine"]:
        assert step["prompt_tokens"] + flavor.max_generation_length <= flavor.total_context_length
    last = combines[-1]
    assert last["batches"] == 1 and final["response"] == last["response"]
    first_round = [e for e in combines if e["round"] == 1]
    assert [e["summaries"] for e in first_round][0][0] == 1 and first_round[-1]["summaries"][1] == len(chunks)
    assert any(w.endswith("the answer reached maxGenerationLength (256 tokens) and was cut there")
               for w in final["warnings"])


# ---- hot reload ----------------------------------------------------------------------------


def listed(daemon, name: str) -> dict[str, Any] | None:
    return next((s for s in daemon.get("/api/services")["services"] if s["name"] == name), None)


def test_a_manifest_added_changed_broken_and_removed_while_running(daemon, services_dir):
    assert listed(daemon, "hot") is None
    write(services_dir / "hot.txt", "First: {{ text }}")
    write(services_dir / "hot.json", mini_manifest())
    wait_until(lambda: listed(daemon, "hot"), 10, "hot to be listed")
    assert post(daemon, "hot", {"fields": {"text": "Hi there."}}).json()["response"] == echo_of("First: Hi there.")
    # A template is read at each use: no reload needed.
    write(services_dir / "hot.txt", "Second: {{ text }}")
    assert post(daemon, "hot", {"fields": {"text": "Hi there."}}).json()["response"] == echo_of("Second: Hi there.")
    # A changed manifest: its new description and its new field.
    changed = json.loads(mini_manifest())
    changed["description"] = "changed"
    changed["fields"].append({"name": "tone", "required": False})
    write(services_dir / "hot.json", json.dumps(changed))
    wait_until(lambda: (listed(daemon, "hot") or {}).get("description") == "changed", 10, "the change")
    assert post(daemon, "hot", {"fields": {"text": "Hi.", "tone": "calm"}}).status_code == 200
    # Broken: that service alone is disabled, its error in the list.
    write(services_dir / "hot.json", '{"type": "map", "fields": [}')
    wait_until(lambda: (listed(daemon, "hot") or {}).get("enabled") is False, 10, "hot to be disabled")
    entry = listed(daemon, "hot")
    assert entry["error"].startswith(f"{services_dir}/hot.json: invalid JSON at line 1 column 28"), entry
    assert all(s["enabled"] for s in daemon.get("/api/services")["services"] if s["name"] != "hot")
    refused = post(daemon, "hot", {"fields": {"text": "Hi."}})
    assert refused.status_code == 503 and refused.json()["error"].startswith('service "hot" is disabled: ')
    assert post(daemon, "mini", {"fields": {"text": "Still fine."}}).status_code == 200
    # Repaired, then removed.
    write(services_dir / "hot.json", mini_manifest())
    wait_until(lambda: (listed(daemon, "hot") or {}).get("enabled") is True, 10, "hot to be repaired")
    (services_dir / "hot.json").unlink()
    wait_until(lambda: listed(daemon, "hot") is None, 10, "hot to be removed")
    assert post(daemon, "hot", {"fields": {"text": "Hi."}}).status_code == 404
    # Its template alone is a warning of the listing, not a service.
    assert f"{services_dir}/hot.txt: a template without a manifest (hot.json)" in daemon.get("/api/services")["warnings"]
    (services_dir / "hot.txt").unlink()


def test_a_manifest_without_its_template_is_disabled_with_that_error(daemon, services_dir):
    write(services_dir / "lonely.json", mini_manifest())
    try:
        wait_until(lambda: listed(daemon, "lonely"), 10, "lonely to be listed")
        entry = listed(daemon, "lonely")
        assert entry["enabled"] is False
        assert entry["error"] == f"{services_dir}/lonely.json: its template {services_dir}/lonely.txt is missing"
    finally:
        (services_dir / "lonely.json").unlink()


# ---- cancellation --------------------------------------------------------------------------


def finished(daemon) -> dict[str, float]:
    return {reason: metric(daemon, "axm1_llm_requests_finished_total", model=SLOW, finished_reason=reason)
            for reason in ("stop", "length", "abort", "error")}


MANY_PARTS = " ".join(f"Item {i} concerns the {WORDS[i % 16]} of the {WORDS[(i * 5) % 16]} team." for i in range(40))


def assert_one_abort_and_nothing_after(daemon, before: dict[str, float]) -> None:
    wait_until(lambda: finished(daemon)["abort"] == before["abort"] + 1, 20, "the generation to be aborted")
    time.sleep(3)  # a next chunk would have started by now (the slow model answers in seconds)
    assert finished(daemon) == {**before, "abort": before["abort"] + 1}
    assert metric(daemon, "axm1_llm_requests_running", model=SLOW) == 0


def test_a_streaming_client_that_leaves_cancels_the_generation_and_the_rest(daemon):
    before = finished(daemon)
    with daemon.client(timeout=60) as http:
        with http.stream("POST", "/api/services/mini", json={"fields": {"text": MANY_PARTS}, "flavor": "slow",
                                                             "stream": True}) as reply:
            lines = reply.iter_lines()
            assert json.loads(next(lines))["event"] == "plan"
            start = json.loads(next(lines))
            assert start["event"] == "chunk_start" and start["chunk"] == 1 and start["chunks"] >= 3
    assert_one_abort_and_nothing_after(daemon, before)


def test_a_waiting_client_that_leaves_cancels_the_generation_and_the_rest(daemon):
    before = finished(daemon)
    with pytest.raises(httpx.ReadTimeout):
        post(daemon, "mini", {"fields": {"text": MANY_PARTS}, "flavor": "slow"}, timeout=3)
    assert_one_abort_and_nothing_after(daemon, before)


# ---- failure after the answer began ------------------------------------------------------------


def test_a_runner_crash_mid_run_ends_the_stream_with_an_error_line_and_runs_nothing_more(daemon):
    text = " ".join(f"Crash point {i} is about {WORDS[i % 16]} and {WORDS[(i * 3) % 16]}." for i in range(30))
    daemon.set_faults(crash_after_tokens=5)
    try:
        with daemon.client(timeout=120) as http:
            with http.stream("POST", "/api/services/mini", json={"fields": {"text": text}, "stream": True}) as reply:
                assert reply.status_code == 200
                events = [json.loads(line) for line in reply.iter_lines() if line]
    finally:
        daemon.set_faults()
    assert events[0]["event"] == "plan" and events[0]["chunks"] >= 3
    assert events[1]["event"] == "chunk_start" and events[1]["chunk"] == 1
    assert len(events) == 3 and set(events[2]) == {"error"}, events
    assert "crash" in events[2]["error"].lower() or "signal" in events[2]["error"].lower(), events[2]
    daemon.wait_state(ECHO, "ready", timeout=30)
    # The model recovers, and the service with it.
    assert post(daemon, "mini", {"fields": {"text": "After the crash."}}).json()["response"] == \
        echo_of("Part 1 of 1:\nAfter the crash.")


def test_a_service_run_as_a_job_keeps_its_result(daemon, tmp_path) -> None:
    text = transcript(3000)
    with daemon.client() as client:
        submitted = client.post("/api/services/transcript-cleanup",
                                json={"fields": {"transcript": text}, "flavor": "scripted", "job": True})
        assert submitted.status_code == 202, submitted.text
        job = submitted.json()
        assert job["status"] in ("in_progress", "validating") and job["service"] == "transcript-cleanup"
        deadline = time.monotonic() + 120
        while job["status"] not in ("completed", "failed") and time.monotonic() < deadline:
            time.sleep(0.2)
            job = client.get(f"/api/services/jobs/{job['id']}").json()
        assert job["status"] == "completed", job
        # The same answer a synchronous call gives.
        sync = client.post("/api/services/transcript-cleanup",
                           json={"fields": {"transcript": text}, "flavor": "scripted"}).json()
        assert job["result"]["response"] == sync["response"]
        assert len(job["result"]["chunks"]) == len(sync["chunks"]) > 1
        # Bad requests are refused at once, not as a failed job; a job id is not a batch.
        bad = client.post("/api/services/transcript-cleanup", json={"fields": {}, "job": True})
        assert bad.status_code == 400
        assert client.get(f"/v1/batches/{job['id']}").status_code == 404
        assert client.get("/api/services/jobs/batch_nope").status_code == 404
