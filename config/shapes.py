"""The shapes of the names a request and the settings carry: DICOM store resource names, BigQuery table
URIs, the BigQuery destination, Cloud Storage URIs and bucket names, and the allowlists.

Shared by the request validator (handlers/core/request.py) and the settings (INGEST_ROUTES,
INGEST_FILTER_BUCKET are checked with the very rules a request is checked with). Pure; imports nothing of
handlers. A broken rule raises ShapeError naming the field, the rule and a message a person can act on.
"""
from __future__ import annotations

import json
import re
import unicodedata
from fnmatch import fnmatchcase
from typing import Any

Obj = dict[str, Any]

PROJECT_ID = r"[a-z][a-z0-9-]{4,28}[a-z0-9]"
DOMAIN = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+"
PROJECT = rf"(?:{DOMAIN}:)?{PROJECT_ID}"
LOCATION = r"[a-z][a-z0-9-]{0,62}"
HC_ID = r"[A-Za-z0-9_.-]{1,256}"
DICOM_STORE_RE = re.compile(
    rf"^projects/({PROJECT})/locations/({LOCATION})/datasets/({HC_ID})/dicomStores/({HC_ID})$")
PROJECT_RE = re.compile(rf"^{PROJECT}$")
DATASET_RE = re.compile(r"^[A-Za-z0-9_]{1,1024}$")
IPV4_RE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
WRITE_DISPOSITIONS = {"WRITE_EMPTY": "WRITE_EMPTY", "WRITE_TRUNCATE": "WRITE_TRUNCATE",
                      "WRITE_APPEND": "WRITE_APPEND", "write-empty": "WRITE_EMPTY",
                      "write-truncate": "WRITE_TRUNCATE", "write-append": "WRITE_APPEND"}
DEST_FIELDS = ("tableUri", "writeDisposition", "force", "includeSourceStore", "schemaJson", "schemaFlattened")
FILTER_FIELDS = ("resourcePathsGcsUri",)
TABLE_URI_MAX = 2000
TABLE_ID_MAX_BYTES = 1024
TABLE_CATEGORIES = ("L", "M", "N")  # plus Pc, Pd, Zs below


class ShapeError(ValueError):
    """A value breaks a rule: `field` (a request field path), `rule` (a short name) and `message`."""

    def __init__(self, field: str, rule: str, message: str):
        super().__init__(message)
        self.field, self.rule, self.message = field, rule, message


def valid_store_name(name: str) -> bool:
    m = DICOM_STORE_RE.match(name)
    return m is not None and not any(part in (".", "..") for part in m.groups()[2:])


def show(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def unknown(obj: Obj, known: tuple[str, ...], where: str = "") -> None:
    for key in obj:
        if key not in known:
            name = f"{where}.{key}" if where else key
            raise ShapeError((name if key else f"{where}.\"\"".lstrip("."))[:200], "unknown-field",
                          f"unknown field {show(name)}; the known fields{' of ' + where if where else ''} are "
                          f"{', '.join(known)}")


def optional(obj: Obj, key: str) -> Any:
    """JSON null counts as absent (as in proto3 JSON)."""
    return obj.get(key)


def dicom_store(obj: Obj, default_store: str | None) -> str:
    store = optional(obj, "dicomStore")
    if store is None:
        if default_store:
            return default_store
        raise ShapeError("dicomStore", "required", "dicomStore is required (this deployment sets no default store)")
    if not isinstance(store, str):
        raise ShapeError("dicomStore", "type", f"dicomStore must be a string, not {type_name(store)}")
    if not valid_store_name(store):
        raise ShapeError("dicomStore", "resource-name",
                      f"dicomStore {show(store)} must be a full resource name "
                      "projects/PROJECT/locations/LOCATION/datasets/DATASET/dicomStores/STORE (project: a Google "
                      "Cloud project ID; dataset and store IDs: 1-256 of A-Z a-z 0-9 _ . -)")
    return store


def table_uri_parts(uri: str) -> tuple[str, str, str]:
    """bq://PROJECT.DATASET.TABLE with BigQuery's naming rules."""
    f = "bigqueryDestination.tableUri"
    if len(uri) > TABLE_URI_MAX:
        raise ShapeError(f, "max-length", f"tableUri is {len(uri)} characters; at most {TABLE_URI_MAX} are allowed")
    if not uri.startswith("bq://"):
        raise ShapeError(f, "scheme", f"tableUri {show(uri)} must start with bq:// (bq://PROJECT.DATASET.TABLE)")
    parts = uri[5:].rsplit(".", 2)
    if len(parts) != 3 or not all(parts):
        raise ShapeError(f, "format", f"tableUri {show(uri)} must be bq://PROJECT.DATASET.TABLE")
    project, dataset, table = parts
    if not PROJECT_RE.match(project):
        raise ShapeError(f, "project-id",
                      f"tableUri project {show(project)} is not a valid project ID: 6-30 characters of a-z 0-9 -, "
                      "starting with a letter and not ending with '-' (optionally domain-scoped: example.com:proj)")
    if not DATASET_RE.match(dataset):
        raise ShapeError(f, "dataset-id", f"tableUri dataset {show(dataset)} is not a valid BigQuery dataset ID: "
                                       "1-1024 letters, digits and underscores")
    if "$" in table:
        raise ShapeError(f, "table-id", f"tableUri table {show(table)}: partition decorators ($) are not supported")
    bad = next((c for c in table if not (unicodedata.category(c)[0] in TABLE_CATEGORIES
                                         or unicodedata.category(c) in ("Pc", "Pd", "Zs"))), None)
    if bad is not None:
        raise ShapeError(f, "table-id", f"tableUri table {show(table)} is not a valid BigQuery table ID: character "
                                     f"{show(bad)} is not a letter, mark, number, connector (_), dash or space")
    if len(table.encode("utf-8")) > TABLE_ID_MAX_BYTES:
        raise ShapeError(f, "table-id", f"tableUri table ID is longer than {TABLE_ID_MAX_BYTES} UTF-8 bytes")
    return project, dataset, table


def destination(obj: Obj) -> Obj:
    dest = optional(obj, "bigqueryDestination")
    if dest is None:
        raise ShapeError("bigqueryDestination", "required", "bigqueryDestination is required")
    if not isinstance(dest, dict):
        raise ShapeError("bigqueryDestination", "type", f"bigqueryDestination must be an object, not {type_name(dest)}")
    unknown(dest, DEST_FIELDS, "bigqueryDestination")
    out: Obj = {}
    uri = optional(dest, "tableUri")
    if uri is None:
        raise ShapeError("bigqueryDestination.tableUri", "required", "bigqueryDestination.tableUri is required")
    if not isinstance(uri, str):
        raise ShapeError("bigqueryDestination.tableUri", "type", f"tableUri must be a string, not {type_name(uri)}")
    table_uri_parts(uri)
    out["tableUri"] = uri
    wd = optional(dest, "writeDisposition")
    if wd is not None:
        if not isinstance(wd, str) or wd not in WRITE_DISPOSITIONS:
            raise ShapeError("bigqueryDestination.writeDisposition", "enum",
                          f"writeDisposition {show(wd)} must be one of WRITE_EMPTY, WRITE_TRUNCATE, WRITE_APPEND "
                          "(or write-empty, write-truncate, write-append)")
        out["writeDisposition"] = WRITE_DISPOSITIONS[wd]
    force = optional(dest, "force")
    if force is not None:
        if not isinstance(force, bool):
            raise ShapeError("bigqueryDestination.force", "type", f"force must be a boolean, not {type_name(force)}")
        if wd is not None:
            raise ShapeError("bigqueryDestination.force", "exclusive",
                          "force cannot be combined with writeDisposition; set writeDisposition alone "
                          "(force is deprecated: true = WRITE_TRUNCATE, false = WRITE_EMPTY)")
        out["force"] = force
    iss = optional(dest, "includeSourceStore")
    if iss is not None:
        if not isinstance(iss, bool):
            raise ShapeError("bigqueryDestination.includeSourceStore", "type",
                          f"includeSourceStore must be a boolean, not {type_name(iss)}")
        out["includeSourceStore"] = iss
    for name in ("schemaJson", "schemaFlattened"):
        v = optional(dest, name)
        if v is None:
            continue
        if v != {} or not isinstance(v, dict):
            raise ShapeError(f"bigqueryDestination.{name}", "type", f"{name} must be an empty object {{}}")
        out[name] = {}
    if "schemaJson" in out and "schemaFlattened" in out:
        raise ShapeError("bigqueryDestination.schemaJson", "exclusive",
                      "schemaJson and schemaFlattened cannot both be set; choose one schema")
    return out


def gcs_uri_parts(uri: str) -> tuple[str, str]:
    f = "filterConfig.resourcePathsGcsUri"
    if not uri.startswith("gs://"):
        raise ShapeError(f, "gcs-uri", f"resourcePathsGcsUri {show(uri)} must be gs://BUCKET/OBJECT")
    bucket, sep, obj = uri[5:].partition("/")
    if not sep or not obj:
        raise ShapeError(f, "object-name", f"resourcePathsGcsUri {show(uri)} must name an object: gs://BUCKET/OBJECT")
    problem = _bucket_problem(bucket)
    if problem:
        raise ShapeError(f, "bucket-name", f"resourcePathsGcsUri bucket {show(bucket)} is not a valid bucket name: "
                                        f"{problem}")
    if len(obj.encode("utf-8")) > 1024 or "\r" in obj or "\n" in obj or obj in (".", ".."):
        raise ShapeError(f, "object-name", f"resourcePathsGcsUri object {show(obj)} is not a valid object name "
                                        "(1-1024 UTF-8 bytes, no line breaks, not . or ..)")
    return bucket, obj


def _bucket_problem(b: str) -> str | None:
    if not 3 <= len(b) <= 222:
        return "3-63 characters (up to 222 with dots)"
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*[a-z0-9]", b):
        return "only a-z 0-9 - _ . and starting and ending with a letter or digit"
    if "." not in b and len(b) > 63:
        return "3-63 characters (up to 222 with dots)"
    if any(not c or len(c) > 63 for c in b.split(".")):
        return "each dot-separated part must be 1-63 characters"
    if IPV4_RE.match(b):
        return "must not be an IP address"
    if b.startswith("goog") or "google" in b or "g00gle" in b:
        return "must not start with 'goog' or contain 'google'"
    return None


def filter_config(obj: Obj) -> Obj | None:
    fc = optional(obj, "filterConfig")
    if fc is None:
        return None
    if not isinstance(fc, dict):
        raise ShapeError("filterConfig", "type", f"filterConfig must be an object, not {type_name(fc)}")
    unknown(fc, FILTER_FIELDS, "filterConfig")
    uri = optional(fc, "resourcePathsGcsUri")
    if uri is None:
        raise ShapeError("filterConfig.resourcePathsGcsUri", "required",
                      "filterConfig.resourcePathsGcsUri is required when filterConfig is set")
    if not isinstance(uri, str):
        raise ShapeError("filterConfig.resourcePathsGcsUri", "type",
                      f"resourcePathsGcsUri must be a string, not {type_name(uri)}")
    gcs_uri_parts(uri)
    return {"resourcePathsGcsUri": uri}


def allowed(value: str, patterns: tuple[str, ...]) -> bool:
    return not patterns or any(fnmatchcase(value, p) for p in patterns)


def check_allowlists(store: str, table_uri: str, allowed_stores: tuple[str, ...],
                     allowed_datasets: tuple[str, ...]) -> None:
    """The store and the destination dataset must match ALLOWED_DICOM_STORES and ALLOWED_BQ_DATASETS."""
    if not allowed(store, allowed_stores):
        raise ShapeError("dicomStore", "allowlist",
                         "dicomStore is not one this deployment may export from (ALLOWED_DICOM_STORES)")
    project, dataset, _ = table_uri_parts(table_uri)
    if not allowed(f"{project}.{dataset}", allowed_datasets):
        raise ShapeError("bigqueryDestination.tableUri", "allowlist",
                         "the destination BigQuery dataset is not one this deployment may export to "
                         "(ALLOWED_BQ_DATASETS)")
