"""Streaming to BigQuery (`streamConfigs`): every STOWed instance becomes a row of the configured tables.

The tables are read through google-cloud-bigquery against the emulator's BigQuery surface; each wait polls
the table with a deadline (no fixed sleep).
"""
from __future__ import annotations

import time

import pydicom
import pytest

from tests.support import dicom_files
from tests.support.hcapi import HC, unique

PROJECT = "stream-proj"


def poll(predicate, what: str, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)  # the interval between two polls of an observable condition


@pytest.fixture(scope="module")
def api(hc):
    return HC(hc.url, project=PROJECT)


@pytest.fixture(scope="module")
def bq(hc):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery
    return bigquery.Client(project=PROJECT, credentials=AnonymousCredentials(),
                           client_options={"api_endpoint": hc.url})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream-files")
    return [dicom_files.with_uids(dicom_files.path(n), d / f"{i}.dcm")
            for i, n in enumerate(("CT_small.dcm", "MR_small.dcm", "rtplan.dcm"))]


def uids(path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def rows_of(bq, table: str) -> list[dict]:
    return [dict(r) for r in bq.query_and_wait(f"SELECT SOPInstanceUID FROM `{table}` ORDER BY SOPInstanceUID")]


def table_rows(bq, table: str) -> int:
    from google.api_core.exceptions import NotFound
    try:
        return bq.get_table(table).num_rows
    except NotFound:
        return -1


def fields_of(schema) -> dict:
    return {f.name: (f.field_type, f.mode) for f in schema}


def test_each_stowed_instance_reaches_its_tables_in_the_exports_schema(api, bq, files):
    ds_id = unique("stream").replace("-", "_")
    bq.create_dataset(ds_id)
    t_plain, t_source = f"{PROJECT}.{ds_id}.plain", f"{PROJECT}.{ds_id}.with_source"
    store = api.store(body={"streamConfigs": [
        {"bigqueryDestination": {"tableUri": f"bq://{t_plain}"}},
        {"bigqueryDestination": {"tableUri": f"bq://{t_source}", "includeSourceStore": True}}]})

    for n, f in enumerate(files, 1):
        assert api.stow(store, [f]).status_code == 200
        poll(lambda n=n: table_rows(bq, t_plain) == n and table_rows(bq, t_source) == n, f"{n} streamed row(s)")
    want = sorted(uids(f)[2] for f in files)
    assert [r["SOPInstanceUID"] for r in rows_of(bq, t_plain)] == want
    got = list(bq.query_and_wait(f"SELECT DISTINCT SourceDicomStore FROM `{t_source}`"))
    assert [r.SourceDicomStore for r in got] == [store]
    assert "SourceDicomStore" not in fields_of(bq.get_table(t_plain).schema)

    # The schema widened with each modality and is the schema an export of the same instances writes.
    op = api.export_and_wait(store, {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.{ds_id}.exported",
                                                             "writeDisposition": "WRITE_TRUNCATE"}})
    assert "error" not in op, op
    exported = fields_of(bq.get_table(f"{PROJECT}.{ds_id}.exported").schema)
    assert fields_of(bq.get_table(t_plain).schema) == exported
    assert "RTPlanLabel" in exported and "EchoTime" in exported and "KVP" in exported
    same = ("SELECT PatientID, Modality, StudyDate, SOPClassUID FROM `{}` ORDER BY SOPInstanceUID")
    assert [dict(r) for r in bq.query_and_wait(same.format(t_plain))] == \
        [dict(r) for r in bq.query_and_wait(same.format(f"{PROJECT}.{ds_id}.exported"))]

    # A deleted instance's row stays: deletes are not applied; later instances still arrive.
    study, series, sop = uids(files[0])
    assert api.http.delete(api.url(f"{store}/dicomWeb/studies/{study}/series/{series}/instances/{sop}")).ok
    extra = dicom_files.with_uids(files[1], files[1].parent / "extra.dcm")
    assert api.stow(store, [extra]).status_code == 200
    poll(lambda: table_rows(bq, t_plain) == 4, "the row of the instance stored after the delete")
    assert sop in [r["SOPInstanceUID"] for r in rows_of(bq, t_plain)]


def test_streaming_errors_never_fail_a_stow_and_are_logged(api, bq, hc, files, tmp_path):
    missing = unique("nods").replace("-", "_")
    ds_id = unique("stream_ok").replace("-", "_")
    bq.create_dataset(ds_id)
    good = f"{PROJECT}.{ds_id}.t"
    store = api.store(body={"streamConfigs": [
        {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.{missing}.t"}},
        {"bigqueryDestination": {"tableUri": f"bq://{good}"}}]})
    f = dicom_files.with_uids(files[0], tmp_path / "e.dcm")
    assert api.stow(store, [f]).status_code == 200
    poll(lambda: table_rows(bq, good) == 1, "the row in the table whose dataset exists")
    poll(lambda: f"streaming to bq://{PROJECT}.{missing}.t failed" in hc.log_tail(200_000),
         "the streaming error in the emulator's log")
    assert "Not found: Dataset" in hc.log_tail(200_000)


def test_bad_stream_configs_are_a_400_naming_the_field_and_leave_the_store_unchanged(api):
    store = api.store(body={"labels": {"k": "v"}})
    before = api.get(store).json()
    for configs, words in (
            ([{"bigqueryDestination": {"tableUri": "bq://stream-proj.bad-dataset.t"}}], "invalid dataset ID"),
            ([{"bigqueryDestination": {"tableUri": "stream-proj.ds.t"}}], "must start with bq://"),
            ([{"bigqueryDestination": {"tableUri": "bq://stream-proj.ds"}}], "bq://PROJECT.DATASET.TABLE"),
            ([{"bigqueryDestination": {"tableUri": "bq://stream-proj.ds.t"}},
              {"bigqueryDestination": {"tableUri": "bq://stream-proj.ds.t"}}], "unique destination"),
            ([{}], "bigquery_destination is required")):
        r = api.http.patch(api.url(store), params={"updateMask": "streamConfigs"},
                           json={"streamConfigs": configs})
        assert r.status_code == 400, (configs, r.text)
        body = r.json()["error"]
        assert words in body["message"], body
        assert body["details"][0]["fieldViolations"][0]["field"].startswith("stream_configs["), body
        r = api.post(f"{store.rsplit('/', 1)[0]}", params={"dicomStoreId": unique("s")},
                     json={"streamConfigs": configs})
        assert r.status_code == 400
    assert api.get(store).json() == before
