"""Model descriptors: the original all-strings format, typed values, every error, path escapes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llm_service.descriptor import (
    DescriptorResult, ModelSpec, diff_specs, load_descriptor, parse_descriptor, parse_keep_alive,
)
from llm_service.engines.http import HttpConfig

SOURCE = "model/model-descriptor.json"


def original_entry(name: str = "qwen3") -> dict[str, object]:
    """An entry in the original format: every value a string."""
    return {
        "model_name": name,
        "run_cmd": "./run_qwen3_1.7b_axcl_aarch64.sh",
        "model_path": name,
        "include_thinking": "true",
        "run_on_startup": "false",
        "tokenizer_path": name,
        "tokenizer_py": "qwen3_tokenizer_uid.py",
        "tokenizer_ip": "127.0.0.1",
        "tokenizer_port": "12345",
        "details": {"format": "axmodel", "family": "qwen3", "families": ["qwen3"],
                    "parameter_size": "1.7B", "quantization_level": "w8a16"},
    }


def make_model_dir(base: Path, name: str = "qwen3") -> Path:
    folder = base / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run_qwen3_1.7b_axcl_aarch64.sh").write_text("./main_axcl_aarch64 \\\n--devices 0\n")
    (folder / "qwen3_tokenizer_uid.py").write_text("")
    return folder


def parse(entries: list[object], base: Path) -> DescriptorResult:
    return parse_descriptor(json.dumps(entries), SOURCE, base)


def only_error(result: DescriptorResult) -> str:
    assert not result.models and len(result.errors) == 1, result
    return next(iter(result.errors.values()))


def test_original_string_format(tmp_path: Path) -> None:
    folder = make_model_dir(tmp_path)
    result = parse([original_entry()], tmp_path)
    assert result.errors == {} and result.warnings == [] and result.file_error is None
    spec = result.models["qwen3"]
    assert spec.name == "qwen3"
    assert spec.include_thinking is True and spec.run_on_startup is False
    assert spec.config.tokenizer_port == 12345
    assert spec.config.model_path == folder.resolve() and spec.config.model_path.is_absolute()
    assert spec.config.tokenizer_path == folder.resolve()
    assert spec.config.script_path == folder.resolve() / "run_qwen3_1.7b_axcl_aarch64.sh"
    assert spec.config.tokenizer_server == "auto"  # ours where the folder's tokenizer files render
    assert spec.config.command == ("/bin/sh", str(spec.config.script_path))
    assert spec.details.parameter_size == "1.7B" and spec.details.families == ("qwen3",)
    # defaults of the new optional fields
    assert (spec.engine, spec.config.dialect, spec.context_size, spec.keep_alive, spec.aliases) == (
        "ax-runner", "auto", 2048, 300.0, ())
    assert (spec.config.load_timeout_s, spec.config.hang_timeout_s) == (300.0, 120.0)


@pytest.mark.parametrize("choice", ["auto", "builtin", "stock"])
def test_tokenizer_server_takes_its_three_values(tmp_path: Path, choice: str) -> None:
    make_model_dir(tmp_path)
    result = parse([original_entry() | {"tokenizer_server": choice}], tmp_path)
    assert result.errors == {} and result.models["qwen3"].config.tokenizer_server == choice


def test_typed_values_equal_string_values(tmp_path: Path) -> None:
    make_model_dir(tmp_path)
    typed = original_entry() | {"include_thinking": True, "run_on_startup": False, "tokenizer_port": 12345,
                                "npu_memory_mb": 3300, "context_size": 4096, "keep_alive": 600,
                                "load_timeout_s": 200.5}
    strings = original_entry() | {"npu_memory_mb": "3300", "context_size": "4096", "keep_alive": "10m",
                                  "load_timeout_s": "200.5"}
    assert parse([typed], tmp_path).models["qwen3"] == parse([strings], tmp_path).models["qwen3"]


def test_repository_descriptor_loads() -> None:
    path = Path(__file__).resolve().parent.parent / "model" / "model-descriptor.json"
    result = load_descriptor(path)
    assert result.file_error is None and result.errors == {}
    assert result.models
    for spec in result.models.values():
        if spec.engine == "openai-http":  # our workers, launched by the daemon
            assert spec.config.command[:3] in (("axm1-llm", "worker", "transformers"), ("axm1-llm", "worker", "embeddings")), spec
            continue
        # a run script for the card's runners; `axllm run .` for dialect C
        assert (spec.config.script_path and spec.config.script_path.is_file()) or (spec.config.dialect == "c" and spec.config.command), spec


@pytest.mark.parametrize("run_cmd", [
    "run_qwen3_1.7b_axcl_aarch64.sh", "./run_qwen3_1.7b_axcl_aarch64.sh", "sh run_qwen3_1.7b_axcl_aarch64.sh",
    "/bin/sh ./run_qwen3_1.7b_axcl_aarch64.sh", "ABSOLUTE"])
def test_run_cmd_forms(tmp_path: Path, run_cmd: str) -> None:
    folder = make_model_dir(tmp_path)
    if run_cmd == "ABSOLUTE":
        run_cmd = str(folder / "run_qwen3_1.7b_axcl_aarch64.sh")
    spec = parse([original_entry() | {"run_cmd": run_cmd}], tmp_path).models["qwen3"]
    assert spec.config.script_path == folder.resolve() / "run_qwen3_1.7b_axcl_aarch64.sh"
    assert spec.config.command[1:] == (str(spec.config.script_path),)
    assert Path(spec.config.command[0]).name == "sh"


def test_run_cmd_keeps_script_arguments(tmp_path: Path) -> None:
    make_model_dir(tmp_path)
    spec = parse([original_entry() | {"run_cmd": "bash run_qwen3_1.7b_axcl_aarch64.sh 12345"}], tmp_path).models["qwen3"]
    assert spec.config.command == ("bash", str(spec.config.script_path), "12345")


def test_dialect_c_command(tmp_path: Path) -> None:
    folder = make_model_dir(tmp_path)
    entry = original_entry() | {"run_cmd": "axllm run .", "dialect": "c"}
    del entry["tokenizer_py"]
    spec = parse([entry], tmp_path).models["qwen3"]
    assert spec.config.script_path is None and spec.config.command == ("axllm", "run", ".")
    assert spec.config.model_path == folder.resolve()
    message = only_error(parse([entry | {"dialect": "b"}], tmp_path))
    assert 'field "run_cmd"' in message and "not found" in message
    missing_dir = entry | {"model_path": "absent"}
    assert 'field "model_path"' in only_error(parse([missing_dir], tmp_path))


def escape_cases(tmp_path: Path) -> dict[str, dict[str, object]]:
    folder = make_model_dir(tmp_path / "models")
    outside = tmp_path / "outside.sh"
    outside.write_text("echo pwned\n")
    (folder / "link.sh").symlink_to(outside)
    (tmp_path / "outside_tokenizer.py").write_text("")
    return {
        "dotdot": {"run_cmd": "../../outside.sh"},
        "absolute": {"run_cmd": str(outside)},
        "shell_dotdot": {"run_cmd": "sh ../../outside.sh"},
        "symlink": {"run_cmd": "./link.sh"},
        "tokenizer": {"tokenizer_py": "../../outside_tokenizer.py"},
    }


@pytest.mark.parametrize("case", ["dotdot", "absolute", "shell_dotdot", "symlink", "tokenizer"])
def test_path_escapes_are_refused(tmp_path: Path, case: str) -> None:
    change = escape_cases(tmp_path)[case]
    entry = original_entry() | {"model_path": "models/qwen3", "tokenizer_path": "models/qwen3"} | change
    message = only_error(parse([entry], tmp_path))
    field = next(iter(change))
    assert message.startswith(f'{SOURCE}: model "qwen3": field "{field}": ')
    assert "resolves outside" in message


def test_symlink_inside_the_folder_is_fine(tmp_path: Path) -> None:
    folder = make_model_dir(tmp_path)
    (folder / "current.sh").symlink_to(folder / "run_qwen3_1.7b_axcl_aarch64.sh")
    spec = parse([original_entry() | {"run_cmd": "./current.sh"}], tmp_path).models["qwen3"]
    assert spec.config.script_path == folder.resolve() / "run_qwen3_1.7b_axcl_aarch64.sh"


# (change to the entry, field named in the error, words the problem must contain)
ERROR_CASES = [
    ({"run_cmd": None}, "run_cmd", "missing"),
    ({"run_cmd": ""}, "run_cmd", "missing"),
    ({"model_path": None}, "model_path", "missing"),
    ({"model_path": "nowhere"}, "model_path", "not a directory"),
    ({"run_cmd": "./absent.sh"}, "run_cmd", "not found"),
    ({"run_cmd": "./qwen3_tokenizer_uid.py'"}, "run_cmd", "cannot be split"),
    ({"tokenizer_path": "nowhere"}, "tokenizer_path", "not a directory"),
    ({"tokenizer_py": "absent.py"}, "tokenizer_py", "not found"),
    ({"tokenizer_port": "twelve"}, "tokenizer_port", "integer"),
    ({"tokenizer_port": "70000"}, "tokenizer_port", "65535"),
    ({"include_thinking": "maybe"}, "include_thinking", "boolean"),
    ({"context_size": "abc"}, "context_size", "integer"),
    ({"context_size": 0}, "context_size", "greater than"),
    ({"npu_memory_mb": -5}, "npu_memory_mb", "greater than"),
    ({"keep_alive": "soon"}, "keep_alive", "not a duration"),
    ({"aliases": "q3"}, "aliases", "tuple"),
    ({"aliases": [""]}, "aliases", "non-empty"),
    ({"details": "small"}, "details", "ModelDetails"),
    ({"engine": "gpu"}, "engine", "ax-runner"),
    ({"dialect": "z"}, "dialect", "'auto'"),
    ({"max_concurrency": "2"}, "max_concurrency", "not used by the ax-runner engine"),
    ({"load_timeout_s": "0"}, "load_timeout_s", "greater than"),
    ({"tokenizer_server": "ours"}, "tokenizer_server", "'auto', 'builtin' or 'stock'"),
    ({"tokenizer_server": "builtin", "tokenizer_py": None}, "tokenizer_server", "needs tokenizer_py"),
]


@pytest.mark.parametrize(("change", "field", "words"), ERROR_CASES)
def test_error_names_file_model_and_field(tmp_path: Path, change: dict[str, object], field: str, words: str) -> None:
    make_model_dir(tmp_path)
    entry = {k: v for k, v in (original_entry() | change).items() if v is not None}
    good = original_entry("other")
    make_model_dir(tmp_path, "other")
    result = parse([entry, good], tmp_path)
    assert list(result.models) == ["other"], "a bad entry does not stop the others"
    message = result.errors["qwen3"]
    assert message.startswith(f'{SOURCE}: model "qwen3": field "{field}": ')
    assert words in message


def test_missing_name_is_reported_by_entry_number(tmp_path: Path) -> None:
    make_model_dir(tmp_path)
    entry = original_entry()
    del entry["model_name"]
    result = parse([original_entry(), entry, "not an object"], tmp_path)
    assert list(result.models) == ["qwen3"]
    assert result.errors["entry #2"] == f'{SOURCE}: entry #2: field "model_name": missing'
    assert result.errors["entry #3"] == f"{SOURCE}: entry #3: expected an object, found str"


def test_duplicates_the_later_entry_is_the_error(tmp_path: Path) -> None:
    make_model_dir(tmp_path)
    make_model_dir(tmp_path, "other")
    first = original_entry() | {"aliases": ["q3"]}
    result = parse([first, original_entry(), original_entry("other") | {"aliases": ["q3"]},
                    original_entry("q3")], tmp_path)
    assert list(result.models) == ["qwen3"]
    assert result.errors["entry #2"] == (
        f'{SOURCE}: model "qwen3": field "model_name": duplicate name: already used by model "qwen3"')
    assert 'model "other": field "aliases": duplicate name "q3"' in result.errors["other"]
    assert 'model "q3": field "model_name": duplicate name' in result.errors["q3"]


def test_a_name_and_its_latest_tag_are_one_name(tmp_path: Path) -> None:
    """`x` and `x:latest` are the same model to a client, so two entries cannot claim them."""
    make_model_dir(tmp_path)
    make_model_dir(tmp_path, "other")
    result = parse([original_entry(), original_entry("qwen3:latest"), original_entry("other") | {"aliases": ["qwen3:latest"]},
                    original_entry("other") | {"model_name": "own", "aliases": ["own:latest"]}], tmp_path)
    assert list(result.models) == ["qwen3"]
    assert 'model "qwen3:latest": field "model_name": duplicate name: already used by model "qwen3"' in result.errors["qwen3:latest"]
    assert 'field "aliases": duplicate name "qwen3:latest": already used by model "qwen3"' in result.errors["other"]
    assert 'field "aliases": duplicate name "own:latest": already used by model "own"' in result.errors["own"]


def test_unknown_fields_are_warnings(tmp_path: Path) -> None:
    make_model_dir(tmp_path)
    result = parse([original_entry() | {"colour": "blue", "script_path": "/etc/passwd"}], tmp_path)
    assert "qwen3" in result.models
    assert result.warnings == [f'{SOURCE}: model "qwen3": unknown field "colour" ignored',
                               f'{SOURCE}: model "qwen3": unknown field "script_path" ignored']
    assert result.models["qwen3"].config.script_path.name == "run_qwen3_1.7b_axcl_aarch64.sh"


def http_entry(name: str = "upstream") -> dict[str, object]:
    return {"model_name": name, "engine": "openai-http", "base_url": "http://127.0.0.1:8000/v1",
            "api_key_env": "UPSTREAM_KEY", "max_concurrency": "2", "request_timeout_s": "30"}


def test_http_engine(tmp_path: Path) -> None:
    spec = parse([http_entry()], tmp_path).models["upstream"]
    assert spec.config.upstream_model == "upstream" and spec.config.max_concurrency == 2 and spec.config.retries == 2
    cases = [
        ({"base_url": None}, "base_url", "missing"),
        ({"base_url": "ftp://host/v1"}, "base_url", "http"),
        ({"run_cmd": "./run.sh"}, "run_cmd", "not used"),
        ({"api_key_env": "sk-123 secret"}, "api_key_env", "environment variable"),
        ({"max_concurrency": 0}, "max_concurrency", "greater than"),
        ({"retries": -1}, "retries", "greater than"),
    ]
    for change, field, words in cases:
        entry = {k: v for k, v in (http_entry() | change).items() if v is not None}
        message = only_error(parse([entry], tmp_path))
        assert message.startswith(f'{SOURCE}: model "upstream": field "{field}": ') and words in message


def test_file_errors(tmp_path: Path) -> None:
    assert parse_descriptor("[{", SOURCE, tmp_path).file_error.startswith(f"{SOURCE}: invalid JSON at line 1")
    assert "expected a JSON list" in parse_descriptor('{"a": 1}', SOURCE, tmp_path).file_error
    missing = load_descriptor(tmp_path / "absent.json")
    assert missing.file_error.startswith(str(tmp_path / "absent.json")) and not missing.models
    if os.geteuid() != 0:  # root reads anything
        unreadable = tmp_path / "locked.json"
        unreadable.write_text("[]")
        unreadable.chmod(0)
        assert "cannot read" in load_descriptor(unreadable).file_error


def test_load_descriptor_resolves_against_its_folder(tmp_path: Path) -> None:
    folder = make_model_dir(tmp_path / "conf")
    (tmp_path / "conf" / "descriptor.json").write_text(json.dumps([original_entry()]))
    result = load_descriptor(tmp_path / "conf" / "descriptor.json")
    assert result.models["qwen3"].config.model_path == folder.resolve()


def test_huge_descriptor(tmp_path: Path) -> None:
    make_model_dir(tmp_path)
    entries = [original_entry() | {"model_name": f"qwen3-{i}"} for i in range(1500)]
    entries += [http_entry(f"upstream-{i}") for i in range(1500)]
    result = parse(entries, tmp_path)
    assert len(result.models) == 3000 and not result.errors


@pytest.mark.parametrize(("value", "seconds"), [
    ("5m", 300.0), ("1h", 3600.0), ("30s", 30.0), ("1h30m", 5400.0), ("1.5h", 5400.0), ("300ms", 0.3),
    (30, 30.0), (2.5, 2.5), ("45", 45.0), ("0", 0.0), (0, 0.0),
    (-1, None), ("-1", None), ("-5m", None), (None, None),
    ("876000h", 876000 * 3600.0), (251605707415.0, None), (float("inf"), None), ("99999999999h", None),
])
def test_parse_keep_alive(value: object, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["", "soon", "5 minutes", "m5", "5d", True, [5], "nan"])
def test_parse_keep_alive_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="keep_alive"):
        parse_keep_alive(value)


def test_diff_specs() -> None:
    def spec(name: str, **changes: object) -> ModelSpec:
        return ModelSpec(name=name, engine="openai-http", config=HttpConfig(base_url="http://h/v1"), **changes)

    old = {"a": spec("a"), "b": spec("b"), "c": spec("c")}
    new = {"b": spec("b"), "c": spec("c", context_size=4096), "d": spec("d")}
    diff = diff_specs(old, new)
    assert (diff.added, diff.removed, diff.changed, diff.unchanged) == (["d"], ["a"], ["c"], ["b"])
    same = diff_specs(old, dict(old))
    assert (same.added, same.removed, same.changed, same.unchanged) == ([], [], [], ["a", "b", "c"])
    assert diff_specs({}, {}).unchanged == []
