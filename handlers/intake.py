"""export_request: turn one export request (a Pub/Sub message) into one running export.

Steps, each recorded in the ledger before the next (docs/reliability.md, "Reliability: what happens when
the intake dies between two steps", explains every crash window):
  1. validate (handlers/core/request.py); create the ledger document (one create-only write): STARTING
     under this delivery's lease, or REJECTED with its event recorded as unpublished. A document that
     already exists makes this delivery a duplicate, and it only resumes what the ledger says is
     unfinished.
  2. call the Healthcare API export. STARTING means the call may have been made: if the process died
     before step 3, the next delivery looks the operation up with operations.list instead of
     exporting twice.
  3. record the operation, EXPORT_STARTED and the lease's release in one write while publishing the
     event, then record the publication (or FAILED with the API's error and its event, then publish
     it and record that).
Every write is conditioned on the version this delivery last read or wrote, and made only under its
lease (leaseUntil/leaseOwner), so two deliveries of one request never work on it at once: the later
one is redelivered by Pub/Sub. A fresh valid request costs an export call, three Firestore writes and
a publish, in four sequential steps.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import time
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, overload

import config
from handlers import wiring
from handlers.adapters import logs
from handlers.core import events as ev
from handlers.core import ledger as L
from handlers.core import outbox
from handlers.core import request as req
from handlers.core.clock import INSTANCE, now, rfc3339
from handlers.core.errors import PublishError
from handlers.core.lazy import once
from handlers.core.ledger import DELETE, Doc, Versioned, dataset_of

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from handlers.adapters.healthcare import Healthcare, TransientError
    from handlers.adapters.ledger_store import Ledger
    from handlers.adapters.pubsub import Events

CLOCK_SKEW = timedelta(seconds=60)  # tolerance between our clock and the API's createTime
OWNED_EVENTS = (ev.REJECTED, ev.STARTED, ev.FAILED)


class Redeliver(Exception):
    """Not done yet: the function fails so that Pub/Sub delivers the message again."""


@once
def _executor() -> ThreadPoolExecutor:
    """A few threads per instance, to publish an event while the ledger is written."""
    from concurrent.futures import ThreadPoolExecutor
    return ThreadPoolExecutor(max_workers=8, thread_name_prefix="publish")


# -- entry --------------------------------------------------------------------------------------------------
def handle(cloud_event: Any) -> None:
    s = wiring.settings()
    message, message_id, published = ev.received(cloud_event)
    published = published or now()
    raw = _message_bytes(message)
    parsed = req.parse(raw, message_id, req.Policy.from_settings(s))
    trace, span = logs.trace_from(cloud_event, s.project)
    with logs.context(trace=trace, span=span, requestId=parsed.request_id, messageId=message_id):
        Intake(s, *wiring.intake(), published_at=published).run(parsed, raw, message_id)


def _message_bytes(message: Doc) -> bytes | None:
    data = message.get("data")
    if data is None:
        return b""
    try:
        return base64.b64decode(data, validate=True) if isinstance(data, str) else None
    except (binascii.Error, ValueError):
        return None


class Intake:
    def __init__(self, settings: config.Settings, ledger: Ledger, healthcare: Healthcare, events: Events, *,
                 published_at: datetime):
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
        created, item = self.ledger.create(rid, doc)
        if created:
            r = parsed.rejection
            if r is None:
                logs.info("export request received", dicomStore=doc["dicomStore"], tableUri=doc["tableUri"])
            else:
                logs.error(f"export request rejected: {r.message}", field=r.field, rule=r.rule)
        else:
            stored = item.doc
            same = stored.get("payloadSha256") == doc["payloadSha256"]
            if not same and stored.get("messageId") != message_id:
                logs.warning("requestId already recorded for a different message; this message is ignored "
                             "(use a new requestId for a new export)", recordedMessageId=stored.get("messageId"),
                             state=stored.get("state"))
            else:
                logs.info("duplicate delivery of a recorded request", state=stored.get("state"))
        self.advance(item, fresh=created)

    # -- the state machine -----------------------------------------------------------------------------
    def advance(self, item: Versioned, *, fresh: bool = False) -> None:
        """`fresh`: this delivery has just created the document (so holds its lease, and no export call
        can have been made for it yet)."""
        doc = item.doc
        if doc.get("operation"):
            logs.bind(operation=doc["operation"], logsUrl=doc.get("logsUrl"))
        if doc["state"] not in (L.RECEIVED, L.STARTING) and not self.pending(doc):
            return  # everything this function owns is done; the poller takes it from here
        item = self.acquire(item)
        try:
            if item.doc["state"] in (L.RECEIVED, L.STARTING):
                item = self.start(item, fresh=fresh)
            pending = self.pending(item.doc)
            if pending:
                outbox.drain(item, pending, item.doc["events"], publish=self.events.publish,
                             published=self.published, failed=self.publish_failed)
            else:
                self.ledger.release(item.request_id, owner=self.owner, current=item)
        except BaseException:
            self._release_quietly(item)
            raise

    def pending(self, doc: Doc) -> list[str]:
        """Events this function owns that are recorded but not known to be published (a failed operation's
        event belongs to the poller)."""
        return [t for t in outbox.unpublished(doc, OWNED_EVENTS) if not (t == ev.FAILED and doc.get("operation"))]

    def acquire(self, item: Versioned) -> Versioned:
        if item.doc.get("leaseOwner") == self.owner:
            return item
        # Taking over a STARTING request is a recovery: say so, so that another recovery of the same
        # dataset never waits for this one (two recoveries waiting for each other would wait for ever).
        marks = {"recoveringBy": self.owner} if item.doc["state"] == L.STARTING else None
        claimed = self.ledger.claim(item.request_id, owner=self.owner, lease_s=self.s.intake_lease_s,
                                    states=(item.doc["state"],), current=item, updates=marks)
        if claimed is None:
            current = self.ledger.get(item.request_id) or item.doc
            logs.info("another delivery holds this request's lease; asking Pub/Sub to redeliver",
                      state=current.get("state"), leaseUntil=current.get("leaseUntil"))
            raise Redeliver(f"request {item.request_id} is being processed by another delivery")
        return claimed

    def _release_quietly(self, item: Versioned) -> None:
        try:
            self.ledger.release(item.request_id, owner=self.owner)
        except Exception as e:  # noqa: BLE001 - the lease then simply expires
            logs.warning("could not release the lease; it will expire", problem=type(e).__name__)

    @overload
    def update(self, item: Versioned, updates: Doc) -> Versioned: ...

    @overload
    def update(self, item: Versioned, updates: Doc, *, release: bool) -> Versioned | None: ...

    def update(self, item: Versioned, updates: Doc, *, release: bool = False) -> Versioned | None:
        """Write `updates` if this delivery still holds the lease (one write when nobody else wrote since
        `item`); with `release`, drop the lease in the same write. Without the lease: Pub/Sub redelivers
        (or, with `release`, None: the lease was lost after the work was done)."""
        owner = self.owner
        updates = {**updates, "updatedAt": now()}
        if release:
            updates.update(leaseOwner=DELETE, leaseUntil=DELETE)
        new = self.ledger.write(item, updates)
        if new is None:  # changed since: read again, and write only if the lease is still ours
            written, new = self.ledger.update(item.request_id,
                                              lambda cur: updates if cur.get("leaseOwner") == owner else None)
            new = new if written else None
        if new is None and not release:
            raise Redeliver("lost the lease on the request (another delivery took over)")
        return new

    # -- 2-4. start the export ---------------------------------------------------------------------------
    def start(self, item: Versioned, *, fresh: bool = False) -> Versioned:
        from handlers.adapters.healthcare import ApiError, TransientError

        request = item.doc["request"]
        store = request["dicomStore"]
        version = req.api_version_for(request, self.s.healthcare_version)
        try:
            if not fresh:
                if item.doc["state"] == L.STARTING:
                    found = self.find_operation(item.doc, version)
                    if found is not None:
                        return self.started(item, found, version, recovered=True)
                t = now()
                attempt = {"state": L.STARTING, "lastAttemptAt": t, "attempts": int(item.doc.get("attempts") or 0) + 1,
                           "recoveringBy": DELETE}  # an export call again: others of the dataset wait for it
                if not item.doc.get("firstAttemptAt"):
                    attempt["firstAttemptAt"] = t
                item = self.update(item, attempt)
            while True:
                try:
                    op = self.hc.export(store, req.export_body(request), version=version, deadline=self.deadline)
                    return self.started(item, op, version)
                except TransientError as e:
                    if not e.ambiguous:
                        raise
                    # It may have started: look before exporting again.
                    found = self.find_operation(item.doc, version)
                    if found is not None:
                        return self.started(item, found, version, recovered=True)
                    if time.monotonic() >= self.deadline:
                        raise
                    logs.warning("the export call failed ambiguously and no operation was started; retrying",
                                 problem=str(e))
        except ApiError as e:
            logs.error(f"the Healthcare API refused the export: {e.status}: {e.message}",
                       httpStatus=e.http_status, status=e.status)
            return self.failed(item, e.rpc())
        except TransientError as e:
            return self.transient(item, e)
        except _Ambiguous as e:
            logs.error(str(e))
            return self.failed(item, {"code": 10, "message": str(e)})

    # -- 5. publish ---------------------------------------------------------------------------------------
    def publish_failed(self, item: Versioned, event_type: str, e: PublishError) -> None:
        logs.warning("could not publish the event; Pub/Sub will redeliver the request", problem=str(e),
                     eventType=event_type)
        raise Redeliver(str(e)) from e

    def published(self, item: Versioned, event_type: str, recorded: Doc, message_id: str,
                  last: bool) -> Versioned | None:
        """Record a publication (the last one together with the lease's release)."""
        self._published(event_type, recorded)
        updates = outbox.publication(event_type, message_id, now())
        if last:
            new = self.update(item, updates, release=True)
            if new is None:
                logs.warning("lost the lease before recording the publication; a redelivery may publish the "
                             "event again with the same eventId", eventType=event_type)
                return item
            return new
        return self.update(item, updates)

    @staticmethod
    def _published(event_type: str, recorded: Doc) -> None:
        severity = logs.error if event_type == ev.FAILED else logs.info
        severity(f"published {event_type}", eventType=event_type, eventId=recorded["eventId"],
                 error=recorded["data"].get("error"))

    def started(self, item: Versioned, op: Doc, version: str, *, recovered: bool = False) -> Versioned:
        """Record the operation (with EXPORT_STARTED, unpublished, and the lease's release) while the event
        is being published, then record the publication.

        The first write closes the window in which a crash leaves an export that operations.list must
        find again (find_operation), so it is made at once, not after the publish; running the publish
        beside it costs no time. If the process dies after it, the poller (or a redelivery) publishes
        the recorded event; if it dies after the publish but before the second write, the event is
        published again with the same eventId. If the publish fails, Pub/Sub redelivers the request,
        and the redelivery publishes the recorded event."""
        meta = op.get("metadata") or {}
        t = now()
        updates = {"state": L.STARTED, "operation": op["name"], "apiVersion": version,
                   "createTime": meta.get("createTime"), "logsUrl": meta.get("logsUrl"),
                   "nextPollAt": t + timedelta(seconds=1), "pollInterval": self.s.poll_initial_interval_s}
        built, updates = outbox.record(ev.STARTED, {**item.doc, **updates}, updates)
        logs.bind(operation=op["name"], logsUrl=meta.get("logsUrl"))
        logs.info("export started" + (" (operation found again after an interrupted call)" if recovered else ""),
                  recovered=recovered)
        if self.pending(item.doc):  # an earlier event (none today) must go out first: record, then publish
            return self.update(item, updates)
        publishing = _executor().submit(self.events.publish, built["data"], built["attributes"])
        try:
            new = self.update(item, updates, release=True)
        finally:
            message_id: str | None
            problem: PublishError | None
            try:
                message_id, problem = publishing.result(), None
            except PublishError as e:
                message_id, problem = None, e
        if problem is not None:
            logs.warning("could not publish the event; Pub/Sub will redeliver the request", problem=str(problem),
                         eventType=ev.STARTED)
            raise Redeliver(str(problem)) from problem
        self._published(ev.STARTED, built)
        if new is None:
            logs.warning("lost the lease before recording the operation; the delivery holding it publishes the "
                         "event again, with the same eventId", eventType=ev.STARTED)
            return Versioned(L.apply_updates(item.doc, updates), None)
        publication = outbox.publication(ev.STARTED, message_id, now())
        done = self.ledger.write(new, publication)
        if done is None:  # the poller or a redelivery wrote since: record it unless one of them published it
            key = ev.STARTED

            def decide(doc: Doc) -> Doc | None:
                return None if ((doc.get("events") or {}).get(key) or {}).get("published") else publication
            _, done = self.ledger.update(item.request_id, decide)
        return done or new

    def failed(self, item: Versioned, error: Doc) -> Versioned:
        t = now()
        updates: Doc = {"state": L.FAILED, "error": error, "endTime": rfc3339(t)}
        _, updates = outbox.record(ev.FAILED, {**item.doc, **updates}, updates)
        return self.update(item, updates)

    def transient(self, item: Versioned, e: TransientError) -> Versioned:
        age = (now() - (item.doc.get("publishTime") or self.published_at)).total_seconds()
        if age <= self.s.max_request_age_s:
            logs.warning("the Healthcare API is unavailable; Pub/Sub will redeliver the request",
                         problem=str(e), ageS=round(age, 1))
            raise Redeliver(str(e))
        message = (f"gave up: the Healthcare API did not accept the export ({e}); the request is {int(age)} s old, "
                   f"older than MAX_REQUEST_AGE_S={int(self.s.max_request_age_s)}. Publish the request again with "
                   f"a new requestId to retry.")
        logs.error(message, ageS=round(age, 1))
        return self.failed(item, {"code": 4, "message": message})

    # -- the crash window between "export returned" and "operation recorded" -----------------------------
    def find_operation(self, doc: Doc, version: str) -> Doc | None:
        """The export this request started before its delivery was interrupted, if any.

        Operations carry no request id, so: list the dataset's export operations created since the
        first attempt (minus clock skew) that no ledger document claims. If another request of the
        same dataset may be mid-call (a live lease, not a recovery like this one), wait for it
        (redeliver); one candidate and no other request in STARTING is ours; none means nothing
        started; otherwise they cannot be told apart, so fail rather than risk exporting twice."""
        dataset = dataset_of(doc["request"]["dicomStore"])
        assert dataset is not None  # a request that got this far has a valid store name
        since = (doc.get("firstAttemptAt") or doc.get("lastAttemptAt") or now()) - CLOCK_SKEW
        candidates = []
        for op in self.hc.iter_operations(dataset, version=version, deadline=self.deadline):
            meta = op.get("metadata") or {}
            created = ev.parse_time(meta.get("createTime"))
            if "ExportDicomData" in str(meta.get("apiMethodName", "")) and created is not None and created >= since:
                candidates.append(op)
        recent = now() - timedelta(seconds=2 * self.s.max_request_age_s)  # older ones give up on their own
        others = [d for d in self.ledger.in_state(L.STARTING, hcDataset=dataset)
                  if d["requestId"] != doc["requestId"] and (d.get("publishTime") or recent) >= recent]
        candidates = [op for op in candidates if self.ledger.find_by_operation(op["name"]) is None]
        # Wait for a delivery that may be in its export call (it records its operation in a moment), but
        # never for another recovery: that one is doing just this, and would wait for us in turn.
        t = now()
        if any(d.get("leaseUntil") and d["leaseUntil"] > t and d.get("recoveringBy") != d.get("leaseOwner")
               for d in others):
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
                         f"{rfc3339(since)} belongs to this request ({names}); not exporting again")


class _Ambiguous(Exception):
    pass


def new_document(parsed: req.Parsed, raw: bytes | None, message_id: str, *, published_at: datetime,
                 owner: str | None, lease_s: float, at: datetime | None = None) -> Doc:
    """The ledger document of a request as first recorded: STARTING (its first export attempt follows
    at once, under the lease it is created with), or REJECTED with its event."""
    t = at or now()
    doc = {
        "requestId": parsed.request_id, "state": L.RECEIVED, "messageId": message_id,
        "payloadSha256": hashlib.sha256(raw).hexdigest() if isinstance(raw, bytes) else None,
        "publishTime": published_at, "receivedAt": t, "updatedAt": t,
        "request": parsed.request, "labels": parsed.known.get("labels") or {},
        "dicomStore": parsed.known.get("dicomStore"),
        "hcDataset": dataset_of(parsed.known.get("dicomStore")),
        "tableUri": (parsed.known.get("bigqueryDestination") or {}).get("tableUri"),
        "operation": None, "apiVersion": None, "createTime": None, "endTime": None, "logsUrl": None,
        "counter": None, "error": None, "events": {},
        "leaseOwner": owner, "leaseUntil": t + timedelta(seconds=lease_s) if owner else None,
    }
    if parsed.rejection is None:
        doc.update(state=L.STARTING, attempts=1, firstAttemptAt=t, lastAttemptAt=t)
    else:
        doc.update(state=L.REJECTED, error=parsed.rejection.error(), endTime=rfc3339(t))
        doc["events"] = {ev.REJECTED: {**ev.build(ev.REJECTED, doc), "published": False}}
    return doc
