"""The image files a vision-language runner reads: one private folder per daemon.

The card's VLM runners take an image as the path of a file (docs/vlm-runners.md §1), read with
the runner's working directory in the model folder, so the path is absolute. Each turn's images
are written, bytes unchanged, under `<data_dir>/images/` (mode 0700): one file with its
format's extension, or a folder of numbered frames where the runner takes several. The request
that wrote them removes them when it ends, however it ends (answer, error, runner crash, client
gone); the folder is emptied when the daemon starts, for the files of a daemon that was killed.
"""
from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .images import ImageInput

log = logging.getLogger(__name__)

FOLDER_NAME = "images"


def image_folder(data_dir: Path) -> Path:
    return (Path(data_dir) / FOLDER_NAME).absolute()


def sweep(data_dir: Path) -> int:
    """Empty (or make) the daemon's image folder, private to its user; the entries removed."""
    folder = image_folder(data_dir)
    removed = 0
    if folder.is_dir():
        for entry in folder.iterdir():
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed += 1
            except OSError as exc:
                log.warning("cannot remove %s: %s", entry, exc)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    if removed:
        log.info("removed %d image file(s) left by an earlier run from %s", removed, folder)
    return removed


@dataclass
class TurnImages:
    """The files of one turn: `path` is what the runner reads at its image marker."""

    path: str
    _remove: Path
    frames: bool = False  # `path` is a folder of frames (the runner lists them as it reads them)
    count: int = 1  # the images written

    def remove(self) -> None:
        try:
            if self._remove.is_dir():
                shutil.rmtree(self._remove)
            else:
                self._remove.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove %s: %s", self._remove, exc)


def write_turn_images(data_dir: Path, images: tuple[ImageInput, ...], request_id: str) -> TurnImages:
    """One image as one file; several as a folder of frames named in their order."""
    folder = image_folder(data_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    stem = f"{''.join(c for c in request_id if c.isalnum() or c in '-_')[:40]}-{uuid.uuid4().hex[:8]}"
    if len(images) == 1:
        target = folder / (stem + images[0].extension)
        _write(target, images[0].data)
        result = TurnImages(str(target), target)
    else:
        target = folder / stem
        target.mkdir(mode=0o700)
        for index, image in enumerate(images):
            _write(target / f"frame{index:03d}{image.extension}", image.data)
        result = TurnImages(str(target), target, frames=True, count=len(images))
    if "\n" in result.path or "\r" in result.path:  # the runner reads the path as one line
        result.remove()
        raise ValueError(f"image path with a line break: {result.path!r}")
    return result


def _write(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        f.write(data)
