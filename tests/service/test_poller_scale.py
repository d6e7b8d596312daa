"""Many requests, overlapping runs: 1,000 STARTED requests drained by short runs, two at a time, none lost
and none published twice; and two functions-framework poller processes ticked at the same moment."""
from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from handlers.core import ledger as L
from tests.support import procs
from tests.support.function import Function
from tests.support.hcapi import HC, unique
from tests.support.poller import Poller, PollerProcess, pull, started_doc, table


def _operations(p: Poller, store: str, n: int) -> list[dict]:
    """n real, finished operations (exports to a missing BigQuery dataset end at once with code 5)."""
    ops = p.exports(store, [table("missing_ds") for _ in range(n)])
    for op in ops:
        p.api.wait(op["name"])
    return ops


def test_1000_started_requests_are_drained_across_runs_none_lost(pubsub_clients, pubsub, firestore, logs_dir, hc):
    f = Function("drain", pubsub_clients, pubsub, firestore, logs_dir, hc.url, push_subscriptions=0)
    try:
        # Short runs (stop after ~1.5 s), two at a time: the set needs several rounds, and runs overlap.
        p = Poller(f, env={"POLL_BUDGET_S": "2", "POLL_CALL_TIMEOUT_S": "0.5", "POLL_LEASE_S": "10",
                           "POLL_PAGE_SIZE": "100"})
        store = HC(hc.url).store()
        ops = _operations(p, store, 250)  # four requests per operation (the ledger does not mind)
        docs = [started_doc(store, f"drain-{i:04d}-{unique('r')}", ops[i % 250])[1] for i in range(1000)]
        rids = {d["requestId"] for d in docs}
        p.seed_many(docs)

        summaries, rounds = [], 0
        while True:
            with ThreadPoolExecutor(2) as ex:
                round_ = list(ex.map(lambda _: p.tick(), range(2)))
            summaries += round_
            rounds += 1
            if not any(s.get("failed") or s.get("busy") or s.get("budgetExhausted") for s in round_):
                break
            assert rounds < 40, summaries
        assert rounds > 2  # it did take several runs
        assert any(s.get("budgetExhausted") for s in summaries)  # runs stopped on their budget ...
        assert sum(s.get("failed", 0) for s in summaries) == 1000  # ... and between them ended each request once

        got = pull(f, 1000, rids)
        counts = Counter(e["attributes"]["eventId"] for e in got)
        assert len(counts) == 1000 and set(counts.values()) == {1}
        assert {e["attributes"]["eventType"] for e in got} == {"EXPORT_FAILED"}
        assert f.drain(1.5) == []
        assert not f.ledger.in_state(L.STARTED, limit=5)
        assert len(f.ledger.in_state(L.FAILED, limit=1001)) == 1000
    finally:
        f.stop()


def test_two_poller_processes_ticked_at_once_publish_one_event_per_request(pubsub_clients, pubsub, firestore,
                                                                          logs_dir, tmp_path):
    """Two instances of poll_exports (two processes) get a tick at the same moment (a redelivered tick, or a
    run still going when the next starts), round after round until nothing is left. With 20 ms per API
    call each run lasts long enough to overlap the other."""
    slow = procs.healthcare_emulator(logs_dir, tmp_path / "hc", "--latency", "0.02",
                                     name=unique("hc-two-runs")).start()
    f = Function("two-runs", pubsub_clients, pubsub, firestore, logs_dir, slow.url, push_subscriptions=0)
    runners = []
    try:
        p = Poller(f)
        store = HC(slow.url).store()
        ops = _operations(p, store, 150)
        docs = [started_doc(store, unique("two"), op)[1] for op in ops]
        rids = {d["requestId"] for d in docs}
        p.seed_many(docs)
        env = {"POLL_CONCURRENCY": "4", "POLL_PAGE_SIZE": "50"}
        runners = [PollerProcess(f, logs_dir, env=env, name=f"poller-{i}").start() for i in range(2)]

        def tick(r):
            barrier.wait()
            return r.tick().status_code
        for _ in range(10):
            barrier = threading.Barrier(2)
            with ThreadPoolExecutor(2) as ex:
                assert list(ex.map(tick, runners)) == [200, 200]
            if not f.ledger.in_state(L.STARTED, limit=1):
                break

        got = pull(f, 150, rids)
        assert sorted(e["attributes"]["requestId"] for e in got) == sorted(rids)  # one event per request
        assert f.drain(1.5) == []
        runs = [s for r in runners for s in r.summaries()]
        done = [sum(s.get("failed", 0) for s in r.summaries()) for r in runners]
        assert sum(done) == 150 and all(done)  # both worked, on different requests ...
        assert sum(s.get("busy", 0) for s in runs) > 0  # ... and met each other's leases
    finally:
        for r in runners:
            r.stop()
        f.stop()
        slow.stop()
