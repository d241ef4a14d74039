"""Our tokenizer server standing in for a folder's stock script answers the runner byte for byte
as the script does: both run as real processes on the same tokenizer files (SmolLM2's, in the
folder the script names), our server with the defaults read from the script's text, and every
reply body of multi-turn conversations is compared."""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import net
from tokenizer_service.stock_script import choose_server, folder_facts, server_arguments
import tokenizer_support
from tokenizer_support import SMOLLM2_TOKENIZER

STOCK_DIR = Path(__file__).parent / "data" / "stock_tokenizers"
START_TIMEOUT = 90.0
PIRATE = "You are a pirate. Answer like one."
# (user line, the runner's reply to it, which goes back as the next turn's last_reply)
CONVERSATION = [
    ("hello", "Hello! How can I help you today?"),
    ("What is 2+2? Explain it   with spaces.", " It is 4: two and two make four."),
    ("And in French?", "Quatre."),
]
TWO_TOKENIZERS = "two_tokenizers_uid.py"  # generated from post_reset_uid.py
POST_RESET = ("post_reset_uid.py", TWO_TOKENIZERS)
THINKING_REPLIES = ["<think>\n\n</think>\n\nHi there.", "<think>\nLet me think: it is 4.\n</think>\n\nFour.", "Plain."]


@contextlib.contextmanager
def serving(command: list[str], folder: Path) -> Iterator[str]:
    with tokenizer_support.serving(command, folder, "/bos_id", START_TIMEOUT) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A folder shaped like a published one: the scripts, and the tokenizer folder they name."""
    root = tmp_path_factory.mktemp("published")
    shutil.copytree(SMOLLM2_TOKENIZER, root / "smollm2_tokenizer")
    for script in STOCK_DIR.glob("*.py"):
        shutil.copy(script, root / script.name)
    # As Qwen3's published script: encode with one tokenizer, render with another's template
    # (here one that writes the roles in capitals, so that the wrong template shows).
    other = root / "qwen_template_tokenizer"
    shutil.copytree(SMOLLM2_TOKENIZER, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("message['role']", "(message['role'] | upper)")
    assert "| upper" in config["chat_template"]
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    text = (STOCK_DIR / "post_reset_uid.py").read_text()
    text = text.replace("        self.held = []\n        self.pending = []",
                        '        self.renderer = AutoTokenizer.from_pretrained("qwen_template_tokenizer")\n'
                        "        self.held = []\n        self.pending = []")
    text = text.replace("self.tokenizer.apply_chat_template", "self.renderer.apply_chat_template")
    assert "self.renderer = " in text and "self.renderer.apply_chat_template" in text
    (root / TWO_TOKENIZERS).write_text(text)
    return root


def ours_command(folder: Path, script: str) -> list[str]:
    """Our server as the tokenizer service starts it for `auto` on this folder."""
    facts = folder_facts(folder, (folder / script).read_text())
    assert choose_server("auto", facts).describe().startswith("builtin: on smollm2_tokenizer/, which the script loads")
    assert (facts.template_dir is not None) == (script == TWO_TOKENIZERS)
    return [sys.executable, *server_arguments(facts)]


@pytest.fixture(scope="module", params=["get_reset_uid.py", "post_reset_uid.py", TWO_TOKENIZERS])
def pair(request, folder):
    script = request.param
    with serving([sys.executable, script], folder) as stock, serving(ours_command(folder, script), folder) as ours:
        with net.client(base_url=stock, timeout=30) as stock_http, net.client(base_url=ours, timeout=30) as ours_http:
            yield script, Pair(stock_http, ours_http)


class Pair:
    """The same request to both servers; every reply body compared byte for byte."""

    def __init__(self, stock, ours) -> None:
        self.stock, self.ours = stock, ours

    def sessions(self) -> tuple[str, str]:
        """A session on each (uids differ by nature: only the shape is compared)."""
        stock, ours = self.stock.get("/get_uid").json(), self.ours.get("/get_uid").json()
        assert list(stock) == list(ours) == ["uid"]
        return stock["uid"], ours["uid"]

    def both(self, method: str, path: str, uids: tuple[str, str], body: dict | None = None) -> bytes:
        """The request with each server's own uid (in the query of a GET, else in the body)."""
        replies = []
        for http, uid in zip((self.stock, self.ours), uids):
            if method == "GET":
                reply = http.get(path, params={"uid": uid})
            else:
                reply = http.post(path, json={"uid": uid, **(body or {})})
            assert reply.status_code == 200, (path, reply.text)
            replies.append(reply.content)
        assert replies[1] == replies[0], (method, path, body)
        return replies[1]


def converse(pair: Pair, uids: tuple[str, str], turns: list[tuple[str, str]], tokenizer_url_ids) -> None:
    last_reply = None
    for line, reply in turns:
        body = {"text": line} if last_reply is None else {"text": line, "last_reply": last_reply}
        pair.both("POST", "/encode", uids, body)
        ids = tokenizer_url_ids(reply)
        for start in range(0, len(ids), 3):  # a runner decodes every 3 tokens
            pair.both("POST", "/decode", uids, {"token_ids": ids[start:start + 3]})
        last_reply = reply


@pytest.fixture(scope="module")
def plain_ids(pair):
    _, both = pair
    return lambda text: both.ours.post("/tokenize", json={"text": text}).json()["token_ids"]


def test_a_runner_that_never_resets_gets_the_same_ids(pair, plain_ids):
    _, both = pair
    uids = both.sessions()
    both.both("GET", "/bos_id", uids)
    both.both("GET", "/eos_id", uids)
    converse(both, uids, CONVERSATION, plain_ids)


def test_a_runner_that_resets_gets_the_same_ids(pair, plain_ids):
    script, both = pair
    uids = both.sessions()
    if script == "get_reset_uid.py":
        assert both.both("GET", "/reset", uids) == b'{"success": true}'
    else:
        reset = both.both("POST", "/reset", uids, {"system_prompt": PIRATE})
        assert reset.startswith(b'{"token_ids": [1, ')
    converse(both, uids, CONVERSATION, plain_ids)
    if script in POST_RESET:
        both.both("POST", "/reset", uids)  # no system prompt: the script's own
        converse(both, uids, CONVERSATION[:2], plain_ids)


def test_thinking_replies_and_split_characters_come_out_the_same(pair, plain_ids):
    script, both = pair
    uids = both.sessions()
    if script not in POST_RESET:
        # Where ours differs on purpose: the Qwen2.5-era script sends a think block back into the
        # conversation (its models write none), and decodes a split character to U+FFFD.
        both.both("POST", "/encode", uids, {"text": "question"})
        with pytest.raises(AssertionError):
            both.both("POST", "/encode", uids, {"text": "again", "last_reply": THINKING_REPLIES[1]})
        with pytest.raises(AssertionError):
            both.both("POST", "/decode", uids, {"token_ids": plain_ids("東")[:1]})
        return
    both.both("POST", "/reset", uids, {"system_prompt": PIRATE})
    converse(both, uids, [(f"question {i}", reply) for i, reply in enumerate(THINKING_REPLIES)], plain_ids)
    # Characters of several bytes split across /decode calls: "" until complete, on both.
    ids = plain_ids("héllo 東京 🙂 done")
    for start in range(0, len(ids), 1):
        both.both("POST", "/decode", uids, {"token_ids": ids[start:start + 1]})


def test_the_no_think_suffix_reaches_the_template_unless_thinking_is_asked_for(pair):
    script, both = pair
    uids = both.sessions()
    text = both.both("POST", "/encode", uids, {"text": "hi"})
    ids = json.loads(text)["token_ids"]
    rendered = both.ours.post("/decode", json={"token_ids": ids}).json()["text"]
    assert ("hi /no_think" in rendered) == (script in POST_RESET)
    assert "You are Qwen, created by Alibaba Cloud." in rendered  # the script's own system prompt
    assert ("<|im_start|>SYSTEM" in rendered) == (script == TWO_TOKENIZERS)  # the template it renders with
    if script in POST_RESET:
        assert both.ours.post("/config", json={"thinking": True}).status_code == 200
        uid = both.ours.get("/get_uid").json()["uid"]
        ids = both.ours.post("/encode", json={"uid": uid, "text": "hi"}).json()["token_ids"]
        assert "/no_think" not in both.ours.post("/decode", json={"token_ids": ids}).json()["text"]
        both.ours.post("/config", json={"thinking": None})


def test_without_the_scripts_defaults_our_server_answers_otherwise(folder):
    """The comparison tells the servers apart: ours on the same files but without the defaults
    read from the script (its system prompt, its /no_think, its cut) gives other ids."""
    plain = [sys.executable, "-m", "tokenizer_service.server", "--tokenizer", str(folder / "smollm2_tokenizer")]
    with serving([sys.executable, "post_reset_uid.py"], folder) as stock, serving(plain, folder) as ours:
        with net.client(base_url=stock, timeout=30) as stock_http, net.client(base_url=ours, timeout=30) as ours_http:
            both = Pair(stock_http, ours_http)
            with pytest.raises(AssertionError):
                both.both("POST", "/encode", both.sessions(), {"text": "hello"})
            uids = both.sessions()
            with pytest.raises(AssertionError):
                both.both("POST", "/reset", uids, {"system_prompt": PIRATE})


def test_a_runners_post_reset_opens_with_the_scripts_prompt_where_the_script_has_no_post_reset(pair):
    """The Qwen2.5-era script answers a runner's POST /reset with an error: the runner's system
    prompt never reaches the model, the script's own does. Ours takes the POST (a runner gets its
    ids) and opens with the script's prompt too; the daemon's /config still sets its own."""
    script, both = pair
    uid = both.ours.get("/get_uid").json()["uid"]
    ids = both.ours.post("/reset", json={"uid": uid, "system_prompt": PIRATE}).json()["token_ids"]
    opened = both.ours.post("/decode", json={"token_ids": ids}).json()["text"]
    assert ("You are Qwen" in opened) == (script == "get_reset_uid.py")
    assert (PIRATE in opened) == (script != "get_reset_uid.py")
    if script == "get_reset_uid.py":
        stock_uid = both.stock.get("/get_uid").json()["uid"]
        refused = both.stock.post("/reset", json={"uid": stock_uid, "system_prompt": PIRATE})
        assert refused.json() == {"error": "Invalid POST endpoint"}
        try:
            assert both.ours.post("/config", json={"system_prompt": "Daemon's."}).status_code == 200
            ids = both.ours.post("/reset", json={"uid": uid, "system_prompt": PIRATE}).json()["token_ids"]
            assert "Daemon's." in both.ours.post("/decode", json={"token_ids": ids}).json()["text"]
        finally:
            both.ours.post("/config", json={"system_prompt": None})
