"""Fault injection: which faults are active, and the "card memory still busy" state file.

Sources, later ones overriding earlier ones key by key: the `--emu_faults SPEC` flag, the
environment variable AX_EMU_FAULTS=SPEC, and the JSON object in the file named by
AX_EMU_FAULT_FILE (re-read at every start and every turn, so a test can change faults while a
daemon runs). SPEC is `key=value,key=value`.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

INIT_FAILURES = ("connect", "set_device", "get_device", "axcl_timeout", "init_axmodel", "embed_selector")
CRASH_SIGNALS = ("SEGV", "KILL", "ABRT")

FAULT_HELP = {
    "init_fail": "connect|set_device|get_device|axcl_timeout|init_axmodel|embed_selector: print the "
                 "card's failure line for that step of the start-up, then exit with status 255",
    "crash_after_tokens": "N: die by crash_signal after the N-th token of a reply; text already "
                          "flushed stays, buffered log lines are lost",
    "crash_signal": "SEGV|KILL|ABRT (default SEGV)",
    "hang_after_tokens": "N: stop producing output forever after the N-th token of a reply; SIGINT "
                         "is ignored, SIGTERM and SIGKILL still end it",
    "hang_at_init": "1: the load progress bar stops part-way, forever",
    "tokens_per_second": "F: decode at most F tokens per second (any engine)",
    "garbage": "1: the first text chunk of every reply carries random bytes, invalid UTF-8 included",
    "busy_after_crash_seconds": "N: after a crash or SIGTERM, starts within N seconds fail with "
                                "'Set AXCL device failed{0x8030040a}.' and exit 255",
}


@dataclass(frozen=True)
class Faults:
    init_fail: str = ""
    crash_after_tokens: int = 0
    crash_signal: str = "SEGV"
    hang_after_tokens: int = 0
    hang_at_init: bool = False
    tokens_per_second: float = 0.0
    garbage: bool = False
    busy_after_crash_seconds: float = 0.0


class FaultSpecError(ValueError):
    """A fault key or value the emulator does not know."""


def parse_spec(spec: str) -> dict[str, str]:
    """`key=value,key=value` → {key: value}."""
    pairs = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise FaultSpecError(f"fault '{item}' is not key=value")
        pairs[key.strip()] = value.strip()
    return pairs


def build(settings: dict[str, object]) -> Faults:
    """Validated Faults from raw key/value settings."""
    unknown = set(settings) - set(FAULT_HELP)
    if unknown:
        raise FaultSpecError(f"unknown fault key(s): {', '.join(sorted(unknown))}")
    typed: dict[str, object] = {}
    for key, value in settings.items():
        kind = type(getattr(Faults, key))
        if kind is bool:
            typed[key] = str(value).lower() in ("1", "true")
        else:
            try:
                typed[key] = kind(value)
            except (TypeError, ValueError) as exc:
                raise FaultSpecError(f"fault {key}={value!r}: {exc}") from None
    faults = Faults(**typed)
    if faults.init_fail and faults.init_fail not in INIT_FAILURES:
        raise FaultSpecError(f"init_fail must be one of {', '.join(INIT_FAILURES)}")
    if faults.crash_signal not in CRASH_SIGNALS:
        raise FaultSpecError(f"crash_signal must be one of {', '.join(CRASH_SIGNALS)}")
    return faults


def current(flag_spec: str, environ: dict[str, str] = os.environ) -> Faults:
    """The faults active now, from the flag, AX_EMU_FAULTS and AX_EMU_FAULT_FILE."""
    settings: dict[str, object] = {}
    settings.update(parse_spec(flag_spec))
    settings.update(parse_spec(environ.get("AX_EMU_FAULTS", "")))
    fault_file = environ.get("AX_EMU_FAULT_FILE")
    if fault_file and Path(fault_file).is_file():
        text = Path(fault_file).read_text() or "{}"
        settings.update(json.loads(text))
    return build(settings)


def _state_file(device: str, environ: dict[str, str]) -> Path:
    state_dir = Path(environ.get("AX_EMU_STATE_DIR") or tempfile.gettempdir())
    return state_dir / f"ax-emulator-device-{device}.json"


def record_crash(device: str, busy_seconds: float, environ: dict[str, str] = os.environ) -> None:
    """Remember that the card's memory stays claimed for `busy_seconds` from now."""
    if busy_seconds <= 0:
        return
    path = _state_file(device, environ)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"busy_until": time.time() + busy_seconds}))


def device_busy(device: str, environ: dict[str, str] = os.environ) -> bool:
    """Whether an earlier crash still holds this device's memory."""
    try:
        state = json.loads(_state_file(device, environ).read_text())
    except (OSError, ValueError):
        return False
    return time.time() < float(state.get("busy_until", 0))
