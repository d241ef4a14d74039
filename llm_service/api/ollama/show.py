"""Ollama's `/api/show` answer: parameters, template, model_info and capabilities.

Clients read more of it than its name suggests: Continue takes `num_ctx` and the `stop` lines
from `parameters` and turns autocomplete on only when `template` mentions `.Suffix`; Open WebUI
and Home Assistant read `capabilities`. Each part is built here from what the daemon knows:
the descriptor, the engine's `PromptFormat` (the tokenizer server's word) and its `model_facts`.

Pure: no I/O.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ...engines.base import PromptFormat
from ...names import split_tag

# Ollama writes each parameter as fmt.Sprintf("%-*s %#v", 30, key, value).
PARAMETER_KEY_WIDTH = 30
# What Ollama's template is when a model has none of its own.
PLAIN_TEMPLATE = "{{ .Prompt }}"


def go_value(value: Any) -> str:
    """A value as Go's `%#v` writes it: strings quoted, booleans and numbers bare."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def parameters_text(parameters: list[tuple[str, Any]]) -> str:
    """Ollama's text form of a model's parameters: one `key value` line per value, in order."""
    return "\n".join(f"{key:<{PARAMETER_KEY_WIDTH}} {go_value(value)}" for key, value in parameters)


def model_parameters(context_size: int, stop: tuple[str, ...]) -> list[tuple[str, Any]]:
    """The parameters the model runs with: the card's context, the texts that end a reply."""
    return [("num_ctx", context_size), *(("stop", text) for text in stop)]


def template_text(form: PromptFormat) -> str:
    """The model's chat template as its tokenizer has it, behind Ollama's `.Suffix` branch where
    the tokenizer can fill in the middle (the daemon builds that prompt itself). Unknown (a stock
    tokenizer script, a built-in one, an upstream): Ollama's plain `{{ .Prompt }}`."""
    chat = form.chat_template or PLAIN_TEMPLATE
    infill = form.infill
    if infill is None:
        return chat
    return (
        "{{- if .Suffix }}"
        f"{infill.prefix}{{{{ .Prompt }}}}{infill.suffix}{{{{ .Suffix }}}}{infill.middle}"
        "{{- else }}" + chat + "{{- end }}"
    )


def capabilities(*, thinking: bool, insert: bool, tools: bool = False, embedding: bool = False,
                 vision: bool = False) -> list[str]:
    """Ollama's capability names, in its order. `tools`: the model's template renders tool
    definitions itself (or its upstream takes them). An embedding model only embeds: no
    `completion`. `vision`: the model reads images (a vision-language runner)."""
    if embedding:
        return ["embedding"]
    found = ["completion"]
    if tools:
        found.append("tools")
    if insert:
        found.append("insert")
    if vision:
        found.append("vision")
    if thinking:
        found.append("thinking")
    return found


def model_info(basename: str, architecture: str, context_length: int, facts: dict[str, Any]) -> dict[str, Any]:
    """Ollama's `general.*` and `<architecture>.*` keys, with what is known."""
    info: dict[str, Any] = {
        "general.architecture": architecture,
        "general.basename": basename,
        f"{architecture}.context_length": context_length,
    }
    for key in ("embedding_length", "block_count"):
        if isinstance(facts.get(key), int):
            info[f"{architecture}.{key}"] = facts[key]
    return info


@dataclass(frozen=True)
class ShowInput:
    """What `/api/show` is built from."""

    name: str  # as Ollama lists it (name:tag)
    engine: str
    details: dict[str, Any]
    context_size: int
    include_thinking: bool
    modified_at: str
    form: PromptFormat = PromptFormat()
    facts: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    embedding: bool = False  # an embedding model
    vision: bool = False  # the model reads images


def show_answer(given: ShowInput) -> dict[str, Any]:
    form = given.form
    architecture = str(given.facts.get("architecture") or given.details.get("family") or "llm")
    parameters = model_parameters(given.context_size, form.stop)
    template = template_text(form)
    modelfile = [
        f"# Modelfile of axm1-llm ({given.engine} engine): a view of the descriptor's entry, not a build recipe",
        f"FROM {given.name}",
        f'TEMPLATE """{template}"""',
        *(f"PARAMETER {key} {go_value(value)}" for key, value in parameters),
    ]
    answer: dict[str, Any] = {
        "modelfile": "\n".join(modelfile) + "\n",
        "parameters": parameters_text(parameters),
        "template": template,
        "details": given.details,
        "model_info": model_info(split_tag(given.name)[0], architecture, given.context_size, given.facts),
        "capabilities": capabilities(
            thinking=given.include_thinking or form.thinking_switch,
            insert=form.infill is not None,
            tools=form.tools,
            embedding=given.embedding,
            vision=given.vision,
        ),
        "modified_at": given.modified_at,
    }
    if given.system is not None:
        answer["system"] = given.system
        answer["modelfile"] += f'SYSTEM """{given.system}"""\n'
    return answer
