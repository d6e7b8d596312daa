"""handlers/core/changes.py: what a batch deletes and exports, applied to a model store and table."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.core import changes as C

T0 = datetime(2026, 12, 2, tzinfo=timezone.utc)
STORE = "projects/p-1234/locations/us/datasets/d/dicomStores/s"


def path(study, series, sop):
    return f"/studies/{study}/series/{series}/instances/{sop}"


def test_parse_resource_levels_and_bad_input():
    r = C.parse_resource(f"{STORE}/dicomWeb/studies/1.2/series/1.2.3/instances/1.2.3.4")
    assert (r.store, r.path, r.study, r.series, r.sop) == (STORE, path("1.2", "1.2.3", "1.2.3.4"), "1.2", "1.2.3",
                                                           "1.2.3.4")
    study = C.parse_resource(f"{STORE}/dicomWeb/studies/1.2")
    assert (study.path, study.series, study.sop) == ("/studies/1.2", None, None)
    for bad in (None, "", STORE, f"{STORE}/dicomWeb/studies/../series/1/instances/2",
                f"{STORE}/dicomWeb/studies/1.2/series/x/instances/3", f"{STORE}/dicomWeb/studies/1." + "2" * 70,
                f"{STORE}/dicomWeb/studies/1.2/instances/3", f"{STORE}/dicomWeb/studies/1.2 /series/1/instances/2"):
        assert C.parse_resource(bad) is None, bad


def test_kinds():
    inst = C.parse_resource(f"{STORE}/dicomWeb/studies/1/series/2/instances/3")
    study = C.parse_resource(f"{STORE}/dicomWeb/studies/1")
    assert C.kind_of("", inst) == C.kind_of("StoreInstances", inst) == C.kind_of("ImportDicomData", inst) == "arrival"
    assert C.kind_of("DeleteStudy", inst) == C.kind_of("DeleteStudy", study) == "deletion"
    assert C.kind_of("StoreInstances", study) == C.kind_of("SetBlobSettings", inst) == "other"


def test_store_delete_store_of_one_instance_exports_it_once_after_deleting_its_rows():
    p = path("1", "2", "3")
    plan = C.plan([C.Change(p, False, T0), C.Change(p, True, T0 + timedelta(1)), C.Change(p, False, T0 + timedelta(2))])
    assert plan == C.Plan(("3",), (), (), (p,))
    gone = C.plan([C.Change(p, False, T0), C.Change(p, True, T0 + timedelta(1))])
    assert gone == C.Plan(("3",), (), (), ())


def test_series_and_study_deletions_cover_earlier_stores_only():
    before, after = path("1", "2", "3"), path("1", "2", "4")
    plan = C.plan([C.Change(before, False, T0), C.Change("/studies/1/series/2", True, T0 + timedelta(1)),
                   C.Change(after, False, T0 + timedelta(2)), C.Change("/studies/9", True, T0)])
    assert plan == C.Plan(("3", "4"), ("2",), ("9",), (after,))


def test_delete_statement_and_parameters():
    plan = C.Plan(("3",), ("2",), (), ())
    assert C.delete_statement("bq://example.com:p-1.d.t") == (
        "DELETE FROM `example.com:p-1.d.t` WHERE SOPInstanceUID IN UNNEST(@sops) OR SeriesInstanceUID IN "
        "UNNEST(@series) OR StudyInstanceUID IN UNNEST(@studies)")
    params = C.parameters(plan)
    assert [p["name"] for p in params] == ["sops", "series", "studies"]
    assert params[0]["parameterValue"] == {"arrayValues": [{"value": "3"}]}
    assert params[2]["parameterValue"] == {"arrayValues": []}


def test_plan_round_trips_through_the_batch_document():
    plan = C.Plan(("3", "4"), ("2",), (), (path("1", "2", "4"),))
    assert C.Plan.of(plan.fields()) == plan
    legacy = C.Plan.of({"paths": [path("1", "2", "4")]})
    assert legacy == C.Plan(("4",), (), (), (path("1", "2", "4"),))


def test_the_dml_job_id_is_the_attempts_and_unique_per_ledger():
    b = {"batchId": "3f2c9a1b7e4d5c60-000042", "closedAt": T0}
    one = C.dml_job_id("ledgerA", b, 1)
    assert one == C.dml_job_id("ledgerA", dict(b), 1) and one.startswith("ingest_3f2c9a1b7e4d5c60-000042_a1_")
    assert len({one, C.dml_job_id("ledgerA", b, 2), C.dml_job_id("ledgerB", b, 1),
                C.dml_job_id("ledgerA", {**b, "closedAt": T0 + timedelta(1)}, 1)}) == 4
    import re
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,1024}", one)


def test_retry_backoff_is_bounded():
    assert C.retry_at(1, 3, 10, T0) == T0 + timedelta(seconds=10)
    assert C.retry_at(2, 3, 10, T0) == T0 + timedelta(seconds=20)
    assert C.retry_at(3, 3, 10, T0) is None
    assert C.retry_at(30, 40, 10, T0) == T0 + timedelta(seconds=3600)
    assert [C.attempt_request_id("b", n) for n in (1, 2)] == ["ingest-b", "ingest-b-a2"]


# -- the model: a store, a table, and changes applied batch by batch ----------------------------------------
INSTANCES = [("1", "1", "1"), ("1", "1", "2"), ("1", "2", "3"), ("2", "1", "4"), ("2", "1", "5")]
steps = st.lists(st.one_of(
    st.tuples(st.sampled_from(["store", "delete", "delete_series", "delete_study"]), st.sampled_from(INSTANCES)),
    st.tuples(st.just("batch"), st.integers(1, 6))), max_size=40)


def apply(store: dict, op: str, uids: tuple, version: int) -> list[tuple[str, bool]]:
    """Change the model store; return the notifications (path, deleted) the API sends."""
    study, series, sop = uids
    if op == "store":
        if uids in store:
            return []  # the real API refuses to store an existing instance
        store[uids] = version
        return [(path(*uids), False)]
    scope = {"delete": uids, "delete_series": (study, series), "delete_study": (study,)}[op]
    gone = [u for u in store if u[:len(scope)] == scope]
    for u in gone:
        del store[u]
    return [(path(*u), True) for u in gone]


def run_batch(table: list, store: dict, batch: list) -> list:
    plan = C.plan(batch)
    table = [r for r in table if r[2] not in plan.sops and r[1] not in plan.series and r[0] not in plan.studies]
    for p in plan.export_paths:  # the export reads the store as it is when it runs
        uids = C.parse_path(p)
        if uids in store:
            table.append((*uids, store[uids]))
    return table


@settings(max_examples=200, deadline=None)
@given(steps)
def test_batches_applied_in_order_leave_one_row_per_stored_instance_with_its_last_version(seq):
    """Changes happen while earlier batches are applied; once every batch ran, the table is the store."""
    store: dict = {}
    pending: list[C.Change] = []
    table: list[tuple] = []  # rows: (study, series, sop, version)
    t = T0
    for i, (op, arg) in enumerate(seq):
        if op == "batch":
            table, pending = run_batch(table, store, pending[:arg]), pending[arg:]
            continue
        for p, deleted in apply(store, op, arg, i):
            t += timedelta(milliseconds=1)
            pending.append(C.Change(p, deleted, t))
    while pending:
        table, pending = run_batch(table, store, pending[:3]), pending[3:]
    assert sorted(table) == sorted((*u, v) for u, v in store.items())


def test_the_failed_event_names_the_batch_every_attempt_the_cause_and_the_remedy():
    b = {"batchId": "abc-000001", "store": STORE, "tableUri": "bq://p-1.d.t", "instances": 3, "filterUri": "gs://f/x",
         "paths": ["/studies/1/series/2/instances/3"], "PatientName": "never^copied"}
    e = C.failed_event(b, 3, {"requestState": "FAILED", "error": {"code": 13, "message": "boom"}}, T0)
    assert e["eventId"] == "abc-000001:INGEST_BATCH_FAILED" and e["attributes"]["eventType"] == "INGEST_BATCH_FAILED"
    assert e["attributes"]["ingestBatch"] == "abc-000001" and e["attributes"]["tableUri"] == "bq://p-1.d.t"
    d = e["data"]
    assert d["requestIds"] == ["ingest-abc-000001", "ingest-abc-000001-a2", "ingest-abc-000001-a3"]
    assert d["cause"]["error"]["code"] == 13 and "reconcile_tables" in d["remedy"] and d["attempts"] == 3
    assert "never^copied" not in str(e)


def test_arrival_documents_of_changes():
    fields = {"route": "r", "store": STORE, "tableUri": "bq://p-1.d.t", "tableKey": "k"}
    doc = C.arrival_doc(fields, path("1", "2", "3"), C.DELETION, action="DeleteSeries", version_id="7",
                        message_id="m", arrived=T0, recorded=T0)
    assert doc["state"] == "PENDING" and doc["kind"] == "deletion" and doc["route"] == "r" and doc["batchId"] is None
    assert C.arrival_doc(fields, "/studies/1", C.OTHER, action="X", version_id=None, message_id="m", arrived=T0,
                         recorded=T0)["state"] == "OTHER"
