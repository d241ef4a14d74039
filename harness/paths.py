"""Where things are: the checkout, this interpreter's scripts, the demo model's tokenizer."""
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # axm1-llm, ax-emulator, transformers: next to this interpreter
AXM1_LLM = BIN / "axm1-llm"
TOKENIZER_DIR = REPO_ROOT / "model" / "smollm2-135m" / "tokenizer"
