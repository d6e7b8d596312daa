"""The poller's outcomes, one tick at a time: the handler's code runs in-process against Google's Firestore
and Pub/Sub emulators and the Healthcare emulator, over sockets. Events are pulled from the events topic and
checked field by field against the contract (docs/contract.md, "Events"); logs are read as the JSON lines Cloud Logging parses."""
from __future__ import annotations

from datetime import timedelta

import pytest

from handlers.core import ledger as L
from tests.support import dicom_files, procs
from tests.support.function import PROJECT, wait_for
from tests.support.hcapi import HC, unique
from tests.support.poller import EVENT_FIELDS, Poller, bq_mk, for_request, log_lines, table


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    d = tmp_path_factory.mktemp("poller-files")
    study, series = "1.2.826.0.1.3680043.8.498.7", "1.2.826.0.1.3680043.8.498.71"
    return [dicom_files.with_uids(dicom_files.path("CT_small.dcm"), d / f"{i}.dcm", study=study, series=series,
                                  sop=f"1.2.826.0.1.3680043.8.498.71{i}") for i in range(1, 4)]


@pytest.fixture(scope="module")
def harness(request, pubsub_clients, pubsub, firestore, logs_dir, hc):
    """Ledger collection, events topic and pull subscription of this module's poller."""
    from tests.support.function import Function
    f = Function("poller", pubsub_clients, pubsub, firestore, logs_dir, hc.url, push_subscriptions=0)
    bq_mk(hc.data_dir)
    yield f
    f.stop()


@pytest.fixture(scope="module")
def slow_hc(logs_dir, tmp_path_factory, three):
    """Slow-export mode (one instance per 5 s): an export stays running while the test looks at it."""
    data = tmp_path_factory.mktemp("hc-slow-poller")
    svc = procs.healthcare_emulator(logs_dir, data, "--export-rate", "0.2", name=unique("hc-slow-poller")).start()
    bq_mk(data)
    api = HC(svc.url)
    svc.store = api.store()
    assert api.stow(svc.store, three).status_code == 200
    yield svc
    svc.stop()


@pytest.fixture
def p(harness):
    return Poller(harness)


def _one_event(f, rid, timeout=30):
    [e] = f.events(1, timeout=timeout, where=lambda e: e["attributes"]["requestId"] == rid)
    return e


def test_success_event_ledger_and_logs(p, harness, hcapi, three, capsys):
    f = harness
    store = hcapi.store()
    assert hcapi.stow(store, three).status_code == 200
    op = p.export(store, table())
    rid, body = p.seed(store, op)
    done = hcapi.wait(op["name"])

    summary = p.tick()
    assert summary["succeeded"] == 1 and summary["published"] == 1

    e = _one_event(f, rid)
    data, attrs = e["data"], e["attributes"]
    assert attrs == {"eventType": "EXPORT_SUCCEEDED", "eventId": f"{rid}:EXPORT_SUCCEEDED", "requestId": rid,
                     "dicomStore": store, "tableUri": body["bigqueryDestination"]["tableUri"], "failureCount": "0"}
    assert set(data) == EVENT_FIELDS
    meta = done["metadata"]
    assert data["eventId"] == attrs["eventId"] and data["eventType"] == "EXPORT_SUCCEEDED"
    assert data["requestId"] == rid and data["dicomStore"] == store
    assert data["bigqueryDestination"] == body["bigqueryDestination"]
    assert data["filterConfig"] is None and data["labels"] == {"team": "radiology"}
    assert data["operation"] == op["name"]
    assert data["counter"] == {"success": 3, "failure": 0, "pending": 0}  # int64 strings -> integers
    assert meta["counter"] == {"success": "3"}
    assert (data["createTime"], data["endTime"], data["logsUrl"]) == (meta["createTime"], meta["endTime"],
                                                                      meta["logsUrl"])
    assert data["error"] is None

    doc = f.ledger.get(rid)
    assert doc["state"] == L.SUCCEEDED and doc["counter"] == {"success": "3"} and doc["endTime"] == meta["endTime"]
    recorded = doc["events"]["EXPORT_SUCCEEDED"]
    assert recorded["published"] is True and recorded["messageId"] and recorded["data"] == data
    assert recorded["attributes"] == attrs
    assert "leaseOwner" not in doc and "leaseUntil" not in doc and "nextPollAt" not in doc
    assert doc["lastPolledAt"] >= doc["receivedAt"] and doc["polls"] == 1

    entries = for_request(log_lines(capsys.readouterr().out), rid)
    [ok] = [x for x in entries if x["message"] == "export succeeded"]
    assert ok["severity"] == "INFO" and ok["logging.googleapis.com/labels"]["operation"] == op["name"]
    assert any(x["message"] == "published EXPORT_SUCCEEDED" and x["eventId"] == attrs["eventId"] for x in entries)

    assert p.tick().get("published") is None  # nothing left to do
    assert f.drain(1.0) == []


def test_success_with_failures_warns_with_the_logs_url(p, harness, hcapi, three, gcs_client, capsys):
    f = harness
    store = hcapi.store()
    assert hcapi.stow(store, three).status_code == 200
    bucket = gcs_client.create_bucket(unique("poll-filters"))
    bucket.blob("f.txt").upload_from_string("/studies/1.2.826.0.1.3680043.8.498.7\n/studies/1.2.3.404\n")
    uri = table()
    r = hcapi.export(store, {"bigqueryDestination": {"tableUri": uri, "writeDisposition": "WRITE_APPEND"},
                             "filterConfig": {"resourcePathsGcsUri": f"gs://{bucket.name}/f.txt"}})
    op = r.json()
    rid, _ = p.seed(store, op, table_uri=uri)
    hcapi.wait(op["name"])
    p.tick()

    e = _one_event(f, rid)
    assert e["attributes"]["eventType"] == "EXPORT_SUCCEEDED" and e["attributes"]["failureCount"] == "1"
    assert e["data"]["counter"] == {"success": 3, "failure": 1, "pending": 0} and e["data"]["error"] is None
    [warn] = [x for x in for_request(log_lines(capsys.readouterr().out), rid) if x["severity"] == "WARNING"]
    assert "1 failed" in warn["message"] and warn["logsUrl"] == op["metadata"]["logsUrl"]
    assert warn["logging.googleapis.com/labels"]["logsUrl"] == op["metadata"]["logsUrl"]


def test_failure_copies_the_error_and_logs_an_error(p, harness, hcapi, capsys):
    f = harness
    store = hcapi.store()
    op = p.export(store, table("no_such_dataset"))
    rid, body = p.seed(store, op, table_uri=f"bq://{PROJECT}.no_such_dataset.t")
    done = hcapi.wait(op["name"])
    assert done["error"]["code"] == 5
    p.tick()

    e = _one_event(f, rid)
    assert e["attributes"]["eventType"] == "EXPORT_FAILED" and e["attributes"]["failureCount"] == "0"
    remedy = e["data"]["error"].pop("remedy")  # a missing destination dataset: the command that fixes it
    assert e["data"]["error"] == {"code": 5, "message": done["error"]["message"]}
    assert remedy.startswith(f"bq --project_id={PROJECT} mk --dataset {PROJECT}:no_such_dataset && bq "), remedy
    e["data"]["error"]["remedy"] = remedy
    assert e["data"]["endTime"] == done["metadata"]["endTime"] and set(e["data"]) == EVENT_FIELDS
    assert f.ledger.get(rid)["state"] == L.FAILED
    [err] = [x for x in for_request(log_lines(capsys.readouterr().out), rid) if x["severity"] == "ERROR"]
    assert err["requestId"] == rid and err["operation"] == op["name"] and err["logsUrl"] == op["metadata"]["logsUrl"]
    assert err["error"] == e["data"]["error"] and "export failed" in err["message"]


def test_cancelled_operation_is_export_cancelled(harness, slow_hc, capsys):
    f = harness
    p = Poller(f, hc_url=slow_hc.url)
    op = p.export(slow_hc.store, table())
    rid, _ = p.seed(slow_hc.store, op)
    assert p.api.post(f"{op['name']}:cancel", json={}).status_code == 200  # an operator cancels it
    assert p.api.wait(op["name"])["error"]["code"] == 1
    p.tick()

    e = _one_event(f, rid)
    assert e["attributes"]["eventType"] == "EXPORT_CANCELLED"
    assert e["attributes"]["eventId"] == f"{rid}:EXPORT_CANCELLED"
    assert e["data"]["error"]["code"] == 1 and f.ledger.get(rid)["state"] == L.CANCELLED
    [err] = [x for x in for_request(log_lines(capsys.readouterr().out), rid) if x["severity"] == "ERROR"]
    assert err["message"].startswith("export cancelled") and err["error"]["code"] == 1


def test_running_too_long_is_cancelled_and_timed_out(harness, slow_hc, capsys):
    f = harness
    p = Poller(f, hc_url=slow_hc.url, env={"MAX_OPERATION_AGE_S": "1"})
    op = p.export(slow_hc.store, table())
    rid, _ = p.seed(slow_hc.store, op)
    created = L.now()
    wait_for(lambda: L.now() - created > timedelta(seconds=1.2), what="the export to pass MAX_OPERATION_AGE_S")
    assert p.tick()["timed_out"] == 1

    e = _one_event(f, rid)
    assert e["attributes"]["eventType"] == "EXPORT_TIMED_OUT" and e["attributes"]["failureCount"] == "0"
    assert e["data"]["error"]["code"] == 4 and "MAX_OPERATION_AGE_S=1" in e["data"]["error"]["message"]
    assert e["data"]["endTime"] is None and e["data"]["operation"] == op["name"] and set(e["data"]) == EVENT_FIELDS
    doc = f.ledger.get(rid)
    assert doc["state"] == L.TIMED_OUT and doc["cancelRequested"] is True and doc["cancelRequestedAt"]
    assert doc["events"]["EXPORT_TIMED_OUT"]["published"] is True
    ended = p.api.wait(op["name"])  # the API was asked to cancel it
    assert ended["error"]["code"] == 1 and ended["metadata"]["cancelRequested"] is True
    [err] = [x for x in for_request(log_lines(capsys.readouterr().out), rid) if x["severity"] == "ERROR"]
    assert err["message"].startswith("export timed out") and err["operation"] == op["name"] and err["logsUrl"]

    p.tick()  # the cancellation that followed is not a second terminal event
    assert f.drain(1.0) == []


def test_a_running_export_is_polled_again_later_with_backoff(harness, slow_hc):
    f = harness
    p = Poller(f, hc_url=slow_hc.url, env={"POLL_MAX_INTERVAL_S": "3"})
    op = p.export(slow_hc.store, table())
    rid, _ = p.seed(slow_hc.store, op)

    intervals = []
    for i in range(4):
        summary = p.tick()
        assert summary.get("running") == 1, summary
        doc = f.ledger.get(rid)
        assert doc["state"] == L.STARTED and doc["polls"] == i + 1 and "leaseOwner" not in doc
        wait = (doc["nextPollAt"] - doc["lastPolledAt"]).total_seconds()
        assert doc["pollInterval"] <= wait <= doc["pollInterval"] + min(1.0, doc["pollInterval"] * 0.1) + 1e-3
        intervals.append(doc["pollInterval"])
        assert p.tick().get("polled") is None  # not due yet: left alone
        f.ledger.update(rid, lambda d: {"nextPollAt": L.now()})  # time travel to the next poll
    assert intervals == [1.4, 1.96, 2.744, 3.0]  # x1.4 (gcloud's waiter), capped by POLL_MAX_INTERVAL_S
    assert f.drain(0.5) == []
    p.api.post(f"{op['name']}:cancel", json={})


def test_an_operation_the_api_no_longer_knows_fails_once(p, harness, hcapi, capsys):
    f = harness
    store = hcapi.store()
    gone = {"name": f"{store.split('/dicomStores/')[0]}/operations/4611686018427387904", "metadata": {}}
    rid, _ = p.seed(store, gone)
    p.tick()

    e = _one_event(f, rid)
    assert e["attributes"]["eventType"] == "EXPORT_FAILED"
    assert e["data"]["error"]["code"] == 5
    assert "no longer known to the Cloud Healthcare API (404 NOT_FOUND)" in e["data"]["error"]["message"]
    assert "30 days" in e["data"]["error"]["message"]
    assert f.ledger.get(rid)["state"] == L.FAILED
    [err] = [x for x in for_request(log_lines(capsys.readouterr().out), rid) if x["severity"] == "ERROR"]
    assert err["operation"] == gone["name"] and err["error"]["code"] == 5
    p.tick()
    assert f.drain(0.5) == []  # not a retry loop


def test_the_started_event_left_by_the_intake_goes_out_first(p, harness, hcapi):
    """The intake died after recording STARTED, before publishing it; the export then ended. The poller
    publishes the recorded EXPORT_STARTED (same eventId) before the terminal event."""
    f = harness
    store = hcapi.store()
    op = p.export(store, table())
    rid, _ = p.seed(store, op, started_published=False)
    hcapi.wait(op["name"])
    p.tick()
    got = f.events(2, where=lambda e: e["attributes"]["requestId"] == rid)
    assert [e["attributes"]["eventType"] for e in got] == ["EXPORT_STARTED", "EXPORT_SUCCEEDED"]
    assert got[0]["attributes"]["eventId"] == f"{rid}:EXPORT_STARTED"
    doc = f.ledger.get(rid)
    assert all(doc["events"][t]["published"] for t in ("EXPORT_STARTED", "EXPORT_SUCCEEDED"))


def test_transient_errors_leave_requests_for_the_next_run(harness, logs_dir, tmp_path, capsys):
    """operations.get answers 429/503 half of the time: those requests stay STARTED and due (no retry inside
    the run), later runs finish them, and each ends with exactly one event."""
    f = harness
    faulty = procs.healthcare_emulator(logs_dir, tmp_path / "faulty", "--fault", "operations.get=0.5",
                                       name=unique("hc-poll-faults")).start()
    try:
        p = Poller(f, hc_url=faulty.url)
        api = HC(faulty.url)
        store = api.store()
        ops = p.exports(store, [table("missing") for _ in range(30)])
        rids = [p.seed(store, op)[0] for op in ops]
        for op in ops:
            api.wait(op["name"])

        first = p.tick()
        assert first["transient"] > 0 and first["failed"] == 30 - first["transient"]
        left = [d for d in (f.ledger.get(r) for r in rids) if d["state"] == L.STARTED]
        assert len(left) == first["transient"]
        for d in left:  # still due, unchanged schedule, lease dropped, the error counted
            assert d["nextPollAt"] <= L.now() and d["pollErrors"] == 1 and "leaseOwner" not in d
        warns = [x for x in log_lines(capsys.readouterr().out) if x["severity"] == "WARNING"]
        assert any("failed transiently" in x["message"] and ("429" in x["problem"] or "503" in x["problem"])
                   for x in warns)
        runs = 1
        while any(f.ledger.get(r)["state"] == L.STARTED for r in rids):
            p.tick()
            runs += 1
            assert runs < 40
        got = f.events(30, where=lambda e: e["attributes"]["requestId"] in rids)
        assert sorted(e["attributes"]["requestId"] for e in got) == sorted(rids)
        assert {e["attributes"]["eventType"] for e in got} == {"EXPORT_FAILED"}
        assert f.drain(1.0) == []
    finally:
        faulty.stop()


def test_a_refusal_other_than_404_is_logged_and_polled_later(p, harness, hcapi, capsys):
    """A final 4xx other than 404 (here 400 on a malformed name) may be a misconfiguration of this deployment
    rather than the export's fault: an ERROR, and the request stays STARTED, polled again with backoff (and
    ends as EXPORT_TIMED_OUT past MAX_OPERATION_AGE_S if it never clears)."""
    f = harness
    store = hcapi.store()
    bad = {"name": f"{store.split('/dicomStores/')[0]}/operations/bad~id", "metadata": {}}
    rid, _ = p.seed(store, bad)
    summary = p.tick()
    assert summary["apiErrors"] == 1 and "published" not in summary
    doc = f.ledger.get(rid)
    assert doc["state"] == L.STARTED and doc["nextPollAt"] > L.now() and doc["pollInterval"] == 1.4
    [err] = [x for x in for_request(log_lines(capsys.readouterr().out), rid) if x["severity"] == "ERROR"]
    assert "INVALID_ARGUMENT" in err["message"] and err["httpStatus"] == 400
    assert f.drain(0.5) == []
