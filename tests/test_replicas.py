"""One model on two cards (issue 19, section 1): replicas behind one name and one queue. The
virtual box has two cards (AX_EMU_CARDS=2); each replica runs the folder's run script with its
`--devices` set to its card. Requests go to free replicas, a chat stays on the replica that holds
it, a crash of one replica fails only its request, and the other keeps serving."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from ax_emulator.scripted import reply_text
from harness.daemon import running_daemon
from harness.models import scripted_model
from harness.net import wait_until
from llm_service.engines.replicas import model_state, script_for_device
from metrics_support import metric

MODEL = "twin"
WORDS = 30


def test_the_run_script_picks_the_card() -> None:
    script = './main_axcl_x86 \\\n--url_tokenizer_model "http://127.0.0.1:12345" \\\n--devices 0\n'
    assert script_for_device(script, 1).endswith("--devices 1\n")
    assert script_for_device("x --devices=0,1 \\\n--live_print 1", 3) == "x --devices=3 \\\n--live_print 1"
    assert script_for_device('x --devices "0"', 2) == "x --devices 2"
    with pytest.raises(ValueError, match="no --devices flag"):
        script_for_device("./main_ax650 --live_print 1", 1)
    assert model_state(["stopped", "outputting"]) == "outputting"
    assert model_state(["failed", "initializing"]) == "initializing"
    assert model_state(["stopped", "stopped"]) == "stopped"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    entry = scripted_model(root, MODEL, reply_words=WORDS, tokens_per_second=40,
                           fields={"run_on_startup": "true", "devices": [0, 1], "npu_memory_mb": 3000})
    with running_daemon(root, [entry], extra_env={"AX_EMU_CARDS": "2"}) as d:
        wait_until(lambda: all(r["state"] == "ready" for r in d.get(f"/api/status/{MODEL}")["replicas"]), 60,
                   "both replicas ready")
        yield d


def ask(daemon, prompt: str, messages: list[dict] | None = None) -> str:
    with daemon.client() as client:
        if messages is None:
            reply = client.post("/api/generate", json={"model": MODEL, "prompt": prompt, "stream": False})
            return reply.json()["response"] if reply.status_code == 200 else f"{reply.status_code} {reply.text}"
        reply = client.post("/api/chat", json={"model": MODEL, "messages": messages, "stream": False})
        return reply.json()["message"]["content"]


def test_both_cards_serve_at_once(daemon) -> None:
    status = daemon.get(f"/api/status/{MODEL}")
    assert [r["device"] for r in status["replicas"]] == [0, 1] and status["queue"]["concurrency"] == 2
    answers: dict[str, str] = {}
    both_busy = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not both_busy.is_set():
            replicas = daemon.get(f"/api/status/{MODEL}")["replicas"]
            if all(r["state"] in ("processing", "outputting") for r in replicas):
                both_busy.set()
            time.sleep(0.02)
    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=lambda p=p: answers.__setitem__(p, ask(daemon, p))) for p in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    watcher.join(30)
    assert answers == {p: reply_text(p, WORDS, False) for p in ("one", "two")}
    assert both_busy.is_set(), "the two requests did not run on the two cards at the same time"
    log = daemon.get(f"/api/logs/{MODEL}")["lines"]
    assert any(line["line"].startswith("[card 1] ") for line in log)


def test_a_chat_stays_on_its_card(daemon) -> None:
    def held() -> list[int | None]:
        return [r["context"]["conversation_messages"] for r in daemon.get(f"/api/status/{MODEL}")["replicas"]]
    chat_a = [{"role": "user", "content": "chat a"}]
    chat_b = [{"role": "user", "content": "chat b"}]
    chat_a.append({"role": "assistant", "content": ask(daemon, "", chat_a)})
    after_a = held()
    chat_b.append({"role": "assistant", "content": ask(daemon, "", chat_b)})
    after_b = held()
    card_a = after_a.index(2)
    card_b = 1 - card_a
    assert after_b[card_a] == 2 and after_b[card_b] == 2  # b went to the other card: a's context kept
    for turn in range(2):
        chat_a += [{"role": "user", "content": f"more a {turn}"}]
        chat_a.append({"role": "assistant", "content": ask(daemon, "", chat_a)})
        chat_b += [{"role": "user", "content": f"more b {turn}"}]
        chat_b.append({"role": "assistant", "content": ask(daemon, "", chat_b)})
        assert held() == ([len(chat_a), len(chat_b)] if card_a == 0 else [len(chat_b), len(chat_a)])


def test_a_crash_of_one_card_fails_only_its_request(daemon) -> None:
    results: dict[str, str] = {}
    threads = [threading.Thread(target=lambda p=p: results.__setitem__(p, ask(daemon, p))) for p in ("left", "right")]
    for t in threads:
        t.start()
    wait_until(lambda: all(r["state"] == "outputting" for r in daemon.get(f"/api/status/{MODEL}")["replicas"]), 10,
               "both cards answering")
    victim = daemon.get(f"/api/status/{MODEL}")["replicas"][1]
    os.kill(victim["runner_pid"], signal.SIGKILL)
    for t in threads:
        t.join(30)
    good = [p for p, text in results.items() if text == reply_text(p, WORDS, False)]
    failed = [p for p, text in results.items() if p not in good]
    assert len(good) == 1 and len(failed) == 1, results
    assert results[failed[0]].startswith("5"), results  # an explicit error, not a half answer
    # The other card kept serving, and the crashed one comes back.
    assert ask(daemon, "still here") == reply_text("still here", WORDS, False)
    wait_until(lambda: all(r["state"] == "ready" for r in daemon.get(f"/api/status/{MODEL}")["replicas"]), 30,
               "the crashed card back")
    restarts = [r["restarts"] for r in daemon.get(f"/api/status/{MODEL}")["replicas"]]
    assert restarts[1] >= 1 and restarts[0] == 0


def test_replicas_need_a_card_flag_and_distinct_cards(tmp_path) -> None:
    from llm_service.descriptor import parse_descriptor
    entry = scripted_model(tmp_path, "bad", fields={"devices": [0, 0]})
    result = parse_descriptor(json.dumps([entry]), "d.json", tmp_path)
    assert "distinct card ids" in result.errors["bad"]


def test_the_state_gauge_shows_the_models_state_and_events_name_the_card(daemon) -> None:
    """While one card answers and the other is free, the model is `ready` (it takes a request at
    once): its state gauge says so, not the state of whichever card moved last; each card's
    transitions reach /api/events naming the card."""
    busy = threading.Thread(target=ask, args=(daemon, "keep one card busy"))
    busy.start()
    wait_until(lambda: sorted(r["state"] for r in daemon.get(f"/api/status/{MODEL}")["replicas"])
               == ["outputting", "ready"], 10, "one card answering, the other free")
    gauge = {state: metric(daemon, "axm1_llm_runner_state", model=MODEL, state=state)
             for state in ("ready", "outputting", "processing")}
    busy.join(30)
    assert gauge == {"ready": 1.0, "outputting": 0.0, "processing": 0.0}
    devices = set()
    with httpx.stream("GET", f"{daemon.url}/api/events", params={"model": MODEL, "types": "state"},
                      headers={**daemon.headers, "Last-Event-ID": "0"}, timeout=httpx.Timeout(10, read=5)) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                devices.add(json.loads(line[6:]).get("device"))
            if devices >= {0, 1}:
                break
    assert devices >= {0, 1}
