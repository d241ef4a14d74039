"""Model folders found without a descriptor entry: a folder shaped like the ones AXERA publishes
(a `run_*.sh` for this host, a tokenizer script) is served under the folder's name.

Pure: `FolderListing` is what a caller read of one folder (file names, the text of its run and
tokenizer scripts); `entry_for` turns it into a descriptor entry in the file's own string format,
or a problem naming the candidates, or None for a folder that is no model folder. The descriptor's
entries win: a folder one of them uses is never looked at (`unclaimed`).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# The host tags in published run scripts' names: the card on an Arm host (Raspberry Pi 5, RK3588
# boards), the card on an x86 host, and the AX650 SoC's own boards.
HOST_TAGS = ("axcl_aarch64", "axcl_x86", "ax650")
_TOKENIZER_URL = re.compile(r"--(?:url_tokenizer_model|filename_tokenizer_model)[ =]+[\"']?https?://([^:/\"' ]+):(\d+)")
_UID_FLAG = re.compile(r"--url_tokenizer_model\b")  # B runners: the uid protocol


def host_tag(machine: str, soc_board: bool) -> str:
    """The run scripts this host runs: `machine` is platform.machine(); `soc_board` is true on an
    AX650 board itself (its BSP's /proc/ax_proc exists)."""
    if machine in ("x86_64", "AMD64", "amd64"):
        return "axcl_x86"
    return "ax650" if soc_board else "axcl_aarch64"


@dataclass(frozen=True)
class FolderListing:
    name: str  # the folder's name: the model's name
    files: frozenset[str]  # names of the files in it (not folders)
    folders: frozenset[str] = frozenset()
    texts: Mapping[str, str] = field(default_factory=dict)  # run_*.sh and *tokenizer*.py: their text


@dataclass(frozen=True)
class Found:
    entry: dict[str, str]


@dataclass(frozen=True)
class Problem:
    message: str


def wanted_texts(files: Iterable[str]) -> list[str]:
    """The files whose text `entry_for` needs: run scripts and tokenizer scripts."""
    return sorted(f for f in files if _is_run_script(f) or _is_tokenizer_script(f))


def _is_run_script(name: str) -> bool:
    return name.startswith("run_") and name.endswith(".sh")


def _is_tokenizer_script(name: str) -> bool:
    return name.endswith(".py") and "tokenizer" in name


def model_name(folder: str) -> str:
    """Ollama-style names are lower-case; `Qwen3-1.7B` is served as `qwen3-1.7b`."""
    return folder.strip().lower().replace(" ", "-")


def entry_for(listing: FolderListing, host: str) -> Found | Problem | None:
    scripts = sorted(f for f in listing.files if _is_run_script(f))
    if not scripts:
        return None  # no model folder (a tokenizer folder, weights, anything else)
    where = f'folder "{listing.name}"'
    fitting = [s for s in scripts if host in s.removesuffix(".sh")]
    if not fitting:
        return Problem(f"{where}: no run script for this host ({host}) among {', '.join(scripts)}; "
                       "add a descriptor entry naming the one to run")
    if len(fitting) > 1:
        return Problem(f"{where}: {len(fitting)} run scripts fit this host ({host}): {', '.join(fitting)}; "
                       "add a descriptor entry naming the one to run")
    script = fitting[0]
    text = listing.texts.get(script, "")
    entry = {"model_name": model_name(listing.name), "run_cmd": f"./{script}", "model_path": listing.name,
             "run_on_startup": "false", "include_thinking": "false"}
    url = _TOKENIZER_URL.search(text)
    if url is None:
        return Found(entry)  # a runner with its own tokenizer (or none the script names)
    tokenizers = sorted(f for f in listing.files if _is_tokenizer_script(f))
    uid = _UID_FLAG.search(text) is not None
    preferred = [t for t in tokenizers if ("uid" in t) == uid] or tokenizers
    if not preferred:
        return Problem(f"{where}: {script} calls a tokenizer server at {url.group(1)}:{url.group(2)}, but the "
                       "folder has no tokenizer script (*tokenizer*.py)")
    if len(preferred) > 1:
        return Problem(f"{where}: {len(preferred)} tokenizer scripts fit {script}: {', '.join(preferred)}; "
                       "add a descriptor entry naming the one to run")
    entry.update(tokenizer_path=listing.name, tokenizer_py=preferred[0], tokenizer_ip=url.group(1),
                 tokenizer_port=url.group(2))
    return Found(entry)


def unclaimed(folders: Iterable[str], entries: Iterable[Mapping[str, object]], base_dir: Path) -> list[str]:
    """The folders no descriptor entry uses (as its model_path or tokenizer_path, or by name)."""
    used: set[str] = set()
    names: set[str] = set()
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        for key in ("model_path", "tokenizer_path"):
            value = entry.get(key)
            if isinstance(value, str) and value:
                used.add(str((base_dir / value).resolve(strict=False)))
        if isinstance(entry.get("model_name"), str):
            names.add(model_name(str(entry["model_name"])))
    return [f for f in folders
            if str((base_dir / f).resolve(strict=False)) not in used and model_name(f) not in names]


# ---- reading the folders (I/O) --------------------------------------------------------------

def read_listing(folder: Path) -> FolderListing:
    files, folders = set(), set()
    for child in folder.iterdir():
        (folders if child.is_dir() else files).add(child.name)
    texts = {}
    for name in wanted_texts(files):
        try:
            texts[name] = (folder / name).read_text(encoding="utf-8", errors="replace")[:65536]
        except OSError:
            continue
    return FolderListing(folder.name, frozenset(files), frozenset(folders), texts)


def subfolders(base_dir: Path) -> list[str]:
    try:
        return sorted(c.name for c in base_dir.iterdir() if c.is_dir() and not c.name.startswith((".", "__")))
    except OSError:
        return []


def discover(base_dir: Path, entries: Iterable[Mapping[str, object]], host: str) -> tuple[list[dict[str, str]], dict[str, str]]:
    """Entries for the model folders under `base_dir` that no descriptor entry uses, and the
    problems of the folders that look like model folders but cannot be served as found."""
    found: list[dict[str, str]] = []
    problems: dict[str, str] = {}
    for name in unclaimed(subfolders(base_dir), list(entries), base_dir):
        try:
            verdict = entry_for(read_listing(base_dir / name), host)
        except OSError:
            continue
        if isinstance(verdict, Found):
            found.append(verdict.entry)
        elif isinstance(verdict, Problem):
            problems[model_name(name)] = verdict.message
    return found, problems


def signature(base_dir: Path) -> bytes:
    """What changes when a folder is added, removed or gets other scripts: the reload's cue."""
    parts = []
    for name in subfolders(base_dir):
        try:
            scripts = sorted(f.name + str(f.stat().st_mtime_ns) for f in (base_dir / name).iterdir()
                             if _is_run_script(f.name) or _is_tokenizer_script(f.name))
        except OSError:
            continue
        parts.append(name + ":" + ",".join(scripts))
    return "\n".join(parts).encode()


def this_host(setting: str = "auto") -> str:
    import platform

    if setting != "auto":
        return setting
    return host_tag(platform.machine(), Path("/proc/ax_proc").exists())
