"""What a stock tokenizer script says, read from its text (never run), and which server runs."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.paths import REPO_ROOT
from tokenizer_service.stock_script import (
    CannotChoose,
    FolderFacts,
    ScriptFacts,
    ServerChoice,
    choose_server,
    find_tokenizer_dir,
    folder_facts,
    read_script,
    server_arguments,
)

STOCK_DIR = REPO_ROOT / "tests" / "data" / "stock_tokenizers"
QWEN = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def test_the_get_reset_script_names_its_folder_prompt_cut_and_reset_method():
    facts = read_script((STOCK_DIR / "get_reset_uid.py").read_text())
    assert facts == ScriptFacts(("smollm2_tokenizer",), QWEN, None, 3, frozenset({"GET"}), "smollm2_tokenizer",
                                "smollm2_tokenizer")


def test_the_post_reset_script_adds_its_no_think_suffix():
    facts = read_script((STOCK_DIR / "post_reset_uid.py").read_text())
    assert facts == ScriptFacts(("smollm2_tokenizer",), QWEN, " /no_think", 3, frozenset({"POST"}), "smollm2_tokenizer",
                                "smollm2_tokenizer")


def test_names_bound_to_literals_and_argument_defaults_are_followed():
    text = '''
import argparse
from transformers import AutoTokenizer
SYSTEM = "Be terse."
parser = argparse.ArgumentParser()
parser.add_argument("--model-id", default="qwen3_tokenizer")
args = parser.parse_args()
class T:
    def __init__(self):
        model_id = "qwen2.5_tokenizer"
        self.a = AutoTokenizer.from_pretrained(args.model_id)
        self.b = AutoTokenizer.from_pretrained(model_id)
        self.messages = [{"role": "system", "content": SYSTEM}]
    def encode(self, prompt):
        prompt += "/no_think"
        ids = self.a.encode(prompt)[:-5]
        return ids[:-1]
'''
    facts = read_script(text)
    assert facts.tokenizer_folders == ("qwen3_tokenizer", "qwen2.5_tokenizer")
    assert facts.system_prompt == "Be terse."
    assert facts.user_suffix == "/no_think"
    assert facts.generation_prompt_cut == 5  # the cut of encode(...), not of any slice
    assert facts.encode_folder == "qwen3_tokenizer"  # self.a, loaded from args.model_id
    assert facts.template_folder is None  # it renders with no tokenizer
    found = FolderFacts(facts, Path("/m/qwen3_tokenizer"), "qwen3_tokenizer/, which the script loads")
    assert server_arguments(found) == [
        "-m", "tokenizer_service.server", "--tokenizer", "/m/qwen3_tokenizer", "--check-template",
        "--default-system-prompt", "Be terse.", "--ignore-runner-system-prompt", "--user-suffix", "/no_think",
        "--generation-prompt-cut", "5"]


def test_a_script_rendering_with_one_tokenizer_and_encoding_with_another(tmp_path):
    """Qwen3's published scripts encode with qwen3_tokenizer and render with Qwen2.5's template."""
    text = '''
from transformers import AutoTokenizer
class T:
    def __init__(self):
        model_id = "qwen3_tokenizer"
        self.tokenizer = AutoTokenizer.from_pretrained(model_id)
        self.tokenizer_25 = AutoTokenizer.from_pretrained("qwen2.5_tokenizer")
    def encode(self, messages):
        text = self.tokenizer_25.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text)
'''
    facts = read_script(text)
    assert (facts.encode_folder, facts.template_folder) == ("qwen3_tokenizer", "qwen2.5_tokenizer")
    for name in ("qwen2.5_tokenizer", "qwen3_tokenizer"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text("{}")
    (tmp_path / "qwen3_tokenizer" / "tokenizer_config.json").write_text('{"chat_template": "qwen3"}')
    found = folder_facts(tmp_path, text)
    assert (found.tokenizer_dir, found.template_dir) == (tmp_path / "qwen3_tokenizer", tmp_path / "qwen2.5_tokenizer")
    # The template that renders is the other folder's, and it has none: the script runs.
    assert choose_server("auto", found).describe() == "stock: the folder's own script runs: qwen2.5_tokenizer/ has no chat template"
    (tmp_path / "qwen2.5_tokenizer" / "chat_template.jinja").write_text("{{ messages }}")
    found = folder_facts(tmp_path, text)
    assert choose_server("auto", found).describe() == (
        "builtin: on qwen3_tokenizer/, which the script loads, with the chat template of qwen2.5_tokenizer/, which "
        "the script renders with: tokenizer files and a chat template are there")
    assert server_arguments(found)[4:7] == ["--check-template", "--chat-template-from", str(tmp_path / "qwen2.5_tokenizer")]


@pytest.mark.parametrize("text", ["", "this is not python (", "import os\nos.system('x')\n",
                                  "# AutoTokenizer.from_pretrained('x')\n# prompt + '/no_think'\n"])
def test_text_without_literals_or_code_tells_nothing(text):
    assert read_script(text) == ScriptFacts()
    with pytest.raises(CannotChoose):
        server_arguments(FolderFacts(ScriptFacts(), None, "the script names no tokenizer folder"))


def test_our_launcher_scripts_name_no_folder():
    facts = read_script((REPO_ROOT / "model" / "smollm2-135m" / "smollm2_tokenizer_uid.py").read_text())
    assert facts.tokenizer_folders == () and facts.system_prompt is None


def test_the_named_folder_wins_and_must_stay_inside(tmp_path):
    (tmp_path / "named").mkdir()
    (tmp_path / "other_tokenizer").mkdir()
    (tmp_path.parent / "outside_tokenizer").mkdir(exist_ok=True)
    found, how = find_tokenizer_dir(tmp_path, ScriptFacts(("named",)))
    assert found == tmp_path / "named" and how == "named/, which the script loads"
    found, how = find_tokenizer_dir(tmp_path, ScriptFacts(("../outside_tokenizer", "Qwen/Qwen3-1.7B")))
    assert found == tmp_path / "other_tokenizer"
    assert how == "the script loads '../outside_tokenizer', 'Qwen/Qwen3-1.7B', not a folder here; other_tokenizer/, the folder's *_tokenizer/"
    (tmp_path / "second_tokenizer").mkdir()
    assert find_tokenizer_dir(tmp_path, ScriptFacts()) == (
        None, "the script names no tokenizer folder, and there are 2 *_tokenizer/ folders")


def facts(**given) -> FolderFacts:
    values = dict(script=ScriptFacts(), tokenizer_dir=Path("/m/x_tokenizer"), found_by="x_tokenizer/, the folder's *_tokenizer/",
                  has_vocabulary=True, has_chat_template=True)
    return FolderFacts(**{**values, **given})


@pytest.mark.parametrize("given, auto", [
    ({}, "builtin: on x_tokenizer/, the folder's *_tokenizer/: tokenizer files and a chat template are there"),
    ({"has_chat_template": False}, "stock: the folder's own script runs: x_tokenizer/ has no chat template"),
    ({"has_vocabulary": False}, "stock: the folder's own script runs: x_tokenizer/ has no tokenizer files "
                                "(tokenizer.json, vocab.json, tokenizer.model, vocab.txt)"),
    ({"problem": "x_tokenizer/tokenizer_config.json cannot be read: bad"},
     "stock: the folder's own script runs: x_tokenizer/tokenizer_config.json cannot be read: bad"),
    ({"tokenizer_dir": None, "found_by": "the script names no tokenizer folder, and there is no *_tokenizer/ folder"},
     "stock: the folder's own script runs: the script names no tokenizer folder, and there is no *_tokenizer/ folder"),
])
def test_auto_runs_ours_only_where_the_files_load_and_render(given, auto):
    assert choose_server("auto", facts(**given)).describe() == auto
    assert choose_server(ServerChoice.STOCK, facts(**given)).describe() == "stock: the descriptor asks for the folder's own script"


def test_builtin_runs_ours_where_a_folder_is_found_and_refuses_where_none_is():
    assert choose_server("builtin", facts()).describe() == "builtin: on x_tokenizer/, the folder's *_tokenizer/ (the descriptor asks for it)"
    assert choose_server("builtin", facts(has_chat_template=False)).describe().endswith(
        "(the descriptor asks for it); warning: x_tokenizer/ has no chat template")
    with pytest.raises(CannotChoose, match="tokenizer_server is builtin, but the script names no tokenizer folder"):
        choose_server("builtin", facts(tokenizer_dir=None, found_by="the script names no tokenizer folder"))


def test_folder_facts_reads_the_files(tmp_path):
    script = (STOCK_DIR / "post_reset_uid.py").read_text()
    assert folder_facts(tmp_path, script).tokenizer_dir is None
    folder = tmp_path / "smollm2_tokenizer"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text('{"chat_template": ""}')
    found = folder_facts(tmp_path, script)
    assert (found.tokenizer_dir, found.has_vocabulary, found.has_chat_template) == (folder, True, False)
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    assert folder_facts(tmp_path, script).has_chat_template
    (folder / "chat_template.jinja").unlink()
    (folder / "tokenizer_config.json").write_text("{broken")
    assert folder_facts(tmp_path, script).problem.startswith("smollm2_tokenizer/tokenizer_config.json cannot be read")
