"""Test options and fixtures; the helpers tests share with the benchmarks are in `harness/`.
Real processes on loopback ports, never mocks."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from emulator_support import Runner

from harness.paths import BIN

# Runners started by tests find `ax-emulator` next to this interpreter, as the daemon arranges.
os.environ["PATH"] = str(BIN) + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture(scope="session")
def postgres_cluster():
    """A throw-away PostgreSQL server (tests/postgres_support.py), one per test process; each
    test that uses it makes a database of its own."""
    from postgres_support import PostgresCluster

    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="module")
def emulator_tokenizer():
    """Our tokenizer server on the SmolLM2 tokenizer, for runner emulator tests."""
    from emulator_support import TokenizerServer

    server = TokenizerServer()
    yield server
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One XDG_CACHE_HOME for the session's processes, shared by its xdist workers: the GGUF cache
    (workers/gguf_cache.py) converts SmolLM2 once for every worker, runner and upstream that loads
    it (~20 s of CPU each otherwise), and never touches the user's own cache."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # <session>/popen-gwN -> <session>, common to the session's workers
    cache = shared / "cache"
    cache.mkdir(exist_ok=True)
    os.environ["XDG_CACHE_HOME"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    """SmolLM2 as a plain checkpoint for `transformers serve`, converted once for every worker."""
    from upstream_support import smollm2_checkpoint

    return smollm2_checkpoint()


@pytest.fixture(scope="session")
def hf_upstream(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """`transformers serve` on SmolLM2, started once for the modules of TRANSFORMERS_SERVE_GROUP
    (each load of torch and the model costs ~40 s of CPU on a 2-core machine)."""
    from upstream_support import transformers_serve

    server = transformers_serve(checkpoint, tmp_path_factory.mktemp("hf-upstream")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random LoRA adapter for SmolLM2, made in a subprocess: the random base model it
    builds (~0.5 GB) stays out of the test process."""
    import subprocess
    import sys

    from harness.paths import REPO_ROOT
    from upstream_support import OFFLINE

    out = tmp_path_factory.mktemp("lora") / "tuned"
    made = subprocess.run(
        [sys.executable, "-m", "workers.lora", "--model", "smollm2", "--out", str(out), "--seed", "0"],
        cwd=REPO_ROOT, env={**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    return out


@pytest.fixture
def runners():
    """Start emulator runners (`Runner(...)`) for a test; all closed after it."""
    started: list[Runner] = []

    def start(*args, **kwargs) -> Runner:
        runner = Runner(*args, **kwargs)
        started.append(runner)
        return runner

    yield start
    for runner in started:
        runner.close()


@pytest.fixture
def client(daemon):
    """The official `ollama` client on the module's `daemon` (a module may define its own)."""
    import ollama

    return ollama.Client(host=daemon.url, timeout=120)


@pytest.fixture
def oai(daemon):
    """The official `openai` client on the module's `daemon`'s /v1."""
    import openai

    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run the long reliability soak tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=start_order)  # stable: the rest keep their order
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak run: pass --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def anyio_backend() -> str:
    """The event loop of `@pytest.mark.anyio` tests: asyncio, as the daemon's."""
    return "asyncio"


# ---- parallel runs (pytest-xdist, as ./run test runs the suite) ---------------------------------
#
# A module listed here runs whole on one worker: its tests share module-scoped fixtures (a daemon,
# an upstream, a tokenizer server) that start once, as in a serial run. Every other test goes on
# its own to whichever worker is free (a module fixture it uses then starts once per worker).
SHARED_FIXTURE_MODULES = {
    "tests/test_api_fuzz.py",  # the fuzzed daemon and its schema
    "tests/test_async_jobs.py",  # the daemon whose async jobs the tests submit
    "tests/test_apps_api.py",  # the daemon with coder, stock and upstream models
    "tests/test_batches_api.py",  # the daemon with the batch models
    "tests/test_cli.py",  # the status server
    "tests/test_daemon_api.py",  # the daemon with every dialect's model
    "tests/test_emulator.py",  # emulator_tokenizer
    "tests/test_events.py",  # the daemon whose events the tests read, in order
    "tests/test_http_engine.py",  # `transformers serve` (hf_upstream), with test_openai_api
    "tests/test_managed_upstreams.py",  # the daemon and its managed fake upstreams
    "tests/test_managed_workers.py",  # the daemon and the workers it launches
    "tests/test_monitoring.py",  # the daemon, node_exporter and Prometheus the live checks query
    "tests/test_workers.py",  # the SmolLM2 and MiniLM workers
    "tests/test_openai_api.py",  # hf_upstream, the fake upstream and their daemon
    "tests/test_security.py",  # the secured app
    "tests/test_services_api.py",  # the daemon with its services folder and echo models
    "tests/test_serverless_api.py",  # the daemon with the serverless models
    "tests/test_structured_output.py",  # the daemon with card models and the fake upstream
    "tests/test_tokenizer_server.py",  # the tokenizer servers
    "tests/test_ui.py",  # the daemon and the browser
    "tests/test_tokenizer_fidelity.py",  # stock-shaped scripts and our server side by side
    "tests/test_published_folders.py",  # the daemon with folders shaped like published ones
    "tests/test_vision_api.py",  # the daemon with vision-language and text card models
}
# Modules that share one session fixture go on the same worker as one unit, so that it starts once.
SHARED_UNITS = {
    "tests/test_http_engine.py": "hf_upstream",
    "tests/test_openai_api.py": "hf_upstream",
}
# The longest work goes out first, so that it does not start last and hold up the end of the run.
# Only the order of dispatch: what is missing here starts in collection order after these.
START_FIRST = (
    "tests/test_chaos.py::test_chaos_200_requests_under_faults",
    "tests/test_fleet_router.py::test_requests_spread_fail_over_and_come_back",
    "tests/test_http_engine.py",
    "tests/test_openai_api.py",
    "tests/test_managed_workers.py",
    "tests/test_workers.py",
    "tests/test_api_fuzz.py",
    "tests/test_emulator_smollm2.py",
    "tests/test_services_smollm2.py",
    "tests/test_tokenizer_server.py",
    "tests/test_fleet_jobs.py",
    "tests/test_batches_restart.py",
    "tests/test_batches_api.py",
)


def start_order(item: pytest.Item) -> int:
    for rank, prefix in enumerate(START_FIRST):
        if item.nodeid == prefix or item.nodeid.startswith(prefix + "::"):
            return rank
    return len(START_FIRST)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, known only where it is installed
def pytest_xdist_make_scheduler(config: pytest.Config, log):  # noqa: ANN001, ANN201 (xdist's types)
    """`-n N` (dist "load"): tests one by one, but a SHARED_FIXTURE_MODULES module as one unit.
    (`--dist loadgroup` would do this with marks, but it cannot mark a test's node id under
    pytest >= 9.2, so every test would go alone.)"""
    if config.getvalue("dist") != "load":
        return None  # another --dist: xdist's own scheduler
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            if module in SHARED_UNITS:
                return SHARED_UNITS[module]
            return module if module in SHARED_FIXTURE_MODULES else nodeid

    config.option.loadscopereorder = False  # keep the collection's order: START_FIRST first
    return SharedFixtureScheduling(config, log)
