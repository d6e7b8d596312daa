"""The poller's process dies at the worst moments; the next run finishes the work, one event per request
(a repeat only for a death between publishing and recording, and then with the same eventId and bytes).

The deaths are real: a poller process is SIGKILLed mid-run, or a poller process exits (os._exit) right
after Pub/Sub accepted an event / right before publishing it. Everything else is the emulators over sockets.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections import defaultdict

import pytest

from handlers.core import ledger as L
from tests.support import procs
from tests.support.function import Function, wait_for
from tests.support.hcapi import HC, unique
from tests.support.poller import Poller, PollerProcess, pull, started_doc, table

# A short lease, so that the next run may take over quickly (3 x POLL_CALL_TIMEOUT_S is the minimum).
CRASH_ENV = {"POLL_CALL_TIMEOUT_S": "1", "POLL_LEASE_S": "3", "POLL_BUDGET_S": "10"}

DIE_AROUND_PUBLISH = textwrap.dedent("""
    import os, sys
    import config
    from handlers import poller, wiring
    from handlers.adapters import pubsub as events

    publish = events.Events.publish

    def publish_then_die(self, data, attributes):
        if sys.argv[1] == "after":
            publish(self, data, attributes)  # Pub/Sub has stored the event ...
        os._exit(137)                        # ... and the process is gone before the ledger knows

    events.Events.publish = publish_then_die
    s = config.get()
    poller.Tick(s, *wiring.poller_for(s)).run()
""")


@pytest.fixture(scope="module")
def harness(pubsub_clients, pubsub, firestore, logs_dir, hc):
    f = Function("poll-crash", pubsub_clients, pubsub, firestore, logs_dir, hc.url, push_subscriptions=0)
    yield f
    f.stop()


def _done_request(p: Poller, store: str) -> tuple[str, dict]:
    op = p.export(store, table("missing_ds"))
    p.api.wait(op["name"])
    rid, _ = p.seed(store, op)
    return rid, op


def _die_around_publish(p: Poller, when: str) -> None:
    r = subprocess.run([sys.executable, "-c", DIE_AROUND_PUBLISH, when], cwd=procs.ROOT, env={**os.environ, **p.env},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 137, r.stdout + r.stderr


def _lease_expired(f, rid):
    return lambda: (d := f.ledger.get(rid)).get("leaseUntil") is None or d["leaseUntil"] < L.now()


def test_died_between_publishing_and_recording_publishes_the_same_event_again(harness, hcapi):
    f = harness
    p = Poller(f, env=CRASH_ENV)
    rid, _ = _done_request(p, hcapi.store())
    _die_around_publish(p, "after")

    [first] = pull(f, 1, {rid})
    doc = f.ledger.get(rid)
    assert doc["state"] == L.FAILED and doc["events"]["EXPORT_FAILED"]["published"] is False
    assert doc["leaseOwner"] and doc["nextPollAt"] <= L.now()  # the dead run's lease; due for a finisher

    wait_for(_lease_expired(f, rid), timeout=10, what="the dead run's lease to expire")
    summary = p.tick()
    assert summary["resumed"] == 1 and summary["published"] == 1
    [again] = pull(f, 1, {rid})
    assert again == first  # the one duplicate the contract allows: same eventId, same bytes
    assert again["attributes"]["eventId"] == f"{rid}:EXPORT_FAILED"
    doc = f.ledger.get(rid)
    assert doc["events"]["EXPORT_FAILED"]["published"] is True
    assert "nextPollAt" not in doc and "leaseOwner" not in doc
    p.tick()
    assert f.drain(1.0) == []


def test_died_after_recording_the_end_before_publishing(harness, hcapi):
    f = harness
    p = Poller(f, env=CRASH_ENV)
    rid, _ = _done_request(p, hcapi.store())
    _die_around_publish(p, "before")
    assert f.drain(1.0) == []
    assert f.ledger.get(rid)["state"] == L.FAILED

    wait_for(_lease_expired(f, rid), timeout=10, what="the dead run's lease to expire")
    p.tick()
    [e] = pull(f, 1, {rid})
    assert e["attributes"]["eventType"] == "EXPORT_FAILED" and e["data"]["requestId"] == rid
    assert f.ledger.get(rid)["events"]["EXPORT_FAILED"]["published"] is True
    p.tick()
    assert f.drain(1.0) == []


def test_a_poller_killed_mid_run_loses_nothing(harness, logs_dir, tmp_path):
    """SIGKILL while a run holds leases on requests, some ended and published, others not yet polled. After
    the leases expire the next run finishes the rest; each request ends with one event (a repeat, if the
    kill fell between a publication and its record, has the same eventId and bytes)."""
    f = harness
    slow = procs.healthcare_emulator(logs_dir, tmp_path / "hc", "--latency", "0.1",
                                     name=unique("hc-poll-kill")).start()
    proc = None
    try:
        p = Poller(f, env=CRASH_ENV, hc_url=slow.url)
        store = HC(slow.url).store()
        ops = p.exports(store, [table("missing_ds") for _ in range(40)])
        for op in ops:
            p.api.wait(op["name"])
        docs = [started_doc(store, unique("kill"), op)[1] for op in ops]
        rids = {d["requestId"] for d in docs}
        p.seed_many(docs)

        proc = PollerProcess(f, logs_dir, env={**CRASH_ENV, "POLL_CONCURRENCY": "2"}, name="poller-killed").start()
        threading.Thread(target=lambda: _ignore_errors(proc.tick), daemon=True).start()
        got = pull(f, 3, rids)  # the run is under way: some requests are done, most are not
        proc.svc.kill()

        leased = [d for d in (f.ledger.get(r) for r in rids) if d.get("leaseOwner")]
        assert leased, "the kill should leave leased requests behind"
        for d in leased:
            wait_for(_lease_expired(f, d["requestId"]), timeout=10, what="leases to expire")
        for _ in range(5):
            p.tick()
            if not f.ledger.in_state(L.STARTED, limit=1) and not any(
                    not f.ledger.get(r)["events"]["EXPORT_FAILED"]["published"] for r in rids):
                break
        got += f.drain(2.0)
        by_request = defaultdict(list)
        for e in got:
            by_request[e["attributes"]["requestId"]].append(e)
        assert set(by_request) == rids
        for events in by_request.values():  # one event, or identical repeats of it
            assert all(e == events[0] for e in events)
        assert sum(len(v) for v in by_request.values()) <= len(rids) + 2  # at most the in-flight ones repeat
    finally:
        if proc:
            proc.stop()
        slow.stop()


def _ignore_errors(fn):
    try:
        fn()
    except Exception:  # noqa: BLE001 - the request dies with the process, as intended
        pass
