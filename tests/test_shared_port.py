"""Several stock folders on the one tokenizer port every published run script hard-codes
(issue 14, section 2, the swap): models sharing a port are served one at a time, swapped like
card memory — a request for the other model waits for the answer in flight, the first model is
unloaded, the second loads — and the status says why it waits; never "failed"."""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from ax_emulator.scripted import reply_text
from harness.daemon import running_daemon
from harness.models import minilm_tokenizer_files, published_model, scripted_model
from harness.net import free_port, wait_until
from llm_service.descriptor import parse_descriptor
from llm_service.models import tokenizer_port_of
from tokenizer_service.server import ChatTokenizer, argument_parser, build_app, load_tokenizer
from tokenizer_service.stock_script import folder_facts, server_arguments

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


def own_prefills(entry: dict, line: str) -> list[str]:
    """The prefill lines the runner of `entry` logs for its system prompt and its first turn
    `line`, with the counts its own folder's tokenizer renders (our server's logic on that
    folder, in this process)."""
    folder = Path(entry["model_path"])
    facts = folder_facts(folder, (folder / entry["tokenizer_py"]).read_text())
    app = build_app(argument_parser().parse_args(server_arguments(facts)[2:]))
    uid = app.new_session()
    runner_system = re.search(r'--system_prompt "([^"]*)"', (folder / entry["run_cmd"]).read_text()).group(1)
    system = len(app.reset(uid, runner_system))
    turn = len(app.encode_turn(uid, line, None)[1])
    return [f"[I][GenerateKVCachePrefill][372]: input_num_token:{system}", f"[I][Run][901]: input_num_token:{turn}"]


def test_two_uid_models_with_different_tokenizers_share_the_port_every_script_hard_codes(tmp_path) -> None:
    """Issue 14 §2: two stock-shaped B folders whose run scripts both name one port, with
    different tokenizers (SmolLM2's BPE and MiniLM's WordPiece), are served together by our one
    server on that port: both stay loaded, requests interleave, every answer comes from its own
    model's tokenizer, and each runner prefilled the ids its own tokenizer renders."""
    port = free_port()
    smol = published_model(tmp_path, "smol-a", tokenizer_port=port)
    mini = published_model(tmp_path, "mini-b", tokenizer_port=port, tokenizer_folder="minilm_tokenizer",
                           tokenizer_files=minilm_tokenizer_files(tmp_path))
    wordpiece = ChatTokenizer(*load_tokenizer(Path(mini["model_path"]) / "minilm_tokenizer"))

    def expected(model: str, line: str) -> str:
        text = reply_text(line, 8, False)
        return text if model == "smol-a" else wordpiece.decode(wordpiece.encode_plain(text))

    with running_daemon(tmp_path, [smol, mini]) as daemon:
        answers: dict[tuple[str, str], str] = {}

        def ask(model: str, line: str) -> None:
            with daemon.client() as client:
                reply = client.post("/api/generate", json={"model": model, "prompt": line, "stream": False})
                answers[(model, line)] = reply.json().get("response") or reply.text

        ask("smol-a", "first")
        ask("mini-b", "second")  # loads beside smol-a: nothing is swapped out
        threads = [threading.Thread(target=ask, args=(model, line)) for model, line in
                   [("smol-a", "third"), ("mini-b", "fourth"), ("smol-a", "fifth"), ("mini-b", "sixth")]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert answers == {key: expected(*key) for key in answers} and len(answers) == 6
        assert expected("mini-b", "x") != reply_text("x", 8, False)  # the tokenizers really differ

        status = {m["name"]: m for m in daemon.get("/api/status")["models"]}
        assert status["smol-a"]["state"] in ("ready", "resetting") and status["mini-b"]["state"] in ("ready", "resetting")
        stops = [t for m in ("smol-a", "mini-b") for t in daemon.get(f"/api/status_history/{m}")["history"]
                 if t["to"] in ("stopping", "failed")]
        assert stops == []
        for entry, line in ((smol, "first"), (mini, "second")):
            logged = [e["line"] for e in daemon.get(f"/api/logs/{entry['model_name']}")["lines"]
                      if "input_num_token:" in e["line"] and "SetKVCache" not in e["line"]]
            assert logged[:2] == own_prefills(entry, line)
        assert own_prefills(smol, "first") != own_prefills(mini, "first")
