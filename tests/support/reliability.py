"""The reliability suite's sizes and figures.

Sizes come from RELIABILITY_SCALE (`small`, the default, keeps `make test` quick; `full` is what
`make reliability` runs). Every test reports its figures with `report(...)`: printed, shown in pytest's
terminal summary (make test does not pass -s), and appended as one JSON line to $RELIABILITY_REPORT if set.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import requests

SCALE = os.environ.get("RELIABILITY_SCALE", "small").strip().lower() or "small"
if SCALE not in ("small", "full"):
    raise pytest.UsageError(f"RELIABILITY_SCALE={SCALE!r}: expected small or full")

SIZES = {
    "small": {"bad_messages": 300, "allowlist": 40, "dup_requests": 20, "fault_requests": 20,
              "kill_runs": 5, "kill_requests": 3, "phi_requests": 3, "concurrent_stow": 12},
    "full": {"bad_messages": 10_000, "allowlist": 1000, "dup_requests": 100, "fault_requests": 100,
             "kill_runs": 50, "kill_requests": 4, "phi_requests": 10, "concurrent_stow": 64},
}[SCALE]

_FIGURES: list[dict] = []


def report(test: str, **figures) -> dict:
    """Print a test's figures, keep them for the terminal summary, and append them to $RELIABILITY_REPORT."""
    line = {"test": test, "scale": SCALE, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **figures}
    print(f"RELIABILITY {json.dumps(line, default=str)}", flush=True)
    _FIGURES.append(line)
    path = os.environ.get("RELIABILITY_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, default=str) + "\n")
    return line


def counts(hc_url: str) -> dict:
    return requests.get(f"{hc_url}/emulator/requestCounts", timeout=10).json()


def total(hc_url: str, key: str = "export.calls") -> int:
    return sum(int(v.get(key, 0)) for v in counts(hc_url).values())
