"""export_status: `GET ?requestId=ID` -> the request's ledger record as JSON (docs/contract.md, "Status lookup").

200 with the record; 400 when requestId is missing, repeated or malformed (the contract's pattern);
404 when no request has that id; 405 for other methods; 503 when the ledger cannot be read. Errors use
Google's envelope {"error": {"code", "status", "message"}}. Only what an operator needs is returned: no
lease, hash or raw event bodies. The function is deployed without public access (deploy.sh).
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from handlers import wiring
from handlers.adapters import logs
from handlers.core import ledger as L
from handlers.core.clock import rfc3339
from handlers.core.events import counter_ints

HEADERS = {"Content-Type": "application/json; charset=utf-8", "Cache-Control": "no-store",
           "X-Content-Type-Options": "nosniff"}
Response = tuple[str, int, dict[str, str]]


def handle(request: Any) -> Response:
    """A Flask request -> (body, status, headers)."""
    if request.method not in ("GET", "HEAD"):
        return _error(405, "METHOD_NOT_ALLOWED", "use GET ?requestId=ID", {"Allow": "GET, HEAD"})
    ids = request.args.getlist("requestId")
    if len(ids) != 1 or not ids[0]:
        return _error(400, "INVALID_ARGUMENT", "give exactly one requestId: GET ?requestId=ID")
    rid = ids[0]
    if not L.REQUEST_ID_RE.match(rid):
        return _error(400, "INVALID_ARGUMENT", "malformed requestId: it must match [A-Za-z0-9._:-]{1,128}")
    with logs.context(requestId=rid):
        try:
            doc = wiring.ledger().get(rid)
        except Exception as e:  # noqa: BLE001 - Firestore unavailable: the caller may retry
            logs.error(f"status lookup failed: {type(e).__name__}: {e}")
            return _error(503, "UNAVAILABLE", "the ledger cannot be read right now; retry later", {"Retry-After": "5"})
    if doc is None:
        return _error(404, "NOT_FOUND", f"no export request has requestId {rid!r}")
    return json.dumps(view(doc), ensure_ascii=False, sort_keys=True), 200, HEADERS


def view(doc: L.Doc) -> L.Doc:
    """The public record of a ledger document (JSON-ready)."""
    request = doc.get("request") or {}
    dest = request.get("bigqueryDestination") or ({"tableUri": doc["tableUri"]} if doc.get("tableUri") else None)
    events: L.Doc = {}
    for event_type, e in sorted((doc.get("events") or {}).items()):
        if isinstance(e, dict):
            events[event_type] = {"eventId": e.get("eventId"), "published": bool(e.get("published")),
                                  "publishedAt": _time(e.get("publishedAt"))}
    out = {
        "requestId": doc.get("requestId"),
        "state": doc.get("state"),
        "dicomStore": request.get("dicomStore") or doc.get("dicomStore"),
        "bigqueryDestination": dest,
        "filterConfig": request.get("filterConfig"),
        "labels": request.get("labels") or doc.get("labels") or {},
        "operation": doc.get("operation"),
        "apiVersion": doc.get("apiVersion"),
        "counter": counter_ints(doc.get("counter")),
        "createTime": _time(doc.get("createTime")),
        "endTime": _time(doc.get("endTime")),
        "logsUrl": doc.get("logsUrl"),
        "error": doc.get("error"),
        "receivedAt": _time(doc.get("receivedAt")),
        "updatedAt": _time(doc.get("updatedAt")),
        "lastPolledAt": _time(doc.get("lastPolledAt")),
        "nextPollAt": _time(doc.get("nextPollAt")) if doc.get("state") == L.STARTED else None,
        "polls": int(doc.get("polls") or 0),
        "events": events,
    }
    return out


def _time(value: Any) -> Any:
    """Firestore timestamps as RFC 3339 UTC strings; the API's own strings unchanged."""
    return rfc3339(value) if isinstance(value, datetime) else value


def _error(code: int, status: str, message: str, extra: dict[str, str] | None = None) -> Response:
    body = json.dumps({"error": {"code": code, "status": status, "message": message}})
    return body, code, {**HEADERS, **(extra or {})}
