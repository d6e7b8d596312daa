"""Reconcile: does a route's table hold exactly its store? The pure decisions of handlers/reconcile.py.

A run compares a window of the store's studies (QIDO-RS `/studies` with NumberOfStudyRelatedInstances,
from the route's cursor) with the table's per-study counts (`COUNT(*)`, `COUNT(DISTINCT SOPInstanceUID)`),
then the series of the studies that differ (NumberOfSeriesRelatedInstances against per-series counts), then
lists instances only for the series that differ. Studies the table has and the store does not are
extra as a whole. The instances found missing, extra or duplicated are healed through ingest: each is
recorded as a change of the route (a store for missing and duplicated ones, a deletion for extra ones), so
the next batch deletes their rows and exports what the store has (handlers/core/changes.py).

Work per run is bounded: at most `max_studies` studies compared and `max_instances` instances listed; the
cursor (kept in Firestore) says where the next run goes on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable

from .changes import table_sql_name

TABLE_RECONCILED = "TABLE_RECONCILED"
UID_LIST_CHUNK = 100  # study UIDs per QIDO UID-list query (a URL well under 8 KiB)


@dataclass(frozen=True)
class Cursor:
    """Where the next run starts: the QIDO offset of the next study of the store, and the last table study
    checked for absence from the store (for stores too large for one run)."""
    offset: int = 0
    table_after: str = ""
    passes: int = 0

    @classmethod
    def of(cls, doc: dict[str, Any] | None) -> Cursor:
        c = (doc or {}).get("cursor") or {}
        return cls(int(c.get("offset") or 0), str(c.get("tableAfter") or ""), int(c.get("passes") or 0))

    def fields(self) -> dict[str, Any]:
        return {"offset": self.offset, "tableAfter": self.table_after, "passes": self.passes}


# -- BigQuery statements ------------------------------------------------------------------------------------
def study_counts_sql(table_uri: str, *, only_studies: bool) -> str:
    """Per-study row and instance counts (of the studies in @studies, or of every study)."""
    where = " WHERE StudyInstanceUID IN UNNEST(@studies)" if only_studies else ""
    return (f"SELECT StudyInstanceUID, COUNT(*) AS n_rows, COUNT(DISTINCT SOPInstanceUID) AS n_instances "
            f"FROM {table_sql_name(table_uri)}{where} GROUP BY 1")


def series_counts_sql(table_uri: str) -> str:
    """Per-series row and instance counts of the studies in @studies."""
    return ("SELECT SeriesInstanceUID, COUNT(*) AS n_rows, COUNT(DISTINCT SOPInstanceUID) AS n_instances "
            f"FROM {table_sql_name(table_uri)} WHERE StudyInstanceUID IN UNNEST(@studies) GROUP BY 1")


def instance_rows_sql(table_uri: str) -> str:
    """Each instance of the series in @series and the studies in @studies with its number of rows."""
    return ("SELECT StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, COUNT(*) AS n "
            f"FROM {table_sql_name(table_uri)} WHERE SeriesInstanceUID IN UNNEST(@series) "
            "OR StudyInstanceUID IN UNNEST(@studies) GROUP BY 1, 2, 3")


def missing_columns(schema_fields: Iterable[dict[str, Any]]) -> list[str]:
    """The columns reconcile needs that the table's schema lacks."""
    names = {f.get("name") for f in schema_fields}
    return [c for c in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if c not in names]


# -- study level ----------------------------------------------------------------------------------------------
def differing(store: dict[str, int], table: dict[str, tuple[int, int]]) -> list[str]:
    """Studies (or series) of the store, in its order, whose table counts are not (n rows, n instances)."""
    return [s for s, n in store.items() if table.get(s, (0, 0)) != (n, n)]


def absence_candidates(table: dict[str, tuple[int, int]], window: set[str], after: str, limit: int) -> list[str]:
    """Table studies outside the store window to look up in the store: in UID order after `after`."""
    return sorted(s for s in table if s not in window and s > after)[:limit]


def chunks(items: list[str], size: int = UID_LIST_CHUNK) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


@dataclass(frozen=True)
class Work:
    """The differing studies this run lists instances of, and the cursor for the next run."""
    studies: list[str]
    cursor: Cursor
    complete: bool  # the run reached the end of the store


def plan_work(cursor: Cursor, window: list[str], store: dict[str, int], diff_studies: list[str], *, end: bool,
              max_instances: int) -> Work:
    """Take differing studies in window order while their instances fit `max_instances` (at least one);
    the next run starts at the first study not taken, or after the window (0 at the end of the store)."""
    taken: list[str] = []
    used = 0
    for s in diff_studies:
        n = store.get(s, 0)
        if taken and used + n > max_instances:
            return Work(taken, Cursor(cursor.offset + window.index(s), cursor.table_after, cursor.passes), False)
        taken.append(s)
        used += n
    if end:
        return Work(taken, Cursor(0, cursor.table_after, cursor.passes + 1), True)
    return Work(taken, Cursor(cursor.offset + len(window), cursor.table_after, cursor.passes), False)


# -- instance level -------------------------------------------------------------------------------------------
def instance_path(study: str, series: str, sop: str) -> str:
    return f"/studies/{study}/series/{series}/instances/{sop}"


@dataclass(frozen=True)
class Diff:
    missing: tuple[str, ...] = ()     # in the store, no row
    extra: tuple[str, ...] = ()       # rows of an instance the store does not have
    duplicated: tuple[str, ...] = ()  # in the store, more than one row


def diff(store_paths: Iterable[str], table_rows: Iterable[tuple[str, int]]) -> Diff:
    """Compare the instance paths of the store with the table's (path, number of rows)."""
    store = set(store_paths)
    rows: dict[str, int] = {}
    for path, n in table_rows:
        rows[path] = rows.get(path, 0) + n
    return Diff(missing=tuple(sorted(store - set(rows))),
                extra=tuple(sorted(set(rows) - store)),
                duplicated=tuple(sorted(p for p, n in rows.items() if n > 1 and p in store)))


def heals(d: Diff) -> list[tuple[str, bool]]:
    """The changes that heal `d`: (path, deleted). Missing and duplicated instances are stored again (their
    rows are deleted and the instance exported once); extra ones are deleted."""
    return sorted([(p, False) for p in (*d.missing, *d.duplicated)] + [(p, True) for p in d.extra])


# -- the report -------------------------------------------------------------------------------------------------
@dataclass
class Report:
    studies_compared: int = 0
    studies_differing: int = 0
    missing: int = 0
    extra: int = 0
    duplicated: int = 0
    healed: int = 0
    api_calls: int = 0
    complete: bool = False
    dry_run: bool = False
    extra_studies: list[str] = field(default_factory=list)

    def add(self, d: Diff) -> None:
        self.missing += len(d.missing)
        self.extra += len(d.extra)
        self.duplicated += len(d.duplicated)

    def counts(self) -> dict[str, Any]:
        return {"studiesCompared": self.studies_compared, "studiesDiffering": self.studies_differing,
                "instancesMissing": self.missing, "instancesExtra": self.extra,
                "instancesDuplicated": self.duplicated, "healed": self.healed, "apiCalls": self.api_calls,
                "passComplete": self.complete, "dryRun": self.dry_run}


def event(run_id: str, store: str, table_uri: str, report: Report, cursor: Cursor, at: datetime) -> dict[str, Any]:
    """{"eventId", "data", "attributes"} of the run's TABLE_RECONCILED event (docs/contract.md, "Events")."""
    eid = f"{run_id}:{TABLE_RECONCILED}"
    data = {"eventId": eid, "eventType": TABLE_RECONCILED, "runId": run_id, "dicomStore": store,
            "tableUri": table_uri, **report.counts(), "cursor": cursor.fields(),
            "time": at.isoformat().replace("+00:00", "Z")}
    attributes = {"eventType": TABLE_RECONCILED, "eventId": eid, "dicomStore": store, "tableUri": table_uri}
    return {"eventId": eid, "data": data, "attributes": {k: v for k, v in attributes.items() if len(v) <= 1024}}
