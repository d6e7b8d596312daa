"""export_request: turn one export request (a Pub/Sub message) into one running export.

Steps, each recorded in the ledger before the next (README.md, "Reliability", explains every crash window):
  1. validate (handlers/request.py); create the ledger document in a transaction: RECEIVED, or
     REJECTED with its event recorded as unpublished. A document that already exists makes this
     delivery a duplicate, and it only resumes what the ledger says is unfinished.
  2. STARTING: the export call may now have been made (first/last attempt times recorded).
  3. call the Healthcare API export; if the process died in step 2-3, the next delivery looks the
     operation up with operations.list instead of exporting twice.
  4. STARTED with the operation (or FAILED with the API's error), the event recorded unpublished.
  5. publish the event, then record it as published.
Every step runs under the document's lease (leaseUntil/leaseOwner), so two deliveries of one
request never work on it at once: the later one is redelivered by Pub/Sub.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import config
from handlers import event as ev
from handlers import request as req
from handlers.adapters import ledger as L
from handlers.adapters import logs

INSTANCE = f"{socket.gethostname()}:{os.getpid()}"
CLOCK_SKEW = timedelta(seconds=60)  # tolerance between our clock and the API's createTime
OWNED_EVENTS = (ev.REJECTED, ev.STARTED, ev.FAILED)


class Redeliver(Exception):
    """Not done yet: the function fails so that Pub/Sub delivers the message again."""


# -- clients: created once per instance, on first use ---------------------------------------------------
_deps = None
_deps_lock = threading.Lock()


def dependencies():
    """(ledger, healthcare, events) for this instance."""
    global _deps
    if _deps is None:
        with _deps_lock:
            if _deps is None:
                from handlers.adapters.events import Events
                from handlers.adapters.healthcare import Healthcare
                s = config.get()
                project = config.project_id(s)
                _deps = (L.Ledger(s.ledger_collection, project),
                         Healthcare(s.healthcare_endpoint, s.healthcare_version, local=s.healthcare_is_local,
                                    timeout_s=s.healthcare_http_timeout_s, budget_s=s.healthcare_retry_budget_s),
                         Events(project, s.events_topic))
    return _deps


# -- entry --------------------------------------------------------------------------------------------------
def handle(cloud_event) -> None:
    s = config.get()
    message, message_id, published = ev.received(cloud_event)
    published = published or L.now()
    raw = _message_bytes(message)
    parsed = req.parse(raw, message_id, req.Policy.from_settings(s))
    trace, span = logs.trace_from(cloud_event, s.project)
    with logs.context(trace=trace, span=span, requestId=parsed.request_id, messageId=message_id):
        Intake(s, *dependencies(), published_at=published).run(parsed, raw, message_id)


def _message_bytes(message: dict) -> bytes | None:
    data = message.get("data")
    if data is None:
        return b""
    try:
        return base64.b64decode(data, validate=True) if isinstance(data, str) else None
    except (binascii.Error, ValueError):
        return None


def _rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Intake:
    def __init__(self, settings, ledger, healthcare, events, *, published_at: datetime):
        self.s = settings
        self.ledger = ledger
        self.hc = healthcare
        self.events = events
        self.published_at = published_at
        self.owner = f"{INSTANCE}:{uuid.uuid4().hex[:12]}"  # one per delivery
        self.deadline = time.monotonic() + settings.healthcare_retry_budget_s

    # -- 1. record ----------------------------------------------------------------------------------
    def run(self, parsed: req.Parsed, raw: bytes | None, message_id: str) -> None:
        rid = parsed.request_id
        doc = new_document(parsed, raw, message_id, published_at=self.published_at, owner=self.owner,
                           lease_s=self.s.intake_lease_s)
        created, stored = self.ledger.create(rid, doc)
        if created:
            if parsed.ok:
                logs.info("export request received", dicomStore=doc["dicomStore"], tableUri=doc["tableUri"])
            else:
                r = parsed.rejection
                logs.error(f"export request rejected: {r.message}", field=r.field, rule=r.rule)
        else:
            same = stored.get("payloadSha256") == doc["payloadSha256"]
            if not same and stored.get("messageId") != message_id:
                logs.warning("requestId already recorded for a different message; this message is ignored "
                             "(use a new requestId for a new export)", recordedMessageId=stored.get("messageId"),
                             state=stored.get("state"))
            else:
                logs.info("duplicate delivery of a recorded request", state=stored.get("state"))
        self.advance(stored)

    # -- the state machine -----------------------------------------------------------------------------
    def advance(self, doc: dict) -> None:
        if doc.get("operation"):
            logs.bind(operation=doc["operation"], logsUrl=doc.get("logsUrl"))
        if doc["state"] not in (L.RECEIVED, L.STARTING) and not self.pending(doc):
            return  # everything this function owns is done; the poller takes it from here
        doc = self.acquire(doc)
        try:
            if doc["state"] in (L.RECEIVED, L.STARTING):
                doc = self.start(doc)
            pending = self.pending(doc)
            for i, event_type in enumerate(pending):
                doc = self.publish(doc, event_type, last=i == len(pending) - 1)
            if not pending:
                self.ledger.release(doc["requestId"], owner=self.owner)
        except BaseException:
            self._release_quietly(doc["requestId"])
            raise

    def pending(self, doc: dict) -> list[str]:
        """Events this function owns that are recorded but not known to be published."""
        out = []
        for event_type in OWNED_EVENTS:
            e = (doc.get("events") or {}).get(event_type)
            if e and not e.get("published"):
                if event_type == ev.FAILED and doc.get("operation"):
                    continue  # a failed operation's event belongs to the poller
                out.append(event_type)
        return out

    def acquire(self, doc: dict) -> dict:
        if doc.get("leaseOwner") == self.owner:
            return doc
        claimed = self.ledger.claim(doc["requestId"], owner=self.owner, lease_s=self.s.intake_lease_s,
                                    states=(doc["state"],))
        if claimed is None:
            current = self.ledger.get(doc["requestId"]) or doc
            logs.info("another delivery holds this request's lease; asking Pub/Sub to redeliver",
                      state=current.get("state"), leaseUntil=current.get("leaseUntil"))
            raise Redeliver(f"request {doc['requestId']} is being processed by another delivery")
        return claimed

    def _release_quietly(self, request_id: str) -> None:
        try:
            self.ledger.release(request_id, owner=self.owner)
        except Exception as e:  # noqa: BLE001 - the lease then simply expires
            logs.warning("could not release the lease; it will expire", problem=type(e).__name__)

    def update(self, doc: dict, updates: dict) -> dict:
        """Write `updates` if this delivery still holds the lease; else let Pub/Sub redeliver."""
        owner = self.owner

        def decide(current):
            return {**updates, "updatedAt": L.now()} if current.get("leaseOwner") == owner else None
        written, new = self.ledger.update(doc["requestId"], decide)
        if not written:
            raise Redeliver("lost the lease on the request (another delivery took over)")
        return new

    # -- 2-4. start the export ---------------------------------------------------------------------------
    def start(self, doc: dict) -> dict:
        from handlers.adapters.healthcare import ApiError, TransientError

        request = doc["request"]
        store = request["dicomStore"]
        version = req.api_version_for(request, self.s.healthcare_version)
        try:
            if doc["state"] == L.STARTING:
                found = self.find_operation(doc, version)
                if found is not None:
                    return self.started(doc, found, version, recovered=True)
            t = L.now()
            attempt = {"state": L.STARTING, "lastAttemptAt": t, "attempts": int(doc.get("attempts") or 0) + 1}
            if not doc.get("firstAttemptAt"):
                attempt["firstAttemptAt"] = t
            doc = self.update(doc, attempt)
            while True:
                try:
                    op = self.hc.export(store, req.export_body(request), version=version, deadline=self.deadline)
                    return self.started(doc, op, version)
                except TransientError as e:
                    if not e.ambiguous:
                        raise
                    # It may have started: look before exporting again.
                    found = self.find_operation(doc, version)
                    if found is not None:
                        return self.started(doc, found, version, recovered=True)
                    if time.monotonic() >= self.deadline:
                        raise
                    logs.warning("the export call failed ambiguously and no operation was started; retrying",
                                 problem=str(e))
        except ApiError as e:
            logs.error(f"the Healthcare API refused the export: {e.status}: {e.message}",
                       httpStatus=e.http_status, status=e.status)
            return self.failed(doc, e.rpc())
        except TransientError as e:
            return self.transient(doc, e)
        except _Ambiguous as e:
            logs.error(str(e))
            return self.failed(doc, {"code": 10, "message": str(e)})

    # -- 5. publish ---------------------------------------------------------------------------------------
    def publish(self, doc: dict, event_type: str, *, last: bool) -> dict:
        from handlers.adapters.events import PublishError

        recorded = doc["events"][event_type]
        try:
            message_id = self.events.publish(recorded["data"], recorded["attributes"])
        except PublishError as e:
            logs.warning("could not publish the event; Pub/Sub will redeliver the request", problem=str(e),
                         eventType=event_type)
            raise Redeliver(str(e)) from e
        t = L.now()
        updates = {f"events.{event_type}.published": True, f"events.{event_type}.publishedAt": t,
                   f"events.{event_type}.messageId": message_id}
        severity = logs.error if event_type == ev.FAILED else logs.info
        severity(f"published {event_type}", eventType=event_type, eventId=recorded["eventId"],
                 error=recorded["data"].get("error"))
        if last:
            new = self.ledger.release(doc["requestId"], owner=self.owner, updates=updates)
            if new is None:
                logs.warning("lost the lease before recording the publication; a redelivery may publish the "
                             "event again with the same eventId", eventType=event_type)
                return doc
            return new
        return self.update(doc, updates)

    def started(self, doc: dict, op: dict, version: str, *, recovered: bool = False) -> dict:
        meta = op.get("metadata") or {}
        t = L.now()
        updates = {"state": L.STARTED, "operation": op["name"], "apiVersion": version,
                   "createTime": meta.get("createTime"), "logsUrl": meta.get("logsUrl"),
                   "nextPollAt": t + timedelta(seconds=1), "pollInterval": self.s.poll_initial_interval_s}
        built = ev.build(ev.STARTED, {**doc, **updates})
        updates[f"events.{ev.STARTED}"] = {**built, "published": False}
        doc = self.update(doc, updates)
        logs.bind(operation=op["name"], logsUrl=meta.get("logsUrl"))
        logs.info("export started" + (" (operation found again after an interrupted call)" if recovered else ""),
                  recovered=recovered)
        return doc

    def failed(self, doc: dict, error: dict) -> dict:
        t = L.now()
        updates = {"state": L.FAILED, "error": error, "endTime": _rfc3339(t)}
        built = ev.build(ev.FAILED, {**doc, **updates})
        updates[f"events.{ev.FAILED}"] = {**built, "published": False}
        return self.update(doc, updates)

    def transient(self, doc: dict, e) -> dict:
        age = (L.now() - (doc.get("publishTime") or self.published_at)).total_seconds()
        if age <= self.s.max_request_age_s:
            logs.warning("the Healthcare API is unavailable; Pub/Sub will redeliver the request",
                         problem=str(e), ageS=round(age, 1))
            raise Redeliver(str(e))
        message = (f"gave up: the Healthcare API did not accept the export ({e}); the request is {int(age)} s old, "
                   f"older than MAX_REQUEST_AGE_S={int(self.s.max_request_age_s)}. Publish the request again with "
                   f"a new requestId to retry.")
        logs.error(message, ageS=round(age, 1))
        return self.failed(doc, {"code": 4, "message": message})

    # -- the crash window between "export returned" and "operation recorded" -----------------------------
    def find_operation(self, doc: dict, version: str) -> dict | None:
        """The export this request started before its delivery was interrupted, if any.

        Operations carry no request id, so: list the dataset's export operations created since the
        first attempt (minus clock skew) that no ledger document claims. If another request of the
        same dataset is mid-call, wait for it (redeliver); one candidate is ours; none means nothing
        started; several cannot be told apart, so fail rather than risk exporting twice."""
        dataset = _dataset_of(doc["request"]["dicomStore"])
        since = (doc.get("firstAttemptAt") or doc.get("lastAttemptAt") or L.now()) - CLOCK_SKEW
        candidates = []
        for op in self.hc.iter_operations(dataset, version=version, deadline=self.deadline):
            meta = op.get("metadata") or {}
            created = ev.parse_time(meta.get("createTime"))
            if "ExportDicomData" in str(meta.get("apiMethodName", "")) and created is not None and created >= since:
                candidates.append(op)
        recent = L.now() - timedelta(seconds=2 * self.s.max_request_age_s)  # older ones give up on their own
        others = [d for d in self.ledger.in_state(L.STARTING, hcDataset=dataset)
                  if d["requestId"] != doc["requestId"] and (d.get("publishTime") or recent) >= recent]
        candidates = [op for op in candidates if self.ledger.find_by_operation(op["name"]) is None]
        if any(d.get("leaseUntil") and d["leaseUntil"] > L.now() for d in others):
            logs.info("another request of the same dataset is starting its export; waiting for it",
                      candidates=len(candidates))
            raise Redeliver("another export on the dataset is being started")
        if not candidates:
            logs.info("no operation of this request found: the export had not started")
            return None
        if len(candidates) == 1 and not others:
            return candidates[0]
        names = ", ".join(op["name"] for op in candidates[:5])
        raise _Ambiguous(f"cannot tell which of {len(candidates)} export operations started since "
                         f"{_rfc3339(since)} belongs to this request ({names}); not exporting again")


class _Ambiguous(Exception):
    pass


def new_document(parsed: req.Parsed, raw: bytes | None, message_id: str, *, published_at: datetime,
                 owner: str | None, lease_s: float, at: datetime | None = None) -> dict:
    """The ledger document of a request as first recorded: RECEIVED, or REJECTED with its event."""
    t = at or L.now()
    doc = {
        "requestId": parsed.request_id, "state": L.RECEIVED, "messageId": message_id,
        "payloadSha256": hashlib.sha256(raw).hexdigest() if isinstance(raw, bytes) else None,
        "publishTime": published_at, "receivedAt": t, "updatedAt": t,
        "request": parsed.request, "labels": parsed.known.get("labels") or {},
        "dicomStore": parsed.known.get("dicomStore"),
        "hcDataset": _dataset_of(parsed.known.get("dicomStore")),
        "tableUri": (parsed.known.get("bigqueryDestination") or {}).get("tableUri"),
        "operation": None, "apiVersion": None, "createTime": None, "endTime": None, "logsUrl": None,
        "counter": None, "error": None, "events": {},
        "leaseOwner": owner, "leaseUntil": t + timedelta(seconds=lease_s) if owner else None,
    }
    if not parsed.ok:
        doc.update(state=L.REJECTED, error=parsed.rejection.error(), endTime=_rfc3339(t))
        doc["events"] = {ev.REJECTED: {**ev.build(ev.REJECTED, doc), "published": False}}
    return doc


def _dataset_of(store: str | None) -> str | None:
    return store.split("/dicomStores/")[0] if isinstance(store, str) and "/dicomStores/" in store else None
