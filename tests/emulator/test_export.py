"""dicomStores.export to the emulator's BigQuery warehouse, end to end over HTTP.

Real DICOM files are stored through STOW-RS, exported, and read back with the emulator's
`query` command in a separate process, as a user would.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import dicom_files, procs
from tests.support.hcapi import HC, unique

PROJECT = "bq-proj-1"


def cli(data_dir, *args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "healthcare_emulator", *args, "--data-dir", str(data_dir)],
                       capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def query(data_dir, sql: str) -> list[dict]:
    return json.loads(cli(data_dir, "query", sql).stdout)


def bq_dataset(data_dir) -> str:
    ds = unique("bqds").replace("-", "_")
    cli(data_dir, "bq", "mk", f"{PROJECT}.{ds}")
    return ds


@pytest.fixture
def api(hc):
    return HC(hc.url)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Three instances: two in one series of one study, one in another study."""
    d = tmp_path_factory.mktemp("three")
    study1, series1 = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.11"
    a = dicom_files.with_uids(dicom_files.path("CT_small.dcm"), d / "a.dcm", study=study1, series=series1,
                              sop="1.2.826.0.1.3680043.8.498.111", PatientID="19045")
    b = dicom_files.with_uids(dicom_files.path("CT_small.dcm"), d / "b.dcm", study=study1, series=series1,
                              sop="1.2.826.0.1.3680043.8.498.112", PatientID="19045")
    c = dicom_files.with_uids(dicom_files.path("MR_small.dcm"), d / "c.dcm", study="1.2.826.0.1.3680043.8.498.2",
                              series="1.2.826.0.1.3680043.8.498.21", sop="1.2.826.0.1.3680043.8.498.211",
                              PatientID="other")
    return [a, b, c]


@pytest.fixture
def loaded(api, three):
    store = api.store()
    r = api.stow(store, three)
    assert r.status_code == 200, r.text
    return store


def test_export_writes_one_row_per_instance_and_the_operation_says_so(api, hc, loaded):
    ds = bq_dataset(hc.data_dir)
    r = api.export(loaded, {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.{ds}.t"}})
    assert r.status_code == 200, r.text
    started = r.json()
    assert started["name"].startswith(loaded.split("/dicomStores/")[0] + "/operations/")
    meta = started["metadata"]
    assert meta["@type"] == "type.googleapis.com/google.cloud.healthcare.v1.OperationMetadata"
    assert meta["apiMethodName"] == "google.cloud.healthcare.v1.dicom.DicomService.ExportDicomData_bq"
    assert "done" not in started or started["done"] is False
    op = api.wait(started["name"])
    assert op["response"] == {"@type": "type.googleapis.com/google.protobuf.Empty"}
    assert "error" not in op
    assert op["metadata"]["counter"] == {"success": "3"}
    assert op["metadata"]["createTime"] <= op["metadata"]["endTime"]
    assert op["metadata"]["logsUrl"] == f"{hc.url}/logs/{started['name']}"
    rows = query(hc.data_dir, f"SELECT SOPInstanceUID, PatientID, StudyDate, Rows FROM `{PROJECT}.{ds}.t` "
                              "ORDER BY SOPInstanceUID")
    assert [r["SOPInstanceUID"] for r in rows] == ["1.2.826.0.1.3680043.8.498.111", "1.2.826.0.1.3680043.8.498.112",
                                                   "1.2.826.0.1.3680043.8.498.211"]
    assert rows[0]["PatientID"] == "19045" and isinstance(rows[0]["Rows"], int)
    assert rows[0]["StudyDate"] == "2004-01-19"  # DATE, rendered ISO


def test_seed_queries_run_verbatim(api, hc, loaded):
    ds = bq_dataset(hc.data_dir)
    api.export_and_wait(loaded, {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.{ds}.dicom"}})
    rows = query(hc.data_dir, f"""SELECT CONCAT('/dicomWeb/studies/', StudyInstanceUID, '/series/', SeriesInstanceUID,
              '/instances/', SOPInstanceUID) as DICOMwebPath
FROM `{PROJECT}.{ds}.dicom`
WHERE PatientID = '19045';""")
    assert sorted(r["DICOMwebPath"] for r in rows) == [
        "/dicomWeb/studies/1.2.826.0.1.3680043.8.498.1/series/1.2.826.0.1.3680043.8.498.11/instances/"
        "1.2.826.0.1.3680043.8.498.111",
        "/dicomWeb/studies/1.2.826.0.1.3680043.8.498.1/series/1.2.826.0.1.3680043.8.498.11/instances/"
        "1.2.826.0.1.3680043.8.498.112"]
    rows = query(hc.data_dir, f"""SELECT MIN(CONCAT(StudyDate, ' ', StudyTime)) as StudyDateTime, MIN(PatientID) as PatientID,
       StudyInstanceUID, COUNT(*) as InstanceCount
FROM `{PROJECT}.{ds}.dicom` AS dicom
GROUP BY StudyInstanceUID
ORDER BY StudyDateTime DESC
LIMIT 10;""")
    assert [list(r) for r in rows] == [["StudyDateTime", "PatientID", "StudyInstanceUID", "InstanceCount"]] * 2
    by_study = {r["StudyInstanceUID"]: r for r in rows}
    ct = by_study["1.2.826.0.1.3680043.8.498.1"]
    assert ct["InstanceCount"] == 2 and ct["PatientID"] == "19045"
    assert ct["StudyDateTime"] == "2004-01-19 07:27:30"  # CT_small: StudyDate 20040119, StudyTime 072730
    assert rows == sorted(rows, key=lambda r: r["StudyDateTime"], reverse=True)


# table state x (force | writeDisposition) -> rows after, or the error code of the operation
MATRIX = {
    # missing: always created
    ("missing", "force=true"): 3, ("missing", "force=false"): 3, ("missing", "none"): 3,
    ("missing", "WRITE_EMPTY"): 3, ("missing", "WRITE_TRUNCATE"): 3, ("missing", "WRITE_APPEND"): 3,
    # exists and empty
    ("empty", "force=true"): 3, ("empty", "force=false"): "error", ("empty", "none"): 3,
    ("empty", "WRITE_EMPTY"): 3, ("empty", "WRITE_TRUNCATE"): 3, ("empty", "WRITE_APPEND"): 3,
    # exists with 3 rows
    ("rows", "force=true"): 3, ("rows", "force=false"): "error", ("rows", "none"): "error",
    ("rows", "WRITE_EMPTY"): "error", ("rows", "WRITE_TRUNCATE"): 3, ("rows", "WRITE_APPEND"): 6,
}


def _dest(uri, mode):
    if mode == "none":
        return {"tableUri": uri}
    if mode.startswith("force="):
        return {"tableUri": uri, "force": mode == "force=true"}
    return {"tableUri": uri, "writeDisposition": mode}


@pytest.mark.parametrize("state, mode", sorted(MATRIX))
def test_write_disposition_matrix(api, hc, loaded, state, mode):
    ds = bq_dataset(hc.data_dir)
    uri = f"bq://{PROJECT}.{ds}.t"
    if state == "empty":
        from healthcare_emulator.warehouse import Warehouse
        Warehouse(hc.data_dir / "bigquery").write_table(
            PROJECT, ds, "t", [{"name": "SOPInstanceUID", "type": "STRING", "mode": "NULLABLE"}], [],
            if_exists="error")
    elif state == "rows":
        assert "error" not in api.export_and_wait(loaded, {"bigqueryDestination": {"tableUri": uri}})
    before = query(hc.data_dir, f"SELECT COUNT(*) AS n FROM `{PROJECT}.{ds}.t`")[0]["n"] if state != "missing" else 0
    op = api.export_and_wait(loaded, {"bigqueryDestination": _dest(uri, mode)})
    want = MATRIX[(state, mode)]
    n = query(hc.data_dir, f"SELECT COUNT(*) AS n FROM `{PROJECT}.{ds}.t`")[0]["n"]
    if want == "error":
        assert op["error"]["code"] in (6, 9), op
        assert "bq://" in op["error"]["message"]
        assert "response" not in op
        assert n == before  # nothing half-written
    else:
        assert "error" not in op, op
        assert n == want


def test_write_disposition_and_force_both_set_force_is_ignored(api, hc, loaded):
    ds = bq_dataset(hc.data_dir)
    uri = f"bq://{PROJECT}.{ds}.t"
    api.export_and_wait(loaded, {"bigqueryDestination": {"tableUri": uri}})
    op = api.export_and_wait(loaded, {"bigqueryDestination": {"tableUri": uri, "force": False,
                                                              "writeDisposition": "WRITE_APPEND"}})
    assert "error" not in op
    assert query(hc.data_dir, f"SELECT COUNT(*) AS n FROM `{PROJECT}.{ds}.t`")[0]["n"] == 6


def test_append_widens_the_schema(api, hc, tmp_path):
    ds = bq_dataset(hc.data_dir)
    uri = f"bq://{PROJECT}.{ds}.t"
    store = api.store()
    api.stow(store, [dicom_files.with_uids(dicom_files.path("CT_small.dcm"), tmp_path / "ct.dcm")])
    api.export_and_wait(store, {"bigqueryDestination": {"tableUri": uri}})
    cols = set(query(hc.data_dir, f"SELECT * FROM `{PROJECT}.{ds}.t`")[0])
    assert "EchoTime" not in cols
    store2 = api.store()
    api.stow(store2, [dicom_files.with_uids(dicom_files.path("MR_small.dcm"), tmp_path / "mr.dcm")])
    op = api.export_and_wait(store2, {"bigqueryDestination": {"tableUri": uri, "writeDisposition": "WRITE_APPEND"}})
    assert "error" not in op, op
    rows = query(hc.data_dir, f"SELECT Modality, EchoTime FROM `{PROJECT}.{ds}.t` ORDER BY Modality")
    assert rows == [{"Modality": "CT", "EchoTime": None}, {"Modality": "MR", "EchoTime": rows[1]["EchoTime"]}]
    assert rows[1]["EchoTime"] is not None


def test_missing_bigquery_dataset_fails_the_operation(api, loaded):
    op = api.export_and_wait(loaded, {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.no_such_ds.t"}})
    assert op["error"]["code"] == 5
    assert "no_such_ds" in op["error"]["message"]


def test_cross_project_destination(api, hc, loaded):
    cli(hc.data_dir, "bq", "mk", "other-project.analytics")
    op = api.export_and_wait(loaded, {"bigqueryDestination": {"tableUri": "bq://other-project.analytics.x",
                                                              "writeDisposition": "WRITE_TRUNCATE"}})
    assert "error" not in op
    assert query(hc.data_dir, "SELECT COUNT(*) AS n FROM `other-project.analytics.x`")[0]["n"] == 3


def test_include_source_store_and_schema_json(api, hc, loaded):
    ds = bq_dataset(hc.data_dir)
    api.export_and_wait(loaded, {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.{ds}.flat",
                                                         "includeSourceStore": True}})
    rows = query(hc.data_dir, f"SELECT DISTINCT SourceDicomStore FROM `{PROJECT}.{ds}.flat`")
    assert rows == [{"SourceDicomStore": loaded}]
    api.export_and_wait(loaded, {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.{ds}.js", "schemaJson": {}}})
    rows = query(hc.data_dir, f"SELECT * FROM `{PROJECT}.{ds}.js` ORDER BY SOPInstanceUID")
    assert len(rows) == 3
    assert {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Metadata", "DroppedTags",
            "StorageClass", "LastUpdated", "Type"} <= set(rows[0])
    meta = rows[0]["Metadata"]
    meta = json.loads(meta) if isinstance(meta, str) else meta
    assert "7FE00010" not in json.dumps(meta).upper()  # no pixel data


@pytest.mark.parametrize("dest, needle", [
    ({"tableUri": "not-a-uri"}, "bq://"),
    ({"tableUri": "bq://proj-1.ds"}, "bq://PROJECT.DATASET.TABLE"),
    ({"tableUri": "bq://Bad_Project.ds.t"}, "project"),
    ({"tableUri": "bq://proj-1.bad-ds.t"}, "dataset"),
    ({"tableUri": "bq://proj-1.ds.bad$table"}, "table"),
    ({"tableUri": "bq://proj-1.ds.t", "writeDisposition": "WRITE_SOMETIMES"}, "write_disposition"),
    ({"tableUri": "bq://proj-1.ds.t", "force": "yes"}, "TYPE_BOOL"),
    ({"tableUri": "bq://proj-1.ds.t", "tableURI": "x"}, 'Unknown name "tableURI"'),
    ({"tableUri": "bq://proj-1.ds.t", "schemaJson": {}, "schemaFlattened": {}}, "schemaJson"),
])
def test_bad_export_requests_are_400_naming_the_field(api, loaded, dest, needle):
    r = api.export(loaded, {"bigqueryDestination": dest})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert needle in r.json()["error"]["message"]


def test_export_request_errors(api, loaded):
    r = api.export(loaded, {})
    assert r.status_code == 400 and "bigqueryDestination" in r.json()["error"]["message"]
    r = api.export(loaded, {"bigqueryDestination": {"tableUri": "bq://proj-1.d.t"}, "unknownField": 1})
    assert r.status_code == 400 and 'Unknown name "unknownField"' in r.json()["error"]["message"]
    r = api.export(loaded, {"bigqueryDestination": {"tableUri": "bq://proj-1.d.t"},
                            "filterConfig": {"resourcePathsGcsUri": "/local/path.txt"}})
    assert r.status_code == 400 and "gs://" in r.json()["error"]["message"]
    r = api.export(loaded.rsplit("/", 1)[0] + "/nope", {"bigqueryDestination": {"tableUri": "bq://proj-1.d.t"}})
    assert r.status_code == 404
    # the v1beta1 surface takes the same request and reports its own version
    beta = HC(api.base, version="v1beta1")
    r = beta.export(loaded, {"bigqueryDestination": {"tableUri": "bq://proj-1.d.t"}})
    assert r.status_code == 200
    assert r.json()["metadata"]["@type"] == "type.googleapis.com/google.cloud.healthcare.v1beta1.OperationMetadata"
    assert r.json()["metadata"]["apiMethodName"] == \
        "google.cloud.healthcare.v1beta1.dicom.DicomService.ExportDicomData_bq"


# -- filter files -----------------------------------------------------------------------------------------
@pytest.fixture
def bucket(gcs_client):
    return gcs_client.create_bucket(unique("filters"))


def _filtered(api, hc, store, bucket, text: str | bytes, table="t"):
    ds = bq_dataset(hc.data_dir)
    blob = bucket.blob(unique("filter") + ".txt")
    blob.upload_from_string(text)
    op = api.export_and_wait(store, {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.{ds}.{table}"},
                                     "filterConfig": {"resourcePathsGcsUri": f"gs://{bucket.name}/{blob.name}"}})
    return ds, op


@pytest.mark.parametrize("lines, want", [
    (["/studies/1.2.826.0.1.3680043.8.498.2"], ["211"]),
    (["/studies/1.2.826.0.1.3680043.8.498.1/series/1.2.826.0.1.3680043.8.498.11"], ["111", "112"]),
    (["/studies/1.2.826.0.1.3680043.8.498.1/series/1.2.826.0.1.3680043.8.498.11/instances/1.2.826.0.1.3680043.8.498.112"],
     ["112"]),
    # overlapping lines export an instance once; blank lines and CRLF are fine
    (["/studies/1.2.826.0.1.3680043.8.498.1", "",
      "/studies/1.2.826.0.1.3680043.8.498.1/series/1.2.826.0.1.3680043.8.498.11/instances/1.2.826.0.1.3680043.8.498.111",
      "/studies/1.2.826.0.1.3680043.8.498.2", ""], ["111", "112", "211"]),
])
def test_filter_file_selects_study_series_instance(api, hc, loaded, bucket, lines, want):
    ds, op = _filtered(api, hc, loaded, bucket, "\r\n".join(lines))
    assert "error" not in op, op
    got = query(hc.data_dir, f"SELECT SOPInstanceUID FROM `{PROJECT}.{ds}.t` ORDER BY 1")
    assert [r["SOPInstanceUID"].rsplit(".", 1)[1] for r in got] == want
    assert op["metadata"]["counter"] == {"success": str(len(want))}


def test_filter_paths_naming_nothing_are_counted_and_logged(api, hc, loaded, bucket):
    ds, op = _filtered(api, hc, loaded, bucket,
                       "/studies/1.2.826.0.1.3680043.8.498.2\n/studies/9.9.9\n/studies/1.2.826.0.1.3680043.8.498.1"
                       "/series/1.2.826.0.1.3680043.8.498.11/instances/9.9\n")
    assert "error" not in op
    assert op["metadata"]["counter"] == {"success": "1", "failure": "2"}
    import requests
    logs = requests.get(op["metadata"]["logsUrl"]).json()
    assert logs["operation"] == op["name"]
    messages = [e["jsonPayload"]["error"]["message"] for e in logs["entries"]]
    assert len(messages) == 2 and all("matches no instance" in m for m in messages)
    assert any("/studies/9.9.9" in m for m in messages)


def test_bad_filter_files_fail_the_operation(api, hc, loaded, bucket):
    _, op = _filtered(api, hc, loaded, bucket, "/studies/1.2\nnot a path\n")
    assert op["error"]["code"] == 3 and "line 2" in op["error"]["message"]
    _, op = _filtered(api, hc, loaded, bucket, b"\xff\xfe/studies/1")
    assert op["error"]["code"] == 3 and "UTF-8" in op["error"]["message"]
    ds = bq_dataset(hc.data_dir)
    op = api.export_and_wait(loaded, {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.{ds}.t"},
                                      "filterConfig": {"resourcePathsGcsUri": f"gs://{bucket.name}/missing.txt"}})
    assert op["error"]["code"] == 5 and f"gs://{bucket.name}/missing.txt" in op["error"]["message"]
    op = api.export_and_wait(loaded, {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.{ds}.t"},
                                      "filterConfig": {"resourcePathsGcsUri": "gs://no-such-bucket-x/f.txt"}})
    assert op["error"]["code"] == 5


# -- cancel and restart: an emulator of their own --------------------------------------------------------
def test_cancel_a_running_export_leaves_the_table_as_it_was(logs_dir, tmp_path, three):
    svc = procs.healthcare_emulator(logs_dir, tmp_path / "data", "--export-rate", "2", name="hc-slow").start()
    try:
        api = HC(svc.url)
        store = api.store()
        api.stow(store, three)
        cli(tmp_path / "data", "bq", "mk", f"{PROJECT}.ds")
        started = api.export(store, {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.ds.t"}}).json()
        running = api.get(started["name"]).json()
        assert not running.get("done")
        assert api.post(f"{started['name']}:cancel", json={}).json() == {}
        op = api.wait(started["name"])
        assert op["error"]["code"] == 1
        assert op["metadata"]["cancelRequested"] is True
        assert "response" not in op
        r = cli(tmp_path / "data", "query", f"SELECT COUNT(*) FROM `{PROJECT}.ds.t`", check=False)
        assert r.returncode != 0 and "Not found" in r.stderr  # the table was never created
        # cancelling a finished operation changes nothing
        assert api.post(f"{started['name']}:cancel", json={}).status_code == 200
        assert api.get(started["name"]).json() == op
    finally:
        svc.stop()


def test_state_survives_a_restart(logs_dir, tmp_path, three):
    data = tmp_path / "data"
    svc = procs.healthcare_emulator(logs_dir, data, name="hc-restart").start()
    api = HC(svc.url)
    store = api.store(body={"labels": {"k": "v"}})
    api.stow(store, three)
    cli(data, "bq", "mk", f"{PROJECT}.ds")
    op = api.export_and_wait(store, {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.ds.t"}})
    svc.stop()
    svc = procs.healthcare_emulator(logs_dir, data, name="hc-restart2").start()
    try:
        api = HC(svc.url)
        assert api.get(store).json()["labels"] == {"k": "v"}
        assert api.get(op["name"]).json() == op
        r = api.get(f"{store}/dicomWeb/instances")
        assert r.status_code == 200 and len(r.json()) == 3
        assert query(data, f"SELECT COUNT(*) AS n FROM `{PROJECT}.ds.t`")[0]["n"] == 3
    finally:
        svc.stop()


def test_exporting_an_empty_store_succeeds_with_zero_rows(api, hc):
    ds = bq_dataset(hc.data_dir)
    op = api.export_and_wait(api.store(), {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.{ds}.empty"}})
    assert "error" not in op and op["metadata"]["counter"] == {"success": "0"}
    assert query(hc.data_dir, f"SELECT COUNT(*) AS n FROM `{PROJECT}.{ds}.empty`") == [{"n": 0}]
