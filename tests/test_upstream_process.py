"""The pure parts of managed upstreams and device memory: command expansion, load progress read
from a server's output, and which idle models make room."""
from __future__ import annotations

import sys

import pytest

from llm_service.engines.http import HttpConfig
from llm_service.engines.upstream_process import expand_command, progress_in_line
from llm_service.memory import Holding, plan_room


def test_expand_command_fills_the_port_and_names_our_own_program() -> None:
    command, env = expand_command(
        ["vllm", "serve", "Qwen/Qwen3-0.6B", "--port", "{port}", '{"json": "kept"}'], {"URL": "http://{host}:{port}"}, port=8123
    )
    assert command == ["vllm", "serve", "Qwen/Qwen3-0.6B", "--port", "8123", '{"json": "kept"}']
    assert env == {"URL": "http://127.0.0.1:8123"}
    own, _ = expand_command(["axm1-llm", "worker", "embeddings", "--port", "{port}"], {}, port=9)
    assert own == [sys.executable, "-m", "llm_service.cli", "worker", "embeddings", "--port", "9"]


@pytest.mark.parametrize(
    "line, percent",
    [
        ("Loading checkpoint shards:  50%|█████     | 1/2 [00:01<00:01]", 50.0),
        ("loading weights 3/4", 75.0),
        ("INFO: model loaded", None),
        ("served on 127.0.0.1:8000/v1", None),
        ("progress 250%", None),
        ("2026-12-02 10:00:01 load 12.5% done", 12.5),
    ],
)
def test_progress_in_line(line: str, percent: float | None) -> None:
    assert progress_in_line(line) == percent


def test_plan_room_unloads_least_recently_used_idle_models_only_as_needed() -> None:
    loaded = [Holding("old", 400, 1.0, True), Holding("busy", 400, 0.5, False), Holding("new", 400, 3.0, True)]
    plan = plan_room(400, 1300, loaded)
    assert plan.victims == ("old",) and plan.fits
    assert plan_room(100, 1300, loaded).victims == ()
    # Not enough even after every idle model: unload nothing rather than half.
    plan = plan_room(1000, 1300, loaded)
    assert plan.victims == () and not plan.fits and plan.free_after == 1300 - 400  # all but the busy one


def test_managed_config_fields() -> None:
    config = HttpConfig(command="vllm serve m --port {port}", env='{"HF_TOKEN_PATH": "/x"}', port=8000)
    assert config.command == ("vllm", "serve", "m", "--port", "{port}") and config.env == {"HF_TOKEN_PATH": "/x"}
    with pytest.raises(ValueError, match="AXM1_"):
        HttpConfig(command=["x"], env={"AXM1_API_KEYS": "k"})
    with pytest.raises(ValueError, match="non-empty"):
        HttpConfig(command=[])
    with pytest.raises(ValueError, match="starting with"):
        HttpConfig(command=["x"], health_path="health")
