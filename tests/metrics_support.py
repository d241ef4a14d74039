"""Real Prometheus tools for tests: `promtool check metrics`, a node_exporter and a Prometheus
server on loopback.

Import from any test module (the tests folder is on `sys.path` under pytest):

    from metrics_support import assert_promtool_clean, node_exporter, running_node_exporter, samples

- `assert_promtool_clean(exposition, what)` fails the test when promtool prints anything.
- `node_exporter` is a fixture: a node_exporter with only the textfile collector, reading
  `node_exporter.textfile_dir` (a fresh folder); point the daemon's metrics folder there.
- `running_node_exporter(folder)` is the same as a context manager, for a folder of your own.
- `running_prometheus(config, folder)` is a Prometheus server on a free loopback port with the
  configuration `config` (a dict, written as YAML), its storage in `folder`; `Prometheus.query`
  runs PromQL through its HTTP API.
- `samples(text)` parses an exposition into `{(name, frozenset(labels.items())): value}`.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from harness import net
from harness.net import free_port, wait_http

PROMTOOL = "promtool"
NODE_EXPORTER = "prometheus-node-exporter"  # Debian's name for node_exporter
PROMETHEUS = "prometheus"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (./run test installs it)")
    return path


def promtool_problems(exposition: bytes) -> str:
    """Everything `promtool check metrics` says about an exposition; empty means clean."""
    result = subprocess.run([_require(PROMTOOL), "check", "metrics"], input=exposition,
                            capture_output=True, timeout=30)
    output = (result.stdout + result.stderr).decode(errors="replace").strip()
    if result.returncode != 0 and not output:
        output = f"promtool exited with status {result.returncode}"
    return output


def assert_promtool_clean(exposition: bytes, what: str) -> None:
    """Fails unless promtool has nothing to say: its lint warnings count as failures too."""
    problems = promtool_problems(exposition)
    assert problems == "", f"promtool check metrics on {what}:\n{problems}"


def samples(text: str) -> Samples:
    """An exposition as `{(sample name, frozenset of label pairs): value}`."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@dataclass
class NodeExporter:
    textfile_dir: Path
    url: str  # the metrics URL
    process: subprocess.Popen[bytes]
    log_path: Path

    def scrape(self) -> str:
        response = net.get(self.url, timeout=10.0)
        response.raise_for_status()
        return response.text

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_node_exporter(textfile_dir: Path) -> Iterator[NodeExporter]:
    """node_exporter on a free loopback port with only the textfile collector (starts fast)."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="node-exporter-") as scratch:
        log_path = Path(scratch) / "node_exporter.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [_require(NODE_EXPORTER), "--collector.disable-defaults", "--collector.textfile",
                 f"--collector.textfile.directory={textfile_dir}",
                 "--web.disable-exporter-metrics", f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log_file, stderr=subprocess.STDOUT)
        exporter = NodeExporter(textfile_dir, f"http://127.0.0.1:{port}/metrics", process, log_path)
        try:
            wait_http(exporter.url, START_TIMEOUT, process=process, output=exporter.log, ok_only=True)
            yield exporter
        finally:
            _stop(process)


@pytest.fixture
def node_exporter(tmp_path: Path) -> Iterator[NodeExporter]:
    """A node_exporter reading the fresh folder `node_exporter.textfile_dir`."""
    textfile_dir = tmp_path / "textfiles"
    textfile_dir.mkdir()
    with running_node_exporter(textfile_dir) as exporter:
        yield exporter


class PrometheusQueryError(AssertionError):
    pass


@dataclass
class Prometheus:
    url: str  # the server's base URL
    process: subprocess.Popen[bytes]
    log_path: Path

    def api(self, path: str, **params: Any) -> Any:
        """`data` of a GET on /api/v1/<path>; fails unless the answer's status is success."""
        response = net.get(f"{self.url}/api/v1/{path}", params=params, timeout=10.0)
        body = response.json()
        if body.get("status") != "success":
            raise PrometheusQueryError(f"/api/v1/{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; the samples of its vector (a scalar comes as one sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        if data["resultType"] != "vector":
            raise PrometheusQueryError(f"{expr}: a {data['resultType']}, not a vector")
        return data["result"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_prometheus(config: dict[str, Any], folder: Path) -> Iterator[Prometheus]:
    """A Prometheus server on a free loopback port with `config`, its storage and log in `folder`;
    stopped (SIGTERM, then SIGKILL) on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log_path = folder / "prometheus.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [_require(PROMETHEUS), f"--config.file={config_path}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=folder)
    server = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_http(f"{server.url}/-/ready", START_TIMEOUT * 2, process=process, output=server.log, ok_only=True)
        yield server
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT."""
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)


def metric(daemon, name: str, **labels: str) -> float:
    """One sample of the daemon's /metrics: the series `name` with exactly these labels (0 if none)."""
    with daemon.client() as http:
        text = http.get("/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            found = ",".join(sorted(line[len(name) + 1:line.index("}")].split(",")))
            if found == wanted:
                return float(line.rsplit(" ", 1)[1])
    return 0.0
