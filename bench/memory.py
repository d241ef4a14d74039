"""The host's memory for tokenization: the daemon plus the tokenizer servers of its loaded models.

`python -m bench --only memory` (about a minute): for 1, 2 and 4 demo-shaped models (the scripted
emulator; each folder's tokenizer script a launcher of our server on the SmolLM2 tokenizer), the
real daemon loads them all and answers one chat on each; then `VmRSS` (and `Pss`, which shares
the pages several processes map between them) of the daemon and of each tokenizer server it
started, found among the daemon's children by their script's name. The runners (emulators)
stand in for the card's programs and are not counted. Run once per tokenizer engine setting
(`auto`: our servers on tokenizers + Jinja2; `transformers`), each with a fresh daemon.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from bench.figures import fmt, render_table
from bench.harness import BENCH_DAEMON, timed_request
from harness.daemon import running_daemon
from harness.models import scripted_model
from harness import net

MODEL_COUNTS = (1, 2, 4)
ENGINE_SETTINGS = ("auto", "transformers")
SETTLE_SECONDS = 2.0


def status_kb(pid: int, key: str, file: str = "status") -> int:
    for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(entry.name))
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def process_memory(pid: int) -> dict[str, float]:
    return {"rss_mb": status_kb(pid, "VmRSS") / 1024, "pss_mb": status_kb(pid, "Pss", "smaps_rollup") / 1024}


def measure(root: Path, count: int, engine: str, daemon_env: dict[str, str]) -> dict[str, Any]:
    entries = [scripted_model(root, f"mem-{index}", reply_words=4, tokens_per_second=1000) for index in range(count)]
    env = {**daemon_env, "AXM1_TOKENIZER_SERVICE_ENGINE": engine}
    with running_daemon(root, entries, extra_env=env, **BENCH_DAEMON) as daemon:
        for entry in entries:
            timed_request(daemon.port, "/api/generate", {"model": entry["model_name"]})  # load
            daemon.wait_state(entry["model_name"], ("ready",), 120)
        with daemon.client(timeout=60) as http:
            for entry in entries:
                reply = http.post("/api/chat", json={"model": entry["model_name"], "stream": False, "messages": [
                    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]})
                assert reply.status_code == 200, reply.text
        time.sleep(SETTLE_SECONDS)
        pid = daemon.process.pid
        scripts = {entry["tokenizer_py"]: entry for entry in entries}
        servers = {}
        for child in children(pid):
            line = command_line(child)
            script = next((name for name in scripts if name in line), None)
            if script is not None:
                port = scripts[script]["tokenizer_port"]
                capabilities = net.get(f"http://127.0.0.1:{port}/capabilities", timeout=5.0).json()
                servers[script] = {**process_memory(child), "engine": capabilities.get("engine", "transformers")}
        assert len(servers) == count, f"found {len(servers)} tokenizer servers of {count}"
        daemon_memory = process_memory(pid)
    total = {key: daemon_memory[key] + sum(s[key] for s in servers.values()) for key in ("rss_mb", "pss_mb")}
    return {"models": count, "setting": engine, "daemon": daemon_memory, "tokenizer_servers": servers,
            "engines": sorted({s["engine"] for s in servers.values()}),
            "tokenizer_server_rss_mb": [s["rss_mb"] for s in servers.values()], "total": total}


def memory_bench(root: Path, daemon_env: dict[str, str]) -> list[dict[str, Any]]:
    runs = []
    for engine in ENGINE_SETTINGS:
        for count in MODEL_COUNTS:
            print(f"memory: {count} model(s), tokenizer engine {engine} ...", file=sys.stderr, flush=True)
            runs.append(measure(root / f"{engine}-{count}", count, engine, daemon_env))
    return runs


def memory_table(runs: list[dict[str, Any]]) -> str:
    rows = [("setting (engines)", "models", "daemon RSS MB", "tokenizer server RSS MB each", "total RSS MB",
             "total PSS MB", "goal")]
    for run in runs:
        each = " / ".join(fmt(value, 1) for value in run["tokenizer_server_rss_mb"])
        goal = "< 150 in all" if run["models"] == 2 else ""
        rows.append((f"{run['setting']} ({', '.join(run['engines'])})", str(run["models"]), fmt(run["daemon"]["rss_mb"], 1),
                     each, fmt(run["total"]["rss_mb"], 1), fmt(run["total"]["pss_mb"], 1), goal))
    return "host memory: the daemon and its tokenizer servers\n" + render_table(rows)
