"""deploy/prometheus and deploy/grafana against the real tools: the alert rules pass
`promtool check rules` and their unit tests (which fail when an expected alert does not fire, or
when planned restarts page); then a real Prometheus scrapes node_exporter's textfile collector
and the daemon's /metrics while the daemon serves real requests, loads the rules, and answers
every PromQL expression of the Grafana dashboard with data."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import net
from harness.daemon import Daemon, running_daemon
from harness.models import scripted_model, shell_runner_model
from harness.net import wait_until
from harness.paths import REPO_ROOT
from llm_service.metrics import RESTART_REASONS, metrics_file_name
from metrics_support import NodeExporter, Prometheus, running_node_exporter, running_prometheus

PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "axm1-llm.rules.yml"
RULES_TEST = PROMETHEUS_DIR / "axm1-llm.rules.test.yml"
PROMETHEUS_EXAMPLE = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "axm1-llm.json"
DAEMON_JOB = "axm1-llm"  # the job name the rules and the dashboard expect for /metrics
MODELS = ("alpha", "beta:1.5b")  # a tag with a dot: the $model regex must escape it
RATE_INTERVAL = "5m"  # for $__rate_interval: every request of the test is in the last 5 minutes
WAIT_S = 60.0
HEARTBEAT_S = 1.0  # the daemon's metrics_heartbeat_s here (60 s by default)

# The job row of the dashboard: the daemon writes these from its start (issue 15), at 0 without
# batches, so their expressions are checked like the others.
JOB_METRICS = (
    "axm1_llm_job_items_total",
    "axm1_llm_job_items_pending",
    "axm1_llm_job_oldest_pending_age_seconds",
)


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed (./run test installs it)")
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


# ---- 1. the rules alone: promtool ------------------------------------------------------------


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", RULES.name, cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout, result.stdout


def test_every_alert_has_a_severity_a_summary_and_a_description() -> None:
    alerts = alert_rules()
    assert len(alerts) >= 10
    assert len({a["alert"] for a in alerts}) == len(alerts)
    for alert in alerts:
        assert alert.get("labels", {}).get("severity") in ("critical", "warning"), alert["alert"]
        assert {"summary", "description"} <= set(alert.get("annotations", {})), alert["alert"]


def test_rules_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULES_TEST.name, cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_must_fire_in_the_unit_tests() -> None:
    """Each alert is expected firing at least once, so none is tested only for staying quiet."""
    expected = RULES_TEST.read_text()
    for alert in alert_rules():
        assert f'alertname="{alert["alert"]}"' in expected or f"alertname: {alert['alert']}" in expected, alert["alert"]


def _run_unit_tests_on(rules_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    (tmp_path / RULES.name).write_text(rules_text)
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    return promtool("test", "rules", RULES_TEST.name, cwd=tmp_path)


def test_unit_tests_fail_when_planned_restarts_would_page(tmp_path: Path) -> None:
    """The unit tests can fail: with the fresh_context exclusion removed, the planned restarts
    of the model without reset page, and promtool says so."""
    original = RULES.read_text()
    broken = original.replace('{reason!="fresh_context"}', "")
    assert broken != original
    result = _run_unit_tests_on(broken, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert re.search(r'got: .*alertname="Axm1LlmRunnerRestarting", alertstate="firing", model="no-reset"', output), output


def test_unit_tests_fail_when_an_expected_alert_does_not_fire(tmp_path: Path) -> None:
    original = RULES.read_text()
    broken = original.replace("model:axm1_llm_runner_not_ready:max == 1", "model:axm1_llm_runner_not_ready:max == 2")
    assert broken != original
    result = _run_unit_tests_on(broken, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert re.search(r'exp: .*alertname="Axm1LlmModelNotReady"', output), output


def test_example_prometheus_config_is_valid(tmp_path: Path) -> None:
    shutil.copy(PROMETHEUS_EXAMPLE, tmp_path / "prometheus.yml")
    shutil.copy(RULES, tmp_path / RULES.name)
    result = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"] for job in yaml.safe_load(PROMETHEUS_EXAMPLE.read_text())["scrape_configs"]}
    assert DAEMON_JOB in jobs


# ---- 2. the dashboard's model --------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expression) of every query of the dashboard."""
    return [(panel["title"], target["expr"]) for panel in dashboard()["panels"] for target in panel.get("targets", [])]


def test_dashboard_has_its_variables_and_queries() -> None:
    model = dashboard()
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["query"]["query"] == "label_values(axm1_llm_runner_state, model)"
    ids = [panel["id"] for panel in model["panels"]]
    assert len(ids) == len(set(ids))
    for panel in model["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    # Panels tile the 24-column grid without overlapping.
    cells: dict[tuple[int, int], str] = {}
    for panel in model["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f'{panel["title"]} overlaps {cells[(x, y)]}'
                cells[(x, y)] = panel["title"]
    exprs = [expr for _, expr in dashboard_targets()]
    assert len(exprs) >= 25
    for metric in JOB_METRICS:  # the job row is there
        assert any(metric in expr for expr in exprs), metric


def regex_literal(name: str) -> str:
    """`name` as a regex inside a PromQL string, as Grafana escapes a multi-value variable."""
    return re.sub(r"([\\.*+?^$()\[\]{}|])", r"\\\\\1", name)


def substitute(expr: str, models: tuple[str, ...]) -> str:
    """The expression as Grafana sends it: $model a regex of the models, $__rate_interval a window."""
    done = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$model", "|".join(map(regex_literal, models)))
    assert "$" not in done, f"a variable left in {done}"
    return done


# ---- 3. a real Prometheus on a real daemon -------------------------------------------------


@dataclass
class Stack:
    daemon: Daemon
    exporter: NodeExporter
    prometheus: Prometheus


def stream_generate(daemon: Daemon, model: str, prompt: str) -> dict[str, Any]:
    """One streaming /api/generate; the last NDJSON object."""
    last: dict[str, Any] = {}
    with net.client(base_url=daemon.url, timeout=60) as http, http.stream(
        "POST", "/api/generate", json={"model": model, "prompt": prompt}
    ) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if line:
                last = json.loads(line)
    return last


def targets_up(prometheus: Prometheus) -> dict[str, str]:
    return {t["labels"]["job"]: t["health"] for t in prometheus.api("targets")["activeTargets"]}


def scraped_value(prometheus: Prometheus, expr: str) -> dict[str, float]:
    return {sample["metric"].get("job", ""): float(sample["value"][1]) for sample in prometheus.query(expr)}


def prometheus_config(daemon: Daemon, exporter: NodeExporter) -> dict[str, Any]:
    """Scrapes of both sources every second, as prometheus.yml here names them, and the rules."""
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "node", "static_configs": [{"targets": [exporter.url.split("/")[2]]}]},
            {"job_name": DAEMON_JOB, "static_configs": [{"targets": [daemon.url.split("/")[2]]}]},
        ],
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("monitoring")
    entries = [scripted_model(root, name, reply_words=12, tokens_per_second=80, fields={"npu_memory_mb": 512})
               for name in MODELS]
    flags = ("--metrics-heartbeat-s", str(HEARTBEAT_S))
    with running_daemon(root, entries, *flags) as daemon, running_node_exporter(daemon.metrics_dir) as exporter:
        with running_prometheus(prometheus_config(daemon, exporter), root / "prometheus") as prometheus:
            stack = Stack(daemon, exporter, prometheus)
            wait_until(lambda: targets_up(prometheus) == {"node": "up", DAEMON_JOB: "up"}, WAIT_S,
                       "both targets up")
            time.sleep(3)  # a few samples before the requests, so that rate() sees them as a rise
            for i in range(3):
                for model in MODELS:
                    answer = stream_generate(daemon, model, f"{model} request {i} " + "word " * i)
                    assert answer.get("done") and answer["eval_count"] > 0, answer
            # One crash and its restart: the restart panels show a real one.
            daemon.set_faults(crash_after_tokens=1)
            try:
                with net.client(base_url=daemon.url, timeout=60) as http:
                    http.post("/api/generate", json={"model": "alpha", "prompt": "crash-marker", "stream": False})
            finally:
                daemon.set_faults()
            daemon.wait_state("alpha", "ready", timeout=WAIT_S)
            assert stream_generate(daemon, "alpha", "alpha after the crash").get("done")
            # Both sources scraped after the last request: 3 per model and 1 after the crash.
            finished = 3.0 * len(MODELS) + 1
            wait_until(lambda: scraped_value(prometheus, 'sum by (job) (axm1_llm_requests_finished_total{finished_reason="stop"})')
                       == {"node": finished, DAEMON_JOB: finished}, WAIT_S, "the last requests scraped from both sources")
            yield stack


def test_both_targets_are_scraped(stack: Stack) -> None:
    assert targets_up(stack.prometheus) == {"node": "up", DAEMON_JOB: "up"}
    # The model metrics come from both: the file through node_exporter, and /metrics.
    jobs = {s["metric"]["job"] for s in stack.prometheus.query('axm1_llm_runner_state{state="ready"} == 1')}
    assert jobs == {"node", DAEMON_JOB}


def test_the_model_variable_lists_the_models(stack: Stack) -> None:
    values = stack.prometheus.api("label/model/values", **{"match[]": "axm1_llm_runner_state"})
    assert set(values) == set(MODELS)


def test_every_dashboard_expression_returns_data(stack: Stack) -> None:
    checked = 0
    empty: list[str] = []
    for title, expr in dashboard_targets():
        query = substitute(expr, MODELS)
        result = stack.prometheus.query(query)  # fails on a syntax error, job metrics included
        # The check can fail: the same query for a model the daemon does not serve has no data.
        if "$model" in expr:
            assert stack.prometheus.query(substitute(expr, ("no-such-model",))) == [], query
        values = [float(sample["value"][1]) for sample in result]
        if not any(math.isfinite(v) for v in values):
            empty.append(f"{title}: {query} -> {result}")
        checked += 1
    assert not empty, "expressions without a finite value:\n" + "\n".join(empty)
    assert checked >= 25


def test_model_series_agree_between_the_two_sources(stack: Stack) -> None:
    """The dashboard and the rules merge the sources with max: they must hold the same numbers."""
    for expr in ('axm1_llm_generation_tokens_total', 'axm1_llm_runner_restarts_total{reason="crash"}'):
        by_job: dict[str, dict[str, float]] = {}
        for sample in stack.prometheus.query(expr):
            by_job.setdefault(sample["metric"]["job"], {})[sample["metric"]["model"]] = float(sample["value"][1])
        assert by_job["node"] == by_job[DAEMON_JOB], expr
    crashes = {s["metric"]["model"]: float(s["value"][1])
               for s in stack.prometheus.query(f'axm1_llm_runner_restarts_total{{job="{DAEMON_JOB}",reason="crash"}}')}
    assert crashes == {"alpha": 1.0, MODELS[1]: 0.0}


def test_rules_are_loaded_healthy_and_quiet(stack: Stack) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        groups = stack.prometheus.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if rules and all(not rule["lastEvaluation"].startswith("0001-") for rule in rules):
            return groups
        return None

    groups = wait_until(evaluated, WAIT_S, "every rule evaluated")
    assert {g["name"] for g in groups} == {"axm1-llm.recording", "axm1-llm.alerts"}
    expected = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == len(expected)
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
    # The recording rules work on the real series: a p95 for each model.
    p95 = {s["metric"]["model"]: float(s["value"][1])
           for s in stack.prometheus.query("model:axm1_llm_time_to_first_token_seconds:p95_5m")}
    assert set(p95) == set(MODELS) and all(0 < v < 20 for v in p95.values()), p95
    # A serving daemon with one crash pages nothing.
    assert stack.prometheus.query('ALERTS{alertstate="firing"}') == []
    assert "level=error" not in stack.prometheus.log(), stack.prometheus.log()[-3000:]


def test_idle_files_are_rewritten_and_their_age_stays_low(stack: Stack) -> None:
    """No request, no state change: the heartbeat still rewrites every model's file, so the file
    age that Axm1LlmMetricsStale watches tells an idle daemon from a dead one."""
    files = {model: stack.daemon.metrics_dir / metrics_file_name(model) for model in MODELS}
    before = {model: path.stat().st_mtime_ns for model, path in files.items()}
    finished = scraped_value(stack.prometheus, 'sum by (job) (axm1_llm_requests_finished_total)')
    wait_until(lambda: all(path.stat().st_mtime_ns > before[model] for model, path in files.items()),
               HEARTBEAT_S * 5, "every file rewritten while idle")
    assert scraped_value(stack.prometheus, 'sum by (job) (axm1_llm_requests_finished_total)') == finished  # idle indeed
    ages = {s["metric"]["file"]: float(s["value"][1]) for s in stack.prometheus.query(
        'time() - node_textfile_mtime_seconds{file=~"(.*/)?axm1-llm-.+-metrics\\\\.prom"}')}
    assert set(ages) == {str(path) for path in files.values()}
    assert all(age < HEARTBEAT_S * 5 for age in ages.values()), ages


def test_readme_and_rules_name_the_restart_reasons_and_the_files() -> None:
    """The planned/fault split the rules make is the daemon's: every other restart reason is
    named a fault in the alert and the README, and the README points to the deploy files."""
    faults = [reason for reason in RESTART_REASONS if reason != "fresh_context"]
    [restarting] = [a for a in alert_rules() if a["alert"] == "Axm1LlmRunnerRestarting"]
    assert '{reason!="fresh_context"}' in restarting["expr"]
    readme = (REPO_ROOT / "README.md").read_text()
    monitoring = readme.split("## Monitoring\n", 1)[1].split("\n## ", 1)[0]
    for reason in faults:
        assert reason in restarting["annotations"]["description"], reason
        assert f"`{reason}`" in monitoring, reason
    for path in (RULES, RULES_TEST, PROMETHEUS_EXAMPLE, DASHBOARD):
        assert path.name in monitoring, path
    assert "groups:" not in monitoring  # the rules live in deploy/prometheus, not inline


def test_real_crashes_page_and_planned_restarts_do_not(tmp_path: Path) -> None:
    """End to end on the daemon's real counters: a runner crashing 5 times fires
    Axm1LlmRunnerRestarting at once (no `for`); a runner without reset, restarted more often
    for fresh contexts, does not."""
    entries = [scripted_model(tmp_path, "crashy", reply_words=6), shell_runner_model(tmp_path, "no-reset")]
    with running_daemon(tmp_path, entries) as daemon, running_node_exporter(daemon.metrics_dir) as exporter, \
            running_prometheus(prometheus_config(daemon, exporter), tmp_path / "prometheus") as prometheus:
        wait_until(lambda: targets_up(prometheus) == {"node": "up", DAEMON_JOB: "up"}, WAIT_S, "both targets up")
        time.sleep(2)  # samples at 0 first
        with daemon.client() as http:
            for i in range(7):  # each independent request after the first: a fresh_context restart
                reply = http.post("/api/generate", json={"model": "no-reset", "prompt": f"one-shot {i}", "stream": False})
                assert reply.json()["response"] == f"You said: one-shot {i}"
            daemon.set_faults(crash_after_tokens=1)
            try:
                for i in range(5):
                    daemon.wait_state("crashy", ("ready", "stopped"), timeout=WAIT_S)
                    reply = http.post("/api/generate", json={"model": "crashy", "prompt": f"crash {i}", "stream": False})
                    assert reply.status_code >= 500, reply.text
            finally:
                daemon.set_faults()

        def restarts(reason: str) -> dict[str, float]:
            return {s["metric"]["model"]: float(s["value"][1]) for s in prometheus.query(
                f'max by (model) (axm1_llm_runner_restarts_total{{reason="{reason}"}})')}

        wait_until(lambda: restarts("crash").get("crashy") == 5 and restarts("fresh_context").get("no-reset") == 6,
                   WAIT_S, "the restarts scraped")

        def firing() -> dict[str, set[str]]:
            found: dict[str, set[str]] = {}
            for sample in prometheus.query('ALERTS{alertstate="firing"}'):
                found.setdefault(sample["metric"]["alertname"], set()).add(sample["metric"].get("model", ""))
            return found

        wait_until(lambda: "Axm1LlmRunnerRestarting" in firing(), WAIT_S, "the restart alert firing")
        time.sleep(3)  # a few more evaluations: the planned restarts still do not page
        assert firing() == {"Axm1LlmRunnerRestarting": {"crashy"}}
        planned = prometheus.query('sum without (reason) (model_reason:axm1_llm_runner_restarts:increase15m{model="no-reset"})')
        assert planned and float(planned[0]["value"][1]) > 3  # above the threshold, yet quiet
