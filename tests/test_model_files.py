"""A model's size on disk (llm_service/model_files.py), on real folders in a temporary directory."""
from __future__ import annotations

import os
from pathlib import Path

from llm_service.model_files import folder_size


def write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def test_the_files_of_a_model_folder_each_count_once(tmp_path: Path) -> None:
    model = tmp_path / "qwen3"
    layer = write(model / "qwen3-ax650" / "qwen3_p128_l0_together.axmodel", 1000)
    write(model / "qwen3-ax650" / "qwen3_post.axmodel", 300)
    write(model / "qwen3_tokenizer" / "tokenizer.json", 50)
    write(model / "run.sh", 7)
    os.link(layer, model / "hard-linked.axmodel")  # the same bytes again
    (model / "linked.axmodel").symlink_to(layer)
    (model / "dangling").symlink_to(tmp_path / "nowhere")
    (model / "loop").symlink_to(model)  # a folder reached twice
    assert folder_size([model]) == 1357
    # A tokenizer folder inside the model folder, named again, adds nothing.
    assert folder_size([model, model / "qwen3_tokenizer"]) == 1357


def test_a_symlinked_folder_of_shared_weights_is_followed(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    write(shared / "embed.bin", 4096)
    model = tmp_path / "model"
    write(model / "run.sh", 4)
    (model / "weights").symlink_to(shared)
    assert folder_size([model]) == 4100


def test_missing_folders_and_the_entry_bound(tmp_path: Path) -> None:
    assert folder_size([tmp_path / "absent"]) == 0
    assert folder_size([]) == 0
    for i in range(10):
        write(tmp_path / "many" / f"f{i}", 1)
    assert folder_size([tmp_path / "many"], max_entries=4) == 4  # a folder named by mistake stays cheap
