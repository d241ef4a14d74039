"""How long the demo's SmolLM2 takes to load on the virtual card, by the state of the GGUF cache.

`python -m bench --only load` (about a minute): the real daemon on a copy of the demo's
`smollm2-135m` folder (run_on_startup), timed from the daemon's start to the model's `ready`, and
the CPU of the runner (the emulator's transformers engine) at that moment, from
`/proc/<pid>/stat`. Three runs, each with a fresh daemon:

- `GGUF itself`: XDG_CACHE_HOME points under a file, so the cache cannot be written and the
  runner loads the GGUF through transformers (what every start did before workers/gguf_cache.py);
- `first start`: an empty cache, so the runner converts the GGUF into it;
- `later start`: the same cache, so the runner loads the dense copy.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from bench.figures import fmt, render_table
from bench.harness import BENCH_DAEMON, cpu_seconds
from harness.daemon import running_daemon

CASES = ("GGUF itself", "first start", "later start")


def _runner_cpu_s() -> float | None:
    """The CPU of the emulator running the real model (the one such process: each run has one
    daemon, and the bench runs nothing else)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            if b"--emu_engine" in command and b"transformers" in command:
                return cpu_seconds(int(entry.name))
        except OSError:
            continue
    return None


def load_bench(root: Path, daemon_env: dict[str, str] | None = None) -> dict[str, Any]:
    from bench.run import real_model_entry  # run.py imports this module

    blocker = root / "not-a-folder"
    root.mkdir(parents=True, exist_ok=True)
    blocker.write_text("the cache cannot go under a file")
    caches = {"GGUF itself": blocker / "cache", "first start": root / "cache", "later start": root / "cache"}
    results: dict[str, Any] = {}
    for index, case in enumerate(CASES):
        print(f"model load: {case} ...", file=sys.stderr, flush=True)
        run_root = root / f"run{index}"
        entry = real_model_entry(run_root)
        env = {**(daemon_env or {}), "XDG_CACHE_HOME": str(caches[case])}
        started = time.monotonic()
        with running_daemon(run_root, [entry], "--load-stall-timeout-s", "300", extra_env=env, **BENCH_DAEMON) as daemon:
            daemon.wait_state("smollm2-135m", ("ready",), 300)
            ready_s = time.monotonic() - started
            results[case] = {"ready_s": round(ready_s, 2), "runner_cpu_s": _runner_cpu_s()}
    return results


def load_table(results: dict[str, Any]) -> str:
    rows = [("GGUF cache", "ready after s", "runner CPU s")]
    rows += [(case, fmt(results[case]["ready_s"]), fmt(results[case]["runner_cpu_s"])) for case in CASES]
    return "SmolLM2 on the virtual card: daemon start -> ready\n" + render_table(rows)
