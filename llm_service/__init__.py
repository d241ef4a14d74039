"""axm1-llm daemon: Ollama and OpenAI APIs in front of the AX-M1 card's runners."""
__version__ = "0.1.0"
