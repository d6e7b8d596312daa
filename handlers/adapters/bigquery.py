"""BigQuery adapter: table metadata and query / DML jobs (`tables.get`, `jobs.query`, `jobs.insert`,
`getQueryResults`), over REST through the one transport and its retry policy.

Jobs run in the functions' project (the runtime account needs roles/bigquery.jobUser there) and name tables
fully (`P.D.T`: roles/bigquery.dataEditor on each routed dataset). A retried `jobs.query` carries the same
`requestId`, which BigQuery uses to answer a repeated call with the job the first one started. `run_once`
inserts a job under an id the caller derives from its work: BigQuery runs at most one job per id (a second
insert answers 409), so a statement that must not run twice (a batch's DML, once its export may have
appended rows) runs once whoever submits it and however often.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from . import transport

WAIT_MS = 10_000  # how long one jobs.query / getQueryResults call waits for the job to finish
PAGE_ROWS = 10_000


class TableError(Exception):
    """The table cannot be used: it does not exist, or the runtime account may not read it."""


@dataclass
class Result:
    rows: list[list[Any]] = field(default_factory=list)  # cell values as BigQuery sends them (strings)
    affected: int = 0                                     # numDmlAffectedRows of a DML statement
    job_id: str = ""
    calls: int = 0                                        # API calls made


class BigQuery:
    def __init__(self, endpoint: str, project: str, *, tokens: transport.Tokens | None = None,
                 timeout_s: float = 30.0, budget_s: float = 60.0):
        self.root = endpoint.rstrip("/") + "/bigquery/v2"
        self.project = project
        self.tokens = tokens or transport.Tokens()
        self.timeout_s, self.budget_s = timeout_s, budget_s

    def table(self, table_uri: str) -> dict[str, Any]:
        """tables.get of `bq://P.D.T`; TableError when it is missing or unreadable (the reason in its text)."""
        p, d, t = table_uri.removeprefix("bq://").rsplit(".", 2)
        try:
            r = self._call("GET", f"/projects/{p}/datasets/{d}/tables/{t}", "tables.get")
        except transport.HttpError as e:
            raise TableError(f"{e.http_status} {e.status}: {e.message}") from None
        out: dict[str, Any] = r.json()
        return out

    def query(self, sql: str, parameters: list[dict[str, Any]] | None = None, *, max_rows: int = 1_000_000) -> Result:
        """Run one statement (a SELECT or DML) and read all its rows (at most `max_rows`)."""
        body = {"query": sql, "useLegacySql": False, "parameterMode": "NAMED", "queryParameters": parameters or [],
                "requestId": str(uuid.uuid4()), "timeoutMs": WAIT_MS, "maxResults": PAGE_ROWS}
        r = self._call("POST", f"/projects/{self.project}/queries", "jobs.query", json=body).json()
        out = Result(calls=1)
        ref = r.get("jobReference") or {}
        out.job_id = str(ref.get("jobId") or "")
        while not r.get("jobComplete"):
            r = self._results(ref, None)
            out.calls += 1
        out.affected = int(r.get("numDmlAffectedRows") or 0)
        out.rows.extend(_values(r))
        while r.get("pageToken") and len(out.rows) < max_rows:
            r = self._results(ref, r["pageToken"])
            out.calls += 1
            out.rows.extend(_values(r))
        return out

    def run_once(self, sql: str, parameters: list[dict[str, Any]], job_id: str, *, table_uri: str) -> Result:
        """Run a DML statement as the job `job_id`, or, if that job exists already, wait for it instead; its
        affected rows. (`table_uri`: the table it changes, whose location finds an existing job.)"""
        body = {"jobReference": {"projectId": self.project, "jobId": job_id}, "configuration": {"query": {
            "query": sql, "useLegacySql": False, "parameterMode": "NAMED", "queryParameters": parameters}}}
        out = Result(job_id=job_id, calls=1)
        try:
            ref = self._call("POST", f"/projects/{self.project}/jobs", "jobs.insert", json=body).json()["jobReference"]
        except transport.HttpError as e:
            if e.http_status != 409:
                raise
            ref = {"projectId": self.project, "jobId": job_id, "location": self._location(table_uri)}
            out.calls += 1
        r: dict[str, Any] = {}
        while not r.get("jobComplete"):
            r = self._results(ref, None)
            out.calls += 1
        out.affected = int(r.get("numDmlAffectedRows") or 0)
        return out

    def _location(self, table_uri: str) -> str | None:
        """The table's location (None when it is gone: the job's own error then says so)."""
        try:
            location = self.table(table_uri).get("location")
        except TableError:
            return None
        return str(location) if location else None

    def _results(self, ref: dict[str, Any], page_token: str | None) -> dict[str, Any]:
        params = {"timeoutMs": WAIT_MS, "maxResults": PAGE_ROWS, "location": ref.get("location"),
                  "pageToken": page_token}
        r = self._call("GET", f"/projects/{ref.get('projectId') or self.project}/queries/{ref['jobId']}",
                       "jobs.getQueryResults", params={k: v for k, v in params.items() if v})
        out: dict[str, Any] = r.json()
        return out

    def _call(self, method: str, path: str, what: str, **kw: Any) -> Any:
        return transport.call(method, self.root + path, tokens=self.tokens, what=f"BigQuery {what}",
                              deadline=time.monotonic() + self.budget_s, timeout_s=self.timeout_s, **kw)


def _values(r: dict[str, Any]) -> list[list[Any]]:
    return [[c.get("v") for c in row.get("f") or []] for row in r.get("rows") or []]
