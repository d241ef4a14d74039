"""Tokenizer server of this model folder, started as the stock scripts are:
`python smollm2_tokenizer_uid.py --host 127.0.0.1 --port N` with this folder as the working directory."""
import sys
from pathlib import Path

from tokenizer_service.server import main

TOKENIZER_FOLDER = Path(__file__).resolve().parent / "tokenizer"

sys.exit(main(["--tokenizer", str(TOKENIZER_FOLDER), *sys.argv[1:]]))
