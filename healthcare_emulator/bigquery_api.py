"""A minimal BigQuery REST API (v2) over the emulator's warehouse, for Google's own clients.

Served on the same port as the Healthcare API, under the paths the clients build:

- `/bigquery/v2/...`: google-cloud-bigquery (`client_options={"api_endpoint": URL}`) and the `bq` CLI
  (`--api=URL`) call these.
- `/$discovery/rest?version=v2` (what `bq --api=URL` fetches) and
  `/discovery/v1/apis/{bigquery|healthcare}/{version}/rest`: Google's discovery documents, as bundled
  with google-api-python-client, with their root URL pointed at this server.

Methods: datasets insert/get/list/delete, tables insert/get/list/delete, tabledata.list,
jobs insert (query jobs)/get/list/cancel, jobs.getQueryResults and jobs.query. Rows are encoded as
BigQuery encodes them (`{"f": [{"v": ...}]}`, RECORDs as nested `{"f": ...}`, REPEATED as
`[{"v": ...}]`, every scalar a string, TIMESTAMP as float seconds or, with
`formatOptions.useInt64Timestamp`, integer microseconds), so the clients decode types as they do
against Google. Queries run synchronously on the warehouse (BigQuery Standard SQL through
sqlglot + DuckDB); a query job is therefore DONE when insert returns. Query results are kept in
memory (the most recent MAX_JOBS jobs), not across a restart; tables and datasets are on disk.
"""
from __future__ import annotations

import base64
import copy
import datetime as dt
import decimal
import hashlib
import json
import math
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from functools import lru_cache

from werkzeug.wrappers import Request, Response

from . import bq_script, iam
from .errors import ApiError

MAX_JOBS = 500                 # query jobs (and their result rows) kept in memory
DEFAULT_PAGE_ROWS = 100_000    # rows per page when the client sets no maxResults
MAX_PAGE_ROWS = 1_000_000
ANON_DATASET = "_emulator_anonymous"   # where query results "live", as BigQuery's _<hash> datasets
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,1024}$")
SEG = r"([^/]+)"

ROUTES = [
    ("GET", re.compile(r"^projects$"), "list_projects"),
    ("POST", re.compile(rf"^projects/{SEG}/datasets$"), "insert_dataset"),
    ("GET", re.compile(rf"^projects/{SEG}/datasets$"), "list_datasets"),
    ("GET", re.compile(rf"^projects/{SEG}/datasets/{SEG}$"), "get_dataset"),
    ("DELETE", re.compile(rf"^projects/{SEG}/datasets/{SEG}$"), "delete_dataset"),
    ("PATCH", re.compile(rf"^projects/{SEG}/datasets/{SEG}$"), "patch_dataset"),
    ("PUT", re.compile(rf"^projects/{SEG}/datasets/{SEG}$"), "update_dataset"),
    ("POST", re.compile(rf"^projects/{SEG}/datasets/{SEG}/tables$"), "insert_table"),
    ("GET", re.compile(rf"^projects/{SEG}/datasets/{SEG}/tables$"), "list_tables"),
    ("GET", re.compile(rf"^projects/{SEG}/datasets/{SEG}/tables/{SEG}$"), "get_table"),
    ("DELETE", re.compile(rf"^projects/{SEG}/datasets/{SEG}/tables/{SEG}$"), "delete_table"),
    ("GET", re.compile(rf"^projects/{SEG}/datasets/{SEG}/tables/{SEG}/data$"), "list_tabledata"),
    ("POST", re.compile(rf"^projects/{SEG}/jobs$"), "insert_job"),
    ("GET", re.compile(rf"^projects/{SEG}/jobs$"), "list_jobs"),
    ("GET", re.compile(rf"^projects/{SEG}/jobs/{SEG}$"), "get_job"),
    ("POST", re.compile(rf"^projects/{SEG}/jobs/{SEG}/cancel$"), "cancel_job"),
    ("POST", re.compile(rf"^projects/{SEG}/queries$"), "query"),
    ("GET", re.compile(rf"^projects/{SEG}/queries/{SEG}$"), "get_query_results"),
]

# google.rpc code name -> (HTTP status, BigQuery error reason)
REASONS = {
    "NOT_FOUND": (404, "notFound"),
    "ALREADY_EXISTS": (409, "duplicate"),
    "INVALID_ARGUMENT": (400, "invalid"),
    "FAILED_PRECONDITION": (400, "invalid"),
    "CANCELLED": (400, "stopped"),
    "UNAUTHENTICATED": (401, "unauthorized"),
    "PERMISSION_DENIED": (403, "accessDenied"),
    "UNIMPLEMENTED": (501, "notImplemented"),
    "RESOURCE_EXHAUSTED": (429, "rateLimitExceeded"),
    "INTERNAL": (500, "internalError"),
}


class BqError(Exception):
    """An error in BigQuery's envelope: {"error": {"code", "message", "errors": [{reason, ...}], "status"}}."""

    def __init__(self, status: str, message: str, reason: str | None = None, location: str | None = None):
        super().__init__(message)
        self.status = status if status in REASONS else "INTERNAL"
        self.http, default_reason = REASONS[self.status]
        self.reason = reason or default_reason
        self.message = message
        self.location = location

    def item(self) -> dict:
        e = {"reason": self.reason, "message": self.message}
        if self.location:
            e["location"] = self.location
        return e

    def body(self) -> dict:
        return {"error": {"code": self.http, "message": self.message,
                          "errors": [{**self.item(), "domain": "global"}], "status": self.status}}


def _from_warehouse(e, reason: str | None = None, location: str | None = None) -> BqError:
    """A WarehouseError (code name + message) as BigQuery reports it."""
    code = getattr(e, "code", None)
    msg = getattr(e, "message", None) or str(e)
    if not isinstance(code, str):
        return BqError("INTERNAL", f"{type(e).__name__}: {msg}")
    if code == "FAILED_PRECONDITION" and msg.startswith("Already Exists"):
        return BqError("ALREADY_EXISTS", msg)
    if code == "FAILED_PRECONDITION" and "still in use" in msg:
        return BqError("FAILED_PRECONDITION", msg, "resourceInUse")
    if code == "INVALID_ARGUMENT":
        return BqError(code, msg, reason, location)
    return BqError(code, msg)


def _json(body, status: int = 200) -> Response:
    return Response(json.dumps(body, indent=1) + "\n", status=status, content_type="application/json; charset=UTF-8")


def _etag(obj) -> str:
    return base64.b64encode(hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).digest()[:12]).decode()


def _token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"o": offset}).encode()).decode().rstrip("=")


def _offset(request: Request, token_param: str = "pageToken") -> int:
    tok = request.args.get(token_param, "")
    start = request.args.get("startIndex")
    if tok:
        try:
            return max(int(json.loads(base64.urlsafe_b64decode(tok + "=" * (-len(tok) % 4)))["o"]), 0)
        except Exception:
            raise BqError("INVALID_ARGUMENT", f"Invalid page token: {tok[:100]}") from None
    if start:
        try:
            return max(int(start), 0)
        except ValueError:
            raise BqError("INVALID_ARGUMENT", f"Invalid startIndex: {start[:50]}") from None
    return 0


def _max_results(raw, default: int = DEFAULT_PAGE_ROWS) -> int:
    if raw is None or raw == "":
        return default
    try:
        n = int(raw)
    except (TypeError, ValueError):
        raise BqError("INVALID_ARGUMENT", f"Invalid maxResults: {str(raw)[:50]}") from None
    if n < 0:
        raise BqError("INVALID_ARGUMENT", "maxResults must not be negative")
    return min(n, MAX_PAGE_ROWS)


def _truthy(v) -> bool:
    return v is True or (isinstance(v, str) and v.lower() == "true")


# -- row encoding (BigQuery's REST "f/v" form) ------------------------------------------------------
def _ts_micros(v) -> int:
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=dt.timezone.utc)
        delta = v - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
        return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    if isinstance(v, (int, float)):
        return int(v)
    return _ts_micros(dt.datetime.fromisoformat(str(v).replace("Z", "+00:00")))


def _scalar(v, typ: str, int64_ts: bool):
    if typ == "INTEGER":
        return str(int(v))
    if typ == "FLOAT":
        f = float(v)
        if math.isnan(f):
            return "NaN"
        if math.isinf(f):
            return "Infinity" if f > 0 else "-Infinity"
        return repr(f)
    if typ == "BOOLEAN":
        return "true" if v else "false"
    if typ == "TIMESTAMP":
        micros = _ts_micros(v)
        if int64_ts:
            return str(micros)
        sign = "-" if micros < 0 else ""
        s, us = divmod(abs(micros), 1_000_000)
        return f"{sign}{s}.{us:06d}".rstrip("0").rstrip(".") if us else f"{sign}{s}"
    if typ == "DATETIME":
        return v.isoformat() if isinstance(v, dt.datetime) else str(v).replace(" ", "T")
    if typ in ("DATE", "TIME"):
        return v.isoformat() if isinstance(v, (dt.date, dt.time)) else str(v)
    if typ == "BYTES":
        return base64.b64encode(bytes(v)).decode("ascii") if isinstance(v, (bytes, bytearray, memoryview)) else str(v)
    if typ in ("NUMERIC", "BIGNUMERIC"):
        return format(v, "f") if isinstance(v, decimal.Decimal) else str(v)
    if typ == "JSON":
        return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), default=str)
    if typ == "INTERVAL" and isinstance(v, dt.timedelta):
        secs = v.days * 86400 + v.seconds
        sign = "-" if secs < 0 else ""
        secs = abs(secs)
        frac = f".{v.microseconds:06d}" if v.microseconds else ""
        return f"0-0 0 {sign}{secs // 3600}:{secs // 60 % 60}:{secs % 60}{frac}"
    return v if isinstance(v, str) else str(v)


def _cell(v, field: dict, int64_ts: bool) -> dict:
    if field.get("mode") == "REPEATED":
        item = {**field, "mode": "NULLABLE"}
        return {"v": [_cell(x, item, int64_ts) for x in (v or [])]}
    if v is None:
        return {"v": None}
    if field["type"] in ("RECORD", "STRUCT"):
        return {"v": _row(v, field["fields"], int64_ts)}
    return {"v": _scalar(v, field["type"], int64_ts)}


def _row(row: dict, fields: list[dict], int64_ts: bool) -> dict:
    return {"f": [_cell(row.get(f["name"]), f, int64_ts) for f in fields]}


def encode_rows(rows: list[dict], fields: list[dict], int64_ts: bool) -> list[dict]:
    return [_row(r, fields, int64_ts) for r in rows]


def _schema_out(fields: list[dict]) -> list[dict]:
    out = []
    for f in fields:
        g = {"name": f["name"], "type": f["type"], "mode": f.get("mode", "NULLABLE")}
        if f.get("fields"):
            g["fields"] = _schema_out(f["fields"])
        if f.get("description"):
            g["description"] = f["description"]
        out.append(g)
    return out


def _select_fields(fields: list[dict], rows: list[dict], selected: str) -> tuple[list[dict], list[dict]]:
    """tabledata.list selectedFields: top-level columns only (nested paths keep the whole column)."""
    want = [s.strip().split(".")[0] for s in selected.split(",") if s.strip()]
    keep = [f for f in fields if f["name"] in want]
    if not keep:
        return fields, rows
    return keep, [{f["name"]: r.get(f["name"]) for f in keep} for r in rows]


# -- query parameters ------------------------------------------------------------------------------
def _param_value(ptype: dict, pvalue: dict):
    t = (ptype or {}).get("type", "STRING").upper()
    pvalue = pvalue or {}
    if t == "ARRAY":
        return [_param_value(ptype.get("arrayType", {}), v) for v in pvalue.get("arrayValues", [])]
    if t == "STRUCT":
        vals = pvalue.get("structValues", {})
        return {st["name"]: _param_value(st["type"], vals.get(st["name"], {})) for st in ptype.get("structTypes", [])}
    v = pvalue.get("value")
    if v is None:
        return None
    try:
        if t in ("INT64", "INTEGER"):
            return int(v)
        if t in ("FLOAT64", "FLOAT"):
            return float(v)
        if t in ("BOOL", "BOOLEAN"):
            return str(v).lower() == "true"
        if t in ("NUMERIC", "BIGNUMERIC"):
            return decimal.Decimal(v)
        if t == "DATE":
            return dt.date.fromisoformat(v)
        if t == "DATETIME":
            return dt.datetime.fromisoformat(v.replace(" ", "T"))
        if t == "TIMESTAMP":
            s = v.replace(" ", "T").replace("Z", "+00:00")
            s = re.sub(r"([+-]\d\d)$", r"\1:00", s)
            ts = dt.datetime.fromisoformat(s)
            return ts if ts.tzinfo else ts.replace(tzinfo=dt.timezone.utc)
        if t == "TIME":
            return dt.time.fromisoformat(v)
        if t == "BYTES":
            return base64.b64decode(v)
    except (ValueError, decimal.InvalidOperation):
        raise BqError("INVALID_ARGUMENT", f"Invalid query parameter value {str(v)[:100]!r} for type {t}",
                      "invalidQuery") from None
    return v


def _params(cfg: dict):
    qp = cfg.get("queryParameters") or []
    if not qp:
        return None
    mode = (cfg.get("parameterMode") or ("NAMED" if qp[0].get("name") else "POSITIONAL")).upper()
    if mode == "NAMED":
        return {p["name"]: _param_value(p.get("parameterType"), p.get("parameterValue")) for p in qp}
    return [_param_value(p.get("parameterType"), p.get("parameterValue")) for p in qp]


def _qualify_default_dataset(sql: str, default_dataset: dict | None) -> str:
    """Tables named without a dataset resolve in `defaultDataset`, as BigQuery does."""
    if not default_dataset or not default_dataset.get("datasetId"):
        return sql
    import sqlglot
    from sqlglot import exp
    try:
        tree = sqlglot.parse_one(sql, read="bigquery")
    except sqlglot.errors.SqlglotError:
        return sql  # the warehouse reports the syntax error
    ctes = {c.alias_or_name.lower() for c in tree.find_all(exp.CTE)}
    changed = False
    for t in tree.find_all(exp.Table):
        if isinstance(t.this, exp.Identifier) and not t.db and t.name.lower() not in ctes:
            t.set("db", exp.to_identifier(default_dataset["datasetId"]))
            if default_dataset.get("projectId"):
                t.set("catalog", exp.to_identifier(default_dataset["projectId"]))
            changed = True
    return tree.sql(dialect="bigquery") if changed else sql


def _dialect(cfg: dict, sql: str) -> str:
    """The Standard SQL text to run, or a BqError for Legacy SQL, which the emulator cannot run.

    As in BigQuery: a `#standardSQL` / `#legacySQL` first line picks the dialect; otherwise
    `useLegacySql`, whose default (unset) is Legacy SQL. google-cloud-bigquery always sends false.
    """
    stripped = sql.lstrip()
    first, _, rest = stripped.partition("\n")
    prefix = first.strip().lower()
    legacy = cfg.get("useLegacySql")
    is_legacy = legacy is None or legacy is True or (isinstance(legacy, str) and legacy.lower() == "true")
    if prefix == "#standardsql":
        if legacy is True:
            raise BqError("INVALID_ARGUMENT", "Query text specifies use_legacy_sql:false, while API options "
                                              "specify:true", "invalid")
        return rest
    if prefix == "#legacysql" or is_legacy:
        raise BqError("INVALID_ARGUMENT",
                      "Legacy SQL is not supported by the local BigQuery emulator: set useLegacySql=false "
                      "(bq: --nouse_legacy_sql, or start the query with #standardSQL).", "invalidQuery", "query")
    return sql


# -- the service ------------------------------------------------------------------------------------
class BigQueryService:
    def __init__(self, app):
        self.app = app
        self.jobs: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self.lock = threading.Lock()

    @property
    def wh(self):
        return self.app.operations.warehouse

    # datasets ---------------------------------------------------------------------------------------
    def _dataset_resource(self, meta: dict, request: Request) -> dict:
        ref = meta["datasetReference"]
        out = {"kind": "bigquery#dataset", "id": f"{ref['projectId']}:{ref['datasetId']}",
               "selfLink": f"{request.host_url}bigquery/v2/projects/{ref['projectId']}/datasets/{ref['datasetId']}",
               "datasetReference": dict(ref), "location": meta.get("location", "US"),
               "creationTime": str(meta.get("creationTime", 0)),
               "lastModifiedTime": str(meta.get("lastModifiedTime", 0)),
               "access": iam.dataset_access(meta), "type": "DEFAULT"}
        if meta.get("labels"):
            out["labels"] = dict(meta["labels"])
        for key in ("description", "friendlyName"):
            if meta.get(key) is not None:
                out[key] = meta[key]
        out["etag"] = _etag(out)
        return out

    def insert_dataset(self, request: Request, project: str) -> Response:
        body = _body(request)
        ref = body.get("datasetReference") or {}
        dataset = ref.get("datasetId")
        if not dataset:
            raise BqError("INVALID_ARGUMENT", "Required parameter is missing: datasetReference.datasetId", "required")
        if ref.get("projectId") and ref["projectId"] != project:
            raise BqError("INVALID_ARGUMENT", f"Invalid project ID '{ref['projectId']}': it does not match the "
                                              f"project of the request ({project}).")
        kw = {"location": body.get("location") or "US", "labels": body.get("labels") or {}}
        if body.get("description") is not None:
            kw["description"] = body["description"]
        access = _checked_access(body)
        try:
            meta = self.wh.create_dataset(project, dataset, **kw)
            if access is not None:
                meta = self.wh.update_dataset(project, dataset, lambda m: m.__setitem__("access", access))
        except Exception as e:
            raise _from_warehouse(e) from None
        return _json(self._dataset_resource(meta, request))

    def patch_dataset(self, request: Request, project: str, dataset: str) -> Response:
        return self._change_dataset(request, project, dataset, replace=False)

    def update_dataset(self, request: Request, project: str, dataset: str) -> Response:
        return self._change_dataset(request, project, dataset, replace=True)

    def _change_dataset(self, request: Request, project: str, dataset: str, *, replace: bool) -> Response:
        """datasets.patch (replace=False: only the fields given) and datasets.update (replace=True: access,
        labels, description and friendlyName as given, defaults for those left out). If-Match is honoured."""
        body = _body(request)
        ref = body.get("datasetReference") or {}
        if (ref.get("projectId") not in (None, project)) or (ref.get("datasetId") not in (None, dataset)):
            raise BqError("INVALID_ARGUMENT", "datasetReference does not match the dataset of the request.")
        access, labels = _checked_access(body), _checked_labels(body)
        current = self._dataset_resource(self._require_dataset(project, dataset), request)
        want = request.headers.get("If-Match")
        if want and want != current["etag"]:
            err = BqError("FAILED_PRECONDITION", "Precondition check failed.", "conditionNotMet")
            err.http = 412
            raise err

        def change(meta: dict) -> None:
            if access is not None or replace:
                meta["access"] = access if access is not None else iam.default_access()
            if labels is not None or replace:
                merged = {} if replace else dict(meta.get("labels") or {})
                merged.update(labels or {})
                meta["labels"] = {k: v for k, v in merged.items() if v is not None}  # null removes a label
            for key in ("description", "friendlyName"):
                if key in body or replace:
                    if body.get(key) is None:
                        meta.pop(key, None)
                    else:
                        meta[key] = str(body[key])
        try:
            meta = self.wh.update_dataset(project, dataset, change)
        except Exception as e:
            raise _from_warehouse(e) from None
        return _json(self._dataset_resource(meta, request))

    def get_dataset(self, request: Request, project: str, dataset: str) -> Response:
        return _json(self._dataset_resource(self._require_dataset(project, dataset), request))

    def _require_dataset(self, project: str, dataset: str) -> dict:
        try:
            return self.wh.get_dataset(project, dataset)
        except Exception as e:
            raise _from_warehouse(e) from None

    def list_datasets(self, request: Request, project: str) -> Response:
        try:
            metas = self.wh.list_datasets(project)
        except Exception as e:
            raise _from_warehouse(e) from None
        items = []
        for m in metas:
            ref = m["datasetReference"]
            item = {"kind": "bigquery#dataset", "id": f"{ref['projectId']}:{ref['datasetId']}",
                    "datasetReference": dict(ref), "location": m.get("location", "US")}
            if m.get("labels"):
                item["labels"] = dict(m["labels"])
            items.append(item)
        return _json(self._page(request, items, "datasets", {"kind": "bigquery#datasetList"}))

    def delete_dataset(self, request: Request, project: str, dataset: str) -> Response:
        try:
            self.wh.delete_dataset(project, dataset, delete_contents=_truthy(request.args.get("deleteContents")))
        except Exception as e:
            raise _from_warehouse(e) from None
        return Response(status=204)

    def list_projects(self, request: Request) -> Response:
        root = self.wh.root / "projects"
        ids = []
        try:
            for d in root.iterdir():
                metas = [p for p in (d / "datasets").glob("*/dataset.json")]
                if metas:
                    ids.append(json.loads(metas[0].read_text())["datasetReference"]["projectId"])
        except OSError:
            pass
        items = [{"kind": "bigquery#project", "id": p,
                  "numericId": iam.project_number(p),
                  "projectReference": {"projectId": p}, "friendlyName": p} for p in sorted(ids)]
        out = self._page(request, items, "projects", {"kind": "bigquery#projectList"})
        out["totalItems"] = len(items)
        return _json(out)

    # tables -----------------------------------------------------------------------------------------
    def _table_resource(self, t: dict, request: Request) -> dict:
        ref = t["tableReference"]
        out = {"kind": "bigquery#table", "id": f"{ref['projectId']}:{ref['datasetId']}.{ref['tableId']}",
               "selfLink": f"{request.host_url}bigquery/v2/projects/{ref['projectId']}/datasets/{ref['datasetId']}"
                           f"/tables/{ref['tableId']}",
               "tableReference": dict(ref), "schema": {"fields": _schema_out(t.get("schema", []))},
               "numRows": str(t.get("numRows", 0)), "numBytes": str(t.get("numBytes", 0)),
               "creationTime": str(t.get("creationTime", 0)), "lastModifiedTime": str(t.get("lastModifiedTime", 0)),
               "type": t.get("type", "TABLE"), "location": t.get("location", "US")}
        out["etag"] = _etag(out)
        return out

    def _require_table(self, project: str, dataset: str, table: str) -> dict:
        anon = self._anonymous(project, dataset, table)
        if anon is not None:
            return anon["table"]
        try:
            t = self.wh.get_table(project, dataset, table)
            if t is None:
                self.wh.get_dataset(project, dataset)
        except Exception as e:
            raise _from_warehouse(e) from None
        if t is None:
            raise BqError("NOT_FOUND", f"Not found: Table {project}:{dataset}.{table}")
        return t

    def get_table(self, request: Request, project: str, dataset: str, table: str) -> Response:
        return _json(self._table_resource(self._require_table(project, dataset, table), request))

    def insert_table(self, request: Request, project: str, dataset: str) -> Response:
        body = _body(request)
        ref = body.get("tableReference") or {}
        table = ref.get("tableId")
        if not table:
            raise BqError("INVALID_ARGUMENT", "Required parameter is missing: tableReference.tableId", "required")
        fields = (body.get("schema") or {}).get("fields") or []
        if not fields:
            raise BqError("INVALID_ARGUMENT", "The local BigQuery emulator needs a schema to create a table.")
        try:
            self.wh.write_table(project, dataset, table, fields, [], if_exists="error")
            t = self.wh.get_table(project, dataset, table)
        except Exception as e:
            raise _from_warehouse(e) from None
        return _json(self._table_resource(t, request))

    def list_tables(self, request: Request, project: str, dataset: str) -> Response:
        try:
            tables = self.wh.list_tables(project, dataset)
        except Exception as e:
            raise _from_warehouse(e) from None
        items = [{"kind": "bigquery#table", "id": f"{project}:{dataset}.{t['tableReference']['tableId']}",
                  "tableReference": dict(t["tableReference"]), "type": t.get("type", "TABLE"),
                  "creationTime": str(t.get("creationTime", 0))} for t in tables]
        out = self._page(request, items, "tables", {"kind": "bigquery#tableList"})
        out["totalItems"] = len(items)
        return _json(out)

    def delete_table(self, request: Request, project: str, dataset: str, table: str) -> Response:
        try:
            self.wh.delete_table(project, dataset, table)
        except Exception as e:
            raise _from_warehouse(e) from None
        return Response(status=204)

    def list_tabledata(self, request: Request, project: str, dataset: str, table: str) -> Response:
        offset = _offset(request)
        limit = _max_results(request.args.get("maxResults"))
        anon = self._anonymous(project, dataset, table)
        if anon is not None:
            fields, rows, total = anon["schema"], anon["rows"][offset:offset + limit], len(anon["rows"])
        else:
            try:
                fields, rows, total = self.wh.list_rows(project, dataset, table, start_index=offset, max_results=limit)
            except Exception as e:
                raise _from_warehouse(e) from None
        if request.args.get("selectedFields"):
            fields, rows = _select_fields(fields, rows, request.args["selectedFields"])
        int64_ts = _truthy(request.args.get("formatOptions.useInt64Timestamp"))
        out = {"kind": "bigquery#tableDataList", "totalRows": str(total)}
        if rows:
            out["rows"] = encode_rows(rows, fields, int64_ts)
        if offset + len(rows) < total and limit:
            out["pageToken"] = _token(offset + len(rows))
        out["etag"] = _etag([project, dataset, table, total])
        return _json(out)

    # jobs -------------------------------------------------------------------------------------------
    def _anonymous(self, project: str, dataset: str, table: str) -> dict | None:
        if dataset != ANON_DATASET:
            return None
        with self.lock:
            for (p, _), job in self.jobs.items():
                dest = job["resource"]["configuration"]["query"].get("destinationTable", {})
                if p == project and dest.get("tableId") == table and dest.get("datasetId") == ANON_DATASET:
                    return job
        return None

    def _new_job(self, project: str, job_id: str, location: str, cfg: dict, config_extra: dict) -> dict:
        t = str(int(time.time() * 1000))
        return {"kind": "bigquery#job", "id": f"{project}:{location}.{job_id}",
                "jobReference": {"projectId": project, "jobId": job_id, "location": location},
                "configuration": {"query": cfg, "jobType": "QUERY", **config_extra},
                "status": {"state": "RUNNING"},
                "statistics": {"creationTime": t, "startTime": t}, "user_email": "emulator@localhost"}

    def _run_query(self, project: str, job_id: str, location: str, cfg: dict, config_extra: dict,
                   dry_run: bool = False) -> dict:
        """Run a query job to completion; the job (with its result rows, or its error) is stored."""
        cfg = copy.deepcopy(cfg)
        query_text = cfg.get("query")
        resource = self._new_job(project, job_id, location, cfg, config_extra)
        job = {"resource": resource, "schema": [], "rows": [], "table": None, "error": None}
        with self.lock:
            key = (project, job_id)
            if key in self.jobs:
                raise BqError("ALREADY_EXISTS", f"Already Exists: Job {project}:{location}.{job_id}")
            self.jobs[key] = job
            while len(self.jobs) > MAX_JOBS:
                self.jobs.popitem(last=False)
        try:
            if not isinstance(query_text, str) or not query_text.strip():
                raise BqError("INVALID_ARGUMENT", "Query text is empty", "invalidQuery", "query")
            sql = _dialect(cfg, query_text)
            if "useLegacySql" not in cfg:
                cfg["useLegacySql"] = False
            if self._run_script(job, project, job_id, location, cfg, sql, dry_run):
                return job
            sql = _qualify_default_dataset(sql, cfg.get("defaultDataset"))
            default_project = (cfg.get("defaultDataset") or {}).get("projectId") or project
            try:
                fields, rows = self.wh.query(sql, default_project=default_project, params=_params(cfg))
            except BqError:
                raise
            except Exception as e:
                code = getattr(e, "code", None)
                if code is None:
                    raise BqError("INVALID_ARGUMENT", f"{type(e).__name__}: {e}", "invalidQuery", "query") from None
                raise _from_warehouse(e, "invalidQuery", "query") from None
            job["schema"] = fields
            job["rows"] = [] if dry_run else rows
            dest = cfg.get("destinationTable")
            if dest and not dry_run:
                self._write_destination(dest, cfg, fields, rows)
            elif not dest:
                cfg["destinationTable"] = {"projectId": project, "datasetId": ANON_DATASET,
                                           "tableId": "anon" + hashlib.sha1(f"{project}/{job_id}".encode()).hexdigest()}
            now = int(time.time() * 1000)
            job["table"] = {"tableReference": dict(cfg["destinationTable"]), "schema": fields, "numRows": len(rows),
                            "numBytes": 0, "creationTime": now, "lastModifiedTime": now, "location": location}
            stats = resource["statistics"]
            stats.update({"endTime": str(now), "totalBytesProcessed": "0",
                          "query": {"totalBytesProcessed": "0", "totalBytesBilled": "0", "cacheHit": False,
                                    "statementType": "SELECT", "schema": {"fields": _schema_out(fields)},
                                    "totalSlotMs": "0"}})
            resource["status"] = {"state": "DONE"}
        except BqError as e:
            job["error"] = e
            resource["statistics"]["endTime"] = str(int(time.time() * 1000))
            resource["status"] = {"state": "DONE", "errorResult": e.item(), "errors": [e.item()]}
        return job

    def _run_script(self, job: dict, project: str, job_id: str, location: str, cfg: dict, sql: str,
                    dry_run: bool) -> bool:
        """DML statements and multi-statement scripts (bq_script.py); False for a single SELECT,
        which the caller runs. The job ends DONE (with its errorResult if a statement failed)."""
        try:
            statements = bq_script.parse(sql)
        except bq_script.DmlError:
            return False  # the SELECT path reports the syntax error as it always has
        if not statements or not bq_script.is_script_or_dml(statements):
            return False
        resource = job["resource"]
        try:
            if cfg.get("destinationTable"):
                raise BqError("INVALID_ARGUMENT", "Cannot set destination table in jobs with DML statements "
                                                  "or scripts", "invalid")
            default_project = (cfg.get("defaultDataset") or {}).get("projectId") or project
            script = bq_script.Script(self.wh, sql, default_project=default_project,
                                      default_dataset=cfg.get("defaultDataset"), params=_params(cfg))
            result = script.run(dry_run=dry_run)
        except bq_script.DmlError as e:
            raise BqError(e.code, e.message, e.reason or ("notFound" if e.code == "NOT_FOUND" else "invalidQuery"),
                          "query" if e.code == "INVALID_ARGUMENT" else None) from None
        now = int(time.time() * 1000)
        q = {"totalBytesProcessed": "0", "totalBytesBilled": "0", "cacheHit": False,
             "statementType": result.statement_type, "totalSlotMs": "0"}
        stats = resource["statistics"]
        stats.update({"endTime": str(now), "totalBytesProcessed": "0", "query": q})
        last = result.last
        if not result.script and last.is_dml and not dry_run:
            q.update(_dml_statistics(last))
        if result.script:
            stats["numChildJobs"] = str(len(result.statements))
            if not dry_run:
                self._child_jobs(project, job_id, location, result)
        if last.statement_type == "SELECT" and not dry_run:
            job["schema"], job["rows"] = last.fields, last.rows
            q["schema"] = {"fields": _schema_out(last.fields)}
            cfg["destinationTable"] = {"projectId": project, "datasetId": ANON_DATASET,
                                       "tableId": "anon" + hashlib.sha1(f"{project}/{job_id}".encode()).hexdigest()}
            job["table"] = {"tableReference": dict(cfg["destinationTable"]), "schema": last.fields,
                            "numRows": len(last.rows), "numBytes": 0, "creationTime": now, "lastModifiedTime": now,
                            "location": location}
        else:
            job["dml"] = {k: q[k] for k in ("numDmlAffectedRows", "dmlStats") if k in q}
        resource["status"] = {"state": "DONE"}
        return True

    def _child_jobs(self, project: str, parent_id: str, location: str, result) -> None:
        """One child job per statement, as BigQuery makes for scripts (jobs.list?parentJobId=)."""
        base = "script_job_" + hashlib.sha1(f"{project}/{parent_id}".encode()).hexdigest()[:32]
        children = []
        for i, st in enumerate(result.statements):
            cfg = {"query": st.sql, "useLegacySql": False}
            r = self._new_job(project, f"{base}_{i}", location, cfg, {})
            q = {"totalBytesProcessed": "0", "totalBytesBilled": "0", "cacheHit": False,
                 "statementType": st.statement_type, "totalSlotMs": "0"}
            if st.is_dml:
                q.update(_dml_statistics(st))
            r["statistics"].update({"endTime": r["statistics"]["startTime"], "totalBytesProcessed": "0", "query": q,
                                    "parentJobId": parent_id,
                                    "scriptStatistics": {"evaluationKind": "STATEMENT",
                                                         "stackFrames": [{"text": st.sql}]}})
            r["status"] = {"state": "DONE"}
            child = {"resource": r, "schema": st.fields, "rows": st.rows, "table": None, "error": None}
            if st.statement_type != "SELECT":
                child["dml"] = {k: q[k] for k in ("numDmlAffectedRows", "dmlStats") if k in q}
            children.append(((project, f"{base}_{i}"), child))
        with self.lock:
            for key, child in children:
                self.jobs[key] = child
            while len(self.jobs) > MAX_JOBS:
                self.jobs.popitem(last=False)

    def _write_destination(self, dest: dict, cfg: dict, fields: list[dict], rows: list[dict]) -> None:
        wd = (cfg.get("writeDisposition") or "WRITE_EMPTY").upper()
        cd = (cfg.get("createDisposition") or "CREATE_IF_NEEDED").upper()
        mode = {"WRITE_EMPTY": "error_if_nonempty", "WRITE_TRUNCATE": "truncate", "WRITE_APPEND": "append"}.get(wd)
        if mode is None:
            raise BqError("INVALID_ARGUMENT", f"Invalid writeDisposition {wd}")
        p, d, t = dest.get("projectId"), dest.get("datasetId"), dest.get("tableId")
        try:
            if cd == "CREATE_NEVER" and self.wh.get_table(p, d, t) is None:
                raise BqError("NOT_FOUND", f"Not found: Table {p}:{d}.{t}")
            self.wh.write_table(p, d, t, fields, [rows], if_exists=mode)
        except BqError:
            raise
        except Exception as e:
            raise _from_warehouse(e) from None

    def _job(self, project: str, job_id: str) -> dict:
        with self.lock:
            job = self.jobs.get((project, job_id))
        if job is None:
            raise BqError("NOT_FOUND", f"Not found: Job {project}:{job_id}")
        return job

    def insert_job(self, request: Request, project: str) -> Response:
        body = _body(request)
        ref = body.get("jobReference") or {}
        job_id = ref.get("jobId") or f"job_{secrets.token_urlsafe(18).replace('-', '_')}"
        if not JOB_ID_RE.match(job_id):
            raise BqError("INVALID_ARGUMENT", f"Invalid job ID \"{job_id[:100]}\". Job IDs must be alphanumeric "
                                              "(plus underscores and dashes) and must be at most 1024 characters long.")
        config = body.get("configuration") or {}
        if "query" not in config:
            kinds = [k for k in ("load", "copy", "extract") if k in config]
            raise BqError("UNIMPLEMENTED" if kinds else "INVALID_ARGUMENT",
                          f"The local BigQuery emulator runs only query jobs (got {', '.join(kinds) or 'none'}).")
        extra = {k: v for k, v in config.items() if k in ("labels", "dryRun", "jobTimeoutMs")}
        location = ref.get("location") or "US"
        job = self._run_query(project, job_id, location, config["query"], extra, dry_run=_truthy(config.get("dryRun")))
        if job["error"] is not None and _truthy(config.get("dryRun")):
            raise job["error"]  # a dry run creates no job: BigQuery answers an invalid one with the HTTP error
        return _json(job["resource"])

    def get_job(self, request: Request, project: str, job_id: str) -> Response:
        return _json(self._job(project, job_id)["resource"])

    def list_jobs(self, request: Request, project: str) -> Response:
        parent = request.args.get("parentJobId")
        with self.lock:
            jobs = [j["resource"] for (p, _), j in reversed(self.jobs.items()) if p == project]
        if parent:
            jobs = [r for r in jobs if r["statistics"].get("parentJobId") == parent]
        items = []
        for r in jobs:
            item = {"kind": "bigquery#job", "id": r["id"], "jobReference": r["jobReference"],
                    "state": r["status"]["state"],
                    "status": r["status"], "statistics": r["statistics"], "configuration": r["configuration"],
                    "user_email": r["user_email"]}
            if "errorResult" in r["status"]:
                item["errorResult"] = r["status"]["errorResult"]
            items.append(item)
        return _json(self._page(request, items, "jobs", {"kind": "bigquery#jobList"}))

    def cancel_job(self, request: Request, project: str, job_id: str) -> Response:
        # Query jobs here are done when inserted: cancelling a finished job is a no-op, as in BigQuery.
        return _json({"kind": "bigquery#jobCancelResponse", "job": self._job(project, job_id)["resource"]})

    def _results(self, job: dict, request_args: dict, offset: int, kind: str) -> dict:
        if job["error"] is not None:
            raise job["error"]
        r = job["resource"]
        if job.get("dml") is not None:  # DML (or a script not ending in a SELECT): counts, no rows
            out = {"kind": kind, "jobReference": r["jobReference"], "jobComplete": True,
                   "totalBytesProcessed": "0", "cacheHit": False, "etag": _etag([r["id"], "dml"]),
                   "queryId": r["jobReference"]["jobId"], "location": r["jobReference"]["location"], **job["dml"]}
            for k in ("creationTime", "startTime", "endTime"):
                if k in r["statistics"]:
                    out[k] = r["statistics"][k]
            return out
        limit = _max_results(request_args.get("maxResults"))
        rows = job["rows"][offset:offset + limit]
        total = len(job["rows"])
        out = {"kind": kind, "jobReference": r["jobReference"], "jobComplete": True,
               "schema": {"fields": _schema_out(job["schema"])}, "totalRows": str(total),
               "totalBytesProcessed": "0", "cacheHit": False, "etag": _etag([r["id"], total])}
        out["queryId"] = r["jobReference"]["jobId"]
        out["location"] = r["jobReference"]["location"]
        stats = r["statistics"]
        for k in ("creationTime", "startTime", "endTime"):
            if k in stats:
                out[k] = stats[k]
        int64_ts = _truthy(request_args.get("useInt64Timestamp"))
        if rows or limit:
            out["rows"] = encode_rows(rows, job["schema"], int64_ts)
        if offset + len(rows) < total:
            out["pageToken"] = _token(offset + len(rows))
        return out

    def get_query_results(self, request: Request, project: str, job_id: str) -> Response:
        job = self._job(project, job_id)
        args = {"maxResults": request.args.get("maxResults"),
                "useInt64Timestamp": request.args.get("formatOptions.useInt64Timestamp")}
        return _json(self._results(job, args, _offset(request), "bigquery#getQueryResultsResponse"))

    def query(self, request: Request, project: str) -> Response:
        body = _body(request)
        cfg = {k: v for k, v in body.items() if k in (
            "query", "useLegacySql", "defaultDataset", "queryParameters", "parameterMode", "useQueryCache",
            "maximumBytesBilled", "connectionProperties", "createSession")}
        job_id = f"job_{secrets.token_urlsafe(18).replace('-', '_')}"
        extra = {k: body[k] for k in ("labels",) if k in body}
        dry = _truthy(body.get("dryRun"))
        job = self._run_query(project, job_id, body.get("location") or "US", cfg, extra, dry_run=dry)
        if job["error"] is not None:
            raise job["error"]  # jobs.query answers a failed query with the HTTP error, as BigQuery does
        args = {"maxResults": body.get("maxResults"),
                "useInt64Timestamp": (body.get("formatOptions") or {}).get("useInt64Timestamp")}
        out = self._results(job, args, 0, "bigquery#queryResponse")
        if dry:
            out.pop("rows", None)
            out.pop("pageToken", None)
        return _json(out)

    # helpers ----------------------------------------------------------------------------------------
    def _page(self, request: Request, items: list, key: str, base: dict) -> dict:
        offset = _offset(request)
        limit = _max_results(request.args.get("maxResults"), default=1000) or 1000
        page = items[offset:offset + limit]
        out = dict(base)
        out["etag"] = _etag([key, len(items), offset])
        if page:
            out[key] = page
        if offset + len(page) < len(items):
            out["nextPageToken"] = _token(offset + len(page))
        return out


def _dml_statistics(st) -> dict:
    """statistics.query's numDmlAffectedRows and dmlStats (int64 as strings) of one DML statement."""
    stats = {}
    if st.statement_type == "INSERT":
        stats["insertedRowCount"] = str(st.inserted)
    else:
        stats["deletedRowCount"] = str(st.deleted)
    return {"numDmlAffectedRows": str(st.affected), "dmlStats": stats}


def _checked_access(body: dict) -> list[dict] | None:
    """A dataset body's `access`, validated (None when absent); a 400 whose location names the bad field."""
    if body.get("access") is None:
        return None
    try:
        return iam.check_access(body["access"])
    except iam.PolicyError as e:
        raise BqError("INVALID_ARGUMENT", f"Invalid value at '{e.field}': {e.message}", "invalid", e.field) from None


def _checked_labels(body: dict) -> dict | None:
    labels = body.get("labels")
    if labels is not None and not (isinstance(labels, dict) and all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in labels.items())):
        raise BqError("INVALID_ARGUMENT", "Invalid value at 'labels': a map of strings to strings", "invalid",
                      "labels")
    return labels


def _body(request: Request) -> dict:
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BqError("INVALID_ARGUMENT", f"Invalid JSON payload received. {e}", "parseError") from None
    if not isinstance(body, dict):
        raise BqError("INVALID_ARGUMENT", "Invalid JSON payload received. Expected an object.", "parseError")
    return body


# -- discovery documents ---------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _bundled_discovery(name: str) -> str | None:
    import googleapiclient
    path = os.path.join(os.path.dirname(googleapiclient.__file__), "discovery_cache", "documents", f"{name}.json")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def discovery_document(api: str, version: str, host_url: str) -> Response:
    raw = _bundled_discovery(f"{api}.{version}")
    if raw is None:
        raise BqError("NOT_FOUND", f"No discovery document for {api} {version} in this emulator.")
    doc = json.loads(raw)
    doc["rootUrl"] = host_url
    doc["mtlsRootUrl"] = host_url
    doc["baseUrl"] = host_url + doc.get("servicePath", "")
    return _json(doc)


_SERVICE_LOCK = threading.Lock()


def _service(app) -> BigQueryService:
    with _SERVICE_LOCK:
        svc = getattr(app, "_bigquery_service", None)
        if svc is None:
            svc = app._bigquery_service = BigQueryService(app)
        return svc


def handle(app, request: Request) -> Response:
    try:
        return _handle(app, request)
    except BqError as e:
        return _json(e.body(), e.http)
    except ApiError as e:
        err = BqError(e.status if e.status in REASONS else "INTERNAL", e.message)
        return _json(err.body(), e.http)


def _handle(app, request: Request) -> Response:
    path = request.path
    if path.startswith("/$discovery/"):  # bq --api=URL fetches URL/$discovery/rest?version=v2
        version = request.args.get("version", "v2")
        api = "bigquery" if version == "v2" else "healthcare"
        return discovery_document(api, version, request.host_url)
    if m := re.match(r"^/discovery/v1/apis/([a-z]+)/([a-z0-9]+)/rest$", path):
        if m.group(1) not in ("bigquery", "healthcare", "cloudresourcemanager"):
            raise BqError("NOT_FOUND", f"No discovery document for {m.group(1)} in this emulator.")
        return discovery_document(m.group(1), m.group(2), request.host_url)
    m = re.match(r"^/bigquery/v2/(.*?)/?$", path)
    if not m:
        raise BqError("NOT_FOUND", f"The requested URL {path} was not found on this server.")
    app.authenticate(request)
    rest = m.group(1)
    svc = _service(app)
    matched_path = False
    for method, rx, fn in ROUTES:
        mm = rx.match(rest)
        if mm:
            matched_path = True
            if method == request.method:
                return getattr(svc, fn)(request, *mm.groups())
    if matched_path:
        raise BqError("NOT_FOUND", f"Method {request.method} is not supported on {path} by the local BigQuery "
                                   "emulator.")
    raise BqError("NOT_FOUND", f"The requested URL {path} was not found on this server.")
