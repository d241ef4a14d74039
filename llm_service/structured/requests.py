"""A request's `format` (Ollama) or `response_format` (OpenAI) → a `StructuredOutput`, its schema
checked (a bad one is a 400 before anything reaches a model). Pure."""
from __future__ import annotations

from typing import Any

from ..engines.base import BadRequest
from .answer import SchemaUnusable, problem_with
from .output import StructuredOutput

# Instances a schema is tried on before it is accepted, one of each JSON type.
PROBES: tuple[object, ...] = (None, True, 0, 0.5, "", [], {})


class InvalidSchema(BadRequest):
    code = "invalid_json_schema"

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param  # OpenAI's error `param`


def from_ollama_format(value: Any) -> StructuredOutput | None:
    """Ollama's `format`: "json", a JSON schema (an object), or nothing ("" or null)."""
    if value is None or value == "":
        return None
    if value == "json":
        return StructuredOutput("json", param="format")
    if isinstance(value, dict):
        return StructuredOutput("schema", checked_schema(value, "format"), param="format")
    raise InvalidSchema(f'invalid format: {_shown(value)}; use "json" or a JSON schema (an object)', "format")


def from_openai_response_format(value: Any) -> StructuredOutput | None:
    """OpenAI's `response_format`: {"type": "text" | "json_object" | "json_schema", …}."""
    if value is None:
        return None
    param = "response_format"
    if not isinstance(value, dict):
        raise InvalidSchema(f"invalid response_format: {_shown(value)}; it must be an object with a type", param)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json", param=param)
    if kind != "json_schema":
        raise InvalidSchema(
            f"invalid response_format.type: {_shown(kind)}; one of \"text\", \"json_object\", \"json_schema\"", param
        )
    definition = value.get("json_schema")
    if not isinstance(definition, dict):
        raise InvalidSchema("response_format.json_schema is required with type json_schema (an object with name and schema)", param)
    name, description, strict = definition.get("name"), definition.get("description"), definition.get("strict")
    if name is not None and not isinstance(name, str):
        raise InvalidSchema("response_format.json_schema.name must be a string", param)
    if description is not None and not isinstance(description, str):
        raise InvalidSchema("response_format.json_schema.description must be a string", param)
    if strict is not None and not isinstance(strict, bool):
        raise InvalidSchema("response_format.json_schema.strict must be a boolean", param)
    schema = definition.get("schema")
    if schema is None:  # OpenAI's schema is optional: then any JSON object, as json_object
        return StructuredOutput("json", name=name, description=description, strict=strict, param=param)
    if not isinstance(schema, dict):
        raise InvalidSchema("response_format.json_schema.schema must be a JSON schema (an object)", param)
    return StructuredOutput(
        "schema", checked_schema(schema, "response_format.json_schema.schema"), name=name,
        description=description, strict=strict, param=param,
    )


def checked_schema(schema: dict[str, Any], where: str) -> dict[str, Any]:
    """`schema` when it is a valid JSON schema of its draft whose local `$ref`s resolve; else
    InvalidSchema naming what is wrong."""
    # jsonschema (~5 MB) is imported by the first request that brings a schema, not at start.
    from jsonschema import Draft202012Validator, validators
    from jsonschema.exceptions import SchemaError

    param = where.split(".", 1)[0]
    try:
        cls = validators.validator_for(schema, default=Draft202012Validator)
        cls.check_schema(schema)
    except SchemaError as exc:
        path = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in exc.path)
        raise InvalidSchema(f"invalid JSON schema in {where}{path}: {exc.message}", param) from None
    except Exception as exc:  # e.g. a $schema that is not a string
        raise InvalidSchema(f"invalid JSON schema in {where}: {exc!r}", param) from None
    _check_refs(schema, cls, where, param)
    # Every validation starts at the root: a schema that cannot even begin (a reference to
    # itself without end, an anchor that does not exist) fails here, not after a generation.
    problem = unusable(StructuredOutput("schema", schema), PROBES)
    if problem is not None:
        raise InvalidSchema(f"invalid JSON schema in {where}: {problem}", param)
    return schema


def unusable(spec: StructuredOutput, instances: tuple[object, ...]) -> str | None:
    """Why `spec` cannot validate the instances at all; None when it can."""
    for instance in instances:
        try:
            problem_with(instance, spec)
        except SchemaUnusable as exc:
            return str(exc)
        except Exception as exc:  # whatever else a strange schema makes the validator raise
            return f"it cannot be applied: {exc!r}"
    return None


def _check_refs(schema: dict[str, Any], cls: Any, where: str, param: str) -> None:
    """Every `$ref` must resolve within the schema: none is fetched from anywhere. Only checked
    where no inner `$id` moves the base of relative references (the validator still refuses an
    unresolvable one later, as the client's error)."""
    refs, ids = [], []

    def walk(node: Any, top: bool) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            if not top and "$id" in node:
                ids.append(node["$id"])
            for child in node.values():
                walk(child, False)
        elif isinstance(node, list):
            for child in node:
                walk(child, False)

    walk(schema, True)
    if not refs or ids:
        return
    # referencing comes with jsonschema, imported by the first schema (see above), not at start
    from referencing import Registry
    from referencing.exceptions import Unresolvable
    from referencing.jsonschema import specification_with

    specification = specification_with(cls.META_SCHEMA.get("$schema", ""), default=None)
    if specification is None:
        return
    resource = specification.create_resource(schema)
    uri = resource.id() or "urn:axm1-llm:request-schema"
    resolver = Registry().with_resource(uri, resource).resolver(base_uri=uri)
    for ref in refs:
        try:
            resolver.lookup(ref)
        except Unresolvable:
            raise InvalidSchema(
                f"invalid JSON schema in {where}: $ref {ref!r} does not resolve within the schema "
                "(remote references are not fetched)", param,
            ) from None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"
