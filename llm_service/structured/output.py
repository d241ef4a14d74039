"""What a request asks of its answer's shape: any JSON object, or JSON valid for a schema. Pure."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal


# "json": Ollama's format "json" and OpenAI's json_object, both one JSON object.
# "schema": a JSON schema the answer must be valid for.
Kind = Literal["json", "schema"]

# What "json" asks for, as a schema: an object, like Ollama's JSON grammar and OpenAI's json_object.
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True, eq=False)
class StructuredOutput:
    """The answer must be JSON of this shape. Built by `requests.py` from a request's `format` or
    `response_format`, whose schema has been checked there."""

    kind: Kind
    schema: dict[str, Any] = field(default_factory=lambda: dict(ANY_OBJECT))
    name: str | None = None  # OpenAI's json_schema.name
    description: str | None = None  # OpenAI's json_schema.description: what the answer is for
    strict: bool | None = None  # OpenAI's json_schema.strict, passed on to upstreams as given
    # Where the request said it, for messages: "format" (Ollama) or "response_format" (OpenAI).
    param: str = "format"

    @cached_property
    def validator(self) -> Validator:
        """A validator of the schema's own draft ($schema; 2020-12 without one), checking
        `format` where jsonschema can without extra packages. Never fetches remote $refs."""
        from jsonschema import Draft202012Validator, validators  # not at start: see requests.py

        cls = validators.validator_for(self.schema, default=Draft202012Validator)
        return cls(self.schema, format_checker=cls.FORMAT_CHECKER)

    @cached_property
    def schema_text(self) -> str:
        """The schema as one line of compact JSON (it goes into a prompt line)."""
        return json.dumps(self.schema, separators=(",", ":"), ensure_ascii=False)


def upstream_response_format(spec: StructuredOutput) -> dict[str, Any]:
    """OpenAI's `response_format` for an upstream that constrains its sampling (vLLM, llama.cpp)."""
    if spec.kind == "json":
        return {"type": "json_object"}
    definition: dict[str, Any] = {"name": spec.name or "response", "schema": spec.schema}
    if spec.description:
        definition["description"] = spec.description
    if spec.strict is not None:
        definition["strict"] = spec.strict
    return {"type": "json_schema", "json_schema": definition}
