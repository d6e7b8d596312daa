"""The export request (contract §1): parse, validate and normalise. Pure: no I/O, no clients.

`parse(data, message_id, policy)` never raises: it returns a Parsed whose `rejection` names the
field, the rule and a message a person can act on, or whose `request` is the normalised request.
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from config import PROJECT, valid_store_name

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PROJECT_RE = re.compile(rf"^{PROJECT}$")
DATASET_RE = re.compile(r"^[A-Za-z0-9_]{1,1024}$")
IPV4_RE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
WRITE_DISPOSITIONS = {"WRITE_EMPTY": "WRITE_EMPTY", "WRITE_TRUNCATE": "WRITE_TRUNCATE",
                      "WRITE_APPEND": "WRITE_APPEND", "write-empty": "WRITE_EMPTY",
                      "write-truncate": "WRITE_TRUNCATE", "write-append": "WRITE_APPEND"}
TOP_FIELDS = ("requestId", "dicomStore", "bigqueryDestination", "filterConfig", "labels")
DEST_FIELDS = ("tableUri", "writeDisposition", "force", "includeSourceStore", "schemaJson", "schemaFlattened")
FILTER_FIELDS = ("resourcePathsGcsUri",)
MAX_LABELS = 64
MAX_LABEL_CHARS = 63
TABLE_URI_MAX = 2000
TABLE_ID_MAX_BYTES = 1024
TABLE_CATEGORIES = ("L", "M", "N")  # plus Pc, Pd, Zs below
MESSAGE = "(message)"  # the field name used for rules about the message as a whole


@dataclass(frozen=True)
class Policy:
    max_bytes: int = 65536
    default_store: str | None = None
    allowed_stores: tuple[str, ...] = ()
    allowed_datasets: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, s) -> "Policy":
        return cls(max_bytes=s.max_request_bytes, default_store=s.default_dicom_store,
                   allowed_stores=s.allowed_dicom_stores, allowed_datasets=s.allowed_bq_datasets)


@dataclass(frozen=True)
class Rejection:
    field: str
    rule: str
    message: str

    def error(self) -> dict:
        """As the EXPORT_REJECTED event carries it: google.rpc INVALID_ARGUMENT."""
        return {"code": 3, "message": self.message}


@dataclass(frozen=True)
class Parsed:
    request_id: str
    request: dict | None = None          # normalised; None when rejected
    rejection: Rejection | None = None
    known: dict = field(default_factory=dict)  # validated parts, echoed on a rejection event

    @property
    def ok(self) -> bool:
        return self.rejection is None


class _Reject(Exception):
    def __init__(self, field_: str, rule: str, message: str):
        super().__init__(message)
        self.rejection = Rejection(field_, rule, message)


def _show(value, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


# -- the message as a whole ---------------------------------------------------------------------------
def _decode(data: bytes, max_bytes: int):
    if not isinstance(data, (bytes, bytearray)):
        raise _Reject(MESSAGE, "bytes", "the message data is missing or not bytes")
    if len(data) > max_bytes:
        raise _Reject(MESSAGE, "max-size", f"the request is {len(data)} bytes; at most {max_bytes} are accepted")
    if not data:
        raise _Reject(MESSAGE, "json", "the request is empty; expected a JSON object")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Reject(MESSAGE, "utf-8", f"the request is not UTF-8 text (invalid byte at offset {e.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]

    def no_constants(name):
        raise ValueError(f"{name} is not a JSON number")

    def pairs(items):
        out = {}
        for k, v in items:
            if k in out:
                raise _Reject(str(k)[:100] or '""', "duplicate-key", f"field {_show(k)} appears more than once")
            out[k] = v
        return out

    try:
        value = json.loads(text, object_pairs_hook=pairs, parse_constant=no_constants)
    except _Reject:
        raise
    except json.JSONDecodeError as e:
        raise _Reject(MESSAGE, "json", f"the request is not JSON: {e.msg} at line {e.lineno} column {e.colno}") \
            from None
    except RecursionError:
        raise _Reject(MESSAGE, "json", "the request is not acceptable JSON: nested too deeply") from None
    except ValueError as e:  # NaN/Infinity, or an integer with thousands of digits
        why = str(e) if "JSON number" in str(e) else "a number has too many digits"
        raise _Reject(MESSAGE, "json", f"the request is not acceptable JSON: {why}") from None
    _check_strings(value)
    if not isinstance(value, dict):
        raise _Reject(MESSAGE, "object", f"the request must be a JSON object, not {_type_name(value)}")
    return value


def _check_strings(value) -> None:
    """Every string must be valid Unicode (JSON can smuggle unpaired surrogates as \\ud800)."""
    stack = [value]
    while stack:
        v = stack.pop()
        items = v.items() if isinstance(v, dict) else ((None, x) for x in v) if isinstance(v, list) else None
        if items is None:
            continue
        for k, x in items:
            for s in (k, x):
                if isinstance(s, str):
                    try:
                        s.encode("utf-8")
                    except UnicodeEncodeError:
                        raise _Reject(MESSAGE, "utf-8", "the request contains a string with an unpaired UTF-16 "
                                                        "surrogate (not valid Unicode)") from None
            if isinstance(x, (dict, list)):
                stack.append(x)


def _unknown(obj: dict, known: tuple[str, ...], where: str = "") -> None:
    for key in obj:
        if key not in known:
            name = f"{where}.{key}" if where else key
            raise _Reject((name if key else f"{where}.\"\"".lstrip("."))[:200], "unknown-field",
                          f"unknown field {_show(name)}; the known fields{' of ' + where if where else ''} are "
                          f"{', '.join(known)}")


def _optional(obj: dict, key: str):
    """JSON null counts as absent (as in proto3 JSON)."""
    return obj.get(key)


# -- fields ---------------------------------------------------------------------------------------
def _request_id(obj: dict, message_id: str) -> str:
    rid = _optional(obj, "requestId")
    if rid is None:
        return message_id
    if not isinstance(rid, str):
        raise _Reject("requestId", "type", f"requestId must be a string, not {_type_name(rid)}")
    if not REQUEST_ID_RE.match(rid):
        raise _Reject("requestId", "pattern",
                      f"requestId {_show(rid)} must be 1-128 characters from A-Z a-z 0-9 . _ : -")
    return rid


def _labels(obj: dict) -> dict:
    labels = _optional(obj, "labels")
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise _Reject("labels", "type", f"labels must be an object of string pairs, not {_type_name(labels)}")
    if len(labels) > MAX_LABELS:
        raise _Reject("labels", "max-count", f"labels has {len(labels)} pairs; at most {MAX_LABELS} are allowed")
    for k, v in labels.items():
        if not k or len(k) > MAX_LABEL_CHARS or re.fullmatch(r"__.*__", k):
            raise _Reject("labels", "key", f"label key {_show(k)} must be 1-{MAX_LABEL_CHARS} characters "
                                           "(and not of the form __name__)")
        if not isinstance(v, str):
            raise _Reject(f"labels.{k}", "type", f"label {_show(k)} must have a string value, not {_type_name(v)}")
        if len(v) > MAX_LABEL_CHARS:
            raise _Reject(f"labels.{k}", "max-length",
                          f"label {_show(k)} has a value longer than {MAX_LABEL_CHARS} characters")
    return dict(labels)


def _dicom_store(obj: dict, policy: Policy) -> str:
    store = _optional(obj, "dicomStore")
    if store is None:
        if policy.default_store:
            return policy.default_store
        raise _Reject("dicomStore", "required", "dicomStore is required (this deployment sets no default store)")
    if not isinstance(store, str):
        raise _Reject("dicomStore", "type", f"dicomStore must be a string, not {_type_name(store)}")
    if not valid_store_name(store):
        raise _Reject("dicomStore", "resource-name",
                      f"dicomStore {_show(store)} must be a full resource name "
                      "projects/PROJECT/locations/LOCATION/datasets/DATASET/dicomStores/STORE (project: a Google "
                      "Cloud project ID; dataset and store IDs: 1-256 of A-Z a-z 0-9 _ . -)")
    return store


def table_uri_parts(uri: str) -> tuple[str, str, str]:
    """bq://PROJECT.DATASET.TABLE with BigQuery's naming rules (healthcare-api.md §G)."""
    f = "bigqueryDestination.tableUri"
    if len(uri) > TABLE_URI_MAX:
        raise _Reject(f, "max-length", f"tableUri is {len(uri)} characters; at most {TABLE_URI_MAX} are allowed")
    if not uri.startswith("bq://"):
        raise _Reject(f, "scheme", f"tableUri {_show(uri)} must start with bq:// (bq://PROJECT.DATASET.TABLE)")
    parts = uri[5:].rsplit(".", 2)
    if len(parts) != 3 or not all(parts):
        raise _Reject(f, "format", f"tableUri {_show(uri)} must be bq://PROJECT.DATASET.TABLE")
    project, dataset, table = parts
    if not PROJECT_RE.match(project):
        raise _Reject(f, "project-id",
                      f"tableUri project {_show(project)} is not a valid project ID: 6-30 characters of a-z 0-9 -, "
                      "starting with a letter and not ending with '-' (optionally domain-scoped: example.com:proj)")
    if not DATASET_RE.match(dataset):
        raise _Reject(f, "dataset-id", f"tableUri dataset {_show(dataset)} is not a valid BigQuery dataset ID: "
                                       "1-1024 letters, digits and underscores")
    if "$" in table:
        raise _Reject(f, "table-id", f"tableUri table {_show(table)}: partition decorators ($) are not supported")
    bad = next((c for c in table if not (unicodedata.category(c)[0] in TABLE_CATEGORIES
                                         or unicodedata.category(c) in ("Pc", "Pd", "Zs"))), None)
    if bad is not None:
        raise _Reject(f, "table-id", f"tableUri table {_show(table)} is not a valid BigQuery table ID: character "
                                     f"{_show(bad)} is not a letter, mark, number, connector (_), dash or space")
    if len(table.encode("utf-8")) > TABLE_ID_MAX_BYTES:
        raise _Reject(f, "table-id", f"tableUri table ID is longer than {TABLE_ID_MAX_BYTES} UTF-8 bytes")
    return project, dataset, table


def _destination(obj: dict) -> dict:
    dest = _optional(obj, "bigqueryDestination")
    if dest is None:
        raise _Reject("bigqueryDestination", "required", "bigqueryDestination is required")
    if not isinstance(dest, dict):
        raise _Reject("bigqueryDestination", "type", f"bigqueryDestination must be an object, not {_type_name(dest)}")
    _unknown(dest, DEST_FIELDS, "bigqueryDestination")
    out: dict = {}
    uri = _optional(dest, "tableUri")
    if uri is None:
        raise _Reject("bigqueryDestination.tableUri", "required", "bigqueryDestination.tableUri is required")
    if not isinstance(uri, str):
        raise _Reject("bigqueryDestination.tableUri", "type", f"tableUri must be a string, not {_type_name(uri)}")
    table_uri_parts(uri)
    out["tableUri"] = uri
    wd = _optional(dest, "writeDisposition")
    if wd is not None:
        if not isinstance(wd, str) or wd not in WRITE_DISPOSITIONS:
            raise _Reject("bigqueryDestination.writeDisposition", "enum",
                          f"writeDisposition {_show(wd)} must be one of WRITE_EMPTY, WRITE_TRUNCATE, WRITE_APPEND "
                          "(or write-empty, write-truncate, write-append)")
        out["writeDisposition"] = WRITE_DISPOSITIONS[wd]
    force = _optional(dest, "force")
    if force is not None:
        if not isinstance(force, bool):
            raise _Reject("bigqueryDestination.force", "type", f"force must be a boolean, not {_type_name(force)}")
        if wd is not None:
            raise _Reject("bigqueryDestination.force", "exclusive",
                          "force cannot be combined with writeDisposition; set writeDisposition alone "
                          "(force is deprecated: true = WRITE_TRUNCATE, false = WRITE_EMPTY)")
        out["force"] = force
    iss = _optional(dest, "includeSourceStore")
    if iss is not None:
        if not isinstance(iss, bool):
            raise _Reject("bigqueryDestination.includeSourceStore", "type",
                          f"includeSourceStore must be a boolean, not {_type_name(iss)}")
        out["includeSourceStore"] = iss
    for name in ("schemaJson", "schemaFlattened"):
        v = _optional(dest, name)
        if v is None:
            continue
        if v != {} or not isinstance(v, dict):
            raise _Reject(f"bigqueryDestination.{name}", "type", f"{name} must be an empty object {{}}")
        out[name] = {}
    if "schemaJson" in out and "schemaFlattened" in out:
        raise _Reject("bigqueryDestination.schemaJson", "exclusive",
                      "schemaJson and schemaFlattened cannot both be set; choose one schema")
    return out


def gcs_uri_parts(uri: str) -> tuple[str, str]:
    f = "filterConfig.resourcePathsGcsUri"
    if not uri.startswith("gs://"):
        raise _Reject(f, "gcs-uri", f"resourcePathsGcsUri {_show(uri)} must be gs://BUCKET/OBJECT")
    bucket, sep, obj = uri[5:].partition("/")
    if not sep or not obj:
        raise _Reject(f, "object-name", f"resourcePathsGcsUri {_show(uri)} must name an object: gs://BUCKET/OBJECT")
    problem = _bucket_problem(bucket)
    if problem:
        raise _Reject(f, "bucket-name", f"resourcePathsGcsUri bucket {_show(bucket)} is not a valid bucket name: "
                                        f"{problem}")
    if len(obj.encode("utf-8")) > 1024 or "\r" in obj or "\n" in obj or obj in (".", ".."):
        raise _Reject(f, "object-name", f"resourcePathsGcsUri object {_show(obj)} is not a valid object name "
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


def _filter(obj: dict) -> dict | None:
    fc = _optional(obj, "filterConfig")
    if fc is None:
        return None
    if not isinstance(fc, dict):
        raise _Reject("filterConfig", "type", f"filterConfig must be an object, not {_type_name(fc)}")
    _unknown(fc, FILTER_FIELDS, "filterConfig")
    uri = _optional(fc, "resourcePathsGcsUri")
    if uri is None:
        raise _Reject("filterConfig.resourcePathsGcsUri", "required",
                      "filterConfig.resourcePathsGcsUri is required when filterConfig is set")
    if not isinstance(uri, str):
        raise _Reject("filterConfig.resourcePathsGcsUri", "type",
                      f"resourcePathsGcsUri must be a string, not {_type_name(uri)}")
    gcs_uri_parts(uri)
    return {"resourcePathsGcsUri": uri}


def _allowed(value: str, patterns: tuple[str, ...]) -> bool:
    return not patterns or any(fnmatchcase(value, p) for p in patterns)


# -- entry point ------------------------------------------------------------------------------------
def parse(data, message_id: str, policy: Policy = Policy()) -> Parsed:
    """Validate one request message. Never raises."""
    request_id, known = str(message_id), {}
    try:
        obj = _decode(data, policy.max_bytes)
        request_id = _request_id(obj, request_id)
        known["labels"] = _labels(obj)
        _unknown(obj, TOP_FIELDS)
        store = _dicom_store(obj, policy)
        known["dicomStore"] = store
        dest = _destination(obj)
        known["bigqueryDestination"] = dest
        fc = _filter(obj)
        known["filterConfig"] = fc
        if not _allowed(store, policy.allowed_stores):
            raise _Reject("dicomStore", "allowlist",
                          "dicomStore is not one this deployment may export from (ALLOWED_DICOM_STORES)")
        project, dataset, _ = table_uri_parts(dest["tableUri"])
        if not _allowed(f"{project}.{dataset}", policy.allowed_datasets):
            raise _Reject("bigqueryDestination.tableUri", "allowlist",
                          "the destination BigQuery dataset is not one this deployment may export to "
                          "(ALLOWED_BQ_DATASETS)")
    except _Reject as r:
        return Parsed(request_id=request_id, rejection=r.rejection, known=known)
    except Exception as e:  # noqa: BLE001 - a validator bug must not become a poison message
        return Parsed(request_id=request_id, known=known,
                      rejection=Rejection(MESSAGE, "internal", f"the request could not be validated "
                                                                f"({type(e).__name__})"))
    request = {"requestId": request_id, "dicomStore": store, "bigqueryDestination": dest, "labels": known["labels"]}
    if fc:
        request["filterConfig"] = fc
    return Parsed(request_id=request_id, request=request, known=known)


def export_body(request: dict) -> dict:
    """The ExportDicomDataRequest body for the Healthcare API."""
    body = {"bigqueryDestination": dict(request["bigqueryDestination"])}
    if request.get("filterConfig"):
        body["filterConfig"] = dict(request["filterConfig"])
    return body


def api_version_for(request: dict, default: str) -> str:
    """v1 unless a field of the request exists only in v1beta1. filterConfig is in v1 since the
    discovery revision 20261013 (healthcare-api.md §A), so today nothing forces v1beta1."""
    return default
