"""A model's files on disk: their size, as Ollama's `size` reports it (the bytes of the model).

Read once per descriptor load, in a worker thread: a card model folder holds a few dozen files
(the axmodel layers, embeddings, tokenizer), so a walk costs milliseconds. Each file counts once
(hard links, symlinks to one file, a folder reached twice), symlinked folders are followed
without looping, and the walk stops after `max_entries` entries, so a folder pointed at by
mistake (a home, `/`) cannot stall a reload.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

MAX_ENTRIES = 100_000


def folder_size(folders: Iterable[Path], max_entries: int = MAX_ENTRIES) -> int:
    """Bytes of the regular files under `folders`, each file counted once."""
    seen_files: set[tuple[int, int]] = set()
    seen_dirs: set[tuple[int, int]] = set()
    total = entries = 0
    pending = [Path(folder) for folder in folders]
    while pending:
        folder = pending.pop()
        try:
            info = os.stat(folder)
        except OSError:
            continue
        key = (info.st_dev, info.st_ino)
        if not stat.S_ISDIR(info.st_mode) or key in seen_dirs:
            continue
        seen_dirs.add(key)
        try:
            with os.scandir(folder) as listing:
                children = list(listing)
        except OSError:
            continue
        for child in children:
            entries += 1
            if entries > max_entries:
                return total
            try:
                info = child.stat()  # follows a symlink to what it names
            except OSError:
                continue  # a dangling link, or gone meanwhile
            if stat.S_ISDIR(info.st_mode):
                pending.append(Path(child.path))
            elif stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) not in seen_files:
                seen_files.add((info.st_dev, info.st_ino))
                total += info.st_size
    return total
