"""A prompt service on the real demo model: SmolLM2-135M-Instruct generating on the CPU behind the
emulated runner, counted on its own tokenizer server. Small on purpose: a test services folder
whose manifest asks for few chunks and short summaries."""
from __future__ import annotations

import json
import shutil

import pytest

from ax_emulator.model_folder import write_model_folder
from harness.daemon import running_daemon
from harness.net import free_port
from harness.paths import REPO_ROOT, TOKENIZER_DIR
from llm_service.services.chunker import split_sentences

MODEL_DIR = REPO_ROOT / "model" / "smollm2-135m"
MAX_GENERATION = 40
CONTEXT = 640

MANIFEST = {
    "type": "map-reduce",
    "description": "a short summary, for the test",
    "fields": [{"name": "transcript", "chunked": True}],
    "flavors": {"card": {"model": "smollm2-135m", "totalContextLength": CONTEXT,
                         "maxGenerationLength": MAX_GENERATION, "createNewTurnAfter": 160, "summaryTurns": 1,
                         "maxNewTurns": 4, "temperature": 0, "top_p": 1}},
}
TEMPLATE = """{% if combine -%}
Summaries of the parts of a meeting:
{% for summary in summaries %}- {{ summary }}
{% endfor %}
Write one short summary of the whole meeting.
{%- else -%}
{% if summaries %}Earlier: {{ summaries | join(' ') }}
{% endif -%}
Summarise part {{ chunk_number }} of {{ chunk_count }} of this meeting in one sentence.

{{ transcript }}
{%- endif %}"""

TRANSCRIPT = "\n".join([
    "Alice: Good morning everyone. Today we plan the release of the new mobile app. The date we aim for is the first of March.",
    "Bob: The login screen still has two bugs. I will fix them this week. Testing needs another three days after that.",
    "Carol: Marketing wants screenshots by the end of January. I can prepare them once the design is frozen.",
    "Alice: Then the design freeze is next Friday. Bob, please tell me when the bugs are fixed.",
    "Dan: The servers are ready for the launch. We doubled the capacity last week and the load tests passed.",
    "Bob: One more thing: the payment provider changes its interface in February. We must update before the release.",
    "Carol: I will write the release notes. Please send me your changes by the twentieth.",
    "Alice: Good. Let us meet again next Monday to check the progress. Thank you all.",
])


@pytest.mark.slow
def test_a_summary_on_smollm2_fits_its_context_and_says_something(tmp_path):
    port = free_port()
    script = (MODEL_DIR / "run_smollm2_135m_axcl_x86.sh").read_text().replace("127.0.0.1:12345", f"127.0.0.1:{port}")
    entry = write_model_folder(tmp_path / "smollm2-135m", "smollm2-135m", script, tokenizer_dir=TOKENIZER_DIR,
                               tokenizer_port=port)
    shutil.copy(MODEL_DIR / "post_config.json", tmp_path / "smollm2-135m")
    entry["details"] = {"format": "gguf", "family": "llama"}
    services = tmp_path / "services"
    services.mkdir()
    (services / "short-summary.json").write_text(json.dumps(MANIFEST))
    (services / "short-summary.txt").write_text(TEMPLATE)
    with running_daemon(tmp_path, [entry], "--services-dir", str(services), start_timeout=120) as daemon:
        with daemon.client(timeout=600) as http:
            reply = http.post("/api/services/short-summary", json={"fields": {"transcript": TRANSCRIPT}})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == "smollm2-135m" and body["tokenizer"] == "tokenizer"
    chunks = body["chunks"]
    assert 2 <= len(chunks) <= 4
    sentences = split_sentences(TRANSCRIPT, lambda _: 1)
    assert [i for chunk in chunks for i in range(*chunk["sentences"])] == list(range(len(sentences)))
    for step in chunks + body["combine"]:
        # Our count is the model's own tokenizer with a cautious reserve for the chat framing:
        # never below what the runner read, and with the generation within the context.
        assert step["model_prompt_tokens"] <= step["prompt_tokens"], step
        assert step["prompt_tokens"] + MAX_GENERATION <= CONTEXT
        assert 0 < step["completion_tokens"] <= MAX_GENERATION + 3
    assert body["combine"] and body["combine"][-1]["batches"] == 1
    assert len(body["response"].split()) >= 3, body["response"]
