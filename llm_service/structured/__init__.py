"""Structured output: answers that must be JSON, or JSON valid for a schema.

Ollama's `format` ("json" or a JSON schema) and OpenAI's `response_format` (`json_object`,
`json_schema`) become one `StructuredOutput` (`requests.py`, `output.py`). The card cannot
constrain its sampling, so the schema is put in front of the model (`prompt.py`, placed by the
card's planner), the answer is extracted, parsed and validated (`answer.py`), and an invalid
answer is asked again in a fresh context a bounded number of times (`attempts.py`, through the
model manager). HTTP upstreams get `response_format` passed on (vLLM and llama.cpp constrain
their sampling with it), and what they send back is validated alike.

Everything but `attempts.py` is pure. This package's `__init__` imports nothing, so the card's
planner can import `prompt` while the engines package is still loading.
"""
