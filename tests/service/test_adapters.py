"""The adapters the intake and the poller share, against the real emulators."""
from __future__ import annotations

import json
from datetime import timedelta

import pytest

from handlers import wiring
from handlers.adapters.healthcare import ApiError, Healthcare, TransientError
from handlers.core import ledger as L
from tests.support import procs
from tests.support.function import PROJECT
from tests.support.hcapi import HC, unique


@pytest.fixture
def ledger(emulator_env):
    return wiring.ledger_for(wiring.settings(), unique("adapter-ledger"))


def test_ledger_create_is_once_and_ids_are_escaped(ledger):
    for rid in (".", "..", "__x__", "a.b:c_d-1"):
        created, item = ledger.create(rid, {"requestId": rid, "state": L.RECEIVED})
        assert created and item.doc["requestId"] == rid and item.version
        created, item = ledger.create(rid, {"requestId": rid, "state": L.REJECTED})
        assert not created and item.doc["state"] == L.RECEIVED and ledger.get(rid)["requestId"] == rid
    assert L.doc_id("..") == "%2E%2E" and L.doc_id("__x__") == "%5F%5Fx%5F%5F" and L.doc_id("a.b") == "a.b"


def test_ledger_due_pages_by_next_poll_and_claims_with_a_lease(ledger):
    now = L.now()
    for i in range(5):
        ledger.create(f"r{i}", {"requestId": f"r{i}", "state": L.STARTED, "operation": f"ops/{i}",
                                "nextPollAt": now - timedelta(seconds=10 - i)})
    ledger.create("future", {"requestId": "future", "state": L.STARTED, "nextPollAt": now + timedelta(hours=1)})
    ledger.create("done", {"requestId": "done", "state": L.SUCCEEDED, "nextPollAt": now - timedelta(hours=1)})
    first, cursor = ledger.due_page(limit=3, at=now)
    assert [v.request_id for v in first] == ["r0", "r1", "r2"] and cursor is not None
    rest, cursor = ledger.due_page(limit=3, at=now, cursor=cursor)
    assert [v.request_id for v in rest] == ["r3", "r4"] and cursor is None

    got = ledger.claim("r0", owner="poller-a", lease_s=30, updates={"pollInterval": 2.0})
    assert got.doc["leaseOwner"] == "poller-a" and got.doc["pollInterval"] == 2.0 and got.doc["leaseUntil"] > now
    assert ledger.claim("r0", owner="poller-b", lease_s=30) is None  # held
    assert ledger.claim("done", owner="poller-b", lease_s=30) is None  # not STARTED
    assert ledger.claim("r0", owner="poller-b", lease_s=30, at=now + timedelta(seconds=60))  # expired
    assert ledger.release("r0", owner="poller-a") is None  # no longer the owner
    released = ledger.release("r0", owner="poller-b", updates={"state": L.SUCCEEDED})
    assert released.doc["state"] == L.SUCCEEDED and "leaseOwner" not in released.doc
    assert "leaseOwner" not in ledger.get("r0")
    assert ledger.find_by_operation("ops/3")["requestId"] == "r3" and ledger.find_by_operation("ops/x") is None
    assert [d["requestId"] for d in ledger.in_state(L.SUCCEEDED)] == sorted(["done", "r0"])


def test_ledger_ties_on_next_poll_are_paged_by_id_none_skipped(ledger):
    now = L.now()
    ledger.put_many([{"requestId": f"t{i:02d}", "state": L.STARTED, "nextPollAt": now} for i in range(7)])
    seen, cursor = [], None
    while True:
        page, cursor = ledger.due_page(limit=3, at=now, cursor=cursor, fields=("operation",))
        seen += [v.request_id for v in page]
        if cursor is None:
            break
    assert seen == [f"t{i:02d}" for i in range(7)]


def test_ledger_write_is_a_compare_and_set(ledger):
    _, item = ledger.create("cas", {"requestId": "cas", "state": L.STARTING, "n": 1})
    first = ledger.write(item, {"n": 2, "events.EXPORT_STARTED.published": True})
    assert first.doc["n"] == 2 and first.doc["events"] == {"EXPORT_STARTED": {"published": True}}
    assert ledger.write(item, {"n": 3}) is None  # item's version is gone: nothing written
    assert ledger.get("cas")["n"] == 2
    second = ledger.write(first, {"n": L.DELETE, "events.EXPORT_STARTED.messageId": "m1"})
    assert ledger.get("cas") == second.doc == {"requestId": "cas", "state": L.STARTING,
                                               "events": {"EXPORT_STARTED": {"published": True, "messageId": "m1"}}}
    # batchWrite: each write alone; a stale version fails only its own write
    ledger.create("cas2", {"requestId": "cas2", "state": L.STARTED})
    v2 = ledger.read("cas2").version
    out = ledger.write_if_unchanged([("cas", item.version, {"n": 9}), ("cas2", v2, {"n": 9}),
                                     ("missing", v2, {"n": 9})])
    assert out["cas"] is None and out["cas2"] and out["missing"] is None
    assert ledger.get("cas2")["n"] == 9 and "n" not in ledger.get("cas")


def test_firestore_values_read_the_same_through_googles_client(ledger):
    """What the REST adapter writes, google-cloud-firestore (gRPC) reads as the same values, and back."""
    from datetime import datetime, timezone

    from google.cloud import firestore

    t = datetime(2026, 11, 25, 7, 0, 0, 123456, tzinfo=timezone.utc)
    doc = {"requestId": "values", "s": "é\u0000`x`", "i": -(2 ** 63), "f": 1.5, "b": True, "none": None, "t": t,
           "bytes": b"\x00\xff", "list": [1, "a", {}, {"x": [2]}], "map": {"a.b": {"c d": 1}, "`": 2}, "empty": {}}
    ledger.create("values", doc)
    client = firestore.Client(project=PROJECT)
    got = client.collection(ledger.collection).document("values").get().to_dict()
    assert got == doc
    client.collection(ledger.collection).document("values2").set({**doc, "requestId": "values2"})
    assert ledger.get("values2") == {**doc, "requestId": "values2"}
    item = ledger.read("values2")
    assert ledger.write(item, {"map.a.b": 5})  # dotted paths are nested fields, not keys with dots
    assert client.collection(ledger.collection).document("values2").get().to_dict()["map"] == {"a": {"b": 5},
                                                                                              "a.b": {"c d": 1},
                                                                                              "`": 2}


def test_events_publish_waits_for_the_server(emulator_env, pubsub_clients):
    publisher, subscriber = pubsub_clients
    topic = unique("adapter-events")
    publisher.create_topic(name=f"projects/{PROJECT}/topics/{topic}")
    sub = f"projects/{PROJECT}/subscriptions/{topic}"
    subscriber.create_subscription(name=sub, topic=f"projects/{PROJECT}/topics/{topic}")
    message_id = wiring.publisher_for(wiring.settings(), topic).publish({"b": 1, "a": "é"}, {"eventType": "EXPORT_STARTED"})
    assert message_id
    [m] = subscriber.pull(subscription=sub, max_messages=1, timeout=10).received_messages
    assert json.loads(m.message.data) == {"a": "é", "b": 1} and m.message.attributes["eventType"] == "EXPORT_STARTED"


def test_healthcare_operations_get_list_cancel_and_final_errors(hc):
    api = HC(hc.url)
    store = api.store()
    dataset = store.split("/dicomStores/")[0]
    client = Healthcare(hc.url, local=True, budget_s=10)
    ops = [client.export(store, {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.d.t{i}"}}) for i in range(3)]
    assert client.get_operation(ops[0]["name"])["name"] == ops[0]["name"]
    names = [op["name"] for op in client.iter_operations(dataset, page_size=1)]
    assert set(op["name"] for op in ops) <= set(names)
    assert client.cancel_operation(ops[1]["name"]) == {}
    with pytest.raises(ApiError) as e:
        client.get_operation(f"{dataset}/operations/123")
    assert e.value.http_status == 404 and e.value.rpc()["code"] == 5 and e.value.status == "NOT_FOUND"
    with pytest.raises(ApiError) as e:
        client.export(store, {"bigqueryDestination": {"tableUri": "bq://x"}, "unknownField": 1})
    assert e.value.rpc()["code"] == 3


def test_healthcare_retries_idempotent_calls_and_gives_up_at_the_deadline(hc, logs_dir, tmp_path):
    flaky = procs.healthcare_emulator(logs_dir, tmp_path / "flaky", "--fault", "operations.get=0.3",
                                      name=f"healthcare-emulator-{unique('flaky')}").start()
    try:
        store = HC(flaky.url).store()
        client = Healthcare(flaky.url, local=True, budget_s=20)
        op = client.export(store, {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.d.t"}})
        for _ in range(5):
            assert client.get_operation(op["name"])["name"] == op["name"]
    finally:
        flaky.stop()
    dead = Healthcare(f"http://127.0.0.1:{procs.free_port()}", local=True, budget_s=0.8)
    with pytest.raises(TransientError) as e:
        dead.export(store, {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.d.t"}})
    assert not e.value.ambiguous and e.value.attempts >= 2  # refused connections: nothing was sent
