"""Model folders served without a descriptor entry (issue 14, section 3): the folder's shape
decides (pure tests), and a real daemon finds a stock-shaped folder, picks up one added and one
removed while it runs, says which scripts are ambiguous, and lets a descriptor entry win."""
from __future__ import annotations

import shutil
from pathlib import Path

from harness.daemon import running_daemon, write_descriptor
from harness.models import scripted_model
from harness.net import wait_until
from llm_service.discovery import FolderListing, Found, Problem, entry_for, host_tag, model_name, unclaimed

B_SCRIPT = """./main_axcl_x86 \\
--system_prompt "You are Qwen" \\
--url_tokenizer_model "http://127.0.0.1:12345" \\
--devices 0
"""
A_SCRIPT = """./main_axcl_aarch64 \\
--prompt "$1" --tokenizer_type 2 --filename_tokenizer_model "http://127.0.0.1:8080" \\
"""


def listing(files: dict[str, str], name: str = "Qwen3-1.7B") -> FolderListing:
    return FolderListing(name, frozenset(files), texts=files)


def test_host_tags() -> None:
    assert host_tag("x86_64", False) == "axcl_x86"
    assert host_tag("aarch64", False) == "axcl_aarch64"  # a Raspberry Pi 5 with the card
    assert host_tag("aarch64", True) == "ax650"


def test_a_published_folder_becomes_an_entry() -> None:
    found = entry_for(listing({
        "run_qwen3_1.7b_int8_ctx_axcl_x86.sh": B_SCRIPT, "run_qwen3_1.7b_int8_ctx_axcl_aarch64.sh": B_SCRIPT,
        "run_qwen3_1.7b_int8_ctx_ax650.sh": B_SCRIPT, "qwen3_tokenizer_uid.py": "", "qwen3_tokenizer.py": "",
        "post_config.json": "{}",
    }), "axcl_x86")
    assert found == Found({"model_name": "qwen3-1.7b", "run_cmd": "./run_qwen3_1.7b_int8_ctx_axcl_x86.sh",
                           "model_path": "Qwen3-1.7B", "run_on_startup": "false", "include_thinking": "false",
                           "tokenizer_path": "Qwen3-1.7B", "tokenizer_py": "qwen3_tokenizer_uid.py",
                           "tokenizer_ip": "127.0.0.1", "tokenizer_port": "12345"})


def test_an_a_runner_takes_the_stateless_script_and_its_port() -> None:
    found = entry_for(listing({"run_axcl_aarch64.sh": A_SCRIPT, "qwen_tokenizer.py": "", "qwen_tokenizer_uid.py": ""}),
                      "axcl_aarch64")
    assert isinstance(found, Found)
    assert found.entry["tokenizer_py"] == "qwen_tokenizer.py" and found.entry["tokenizer_port"] == "8080"


def test_what_is_not_served_as_found() -> None:
    assert entry_for(listing({"config.json": "{}", "tokenizer.json": "{}"}), "axcl_x86") is None
    none_fits = entry_for(listing({"run_x_ax650.sh": B_SCRIPT}), "axcl_x86")
    assert isinstance(none_fits, Problem) and "no run script for this host (axcl_x86) among run_x_ax650.sh" in none_fits.message
    two = entry_for(listing({"run_a_axcl_x86.sh": B_SCRIPT, "run_b_axcl_x86.sh": B_SCRIPT, "t_tokenizer_uid.py": ""}),
                    "axcl_x86")
    assert isinstance(two, Problem) and "2 run scripts fit this host (axcl_x86): run_a_axcl_x86.sh, run_b_axcl_x86.sh" in two.message
    no_tokenizer = entry_for(listing({"run_axcl_x86.sh": B_SCRIPT}), "axcl_x86")
    assert isinstance(no_tokenizer, Problem) and "no tokenizer script" in no_tokenizer.message
    builtin = entry_for(listing({"run_axcl_x86.sh": "./main_axcl_x86 --devices 0\n"}), "axcl_x86")
    assert isinstance(builtin, Found) and "tokenizer_py" not in builtin.entry


def test_entries_win_over_folders(tmp_path) -> None:
    entries = [{"model_name": "mine", "model_path": "a"}, {"model_name": "Other", "model_path": "/elsewhere",
                                                           "tokenizer_path": "b"}]
    assert unclaimed(["a", "b", "c", "other", "d"], entries, tmp_path) == ["c", "d"]
    assert model_name("Qwen3-1.7B") == "qwen3-1.7b"


# ---- on a daemon ------------------------------------------------------------------------------

def stock_folder(root: Path, name: str) -> None:
    """A folder shaped like a published one: the run script hard-codes its tokenizer's port."""
    scripted_model(root, name, port_from_dollar1=False, reply_words=3)


def test_folders_found_added_removed_and_ambiguous(tmp_path) -> None:
    declared = scripted_model(tmp_path, "declared", reply_words=3)
    stock_folder(tmp_path, "found-one")
    with running_daemon(tmp_path, [declared], discover=True) as daemon:
        with daemon.client() as client:
            status = client.get("/api/status").json()
            assert status["descriptor"]["found"] == ["found-one"]
            answer = client.post("/api/generate", json={"model": "found-one", "prompt": "hi", "stream": False})
            assert answer.status_code == 200 and answer.json()["response"].startswith("You said: hi.")
            names = {m["name"] for m in client.get("/api/tags").json()["models"]}
            assert {"declared:latest", "found-one:latest"} <= names

            # Added while running.
            stock_folder(tmp_path, "found-two")
            wait_until(lambda: any(m["name"] == "found-two" for m in client.get("/api/status").json()["models"]), 15,
                       "the new folder to be found")
            assert client.post("/api/generate", json={"model": "found-two", "prompt": "yo", "stream": False}).status_code == 200

            # Two scripts for this host: not served, and the status names both.
            stock_folder(tmp_path, "twice")
            shutil.copy(tmp_path / "twice" / "run_twice_axcl_x86.sh", tmp_path / "twice" / "run_twice_b_axcl_x86.sh")
            wait_until(lambda: any(m["name"] == "twice" for m in client.get("/api/status").json()["models"]), 15,
                       "the ambiguous folder in the status")
            twice = next(m for m in client.get("/api/status").json()["models"] if m["name"] == "twice")
            assert twice["state"] == "disabled"
            assert "run_twice_axcl_x86.sh, run_twice_b_axcl_x86.sh" in twice["last_error"]["reason"]
            refused = client.post("/api/generate", json={"model": "twice", "prompt": "x", "stream": False})
            assert refused.status_code == 503 and "2 run scripts fit" in refused.json()["error"]

            # Removed while running.
            shutil.rmtree(tmp_path / "found-two")
            wait_until(lambda: all(m["name"] != "found-two" for m in client.get("/api/status").json()["models"]), 15,
                       "the removed folder to go")
            assert "found-two" not in client.get("/api/status").json()["descriptor"]["found"]
            assert client.post("/api/generate", json={"model": "found-two", "prompt": "x", "stream": False}).status_code == 404

            # A descriptor entry for the folder wins: served as the entry says, no longer "found".
            entry = scripted_model(tmp_path, "found-one", port_from_dollar1=False, reply_words=3)
            entry["model_name"] = "renamed"
            write_descriptor(daemon.descriptor, [declared, entry])
            wait_until(lambda: any(m["name"] == "renamed" for m in client.get("/api/status").json()["models"]), 15,
                       "the entry to take the folder")
            assert "found-one" not in client.get("/api/status").json()["descriptor"]["found"]
            assert client.post("/api/generate", json={"model": "renamed", "prompt": "x", "stream": False}).status_code == 200
