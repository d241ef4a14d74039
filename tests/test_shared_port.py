"""Several stock folders on the one tokenizer port every published run script hard-codes
(issue 14, section 2, the swap): models sharing a port are served one at a time, swapped like
card memory — a request for the other model waits for the answer in flight, the first model is
unloaded, the second loads — and the status says why it waits; never "failed"."""
from __future__ import annotations

import threading
import time

from ax_emulator.scripted import reply_text
from harness.daemon import running_daemon
from harness.models import scripted_model
from harness.net import free_port, wait_until
from llm_service.descriptor import parse_descriptor
from llm_service.models import tokenizer_port_of

WORDS = 30


def test_the_port_a_model_takes(tmp_path) -> None:
    entry = scripted_model(tmp_path, "m", port_from_dollar1=False)
    result = parse_descriptor(__import__("json").dumps([entry]), "d.json", tmp_path)
    assert tokenizer_port_of(result.models["m"]) == ("127.0.0.1", int(entry["tokenizer_port"]))
    del entry["tokenizer_py"]  # a server someone else runs: not ours to stop
    result = parse_descriptor(__import__("json").dumps([entry]), "d.json", tmp_path)
    assert tokenizer_port_of(result.models["m"]) is None


def test_two_models_on_one_port_take_turns(tmp_path) -> None:
    port = free_port()
    first = scripted_model(tmp_path, "qwen-a", tokenizer_port=port, port_from_dollar1=False, reply_words=WORDS,
                           tokens_per_second=40)
    second = scripted_model(tmp_path, "qwen-b", tokenizer_port=port, port_from_dollar1=False, reply_words=WORDS,
                            tokens_per_second=40)
    with running_daemon(tmp_path, [first, second]) as daemon:
        answers: dict[str, str] = {}

        def ask(model: str, prompt: str) -> None:
            with daemon.client() as client:
                reply = client.post("/api/generate", json={"model": model, "prompt": prompt, "stream": False})
                answers[model] = reply.json().get("response") or reply.text

        a = threading.Thread(target=ask, args=("qwen-a", "first"))
        a.start()
        daemon.wait_state("qwen-a", ("processing", "outputting"))
        b = threading.Thread(target=ask, args=("qwen-b", "second"))
        b.start()
        waiting = wait_until(lambda: daemon.get("/api/status/qwen-b").get("waiting_for"), 10, "qwen-b to wait")
        assert waiting == f"port {port} is held by qwen-a"
        a.join(30)
        b.join(30)
        assert answers == {"qwen-a": reply_text("first", WORDS, False), "qwen-b": reply_text("second", WORDS, False)}
        status = {m["name"]: m for m in daemon.get("/api/status")["models"]}
        assert status["qwen-a"]["state"] == "stopped" and status["qwen-b"]["state"] in ("ready", "resetting")
        assert all(m["state"] != "failed" for m in status.values())
        assert "waiting_for" not in status["qwen-b"]
        # And back: each request reaches its own model, interleaved.
        for model, prompt in [("qwen-a", "third"), ("qwen-b", "fourth"), ("qwen-a", "fifth")]:
            ask(model, prompt)
            assert answers[model] == reply_text(prompt, WORDS, False)
        history = [t["reason"] for t in daemon.get("/api/status_history/qwen-a")["history"] if t["to"] == "stopping"]
        assert history and all(f"tokenizer port {port} needed by qwen-b" in r for r in history)
