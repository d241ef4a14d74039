"""Real Prometheus tools for tests: `promtool check metrics` and a node_exporter on loopback.

Import from any test module (the tests folder is on `sys.path` under pytest):

    from metrics_support import assert_promtool_clean, node_exporter, running_node_exporter, samples

- `assert_promtool_clean(exposition, what)` fails the test when promtool prints anything.
- `node_exporter` is a fixture: a node_exporter with only the textfile collector, reading
  `node_exporter.textfile_dir` (a fresh folder); point the daemon's metrics folder there.
- `running_node_exporter(folder)` is the same as a context manager, for a folder of your own.
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

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import net
from harness.net import free_port, wait_http

PROMTOOL = "promtool"
NODE_EXPORTER = "prometheus-node-exporter"  # Debian's name for node_exporter
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
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)


@pytest.fixture
def node_exporter(tmp_path: Path) -> Iterator[NodeExporter]:
    """A node_exporter reading the fresh folder `node_exporter.textfile_dir`."""
    textfile_dir = tmp_path / "textfiles"
    textfile_dir.mkdir()
    with running_node_exporter(textfile_dir) as exporter:
        yield exporter
