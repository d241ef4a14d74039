"""What the apps send, end to end (issue 13, sections 4 and 5): names with tags, pull, show, sizes,
num_ctx, raw prompts and fill-in-the-middle. The real daemon with scripted card models (answers
are exact: the emulator echoes the line it read) and a fake OpenAI-compatible upstream, driven
through the official `ollama` and `openai` clients as the apps use them; raw HTTP only where the
clients drop a field (Ollama's `warnings`)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import ollama
import openai
import pytest
from tokenizers import Tokenizer

from ax_emulator.scripted import reply_text
from harness.daemon import running_daemon
from harness.models import INFILL_TOKENS, infill_tokenizer, scripted_model
from harness.paths import TOKENIZER_DIR
from tokenizer_service.prompt_escape import escape_prompt_line
from upstream_support import FakeUpstream

WORDS = 6
MIB = 1024 * 1024
EMULATED_CMM_MB = 600  # what an emulated runner claims by default (ax-emulator --emu_cmm_mb)


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    upstream = FakeUpstream(tmp_path_factory.mktemp("apps-upstream")).start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("apps")


@pytest.fixture(scope="module")
def daemon(root, fake):
    tokenizers = root / "tokenizers"
    entries = [
        scripted_model(root, "echo", reply_words=WORDS, extra_flags=("--tokens_embed_size 576",)),
        scripted_model(root, "thinker", reply_words=WORDS, think=True),
        scripted_model(root, "coder", reply_words=WORDS, tokenizer_dir=infill_tokenizer(tokenizers / "qwen", "qwen")),
        scripted_model(root, "star", reply_words=WORDS,
                       tokenizer_dir=infill_tokenizer(tokenizers / "starcoder", "starcoder")),
        scripted_model(root, "stock", reply_words=WORDS, stock_tokenizer=True),
        # A B runner without `reset`: an empty context for a raw prompt costs a restart.
        scripted_model(root, "plain-b", dialect="b", reply_words=WORDS),
        {"model_name": "fake-remote", "engine": "openai-http", "base_url": fake.base_url + "/v1",
         "upstream_model": "fake-upstream-model", "retries": "0"},
    ]
    with running_daemon(root, entries) as d:
        yield d


def plain_ids(tokenizer_dir: Path, text: str) -> list[int]:
    """The ids of `text` encoded as it is, special tokens included: what a raw prompt prefills."""
    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def files_size(folder: Path) -> int:
    return sum(os.path.getsize(Path(top) / name) for top, _, names in os.walk(folder) for name in names)


# ---- names and pull ---------------------------------------------------------------------------


def test_home_assistants_config_flow_finds_its_model_and_pulls_it(daemon):
    """homeassistant/components/ollama/config_flow.py: the names of `list()` against
    `<model>:latest`, then `pull(model)` (not streamed) must succeed, or the flow aborts."""
    import anyio

    async def flow() -> tuple[set[str], ollama.ProgressResponse]:
        client = ollama.AsyncClient(host=daemon.url)
        response = await client.list()
        downloaded = {model_info["model"] for model_info in response.get("models", [])}
        return downloaded, await client.pull("echo:latest")

    downloaded, pulled = anyio.run(flow)
    assert {"echo:latest", "thinker:latest", "coder:latest", "fake-remote:latest"} <= downloaded
    assert pulled.status == "success"


def test_pull_streams_ollamas_progress_for_a_model_it_has(client, root):
    progress = list(client.pull("echo", stream=True))
    assert [p.status for p in progress][0] == "pulling manifest"
    assert progress[-1].status == "success"
    layer = [p for p in progress if p.digest]
    assert len(layer) == 1 and layer[0].total == layer[0].completed == files_size(root / "echo")
    assert client.pull("coder:latest").status == "success"


def test_pull_of_a_model_it_lacks_says_how_to_add_one(client):
    with pytest.raises(ollama.ResponseError) as missing:
        client.pull("llama3.2:3b")
    assert missing.value.status_code == 404
    message = missing.value.error
    assert message.startswith('pull model manifest: file does not exist: model "llama3.2:3b" is not on this daemon')
    assert "names no repository of the model hub" in message and "AXERA-TECH/Qwen3-1.7B" in message
    assert "model-descriptor.json" in message


def test_both_forms_of_a_name_resolve_everywhere(client, oai, daemon):
    for name in ("echo", "echo:latest"):
        assert client.generate(model=name, prompt=f"gen {name}").response == reply_text(f"gen {name}", WORDS, think=False)
        chat = client.chat(model=name, messages=[{"role": "user", "content": f"chat {name}"}])
        assert chat.message.content == reply_text(f"chat {name}", WORDS, think=False)
        assert client.show(name).modelinfo["general.basename"] == "echo"
        answer = oai.chat.completions.create(model=name, messages=[{"role": "user", "content": f"v1 {name}"}])
        assert answer.choices[0].message.content == reply_text(f"v1 {name}", WORDS, think=False)
        assert oai.models.retrieve(name).id == "echo"
        assert daemon.get(f"/api/status/{name}")["name"] == "echo"
    listed = {m.model: m for m in client.list().models}
    assert "echo:latest" in listed and "echo" not in listed
    assert "echo:latest" in {m.model for m in client.ps().models}
    # Unload by the tagged name, as Ollama's clients do (an empty prompt with keep_alive 0).
    assert client.generate(model="echo:latest", prompt="", keep_alive=0).done_reason == "unload"
    assert "echo:latest" not in {m.model for m in client.ps().models}


# ---- sizes ------------------------------------------------------------------------------------


def test_size_is_the_folder_on_disk_and_size_vram_the_card_memory_the_runner_claimed(client, root):
    assert client.generate(model="thinker", prompt="load me").done
    listed = {m.model: m for m in client.list().models}
    assert listed["thinker:latest"].size == files_size(root / "thinker") > 0
    assert listed["fake-remote:latest"].size == 0  # no folder: an upstream's files are its own
    running = {m.model: m for m in client.ps().models}
    assert running["thinker:latest"].size == listed["thinker:latest"].size
    # The emulated runner prints remain_cmm after each layer: 7040 MB down to 6440 MB.
    assert running["thinker:latest"].size_vram == EMULATED_CMM_MB * MIB


# ---- show -------------------------------------------------------------------------------------


def test_show_tells_parameters_template_model_info_and_capabilities(client):
    shown = client.show("echo")
    chat_template = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())["chat_template"]
    assert shown.parameters == 'num_ctx                        2048\nstop                           "<|im_end|>"\nstop                           "<|im_start|>"'
    assert shown.template == chat_template and ".Suffix" not in shown.template
    assert shown.capabilities == ["completion"]
    assert shown.modelinfo == {
        "general.architecture": "echo", "general.basename": "echo", "echo.context_length": 2048,
        "echo.embedding_length": 576, "echo.block_count": 4,
    }
    assert shown.details.family == "echo" and shown.modified_at is not None
    assert "thinking" in client.show("thinker").capabilities


def test_show_of_a_model_never_loaded_asks_its_tokenizer_and_offers_insert(client, daemon):
    """Continue reads /api/show before its first completion and turns autocomplete on only when
    the template mentions .Suffix: the daemon asks the tokenizer server without loading the model."""
    assert daemon.get("/api/status/star")["state"] == "stopped"
    shown = client.show("star:latest")
    prefix, suffix, middle = INFILL_TOKENS["starcoder"]
    assert shown.template.startswith(f"{{{{- if .Suffix }}}}{prefix}{{{{ .Prompt }}}}{suffix}{{{{ .Suffix }}}}{middle}")
    assert "insert" in shown.capabilities
    assert daemon.get("/api/status/star")["state"] == "stopped"


def test_show_of_a_stock_tokenizer_and_of_an_upstream_says_what_is_known(client):
    stock = client.show("stock")
    assert stock.template == "{{ .Prompt }}" and stock.capabilities == ["completion"]
    assert stock.parameters == "num_ctx                        2048"
    remote = client.show("fake-remote")
    # An upstream's template is its own; it takes tools (passed on, calls written as text recognised).
    assert remote.template == "{{ .Prompt }}" and remote.capabilities == ["completion", "tools"]


# ---- num_ctx and prompts that cannot fit -----------------------------------------------------


def test_num_ctx_beyond_the_context_is_a_warning(daemon, client):
    assert client.generate(model="echo", prompt="ctx", options={"num_ctx": 8192}).response == \
        reply_text("ctx", WORDS, think=False)
    with daemon.client() as http:  # the ollama client drops `warnings`: read the wire
        body = http.post("/api/generate", json={"model": "echo", "prompt": "ctx", "stream": False,
                                                "options": {"num_ctx": 8192}}).json()
    assert body["warnings"] == ["num_ctx 8192: the model's context on the card is 2048 tokens, fixed when the "
                                "model was converted; the request runs with 2048"]


def test_a_prompt_that_cannot_fit_is_a_400_naming_count_context_and_remedy(client, oai):
    prompt = "lorem ipsum dolor sit amet " * 1500
    with pytest.raises(ollama.ResponseError) as refused:
        client.generate(model="echo", prompt=prompt)
    assert refused.value.status_code == 400
    message = refused.value.error
    assert message.startswith("the prompt needs about ") and "more than the model's context of 2048 tokens" in message
    assert "shorten the prompt" in message
    with pytest.raises(openai.BadRequestError, match="more than the model's context of 2048 tokens"):
        oai.chat.completions.create(model="echo", messages=[{"role": "user", "content": prompt}])


# ---- raw and suffix ---------------------------------------------------------------------------


def test_raw_sends_the_prompt_without_the_chat_template(client, daemon):
    prompt = "Once upon a time\nthere was"
    raw = client.generate(model="echo", prompt=prompt, raw=True)
    assert raw.response == reply_text(escape_prompt_line(prompt), WORDS, think=False)
    # The runner prefilled exactly the prompt's own tokens: no system prompt, no template.
    assert raw.prompt_eval_count == len(plain_ids(TOKENIZER_DIR, prompt))
    templated = client.generate(model="echo", prompt=prompt)
    # Without raw, the user turn as the template writes it follows the system prompt held already.
    turn = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    assert templated.response == raw.response and templated.prompt_eval_count == len(plain_ids(TOKENIZER_DIR, turn))
    with daemon.client() as http:
        body = http.post("/api/generate", json={"model": "echo", "prompt": prompt, "raw": True, "stream": False}).json()
    assert "warnings" not in body
    # A chat after a raw prompt starts from a context with its template again.
    chat = client.chat(model="echo", messages=[{"role": "user", "content": "after raw"}])
    assert chat.message.content == reply_text("after raw", WORDS, think=False)


def test_raw_on_a_runner_without_reset_restarts_it_into_an_empty_context(client, daemon):
    prompt = "raw after a restart"
    assert client.generate(model="plain-b", prompt="templated first").response == \
        reply_text("templated first", WORDS, think=False)
    raw = client.generate(model="plain-b", prompt=prompt, raw=True)
    assert raw.response == reply_text(prompt, WORDS, think=False)
    assert raw.prompt_eval_count == len(plain_ids(TOKENIZER_DIR, prompt))
    again = client.generate(model="plain-b", prompt=prompt)
    assert again.response == raw.response and again.prompt_eval_count > raw.prompt_eval_count
    restarts = [t for t in daemon.get("/api/status_history/plain-b")["history"] if "fresh context needs a restart" in t["reason"]]
    assert len(restarts) >= 2  # into the raw context, and out of it


def test_raw_with_a_stock_tokenizer_script_is_templated_with_a_warning(daemon):
    with daemon.client() as http:
        body = http.post("/api/generate", json={"model": "stock", "prompt": "raw stock", "raw": True, "stream": False}).json()
    assert body["response"] == reply_text("raw stock", WORDS, think=False)
    assert body["warnings"] == ["raw: the stock tokenizer script applies the chat template to every prompt; "
                                "the chat template was applied to the prompt"]


@pytest.mark.parametrize(("model", "style"), [("coder", "qwen"), ("star", "starcoder")])
def test_suffix_fills_in_the_middle_with_the_tokenizers_own_tokens(client, root, model, style):
    before, after = "def add(a, b):\n    ", "\n\nprint(add(1, 2))"
    prefix, suffix, middle = INFILL_TOKENS[style]
    line = f"{prefix}{before}{suffix}{after}{middle}"
    streamed = list(client.generate(model=model, prompt=before, suffix=after, stream=True))
    assert "".join(part.response for part in streamed) == reply_text(escape_prompt_line(line), WORDS, think=False)
    tokenizer_dir = root / "tokenizers" / style
    ids = plain_ids(tokenizer_dir, line)
    special = {t["content"]: t["id"] for t in json.loads((tokenizer_dir / "tokenizer.json").read_text())["added_tokens"]}
    assert ids[0] == special[prefix] and ids[-1] == special[middle]  # the markers reach the model as tokens
    assert streamed[-1].prompt_eval_count == len(ids)


def test_openai_completions_take_a_suffix_too(oai):
    answer = oai.completions.create(model="coder:latest", prompt="x = ", suffix="\nprint(x)", max_tokens=64)
    line = "<|fim_prefix|>x = <|fim_suffix|>\nprint(x)<|fim_middle|>"
    assert answer.choices[0].text == reply_text(escape_prompt_line(line), WORDS, think=False)


def test_suffix_on_a_model_that_cannot_fill_in_is_ollamas_400(client, oai):
    with pytest.raises(ollama.ResponseError) as no_tokens:
        client.generate(model="echo", prompt="def f(", suffix=")")
    assert no_tokens.value.status_code == 400
    assert no_tokens.value.error == "echo does not support insert: its tokenizer has no fill-in-the-middle tokens"
    with pytest.raises(ollama.ResponseError) as stock:
        client.generate(model="stock", prompt="def f(", suffix=")")
    assert stock.value.status_code == 400 and stock.value.error.startswith("stock does not support insert")
    with pytest.raises(openai.BadRequestError, match="does not support insert"):
        oai.completions.create(model="echo", prompt="def f(", suffix=")")


def test_an_upstream_gets_raw_and_suffix_through_its_completions_endpoint(client, fake):
    raw = client.generate(model="fake-remote", prompt="as it is", raw=True)
    assert raw.response == "prompt[as it is]"
    infill = client.generate(model="fake-remote", prompt="def f(", suffix=")")
    assert infill.response == "prompt[def f(]suffix[)]"
    bodies = [r["body"] for r in fake.records()["completion_requests"]][-2:]
    assert [b["prompt"] for b in bodies] == ["as it is", "def f("] and "messages" not in bodies[0]
    assert "suffix" not in bodies[0] and bodies[1]["suffix"] == ")" and bodies[1]["model"] == "fake-upstream-model"
    # An ordinary request still goes to the chat endpoint.
    assert client.generate(model="fake-remote", prompt="chat").response.startswith("w1 ")
    fake.configure(completions=False)
    try:
        with pytest.raises(ollama.ResponseError) as absent:
            client.generate(model="fake-remote", prompt="x", raw=True)
        assert absent.value.status_code == 400 and "has none (404)" in absent.value.error
    finally:
        fake.configure(completions=True)


def test_a_suffix_is_checked_as_the_prompt_is(daemon):
    """A lone surrogate is valid JSON but no text: a 400 before anything reaches the runner."""
    body = '{"model": "coder", "prompt": "x", "suffix": "bad \\ud800 text", "stream": false}'
    with daemon.client() as http:
        reply = http.post("/api/generate", content=body)
    assert reply.status_code == 400 and reply.json()["error"].startswith("invalid text:")
