"""Model folders shaped like the published ones (a stock tokenizer script that loads its
`*_tokenizer/` folder by a relative name, and a run script that hard-codes the tokenizer's port),
served by a real daemon: with `tokenizer_server` at its default (`auto`) our server stands in for
the script and a request's system prompt reaches the model; with `stock` the script runs and the
answer's warnings say what it could not take."""
from __future__ import annotations

import pytest

from ax_emulator.scripted import reply_text
from harness.daemon import running_daemon
from harness.models import published_model, scripted_model
from harness.paths import TOKENIZER_DIR
from tokenizer_service.prompt_escape import escape_prompt_line

WORDS = 6
LINE = "marker-41 tell me"
SHORT_SYSTEM = "Be brief."
LONG_SYSTEM = "You are a careful assistant who answers in complete sentences and never guesses at facts."
STOCK_SYSTEM_WARNING = ("system prompt not applied: the stock tokenizer script takes no system prompt from the daemon; "
                        "the runner's own system prompt stays")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    entries = [published_model(root, "auto", reply_words=WORDS),
               published_model(root, "stock", reply_words=WORDS, tokenizer_server="stock"),
               # A Qwen2.5-era script: GET /reset only, where the runner POSTs /reset at its start.
               published_model(root, "get-reset", script="get_reset_uid.py", reply_words=WORDS),
               # The demo folders' shape: the script is a launcher of our server.
               scripted_model(root, "launcher", reply_words=WORDS)]
    with running_daemon(root, entries) as d:
        yield d


@pytest.fixture(scope="module")
def rendered_length():
    """Ids of a fresh conversation [system, user] as the SmolLM2 template renders it (the
    stock-shaped script appends " /no_think" to user messages, and so does our server for it)."""
    from transformers import AutoTokenizer  # here, not at collection: it may pull in torch

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)

    def length(system: str) -> int:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": LINE + " /no_think"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tokenizer.encode(text, add_special_tokens=False))
    return length


def chat(daemon, model: str, system: str) -> tuple[dict, int]:
    """A one-turn chat with `system`; the answer and the runner's context used after it."""
    with daemon.client(timeout=60) as http:
        reply = http.post("/api/chat", json={"model": model, "stream": False, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": LINE}]})
        assert reply.status_code == 200, reply.text
        status = http.get(f"/api/status/{model}").json()
    return reply.json(), status["context"]["used"]


def test_auto_runs_our_server_and_a_request_system_prompt_reaches_the_model(daemon, rendered_length):
    short, short_used = chat(daemon, "auto", SHORT_SYSTEM)
    long, long_used = chat(daemon, "auto", LONG_SYSTEM)
    for answer in (short, long):
        assert answer["message"]["content"] == reply_text(LINE, WORDS, think=False)
        assert not answer.get("warnings"), answer.get("warnings")
    # The runner's own count: the longer system prompt took exactly its extra tokens in the context.
    assert long_used - short_used == rendered_length(LONG_SYSTEM) - rendered_length(SHORT_SYSTEM) > 10
    with daemon.client() as http:
        status = http.get("/api/status/auto").json()
    assert status["tokenizer_server"] == ("builtin: on smollm2_tokenizer/, which the script loads: tokenizer files "
                                          "and a chat template are there")
    assert status["newlines"] == "restored by the tokenizer server"


def test_stock_runs_the_script_and_says_the_system_prompt_was_not_applied(daemon):
    short, short_used = chat(daemon, "stock", SHORT_SYSTEM)
    long, long_used = chat(daemon, "stock", LONG_SYSTEM)
    for answer in (short, long):
        assert answer["message"]["content"] == reply_text(LINE, WORDS, think=False)
        assert STOCK_SYSTEM_WARNING in answer["warnings"]
    assert long_used == short_used  # neither reached the model: the script's own prompt stayed
    with daemon.client() as http:
        status = http.get("/api/status/stock").json()
    assert status["tokenizer_server"].startswith("stock: the descriptor asks for the folder's own script; it has none "
                                                 "of our extensions: a request's system prompt, history, newlines")
    assert status["newlines"].startswith("replaced with spaces")


def generate(daemon, model: str, prompt: str) -> dict:
    with daemon.client(timeout=60) as http:
        reply = http.post("/api/generate", json={"model": model, "prompt": prompt, "stream": False})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_auto_takes_newlines_and_history_where_the_script_cannot(daemon):
    ours = generate(daemon, "auto", "two\nlines")
    # The runner reads one line: our server restores the newline the daemon escaped.
    assert ours["response"] == reply_text(escape_prompt_line("two\nlines"), WORDS, think=False)
    assert not ours.get("warnings")
    stock = generate(daemon, "stock", "two\nlines")
    assert stock["response"] == reply_text("two lines", WORDS, think=False)
    assert stock["warnings"] == ["newlines replaced with spaces: the stock tokenizer script cannot restore them"]

    history = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "an answer"},
               {"role": "user", "content": "now"}]
    with daemon.client(timeout=60) as http:
        ours = http.post("/api/chat", json={"model": "auto", "stream": False, "messages": history}).json()
        stock = http.post("/api/chat", json={"model": "stock", "stream": False, "messages": history}).json()
    assert ours["message"]["content"] == reply_text("now", WORDS, think=False) and not ours.get("warnings")
    assert any(w.startswith("history flattened into the prompt") for w in stock["warnings"])

    with daemon.client(timeout=60) as http:
        ours = http.post("/api/generate", json={"model": "auto", "prompt": "raw line", "raw": True, "stream": False}).json()
        stock = http.post("/api/generate", json={"model": "stock", "prompt": "raw line", "raw": True, "stream": False}).json()
    assert ours["response"] == reply_text("raw line", WORDS, think=False) and not ours.get("warnings")
    assert stock["warnings"][0].startswith("raw: the stock tokenizer script applies the chat template to every prompt")


def test_a_script_that_launches_our_server_is_said_to_be_ours(daemon):
    generate(daemon, "launcher", "hello")
    with daemon.client() as http:
        status = http.get("/api/status/launcher").json()
    assert status["tokenizer_server"] == (
        "stock: the folder's own script runs: the script names no tokenizer folder, and there is no *_tokenizer/ "
        "folder; the script starts our tokenizer server (it answers /capabilities)")


def test_a_conversation_continues_turn_by_turn_on_our_server(daemon):
    """Held ids cut as the script cuts them: the runner's context and our server's account of each
    turn still agree, so every turn continues the conversation (no re-prefill of the history)."""
    messages = [{"role": "system", "content": SHORT_SYSTEM}]
    used = []
    with daemon.client(timeout=60) as http:
        for line in ("first question", "second question", "third question"):
            messages.append({"role": "user", "content": line})
            answer = http.post("/api/chat", json={"model": "auto", "stream": False, "messages": messages}).json()
            assert answer["message"]["content"] == reply_text(line, WORDS, think=False)
            assert not answer.get("warnings")
            messages.append(answer["message"])
            status = http.get("/api/status/auto").json()
            used.append((answer["prompt_eval_count"], status["context"]["used"]))
            assert status["context"]["conversation_messages"] == len(messages) - 1
    # Each later turn prefilled only its own line (the runner's count), not the history again.
    (_, first_used), (second, second_used), (third, _) = used
    assert 0 < second < 20 and 0 < third < 20 and first_used + second < second_used, used


def test_a_folder_whose_script_serves_only_get_reset_runs_with_ours(daemon):
    """The runner POSTs /reset with its system prompt at start; the Qwen2.5-era script answers
    that with an error body. Ours, standing in for it, serves both forms."""
    body = generate(daemon, "get-reset", "hello there")
    assert body["response"] == reply_text("hello there", WORDS, think=False) and not body.get("warnings")
    with daemon.client() as http:
        status = http.get("/api/status/get-reset").json()
    assert status["tokenizer_server"].startswith("builtin: on smollm2_tokenizer/, which the script loads")
