"""The tokenizer service (:8101) as a real process supervising real tokenizer server processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness import net
from harness.net import free_port, wait_http, wait_until
from harness.paths import REPO_ROOT
from tokenizer_support import SMOLLM2_TOKENIZER, pid_alive, write_stub_tokenizer

SERVICE_STOP_TIMEOUT = 30.0


class Service:
    def __init__(self, process: subprocess.Popen, base_url: str) -> None:
        self.process = process
        self.http = net.client(base_url=base_url, timeout=30.0)

    def start(self, name: str, folder: Path, script: str, port: int) -> httpx.Response:
        body = {"tokenizer_path": str(folder), "tokenizer_py": script, "port": port}
        return self.http.post(f"/tokenizers/{name}/start", json=body)

    def entry(self, name: str) -> dict:
        return next(item for item in self.http.get("/tokenizers").json() if item["name"] == name)

    def child_pid(self, name: str) -> int:
        """The pid the stub script printed for its own child."""
        def find() -> int | None:
            lines = [line for line in self.entry(name)["log_tail"] if line.startswith("child ")]
            return int(lines[-1].split()[1]) if lines else None
        return wait_until(find, 30, "the stub's child pid in the log tail")


@pytest.fixture()
def service() -> Iterator[Service]:
    port = free_port()
    env = dict(os.environ, AXM1_TOKENIZER_SERVICE_RESTART_BACKOFF_MIN_S="0.2",
               AXM1_TOKENIZER_SERVICE_RESTART_BACKOFF_MAX_S="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenizer_service.service", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    service = Service(process, f"http://127.0.0.1:{port}")
    try:
        assert wait_http(f"http://127.0.0.1:{port}/health").json() == {"status": "ok"}
        yield service
    finally:
        service.http.close()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=SERVICE_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def answers(port: int, path: str = "/bos_id") -> bool:
    try:
        return net.get(f"http://127.0.0.1:{port}{path}", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def test_real_tokenizer_is_started_restarted_after_a_kill_and_stopped(service, tmp_path):
    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / "smollm2_tokenizer_uid.py").write_text(
        "import sys\n"
        "from tokenizer_service.server import main\n"
        f"sys.exit(main(['--tokenizer', {str(SMOLLM2_TOKENIZER)!r}, *sys.argv[1:]]))\n"
    )
    port = free_port()
    started = service.start("smollm2", folder, "smollm2_tokenizer_uid.py", port)
    assert started.status_code == 200
    first = started.json()
    assert first["name"] == "smollm2" and first["port"] == port and first["state"] == "starting"
    assert pid_alive(first["pid"])
    wait_http(f"http://127.0.0.1:{port}/get_uid", 60, ok_only=True)
    # Idempotent: the same start again keeps the same process.
    assert service.start("smollm2", folder, "smollm2_tokenizer_uid.py", port).json()["pid"] == first["pid"]

    os.kill(first["pid"], signal.SIGKILL)
    restarted = wait_until(
        lambda: (e := service.entry("smollm2"))["restarts"] == 1 and e["pid"] not in (None, first["pid"]) and e,
        30, "the killed tokenizer server to be restarted")
    assert restarted["last_exit"] == -signal.SIGKILL
    wait_http(f"http://127.0.0.1:{port}/get_uid", 60, ok_only=True)  # restarted
    assert "Server running at http://127.0.0.1:" in "\n".join(service.entry("smollm2")["log_tail"])

    stopped = service.http.post("/tokenizers/smollm2/stop")
    assert stopped.json() == {"name": "smollm2", "state": "stopped"}
    assert not pid_alive(restarted["pid"])
    assert not answers(port)
    assert service.entry("smollm2")["pid"] is None


def test_script_outside_its_folder_is_refused(service, tmp_path):
    folder = tmp_path / "model" / "tokenizer"
    write_stub_tokenizer(folder)
    outside = write_stub_tokenizer(tmp_path / "elsewhere")
    (folder / "link.py").symlink_to(outside)
    for script in ["../../elsewhere/stub_tokenizer.py", str(outside), "link.py", "missing.py"]:
        reply = service.start("evil", folder, script, free_port())
        assert reply.status_code == 400, script
        assert "error" in reply.json()
    assert service.start("evil", tmp_path / "no-such-folder", "stub_tokenizer.py", free_port()).status_code == 400
    assert service.http.get("/tokenizers").json() == []


def test_stop_of_an_unknown_tokenizer_is_a_404(service):
    reply = service.http.post("/tokenizers/nobody/stop")
    assert reply.status_code == 404 and "error" in reply.json()


def test_a_crashing_script_is_restarted_with_back_off(service, tmp_path):
    write_stub_tokenizer(tmp_path, exit_code=3)
    assert service.start("crashy", tmp_path, "stub_tokenizer.py", free_port()).status_code == 200
    entry = wait_until(lambda: (e := service.entry("crashy"))["restarts"] >= 2 and e, 30, "two restarts")
    assert entry["last_exit"] == 3
    assert any("stub running in " + str(tmp_path) in line for line in entry["log_tail"])  # cwd = folder
    # Delays of 0.2, 0.4, 0.8, 1, 1 … s: no more than a handful of restarts in a few seconds.
    time.sleep(3)
    assert service.entry("crashy")["restarts"] <= entry["restarts"] + 6
    assert service.http.post("/tokenizers/crashy/stop").json()["state"] == "stopped"


def test_a_port_served_by_a_hand_started_tokenizer_is_external_until_it_goes(service, tmp_path):
    script = write_stub_tokenizer(tmp_path)
    port = free_port()
    by_hand = subprocess.Popen([sys.executable, str(script), "--host", "127.0.0.1", "--port", str(port)],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/bos_id", 30, ok_only=True)  # the hand-started one
        reply = service.start("manual", tmp_path, "stub_tokenizer.py", port).json()
        assert reply["state"] == "external" and reply["pid"] is None
    finally:
        os.killpg(by_hand.pid, signal.SIGKILL)  # the stub and its child
        by_hand.wait()
    ours = wait_until(lambda: (e := service.entry("manual"))["pid"] and e, 30, "our own server to take over")
    assert ours["state"] == "starting" and ours["pid"] != by_hand.pid
    wait_http(f"http://127.0.0.1:{port}/bos_id", 30, ok_only=True)  # ours, on the freed port


def test_shutdown_leaves_no_orphans(service, tmp_path):
    write_stub_tokenizer(tmp_path)
    server_pid = service.start("stub", tmp_path, "stub_tokenizer.py", free_port()).json()["pid"]
    child_pid = service.child_pid("stub")
    assert pid_alive(server_pid) and pid_alive(child_pid)
    service.process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert service.process.wait(timeout=SERVICE_STOP_TIMEOUT) in (0, -signal.SIGTERM)
    # The stub's child has no parent-death signal: only the group stop at shutdown ends it.
    wait_until(lambda: not pid_alive(server_pid) and not pid_alive(child_pid), 10, "the whole group to be gone")


def test_a_killed_service_takes_its_servers_with_it(service, tmp_path):
    write_stub_tokenizer(tmp_path)
    server_pid = service.start("stub", tmp_path, "stub_tokenizer.py", free_port()).json()["pid"]
    child_pid = service.child_pid("stub")
    service.process.kill()  # no chance to clean up: the kernel's parent-death signal does it
    service.process.wait(timeout=10)
    try:
        wait_until(lambda: not pid_alive(server_pid), 10, "the tokenizer server to die with the service")
    finally:
        # The stub's own child has no parent-death signal; clean it up by hand.
        if pid_alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)
