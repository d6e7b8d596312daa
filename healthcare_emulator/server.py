"""The Cloud Healthcare API's REST surface (v1 and v1beta1), as a WSGI app.

Routes are matched on the path after the version prefix; resource ids are checked before
anything touches state, so no client-chosen string ever reaches the filesystem.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

from werkzeug.wrappers import Request, Response

from . import datasets, dicom_stores, imports, metrics
from .errors import ApiError, invalid
from .http_util import (  # noqa: F401 - re-exported: importers of server keep working
    MAX_JSON_BODY,
    encode_token,
    json_response,
    like_prefix,
    now_rfc3339,
    page_args,
    read_json,
)
from .ids import ID_RE, LABEL_KEY_RE, LABEL_VALUE_RE, LOCATION_RE, PROJECT_RE  # noqa: F401 - re-exported
from .operations import Operations, cancel_operation, get_operation, list_operations
from .routing import RouteTable, route
from .state import State
from .streaming import Streamer

log = logging.getLogger("healthcare_emulator")

# The REST surface below the version prefix: (path template, method) -> handler(app, call).
# Templates and their matching rules: routing.py. The first template that matches wins.
D = "projects/{project}/locations/{location}/datasets/{dataset}"
ROUTES = RouteTable([
    route(D + "/dicomStores/{dicomStore}/dicomWeb/studies/{study}:getStudyMetrics", GET=metrics.study_route),
    route(D + "/dicomStores/{dicomStore}/dicomWeb/studies/{study}/series/{series}:getSeriesMetrics",
          GET=metrics.series_route),
    route(D + "/dicomStores/{dicomStore}/dicomWeb{path*}", ANY=dicom_stores.dicomweb),
    route("projects/{project}/locations/{location}/datasets", GET=datasets.list_datasets, POST=datasets.create),
    route(D, GET=datasets.get, DELETE=datasets.delete),
    route(D + "/dicomStores", GET=dicom_stores.list_stores, POST=dicom_stores.create),
    route(D + "/dicomStores/{dicomStore}", GET=dicom_stores.get, PATCH=dicom_stores.patch,
          DELETE=dicom_stores.delete),
    route(D + "/dicomStores/{dicomStore}:export", POST=dicom_stores.export),
    route(D + "/dicomStores/{dicomStore}:import", POST=imports.start_route),
    route(D + "/dicomStores/{dicomStore}:getDICOMStoreMetrics", GET=metrics.store_route),
    route(D + "/operations", GET=list_operations),
    route(D + "/operations/{operation}", GET=get_operation),
    route(D + "/operations/{operation}:cancel", POST=cancel_operation),
])


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
    enforce_iam: bool = False                # exports need the service agent's BigQuery grants (iam_api.py)


class App:
    def __init__(self, data_dir, options: Options | None = None):
        self.options = options or Options()
        self.state = State(data_dir)
        self.operations = Operations(self)
        self.notifier = None
        if os.environ.get("PUBSUB_EMULATOR_HOST"):
            from .notifications import Notifier  # store notifications through Google's Pub/Sub emulator
            self.notifier = Notifier(self)
        self.streamer = Streamer(self)  # streamConfigs: stored instances appended to BigQuery tables

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
        if path == "/console" or path.startswith("/console/"):  # the web console (README, "The web console"):
            from .console.entry import handle as console  # a client of this app's own REST surface
            return console(self, request)
        if path.startswith(("/bigquery/", "/discovery/", "/$discovery/")):  # $discovery: bq --api=URL
            from . import bigquery_api  # the BigQuery REST surface over the same warehouse
            return bigquery_api.handle(self, request)
        if path.startswith("/v1/projects/"):
            from . import iam_api  # Cloud Resource Manager v1: projects.get, getIamPolicy, setIamPolicy
            if iam_api.is_resource_manager_path(path):
                self.authenticate(request)
                return iam_api.handle(self, request)
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
        return ROUTES.dispatch(self, request, version, rest)

    def require_dataset(self, name: str) -> dict:
        return datasets.require(self.state, name)

    def require_store(self, name: str) -> dict:
        return dicom_stores.require(self.state, name)

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


def create_app(data_dir, options: Options | None = None) -> App:
    return App(data_dir, options)
