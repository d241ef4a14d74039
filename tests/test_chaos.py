"""Reliability under chaos: many concurrent clients (generate and chat, streaming or not, some
leaving early) while the virtual card crashes, hangs, emits garbage, refuses to start, and while
the daemon's children are SIGKILLed. Every request must end in its own complete answer or an
explicit error; nothing is lost, nothing leaks between requests, and everything recovers."""
from __future__ import annotations

import itertools
import threading
import time

import pytest

from chaos_support import (
    Outcome, ask, check, children, kill_all, metric_files, wait_answer,
)
from harness import net
from harness.daemon import running_daemon
from harness.models import scripted_model
from metrics_support import assert_promtool_clean

WORDS = 6
MODELS = ("c1", "c2")

# Each phase holds for PHASE_REQUESTS requests issued; "kill" SIGKILLs the runners and the
# tokenizer servers once at its start.
PHASES: tuple[tuple[str, dict], ...] = (
    ("calm", {}),
    ("crash-segv", {"crash_after_tokens": 4, "crash_signal": "SEGV"}),
    ("init-fail", {"crash_after_tokens": 2, "crash_signal": "KILL", "init_fail": "connect"}),
    ("calm", {}),
    ("hang", {"hang_after_tokens": 3}),
    ("garbage", {"garbage": 1}),
    ("busy-after-crash", {"crash_after_tokens": 5, "crash_signal": "ABRT", "busy_after_crash_seconds": 2}),
    ("kill", {}),
    ("crash-mixed", {"crash_after_tokens": 7, "crash_signal": "KILL"}),
    ("calm", {}),
)
DAEMON_FLAGS = ("--hang-timeout-s", "1.5", "--load-stall-timeout-s", "8", "--request-deadline-s", "45")


def chaos_run(tmp_path, total: int, clients: int) -> None:
    phase_requests = max(1, total // len(PHASES))
    # About 1 s a request per client at worst (restarts, hangs), so the soak gets its time too.
    run_limit_s = max(240.0, total * 1.2)
    entries = [scripted_model(tmp_path, name, reply_words=WORDS, tokens_per_second=300) for name in MODELS]
    with running_daemon(tmp_path, entries, *DAEMON_FLAGS) as daemon:
        for name in MODELS:  # both serve before the chaos starts
            wait_answer(daemon.url, name, f"warm-{name}", WORDS)
        counter = itertools.count()
        lock = threading.Lock()
        outcomes: list[Outcome] = []
        phase_now = ["calm"]
        injected = {"fault phases": 0, "SIGKILLed runners": 0, "SIGKILLed tokenizer servers": 0}
        entered: set[int] = set()

        def kill_children() -> None:
            """SIGKILL runners and tokenizer servers as they are found (a runner may be between
            restarts right now), until at least one of each died; bounded to 20 s."""
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (
                injected["SIGKILLed runners"] and injected["SIGKILLed tokenizer servers"]
            ):
                if not injected["SIGKILLed runners"]:
                    injected["SIGKILLed runners"] += kill_all(children(daemon.marker, "ax-emulator"))
                if not injected["SIGKILLed tokenizer servers"]:
                    injected["SIGKILLed tokenizer servers"] += kill_all(children(daemon.marker, "_tokenizer.py"))
                time.sleep(0.05)

        killer = threading.Thread(target=kill_children)

        def enter_phase(index: int) -> None:
            """Called under the lock by the client issuing the first request of a phase."""
            name, faults = PHASES[index]
            phase_now[0] = name
            daemon.set_faults(**faults)
            if faults:
                injected["fault phases"] += 1
            if name == "kill":
                killer.start()

        def client() -> None:
            deadline = time.monotonic() + run_limit_s
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter)
                    if i >= total:
                        return
                    phase = min(i // phase_requests, len(PHASES) - 1)
                    if phase not in entered:
                        entered.add(phase)
                        enter_phase(phase)
                    outcome = Outcome(
                        index=i, model=MODELS[i % len(MODELS)], kind=("generate", "chat")[(i // 2) % 2],
                        stream=(i // 4) % 2 == 0, disconnect=i % 10 == 7,
                    )
                    outcome.phases.add(phase_now[0])
                    outcomes.append(outcome)
                ask(daemon.url, outcome)
                with lock:
                    outcome.phases.add(phase_now[0])

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(run_limit_s + 60)
        assert not any(t.is_alive() for t in threads), f"clients still running after {run_limit_s + 60:.0f} s"
        assert killer.ident is not None, "the run never reached its kill phase"
        killer.join(30)
        daemon.set_faults()

        assert len(outcomes) == total
        problems = [f"#{o.index} {o.kind} stream={o.stream} {sorted(o.phases)}: {why}"
                    for o in outcomes if (why := check(o, WORDS))]
        complete = sum(o.result == "complete" for o in outcomes)
        errors = sum(o.result == "error" for o in outcomes)
        left = sum(o.result == "disconnected" for o in outcomes)
        lost = sum(o.result == "lost" for o in outcomes)
        print(
            f"\nCHAOS: {total} requests from {clients} clients; faults injected: "
            + ", ".join(f"{k} {v}" for k, v in injected.items())
            + f"; complete answers {complete}, explicit errors {errors}, client left early {left}, lost: {lost}"
        )
        assert not problems, "\n".join(problems[:20]) + f"\n... {len(problems)} problems\n" + daemon.log()[-3000:]
        assert injected["SIGKILLed runners"] >= 1 and injected["SIGKILLed tokenizer servers"] >= 1
        # The chaos must really have bitten, and the calm phases must really have answered.
        assert errors >= 3, "the faults never surfaced as errors: the chaos did not bite"
        assert sum(o.result == "complete" and o.phases == {"calm"} for o in outcomes) >= phase_requests // 2

        # Afterwards: healthy, every model answers exactly and is ready again.
        for name in MODELS:
            wait_answer(daemon.url, name, f"after-chaos-{name}", WORDS)
            assert daemon.wait_state(name, "ready")["state"] == "ready"
        with daemon.client() as http:
            assert http.get("/health").json() == {"status": "ok"}
            status = http.get("/api/status").json()
            assert {m["name"]: m["state"] for m in status["models"]} == {name: "ready" for name in MODELS}
            assert all(m["restarts"] >= 1 for m in status["models"]), "crashes must have caused restarts"
            exposition = http.get("/metrics").content
        assert_promtool_clean(exposition, "/metrics after the chaos")
        files = metric_files(daemon.metrics_dir)
        assert files, "no metric files written"
        for path in files:
            assert_promtool_clean(path.read_bytes(), path.name)
        # running_daemon proves, after SIGTERM, that no runner or tokenizer server is left behind


def test_chaos_200_requests_under_faults(tmp_path):
    chaos_run(tmp_path, total=200, clients=8)


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_chaos_soak_1000_requests(tmp_path):
    chaos_run(tmp_path, total=1000, clients=16)


def test_tokenizer_server_killed_mid_answer_is_restarted_and_the_model_recovers(tmp_path):
    entry = scripted_model(tmp_path, "tk", reply_words=40, tokens_per_second=60)
    with running_daemon(tmp_path, [entry], *DAEMON_FLAGS) as daemon:
        wait_answer(daemon.url, "tk", "before-kill", 40)
        old = children(daemon.marker, "tk_tokenizer.py")
        assert len(old) == 1, old
        outcome = Outcome(index=1, model="tk", kind="generate", stream=True, disconnect=False)
        client = threading.Thread(target=ask, args=(daemon.url, outcome))
        client.start()
        daemon.wait_state("tk", "outputting", timeout=20)
        time.sleep(0.2)
        assert kill_all(old) == 1
        client.join(90)
        assert not client.is_alive()
        assert outcome.result in ("complete", "error"), outcome.problem
        assert check(outcome, 40) is None, check(outcome, 40)
        # detected and restarted: a new tokenizer server process, and the model answers again
        recovery = wait_answer(daemon.url, "tk", "after-kill", 40, timeout=60)
        new = children(daemon.marker, "tk_tokenizer.py")
        assert len(new) == 1 and new != old, (old, new)
        daemon.wait_state("tk", "ready")  # after the reset ahead of the next request
        print(f"\ntokenizer server SIGKILLed: request ended as {outcome.result!r}; answered again after {recovery:.1f}s")


def test_tokenizer_server_answers_a_kept_alive_client_without_a_delayed_ack_stall(tmp_path):
    """The daemon talks to its tokenizer servers through one kept-alive httpx client (estimate,
    /config, /stats every request). A server that sends headers and body in two writes made each
    call wait ~44 ms for the client's delayed ACK (Nagle): ~100 ms added to every TTFT."""
    entry = scripted_model(tmp_path, "nagle", reply_words=2)
    with running_daemon(tmp_path, [entry]) as daemon:
        wait_answer(daemon.url, "nagle", "warm", 2)
        url = f"http://127.0.0.1:{entry['tokenizer_port']}/tokenize"
        with net.client(timeout=5) as http:
            times = []
            for _ in range(9):
                started = time.perf_counter()
                assert http.post(url, json={"text": "hello world"}).status_code == 200
                times.append(time.perf_counter() - started)
        median = sorted(times)[len(times) // 2]
        assert median < 0.02, f"median round trip {median * 1000:.1f} ms: {[round(t * 1000, 1) for t in times]}"
