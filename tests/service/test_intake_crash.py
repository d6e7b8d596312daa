"""Crash windows (docs/reliability.md, "Reliability: what happens when the intake dies between two steps"):
the process dies between two steps, Pub/Sub redelivers, and the request ends with exactly one export and
its event.

The first test really kills the function (SIGKILL) while its export call is in flight; the others
leave the ledger exactly as a process that died at that step would have, then deliver the request."""
from __future__ import annotations

import json
from datetime import timedelta

import pytest

from handlers import intake
from handlers.core import events as ev
from handlers.core import gate as G
from handlers.core import ledger as L
from handlers.core import request as req
from tests.support import procs
from tests.support.function import request_counts, valid_request, wait_for
from tests.support.hcapi import HC, unique


def test_killed_while_the_export_call_is_in_flight(make_function, logs_dir, tmp_path):
    """The window that matters most for WRITE_APPEND: the API started the export, the process died
    before recording it. The redelivery finds the operation with operations.list, no second export."""
    slow = procs.healthcare_emulator(logs_dir, tmp_path / "slow", "--latency", "1.5",
                                     name=f"healthcare-emulator-{unique('slow')}").start()
    try:
        api = HC(slow.url)
        store = api.store()
        f = make_function("kill", hc_url=slow.url, env={"HEALTHCARE_RETRY_BUDGET_S": "4", "INTAKE_LEASE_S": "5"})
        rid = unique("kill")
        f.publish(valid_request(store, rid))
        wait_for(lambda: request_counts(slow.url).get(store, {}).get("export.calls"), what="the export call")
        f.kill()  # the API is still answering the call: the export will start, unrecorded
        wait_for(lambda: request_counts(slow.url)[store].get("export") == 1, what="the export to start")
        doc = f.ledger.get(rid)
        assert doc["state"] == "STARTING" and doc["operation"] is None

        f.start()  # a new instance; Pub/Sub redelivers the unacknowledged message
        [e] = f.events(1, timeout=60, where=lambda e: e["attributes"]["requestId"] == rid)
        assert e["attributes"]["eventType"] == "EXPORT_STARTED"
        ops = api.get(f"{store.split('/dicomStores/')[0]}/operations").json()["operations"]
        [export_op] = [op for op in ops if "ExportDicomData" in op["metadata"]["apiMethodName"]]
        assert e["data"]["operation"] == export_op["name"]
        assert request_counts(slow.url)[store] == {"export.calls": 1, "export": 1}
        assert any(x["message"].startswith("export started (operation found again") for x in f.log_entries())
        assert f.drain(1.5) == []
    finally:
        slow.stop()


def _seed(f, store, rid, state, *, published_at=None, **fields):
    """The ledger as a process that died at `state` left it (its lease expired); in STARTING, with the
    dataset's gate it held (created in the same commit, its lease as expired)."""
    body = valid_request(store, rid)
    raw = json.dumps(body).encode()
    parsed = req.parse(raw, "seeded-message")
    now = L.now()
    doc = intake.new_document(parsed, raw, "seeded-message", published_at=published_at or now, owner=None,
                              lease_s=0)
    doc.update(state=state, leaseOwner="dead-instance", leaseUntil=now - timedelta(seconds=1), **fields)
    writes = [f.ledger.create_write(rid, doc)]
    if state == L.STARTING:
        doc["gateAcquiredAt"] = doc["firstAttemptAt"]
        writes.append(f.ledger.gate_create(G.Gate(doc["hcDataset"], rid, "dead-instance", doc["leaseUntil"],
                                                  doc["gateAcquiredAt"])))
    assert f.ledger.commit(writes) is not None
    return body, doc


@pytest.fixture(scope="module")
def crash_function(request, pubsub_clients, pubsub, firestore, logs_dir, hc):
    from tests.support.function import Function
    f = Function("crash", pubsub_clients, pubsub, firestore, logs_dir, hc.url,
                 env={"HEALTHCARE_RETRY_BUDGET_S": "4", "INTAKE_LEASE_S": "5"})
    f.start()
    yield f
    f.stop()


def test_died_after_recording_received(crash_function, hcapi, hc):
    f, store, rid = crash_function, hcapi.store(), unique("received")
    body, _ = _seed(f, store, rid, L.RECEIVED)
    f.publish(body)
    [e] = f.events(1, where=lambda e: e["attributes"]["requestId"] == rid)
    assert e["attributes"]["eventType"] == "EXPORT_STARTED"
    assert request_counts(hc.url)[store] == {"export.calls": 1, "export": 1}


def test_died_after_starting_before_the_call(crash_function, hcapi, hc):
    """STARTING recorded, the export never called: the lookup finds nothing, so it exports once."""
    f, store, rid = crash_function, hcapi.store(), unique("starting")
    body, _ = _seed(f, store, rid, L.STARTING, firstAttemptAt=L.now(), lastAttemptAt=L.now(), attempts=1)
    f.publish(body)
    [e] = f.events(1, where=lambda e: e["attributes"]["requestId"] == rid)
    assert e["attributes"]["eventType"] == "EXPORT_STARTED"
    assert request_counts(hc.url)[store] == {"export.calls": 1, "export": 1}
    assert f.ledger.get(rid)["attempts"] == 2


def test_died_after_the_call_returned_before_recording_the_operation(crash_function, hcapi, hc):
    f, store, rid = crash_function, hcapi.store(), unique("returned")
    body, _ = _seed(f, store, rid, L.STARTING, firstAttemptAt=L.now(), lastAttemptAt=L.now(), attempts=1)
    op = hcapi.export(store, {"bigqueryDestination": body["bigqueryDestination"]}).json()  # what it had started
    f.publish(body)
    [e] = f.events(1, where=lambda e: e["attributes"]["requestId"] == rid)
    assert e["attributes"]["eventType"] == "EXPORT_STARTED" and e["data"]["operation"] == op["name"]
    assert request_counts(hc.url)[store] == {"export.calls": 1, "export": 1}  # only the dead process's call


def test_an_operation_claimed_by_another_request_is_not_adopted(crash_function, hcapi, hc):
    f, dataset = crash_function, hcapi.dataset()
    store = hcapi.store(dataset)
    other_rid, rid = unique("other"), unique("mine")
    other_body = valid_request(store, other_rid)
    op = hcapi.export(store, {"bigqueryDestination": other_body["bigqueryDestination"]}).json()
    _seed(f, store, other_rid, L.STARTED, operation=op["name"])
    body, _ = _seed(f, store, rid, L.STARTING, firstAttemptAt=L.now() - timedelta(seconds=5),
                    lastAttemptAt=L.now(), attempts=1)
    f.publish(body)
    [e] = f.events(1, where=lambda e: e["attributes"]["requestId"] == rid)
    assert e["attributes"]["eventType"] == "EXPORT_STARTED" and e["data"]["operation"] != op["name"]
    assert request_counts(hc.url)[store] == {"export.calls": 2, "export": 2}


def test_a_request_waits_for_the_gate_of_a_live_holder(crash_function, hcapi, hc):
    """Another request of the dataset holds the gate with a live lease (it may be in its export call): this
    one waits, then is redelivered (503), never exporting meanwhile; once the holder is done, it goes on."""
    f, dataset = crash_function, hcapi.dataset()
    store = hcapi.store(dataset)
    rid, holder = unique("wait-a"), unique("wait-b")
    body, _ = _seed(f, store, rid, L.RECEIVED)  # recorded without the gate, as a waiting delivery leaves it
    t = L.now()
    _seed(f, store, holder, L.STARTING, firstAttemptAt=t, lastAttemptAt=t, attempts=1)
    alive = L.now() + timedelta(minutes=10)
    f.ledger.update(holder, lambda d: {"leaseOwner": "first-delivery", "leaseUntil": alive})
    gate = f.ledger.read_gate(dataset)
    assert f.ledger.commit([f.ledger.gate_replace(gate.gate._replace(owner="first-delivery", lease_until=alive),
                                                  gate.version)]) is not None
    f.publish(body)
    wait_for(lambda: sum(1 for x in f.log_entries() if x["message"].startswith("another request of the dataset")
                         and x["logging.googleapis.com/labels"]["requestId"] == rid) >= 2, what="two redeliveries")
    assert f.ledger.get(rid)["state"] == L.RECEIVED and store not in request_counts(hc.url)
    gate = f.ledger.read_gate(dataset)  # the holder is done: its operation's record deletes the gate
    assert f.ledger.commit([f.ledger.update_write(f.ledger.read(holder), {"state": L.FAILED}),
                            f.ledger.gate_delete(dataset, gate.version)]) is not None
    [e] = f.events(1, timeout=30, where=lambda e: e["attributes"]["requestId"] == rid)
    assert e["attributes"]["eventType"] == "EXPORT_STARTED"
    assert request_counts(hc.url)[store] == {"export.calls": 1, "export": 1}


def test_died_after_recording_started_before_publishing(crash_function, hcapi, hc):
    """Also the window "published, publication not recorded": the event goes out (again) with
    the same eventId, and the API is not called."""
    f, store, rid = crash_function, hcapi.store(), unique("unpublished")
    body, doc = _seed(f, store, rid, L.STARTED)
    op = hcapi.export(store, {"bigqueryDestination": body["bigqueryDestination"]}).json()
    fields = {"operation": op["name"], "logsUrl": op["metadata"]["logsUrl"],
              "createTime": op["metadata"]["createTime"], "nextPollAt": L.now(), "pollInterval": 1.0}
    built = ev.build(ev.STARTED, {**doc, **fields})
    f.ledger.update(rid, lambda d: {**fields, f"events.{ev.STARTED}": {**built, "published": False}})
    f.publish(body)
    [e] = f.events(1, where=lambda e: e["attributes"]["requestId"] == rid)
    assert e["attributes"] == built["attributes"] and e["data"] == built["data"]
    assert e["attributes"]["eventId"] == f"{rid}:EXPORT_STARTED"
    assert request_counts(hc.url)[store] == {"export.calls": 1, "export": 1}  # the seeded one only
    # the publication is recorded just after the event is out
    doc = wait_for(lambda: (d := f.ledger.get(rid))["events"][ev.STARTED]["published"] and d, what="recording")
    assert "leaseOwner" not in doc


def test_everything_recorded_only_the_ack_was_lost(crash_function, hcapi, hc):
    f, store, rid = crash_function, hcapi.store(), unique("acklost")
    body, doc = _seed(f, store, rid, L.STARTED, operation=f"{store.split('/dicomStores/')[0]}/operations/1")
    f.ledger.update(rid, lambda d: {f"events.{ev.STARTED}": {**ev.build(ev.STARTED, doc), "published": True}})
    f.publish(body)
    wait_for(lambda: any(x["message"].startswith("duplicate delivery") and
                         x["logging.googleapis.com/labels"]["requestId"] == rid for x in f.log_entries()),
             what="the redelivery to be handled")
    assert f.drain(1.5) == [] and store not in request_counts(hc.url)
