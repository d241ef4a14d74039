"""The daemon's HTTP engine path: a paced OpenAI-compatible upstream called directly, and relayed
by the daemon (`engine: openai-http`) on its OpenAI (SSE) and Ollama (NDJSON) routes.

See bench/README.md ("HTTP engine path") for what each figure means.
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from bench import paced_upstream
from bench.figures import fmt, ms, pct, render_table, summary
from bench.harness import (
    BENCH_DAEMON, TimedResponse, cpu_seconds, ndjson_line, sse_line, timed_request, timed_requests_at_once,
)
from harness.daemon import running_daemon
from harness.net import free_port, wait_http

MODEL = "bench-http"
# (chunks per second, chunks per stream, streams one after another)
RATES = ((30, 150, 3), (300, 600, 5), (3000, 3000, 5))
# Many short streams for a steadier TTFT than the few long ones above give (rate, chunks, streams).
SHORT = (3000, 5, 30)
# streams at once, chunks per second each, chunks per stream
CONCURRENT_STREAMS, CONCURRENT_RATE, CONCURRENT_CHUNKS = 20, 300, 600
WARM_UP_CHUNKS = 20


# ---- where a request goes ---------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    label: str  # the key of its figures
    port: int
    path: str
    model: str
    dialect: str  # "openai": SSE chat.completion.chunk objects; "ollama": NDJSON /api/chat lines

    def body(self, prompt: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "stream": True}
        if self.dialect == "openai":
            body["stream_options"] = {"include_usage": True}
        return body

    def decode_line(self) -> Callable[[bytes], dict | None]:
        return sse_line if self.dialect == "openai" else ndjson_line

    def content(self, obj: dict[str, Any]) -> str:
        if self.dialect == "ollama":
            return (obj.get("message") or {}).get("content") or ""
        choices = obj.get("choices") or [{}]
        return (choices[0].get("delta") or {}).get("content") or ""


def routes(upstream_port: int, daemon_port: int) -> tuple[Route, Route, Route]:
    return (Route("direct", upstream_port, "/v1/chat/completions", paced_upstream.MODEL, "openai"),
            Route("daemon_openai", daemon_port, "/v1/chat/completions", MODEL, "openai"),
            Route("daemon_ollama", daemon_port, "/api/chat", MODEL, "ollama"))


# ---- the upstream -------------------------------------------------------------------------------

@dataclass
class Upstream:
    port: int
    pid: int

    def records(self, request_id: str) -> dict[str, Any]:
        """What the upstream did for one request: when it read it, and when it wrote each chunk."""
        record = httpx.get(f"http://127.0.0.1:{self.port}/_records", params={"id": request_id}, timeout=10).json()
        if not record.get("writes_ns"):
            raise AssertionError(f"the upstream has no record of request {request_id}")
        return record

    def stats(self) -> dict[str, int]:
        return httpx.get(f"http://127.0.0.1:{self.port}/_stats", timeout=10).json()


@contextmanager
def running_upstream() -> Iterator[Upstream]:
    port = free_port()
    process = subprocess.Popen([sys.executable, paced_upstream.__file__, "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 30, process=process)
        yield Upstream(port, process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def daemon_entry(upstream: Upstream) -> dict[str, str]:
    return {"model_name": MODEL, "engine": "openai-http", "base_url": f"http://127.0.0.1:{upstream.port}",
            "upstream_model": paced_upstream.MODEL, "max_concurrency": "32", "run_on_startup": "true"}


def managed_entry(port: int) -> dict[str, Any]:
    """The same upstream, launched by the daemon (a managed upstream) on a port known to the bench,
    so that it can be called directly too."""
    return {"model_name": MODEL, "engine": "openai-http", "command": [sys.executable, paced_upstream.__file__, "--port", "{port}"],
            "port": str(port), "upstream_model": paced_upstream.MODEL, "max_concurrency": "32", "run_on_startup": "true",
            "keep_alive": "-1"}


@contextmanager
def upstream_and_daemon(root: Path, daemon_env: dict[str, str] | None, managed: bool) -> Iterator[tuple[Upstream, Any]]:
    if not managed:
        with running_upstream() as upstream, running_daemon(root, [daemon_entry(upstream)], extra_env=daemon_env,
                                                             **BENCH_DAEMON) as daemon:
            daemon.wait_state(MODEL, ("ready",), 60)
            yield upstream, daemon
        return
    port = free_port()
    with running_daemon(root, [managed_entry(port)], extra_env=daemon_env, **BENCH_DAEMON) as daemon:
        status = daemon.wait_state(MODEL, ("ready",), 60)
        yield Upstream(port, status["managed"]["pid"]), daemon


# ---- one stream ---------------------------------------------------------------------------------

@dataclass
class Stream:
    request_id: str
    chunks: int
    rate: float
    response: TimedResponse


def paced_prompt(chunks: int, rate: float) -> tuple[str, str]:
    """A fresh request id, and the user message telling the upstream that id and the pace."""
    request_id = os.urandom(6).hex()
    return request_id, f"bench id={request_id} chunks={chunks} rate={rate}"


def run_stream(route: Route, chunks: int, rate: float) -> Stream:
    request_id, prompt = paced_prompt(chunks, rate)
    response = timed_request(route.port, route.path, route.body(prompt), decode_line=route.decode_line())
    return Stream(request_id, chunks, rate, response)


def run_streams_at_once(route: Route, count: int, chunks: int, rate: float) -> list[Stream]:
    prompts = [paced_prompt(chunks, rate) for _ in range(count)]
    responses = timed_requests_at_once(route.port, [(route.path, route.body(prompt)) for _, prompt in prompts],
                                       decode_line=route.decode_line())
    return [Stream(request_id, chunks, rate, response) for (request_id, _), response in zip(prompts, responses)]


def chunk_arrivals(route: Route, stream: Stream) -> list[int]:
    """For every chunk i, when the client had its text " w<i>" complete (arrival of the line that
    completed it): offsets into the whole text, so this holds however the daemon re-chunks."""
    lines = stream.response.lines
    text = "".join(route.content(obj) for _, obj in lines)
    expected = "".join(paced_upstream.chunk_content(i) for i in range(stream.chunks))
    if stream.response.status != 200 or text != expected:
        raise AssertionError(f"{route.label}: wrong answer (status {stream.response.status}): {text[:200]!r}")
    ends = itertools.accumulate(len(paced_upstream.chunk_content(i)) for i in range(stream.chunks))
    arrivals, received, line = [], 0, iter(lines)
    for end in ends:
        while received < end:
            stamp, obj = next(line)
            received += len(route.content(obj))
        arrivals.append(stamp)
    return arrivals


def stream_figures(route: Route, upstream: Upstream, stream: Stream) -> dict[str, Any]:
    record = upstream.records(stream.request_id)
    arrivals, writes = chunk_arrivals(route, stream), record["writes_ns"]
    sent = stream.response.sent_ns
    last_scheduled_ns = record["t0_ns"] + (stream.chunks - 1) / stream.rate * 1e9
    return {
        "ttft_ms": ms(arrivals[0] - sent),
        "request_to_upstream_ms": ms(record["request_ns"] - sent),
        "first_chunk_relay_ms": ms(arrivals[0] - writes[0]),
        "behind_s": (arrivals[-1] - writes[-1]) / 1e9,
        "upstream_late_ms": ms(writes[-1] - last_scheduled_ns),  # the upstream's own slip: ~0
        "_lags_ms": [ms(a - w) for a, w in zip(arrivals, writes)],
    }


def lag_figures(streams: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-chunk lag over all streams, and whether it grows within a stream."""
    lags = [stream.pop("_lags_ms") for stream in streams]
    quarter = max(1, min(len(one) for one in lags) // 4)
    return {"lag_ms": summary([x for one in lags for x in one]),
            "lag_first_quarter_p50_ms": pct([x for one in lags for x in one[:quarter]], 50),
            "lag_last_quarter_p50_ms": pct([x for one in lags for x in one[-quarter:]], 50)}


# ---- streams one after another, and many at once --------------------------------------------------

def sequential(route: Route, upstream: Upstream, rate: int, chunks: int, count: int, daemon_pid: int | None) -> dict[str, Any]:
    streams, cpu = [], 0.0
    for _ in range(count):
        before = cpu_seconds(daemon_pid) if daemon_pid else None
        stream = run_stream(route, chunks, rate)
        if before is not None:
            cpu += cpu_seconds(daemon_pid) - before
        streams.append(stream_figures(route, upstream, stream))
    out = {key: summary([s[key] for s in streams]) for key in
           ("ttft_ms", "request_to_upstream_ms", "first_chunk_relay_ms", "behind_s", "upstream_late_ms")}
    out.update(lag_figures(streams))
    if daemon_pid:  # summed over the streams: one stream is only a few clock ticks at 30 chunks/s
        out["daemon_cpu_s_per_1000_chunks"] = 1000 * cpu / (chunks * count)
    return out


def concurrent(route: Route, upstream: Upstream, daemon_pid: int | None) -> dict[str, Any]:
    """CONCURRENT_STREAMS streams started together; how far behind the upstream each one ends."""
    pids = {"daemon": daemon_pid, "upstream": upstream.pid}
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items() if pid}
    done = run_streams_at_once(route, CONCURRENT_STREAMS, CONCURRENT_CHUNKS, CONCURRENT_RATE)
    wall = (max(s.response.done_ns for s in done) - min(s.response.sent_ns for s in done)) / 1e9
    streams = [stream_figures(route, upstream, s) for s in done]
    behind = [s["behind_s"] for s in streams]
    out = {"streams": CONCURRENT_STREAMS, "rate": CONCURRENT_RATE, "chunks": CONCURRENT_CHUNKS, "wall_s": wall,
           "behind_s": {"max": max(behind), "p50": pct(behind, 50), "min": min(behind)},
           "chunks_per_s_delivered": CONCURRENT_STREAMS * CONCURRENT_CHUNKS / wall,
           "upstream_late_ms_max": max(s["upstream_late_ms"] for s in streams),
           "ttft_ms": summary([s["ttft_ms"] for s in streams]),
           "request_to_upstream_ms": summary([s["request_to_upstream_ms"] for s in streams])}
    out.update(lag_figures(streams))
    for name, before in cpu_before.items():
        out[f"{name}_cpu_percent_of_core"] = 100 * (cpu_seconds(pids[name]) - before) / wall
    return out


# ---- the whole part -------------------------------------------------------------------------------

def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def connections_per_request(before: dict[str, int], after: dict[str, int]) -> float:
    """New upstream connections per chat request: 1.0 when a client never reuses one."""
    return (after["chat_connections"] - before["chat_connections"]) / (after["chat_requests"] - before["chat_requests"])


def added_ttft(results: dict[str, Any], key: str, label: str) -> float:
    return results[label][key]["ttft_ms"]["p50"] - results["direct"][key]["ttft_ms"]["p50"]


def http_path_bench(root: Path, daemon_env: dict[str, str] | None = None, managed: bool = False) -> dict[str, Any]:
    """`managed`: the daemon launches the upstream itself (a `command` entry) instead of being
    pointed at one the bench started; the path of a request is meant to be the same."""
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"load_avg_at_start": loadavg(), "managed": managed}
    with upstream_and_daemon(root, daemon_env, managed) as (upstream, daemon):
        all_routes = routes(upstream.port, daemon.port)
        for route in all_routes:  # first requests pay for connections and lazy set-up
            run_stream(route, WARM_UP_CHUNKS, 3000)
        for route in all_routes:
            pid = None if route.label == "direct" else daemon.process.pid
            by_rate = results.setdefault(route.label, {})
            before = upstream.stats()
            print(f"http path: {route.label}, {SHORT[2]} short streams ...", file=sys.stderr, flush=True)
            by_rate["short"] = sequential(route, upstream, *SHORT, pid)
            for rate, chunks, count in RATES:
                print(f"http path: {route.label} at {rate} chunks/s ...", file=sys.stderr, flush=True)
                by_rate[str(rate)] = sequential(route, upstream, rate, chunks, count, pid)
            by_rate["upstream_connections_per_request"] = connections_per_request(before, upstream.stats())
            print(f"http path: {route.label}, {CONCURRENT_STREAMS} streams at once ...", file=sys.stderr, flush=True)
            by_rate["concurrent"] = concurrent(route, upstream, pid)
    for label in ("daemon_openai", "daemon_ollama"):
        for key in ("short", *(str(rate) for rate, *_ in RATES)):
            results[label][key]["added_ttft_ms"] = added_ttft(results, key, label)
    results["load_avg_at_end"] = loadavg()
    return results


def http_path_table(r: dict[str, Any]) -> str:
    labels = ("direct", "daemon_openai", "daemon_ollama")
    rows = [("HTTP engine path", "direct upstream", "daemon /v1/chat/completions", "daemon /api/chat", "goal")]

    def row(measure: str, cell: Callable[[str], str], goal: str = "", daemon_only: bool = False) -> None:
        rows.append((measure, *("-" if daemon_only and label == "direct" else cell(label) for label in labels), goal))

    def ttft_rows(at: str, name: str) -> None:
        row(f"{name}: TTFT p50 ms (added)", lambda label: fmt(r[label][at]["ttft_ms"]["p50"]) + (
            "" if label == "direct" else f" (+{fmt(r[label][at]['added_ttft_ms'])})"), "added < 2")
        row(f"{name}: to upstream + first-chunk relay, p50 ms", lambda label: (
            f"{fmt(r[label][at]['request_to_upstream_ms']['p50'])} + {fmt(r[label][at]['first_chunk_relay_ms']['p50'])}"))

    ttft_rows("short", f"{SHORT[2]} short streams")
    for rate, *_ in RATES:
        at = str(rate)
        ttft_rows(at, f"{rate} chunks/s")
        row(f"{rate} chunks/s: per-chunk lag p50/p99/max ms", lambda label: " / ".join(
            fmt(r[label][at]["lag_ms"][q], 3) for q in ("p50", "p99", "max")))
    row("daemon CPU s per 1000 chunks (30/300/3000)", lambda label: " / ".join(
        fmt(r[label][str(rate)]["daemon_cpu_s_per_1000_chunks"], 3) for rate, *_ in RATES), daemon_only=True)
    row("new upstream connections per request", lambda label: fmt(r[label]["upstream_connections_per_request"]),
        "0 (kept alive)", daemon_only=True)
    many = f"{CONCURRENT_STREAMS}x{CONCURRENT_RATE} chunks/s"
    row(f"{many}: behind at the last chunk, max / p50 s", lambda label: (
        f"{fmt(r[label]['concurrent']['behind_s']['max'], 3)} / {fmt(r[label]['concurrent']['behind_s']['p50'], 3)}"),
        "~0 (keeps up)")
    row(f"{many}: chunks/s delivered, all streams", lambda label: fmt(r[label]["concurrent"]["chunks_per_s_delivered"], 0),
        f"~{CONCURRENT_STREAMS * CONCURRENT_RATE}")
    row(f"{many}: TTFT p50 / max ms (to upstream p50 / max)", lambda label: "{} / {} ({} / {})".format(
        *(fmt(r[label]["concurrent"][key][q], 1) for key in ("ttft_ms", "request_to_upstream_ms") for q in ("p50", "max"))))
    row(f"{many}: per-chunk lag p50/p99 ms", lambda label: " / ".join(
        fmt(r[label]["concurrent"]["lag_ms"][q], 1) for q in ("p50", "p99")))
    row(f"{many}: daemon CPU % of a core", lambda label: fmt(r[label]["concurrent"]["daemon_cpu_percent_of_core"], 0),
        daemon_only=True)
    row(f"{many}: upstream's last write after its schedule, max ms",
        lambda label: fmt(r[label]["concurrent"]["upstream_late_ms_max"], 1), "~0")
    row(f"{many}: upstream CPU % of a core", lambda label: fmt(r[label]["concurrent"]["upstream_cpu_percent_of_core"], 0))
    rows.append(("load average at start / end", f"{r['load_avg_at_start']} / {r['load_avg_at_end']}", "", "", ""))
    return render_table(rows)
