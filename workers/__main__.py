"""`python -m workers KIND [ARGS…]`, the same as `axm1-llm worker KIND [ARGS…]`."""
import sys

from workers import KINDS, main

if len(sys.argv) < 2 or sys.argv[1] not in KINDS:
    print(f"usage: python -m workers {{{','.join(KINDS)}}} [--help | ARGS…]", file=sys.stderr)
    sys.exit(2)
sys.exit(main(sys.argv[1], sys.argv[2:], prog=f"python -m workers {sys.argv[1]}"))
