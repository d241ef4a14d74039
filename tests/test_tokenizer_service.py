"""The tokenizer service (:8101) as a real process supervising real tokenizer server processes:
it starts only what the descriptor names, for callers holding its secret, and a server is
`running` only when the socket on its port is its own."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness import net
from harness.daemon import write_descriptor
from harness.models import published_model
from harness.net import free_port, wait_http, wait_until
from harness.paths import AXM1_LLM, REPO_ROOT
from tokenizer_service.service import (
    BLOCKED_RECHECK_SECONDS,
    holders,
    inspect_port,
    listening_inodes,
    session_members,
    socket_inodes,
    taken_message,
    tcp_tables,
)
from tokenizer_support import SMOLLM2_TOKENIZER, pid_alive, squatter, tokenizer_entry, write_stub_tokenizer

SERVICE_STOP_TIMEOUT = 30.0
SECRET = "test-secret-0123456789abcdef"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


class Service:
    def __init__(self, process: subprocess.Popen, base_url: str, descriptor: Path) -> None:
        self.process = process
        self.descriptor = descriptor
        self.http = net.client(base_url=base_url, timeout=30.0, headers={"Authorization": f"Bearer {SECRET}"})

    def models(self, *entries: dict) -> None:
        write_descriptor(self.descriptor, list(entries))

    def start(self, name: str) -> httpx.Response:
        return self.http.post(f"/tokenizers/{name}/start")

    def entry(self, name: str) -> dict:
        reply = self.http.get(f"/tokenizers/{name}")
        assert reply.status_code == 200, reply.text
        return reply.json()

    def wait_state(self, name: str, state: str, timeout: float = 60) -> dict:
        return wait_until(lambda: (e := self.entry(name))["state"] == state and e, timeout, f"{name} to be {state}")

    def child_pid(self, name: str) -> int:
        """The pid the stub script printed for its own child."""
        def find() -> int | None:
            lines = [line for line in self.entry(name)["log_tail"] if line.startswith("child ")]
            return int(lines[-1].split()[1]) if lines else None
        return wait_until(find, 30, "the stub's child pid in the log tail")


def service_command(port: int, descriptor: Path, data_dir: Path) -> list[str]:
    # The module's entry point is the CLI's `tokenizer-service`.
    return [sys.executable, "-m", "tokenizer_service.service", "--host", "127.0.0.1", "--port", str(port),
            "--descriptor", str(descriptor), "--data-dir", str(data_dir)]


@pytest.fixture()
def service(tmp_path) -> Iterator[Service]:
    port = free_port()
    descriptor = tmp_path / "model-descriptor.json"
    write_descriptor(descriptor, [])
    env = dict(os.environ, AXM1_TOKENIZER_SERVICE_RESTART_BACKOFF_MIN_S="0.2",
               AXM1_TOKENIZER_SERVICE_RESTART_BACKOFF_MAX_S="1", AXM1_TOKENIZER_SERVICE_SECRET=SECRET)
    process = subprocess.Popen(service_command(port, descriptor, tmp_path / "data"),
                               cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    service = Service(process, f"http://127.0.0.1:{port}", descriptor)
    try:
        assert wait_http(f"http://127.0.0.1:{port}/health", process=process).json() == {"status": "ok"}
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


def evil_script(folder: Path, touched: Path) -> str:
    """A script an attacker would like the service to run: it leaves `touched` behind."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evil.py").write_text(f"from pathlib import Path\nPath({str(touched)!r}).touch()\n")
    return "evil.py"


def test_real_tokenizer_is_started_restarted_after_a_kill_and_stopped(service, tmp_path):
    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / "smollm2_tokenizer_uid.py").write_text(
        "import sys\n"
        "from tokenizer_service.server import main\n"
        f"sys.exit(main(['--tokenizer', {str(SMOLLM2_TOKENIZER)!r}, *sys.argv[1:]]))\n"
    )
    port = free_port()
    service.models(tokenizer_entry(folder, "smollm2", "smollm2_tokenizer_uid.py", port))
    started = service.start("smollm2")
    assert started.status_code == 200, started.text
    first = started.json()
    assert first["name"] == "smollm2" and first["port"] == port and first["state"] in ("starting", "running")
    assert pid_alive(first["pid"])
    running = service.wait_state("smollm2", "running")
    assert running["pid"] == first["pid"] and running["detail"] is None
    assert wait_http(f"http://127.0.0.1:{port}/get_uid", 5, ok_only=True)  # running means serving
    # Idempotent: the same start again keeps the same process.
    assert service.start("smollm2").json()["pid"] == first["pid"]

    os.kill(first["pid"], signal.SIGKILL)
    restarted = wait_until(
        lambda: (e := service.entry("smollm2"))["restarts"] == 1 and e["pid"] not in (None, first["pid"]) and e,
        30, "the killed tokenizer server to be restarted")
    assert restarted["last_exit"] == -signal.SIGKILL
    service.wait_state("smollm2", "running")
    wait_http(f"http://127.0.0.1:{port}/get_uid", 5, ok_only=True)  # restarted
    assert "Server running at http://127.0.0.1:" in "\n".join(service.entry("smollm2")["log_tail"])

    stopped = service.http.post("/tokenizers/smollm2/stop")
    assert stopped.json() == {"name": "smollm2", "state": "stopped"}
    assert not pid_alive(restarted["pid"])
    assert not answers(port)
    assert service.entry("smollm2")["pid"] is None


def test_the_descriptor_is_read_again_at_each_start(service, tmp_path):
    write_stub_tokenizer(tmp_path / "m")
    first_port, second_port = free_port(), free_port()
    service.models(tokenizer_entry(tmp_path / "m", "m", "stub_tokenizer.py", first_port))
    first = service.start("m").json()
    service.wait_state("m", "running", 30)
    service.models(tokenizer_entry(tmp_path / "m", "m", "stub_tokenizer.py", second_port))
    second = service.start("m").json()
    assert second["port"] == second_port and second["pid"] != first["pid"]
    assert not pid_alive(first["pid"])
    service.wait_state("m", "running", 30)
    assert answers(second_port) and not answers(first_port)


def test_a_script_outside_its_folder_is_refused(service, tmp_path):
    folder = tmp_path / "model"
    write_stub_tokenizer(folder)
    outside = write_stub_tokenizer(tmp_path / "elsewhere")
    (folder / "link.py").symlink_to(outside)
    scripts = ["../elsewhere/stub_tokenizer.py", str(outside), "link.py", "missing.py"]
    service.models(*(tokenizer_entry(folder, f"evil{i}", script, free_port()) for i, script in enumerate(scripts)),
                   tokenizer_entry(folder, "no-folder", "stub_tokenizer.py", free_port(),
                                   tokenizer_path=str(tmp_path / "no-such-folder")))
    for name in [f"evil{i}" for i in range(len(scripts))] + ["no-folder"]:
        reply = service.start(name)
        assert reply.status_code == 400, (name, reply.text)
        assert "invalid" in reply.json()["error"] and "tokenizer_" in reply.json()["error"], reply.text
    assert service.http.get("/tokenizers").json() == []


def test_requests_without_the_secret_are_refused_and_start_nothing(service, tmp_path):
    touched = tmp_path / "pwned"
    script = evil_script(tmp_path / "attacker", touched)
    service.models(tokenizer_entry(tmp_path / "attacker", "victim", script, free_port()))
    body = {"tokenizer_path": str(tmp_path / "attacker"), "tokenizer_py": script, "port": free_port()}
    base = service.http.base_url
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": SECRET},
                    {"Authorization": f"Basic {SECRET}"}, {"Authorization": f"Bearer {SECRET}x"}]:
        with net.client(base_url=base, headers=headers, timeout=10) as http:
            for method, path in [("POST", "/tokenizers/victim/start"), ("POST", "/tokenizers/x/start"),
                                 ("POST", "/tokenizers/victim/stop"), ("GET", "/tokenizers"),
                                 ("GET", "/tokenizers/victim"), ("GET", "/docs"), ("GET", "/nowhere")]:
                reply = http.request(method, path, json=body)
                assert reply.status_code == 401, (headers, method, path, reply.text)
                assert "secret" in reply.json()["error"]
            assert http.get("/health").json() == {"status": "ok"}  # liveness needs no secret
    time.sleep(1)
    assert not touched.exists()
    assert service.http.get("/tokenizers").json() == []


def test_only_models_of_the_descriptor_start_and_a_request_body_is_ignored(service, tmp_path):
    touched = tmp_path / "pwned"
    script = evil_script(tmp_path / "attacker", touched)
    write_stub_tokenizer(tmp_path / "m")
    port = free_port()
    service.models(tokenizer_entry(tmp_path / "m", "m", "stub_tokenizer.py", port),
                   {"model_name": "external", "run_cmd": "run.sh", "model_path": str(tmp_path / "m"),
                    "tokenizer_port": str(free_port())})
    evil = {"tokenizer_path": str(tmp_path / "attacker"), "tokenizer_py": script, "port": free_port()}
    reply = service.http.post("/tokenizers/x/start", json=evil)
    assert reply.status_code == 404 and "no model named 'x'" in reply.json()["error"], reply.text
    reply = service.http.post("/tokenizers/external/start")
    assert reply.status_code == 400 and "no tokenizer_py" in reply.json()["error"], reply.text
    # A known name with a body naming another script runs the descriptor's script, on its port.
    started = service.http.post("/tokenizers/m/start", json=evil).json()
    assert started["port"] == port
    service.wait_state("m", "running", 30)
    assert any("stub running in " + str(tmp_path / "m") in line for line in service.entry("m")["log_tail"])
    time.sleep(0.5)
    assert not touched.exists()
    assert [e["name"] for e in service.http.get("/tokenizers").json()] == ["m"]


def test_stop_of_an_unknown_tokenizer_is_a_404(service):
    reply = service.http.post("/tokenizers/nobody/stop")
    assert reply.status_code == 404 and "error" in reply.json()
    reply = service.http.get("/tokenizers/nobody")
    assert reply.status_code == 404 and "error" in reply.json()


def test_a_crashing_script_is_restarted_with_back_off(service, tmp_path):
    write_stub_tokenizer(tmp_path / "crashy", exit_code=3)
    service.models(tokenizer_entry(tmp_path / "crashy", "crashy", "stub_tokenizer.py", free_port()))
    assert service.start("crashy").status_code == 200
    entry = wait_until(lambda: (e := service.entry("crashy"))["restarts"] >= 2 and e, 30, "two restarts")
    assert entry["last_exit"] == 3 and entry["state"] != "running"
    assert any("stub running in " + str(tmp_path / "crashy") in line for line in entry["log_tail"])  # cwd = folder
    # Delays of 0.2, 0.4, 0.8, 1, 1 … s: no more than a handful of restarts in a few seconds.
    time.sleep(3)
    assert service.entry("crashy")["restarts"] <= entry["restarts"] + 6
    assert service.http.post("/tokenizers/crashy/stop").json()["state"] == "stopped"


@pytest.mark.parametrize("answering", [True, False], ids=["http-squatter", "silent-squatter"])
def test_a_squatter_blocks_the_model_until_it_goes_and_never_gets_a_request(service, tmp_path, answering):
    write_stub_tokenizer(tmp_path / "m")
    port = free_port()
    service.models(tokenizer_entry(tmp_path / "m", "m", "stub_tokenizer.py", port))
    if answering:
        other = squatter(port, tmp_path / "received.jsonl")
    else:  # a socket that only listens: no HTTP needed to take a port
        other = silent_listener(port)
    with other as held:
        reply = service.start("m").json()
        assert reply["state"] == "blocked" and reply["pid"] is None, reply
        assert reply["detail"].startswith(f"port {port} is taken by another process (pid {held.pid}: ")
        time.sleep(BLOCKED_RECHECK_SECONDS * 1.5)  # re-checked: still blocked, nothing of ours spawned
        entry = service.entry("m")
        assert entry["state"] == "blocked" and entry["pid"] is None and entry["restarts"] == 0
        assert not any("stub running" in line for line in entry["log_tail"])
        if answering:
            assert held.received() == []
    ours = service.wait_state("m", "running", 30)  # the port is free: ours starts
    assert ours["pid"] not in (None, held.pid) and ours["detail"] is None
    assert answers(port)


@contextlib.contextmanager
def silent_listener(port: int) -> Iterator[subprocess.Popen]:
    """A socket that only listens, in a process of its own (so that it has a pid to name)."""
    code = ("import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); "
            "s.listen(); print('listening', flush=True); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", code, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "listening\n"
        yield process
    finally:
        process.kill()
        process.wait(10)
        process.stdout.close()


def test_shutdown_leaves_no_orphans(service, tmp_path):
    write_stub_tokenizer(tmp_path / "stub")
    service.models(tokenizer_entry(tmp_path / "stub", "stub", "stub_tokenizer.py", free_port()))
    server_pid = service.start("stub").json()["pid"]
    child_pid = service.child_pid("stub")
    assert pid_alive(server_pid) and pid_alive(child_pid)
    service.process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert service.process.wait(timeout=SERVICE_STOP_TIMEOUT) in (0, -signal.SIGTERM)
    # The stub's child has no parent-death signal: only the group stop at shutdown ends it.
    wait_until(lambda: not pid_alive(server_pid) and not pid_alive(child_pid), 10, "the whole group to be gone")


def test_a_killed_service_takes_its_servers_with_it(service, tmp_path):
    write_stub_tokenizer(tmp_path / "stub")
    service.models(tokenizer_entry(tmp_path / "stub", "stub", "stub_tokenizer.py", free_port()))
    server_pid = service.start("stub").json()["pid"]
    child_pid = service.child_pid("stub")
    service.process.kill()  # no chance to clean up: the kernel's parent-death signal does it
    service.process.wait(timeout=10)
    try:
        wait_until(lambda: not pid_alive(server_pid), 10, "the tokenizer server to die with the service")
    finally:
        # The stub's own child has no parent-death signal; clean it up by hand.
        if pid_alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


@pytest.mark.parametrize(("missing", "message"), [("AXM1_TOKENIZER_SERVICE_SECRET", "no secret"),
                                                  ("--descriptor", "no descriptor")])
def test_run_alone_it_refuses_to_start_without_a_secret_or_a_descriptor(tmp_path, missing, message):
    descriptor = tmp_path / "model-descriptor.json"
    write_descriptor(descriptor, [])
    env = {k: v for k, v in os.environ.items() if not k.startswith("AXM1_")}
    command = [str(AXM1_LLM), "tokenizer-service", "--port", str(free_port()), "--data-dir", str(tmp_path / "data")]
    if missing != "AXM1_TOKENIZER_SERVICE_SECRET":
        env["AXM1_TOKENIZER_SERVICE_SECRET"] = SECRET
    if missing != "--descriptor":
        command += ["--descriptor", str(descriptor)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    short = subprocess.run([*command, "--descriptor", str(descriptor)], env=dict(env, AXM1_TOKENIZER_SERVICE_SECRET="short"),
                           capture_output=True, text=True, timeout=60)
    assert short.returncode == 2 and "--secret" in short.stderr and "16" in short.stderr, short.stderr


# ---- who listens on a port: the /proc helpers ----------------------------------------------------

TCP_TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3039 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 111 1 0 100 0 0 10 0
   1: 00000000:3039 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 222 1 0 100 0 0 10 0
   2: 0100007F:3039 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 333 1 0 20 4 30 10 -1
   3: 0100007F:303A 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 444 1 0 100 0 0 10 0
   4: 0100007F:9C40 0100007F:3039 06 00000000:00000000 03:00000F8A 00000000     0        0 0 3
"""
TCP6_TABLE = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:3039 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 555 1 0 100 0 0 10 0
"""


def test_listening_inodes_reads_listeners_of_the_port_on_every_address():
    assert listening_inodes(12345, [TCP_TABLE, TCP6_TABLE]) == {111, 222, 555}  # not the connection (333)
    assert listening_inodes(12346, [TCP_TABLE]) == {444}
    assert listening_inodes(40000, [TCP_TABLE]) == set()  # a time-wait socket is no listener
    assert listening_inodes(12345, []) == set()


def test_the_proc_helpers_find_a_real_listening_socket_and_its_holder():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        inode = os.fstat(listener.fileno()).st_ino
        assert listening_inodes(port, tcp_tables()) == {inode}
        assert inode in socket_inodes(os.getpid())
        assert os.getpid() in holders({inode})
        assert os.getpid() in session_members(os.getsid(0))
        assert inspect_port(port, os.getsid(0)) == (True, None)  # our session's socket
        ours, taken = inspect_port(port, None)
        assert not ours and taken.startswith(f"port {port} is taken by another process (pid {os.getpid()}: ")
    assert inspect_port(port, None) == (False, None)  # closed: nobody listens
    assert taken_message(80, []) == "port 80 is taken by another process (pid unknown: a process this service may not inspect)"


def test_auto_runs_our_server_on_the_files_the_stock_script_loads_and_stock_runs_the_script(service, tmp_path):
    """A folder shaped like a published one: `auto` (the default) runs our server on the tokenizer
    folder the script names, with the script's system prompt; `stock` runs the script itself;
    without a tokenizer folder `auto` runs the script and `builtin` is refused. The entry says
    which runs and why."""
    auto, stock = published_model(tmp_path, "auto"), published_model(tmp_path, "stock", tokenizer_server="stock")
    bare, builtin = published_model(tmp_path, "bare"), published_model(tmp_path, "forced", tokenizer_server="builtin")
    for entry in (bare, builtin):
        shutil.rmtree(Path(entry["model_path"]) / "smollm2_tokenizer")
    service.models(auto, stock, bare, builtin)
    for name in ("auto", "stock", "bare"):
        assert service.start(name).status_code == 200
    refused = service.start("forced")
    assert refused.status_code == 400
    assert refused.json()["error"] == (
        "model 'forced': tokenizer_server is builtin, but the script loads 'smollm2_tokenizer', not a folder inside "
        "the model folder, and there is no *_tokenizer/ folder: set tokenizer_server to stock or auto")

    ours = service.wait_state("auto", "running")
    assert ours["server"] == ("builtin: on smollm2_tokenizer/, which the script loads: tokenizer files and a chat "
                              "template are there")
    caps = net.get(f"http://127.0.0.1:{auto['tokenizer_port']}/capabilities", timeout=10).json()
    assert caps["server"] == "axm1-tokenizer"
    assert caps["stock_defaults"] == {"system_prompt": QWEN_SYSTEM, "user_suffix": " /no_think", "generation_prompt_cut": 3,
                                      "ignore_runner_system_prompt": False}  # its POST /reset takes the runner's
    assert "tokenizer_service.host" in cmdline_of(ours["pid"]) and ours["process"] == "shared"

    for name, why in (("stock", "stock: the descriptor asks for the folder's own script"),
                      ("bare", "stock: the folder's own script runs: the script loads 'smollm2_tokenizer', not a folder "
                               "inside the model folder, and there is no *_tokenizer/ folder")):
        entry = service.wait_state(name, "running") if name == "stock" else service.entry(name)
        assert entry["server"] == why
    assert cmdline_of(service.entry("stock")["pid"]).endswith(
        f"stock_tokenizer_uid.py --host 127.0.0.1 --port {stock['tokenizer_port']}")
    # The script has none of our extensions: its error body for a path it does not know.
    assert net.get(f"http://127.0.0.1:{stock['tokenizer_port']}/capabilities", timeout=10).json() == {"error": "Invalid uid"}


def cmdline_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def test_auto_runs_the_script_when_our_server_cannot_render_the_files_and_builtin_keeps_failing(service, tmp_path):
    """Files that look usable but do not render: under `auto` our server exits at its start-up
    check and the folder's script runs instead, the entry saying why; under `builtin` ours is
    restarted with its error in the log tail (nothing else runs behind the descriptor's back)."""
    auto, builtin = published_model(tmp_path, "auto"), published_model(tmp_path, "forced", tokenizer_server="builtin")
    for entry in (auto, builtin):
        config_file = Path(entry["model_path"]) / "smollm2_tokenizer" / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["chat_template"] = "{{ raise_exception('this template renders nothing') }}"
        config_file.write_text(json.dumps(config))
    service.models(auto, builtin)
    # The shared host checks the files as it adds the model: the start's reply has the fallback already.
    assert service.start("auto").json()["server"].startswith("stock: the folder's own script runs: ")
    running = service.wait_state("auto", "running")
    assert running["server"].startswith("stock: the folder's own script runs: our server cannot use smollm2_tokenizer/ "
                                        "(cannot use the tokenizer files in ")
    assert "this template renders nothing" in running["server"]
    assert cmdline_of(running["pid"]).endswith(f"auto_tokenizer_uid.py --host 127.0.0.1 --port {auto['tokenizer_port']}")
    assert service.start("auto").json()["pid"] == running["pid"]  # the same start again keeps the fallback

    assert service.start("forced").status_code == 200
    failing = wait_until(lambda: (e := service.entry("forced"))["restarts"] >= 1 and e, 60, "forced to be restarted")
    assert failing["last_exit"] == 3 and failing["server"].startswith("builtin: ")
    assert any("this template renders nothing" in line for line in failing["log_tail"])


def test_one_host_process_serves_every_builtin_model_and_uid_models_share_a_port(service, tmp_path):
    """Our server runs in one shared process for every model that has it: two B folders on one
    port and a third on a port of its own have the same pid; a folder whose own script runs
    cannot join their port (the daemon swaps it in instead). Killing the host restarts it for
    all; stopping the last model ends it."""
    port = free_port()
    first = published_model(tmp_path, "first", tokenizer_port=port)
    second = published_model(tmp_path, "second", tokenizer_port=port)
    alone = published_model(tmp_path, "alone")
    stock = published_model(tmp_path, "stock", tokenizer_server="stock", tokenizer_port=port)
    service.models(first, second, alone, stock)
    for name in ("first", "second", "alone"):
        assert service.start(name).status_code == 200, name
    running = {name: service.wait_state(name, "running") for name in ("first", "second", "alone")}
    pids = {entry["pid"] for entry in running.values()}
    assert len(pids) == 1 and all(entry["process"] == "shared" for entry in running.values())
    host = pids.pop()
    assert "tokenizer_service.host" in cmdline_of(host)
    refused = service.start("stock")
    assert refused.status_code == 400
    assert refused.json()["error"] == (f"port {port} is already used by tokenizer 'first': only our tokenizer server "
                                       "serves several models on one port, and a folder's own script runs here")
    # Both models answer on the shared port, each its own session.
    uids = [net.get(f"http://127.0.0.1:{port}/get_uid", timeout=5) for _ in range(2)]
    assert [u.status_code for u in uids] == [409, 409]  # nobody announced whose runner asks
    assert net.post(f"http://127.0.0.1:{port}/next_runner?model=second", timeout=5).json() == {"ok": True}
    uid = net.get(f"http://127.0.0.1:{port}/get_uid", timeout=5).json()["uid"]
    assert net.get(f"http://127.0.0.1:{port}/get_uid", timeout=5).status_code == 409  # one announcement, one uid
    assert net.get(f"http://127.0.0.1:{port}/bos_id?uid={uid}", timeout=5).status_code == 200

    os.kill(host, signal.SIGKILL)
    restarted = {name: wait_until(lambda n=name: (e := service.entry(n))["state"] == "running" and e["pid"] != host
                                  and e, 60, f"{name} back") for name in ("first", "second", "alone")}
    assert len({e["pid"] for e in restarted.values()}) == 1
    assert all(e["restarts"] >= 1 for e in restarted.values())
    new_host = restarted["first"]["pid"]
    for name in ("first", "second", "alone"):
        assert service.http.post(f"/tokenizers/{name}/stop").status_code == 200
    wait_until(lambda: not pid_alive(new_host), 30, "the host to exit with its last model")
    assert not answers(port)


def test_a_tokenizer_that_hangs_the_shared_host_runs_apart_and_the_others_go_on(tmp_path):
    """A model whose tokenizer never finishes loading (here a template file that is a FIFO
    nobody writes: a stuck mount looks the same) hangs the shared host's `add`. After
    host_answer_timeout_s the host is taken as hung and restarted for the other models, and
    the hanging model runs in a process of its own from then on, where it holds up only itself."""
    port = free_port()
    descriptor = tmp_path / "model-descriptor.json"
    fine, stuck = published_model(tmp_path, "fine"), published_model(tmp_path, "stuck")
    templates = Path(stuck["model_path"]) / "smollm2_tokenizer" / "additional_chat_templates"
    templates.mkdir()
    os.mkfifo(templates / "tool_use.jinja")
    write_descriptor(descriptor, [fine, stuck])
    env = dict(os.environ, AXM1_TOKENIZER_SERVICE_SECRET=SECRET, AXM1_TOKENIZER_SERVICE_HOST_ANSWER_TIMEOUT_S="3",
               AXM1_TOKENIZER_SERVICE_RESTART_BACKOFF_MIN_S="0.2", AXM1_TOKENIZER_SERVICE_RESTART_BACKOFF_MAX_S="1")
    process = subprocess.Popen(service_command(port, descriptor, tmp_path / "data"), cwd=REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    service = Service(process, f"http://127.0.0.1:{port}", descriptor)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", process=process)
        assert service.start("fine").status_code == 200
        first_host = service.wait_state("fine", "running")["pid"]
        started = time.monotonic()
        assert service.start("stuck").status_code == 200  # answered once the host was given up on
        assert time.monotonic() - started >= 3
        apart = wait_until(lambda: (e := service.entry("stuck"))["process"] == "own" and e["pid"] and e, 30,
                           "the stuck model in a process of its own")
        assert "in a process of its own: the tokenizer host did not answer add of stuck within 3s" in apart["server"]
        assert apart["state"] == "starting"  # it hangs there too, alone
        back = wait_until(lambda: (e := service.entry("fine"))["state"] == "running" and e["pid"] != first_host
                          and e, 30, "fine served again by a new host")
        assert back["process"] == "shared" and back["restarts"] >= 1 and back["pid"] != apart["pid"]
        assert "tokenizer_service.host" in cmdline_of(back["pid"])
        assert "tokenizer_service.server" in cmdline_of(apart["pid"])
        assert answers(int(fine["tokenizer_port"]))
        for name in ("fine", "stuck"):
            assert service.http.post(f"/tokenizers/{name}/stop").status_code == 200
        wait_until(lambda: not pid_alive(apart["pid"]) and not pid_alive(back["pid"]), 30, "both gone")
    finally:
        service.http.close()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=SERVICE_STOP_TIMEOUT)
