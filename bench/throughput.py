"""Throughput benches: one model on one card against two replicas (issue 19), and batch items
through the jobs path against the same prompts sent directly (issue 15), with the first-token
delay of an interactive request while a batch runs.

    ./run bench --only replicas
    ./run bench --only jobs
    ./run bench --only shared-queue
"""
from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai

from harness.daemon import running_daemon
from harness.models import scripted_model
from harness.net import wait_until

WORDS = 24
TOKENS_PER_SECOND = 60  # a fixed decode speed: what the card gives a small model, roughly


def _ask(url: str, model: str, prompt: str) -> float:
    started = time.monotonic()
    reply = httpx.post(f"{url}/api/generate", json={"model": model, "prompt": prompt, "stream": False}, timeout=120)
    reply.raise_for_status()
    return time.monotonic() - started


def replicas_bench(root: Path, daemon_env: dict[str, str], requests: int = 16, clients: int = 4) -> dict[str, Any]:
    """The same concurrent load on one card and on two: requests per second."""
    results: dict[str, Any] = {"requests": requests, "clients": clients, "words": WORDS,
                               "tokens_per_second": TOKENS_PER_SECOND}
    for label, devices in (("one_card", []), ("two_replicas", [0, 1])):
        folder = root / label
        folder.mkdir(parents=True)
        fields: dict[str, Any] = {"run_on_startup": "true"}
        if devices:
            fields["devices"] = devices
        entry = scripted_model(folder, "bench-twin", reply_words=WORDS, tokens_per_second=TOKENS_PER_SECOND,
                               fields=fields)
        with running_daemon(folder, [entry], fast_restarts=False, faults=False,
                            extra_env={**daemon_env, "AX_EMU_CARDS": "2"}) as daemon:
            daemon.wait_state("bench-twin", "ready", timeout=60)
            _ask(daemon.url, "bench-twin", "warm up")
            print(f"replicas: {label} ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            with ThreadPoolExecutor(clients) as pool:
                latencies = list(pool.map(lambda i: _ask(daemon.url, "bench-twin", f"load {i}"), range(requests)))
            wall = time.monotonic() - started
        results[label] = {"wall_s": round(wall, 3), "requests_per_s": round(requests / wall, 3),
                          "latency_p50_s": round(statistics.median(latencies), 3)}
    results["speedup"] = round(results["two_replicas"]["requests_per_s"] / results["one_card"]["requests_per_s"], 2)
    return results


def jobs_bench(root: Path, daemon_env: dict[str, str], items: int = 40) -> dict[str, Any]:
    """Items per second through /v1/batches against the same prompts sent one after another to
    /v1/chat/completions (the limit), on a fast scripted model; then the first-token delay of an
    interactive request while a batch of slower items runs."""
    root.mkdir(parents=True)
    fast = scripted_model(root, "bench-fast", reply_words=4, tokens_per_second=5000, fields={"run_on_startup": "true"})
    slow = scripted_model(root, "bench-slow", reply_words=WORDS, tokens_per_second=TOKENS_PER_SECOND,
                          fields={"run_on_startup": "true"})
    results: dict[str, Any] = {"items": items}
    with running_daemon(root, [fast, slow], fast_restarts=False, faults=False, extra_env=daemon_env) as daemon:
        for model in ("bench-fast", "bench-slow"):
            daemon.wait_state(model, "ready", timeout=60)
        client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="none", max_retries=0)
        prompts = [f"item {i}" for i in range(items)]
        client.chat.completions.create(model="bench-fast", messages=[{"role": "user", "content": "warm up"}])
        started = time.monotonic()
        for prompt in prompts:
            client.chat.completions.create(model="bench-fast", messages=[{"role": "user", "content": prompt}])
        direct = time.monotonic() - started
        batch_s = _run_batch(client, "bench-fast", prompts)
        results["direct_s"] = round(direct, 3)
        results["batch_s"] = round(batch_s, 3)
        results["direct_items_per_s"] = round(items / direct, 2)
        results["batch_items_per_s"] = round(items / batch_s, 2)
        results["overhead_per_item_ms"] = round((batch_s - direct) / items * 1000, 2)

        # Interactive first token while a batch of slow items runs (each ~WORDS/TPS seconds).
        item_s = _ask(daemon.url, "bench-slow", "one item alone")
        thread = threading.Thread(target=_run_batch, args=(client, "bench-slow", [f"slow {i}" for i in range(12)]),
                                  daemon=True)
        thread.start()
        wait_until(lambda: daemon.get("/api/status/bench-slow")["state"] in ("processing", "outputting"), 30,
                   "the batch to run")
        delays = []
        for i in range(5):
            time.sleep(0.37 * (i + 1) % item_s)  # land at different points of the running item
            delays.append(_first_token(daemon.url, "bench-slow", f"interactive {i}"))
        thread.join(300)
        results["slow_item_s"] = round(item_s, 3)
        results["interactive_ttft_during_batch_s"] = {"max": round(max(delays), 3),
                                                      "p50": round(statistics.median(delays), 3)}
    return results


def _first_token(url: str, model: str, prompt: str) -> float:
    started = time.monotonic()
    first = None
    with httpx.stream("POST", f"{url}/api/generate", json={"model": model, "prompt": prompt}, timeout=120) as reply:
        for line in reply.iter_lines():  # read to the end: the answer finishes before the next
            if first is None and line.strip() and json.loads(line).get("response"):
                first = time.monotonic() - started
    assert first is not None, "no text in the answer"
    return first


def _run_batch(client: openai.OpenAI, model: str, prompts: list[str]) -> float:
    lines = [json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": model, "messages": [{"role": "user", "content": p}]}})
             for i, p in enumerate(prompts)]
    started = time.monotonic()
    upload = client.files.create(file=("bench.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    while client.batches.retrieve(batch.id).status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.05)
    return time.monotonic() - started


def shared_queue_bench(root: Path, daemon_env: dict[str, str], items: int = 120) -> dict[str, Any]:
    """Batch items per second drained from one PostgreSQL job store by one daemon, then by two
    (each with one card, the scripted model at a fixed decode speed)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from postgres_support import PostgresCluster

    cluster = PostgresCluster()
    cluster.start()
    results: dict[str, Any] = {"items": items, "words": 6, "tokens_per_second": TOKENS_PER_SECOND}
    try:
        for boxes in (1, 2):
            url = cluster.create_database()
            flags = ("--jobs-url", url, "--job-poll-s", "0.2")
            contexts, daemons = [], []
            try:
                for n in range(boxes):
                    folder = root / f"{boxes}-{n}"
                    folder.mkdir(parents=True)
                    entry = scripted_model(folder, "bench-pg", reply_words=6, tokens_per_second=TOKENS_PER_SECOND,
                                           fields={"run_on_startup": "true"})
                    context = running_daemon(folder, [entry], *flags, fast_restarts=False, faults=False,
                                             extra_env=daemon_env)
                    contexts.append(context)
                    daemons.append(context.__enter__())
                for daemon in daemons:
                    daemon.wait_state("bench-pg", "ready", timeout=60)
                print(f"shared queue: {boxes} daemon(s) ...", file=sys.stderr, flush=True)
                client = openai.OpenAI(base_url=f"{daemons[0].url}/v1", api_key="none", max_retries=0)
                seconds = _run_batch(client, "bench-pg", [f"pg {i}" for i in range(items)])
                results[f"{boxes}_daemons"] = {"s": round(seconds, 2), "items_per_s": round(items / seconds, 2)}
            finally:
                for context in reversed(contexts):
                    context.__exit__(None, None, None)
    finally:
        cluster.remove()
    results["speedup"] = round(results["2_daemons"]["items_per_s"] / results["1_daemons"]["items_per_s"], 2)
    return results


def throughput_table(results: dict[str, Any]) -> str:
    rows = []
    if "replicas" in results:
        r = results["replicas"]
        rows.append(f"replicas ({r['requests']} requests, {r['clients']} clients, {r['words']} words at "
                    f"{r['tokens_per_second']} tok/s)")
        for label in ("one_card", "two_replicas"):
            x = r[label]
            rows.append(f"  {label:13s} {x['requests_per_s']:6.2f} req/s  wall {x['wall_s']:6.2f} s  "
                        f"p50 {x['latency_p50_s']:.2f} s")
        rows.append(f"  speedup {r['speedup']}x (goal: 2x)")
    if "jobs" in results:
        j = results["jobs"]
        rows.append(f"jobs ({j['items']} items on a 5000 tok/s model)")
        rows.append(f"  direct {j['direct_items_per_s']} items/s, batch {j['batch_items_per_s']} items/s, "
                    f"overhead {j['overhead_per_item_ms']} ms per item (goal < 5)")
        t = j["interactive_ttft_during_batch_s"]
        rows.append(f"  interactive first token during a batch: p50 {t['p50']} s, max {t['max']} s "
                    f"(one item takes {j['slow_item_s']} s: goal max <= one item)")
    if "shared_queue" in results:
        q = results["shared_queue"]
        rows.append(f"one PostgreSQL job queue ({q['items']} items, {q['words']} words at {q['tokens_per_second']} tok/s)")
        rows.append(f"  1 daemon {q['1_daemons']['items_per_s']} items/s, 2 daemons {q['2_daemons']['items_per_s']} "
                    f"items/s: {q['speedup']}x")
    return "\n".join(rows)
