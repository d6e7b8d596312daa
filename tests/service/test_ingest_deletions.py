"""Deletions and replacements applied, failed batches re-driven then surfaced, bad input counted, end to end on the local stack: the Healthcare emulator's notifications feed ingest_notification;
batches go through the real intake and poller; rows are read from the emulator's BigQuery warehouse."""
from __future__ import annotations

import json
from collections import Counter

import pydicom
import pytest
import requests

from tests.support.function import PROJECT, wait_for
from tests.support.ingest import IngestStack, bq_mk, make_instances, stow_bursts

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


def uids_of(f) -> tuple[str, str, str]:
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def delete(st, store: str, *uids: str) -> None:
    scope = "/".join(f"{level}/{u}" for level, u in zip(("studies", "series", "instances"), uids))
    r = st.hc.http.delete(st.hc.url(f"{store}/dicomWeb/{scope}"))
    assert r.status_code == 200, r.text


def sops(st, sid: str) -> list[tuple[str, str | None]]:
    if not st.rows(sid)["n"]:
        return []
    return sorted((r["SOPInstanceUID"], r["name"]) for r in st.query(
        f"SELECT SOPInstanceUID, JSON_VALUE(Metadata, '$.\"00100010\".Value[0].Alphabetic') AS name "
        f"FROM `{st.tables[sid]}`"))


def converge(st, sid: str, expected, timeout: float = 240):
    def done():
        got = sops(st, sid)
        if got != expected:
            st.tick()
        return got == expected
    wait_for(done, timeout=timeout, interval=1.0, what=f"table {st.tables[sid]} = {expected}")


def dml_jobs(st) -> list[str]:
    r = requests.get(f"{st.hc_svc.url}/bigquery/v2/projects/{PROJECT}/jobs", params={"maxResults": 1000,
                                                                                   "allUsers": "true"}, timeout=30)
    r.raise_for_status()
    return [j["configuration"]["query"]["query"] for j in r.json().get("jobs", [])
            if j.get("configuration", {}).get("query", {}).get("query", "").startswith("DELETE")]


def test_store_delete_store_ends_with_one_row_of_the_last_version_and_a_deleted_study_has_none(
        stack_factory, tmp_path):
    from tests.support.dicom_files import path, with_uids

    st = stack_factory(["d"], route_options={"d": {"schemaJson": {}}}, max_n=100, max_age_s=1)
    store = st.stores["d"]
    files = make_instances(tmp_path / "a", 3, per_study=3) + make_instances(tmp_path / "b", 2, per_study=2)
    stow_bursts(st.hc, store, files)
    converge(st, "d", sorted((uids_of(f)[2], "CompressedSamples^CT1") for f in files))
    keep, gone_study = [uids_of(f) for f in files[:3]], uids_of(files[3])[0]
    study, series, sop = keep[0]
    delete(st, store, study, series, sop)  # a replacement: deleted, then stored again with new metadata
    stow_bursts(st.hc, store, [with_uids(path("CT_small.dcm"), tmp_path / "new.dcm", study=study, series=series,
                                         sop=sop, PatientName="REPLACED^ONCE")])
    delete(st, store, *keep[1])  # an instance deleted
    delete(st, store, gone_study)  # a whole study deleted (one notification per instance)
    converge(st, "d", sorted([(sop, "REPLACED^ONCE"), (keep[2][2], "CompressedSamples^CT1")]))
    outcomes = [e.get("ingestOutcome") for e in st.ingest_notification.log_entries()]
    assert outcomes.count("deletion") == 4 and outcomes.count("recorded") == 6


def test_a_deletion_storm_of_one_study_is_batched_not_one_dml_job_per_notification(stack_factory, tmp_path):
    st = stack_factory(["s"], max_n=500, max_age_s=5)
    store = st.stores["s"]
    files = make_instances(tmp_path / "dcm", 120, per_study=120)
    stow_bursts(st.hc, store, files)
    st.wait_rows({"s": 120})
    delete(st, store, uids_of(files[0])[0])  # 120 DeleteStudy notifications
    wait_for(lambda: st.rows("s")["n"] == 0 or st.tick(), timeout=240, interval=1.0, what="the study's rows deleted")
    ingest_ledger, _ = st.ledgers()
    batches = ingest_ledger.batches()
    with_deletions = [b for b in batches if len(b["removals"]["sops"]) > len(b["paths"])]
    # the notifications arrive over seconds (one push in flight): batches close by age, each one DML job
    assert 1 <= len(with_deletions) <= 12 and sum(len(b["removals"]["sops"]) for b in with_deletions) == 120
    # one DML job per batch attempt, however many processes found the batch part-way
    assert len(dml_jobs(st)) == sum(b.get("attempt") or 1 for b in batches)


def test_bad_input_is_counted_and_logged_and_changes_nothing(stack_factory, tmp_path):
    st = stack_factory(["x"], max_n=100, max_age_s=1)
    store = st.stores["x"]
    files = make_instances(tmp_path / "dcm", 2)
    stow_bursts(st.hc, store, files)
    st.wait_rows({"x": 2})
    other = store.rsplit("/", 1)[0] + "/not-routed"
    study, series, sop = uids_of(files[0])
    bad = [(f"{other}/dicomWeb/studies/{study}/series/{series}/instances/{sop}", {"action": "DeleteInstance"}),
           (f"{store}/dicomWeb/studies/{study}/series/../instances/{sop}", {"action": "DeleteInstance"}),
           ("not a resource name", {}),
           (f"{store}/dicomWeb/studies/1.2.3.999/series/1.2.3.999.1/instances/1.2.3.999.1.1",
            {"action": "DeleteInstance", "versionId": "1"})]  # an instance the table never had
    for data, attrs in bad:
        st.publisher.publish(st.topic("notify"), data.encode(), **attrs).result(timeout=30)

    def outcomes():
        return Counter(e.get("ingestOutcome") for e in st.ingest_notification.log_entries() if e.get("ingestOutcome"))
    try:
        # (a redelivered notification is logged again as a duplicate)
        wait_for(lambda: {k: outcomes()[k] for k in ("recorded", "unrouted", "malformed", "deletion")} == {
            "recorded": 2, "unrouted": 1, "malformed": 2, "deletion": 1}, timeout=60)
    finally:
        print("outcomes:", outcomes())
    wait_for(lambda: any(e.get("message") == "ingest batch rows deleted" and e.get("rowsDeleted") == 0
                         for e in st.ingest_notification.log_entries() + st.poll_exports.log_entries())
             or st.tick(), timeout=120, interval=1.0, what="the never-had deletion applied")
    assert st.rows("x") == {"n": 2, "d": 2}


def test_a_failing_batch_is_re_driven_with_backoff_until_it_succeeds(stack_factory, tmp_path):
    st = stack_factory(["r"], max_n=100, max_age_s=1, extra_env={"INGEST_RETRY_BACKOFF_S": "1",
                                                                 "INGEST_BATCH_MAX_ATTEMPTS": "10"})
    _drop_dataset(st)  # the export fails (its dataset is missing) until the dataset is back
    stow_bursts(st.hc, st.stores["r"], make_instances(tmp_path / "dcm", 3))
    wait_for(lambda: _failed_attempts(st) >= 2 or st.tick(), timeout=180, interval=1.0, what="two failed attempts")
    bq_mk(st.data_dir, st.bq_dataset)
    st.wait_rows({"r": 3})
    ingest_ledger, _ = st.ledgers()
    wait_for(lambda: all(b["state"] == "EXPORTED" for b in ingest_ledger.batches()) or st.tick(), timeout=60,
             interval=0.5, what="every batch EXPORTED")  # (recorded at the tick after the export's end)
    batches = sorted(ingest_ledger.batches(), key=lambda b: b["batchId"])  # (the instances may span two)
    assert all(b["state"] == "EXPORTED" and len(b.get("failures") or []) == b["attempt"] - 1 for b in batches)
    first = batches[0]
    assert first["attempt"] >= 3 and first["requestId"] == f"ingest-{first['batchId']}-a{first['attempt']}"
    assert [f["attempt"] for f in first["failures"]] == list(range(1, first["attempt"]))
    assert all(f["requestState"] == "FAILED" for f in first["failures"])
    assert st.rows("r") == {"n": 3, "d": 3}


def test_a_batch_failing_every_attempt_is_surfaced_with_an_error_and_an_event(stack_factory, tmp_path):
    st = stack_factory(["f"], max_n=100, max_age_s=1, extra_env={"INGEST_RETRY_BACKOFF_S": "0.5",
                                                                 "INGEST_BATCH_MAX_ATTEMPTS": "2"})
    _drop_dataset(st)
    stow_bursts(st.hc, st.stores["f"], make_instances(tmp_path / "dcm", 2))
    ingest_ledger, _ = st.ledgers()
    wait_for(lambda: [b["state"] for b in ingest_ledger.batches()] == ["FAILED"] or st.tick(), timeout=180,
             interval=1.0, what="the batch FAILED")
    (b,) = ingest_ledger.batches()

    def event():
        st.tick()
        return [e for e in st.events(timeout=3) if e["attributes"].get("eventType") == "INGEST_BATCH_FAILED"]
    events = wait_for(event, timeout=60, interval=0.5, what="INGEST_BATCH_FAILED")
    (e,) = events
    assert e["attributes"]["ingestBatch"] == b["batchId"] and e["attributes"]["tableUri"] == f"bq://{st.tables['f']}"
    assert e["data"]["attempts"] == 2 and e["data"]["requestIds"] == [f"ingest-{b['batchId']}",
                                                                        f"ingest-{b['batchId']}-a2"]
    assert e["data"]["cause"]["requestState"] == "FAILED" and e["data"]["cause"]["error"]["code"]
    assert "reconcile_tables" in e["data"]["remedy"]
    logs = st.ingest_notification.log_entries() + st.poll_exports.log_entries()
    (err,) = [x for x in logs if x.get("message", "").startswith("ingest batch NOT applied")]
    assert err["severity"] == "ERROR" and err["ingestBatch"] == b["batchId"] and "PatientName" not in json.dumps(e)
    assert ingest_ledger.batch(b["batchId"])["events"]["INGEST_BATCH_FAILED"]["published"] is True
    assert (ingest_ledger.table(b["tableKey"]) or {}).get("running") is None  # the table is free again


def _drop_dataset(st) -> None:
    r = requests.delete(f"{st.hc_svc.url}/bigquery/v2/projects/{PROJECT}/datasets/{st.bq_dataset.split('.')[1]}",
                        params={"deleteContents": "true"}, timeout=30)
    assert r.status_code in (200, 204), r.text


def _failed_attempts(st) -> int:
    ingest_ledger, _ = st.ledgers()
    return sum(len(b.get("failures") or []) for b in ingest_ledger.batches())
