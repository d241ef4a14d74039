"""axm1-llm daemon: Ollama and OpenAI APIs in front of the AX-M1 card's runners."""
import sys

__version__ = "0.1.0"

# httpx imports its command-line client (click, rich, pygments) whenever they are installed, as
# transformers' dependencies install them: ~70 ms of every daemon start, and memory, for a
# program the daemon never runs. A None entry makes that import fail, and httpx then defines its
# stub `httpx.main` (its own ImportError path). Nothing is changed where httpx is already loaded.
sys.modules.setdefault("httpx._main", None)
