"""dicomStores.import from Cloud Storage (fake-gcs-server), through gcloud, the discovery client and REST.

The session's `hc` emulator reads gs:// objects from the session's `gcs` (fake-gcs-server). Every wait is
the emulator's `/emulator/wait/{operation}` (a condition with a deadline) or a poll with a deadline, never a sleep.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pydicom
import pytest
import requests

from tests.support import dicom_files
from tests.support.hcapi import HC, unique

PROJECT = "import-proj"
LOCATION = "us-central1"


@pytest.fixture(scope="module")
def api(hc):
    return HC(hc.url, project=PROJECT)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """Four instances: two studies; ct/mr in one, us/rt in another; fresh UIDs."""
    d = tmp_path_factory.mktemp("import-files")
    out = {}
    for name, src in (("ct", "CT_small.dcm"), ("mr", "MR_small.dcm"), ("rt", "rtplan.dcm"), ("us", "JPEG2000.dcm")):
        out[name] = dicom_files.with_uids(dicom_files.path(src), d / f"{name}.dcm")
    return out


def upload(bucket, name: str, path_or_bytes) -> None:
    blob = bucket.blob(name)
    if isinstance(path_or_bytes, bytes):
        blob.upload_from_string(path_or_bytes)
    else:
        blob.upload_from_filename(str(path_or_bytes))


def sop_of(path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def sops_in(api: HC, store: str) -> set[str]:
    r = api.get(f"{store}/dicomWeb/instances", params={"includefield": "00080018"})
    if r.status_code == 204:
        return set()
    assert r.status_code == 200, r.text
    return {i["00080018"]["Value"][0] for i in r.json()}


def import_and_wait(api: HC, store: str, uri: str) -> dict:
    r = api.post(f"{store}:import", json={"gcsSource": {"uri": uri}})
    assert r.status_code == 200, r.text
    op = r.json()
    assert op["metadata"]["apiMethodName"] == "google.cloud.healthcare.v1.dicom.DicomService.ImportDicomData"
    assert op["metadata"]["logsUrl"].endswith(f"/logs/{op['name']}")
    return api.wait(op["name"])


def logs_of(op: dict) -> list[dict]:
    r = requests.get(op["metadata"]["logsUrl"], timeout=30)
    r.raise_for_status()
    return r.json()["entries"]


def test_import_wildcards_count_failures_and_log_them_by_uri(api, gcs_client, four):
    bucket = gcs_client.create_bucket(unique("imp"))
    upload(bucket, "a/ct.dcm", four["ct"])
    upload(bucket, "a/mr.dcm", four["mr"])
    upload(bucket, "a/notes.txt", b"not DICOM at all")
    upload(bucket, "a/deep/rt.dcm", four["rt"])
    upload(bucket, "b/us.dcm", four["us"])
    store = api.store()

    # '*' does not cross '/': a/ct.dcm, a/mr.dcm and a/notes.txt (a failure), not a/deep/rt.dcm.
    op = import_and_wait(api, store, f"gs://{bucket.name}/a/*")
    assert "error" not in op, op
    assert op["response"]["@type"].endswith("ImportDicomDataResponse")
    assert op["metadata"]["counter"] == {"success": "2", "failure": "1"}
    assert sops_in(api, store) == {sop_of(four["ct"]), sop_of(four["mr"])}
    entries = logs_of(op)
    assert [e["jsonPayload"]["gcsSource"] for e in entries] == [f"gs://{bucket.name}/a/notes.txt"]
    assert entries[0]["severity"] == "ERROR" and "not a valid DICOM" in entries[0]["jsonPayload"]["error"]["message"]

    # '**.dcm' crosses '/': the two already stored are failures (kept, never overwritten), rt is new.
    op = import_and_wait(api, store, f"gs://{bucket.name}/a/**.dcm")
    assert op["metadata"]["counter"] == {"success": "1", "failure": "2"}
    assert sops_in(api, store) == {sop_of(four[k]) for k in ("ct", "mr", "rt")}
    failed = sorted(e["jsonPayload"]["gcsSource"] for e in logs_of(op))
    assert failed == [f"gs://{bucket.name}/a/ct.dcm", f"gs://{bucket.name}/a/mr.dcm"]
    assert all(e["jsonPayload"]["error"]["code"] == 6 and "already exists" in e["jsonPayload"]["error"]["message"]
               for e in logs_of(op))

    # '?' is one character; a plain object name imports that object.
    op = import_and_wait(api, store, f"gs://{bucket.name}/?/us.dcm")
    assert op["metadata"]["counter"] == {"success": "1"}
    other = api.store()
    op = import_and_wait(api, other, f"gs://{bucket.name}/b/us.dcm")
    assert op["metadata"]["counter"] == {"success": "1"} and sops_in(api, other) == {sop_of(four["us"])}

    # The imported bytes are the object's bytes.
    sop = sop_of(four["us"])
    ds = pydicom.dcmread(four["us"], stop_before_pixels=True)
    r = api.get(f"{other}/dicomWeb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{sop}",
                headers={"Accept": "application/dicom"})
    assert r.status_code == 200 and r.content == four["us"].read_bytes()


def test_import_bad_input_is_a_clear_error_and_leaves_the_store_unchanged(api, gcs_client, four):
    bucket = gcs_client.create_bucket(unique("imp-bad"))
    upload(bucket, "x/ct.dcm", four["ct"])
    store = api.store()
    for body, words in (
            ({"gcsSource": {"uri": "https://storage.googleapis.com/b/o"}}, "gs://BUCKET/OBJECT"),
            ({"gcsSource": {"uri": "gs://bucket-only"}}, "gs://BUCKET/OBJECT"),
            ({"gcsSource": {"uri": "gs://Bad_Bucket!/x"}}, "invalid bucket name"),
            ({"gcsSource": {"uri": f"gs://{bucket.name}/x/**/y.dcm"}}, "'**' must be at the end"),
            ({"gcsSource": {"uri": f"gs://{bucket.name}/*/**"}}, "'**' must be at the end"),
            ({"gcsSource": {}}, "gcs_source.uri is required"),
            ({}, "gcsSource is required"),
            ({"gcsSource": {"uri": "gs://b/o", "mimeType": "x"}}, 'Unknown name "mimeType"')):
        r = api.post(f"{store}:import", json=body)
        assert r.status_code == 400, (body, r.text)
        assert words in r.json()["error"]["message"], (body, r.text)
    r = api.post(f"{store}:import", json={"gcsSource": {"uri": "gs://b/o"}, "blobStorageSettings": {
        "blobStorageClass": "HOT"}})
    assert r.status_code == 400 and "blob_storage_settings.blob_storage_class" in r.text

    missing = unique("no-such-bucket")
    op = import_and_wait(api, store, f"gs://{missing}/x/*.dcm")
    assert op["error"]["code"] == 5 and f"gs://{missing}/x/*.dcm" in op["error"]["message"], op
    op = import_and_wait(api, store, f"gs://{missing}/x/ct.dcm")
    assert op["error"]["code"] == 5 and f"gs://{missing}/x/ct.dcm" in op["error"]["message"], op
    op = import_and_wait(api, store, f"gs://{bucket.name}/nothing/*.dcm")
    assert op["error"]["code"] == 5 and "No object matches" in op["error"]["message"], op
    op = import_and_wait(api, store, f"gs://{bucket.name}/x/missing.dcm")
    assert op["error"]["code"] == 5 and op["metadata"]["counter"] == {"success": "0"}
    assert sops_in(api, store) == set()
    r = api.post(f"{store.rsplit('/', 1)[0]}/nostore:import", json={"gcsSource": {"uri": "gs://b/o"}})
    assert r.status_code == 404


# -- gcloud ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gcloud_env(hc, tmp_path_factory):
    assert shutil.which("gcloud"), "gcloud is not on PATH"
    d = tmp_path_factory.mktemp("gcloud-import")
    token = d / "token"
    token.write_text("dummy-token\n")
    (d / "config").mkdir()
    return {**os.environ, "CLOUDSDK_CONFIG": str(d / "config"),
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_HEALTHCARE": hc.url + "/",
            "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE": str(token), "CLOUDSDK_CORE_PROJECT": PROJECT,
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1", "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
            "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true"}


def gcloud(env, *args):
    return subprocess.run(["gcloud", "healthcare", *args, f"--location={LOCATION}"], env=env, capture_output=True,
                          text=True, timeout=240, stdin=subprocess.DEVNULL)


def test_gcloud_imports_from_gcs(gcloud_env, api, gcs_client, four):
    bucket = gcs_client.create_bucket(unique("imp-gcloud"))
    upload(bucket, "dir/ct.dcm", four["ct"])
    upload(bucket, "dir/sub/mr.dcm", four["mr"])
    ds_id, store_id = unique("gds"), unique("gst")
    assert gcloud(gcloud_env, "datasets", "create", ds_id).returncode == 0
    assert gcloud(gcloud_env, "dicom-stores", "create", store_id, f"--dataset={ds_id}").returncode == 0
    r = gcloud(gcloud_env, "dicom-stores", "import", "gcs", store_id, f"--dataset={ds_id}",
               f"--gcs-uri=gs://{bucket.name}/dir/**")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Waiting for operation" in r.stderr and "done" in r.stderr
    store = f"projects/{PROJECT}/locations/{LOCATION}/datasets/{ds_id}/dicomStores/{store_id}"
    assert sops_in(api, store) == {sop_of(four["ct"]), sop_of(four["mr"])}

    r = gcloud(gcloud_env, "dicom-stores", "import", "gcs", store_id, f"--dataset={ds_id}",
               f"--gcs-uri=gs://{unique('gone')}/dir/*")
    assert r.returncode == 1 and "NOT_FOUND" not in r.stdout and '"code": 5' in r.stderr.replace("'", '"'), r.stderr
    r = gcloud(gcloud_env, "dicom-stores", "import", "gcs", store_id, f"--dataset={ds_id}", "--gcs-uri=/local/path")
    assert r.returncode == 1 and "gs://BUCKET/OBJECT" in r.stderr


def test_discovery_client_imports_and_reports_the_operation(hc, api, gcs_client, four):
    from google.oauth2.credentials import Credentials
    from googleapiclient import discovery

    bucket = gcs_client.create_bucket(unique("imp-disc"))
    upload(bucket, "p/rt.dcm", four["rt"])
    upload(bucket, "p/junk.dcm", b"\0" * 200)
    for version in ("v1", "v1beta1"):
        svc = discovery.build("healthcare", version, client_options={"api_endpoint": hc.url + "/"},
                              credentials=Credentials("dummy-token"), cache_discovery=False, static_discovery=True)
        store = HC(hc.url, version=version, project=PROJECT).store()
        stores = svc.projects().locations().datasets().dicomStores()
        op = stores.import_(name=store, body={"gcsSource": {"uri": f"gs://{bucket.name}/p/*.dcm"}}).execute()
        assert op["metadata"]["apiMethodName"] == f"google.cloud.healthcare.{version}.dicom.DicomService." \
                                                  "ImportDicomData"
        api.wait(op["name"])
        got = svc.projects().locations().datasets().operations().get(name=op["name"]).execute()
        assert got["done"] and got["metadata"]["counter"] == {"success": "1", "failure": "1"}, got
        assert got["response"]["@type"] == f"type.googleapis.com/google.cloud.healthcare.{version}.dicom." \
                                           "ImportDicomDataResponse"
        assert sops_in(api, store) == {sop_of(four["rt"])}


@pytest.fixture(scope="module")
def slow_hc(logs_dir, tmp_path_factory, gcs):
    """An emulator in slow mode: 2 files per second, so counters can be read and the import cancelled."""
    from tests.support import procs
    svc = procs.healthcare_emulator(logs_dir, tmp_path_factory.mktemp("hc-slow-import"), "--export-rate", "2",
                                    env={"STORAGE_EMULATOR_HOST": gcs.url}, name="healthcare-emulator-slow-import")
    svc.start()
    yield svc
    svc.stop()


def test_counters_while_it_runs_and_cancel(slow_hc, gcs_client, four):
    api = HC(slow_hc.url, project=PROJECT)
    bucket = gcs_client.create_bucket(unique("imp-slow"))
    for i in range(40):
        upload(bucket, f"many/{i:02d}.dcm", four["ct"] if i == 0 else dicom_files.with_uids(
            four["ct"], four["ct"].parent / f"slow-{i}.dcm"))
    store = api.store()
    r = api.post(f"{store}:import", json={"gcsSource": {"uri": f"gs://{bucket.name}/many/*"}})
    assert r.status_code == 200, r.text
    name = r.json()["name"]

    def running_with_progress():
        op = api.get(name).json()
        c = op["metadata"]["counter"]
        return op if not op.get("done") and int(c.get("success", 0)) >= 2 and int(c.get("pending", 0)) >= 1 else None
    deadline = time.monotonic() + 60
    while (op := running_with_progress()) is None:
        assert time.monotonic() < deadline, api.get(name).json()
        time.sleep(0.1)  # poll interval
    assert api.post(f"{name}:cancel", json={}).status_code == 200
    op = api.wait(name)
    assert op["error"]["code"] == 1, op
    done = int(op["metadata"]["counter"]["success"])
    assert 2 <= done < 40 and "pending" not in op["metadata"]["counter"]
    assert len(sops_in(api, store)) == done  # what was imported before the cancel stays
