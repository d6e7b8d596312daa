"""The Resource Manager adapter (handlers/adapters/resource_manager.py) against the emulator: a project's number,
asked once per instance; and, when it cannot be had, None within the time limit (the remedy then names the agent
with its placeholder)."""
from __future__ import annotations

from handlers.adapters.resource_manager import ResourceManager
from healthcare_emulator import iam
from tests.support import procs


def test_the_number_is_asked_once_and_kept(hc):
    rm = ResourceManager(hc.url, timeout_s=5, tokens=None)
    assert rm.project_number("rm-proj-one") == iam.project_number("rm-proj-one")
    rm.endpoint = f"http://127.0.0.1:{procs.free_port()}"  # nothing answers there any more: no second call is made
    assert rm.project_number("rm-proj-one") == iam.project_number("rm-proj-one")


def test_without_an_answer_it_is_none():
    closed = procs.free_port()
    rm = ResourceManager(f"http://127.0.0.1:{closed}", timeout_s=1, tokens=None)
    assert rm.project_number("rm-proj-two") is None
