"""Google's own clients, unchanged, pointed at the running emulator.

Each client is configured with nothing but the endpoint (and a dummy token where it insists on one),
exactly as the README's "Use it with your tools" recipes say:

- the gcloud CLI (GA, beta and alpha tracks);
- google-api-python-client, built from its bundled discovery documents (v1 and v1beta1);
- dicomweb-client;
- the bq CLI (`--api`), and google-cloud-bigquery (`client_options={"api_endpoint": ...}`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pydicom
import pytest

from tests.support import dicom_files, procs
from tests.support.hcapi import HC, unique

PROJECT = "clients-proj"
LOCATION = "us-central1"
STUDY1, SERIES1 = "1.2.826.0.1.3680043.8.498.31", "1.2.826.0.1.3680043.8.498.311"
STUDY2, SERIES2 = "1.2.826.0.1.3680043.8.498.32", "1.2.826.0.1.3680043.8.498.321"
SOPS = ["1.2.826.0.1.3680043.8.498.3111", "1.2.826.0.1.3680043.8.498.3112", "1.2.826.0.1.3680043.8.498.3211"]

SEED_Q1 = """SELECT CONCAT('/dicomWeb/studies/', StudyInstanceUID, '/series/', SeriesInstanceUID,
              '/instances/', SOPInstanceUID) as DICOMwebPath
FROM `{table}`
WHERE PatientID = '19045';"""
SEED_Q2 = """SELECT MIN(CONCAT(StudyDate, ' ', StudyTime)) as StudyDateTime, MIN(PatientID) as PatientID,
       StudyInstanceUID, COUNT(*) as InstanceCount
FROM `{table}` AS dicom
GROUP BY StudyInstanceUID
ORDER BY StudyDateTime DESC
LIMIT 10;"""


# -- shared data -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Two CT instances of one series (patient 19045) and one MR instance of another study."""
    d = tmp_path_factory.mktemp("clients-files")
    a = dicom_files.with_uids(dicom_files.path("CT_small.dcm"), d / "a.dcm", study=STUDY1, series=SERIES1,
                              sop=SOPS[0], PatientID="19045")
    b = dicom_files.with_uids(dicom_files.path("CT_small.dcm"), d / "b.dcm", study=STUDY1, series=SERIES1,
                              sop=SOPS[1], PatientID="19045")
    c = dicom_files.with_uids(dicom_files.path("MR_small.dcm"), d / "c.dcm", study=STUDY2, series=SERIES2,
                              sop=SOPS[2], PatientID="other")
    return [a, b, c]


@pytest.fixture(scope="module")
def api(hc):
    return HC(hc.url, project=PROJECT, location=LOCATION)


@pytest.fixture(scope="module")
def loaded(api, three):
    store = api.store()
    r = api.stow(store, three)
    assert r.status_code == 200, r.text
    return store


@pytest.fixture(scope="module")
def slow_hc(logs_dir, tmp_path_factory):
    """An emulator in slow-export mode (one instance per 5 s), so an export can be cancelled mid-flight."""
    svc = procs.healthcare_emulator(logs_dir, tmp_path_factory.mktemp("hc-slow-clients"), "--export-rate", "0.2",
                                    name="healthcare-emulator-slow-clients")
    svc.start()
    bq_client(svc.url).create_dataset("slow_ds")
    yield svc
    svc.stop()


def bq_client(url: str):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery
    return bigquery.Client(project=PROJECT, credentials=AnonymousCredentials(), client_options={"api_endpoint": url})


@pytest.fixture(scope="module")
def bigquery_client(hc):
    return bq_client(hc.url)


@pytest.fixture(scope="module")
def exported(api, loaded, bigquery_client):
    """A BigQuery dataset made through google-cloud-bigquery, and the store exported into it."""
    ds = unique("clients").replace("-", "_")
    bigquery_client.create_dataset(ds)
    op = api.export_and_wait(loaded, {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.{ds}.dicom"}})
    assert "error" not in op, op
    return f"{PROJECT}.{ds}.dicom"


# -- gcloud ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gcloud_env(hc, tmp_path_factory):
    assert shutil.which("gcloud"), "gcloud is not on PATH"
    d = tmp_path_factory.mktemp("gcloud")
    token = d / "token"
    token.write_text("dummy-token\n")
    (d / "config").mkdir()
    return {**os.environ,
            "CLOUDSDK_CONFIG": str(d / "config"),
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_HEALTHCARE": hc.url + "/",
            "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE": str(token),
            "CLOUDSDK_CORE_PROJECT": PROJECT,
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
            "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
            "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true"}


def run(env, *argv, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def said(r: subprocess.CompletedProcess) -> str:
    """stdout + stderr with line wrapping undone (bq wraps its messages at 80 columns)."""
    return " ".join((r.stdout + r.stderr).split())


def gcloud(env, *args, track=(), **kw):
    return run(env, "gcloud", *track, "healthcare", *args, f"--location={LOCATION}", **kw)


def op_name_in(text: str) -> str:
    m = re.search(r"(projects/[^\]\s]+/operations/\d+)", text)
    assert m, text
    return m.group(1)


def count_rows(bigquery_client, table: str) -> int:
    return bigquery_client.get_table(table).num_rows


def test_gcloud_creates_exports_with_every_flag_and_reports_operations(gcloud_env, api, three, bigquery_client,
                                                                      gcs_client):
    env = gcloud_env
    ds_id, store_id = unique("gds"), unique("gst")
    r = gcloud(env, "datasets", "create", ds_id)
    assert r.returncode == 0, r.stderr
    assert f"Created dataset [{ds_id}]." in r.stderr
    r = gcloud(env, "dicom-stores", "create", store_id, f"--dataset={ds_id}")
    assert r.returncode == 0, r.stderr
    assert f"Created dicomStore [{store_id}]." in r.stderr
    store = f"projects/{PROJECT}/locations/{LOCATION}/datasets/{ds_id}/dicomStores/{store_id}"
    assert api.stow(store, three).status_code == 200

    bq_ds = unique("gcloud").replace("-", "_")
    bigquery_client.create_dataset(bq_ds)
    table = f"{PROJECT}.{bq_ds}.t"
    export = ("dicom-stores", "export", "bq", store_id, f"--dataset={ds_id}", f"--bq-table=bq://{table}")

    # Plain export: waits, prints the store, exit 0.
    r = gcloud(env, *export)
    assert r.returncode == 0, r.stderr
    assert f"Request issued for: [{store_id}]" in r.stderr
    first = op_name_in(r.stderr)
    assert first.startswith(f"projects/{PROJECT}/locations/{LOCATION}/datasets/{ds_id}/operations/")
    assert f"Waiting for operation [{first}] to complete...\n" in r.stderr and "done." in r.stderr
    assert f"name: {store}" in r.stdout
    assert count_rows(bigquery_client, table) == 3

    # write-empty on a table with rows: the operation fails; gcloud prints its error, exit 1.
    r = gcloud(env, *export, "--write-disposition=write-empty")
    assert r.returncode == 1, r.stderr
    assert "failed." in r.stderr
    assert "ERROR: (gcloud.healthcare.dicom-stores.export.bq) {" in r.stderr
    assert '"code": 9' in r.stderr and f"bq://{table}" in r.stderr
    assert count_rows(bigquery_client, table) == 3

    r = gcloud(env, *export, "--write-disposition=write-append")
    assert r.returncode == 0, r.stderr
    assert count_rows(bigquery_client, table) == 6
    r = gcloud(env, *export, "--write-disposition=write-truncate")
    assert r.returncode == 0, r.stderr
    assert count_rows(bigquery_client, table) == 3
    r = gcloud(env, *export, "--write-disposition=WRITE_APPEND")  # gcloud itself rejects the API spelling
    assert r.returncode == 2 and "Invalid choice" in r.stderr

    # --overwrite-table (force) and --async: the operation is printed and not waited for.
    r = gcloud(env, *export, "--overwrite-table", "--async")
    assert r.returncode == 0, r.stderr
    async_op = op_name_in(r.stderr)
    assert f"Check operation [{async_op}] for status." in r.stderr
    assert "done: true" not in r.stdout
    assert "error" not in api.wait(async_op)
    assert count_rows(bigquery_client, table) == 3

    # operations describe / list
    r = gcloud(env, "operations", "describe", async_op.rsplit("/", 1)[1], f"--dataset={ds_id}", "--format=json")
    assert r.returncode == 0, r.stderr
    described = json.loads(r.stdout)
    assert described["name"] == async_op and described["done"] is True
    assert described["metadata"]["counter"] == {"success": "3"}
    r = gcloud(env, "operations", "list", f"--dataset={ds_id}", "--format=value(name)")
    assert r.returncode == 0, r.stderr
    listed = r.stdout.split()
    assert first.rsplit("/", 1)[1] in " ".join(listed) and async_op.rsplit("/", 1)[1] in " ".join(listed)

    # beta: --filter-config-gcs-uri, read from the GCS emulator; a missing object fails with its name.
    bucket = gcs_client.create_bucket(unique("filters"))
    bucket.blob("one-study.txt").upload_from_string(f"/studies/{STUDY1}\n")
    beta_table = f"{PROJECT}.{bq_ds}.filtered"
    r = gcloud(env, "dicom-stores", "export", "bq", store_id, f"--dataset={ds_id}", f"--bq-table=bq://{beta_table}",
               f"--filter-config-gcs-uri=gs://{bucket.name}/one-study.txt", track=("beta",))
    assert r.returncode == 0, r.stderr
    assert "done." in r.stderr
    rows = list(bigquery_client.query_and_wait(f"SELECT SOPInstanceUID FROM `{beta_table}` ORDER BY 1"))
    assert [row.SOPInstanceUID for row in rows] == SOPS[:2]
    r = gcloud(env, "dicom-stores", "export", "bq", store_id, f"--dataset={ds_id}", f"--bq-table=bq://{beta_table}",
               f"--filter-config-gcs-uri=gs://{bucket.name}/missing.txt", "--write-disposition=write-truncate",
               track=("beta",))
    assert r.returncode == 1
    assert "ERROR: (gcloud.beta.healthcare.dicom-stores.export.bq)" in r.stderr
    assert f"gs://{bucket.name}/missing.txt" in r.stderr and '"code": 5' in r.stderr

    # An HTTP error is printed as STATUS: message, exit 1.
    r = gcloud(env, "dicom-stores", "export", "bq", "no-such-store", f"--dataset={ds_id}", f"--bq-table=bq://{table}")
    assert r.returncode == 1
    assert "ERROR: (gcloud.healthcare.dicom-stores.export.bq) NOT_FOUND:" in r.stderr


def test_gcloud_alpha_cancels_a_running_export(slow_hc, gcloud_env, three):
    env = {**gcloud_env, "CLOUDSDK_API_ENDPOINT_OVERRIDES_HEALTHCARE": slow_hc.url + "/"}
    api = HC(slow_hc.url, project=PROJECT, location=LOCATION)
    store = api.store()
    assert api.stow(store, three).status_code == 200
    ds_id, store_id = store.split("/")[5], store.split("/")[7]
    r = gcloud(env, "dicom-stores", "export", "bq", store_id, f"--dataset={ds_id}",
               f"--bq-table=bq://{PROJECT}.slow_ds.t", "--async")
    assert r.returncode == 0, r.stderr
    op = op_name_in(r.stderr)
    r = gcloud(env, "operations", "cancel", op.rsplit("/", 1)[1], f"--dataset={ds_id}", track=("alpha",))
    assert r.returncode == 0, r.stderr
    done = api.wait(op)
    assert done["error"]["code"] == 1
    assert done["metadata"].get("cancelRequested") is True
    r = gcloud(env, "operations", "describe", op.rsplit("/", 1)[1], f"--dataset={ds_id}", "--format=json")
    assert json.loads(r.stdout)["error"]["code"] == 1


# -- google-api-python-client ---------------------------------------------------------------------------
def discovery_client(url: str, version: str):
    from google.oauth2.credentials import Credentials
    from googleapiclient import discovery
    return discovery.build("healthcare", version, client_options={"api_endpoint": url + "/"},
                           credentials=Credentials("dummy-token"), cache_discovery=False, static_discovery=True)


def test_discovery_client_v1_creates_exports_and_reads_operations(hc, three, bigquery_client):
    svc = discovery_client(hc.url, "v1")
    parent = f"projects/{PROJECT}/locations/{LOCATION}"
    ds_id, store_id = unique("dcds"), unique("dcst")
    created = svc.projects().locations().datasets().create(parent=parent, datasetId=ds_id, body={}).execute()
    assert created["done"] is True and created["response"]["name"] == f"{parent}/datasets/{ds_id}"
    dataset = f"{parent}/datasets/{ds_id}"
    stores = svc.projects().locations().datasets().dicomStores()
    store = stores.create(parent=dataset, dicomStoreId=store_id, body={"labels": {"team": "radiology"}}).execute()
    assert store == {"name": f"{dataset}/dicomStores/{store_id}", "labels": {"team": "radiology"}}
    assert HC(hc.url, project=PROJECT).stow(store["name"], three).status_code == 200

    bq_ds = unique("disc").replace("-", "_")
    bigquery_client.create_dataset(bq_ds)
    op = stores.export(name=store["name"], body={"bigqueryDestination": {
        "tableUri": f"bq://{PROJECT}.{bq_ds}.t", "writeDisposition": "WRITE_TRUNCATE"}}).execute()
    assert op["name"].startswith(f"{dataset}/operations/")
    HC(hc.url).wait(op["name"])
    ops = svc.projects().locations().datasets().operations()
    got = ops.get(name=op["name"]).execute()
    assert got["done"] is True and got["response"] == {"@type": "type.googleapis.com/google.protobuf.Empty"}
    assert got["metadata"]["counter"] == {"success": "3"}
    listed = ops.list(name=dataset).execute()
    assert op["name"] in [o["name"] for o in listed["operations"]]
    assert ops.cancel(name=op["name"], body={}).execute() == {}  # cancelling a finished operation: no-op
    assert bigquery_client.get_table(f"{PROJECT}.{bq_ds}.t").num_rows == 3

    from googleapiclient.errors import HttpError
    with pytest.raises(HttpError) as e:
        stores.export(name=store["name"], body={"bigqueryDestination": {"tableUri": "not-a-uri"}}).execute()
    assert e.value.resp.status == 400 and "bq://" in str(e.value)


def test_discovery_client_v1beta1_filter_export_and_cancel(hc, slow_hc, three, bigquery_client, gcs_client):
    svc = discovery_client(hc.url, "v1beta1")
    api = HC(hc.url, version="v1beta1", project=PROJECT)
    store = api.store()
    assert api.stow(store, three).status_code == 200
    bucket = gcs_client.create_bucket(unique("beta-filters"))
    bucket.blob("f.txt").upload_from_string(f"/studies/{STUDY2}/series/{SERIES2}/instances/{SOPS[2]}\n")
    bq_ds = unique("beta").replace("-", "_")
    bigquery_client.create_dataset(bq_ds)
    stores = svc.projects().locations().datasets().dicomStores()
    op = stores.export(name=store, body={
        "bigqueryDestination": {"tableUri": f"bq://{PROJECT}.{bq_ds}.t", "writeDisposition": "WRITE_EMPTY"},
        "filterConfig": {"resourcePathsGcsUri": f"gs://{bucket.name}/f.txt"}}).execute()
    assert op["metadata"]["@type"] == "type.googleapis.com/google.cloud.healthcare.v1beta1.OperationMetadata"
    api.wait(op["name"])
    done = svc.projects().locations().datasets().operations().get(name=op["name"]).execute()
    assert "error" not in done and done["metadata"]["counter"] == {"success": "1"}
    assert [r.SOPInstanceUID for r in bigquery_client.list_rows(f"{PROJECT}.{bq_ds}.t")] == [SOPS[2]]

    # cancel, on the slow emulator, through the same client code
    slow = discovery_client(slow_hc.url, "v1beta1")
    slow_api = HC(slow_hc.url, version="v1beta1", project=PROJECT)
    slow_store = slow_api.store()
    assert slow_api.stow(slow_store, three).status_code == 200
    running = slow.projects().locations().datasets().dicomStores().export(name=slow_store, body={
        "bigqueryDestination": {"tableUri": f"bq://{PROJECT}.slow_ds.beta"}}).execute()
    ops = slow.projects().locations().datasets().operations()
    assert ops.cancel(name=running["name"], body={}).execute() == {}
    slow_api.wait(running["name"])
    assert ops.get(name=running["name"]).execute()["error"]["code"] == 1


# -- dicomweb-client ---------------------------------------------------------------------------------------
def test_dicomweb_client_stores_searches_and_retrieves(hc, api, three):
    from dicomweb_client.api import DICOMwebClient
    store = api.store()
    client = DICOMwebClient(url=f"{hc.url}/v1/{store}/dicomWeb", headers={"Authorization": "Bearer dummy-token"})
    datasets = [pydicom.dcmread(p) for p in three]
    response = client.store_instances(datasets=datasets)
    stored = [item.ReferencedSOPInstanceUID for item in response.ReferencedSOPSequence]
    assert sorted(stored) == SOPS
    assert "FailedSOPSequence" not in response

    studies = client.search_for_studies()
    assert sorted(s["0020000D"]["Value"][0] for s in studies) == [STUDY1, STUDY2]
    series = client.search_for_series(study_instance_uid=STUDY1)
    assert [s["0020000E"]["Value"][0] for s in series] == [SERIES1]
    instances = client.search_for_instances(study_instance_uid=STUDY1, series_instance_uid=SERIES1)
    assert sorted(i["00080018"]["Value"][0] for i in instances) == SOPS[:2]
    assert len(client.search_for_instances(search_filters={"PatientID": "19045"})) == 2

    meta = client.retrieve_instance_metadata(study_instance_uid=STUDY2, series_instance_uid=SERIES2,
                                             sop_instance_uid=SOPS[2])
    assert meta["00080018"]["Value"] == [SOPS[2]]
    assert meta["00080060"]["Value"] == ["MR"]
    ds = client.retrieve_instance(study_instance_uid=STUDY2, series_instance_uid=SERIES2, sop_instance_uid=SOPS[2])
    assert ds.SOPInstanceUID == SOPS[2] and ds.PixelData == datasets[2].PixelData


# -- BigQuery: google-cloud-bigquery ----------------------------------------------------------------------
def test_bigquery_client_datasets_tables_rows_and_the_seed_queries(bigquery_client, exported):
    from google.api_core import exceptions as gexc
    from google.cloud import bigquery

    client = bigquery_client
    project, ds, _ = exported.split(".")
    got = client.get_dataset(f"{project}.{ds}")
    assert got.dataset_id == ds and got.project == project and got.location == "US"
    assert ds in [d.dataset_id for d in client.list_datasets()]
    assert [t.table_id for t in client.list_tables(f"{project}.{ds}")] == ["dicom"]
    with pytest.raises(gexc.Conflict):
        client.create_dataset(ds)
    with pytest.raises(gexc.NotFound):
        client.get_dataset(f"{project}.no_such_dataset")

    table = client.get_table(exported)
    assert table.num_rows == 3
    fields = {f.name: f for f in table.schema}
    assert (fields["SOPInstanceUID"].field_type, fields["SOPInstanceUID"].mode) == ("STRING", "NULLABLE")
    assert (fields["ImageType"].field_type, fields["ImageType"].mode) == ("STRING", "REPEATED")
    assert (fields["StudyDate"].field_type, fields["StudyTime"].field_type) == ("DATE", "TIME")
    assert fields["Rows"].field_type == "INTEGER"
    pn = fields["PatientName"]
    assert (pn.field_type, pn.mode) == ("RECORD", "NULLABLE")
    alphabetic = {f.name: f for f in pn.fields}["Alphabetic"]
    assert alphabetic.field_type == "RECORD"
    assert {"FamilyName", "GivenName"} <= {f.name for f in alphabetic.fields}

    rows = list(client.list_rows(table, page_size=2))  # two pages
    assert sorted(r["SOPInstanceUID"] for r in rows) == SOPS
    ct = next(r for r in rows if r["SOPInstanceUID"] == SOPS[0])
    import datetime
    assert ct["StudyDate"] == datetime.date(2004, 1, 19) and ct["StudyTime"] == datetime.time(7, 27, 30)
    assert isinstance(ct["Rows"], int) and isinstance(ct["ImageType"], list)
    assert isinstance(ct["PatientName"], dict) and "Alphabetic" in ct["PatientName"]

    # The seed's two queries, through query_and_wait (jobs.query) and query().result() (jobs.insert).
    q1 = client.query_and_wait(SEED_Q1.format(table=exported))
    assert [f.name for f in q1.schema] == ["DICOMwebPath"]
    assert sorted(r.DICOMwebPath for r in q1) == [
        f"/dicomWeb/studies/{STUDY1}/series/{SERIES1}/instances/{SOPS[0]}",
        f"/dicomWeb/studies/{STUDY1}/series/{SERIES1}/instances/{SOPS[1]}"]
    job = client.query(SEED_Q2.format(table=exported))
    result = job.result()
    assert job.state == "DONE" and job.error_result is None
    assert [f.name for f in result.schema] == ["StudyDateTime", "PatientID", "StudyInstanceUID", "InstanceCount"]
    rows2 = [dict(r) for r in result]
    by_study = {r["StudyInstanceUID"]: r for r in rows2}
    assert by_study[STUDY1] == {"StudyDateTime": "2004-01-19 07:27:30", "PatientID": "19045",
                                "StudyInstanceUID": STUDY1, "InstanceCount": 2}
    assert by_study[STUDY2]["InstanceCount"] == 1
    assert [r["StudyDateTime"] for r in rows2] == sorted((r["StudyDateTime"] for r in rows2), reverse=True)

    # Parameters, typed values, and errors as the client raises them against BigQuery.
    cfg = bigquery.QueryJobConfig(query_parameters=[bigquery.ScalarQueryParameter("pid", "STRING", "19045")])
    n = list(client.query_and_wait(f"SELECT COUNT(*) AS n, CURRENT_TIMESTAMP() AS now FROM `{exported}` "
                                   "WHERE PatientID = @pid", job_config=cfg))
    assert n[0]["n"] == 2 and n[0]["now"].tzinfo is not None
    with pytest.raises(gexc.NotFound):
        client.query_and_wait(f"SELECT 1 FROM `{project}.{ds}.missing`")
    with pytest.raises(gexc.BadRequest):
        client.query(f"SELECT no_such_column FROM `{exported}`").result()


# -- BigQuery: the bq CLI ------------------------------------------------------------------------------------
def test_bq_cli_makes_datasets_shows_tables_and_runs_the_seed_queries(gcloud_env, hc, exported):
    assert shutil.which("bq"), "bq is not on PATH (it ships with gcloud)"
    bq = ("bq", f"--api={hc.url}", f"--project_id={PROJECT}")
    new_ds = unique("bqcli").replace("-", "_")
    r = run(gcloud_env, *bq, "mk", "--dataset", f"{PROJECT}:{new_ds}")
    assert r.returncode == 0, r.stderr + r.stdout
    assert f"Dataset '{PROJECT}:{new_ds}' successfully created." in r.stdout
    r = run(gcloud_env, *bq, "mk", "--dataset", f"{PROJECT}:{new_ds}")
    assert r.returncode == 1 and f"Dataset '{PROJECT}:{new_ds}' already exists." in said(r)
    r = run(gcloud_env, *bq, "ls", "--format=json")
    assert r.returncode == 0, r.stderr
    assert new_ds in [d["datasetReference"]["datasetId"] for d in json.loads(r.stdout)]

    project, ds, table = exported.split(".")
    r = run(gcloud_env, *bq, "show", "--format=json", f"{project}:{ds}.{table}")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["numRows"] == "3"
    pn = next(f for f in shown["schema"]["fields"] if f["name"] == "PatientName")
    assert pn["type"] == "RECORD" and pn["mode"] == "NULLABLE"

    r = run(gcloud_env, *bq, "head", "--format=json", "-n", "10", f"{project}:{ds}.{table}")
    assert r.returncode == 0, r.stderr
    assert sorted(row["SOPInstanceUID"] for row in json.loads(r.stdout)) == SOPS

    r = run(gcloud_env, *bq, "query", "--nouse_legacy_sql", "--format=json", SEED_Q1.format(table=exported))
    assert r.returncode == 0, r.stderr + r.stdout
    assert sorted(row["DICOMwebPath"] for row in json.loads(r.stdout)) == [
        f"/dicomWeb/studies/{STUDY1}/series/{SERIES1}/instances/{SOPS[0]}",
        f"/dicomWeb/studies/{STUDY1}/series/{SERIES1}/instances/{SOPS[1]}"]
    r = run(gcloud_env, *bq, "query", "--nouse_legacy_sql", "--format=json", SEED_Q2.format(table=exported))
    assert r.returncode == 0, r.stderr + r.stdout
    rows = json.loads(r.stdout)
    assert sorted(rows[0]) == sorted(["StudyDateTime", "PatientID", "StudyInstanceUID", "InstanceCount"])
    assert {"StudyDateTime": "2004-01-19 07:27:30", "PatientID": "19045", "StudyInstanceUID": STUDY1,
            "InstanceCount": "2"} in rows  # bq prints INTEGER values as strings, as against BigQuery

    r = run(gcloud_env, *bq, "query", "--nouse_legacy_sql", f"SELECT no_such_column FROM `{exported}`")
    assert r.returncode != 0
    assert "Error in query string: Error processing job" in said(r) and "no_such_column" in said(r)
