"""Export the tokenizer of a GGUF model as plain tokenizer files (run once, commit the result).

Reading a tokenizer out of a GGUF needs the `gguf` package and takes seconds; the exported
`tokenizer.json` + `tokenizer_config.json` load in a fraction of that, without `gguf`.

    python -m tokenizer_service.export_gguf_tokenizer MODEL.gguf OUT_DIR
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoTokenizer

# Keys save_pretrained records about this machine's load, meaningless in a committed folder.
_LOAD_STATE_KEYS = ("is_local", "local_files_only")


def export_gguf_tokenizer(gguf_file: Path, out_dir: Path) -> None:
    """Write the tokenizer of `gguf_file` into `out_dir` as tokenizer.json + tokenizer_config.json.

    The chat template goes inside tokenizer_config.json and the class is named
    PreTrainedTokenizerFast, so transformers 4.x (what stock tokenizer scripts run on) loads
    the folder as well as 5.x does.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in _LOAD_STATE_KEYS:
        config.pop(key, None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = tokenizer.chat_template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf_file", type=Path, help="the model's .gguf file")
    parser.add_argument("out_dir", type=Path, help="folder to write the tokenizer files into")
    args = parser.parse_args(argv)
    export_gguf_tokenizer(args.gguf_file.resolve(), args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
