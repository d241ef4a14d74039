"""Model descriptors: parsing, validation and the difference between two versions.

The original descriptor is a JSON list of flat objects whose values are all strings
("true"/"false", numbers as strings); typed values are accepted too. One bad entry is reported and
skipped, the others still load. Every message names the file, the model (or `entry #i`) and the
field.

Each entry's keys fall in two parts: the fields every model has (`ModelSpec`) and the fields of
its engine (an `EngineConfig` subclass that the engine registry names by the `engine` key). A key
of another engine is an error ("not used by …"); a key no engine knows is a warning.

Pure apart from resolving paths and checking that they exist.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .discovery import discover
from .names import name_forms

DEFAULT_ENGINE = "ax-runner"
DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's default: five minutes
# Go's time.ParseDuration, which Ollama uses: "5m", "1h30m", "-1s", "300ms", "1.5h".
_DURATION = re.compile(r"([+-]?)((?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# Longer than this is forever: an expiry far past it is no date a timestamp can hold (year 9999).
FOREVER_AFTER_S = 100 * 365.25 * 86400


def parse_keep_alive(value: str | int | float | None) -> float | None:
    """Seconds to keep a model loaded; None means forever (any negative value, null, or longer
    than a century).

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
    return None if seconds < 0 or seconds > FOREVER_AFTER_S else seconds


class FieldError(Exception):
    """A descriptor field that is wrong; `key` is its name in the file."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


class EngineConfig(BaseModel):
    """The descriptor fields one engine reads. Each engine module subclasses it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Fields the engine computes itself; a file may not set them.
    computed: ClassVar[frozenset[str]] = frozenset()

    def resolved(self, base_dir: Path, model_name: str) -> EngineConfig:
        """Check what needs the file system (paths exist, stay inside their folder) and make
        paths absolute; raises FieldError. `base_dir` is the descriptor's folder."""
        return self

    def folders(self) -> tuple[Path, ...]:
        """The folders the model is served from, once resolved (its size on disk); none by default."""
        return ()


class ModelDetails(BaseModel):
    """What /api/tags echoes for the model."""
    model_config = ConfigDict(frozen=True, extra="ignore")

    format: str = ""
    family: str = ""
    families: tuple[str, ...] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class ModelSpec(BaseModel):
    """One model of the descriptor: what every model has, and its engine's own `config`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    engine: str = DEFAULT_ENGINE
    include_thinking: bool = False
    run_on_startup: bool = False
    details: ModelDetails = ModelDetails()
    npu_memory_mb: int | None = Field(default=None, ge=0)
    # A GPU-served model's share of its device's memory (managed upstreams), and which device.
    gpu_memory_mb: int | None = Field(default=None, ge=0)
    gpu_device: str = "0"
    # It only computes embeddings (all-MiniLM, nomic-embed, …): generate and chat are refused.
    embedding_model: bool = False
    keep_alive: float | None = DEFAULT_KEEP_ALIVE_S  # seconds; None = forever; 0 = unload after use
    system_prompt: str | None = None
    context_size: int = Field(default=2048, ge=1)
    aliases: tuple[str, ...] = ()
    config: EngineConfig = EngineConfig()

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, value: Any) -> float | None:
        return parse_keep_alive(value)

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not alias.strip() for alias in value):
            raise ValueError("aliases must be non-empty names")
        return value


_FILE_NAMES = {"name": "model_name"}  # spec field -> its key in the file, where they differ
_COMMON_KEYS = {_FILE_NAMES.get(name, name): name for name in ModelSpec.model_fields if name != "config"}
_KEEP_EMPTY = frozenset({"system_prompt"})  # "" is a meaningful system prompt; elsewhere "" means unset


def config_keys(config_class: type[EngineConfig]) -> frozenset[str]:
    """The file keys of an engine's config (its fields, minus the ones it computes)."""
    return frozenset(config_class.model_fields) - config_class.computed


@dataclass
class DescriptorResult:
    models: dict[str, ModelSpec] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # model name (or "entry #i") -> message
    warnings: list[str] = field(default_factory=list)
    file_error: str | None = None
    found: list[str] = field(default_factory=list)  # models served from a folder found, not an entry


@dataclass
class SpecDiff:
    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: list[str]


def parse_descriptor(
    text: str, source: str, base_dir: Path, engines: Mapping[str, type[EngineConfig]] | None = None,
    discover_host: str | None = None,
) -> DescriptorResult:
    """Parse descriptor JSON; relative paths resolve against `base_dir` (the file's folder).

    `engines` maps engine kinds to their config classes (default: the engine registry's). With
    `discover_host`, the model folders under `base_dir` that no entry uses are served too, as
    found (discovery.py); the entries win.
    """
    if engines is None:
        from .engines import ENGINE_CONFIGS  # the registry imports the engines, which import this module

        engines = ENGINE_CONFIGS
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
    found_from = len(entries)
    if discover_host is not None:
        found, problems = discover(base_dir, entries, discover_host)
        entries = entries + found
        result.errors.update(problems)
    owners: dict[str, str] = {}  # every name and alias seen so far -> the entry that claimed it
    for number, entry in enumerate(entries, start=1):
        label = f"entry #{number}"
        where = source
        if number > found_from:  # a folder found: its messages name the folder, not the file
            where = f"{base_dir}/{entry['model_path']} (found, no descriptor entry)"
        if not isinstance(entry, dict):
            result.errors[label] = f"{where}: {label}: expected an object, found {type(entry).__name__}"
            continue
        name = entry.get("model_name")
        has_name = isinstance(name, str) and bool(name.strip())
        if has_name:
            label = f'model "{name}"'
        key = name if has_name and name not in result.models and name not in result.errors else f"entry #{number}"
        try:
            spec, unknown = _typed_spec(entry, engines)
            result.warnings.extend(f'{where}: {label}: unknown field "{field}" ignored' for field in unknown)
            _claim_names(spec, label, owners)  # before the path checks: a duplicate is the first thing to fix
            spec = spec.model_copy(update={"config": spec.config.resolved(base_dir, spec.name)})
        except FieldError as exc:
            result.errors[key] = f'{where}: {label}: field "{exc.key}": {exc.problem}'
            if has_name:
                for form in name_forms(name):
                    owners.setdefault(form, label)
            continue
        if number > found_from:
            result.found.append(spec.name)
        result.models[spec.name] = spec
    return result


def load_descriptor(path: Path, discover_host: str | None = None) -> DescriptorResult:
    """Read and parse a descriptor file; an unreadable file or invalid JSON sets file_error.
    With `discover_host`, model folders beside it without an entry are served too."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return DescriptorResult(file_error=f"{path}: cannot read: {reason}")
    return parse_descriptor(text, str(path), path.parent, discover_host=discover_host)


def diff_specs(old: Mapping[str, ModelSpec], new: Mapping[str, ModelSpec]) -> SpecDiff:
    """Which models a reload adds, removes, changes (any field differs) or leaves alone."""
    return SpecDiff(
        added=sorted(set(new) - set(old)),
        removed=sorted(set(old) - set(new)),
        changed=sorted(name for name in set(old) & set(new) if old[name] != new[name]),
        unchanged=sorted(name for name in set(old) & set(new) if old[name] == new[name]),
    )


def _typed_spec(entry: dict[str, Any], engines: Mapping[str, type[EngineConfig]]) -> tuple[ModelSpec, list[str]]:
    """The entry as a spec, and the keys no engine knows (ignored)."""
    values = {
        key: value for key, value in entry.items()
        if not (isinstance(value, str) and not value.strip() and key not in _KEEP_EMPTY)
    }
    engine = values.get("engine", DEFAULT_ENGINE)
    if engine not in engines:
        known = ", ".join(f'"{kind}"' for kind in engines)
        raise FieldError("engine", f"must be one of {known}, not {engine!r}")
    own_keys = config_keys(engines[engine])
    other_keys = {key: kind for kind, cls in engines.items() if kind != engine for key in config_keys(cls)}
    common, own, unknown = {}, {}, []
    for key, value in values.items():
        if key in _COMMON_KEYS:
            common[_COMMON_KEYS[key]] = value
        elif key in own_keys:
            own[key] = value
        elif key in other_keys:
            raise FieldError(key, f'not used by the {engine} engine (it is a field of "{other_keys[key]}"): remove it')
        else:
            unknown.append(key)
    try:
        config = engines[engine].model_validate(own)
        spec = ModelSpec.model_validate({**common, "config": config})
    except ValidationError as exc:
        error = exc.errors()[0]
        location = error["loc"][0] if error["loc"] else "model_name"
        key = _FILE_NAMES.get(str(location), str(location))
        problem = "missing" if error["type"] == "missing" else error["msg"].removeprefix("Value error, ")
        raise FieldError(key, problem) from None
    return spec, sorted(unknown)


def _claim_names(spec: ModelSpec, label: str, owners: dict[str, str]) -> None:
    """Claim the name and aliases in every form a client may write them (`x` is `x:latest`)."""
    def taken(name: str) -> str | None:
        return next((owners[form] for form in name_forms(name) if form in owners), None)

    if (owner := taken(spec.name)) is not None:
        raise FieldError("model_name", f"duplicate name: already used by {owner}")
    for alias in spec.aliases:
        owner = label if set(name_forms(alias)) & set(name_forms(spec.name)) else taken(alias)
        if owner is not None:
            raise FieldError("aliases", f'duplicate name "{alias}": already used by {owner}')
    for name in (spec.name, *spec.aliases):
        for form in name_forms(name):
            owners[form] = label


def resolve_path(base: Path, path: Path) -> Path:
    """Absolute, with symlinks followed, so containment checks see where a path really leads."""
    return (base / path.expanduser()).resolve()
