"""Settings precedence (flag > env > config file > default), file formats and validation."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from harness.paths import REPO_ROOT
from llm_service.cli import build_settings, make_parser
from llm_service.settings import DaemonSettings
from tokenizer_service.settings import TokenizerServiceSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No AXM1_* variable from the machine may leak into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("AXM1_"):
            monkeypatch.delenv(name)


def settings_from_cli(*argv: str) -> DaemonSettings:
    parser = make_parser()
    args = parser.parse_args(["serve", *argv])
    return build_settings(args.command_parser, DaemonSettings, args)


def write_config(tmp_path: Path, kind: str, port: int, queue_size: int) -> Path:
    if kind == "toml":
        path = tmp_path / "config.toml"
        path.write_text(f'port = {port}\nqueue_size = {queue_size}\nlog_format = "json"\n')
    else:
        path = tmp_path / "config.yaml"
        path.write_text(f"port: {port}\nqueue_size: {queue_size}\nlog_format: json\n")
    return path


def test_defaults_bind_to_loopback_only() -> None:
    settings = DaemonSettings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 11535
    assert settings.tokenizer_service_url is None
    assert settings.api_keys == []
    assert settings.max_body_bytes == 8 * 1024 * 1024
    assert TokenizerServiceSettings().host == "127.0.0.1"
    assert TokenizerServiceSettings().port == 8101


@pytest.mark.parametrize("kind", ["toml", "yaml"])
def test_precedence_flag_over_env_over_file_over_default(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path, kind, port=2001, queue_size=11)
    monkeypatch.setenv("AXM1_CONFIG", str(config))

    from_file = settings_from_cli()
    assert (from_file.port, from_file.queue_size, from_file.log_format) == (2001, 11, "json")
    assert from_file.hang_timeout_s == 60  # not in the file: the default

    monkeypatch.setenv("AXM1_PORT", "2002")
    from_env = settings_from_cli()
    assert (from_env.port, from_env.queue_size) == (2002, 11)

    from_flag = settings_from_cli("--port", "2003")
    assert (from_flag.port, from_flag.queue_size) == (2003, 11)


def test_config_flag_names_the_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, "yaml", port=2004, queue_size=5)
    assert settings_from_cli("--config", str(config)).port == 2004


def test_env_lists_and_empty_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AXM1_API_KEYS", " key-one, key-two ,")
    monkeypatch.setenv("AXM1_METRICS_DIR", "")
    settings = DaemonSettings()
    assert settings.api_keys == ["key-one", "key-two"]
    assert settings.metrics_dir is None
    assert settings_from_cli("--api-keys", "k3").api_keys == ["k3"]


def test_tokenizer_port_shares_its_variable_with_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AXM1_TOKENIZER_SERVICE_PORT", "9101")
    assert DaemonSettings().tokenizer_service_port == 9101
    assert TokenizerServiceSettings().port == 9101


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("prot = 1\n", ".toml", "prot"),
        ("port: 0\n", ".yaml", "greater than or equal to 1"),
        ("backoff_min_s = 10\nbackoff_max_s = 1\n", ".toml", "backoff_max_s"),
        ("port = 1\n", ".ini", ".toml, .yaml or .yml"),
    ],
)
def test_bad_config_is_refused_by_name(tmp_path: Path, content: str, suffix: str, message: str) -> None:
    path = tmp_path / f"config{suffix}"
    path.write_text(content)
    with pytest.raises((ValidationError, ValueError), match=re.escape(message)):
        DaemonSettings(config=path)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config file not found"):
        DaemonSettings(config=tmp_path / "absent.toml")


def test_example_config_loads() -> None:
    settings = DaemonSettings(config=REPO_ROOT / "deploy" / "config.example.toml")
    assert settings.host == "127.0.0.1"


def test_readme_configuration_table_lists_every_setting() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {
        match.group(1): match.group(2)
        for match in re.finditer(r"^\| `(\w+)` \| `(AXM1_\w+)` \|", table, re.MULTILINE)
    }
    for name in DaemonSettings.model_fields:
        assert rows.get(name) == f"AXM1_{name.upper()}", f"README table misses {name}"
