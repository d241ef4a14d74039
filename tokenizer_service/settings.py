"""Configuration of the tokenizer service (:8101): flags > environment > config file > defaults.

Environment names start with `AXM1_TOKENIZER_SERVICE_`, so `AXM1_TOKENIZER_SERVICE_PORT` and
`AXM1_TOKENIZER_SERVICE_SECRET` mean the same port and secret to the daemon (its
`tokenizer_service_port` and `tokenizer_service_secret`) and to this service.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from llm_service.settings import FileConfiguredSettings

MIN_SECRET_CHARS = 16


class TokenizerServiceSettings(FileConfiguredSettings):
    model_config = SettingsConfigDict(env_prefix="AXM1_TOKENIZER_SERVICE_", extra="forbid")

    host: str = Field(
        "127.0.0.1", description="address to listen on; the service must stay on loopback"
    )
    port: int = Field(8101, ge=1, le=65535, description="port of the tokenizer service")
    python: str = Field(
        sys.executable,
        description="Python interpreter that runs each model's tokenizer script "
        "(needs transformers)",
    )
    engine: Literal["auto", "transformers"] = Field(
        "auto", description="the library our tokenizer servers run on: auto (tokenizers and Jinja2, "
        "without transformers, where the folder's files allow it; else transformers) or transformers"
    )
    session_idle_s: float = Field(
        24 * 3600.0, gt=0, description="a tokenizer server frees a uid session unused for this long"
    )
    restart_backoff_min_s: float = Field(
        1, ge=0, description="first delay before restarting a tokenizer server that exited"
    )
    restart_backoff_max_s: float = Field(
        30, ge=0, description="longest delay between restarts of a tokenizer server"
    )
    host_answer_timeout_s: float = Field(
        60, gt=0, description="the shared tokenizer host must add or remove a model within this long, "
        "else it is taken as hung and restarted"
    )
    data_dir: Path = Field(
        Path("data"), description="folder of the service's state; its tokenizer servers carry it as their owner tag"
    )
    child_env: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="more environment variables tokenizer servers get (names or globs, comma-separated)",
    )
    descriptor: Path | None = Field(
        None,
        description="the daemon's model descriptor: only the tokenizer servers of its models are "
        "started, as their entries say (re-read at each start); required",
    )
    discover_models: bool = Field(
        True, description="start tokenizer servers of model folders found beside the descriptor, as the daemon finds them"
    )
    host_kind: Literal["auto", "axcl_aarch64", "axcl_x86", "ax650"] = Field(
        "auto", description="the host whose run_*.sh scripts found folders run (the daemon's host_kind)"
    )
    secret: str | None = Field(
        None,
        min_length=MIN_SECRET_CHARS,
        description="shared secret every request but /health must carry (Authorization: Bearer); "
        "the daemon's tokenizer_service_secret; required; prefer the environment to the flag, "
        "which other users see in ps",
    )

    @field_validator("descriptor", "secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("child_env", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        return [name.strip() for name in value.split(",") if name.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _backoff_in_order(self) -> TokenizerServiceSettings:
        if self.restart_backoff_max_s < self.restart_backoff_min_s:
            raise ValueError("restart_backoff_max_s must not be below restart_backoff_min_s")
        return self
