"""A batch's changes to its table: which rows it deletes, which instances it exports. Pure.

Every notification of a routed store is one change of one instance: stored (`StoreInstances`,
`ImportDicomData`, or no action) or deleted (`DeleteInstance`, `DeleteSeries`, `DeleteStudy`: the API
notifies each deleted instance, with the action of the call that deleted it). A resource name of a
whole series or study (no `/instances/Z`) is accepted as a deletion of everything under it.

A batch holds a route's oldest changes and applies them under the table lock in two steps
(docs/design.md, "Deletions and replacements"):

  1. one DML job deletes every row of every instance the batch touches, stored or deleted (and every
     row of a series or study deleted whole);
  2. one WRITE_APPEND export of the instances whose last change in the batch is a store.

An export reads the store as it is when it runs, so an instance stored, deleted and stored again ends
with one row, the last version's; one deleted after its store ends with none. Batches of a table run
one at a time in the order they were closed, so a later change of an instance is applied after an
earlier one.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Iterable

from .batches import OTHER as OTHER_STATE
from .batches import PENDING

UID = r"[0-9]{1,64}(?:\.[0-9]{1,64}){0,63}"
RESOURCE_RE = re.compile(
    r"^(projects/[^/\s]+/locations/[^/\s]+/datasets/[^/\s]+/dicomStores/[^/\s]+)"
    rf"/dicomWeb(/studies/({UID})(?:/series/({UID})(?:/instances/({UID}))?)?)$")
STORE_ACTIONS = frozenset({"StoreInstances", "ImportDicomData"})
DELETE_ACTIONS = frozenset({"DeleteInstance", "DeleteSeries", "DeleteStudy"})
ARRIVAL, DELETION, OTHER = "arrival", "deletion", "other"  # kinds of change
MAX_UID_CHARS = 64


@dataclass(frozen=True)
class Resource:
    """A notification's resource: the store, the path under dicomWeb and its UIDs (None above the level)."""
    store: str
    path: str
    study: str
    series: str | None
    sop: str | None


def parse_resource(text: str | None) -> Resource | None:
    """The resource a notification names, or None when it is not a DICOM study, series or instance."""
    m = RESOURCE_RE.match(text or "")
    if not m:
        return None
    store, path, study, series, sop = m.groups()
    if any(u is not None and len(u) > MAX_UID_CHARS for u in (study, series, sop)):
        return None
    return Resource(store, path, study, series, sop)


def kind_of(action: str, resource: Resource) -> str:
    """`arrival` (an instance stored), `deletion`, or `other` (an action this service does not apply)."""
    if action in DELETE_ACTIONS:
        return DELETION
    if (not action or action in STORE_ACTIONS) and resource.sop is not None:
        return ARRIVAL
    return OTHER


def parse_path(path: str) -> tuple[str, str | None, str | None]:
    """(study, series, sop) of `/studies/X[/series/Y[/instances/Z]]` (a path this module accepted)."""
    parts = path.strip("/").split("/")
    return parts[1], parts[3] if len(parts) > 3 else None, parts[5] if len(parts) > 5 else None


@dataclass(frozen=True)
class Change:
    path: str
    deleted: bool
    at: datetime  # when it happened (the notification's publish time): orders the changes of an instance


@dataclass(frozen=True)
class Plan:
    """What a batch does to its table: delete the rows of `sops`, `series` and `studies`, then export
    `export_paths` (instance paths, sorted)."""
    sops: tuple[str, ...]
    series: tuple[str, ...]
    studies: tuple[str, ...]
    export_paths: tuple[str, ...]

    def fields(self) -> dict[str, Any]:
        """The plan as the batch document keeps it."""
        return {"paths": list(self.export_paths), "removals": {
            "sops": list(self.sops), "series": list(self.series), "studies": list(self.studies)}}

    @classmethod
    def of(cls, batch: dict[str, Any]) -> Plan:
        """The plan kept in a batch document (one closed before deletions were applied: its paths only)."""
        r = batch.get("removals")
        paths = tuple(batch.get("paths") or ())
        if not isinstance(r, dict):
            return cls(tuple(sorted({parse_path(p)[2] or "" for p in paths} - {""})), (), (), paths)
        return cls(tuple(r.get("sops") or ()), tuple(r.get("series") or ()), tuple(r.get("studies") or ()), paths)

    @property
    def instances(self) -> int:
        """Instances the batch touches (rows deleted or exported)."""
        return len(set(self.sops) | {parse_path(p)[2] for p in self.export_paths})


def plan(changes: Iterable[Change]) -> Plan:
    """The batch's plan. An instance is exported unless a deletion in the batch that covers it (of itself,
    its series or its study) came after its last store; every instance touched loses its rows first."""
    changes = list(changes)
    last_delete: dict[tuple[str | None, ...], datetime] = {}
    sops: set[str] = set()
    series: set[str] = set()
    studies: set[str] = set()
    for c in changes:
        study, se, sop = parse_path(c.path)
        if c.deleted:
            key = (study, se, sop)
            last_delete[key] = max(c.at, last_delete.get(key, c.at))
            (sops if sop else series if se else studies).add(sop or se or study)
    last_store: dict[str, Change] = {}
    for c in changes:
        if not c.deleted and (c.path not in last_store or c.at >= last_store[c.path].at):
            last_store[c.path] = c
    exported = []
    for path, c in last_store.items():
        study, se, sop = parse_path(path)
        covering = [last_delete.get(k) for k in ((study, None, None), (study, se, None), (study, se, sop))]
        if all(d is None or c.at >= d for d in covering):  # a tie: export (a deleted one only fails)
            exported.append(path)
        sops.add(sop or "")
    sops.discard("")
    return Plan(tuple(sorted(sops)), tuple(sorted(series)), tuple(sorted(studies)), tuple(sorted(exported)))


def table_sql_name(table_uri: str) -> str:
    """`bq://P.D.T` as BigQuery SQL names it: `P.D.T` in backticks (P may be `domain:project`)."""
    return "`" + table_uri.removeprefix("bq://") + "`"


def delete_statement(table_uri: str) -> str:
    """The DML of step 1; its parameters are `parameters(plan)`."""
    return (f"DELETE FROM {table_sql_name(table_uri)} WHERE SOPInstanceUID IN UNNEST(@sops) "
            "OR SeriesInstanceUID IN UNNEST(@series) OR StudyInstanceUID IN UNNEST(@studies)")


def string_array(name: str, values: Iterable[str]) -> dict[str, Any]:
    """A BigQuery ARRAY<STRING> query parameter (REST queryParameters item)."""
    return {"name": name, "parameterType": {"type": "ARRAY", "arrayType": {"type": "STRING"}},
            "parameterValue": {"arrayValues": [{"value": v} for v in values]}}


def parameters(p: Plan) -> list[dict[str, Any]]:
    return [string_array("sops", p.sops), string_array("series", p.series), string_array("studies", p.studies)]


def dml_job_id(ledger: str, batch: dict[str, Any], attempt: int) -> str:
    """The BigQuery job id of a batch attempt's DML: the same for every process that applies it (BigQuery runs
    one job per id), and unique across ledgers and routes re-created with the same batch numbers."""
    salt = hashlib.sha256(f"{ledger}\n{batch['batchId']}\n{batch.get('closedAt')}".encode()).hexdigest()[:12]
    return f"ingest_{batch['batchId']}_a{attempt}_{salt}"


def retry_at(attempt: int, max_attempts: int, base_s: float, now: datetime) -> datetime | None:
    """When attempt `attempt + 1` of a failed batch may start (exponential backoff from `base_s`, at most
    an hour between attempts), or None when `attempt` was the last one allowed."""
    if attempt >= max_attempts:
        return None
    return now + timedelta(seconds=min(base_s * 2 ** (attempt - 1), 3600.0))


def attempt_request_id(batch_id: str, attempt: int) -> str:
    """The export request of a batch's attempt: `ingest-<batch>` first, then `ingest-<batch>-a<N>` (a new
    requestId: the intake keeps a failed request failed)."""
    return f"ingest-{batch_id}" if attempt <= 1 else f"ingest-{batch_id}-a{attempt}"


def arrival_doc(route_fields: dict[str, Any], path: str, kind: str, *, action: str | None, version_id: str | None,
                message_id: str | None, arrived: datetime, recorded: datetime) -> dict[str, Any]:
    """The arrival document of one change of a route (contract.md, "The ingest documents"): stores and
    deletions wait (PENDING) for the route's next batch; other actions are kept only to be counted."""
    return {**route_fields, "path": path, "kind": kind, "state": PENDING if kind in (ARRIVAL, DELETION) else OTHER_STATE,
            "action": action, "versionId": version_id, "messageId": message_id, "arrivedAt": arrived,
            "recordedAt": recorded, "batchId": None}


BATCH_FAILED = "INGEST_BATCH_FAILED"
FAILED_REMEDY = ("The batch's changes are not in the table. Fix the cause, then run reconcile_tables (or wait for its "
                 "next run): it finds the batch's instances missing or extra and heals them through a new batch. "
                 "docs/operations.md, 'A failed batch'.")


def failed_event(batch: dict[str, Any], attempts: int, cause: dict[str, Any], at: datetime) -> dict[str, Any]:
    """{"eventId", "data", "attributes"} of INGEST_BATCH_FAILED (docs/contract.md, "Events"): the batch, the cause
    of its last attempt and the remedy. Names UIDs (its filter file), never patient data."""
    eid = f"{batch['batchId']}:{BATCH_FAILED}"
    data = {"eventId": eid, "eventType": BATCH_FAILED, "ingestBatch": batch["batchId"], "dicomStore": batch["store"],
            "tableUri": batch["tableUri"], "attempts": attempts, "requestIds": [
                attempt_request_id(batch["batchId"], n) for n in range(1, attempts + 1)],
            "instances": batch.get("instances"), "filterUri": batch.get("filterUri"), "cause": cause,
            "remedy": FAILED_REMEDY, "time": at.isoformat().replace("+00:00", "Z")}
    attributes = {"eventType": BATCH_FAILED, "eventId": eid, "ingestBatch": batch["batchId"],
                  "dicomStore": batch["store"], "tableUri": batch["tableUri"]}
    return {"eventId": eid, "data": data, "attributes": {k: v for k, v in attributes.items() if len(v) <= 1024}}
