"""Cloud Resource Manager adapter: a project's number (projects.get, v1), for the Cloud Healthcare Service
Agent's address in an export failure's remedy (handlers/core/remedy.py).

Asked only when an export has failed for want of BigQuery grants, once per project per instance: a number
found is kept; a failure (no permission, the API unreachable, no time) answers None and is asked again next
time, the remedy then naming the agent with a placeholder. Transport, auth and retries are transport.py's.
"""
from __future__ import annotations

import threading
import time

from . import transport as gh


class ResourceManager:
    def __init__(self, endpoint: str, *, timeout_s: float, tokens: gh.Tokens | None):
        self.endpoint = endpoint.rstrip("/")
        self.timeout_s = timeout_s
        self.tokens = tokens or gh.Tokens()
        self._numbers: dict[str, str] = {}
        self._lock = threading.Lock()

    def project_number(self, project: str) -> str | None:
        """The project's number, or None when it cannot be had within the time limit."""
        with self._lock:
            if project in self._numbers:
                return self._numbers[project]
        try:
            r = gh.call("GET", f"{self.endpoint}/v1/projects/{project}", tokens=self.tokens,
                        deadline=time.monotonic() + self.timeout_s, what="projects.get", timeout_s=self.timeout_s,
                        max_attempts=2)
            number = r.json().get("projectNumber")
        except (gh.HttpError, gh.Unavailable, ValueError, AttributeError):
            return None
        if not isinstance(number, str) or not number.isdigit():
            return None
        with self._lock:
            self._numbers[project] = number
        return number
