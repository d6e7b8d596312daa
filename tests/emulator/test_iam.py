"""IAM in the emulator, through Google's own clients: Resource Manager v1 (projects.get, getIamPolicy,
setIamPolicy) with google-api-python-client's discovery client, BigQuery dataset access entries with
google-cloud-bigquery, and `--enforce-iam` on the export."""
from __future__ import annotations

import pytest
import requests

from healthcare_emulator import iam
from tests.support import dicom_files, procs
from tests.support.hcapi import HC, unique

STORE_PROJECT = "iam-store-proj"
DEST_PROJECT = "iam-dest-proj"
AGENT = iam.service_agent(iam.project_number(STORE_PROJECT))


@pytest.fixture(scope="module")
def enforcing(logs_dir, tmp_path_factory):
    svc = procs.healthcare_emulator(logs_dir, tmp_path_factory.mktemp("hc-iam"), "--enforce-iam",
                                    name="healthcare-emulator-iam")
    svc.start()
    yield svc
    svc.stop()


def crm(url: str, discovery: bool = False):
    from google.oauth2.credentials import Credentials
    from googleapiclient import discovery as d
    if discovery:  # the discovery document the emulator serves
        return d.build("cloudresourcemanager", "v1", credentials=Credentials("dummy-token"), cache_discovery=False,
                       static_discovery=False,
                       discoveryServiceUrl=f"{url}/discovery/v1/apis/cloudresourcemanager/v1/rest")
    return d.build("cloudresourcemanager", "v1", client_options={"api_endpoint": url + "/"},
                   credentials=Credentials("dummy-token"), cache_discovery=False, static_discovery=True)


def bq(url: str, project: str):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery
    return bigquery.Client(project=project, credentials=AnonymousCredentials(), client_options={"api_endpoint": url})


def grant(url: str, project: str, role: str, member: str) -> dict:
    svc = crm(url)
    policy = svc.projects().getIamPolicy(resource=project, body={}).execute()
    policy.setdefault("bindings", []).append({"role": role, "members": [member]})
    return svc.projects().setIamPolicy(resource=project, body={"policy": policy}).execute()


def test_projects_get_gives_a_deterministic_number(hc):
    for discovery in (False, True):
        p = crm(hc.url, discovery).projects().get(projectId=STORE_PROJECT).execute()
        assert p["projectId"] == STORE_PROJECT and p["lifecycleState"] == "ACTIVE"
        assert p["projectNumber"] == iam.project_number(STORE_PROJECT)


def test_get_and_set_iam_policy_with_etags(hc):
    svc = crm(hc.url, discovery=True)
    project = unique("pol-proj")[:30]
    empty = svc.projects().getIamPolicy(resource=project, body={"options": {"requestedPolicyVersion": 3}}).execute()
    assert empty == {"version": 1, "etag": "ACAB"}
    binding = {"role": "roles/bigquery.jobUser", "members": [f"serviceAccount:{AGENT}"]}
    first = svc.projects().setIamPolicy(resource=project, body={"policy": {**empty, "bindings": [binding]},
                                                                 "updateMask": "bindings,etag"}).execute()
    assert first["bindings"] == [binding] and first["etag"] not in ("ACAB", "") and first["version"] == 1
    assert svc.projects().getIamPolicy(resource=project, body={}).execute() == first
    from googleapiclient.errors import HttpError
    with pytest.raises(HttpError) as e:  # a stale etag: someone changed it since
        svc.projects().setIamPolicy(resource=project, body={"policy": {**empty, "bindings": []}}).execute()
    assert e.value.resp.status == 409
    assert svc.projects().getIamPolicy(resource=project, body={}).execute() == first


@pytest.mark.parametrize("policy, field", [
    ({"bindings": [{"role": "bigquery.jobUser", "members": ["serviceAccount:a@b.c"]}]}, "policy.bindings[0].role"),
    ({"bindings": [{"role": "roles/owner", "members": ["a@b.c"]}]}, "policy.bindings[0].members[0]"),
    ({"bindings": "all"}, "policy.bindings"),
])
def test_a_malformed_policy_is_a_400_naming_the_field(hc, policy, field):
    r = requests.post(f"{hc.url}/v1/projects/{STORE_PROJECT}:setIamPolicy", json={"policy": policy}, timeout=10)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["status"] == "INVALID_ARGUMENT" and field in err["message"]
    assert err["details"][0]["fieldViolations"][0]["field"] == field


def test_dataset_access_entries_round_trip_through_google_cloud_bigquery(hc):
    from google.cloud.bigquery import AccessEntry, Dataset
    client = bq(hc.url, DEST_PROJECT)
    ds = client.create_dataset(Dataset(f"{DEST_PROJECT}.{unique('acc').replace('-', '_')}"))
    assert {(e.role, e.entity_type, e.entity_id) for e in ds.access_entries} == {
        ("WRITER", "specialGroup", "projectWriters"), ("OWNER", "specialGroup", "projectOwners"),
        ("READER", "specialGroup", "projectReaders")}
    entries = list(ds.access_entries) + [AccessEntry("WRITER", "userByEmail", AGENT),
                                         AccessEntry("READER", "iamMember", "group:readers@example.com")]
    ds.access_entries = entries
    updated = client.update_dataset(ds, ["access_entries"])  # PATCH with If-Match: the etag just read
    again = client.get_dataset(ds.reference)
    assert [e.to_api_repr() for e in again.access_entries] == [e.to_api_repr() for e in entries]
    assert updated.etag == again.etag != ds.etag
    ds.access_entries = entries[:1]  # a stale etag is refused, nothing changes
    from google.api_core.exceptions import PreconditionFailed
    with pytest.raises(PreconditionFailed):
        client.update_dataset(ds, ["access_entries"])
    assert len(client.get_dataset(ds.reference).access_entries) == len(entries)


def test_a_malformed_access_entry_is_a_400_naming_the_field(hc):
    client = bq(hc.url, DEST_PROJECT)
    ds = client.create_dataset(f"{DEST_PROJECT}.{unique('bad').replace('-', '_')}")
    url = f"{hc.url}/bigquery/v2/projects/{DEST_PROJECT}/datasets/{ds.dataset_id}"
    r = requests.patch(url, json={"access": [{"role": "WRITER", "userByEmail": AGENT},
                                             {"role": "SUPERUSER", "userByEmail": AGENT}]}, timeout=10)
    assert r.status_code == 400, r.text
    assert "access[1].role" in r.json()["error"]["message"]
    assert r.json()["error"]["errors"][0]["location"] == "access[1].role"


# -- --enforce-iam ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(enforcing, tmp_path_factory):
    api = HC(enforcing.url, project=STORE_PROJECT)
    s = api.store()
    f = dicom_files.with_uids(dicom_files.path("CT_small.dcm"), tmp_path_factory.mktemp("iam-dcm") / "a.dcm",
                              study="1.2.826.0.1.3680043.8.498.71", series="1.2.826.0.1.3680043.8.498.711",
                              sop="1.2.826.0.1.3680043.8.498.7111")
    assert api.stow(s, [f]).status_code == 200
    return api, s


def test_without_the_grants_the_export_fails_with_permission_denied(enforcing, store):
    api, s = store
    dataset = unique("deny").replace("-", "_")
    bq(enforcing.url, DEST_PROJECT).create_dataset(f"{DEST_PROJECT}.{dataset}")
    table = f"bq://{DEST_PROJECT}.{dataset}.dicom"
    op = api.export_and_wait(s, {"bigqueryDestination": {"tableUri": table}})
    assert op["error"]["code"] == 7
    msg = op["error"]["message"]
    assert AGENT in msg and "bigquery.tables.create" in msg and f"projects/{DEST_PROJECT}/datasets/{dataset}" in msg
    logs = requests.get(op["metadata"]["logsUrl"], timeout=10).json()["entries"]
    assert [(e["severity"], e["jsonPayload"]["error"]) for e in logs] == [("ERROR", {"code": 7, "message": msg})]
    assert list(bq(enforcing.url, DEST_PROJECT).list_tables(f"{DEST_PROJECT}.{dataset}")) == []  # nothing written


def test_dataset_write_alone_still_lacks_jobs_create_then_both_grants_let_it_through(enforcing, store):
    from google.cloud.bigquery import AccessEntry
    api, s = store
    client = bq(enforcing.url, DEST_PROJECT)
    ds = client.create_dataset(f"{DEST_PROJECT}.{unique('grant').replace('-', '_')}")
    ds.access_entries = list(ds.access_entries) + [AccessEntry("WRITER", "userByEmail", AGENT)]
    client.update_dataset(ds, ["access_entries"])
    table = f"bq://{DEST_PROJECT}.{ds.dataset_id}.dicom"
    op = api.export_and_wait(s, {"bigqueryDestination": {"tableUri": table}})
    assert op["error"]["code"] == 7 and "bigquery.jobs.create" in op["error"]["message"]
    assert f"projects/{DEST_PROJECT}" in op["error"]["message"]
    grant(enforcing.url, DEST_PROJECT, "roles/bigquery.jobUser", f"serviceAccount:{AGENT}")
    op = api.export_and_wait(s, {"bigqueryDestination": {"tableUri": table}})
    assert "error" not in op, op
    assert client.get_table(f"{DEST_PROJECT}.{ds.dataset_id}.dicom").num_rows == 1


def test_the_store_projects_own_grants_do_not_reach_another_project(enforcing, store):
    api, s = store
    grant(enforcing.url, STORE_PROJECT, "roles/owner", f"serviceAccount:{AGENT}")
    other = "iam-other-proj"
    dataset = unique("x").replace("-", "_")
    bq(enforcing.url, other).create_dataset(f"{other}.{dataset}")
    op = api.export_and_wait(s, {"bigqueryDestination": {"tableUri": f"bq://{other}.{dataset}.t"}})
    assert op["error"]["code"] == 7 and f"projects/{other}/datasets/{dataset}" in op["error"]["message"]
    op = api.export_and_wait(s, {"bigqueryDestination": {"tableUri": f"bq://{STORE_PROJECT}.{dataset}.t"}})
    assert op["error"]["code"] == 5  # the store's project has no such dataset: NOT_FOUND comes first


def test_without_the_flag_nothing_is_enforced(hc, tmp_path):
    api = HC(hc.url, project=STORE_PROJECT)
    s = api.store()
    dataset = unique("free").replace("-", "_")
    bq(hc.url, DEST_PROJECT).create_dataset(f"{DEST_PROJECT}.{dataset}")
    op = api.export_and_wait(s, {"bigqueryDestination": {"tableUri": f"bq://{DEST_PROJECT}.{dataset}.t"}})
    assert "error" not in op, op
