"""Timestamps as the API writes them."""
from __future__ import annotations

import time
from datetime import datetime, timezone


def rfc3339(epoch: float) -> str:
    """A UTC time as RFC 3339 with a Z, the form every timestamp of the API uses."""
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def now_rfc3339() -> str:
    return rfc3339(time.time())


def rfc3339_in(seconds_from_now: float) -> str:
    return rfc3339(time.time() + seconds_from_now)
