"""The Cloud Healthcare API's REST surface (v1 and v1beta1), as a WSGI app.

Routes are matched on the path after the version prefix; resource ids are checked before
anything touches state, so no client-chosen string ever reaches the filesystem.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

from werkzeug.wrappers import Request, Response

from . import messages
from .errors import ApiError, invalid, not_found
from .state import State

log = logging.getLogger("healthcare_emulator")

ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,256}$")
PROJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,127}$")
LOCATION_RE = re.compile(r"^[a-z0-9][a-z0-9\-]{0,62}$")
LABEL_KEY_RE = re.compile(r"^[\w\-]{1,63}$")
LABEL_VALUE_RE = re.compile(r"^[\w\-]{0,63}$")

SEG = r"([^/:]+)"
DATASETS = re.compile(rf"^projects/{SEG}/locations/{SEG}/datasets$")
DATASET = re.compile(rf"^projects/{SEG}/locations/{SEG}/datasets/{SEG}$")
STORES = re.compile(rf"^projects/{SEG}/locations/{SEG}/datasets/{SEG}/dicomStores$")
STORE = re.compile(rf"^projects/{SEG}/locations/{SEG}/datasets/{SEG}/dicomStores/{SEG}(:export|:import|:getDICOMStoreMetrics)?$")
DICOMWEB = re.compile(rf"^projects/{SEG}/locations/{SEG}/datasets/{SEG}/dicomStores/{SEG}/dicomWeb(?:/(.*))?$")
OPERATIONS = re.compile(rf"^projects/{SEG}/locations/{SEG}/datasets/{SEG}/operations$")
OPERATION = re.compile(rf"^projects/{SEG}/locations/{SEG}/datasets/{SEG}/operations/{SEG}(:cancel)?$")

MAX_JSON_BODY = 10 * 1024 * 1024


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _check_ids(match: re.Match) -> tuple[str, ...]:
    parts = match.groups()
    project, location, *rest = [p for p in parts if p is not None and not p.startswith(":")]
    if not PROJECT_RE.match(project) or project in (".", ".."):
        raise invalid(f"Invalid project ID {project!r}.", "name")
    if not LOCATION_RE.match(location):
        raise invalid(f"Invalid location {location!r}.", "name")
    for r in rest:
        if not ID_RE.match(r) or r in (".", ".."):
            raise invalid(f"Invalid resource ID {r!r}: it must match [A-Za-z0-9_.-]{{1,256}}.", "name")
    return (project, location, *rest)


@dataclass
class Options:
    """Server behaviour knobs (flags or HC_EMULATOR_* environment variables, see __main__)."""
    require_token: str | None = None
    # Fault injection: method name ("export", "operations.get", ...) -> rate in [0, 1] of 429/503 answers.
    fault_rates: dict = field(default_factory=dict)
    latency_s: float = 0.0
    max_running_operations: int = 0          # per project; 0 = no limit
    export_instances_per_s: float = 0.0      # slow-export mode; 0 = full speed
    export_workers: int | None = None        # processes mapping instances; None = one per core, 0/1 = in-thread
    verbose: bool = False


class App:
    def __init__(self, data_dir, options: Options | None = None):
        from .operations import Operations  # local: keeps the import graph one-way

        self.options = options or Options()
        self.state = State(data_dir)
        self.operations = Operations(self)
        self.notifier = None
        from .streaming import Streamer  # streamConfigs: stored instances appended to BigQuery tables
        self.streamer = Streamer(self)
        if os.environ.get("PUBSUB_EMULATOR_HOST"):
            from .notifications import Notifier  # store notifications through Google's Pub/Sub emulator
            self.notifier = Notifier(self)

    # -- helpers passed to dicomweb -----------------------------------------------------------
    def base_url(self, request: Request) -> str:
        return request.host_url + request.environ.get("hc.version", "v1") + "/"

    def notify(self, store: str, action: str, instance: dict) -> None:
        try:
            if self.notifier is not None:
                self.notifier(store, action, instance)
        except Exception:  # storing must succeed even when a notification cannot be sent
            log.exception("notification for %s failed", store)
        try:
            self.streamer(store, action, instance)
        except Exception:  # nor when it cannot be streamed
            log.exception("streaming for %s failed", store)

    # -- WSGI ----------------------------------------------------------------------------------
    def __call__(self, environ, start_response):
        request = Request(environ)
        try:
            response = self.dispatch(request)
        except ApiError as e:
            response = json_response(e.body(), e.http)
        except Exception as e:  # never let one request take the server down
            log.exception("internal error on %s %s", request.method, request.path)
            err = ApiError("INTERNAL", f"Internal error: {type(e).__name__}")
            response = json_response(err.body(), err.http)
        return response(environ, start_response)

    def dispatch(self, request: Request) -> Response:
        path = request.path
        if path in ("/", "/healthz"):
            return json_response({"status": "ok"})
        if path.startswith("/logs/"):
            return self.operations.logs_response(path[len("/logs/"):])
        if path.startswith("/emulator/"):
            return self.emulator_endpoint(request, path[len("/emulator/"):])
        if path.startswith(("/bigquery/", "/discovery/", "/$discovery/")):  # $discovery: bq --api=URL
            from . import bigquery_api  # the BigQuery REST surface over the same warehouse
            return bigquery_api.handle(self, request)
        m = re.match(r"^/(v1|v1beta1|v1alpha2)/(.*)$", path)  # v1alpha2: gcloud alpha healthcare
        if not m:
            raise ApiError("NOT_FOUND", f"The requested URL {path} was not found on this server.")
        version, rest = m.groups()
        request.environ["hc.version"] = version
        self.authenticate(request)
        return self.route(request, version, rest.rstrip("/"))

    def authenticate(self, request: Request) -> None:
        want = self.options.require_token
        if not want:
            return
        got = request.headers.get("Authorization", "")
        if got != f"Bearer {want}":
            raise ApiError("UNAUTHENTICATED", "Request had invalid authentication credentials. Expected OAuth 2 "
                           "access token, login cookie or other valid authentication credential.")

    def route(self, request: Request, version: str, rest: str) -> Response:
        method = request.method
        if m := DICOMWEB.match(rest):
            p, l, d, s, sub = m.groups()
            _check_ids(DICOMWEB.match(f"projects/{p}/locations/{l}/datasets/{d}/dicomStores/{s}/dicomWeb"))
            store = f"projects/{p}/locations/{l}/datasets/{d}/dicomStores/{s}"
            self.require_store(store)
            if method == "GET" and sub and ":" in sub:  # studies/X:getStudyMetrics, .../series/Y:getSeriesMetrics
                from . import metrics
                if (out := metrics.dicomweb_metrics(self, store, sub.strip("/"))) is not None:
                    return json_response(out)
            from . import dicomweb
            return dicomweb.handle(self, store, method, (sub or "").strip("/"), request)
        if m := DATASETS.match(rest):
            p, l = _check_ids(m)
            parent = f"projects/{p}/locations/{l}"
            if method == "POST":
                return self.create_dataset(request, version, parent)
            if method == "GET":
                return self.list_resources(request, "datasets", "parent", parent, "datasets")
        elif m := DATASET.match(rest):
            p, l, d = _check_ids(m)
            name = f"projects/{p}/locations/{l}/datasets/{d}"
            if method == "GET":
                return json_response(self.require_dataset(name))
            if method == "DELETE":
                return self.delete_dataset(name)
        elif m := STORES.match(rest):
            p, l, d = _check_ids(m)
            dataset = f"projects/{p}/locations/{l}/datasets/{d}"
            if method == "POST":
                return self.create_store(request, dataset)
            if method == "GET":
                self.require_dataset(dataset)
                return self.list_resources(request, "stores", "dataset", dataset, "dicomStores")
        elif m := STORE.match(rest):
            p, l, d, s = _check_ids(m)
            name = f"projects/{p}/locations/{l}/datasets/{d}/dicomStores/{s}"
            if m.group(5) == ":export":
                if method == "POST":
                    return self.operations.start_export(request, version, name, read_json(request))
            elif m.group(5) == ":import":
                if method == "POST":
                    from . import imports
                    return imports.start_import(self, request, version, name, read_json(request))
            elif m.group(5):  # :getDICOMStoreMetrics
                if method == "GET":
                    from . import metrics
                    return json_response(metrics.store_metrics(self, name))
            elif method == "GET":
                return json_response(self.require_store(name))
            elif method == "PATCH":
                return self.patch_store(request, name)
            elif method == "DELETE":
                return self.delete_store(name)
        elif m := OPERATIONS.match(rest):
            p, l, d = _check_ids(m)
            dataset = f"projects/{p}/locations/{l}/datasets/{d}"
            if method == "GET":
                self.require_dataset(dataset)
                return self.operations.list_response(request, dataset)
        elif m := OPERATION.match(rest):
            p, l, d, o = _check_ids(m)
            name = f"projects/{p}/locations/{l}/datasets/{d}/operations/{o}"
            if m.group(5):  # :cancel
                if method == "POST":
                    messages.check(read_json(request), messages.CANCEL)
                    return self.operations.cancel_response(name)
            elif method == "GET":
                return self.operations.get_response(name)
        else:
            raise ApiError("NOT_FOUND", f"The requested URL /{version}/{rest} was not found on this server.")
        raise ApiError("NOT_FOUND", f"Method {method} is not supported on /{version}/{rest}.", http=405)

    # -- datasets ------------------------------------------------------------------------------
    def require_dataset(self, name: str) -> dict:
        ds = self.state.get_json("datasets", name)
        if ds is None:
            raise not_found(f"dataset not found: {name}")
        return ds

    def create_dataset(self, request: Request, version: str, parent: str) -> Response:
        dataset_id = request.args.get("datasetId", "")
        if not dataset_id:
            raise invalid("datasetId is required", "dataset_id")
        if not ID_RE.match(dataset_id) or dataset_id in (".", ".."):
            raise invalid(f"invalid dataset ID {dataset_id!r}: it must match [A-Za-z0-9_.-]{{1,256}}", "dataset_id")
        body = messages.check(read_json(request), messages.DATASET)
        name = f"{parent}/datasets/{dataset_id}"
        resource = {"name": name, "timeZone": body.get("timeZone", "UTC")}
        if "encryptionSpec" in body:
            resource["encryptionSpec"] = body["encryptionSpec"]
        with self.state.tx() as db:
            if db.execute("SELECT 1 FROM datasets WHERE name = ?", (name,)).fetchone():
                raise ApiError("ALREADY_EXISTS", f"already exists: {name}")
            db.execute("INSERT INTO datasets VALUES (?, ?, ?)", (name, parent, json.dumps(resource)))
        # datasets.create is a long-running operation that is done at once.
        op = self.operations.finished(name, version, "google.cloud.healthcare.{v}.dataset.DatasetService.CreateDataset",
                                      {"@type": f"type.googleapis.com/google.cloud.healthcare.{version}.Dataset",
                                       **resource})
        return json_response(op)

    def delete_dataset(self, name: str) -> Response:
        self.require_dataset(name)
        with self.state.write_lock:  # held until the files are gone: no STOW may reuse a blob meanwhile
            with self.state.tx() as db:
                shas = {r["blob"] for r in db.execute(
                    "SELECT DISTINCT blob FROM instances WHERE store LIKE ? ESCAPE '\\'", (like_prefix(name + "/"),))}
                db.execute("DELETE FROM instances WHERE store LIKE ? ESCAPE '\\'", (like_prefix(name + "/"),))
                db.execute("DELETE FROM stores WHERE dataset = ?", (name,))
                db.execute("DELETE FROM operation_logs WHERE operation LIKE ? ESCAPE '\\'",
                           (like_prefix(name + "/"),))
                db.execute("DELETE FROM operations WHERE dataset = ?", (name,))
                db.execute("DELETE FROM datasets WHERE name = ?", (name,))
            self.state.drop_unreferenced_blobs(shas)
        return json_response({})

    # -- DICOM stores ---------------------------------------------------------------------------
    def require_store(self, name: str) -> dict:
        store = self.state.get_json("stores", name)
        if store is None:
            raise not_found(f"DICOM store not found: {name}")
        return store

    def _check_store_body(self, body: dict) -> None:
        labels = body.get("labels", {})
        if len(labels) > 64:
            raise invalid("A DICOM store can have at most 64 labels.", "labels")
        for k, v in labels.items():
            if not LABEL_KEY_RE.match(k) or not k[0].islower():
                raise invalid(f"Invalid label key {k!r}: keys are 1-63 characters, start with a lowercase letter, "
                              "and contain only lowercase letters, digits, '_' and '-'.", "labels")
            if not LABEL_VALUE_RE.match(v):
                raise invalid(f"Invalid label value for {k!r}: values are 0-63 characters of lowercase letters, "
                              "digits, '_' and '-'.", "labels")
        topics = [body.get("notificationConfig", {}).get("pubsubTopic")] + \
                 [c.get("pubsubTopic") for c in body.get("notificationConfigs", [])]
        for t in topics:
            if t and not re.match(r"^projects/[^/]+/topics/[^/]+$", t):
                raise invalid(f"Invalid Pub/Sub topic {t!r}: it must be projects/PROJECT/topics/TOPIC.",
                              "notification_config.pubsub_topic")
        if any(topics) and self.notifier is None:
            log.warning("notifications to %s will not be sent: set PUBSUB_EMULATOR_HOST to publish them "
                        "through Google's Pub/Sub emulator", ", ".join(t for t in topics if t))
        from .streaming import check_configs
        check_configs(body.get("streamConfigs", []))

    def create_store(self, request: Request, dataset: str) -> Response:
        self.require_dataset(dataset)
        store_id = request.args.get("dicomStoreId", "")
        if not store_id:
            raise invalid("dicomStoreId is required", "dicom_store_id")
        if not ID_RE.match(store_id) or store_id in (".", ".."):
            raise invalid(f"invalid DICOM store ID {store_id!r}: it must match [A-Za-z0-9_.-]{{1,256}}",
                          "dicom_store_id")
        body = messages.check(read_json(request), messages.DICOM_STORE)
        self._check_store_body(body)
        name = f"{dataset}/dicomStores/{store_id}"
        resource = {"name": name, **{k: v for k, v in body.items() if k != "name"}}
        with self.state.tx() as db:
            if db.execute("SELECT 1 FROM stores WHERE name = ?", (name,)).fetchone():
                raise ApiError("ALREADY_EXISTS", f"already exists: {name}")
            db.execute("INSERT INTO stores VALUES (?, ?, ?)", (name, dataset, json.dumps(resource)))
        return json_response(resource)

    def patch_store(self, request: Request, name: str) -> Response:
        mask = [f for f in request.args.get("updateMask", "").split(",") if f]
        if not mask:
            raise invalid("updateMask is required", "update_mask")
        body = messages.check(read_json(request), messages.DICOM_STORE)
        allowed = {"labels", "notificationConfig", "notificationConfigs", "streamConfigs"}
        fields = []
        for f in mask:
            camel = re.sub(r"_([a-z])", lambda x: x.group(1).upper(), f.strip())
            if camel not in allowed:
                raise invalid(f"Invalid update_mask path {f!r}.", "update_mask")
            fields.append(camel)
        self._check_store_body(body)
        with self.state.tx() as db:
            row = db.execute("SELECT body FROM stores WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise not_found(f"DICOM store not found: {name}")
            resource = json.loads(row["body"])
            for f in fields:
                if f in body:
                    resource[f] = body[f]
                else:
                    resource.pop(f, None)
            db.execute("UPDATE stores SET body = ? WHERE name = ?", (json.dumps(resource), name))
        return json_response(resource)

    def delete_store(self, name: str) -> Response:
        with self.state.write_lock:  # held until the files are gone: no STOW may reuse a blob meanwhile
            with self.state.tx() as db:
                if not db.execute("SELECT 1 FROM stores WHERE name = ?", (name,)).fetchone():
                    raise not_found(f"DICOM store not found: {name}")
                shas = {r["blob"] for r in db.execute("SELECT DISTINCT blob FROM instances WHERE store = ?",
                                                      (name,))}
                db.execute("DELETE FROM instances WHERE store = ?", (name,))
                db.execute("DELETE FROM stores WHERE name = ?", (name,))
            self.state.drop_unreferenced_blobs(shas)
        return json_response({})

    # -- listing with pages -----------------------------------------------------------------------
    def list_resources(self, request: Request, table: str, key: str, value: str, field_name: str) -> Response:
        size, offset = page_args(request, default=100, maximum=1000)
        rows = self.state.db().execute(
            f"SELECT body FROM {table} WHERE {key} = ? ORDER BY name LIMIT ? OFFSET ?",
            (value, size + 1, offset)).fetchall()
        out = {field_name: [json.loads(r["body"]) for r in rows[:size]]}
        if len(rows) > size:
            out["nextPageToken"] = encode_token(offset + size)
        return json_response(out)

    # -- emulator-only endpoints ----------------------------------------------------------------
    def emulator_endpoint(self, request: Request, rest: str) -> Response:
        if rest == "requestCounts" and request.method == "GET":
            return json_response(self.state.counts())
        if rest.startswith("wait/") and request.method == "GET":
            try:
                timeout = min(float(request.args.get("timeout", "60")), 600.0)
            except ValueError:
                raise invalid("timeout must be a number of seconds", "timeout") from None
            return json_response(self.operations.wait(rest[len("wait/"):], timeout))
        raise ApiError("NOT_FOUND", f"unknown emulator endpoint /emulator/{rest}")


# -- small shared helpers ----------------------------------------------------------------------------
def json_response(body, status: int = 200) -> Response:
    return Response(json.dumps(body, indent=2) + "\n", status=status,
                    content_type="application/json; charset=UTF-8")


def read_json(request: Request):
    if request.content_length and request.content_length > MAX_JSON_BODY:
        raise ApiError("INVALID_ARGUMENT", "Request payload size exceeds the limit.", http=413)
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError("INVALID_ARGUMENT", f"Invalid JSON payload received. {e}") from None


def like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"o": offset}).encode()).decode().rstrip("=")


def page_args(request: Request, *, default: int, maximum: int) -> tuple[int, int]:
    try:
        size = int(request.args.get("pageSize") or default)
    except ValueError:
        raise invalid("pageSize must be an integer", "page_size") from None
    if size < 0:
        raise invalid("pageSize must not be negative", "page_size")
    size = min(size or default, maximum)
    token = request.args.get("pageToken", "")
    offset = 0
    if token:
        try:
            offset = int(json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))["o"])
        except Exception:
            raise invalid("Invalid page token.", "page_token") from None
    return size, max(offset, 0)


def create_app(data_dir, options: Options | None = None) -> App:
    return App(data_dir, options)
