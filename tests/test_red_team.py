"""The red-team suite: the daemon attacked as an attacker on the box and as bad luck would, each
case bounded and on loopback. Every case here broke an earlier version of the daemon (see the
hardening issue); each must now end with a clear error or a correct answer, never a stopped or
poisoned daemon."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from ax_emulator.scripted import reply_text
from harness import net
from harness.daemon import running_daemon
from harness.models import scripted_model, shell_runner_model
from harness.net import free_port, wait_until
from harness.daemon import processes_with_marker as processes_owned_by
from tokenizer_support import Squatter

WORDS = 6


def generate(daemon, prompt: str, model: str = "m", timeout: float = 30, **extra) -> httpx.Response:
    with daemon.client(timeout=timeout) as http:
        return http.post("/api/generate", json={"model": model, "prompt": prompt, "stream": False, **extra})


def environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ---- 1. one request must never stop the daemon ------------------------------------------------


def test_unencodable_text_is_a_400_and_every_model_keeps_serving(tmp_path):
    entries = [scripted_model(tmp_path, "m", reply_words=WORDS), scripted_model(tmp_path, "other", reply_words=WORDS)]
    with running_daemon(tmp_path, entries) as daemon:
        with daemon.client() as http:
            for path, body in [
                ("/api/generate", b'{"model": "m", "prompt": "bad \\ud800 text", "stream": false}'),
                ("/api/chat", b'{"model": "m", "messages": [{"role": "user", "content": "\\udfff"}], "stream": false}'),
                ("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": "x\\ud800"}]}'),
                ("/api/generate", b'{"model": "m", "prompt": "x", "stream": false, "options": {"stop": ["\\ud800"]}}'),
            ]:
                reply = http.post(path, content=body)
                assert reply.status_code == 400, (path, reply.text)
                assert "invalid text" in json.dumps(reply.json())
        assert generate(daemon, "still-here").json()["response"] == reply_text("still-here", WORDS, think=False)
        assert generate(daemon, "other-too", model="other").json()["response"] == reply_text("other-too", WORDS, think=False)


# ---- 3. no orphans when the daemon is killed --------------------------------------------------


def test_after_a_sigkill_the_next_daemon_ends_what_the_first_left_running(tmp_path):
    entries = [scripted_model(tmp_path, "m", reply_words=WORDS, fields={"run_on_startup": "true"})]
    with running_daemon(tmp_path, entries, leftovers_fail=False) as first:
        status = first.wait_state("m", "ready")
        runner = status["runner_pid"]
        owned_before = {pid for pid, _ in processes_owned_by(first.marker)} - {first.process.pid}
        assert runner in owned_before and len(owned_before) >= 3  # tokenizer server, sh, runner
        first.process.kill()
        first.process.wait(10)
        # Direct children die with the daemon (parent-death signal); a run script's runner ends
        # when its pipes break, or at the latest when the next daemon on this data folder starts.
        with running_daemon(tmp_path, entries) as second:
            second.wait_state("m", "ready")
            wait_until(lambda: not any(alive(pid) for pid in owned_before), 10, "the first daemon's children to end")
            assert generate(second, "after-kill").json()["response"] == reply_text("after-kill", WORDS, think=False)
            runners = [pid for pid, cmd in processes_owned_by(second.marker) if "ax-emulator" in cmd and alive(pid)]
            assert len(runners) == 1, runners  # one runner for the model, not a second copy


def test_a_second_daemon_on_the_same_data_folder_is_refused(tmp_path):
    entries = [scripted_model(tmp_path, "m", reply_words=WORDS)]
    with running_daemon(tmp_path, entries) as daemon:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AXM1_")}
        import subprocess

        from harness.paths import AXM1_LLM

        result = subprocess.run(
            [str(AXM1_LLM), "serve", "--port", "1", "--descriptor", str(daemon.descriptor), "--data-dir", str(tmp_path / "data")],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 2 and "is in use by another instance" in result.stderr, result.stderr
        assert generate(daemon, "unharmed").status_code == 200


# ---- 6. no secrets in children ----------------------------------------------------------------


def test_children_get_a_minimal_environment_without_the_daemons_secrets(tmp_path):
    entries = [scripted_model(tmp_path, "m", reply_words=WORDS)]
    with running_daemon(tmp_path, entries, "--api-keys", "s3cret-key", extra_env={"AXM1_API_KEYS": "env-s3cret",
                                                                                  "UNRELATED_TOKEN": "leak"}) as daemon:
        headers = {"Authorization": "Bearer s3cret-key"}
        assert httpx.post(daemon.url + "/api/generate", json={"model": "m", "prompt": "x", "stream": False},
                          headers=headers, timeout=30).status_code == 200
        children = [pid for pid, _ in processes_owned_by(daemon.marker) if pid != daemon.process.pid]
        assert len(children) >= 3
        for pid in children:
            env = environ(pid)
            # Only what the daemon sets for them on purpose: the owner tag, our server's session idle time.
            assert {k for k in env if k.startswith("AXM1_")} <= {"AXM1_OWNER", "AXM1_TOKENIZER_SESSION_IDLE_SECONDS",
                                                                      "AXM1_TOKENIZER_ENGINE"}, (pid, sorted(env))
            assert "UNRELATED_TOKEN" not in env and "s3cret" not in json.dumps(env)
            assert env["AXM1_OWNER"] == daemon.marker and "PATH" in env


# ---- 8. runner output cannot grow the daemon's memory ------------------------------------------


def test_huge_runner_lines_are_truncated_in_the_log_ring(tmp_path):
    flood = "i=0; while [ $i -lt 20 ]; do head -c 1048576 /dev/zero | tr '\\0' 'x'; echo; i=$((i+1)); done"
    entries = [shell_runner_model(tmp_path, "m", setup=flood)]
    with running_daemon(tmp_path, entries) as daemon:
        assert generate(daemon, "after-flood").json()["response"] == "You said: after-flood"
        reply = daemon.client().get("/api/logs/m")
        assert len(reply.content) < 2 * 1024 * 1024, len(reply.content)
        lines = [e["line"] for e in reply.json()["lines"]]
        assert any("more characters cut]" in line for line in lines)


# ---- 9. numbers out of range are the client's error -------------------------------------------


@pytest.mark.parametrize("option", ["num_predict", "top_k", "seed", "temperature"])
def test_huge_numeric_options_are_400_and_the_connection_stays_usable(tmp_path, option):
    with running_daemon(tmp_path, [scripted_model(tmp_path, "m", reply_words=WORDS)]) as daemon:
        with daemon.client() as http:
            body = '{"model": "m", "prompt": "x", "stream": false, "options": {"%s": 1e400}}' % option
            reply = http.post("/api/generate", content=body.encode())
            assert reply.status_code == 400 and option in reply.json()["error"], reply.text
            again = http.post("/api/generate", json={"model": "m", "prompt": "fine", "stream": False})
            assert again.json()["response"] == reply_text("fine", WORDS, think=False)
            openai = http.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                             "max_tokens": 10**30})
            assert openai.status_code == 400 and openai.json()["error"]["param"] == "max_tokens"


# ---- 10 and 11. dialect C: its command and its context -----------------------------------------


def axllm_folder(root: Path, name: str = "axllm") -> Path:
    folder = root / name
    folder.mkdir()
    tokenizer = Path(__file__).resolve().parent.parent / "model" / "smollm2-135m" / "tokenizer"
    (folder / "config.json").write_text(json.dumps(
        {"tokenizer_path": str(tokenizer), "system_prompt": "Be brief.", "emu_init_seconds": 0, "emu_reply_words": WORDS}))
    return folder


def test_a_dialect_c_command_runs_without_a_shell_and_stays_in_its_folder(tmp_path):
    folder = axllm_folder(tmp_path)
    pwned = tmp_path / "pwned"
    entries = [
        {"model_name": "evil", "run_cmd": f"ax-emulator run ../x; touch {pwned}", "model_path": str(folder), "dialect": "c"},
        {"model_name": "outside", "run_cmd": "ax-emulator run ..", "model_path": str(folder), "dialect": "c"},
    ]
    with running_daemon(tmp_path, entries) as daemon:
        status = daemon.get("/api/status")
        errors = {m["name"]: m["last_error"]["reason"] for m in status["models"] if m["state"] == "disabled"}
        assert "resolves outside model_path" in errors["evil"] and "resolves outside model_path" in errors["outside"]
        time.sleep(0.5)
        assert not pwned.exists()


def test_a_dialect_c_chat_larger_than_the_context_is_refused_after_a_reset(tmp_path):
    folder = axllm_folder(tmp_path)
    entries = [{"model_name": "axllm", "run_cmd": "ax-emulator run .", "model_path": str(folder), "dialect": "c",
                "context_size": "256"}]
    with running_daemon(tmp_path, entries) as daemon:
        assert generate(daemon, "warm", model="axllm").status_code == 200  # then a reset ahead
        daemon.wait_state("axllm", "ready")
        # A chat of one message continues the (empty) context the reset left, whose size the runner
        # has not reported again: the model's own context size bounds it.
        with daemon.client() as http:
            reply = http.post("/api/chat", json={"model": "axllm", "stream": False,
                                                 "messages": [{"role": "user", "content": " ".join(["word"] * 400)}]})
        assert reply.status_code == 400, reply.text
        assert "more than the model's context" in reply.json()["error"]


# ---- 4 and 5. the tokenizer service runs only the descriptor's servers, on ports of their own ----


@pytest.mark.parametrize("api_keys", [(), ("--api-keys", "api-k3y")], ids=["no-api-keys", "api-keys"])
def test_an_attacker_can_neither_run_a_script_nor_stop_a_tokenizer_through_the_tokenizer_service(tmp_path, api_keys):
    touched = tmp_path / "pwned"
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    (attacker / "evil.py").write_text(f"from pathlib import Path\nPath({str(touched)!r}).touch()\n")
    entries = [scripted_model(tmp_path, "m", reply_words=WORDS)]
    with running_daemon(tmp_path, entries, *api_keys) as daemon:
        api = {"Authorization": f"Bearer {api_keys[1]}"} if api_keys else {}

        def answer(prompt: str) -> httpx.Response:
            return httpx.post(daemon.url + "/api/generate", json={"model": "m", "prompt": prompt, "stream": False},
                              headers=api, timeout=30)

        assert answer("before").status_code == 200  # the model's tokenizer server runs
        service = daemon.tokenizer_service_url
        body = {"tokenizer_path": str(attacker), "tokenizer_py": "evil.py", "port": free_port()}
        # Without a key, and with the daemon's API key (a client of the API is no admin of the box).
        replies = [
            net.post(f"{service}/tokenizers/x/start", json=body, headers=headers, timeout=10)
            for headers in ({}, api, {"Authorization": "Bearer wrong"})
        ] + [net.post(f"{service}/tokenizers/m/stop", headers=api, timeout=10),
             net.get(f"{service}/tokenizers", headers=api, timeout=10)]
        time.sleep(2)
        assert not touched.exists(), [(r.status_code, r.text) for r in replies]
        assert [r.status_code for r in replies] == [401] * len(replies), [r.text for r in replies]
        after = answer("after")  # its tokenizer server was not stopped
        assert after.status_code == 200 and after.json()["response"] == reply_text("after", WORDS, think=False)


def test_a_squatter_on_a_tokenizer_port_fails_the_model_clearly_and_gets_no_prompt(tmp_path):
    port = free_port()
    entries = [scripted_model(tmp_path, "m", tokenizer_port=port, reply_words=WORDS),
               scripted_model(tmp_path, "other", reply_words=WORDS)]
    held = Squatter(port, tmp_path / "received.jsonl")  # there before the model loads
    try:
        with running_daemon(tmp_path, entries) as daemon:
            messages = [{"role": "system", "content": "SYSTEM-SECRET-42"}, {"role": "user", "content": "PROMPT-SECRET-42"}]
            with daemon.client(timeout=30) as http:
                reply = http.post("/api/chat", json={"model": "m", "stream": False, "messages": messages})
            time.sleep(1)
            leaked = [request for request in held.received() if "SECRET-42" in json.dumps(request)]
            assert leaked == []
            taken = f"port {port} is taken by another process (pid {held.pid}: "
            assert reply.status_code == 503 and taken in reply.json()["error"], reply.text
            assert taken in daemon.get("/api/status/m")["last_error"]["reason"]
            assert generate(daemon, "other-serves", model="other").status_code == 200
            held.stop()  # the squatter goes: our tokenizer server takes the port, the model serves
            answer = wait_until(lambda: (r := generate(daemon, "freed")).status_code == 200 and r, 30, "the model to serve")
            assert answer.json()["response"] == reply_text("freed", WORDS, think=False)
    finally:
        if held.process.poll() is None:
            held.stop()


# ---- 12. weak spots --------------------------------------------------------------------------


def test_metric_files_that_cannot_be_written_are_said_in_status_ready_and_metrics(tmp_path):
    not_a_folder = tmp_path / "metrics-is-a-file"
    not_a_folder.write_text("")
    entries = [scripted_model(tmp_path, "m", reply_words=WORDS)]
    with running_daemon(tmp_path, entries, "--metrics-dir", str(not_a_folder)) as daemon:
        assert generate(daemon, "served").json()["response"] == reply_text("served", WORDS, think=False)
        problems = daemon.get("/api/status")["metrics"]["problems"]
        assert problems and str(not_a_folder) in problems[0], problems
        ready = daemon.client().get("/ready")
        assert ready.status_code == 200 and ready.json()["warnings"] == problems  # serving is not stopped
        metrics = daemon.client().get("/metrics").text
        failures = [line for line in metrics.splitlines() if line.startswith('axm1_llm_metrics_file_write_failures_total{model="m"}')]
        assert failures and float(failures[0].split()[-1]) >= 1, failures


def test_after_a_crash_a_request_brings_the_restart_forward_halfway_through_the_back_off(tmp_path):
    entries = [scripted_model(tmp_path, "m", reply_words=WORDS, tokens_per_second=50)]
    with running_daemon(tmp_path, entries, "--backoff-min-s", "12", "--backoff-max-s", "12", fast_restarts=False) as daemon:
        daemon.set_faults(crash_after_tokens=2)
        assert generate(daemon, "crash").status_code == 500
        daemon.set_faults()  # the cause is gone
        started = time.monotonic()
        reply = generate(daemon, "soon-again", timeout=60)
        waited = time.monotonic() - started
        assert reply.json()["response"] == reply_text("soon-again", WORDS, think=False)
        assert waited < 10, f"waited {waited:.1f}s: the whole back-off of 12s"


# ---- 7. connections cannot lock everyone out ---------------------------------------------------


def test_idle_and_slow_connections_at_a_1024_file_limit_leave_the_daemon_serving(tmp_path):
    """1,100 idle connections at systemd's default limit of 1,024 open files: the daemon refuses
    what is beyond its connection cap with a clear 503, drops what sends nothing in time, keeps
    descriptors for a runner restart, and its log does not flood."""
    import socket

    entries = [scripted_model(tmp_path, "m", reply_words=WORDS, fields={"run_on_startup": "true"})]
    limits = {"AXM1_HEADER_TIMEOUT_S": "3", "AXM1_MAX_HEADER_BYTES": "8192"}
    with running_daemon(tmp_path, entries, extra_env=limits, open_files_limit=1024) as daemon:
        runner = daemon.wait_state("m", "ready")["runner_pid"]
        sockets = []
        try:
            for _ in range(1100):
                sockets.append(socket.create_connection(("127.0.0.1", daemon.port), timeout=5))
            refused = 0
            for sock in sockets[-50:]:  # the last ones are beyond the cap: answered at once
                sock.settimeout(5)
                try:
                    refused += sock.recv(64).startswith(b"HTTP/1.1 503")
                except OSError:
                    pass
            assert refused >= 40, refused
            # Meanwhile the runner dies: its restart still finds descriptors for pipes and sockets.
            os.kill(runner, signal.SIGKILL)
            time.sleep(3)
            held_until = time.time()
        finally:
            for sock in sockets:
                sock.close()
        answer = wait_until(lambda: (r := generate(daemon, "after")).status_code == 200 and r, 30, "service again")
        assert answer.json()["response"] == reply_text("after", WORDS, think=False)
        history = daemon.get("/api/status_history/m")["history"]
        restarted = [t for t in history if t["to"] == "ready" and t["at_epoch"] < held_until]
        assert len(restarted) >= 2, history  # the first start, and the restart with every connection held
        with daemon.client() as http:  # an oversized header is refused, not read
            huge = http.get("/health", headers={"X-Big": "x" * 20000})
            assert huge.status_code == 431
        assert daemon.log_path.stat().st_size < 1024 * 1024
