"""The host's memory for tokenization: the daemon plus the tokenizer processes of its loaded models.

`python -m bench --only memory` (a few minutes): for 1, 2 and 4 models (the scripted emulator
as runner), the real daemon loads them all and answers one chat on each; then `VmRSS` (and
`Pss`, which shares the pages several processes map between them) of the daemon and of each
tokenizer process it started, found among the daemon's children by their command line. The
runners stand in for the card's programs and are not counted. Two folder layouts:

- `published`: folders shaped like AXERA's (a stock-shaped `*_tokenizer_uid.py` naming its
  `smollm2_tokenizer/`), where our server runs for every model in the one shared host process
  (tokenizer_service.host);
- `own process`: each folder's tokenizer script a launcher of our server, so a process per model
  (what every folder got before the shared host; a folder's own script still does).

Run per tokenizer engine setting (`auto`: tokenizers + Jinja2; `transformers`), each run with a
fresh daemon.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from bench.figures import fmt, render_table
from bench.harness import BENCH_DAEMON, timed_request
from harness.daemon import running_daemon
from harness.models import published_model, scripted_model
from harness import net

MODEL_COUNTS = (1, 2, 4)
ENGINE_SETTINGS = ("auto", "transformers")
LAYOUTS = ("published", "own process")
TOKENIZER_COMMANDS = ("tokenizer_service.host", "_tokenizer.py", "_tokenizer_uid.py")
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


def measure(root: Path, count: int, engine: str, layout: str, daemon_env: dict[str, str]) -> dict[str, Any]:
    if layout == "published":
        entries = [published_model(root, f"mem-{index}", reply_words=4) for index in range(count)]
    else:
        entries = [scripted_model(root, f"mem-{index}", reply_words=4, tokens_per_second=1000) for index in range(count)]
    env = {**daemon_env, "AXM1_TOKENIZER_SERVICE_ENGINE": engine}
    with running_daemon(root, entries, extra_env=env, **BENCH_DAEMON) as daemon:
        for entry in entries:
            timed_request(daemon.port, "/api/generate", {"model": entry["model_name"]})  # load
            daemon.wait_state(entry["model_name"], ("ready",), 120)
        engines = set()
        with daemon.client(timeout=60) as http:
            for entry in entries:
                reply = http.post("/api/chat", json={"model": entry["model_name"], "stream": False, "messages": [
                    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]})
                assert reply.status_code == 200, reply.text
                capabilities = net.get(f"http://127.0.0.1:{entry['tokenizer_port']}/capabilities", timeout=5.0).json()
                engines.add(capabilities.get("engine", "transformers"))
        time.sleep(SETTLE_SECONDS)
        pid = daemon.process.pid
        servers = [process_memory(child) for child in children(pid)
                   if any(word in command_line(child) for word in TOKENIZER_COMMANDS)]
        expected = 1 if layout == "published" else count
        assert len(servers) == expected, f"found {len(servers)} tokenizer processes, not {expected}"
        daemon_memory = process_memory(pid)
    total = {key: daemon_memory[key] + sum(s[key] for s in servers) for key in ("rss_mb", "pss_mb")}
    return {"models": count, "setting": engine, "layout": layout, "daemon": daemon_memory, "engines": sorted(engines),
            "tokenizer_process_rss_mb": [s["rss_mb"] for s in servers], "total": total}


def memory_bench(root: Path, daemon_env: dict[str, str]) -> list[dict[str, Any]]:
    runs = []
    for layout in LAYOUTS:
        for engine in ENGINE_SETTINGS:
            for count in MODEL_COUNTS:
                print(f"memory: {count} model(s), {layout}, tokenizer engine {engine} ...", file=sys.stderr, flush=True)
                runs.append(measure(root / f"{layout.replace(' ', '-')}-{engine}-{count}", count, engine, layout,
                                    daemon_env))
    return runs


def memory_table(runs: list[dict[str, Any]]) -> str:
    rows = [("folders", "setting (engines)", "models", "daemon RSS MB", "tokenizer process RSS MB each",
             "total RSS MB", "total PSS MB", "goal")]
    for run in runs:
        each = " / ".join(fmt(value, 1) for value in run["tokenizer_process_rss_mb"])
        goal = "< 150 in all" if run["models"] == 2 else ""
        rows.append((run["layout"], f"{run['setting']} ({', '.join(run['engines'])})", str(run["models"]),
                     fmt(run["daemon"]["rss_mb"], 1), each, fmt(run["total"]["rss_mb"], 1),
                     fmt(run["total"]["pss_mb"], 1), goal))
    return "host memory: the daemon and its tokenizer processes\n" + render_table(rows)
