"""Every fault of the virtual card, at init and mid-answer, through the real daemon: the client
sees the right result (its full answer or an explicit error) and the model recovers by itself."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from ax_emulator.scripted import reply_text
from harness import net
from harness.daemon import running_daemon, write_descriptor
from harness.models import scripted_model

WORDS = 10
LOG_TRACES = ("\x1b", "[I][", "[N][", "hit eos", "prompt >>", "GetKVCache")


def generate(daemon, prompt: str, model: str = "m", **extra) -> httpx.Response:
    with daemon.client() as http:
        return http.post("/api/generate", json={"model": model, "prompt": prompt, "stream": False, **extra})


def stream_lines(daemon, prompt: str, model: str = "m") -> list[dict]:
    with daemon.client() as http, http.stream("POST", "/api/generate", json={"model": model, "prompt": prompt}) as reply:
        assert reply.status_code == 200, reply.read()
        return [json.loads(line) for line in reply.iter_lines() if line]


def assert_recovers(daemon, model: str = "m") -> None:
    daemon.set_faults()
    deadline = time.monotonic() + 30
    while True:
        reply = generate(daemon, "after-recovery", model)
        if reply.status_code == 200:
            break
        assert time.monotonic() < deadline, f"no recovery: {reply.text}"
        time.sleep(0.2)
    assert reply.json()["response"] == reply_text("after-recovery", WORDS, think=False)
    assert daemon.wait_state(model, "ready")["state"] == "ready"


@pytest.mark.parametrize(
    "failure, expected",
    [
        ("connect", "lLaMa.Init failed"),
        ("set_device", "Set AXCL device failed"),
        ("get_device", "Get AXCL device failed"),
        ("axcl_timeout", "AXCLWorker initialization timeout"),
        ("init_axmodel", "init axmodel"),
        ("embed_selector", "embed_selector.Init"),
    ],
)
def test_init_failure_is_reported_and_recovered(tmp_path, failure, expected):
    with running_daemon(tmp_path, [scripted_model(tmp_path, "m", reply_words=WORDS)]) as daemon:
        daemon.set_faults(init_fail=failure)
        reply = generate(daemon, "x")
        assert reply.status_code == 503, reply.text
        error = reply.json()["error"]
        assert "failed" in error and expected in error, error
        status = daemon.client().get("/api/status/m").json()
        assert status["state"] in ("failed", "waiting_for_tokenizer", "starting", "initializing")
        assert status["last_error"] and "status 255" in status["last_error"]["reason"]
        assert any(expected in line for line in status["last_error"]["log_tail"])
        assert_recovers(daemon)


@pytest.mark.parametrize("sig", ["SEGV", "KILL", "ABRT"])
def test_crash_mid_answer_fails_the_request_at_once_and_restarts(tmp_path, sig):
    with running_daemon(tmp_path, [scripted_model(tmp_path, "m", reply_words=WORDS, tokens_per_second=50)]) as daemon:
        daemon.set_faults(crash_after_tokens=6, crash_signal=sig)
        lines = stream_lines(daemon, "crash-me")
        assert "error" in lines[-1], lines[-1]
        assert f"SIG{sig}" in lines[-1]["error"]
        partial = "".join(line.get("response", "") for line in lines[:-1])
        assert reply_text("crash-me", WORDS, think=False).startswith(partial)
        status = daemon.client().get("/api/status/m").json()
        assert status["restarts"] >= 1
        assert_recovers(daemon)


def test_hang_mid_answer_is_detected_interrupted_and_restarted(tmp_path):
    entries = [scripted_model(tmp_path, "m", reply_words=WORDS)]
    with running_daemon(tmp_path, entries, "--hang-timeout-s", "1") as daemon:
        daemon.set_faults(hang_after_tokens=4)
        started = time.monotonic()
        lines = stream_lines(daemon, "hang-me")
        assert "error" in lines[-1] and "no output" in lines[-1]["error"]
        assert time.monotonic() - started < 20
        # The emulated hang ignores SIGINT: the daemon kills it after the grace and restarts it.
        assert_recovers(daemon)
        history = daemon.client().get("/api/status_history/m").json()["history"]
        assert any("SIGINT" in t["reason"] for t in history if t["to"] == "failed"), history


def test_hang_at_init_hits_the_stall_timeout(tmp_path):
    entries = [scripted_model(tmp_path, "m", reply_words=WORDS)]
    with running_daemon(tmp_path, entries, "--load-stall-timeout-s", "1.5") as daemon:
        daemon.set_faults(hang_at_init=1)
        reply = generate(daemon, "x")
        assert reply.status_code == 503 and "no progress" in reply.json()["error"]
        assert_recovers(daemon)


def test_garbage_and_invalid_utf8_never_break_the_stream(tmp_path):
    with running_daemon(tmp_path, [scripted_model(tmp_path, "m", reply_words=WORDS)]) as daemon:
        daemon.set_faults(garbage=1)
        lines = stream_lines(daemon, "garbage-marker")
        assert lines[-1]["done"] is True
        text = "".join(line["response"] for line in lines)
        assert "garbage-marker" in text
        assert not any(trace in text for trace in LOG_TRACES)
        assert_recovers(daemon)


def test_card_memory_busy_after_a_crash_delays_the_restart(tmp_path):
    with running_daemon(tmp_path, [scripted_model(tmp_path, "m", reply_words=WORDS)]) as daemon:
        daemon.set_faults(crash_after_tokens=3, busy_after_crash_seconds=2)
        lines = stream_lines(daemon, "crash-then-busy")
        assert "error" in lines[-1]
        daemon.set_faults(busy_after_crash_seconds=2)
        deadline = time.monotonic() + 30
        while generate(daemon, "after-busy").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.3)
        log = daemon.client().get("/api/logs/m").json()["lines"]
        assert any("Set AXCL device failed" in e["line"] for e in log)
        assert_recovers(daemon)


def test_client_disconnect_while_streaming_stops_the_generation(tmp_path):
    entries = [scripted_model(tmp_path, "m", reply_words=200, tokens_per_second=40)]
    with running_daemon(tmp_path, entries) as daemon:
        with daemon.client() as http, http.stream("POST", "/api/generate", json={"model": "m", "prompt": "long-one"}) as reply:
            for i, _ in enumerate(reply.iter_lines()):
                if i == 2:
                    break  # the client goes away mid-answer
        status = daemon.wait_state("m", "ready", timeout=10)
        assert status["in_flight"] is None
        # The runner is clean for the next request: its answer holds nothing of the first one.
        body = generate(daemon, "next-one").json()
        assert body["response"] == reply_text("next-one", 200, think=False)
        assert "long-one" not in body["response"]


def test_client_disconnect_while_queued_leaves_the_running_answer_alone(tmp_path):
    entries = [scripted_model(tmp_path, "m", reply_words=40, tokens_per_second=40)]
    with running_daemon(tmp_path, entries) as daemon:
        results = {}

        def first():
            results["first"] = generate(daemon, "first-in-line").json()

        runner = threading.Thread(target=first)
        runner.start()
        daemon.wait_state("m", ("processing", "outputting"), timeout=30)
        with pytest.raises(httpx.ReadTimeout):
            with net.client(base_url=daemon.url, timeout=0.5) as quick:
                quick.post("/api/generate", json={"model": "m", "prompt": "gives-up", "stream": False})
        deadline = time.monotonic() + 10
        while daemon.client().get("/api/status/m").json()["queue"]["length"] != 0:
            assert time.monotonic() < deadline, "the queued request that left was never removed"
            time.sleep(0.05)
        runner.join(60)
        assert results["first"]["response"] == reply_text("first-in-line", 40, think=False)
        assert generate(daemon, "third").json()["response"] == reply_text("third", 40, think=False)


def test_full_queue_answers_503_with_retry_after(tmp_path):
    entries = [scripted_model(tmp_path, "m", reply_words=60, tokens_per_second=40)]
    with running_daemon(tmp_path, entries, "--queue-size", "1") as daemon:
        done = []
        threads = [threading.Thread(target=lambda i=i: done.append(generate(daemon, f"q{i}"))) for i in range(2)]
        threads[0].start()
        daemon.wait_state("m", ("processing", "outputting"), timeout=30)
        threads[1].start()
        deadline = time.monotonic() + 10
        while daemon.client().get("/api/status/m").json()["queue"]["length"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        busy = generate(daemon, "one-too-many")
        assert busy.status_code == 503 and busy.headers["retry-after"]
        assert busy.json() == {"error": "server busy, please try again.  maximum pending requests exceeded"}
        for t in threads:
            t.join(60)
        assert sorted(r.json()["response"] for r in done) == sorted(reply_text(f"q{i}", 60, think=False) for i in range(2))


def test_request_deadline_gives_a_clear_error(tmp_path):
    entries = [scripted_model(tmp_path, "m", reply_words=200, tokens_per_second=20)]
    with running_daemon(tmp_path, entries, "--request-deadline-s", "2") as daemon:
        deadline = time.monotonic() + 30
        while generate(daemon, "").status_code != 200:  # the load itself may outlast 2 s: it goes on
            assert time.monotonic() < deadline
        lines = stream_lines(daemon, "too-slow")
        assert "error" in lines[-1] and "deadline" in lines[-1]["error"]
        daemon.wait_state("m", "ready", timeout=15)


def test_num_predict_and_stop_are_enforced_by_the_daemon(tmp_path):
    with running_daemon(tmp_path, [scripted_model(tmp_path, "m", reply_words=WORDS)]) as daemon:
        full = reply_text("stop-test", WORDS, think=False)
        stop_word = full.split()[4]
        stopped = generate(daemon, "stop-test", options={"stop": [stop_word]}).json()
        assert stopped["response"] == full[: full.index(stop_word)]
        assert stopped["done_reason"] == "stop"
        limited = generate(daemon, "limit-test", options={"num_predict": 3}).json()
        assert limited["done_reason"] == "length"
        assert reply_text("limit-test", WORDS, think=False).startswith(limited["response"])
        assert len(limited["response"]) < len(reply_text("limit-test", WORDS, think=False))
        # Unsupported per-request sampling is accepted and reported, not pretended.
        warned = generate(daemon, "warn-test", options={"temperature": 0.1}).json()
        assert any("temperature" in w for w in warned["warnings"])
        # After SIGINT-ed generations the runner answers cleanly again.
        assert generate(daemon, "clean").json()["response"] == reply_text("clean", WORDS, think=False)


def _runner_pid(daemon, model):
    return daemon.client().get(f"/api/status/{model}").json()["pid"]


def test_descriptor_hot_reload(tmp_path):
    keep = scripted_model(tmp_path, "keep", reply_words=WORDS)
    gone = scripted_model(tmp_path, "gone", reply_words=WORDS)
    change = scripted_model(tmp_path, "change", reply_words=WORDS)
    with running_daemon(tmp_path, [keep, gone, change]) as daemon:
        for name in ("keep", "gone", "change"):
            assert generate(daemon, "warm", name).status_code == 200
        keep_pid, gone_pid = _runner_pid(daemon, "keep"), _runner_pid(daemon, "gone")
        added = scripted_model(tmp_path, "added", reply_words=WORDS)
        changed = dict(change, details={"format": "scripted", "family": "changed"})
        write_descriptor(daemon.descriptor, [keep, changed, added])
        deadline = time.monotonic() + 15
        while True:
            names = {m["name"] for m in daemon.client().get("/api/tags").json()["models"]}
            families = {m["name"]: m["details"]["family"] for m in daemon.client().get("/api/tags").json()["models"]}
            if names == {"keep:latest", "change:latest", "added:latest"} and families["change:latest"] == "changed":
                break
            assert time.monotonic() < deadline, names
            time.sleep(0.1)
        assert generate(daemon, "fresh", "added").json()["response"] == reply_text("fresh", WORDS, think=False)
        assert generate(daemon, "x", "gone").status_code == 404
        assert _runner_pid(daemon, "keep") == keep_pid, "an untouched running model must keep running"
        assert daemon.client().get("/api/status/change").json()["state"] == "stopped"
        with pytest.raises(ProcessLookupError):
            import os

            os.kill(gone_pid, 0)
        # A broken entry disables that model only, with an error naming file, model and field.
        bad = dict(keep, model_name="bad", run_cmd="../../etc/passwd")
        write_descriptor(daemon.descriptor, [keep, changed, added, bad])
        deadline = time.monotonic() + 15
        while True:
            models = {m["name"]: m for m in daemon.client().get("/api/status").json()["models"]}
            if "bad" in models:
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert models["bad"]["state"] == "disabled"
        error = models["bad"]["last_error"]["reason"]
        assert "model-descriptor.json" in error and "bad" in error and "run_cmd" in error
        assert generate(daemon, "still", "keep").status_code == 200
        assert _runner_pid(daemon, "keep") == keep_pid


def test_tokenizer_server_down_while_a_chat_changes_its_system_prompt(tmp_path):
    """A tokenizer server that is gone while a chat changes the system prompt: an explicit error
    (or a recovered answer), the daemon stays up, the other model serves, and the model recovers.
    It used to let `httpx.ConnectError` out of the owner task, ending every model's task."""
    entries = [scripted_model(tmp_path, "m", reply_words=WORDS), scripted_model(tmp_path, "other", reply_words=WORDS)]
    secret = "test-tokenizer-service-secret"  # the service's secret, known to this test
    with running_daemon(tmp_path, entries, "--request-deadline-s", "15",
                        extra_env={"AXM1_TOKENIZER_SERVICE_SECRET": secret}) as daemon:
        assert generate(daemon, "warm-up").status_code == 200
        assert generate(daemon, "warm-up", model="other").status_code == 200
        # Stopped through the tokenizer service, so that nothing restarts it behind the daemon's back.
        stop = net.post(f"{daemon.tokenizer_service_url}/tokenizers/m/stop",
                        headers={"Authorization": f"Bearer {secret}"}, timeout=10)
        assert stop.status_code == 200
        messages = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "ahoy"}]
        with daemon.client(timeout=30) as http:
            reply = http.post("/api/chat", json={"model": "m", "messages": messages, "stream": False})
        if reply.status_code == 200:
            assert reply.json()["message"]["content"] == reply_text("ahoy", WORDS, think=False)
        else:
            assert reply.status_code == 503 and "tokenizer" in reply.json()["error"], reply.text
        other = generate(daemon, "still-served", model="other")
        assert other.status_code == 200 and other.json()["response"] == reply_text("still-served", WORDS, think=False)
        assert_recovers(daemon)


def test_an_unencodable_prompt_fails_alone_and_every_model_keeps_serving(tmp_path):
    """A lone surrogate is valid JSON but no valid text: that request fails with a clear error,
    and neither that model nor any other stops serving."""
    entries = [scripted_model(tmp_path, "m", reply_words=WORDS), scripted_model(tmp_path, "other", reply_words=WORDS)]
    with running_daemon(tmp_path, entries, "--request-deadline-s", "15") as daemon:
        assert generate(daemon, "warm-up", model="other").status_code == 200
        with daemon.client(timeout=30) as http:
            reply = http.post("/api/generate", content=b'{"model": "m", "prompt": "bad \\ud800 text", "stream": false}')
        assert 400 <= reply.status_code < 600 and reply.json()["error"], reply.text
        other = generate(daemon, "still-served", model="other")
        assert other.status_code == 200 and other.json()["response"] == reply_text("still-served", WORDS, think=False)
        assert_recovers(daemon)
