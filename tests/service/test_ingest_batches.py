"""Ingest batching, in-process against the real Firestore, Pub/Sub and GCS emulators: size and age
limits, one running export per table, duplicates, deletions, a crash at every step, concurrency.
The intake and the poller are stood in for by writing the request's terminal ledger document."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest

from handlers.core import request as req
from tests.support.function import wait_for
from tests.support.ingest import instance_path, store_name

TABLE = "bq://test-project.ingest.dicom"


def _lines(p, batch) -> list[str]:
    return p.files.read(batch["filterObject"]).splitlines()


def test_size_limit_closes_batches_one_export_per_table(pieces):
    store = store_name()
    p = pieces({store: TABLE}, max_n=10, max_age_s=60)
    for i in range(25):
        assert p.notify(store, instance_path(i)) == "recorded"
    b1, b2 = p.batches()
    # the first full batch was exported at once; the second waits for the table
    assert (b1["state"], b2["state"]) == ("PUBLISHED", "READY")
    assert b1["instances"] == b2["instances"] == 10 and b1["reason"] == "size"
    assert _lines(p, b1) == sorted(instance_path(i) for i in range(10))
    assert _lines(p, b2) == sorted(instance_path(i) for i in range(10, 20))
    assert Counter(a["state"] for a in p.arrivals()) == {"BATCHED": 20, "PENDING": 5}
    table = p.ledger.table(b1["tableKey"])
    assert table["running"]["batchId"] == b1["batchId"] and table["running"]["requestId"] == b1["requestId"]

    [m] = p.pull_requests()
    assert m["data"] == {"requestId": f"ingest-{b1['batchId']}", "dicomStore": store,
                         "bigqueryDestination": {"tableUri": TABLE, "writeDisposition": "WRITE_APPEND"},
                         "filterConfig": {"resourcePathsGcsUri": f"gs://{p.bucket}/{b1['filterObject']}"},
                         "labels": {"ingest-batch": b1["batchId"]}}
    assert m["attributes"] == {"source": "ingest", "ingestBatch": b1["batchId"]}
    parsed = req.parse(m["raw"], "mid", req.Policy.from_settings(p.settings))
    assert parsed.ok, parsed.rejection  # the intake accepts it as it is

    # a tick while the export runs changes nothing
    assert p.ingest().tick()["busy"] == 1
    assert p.ledger.batch(b2["batchId"])["state"] == "READY"
    # the export ends (intake + poller record it): the tick releases the table and starts the next batch
    p.finish_request(b1["requestId"], counter={"success": "10"})
    summary = p.ingest().tick()
    assert summary["released"] == 1 and summary["started"] == 1
    assert p.ledger.batch(b1["batchId"])["state"] == "EXPORTED"
    assert p.ledger.batch(b1["batchId"])["counter"] == {"success": "10"}
    assert p.ledger.batch(b2["batchId"])["state"] == "PUBLISHED"
    assert [m["data"]["requestId"] for m in p.pull_requests()] == [b1["requestId"], b2["requestId"]]
    p.finish_request(b2["requestId"])
    p.ingest().tick()
    assert p.ledger.table(b1["tableKey"])["running"] is None
    # the 5 left are younger than INGEST_BATCH_MAX_AGE_S: still pending
    assert len(p.batches()) == 2 and p.ledger.count(b1["route"]) == 5


def test_age_limit_closes_when_the_table_is_idle_and_grows_while_it_is_busy(pieces):
    store = store_name()
    p = pieces({store: TABLE}, max_n=50, max_age_s=1)
    for i in range(3):
        p.notify(store, instance_path(i))
    assert p.batches() == []  # not full, not old
    wait_for(lambda: p.ingest().tick()["started"], timeout=10, interval=0.2, what="an aged batch")
    [b1] = p.batches()
    assert b1["reason"] == "age" and b1["instances"] == 3 and b1["state"] == "PUBLISHED"
    # while b1's export runs, aged arrivals are not closed: the open batch keeps growing
    for i in range(3, 10):
        p.notify(store, instance_path(i))
    t_end = time.monotonic() + 1.5
    while time.monotonic() < t_end:  # past the age limit, with ticks
        assert p.ingest().tick()["busy"] == 1
        time.sleep(0.2)
    assert len(p.batches()) == 1
    p.finish_request(b1["requestId"])
    assert p.ingest().tick() == {"closed": 0, "started": 1, "released": 1, "busy": 0, "errors": 0}
    b2 = p.batches()[1]
    assert b2["instances"] == 7 and b2["reason"] == "age"
    assert _lines(p, b2) == sorted(instance_path(i) for i in range(3, 10))


def test_duplicates_deletions_and_other_notifications(pieces):
    store, other_store = store_name(), store_name()
    p = pieces({store: TABLE}, max_n=4, max_age_s=60)
    assert p.notify(store, instance_path(1), message_id="m1") == "recorded"
    assert p.notify(store, instance_path(1), message_id="m1") == "duplicate"      # redelivery
    assert p.notify(store, instance_path(1), message_id="m1-again") == "duplicate"  # re-published copy
    assert p.notify(store, instance_path(2), action=None) == "recorded"           # legacy: data only
    assert p.notify(store, instance_path(2), action=None) == "duplicate"
    assert p.notify(store, instance_path(3), action="DeleteInstance") == "deletion"
    assert p.notify(store, instance_path(3), action="DeleteInstance") == "duplicate"  # counted once
    assert p.batches() == []
    # deletions are changes like stores: the 4th pending change closes the batch
    assert p.notify(store, instance_path(4), action="DeleteStudy", version=None) == "deletion"
    [b] = p.batches()
    assert b["state"] == "PUBLISHED" and len(b["arrivalIds"]) == 4
    assert _lines(p, b) == sorted({instance_path(i) for i in (1, 2)})  # it exports the stored ones
    assert b["removals"] == {"sops": [f"1.2.3.4.{i}" for i in (1, 2, 3, 4)], "series": [], "studies": []}
    assert p.notify(store, instance_path(4), action="SetBlobSettings") == "ignored"
    assert p.notify(other_store, instance_path(5)) == "unrouted"
    ing = p.ingest()
    assert ing.notification("not a resource name", {}, "m-bad", None) == "malformed"
    assert ing.notification(None, {}, "m-none", None) == "malformed"
    assert ing.notification(f"{store}/dicomWeb/studies/1.2/series/x/instances/3", {}, "m-x", None) == "malformed"
    # a new version of instance 1 (stored again), and a whole study deleted by its resource name: pending
    assert p.notify(store, instance_path(1), version="2") == "recorded"
    assert p.notify(store, "/studies/9.9", action="DeleteStudy") == "deletion"
    assert len(p.batches()) == 1
    counts = Counter(a["state"] for a in p.arrivals())
    assert counts == {"BATCHED": 4, "PENDING": 2, "OTHER": 1}
    assert p.ledger.count(b["route"], "PENDING") == 2
    assert Counter(a["kind"] for a in p.arrivals()) == {"arrival": 3, "deletion": 3, "other": 1}


class Crash(BaseException):
    """The process dies here (BaseException: no `except Exception` of the function catches it)."""


class Crashing:
    """Delegates to `target`; the first call of `method` dies before or after doing its work."""

    def __init__(self, target, method: str, when: str):
        self.target, self.method, self.when, self.fired = target, method, when, False

    def __getattr__(self, name):
        real = getattr(self.target, name)
        if name != self.method or self.fired:
            return real

        def call(*a, **kw):
            self.fired = True
            if self.when == "before":
                raise Crash(f"before {name}")
            try:
                real(*a, **kw)
            finally:  # dies once the call has returned, or failed (a DML on a table not there yet: 404)
                raise Crash(f"after {name}")  # noqa: B012
        return call


CRASH_POINTS = [("ledger", "open_batch", "after"), ("ledger", "mark_batched", "before"),
                ("ledger", "mark_batched", "after"), ("files", "write_once", "after"),
                ("ledger", "finish_close", "before"), ("ledger", "finish_close", "after"),
                ("ledger", "claim_table", "after"), ("bigquery", "run_once", "before"), ("bigquery", "run_once", "after"),
                ("requests", "publish", "before"),
                ("requests", "publish", "after"), ("ledger", "update_batch_if", "before"),
                ("ledger", "release_table", "after")]


@pytest.mark.parametrize("target, method, when", CRASH_POINTS)
def test_a_crash_at_any_step_loses_nothing_and_exports_once(pieces, target, method, when):
    store = store_name()
    p = pieces({store: TABLE}, max_n=5, max_age_s=60)
    parts = {"ledger": p.ledger, "files": p.files, "requests": p.requests, "bigquery": p.bigquery}
    crashing = Crashing(parts[target], method, when)
    parts[target] = crashing
    doomed = p.ingest(**parts)
    for i in range(4):
        p.notify(store, instance_path(i))
    if method == "release_table":
        p.notify(store, instance_path(4))
        [b] = p.batches()
        p.finish_request(b["requestId"])
        with pytest.raises(Crash):
            doomed.tick()
    else:
        with pytest.raises(Crash):
            p.notify(store, instance_path(4), ingest=doomed)  # the fifth arrival closes the batch
    assert crashing.fired
    # recorded before the crash, so the notification is redelivered or not: either way nothing is lost
    p.notify(store, instance_path(4))
    # a fresh instance (the next notification or the tick) finishes whatever was interrupted
    p.ingest().tick()
    [b] = p.batches()
    assert b["state"] in ("PUBLISHED", "EXPORTED"), b["state"]
    assert _lines(p, b) == sorted(instance_path(i) for i in range(5))
    assert Counter(a["state"] for a in p.arrivals()) == {"BATCHED": 5}
    p.finish_request(b["requestId"])
    p.ingest().tick()
    assert p.ledger.batch(b["batchId"])["state"] == "EXPORTED"
    assert p.ledger.table(b["tableKey"])["running"] is None
    msgs = p.pull_requests()
    # (a crash around the batch's DML, or before it is recorded, runs the DML again: nothing was appended yet)
    # one request; published again only when the crash fell between publishing and recording it, then with
    # the same requestId and the same bytes (the intake records the first and ignores the copy)
    assert {m["data"]["requestId"] for m in msgs} == {b["requestId"]}
    assert len({m["raw"] for m in msgs}) == 1
    assert len(msgs) == (2 if (target, method, when) == ("requests", "publish", "after") else 1)
    assert p.ledger.route(b["route"])["closing"] is None and p.ledger.route(b["route"])["seq"] == 1


def test_concurrent_notifications_each_path_in_exactly_one_batch(pieces):
    stores = [store_name(), store_name()]
    tables = [TABLE, TABLE.replace("dicom", "other")]
    p = pieces({stores[0]: tables[0], stores[1]: tables[1]}, max_n=25, max_age_s=1)
    errors = []

    def worker(k):
        try:
            ing = p.ingest()
            for i in range(k, 240, 6):
                s = stores[i % 2]
                p.notify(s, instance_path(i), ingest=ing)
                if i % 5 == 0:
                    p.notify(s, instance_path(i), ingest=ing)  # a duplicate, concurrently with others
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors

    def drained():
        for b in p.batches():
            if b["state"] == "PUBLISHED" and p.requests_ledger.get(b["requestId"]) is None:
                p.finish_request(b["requestId"])
        p.ingest().tick()
        bs = p.batches()
        return bs and all(b["state"] == "EXPORTED" for b in bs) and sum(b["instances"] for b in bs) == 240
    wait_for(drained, timeout=60, interval=0.3, what="every arrival exported")
    bs = p.batches()
    seen = Counter(line for b in bs for line in _lines(p, b))
    assert set(seen.values()) == {1} and len(seen) == 240
    assert all(b["instances"] <= 25 for b in bs)
    for route in {b["route"] for b in bs}:
        seqs = sorted(b["seq"] for b in bs if b["route"] == route)
        assert seqs == list(range(1, len(seqs) + 1))
    assert Counter(a["state"] for a in p.arrivals()) == {"BATCHED": 240}
    assert len({json.dumps(m["data"]["requestId"]) for m in p.pull_requests()}) == len(bs)
