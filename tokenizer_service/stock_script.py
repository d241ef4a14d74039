"""What a model folder's stock tokenizer script says, read from its text, and which server runs.

Every model folder published for the card has a tokenizer script: a single-threaded
`http.server` around `AutoTokenizer.from_pretrained("<folder>")`, with a hard-coded system
prompt. Our server (tokenizer_service.server) can stand in for it on the same tokenizer files,
with the script's own defaults, so that a runner sees the same ids and a request's system prompt,
history, newlines and tools reach the model. The script is never imported or run to learn this:
its text is parsed (`ast`), and only literal values are taken.

Pure: `read_script` and `choose_server` take text and facts; `folder_facts` is the one function
that reads files (a few small JSON files, no tokenizer is loaded).
"""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

# Where a folder lacks a script naming its tokenizer folder, the published layout's name.
TOKENIZER_FOLDER_SUFFIX = "_tokenizer"
# Files one of which a tokenizer folder must hold for `AutoTokenizer` to load it.
NO_THINK = "/no_think"  # Qwen3's switch, which its scripts append to user messages
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


class ServerChoice(StrEnum):
    BUILTIN = "builtin"  # our server on the folder's tokenizer files
    STOCK = "stock"  # the folder's own script, as it is
    AUTO = "auto"  # ours where the files load and render, the script otherwise


@dataclass(frozen=True)
class ScriptFacts:
    """The literal values of a stock script that decide what a runner sees."""

    tokenizer_folders: tuple[str, ...] = ()  # the folders given to from_pretrained, in order
    system_prompt: str | None = None  # the content of its first {"role": "system", ...} literal
    user_suffix: str | None = None  # a literal appended to every user message ("/no_think")
    # The ids dropped from a render with the generation prompt to get what the runner holds
    # (`encode(text)[:-3]`); None: the script keeps no such prefix.
    generation_prompt_cut: int | None = None
    reset_methods: frozenset[str] = frozenset()  # the HTTP methods whose handler serves /reset
    # Where it loads two tokenizers (Qwen3's scripts render with Qwen2.5's template): the folder
    # of the one it encodes with, and of the one whose apply_chat_template it calls.
    encode_folder: str | None = None
    template_folder: str | None = None


def read_script(text: str) -> ScriptFacts:
    """The facts of a stock script's text; what cannot be parsed or is not a literal is unknown."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return ScriptFacts()
    strings = _string_assignments(tree)
    defaults = _argument_defaults(tree)
    folders: list[str] = []
    system_prompt = user_suffix = None
    cut = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _called_name(node) == "from_pretrained" and node.args:
            folder = _literal(node.args[0], strings, defaults)
            if folder is not None and folder not in folders:
                folders.append(folder)
        elif isinstance(node, ast.Dict) and system_prompt is None:
            system_prompt = _system_content(node, strings)
        elif isinstance(node, (ast.BinOp, ast.AugAssign)) and isinstance(node.op, ast.Add) and user_suffix is None:
            added = node.right if isinstance(node, ast.BinOp) else node.value
            if isinstance(added, ast.Constant) and isinstance(added.value, str) and NO_THINK in added.value:
                user_suffix = added.value
        elif isinstance(node, ast.Subscript) and cut is None:
            cut = _tail_cut(node)
    bound = _bound_folders(tree, strings, defaults)
    return ScriptFacts(tuple(folders), system_prompt, user_suffix, cut, _reset_methods(tree),
                       _used_folder(tree, bound, "encode"), _used_folder(tree, bound, "apply_chat_template"))


def _target_name(node: ast.AST) -> str | None:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def _bound_folders(tree: ast.AST, strings: dict[str, str], defaults: dict[str, str]) -> dict[str, str]:
    """`self.tokenizer = AutoTokenizer.from_pretrained("dir")`: {"tokenizer": "dir"}."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and _called_name(node.value) == "from_pretrained" and node.value.args):
            folder = _literal(node.value.args[0], strings, defaults)
            for target in node.targets:
                if folder is not None and (name := _target_name(target)) is not None:
                    bound.setdefault(name, folder)
    return bound


def _used_folder(tree: ast.AST, bound: dict[str, str], method: str) -> str | None:
    """The folder of the tokenizer whose `method` the script calls first (`self.tokenizer.encode`)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == method:
            name = _target_name(node.func.value)
            if name in bound:
                return bound[name]
    return None


def _string_assignments(tree: ast.AST) -> dict[str, str]:
    """`name = "text"` (also `self.name = "text"`) anywhere in the script, the first one kept."""
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if (name := _target_name(target)) is not None:
                    found.setdefault(name, node.value.value)
    return found


def _argument_defaults(tree: ast.AST) -> dict[str, str]:
    """`parser.add_argument("--model_id", default="dir")`: {"model_id": "dir"}."""
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _called_name(node) == "add_argument" and node.args:
            flag = node.args[0]
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            if (isinstance(flag, ast.Constant) and isinstance(flag.value, str)
                    and isinstance(default, ast.Constant) and isinstance(default.value, str)):
                found[flag.value.lstrip("-").replace("-", "_")] = default.value
    return found


def _called_name(call: ast.Call) -> str | None:
    return _target_name(call.func)


def _literal(node: ast.AST, strings: dict[str, str], defaults: dict[str, str]) -> str | None:
    """A string literal, a name bound to one, or `args.x` of an argument with a string default."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return strings.get(node.id)
    if isinstance(node, ast.Attribute):
        of_args = isinstance(node.value, ast.Name) and node.value.id == "args"
        return defaults.get(node.attr) if of_args else strings.get(node.attr)
    return None


def _system_content(node: ast.Dict, strings: dict[str, str]) -> str | None:
    values = {}
    for key, value in zip(node.keys, node.values):
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            values[key.value] = value
    role, content = values.get("role"), values.get("content")
    if not (isinstance(role, ast.Constant) and role.value == "system") or content is None:
        return None
    return _literal(content, strings, {})


def _tail_cut(node: ast.Subscript) -> int | None:
    """N of `tokenizer.encode(text)[:-N]` (ids with a fixed tail dropped)."""
    part = node.slice
    if not (isinstance(part, ast.Slice) and part.lower is None and part.step is None):
        return None
    if not (isinstance(node.value, ast.Call) and _called_name(node.value) == "encode"):
        return None
    upper = part.upper
    if (isinstance(upper, ast.UnaryOp) and isinstance(upper.op, ast.USub)
            and isinstance(upper.operand, ast.Constant) and type(upper.operand.value) is int):
        return upper.operand.value
    return None


def _reset_methods(tree: ast.AST) -> frozenset[str]:
    methods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in ("do_GET", "do_POST"):
            texts = (n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str))
            if any("/reset" in text for text in texts):
                methods.add(node.name[3:])
    return frozenset(methods)


# ---- the tokenizer folder and the choice -------------------------------------------------------


@dataclass(frozen=True)
class FolderFacts:
    """What was found for one model: its script's facts, the tokenizer folder and its files."""

    script: ScriptFacts
    tokenizer_dir: Path | None  # the folder our server would load
    found_by: str  # how it was found (or why none was), for the status
    template_dir: Path | None = None  # where the chat template comes from, when another folder
    has_vocabulary: bool = False
    has_chat_template: bool = False
    problem: str | None = None  # a file that exists but cannot be read


class CannotChoose(ValueError):
    """The descriptor asks for our server where there is nothing for it to load."""


@dataclass(frozen=True)
class Choice:
    server: ServerChoice  # BUILTIN or STOCK
    reason: str

    def describe(self) -> str:
        return f"{self.server.value}: {self.reason}"


def _inside(root: Path, name: str) -> Path | None:
    candidate = (root / name).resolve()
    return candidate if candidate.is_relative_to(root) and candidate.is_dir() else None


def find_tokenizer_dir(folder: Path, script: ScriptFacts) -> tuple[Path | None, str]:
    """The folder the script loads (relative to its working directory, inside `folder`; the one
    it encodes with first), else the one `*_tokenizer/` (or `tokenizer/`) folder; with how it
    was found or why none was."""
    root = folder.resolve()
    names = dict.fromkeys([*([script.encode_folder] if script.encode_folder else []), *script.tokenizer_folders])
    for name in names:
        if (candidate := _inside(root, name)) is not None:
            return candidate, f"{candidate.name}/, which the script loads"
    named = ", ".join(f"{n!r}" for n in script.tokenizer_folders)
    # `tokenizer/` too: the plain name a Hugging Face layout (and our demo folders) use.
    candidates = sorted(p for p in [*root.glob(f"*{TOKENIZER_FOLDER_SUFFIX}"), root / "tokenizer"] if p.is_dir())
    if len(candidates) == 1:
        prefix = f"the script loads {named}, not a folder here; " if named else ""
        kind = f"*{TOKENIZER_FOLDER_SUFFIX}/" if candidates[0].name.endswith(TOKENIZER_FOLDER_SUFFIX) else "tokenizer folder"
        return candidates[0], f"{prefix}{candidates[0].name}/, the folder's {kind}"
    if named:
        why = f"the script loads {named}, not a folder inside the model folder"
    else:
        why = "the script names no tokenizer folder"
    if len(candidates) > 1:
        return None, f"{why}, and there are {len(candidates)} *{TOKENIZER_FOLDER_SUFFIX}/ folders"
    return None, f"{why}, and there is no *{TOKENIZER_FOLDER_SUFFIX}/ folder"


def folder_facts(folder: Path, script_text: str) -> FolderFacts:
    """Read what the choice needs: the script's facts, the tokenizer folder, its files."""
    script = read_script(script_text)
    tokenizer_dir, found_by = find_tokenizer_dir(folder, script)
    if tokenizer_dir is None:
        return FolderFacts(script, None, found_by)
    vocabulary = any((tokenizer_dir / name).is_file() for name in VOCABULARY_FILES)
    template_dir = None
    if script.template_folder is not None:
        other = _inside(folder.resolve(), script.template_folder)
        if other is not None and other != tokenizer_dir:
            template_dir = other
            found_by += f", with the chat template of {other.name}/, which the script renders with"
    template, problem = _has_template(template_dir or tokenizer_dir)
    return FolderFacts(script, tokenizer_dir, found_by, template_dir, vocabulary, template, problem)


def _has_template(folder: Path) -> tuple[bool, str | None]:
    if any((folder / name).is_file() for name in TEMPLATE_FILES):
        return True, None
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return False, None
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return False, f"{folder.name}/tokenizer_config.json cannot be read: {exc}"
    return isinstance(values, dict) and bool(values.get("chat_template")), None


def choose_server(mode: ServerChoice | str, facts: FolderFacts) -> Choice:
    """Which server runs for `mode`, and why. `builtin` runs ours on the folder found (files that
    do not load fail loudly in its log; no folder at all: CannotChoose); `stock` runs the script;
    `auto` runs ours where the tokenizer files are there and have a chat template, the script
    otherwise."""
    mode = ServerChoice(mode)
    if mode is ServerChoice.STOCK:
        return Choice(ServerChoice.STOCK, "the descriptor asks for the folder's own script")
    usable, why_not = _usable(facts)
    if mode is ServerChoice.BUILTIN:
        if facts.tokenizer_dir is None:
            raise CannotChoose(
                f"tokenizer_server is builtin, but {facts.found_by}: set tokenizer_server to stock or auto")
        return Choice(ServerChoice.BUILTIN, f"on {facts.found_by} (the descriptor asks for it)"
                      + ("" if usable else f"; warning: {why_not}"))
    if usable:
        return Choice(ServerChoice.BUILTIN, f"on {facts.found_by}: tokenizer files and a chat template are there")
    return Choice(ServerChoice.STOCK, f"the folder's own script runs: {why_not}")


def _usable(facts: FolderFacts) -> tuple[bool, str]:
    if facts.tokenizer_dir is None:
        return False, facts.found_by
    if facts.problem:
        return False, facts.problem
    if not facts.has_vocabulary:
        return False, f"{facts.tokenizer_dir.name}/ has no tokenizer files ({', '.join(VOCABULARY_FILES)})"
    if not facts.has_chat_template:
        return False, f"{(facts.template_dir or facts.tokenizer_dir).name}/ has no chat template"
    return True, ""


def server_arguments(facts: FolderFacts) -> list[str]:
    """What runs after the interpreter to start our server in place of the script: on the
    tokenizer folder found, checked at start-up, with the script's defaults."""
    if facts.tokenizer_dir is None:
        raise CannotChoose(f"no tokenizer folder for our server: {facts.found_by}")
    arguments = ["-m", "tokenizer_service.server", "--tokenizer", str(facts.tokenizer_dir), "--check-template"]
    if facts.template_dir is not None:
        arguments += ["--chat-template-from", str(facts.template_dir)]
    script = facts.script
    if script.system_prompt is not None:
        arguments += ["--default-system-prompt", script.system_prompt]
        if "POST" not in script.reset_methods:  # a runner's POST /reset never reached its model
            arguments += ["--ignore-runner-system-prompt"]
    if script.user_suffix is not None:
        arguments += ["--user-suffix", script.user_suffix]
    if script.generation_prompt_cut is not None:
        arguments += ["--generation-prompt-cut", str(script.generation_prompt_cut)]
    return arguments
