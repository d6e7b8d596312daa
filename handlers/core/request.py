"""The export request (docs/contract.md, "Export request"): parse, validate and normalise. Pure: no I/O,
no clients. The rules for names (store, table, bucket) and the allowlists are config/shapes.py, shared
with the settings.

`parse(data, message_id, policy)` never raises: it returns a Parsed whose `rejection` names the
field, the rule and a message a person can act on, or whose `request` is the normalised request.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from config.shapes import (
    DEST_FIELDS,
    FILTER_FIELDS,
    WRITE_DISPOSITIONS,
    check_allowlists,
    destination,
    dicom_store,
    filter_config,
    gcs_uri_parts,
    optional,
    show,
    table_uri_parts,
    type_name,
    unknown,
)
from config.shapes import ShapeError as _Reject

from .ledger import REQUEST_ID_RE

__all__ = ["DEST_FIELDS", "FILTER_FIELDS", "REQUEST_ID_RE", "TOP_FIELDS", "WRITE_DISPOSITIONS", "Parsed", "Policy",
           "Rejection", "api_version_for", "export_body", "gcs_uri_parts", "parse", "table_uri_parts"]

TOP_FIELDS = ("requestId", "dicomStore", "bigqueryDestination", "filterConfig", "labels")
MAX_LABELS = 64
MAX_LABEL_CHARS = 63
MESSAGE = "(message)"  # the field name used for rules about the message as a whole


@dataclass(frozen=True)
class Policy:
    max_bytes: int = 65536
    default_store: str | None = None
    allowed_stores: tuple[str, ...] = ()
    allowed_datasets: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, s: Any) -> "Policy":
        return cls(max_bytes=s.max_request_bytes, default_store=s.default_dicom_store,
                   allowed_stores=s.allowed_dicom_stores, allowed_datasets=s.allowed_bq_datasets)


@dataclass(frozen=True)
class Rejection:
    field: str
    rule: str
    message: str

    def error(self) -> dict[str, Any]:
        """As the EXPORT_REJECTED event carries it: google.rpc INVALID_ARGUMENT."""
        return {"code": 3, "message": self.message}


@dataclass(frozen=True)
class Parsed:
    request_id: str
    request: dict[str, Any] | None = None          # normalised; None when rejected
    rejection: Rejection | None = None
    known: dict[str, Any] = field(default_factory=dict)  # validated parts, echoed on a rejection event

    @property
    def ok(self) -> bool:
        return self.rejection is None


# -- the message as a whole ---------------------------------------------------------------------------
def _decode(data: Any, max_bytes: int) -> dict[str, Any]:
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

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise _Reject(str(k)[:100] or '""', "duplicate-key", f"field {show(k)} appears more than once")
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
        raise _Reject(MESSAGE, "object", f"the request must be a JSON object, not {type_name(value)}")
    return value


def _check_strings(value: Any) -> None:
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


# -- fields ---------------------------------------------------------------------------------------
def _request_id(obj: dict[str, Any], message_id: str) -> str:
    rid = optional(obj, "requestId")
    if rid is None:
        return message_id
    if not isinstance(rid, str):
        raise _Reject("requestId", "type", f"requestId must be a string, not {type_name(rid)}")
    if not REQUEST_ID_RE.match(rid):
        raise _Reject("requestId", "pattern",
                      f"requestId {show(rid)} must be 1-128 characters from A-Z a-z 0-9 . _ : -")
    return rid


def _labels(obj: dict[str, Any]) -> dict[str, str]:
    labels = optional(obj, "labels")
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise _Reject("labels", "type", f"labels must be an object of string pairs, not {type_name(labels)}")
    if len(labels) > MAX_LABELS:
        raise _Reject("labels", "max-count", f"labels has {len(labels)} pairs; at most {MAX_LABELS} are allowed")
    for k, v in labels.items():
        if not k or len(k) > MAX_LABEL_CHARS or re.fullmatch(r"__.*__", k):
            raise _Reject("labels", "key", f"label key {show(k)} must be 1-{MAX_LABEL_CHARS} characters "
                                           "(and not of the form __name__)")
        if not isinstance(v, str):
            raise _Reject(f"labels.{k}", "type", f"label {show(k)} must have a string value, not {type_name(v)}")
        if len(v) > MAX_LABEL_CHARS:
            raise _Reject(f"labels.{k}", "max-length",
                          f"label {show(k)} has a value longer than {MAX_LABEL_CHARS} characters")
    return dict(labels)


# -- entry point ------------------------------------------------------------------------------------
def parse(data: Any, message_id: str, policy: Policy = Policy()) -> Parsed:
    """Validate one request message. Never raises."""
    request_id, known = str(message_id), dict[str, Any]()
    try:
        obj = _decode(data, policy.max_bytes)
        request_id = _request_id(obj, request_id)
        known["labels"] = _labels(obj)
        unknown(obj, TOP_FIELDS)
        store = dicom_store(obj, policy.default_store)
        known["dicomStore"] = store
        dest = destination(obj)
        known["bigqueryDestination"] = dest
        fc = filter_config(obj)
        known["filterConfig"] = fc
        check_allowlists(store, dest["tableUri"], policy.allowed_stores, policy.allowed_datasets)
    except _Reject as r:
        return Parsed(request_id=request_id, rejection=Rejection(r.field, r.rule, r.message), known=known)
    except Exception as e:  # noqa: BLE001 - a validator bug must not become a poison message
        return Parsed(request_id=request_id, known=known,
                      rejection=Rejection(MESSAGE, "internal", f"the request could not be validated "
                                                                f"({type(e).__name__})"))
    request = {"requestId": request_id, "dicomStore": store, "bigqueryDestination": dest, "labels": known["labels"]}
    if fc:
        request["filterConfig"] = fc
    return Parsed(request_id=request_id, request=request, known=known)


def export_body(request: dict[str, Any]) -> dict[str, Any]:
    """The ExportDicomDataRequest body for the Healthcare API."""
    body = {"bigqueryDestination": dict(request["bigqueryDestination"])}
    if request.get("filterConfig"):
        body["filterConfig"] = dict(request["filterConfig"])
    return body


def api_version_for(request: dict[str, Any], default: str) -> str:
    """v1 unless a field of the request exists only in v1beta1. filterConfig is in v1 since the
    discovery revision 20261013, so today nothing forces v1beta1."""
    return default
