"""Model descriptors: parsing, validation and the difference between two versions.

The original descriptor is a JSON list of objects whose values are all strings ("true"/"false",
numbers as strings); typed values are accepted too. One bad entry is reported and skipped, the
others still load. Every message names the file, the model (or `entry #i`) and the field.

Pure apart from resolving paths and checking that they exist.
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's default: five minutes
_SHELLS = frozenset({"sh", "bash", "dash"})
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Go's time.ParseDuration, which Ollama uses: "5m", "1h30m", "-1s", "300ms", "1.5h".
_DURATION = re.compile(r"([+-]?)((?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: str | int | float | None) -> float | None:
    """Seconds to keep a model loaded; None means forever (any negative value, or null).

    Accepts a number of seconds (also as a numeric string) or a Go duration such as "5m".
    """
    if value is None:
        return None
    if isinstance(value, bool):  # bool is an int to Python, never a duration to a user
        raise ValueError(f"keep_alive must be a duration like \"5m\" or a number of seconds, not {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            match = _DURATION.fullmatch(text)
            if not match:
                raise ValueError(
                    f"keep_alive {value!r} is not a duration: use e.g. \"30s\", \"5m\", \"1h\", "
                    "a number of seconds, or a negative value for forever") from None
            seconds = sum(float(number) * _UNIT_SECONDS[unit]
                          for number, unit in _DURATION_PART.findall(text))
            if match.group(1) == "-":
                seconds = -seconds
    else:
        raise ValueError(f"keep_alive must be a duration string or a number, not {type(value).__name__}")
    if seconds != seconds:  # NaN
        raise ValueError("keep_alive must be a number, not NaN")
    return None if seconds < 0 else seconds


class ModelDetails(BaseModel):
    """What /api/tags echoes for the model."""
    model_config = ConfigDict(frozen=True, extra="ignore")

    format: str = ""
    family: str = ""
    families: tuple[str, ...] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class ModelSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    engine: Literal["ax-runner", "openai-http"] = "ax-runner"
    dialect: Literal["auto", "a", "b", "c"] = "auto"
    run_cmd: str | None = None
    model_path: Path | None = None  # absolute, resolved
    # Computed from run_cmd, never read from the file: the resolved run script (None for a
    # dialect C command such as `axllm run .`), and the argv that starts the runner with
    # model_path as working directory (scripts have no shebang, so they run through a shell).
    script_path: Path | None = None
    command: tuple[str, ...] = ()
    include_thinking: bool = False
    run_on_startup: bool = False
    tokenizer_path: Path | None = None  # absolute, resolved
    tokenizer_py: str | None = None
    tokenizer_ip: str = "127.0.0.1"
    tokenizer_port: int | None = Field(default=None, ge=1, le=65535)
    details: ModelDetails = ModelDetails()
    npu_memory_mb: int | None = Field(default=None, ge=0)
    keep_alive: float | None = DEFAULT_KEEP_ALIVE_S  # seconds; None = forever; 0 = unload after use
    system_prompt: str | None = None
    context_size: int = Field(default=2048, ge=1)
    aliases: tuple[str, ...] = ()
    load_timeout_s: float = Field(default=300.0, gt=0)
    hang_timeout_s: float = Field(default=120.0, gt=0)
    base_url: str | None = None
    upstream_model: str | None = None
    api_key_env: str | None = None  # the NAME of the variable holding the key, never the key
    max_concurrency: int = Field(default=1, ge=1)
    request_timeout_s: float = Field(default=300.0, gt=0)
    retries: int = Field(default=2, ge=0)

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, value: Any) -> float | None:
        return parse_keep_alive(value)

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("api_key_env")
    @classmethod
    def _api_key_env(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.fullmatch(value):
            raise ValueError("must be the name of an environment variable (the key itself never goes in the file)")
        return value

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not alias.strip() for alias in value):
            raise ValueError("aliases must be non-empty names")
        return value


# The descriptor's keys: the spec's fields under their file names, minus the computed ones.
_FILE_NAMES = {"name": "model_name"}
_COMPUTED = frozenset({"script_path", "command"})
_FIELD_OF_KEY = {_FILE_NAMES.get(name, name): name for name in ModelSpec.model_fields if name not in _COMPUTED}
_KEEP_EMPTY = frozenset({"system_prompt"})  # "" is a meaningful system prompt; elsewhere "" means unset


@dataclass
class DescriptorResult:
    models: dict[str, ModelSpec] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # model name (or "entry #i") -> message
    warnings: list[str] = field(default_factory=list)
    file_error: str | None = None


@dataclass
class SpecDiff:
    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: list[str]


class _FieldError(Exception):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


def parse_descriptor(text: str, source: str, base_dir: Path) -> DescriptorResult:
    """Parse descriptor JSON; relative paths resolve against `base_dir` (the file's folder)."""
    result = DescriptorResult()
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        result.file_error = f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        return result
    if not isinstance(entries, list):
        result.file_error = f"{source}: expected a JSON list of model objects, found {type(entries).__name__}"
        return result
    base_dir = base_dir.resolve()
    owners: dict[str, str] = {}  # every name and alias seen so far -> the entry that claimed it
    for number, entry in enumerate(entries, start=1):
        label = f"entry #{number}"
        if not isinstance(entry, dict):
            result.errors[label] = f"{source}: {label}: expected an object, found {type(entry).__name__}"
            continue
        name = entry.get("model_name")
        has_name = isinstance(name, str) and bool(name.strip())
        if has_name:
            label = f'model "{name}"'
        key = name if has_name and name not in result.models and name not in result.errors else f"entry #{number}"
        for unknown in sorted(set(entry) - set(_FIELD_OF_KEY)):
            result.warnings.append(f'{source}: {label}: unknown field "{unknown}" ignored')
        try:
            spec = _typed_spec(entry)
            _claim_names(spec, label, owners)  # before the path checks: a duplicate is the first thing to fix
            spec = _check_http(spec, base_dir) if spec.engine == "openai-http" else _check_runner(spec, base_dir)
        except _FieldError as exc:
            result.errors[key] = f'{source}: {label}: field "{exc.key}": {exc.problem}'
            if has_name:
                owners.setdefault(name, label)
            continue
        result.models[spec.name] = spec
    return result


def load_descriptor(path: Path) -> DescriptorResult:
    """Read and parse a descriptor file; an unreadable file or invalid JSON sets file_error."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return DescriptorResult(file_error=f"{path}: cannot read: {reason}")
    return parse_descriptor(text, str(path), path.parent)


def diff_specs(old: Mapping[str, ModelSpec], new: Mapping[str, ModelSpec]) -> SpecDiff:
    """Which models a reload adds, removes, changes (any field differs) or leaves alone."""
    return SpecDiff(
        added=sorted(set(new) - set(old)),
        removed=sorted(set(old) - set(new)),
        changed=sorted(name for name in set(old) & set(new) if old[name] != new[name]),
        unchanged=sorted(name for name in set(old) & set(new) if old[name] == new[name]),
    )


def _typed_spec(entry: dict[str, Any]) -> ModelSpec:
    values = {
        _FIELD_OF_KEY[key]: value for key, value in entry.items()
        if key in _FIELD_OF_KEY
        and not (isinstance(value, str) and not value.strip() and key not in _KEEP_EMPTY)
    }
    try:
        spec = ModelSpec.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        location = error["loc"][0] if error["loc"] else "model_name"
        key = _FILE_NAMES.get(str(location), str(location))
        problem = "missing" if error["type"] == "missing" else error["msg"].removeprefix("Value error, ")
        raise _FieldError(key, problem) from None
    return spec


def _check_http(spec: ModelSpec, base_dir: Path) -> ModelSpec:
    if spec.base_url is None:
        raise _FieldError("base_url", "missing (required by the openai-http engine)")
    if spec.run_cmd is not None:
        raise _FieldError("run_cmd", "not used by the openai-http engine: remove it")
    return spec.model_copy(update={
        "upstream_model": spec.upstream_model or spec.name,
        "model_path": _resolve(base_dir, spec.model_path) if spec.model_path else None,
    })


def _check_runner(spec: ModelSpec, base_dir: Path) -> ModelSpec:
    if spec.model_path is None:
        raise _FieldError("model_path", "missing")
    if spec.run_cmd is None:
        raise _FieldError("run_cmd", "missing")
    model_dir = _resolve(base_dir, spec.model_path)
    if not model_dir.is_dir():
        raise _FieldError("model_path", f"not a directory: {model_dir}")
    script_path, command = _run_command(spec.run_cmd, model_dir, spec.dialect)
    tokenizer_dir = _resolve(base_dir, spec.tokenizer_path) if spec.tokenizer_path else None
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        raise _FieldError("tokenizer_path", f"not a directory: {tokenizer_dir}")
    if spec.tokenizer_py is not None:
        script_dir = tokenizer_dir or model_dir
        tokenizer_script = _resolve(script_dir, Path(spec.tokenizer_py))
        if not tokenizer_script.is_relative_to(script_dir):
            raise _FieldError("tokenizer_py", "resolves outside tokenizer_path")
        if not tokenizer_script.is_file():
            raise _FieldError("tokenizer_py", f"not found in {script_dir}")
    return spec.model_copy(update={
        "model_path": model_dir, "tokenizer_path": tokenizer_dir,
        "script_path": script_path, "command": command,
    })


def _run_command(run_cmd: str, model_dir: Path, dialect: str) -> tuple[Path | None, tuple[str, ...]]:
    """The run script and the argv for `run.sh`, `./run.sh`, `sh run.sh`, `/bin/sh run.sh` or an
    absolute path; dialect C may name a program instead (`axllm run .`)."""
    try:
        words = shlex.split(run_cmd)
    except ValueError as exc:
        raise _FieldError("run_cmd", f"cannot be split into words: {exc}") from None
    if len(words) > 1 and Path(words[0]).name in _SHELLS:
        shell, script_word, arguments = words[0], words[1], words[2:]
    else:
        shell, script_word, arguments = "/bin/sh", words[0], words[1:]
    script = _resolve(model_dir, Path(script_word))
    if dialect == "c" and not script.is_file():
        return None, tuple(words)
    if not script.is_relative_to(model_dir):
        raise _FieldError("run_cmd", "resolves outside model_path")
    if not script.is_file():
        raise _FieldError("run_cmd", f"script {script_word!r} not found in model_path")
    return script, (shell, str(script), *arguments)


def _resolve(base: Path, path: Path) -> Path:
    """Absolute, with symlinks followed, so containment checks see where a path really leads."""
    return (base / path.expanduser()).resolve()


def _claim_names(spec: ModelSpec, label: str, owners: dict[str, str]) -> None:
    if spec.name in owners:
        raise _FieldError("model_name", f"duplicate name: already used by {owners[spec.name]}")
    for alias in spec.aliases:
        if alias in owners or alias == spec.name:
            raise _FieldError("aliases", f'duplicate name "{alias}": already used by {owners.get(alias, label)}')
    owners[spec.name] = label
    for alias in spec.aliases:
        owners[alias] = label
