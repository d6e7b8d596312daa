"""error.remedy (handlers/core/remedy.py): which failures get one, and the commands for that dataset and agent."""
from __future__ import annotations

import shlex

import pytest

from handlers.core import remedy

STORE = "projects/hc-proj/locations/us-central1/datasets/d/dicomStores/s"
TABLE = "bq://bq-proj.imaging.dicom"
AGENT = "service-123456789012@gcp-sa-healthcare.iam.gserviceaccount.com"
WRITE = (f"bq --project_id=bq-proj add-iam-policy-binding --dataset --member=serviceAccount:{AGENT} "
         "--role=roles/bigquery.dataEditor "
         "bq-proj:imaging")
JOBS = (f"gcloud projects add-iam-policy-binding bq-proj --member=serviceAccount:{AGENT} "
        "--role=roles/bigquery.jobUser --condition=None")


def test_permission_denied_on_the_dataset_grants_both_roles_to_the_store_projects_agent():
    error = {"code": 7, "message": f"Permission denied: {AGENT} does not have bigquery.tables.create ..."}
    assert remedy.build(error, STORE, TABLE, "123456789012") == f"{WRITE} && {JOBS}"


def test_permission_denied_for_jobs_only_grants_job_user():
    error = {"code": 7, "message": "... does not have bigquery.jobs.create permission on project bq-proj"}
    assert remedy.build(error, STORE, TABLE, "123456789012") == JOBS


@pytest.mark.parametrize("message", ["Not found: Dataset bq-proj:imaging", "dataset bq-proj.imaging was not found",
                                     "NOT_FOUND: projects/bq-proj/datasets/imaging (dataset) does not exist"])
def test_a_missing_destination_dataset_is_created_then_granted(message):
    r = remedy.build({"code": 5, "message": message}, STORE, TABLE, "123456789012")
    assert r == f"bq --project_id=bq-proj mk --dataset bq-proj:imaging && {WRITE} && {JOBS}"


@pytest.mark.parametrize("error", [
    {"code": 5, "message": "operation projects/p/locations/l/datasets/d/operations/1 is no longer known"},
    {"code": 5, "message": "Failed to read filter file gs://b/o: the bucket or object does not exist"},
    {"code": 5, "message": "Not found: Dataset other-proj:imaging"},
    {"code": 5, "message": "dataset not found: projects/bq-proj/locations/us/datasets/imaging"},  # Healthcare's
    {"code": 9, "message": "Destination table is not empty"},
    {"code": 1, "message": "Operation was cancelled."},
    None,
])
def test_other_failures_get_none(error):
    assert remedy.build(error, STORE, TABLE, "123456789012") is None


def test_without_the_project_number_the_agent_is_a_command_substitution():
    r = remedy.build({"code": 7, "message": "denied"}, STORE, TABLE, None)
    agent = "service-$(gcloud projects describe hc-proj --format='value(projectNumber)')@gcp-sa-healthcare.iam." \
            "gserviceaccount.com"
    assert r == WRITE.replace(AGENT, agent) + " && " + JOBS.replace(AGENT, agent)
    assert shlex.split(r)  # a shell parses it as it is


def test_a_domain_scoped_destination_project():
    r = remedy.build({"code": 7, "message": "denied"}, STORE, "bq://example.com:bq-proj.imaging.t", "1")
    assert "example.com:bq-proj:imaging" in r and "add-iam-policy-binding example.com:bq-proj " in r


def test_a_refused_export_call_gets_one_only_when_it_is_about_bigquery():
    runtime = {"code": 7, "message": "Permission 'healthcare.dicomStores.export' denied on resource"}
    assert remedy.build(runtime, STORE, TABLE, "123456789012", operation=False) is None
    agent = {"code": 7, "message": f"{AGENT} lacks BigQuery permission bigquery.tables.create"}
    assert remedy.build(agent, STORE, TABLE, "123456789012", operation=False) == f"{WRITE} && {JOBS}"
