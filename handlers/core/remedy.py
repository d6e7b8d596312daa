"""The remedy of an export that failed for want of BigQuery grants (docs/contract.md, "Events": `error.remedy`).
Pure: built only when an export has failed, so nothing here is imported at cold start.

An export runs as the Cloud Healthcare Service Agent of the store's project,
service-PROJECT_NUMBER@gcp-sa-healthcare.iam.gserviceaccount.com. When it fails with PERMISSION_DENIED (7), or
NOT_FOUND (5) naming the destination dataset, the remedy is the command that fixes it for that dataset and that
agent: the dataset created (NOT_FOUND), roles/bigquery.dataEditor on the dataset, roles/bigquery.jobUser on its
project (only the latter when the message names bigquery.jobs.create). Without the project number the agent is
written `service-$(gcloud projects describe PROJECT --format='value(projectNumber)')@...`: still a command a
shell runs as it is.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

AGENT_DOMAIN = "gcp-sa-healthcare.iam.gserviceaccount.com"
PERMISSION_DENIED, NOT_FOUND = 7, 5
TABLE_URI = re.compile(r"^bq://(.+)\.([A-Za-z0-9_]+)\.[^.]+$")
STORE_PROJECT = re.compile(r"^projects/([^/]+)/")


def service_agent(store_project: str, number: str | None) -> str:
    if number:
        return f"service-{number}@{AGENT_DOMAIN}"
    return f"service-$(gcloud projects describe {store_project} --format='value(projectNumber)')@{AGENT_DOMAIN}"


def destination(table_uri: Any) -> tuple[str, str] | None:
    """(project, dataset) of bq://PROJECT.DATASET.TABLE."""
    m = TABLE_URI.match(table_uri) if isinstance(table_uri, str) else None
    return (m.group(1), m.group(2)) if m else None


def store_project(store: Any) -> str | None:
    m = STORE_PROJECT.match(store) if isinstance(store, str) else None
    return m.group(1) if m else None


def applies(error: Mapping[str, Any] | None, table_uri: Any, *, operation: bool = True) -> bool:
    """Does this failure call for a remedy: PERMISSION_DENIED, or NOT_FOUND naming the destination dataset?
    `operation`: the export's operation failed (it ran as the service agent). A refused export *call* (the
    intake's) is the runtime account's unless its message is about BigQuery."""
    dest = destination(table_uri)
    if not error or dest is None:
        return False
    code, message = error.get("code"), str(error.get("message") or "")
    if code == PERMISSION_DENIED:
        return operation or "bigquery" in message.lower()
    project, dataset = dest
    return code == NOT_FOUND and re.search(r"\bdataset\b", message, re.I) is not None and any(
        ref in message for ref in (f"{project}:{dataset}", f"{project}.{dataset}", f"projects/{project}/datasets/{dataset}"))


def build(error: Mapping[str, Any] | None, store: Any, table_uri: Any, number: str | None, *,
          operation: bool = True) -> str | None:
    """The command (several joined with &&) that lets the export through, or None when it does not apply."""
    dest = destination(table_uri)
    if error is None or dest is None or not applies(error, table_uri, operation=operation):
        return None
    project, dataset = dest
    agent = service_agent(store_project(store) or "STORE_PROJECT", number)
    member = f"--member=serviceAccount:{agent}"
    create = f"bq --project_id={project} mk --dataset {project}:{dataset}"
    write = (f"bq --project_id={project} add-iam-policy-binding --dataset {member} --role=roles/bigquery.dataEditor "
             f"{project}:{dataset}")
    jobs = f"gcloud projects add-iam-policy-binding {project} {member} --role=roles/bigquery.jobUser --condition=None"
    if error.get("code") == NOT_FOUND:
        return " && ".join((create, write, jobs))
    if "bigquery.jobs.create" in str(error.get("message") or ""):
        return jobs
    return " && ".join((write, jobs))


def with_remedy(error: dict[str, Any], ledger_doc: Mapping[str, Any], number_of: Callable[[str], str | None], *,
                operation: bool = True) -> dict[str, Any]:
    """`error` with its `remedy` when the failure calls for one (the store and table from the ledger document;
    `number_of(project)` asks for a project's number only then), else `error` as it is."""
    request = ledger_doc.get("request") or {}
    store = request.get("dicomStore") or ledger_doc.get("dicomStore")
    table_uri = (request.get("bigqueryDestination") or {}).get("tableUri") or ledger_doc.get("tableUri")
    if not applies(error, table_uri, operation=operation):
        return error
    project = store_project(store)
    text = build(error, store, table_uri, number_of(project) if project else None, operation=operation)
    return {**error, "remedy": text} if text else error
