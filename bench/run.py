"""`python -m bench`: the daemon measured side by side with the raw runner, and (bench/http_path.py)
with an OpenAI-compatible upstream called directly.

See bench/README.md for what each number means. Results go to bench/results/latest.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ax_emulator.scripted import reply_text
from bench.services_demo import services_demo, services_table
from bench.throughput import jobs_bench, replicas_bench, shared_queue_bench, throughput_table
from bench.figures import fmt, ms, pct, render_table, summary
from bench.harness import (
    BENCH_DAEMON, RawRunner, cpu_seconds, daemon_package_file, daemon_source_env, heavy_libraries, probed_model,
    read_probe, rss_mb, timed_request,
)
from bench.http_path import http_path_bench, http_path_table
from bench.memory import memory_bench, memory_table
from bench.model_load import load_bench, load_table
from bench.worker_path import worker_bench, worker_table
from harness.daemon import running_daemon
from harness.net import free_port
from harness.paths import REPO_ROOT

MARKER = b"prompt >> "
RESULTS = Path(__file__).resolve().parent / "results"
# (tokens per second, filler words per reply, requests)
SPEEDS = ((30, 120, 1), (300, 300, 3), (3000, 600, 3))
QUEUE_CLIENTS = 50
POLLERS = 50


def reply_times(records: list[tuple[int, bytes]], reply: bytes, after: int = 0) -> list[tuple[int, int]]:
    """For a stream of (time, bytes) records, where `reply` appears contiguously: for every
    record holding reply bytes, (time, reply bytes complete up to then)."""
    stream = b"".join(d for _, d in records)
    start = stream.find(reply, after)
    if start < 0:
        raise ValueError(f"reply not found in the runner's output: {reply[:60]!r}")
    out, offset = [], 0
    for stamp, data in records:
        end = offset + len(data)
        if end > start and offset < start + len(reply):
            out.append((stamp, min(end, start + len(reply)) - start))
        offset = end
    return out


def arrival_of(progress: list[tuple[int, int]], needed: int) -> int:
    for stamp, done in progress:
        if done >= needed:
            return stamp
    raise ValueError("offset beyond the reply")


def stream_figures(progress: list[tuple[int, int]], reply_len: int) -> dict[str, Any]:
    times = [t for t, _ in progress]
    gaps = [ms(b - a) for a, b in zip(times, times[1:])]
    seconds = (times[-1] - times[0]) / 1e9 if len(times) > 1 else 0.0
    return {"chunks": len(times), "duration_s": seconds, "gap_ms": summary(gaps), "reply_bytes": reply_len}


# ---- raw runner -------------------------------------------------------------------------------

def raw_scripted(root: Path, tps: int, words: int, requests: int) -> dict[str, Any]:
    runner = RawRunner(root, f"raw{tps}", tps, words)
    try:
        runner.wait_for(MARKER, 0, 60)
        ttft, streams = [], []
        for i in range(requests):
            index, _ = runner.send("reset")
            runner.wait_for(MARKER, index, 10)
            prompt = f"raw-{tps}-{i} bench"
            index, written = runner.send(prompt)
            runner.wait_for(MARKER, index, 300)
            reply = reply_text(prompt, words, False).encode()
            progress = reply_times(runner.chunks[index:], reply)
            ttft.append(ms(progress[0][0] - written))
            streams.append(stream_figures(progress, len(reply)))
        return {"ttft_ms": summary(ttft), "streams": streams,
                "duration_s": statistics.fmean(s["duration_s"] for s in streams)}
    finally:
        runner.close()


# ---- through the daemon ---------------------------------------------------------------------------

def daemon_stream(daemon, folder: Path, model: str, prompt: str, words: int, cpu_pid: int | None = None) -> dict[str, Any]:
    cpu_before = cpu_seconds(cpu_pid) if cpu_pid else None
    rss_samples: list[float] = []
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.wait(0.25):
            rss_samples.append(rss_mb(cpu_pid))

    sampler = threading.Thread(target=sample_rss, daemon=True)
    if cpu_pid:
        sampler.start()
    response = timed_request(daemon.port, "/api/generate", {"model": model, "prompt": prompt})
    stop.set()
    cpu_after = cpu_seconds(cpu_pid) if cpu_pid else None
    final = response.lines[-1][1]
    text = response.text()
    expected = reply_text(prompt, words, False)
    if response.status != 200 or text != expected or not final.get("done"):
        raise AssertionError(f"{model}: wrong answer (status {response.status}): {text[:200]!r} / {final}")
    reply = expected.encode()
    time.sleep(0.2)  # let the probes append their last records
    inputs = read_probe(folder / "probe-in.log")
    prompt_in = next(t for t, d in inputs if prompt.encode() in d)
    reset_in = max((t for t, d in inputs if d == b"reset\n" and t < prompt_in), default=None)
    outputs = read_probe(folder / "probe-out.log")
    reset_marker = next((t for t, d in outputs if reset_in and reset_in < t < prompt_in and MARKER in d), None)
    runner_progress = reply_times(outputs, reply)
    lags, client_progress, done = [], [], 0
    for stamp, obj in response.lines:
        piece = (obj.get("response") or "").encode()
        if not piece:
            continue
        done += len(piece)
        client_progress.append((stamp, done))
        lags.append(ms(stamp - arrival_of(runner_progress, done)))
    quarter = max(1, len(lags) // 4)
    first_runner, first_client = runner_progress[0][0], client_progress[0][0]
    result = {
        "lag_ms": summary(lags),
        "lag_first_quarter_p50_ms": pct(lags[:quarter], 50),
        "lag_last_quarter_p50_ms": pct(lags[-quarter:], 50),
        "ttft_ms": ms(first_client - response.sent_ns),
        "request_to_prompt_written_ms": ms(prompt_in - response.sent_ns),
        "runner_prompt_to_first_text_ms": ms(first_runner - prompt_in),
        "first_text_relay_ms": ms(first_client - first_runner),
        "ttft_added_ms": ms(prompt_in - response.sent_ns) + ms(first_client - first_runner),
        "request_to_reset_written_ms": ms(reset_in - response.sent_ns) if reset_in else None,
        "runner_reset_ms": ms(reset_marker - reset_in) if reset_marker else None,
        "reset_done_to_prompt_written_ms": ms(prompt_in - reset_marker) if reset_marker else None,
        "runner": stream_figures(runner_progress, len(reply)),
        "client": stream_figures(client_progress, len(reply)),
        "eval_count": final.get("eval_count"),
        "request_id": response.headers.get("x-request-id"),
        "_lags": lags,
    }
    if cpu_pid:
        wall = (response.done_ns - response.sent_ns) / 1e9
        used = cpu_after - cpu_before
        result.update(cpu_s=used, wall_s=wall, cpu_percent_of_core=100 * used / wall,
                      cpu_s_per_1000_tokens=1000 * used / max(1, final.get("eval_count") or 1),
                      rss_streaming_mb=max(rss_samples) if rss_samples else rss_mb(cpu_pid))
    return result


async def _poll(port: int, path: str, until: float, period: float, latencies: list[float], errors: list[str]) -> None:
    await asyncio.sleep(random.random() * (period or 0.01))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    try:
        while time.monotonic() < until:
            started = time.monotonic_ns()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
            await reader.readexactly(length)
            latencies.append(ms(time.monotonic_ns() - started))
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(head.split(b"\r\n")[0].decode())
            if period:
                await asyncio.sleep(max(0.0, period - (time.monotonic_ns() - started) / 1e9))
    finally:
        writer.close()


def pollers(port: int, seconds: float, period: float) -> tuple[list[float], list[str]]:
    latencies: list[float] = []
    errors: list[str] = []

    async def all_of_them() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(_poll(port, "/api/status", until, period, latencies, errors) for _ in range(POLLERS)))

    asyncio.run(all_of_them())
    return latencies, errors


def daemon_body(daemon, path: str) -> bytes:
    import httpx

    return httpx.get(daemon.url + path, timeout=10).content


def status_under_load(daemon, folder: Path, model: str, words: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, period in (("paced_10hz_each", 0.1), ("back_to_back", 0.0)):
        box: dict[str, Any] = {}

        def stream() -> None:
            box["stream"] = daemon_stream(daemon, folder, model, f"status-load-{label} bench", words)

        streamer = threading.Thread(target=stream)
        streamer.start()
        time.sleep(0.3)
        latencies, errors = pollers(daemon.port, 3.0, period)
        streamer.join(300)
        out[label] = {"latency_ms": summary(latencies), "body_bytes": len(daemon_body(daemon, "/api/status")), "requests_per_s": len(latencies) / 3.0, "errors": len(errors),
                      "stream_lag_ms": box["stream"]["lag_ms"] if "stream" in box else None}
    return out


def queueing(daemon, model: str, words: int) -> dict[str, Any]:
    results: dict[int, Any] = {}
    snapshots: list[list[str]] = []
    stop = threading.Event()

    def watch() -> None:
        import httpx

        with httpx.Client(base_url=daemon.url, timeout=10) as http:
            while not stop.is_set():
                queue = http.get(f"/api/status/{model}").json().get("queue", {})
                snapshots.append([w["id"] for w in sorted(queue.get("waiting", []), key=lambda w: w["position"])])
                time.sleep(0.01)

    def client(i: int, at: float) -> None:
        time.sleep(max(0.0, at - time.monotonic()))
        results[i] = timed_request(daemon.port, "/api/generate", {"model": model, "prompt": f"queue-{i:02d} bench"})

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.monotonic() + 0.2
    threads = [threading.Thread(target=client, args=(i, start + i * 0.004)) for i in range(QUEUE_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    stop.set()
    watcher.join(10)
    correct = sum(1 for i, r in results.items() if r.status == 200 and r.text() == reply_text(f"queue-{i:02d} bench", words, False))
    by_first_token = sorted(results, key=lambda i: results[i].lines[0][0])
    sent_order = sorted(results, key=lambda i: results[i].sent_ns)
    ids = {results[i].headers.get("x-request-id"): i for i in results}
    # every queue snapshot must list the waiting requests in the order they were sent
    snapshot_violations = 0
    for snap in snapshots:
        order = [ids[x] for x in snap if x in ids]
        if order != sorted(order, key=lambda i: results[i].sent_ns):
            snapshot_violations += 1
    waits = [ms(results[i].lines[0][0] - results[i].sent_ns) for i in results]
    return {"clients": QUEUE_CLIENTS, "correct_answers": correct, "served_in_arrival_order": by_first_token == sent_order,
            "queue_snapshots": len(snapshots), "max_waiting_seen": max((len(s) for s in snapshots), default=0),
            "snapshot_order_violations": snapshot_violations,
            "wait_to_first_token_ms": summary(waits),
            "service_ms_per_request": (max(r.done_ns for r in results.values()) - min(r.sent_ns for r in results.values())) / 1e6 / QUEUE_CLIENTS}


# ---- the real model -------------------------------------------------------------------------------

REAL_PROMPTS = ("Why is the sky blue?", "Name three fruits.", "What is a prime number?")


def real_model_folder(root: Path) -> tuple[Path, int]:
    source = REPO_ROOT / "model" / "smollm2-135m"
    folder = root / "smollm2-135m"
    shutil.copytree(source, folder, symlinks=True)
    port = free_port()
    for script in folder.glob("run_*.sh"):
        script.write_text(script.read_text().replace("127.0.0.1:12345", f"127.0.0.1:{port}"))
    return folder, port


def real_model_entry(root: Path) -> dict[str, Any]:
    """The descriptor entry of a fresh copy of the demo's SmolLM2 folder in `root` (run_on_startup)."""
    folder, port = real_model_folder(root)
    script = next(folder.glob("run_*.sh"))
    return {
        "model_name": "smollm2-135m", "run_cmd": "./" + script.name, "model_path": str(folder),
        "include_thinking": "false", "run_on_startup": "true", "tokenizer_path": str(folder),
        "tokenizer_py": "smollm2_tokenizer_uid.py", "tokenizer_ip": "127.0.0.1", "tokenizer_port": str(port),
    }


def decode_speed(progress: list[tuple[int, int]]) -> float | None:
    """Tokens per second between the first and the last text chunk (3 tokens per chunk)."""
    if len(progress) < 2:
        return None
    return 3 * (len(progress) - 1) / ((progress[-1][0] - progress[0][0]) / 1e9)


def text_chunks(records: list[tuple[int, bytes]]) -> list[tuple[int, int]]:
    from llm_service.engines.card.output import RunnerOutputParser, Text

    parser, out, total = RunnerOutputParser("b"), [], 0
    parser.feed(b"prompt >> ")
    parser.begin_turn()
    for stamp, data in records:
        for event in parser.feed(data):
            if isinstance(event, Text) and event.text:
                total += len(event.text)
                out.append((stamp, total))
    return out


def real_model(root: Path, daemon_env: dict[str, str] | None = None) -> dict[str, Any]:
    folder, port = real_model_folder(root / "raw")
    script = next(folder.glob("run_*.sh"))
    runner = RawRunner(root, "smollm2", 0, 0, command=["/bin/sh", str(script)], cwd=folder,
                       tokenizer=folder / "tokenizer", tokenizer_port=port)
    raw_ttft, raw_speed = [], []
    try:
        runner.wait_for(MARKER, 0, 300)
        for prompt in REAL_PROMPTS:
            index, _ = runner.send("reset")
            runner.wait_for(MARKER, index, 30)
            index, written = runner.send(prompt)
            runner.wait_for(MARKER, index, 300)
            progress = text_chunks(runner.chunks[index:])
            raw_ttft.append(ms(progress[0][0] - written))
            raw_speed.append(decode_speed(progress))
    finally:
        runner.close()
    entry = real_model_entry(root / "daemon")
    ttft, speed, reported = [], [], []
    with running_daemon(root / "daemon", [entry], "--load-stall-timeout-s", "300", extra_env=daemon_env,
                        **BENCH_DAEMON) as daemon:
        daemon.wait_state("smollm2-135m", ("ready",), 300)
        for prompt in REAL_PROMPTS:
            response = timed_request(daemon.port, "/api/generate", {"model": "smollm2-135m", "prompt": prompt})
            progress, done = [], 0
            for stamp, obj in response.lines:
                if obj.get("response"):
                    done += len(obj["response"])
                    progress.append((stamp, done))
            final = response.lines[-1][1]
            ttft.append(ms(progress[0][0] - response.sent_ns))
            speed.append(decode_speed(progress))
            if final.get("eval_duration"):
                reported.append(final["eval_count"] / (final["eval_duration"] / 1e9))
    return {"prompts": list(REAL_PROMPTS),
            "raw": {"ttft_ms": summary(raw_ttft), "decode_tok_s": summary([s for s in raw_speed if s])},
            "daemon": {"ttft_ms": summary(ttft), "decode_tok_s": summary([s for s in speed if s]),
                       "reported_eval_tok_s": summary(reported)}}


# ---- the run -----------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}


def table(r: dict[str, Any]) -> str:
    rows = [("measure", "raw runner", "through daemon", "goal")]
    if "daemon" in r:
        rows += runner_rows(r)
    if r.get("real_model"):
        m = r["real_model"]
        rows.append(("SmolLM2: TTFT p50 ms", fmt(m["raw"]["ttft_ms"]["p50"], 0), fmt(m["daemon"]["ttft_ms"]["p50"], 0), "~ raw"))
        rows.append(("SmolLM2: decode tok/s p50", fmt(m["raw"]["decode_tok_s"]["p50"], 1), fmt(m["daemon"]["decode_tok_s"]["p50"], 1), "~ raw"))
    return render_table(rows)


def runner_rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for tps, *_ in SPEEDS:
        d, raw = r["daemon"][str(tps)], r["raw"][str(tps)]
        lag = d["lag_ms"]
        rows.append((f"{tps} tok/s: per-chunk lag p50/p99/max ms", "0 (reference)",
                     f"{fmt(lag['p50'], 3)} / {fmt(lag['p99'], 3)} / {fmt(lag['max'], 3)}", "p50 < 0.5, p99 < 3"))
        rows.append((f"{tps} tok/s: lag p50 first/last quarter ms", "-",
                     f"{fmt(d['lag_first_quarter_p50_ms'], 3)} / {fmt(d['lag_last_quarter_p50_ms'], 3)}", "no growth"))
        rows.append((f"{tps} tok/s: same stream, first->last chunk s", fmt(d["runner_duration_s"], 3),
                     fmt(d["client_duration_s"], 3), "equal"))
        parts = d["ttft_parts_p50_ms"]
        rows.append((f"{tps} tok/s: added TTFT = to prompt + relay, p50 ms", "-",
                     f"{fmt(parts['request_to_prompt_written_ms'])} + {fmt(parts['first_text_relay_ms'])}", "-"))
        rows.append((f"{tps} tok/s: TTFT p50 ms (added p50)", fmt(raw["ttft_ms"]["p50"]),
                     f"{fmt(d['ttft_ms']['p50'])} (+{fmt(d['ttft_added_ms']['p50'])})", "added < 5"))
    c = r["daemon"]["30"]
    rows.append(("daemon CPU at 30 tok/s, % of a core", "-", fmt(c["cpu_percent_of_core"]), "< 3"))
    rows.append(("daemon CPU s per 1000 tokens (30/300/3000)", "-",
                 " / ".join(fmt(r["daemon"][str(t)]["cpu_s_per_1000_tokens"], 3) for t, *_ in SPEEDS), "-"))
    rows.append(("daemon RSS MB idle / streaming", "-", f"{fmt(r['rss_idle_mb'], 1)} / {fmt(c['rss_streaming_mb'], 1)}", "idle < 80"))
    rows.append(("torch/transformers mapped in daemon", "-", str(len(r["heavy_libraries"])), "0"))
    for label, s in r["status_under_load"].items():
        lat = s["latency_ms"]
        rows.append((f"/api/status, {POLLERS} pollers {label}: p50/p99 ms", "-",
                     f"{fmt(lat['p50'])} / {fmt(lat['p99'])} ({fmt(s['requests_per_s'], 0)} req/s)", "p99 < 10"))
    q = r["queueing"]
    rows.append((f"queue: {q['clients']} clients, correct / in order", "-",
                 f"{q['correct_answers']} / {q['served_in_arrival_order']} (snapshot violations {q['snapshot_order_violations']})", "50 / True"))
    rows.append(("queue: wait to first token p50/max ms", "-",
                 f"{fmt(q['wait_to_first_token_ms']['p50'], 0)} / {fmt(q['wait_to_first_token_ms']['max'], 0)}", "-"))
    return rows


def scripted_runner(root: Path, daemon_env: dict[str, str]) -> dict[str, Any]:
    """The raw scripted runner, then the same streams through the daemon; status and queueing."""
    results: dict[str, Any] = {"raw": {}, "daemon": {}}
    for tps, words, requests in SPEEDS:
        print(f"raw runner at {tps} tok/s ...", file=sys.stderr, flush=True)
        results["raw"][str(tps)] = raw_scripted(root / "raw", tps, words, requests)
    names = {tps: f"bench-{tps}" for tps, *_ in SPEEDS}
    entries = [probed_model(root / "daemon", names[tps], tps, words) for tps, words, _ in SPEEDS]
    entries.append(probed_model(root / "daemon", "bench-queue", 3000, 4))
    with running_daemon(root / "daemon", entries, extra_env=daemon_env, **BENCH_DAEMON) as daemon:
        pid = daemon.process.pid
        for entry in entries:
            daemon.get(f"/api/status/{entry['model_name']}")
            timed_request(daemon.port, "/api/generate", {"model": entry["model_name"]})  # load
            daemon.wait_state(entry["model_name"], ("ready",), 120)
        time.sleep(2.0)
        results["rss_idle_mb"] = rss_mb(pid)
        results["heavy_libraries"] = heavy_libraries(pid)
        for tps, words, requests in SPEEDS:
            print(f"daemon at {tps} tok/s ...", file=sys.stderr, flush=True)
            folder = root / "daemon" / names[tps]
            runs = [daemon_stream(daemon, folder, names[tps], f"daemon-{tps}-{i} bench", words, cpu_pid=pid)
                    for i in range(requests)]
            merged = {
                "lag_ms": summary([x for run in runs for x in _lags(run)]),
                "lag_first_quarter_p50_ms": max(run["lag_first_quarter_p50_ms"] for run in runs),
                "lag_last_quarter_p50_ms": max(run["lag_last_quarter_p50_ms"] for run in runs),
                "ttft_ms": summary([run["ttft_ms"] for run in runs]),
                "ttft_added_ms": summary([run["ttft_added_ms"] for run in runs]),
                "ttft_parts_p50_ms": {key: pct([run[key] for run in runs if run[key] is not None], 50) for key in (
                    "request_to_reset_written_ms", "runner_reset_ms", "reset_done_to_prompt_written_ms",
                    "request_to_prompt_written_ms", "runner_prompt_to_first_text_ms", "first_text_relay_ms")},
                "client_duration_s": statistics.fmean(run["client"]["duration_s"] for run in runs),
                "runner_duration_s": statistics.fmean(run["runner"]["duration_s"] for run in runs),
                "cpu_percent_of_core": statistics.fmean(run["cpu_percent_of_core"] for run in runs),
                "cpu_s_per_1000_tokens": statistics.fmean(run["cpu_s_per_1000_tokens"] for run in runs),
                "rss_streaming_mb": max(run["rss_streaming_mb"] for run in runs),
                "runs": runs,
            }
            results["daemon"][str(tps)] = merged
        print("status under load ...", file=sys.stderr, flush=True)
        results["status_under_load"] = status_under_load(daemon, root / "daemon" / "bench-300", "bench-300", 300)
        print("queueing ...", file=sys.stderr, flush=True)
        results["queueing"] = queueing(daemon, "bench-queue", 4)
    return results


PARTS = ("runner", "http", "managed", "worker", "real", "replicas", "jobs", "shared-queue", "memory", "load", "services")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--skip-real", action="store_true", help="skip the SmolLM2 parts (the card's transformers engine and the worker)")
    parser.add_argument("--only", choices=PARTS,
                        help="run one part: the scripted runner, the HTTP engine path, the same with the "
                        "upstream launched by the daemon, our transformers worker, SmolLM2 on the card, or the "
                        "memory of the daemon and its tokenizer servers, or SmolLM2's load by the state of the GGUF cache")
    parser.add_argument("--daemon-source", type=Path, metavar="DIR",
                        help="measure the daemon of another checkout (DIR goes first on the daemon's PYTHONPATH)")
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args(argv)
    # The services demo runs SmolLM2 for many minutes: only when asked for (--only services).
    parts = [args.only] if args.only else [part for part in PARTS if part != "services"
                                           and not (part in ("real", "worker", "load") and args.skip_real)]
    daemon_env = daemon_source_env(args.daemon_source)
    results: dict[str, Any] = {"machine": machine(), "daemon_llm_service": daemon_package_file(daemon_env)}
    print(f"daemon code: {results['daemon_llm_service']}", file=sys.stderr, flush=True)
    if args.daemon_source and not results["daemon_llm_service"].startswith(str(args.daemon_source.resolve()) + os.sep):
        parser.error(f"the daemon would not run {args.daemon_source}: it imports {results['daemon_llm_service']}")
    root = Path(tempfile.mkdtemp(prefix="axm1-bench-"))
    finished = False
    try:
        if "runner" in parts:
            results.update(scripted_runner(root, daemon_env))
        if "http" in parts:
            results["http_path"] = http_path_bench(root / "http", daemon_env)
        if "managed" in parts:
            results["managed_http_path"] = http_path_bench(root / "managed", daemon_env, managed=True)
        if "worker" in parts:
            results["worker"] = worker_bench(root / "worker", daemon_env)
        if "real" in parts:
            print("real model (SmolLM2, transformers engine) ...", file=sys.stderr, flush=True)
            results["real_model"] = real_model(root / "real", daemon_env)
        if "replicas" in parts:
            results["replicas"] = replicas_bench(root / "replicas", daemon_env)
        if "jobs" in parts:
            print("jobs ...", file=sys.stderr, flush=True)
            results["jobs"] = jobs_bench(root / "jobs", daemon_env)
        if "shared-queue" in parts:
            results["shared_queue"] = shared_queue_bench(root / "shared-queue", daemon_env)
        if "services" in parts:
            results["services"] = services_demo(root / "services", daemon_env)
        if "memory" in parts:
            results["memory"] = memory_bench(root / "memory", daemon_env)
        if "load" in parts:
            results["model_load"] = load_bench(root / "load", daemon_env)
        finished = True
    finally:
        if finished:
            shutil.rmtree(root, ignore_errors=True)
        else:  # keep the daemon's log and the probe logs for the post-mortem
            print(f"bench failed: logs kept in {root}", file=sys.stderr)
    tables = [table(results)] if "runner" in parts or "real" in parts else []
    if "http_path" in results:
        tables.append(http_path_table(results["http_path"]))
    if "worker" in results:
        tables.append(worker_table(results["worker"]))
    if "managed_http_path" in results:
        tables.append("managed upstream (launched by the daemon)\n" + http_path_table(results["managed_http_path"]))
    if "replicas" in results or "jobs" in results or "shared_queue" in results:
        tables.append(throughput_table(results))
    if "services" in results:
        tables.append(services_table(results["services"]))
    if "memory" in results:
        tables.append(memory_table(results["memory"]))
    if "model_load" in results:
        tables.append(load_table(results["model_load"]))
    print("\n\n".join(tables))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {args.output}", file=sys.stderr)
    return 0


def _lags(run: dict[str, Any]) -> list[float]:
    return run.pop("_lags", [])
