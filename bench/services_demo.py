"""A long meeting transcript through the two example services on the SmolLM2 demo model (issue
16): chunks, time per chunk, total time, and the first lines of each answer.

    ./run bench --only services
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from harness.daemon import running_daemon
from harness.paths import REPO_ROOT

PEOPLE = ("Anna", "Ben", "Chloe", "David")
TOPICS = (
    ("the release date", ["we could ship on the twelfth if testing finishes on time",
                          "the installer still fails on older Raspberry Pi images",
                          "marketing needs two weeks of notice before any date is announced"]),
    ("the support backlog", ["there are forty open tickets, most about Wi-Fi setup",
                             "a short troubleshooting page would answer half of them",
                             "Chloe offered to write that page by Friday"]),
    ("the budget", ["the cloud bill went up by eighteen percent last month",
                    "most of it is the staging cluster that nobody turned off",
                    "we agreed to shut staging down every night"]),
    ("hiring", ["two candidates passed the technical interview",
                "David will call their references this week",
                "an offer should go out before the end of the month"]),
    ("the camera integration", ["Frigate events now reach the card in about a second",
                                "descriptions are still too long for the phone notifications",
                                "Ben will try a shorter prompt and report next week"]),
)
FILLERS = ("okay, so", "right,", "um,", "well,", "I think", "honestly,", "yeah,", "so basically")


def meeting(target_words: int, seed: int = 3) -> str:
    """A meeting transcript of about `target_words` words: speakers, topics, decisions, fillers."""
    chooser = random.Random(seed)
    lines, words = [], 0
    while words < target_words:
        topic, points = chooser.choice(TOPICS)
        for point in chooser.sample(points, k=len(points)):
            speaker = chooser.choice(PEOPLE)
            opener = chooser.choice(FILLERS)
            line = f"{speaker}: {opener} about {topic}, {point}."
            if chooser.random() < 0.4:
                line += f" {chooser.choice(FILLERS).capitalize()} we should write that down."
            lines.append(line)
            words += len(line.split())
    return "\n".join(lines) + "\n"


def _run(url: str, service: str, transcript: str) -> dict[str, Any]:
    started = time.monotonic()
    chunks: list[dict[str, Any]] = []
    answer: dict[str, Any] = {}
    with httpx.stream("POST", f"{url}/api/services/{service}", json={"fields": {"transcript": transcript},
                      "flavor": "card", "stream": True}, timeout=httpx.Timeout(30, read=None)) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.strip():
                continue
            event = json.loads(line)
            if event.get("event") == "chunk_done":
                chunks.append(event)
                print(f"  {service}: step {len(chunks)} done at {time.monotonic() - started:.1f} s", file=sys.stderr,
                      flush=True)
            if event.get("done"):
                answer = event
            if "error" in event:
                raise RuntimeError(event["error"])
    total = time.monotonic() - started
    seconds = [c.get("seconds") for c in answer.get("chunks", []) if c.get("seconds") is not None]
    return {"total_s": round(total, 1), "steps": len(chunks), "chunks": len(answer.get("chunks", [])),
            "combine_steps": len(answer.get("combine") or []),
            "seconds_per_chunk": [round(s, 1) for s in seconds],
            "first_lines": "\n".join((answer.get("response") or "").strip().splitlines()[:6]),
            "warnings": answer.get("warnings", [])}


def services_demo(root: Path, daemon_env: dict[str, str], words: int = 1500) -> dict[str, Any]:
    entries = json.loads((REPO_ROOT / "model" / "model-descriptor.json").read_text())
    demo = next(e for e in entries if e["model_name"] == "smollm2-135m")
    for key in ("model_path", "tokenizer_path"):
        demo[key] = str(REPO_ROOT / "model" / demo[key])
    transcript = meeting(words)
    results: dict[str, Any] = {"transcript_words": len(transcript.split()), "transcript_chars": len(transcript)}
    root.mkdir(parents=True)
    with running_daemon(root, [demo], "--services-dir", str(REPO_ROOT / "services"), fast_restarts=False,
                        faults=False, extra_env=daemon_env, start_timeout=120) as daemon:
        daemon.wait_state("smollm2-135m", "ready", timeout=300)
        for service in ("meeting-summary", "transcript-cleanup"):
            print(f"services: {service} ...", file=sys.stderr, flush=True)
            results[service] = _run(daemon.url, service, transcript)
            print(json.dumps({service: results[service]}, indent=1), file=sys.stderr, flush=True)  # kept if stopped later
    return results


def services_table(results: dict[str, Any]) -> str:
    rows = [f"services on SmolLM2-135M (a {results['transcript_words']}-word meeting transcript)"]
    for service in ("meeting-summary", "transcript-cleanup"):
        r = results[service]
        rows.append(f"  {service}: {r['chunks']} chunks + {r['combine_steps']} combine steps, {r['total_s']} s in all, "
                    f"per chunk {r['seconds_per_chunk']}")
        rows.extend("    | " + line for line in r["first_lines"].splitlines())
    return "\n".join(rows)
