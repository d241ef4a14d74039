"""Our transformers worker (SmolLM2-135M on the CPU): its own speed called directly, and the same
requests through the daemon, which launched it as a managed upstream (`--only worker`).

The daemon's entry names the worker's port, so the bench can call the very same process directly:
direct and relayed requests alternate, one at a time, on identical greedy prompts, so both see the
same load and the same model. TTFT is the first SSE content line at the client; decode speed is
(chunks after the first) / (last − first chunk), the worker sending about one chunk per token.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bench.figures import fmt, render_table, summary
from bench.harness import BENCH_DAEMON, sse_line, timed_request
from harness.daemon import running_daemon
from harness.net import free_port

MODEL = "bench-worker"
PROMPTS = ("Tell me about the sea.", "Explain what a CPU does.", "Write a short poem about autumn.")
ROUNDS = 2  # each prompt this many times on each route
MAX_TOKENS = 64


def entry(port: int) -> dict[str, Any]:
    return {"model_name": MODEL, "engine": "openai-http", "upstream_model": "smollm2", "port": str(port),
            "command": ["axm1-llm", "worker", "transformers", "--model", "smollm2", "--served-name", "smollm2",
                        "--port", "{port}"],
            "env": {"OMP_NUM_THREADS": "1"}, "run_on_startup": "true", "keep_alive": "-1"}


def one(port: int, model: str, prompt: str) -> dict[str, float]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": MAX_TOKENS, "temperature": 0}
    answer = timed_request(port, "/v1/chat/completions", body, decode_line=sse_line)
    arrivals = [at for at, obj in answer.lines
                if isinstance(obj, dict) and (obj.get("choices") or [{}])[0].get("delta", {}).get("content")]
    if len(arrivals) < 2:
        raise RuntimeError(f"{model}: too short an answer ({len(arrivals)} chunks, status {answer.status})")
    return {"ttft_ms": (arrivals[0] - answer.sent_ns) / 1e6,
            "tokens_per_s": (len(arrivals) - 1) / ((arrivals[-1] - arrivals[0]) / 1e9),
            "chunks": len(arrivals)}


def worker_bench(root: Path, daemon_env: dict[str, str] | None = None) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    worker_port = free_port()
    runs: dict[str, list[dict[str, float]]] = {"direct": [], "daemon": []}
    with running_daemon(root, [entry(worker_port)], extra_env=daemon_env, **BENCH_DAEMON) as daemon:
        daemon.wait_state(MODEL, ("ready",), 600)
        one(worker_port, "smollm2", "warm up")
        one(daemon.port, MODEL, "warm up")
        for _ in range(ROUNDS):
            for prompt in PROMPTS:
                print(f"worker: {prompt!r} ...", file=sys.stderr, flush=True)
                runs["direct"].append(one(worker_port, "smollm2", prompt))
                runs["daemon"].append(one(daemon.port, MODEL, prompt))
    results: dict[str, Any] = {}
    for route, measured in runs.items():
        results[route] = {key: summary([m[key] for m in measured]) for key in ("ttft_ms", "tokens_per_s")}
    added = [d["ttft_ms"] - w["ttft_ms"] for d, w in zip(runs["daemon"], runs["direct"])]
    results["added_ttft_ms"] = {**summary(added), "min": min(added)}
    return results


def worker_table(r: dict[str, Any]) -> str:
    rows = [
        ("measure", "worker directly", "through the daemon"),
        ("TTFT p50 ms", fmt(r["direct"]["ttft_ms"]["p50"]), fmt(r["daemon"]["ttft_ms"]["p50"])),
        ("TTFT added, p50 / min / max of the pairs ms", "",
         f'{fmt(r["added_ttft_ms"]["p50"])} / {fmt(r["added_ttft_ms"]["min"])} / {fmt(r["added_ttft_ms"]["max"])}'),
        ("decode tok/s p50", fmt(r["direct"]["tokens_per_s"]["p50"]), fmt(r["daemon"]["tokens_per_s"]["p50"])),
    ]
    return "transformers worker (SmolLM2-135M, CPU), launched by the daemon\n" + render_table(rows)
