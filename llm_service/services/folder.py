"""The services folder as the daemon sees it while running: I/O only, the logic is `manifest.py`.

`ServiceFolder.refresh()` lists the folder, stats each `*.json` and `*.txt`, re-reads only the
manifests whose change key (mtime in ns, size, inode) moved, and hands the listing to
`load_catalog`, which parses again only what changed. `run()` refreshes every `poll_s` for the
daemon's life, so a manifest added, changed or removed is picked up while it runs; a broken one
disables that service alone, its error shown in the listing. Templates are never cached: each use
reads the file (`template()`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import anyio

from .manifest import ManifestFile, ServiceCatalog, load_catalog

log = logging.getLogger(__name__)

# A manifest larger than this is not read (a services folder holds small text files).
MAX_MANIFEST_BYTES = 1024 * 1024


@dataclass(frozen=True)
class _Seen:
    key: tuple[int, int, int]  # (mtime_ns, size, inode)
    read: ManifestFile


class ServiceFolder:
    def __init__(self, path: Path, poll_s: float) -> None:
        self.path = Path(path)
        self.poll_s = poll_s
        self.catalog = ServiceCatalog()
        self.folder_error: str | None = None  # the folder itself cannot be listed
        self._seen: dict[str, _Seen] = {}

    @property
    def label(self) -> str:
        return str(self.path)

    def refresh(self) -> ServiceCatalog:
        """List the folder once and update the catalog; returns it."""
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            self.folder_error = f"services folder {self.path} does not exist: no services"
            entries = []
        except OSError as exc:
            self.folder_error = f"services folder {self.path} cannot be listed: {exc.strerror or exc}"
            entries = []
        else:
            self.folder_error = None
        manifests: dict[str, ManifestFile] = {}
        templates: list[str] = []
        seen: dict[str, _Seen] = {}
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue  # editors' swap files, atomic writers' temporaries
            try:
                if not entry.is_file():
                    continue
                stat = entry.stat()
            except OSError:
                continue  # removed while listing
            if name.endswith(".txt"):
                templates.append(name)
                continue
            if not name.endswith(".json"):
                continue
            key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            before = self._seen.get(name)
            if before is not None and before.key == key:
                seen[name] = before
            else:
                seen[name] = _Seen(key, ManifestFile(self._read_manifest(Path(entry.path), stat.st_size),
                                                     _change_mark(key)))
            manifests[name] = seen[name].read
        self._seen = seen
        self.catalog = load_catalog(manifests, templates, self.label, self.catalog)
        return self.catalog

    def _read_manifest(self, path: Path, size: int) -> str:
        if size > MAX_MANIFEST_BYTES:
            return f'"{path.name} is {size} bytes; a manifest may have at most {MAX_MANIFEST_BYTES}"'
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            # Not JSON: the catalog shows the service disabled with this in its error.
            return f"unreadable: {exc}"

    def modified_ns(self, name: str) -> int | None:
        """When the manifest `name.json` was last changed, as last seen."""
        seen = self._seen.get(f"{name}.json")
        return None if seen is None else seen.key[0]

    def template(self, name: str) -> tuple[str, str]:
        """A service's template as it is now, and the name messages give it; OSError when gone."""
        path = self.path / f"{name}.txt"
        return path.read_text(encoding="utf-8"), f"{self.label}/{name}.txt"

    async def run(self, *, task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED) -> None:
        await anyio.to_thread.run_sync(self._refresh_logged)
        task_status.started()
        while True:
            await anyio.sleep(self.poll_s)
            await anyio.to_thread.run_sync(self._refresh_logged)

    def _refresh_logged(self) -> None:
        before = {name: service.error for name, service in self.catalog.services.items()}
        try:
            catalog = self.refresh()
        except Exception:  # a bug here must not end the watcher
            log.exception("services folder %s: refresh failed", self.path)
            return
        for name, service in catalog.services.items():
            if name not in before or before[name] != service.error:
                if service.error:
                    log.error("service %s disabled: %s", name, service.error)
                else:
                    log.info("service %s %s", name, "loaded" if name not in before else "reloaded")
        for name in before.keys() - catalog.services.keys():
            log.info("service %s removed", name)


def _change_mark(key: tuple[int, int, int]) -> float:
    """The catalog's change key for a manifest: it only compares it for equality, so the whole
    stat key goes in (an edit within one mtime tick still changes the size or the inode)."""
    return float(hash(key))
