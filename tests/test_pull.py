"""Fetching published model folders (issue 14, section 3): `/api/pull` and `axm1-llm pull`
with the real `huggingface_hub` client against a local hub in Hugging Face's layout; the folder
is served once whole, a broken connection is retried, a failed pull is taken up again without
fetching the files it had, a missing repository or a full disk is a clear error that leaves no
folder served, and `/api/delete` removes a pulled folder."""
from __future__ import annotations

import json
import os
import resource
import subprocess
from pathlib import Path

import httpx
import pytest

from harness.daemon import running_daemon
from harness.models import scripted_model
from harness.paths import AXM1_LLM
from hub_support import LocalHub
from llm_service.pull import PARTIAL, hub_repo, progress_line

REPO = "AXERA-TECH/Tiny-Chat"
# The harness keeps daemons offline (no model is ever fetched behind a test's back); a pull is
# the one explicit fetch. Xet off: the local hub serves plain HTTP files.
HUB_ENV = {"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}


def test_repository_names() -> None:
    assert hub_repo("AXERA-TECH/Qwen3-1.7B") == "AXERA-TECH/Qwen3-1.7B"
    assert hub_repo("hf.co/AXERA-TECH/Qwen3-1.7B") == "AXERA-TECH/Qwen3-1.7B"
    assert hub_repo("https://huggingface.co/AXERA-TECH/Qwen3-1.7B") == "AXERA-TECH/Qwen3-1.7B"
    assert hub_repo("AXERA-TECH/Qwen3-1.7B:latest") == "AXERA-TECH/Qwen3-1.7B"
    for not_a_repo in ("qwen3:1.7b", "a/b/c", "../etc", "a/..", "x/ y", ""):
        assert hub_repo(not_a_repo) is None, not_a_repo
    assert progress_line("w.bin", "ab", 10, 4) == {"status": "pulling w.bin", "digest": "sha256:ab", "total": 10,
                                                   "completed": 4}


@pytest.fixture
def hub(tmp_path):
    """A hub with one published-shaped folder: the scripted runner's script, its tokenizer
    script and files, and 3 MB of "weights"."""
    source = tmp_path / "published"
    entry = scripted_model(source, "Tiny-Chat", port_from_dollar1=False, reply_words=3)
    folder = Path(entry["model_path"])
    (folder / "tiny-ax650").mkdir()
    (folder / "tiny-ax650" / "weights.bin").write_bytes(os.urandom(3_000_000))
    local = LocalHub()
    local.add_folder(REPO, folder)
    local.start()
    yield local
    local.stop()


def pull_lines(daemon, name: str) -> list[dict]:
    with daemon.client() as client, client.stream("POST", "/api/pull", json={"model": name}) as reply:
        assert reply.status_code == 200, reply.read()
        return [json.loads(line) for line in reply.iter_lines() if line.strip()]


def test_pull_serves_the_folder_and_delete_removes_it(tmp_path, hub) -> None:
    root = tmp_path / "box"
    root.mkdir()
    with running_daemon(root, [], "--hub-endpoint", hub.url, discover=True, extra_env=HUB_ENV) as daemon:
        hub.cut_once[(REPO, "tiny-ax650/weights.bin")] = 1_000_000  # the connection breaks once, a third in
        lines = pull_lines(daemon, REPO)
        assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
        weights = [line for line in lines if line.get("status") == "pulling tiny-ax650/weights.bin"]
        assert weights[-1]["completed"] == weights[-1]["total"] == 3_000_000
        assert weights[-1]["digest"].startswith("sha256:")
        assert {"status": "verifying sha256 digest"} in lines
        assert (root / "Tiny-Chat" / "tiny-ax650" / "weights.bin").read_bytes() == hub.repos[REPO]["tiny-ax650/weights.bin"]
        assert not (root / "Tiny-Chat" / ".cache").exists()
        with daemon.client() as client:
            answer = client.post("/api/generate", json={"model": "tiny-chat", "prompt": "hi", "stream": False})
            assert answer.status_code == 200 and answer.json()["response"].startswith("You said: hi.")
            # Pulled again: already here.
            again = client.post("/api/pull", json={"model": REPO, "stream": False})
            assert again.status_code == 200 and again.json()["status"] == "success"
            # Deleted: folder gone, model gone.
            assert client.request("DELETE", "/api/delete", json={"model": "tiny-chat"}).status_code == 200
            assert not (root / "Tiny-Chat").exists()
            assert client.post("/api/generate", json={"model": "tiny-chat", "prompt": "x", "stream": False}).status_code == 404


def test_errors_leave_no_folder_served(tmp_path, hub) -> None:
    root = tmp_path / "box"
    root.mkdir()
    declared = scripted_model(root, "declared", reply_words=2)
    with running_daemon(root, [declared], "--hub-endpoint", hub.url, discover=True,
                        extra_env=HUB_ENV) as daemon:
        with daemon.client() as client:
            missing = client.post("/api/pull", json={"model": "AXERA-TECH/Nope", "stream": False})
            assert missing.status_code == 404 and "no such repository" in missing.json()["error"]
            plain = client.post("/api/pull", json={"model": "qwen3:1.7b", "stream": False})
            assert plain.status_code == 404 and "names no repository" in plain.json()["error"]
            kept = client.request("DELETE", "/api/delete", json={"model": "declared"})
            assert kept.status_code == 400 and "descriptor" in kept.json()["error"]
        # Broken off for good (every attempt cut): an error, nothing served, the files kept to resume.
        broken = _always_cut(hub)
        lines = pull_lines(daemon, REPO)
        broken.clear()
        assert "error" in lines[-1], lines[-3:]
        assert not (root / "Tiny-Chat").exists() and (root / PARTIAL / "Tiny-Chat").exists()
        status = daemon.get("/api/status")
        assert all(m["name"] != "tiny-chat" for m in status["models"])
        # The next pull goes on from what is there: the files done before the break are not
        # fetched again (the hub client restarts a broken file from its start), and it succeeds.
        hub.requests.clear()
        assert pull_lines(daemon, REPO)[-1] == {"status": "success"}
        fetched = [path.rsplit("/", 1)[-1] for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
        assert fetched == ["weights.bin"], hub.requests


def _always_cut(hub: LocalHub) -> dict:
    """Every request for the weights breaks off until the returned dict is cleared."""
    class Always(dict):
        def pop(self, key, default=None):  # noqa: ANN001
            return 500_000 if key == (REPO, "tiny-ax650/weights.bin") and self else default
    always = Always({(REPO, "tiny-ax650/weights.bin"): 500_000})
    hub.cut_once = always
    return always


def test_a_full_disk_is_a_clear_error(tmp_path, hub) -> None:
    root = tmp_path / "box"
    root.mkdir()
    # The daemon may write no file over 2 MB: the 3 MB weights cannot be written (EFBIG, as on a
    # full disk; Python ignores SIGXFSZ, so the write fails instead of killing the process).
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))
    with running_daemon(root, [], "--hub-endpoint", hub.url, discover=True, extra_env=HUB_ENV,
                        preexec=limit) as daemon:
        with daemon.client() as client:
            reply = client.post("/api/pull", json={"model": REPO, "stream": False})
        assert reply.status_code == 507, reply.text
        assert "not enough space" in reply.json()["error"]
        assert not (root / "Tiny-Chat").exists()


def test_the_pull_command(tmp_path, hub) -> None:
    root = tmp_path / "box"
    root.mkdir()
    with running_daemon(root, [], "--hub-endpoint", hub.url, discover=True, extra_env=HUB_ENV) as daemon:
        result = subprocess.run([str(AXM1_LLM), "pull", REPO, "--url", daemon.url], capture_output=True, text=True,
                                timeout=120, env={k: v for k, v in os.environ.items() if not k.startswith("AXM1_")})
        assert result.returncode == 0, result.stderr
        assert "pulling manifest" in result.stdout and "100.0% of 3.0 MB" in result.stdout
        assert result.stdout.rstrip().endswith("success")
        failed = subprocess.run([str(AXM1_LLM), "pull", "AXERA-TECH/Nope", "--url", daemon.url], capture_output=True,
                                text=True, timeout=60)
        assert failed.returncode == 1 and "no such repository" in failed.stderr
