"""The descriptor fields of a card model: its folder, run command, dialect and tokenizer server.

Pure apart from resolving paths and checking that they exist.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from ...descriptor import EngineConfig, FieldError, resolve_path
from .dialects import DIALECTS

_SHELLS = frozenset({"sh", "bash", "dash"})


class CardConfig(EngineConfig):
    computed: ClassVar[frozenset[str]] = frozenset({"script_path", "command"})

    run_cmd: str
    model_path: Path  # absolute and resolved once checked
    dialect: str = "auto"
    tokenizer_path: Path | None = None  # absolute, resolved
    tokenizer_py: str | None = None
    tokenizer_ip: str = "127.0.0.1"
    tokenizer_port: int | None = Field(default=None, ge=1, le=65535)
    # Which server answers the runner: the folder's script as it is, ours on the tokenizer files
    # the script loads, or ours where those files load and render (tokenizer_service.stock_script).
    tokenizer_server: Literal["auto", "builtin", "stock"] = "auto"
    # Replicas: the cards (`--devices` ids) this model runs on, one runner each behind one queue;
    # empty = the card its run script names.
    devices: tuple[int, ...] = ()
    load_timeout_s: float = Field(default=300.0, gt=0)
    hang_timeout_s: float = Field(default=120.0, gt=0)
    # Computed from run_cmd: the resolved run script (None when the dialect starts a program such
    # as `axllm run .`), and the argv that starts the runner with model_path as working directory.
    script_path: Path | None = None
    command: tuple[str, ...] = ()

    @field_validator("dialect")
    @classmethod
    def _dialect(cls, value: str) -> str:
        names = ("auto", *DIALECTS)
        if value not in names:
            raise ValueError(f"Input should be {', '.join(repr(n) for n in names)}")
        return value

    def resolved(self, base_dir: Path, model_name: str) -> CardConfig:
        model_dir = resolve_path(base_dir, self.model_path)
        if not model_dir.is_dir():
            raise FieldError("model_path", f"not a directory: {model_dir}")
        script_path, command = run_command(self.run_cmd, model_dir, self.dialect)
        tokenizer_dir = resolve_path(base_dir, self.tokenizer_path) if self.tokenizer_path else None
        if tokenizer_dir is not None and not tokenizer_dir.is_dir():
            raise FieldError("tokenizer_path", f"not a directory: {tokenizer_dir}")
        if self.tokenizer_py is None and self.tokenizer_server != "auto":
            raise FieldError("tokenizer_server", "needs tokenizer_py: the tokenizer service starts the server it "
                             "chooses in place of that script (without it, the tokenizer server is an external one)")
        if self.tokenizer_py is not None:
            script_dir = tokenizer_dir or model_dir
            tokenizer_script = resolve_path(script_dir, Path(self.tokenizer_py))
            if not tokenizer_script.is_relative_to(script_dir):
                raise FieldError("tokenizer_py", "resolves outside tokenizer_path")
            if not tokenizer_script.is_file():
                raise FieldError("tokenizer_py", f"not found in {script_dir}")
        if self.devices:
            if len(set(self.devices)) != len(self.devices) or min(self.devices) < 0:
                raise FieldError("devices", "a list of distinct card ids (0, 1, …)")
            if script_path is None or "--devices" not in script_path.read_text(encoding="utf-8", errors="replace"):
                raise FieldError("devices", "the run script has no --devices flag to pick a card with")
        return self.model_copy(update={
            "model_path": model_dir, "tokenizer_path": tokenizer_dir, "script_path": script_path, "command": command,
        })


    def folders(self) -> tuple[Path, ...]:
        folders = [self.model_path]
        if self.tokenizer_path is not None and not self.tokenizer_path.is_relative_to(self.model_path):
            folders.append(self.tokenizer_path)
        return tuple(folders)


def run_command(run_cmd: str, model_dir: Path, dialect: str) -> tuple[Path | None, tuple[str, ...]]:
    """The run script and the argv for `run.sh`, `./run.sh`, `sh run.sh`, `bash run.sh ARGS`,
    `/bin/sh run.sh` or an absolute path. Scripts have no shebang, so they always run through a
    shell (the one run_cmd names, else /bin/sh). A dialect started as a program may name one
    instead of a script (`axllm run .`)."""
    try:
        words = shlex.split(run_cmd)
    except ValueError as exc:
        raise FieldError("run_cmd", f"cannot be split into words: {exc}") from None
    if not words:
        raise FieldError("run_cmd", "missing")
    if len(words) > 1 and Path(words[0]).name in _SHELLS:
        shell, script_word, arguments = words[0], words[1], words[2:]
    else:
        shell, script_word, arguments = "/bin/sh", words[0], words[1:]
    script = resolve_path(model_dir, Path(script_word))
    started_as_program = dialect in DIALECTS and not DIALECTS[dialect].launched_by_script
    if started_as_program and not script.is_file():
        return None, program_command(words, model_dir)
    if not script.is_relative_to(model_dir):
        raise FieldError("run_cmd", "resolves outside model_path")
    if not script.is_file():
        raise FieldError("run_cmd", f"script {script_word!r} not found in model_path")
    return script, (shell, str(script), *arguments)


def program_command(words: list[str], model_dir: Path) -> tuple[str, ...]:
    """The argv of a runner started as a program (`axllm run .`): run without a shell, so shell
    syntax is inert, and held to the containment of run scripts — the program is a name found on
    PATH or lies inside model_path, and no argument that names a path leads outside it."""
    program, *arguments = words
    if "/" in program and not resolve_path(model_dir, Path(program)).is_relative_to(model_dir):
        raise FieldError("run_cmd", f"program {program!r} resolves outside model_path")
    for argument in arguments:
        if argument.startswith("-"):
            continue
        if ("/" in argument or argument == "..") and not resolve_path(model_dir, Path(argument)).is_relative_to(model_dir):
            raise FieldError("run_cmd", f"argument {argument!r} resolves outside model_path")
    return tuple(words)


def script_flags(text: str) -> dict[str, str]:
    """The `--name value` (or `--name=value`) flags of a run script, as the runner reads them;
    a shell script whose lines continue with `\\`. Pure; unparsable text gives what it can."""
    try:
        words = shlex.split(text.replace("\\\n", " "), comments=True)
    except ValueError:
        words = text.split()
    flags: dict[str, str] = {}
    for index, word in enumerate(words):
        if not word.startswith("--"):
            continue
        name, equals, value = word[2:].partition("=")
        if equals:
            flags[name] = value
        elif index + 1 < len(words) and not words[index + 1].startswith("--"):
            flags[name] = words[index + 1]
    return flags


def model_facts_from_flags(flags: dict[str, str]) -> dict[str, object]:
    """What a runner's flags tell about its model, in Ollama's model_info terms (without the
    architecture prefix): the architecture, from the layer files' names
    (`qwen3_p128_l%d_together.axmodel` is qwen3), its layer count and its embedding width."""
    facts: dict[str, object] = {}
    template = flags.get("template_filename_axmodel", "")
    stem = Path(template).name.split("_p", 1)[0] if "%d" in template else ""
    if stem and stem.replace("-", "").replace(".", "").isalnum():
        facts["architecture"] = stem
    for flag, key in (("axmodel_num", "block_count"), ("tokens_embed_size", "embedding_length")):
        if flags.get(flag, "").isdigit():
            facts[key] = int(flags[flag])
    # A vision-language runner names its image encoder (the card's flag is misspelt `axmodedl`;
    # the later config key is spelt right): docs/vlm-runners.md §2.
    if any(flags.get(name) for name in ("filename_image_encoder_axmodedl", "filename_image_encoder_axmodel")):
        facts["vision"] = True
        if flags.get("img_width"):  # the Qwen-VL builds: a directory of frames at the image marker
            facts["image_directories"] = True
        if flags.get("video") == "1":  # a Qwen-VL build for video: its second marker is `video >> `
            facts["video"] = True
    return facts
