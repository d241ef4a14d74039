"""The daemon's configuration: CLI flags > environment (`AXM1_*`) > config file > defaults.

The config file (TOML or YAML, chosen by its suffix) is named by `--config` or `AXM1_CONFIG`;
its keys are the field names below, at the top level. Unknown keys in the file are errors, so a
typo does not silently fall back to a default.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class ConfigFileSource(PydanticBaseSettingsSource):
    """Values from the TOML/YAML file named by the `config` init value or `<prefix>CONFIG`.

    The path is only known when the settings are built, so it is looked up at call time.
    """

    def __init__(self, settings_cls: type[BaseSettings], init_kwargs: dict[str, Any]):
        super().__init__(settings_cls)
        self.init_kwargs = init_kwargs

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        # Unused: __call__ returns the whole file at once.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        prefix = self.settings_cls.model_config.get("env_prefix", "")
        path = self.init_kwargs.get("config") or os.environ.get(f"{prefix}CONFIG")
        if not path:
            return {}
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        if path.suffix == ".toml":
            return TomlConfigSettingsSource(self.settings_cls, toml_file=path)()
        if path.suffix in (".yaml", ".yml"):
            return YamlConfigSettingsSource(self.settings_cls, yaml_file=path)()
        raise ValueError(f"config file must end in .toml, .yaml or .yml: {path}")


class FileConfiguredSettings(BaseSettings):
    """Base for settings that read an optional config file between the environment and defaults,
    with the logging settings every program has."""

    config: Path | None = Field(
        None, description="TOML or YAML file with settings (keys are the field names)"
    )
    log_level: str = Field("info", description=f"one of {', '.join(LOG_LEVELS)}")
    log_format: Literal["plain", "json"] = Field(
        "plain", description="plain text or one JSON object per line"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        init_kwargs = getattr(init_settings, "init_kwargs", {})
        return init_settings, env_settings, ConfigFileSource(settings_cls, init_kwargs)

    @field_validator("log_level", mode="before")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        value = str(value).lower()
        if value not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return value


def _empty_is_none(value: Any) -> Any:
    return None if value == "" else value


class DaemonSettings(FileConfiguredSettings):
    model_config = SettingsConfigDict(env_prefix="AXM1_", extra="forbid")

    host: str = Field(
        "127.0.0.1",
        description="address to listen on; 0.0.0.0 exposes the API to the network (set api_keys)",
    )
    port: int = Field(11535, ge=1, le=65535, description="port of the Ollama and OpenAI APIs")
    descriptor: Path = Field(
        Path("model/model-descriptor.json"),
        description="model descriptor (JSON list of models); re-read when it changes",
    )
    metrics_dir: Path | None = Field(
        Path("metrics"),
        description="folder for the .prom files of node_exporter's textfile collector; empty disables",
    )
    metrics_heartbeat_s: float = Field(
        60, gt=0,
        description="each .prom file is rewritten at least this often, idle or not, so that its age shows a daemon alive",
    )
    tokenizer_service_url: str | None = Field(
        None,
        description="URL of a separate tokenizer service; unset = serve runs it in-process",
    )
    tokenizer_service_port: int = Field(
        8101, ge=1, le=65535, description="port of the in-process tokenizer service (loopback)"
    )
    tokenizer_service_secret: str | None = Field(
        None,
        description="shared secret of the tokenizer service (Bearer); unset = serve makes one at "
        "each start for its in-process service; required with tokenizer_service_url; prefer the "
        "environment to the flag, which other users see in ps",
    )
    queue_size: int = Field(512, ge=1, description="pending requests per model before 503")
    request_deadline_s: float = Field(
        600, gt=0, description="a request fails after this long, queueing included"
    )
    load_stall_timeout_s: float = Field(
        60, gt=0, description="a model load fails when it shows no progress for this long"
    )
    load_timeout_cap_s: float = Field(300, gt=0, description="upper bound on one model load")
    tokenizer_timeout_s: float = Field(
        60, gt=0, description="time for a model's tokenizer server to answer after its start"
    )
    hang_timeout_s: float = Field(
        60, gt=0, description="a generation with no runner output for this long is a hang"
    )
    stop_grace_s: float = Field(
        5, ge=0, description="wait after quit and after SIGTERM before the next, harder stop"
    )
    backoff_min_s: float = Field(1, ge=0, description="first delay before restarting a runner")
    backoff_max_s: float = Field(60, ge=0, description="longest delay between runner restarts")
    default_keep_alive: str = Field(
        "5m", description="how long an idle model stays loaded (Ollama keep_alive syntax)"
    )
    npu_memory_mb: int = Field(
        7040, ge=1, description="NPU memory (CMM) the loaded models may use together, in MiB"
    )
    gpu_memory_mb: int | None = Field(
        None, ge=1, description="memory of each GPU the models' gpu_memory_mb may use together, "
        "in MiB; unset = no budget"
    )
    discover_models: bool = Field(
        True, description="serve model folders beside the descriptor that no entry names, under the folder's name"
    )
    host_kind: Literal["auto", "axcl_aarch64", "axcl_x86", "ax650"] = Field(
        "auto", description="which run_*.sh scripts a found folder runs: auto = axcl_x86 on x86, "
        "ax650 on an AX650 board, axcl_aarch64 on other Arm hosts"
    )
    hub_endpoint: str | None = Field(
        None, description="the model hub /api/pull fetches folders from (Hugging Face's API); unset = "
        "huggingface.co, or HF_ENDPOINT"
    )
    hub_token: str | None = Field(None, description="a token for the model hub (gated or private repositories)")
    descriptor_poll_s: float = Field(
        2, gt=0, description="how often the descriptor file is checked for changes"
    )
    services_dir: Path = Field(
        Path("services"),
        description="folder of prompt services (NAME.json manifests, NAME.txt templates); "
        "checked every descriptor_poll_s, a template read at each use; missing = no services",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="accepted Bearer keys, comma-separated; empty = no authentication",
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1, description="largest request body accepted (413 beyond)"
    )
    max_prompt_chars: int = Field(
        200_000, ge=1, description="largest prompt, all messages together, in characters"
    )
    structured_output_retries: int = Field(
        2, ge=0, le=10, description="an answer that is not valid for the request's format / "
        "response_format is asked again this many times, each in a fresh context, before a 502"
    )
    runner_log_lines: int = Field(
        500, ge=1, description="runner output lines kept per model for status and errors"
    )
    events_kept: int = Field(
        2048, ge=1, description="events /api/events keeps for clients that resume with Last-Event-ID"
    )
    events_heartbeat_s: float = Field(
        15, gt=0, description="seconds between keep-alive comments on an idle /api/events stream"
    )
    image_max_bytes: int = Field(
        5 * 1024 * 1024, ge=1, description="largest image a request may carry, in bytes (decoded; in base64 "
        "it takes a third more of max_body_bytes)"
    )
    image_max_side: int = Field(8192, ge=1, description="largest width or height of an image, in pixels")
    image_max_pixels: int = Field(40_000_000, ge=1, description="largest width x height of an image")
    image_max_count: int = Field(8, ge=1, description="most images in one request, all its messages together")
    image_url_fetch: bool = Field(
        False, description="fetch http(s) image URLs of OpenAI image_url parts (off: only data URLs)"
    )
    image_fetch_timeout_s: float = Field(10, gt=0, description="time to fetch one http(s) image URL")
    data_dir: Path = Field(
        Path("data"),
        description="folder of the daemon's own state; its children carry it as their owner tag",
    )
    jobs_url: str | None = Field(
        None,
        description="job store shared by several daemons, a postgresql://user@host/db URL (needs "
        "the postgres extra; its password best in PGPASSWORD or ~/.pgpass, not on a command line); "
        "unset = SQLite in data_dir, for this daemon alone",
    )
    jobs_lease_s: float = Field(
        60, gt=0,
        description="with jobs_url: a batch item a daemon claimed is run again elsewhere when the "
        "daemon has not renewed its lease for this long (it died or lost the database)",
    )
    child_env: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="more environment variables runners and workers get (names or globs, "
        "comma-separated); the daemon's own AXM1_* never pass",
    )
    max_connections: int | None = Field(
        None, ge=1, description="client connections at once before 503; unset = below the open-files limit"
    )
    header_timeout_s: float = Field(
        10, gt=0, description="time a client has to send a request's headers"
    )
    body_timeout_s: float = Field(30, gt=0, description="time a client has to send a request's body")
    keep_alive_timeout_s: float = Field(
        5, gt=0, description="an idle kept-alive client connection is closed after this long"
    )
    max_headers: int = Field(100, ge=1, description="most request headers accepted (431 beyond)")
    max_header_bytes: int = Field(
        32768, ge=1024, description="largest request line plus headers accepted, in bytes (431 beyond)"
    )
    job_file_max_bytes: int = Field(
        200 * 1024 * 1024, ge=1, description="largest file accepted by POST /v1/files (a batch's "
        "JSONL input), in bytes (413 beyond); such uploads have this limit instead of max_body_bytes"
    )
    job_retention_s: float = Field(
        7 * 86400, gt=0, description="finished batches and files older than this are deleted "
        "from the job store in data_dir/jobs (files a batch still reads are kept)"
    )
    job_poll_s: float = Field(
        1.0, gt=0, description="how often the batch runner checks completion windows and "
        "cancelled items; new batches wake it at once"
    )
    job_max_attempts: int = Field(
        3, ge=1, description="a batch item that was running when the daemon died this many "
        "times fails instead of running again (it may be what kills the daemon)"
    )
    shutdown_timeout_s: float = Field(
        20, gt=0, description="on SIGTERM, answers still streaming after this long are cut off"
    )

    _empty_paths_are_none = field_validator(
        "metrics_dir", "tokenizer_service_url", "jobs_url", mode="before")(_empty_is_none)

    @field_validator("jobs_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL (or empty for SQLite in data_dir)")
        return value

    @field_validator("api_keys", "child_env", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @model_validator(mode="after")
    def _backoff_in_order(self) -> DaemonSettings:
        if self.backoff_max_s < self.backoff_min_s:
            raise ValueError("backoff_max_s must not be below backoff_min_s")
        return self
