"""Hostile model descriptors: every bad entry gets a clear error of its own in /api/status
(naming the file, the model and the field where the descriptor is at fault), and the daemon keeps
serving the good model next to it."""
from __future__ import annotations

import json
import os
import time


from chaos_support import wait_answer
from harness import net
from harness.daemon import processes_with_marker, running_daemon, write_descriptor
from harness.models import scripted_model

WORDS = 4


def status_of(daemon, name: str | None = None) -> dict:
    everything = net.get(f"{daemon.url}/api/status", timeout=10).json()
    if name is None:
        return everything
    found = [m for m in everything["models"] if m["name"] == name]
    assert len(found) == 1, (name, [m["name"] for m in everything["models"]])
    return found[0]


def wait_error(daemon, name: str, *needles: str, timeout: float = 20.0) -> str:
    """Poll until `name`'s last error holds every needle; return that error text."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        model = status_of(daemon, name)
        text = json.dumps(model.get("last_error"))
        if all(n in text for n in needles):
            return text
        time.sleep(0.1)
    raise AssertionError(f"{name}: error never named {needles}; last: {text[:1500]}")


def runner_folder(root, name: str, script: str) -> dict:
    """A model folder (with a working tokenizer) whose run script is `script`."""
    entry = scripted_model(root, name, reply_words=WORDS)
    (root / name / entry["run_cmd"]).write_text(script)
    return entry


def test_descriptor_errors_name_file_model_and_field_and_the_good_model_serves(tmp_path):
    good = scripted_model(tmp_path, "good", reply_words=WORDS)
    no_run_cmd = scripted_model(tmp_path, "no-run-cmd")
    del no_run_cmd["run_cmd"]
    wrong_port = scripted_model(tmp_path, "wrong-type-port", fields={"tokenizer_port": {"port": 1}})
    wrong_size = scripted_model(tmp_path, "wrong-type-context", fields={"context_size": "lots"})
    escape_run = scripted_model(tmp_path, "escape-run", fields={"run_cmd": "../good/run_good_axcl_x86.sh"})
    escape_tok = scripted_model(tmp_path, "escape-tokenizer", fields={"tokenizer_py": "../good/good_tokenizer.py"})
    escape_link = scripted_model(tmp_path, "escape-symlink")
    link = tmp_path / "escape-symlink" / "linked.sh"
    os.symlink(tmp_path / "good" / good["run_cmd"], link)
    escape_link["run_cmd"] = "./linked.sh"
    absolute = scripted_model(tmp_path, "absolute-outside", fields={"run_cmd": "/bin/true"})
    duplicate = scripted_model(tmp_path, "good-again", fields={"model_name": "good"})
    entries = [good, no_run_cmd, wrong_port, wrong_size, escape_run, escape_tok, escape_link, absolute,
               "not an object", duplicate]
    with running_daemon(tmp_path, entries) as daemon:
        descriptor = str(daemon.descriptor)
        expected = {
            "no-run-cmd": ('field "run_cmd"', "missing"),
            "wrong-type-port": ('field "tokenizer_port"',),
            "wrong-type-context": ('field "context_size"',),
            "escape-run": ('field "run_cmd"', "outside model_path"),
            "escape-tokenizer": ('field "tokenizer_py"', "outside tokenizer_path"),
            "escape-symlink": ('field "run_cmd"', "outside model_path"),
            "absolute-outside": ('field "run_cmd"', "outside model_path"),
        }
        everything = status_of(daemon)
        by_name = {m["name"]: m for m in everything["models"]}
        for name, needles in expected.items():
            model = by_name.get(name)
            assert model is not None, f"{name} missing from /api/status: {sorted(by_name)}"
            reason = model["last_error"]["reason"]
            assert model["state"] == "disabled", model
            for needle in (descriptor, f'model "{name}"', *needles):
                assert needle in reason, f"{name}: {needle!r} not in {reason!r}"
        not_object = [m for m in everything["models"] if "expected an object" in json.dumps(m)]
        assert len(not_object) == 1 and "entry #9" in not_object[0]["last_error"]["reason"], not_object
        duplicated = [m for m in everything["models"] if "duplicate name" in json.dumps(m)]
        assert len(duplicated) == 1 and 'field "model_name"' in duplicated[0]["last_error"]["reason"], duplicated
        # the disabled models answer with a clear error, never a 500
        with daemon.client() as http:
            for name in expected:
                reply = http.post("/api/generate", json={"model": name, "prompt": "x", "stream": False})
                assert reply.status_code in (400, 404, 503) and reply.json()["error"], (name, reply.text)
        wait_answer(daemon.url, "good", "good-serves", WORDS)
        daemon.wait_state("good", "ready")  # after the reset ahead of the next request


def test_runner_scripts_that_exit_or_stay_silent_fail_their_model_only(tmp_path):
    good = scripted_model(tmp_path, "good", reply_words=WORDS)
    exits = runner_folder(tmp_path, "exits-at-once", "echo 'cannot open /dev/axcl_host' >&2\nexit 3\n")
    silent = runner_folder(tmp_path, "prints-nothing", "exec sleep 300\n")
    garbage_init = runner_folder(tmp_path, "binary-noise", "head -c 4096 /dev/urandom\nexec sleep 300\n")
    with running_daemon(tmp_path, [good, exits, silent, garbage_init], "--load-stall-timeout-s", "2") as daemon:
        with daemon.client(timeout=30) as http:
            replies = {name: http.post("/api/generate", json={"model": name, "prompt": "x", "stream": False})
                       for name in ("exits-at-once", "prints-nothing", "binary-noise")}
        for name, reply in replies.items():
            assert reply.status_code == 503 and reply.json()["error"], (name, reply.status_code, reply.text)
        assert "status 3" in replies["exits-at-once"].json()["error"], replies["exits-at-once"].text
        wait_error(daemon, "exits-at-once", "status 3", "cannot open /dev/axcl_host")
        wait_error(daemon, "prints-nothing", "no progress for 2s")
        wait_error(daemon, "binary-noise", "no progress for 2s")
        # the silent runner was killed, not left sleeping (the back-off may have started a new one)
        sleepers = [p for p in processes_with_marker(daemon.marker) if p[1].startswith("sleep 300")]
        assert len(sleepers) <= 2, sleepers
        wait_answer(daemon.url, "good", "still-serving", WORDS)
        daemon.wait_state("good", "ready")


def test_huge_and_broken_descriptors_keep_the_running_models(tmp_path):
    good = scripted_model(tmp_path, "good", reply_words=WORDS)
    with running_daemon(tmp_path, [good]) as daemon:
        wait_answer(daemon.url, "good", "before", WORDS)
        # 3000 entries pointing nowhere, one with a 1 MB system prompt: parsed, each disabled on its own
        bogus = [dict(good, model_name=f"bogus-{i}", model_path=str(tmp_path / f"missing-{i}")) for i in range(3000)]
        bogus.append(dict(good, model_name="huge-prompt", model_path=str(tmp_path / "missing"),
                          system_prompt="x" * 1_000_000))
        write_descriptor(daemon.descriptor, [good, *bogus])
        deadline = time.monotonic() + 30
        while len(status_of(daemon)["models"]) < 3002 and time.monotonic() < deadline:
            time.sleep(0.3)
        started = time.monotonic()
        everything = status_of(daemon)
        assert time.monotonic() - started < 5, "status of 3002 models took more than 5 s"
        assert len(everything["models"]) == 3002
        bogus_1 = next(m for m in everything["models"] if m["name"] == "bogus-1")
        assert 'field "model_path"' in bogus_1["last_error"]["reason"] and "not a directory" in bogus_1["last_error"]["reason"]
        wait_answer(daemon.url, "good", "with-huge", WORDS)

        # a broken file: the error names the file and the line, the running model stays
        daemon.descriptor.write_text('[{"model_name": "good",\n  oops}\n]')
        # written in place, as an editor may: a poll can catch the file empty, the next one whole
        deadline = time.monotonic() + 10
        while "line 2" not in (status_of(daemon)["descriptor"]["error"] or "") and time.monotonic() < deadline:
            time.sleep(0.1)
        error = status_of(daemon)["descriptor"]["error"]
        assert error and str(daemon.descriptor) in error and "line 2" in error, error
        wait_answer(daemon.url, "good", "with-broken-file", WORDS)
        # not JSON at all, then not a list
        for content, needle in ((b"\xff\xfe\x00garbage", str(daemon.descriptor)), (b'{"model_name": "good"}', "JSON list")):
            daemon.descriptor.write_bytes(content)
            deadline = time.monotonic() + 10
            while needle not in (status_of(daemon)["descriptor"]["error"] or "") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert needle in (status_of(daemon)["descriptor"]["error"] or ""), status_of(daemon)["descriptor"]
            wait_answer(daemon.url, "good", f"with-{len(content)}", WORDS)
        write_descriptor(daemon.descriptor, [good])
        deadline = time.monotonic() + 10
        while status_of(daemon)["descriptor"]["error"] is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status_of(daemon)["descriptor"]["error"] is None
        assert [m["name"] for m in status_of(daemon)["models"]] == ["good"]
