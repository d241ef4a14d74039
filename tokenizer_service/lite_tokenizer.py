"""A tokenizer folder served without transformers: `tokenizers` for the ids, Jinja2 for the chat template.

A transformers tokenizer costs its server about 130 MB of memory (transformers, its imports);
this one needs only the `tokenizers` library and Jinja2, and answers what the server asks of
the transformers tokenizer (ChatTokenizer in tokenizer_service.server) the same way, id for
id and character for character, for the folders it takes (`can_load`):

- `tokenizer.json` is the vocabulary, loaded as it is, which is what transformers does for a
  folder naming the generic fast class (`PreTrainedTokenizerFast` / `TokenizersBackend`); a
  model-specific class rebuilds its tokenizer from the vocabulary with its own rules, so such a
  folder is left to transformers.
- `tokenizer_config.json` gives the special tokens (bos/eos/unk/sep/pad/cls/mask, strings or
  AddedToken objects; those missing from the file's added tokens are added as special, as
  transformers adds them), `added_tokens_decoder`, `extra_special_tokens` /
  `additional_special_tokens`, `split_special_tokens`, `clean_up_tokenization_spaces` and the
  chat template: a string or a list of named templates; `chat_template.jinja` and
  `additional_chat_templates/*.jinja` take precedence over it, as they do in transformers.
- Templates render in a sandboxed, immutable Jinja2 environment set up as transformers sets up
  its own: trim_blocks and lstrip_blocks, the loop controls, `raise_exception`,
  `strftime_now`, a `tojson` that keeps non-ASCII text and takes indent/separators/sort_keys,
  a `dict` and a `namespace` that store no underscore names, and `{% generation %}` blocks
  (rendered as their body). The variables: `messages` (keys whose value is null dropped, a
  reasoning field also given as `reasoning_content` and `thinking`), `tools`, `documents`,
  `add_generation_prompt`, the special tokens by name (`bos_token`, `eos_token`, ...) and the
  caller's keyword arguments (`enable_thinking`), which win over the special tokens.
- `apply_chat_template(tokenize=True)` encodes the rendered text without adding special tokens
  (the template writes them); `decode` is the vocabulary's decoder, with `skip_special_tokens`.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer

ENGINE = "tokenizers"
# tokenizer_class values transformers loads straight from tokenizer.json, as this module does.
GENERIC_FAST_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
# Names a message's reasoning goes under; templates read the first one (gpt-oss's: `thinking`).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class LiteUnsupported(Exception):
    """The folder needs transformers (no tokenizer.json, a model-specific class, a template
    this renderer does not compile)."""


def read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise LiteUnsupported(f"tokenizer_config.json: {exc}") from None
    if not isinstance(config, dict):
        raise LiteUnsupported("tokenizer_config.json is not an object")
    return config


def why_not(source: Path) -> str | None:
    """Why `source` cannot be served by this module (None: it can)."""
    if not source.is_dir():
        return f"{source.name} is not a tokenizer folder"
    if not (source / "tokenizer.json").is_file():
        return "no tokenizer.json"
    try:
        config = read_config(source)
    except LiteUnsupported as exc:
        return str(exc)
    if config.get("tokenizer_class") not in GENERIC_FAST_CLASSES:
        return f"tokenizer_class {config.get('tokenizer_class')!r} is not the generic fast class"
    return None


def can_load(source: Path) -> bool:
    return why_not(source) is None


def token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken object."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def added_token(value: Any, special: bool | None = None) -> AddedToken:
    if isinstance(value, str):
        return AddedToken(value, special=True if special is None else special)
    flags = {key: value[key] for key in ("single_word", "lstrip", "rstrip", "normalized") if key in value}
    return AddedToken(value["content"], special=bool(value.get("special", True)) if special is None else special,
                      **flags)


def flags(token: AddedToken) -> tuple[Any, ...]:
    return (token.content, token.special, token.single_word, token.lstrip, token.rstrip, token.normalized)


def chat_templates(folder: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    """The folder's chat template: one string, or named templates (transformers' precedence:
    the .jinja files over tokenizer_config.json)."""
    files: dict[str, str] = {}
    if (folder / TEMPLATE_FILE).is_file():
        files["default"] = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    if (folder / TEMPLATE_DIR).is_dir():
        for path in sorted((folder / TEMPLATE_DIR).glob("*.jinja")):
            files[path.stem] = path.read_text(encoding="utf-8")
    if files:
        return files["default"] if list(files) == ["default"] else files
    template = config.get("chat_template")
    if isinstance(template, (list, tuple)):
        return {item["name"]: item["template"] for item in template}
    return template if isinstance(template, str) else None


# -- the template environment -------------------------------------------------------------

class GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (templates that mark the assistant's tokens for
    training masks): rendered as its body, as transformers renders it outside mask tracking."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
           sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &, ') and takes no options.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class TemplateDict:
    """`dict(...)` for templates, without the class itself (its attributes) within reach."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
        )


class TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names (no way to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature: namespace(self=...) works
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _check_name(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def template_environment() -> ImmutableSandboxedEnvironment:
    if tuple(int(part) for part in jinja2.__version__.split(".")[:3] if part.isdigit()) < (3, 1, 6):
        # Older sandboxes have known escapes, and chat templates come from model folders.
        raise LiteUnsupported(f"Jinja2 {jinja2.__version__} is older than 3.1.6")
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    environment.globals["dict"] = TemplateDict()
    environment.globals["namespace"] = TemplateNamespace
    return environment


def plain(value: Any) -> Any:
    """What the template may see: JSON types only (subclasses reduced to their base type)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {plain(key): plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(plain(item) for item in value)
    return f"<{type(value).__name__}>"


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the template gets them: null values dropped, reasoning under every name."""
    shaped = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages should be dicts, but got {message!r}.")
        message = plain({key: value for key, value in message.items() if value is not None})
        reasoning = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        shaped.append(message)
    return shaped


# -- the tokenizer --------------------------------------------------------------------------

class LiteTokenizer:
    """The parts of a transformers fast tokenizer our tokenizer server uses."""

    engine = ENGINE

    def __init__(self, folder: Path) -> None:
        reason = why_not(folder)
        if reason is not None:
            raise LiteUnsupported(reason)
        config = read_config(folder)
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # A tokenizer.json may carry the padding and truncation it was trained with (BERT's pads
        # to 128); transformers encodes without either unless a call asks, and so does this.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._add_missing_tokens(config)
        if config.get("split_special_tokens"):
            self._tokenizer.encode_special_tokens = True
        self._special = {name: token_content(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._clean_up_bpe = bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        self._environment = template_environment()
        self._compiled: dict[str, jinja2.Template] = {}
        self.chat_template = chat_templates(folder, config)

    def _add_missing_tokens(self, config: dict[str, Any]) -> None:
        """Tokens the config names as transformers adds them to the vocabulary's: an
        `added_tokens_decoder` entry unlike the added token of its text (absent, or other flags:
        re-adding it sets them), then the special tokens whose text is no added token (special)."""
        present = {flags(token) for token in self._tokenizer.get_added_tokens_decoder().values()}
        to_add: list[AddedToken] = []
        decoder = config.get("added_tokens_decoder") or {}
        for _, value in sorted(decoder.items(), key=lambda item: int(item[0])):
            if token_content(value) is not None and flags(token := added_token(value)) not in present:
                to_add.append(token)
        contents = {token.content for token in self._tokenizer.get_added_tokens_decoder().values()}
        contents |= {token.content for token in to_add}
        named = [config.get(name) for name in SPECIAL_TOKEN_NAMES]
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, dict):
            extra = list(extra.values())
        for value in [*named, *extra]:
            content = token_content(value)
            if content is not None and content not in contents:
                to_add.append(added_token(value, special=True))
                contents.add(content)
        if to_add:
            self._tokenizer.add_tokens(to_add)

    # -- the chat template ----------------------------------------------------------------

    @property
    def chat_template(self) -> str | dict[str, str] | None:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: str | dict[str, str] | None) -> None:
        """Compiled now, so a template this environment cannot parse fails at load."""
        for text in ([] if template is None else [template] if isinstance(template, str) else template.values()):
            self._compile(text)
        self._chat_template = template

    def _compile(self, text: str) -> jinja2.Template:
        if text not in self._compiled:
            try:
                self._compiled[text] = self._environment.from_string(text)
            except jinja2.exceptions.TemplateSyntaxError as exc:
                raise LiteUnsupported(f"the chat template does not compile here: {exc}") from None
        return self._compiled[text]

    def get_chat_template(self, tools: list[dict[str, Any]] | None = None) -> str:
        template = self._chat_template
        if isinstance(template, dict):
            if tools is not None and "tool_use" in template:
                return template["tool_use"]
            if "default" in template:
                return template["default"]
            raise ValueError(f"This model has multiple chat templates with no default: {sorted(template)}")
        if template is None:
            raise ValueError("This tokenizer has no chat template")
        return template

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {name: value for name, value in self._special.items() if value is not None}

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None, add_generation_prompt: bool = False,
        tokenize: bool = True, **kwargs: Any,
    ) -> str | list[int]:
        template = self._compile(self.get_chat_template(tools))
        if not messages:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        variables = {**self.special_tokens_map, **kwargs}
        text = template.render(
            messages=template_messages(messages), tools=plain(tools), documents=plain(documents),
            add_generation_prompt=add_generation_prompt, **plain(variables),
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # -- ids ------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """The ids of `text`, special tokens written in it included, none added: what the server
        encodes (renders, whose template writes the special tokens, and raw text). Adding them
        (bos/eos by `add_bos_token`, the post-processor) is not done here: transformers rebuilds
        the post-processor from the config for that, and nothing here needs it."""
        if add_special_tokens:
            raise ValueError("the lite tokenizer adds no special tokens; the chat template writes them")
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        is_bpe = type(self._tokenizer.model).__name__ == "BPE"
        if self.clean_up_tokenization_spaces and (not is_bpe or self._clean_up_bpe):
            for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                                   (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(spaced, joined)
        return text

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def _token_id(self, name: str) -> int | None:
        token = self._special.get(name)
        return None if token is None else self._tokenizer.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self._special["bos_token"]

    @property
    def eos_token(self) -> str | None:
        return self._special["eos_token"]

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id("eos_token")
