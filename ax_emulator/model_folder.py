"""Card-shaped model folders served by the emulator, for tests and benchmarks.

A folder holds what a model folder of the card holds for the daemon: a run script without a
shebang, `post_config.json`, and a tokenizer script run as `python <script> --host H --port P`
(here a launcher of our tokenizer server). Returns the descriptor entry in the original format:
every value a string.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKENIZER_LAUNCHER = """\
import sys
from tokenizer_service.server import main
sys.exit(main([{arguments}*sys.argv[1:]]))
"""


def write_model_folder(
    folder: Path,
    name: str,
    run_script: str,
    *,
    tokenizer_dir: Path,
    tokenizer_port: int,
    tokenizer_args: tuple[str, ...] = (),
    think: bool = False,
) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / f"run_{name}_axcl_x86.sh"
    script.write_text(run_script)
    (folder / "post_config.json").write_text(json.dumps({"enable_temperature": False, "temperature": 0.9}, indent=4))
    arguments = "".join(f"{a!r}, " for a in ("--tokenizer", str(tokenizer_dir), *tokenizer_args))
    (folder / f"{name}_tokenizer.py").write_text(TOKENIZER_LAUNCHER.format(arguments=arguments))
    return {
        "model_name": name,
        "run_cmd": script.name,
        "model_path": str(folder),
        "include_thinking": "true" if think else "false",
        "run_on_startup": "false",
        "tokenizer_path": str(folder),
        "tokenizer_py": f"{name}_tokenizer.py",
        "tokenizer_ip": "127.0.0.1",
        "tokenizer_port": str(tokenizer_port),
        "details": {"format": "scripted", "family": "echo", "parameter_size": "0", "quantization_level": "none"},
    }
