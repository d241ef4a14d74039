"""HTTP routes: Ollama's API, OpenAI's /v1, and the daemon's own status, logs and metrics."""
