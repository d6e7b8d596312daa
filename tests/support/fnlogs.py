"""The structured log lines of a function process (one log file per start), as the tests read them."""
from __future__ import annotations

import json
from pathlib import Path


def text(logs_dir, name: str, runs: int) -> str:
    """Everything the function `name` printed, over its `runs` starts (fn-NAME-1.log, fn-NAME-2.log, ...)."""
    out = []
    for i in range(1, runs + 1):
        p = Path(logs_dir) / f"fn-{name}-{i}.log"
        if p.exists():
            out.append(p.read_text(errors="replace"))
    return "".join(out)


def entries(log_text: str) -> list[dict]:
    """The JSON log entries among the lines (functions-framework's own lines are skipped)."""
    out = []
    for line in log_text.split("\n"):  # not splitlines(): that also splits on U+0085, U+2028, ...
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out
