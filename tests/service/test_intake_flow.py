"""export_request end to end: Pub/Sub push -> functions-framework process -> Firestore + Healthcare
emulators -> events on Pub/Sub. Over real sockets; nothing mocked."""
from __future__ import annotations

import pytest

from tests.support.function import PROJECT, request_counts, valid_request, wait_for
from tests.support.hcapi import unique


def test_request_starts_one_export_and_publishes_started(module_function, hcapi, hc):
    f = module_function
    store = hcapi.store()
    rid = unique("ok")
    body = valid_request(store, rid, writeDisposition="write-append")
    body["filterConfig"] = {"resourcePathsGcsUri": "gs://filters-bucket/path/filter.txt"}
    f.publish(body)

    [e] = f.events(1, where=lambda e: e["attributes"]["requestId"] == rid)
    data, attrs = e["data"], e["attributes"]
    assert attrs == {"eventType": "EXPORT_STARTED", "eventId": f"{rid}:EXPORT_STARTED", "requestId": rid,
                     "dicomStore": store, "tableUri": body["bigqueryDestination"]["tableUri"]}
    assert data["eventId"] == f"{rid}:EXPORT_STARTED" and data["eventType"] == "EXPORT_STARTED"
    assert data["bigqueryDestination"] == {"tableUri": body["bigqueryDestination"]["tableUri"],
                                           "writeDisposition": "WRITE_APPEND"}
    assert data["filterConfig"] == body["filterConfig"]
    assert data["operation"].startswith(store.split("/dicomStores/")[0] + "/operations/")
    assert data["labels"] == {"team": "radiology"} and data["error"] is None and data["counter"] is None
    assert data["logsUrl"] and data["createTime"]
    assert set(data) == {"eventId", "eventType", "requestId", "dicomStore", "bigqueryDestination", "filterConfig",
                         "operation", "counter", "createTime", "endTime", "logsUrl", "error", "labels"}
    assert request_counts(hc.url)[store] == {"export.calls": 1, "export": 1}

    # the publication is recorded just after the event is out
    doc = wait_for(lambda: (d := f.ledger.get(rid))["events"]["EXPORT_STARTED"]["published"] and d, what="recording")
    assert doc["state"] == "STARTED" and doc["operation"] == data["operation"]
    assert doc["events"]["EXPORT_STARTED"]["eventId"] == f"{rid}:EXPORT_STARTED"
    assert doc["nextPollAt"] > doc["receivedAt"] and doc["pollInterval"] > 0
    assert "leaseUntil" not in doc and doc["apiVersion"] == "v1"
    assert doc["request"]["bigqueryDestination"]["writeDisposition"] == "WRITE_APPEND"


def _entries_for(f, rid):
    return [e for e in f.log_entries() if e.get("logging.googleapis.com/labels", {}).get("requestId") == rid]



@pytest.mark.parametrize("payload, field, rule", [
    (b"\x89PNG not json", "(message)", "utf-8"),
    ({"requestId": "REJ", "dicomStore": "STORE", "bigqueryDestination": {"tableUri": "bq://test-project.d.t"},
      "colour": "red"}, "colour", "unknown-field"),
    ({"requestId": "REJ", "dicomStore": "STORE",
      "bigqueryDestination": {"tableUri": "bq://test-project.d.t", "force": True, "writeDisposition": "WRITE_EMPTY"}},
     "bigqueryDestination.force", "exclusive"),
    ({"requestId": "REJ", "dicomStore": "STORE", "bigqueryDestination": {"tableUri": "bq://test-project.d.t"},
      "labels": {"pad": "x" * 60}, "filterConfig": {"resourcePathsGcsUri": "gs://b/" + "o" * 70000}},
     "(message)", "max-size"),
])
def test_rejection_is_published_logged_acknowledged_and_exports_nothing(module_function, hcapi, hc, payload,
                                                                         field, rule):
    f = module_function
    store = hcapi.store()
    rid = unique("rej")
    if isinstance(payload, dict):
        payload = {**payload, "requestId": rid, "dicomStore": store}
    message_id = f.publish(payload)
    expect_rid = rid if isinstance(payload, dict) and rule != "max-size" else message_id

    [e] = f.events(1, where=lambda e: e["attributes"]["requestId"] == expect_rid)
    assert e["attributes"]["eventType"] == "EXPORT_REJECTED"
    assert e["attributes"]["eventId"] == f"{expect_rid}:EXPORT_REJECTED"
    err = e["data"]["error"]
    assert err["code"] == 3 and err["message"]
    assert e["data"]["operation"] is None

    errors = [x for x in _entries_for(f, expect_rid) if x["severity"] == "ERROR"]
    assert len(errors) == 1 and errors[0]["field"] == field and errors[0]["rule"] == rule
    assert err["message"] in errors[0]["message"]
    doc = wait_for(lambda: (d := f.ledger.get(expect_rid))["events"]["EXPORT_REJECTED"]["published"] and d,
                   what="recording")
    assert doc["state"] == "REJECTED" and doc["error"] == err
    assert store not in request_counts(hc.url)  # no export call at all
    # acknowledged: never delivered again (a redelivery would log a "duplicate delivery" entry)
    assert f.drain(1.5) == []
    assert not [x for x in _entries_for(f, expect_rid) if "duplicate" in x["message"]]


def test_duplicate_deliveries_start_one_export_and_publish_one_event(make_function, hcapi, hc):
    """Three push subscriptions deliver the same message concurrently (same messageId), then the
    publisher re-sends the same request as a new message (same requestId)."""
    f = make_function("dup", push_subscriptions=3)
    store = hcapi.store()
    rid = unique("dup")
    body = valid_request(store, rid)
    f.publish(body)
    [e] = f.events(1, where=lambda e: e["attributes"]["requestId"] == rid)
    assert e["attributes"]["eventType"] == "EXPORT_STARTED"
    f.publish(body)  # the same request again, as a new Pub/Sub message
    assert f.drain(3) == []
    assert request_counts(hc.url)[store] == {"export.calls": 1, "export": 1}
    received = [x for x in _entries_for(f, rid) if x["message"] == "export request received"]
    duplicates = [x for x in _entries_for(f, rid) if x["message"].startswith("duplicate delivery")]
    assert len(received) == 1 and len(duplicates) >= 3  # 2 more subscriptions + the re-sent message
    doc = f.ledger.get(rid)
    assert doc["state"] == "STARTED" and doc["operation"] == e["data"]["operation"]


def test_reused_request_id_with_different_content_is_ignored(module_function, hcapi, hc):
    f = module_function
    store = hcapi.store()
    rid = unique("reuse")
    f.publish(valid_request(store, rid))
    f.events(1, where=lambda e: e["attributes"]["requestId"] == rid)
    f.publish(valid_request(store, rid, writeDisposition="WRITE_TRUNCATE"))
    assert f.drain(2) == []
    assert request_counts(hc.url)[store]["export"] == 1
    warnings = [x for x in _entries_for(f, rid) if x["severity"] == "WARNING"]
    assert warnings and "different message" in warnings[0]["message"]


def test_api_4xx_is_final_export_failed_with_the_api_error(module_function, hcapi, hc):
    f = module_function
    dataset = hcapi.dataset()
    store = f"{dataset}/dicomStores/missing-store"
    rid = unique("404")
    f.publish(valid_request(store, rid))
    [e] = f.events(1, where=lambda e: e["attributes"]["requestId"] == rid)
    assert e["attributes"]["eventType"] == "EXPORT_FAILED" and e["attributes"]["failureCount"] == "0"
    err = e["data"]["error"]
    assert err["code"] == 5 and "missing-store" in err["message"]  # NOT_FOUND, the API's message copied
    assert e["data"]["operation"] is None and e["data"]["endTime"]
    assert f.drain(1.5) == []  # acknowledged, not retried
    assert request_counts(hc.url)[store] == {"export.calls": 1}
    doc = f.ledger.get(rid)
    assert doc["state"] == "FAILED" and doc["error"] == err


def test_allowlists_are_enforced_and_silence_the_start_warning(make_function, hcapi, hc, module_function):
    allowed = hcapi.store()
    other = hcapi.store()
    f = make_function("allow", env={"ALLOWED_DICOM_STORES": allowed, "ALLOWED_BQ_DATASETS": f"{PROJECT}.exports"})
    rid_ok, rid_store, rid_ds = unique("in"), unique("out-store"), unique("out-ds")
    f.publish(valid_request(allowed, rid_ok))
    f.publish(valid_request(other, rid_store))
    bad_ds = valid_request(allowed, rid_ds)
    bad_ds["bigqueryDestination"]["tableUri"] = f"bq://{PROJECT}.secret.t"
    f.publish(bad_ds)
    got = {e["attributes"]["requestId"]: e for e in f.events(3)}
    assert got[rid_ok]["attributes"]["eventType"] == "EXPORT_STARTED"
    for rid in (rid_store, rid_ds):
        assert got[rid]["attributes"]["eventType"] == "EXPORT_REJECTED"
        message = got[rid]["data"]["error"]["message"]
        assert "not one this deployment may export" in message
        assert allowed not in message and f"{PROJECT}.exports" not in message
    assert other not in request_counts(hc.url)
    start_warnings = [e for e in f.log_entries() if e["severity"] == "WARNING" and "ALLOWED_" in e["message"]]
    assert start_warnings == []
    default_warnings = [e for e in module_function.log_entries()
                        if e["severity"] == "WARNING" and "is not set" in e["message"]]
    assert {w["message"].split()[0] for w in default_warnings} == {"ALLOWED_DICOM_STORES", "ALLOWED_BQ_DATASETS"}
