"""The clock and this instance's name: one of each for every function."""
from __future__ import annotations

import os
import socket
from datetime import datetime, timezone

INSTANCE = f"{socket.gethostname()}:{os.getpid()}"


def now() -> datetime:
    """The current time, timezone-aware UTC (as every ledger timestamp)."""
    return datetime.now(timezone.utc)


def rfc3339(t: datetime) -> str:
    """`t` as an RFC 3339 UTC string with microseconds and a Z."""
    return t.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
