"""Prometheus metrics of the real daemon: every file it writes through a session with several
models, faults, restarts and a removal passes the real `promtool check metrics`; the real
node_exporter serves the files while requests run and shows the values the clients saw;
`GET /metrics` carries the process metrics and HTTP requests by route template."""
from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import net
from harness.daemon import Daemon, running_daemon, write_descriptor
from harness.models import scripted_model
from harness.net import WaitFailed, wait_until
from llm_service.metrics import RESTART_REASONS
from metrics_support import assert_promtool_clean, running_node_exporter, samples

FILE_NAME = re.compile(r"^axm1-llm-(?P<model>.+)-metrics\.prom$")
WAIT_S = 20.0


# ---- helpers -------------------------------------------------------------------------------------


def stream_generate(daemon: Daemon, model: str, prompt: str, timeout: float = 60.0) -> dict[str, Any]:
    """One streaming /api/generate; returns the final object or the error (a status before the
    first byte, or the last NDJSON line), with the number of text chunks received."""
    chunks = 0
    with net.client(base_url=daemon.url, timeout=timeout) as http, http.stream(
        "POST", "/api/generate", json={"model": model, "prompt": prompt}
    ) as reply:
        if reply.status_code != 200:
            return {**json.loads(reply.read()), "_status": reply.status_code, "_chunks": 0}
        last: dict[str, Any] = {}
        for line in reply.iter_lines():
            if not line:
                continue
            last = json.loads(line)
            if not last.get("done") and "error" not in last:
                chunks += 1
    return {**last, "_chunks": chunks}


def status(daemon: Daemon, model: str) -> dict[str, Any]:
    return net.get(f"{daemon.url}/api/status/{model}", timeout=5).json()


def crash_once(daemon: Daemon, model: str, **extra_faults: Any) -> dict[str, Any]:
    """The runner of `model` dies by SIGSEGV after its first token (nothing of the text flushed);
    returns the client's last NDJSON line (the error)."""
    daemon.set_faults(crash_after_tokens=1, **extra_faults)
    try:
        answer = stream_generate(daemon, model, "crash-marker")
    finally:
        if not extra_faults:
            daemon.set_faults()
    assert "error" in answer and not answer.get("done"), answer
    return answer


def read_first_chunk_and_leave(daemon: Daemon, model: str, prompt: str) -> None:
    with net.client(base_url=daemon.url, timeout=30) as http, http.stream(
        "POST", "/api/generate", json={"model": model, "prompt": prompt}
    ) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line:
                assert json.loads(line)["done"] is False
                break  # leaving the block closes the connection mid-answer


class FileRecorder:
    """Reads every file of the metrics folder every few milliseconds while the daemon runs and
    keeps each distinct content of each `.prom` file, so the checks see the files as written."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.versions: dict[str, list[bytes]] = defaultdict(list)
        self.names_seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FileRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()
        self.snapshot()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.snapshot()
            time.sleep(0.02)

    def snapshot(self) -> None:
        for path in self.folder.iterdir():
            self.names_seen.add(path.name)
            if not path.name.endswith(".prom"):
                continue
            try:
                content = path.read_bytes()
            except FileNotFoundError:
                continue
            seen = self.versions[path.name]
            if not seen or seen[-1] != content:
                seen.append(content)

    def present(self) -> set[str]:
        return {p.name for p in self.folder.iterdir()}


def check_model_file(name: str, content: bytes) -> str:
    """Everything the issue asks of one file; returns the model it belongs to."""
    match = FILE_NAME.match(name)
    assert match, f"{name}: not named axm1-llm-{{model}}-metrics.prom"
    model = unquote(match["model"])
    text = content.decode()
    assert text.endswith("\n"), f"{name}: does not end with a newline"
    families = list(text_string_to_metric_families(text))
    assert families, f"{name}: empty"
    for family in families:
        for sample in family.samples:
            assert sample.timestamp is None, f"{name}: sample with a timestamp: {sample}"
            assert not sample.name.endswith("_created"), f"{name}: {sample.name}"
            assert sample.labels.get("model") == model, f"{name}: series without model={model!r}: {sample}"
    assert "_created" not in text, f"{name}: holds a _created series"
    # No third field after the value on any sample line (a timestamp), checked on the raw text too.
    for line in text.splitlines():
        if line and not line.startswith("#"):
            value_part = line.rsplit("}", 1)[-1].split()
            assert len(value_part) == 1, f"{name}: sample line with more than a value: {line!r}"
    assert_promtool_clean(content, name)
    return model


def value(parsed, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in parsed, f"no series {name}{labels}; have: {sorted(k for k in parsed if k[0] == name)}"
    return parsed[key]


def one_hot_state(parsed, model: str) -> str:
    states = {dict(labels)["state"]: v for (name, labels), v in parsed.items()
              if name == "axm1_llm_runner_state" and dict(labels).get("model") == model}
    assert states and sorted(states.values()) == [0.0] * (len(states) - 1) + [1.0], (model, states)
    return next(s for s, v in states.items() if v == 1.0)


# ---- 1. every file through a session with faults, restarts and a removal ---------------------


def test_every_file_written_through_faults_restarts_and_removal_passes_promtool(tmp_path: Path) -> None:
    names = ["alpha", "beta", "qwen3:0.6b"]
    entries = [scripted_model(tmp_path, name, reply_words=6) for name in names]
    # The folder may be shared with other exporters, and may hold the files of an earlier run.
    folder = tmp_path / "metrics"
    folder.mkdir()
    foreign = b"# HELP other_up Another exporter's file.\n# TYPE other_up gauge\nother_up 1\n"
    (folder / "other-exporter.prom").write_bytes(foreign)
    (folder / "axm1-llm-retired-metrics.prom").write_text('axm1_llm_requests_running{model="retired"} 3\n')
    with running_daemon(tmp_path, entries) as daemon, FileRecorder(daemon.metrics_dir) as files:
        assert not (folder / "axm1-llm-retired-metrics.prom").exists(), "a file of an earlier run was kept"
        # Every model has its file from the start, before any request.
        wait_until(lambda: files.present() >= {f"axm1-llm-{n}-metrics.prom" for n in names}, WAIT_S, "a file per model")
        with daemon.client() as http:
            for name in names:
                assert http.post("/api/generate", json={"model": name, "prompt": f"hi {name}", "stream": False}).status_code == 200
                assert stream_generate(daemon, name, f"stream {name}")["done"] is True

        # A runner dies mid-answer and comes back.
        crash_once(daemon, "alpha")
        daemon.wait_state("alpha", "ready", timeout=WAIT_S)

        # A crash, then starts that fail (init_fail) for a while, then the card works again.
        crash_once(daemon, "beta", init_fail="set_device")
        wait_until(lambda: status(daemon, "beta")["restarts"] >= 3, WAIT_S, "beta failing to start again")
        daemon.set_faults()
        daemon.wait_state("beta", "ready", timeout=WAIT_S)
        assert stream_generate(daemon, "beta", "after the faults")["done"] is True

        # The third model leaves the descriptor: its file goes, and stays gone.
        gone = "axm1-llm-qwen3:0.6b-metrics.prom"
        assert gone in files.present()
        write_descriptor(daemon.descriptor, entries[:2])
        wait_until(lambda: gone not in files.present(), WAIT_S, f"{gone} to disappear")
        assert net.get(f"{daemon.url}/api/status/qwen3:0.6b", timeout=5).status_code == 404
        assert stream_generate(daemon, "alpha", "after removal")["done"] is True

        for name in names[:2]:
            daemon.wait_state(name, "ready", timeout=WAIT_S)

        # At rest, each file says what /metrics says about its model. A file is written just
        # after a state change, so the last one may land a moment after "ready" is seen.
        def differences() -> dict[str, dict]:
            nonlocal metrics_body
            metrics_body = net.get(f"{daemon.url}/metrics", timeout=10)
            assert metrics_body.status_code == 200
            live = samples(metrics_body.text)
            found = {}
            for name in names[:2]:
                written = samples((daemon.metrics_dir / f"axm1-llm-{name}-metrics.prom").read_text())
                differ = {k: (v, live.get(k)) for k, v in written.items() if v == v and live.get(k) != v}
                if differ:
                    found[name] = differ
            return found

        metrics_body: httpx.Response | None = None
        deadline = time.monotonic() + WAIT_S
        while (differ := differences()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for name, differ_ in differ.items():
            assert not differ_, f"{name}: file and /metrics differ: {differ_}"
        assert 'model="qwen3:0.6b"' not in metrics_body.text
        time.sleep(0.3)
        assert gone not in files.present()
    # After the daemon stopped (its last write_all): the removed model's file did not come back.
    files.snapshot()
    final = files.present()
    assert final == {"axm1-llm-alpha-metrics.prom", "axm1-llm-beta-metrics.prom", "other-exporter.prom"}, final
    assert (folder / "other-exporter.prom").read_bytes() == foreign
    files.versions.pop("other-exporter.prom")

    assert_promtool_clean(metrics_body.content, "GET /metrics")
    assert metrics_body.text.endswith("\n") and "_created" not in metrics_body.text

    checked = Counter()
    for name, versions in sorted(files.versions.items()):
        for content in versions:
            checked[check_model_file(name, content)] += 1
    assert set(checked) == set(names), checked
    assert all(n >= 3 for n in checked.values()), checked
    # Temporaries of the atomic writes are the only other names ever seen, and none is left.
    others = {n for n in files.names_seen if not n.endswith(".prom")}
    assert all(re.match(r"^axm1-llm-.+-metrics\.prom\.\d+\.\d+$", n) for n in others), others

    # The files hold what the session did: the crash and the failed starts, by reason.
    beta = samples(files.versions["axm1-llm-beta-metrics.prom"][-1].decode())
    assert value(beta, "axm1_llm_runner_restarts_total", model="beta", reason="crash") == 1
    assert value(beta, "axm1_llm_runner_restarts_total", model="beta", reason="crash_at_load") >= 2
    alpha = samples(files.versions["axm1-llm-alpha-metrics.prom"][-1].decode())
    assert value(alpha, "axm1_llm_runner_restarts_total", model="alpha", reason="crash") == 1
    assert value(alpha, "axm1_llm_requests_finished_total", model="alpha", finished_reason="error") == 1


# ---- 2. node_exporter scraping while requests run ---------------------------------------------


def test_node_exporter_serves_the_daemons_files_while_requests_run(tmp_path: Path) -> None:
    names = ["alpha", "beta"]
    entries = [scripted_model(tmp_path, name, reply_words=10, tokens_per_second=60) for name in names]
    with running_daemon(tmp_path, entries) as daemon, running_node_exporter(daemon.metrics_dir) as exporter:
        scrapes: list[str] = []
        stop = threading.Event()

        def scrape_loop() -> None:
            while not stop.is_set():
                scrapes.append(exporter.scrape())
                time.sleep(0.03)

        answers: dict[str, list[dict[str, Any]]] = defaultdict(list)
        errors: list[BaseException] = []

        def ask(model: str, i: int) -> None:
            try:
                answers[model].append(stream_generate(daemon, model, f"{model} request {i} " + "word " * i))
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        scraper = threading.Thread(target=scrape_loop, daemon=True)
        scraper.start()
        clients = [threading.Thread(target=ask, args=(model, i)) for model in names for i in range(4)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(90)
        assert not any(t.is_alive() for t in clients), "requests did not finish in 90s"
        assert not errors, errors

        # A runner crash on alpha, and alpha serving again after its restart.
        crash_once(daemon, "alpha")
        daemon.wait_state("alpha", "ready", timeout=WAIT_S)
        answers["alpha"].append(stream_generate(daemon, "alpha", "alpha after the crash"))
        for model in names:
            daemon.wait_state(model, "ready", timeout=WAIT_S)
        stop.set()
        scraper.join(15)
        assert not scraper.is_alive()
        # The files are written off the event loop, a moment after the last answer: the final
        # scrape is the first that shows every answer's tokens (bounded wait; checked below).
        expected = sum(a["eval_count"] for m in names for a in answers[m] if a.get("done"))

        def settled() -> str | None:
            text = exporter.scrape()
            got = sum(value(samples(text), "axm1_llm_generation_tokens_total", model=m) for m in names)
            return text if got == expected else None
        try:
            final = wait_until(settled, 10, "the metric files to show every answer")
        except WaitFailed:
            final = exporter.scrape()  # the assertions below say what is missing

    assert len(scrapes) >= 10, len(scrapes)
    for text in scrapes + [final]:
        assert value(samples(text), "node_textfile_scrape_error") == 0, text[-3000:]
    # Scrapes happened while requests were in flight, and saw them.
    busy = [s for s in map(samples, scrapes)
            if any(v > 0 for (n, _), v in s.items() if n in ("axm1_llm_requests_running", "axm1_llm_requests_waiting"))]
    assert busy, "no scrape saw a request running or waiting"

    parsed = samples(final)
    for model in names:
        done = [a for a in answers[model] if a.get("done")]
        assert len(done) == (5 if model == "alpha" else 4), answers[model]
        assert all(a["done_reason"] == "stop" and a["eval_count"] > 0 for a in done), done
        assert value(parsed, "node_textfile_mtime_seconds", file=str(daemon.metrics_dir / f"axm1-llm-{model}-metrics.prom")) > 0
        assert value(parsed, "axm1_llm_generation_tokens_total", model=model) == sum(a["eval_count"] for a in done)
        assert value(parsed, "axm1_llm_prompt_tokens_total", model=model) == sum(a["prompt_eval_count"] for a in done)
        assert value(parsed, "axm1_llm_requests_finished_total", model=model, finished_reason="stop") == len(done)
        assert value(parsed, "axm1_llm_requests_finished_total", model=model, finished_reason="error") == (1 if model == "alpha" else 0)
        assert one_hot_state(parsed, model) == "ready"
        # Every request that received text has its time to first token; every served one its queue time.
        with_text = sum(1 for a in answers[model] if a["_chunks"] > 0)
        served = len(answers[model]) + (1 if model == "alpha" else 0)
        assert value(parsed, "axm1_llm_time_to_first_token_seconds_count", model=model) == with_text
        assert value(parsed, "axm1_llm_request_queue_time_seconds_count", model=model) == served
        assert value(parsed, "axm1_llm_e2e_request_latency_seconds_count", model=model) == served
        assert value(parsed, "axm1_llm_requests_running", model=model) == 0
        assert value(parsed, "axm1_llm_requests_waiting", model=model) == 0
        chunk_gaps = sum(max(a["_chunks"] - 1, 0) for a in answers[model])
        assert value(parsed, "axm1_llm_inter_token_latency_seconds_count", model=model) == chunk_gaps
        loads = 2 if model == "alpha" else 1  # alpha loaded again after its crash
        assert value(parsed, "axm1_llm_model_load_duration_seconds_count", model=model) == loads
        assert value(parsed, "axm1_llm_measured_decode_tokens_per_second", model=model) > 0
        assert value(parsed, "axm1_llm_runner_reported_decode_tokens_per_second", model=model) > 0
        assert value(parsed, "axm1_llm_context_used_tokens", model=model) > 0
    assert value(parsed, "axm1_llm_runner_restarts_total", model="alpha", reason="crash") == 1
    # Every restart reason is there from 0 (so that increase() counts a first crash), and beta had none.
    beta_restarts = {dict(k[1])["reason"]: v for k, v in parsed.items()
                     if k[0] == "axm1_llm_runner_restarts_total" and ("model", "beta") in k[1]}
    assert beta_restarts == dict.fromkeys(RESTART_REASONS, 0.0)


# ---- 3. GET /metrics: process metrics and HTTP requests by route template --------------------


def http_counts(parsed) -> dict[tuple[str, str, str], float]:
    return {(d["route"], d["method"], d["status"]): v
            for (name, labels), v in parsed.items() if name == "axm1_llm_http_requests_total"
            for d in [dict(labels)]}


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    """One daemon for the tests below: "echo" for the HTTP counts, "partial" for faults."""
    root = tmp_path_factory.mktemp("daemon-metrics")
    entries = [scripted_model(root, "echo", reply_words=4),
               scripted_model(root, "partial", reply_words=40, tokens_per_second=12)]
    with running_daemon(root, entries) as daemon:
        yield daemon


def test_metrics_endpoint_has_process_metrics_and_route_templates(shared_daemon: Daemon) -> None:
    daemon = shared_daemon
    with daemon.client() as http:
        before = http_counts(samples(http.get("/metrics").text))
        assert http.get("/api/status/echo").status_code == 200
        assert http.get("/api/status/echo").status_code == 200
        assert http.get("/api/status/no-such-model").status_code == 404
        assert http.post("/api/generate", json={"model": "no-such-model", "prompt": "x"}).status_code == 404
        assert http.post("/api/generate", json={"model": "echo", "prompt": "route-marker", "stream": False}).status_code == 200
        assert stream_generate(daemon, "echo", "streamed")["done"] is True
        assert http.get("/api/logs/echo").status_code == 200
        assert http.get("/not/a/route/echo").status_code == 404
        reply = http.get("/metrics")
        after_text = http.get("/metrics").text  # a /metrics is counted once its answer is sent

    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    assert_promtool_clean(reply.content, "GET /metrics")
    parsed = samples(after_text)
    assert value(parsed, "process_cpu_seconds_total") > 0
    assert value(parsed, "process_resident_memory_bytes") > 10 * 2**20
    assert value(parsed, "axm1_llm_build_info", model="echo", version=dict(
        next(labels for (n, labels) in parsed if n == "axm1_llm_build_info"))["version"]) == 1

    after = http_counts(parsed)
    delta = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    assert delta.get(("/api/status/{model:path}", "GET", "200")) == 2, delta
    assert delta.get(("/api/status/{model:path}", "GET", "404")) == 1, delta
    assert delta.get(("/api/generate", "POST", "404")) == 1, delta
    assert delta.get(("/api/generate", "POST", "200")) == 2, delta
    assert delta.get(("/api/logs/{model:path}", "GET", "200")) == 1, delta
    assert delta.get(("/metrics", "GET", "200")) == 2, delta  # the one read as `before`, and `reply`
    # A path no route matches is counted, under a fixed label rather than the raw path.
    unmatched = [k for k in delta if k[2] == "404" and k[0] not in ("/api/status/{model:path}", "/api/generate")]
    assert len(unmatched) == 1 and delta[unmatched[0]] == 1, delta
    # Route labels are templates: never a model name or a raw path.
    for route, _, _ in after:
        assert "echo" not in route and "no-such-model" not in route and "not/a/route" not in route, route


def test_tokens_of_crashed_and_abandoned_answers_are_counted(shared_daemon: Daemon) -> None:
    """vLLM's meaning: prompt tokens count once prefilled, generation tokens once generated, however
    the request ends. A client that received text before a crash, or left mid-answer, was sent
    generated tokens, and the runner had read its prompt."""
    daemon = shared_daemon
    file = daemon.metrics_dir / "axm1-llm-partial-metrics.prom"
    daemon.set_faults(crash_after_tokens=5)  # the first 3-token chunk is flushed, then SIGSEGV
    try:
        crashed = stream_generate(daemon, "partial", "crash after some text")
    finally:
        daemon.set_faults()
    assert "error" in crashed and crashed["_chunks"] >= 1, crashed
    daemon.wait_state("partial", "ready", timeout=WAIT_S)
    read_first_chunk_and_leave(daemon, "partial", "leave after some text")

    def settled():
        parsed = samples(file.read_text())
        finished = sum(value(parsed, "axm1_llm_requests_finished_total", model="partial", finished_reason=r)
                       for r in ("error", "abort"))
        return parsed if finished == 2 and value(parsed, "axm1_llm_requests_running", model="partial") == 0 else None

    parsed = wait_until(settled, WAIT_S, "the crashed and the abandoned request in the file")
    assert value(parsed, "axm1_llm_requests_finished_total", model="partial", finished_reason="error") == 1
    assert value(parsed, "axm1_llm_requests_finished_total", model="partial", finished_reason="abort") == 1
    assert value(parsed, "axm1_llm_time_to_first_token_seconds_count", model="partial") == 2
    # Both prompts were read by the runner and both answers had sent text (3+ tokens each).
    assert value(parsed, "axm1_llm_prompt_tokens_total", model="partial") >= 2
    assert value(parsed, "axm1_llm_generation_tokens_total", model="partial") >= 2 * 3


# ---- 4. a client leaving mid-answer, and a model removed while it answers ---------------------


def test_client_gone_counts_abort_and_a_removed_models_file_stays_gone(tmp_path: Path) -> None:
    # Slow answers (about 4 s), so there is time to leave, and to remove a model, mid-answer.
    entries = [scripted_model(tmp_path, name, reply_words=40, tokens_per_second=12) for name in ("stay", "leave")]
    with running_daemon(tmp_path, entries) as daemon:
        stay_file = daemon.metrics_dir / "axm1-llm-stay-metrics.prom"
        read_first_chunk_and_leave(daemon, "stay", "abort-marker")

        def settled():
            parsed = samples(stay_file.read_text())
            return parsed if value(parsed, "axm1_llm_requests_running", model="stay") == 0 else None

        parsed = wait_until(settled, WAIT_S, "the aborted request to leave the file's running gauge")
        assert value(parsed, "axm1_llm_requests_finished_total", model="stay", finished_reason="abort") == 1
        assert value(parsed, "axm1_llm_requests_finished_total", model="stay", finished_reason="stop") == 0
        assert value(parsed, "axm1_llm_time_to_first_token_seconds_count", model="stay") == 1

        # "leave" is removed from the descriptor while it answers a client.
        leave_file = daemon.metrics_dir / "axm1-llm-leave-metrics.prom"
        outcome: dict[str, Any] = {}
        client = threading.Thread(target=lambda: outcome.update(stream_generate(daemon, "leave", "in flight")))
        client.start()
        daemon.wait_state("leave", "outputting", timeout=WAIT_S)
        write_descriptor(daemon.descriptor, entries[:1])
        client.join(30)
        assert not client.is_alive()
        assert "error" in outcome, outcome
        wait_until(lambda: not leave_file.exists(), WAIT_S, "the removed model's file to go")
        time.sleep(1.0)  # anything the finished request or the stopped runner still writes
        assert not leave_file.exists(), leave_file.read_text()
        assert 'model="leave"' not in net.get(f"{daemon.url}/metrics", timeout=10).text
        assert_promtool_clean(stay_file.read_bytes(), stay_file.name)
    assert sorted(p.name for p in daemon.metrics_dir.iterdir()) == [stay_file.name]
