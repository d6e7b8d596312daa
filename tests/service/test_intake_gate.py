"""The gate of a Healthcare dataset (handlers/core/gate.py; docs/design.md, "The intake"): at most one export
call of this service in flight per dataset, a dead holder's call resolved with its one operation, and
the round trips of a fresh request unchanged.

The function runs as in production (functions-framework, fed by the Pub/Sub emulator), against the
Firestore emulator and the Healthcare API emulator; the emulator's `export.overlapping` figure counts
export calls that arrived while another one on the same dataset was still being answered."""
from __future__ import annotations

import base64
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import requests

from handlers import intake
from handlers.core import events as ev
from handlers.core import gate as G
from handlers.core import ledger as L
from handlers.core import request as req
from tests.support import procs
from tests.support.function import PROJECT, request_counts, valid_request, wait_for
from tests.support.hcapi import HC, unique

ENV = {"HEALTHCARE_RETRY_BUDGET_S": "4", "INTAKE_LEASE_S": "6"}


def _slow_emulator(logs_dir, path, latency_s: float):
    """An emulator whose export (and operations) calls each take `latency_s` to answer."""
    return procs.healthcare_emulator(logs_dir, path, "--latency", str(latency_s),
                                     name=f"healthcare-emulator-{unique('gate')}").start()


@pytest.fixture
def slow_hc(logs_dir, tmp_path):
    svc = _slow_emulator(logs_dir, tmp_path / "slow", 2.0)
    yield svc
    svc.stop()


@pytest.fixture
def slower_hc(logs_dir, tmp_path):
    """Six seconds per call: longer than a push takes to reach the function on a busy machine."""
    svc = _slow_emulator(logs_dir, tmp_path / "slower", 6.0)
    yield svc
    svc.stop()


def _started(f, rids, timeout=90) -> dict:
    events = f.events(len(rids), timeout=timeout, where=lambda e: e["attributes"]["requestId"] in rids
                      and e["attributes"]["eventType"] == ev.STARTED)
    return {e["attributes"]["requestId"]: e["data"]["operation"] for e in events}


def _logged(f, prefix: str, **labels) -> list[dict]:
    return [x for x in f.log_entries() if x["message"].startswith(prefix)
            and all(x.get("logging.googleapis.com/labels", {}).get(k, x.get(k)) == v for k, v in labels.items())]


def _push(f, body: dict, message_id: str) -> int:
    """Deliver a request as Pub/Sub's push subscription would (the envelope POSTed to the function), at once."""
    data = base64.b64encode(json.dumps(body).encode()).decode()
    envelope = {"message": {"data": data, "messageId": message_id, "publishTime": L.now().isoformat(),
                            "attributes": {}}, "subscription": f"projects/{PROJECT}/subscriptions/direct"}
    return requests.post(f"http://127.0.0.1:{f.port}/projects/{PROJECT}/topics/{f.requests_topic}", json=envelope,
                         timeout=120).status_code


def test_two_requests_of_one_dataset_are_never_both_in_the_export_call(make_function, slower_hc):
    """The second request is delivered while the first holds the gate (it is in its slow export call): it
    waits for the gate, then makes its own call once the first has recorded its operation."""
    api = HC(slower_hc.url)
    dataset = api.dataset()
    stores = [api.store(dataset), api.store(dataset)]
    f = make_function("gate-two", hc_url=slower_hc.url, env={"HEALTHCARE_RETRY_BUDGET_S": "15", "INTAKE_LEASE_S": "20"})
    first, second = unique("first"), unique("second")
    with ThreadPoolExecutor(1) as pool:
        answered = pool.submit(_push, f, valid_request(stores[0], first), unique("m"))
        wait_for(lambda: (g := f.ledger.read_gate(dataset)) and g.gate.holder == first, what="the first to take the gate")
        assert _push(f, valid_request(stores[1], second), unique("m")) < 300
        assert answered.result() < 300
    counts = request_counts(slower_hc.url)
    assert [counts[s]["export.calls"] for s in stores] == [1, 1] and [counts[s]["export"] for s in stores] == [1, 1]
    assert "export.overlapping" not in counts.get(dataset, {})  # never two calls at once on the dataset
    waited = _logged(f, "waiting for the dataset's gate", requestId=second)
    assert waited and {w["holderRequestId"] for w in waited} == {first}
    ops = _started(f, {first, second})
    assert len(set(ops.values())) == 2
    assert f.ledger.read_gate(dataset) is None  # released with each operation's record


def test_many_deliveries_at_once_on_one_dataset_take_turns_and_all_start(make_function, hcapi, hc):
    """Eight requests of one dataset delivered at the same moment: each waits its turn at the gate (however
    many times another waiter takes it first), none is turned away, none exports twice."""
    f = make_function("gate-many", env={"HEALTHCARE_RETRY_BUDGET_S": "20", "INTAKE_LEASE_S": "25"})
    dataset = hcapi.dataset()
    store = hcapi.store(dataset)
    rids = [unique("many") for _ in range(8)]
    with ThreadPoolExecutor(len(rids)) as pool:
        answers = list(pool.map(lambda r: _push(f, valid_request(store, r), unique("m")), rids))
    assert all(a < 300 for a in answers), answers
    counts = request_counts(hc.url)
    assert counts[store] == {"export.calls": 8, "export": 8} and "export.overlapping" not in counts.get(dataset, {})
    assert len(set(_started(f, set(rids)).values())) == 8
    assert f.ledger.read_gate(dataset) is None


def test_a_holder_killed_in_its_export_call_is_recovered_with_its_one_operation(make_function, slow_hc):
    """SIGKILL while the export call is in flight (the call completes at the API): the gate stays with the
    dead holder until its lease ends, the next request of the dataset waits, and whoever comes first after
    the lease (the holder's redelivery, or the other request taking the gate over) finds exactly the dead
    call's operation. Nobody exports twice, and no two calls overlap."""
    api = HC(slow_hc.url)
    dataset = api.dataset()
    store = api.store(dataset)
    f = make_function("gate-kill", hc_url=slow_hc.url, env=ENV)
    dead, other = unique("dead"), unique("other")
    f.publish(valid_request(store, dead))
    wait_for(lambda: request_counts(slow_hc.url).get(store, {}).get("export.calls"), what="the export call")
    f.kill()
    wait_for(lambda: request_counts(slow_hc.url)[store].get("export") == 1, what="the killed call's export")
    [killed_op] = [op for op in api.get(f"{dataset}/operations").json()["operations"]
                   if G.EXPORT_METHOD in op["metadata"]["apiMethodName"]]
    assert f.ledger.read_gate(dataset).gate.holder == dead
    f.publish(valid_request(store, other))
    f.start()  # Pub/Sub redelivers the killed delivery's message
    ops = _started(f, {dead, other})
    assert ops[dead] == killed_op["name"] and ops[other] != killed_op["name"]
    counts = request_counts(slow_hc.url)
    assert counts[store] == {"export.calls": 2, "export": 2}
    assert "export.overlapping" not in counts.get(dataset, {})
    found_again = _logged(f, "export started (operation found again", requestId=dead)
    taken_over = [x for x in _logged(f, "took the dataset's gate over") if x.get("holderRequestId") == dead]
    assert len(found_again) + len(taken_over) >= 1
    assert all(x["holderOperation"] == killed_op["name"] for x in taken_over)
    assert f.ledger.get(dead)["operation"] == killed_op["name"]


def _seed_dead_holder(f, store: str, rid: str) -> dict:
    """What a process that died in its export call left: the request STARTING under the gate, both leases
    over. Its message is gone (never published here)."""
    raw = json.dumps(valid_request(store, rid)).encode()
    t = L.now() - timedelta(seconds=2)
    doc = intake.new_document(req.parse(raw, "gone"), raw, "gone", published_at=t, owner=None, lease_s=0, at=t)
    dead_until = L.now() - timedelta(seconds=1)
    doc.update(G.attempt(doc, owner="dead-instance", lease_until=dead_until, acquired_at=t, t=t))
    gate = G.Gate(doc["hcDataset"], rid, "dead-instance", dead_until, t)
    assert f.ledger.commit([f.ledger.create_write(rid, doc), f.ledger.gate_create(gate)]) is not None
    return doc


@pytest.mark.parametrize("made_a_call", [True, False])
def test_a_dead_holder_whose_request_never_comes_back_is_resolved_by_the_next_request(make_function, hcapi, hc,
                                                                                       made_a_call):
    f = make_function("gate-gone", env=ENV)
    dataset = hcapi.dataset()
    store = hcapi.store(dataset)
    gone, nxt = unique("gone"), unique("next")
    doc = _seed_dead_holder(f, store, gone)
    dead_op = hcapi.export(store, {"bigqueryDestination": doc["request"]["bigqueryDestination"]}).json() \
        if made_a_call else None
    f.publish(valid_request(store, nxt))
    ops = _started(f, {nxt}, timeout=60)
    holder = f.ledger.get(gone)
    assert "leaseOwner" not in holder and f.ledger.read_gate(dataset) is None
    if dead_op is not None:  # its operation recorded on it: the poller follows it and publishes its event
        assert holder["state"] == L.STARTED and holder["operation"] == dead_op["name"] != ops[nxt]
        assert holder["events"][ev.STARTED]["published"] is False
        assert holder["events"][ev.STARTED]["data"]["operation"] == dead_op["name"]
    else:  # no call in flight: a redelivery, if one ever comes, makes a new attempt
        assert holder["state"] == L.RECEIVED and "gateAcquiredAt" not in holder and not holder["operation"]
    assert request_counts(hc.url)[store] == {"export.calls": 1 + made_a_call, "export": 1 + made_a_call}
    [took] = _logged(f, "took the dataset's gate over", requestId=nxt)
    assert took["holderRequestId"] == gone and took["holderState"] == holder["state"]


def test_the_impossible_second_operation_fails_the_request_naming_the_invariant(make_function, hcapi, hc):
    """Someone else exported from the dataset while the request held the gate: two unclaimed operations.
    The request ends EXPORT_FAILED (code 13) with an ERROR naming the invariant, and exports nothing more."""
    f = make_function("gate-broken", env=ENV)
    store = hcapi.store()
    rid = unique("broken")
    doc = _seed_dead_holder(f, store, rid)
    for _ in range(2):
        hcapi.export(store, {"bigqueryDestination": doc["request"]["bigqueryDestination"]}).raise_for_status()
    f.publish(valid_request(store, rid))  # its redelivery: the gate is its own
    [e] = f.events(1, where=lambda e: e["attributes"]["requestId"] == rid)
    assert e["attributes"]["eventType"] == ev.FAILED and e["data"]["error"]["code"] == 13
    assert e["data"]["error"]["message"].startswith("invariant broken: one export call per dataset at a time")
    assert [x["severity"] for x in _logged(f, "invariant broken", requestId=rid)] == ["ERROR"]
    assert request_counts(hc.url)[store] == {"export.calls": 2, "export": 2}  # the two outside calls only


def test_a_fresh_request_costs_the_same_round_trips_with_the_gate(emulator_env, pubsub_clients, hc, hcapi,
                                                                 monkeypatch):
    """Counted on the wire (a counting wrapper around the functions' one HTTP send, every call real): three
    Firestore commits (the request created with the gate, the operation recorded with the gate deleted,
    the publication), one export call, one publish. The same as before the gate."""
    from handlers import wiring
    from handlers.adapters import transport
    topic = unique("gate-events")
    pubsub_clients[0].create_topic(name=f"projects/test-project/topics/{topic}")
    monkeypatch.setenv("HEALTHCARE_API_ENDPOINT", hc.url)
    monkeypatch.setenv("EXPORT_EVENTS_TOPIC", topic)
    monkeypatch.setenv("LEDGER_COLLECTION", unique("ledger-gate"))
    wiring.reset()
    calls: list[tuple[str, dict]] = []
    real = transport.send  # every call of the functions goes through it

    def counting(method, url, **kw):
        calls.append((url.rsplit("/", 1)[-1].split(":")[-1] if ":" in url.rsplit("/", 1)[-1] else url,
                      kw.get("json") or {}))
        return real(method, url, **kw)
    monkeypatch.setattr(transport, "send", counting)
    try:
        store = hcapi.store()
        raw = json.dumps(valid_request(store, unique("rt"))).encode()
        parsed = req.parse(raw, "m-rt")
        intake.Intake(wiring.settings(), *wiring.intake(), published_at=L.now()).run(parsed, raw, "m-rt")
    finally:
        monkeypatch.undo()
        wiring.reset()
    assert Counter(name for name, _ in calls) == {"commit": 3, "export": 1, "publish": 1}
    commits = [body["writes"] for name, body in calls if name == "commit"]
    assert [len(w) for w in commits] == [2, 2, 1]  # the gate rides in the first two
    assert commits[0][1]["currentDocument"] == {"exists": False} and "delete" in commits[1][1]
