"""reconcile_tables: find where a routed table differs from its DICOM store, and heal it (docs/design.md,
"Reconcile").

Cloud Scheduler publishes a tick on the reconcile topic; each tick reconciles every route of INGEST_ROUTES:

  1. the table is checked (tables.get): one without SOPInstanceUID (or the other UID columns), or one the
     runtime account cannot read, is refused with an ERROR naming the table and the reason;
  2. a window of the store's studies, from the route's cursor (QIDO-RS /studies with
     NumberOfStudyRelatedInstances, paged), is compared with the table's per-study counts (one query,
     `GROUP BY StudyInstanceUID`); table studies the store does not have are extra;
  3. instances are listed (QIDO-RS, and one query of the table) only for the studies that differ, within
     RECONCILE_MAX_INSTANCES; the cursor says where the next run goes on;
  4. each instance found missing, extra or duplicated is recorded as a change of the route (handlers/
     core/changes.py): the route's next ingest batch deletes its rows and exports what the store has,
     under the table lock like every batch. RECONCILE_DRY_RUN: nothing is recorded;
  5. one TABLE_RECONCILED event per route on the events topic, recorded with the cursor before it is
     published (an unpublished one is published by the next run).
"""
from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import datetime
from typing import Any

import config
from handlers.adapters import logs
from handlers.core import changes as C
from handlers.core import reconcile as R

QIDO_PAGE = 1000  # studies per QIDO-RS page


def handle(cloud_event: Any) -> list[dict[str, Any]]:
    """One tick: every route, one after the other. Never raises: the next tick tries again."""
    from handlers import wiring

    s = wiring.settings()
    if not s.ingest_routes:
        logs.warning("reconcile_tables: INGEST_ROUTES is empty, nothing to reconcile")
        return []
    try:
        deps = wiring.reconcile()
    except Exception as e:  # noqa: BLE001 - e.g. no project: logged, and the tick is acknowledged
        logs.error(f"reconcile_tables cannot start: {type(e).__name__}: {e}")
        return []
    out = []
    for store, table_uri in s.ingest_routes:
        try:
            report = Reconcile(s, *deps).route(store, table_uri)
        except Exception as e:  # noqa: BLE001 - one route's problem must not stop the others
            logs.error("reconcile: the route could not be reconciled this run; the next run tries again",
                       problem=f"{type(e).__name__}: {e}", dicomStore=store, tableUri=table_uri)
            continue
        if report is not None:
            out.append(report.counts())
    return out


class Reconcile:
    def __init__(self, settings: config.Settings, state: Any, ingest: Any, web: Any, bq: Any, events: Any):
        self.s = settings
        self.state, self.ingest, self.web, self.bq, self.events = state, ingest, web, bq, events
        self.run_id = f"reconcile-{uuid.uuid4().hex[:16]}"
        self.calls = 0

    def route(self, store: str, table_uri: str) -> R.Report | None:
        """Reconcile one route; its report, or None when the table was refused."""
        from handlers.core.batches import Route

        route = Route(store, table_uri)
        if not self.table_ok(route):
            return None
        doc = self.state.get(route.key) or {}
        self.publish_recorded(route, doc)
        cursor, t0 = R.Cursor.of(doc), self.state.now()
        report = R.Report(dry_run=self.s.reconcile_dry_run)
        window, end = self.window(store, cursor)
        table = self.table_counts(table_uri)
        diff_studies = R.differing(window, table)
        extra, table_after = self.extra_studies(store, cursor, window, table, whole=cursor.offset == 0 and end)
        work = R.plan_work(cursor, list(window), window, diff_studies, end=end,
                           max_instances=self.s.reconcile_max_instances)
        d = self.instances(store, table_uri, work.studies, extra)
        report.studies_compared, report.studies_differing = len(window), len(diff_studies) + len(extra)
        report.add(d)
        report.complete = work.complete
        if not report.dry_run:
            report.healed = self.heal(route, d, t0)
        report.api_calls = self.calls + self.web.calls
        self.finish(route, report, replace(work.cursor, table_after=table_after))
        return report

    # -- the table ---------------------------------------------------------------------------------------
    def table_ok(self, route: Any) -> bool:
        from handlers.adapters.bigquery import TableError

        try:
            self.calls += 1
            missing = R.missing_columns((self.bq.table(route.table_uri).get("schema") or {}).get("fields") or [])
        except TableError as e:
            return self.refuse(route, f"the runtime account cannot read it ({e})")
        if missing:
            return self.refuse(route, f"it has no {', '.join(missing)} column")
        return True

    def refuse(self, route: Any, reason: str) -> bool:
        logs.error(f"reconcile refused table {route.table_uri}: {reason}", tableUri=route.table_uri,
                   dicomStore=route.store, reconcileOutcome="refused", reason=reason)
        return False

    def table_counts(self, table_uri: str) -> dict[str, tuple[int, int]]:
        r = self.bq.query(R.study_counts_sql(table_uri, only_studies=False))
        self.calls += r.calls
        return {row[0]: (int(row[1]), int(row[2])) for row in r.rows}

    # -- the store -----------------------------------------------------------------------------------------
    def window(self, store: str, cursor: R.Cursor) -> tuple[dict[str, int], bool]:
        """The store's studies from the cursor on, at most RECONCILE_MAX_STUDIES; True when the store ended."""
        out: dict[str, int] = {}
        while len(out) < self.s.reconcile_max_studies:
            limit = min(QIDO_PAGE, self.s.reconcile_max_studies - len(out))
            page = self.web.studies(store, offset=cursor.offset + len(out), limit=limit)
            out.update(page)
            if len(page) < limit:
                return out, True
        return out, False

    def extra_studies(self, store: str, cursor: R.Cursor, window: dict[str, int],
                      table: dict[str, tuple[int, int]], *, whole: bool) -> tuple[list[str], str]:
        """Table studies the store does not have, and the cursor's new `table_after`. When the window was the
        whole store, every other table study; else a slice of them, looked up by UID list."""
        if whole:
            return sorted(set(table) - set(window)), ""
        limit = self.s.reconcile_max_studies
        candidates = R.absence_candidates(table, set(window), cursor.table_after, limit)
        present: set[str] = set()
        for chunk in R.chunks(candidates):
            present.update(uid for uid, _ in self.web.studies(store, offset=0, limit=len(chunk), uids=chunk))
        after = candidates[-1] if len(candidates) == limit else ""
        return [s for s in candidates if s not in present], after

    def instances(self, store: str, table_uri: str, studies: list[str], extra: list[str]) -> R.Diff:
        """The differing series of the differing studies, then their instances (and the rows of extra studies)."""
        if not studies and not extra:
            return R.Diff()
        series = self.differing_series(store, table_uri, studies)
        paths = [R.instance_path(st, se, sop) for se, st in series.items() if st
                 for _, sop in self.web.instances(store, st, se)]
        r = self.bq.query(R.instance_rows_sql(table_uri), [C.string_array("series", list(series)),
                                                           C.string_array("studies", extra)])
        self.calls += r.calls
        return R.diff(paths, [(R.instance_path(st, se, sop), int(n)) for st, se, sop, n in r.rows])

    def differing_series(self, store: str, table_uri: str, studies: list[str]) -> dict[str, str]:
        """{series UID: its study UID, or "" for a series only the table has} of the series that differ."""
        if not studies:
            return {}
        in_store = {se: (st, n) for st in studies for se, n in self.web.series(store, st)}
        r = self.bq.query(R.series_counts_sql(table_uri), [C.string_array("studies", studies)])
        self.calls += r.calls
        table = {row[0]: (int(row[1]), int(row[2])) for row in r.rows}
        out = {se: in_store[se][0] for se in R.differing({se: n for se, (_, n) in in_store.items()}, table)}
        return {**out, **{se: "" for se in table if se not in in_store}}

    # -- healing and the event ---------------------------------------------------------------------------
    def heal(self, route: Any, d: R.Diff, observed: datetime) -> int:
        """Record each heal as a change of the route, dated when the run began observing (so any real change
        after that is applied after it). Returns how many were recorded (or already were)."""
        from handlers.core.batches import arrival_id

        healed = 0
        for path, deleted in R.heals(d):
            kind = C.DELETION if deleted else C.ARRIVAL
            doc = C.arrival_doc(route.fields(), path, kind, action="Reconcile", version_id=None,
                                message_id=None, arrived=observed, recorded=self.state.now())
            self.ingest.record(arrival_id(f"{route.store}/dicomWeb{path}", kind, self.run_id),
                               {**doc, "runId": self.run_id})
            healed += 1
        if healed:
            logs.info("reconcile: heals recorded for the route's next batch", tableUri=route.table_uri,
                      healed=healed, runId=self.run_id)
        return healed

    def finish(self, route: Any, report: R.Report, cursor: R.Cursor) -> None:
        event = R.event(self.run_id, route.store, route.table_uri, report, cursor, self.state.now())
        self.state.save(route.key, {"cursor": cursor.fields(), "lastRunId": self.run_id, "updatedAt": self.state.now(),
                                    f"events.{R.TABLE_RECONCILED}": {**event, "published": False}})
        logs.log("WARNING" if report.missing or report.extra or report.duplicated else "INFO",
                 "table reconciled", tableUri=route.table_uri, dicomStore=route.store, runId=self.run_id,
                 reconcileOutcome="reconciled", **report.counts())
        self.publish(route, event)

    def publish_recorded(self, route: Any, doc: dict[str, Any]) -> None:
        """The previous run's event, if it was recorded but not published."""
        recorded = (doc.get("events") or {}).get(R.TABLE_RECONCILED)
        if recorded and not recorded.get("published"):
            self.publish(route, recorded)

    def publish(self, route: Any, event: dict[str, Any]) -> None:
        from handlers.core.errors import PublishError

        try:
            message_id = self.events.publish(event["data"], event["attributes"])
        except PublishError as e:
            logs.error("reconcile: the TABLE_RECONCILED event could not be published; the next run publishes it",
                       problem=str(e), tableUri=route.table_uri)
            return
        key = f"events.{R.TABLE_RECONCILED}"
        self.state.save(route.key, {f"{key}.published": True, f"{key}.messageId": message_id,
                                    f"{key}.publishedAt": self.state.now()}, if_event=event["eventId"])
