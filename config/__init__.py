"""Settings: environment variables, all read and validated once, at start.

A bad value raises SettingsError naming the variable, which stops the function at load time
(docs/contract.md, "Settings"). Nothing here imports a Google client or anything of handlers/: this
module is on every cold start. The name rules shared with the request validator are config/shapes.py.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

from config import shapes
from config.shapes import PROJECT, valid_store_name

Env = Mapping[str, str]


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


TOPIC_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._~+%-]{2,254}$")


@dataclass(frozen=True)
class Settings:
    project: str | None
    requests_topic: str = "dicom-export-requests"
    events_topic: str = "dicom-export-events"
    healthcare_endpoint: str = "https://healthcare.googleapis.com"
    healthcare_version: str = "v1"
    ledger_collection: str = "dicomExports"
    allowed_dicom_stores: tuple[str, ...] = ()
    allowed_bq_datasets: tuple[str, ...] = ()
    default_dicom_store: str | None = None
    max_operation_age_s: float = 86400.0
    # Added by the intake function (docs/contract.md, "Settings"):
    max_request_bytes: int = 65536
    max_request_age_s: float = 3600.0
    healthcare_retry_budget_s: float = 30.0
    healthcare_http_timeout_s: float = 30.0
    intake_lease_s: float = 60.0
    poll_initial_interval_s: float = 1.0
    # Added by the poller (docs/contract.md, "Settings"):
    poll_concurrency: int = 16
    poll_budget_s: float = 45.0
    poll_lease_s: float = 60.0
    poll_page_size: int = 200
    poll_max_interval_s: float = 180.0
    poll_call_timeout_s: float = 10.0
    # Added by the ingest function (docs/design.md, "Ingest"; docs/contract.md, "Settings"):
    ingest_routes: tuple[tuple[str, str], ...] = ()  # (store resource name, bq:// table URI), sorted
    ingest_route_options: tuple[tuple[str, str], ...] = ()  # (store, JSON of extra bigqueryDestination fields)
    ingest_filter_bucket: str | None = None
    ingest_batch_max_instances: int = 1000
    ingest_batch_max_age_s: float = 60.0
    # Deletions, re-driven batches and reconcile (docs/design.md, "Deletions and replacements", "Reconcile"):
    ingest_batch_max_attempts: int = 5
    ingest_retry_backoff_s: float = 60.0
    reconcile_max_studies: int = 5000
    reconcile_max_instances: int = 20000
    reconcile_dry_run: bool = False
    # Where the Google APIs are (handlers/wiring.py passes them to the adapters): emulators when set, else Google's endpoints.
    firestore_database: str = "(default)"
    firestore_emulator_host: str | None = None
    pubsub_emulator_host: str | None = None
    storage_emulator_host: str | None = None
    credentials_file: str | None = None  # GOOGLE_APPLICATION_CREDENTIALS
    on_google_cloud: bool = False  # K_SERVICE is set: Cloud Functions gen2 / Cloud Run
    metadata_host: str = "metadata.google.internal"
    # Resource Manager: the service agent's project number in an export failure's remedy; BigQuery: ingest's
    # deletions and replacements, reconcile_tables, preflight.
    resource_manager_endpoint: str = "https://cloudresourcemanager.googleapis.com"
    bigquery_endpoint: str = "https://bigquery.googleapis.com"

    @property
    def healthcare_is_local(self) -> bool:
        return is_loopback_url(self.healthcare_endpoint)

    @property
    def bigquery_is_local(self) -> bool:
        return is_loopback_url(self.bigquery_endpoint)


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _number(env: Env, name: str, default: float, *, minimum: float, integer: bool = False) -> Any:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise SettingsError(f"{name}={raw!r}: must be {kind}") from None
    if value != value or value < minimum or value in (float("inf"),):
        raise SettingsError(f"{name}={raw!r}: must be at least {minimum}")
    return value


def _patterns(env: Env, name: str) -> tuple[str, ...]:
    items = tuple(p.strip() for p in env.get(name, "").split(",") if p.strip())
    for p in items:
        if any(c.isspace() for c in p):
            raise SettingsError(f"{name}: pattern {p!r} contains whitespace")
    return items


def _topic(env: Env, name: str, default: str) -> str:
    value = env.get(name, "").strip() or default
    if not TOPIC_ID_RE.match(value) or value.lower().startswith("goog"):
        raise SettingsError(f"{name}={value!r}: not a valid Pub/Sub topic ID")
    return value


def _bounded(env: Env, name: str, default: float, lo: float, hi: float, integer: bool = False) -> Any:
    """A number setting within [lo, hi]."""
    value = _number(env, name, default, minimum=lo, integer=integer)
    if value > hi:
        raise SettingsError(f"{name}={value}: must be at most {hi}")
    return value


def _poll_settings(env: Env) -> dict[str, Any]:
    """The poller's settings (poll_exports), checked against each other."""
    def bounded(name: str, default: float, lo: float, hi: float, integer: bool = False) -> Any:
        return _bounded(env, name, default, lo, hi, integer)

    out = dict(
        poll_concurrency=bounded("POLL_CONCURRENCY", 16, 1, 256, integer=True),
        poll_budget_s=bounded("POLL_BUDGET_S", 45.0, 2, 3600),
        poll_lease_s=bounded("POLL_LEASE_S", 60.0, 1, 3600),
        poll_page_size=bounded("POLL_PAGE_SIZE", 200, 10, 500, integer=True),  # 500: one Firestore BatchWrite
        poll_max_interval_s=bounded("POLL_MAX_INTERVAL_S", 180.0, 1, 86400),
        poll_call_timeout_s=bounded("POLL_CALL_TIMEOUT_S", 10.0, 0.2, 300),
    )
    if out["poll_call_timeout_s"] * 2 > out["poll_budget_s"]:
        raise SettingsError(f"POLL_CALL_TIMEOUT_S={out['poll_call_timeout_s']:g}: must be at most half of "
                            f"POLL_BUDGET_S={out['poll_budget_s']:g}")
    need = 3 * out["poll_call_timeout_s"]
    if out["poll_lease_s"] < need:
        raise SettingsError(f"POLL_LEASE_S={out['poll_lease_s']:g}: must be at least {need:g} (3 x "
                            "POLL_CALL_TIMEOUT_S: operations.get, operations.cancel and a publish), so that a live "
                            "run keeps its lease")
    return out


INGEST_DESTINATION_OPTIONS = ("schemaJson", "schemaFlattened", "includeSourceStore")
INGEST_MAX_BATCH_LIMIT = 2000  # a batch document holds its paths: 2000 x <= 220 bytes stays far below 1 MiB


def _ingest_settings(env: Env) -> dict[str, Any]:
    """The ingest function's settings. Every route is checked with the request's own rules
    (config/shapes.py), so a batch request can never be rejected for its store, table, bucket or the
    allowlists."""
    raw_bucket = env.get("INGEST_FILTER_BUCKET", "").strip() or None
    max_n = _number(env, "INGEST_BATCH_MAX_INSTANCES", 1000, minimum=1, integer=True)
    if max_n > INGEST_MAX_BATCH_LIMIT:
        raise SettingsError(f"INGEST_BATCH_MAX_INSTANCES={max_n}: must be at most {INGEST_MAX_BATCH_LIMIT} (a "
                            "batch's paths are kept in one Firestore document, limited to 1 MiB)")
    max_age = _number(env, "INGEST_BATCH_MAX_AGE_S", 60.0, minimum=1)
    routes = _routes_json(env.get("INGEST_ROUTES", "").strip() or "{}")
    if raw_bucket is not None or routes:
        if raw_bucket is None:
            raise SettingsError("INGEST_FILTER_BUCKET: required when INGEST_ROUTES names a store (batch filter "
                                "files are written there)")
        try:
            shapes.filter_config({"filterConfig": {"resourcePathsGcsUri": f"gs://{raw_bucket}/ingest/x.txt"}})
        except shapes.ShapeError as e:
            raise SettingsError(f"INGEST_FILTER_BUCKET={raw_bucket!r}: {e.message}") from None
    allowlists = (_patterns(env, "ALLOWED_DICOM_STORES"), _patterns(env, "ALLOWED_BQ_DATASETS"))
    tables, options = {}, {}
    for store, value in routes.items():
        uri, extra = _route(store, value)
        if extra:
            options[store] = json.dumps(extra, sort_keys=True, separators=(",", ":"))
        _check_route(store, uri, extra, raw_bucket, allowlists)
        tables[store] = uri
    return dict(ingest_routes=tuple(sorted(tables.items())), ingest_route_options=tuple(sorted(options.items())),
                ingest_filter_bucket=raw_bucket, ingest_batch_max_instances=max_n, ingest_batch_max_age_s=max_age)


def _routes_json(text: str) -> dict[str, Any]:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise SettingsError(f"INGEST_ROUTES: store {k!r} appears more than once")
            out[k] = v
        return out
    try:
        routes = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise SettingsError(f"INGEST_ROUTES: not JSON ({e}); expected {{\"STORE RESOURCE NAME\": "
                            "\"bq://PROJECT.DATASET.TABLE\"}") from None
    if not isinstance(routes, dict):
        raise SettingsError("INGEST_ROUTES: must be a JSON object {\"STORE RESOURCE NAME\": "
                            "\"bq://PROJECT.DATASET.TABLE\"}")
    return routes


def _table_settings(env: Env) -> dict[str, Any]:
    """Settings of deletions, re-driven batches and reconcile_tables."""
    def bounded(name: str, default: float, lo: float, hi: float, integer: bool = False) -> Any:
        return _bounded(env, name, default, lo, hi, integer)

    dry = env.get("RECONCILE_DRY_RUN", "").strip().lower()
    if dry not in ("", "0", "1", "false", "true"):
        raise SettingsError(f"RECONCILE_DRY_RUN={dry!r}: must be true or false")
    return dict(ingest_batch_max_attempts=bounded("INGEST_BATCH_MAX_ATTEMPTS", 5, 1, 100, integer=True),
                ingest_retry_backoff_s=bounded("INGEST_RETRY_BACKOFF_S", 60.0, 0.1, 86400),
                reconcile_max_studies=bounded("RECONCILE_MAX_STUDIES", 5000, 1, 1_000_000, integer=True),
                reconcile_max_instances=bounded("RECONCILE_MAX_INSTANCES", 20000, 1, 10_000_000, integer=True),
                reconcile_dry_run=dry in ("1", "true"))


def _route(store: str, value: Any) -> tuple[str, dict[str, Any]]:
    """A route's table URI and extra bigqueryDestination fields: "bq://P.D.T", or {"tableUri": "bq://P.D.T",
    "schemaJson": {}} (also schemaFlattened, includeSourceStore), passed to every batch's destination."""
    if isinstance(value, dict):
        extra = {k: v for k, v in value.items() if k != "tableUri"}
        unknown = sorted(set(extra) - set(INGEST_DESTINATION_OPTIONS))
        if unknown or not isinstance(value.get("tableUri"), str):
            raise SettingsError(f"INGEST_ROUTES: the route of store {store!r} must be \"bq://PROJECT.DATASET."
                                "TABLE\" or an object with tableUri and optionally "
                                f"{', '.join(INGEST_DESTINATION_OPTIONS)}"
                                + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        return value["tableUri"], extra
    if isinstance(value, str):
        return value, {}
    raise SettingsError(f"INGEST_ROUTES: the route of store {store!r} must be a string "
                        "\"bq://PROJECT.DATASET.TABLE\" or an object with tableUri")


def _check_route(store: str, uri: str, extra: dict[str, Any], bucket: str | None,
                 allowlists: tuple[tuple[str, ...], tuple[str, ...]]) -> None:
    """The checks a batch's export request will pass, in the order the request validator makes them."""
    try:
        shapes.dicom_store({"dicomStore": store}, None)
        dest = shapes.destination({"bigqueryDestination": {"tableUri": uri, **extra,
                                                           "writeDisposition": "WRITE_APPEND"}})
        shapes.filter_config({"filterConfig": {"resourcePathsGcsUri": f"gs://{bucket}/ingest/x.txt"}})
        shapes.check_allowlists(store, dest["tableUri"], *allowlists)
    except shapes.ShapeError as e:
        raise SettingsError(f"INGEST_ROUTES: route {store!r} -> {uri!r}: {e.message}") from None


def _host_port(env: Env, name: str) -> str | None:
    value = env.get(name, "").strip() or None
    if value is not None:
        value = value.removeprefix("http://").rstrip("/")
        if not re.fullmatch(r"[A-Za-z0-9.\-]+:\d{1,5}|\[[0-9A-Fa-f:]+\]:\d{1,5}", value):
            raise SettingsError(f"{name}={value!r}: must be HOST:PORT")
    return value


def _endpoint_settings(env: Env) -> dict[str, Any]:
    database = env.get("FIRESTORE_DATABASE", "").strip() or "(default)"
    if database != "(default)" and not re.fullmatch(r"[a-z][a-z0-9-]{2,62}", database):
        raise SettingsError(f"FIRESTORE_DATABASE={database!r}: must be (default) or a database ID "
                            "(4-63 lowercase letters, digits or '-', starting with a letter)")
    metadata = env.get("GCE_METADATA_HOST", "").strip() or "metadata.google.internal"
    if not re.fullmatch(r"[A-Za-z0-9.\-]+(:\d{1,5})?", metadata):
        raise SettingsError(f"GCE_METADATA_HOST={metadata!r}: must be HOST or HOST:PORT")
    return dict(firestore_database=database,
                firestore_emulator_host=_host_port(env, "FIRESTORE_EMULATOR_HOST"),
                pubsub_emulator_host=_host_port(env, "PUBSUB_EMULATOR_HOST"),
                storage_emulator_host=_host_port(env, "STORAGE_EMULATOR_HOST"),
                credentials_file=env.get("GOOGLE_APPLICATION_CREDENTIALS", "").strip() or None,
                on_google_cloud=bool(env.get("K_SERVICE", "").strip()), metadata_host=metadata,
                resource_manager_endpoint=_api_root(env, "RESOURCE_MANAGER_API_ENDPOINT",
                                                    "https://cloudresourcemanager.googleapis.com"),
                bigquery_endpoint=_api_root(env, "BIGQUERY_API_ENDPOINT", "https://bigquery.googleapis.com"))


def _api_root(env: Env, name: str, default: str) -> str:
    """An API's root URL (NAME=https://..., Google's by default); plain http only for a loopback emulator."""
    endpoint = (env.get(name, "").strip() or default).rstrip("/")
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise SettingsError(f"{name}={endpoint!r}: must be an http(s) URL such as {default}")
    if parts.scheme == "http" and not is_loopback_url(endpoint):
        # A bearer token must never travel in clear text: plain http only for a local emulator.
        raise SettingsError(f"{name}={endpoint!r}: plain http is allowed only for a local "
                            "emulator (localhost or a loopback address)")
    return endpoint


def _healthcare(env: Env) -> tuple[str, str]:
    """HEALTHCARE_API_ENDPOINT and HEALTHCARE_API_VERSION."""
    endpoint = _api_root(env, "HEALTHCARE_API_ENDPOINT", "https://healthcare.googleapis.com")

    version = env.get("HEALTHCARE_API_VERSION", "").strip() or "v1"
    if version not in ("v1", "v1beta1"):
        raise SettingsError(f"HEALTHCARE_API_VERSION={version!r}: must be v1 or v1beta1")
    return endpoint, version


def load(env: Env | None = None) -> Settings:
    """Read and validate every setting; raise SettingsError naming the first bad variable."""
    env = os.environ if env is None else env
    project = (env.get("GOOGLE_CLOUD_PROJECT") or env.get("GCP_PROJECT") or "").strip() or None
    if project is not None and not re.fullmatch(PROJECT, project):
        raise SettingsError(f"GOOGLE_CLOUD_PROJECT={project!r}: not a valid project ID")

    endpoint, version = _healthcare(env)
    collection = env.get("LEDGER_COLLECTION", "").strip() or "dicomExports"
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,100}", collection) or re.fullmatch(r"__.*__", collection):
        raise SettingsError(f"LEDGER_COLLECTION={collection!r}: must be 1-100 letters, digits, '_' or '-'")

    default_store = env.get("DEFAULT_DICOM_STORE", "").strip() or None
    if default_store is not None and not valid_store_name(default_store):
        raise SettingsError(f"DEFAULT_DICOM_STORE={default_store!r}: must be a full resource name "
                            "projects/P/locations/L/datasets/D/dicomStores/S")

    budget = _number(env, "HEALTHCARE_RETRY_BUDGET_S", 30.0, minimum=0.5)
    settings = Settings(
        project=project,
        requests_topic=_topic(env, "EXPORT_REQUESTS_TOPIC", "dicom-export-requests"),
        events_topic=_topic(env, "EXPORT_EVENTS_TOPIC", "dicom-export-events"),
        healthcare_endpoint=endpoint,
        healthcare_version=version,
        ledger_collection=collection,
        allowed_dicom_stores=_patterns(env, "ALLOWED_DICOM_STORES"),
        allowed_bq_datasets=_patterns(env, "ALLOWED_BQ_DATASETS"),
        default_dicom_store=default_store,
        max_operation_age_s=_number(env, "MAX_OPERATION_AGE_S", 86400.0, minimum=1),
        max_request_bytes=_number(env, "MAX_REQUEST_BYTES", 65536, minimum=256, integer=True),
        max_request_age_s=_number(env, "MAX_REQUEST_AGE_S", 3600.0, minimum=1),
        healthcare_retry_budget_s=budget,
        healthcare_http_timeout_s=_number(env, "HEALTHCARE_HTTP_TIMEOUT_S", 30.0, minimum=0.5),
        intake_lease_s=_number(env, "INTAKE_LEASE_S", budget + 30.0, minimum=1),
        poll_initial_interval_s=_number(env, "POLL_INITIAL_INTERVAL_S", 1.0, minimum=0.1),
        **_poll_settings(env),
        **_ingest_settings(env),
        **_endpoint_settings(env),
        **_table_settings(env),
    )
    if settings.intake_lease_s <= budget:
        raise SettingsError(f"INTAKE_LEASE_S={settings.intake_lease_s}: must be longer than "
                            f"HEALTHCARE_RETRY_BUDGET_S={budget} (a live delivery must keep its lease)")
    return settings


_settings: Settings | None = None


def get() -> Settings:
    """The process's settings, loaded on first use (main.py loads them at import)."""
    global _settings
    if _settings is None:
        _settings = load()
    return _settings


def reload() -> Settings:
    """Read the environment again (handlers/wiring.py reset(), when tests change it)."""
    global _settings
    _settings = None
    return get()


def project_id(settings: Settings) -> str:
    """GOOGLE_CLOUD_PROJECT, or else the project of Application Default Credentials (asked on first use)."""
    if settings.project:
        return settings.project
    import google.auth
    _, project = google.auth.default()
    if not project:
        raise SettingsError("GOOGLE_CLOUD_PROJECT is not set and the runtime does not tell the project")
    return str(project)
