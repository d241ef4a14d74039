"""Model folders fetched from a model hub (Hugging Face's API, `huggingface_hub`): `/api/pull`
and `axm1-llm pull AXERA-TECH/Qwen3-1.7B`.

A folder is downloaded into `<models dir>/.partial/<name>` — a dot folder, which discovery never
serves — where a failed pull is taken up again (files already there are not fetched again; the
hub client retries a broken connection, restarting that file); every file is checked against the hub's SHA-256 (its
size where the hub gives no hash); only then is the folder moved into place in one rename, and
discovery serves it. `huggingface_hub` is imported by the first pull, never at start.

The names and the progress lines are pure; `pull_folder` does the I/O and blocks (run it in a
worker thread).
"""
from __future__ import annotations

import errno
import hashlib
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

PARTIAL = ".partial"
_HUB_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "huggingface.co/", "hf.co/")
_REPO_PART = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class PullError(Exception):
    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


def hub_repo(name: str) -> str | None:
    """The hub repository a pull names (`AXERA-TECH/Qwen3-1.7B`, `hf.co/AXERA-TECH/Qwen3-1.7B`),
    or None for a plain model name (`qwen3:1.7b`), which names no repository."""
    for prefix in _HUB_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    name = name.split(":")[0].strip("/")
    parts = name.split("/")
    if len(parts) != 2 or not all(p and set(p) <= _REPO_PART and p not in (".", "..") for p in parts):
        return None
    return name


def folder_name(repo: str) -> str:
    return repo.split("/")[1]


def progress_line(path: str, sha256: str | None, total: int | None, completed: int) -> dict[str, Any]:
    """Ollama's line for one layer being pulled: here, one file of the folder."""
    line: dict[str, Any] = {"status": f"pulling {path}", "completed": completed}
    if sha256:
        line["digest"] = f"sha256:{sha256}"
    if total is not None:
        line["total"] = total
    return line


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _disk_error(exc: OSError, where: Path) -> PullError | None:
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return PullError(f"not enough space in {where}: {exc.strerror}; the files so far are kept in "
                         f"{where / PARTIAL} and the next pull goes on from them", 507)
    return None


def pull_folder(repo: str, models_dir: Path, report: Callable[[dict[str, Any]], None], *,
                endpoint: str | None = None, token: str | None = None, revision: str = "main") -> Path:
    """Fetch `repo` into `models_dir/<repo name>`, reporting Ollama-style progress lines."""
    from huggingface_hub import HfApi, hf_hub_download  # ~20 MB of imports: only when pulling
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    target = models_dir / folder_name(repo)
    partial = models_dir / PARTIAL / folder_name(repo)
    api = HfApi(endpoint=endpoint, token=token or False)
    report({"status": "pulling manifest"})
    try:
        info = api.model_info(repo, revision=revision, files_metadata=True)
        if target.exists():
            report({"status": f"{target.name} is already in {models_dir}"})
            report({"status": "success"})
            return target
        partial.mkdir(parents=True, exist_ok=True)
        for sibling in info.siblings or []:
            sha = sibling.lfs.sha256 if sibling.lfs else None
            size = sibling.size
            report(progress_line(sibling.rfilename, sha, size, 0))
            with _WatchPartial(partial, sibling.rfilename, lambda n, f=sibling.rfilename: report(
                    progress_line(f, sha, size, n))):
                hf_hub_download(repo, sibling.rfilename, revision=info.sha or revision, local_dir=partial,
                                endpoint=endpoint, token=token or False)
            report(progress_line(sibling.rfilename, sha, size, size or 0))
        report({"status": "verifying sha256 digest"})
        for sibling in info.siblings or []:
            path = partial / sibling.rfilename
            if sibling.lfs and _sha256(path) != sibling.lfs.sha256:
                path.unlink(missing_ok=True)  # the next pull fetches it again
                raise PullError(f"{sibling.rfilename}: its SHA-256 does not match the hub's; removed, pull again", 502)
            if sibling.size is not None and path.stat().st_size != sibling.size:
                path.unlink(missing_ok=True)
                raise PullError(f"{sibling.rfilename}: {path.stat().st_size} bytes, the hub says {sibling.size}", 502)
        report({"status": "writing manifest"})
        shutil.rmtree(partial / ".cache", ignore_errors=True)  # the download's own bookkeeping
        partial.rename(target)  # one rename: the folder appears whole, or not at all
    except PullError:
        raise
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise PullError(f"{repo}: no such repository on the hub (or it needs a token): {_first_line(exc)}", 404) from None
    except (RevisionNotFoundError, EntryNotFoundError) as exc:
        raise PullError(f"{repo}: {_first_line(exc)}", 404) from None
    except OSError as exc:
        problem = _disk_error(exc, models_dir)
        if problem is not None:
            raise problem from None
        raise PullError(f"{repo}: {exc}", 502) from None
    except HfHubHTTPError as exc:
        raise PullError(f"{repo}: the hub answered {_first_line(exc)}", 502) from None
    except Exception as exc:  # the client's network errors (httpx), whatever the version raises
        raise PullError(f"{repo}: cannot reach the hub: {_first_line(exc)}", 502) from None
    report({"status": "success"})
    return target


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class _WatchPartial:
    """Reports the size of the file being downloaded every half second (huggingface_hub writes
    it as `<name>.<etag>.incomplete` under the folder's .cache)."""

    def __init__(self, partial: Path, name: str, report: Callable[[int], None]) -> None:
        self._folder = partial / ".cache" / "huggingface" / "download" / Path(name).parent
        self._stem = Path(name).name
        self._report = report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> _WatchPartial:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(2)

    def _watch(self) -> None:
        last = -1
        while not self._stop.wait(0.5):
            sizes = [p.stat().st_size for p in self._folder.glob(f"{self._stem}*.incomplete") if p.exists()]
            if sizes and sizes[0] != last:
                last = sizes[0]
                self._report(last)


def delete_folder(folder: Path) -> None:
    shutil.rmtree(folder)
