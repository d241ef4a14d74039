"""Run scripts and runners the daemon does not control, through the real daemon: scripts that
need their own shell and arguments, hand-written runners printing what a real build might."""
from __future__ import annotations

import httpx
import pytest

from ax_emulator.scripted import reply_text
from harness.daemon import running_daemon
from harness.models import scripted_model, shell_runner_model

WORDS = 6


def generate(daemon, prompt: str, model: str = "m", timeout: float = 30) -> httpx.Response:
    with daemon.client(timeout=timeout) as http:
        return http.post("/api/generate", json={"model": model, "prompt": prompt, "stream": False})


def test_run_cmd_with_its_own_shell_and_arguments_runs_as_written(tmp_path):
    """`bash run.sh --flag` keeps its shell and its arguments (a bash-only test fails in dash)."""
    entry = scripted_model(tmp_path, "m", reply_words=WORDS, port_from_dollar1=False)
    script = tmp_path / "m" / entry["run_cmd"]
    check = '[[ "$1" == "--from-run-cmd" ]] || { echo "run as: $0 $*" >&2; exit 3; }\n'
    script.write_text(check + script.read_text())
    entry["run_cmd"] = f"bash {entry['run_cmd']} --from-run-cmd"
    with running_daemon(tmp_path, [entry]) as daemon:
        reply = generate(daemon, "through-bash")
        assert reply.status_code == 200, reply.text
        assert reply.json()["response"] == reply_text("through-bash", WORDS, think=False)


def test_a_malformed_precompute_len_line_does_not_stop_the_model(tmp_path):
    entries = [shell_runner_model(tmp_path, "m", precompute_line="precompute_len: 2x1")]
    with running_daemon(tmp_path, entries, "--request-deadline-s", "10") as daemon:
        reply = generate(daemon, "still-parsed")
        assert reply.status_code == 200, reply.text
        assert reply.json()["response"] == "You said: still-parsed"


def test_a_crash_is_seen_while_a_child_of_the_script_holds_stdout(tmp_path):
    """A script that leaves a background child (a logger, a watchdog) holding the runner's stdout:
    the runner's crash is still seen at once, and the child does not outlive the runner."""
    entries = [shell_runner_model(tmp_path, "m", setup="sleep 300 &", mid_answer="kill -SEGV $$")]
    with running_daemon(tmp_path, entries, "--hang-timeout-s", "60") as daemon:
        reply = generate(daemon, "crash-me", timeout=20)
        assert reply.status_code == 500, reply.text
        assert "SIGSEGV" in reply.json()["error"]
