"""What every child process of the daemon gets, and how an earlier instance's children are found.

- An explicit, minimal environment: the variables a runner, a tokenizer server or a worker needs
  (PATH, locale, the AXCL libraries, the emulator's controls, …, plus what the settings name),
  never the daemon's own `AXM1_*` settings — API keys among them — nor anything else it was given.
- An owner tag, `AXM1_OWNER=<data_dir>`: every child of the daemon that uses this data folder
  carries it, so that at start-up the daemon finds what an earlier instance left running (after
  a SIGKILL, say: on the card such a runner keeps its NPU memory) and ends it. Found by this tag
  only, never by a process name.
- A parent-death signal: a child the daemon started directly is killed by the kernel when the
  daemon dies. A run script's own children (the runner) end when their pipes to the daemon break,
  and the next start-up sweeps whatever is left.
"""
from __future__ import annotations

import ctypes
import fcntl
import fnmatch
import logging
import os
import signal
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

OWNER_VARIABLE = "AXM1_OWNER"
# What children need; glob patterns allowed. The daemon's own AXM1_* variables are never passed.
PASSED_TO_CHILDREN = (
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_*", "TZ", "TMPDIR", "TERM", "XDG_CACHE_HOME",
    "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", "AXCL_*", "AX_EMU_*",
    "HF_*", "TRANSFORMERS_*", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
)

_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved now: never look it up after fork
except (OSError, AttributeError):  # not Linux
    _prctl = None


def owner_tag(data_dir: Path) -> str:
    return str(Path(data_dir).resolve())


def child_environment(
    owner: str, passthrough: Iterable[str] = (), extra: Mapping[str, str] | None = None,
    source: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a child: the allowed variables of `source` (default: ours), the ones
    `passthrough` names too, `extra`, and the owner tag."""
    source = os.environ if source is None else source
    patterns = (*PASSED_TO_CHILDREN, *passthrough)
    env = {
        name: value for name, value in source.items()
        if not name.startswith("AXM1_") and any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
    }
    env.update(extra or {})
    env[OWNER_VARIABLE] = owner
    return env


def die_with_parent() -> None:
    """For `preexec_fn`: the kernel sends SIGKILL to this child when the daemon dies."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def processes_owned_by(owner: str, proc: Path = Path("/proc")) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes carrying `AXM1_OWNER=<owner>`."""
    needle = f"{OWNER_VARIABLE}={owner}".encode()
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append((int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")))
        except OSError:  # gone, or not ours to read
            continue
    return found


class DataDirInUse(Exception):
    pass


def claim_data_dir(data_dir: Path) -> IO[str]:
    """Lock `data_dir` for this process's life (keep the returned file open). A second daemon on
    the same folder is refused, so that ending "leftovers" never hits a live instance's children."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = open(data_dir / "daemon.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise DataDirInUse(f"data_dir {data_dir} is in use by another instance (pid {holder}); give each its own") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def end_leftovers(owner: str) -> list[tuple[int, str]]:
    """Kill (with their process groups) the processes an earlier instance left running under this
    owner tag. Call at start-up, after `claim_data_dir` and before any child of ours exists.
    Returns what was found."""
    me = os.getpid()
    leftovers = [(pid, cmd) for pid, cmd in processes_owned_by(owner) if pid != me]
    for pid, cmd in leftovers:
        log.warning("ending a process left by an earlier instance of the daemon: pid %d: %s", pid, cmd[:200])
        try:
            group = os.getpgid(pid)
            if group != os.getpgid(me):
                os.killpg(group, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return leftovers
