"""Model names as Ollama writes them, and the one lookup every route uses.

Ollama names a model `name:tag` and fills in `latest` when a client leaves the tag out, so
clients send and compare both forms: Home Assistant looks for `smollm2-135m:latest` in
`/api/tags`, a curl user types `smollm2-135m`. The descriptor names a model once, with or
without a tag; every form of that name (and of its aliases) resolves to it, and the listings
show the tagged form, as Ollama's do.

Pure: no I/O.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping

DEFAULT_TAG = "latest"


def split_tag(name: str) -> tuple[str, str | None]:
    """(`name` without its tag, the tag or None). A tag follows the last `:` after the last `/`
    (`host:port/model` has no tag; `model:1.7b` has `1.7b`)."""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash and colon < len(name) - 1:
        return name[:colon], name[colon + 1:]
    return name, None


def ollama_name(name: str) -> str:
    """The name as Ollama lists it: `name:latest` when the name has no tag."""
    base, tag = split_tag(name)
    return name if tag is not None else f"{base}:{DEFAULT_TAG}"


def name_forms(name: str) -> tuple[str, ...]:
    """Every spelling that means the same model: itself, and with `:latest` added or removed."""
    base, tag = split_tag(name)
    if tag is None:
        return (name, f"{name}:{DEFAULT_TAG}")
    if tag == DEFAULT_TAG:
        return (name, base)
    return (name,)


def resolve_name(requested: str, names: Collection[str], aliases: Mapping[str, str]) -> str | None:
    """The descriptor name `requested` means, or None.

    `names` are the descriptor's model names, `aliases` maps each alias to its model. An exact
    name wins over an alias; `x` and `x:latest` are one name for both."""
    for form in name_forms(requested):
        if form in names:
            return form
    for form in name_forms(requested):
        if form in aliases:
            return aliases[form]
    return None


def matches(requested: str, candidates: Collection[str]) -> str | None:
    """The first of `candidates` (e.g. the names of models the descriptor could not load) that
    `requested` means, or None."""
    for form in name_forms(requested):
        if form in candidates:
            return form
    return None
