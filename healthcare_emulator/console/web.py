"""The console's pages: routing, same-origin protection, and the views over REST answers.

Every page is a GET that only reads; the two actions that change something (start an export, run SQL)
are POSTs that must carry the page's token: an HMAC, under a secret made when the process starts, of a
random per-browser cookie (SameSite=Strict, HttpOnly). A cross-site page cannot read the token, and a
POST whose Origin or Referer names another site is refused as well. Templates are Jinja2 with
autoescaping on: every value from the API, the DICOM data or the person is escaped.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import mimetypes
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from jinja2 import Environment, FileSystemLoader
from werkzeug.utils import redirect
from werkzeug.wrappers import Request, Response

from . import names
from .rest import Rest, RestError, healthcare_parents
from .service import TERMINAL, Service, Settings, remedy

log = logging.getLogger("healthcare_emulator.console")
HERE = Path(__file__).resolve().parent
COOKIE = "hc_console"
PREVIEW_ROWS = 50
RESULT_ROWS = 1000
REFRESH_S = 2

EXAMPLES = {  # "Exporting DICOM metadata to BigQuery" / "Querying and analyzing DICOM data in BigQuery"
    "1": ("DICOMweb paths of a patient's instances",
          "SELECT CONCAT('/dicomWeb/studies/', StudyInstanceUID, '/series/', SeriesInstanceUID, "
          "'/instances/', SOPInstanceUID) as DICOMwebPath\nFROM `{table}`\nWHERE PatientID = '19045';"),
    "2": ("The most recent studies",
          "SELECT MIN(CONCAT(StudyDate, ' ', StudyTime)) as StudyDateTime, MIN(PatientID) as PatientID, "
          "StudyInstanceUID, COUNT(*) as InstanceCount\nFROM `{table}` AS dicom\nGROUP BY StudyInstanceUID\n"
          "ORDER BY StudyDateTime DESC\nLIMIT 10;"),
}

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class Forbidden(Exception):
    pass


class Console:
    def __init__(self, app):
        self.app = app
        self.secret = secrets.token_bytes(32)  # per process: tokens die with it
        self.env = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=True,
                               trim_blocks=True, lstrip_blocks=True)
        self.env.filters["tojson_compact"] = lambda v: json.dumps(v, ensure_ascii=False, separators=(",", ":"))
        self.env.globals["qs"] = lambda **kw: urlencode({k: v for k, v in kw.items() if v not in (None, "")})
        self.settings = Settings()
        self.service = Service(self.settings) if self.settings.enabled else None
        if self.service:
            self.service.start()
        self.extra_projects = [p for p in os.environ.get("HC_CONSOLE_PROJECTS", "").split(",") if p]
        self.routes = {
            ("GET", ""): self.datasets_page, ("GET", "/"): self.datasets_page,
            ("GET", "/datasets"): self.datasets_page,
            ("GET", "/dataset"): self.dataset_page,
            ("GET", "/operations"): self.operations_page,
            ("GET", "/export"): self.export_page, ("POST", "/export"): self.export_post,
            ("GET", "/bigquery"): self.bigquery_page,
            ("GET", "/bigquery/table"): self.table_page,
            ("GET", "/bigquery/query"): self.query_page, ("POST", "/bigquery/query"): self.query_post,
            ("GET", "/service"): self.service_page,
        }

    # -- WSGI-ish entry ---------------------------------------------------------------------------------------
    def __call__(self, request: Request) -> Response:
        sub = request.path[len("/console"):]
        sid = request.cookies.get(COOKIE)
        new_sid = None
        if not sid or len(sid) != 43:
            sid = new_sid = secrets.token_urlsafe(32)
        request.environ["console.sid"] = sid
        try:
            if sub.startswith("/static/") and request.method in ("GET", "HEAD"):
                resp = self.static(sub[len("/static/"):])
            else:
                handler = self.routes.get((request.method, sub))
                if handler is None:
                    if any(path == sub for _, path in self.routes):
                        resp = self.error_page(request, 405, "Method not allowed",
                                               f"{request.method} is not allowed here.")
                        resp.headers["Allow"] = ", ".join(m for m, p in self.routes if p == sub)
                    else:
                        resp = self.error_page(request, 404, "Not found", f"No console page at {request.path}.")
                else:
                    if request.method == "POST":
                        self.check_same_origin(request)
                    resp = handler(request)
        except Forbidden as e:
            resp = self.error_page(request, 403, "Forbidden", str(e))
        except RestError as e:
            resp = self.error_page(request, e.http if 400 <= e.http < 600 else 502, "The API answered an error",
                                   f"{e.http} {e.status}: {e.message}")
        except Exception as e:  # noqa: BLE001 - a page, never a crash
            log.exception("console error on %s %s", request.method, request.path)
            resp = self.error_page(request, 500, "Console error", f"{type(e).__name__}: {e}")
        for k, v in SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
        if new_sid:
            resp.set_cookie(COOKIE, new_sid, path="/console", httponly=True, samesite="Strict")
        return resp

    # -- protection -------------------------------------------------------------------------------------------
    def token(self, request: Request) -> str:
        return hmac.new(self.secret, request.environ["console.sid"].encode(), hashlib.sha256).hexdigest()

    def check_same_origin(self, request: Request) -> None:
        origin = request.headers.get("Origin")
        own = request.host_url.rstrip("/")
        if origin is not None and origin != own:
            raise Forbidden(f"This request came from another site ({origin}): refused.")
        referer = request.headers.get("Referer")
        if origin is None and referer:
            parts = urlsplit(referer)
            if f"{parts.scheme}://{parts.netloc}" != own:
                raise Forbidden("This request came from another site: refused.")
        sent = request.form.get("csrf", "")
        if not request.cookies.get(COOKIE) or not hmac.compare_digest(sent, self.token(request)):
            raise Forbidden("The form's token is missing or out of date: reload the page and try again.")

    # -- helpers ---------------------------------------------------------------------------------------------
    def rest(self, request: Request) -> Rest:
        return Rest(self.app, request.host_url, getattr(self.app.options, "require_token", None))

    def render(self, request: Request, template: str, status: int = 200, **ctx) -> Response:
        ctx.setdefault("refresh", None)
        html = self.env.get_template(template).render(
            csrf=self.token(request), service_on=self.service is not None, **ctx)
        return Response(html, status=status, content_type="text/html; charset=utf-8")

    def error_page(self, request: Request, status: int, title: str, message: str) -> Response:
        return self.render(request, "error.html", status=status, title=title, message=message, nav="")

    def static(self, name: str) -> Response:
        files = {p.name: p for p in (HERE / "static").iterdir() if p.is_file()}
        if name not in files:
            return Response("not found", status=404, content_type="text/plain")
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        resp = Response(files[name].read_bytes(), content_type=ctype)
        resp.headers["Cache-Control"] = "max-age=300"
        return resp

    def known_projects(self, rest: Rest) -> list[str]:
        projects = set(self.extra_projects)
        projects.update(p.split("/")[1] for p in healthcare_parents(self.app))
        try:
            projects.update(rest.bq_projects())
        except RestError:
            pass
        return sorted(projects)

    # -- Healthcare: datasets ------------------------------------------------------------------------------
    def datasets_page(self, request: Request) -> Response:
        rest = self.rest(request)
        want = request.args.get("project") or None
        parents = healthcare_parents(self.app)
        for p in self.extra_projects:  # settings may name projects whose datasets live in us-central1
            parents.append(f"projects/{p}/locations/us-central1")
        rows = []
        for parent in sorted(set(parents)):
            if not names.parent_name(parent):
                continue
            project, location = parent.split("/")[1], parent.split("/")[3]
            if want and project != want:
                continue
            for ds in rest.datasets(parent):
                stores = rest.stores(ds["name"])
                rows.append({"name": ds["name"], "id": ds["name"].rsplit("/", 1)[1], "project": project,
                             "location": location, "stores": [s["name"].rsplit("/", 1)[1] for s in stores]})
        projects = sorted({p.split("/")[1] for p in parents if names.parent_name(p)})
        return self.render(request, "datasets.html", nav="datasets", rows=rows, projects=projects, project=want)

    def dataset_page(self, request: Request) -> Response:
        name = request.args.get("name", "")
        if not names.dataset_name(name):
            return self.error_page(request, 400, "Bad dataset name", f"Not a dataset name: {name}")
        rest = self.rest(request)
        stores = []
        for s in rest.stores(name):
            stores.append({"name": s["name"], "id": s["name"].rsplit("/", 1)[1],
                           "instances": rest.instance_count(s["name"]), "labels": s.get("labels") or {}})
        return self.render(request, "dataset.html", nav="datasets", dataset=name, dataset_id=name.rsplit("/", 1)[1],
                           stores=stores, tab="stores")

    # -- Healthcare: operations ----------------------------------------------------------------------------
    def operations_page(self, request: Request) -> Response:
        name = request.args.get("dataset", "")
        if not names.dataset_name(name):
            return self.error_page(request, 400, "Bad dataset name", f"Not a dataset name: {name}")
        ops = [operation_view(o) for o in self.rest(request).operations(name)]
        running = any(not o["done"] for o in ops)
        return self.render(request, "operations.html", nav="datasets", dataset=name,
                           dataset_id=name.rsplit("/", 1)[1], ops=ops, tab="operations",
                           started=request.args.get("started"), refresh=REFRESH_S if running else None)

    # -- Healthcare: export ---------------------------------------------------------------------------------
    def export_page(self, request: Request, *, form: dict | None = None, error: str | None = None,
                    status: int = 200) -> Response:
        src = form if form is not None else request.args
        store = src.get("store", "")
        if not names.store_name(store):
            return self.error_page(request, 400, "Bad DICOM store name", f"Not a DICOM store name: {store}")
        rest = self.rest(request)
        projects = self.known_projects(rest)
        project = src.get("project") or ""
        datasets: list[str] = []
        if project and names.bq_project(project):
            try:
                datasets = [d for d in rest.bq_datasets(project) if not d.startswith("_")]
            except RestError as e:
                error = error or e.message
        elif project:
            error = error or f"Not a BigQuery project ID: {project}"
        return self.render(request, "export.html", status=status, nav="datasets", store=store,
                           store_id=store.rsplit("/", 1)[1], dataset=store.split("/dicomStores/")[0],
                           projects=projects, project=project, datasets=datasets,
                           bq_dataset=src.get("bq_dataset", ""), table=src.get("table", ""),
                           disposition=src.get("write_disposition", "WRITE_EMPTY"),
                           filter_uri=src.get("filter_uri", ""), dispositions=names.WRITE_DISPOSITIONS,
                           error=error)

    def export_post(self, request: Request) -> Response:
        f = request.form
        store, project, ds, table = f.get("store", ""), f.get("project", ""), f.get("bq_dataset", ""), f.get("table", "")
        wd, filter_uri = f.get("write_disposition", ""), f.get("filter_uri", "").strip()
        if not names.store_name(store):
            return self.error_page(request, 400, "Bad DICOM store name", f"Not a DICOM store name: {store}")
        problem = None
        if not names.bq_project(project):
            problem = "Choose a project (Browse)."
        elif not names.bq_dataset(ds):
            problem = "Choose a dataset."
        elif p := names.table_name_problem(table):
            problem = p
        elif wd not in names.WRITE_DISPOSITIONS:
            problem = "Choose a write disposition."
        elif filter_uri and (p := names.gcs_uri_problem(filter_uri)):
            problem = p
        if problem:
            return self.export_page(request, form=f, error=problem, status=400)
        body: dict = {"bigqueryDestination": {"tableUri": f"bq://{project}.{ds}.{table}", "writeDisposition": wd}}
        if filter_uri:
            body["filterConfig"] = {"resourcePathsGcsUri": filter_uri}
        try:
            op = self.rest(request).export(store, body)
        except RestError as e:
            return self.export_page(request, form=f, error=f"{e.status or e.http}: {e.message}", status=400)
        dataset = store.split("/dicomStores/")[0]
        return redirect("/console/operations?" + urlencode({"dataset": dataset, "started": op.get("name", "")}),
                        code=303)

    # -- BigQuery -------------------------------------------------------------------------------------------
    def bigquery_page(self, request: Request) -> Response:
        rest = self.rest(request)
        projects = self.known_projects(rest)
        project = request.args.get("project") or (projects[0] if projects else "")
        tree = []
        if project:
            if not names.bq_project(project):
                return self.error_page(request, 400, "Bad project ID", f"Not a BigQuery project ID: {project}")
            for d in rest.bq_datasets(project):
                if not d.startswith("_"):
                    tree.append({"id": d, "tables": rest.bq_tables(project, d)})
        return self.render(request, "bigquery.html", nav="bigquery", projects=projects, project=project, tree=tree)

    def table_page(self, request: Request) -> Response:
        ref = request.args.get("ref", "")
        parts = names.split_table_ref(ref)
        if not parts:
            return self.error_page(request, 400, "Bad table", f"Not a table reference PROJECT.DATASET.TABLE: {ref}")
        rest = self.rest(request)
        t = rest.bq_table(*parts)
        fields = t.get("schema", {}).get("fields", [])
        data = rest.bq_rows(*parts, PREVIEW_ROWS)
        rows = [row_view(r, fields) for r in data.get("rows", [])]
        return self.render(request, "table.html", nav="bigquery", ref=ref, parts=parts, fields=fields,
                           num_rows=int(t.get("numRows", 0)), rows=rows, columns=[f["name"] for f in fields])

    def query_page(self, request: Request, *, sql: str | None = None, result=None, error=None,
                   status: int = 200) -> Response:
        ref = request.values.get("ref", "")
        parts = names.split_table_ref(ref)
        table = ".".join(parts) if parts else "PROJECT_ID.BIGQUERY_DATASET.BIGQUERY_TABLE"
        example = request.args.get("example")
        if sql is None:
            sql = EXAMPLES[example][1].format(table=table) if example in EXAMPLES else ""
        examples = [(k, title) for k, (title, _) in EXAMPLES.items()]
        return self.render(request, "query.html", status=status, nav="bigquery", ref=ref if parts else "",
                           sql=sql, examples=examples, result=result, error=error,
                           project=request.values.get("project", ""))

    def query_post(self, request: Request) -> Response:
        sql = request.form.get("sql", "")
        ref = request.form.get("ref", "")
        parts = names.split_table_ref(ref)
        project = parts[0] if parts else request.form.get("project", "")
        if not project:
            projects = self.known_projects(self.rest(request))
            project = projects[0] if projects else "emulator-project"
        if not names.bq_project(project):
            return self.query_page(request, sql=sql, error=f"Not a BigQuery project ID: {project}", status=400)
        if not sql.strip():
            return self.query_page(request, sql=sql, error="Enter a query.", status=400)
        try:
            ans = self.rest(request).bq_query(project, sql, RESULT_ROWS)
        except RestError as e:
            return self.query_page(request, sql=sql, error=e.message, status=400)
        fields = ans.get("schema", {}).get("fields", [])
        result = {"columns": [f["name"] for f in fields], "rows": [row_view(r, fields) for r in ans.get("rows", [])],
                  "total": int(ans.get("totalRows", 0) or 0)}
        return self.query_page(request, sql=sql, result=result)

    # -- the service ----------------------------------------------------------------------------------------
    def service_page(self, request: Request) -> Response:
        if self.service is None:
            return self.render(request, "service.html", nav="service", on=False, requests=[], events=[],
                               error=None, events_error=None, settings=self.settings)
        error = None
        docs = []
        try:
            docs = self.service.ledger()
        except Exception as e:  # noqa: BLE001 - shown on the page
            error = f"The ledger cannot be read: {type(e).__name__}: {e}"
        reqs = [ledger_view(d) for d in docs]
        events = [event_view(e) for e in list(self.service.events)]
        return self.render(request, "service.html", nav="service", on=True, requests=reqs, events=events,
                           error=error, events_error=self.service.events_error, settings=self.settings,
                           refresh=REFRESH_S)


# -- views: REST answers -> what a template shows ------------------------------------------------------------
def _int(v) -> int:
    try:
        return int(v or 0)
    except (TypeError, ValueError):
        return 0


def safe_url(url) -> str | None:
    """Only http(s) URLs become links: a javascript: or data: URL from anywhere is shown as text."""
    if isinstance(url, str) and urlsplit(url).scheme in ("http", "https"):
        return url
    return None


def operation_view(op: dict) -> dict:
    meta = op.get("metadata") or {}
    c = meta.get("counter") or {}
    success, failure, pending = _int(c.get("success")), _int(c.get("failure")), _int(c.get("pending"))
    selected = success + failure + pending
    done = bool(op.get("done"))
    err = op.get("error") if isinstance(op.get("error"), dict) else None
    method = str(meta.get("apiMethodName", ""))
    return {"name": op.get("name", ""), "id": str(op.get("name", "")).rsplit("/", 1)[-1], "done": done,
            "error": err, "ok": done and not err, "method": method.rsplit(".", 1)[-1] or method,
            "success": success, "failure": failure, "pending": pending, "selected": selected,
            "percent": int(100 * (success + failure) / selected) if selected else 0,
            "createTime": meta.get("createTime"), "endTime": meta.get("endTime"),
            "logsUrl": safe_url(meta.get("logsUrl")), "logsText": meta.get("logsUrl")}


def _decode(cell, field: dict):
    v = cell.get("v") if isinstance(cell, dict) else cell
    if field.get("mode") == "REPEATED":
        item = {**field, "mode": "NULLABLE"}
        return [_decode(x, item) for x in (v or [])]
    if v is None:
        return None
    if field.get("type") in ("RECORD", "STRUCT"):
        return {f["name"]: _decode(c, f) for c, f in zip(v.get("f", []), field.get("fields", []))}
    if field.get("type") == "TIMESTAMP":
        try:
            return datetime.fromtimestamp(float(v), timezone.utc).isoformat().replace("+00:00", " UTC")
        except (TypeError, ValueError, OverflowError):
            return v
    return v


def _cell_text(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False, separators=(", ", ": "))
    return str(v)


def row_view(row: dict, fields: list[dict]) -> list[dict]:
    out = []
    for cell, f in zip(row.get("f", []), fields):
        v = _decode(cell, f)
        out.append({"text": _cell_text(v), "null": v is None})
    return out


def ledger_view(doc: dict) -> dict:
    counter = doc.get("counter") if isinstance(doc.get("counter"), dict) else {}
    err = doc.get("error") if isinstance(doc.get("error"), dict) else None
    req = doc.get("request") if isinstance(doc.get("request"), dict) else {}
    dest = req.get("bigqueryDestination") if isinstance(req.get("bigqueryDestination"), dict) else {}
    op = doc.get("operation") if isinstance(doc.get("operation"), str) else None
    dataset = op.split("/operations/")[0] if op and names.operation_name(op) else None
    return {"requestId": doc.get("requestId"), "state": doc.get("state"),
            "terminal": doc.get("state") in TERMINAL, "table": dest.get("tableUri") or doc.get("tableUri"),
            "disposition": dest.get("writeDisposition"), "store": doc.get("dicomStore"),
            "operation": op, "op_dataset": dataset,
            "counter": {k: _int(counter.get(k)) for k in ("success", "failure", "pending")},
            "error": err, "remedy": remedy(doc), "receivedAt": doc.get("receivedAt"),
            "updatedAt": doc.get("updatedAt"), "logsUrl": safe_url(doc.get("logsUrl"))}


def event_view(e: dict) -> dict:
    d = e.get("data") or {}
    attrs = e.get("attributes") or {}
    op = d.get("operation") if isinstance(d.get("operation"), str) else None
    return {"receivedAt": e.get("receivedAt"), "type": d.get("eventType") or attrs.get("eventType"),
            "requestId": d.get("requestId") or attrs.get("requestId"), "operation": op,
            "op_dataset": op.split("/operations/")[0] if op and names.operation_name(op) else None,
            "counter": d.get("counter"), "error": d.get("error"),
            "table": (d.get("bigqueryDestination") or {}).get("tableUri") if isinstance(
                d.get("bigqueryDestination"), dict) else attrs.get("tableUri")}
