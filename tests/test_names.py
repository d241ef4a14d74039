"""Model names as Ollama writes them (llm_service/names.py): pure, no daemon."""
from __future__ import annotations

import pytest

from llm_service.names import name_forms, ollama_name, resolve_name, split_tag

NAMES = {"smollm2-135m", "qwen3:1.7b", "coder:latest", "registry.local:5000/team/model"}
ALIASES = {"smol": "smollm2-135m", "q3": "qwen3:1.7b"}


@pytest.mark.parametrize(("name", "split"), [
    ("smollm2-135m", ("smollm2-135m", None)),
    ("qwen3:1.7b", ("qwen3", "1.7b")),
    ("x:latest", ("x", "latest")),
    ("registry.local:5000/team/model", ("registry.local:5000/team/model", None)),
    ("registry.local:5000/team/model:v2", ("registry.local:5000/team/model", "v2")),
    ("odd:", ("odd:", None)),
])
def test_split_tag(name, split):
    assert split_tag(name) == split


def test_listed_names_carry_a_tag_as_ollamas_do():
    assert ollama_name("smollm2-135m") == "smollm2-135m:latest"
    assert ollama_name("qwen3:1.7b") == "qwen3:1.7b"
    assert ollama_name("coder:latest") == "coder:latest"
    assert ollama_name("registry.local:5000/team/model") == "registry.local:5000/team/model:latest"


def test_name_forms():
    assert name_forms("m") == ("m", "m:latest")
    assert name_forms("m:latest") == ("m:latest", "m")
    assert name_forms("m:1b") == ("m:1b",)


@pytest.mark.parametrize(("requested", "found"), [
    ("smollm2-135m", "smollm2-135m"),
    ("smollm2-135m:latest", "smollm2-135m"),
    ("coder", "coder:latest"),  # the descriptor wrote the tag, the client did not
    ("coder:latest", "coder:latest"),
    ("qwen3:1.7b", "qwen3:1.7b"),
    ("smol", "smollm2-135m"),
    ("smol:latest", "smollm2-135m"),
    ("q3", "qwen3:1.7b"),
    ("registry.local:5000/team/model:latest", "registry.local:5000/team/model"),
    ("qwen3", None),  # another tag is another model
    ("qwen3:latest", None),
    ("smollm2-135m:q4", None),
    ("absent", None),
])
def test_every_form_of_a_name_or_alias_resolves(requested, found):
    assert resolve_name(requested, NAMES, ALIASES) == found


def test_a_name_wins_over_an_alias():
    assert resolve_name("m", {"m", "n"}, {"m:latest": "n"}) == "m"
