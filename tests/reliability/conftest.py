"""The reliability suite: figures measured against the real emulators and function processes
(sizes and the report: tests/support/reliability.py; the fixtures are the service tests')."""
from __future__ import annotations

import json

from tests.support.function import emulator_env, hcapi, make_function, pubsub_clients  # noqa: F401
from tests.support.reliability import _FIGURES, SCALE


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section(f"reliability figures (RELIABILITY_SCALE={SCALE})")
        for line in _FIGURES:
            rest = {k: v for k, v in line.items() if k not in ("test", "scale", "time")}
            terminalreporter.write_line(f"{line['test']}: {json.dumps(rest, default=str)}")
