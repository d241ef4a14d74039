"""Service manifests: `name.json` (JSON with comments) and its prompt template `name.txt` (Jinja2).

A manifest says what a service is (`type`), what a caller sends (`fields`), and on which models it
runs (`flavors`, the first being the default):

    {
      "type": "map-reduce",            // "single" | "map" | "map-reduce"
      "description": "…",
      "backend": "local",              // the daemon's own models
      "fields": [{"name": "transcript", "chunked": true}],
      "flavors": {"small": {"model": "smollm2", "totalContextLength": 2048, …}}
    }

`single` renders the template once; `map` cleans each chunk of the chunked field and joins the
outputs; `map-reduce` summarises each chunk (carrying earlier summaries) and then combines them.

Every message names the file and the field (`flavors.small.temperature`), as the descriptor's do.
A broken manifest disables that service alone (`load_catalog`). Pure: callers read the files.
"""
from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .chunker import ChunkLimits

SERVICE_TYPES = ("single", "map", "map-reduce")
CHUNKED_TYPES = frozenset({"map", "map-reduce"})
# Names the template sees besides the input fields; an input field may not take them.
TEMPLATE_NAMES = frozenset({"summaries", "combine", "chunk_number", "chunk_count"})
_SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and the field."""


def strip_json_comments(text: str) -> str:
    """The text with `//` and `/* */` comments outside strings replaced by spaces.

    Newlines are kept (and comment characters become spaces) so that the JSON parser's line and
    column numbers still point into the file as written. Raises ValueError for an unclosed `/*`.
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == '"':  # copy a whole string, escapes included, so "//" inside one stays
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            out.append(" " * (end - i))
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                line = text.count("\n", 0, i) + 1
                raise ValueError(f"comment opened at line {line} is never closed (*/ missing)")
            out.append(re.sub(r"[^\n]", " ", text[i:end + 2]))
            i = end + 2
        else:
            out.append(char)
            i += 1
    return "".join(out)


class InputField(BaseModel):
    """One input of the service: the caller sends it, the template sees it under `name`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    required: bool = True
    # The long text that map and map-reduce services split; exactly one field of such a service.
    chunked: bool = False

    @model_validator(mode="after")
    def _name(self) -> InputField:
        if not _FIELD_NAME.fullmatch(self.name):
            raise ValueError(f"name {self.name!r} must be a template variable name (letters, digits, _)")
        if self.name in TEMPLATE_NAMES:
            raise ValueError(f"name {self.name!r} is taken by the template's own variables")
        return self


class Flavor(BaseModel):
    """A model the service runs on, with its context arithmetic and sampling."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=False)

    model: str = Field(min_length=1)
    total_context_length: int = Field(alias="totalContextLength", ge=64)
    max_generation_length: int = Field(alias="maxGenerationLength", ge=1)
    # Tokens of input after which a new virtual turn (chunk) starts.
    create_new_turn_after: int = Field(alias="createNewTurnAfter", ge=1)
    # How many earlier summaries a chunk's prompt carries (map-reduce).
    summary_turns: int = Field(0, alias="summaryTurns", ge=0)
    # The most virtual turns one input may become.
    max_new_turns: int = Field(64, alias="maxNewTurns", ge=1)
    temperature: float = Field(0.2, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)

    @model_validator(mode="after")
    def _fits(self) -> Flavor:
        if self.max_generation_length >= self.total_context_length:
            raise ValueError(
                f"maxGenerationLength ({self.max_generation_length}) must be below "
                f"totalContextLength ({self.total_context_length}): the prompt needs room too")
        room = self.total_context_length - self.max_generation_length
        if self.create_new_turn_after > room:
            raise ValueError(
                f"createNewTurnAfter ({self.create_new_turn_after}) must be at most "
                f"totalContextLength - maxGenerationLength ({room})")
        return self


class Manifest(BaseModel):
    """The parsed `name.json`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["single", "map", "map-reduce"]
    description: str = ""
    backend: str = Field("local", min_length=1)
    fields: tuple[InputField, ...] = Field(min_length=1)
    flavors: dict[str, Flavor] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        names = [item.name for item in self.fields]
        if duplicates := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"fields: duplicate name {duplicates[0]!r}")
        chunked = [item.name for item in self.fields if item.chunked]
        if self.type in CHUNKED_TYPES and len(chunked) != 1:
            raise ValueError(f'fields: a "{self.type}" service needs exactly one field with '
                             f'"chunked": true, found {len(chunked)}')
        if self.type not in CHUNKED_TYPES and chunked:
            raise ValueError(f'fields: "{chunked[0]}" is chunked but a "single" service does not split inputs')
        return self

    @property
    def default_flavor(self) -> str:
        return next(iter(self.flavors))

    @property
    def chunked_field(self) -> str | None:
        return next((item.name for item in self.fields if item.chunked), None)


def parse_manifest(text: str, source: str) -> Manifest:
    """A manifest from its text; raises ManifestError naming `source` and the field."""
    try:
        data = json.loads(strip_json_comments(text))
    except ValueError as exc:  # JSONDecodeError is one
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise ManifestError(f"{source}: invalid JSON{where}: {reason}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: expected a JSON object, found {type(data).__name__}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(f"{source}: " + "; ".join(_field_problem(error) for error in exc.errors())) from None


def _field_problem(error: Mapping[str, Any]) -> str:
    """`field "flavors.small.top_p": must be …` — the dotted path as the file spells it."""
    path = ""
    for part in error["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    problem = "missing" if error["type"] == "missing" else str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        problem = "unknown field (remove it or check its spelling)"
    return f'field "{path}": {problem}' if path else problem


# Templates come from files anyone with the folder may edit: sandboxed, and a missing variable is
# an error rather than an empty string that would silently drop the user's text. Jinja2 is
# imported by the first template used, not with the daemon (~2 MB of its idle RSS).
@cache
def _templates() -> Any:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)


def check_template(text: str, source: str) -> None:
    """Raise ManifestError when the template does not compile (syntax, line)."""
    from jinja2 import TemplateError

    try:
        _templates().parse(text)
    except TemplateError as exc:
        line = getattr(exc, "lineno", None)
        raise ManifestError(f"{source}: template error{f' at line {line}' if line else ''}: {exc}") from None


def render_template(
    text: str,
    source: str,
    inputs: Mapping[str, str],
    summaries: Sequence[str] = (),
    *,
    combine: bool = False,
    chunk_number: int = 1,
    chunk_count: int = 1,
) -> str:
    """The prompt: the template with the input fields, `summaries` (the earlier summaries a chunk
    carries, or all of them when `combine`), and where the chunk stands (1-based)."""
    from jinja2 import TemplateError

    try:
        template = _templates().from_string(text)
        return template.render(**inputs, summaries=list(summaries), combine=combine,
                               chunk_number=chunk_number, chunk_count=chunk_count)
    except TemplateError as exc:
        raise ManifestError(f"{source}: template error: {exc}") from None


def chunk_limits(manifest: Manifest, flavor: str, template_tokens: int,
                 summary_tokens: int | None = None) -> ChunkLimits:
    """What the chunker needs of a flavor; a plain map carries no summaries whatever the flavor says.
    `template_tokens`: the template rendered with an empty chunk and no summaries."""
    chosen = manifest.flavors[flavor]
    return ChunkLimits(
        total_context=chosen.total_context_length, max_generation=chosen.max_generation_length,
        create_new_turn_after=chosen.create_new_turn_after,
        summary_turns=chosen.summary_turns if manifest.type == "map-reduce" else 0,
        max_new_turns=chosen.max_new_turns, template_tokens=template_tokens, summary_tokens=summary_tokens)


def check_inputs(manifest: Manifest, inputs: Mapping[str, Any]) -> dict[str, str]:
    """The caller's fields as the template takes them; raises ManifestError per field."""
    known = {item.name for item in manifest.fields}
    if unknown := sorted(set(inputs) - known):
        raise ManifestError(f'field "{unknown[0]}": not an input of this service (it has: {", ".join(sorted(known))})')
    values: dict[str, str] = {}
    for item in manifest.fields:
        value = inputs.get(item.name)
        if value is None:
            if item.required:
                raise ManifestError(f'field "{item.name}": missing')
            value = ""
        if not isinstance(value, str):
            raise ManifestError(f'field "{item.name}": must be a string, not {type(value).__name__}')
        values[item.name] = value
    return values


@dataclass(frozen=True)
class ManifestFile:
    """What a watcher read of one manifest: its text and the change key it saw (mtime)."""

    text: str
    mtime: float


@dataclass(frozen=True)
class Service:
    """One service of the folder: usable (`manifest`) or disabled with its `error`."""

    name: str
    mtime: float
    has_template: bool
    manifest: Manifest | None = None
    error: str | None = None

    @property
    def template_file(self) -> str:
        return f"{self.name}.txt"


@dataclass(frozen=True)
class ServiceCatalog:
    services: dict[str, Service] = field(default_factory=dict)
    # Files that are not a service (bad names, templates without a manifest): listed, never fatal.
    warnings: tuple[str, ...] = ()

    def usable(self) -> dict[str, Manifest]:
        return {name: s.manifest for name, s in self.services.items() if s.manifest is not None}


def load_catalog(
    manifests: Mapping[str, ManifestFile],
    templates: Collection[str],
    folder: str = "services",
    previous: ServiceCatalog | None = None,
) -> ServiceCatalog:
    """The services of a folder listing: `manifests` maps each `*.json` file name to what was read,
    `templates` holds the `*.txt` file names present.

    A watcher calls it with whatever it re-read; a service whose mtime and template presence match
    `previous` is kept as it was, without parsing again. Only a template's presence counts here:
    it is read (and checked) at every use, so an edited template needs no reload.
    """
    old = previous.services if previous is not None else {}
    services: dict[str, Service] = {}
    warnings: list[str] = []
    template_names = set(templates)
    for file_name in sorted(manifests):
        name = file_name.removesuffix(".json")
        source = f"{folder}/{file_name}"
        if not file_name.endswith(".json") or not _SERVICE_NAME.fullmatch(name):
            warnings.append(f"{source}: not a service: names are lower-case letters, digits, '.', '_', '-' "
                            "and end in .json")
            continue
        read = manifests[file_name]
        has_template = f"{name}.txt" in template_names
        kept = old.get(name)
        if kept is not None and kept.mtime == read.mtime and kept.has_template == has_template:
            services[name] = kept
            continue
        services[name] = _service(name, read, has_template, folder)
    for template in sorted(template_names - {f"{name}.txt" for name in services}):
        warnings.append(f"{folder}/{template}: a template without a manifest ({template.removesuffix('.txt')}.json)")
    return ServiceCatalog(services=services, warnings=tuple(warnings))


def _service(name: str, read: ManifestFile, has_template: bool, folder: str) -> Service:
    try:
        manifest = parse_manifest(read.text, f"{folder}/{name}.json")
    except ManifestError as exc:
        return Service(name=name, mtime=read.mtime, has_template=has_template, error=str(exc))
    if not has_template:
        return Service(name=name, mtime=read.mtime, has_template=False,
                       error=f"{folder}/{name}.json: its template {folder}/{name}.txt is missing")
    return Service(name=name, mtime=read.mtime, has_template=True, manifest=manifest)
