"""MetricsHub against the real tools: promtool on every file and on /metrics, node_exporter scraping."""
from __future__ import annotations

import logging
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_service.metrics import WRITE_DELAY_S, MetricsHub, ModelMetrics, metrics_file_name
from llm_service.states import RunnerState
from metrics_support import NodeExporter, assert_promtool_clean, node_exporter, samples  # noqa: F401 (fixture)

VERSION = "0.1.0-test"
# Names a daemon meets: plain, Ollama-style with a tag, and one holding a slash.
MODELS = ("smollm2", "qwen3:1.7b", "org/deepseek-r1")


def serve(metrics: ModelMetrics, reason: str, prompt_tokens: int, generation_tokens: int) -> None:
    """One request through queue and runner, as the daemon reports it."""
    metrics.request_queued()
    metrics.request_dequeued(0.5)
    metrics.request_started()
    metrics.first_token(0.7)
    for _ in range(max(generation_tokens - 1, 0)):
        metrics.inter_token(0.08)
    metrics.request_finished(reason, prompt_tokens, generation_tokens, 2.0)


def drive(hub: MetricsHub) -> dict[str, dict[str, float]]:
    """Traffic with faults, restarts and state changes on every model; returns what was fed."""
    fed: dict[str, dict[str, float]] = {}
    for index, name in enumerate(MODELS):
        model = hub.model(name)
        model.npu_memory(1000 + index)
        for state in ("starting", "initializing", "ready"):
            model.set_state(state)
        model.load_finished(36.0 + index)
        runs = [("stop", 21, 40 + index), ("length", 30, 128), ("error", 12, 3), ("abort", 9, 1 + index)]
        for reason, prompt, generation in runs:
            model.set_state("processing")
            serve(model, reason, prompt, generation)
            model.set_state("ready")
        model.restarted("crash")
        model.restarted("crash")
        model.restarted("hung")
        model.set_state("failed" if index == 1 else "ready")
        model.runner_speed(12.9 + index, 12.5 + index)
        model.context(used_tokens=200 + index, size_tokens=2559)
        fed[name] = {
            "prompt": sum(r[1] for r in runs),
            "generation": sum(r[2] for r in runs),
            "requests": len(runs),
            "inter_token_observations": sum(max(r[2] - 1, 0) for r in runs),
        }
    return fed


def model_files(folder: Path) -> dict[str, Path]:
    return {name: folder / metrics_file_name(name) for name in MODELS}


def help_texts(text: str) -> dict[str, str]:
    return {family.name: family.documentation for family in text_string_to_metric_families(text)}


def value(found: dict, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in found, f"no series {name}{labels}"
    return found[key]


def test_import_does_not_pull_torch_or_transformers() -> None:
    heavy = ("torch", "transformers", "tokenizers", "numpy")
    probe = (f"import sys, llm_service.metrics; "
             f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing llm_service.metrics loaded {result.stdout.strip()}"


def test_every_file_and_the_metrics_body_pass_promtool(tmp_path: Path) -> None:
    hub = MetricsHub(tmp_path, VERSION)
    fed = drive(hub)
    hub.observe_http("/api/chat", "POST", 200)
    hub.observe_http("/api/chat", "POST", 503)
    hub.write_all()

    files = model_files(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(p.name for p in files.values()), \
        "only the model files, no temporaries left behind"
    assert files["org/deepseek-r1"].name == "axm1-llm-org%2Fdeepseek-r1-metrics.prom"
    helps: list[dict[str, str]] = []
    for name, path in files.items():
        raw = path.read_bytes()
        assert_promtool_clean(raw, path.name)
        text = raw.decode()
        assert text.endswith("\n")
        assert "_created" not in text
        families = list(text_string_to_metric_families(text))
        assert all(s.timestamp is None for f in families for s in f.samples), "a timestamp in " + path.name
        assert all(s.labels.get("model") == name for f in families for s in f.samples), \
            f"{path.name}: every series carries model={name!r}"
        found = samples(text)
        assert value(found, "axm1_llm_generation_tokens_total", model=name) == fed[name]["generation"]
        assert value(found, "axm1_llm_prompt_tokens_total", model=name) == fed[name]["prompt"]
        for reason in ("stop", "length", "error", "abort"):
            assert value(found, "axm1_llm_requests_finished_total", model=name, finished_reason=reason) == 1
        assert value(found, "axm1_llm_runner_restarts_total", model=name, reason="crash") == 2
        assert value(found, "axm1_llm_runner_restarts_total", model=name, reason="hung") == 1
        assert value(found, "axm1_llm_inter_token_latency_seconds_count", model=name) == \
            fed[name]["inter_token_observations"]
        assert value(found, "axm1_llm_time_to_first_token_seconds_count", model=name) == fed[name]["requests"]
        assert value(found, "axm1_llm_request_queue_time_seconds_count", model=name) == fed[name]["requests"]
        assert value(found, "axm1_llm_e2e_request_latency_seconds_bucket", model=name, le="2.0") == 4
        assert value(found, "axm1_llm_build_info", model=name, version=VERSION) == 1
        assert value(found, "axm1_llm_requests_running", model=name) == 0
        assert value(found, "axm1_llm_requests_waiting", model=name) == 0
        helps.append(help_texts(text))
    assert all(h == helps[0] for h in helps), "HELP texts differ between files"

    body, content_type = hub.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert_promtool_clean(body, "the /metrics body")
    text = body.decode()
    type_lines = Counter(line for line in text.splitlines() if line.startswith("# TYPE"))
    assert [line for line, n in type_lines.items() if n > 1] == [], "a family repeated in /metrics"
    assert "_created" not in text
    found = samples(text)
    for name in MODELS:
        assert value(found, "axm1_llm_generation_tokens_total", model=name) == fed[name]["generation"]
    assert value(found, "axm1_llm_runner_state", model="qwen3:1.7b", state="failed") == 1
    assert value(found, "axm1_llm_http_requests_total", route="/api/chat", method="POST", status="503") == 1
    assert value(found, "axm1_llm_build_info", version=VERSION) == 1
    assert value(found, "process_resident_memory_bytes") > 0
    assert help_texts(text).items() >= helps[0].items(), "/metrics and the files disagree on HELP"


def test_node_exporter_serves_the_files(tmp_path: Path, node_exporter: NodeExporter) -> None:
    hub = MetricsHub(node_exporter.textfile_dir, VERSION)
    fed = drive(hub)
    hub.write_all()

    found = samples(node_exporter.scrape())
    assert value(found, "node_textfile_scrape_error") == 0, node_exporter.log()
    for name, path in model_files(node_exporter.textfile_dir).items():
        assert value(found, "node_textfile_mtime_seconds", file=str(path)) > 0
        assert value(found, "axm1_llm_generation_tokens_total", model=name) == fed[name]["generation"]
        assert value(found, "axm1_llm_requests_finished_total", model=name, finished_reason="error") == 1
        assert value(found, "axm1_llm_npu_memory_bytes", model=name) == \
            (1000 + MODELS.index(name)) * 1024 * 1024
        state = "failed" if name == "qwen3:1.7b" else "ready"
        assert {s: value(found, "axm1_llm_runner_state", model=name, state=s) for s in RunnerState} == \
            {s: float(s == state) for s in RunnerState}

    # Live: the next request shows at the next scrape, with no restart of anything.
    serve(hub.model("smollm2"), "stop", 5, 7)
    found = samples(node_exporter.scrape())
    assert value(found, "axm1_llm_generation_tokens_total", model="smollm2") == fed["smollm2"]["generation"] + 7

    hub.remove_model("qwen3:1.7b")
    assert not model_files(node_exporter.textfile_dir)["qwen3:1.7b"].exists()
    found = samples(node_exporter.scrape())
    assert value(found, "node_textfile_scrape_error") == 0
    assert not [key for key in found if ("model", "qwen3:1.7b") in key[1]], "removed model still scraped"
    assert value(found, "axm1_llm_generation_tokens_total", model="smollm2") > 0
    assert b'model="qwen3:1.7b"' not in hub.render()[0]


def test_runner_state_is_one_hot_and_names_are_checked(tmp_path: Path) -> None:
    hub = MetricsHub(tmp_path, VERSION)
    model = hub.model("smollm2")
    path = tmp_path / metrics_file_name("smollm2")
    for state in ["stopped", *RunnerState]:
        model.set_state(state)  # writes the file
        found = samples(path.read_text())
        ones = [s for s in RunnerState if value(found, "axm1_llm_runner_state", model="smollm2", state=s) == 1]
        assert ones == [state]
    with pytest.raises(ValueError):
        model.set_state("sleeping")
    with pytest.raises(ValueError):
        model.request_finished("timeout", 1, 1, 1.0)


def test_queue_exit_without_service_and_optional_values(tmp_path: Path) -> None:
    hub = MetricsHub(tmp_path, VERSION)
    model = hub.model("smollm2")
    path = tmp_path / metrics_file_name("smollm2")
    found = samples(path.read_text())
    assert math.isnan(value(found, "axm1_llm_runner_reported_decode_tokens_per_second", model="smollm2"))
    assert math.isnan(value(found, "axm1_llm_measured_decode_tokens_per_second", model="smollm2"))
    assert value(found, "axm1_llm_runner_state", model="smollm2", state="stopped") == 1

    model.request_queued()
    model.request_queued()
    model.request_dequeued(None)  # client left while waiting
    model.runner_speed(13.5, None)
    model.runner_speed(None, 12.0)
    model.npu_memory(3252)
    model.write()
    found = samples(path.read_text())
    assert value(found, "axm1_llm_requests_waiting", model="smollm2") == 1
    assert value(found, "axm1_llm_request_queue_time_seconds_count", model="smollm2") == 0
    assert value(found, "axm1_llm_runner_reported_decode_tokens_per_second", model="smollm2") == 13.5
    assert value(found, "axm1_llm_measured_decode_tokens_per_second", model="smollm2") == 12.0
    assert value(found, "axm1_llm_npu_memory_bytes", model="smollm2") == 3252 * 1024 * 1024

    model.npu_memory(None)
    model.npu_memory(None)
    model.write()
    assert not [key for key in samples(path.read_text()) if key[0] == "axm1_llm_npu_memory_bytes"]
    assert_promtool_clean(path.read_bytes(), "a file with an empty family")


def test_writes_replace_the_file_by_rename(tmp_path: Path) -> None:
    hub = MetricsHub(tmp_path, VERSION)
    model = hub.model("smollm2")
    path = tmp_path / metrics_file_name("smollm2")
    before = path.stat().st_ino
    model.set_state("starting")
    assert path.stat().st_ino != before, "rewritten in place: a scrape could read half a file"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_files_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    hub = MetricsHub(None, VERSION)
    drive(hub)
    hub.write_all()
    hub.remove_model("smollm2")
    assert list(tmp_path.iterdir()) == []
    assert b'axm1_llm_generation_tokens_total{model="qwen3:1.7b"}' in hub.render()[0]


def test_stale_files_of_an_earlier_run_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / metrics_file_name("gone")
    interrupted = tmp_path / (metrics_file_name("gone") + ".4242.1")
    foreign = tmp_path / "other-exporter.prom"
    for path in (stale, interrupted, foreign):
        path.write_text("x 1\n")
    MetricsHub(tmp_path, VERSION)
    assert sorted(p.name for p in tmp_path.iterdir()) == [foreign.name]


def test_failed_writes_do_not_reach_the_request(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "metrics"
    hub = MetricsHub(folder, VERSION)
    model = hub.model("smollm2")
    (folder / metrics_file_name("smollm2")).unlink()
    folder.rmdir()
    with caplog.at_level(logging.INFO, logger="llm_service.metrics"):
        serve(model, "stop", 3, 4)
        serve(model, "stop", 3, 4)
        assert [r.levelno for r in caplog.records] == [logging.WARNING], "one warning per failing spell"
        folder.mkdir()
        model.write()
    assert (folder / metrics_file_name("smollm2")).exists()
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]


def test_scheduled_file_writes_run_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write takes milliseconds (more on an SD card): it must not stall the requests the loop serves."""
    import asyncio
    import threading

    import prometheus_client

    writers: list[threading.Thread] = []
    write = prometheus_client.write_to_textfile

    def spied(path: str, registry) -> None:
        writers.append(threading.current_thread())
        write(path, registry)

    monkeypatch.setattr(prometheus_client, "write_to_textfile", spied)
    hub = MetricsHub(tmp_path, VERSION)
    model = hub.model("m")
    writers.clear()  # the first file is written when the model appears, before any loop runs

    async def events() -> None:
        model.set_state("starting")
        model.set_state("initializing")
        await asyncio.sleep(WRITE_DELAY_S + 0.5)

    asyncio.run(events())
    assert len(writers) == 1, "the burst of events was not one write"
    assert threading.main_thread() not in writers
    assert 'axm1_llm_runner_state{model="m",state="initializing"} 1.0' in (tmp_path / metrics_file_name("m")).read_text()


def test_every_restart_reason_exists_from_zero(tmp_path: Path) -> None:
    """The reasons the engines restart for are RESTART_REASONS, and each has its series at 0 in a
    new model's file: increase() sees a first crash, and the alert rules see every reason."""
    import re

    from llm_service.metrics import RESTART_REASONS

    engines = Path(__file__).resolve().parent.parent / "llm_service" / "engines"
    used: set[str] = set()
    for source in engines.rglob("*.py"):
        text = source.read_text()
        for call in re.findall(r"\.restarted\(([^()]*)\)", text):
            used.update(re.findall(r'"(\w+)"', call))
        # _runner_failed(reason, error type, metric reason): the last argument.
        used.update(re.findall(r'_runner_failed\([^;]*?,\s*"(\w+)"\s*,?\s*\)', text))
    assert used == set(RESTART_REASONS)

    hub = MetricsHub(tmp_path, VERSION)
    hub.model("m")
    found = samples((tmp_path / metrics_file_name("m")).read_text())
    restarts = {dict(labels)["reason"]: v for (name, labels), v in found.items() if name == "axm1_llm_runner_restarts_total"}
    assert restarts == dict.fromkeys(RESTART_REASONS, 0.0)
