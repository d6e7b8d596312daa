"""The console's client of the emulator's REST surface, called in-process through the WSGI app.

Each call builds a WSGI environ for the same host the browser used (so URLs the API puts in its answers,
like an operation's `logsUrl`, point where the browser can follow them) and runs the emulator's app on it.
Nothing here knows how the emulator routes or stores anything.
"""
from __future__ import annotations

import json
from urllib.parse import quote

from werkzeug.test import EnvironBuilder, run_wsgi_app


class RestError(Exception):
    """A non-2xx answer: the API's own error message and status."""

    def __init__(self, http: int, status: str, message: str, code: int | None = None):
        super().__init__(message)
        self.http, self.status, self.message = http, status, message
        self.code = code


class Rest:
    def __init__(self, app, host_url: str, token: str | None = None):
        self.app = app
        self.host_url = host_url
        self.token = token

    def call(self, method: str, path: str, *, params: dict | None = None, body=None, ok404: bool = False):
        """JSON in, JSON out. `path` starts with '/' and is made of names the console has validated."""
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body)
            headers["Content-Type"] = "application/json"
        env = EnvironBuilder(path=quote(path, safe="/:$@!*'(),;=+-._~"), base_url=self.host_url, method=method,
                             query_string=params or None, headers=headers, data=data).get_environ()
        app_iter, status, resp_headers = run_wsgi_app(self.app, env, buffered=True)
        try:
            raw = b"".join(app_iter)
        finally:
            close = getattr(app_iter, "close", None)
            if close:
                close()
        http = int(status.split(" ", 1)[0])
        if http == 204 or not raw.strip():
            parsed = {}
        else:
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = {"_raw": raw.decode("utf-8", "replace")}
        if 200 <= http < 300:
            return parsed
        if http == 404 and ok404:
            return None
        err = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(err, dict):
            raise RestError(http, str(err.get("status", "")), str(err.get("message", "")), err.get("code"))
        raise RestError(http, "", raw.decode("utf-8", "replace")[:500])

    def pages(self, path: str, field: str, *, params: dict | None = None, limit: int = 100_000) -> list:
        """Every item of a paged list (pageToken / nextPageToken)."""
        out: list = []
        token = None
        while True:
            p = dict(params or {})
            if token:
                p["pageToken"] = token
            page = self.call("GET", path, params=p) or {}
            out += page.get(field, [])
            token = page.get("nextPageToken")
            if not token or len(out) >= limit:
                return out

    # -- the Healthcare API ------------------------------------------------------------------------------
    def datasets(self, parent: str) -> list[dict]:
        return self.pages(f"/v1/{parent}/datasets", "datasets", params={"pageSize": 1000})

    def stores(self, dataset: str) -> list[dict]:
        return self.pages(f"/v1/{dataset}/dicomStores", "dicomStores", params={"pageSize": 1000})

    def instance_count(self, store: str) -> int:
        """QIDO-RS instance search, paged at its 50,000 maximum (the API has no cheaper count)."""
        n, offset = 0, 0
        while True:
            found = self.call("GET", f"/v1/{store}/dicomWeb/instances",
                              params={"limit": "50000", "offset": str(offset), "includefield": "00080018"})
            got = len(found) if isinstance(found, list) else 0
            n += got
            if got < 50000:
                return n
            offset += got

    def operations(self, dataset: str) -> list[dict]:
        return self.pages(f"/v1/{dataset}/operations", "operations", params={"pageSize": 100})

    def export(self, store: str, body: dict) -> dict:
        return self.call("POST", f"/v1/{store}:export", body=body)

    # -- BigQuery ----------------------------------------------------------------------------------------
    def bq_projects(self) -> list[str]:
        items = self.pages("/bigquery/v2/projects", "projects")
        return [p["projectReference"]["projectId"] for p in items]

    def bq_datasets(self, project: str) -> list[str]:
        items = self.pages(f"/bigquery/v2/projects/{project}/datasets", "datasets")
        return sorted(d["datasetReference"]["datasetId"] for d in items)

    def bq_tables(self, project: str, dataset: str) -> list[str]:
        items = self.pages(f"/bigquery/v2/projects/{project}/datasets/{dataset}/tables", "tables")
        return sorted(t["tableReference"]["tableId"] for t in items)

    def bq_table(self, project: str, dataset: str, table: str) -> dict:
        return self.call("GET", f"/bigquery/v2/projects/{project}/datasets/{dataset}/tables/{table}")

    def bq_rows(self, project: str, dataset: str, table: str, n: int) -> dict:
        return self.call("GET", f"/bigquery/v2/projects/{project}/datasets/{dataset}/tables/{table}/data",
                         params={"maxResults": str(n)})

    def bq_query(self, project: str, sql: str, max_rows: int) -> dict:
        return self.call("POST", f"/bigquery/v2/projects/{project}/queries",
                         body={"query": sql, "useLegacySql": False, "maxResults": max_rows, "timeoutMs": 600000})


def healthcare_parents(app) -> list[str]:
    """`projects/P/locations/L` of every Healthcare dataset the emulator holds.

    The one place the console looks past the REST surface: the Cloud Healthcare API lists datasets per
    project and location but the emulator serves no projects.list or locations.list to find those. It is a
    read-only query; if the emulator's state ever changes shape the console still works with the projects
    BigQuery lists and HC_CONSOLE_PROJECTS.
    """
    try:
        rows = app.state.db().execute("SELECT DISTINCT parent FROM datasets ORDER BY parent").fetchall()
        return [str(r[0]) for r in rows]
    except Exception:  # noqa: BLE001 - a hint only
        return []
