"""/api/show's parts (llm_service/api/ollama/show.py): pure, no daemon. The same answers reach
the real clients in test_apps_api.py."""
from __future__ import annotations

import re

from llm_service.api.ollama.show import (
    ShowInput, capabilities, go_value, model_info, parameters_text, show_answer, template_text,
)
from llm_service.engines.base import Infill, PromptFormat

CHATML = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}{% endfor %}"
FIM = Infill("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
# Continue's reading of Ollama's parameters (core/llm/llms/Ollama.ts).
CONTINUE_LINE = re.compile(r"^(\S+)\s+((?:\".*\")|\S+)$")


def test_parameters_in_ollamas_text_form():
    text = parameters_text([("num_ctx", 2048), ("stop", "<|im_end|>"), ("stop", 'say "hi"'), ("use_mmap", True)])
    assert text == (
        "num_ctx                        2048\n"
        'stop                           "<|im_end|>"\n'
        'stop                           "say \\"hi\\""\n'
        "use_mmap                       true"
    )
    assert [CONTINUE_LINE.match(line).groups() for line in text.splitlines()][:2] == [
        ("num_ctx", "2048"), ("stop", '"<|im_end|>"')]
    assert go_value("é") == '"é"' and go_value(0.5) == "0.5"


def test_template_is_the_tokenizers_with_a_suffix_branch_where_it_can_fill_in():
    assert template_text(PromptFormat()) == "{{ .Prompt }}"
    assert template_text(PromptFormat(chat_template=CHATML)) == CHATML
    coder = template_text(PromptFormat(chat_template=CHATML, infill=FIM, raw=True))
    assert coder == ("{{- if .Suffix }}<|fim_prefix|>{{ .Prompt }}<|fim_suffix|>{{ .Suffix }}<|fim_middle|>"
                     "{{- else }}" + CHATML + "{{- end }}")
    assert ".Suffix" in coder  # what Continue looks for before it turns autocomplete on


def test_capabilities_in_ollamas_order():
    assert capabilities(thinking=False, insert=False) == ["completion"]
    assert capabilities(thinking=True, insert=True) == ["completion", "insert", "thinking"]
    assert capabilities(thinking=False, insert=False, tools=True) == ["completion", "tools"]
    # An embedding model only embeds, as Ollama lists nomic-embed-text.
    assert capabilities(thinking=False, insert=False, embedding=True) == ["embedding"]


def test_model_info_names_what_is_known():
    assert model_info("smollm2-135m", "llama", 2048, {"embedding_length": 576, "block_count": 30, "other": 1}) == {
        "general.architecture": "llama", "general.basename": "smollm2-135m", "llama.context_length": 2048,
        "llama.embedding_length": 576, "llama.block_count": 30}
    assert model_info("m", "llm", 1024, {}) == {
        "general.architecture": "llm", "general.basename": "m", "llm.context_length": 1024}


def test_a_whole_answer_for_a_coder_model():
    answer = show_answer(ShowInput(
        name="coder:latest", engine="ax-runner", details={"family": "qwen2"}, context_size=2048,
        include_thinking=False, modified_at="2025-01-01T00:00:00Z",
        form=PromptFormat(chat_template=CHATML, stop=("<|im_end|>", "<|im_start|>"), infill=FIM, raw=True),
        facts={"architecture": "qwen2", "embedding_length": 896}, system="Be brief.",
    ))
    assert answer["parameters"] == 'num_ctx                        2048\nstop                           "<|im_end|>"\nstop                           "<|im_start|>"'
    assert answer["capabilities"] == ["completion", "insert"]
    assert answer["model_info"]["qwen2.embedding_length"] == 896 and answer["model_info"]["general.basename"] == "coder"
    assert answer["system"] == "Be brief." and 'PARAMETER stop "<|im_end|>"' in answer["modelfile"]
    # The descriptor's family names the architecture where the runner's files do not.
    plain = show_answer(ShowInput(name="m:latest", engine="openai-http", details={"family": "echo"}, context_size=4096,
                                  include_thinking=True, modified_at=""))
    assert plain["model_info"]["general.architecture"] == "echo" and plain["capabilities"] == ["completion", "thinking"]
    assert "system" not in plain and plain["template"] == "{{ .Prompt }}"
