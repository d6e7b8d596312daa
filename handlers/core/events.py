"""Events (docs/contract.md, "Events"): data and attributes built from a ledger document, and the
Pub/Sub message a function receives. Pure.

The intake and the poller both build events here, and record what they built in the ledger
(`events.{TYPE}`) before publishing (handlers/core/outbox.py), so a re-publication after a crash is
byte-for-byte the same. An event is built from the ledger fields EVENT_FIELDS only (handlers/core/ledger.py).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from .ledger import EVENT_FIELDS, Doc

REJECTED, STARTED = "EXPORT_REJECTED", "EXPORT_STARTED"
SUCCEEDED, FAILED = "EXPORT_SUCCEEDED", "EXPORT_FAILED"
CANCELLED, TIMED_OUT = "EXPORT_CANCELLED", "EXPORT_TIMED_OUT"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, TIMED_OUT})
MAX_ATTRIBUTE_BYTES = 1024  # Pub/Sub's limit on an attribute value


def event_id(request_id: str, event_type: str) -> str:
    return f"{request_id}:{event_type}"


def counter_ints(counter: Any) -> dict[str, int] | None:
    """The API's int64-as-string counter as JSON integers (missing ones are 0)."""
    if not isinstance(counter, dict):
        return None
    out = {}
    for k in ("success", "failure", "pending"):
        try:
            out[k] = int(counter.get(k) or 0)
        except (TypeError, ValueError):
            out[k] = 0
    return out


def build(event_type: str, ledger_doc: Doc) -> Doc:
    """{"eventId", "data", "attributes"} for `event_type` from the ledger document (its EVENT_FIELDS)."""
    doc = {k: ledger_doc.get(k) for k in EVENT_FIELDS}
    request = doc.get("request") or {}
    rid = ledger_doc["requestId"]
    dest = request.get("bigqueryDestination") or ({"tableUri": doc["tableUri"]} if doc.get("tableUri") else None)
    store = request.get("dicomStore") or doc.get("dicomStore")
    table_uri = (dest or {}).get("tableUri") or doc.get("tableUri")
    counter = counter_ints(doc.get("counter"))
    eid = event_id(rid, event_type)
    data = {
        "eventId": eid,
        "eventType": event_type,
        "requestId": rid,
        "dicomStore": store,
        "bigqueryDestination": dest,
        "filterConfig": request.get("filterConfig") if request else doc.get("filterConfig"),
        "operation": doc.get("operation"),
        "counter": counter,
        "createTime": doc.get("createTime"),
        "endTime": doc.get("endTime"),
        "logsUrl": doc.get("logsUrl"),
        "error": doc.get("error"),
        "labels": request.get("labels") if request else (doc.get("labels") or {}),
    }
    attributes: dict[str, str] = {"eventType": event_type, "eventId": eid, "requestId": rid}
    for name, value in (("dicomStore", store), ("tableUri", table_uri)):
        if isinstance(value, str) and value and len(value.encode("utf-8")) <= MAX_ATTRIBUTE_BYTES:
            attributes[name] = value
    if event_type in TERMINAL:
        attributes["failureCount"] = str((counter or {}).get("failure", 0))
    return {"eventId": eid, "data": data, "attributes": attributes}


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 string (Z or an offset, up to nanoseconds) as an aware UTC datetime; None if unreadable."""
    if isinstance(value, datetime):
        t = value
    elif isinstance(value, str) and value:
        try:
            t = datetime.fromisoformat(value)  # Python >= 3.11: Z, offsets, fractions beyond 6 digits
        except ValueError:
            return None
    else:
        return None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def received(cloud_event: Any) -> tuple[Doc, str, datetime | None]:
    """The Pub/Sub message inside a messagePublished CloudEvent: (message, its id, its publish time)."""
    data = cloud_event.data if isinstance(cloud_event.data, dict) else {}
    message = data.get("message")
    message = message if isinstance(message, dict) else {}
    message_id = str(message.get("messageId") or cloud_event["id"])
    return message, message_id, parse_time(message.get("publishTime") or cloud_event.get("time"))

