"""Ingest end to end on the local stack: real DICOM instances STOWed into a Healthcare
emulator store whose notifications feed ingest_notification over a Pub/Sub push subscription; batches go
through the real intake and poller processes; rows are counted in the emulator's BigQuery warehouse.
Nothing is mocked and nothing waits on a fixed sleep: every wait is a condition with a deadline."""
from __future__ import annotations

from collections import Counter

import pytest
import requests

from tests.support.function import wait_for
from tests.support.ingest import IngestStack, make_instances, stow_bursts

pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def stack_factory(pubsub, firestore, gcs, logs_dir, tmp_path, pubsub_clients):
    made = []

    def make(store_ids, **kw) -> IngestStack:
        st = IngestStack(pubsub=pubsub, firestore=firestore, gcs=gcs, logs_dir=logs_dir,
                         data_dir=tmp_path / f"hc-{len(made)}", pubsub_clients=pubsub_clients,
                         store_ids=store_ids, **kw)
        made.append(st)
        return st.start()
    yield make
    for st in made:
        st.stop()


def _request_counts(st) -> dict:
    return requests.get(f"{st.hc_svc.url}/emulator/requestCounts", timeout=10).json()


def _assert_batches(st, sid, n_instances, max_n):
    ingest_ledger, requests_ledger = st.ledgers()
    route_batches = [b for b in ingest_ledger.batches() if b["store"] == st.stores[sid]]
    assert route_batches, "no batch"

    def settled():  # the poller records the last export's end, and the tick releases its table
        st.tick()
        return all(ingest_ledger.batch(b["batchId"])["state"] == "EXPORTED" for b in route_batches)
    wait_for(settled, timeout=60, interval=1, what="every batch EXPORTED")
    paths = Counter(p for b in route_batches for p in b["paths"])
    assert len(paths) == n_instances and set(paths.values()) == {1}, "a path in two batches, or one missing"
    assert all(b["instances"] <= max_n for b in route_batches)
    docs = [requests_ledger.get(b["requestId"]) for b in route_batches]
    assert all(d and d["state"] == "SUCCEEDED" for d in docs), [d and d["state"] for d in docs]
    return route_batches, docs


def _no_overlap(docs):
    """The exports' [createTime, endTime] intervals, sorted, never overlap."""
    from datetime import datetime

    def t(v):
        return datetime.fromisoformat(v.replace("Z", "+00:00"))
    spans = sorted((t(d["createTime"]), t(d["endTime"])) for d in docs)
    for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
        assert e1 <= s2, f"exports overlap: {s1}..{e1} and {s2}..{e2}"


def test_500_instances_in_bursts_arrive_exactly_once_despite_duplicates_and_a_killed_function(
        stack_factory, tmp_path):
    st = stack_factory(["s1"], max_n=100, max_age_s=2)
    files = make_instances(tmp_path / "dcm", 500)
    store = st.stores["s1"]

    stow_bursts(st.hc, store, files[:200])
    # duplicates: copies of 60 notifications already sent, published again (same data and attributes)
    st.republish(st.pull_notifications(60))
    # the function dies in the middle of the flow (SIGKILL: in-flight deliveries are lost and redelivered)
    wait_for(lambda: any(e.get("message") == "ingest batch closed"
                         for e in st.ingest_notification.log_entries()), timeout=60, what="a first batch")
    st.ingest_notification.kill()
    stow_bursts(st.hc, store, files[200:350])  # notified while the function is down
    st.ingest_notification.start()
    stow_bursts(st.hc, store, files[350:])
    st.republish(st.pull_notifications(440)[-80:])

    rows = st.wait_rows({"s1": 500})
    assert rows["s1"] == {"n": 500, "d": 500}
    batches, docs = _assert_batches(st, "s1", 500, 100)
    assert len(batches) >= 5
    # exactly one export per batch, one at a time on the table
    assert _request_counts(st)[store] == {"export.calls": len(batches), "export": len(batches)}
    _no_overlap(docs)
    # consumers see the usual events, labelled with the batch
    succeeded = [e for e in st.events(timeout=10) if e["attributes"]["eventType"] == "EXPORT_SUCCEEDED"]
    assert sorted(e["data"]["labels"]["ingest-batch"] for e in succeeded) == sorted(b["batchId"] for b in batches)
    # nothing more is exported later (no straggling duplicate makes another batch)
    st.tick()
    st.tick()
    assert st.rows("s1") == {"n": 500, "d": 500}
    assert len(st.ledgers()[0].batches()) == len(batches)
    ingest_ledger, _ = st.ledgers()
    assert ingest_ledger.count(batches[0]["route"], "BATCHED") == 500
    assert ingest_ledger.count(batches[0]["route"], "PENDING") == 0
    outcomes = Counter(e.get("ingestOutcome") for e in st.ingest_notification.log_entries())
    assert outcomes["duplicate"] >= 100, outcomes


def test_with_one_concurrent_operation_batches_queue_and_all_complete(stack_factory, tmp_path):
    st = stack_factory(["a", "b"], hc_flags=("--max-running-operations", "1"), max_n=50, max_age_s=2)
    files = make_instances(tmp_path / "dcm", 300)
    import threading
    threads = [threading.Thread(target=stow_bursts, args=(st.hc, st.stores["a"], files[:150])),
               threading.Thread(target=stow_bursts, args=(st.hc, st.stores["b"], files[150:]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = st.wait_rows({"a": 150, "b": 150})
    assert rows == {"a": {"n": 150, "d": 150}, "b": {"n": 150, "d": 150}}
    docs = []
    for sid in ("a", "b"):
        batches, d = _assert_batches(st, sid, 150, 50)
        assert len(batches) >= 3
        assert _request_counts(st)[st.stores[sid]]["export"] == len(batches)
        docs += d
    _no_overlap(docs)  # the emulator allows one running operation per project: they ran one after another
