"""Datasets, DICOM stores and operations on the emulator, over real HTTP."""
from __future__ import annotations

import pytest
import requests

from tests.support import procs
from tests.support.hcapi import HC, unique


@pytest.fixture
def api(hc):
    return HC(hc.url)


def err(r, http, status, needle=""):
    assert r.status_code == http, r.text
    body = r.json()["error"]
    assert body["code"] == http and body["status"] == status
    assert needle in body["message"], body["message"]
    return body


def test_dataset_create_is_a_done_operation_with_the_dataset(api):
    parent = f"projects/{api.project}/locations/{api.location}"
    ds_id = unique("ds")
    r = api.post(f"{parent}/datasets", params={"datasetId": ds_id}, json={"timeZone": "Europe/Paris"})
    assert r.status_code == 200, r.text
    op = r.json()
    assert op["done"] is True
    assert op["name"].startswith(f"{parent}/datasets/{ds_id}/operations/")
    assert op["metadata"]["@type"] == "type.googleapis.com/google.cloud.healthcare.v1.OperationMetadata"
    assert op["response"]["@type"] == "type.googleapis.com/google.cloud.healthcare.v1.Dataset"
    assert op["response"]["name"] == f"{parent}/datasets/{ds_id}"
    got = api.get(f"{parent}/datasets/{ds_id}").json()
    assert got == {"name": f"{parent}/datasets/{ds_id}", "timeZone": "Europe/Paris"}
    names = [d["name"] for d in api.get(f"{parent}/datasets", params={"pageSize": 1000}).json()["datasets"]]
    assert f"{parent}/datasets/{ds_id}" in names
    err(api.post(f"{parent}/datasets", params={"datasetId": ds_id}, json={}), 409, "ALREADY_EXISTS")


def test_dataset_errors(api):
    parent = f"projects/{api.project}/locations/{api.location}"
    err(api.post(f"{parent}/datasets", json={}), 400, "INVALID_ARGUMENT", "datasetId")
    err(api.post(f"{parent}/datasets", params={"datasetId": "a/b"}, json={}), 400, "INVALID_ARGUMENT")
    err(api.post(f"{parent}/datasets", params={"datasetId": ".."}, json={}), 400, "INVALID_ARGUMENT")
    err(api.post(f"{parent}/datasets", params={"datasetId": "x"}, json={"timezone": "UTC"}), 400,
        "INVALID_ARGUMENT", 'Unknown name "timezone"')
    err(api.get(f"{parent}/datasets/{unique('missing')}"), 404, "NOT_FOUND")
    err(api.post(f"{parent}/datasets", params={"datasetId": "y"}, data=b"{not json",
                 headers={"Content-Type": "application/json"}), 400, "INVALID_ARGUMENT", "Invalid JSON payload")


def test_dataset_list_pages(api):
    api.project = unique("pager")
    made = sorted(api.dataset(f"d{i}") for i in range(5))
    parent = f"projects/{api.project}/locations/{api.location}"
    seen, token = [], None
    while True:
        body = api.get(f"{parent}/datasets", params={"pageSize": 2, **({"pageToken": token} if token else {})}).json()
        assert len(body["datasets"]) <= 2
        seen += [d["name"] for d in body["datasets"]]
        token = body.get("nextPageToken")
        if not token:
            break
    assert seen == made
    err(api.get(f"{parent}/datasets", params={"pageToken": "garbage!"}), 400, "INVALID_ARGUMENT", "page token")


def test_store_crud_with_labels_and_notification_configs(api):
    ds = api.dataset()
    body = {"labels": {"team": "radiology"},
            "notificationConfig": {"pubsubTopic": "projects/p/topics/legacy", "sendForBulkImport": True},
            "notificationConfigs": [{"pubsubTopic": "projects/p/topics/new"}],
            "streamConfigs": [{"bigqueryDestination": {"tableUri": "bq://proj-1.ds.stream"}}]}
    r = api.post(f"{ds}/dicomStores", params={"dicomStoreId": "s1"}, json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {"name": f"{ds}/dicomStores/s1", **body}
    assert api.get(f"{ds}/dicomStores/s1").json() == r.json()
    err(api.post(f"{ds}/dicomStores", params={"dicomStoreId": "s1"}, json={}), 409, "ALREADY_EXISTS")

    r = api.http.patch(api.url(f"{ds}/dicomStores/s1"), params={"updateMask": "labels,streamConfigs"},
                       json={"labels": {"team": "cardio", "env": "test"}})
    assert r.status_code == 200, r.text
    patched = r.json()
    assert patched["labels"] == {"team": "cardio", "env": "test"}
    assert "streamConfigs" not in patched  # in the mask but not in the body: cleared
    assert patched["notificationConfigs"] == body["notificationConfigs"]  # not in the mask: kept
    listed = api.get(f"{ds}/dicomStores").json()["dicomStores"]
    assert [s["name"] for s in listed] == [f"{ds}/dicomStores/s1"]
    assert api.http.delete(api.url(f"{ds}/dicomStores/s1")).status_code == 200
    err(api.get(f"{ds}/dicomStores/s1"), 404, "NOT_FOUND")
    err(api.http.delete(api.url(f"{ds}/dicomStores/s1")), 404, "NOT_FOUND")


@pytest.mark.parametrize("body, needle", [
    ({"labels": {"Bad": "x"}}, "label key"),
    ({"labels": {"ok": "Bad Value"}}, "label value"),
    ({"notificationConfig": {"pubsubTopic": "not-a-topic"}}, "Pub/Sub topic"),
    ({"streamConfigs": [{"bigqueryDestination": {"tableUri": "nope"}}]}, "table_uri"),
    ({"notificationConfig": {"pubsubTopic": 5}}, "TYPE_STRING"),
    ({"labels": ["x"]}, "map<string, string>"),
    ({"notification_configs": [{"pubsub_topic": "projects/p/topics/t", "extra": 1}]}, 'Unknown name "extra"'),
])
def test_store_body_errors_name_the_field(api, body, needle):
    ds = api.dataset()
    err(api.post(f"{ds}/dicomStores", params={"dicomStoreId": "s"}, json=body), 400, "INVALID_ARGUMENT", needle)


def test_store_needs_dataset_and_safe_ids(api):
    parent = f"projects/{api.project}/locations/{api.location}"
    err(api.post(f"{parent}/datasets/{unique('none')}/dicomStores", params={"dicomStoreId": "s"}, json={}),
        404, "NOT_FOUND")
    ds = api.dataset()
    for bad in ("..", "a b", "x" * 257, "%2e%2e"):
        err(api.post(f"{ds}/dicomStores", params={"dicomStoreId": bad}, json={}), 400, "INVALID_ARGUMENT")
    # a traversal-like id in the path itself never reaches state
    r = requests.get(f"{api.base}/v1/projects/{api.project}/locations/{api.location}/datasets/..%2F..%2Fetc")
    assert r.status_code in (400, 404)


def test_unknown_route_and_method(api):
    err(api.get("projects/p/locations/l/nothing"), 404, "NOT_FOUND")
    ds = api.dataset()
    r = api.http.put(api.url(ds), json={})
    assert r.status_code == 405 and r.json()["error"]["status"] == "NOT_FOUND"


def test_operations_list_filter_and_pages(api):
    ds = api.dataset()
    store = api.store(ds)
    api.post(f"projects/{api.project}/locations/{api.location}/datasets", params={"datasetId": "unused"}, json={})
    ops = [api.export(store, {"bigqueryDestination": {"tableUri": f"bq://proj-1.missing.t{i}"}}).json()["name"]
           for i in range(3)]
    for name in ops:
        done = api.wait(name)
        assert done["error"]["code"] == 5  # the BigQuery dataset does not exist
    body = api.get(f"{ds}/operations", params={"filter": "done=true", "pageSize": 2}).json()
    assert len(body["operations"]) == 2 and body["nextPageToken"]
    rest = api.get(f"{ds}/operations", params={"filter": "done=true", "pageToken": body["nextPageToken"]}).json()
    names = {o["name"] for o in body["operations"] + rest["operations"]}
    assert set(ops) <= names
    assert api.get(f"{ds}/operations", params={"filter": "done = false"}).json().get("operations", []) == []
    err(api.get(f"{ds}/operations", params={"filter": "metadata.x=1"}), 400, "INVALID_ARGUMENT", "filter")
    err(api.get(f"{ds}/operations/123"), 404, "NOT_FOUND")


def test_token_required_when_configured(logs_dir, tmp_path):
    svc = procs.healthcare_emulator(logs_dir, tmp_path, "--require-token", "s3cret", name="hc-token").start()
    try:
        r = requests.get(f"{svc.url}/v1/projects/p/locations/l/datasets", headers={"Authorization": "Bearer nope"})
        err(r, 401, "UNAUTHENTICATED")
        r = requests.get(f"{svc.url}/v1/projects/p/locations/l/datasets", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
    finally:
        svc.stop()
