"""The pure core (handlers/core/) and the wiring: no emulator, no socket."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

import config
from handlers import poller, wiring
from handlers.core import batches as B
from handlers.core import events as ev
from handlers.core import ledger as L
from handlers.core import outbox
from handlers.core.errors import PublishError

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
STORE = "projects/p-1234/locations/us/datasets/d/dicomStores/s"


def ledger_doc(**over) -> dict:
    doc = {"requestId": "r-1", "state": L.STARTED, "request": {"requestId": "r-1", "dicomStore": STORE,
                                                            "bigqueryDestination": {"tableUri": "bq://p-1234.d.t"},
                                                            "labels": {"team": "x"}},
           "dicomStore": STORE, "tableUri": "bq://p-1234.d.t", "operation": "projects/p/operations/9",
           "counter": {"success": "3", "failure": "1"}, "createTime": "2026-01-02T03:04:05Z",
           "endTime": "2026-01-02T03:05:05Z", "logsUrl": "https://logs", "error": None, "labels": {"team": "x"},
           "leaseOwner": "someone", "leaseUntil": T0, "polls": 4, "pollInterval": 2.0, "payloadSha256": "ab",
           "events": {ev.STARTED: {"published": True}}}
    return {**doc, **over}


def test_an_event_is_built_from_the_event_fields_only():
    doc = ledger_doc()
    only = {k: doc[k] for k in L.EVENT_FIELDS if k in doc}
    assert ev.build(ev.SUCCEEDED, doc) == ev.build(ev.SUCCEEDED, only)
    changed = ledger_doc(polls=99, leaseOwner="other", payloadSha256="cd", pollInterval=7.0)
    assert ev.build(ev.SUCCEEDED, changed) == ev.build(ev.SUCCEEDED, doc)
    assert ev.build(ev.SUCCEEDED, ledger_doc(logsUrl="https://elsewhere"))["data"]["logsUrl"] == "https://elsewhere"


def test_the_poller_reads_every_field_an_event_is_built_from():
    assert set(L.EVENT_FIELDS) <= set(poller.POLL_FIELDS)
    assert L.published_field(ev.STARTED) in poller.POLL_FIELDS
    assert set(poller.POLL_FIELDS) <= set(L.LedgerDoc.__annotations__) | {L.published_field(ev.STARTED)}


def test_terminal_event_attributes_and_counter():
    e = ev.build(ev.SUCCEEDED, ledger_doc())
    assert e["eventId"] == "r-1:EXPORT_SUCCEEDED" and e["data"]["counter"] == {"success": 3, "failure": 1,
                                                                                 "pending": 0}
    assert e["attributes"] == {"eventType": ev.SUCCEEDED, "eventId": "r-1:EXPORT_SUCCEEDED", "requestId": "r-1",
                               "dicomStore": STORE, "tableUri": "bq://p-1234.d.t", "failureCount": "1"}
    assert "failureCount" not in ev.build(ev.STARTED, ledger_doc())["attributes"]


def test_doc_ids_escape_what_firestore_reserves():
    assert [L.doc_id(x) for x in (".", "..", "__x__", "a.b", "_a_")] == ["%2E", "%2E%2E", "%5F%5Fx%5F%5F", "a.b",
                                                                          "_a_"]


def test_apply_updates_sets_nested_paths_and_deletes_without_touching_the_original():
    doc = ledger_doc()
    out = L.apply_updates(doc, {"events.EXPORT_STARTED.messageId": "m", "leaseOwner": L.DELETE, "polls": 5})
    assert out["events"][ev.STARTED] == {"published": True, "messageId": "m"}
    assert "leaseOwner" not in out and out["polls"] == 5
    assert doc["events"][ev.STARTED] == {"published": True} and doc["leaseOwner"] == "someone"


@pytest.mark.parametrize("doc, owner, free", [
    ({"state": L.STARTED}, "me", True),
    ({"state": L.STARTED, "leaseOwner": "other", "leaseUntil": T0 + timedelta(seconds=1)}, "me", False),
    ({"state": L.STARTED, "leaseOwner": "other", "leaseUntil": T0}, "me", True),  # expired at T0
    ({"state": L.STARTED, "leaseOwner": "me", "leaseUntil": T0 + timedelta(seconds=9)}, "me", True),
    ({"state": L.SUCCEEDED}, "me", False),
])
def test_lease_rules(doc, owner, free):
    assert L.lease_free(doc, owner, (L.STARTED,), T0) is free


def test_lease_taken_and_dropped():
    taken = L.lease_taken("me", 30, T0, {"x": 1})
    assert taken == {"leaseUntil": T0 + timedelta(seconds=30), "leaseOwner": "me", "updatedAt": T0, "x": 1}
    dropped = L.apply_updates({"leaseOwner": "me", "leaseUntil": T0, "a": 1}, L.lease_dropped(T0))
    assert dropped == {"a": 1, "updatedAt": T0}


def test_outbox_records_then_reports_unpublished_in_order():
    doc = ledger_doc(events={})
    built, updates = outbox.record(ev.SUCCEEDED, doc, {"state": L.SUCCEEDED})
    after = L.apply_updates(doc, updates)
    assert after["events"][ev.SUCCEEDED] == {**built, "published": False}
    after = L.apply_updates(after, {f"events.{ev.STARTED}": {"published": False}})
    assert outbox.unpublished(after, (ev.STARTED, ev.SUCCEEDED, None)) == [ev.STARTED, ev.SUCCEEDED]
    published = L.apply_updates(after, outbox.publication(ev.STARTED, "m-1", T0))
    assert outbox.unpublished(published, (ev.STARTED, ev.SUCCEEDED)) == [ev.SUCCEEDED]
    assert published["events"][ev.STARTED] == {"published": True, "publishedAt": T0, "messageId": "m-1"}


def test_outbox_drain_publishes_in_order_and_stops_on_a_failure_or_a_lost_lease():
    recorded = {t: {"data": {"t": t}, "attributes": {"eventType": t}} for t in (ev.STARTED, ev.FAILED)}
    sent, marked, failures = [], [], []

    def publish(data, attributes):
        sent.append(data["t"])
        if data["t"] == "boom":
            raise PublishError("down")
        return f"m{len(sent)}"

    def published(item, event_type, event, message_id, last):
        marked.append((item, event_type, message_id, last))
        return item + 1

    out = outbox.drain(0, [ev.STARTED, ev.FAILED], recorded, publish=publish, published=published,
                       failed=lambda *a: failures.append(a))
    assert out == 2 and sent == [ev.STARTED, ev.FAILED] and not failures
    assert marked == [(0, ev.STARTED, "m1", False), (1, ev.FAILED, "m2", True)]

    sent.clear()
    recorded["boom"] = {"data": {"t": "boom"}, "attributes": {}}
    out = outbox.drain(0, ["boom", ev.FAILED], recorded, publish=publish, published=published,
                       failed=lambda item, t, e: failures.append((item, t, str(e))))
    assert out is None and sent == ["boom"] and failures == [(0, "boom", "down")]

    sent.clear()
    out = outbox.drain(0, [ev.STARTED, ev.FAILED], recorded, publish=publish, published=lambda *a: None,
                       failed=lambda *a: failures.append(a))
    assert out is None and sent == [ev.STARTED]


def test_ingest_names_are_stable_and_distinct():
    a, b = B.Route(STORE, "bq://p-1234.d.t"), B.Route(STORE, "bq://p-1234.d.u")
    assert a.key == B.Route(STORE, "bq://p-1234.d.t").key and a.key != b.key and len(a.key) == 16
    assert a.fields() == {"route": a.key, "store": STORE, "tableUri": "bq://p-1234.d.t", "tableKey": a.table_key}
    assert B.arrival_id("x", "arrival", "1") == B.arrival_id("x", "arrival", "1") != B.arrival_id("x", "deletion", "1")
    assert B.request_id_of("k-000001") == "ingest-k-000001"
    assert B.collections("c") == ("c-ingestArrivals", "c-ingestRoutes", "c-ingestBatches", "c-ingestTables")
    assert B.filter_text(["/a", "/b"]) == "/a\n/b\n"


@pytest.fixture
def wired():
    yield
    wiring.use(None)


def test_wiring_builds_each_client_once_from_the_settings_it_is_given(wired):
    s = config.load({"GOOGLE_CLOUD_PROJECT": "proj-one", "FIRESTORE_EMULATOR_HOST": "127.0.0.1:1001",
                     "PUBSUB_EMULATOR_HOST": "127.0.0.1:1002", "HEALTHCARE_API_ENDPOINT": "http://127.0.0.1:1003",
                     "LEDGER_COLLECTION": "one", "EXPORT_EVENTS_TOPIC": "events-one"})
    wiring.use(s)
    ledger, hc, events = wiring.intake()
    assert wiring.intake() == (ledger, hc, events) and wiring.ledger() is ledger
    assert ledger.collection == "one" and ledger.client().base == "http://127.0.0.1:1001/v1/"
    assert ledger.client().root == "projects/proj-one/databases/(default)/documents"
    assert events.url == "http://127.0.0.1:1002/v1/projects/proj-one/topics/events-one:publish"
    assert hc.endpoint == "http://127.0.0.1:1003" and hc.tokens().header() == {}  # a local emulator: no token
    assert hc.budget_s == s.healthcare_retry_budget_s
    _, poll_hc, poll_events = wiring.poller()
    assert poll_hc.budget_s == s.poll_call_timeout_s and poll_events.timeout_s == s.poll_call_timeout_s

    wiring.use(config.load({"GOOGLE_CLOUD_PROJECT": "proj-two", "FIRESTORE_EMULATOR_HOST": "127.0.0.1:2001",
                            "LEDGER_COLLECTION": "two"}))
    again = wiring.ledger()
    assert again is not ledger and again.collection == "two" and again.client().base == "http://127.0.0.1:2001/v1/"
