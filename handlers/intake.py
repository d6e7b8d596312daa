"""export_request: turn one export request (a Pub/Sub message) into one running export.

Steps, each recorded in the ledger before the next (docs/reliability.md, "Reliability: what happens when
the intake dies between two steps", explains every crash window):
  1. validate (handlers/core/request.py); create the ledger document and the gate of the request's
     Healthcare dataset in one commit: STARTING under this delivery's lease, the gate under the same
     lease (handlers/core/gate.py); or REJECTED with its event recorded as unpublished. A document
     that already exists makes this delivery a duplicate, and it only resumes what the ledger says is
     unfinished.
  2. call the Healthcare API export. Only the gate's holder calls, so if the process died before
     step 3, the one export operation started under the gate that no document claims is its own:
     the next delivery (or the next request of the dataset) finds it with operations.list instead
     of exporting twice.
  3. record the operation, EXPORT_STARTED, the lease's release and the gate's deletion in one commit
     while publishing the event, then record the publication (or FAILED with the API's error and its
     event, the gate deleted in the same commit, then publish it and record that).
Every write is conditioned on the version this delivery last read or wrote, and made only under its
lease (leaseUntil/leaseOwner), so two deliveries of one request never work on it at once: the later
one is redelivered by Pub/Sub. A fresh valid request costs an export call, three Firestore commits and
a publish, in four sequential steps (the gate adds no round trip). While another request of the
dataset holds the gate, a delivery waits for it (at most HEALTHCARE_RETRY_BUDGET_S), then records the
request without it and lets Pub/Sub redeliver.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import random
import time
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple, overload

import config
from handlers import wiring
from handlers.adapters import logs
from handlers.core import events as ev
from handlers.core import gate as G
from handlers.core import ledger as L
from handlers.core import outbox
from handlers.core import request as req
from handlers.core.clock import INSTANCE, now, rfc3339
from handlers.core.errors import ContentionError, PublishError
from handlers.core.gate import Gate, Held
from handlers.core.lazy import once
from handlers.core.ledger import DELETE, Doc, Versioned, dataset_of

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from handlers.adapters.healthcare import Healthcare, TransientError
    from handlers.adapters.ledger_store import Ledger
    from handlers.adapters.pubsub import Events

OWNED_EVENTS = (ev.REJECTED, ev.STARTED, ev.FAILED)
LOST_RACES = 30  # commits that release the gate, lost to concurrent writers, before giving up


class Redeliver(Exception):
    """Not done yet: the function fails so that Pub/Sub delivers the message again."""


class _Recorded(Exception):
    """The request's document exists already: this delivery is a duplicate."""

    def __init__(self, item: Versioned):
        super().__init__(item.request_id)
        self.item = item


class _Busy(Exception):
    """Another request of the dataset held the gate for as long as this delivery could wait."""

    def __init__(self, gate: Gate):
        super().__init__(gate.holder)
        self.gate = gate


class _Own(NamedTuple):
    """This request's write in a gate's commit: its creation (`item` None, `doc` the document as first
    recorded) or an update of `item` (`doc` its document as read)."""
    item: Versioned | None
    doc: Doc


class _Plan(NamedTuple):
    """One commit that takes the gate: this request's attempt, the gate, and a dead holder's resolution."""
    gate: Gate
    own: _Own
    updates: Doc  # this request's attempt
    writes: list[Doc]
    holder: Versioned | None
    resolution: Doc | None


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
        self.gate: Held | None = None  # the dataset's gate, while this delivery holds it

    # -- 1. record ----------------------------------------------------------------------------------
    def run(self, parsed: req.Parsed, raw: bytes | None, message_id: str) -> None:
        doc = new_document(parsed, raw, message_id, published_at=self.published_at, owner=self.owner,
                           lease_s=self.s.intake_lease_s)
        if parsed.rejection is None:
            created, item = self.record(doc)
        else:
            created, item = self.ledger.create(parsed.request_id, doc)
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

    def record(self, doc: Doc) -> tuple[bool, Versioned]:
        """Create a valid request's document in STARTING together with its dataset's gate (one commit).
        (False, the document) if it exists. If another request holds the gate for longer than this
        delivery can wait, the request is recorded without it (RECEIVED) and Pub/Sub redelivers."""
        try:
            return True, self.take_gate(_Own(None, doc))
        except _Recorded as e:
            return False, e.item
        except _Busy as e:
            created, item = self.ledger.create(doc["requestId"], doc)
            if not created:
                return False, item
            raise self.busy(e.gate) from None

    # -- the state machine -----------------------------------------------------------------------------
    def advance(self, item: Versioned, *, fresh: bool = False) -> None:
        """`fresh`: this delivery has just created the document with the gate (so holds its lease and
        the gate, and no export call can have been made for it yet)."""
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
        claimed = self.ledger.claim(item.request_id, owner=self.owner, lease_s=self.s.intake_lease_s,
                                    states=(item.doc["state"],), current=item)
        if claimed is None:
            current = self.ledger.get(item.request_id) or item.doc
            logs.info("another delivery holds this request's lease; asking Pub/Sub to redeliver",
                      state=current.get("state"), leaseUntil=current.get("leaseUntil"))
            raise Redeliver(f"request {item.request_id} is being processed by another delivery")
        return claimed

    def _release_quietly(self, item: Versioned) -> None:
        try:
            self.ledger.release(item.request_id, owner=self.owner)
        except Exception as e:  # noqa: BLE001 - the lease then simply expires (and the gate with it)
            logs.warning("could not release the lease; it will expire", problem=type(e).__name__)

    @overload
    def update(self, item: Versioned, updates: Doc) -> Versioned: ...

    @overload
    def update(self, item: Versioned, updates: Doc, *, release: bool) -> Versioned | None: ...

    def update(self, item: Versioned, updates: Doc, *, release: bool = False) -> Versioned | None:
        """Write `updates` if this delivery still holds the lease (one write when nobody else wrote since
        `item`); with `release`, drop the lease in the same write. An update that ends STARTING deletes
        the gate this delivery holds in the same commit. Without the lease: Pub/Sub redelivers (or,
        with `release`, None: the lease was lost after the work was done)."""
        owner = self.owner
        updates = {**updates, "updatedAt": now()}
        if release:
            updates.update(leaseOwner=DELETE, leaseUntil=DELETE)
        if self.gate is not None and updates.get("state", L.STARTING) != L.STARTING:
            new = self.release_gate(item, updates, self.gate)
        else:
            new = self.ledger.write(item, updates)
            if new is None:  # changed since: read again, and write only if the lease is still ours
                written, new = self.ledger.update(item.request_id,
                                                  lambda cur: updates if cur.get("leaseOwner") == owner else None)
                new = new if written else None
        if new is None and not release:
            raise Redeliver("lost the lease on the request (another delivery took over)")
        return new

    # -- the gate (handlers/core/gate.py) ---------------------------------------------------------------
    def take_gate(self, own: _Own) -> Versioned:
        """Write this request's attempt (STARTING, a new lease) and take its dataset's gate in one commit.
        The gate is assumed free, so the common path reads nothing first; after a lost race both documents
        are read again in one call. A gate whose holder may be alive is waited for (until this delivery's
        budget ends: _Busy); an abandoned one is taken over, its holder's call resolved in the same commit.
        Waiting and lost races (another waiter took the gate first) are bounded by the same budget."""
        dataset = str(own.doc["hcDataset"])
        held: Held | None = None
        while True:
            plan = self.plan(own, held, now())
            if not isinstance(plan, _Plan):
                held = self.wait_for_gate(dataset, held, until=plan)
                continue
            versions = self.ledger.commit(plan.writes)
            if versions is not None:
                return self.took(plan, versions)
            own, held = self.reread(own, dataset)
            if time.monotonic() < self.deadline:
                continue
            if held is not None and held.gate.holder != own.doc["requestId"]:
                raise _Busy(held.gate)
            raise ContentionError(f"{own.doc['requestId']}: the gate of {dataset} kept changing")

    def plan(self, own: _Own, held: Held | None, t: datetime) -> _Plan | datetime:
        """The commit that takes the gate as `held` (None: assumed free), or until when to wait for it."""
        rid, dataset = str(own.doc["requestId"]), str(own.doc["hcDataset"])
        verdict = G.judge(held.gate if held else None, rid, t)
        holder, resolution = None, None
        if held is not None and verdict == G.HELD:
            return held.gate.lease_until
        if held is not None and verdict == G.ABANDONED:
            holder = self.ledger.read(held.gate.holder)
            seen = G.holder_verdict(holder.doc if holder else None, held.gate, t)
            if holder is not None and seen == G.BUSY:
                until: datetime = holder.doc["leaseUntil"]
                return until  # its own redelivery is recovering it
            resolution = self.resolve_holder(holder, held.gate, t) if holder and seen == G.RECOVER else None
        lease_until = t + timedelta(seconds=self.s.intake_lease_s)
        since = held.gate.acquired_at if held and verdict == G.MINE else G.window_start(own.doc, t)
        gate = Gate(dataset, rid, self.owner, lease_until, since)
        updates = G.attempt(own.doc, owner=self.owner, lease_until=lease_until, acquired_at=since, t=t)
        writes = [self.ledger.create_write(rid, L.apply_updates(own.doc, updates)) if own.item is None
                  else self.ledger.update_write(own.item, updates),
                  self.ledger.gate_create(gate) if held is None else self.ledger.gate_replace(gate, held.version)]
        if holder is not None and resolution is not None:
            writes.append(self.ledger.update_write(holder, resolution))
        return _Plan(gate, own, updates, writes, holder if resolution is not None else None, resolution)

    def took(self, plan: _Plan, versions: list[str]) -> Versioned:
        self.gate = Held(plan.gate, versions[1])
        self.deadline = time.monotonic() + self.s.healthcare_retry_budget_s  # the export call's own budget
        if plan.holder is not None and plan.resolution is not None:
            logs.warning("took the dataset's gate over from a request whose delivery stopped in its export call; "
                         "that call is resolved", holderRequestId=plan.holder.request_id,
                         holderState=plan.resolution.get("state"), holderOperation=plan.resolution.get("operation"))
        return Versioned(L.apply_updates(plan.own.doc, plan.updates), versions[0])

    def reread(self, own: _Own, dataset: str) -> tuple[_Own, Held | None]:
        """After a lost gate commit: this request's document and the gate, in one read."""
        current, held = self.ledger.read_with_gate(str(own.doc["requestId"]), dataset)
        if own.item is None:
            if current is not None:
                raise _Recorded(current)
            return own, held
        if current is None or current.doc.get("leaseOwner") != self.owner:
            raise Redeliver("lost the lease on the request (another delivery took over)")
        return _Own(current, current.doc), held

    def wait_for_gate(self, dataset: str, held: Held | None, *, until: datetime) -> Held | None:
        """Read the gate again, with growing pauses, until it changes or `until` passes (its holder's lease
        ends); _Busy when this delivery's budget runs out first."""
        assert held is not None
        logs.info("waiting for the dataset's gate: another request may be in its export call",
                  holderRequestId=held.gate.holder, until=until)
        pause = 0.02
        while time.monotonic() < self.deadline:
            time.sleep(random.uniform(pause / 2, pause))  # backoff between reads of a gate held elsewhere
            pause = min(pause * 1.5, 0.1)  # the gate is held for about one call and one commit
            current = self.ledger.read_gate(dataset)
            if current is None or current.version != held.version or now() >= until:
                return current
        raise _Busy(held.gate)

    @staticmethod
    def busy(gate: Gate) -> Redeliver:
        logs.info("another request of the dataset is in its export call (it holds the dataset's gate); "
                  "asking Pub/Sub to redeliver", holderRequestId=gate.holder, gateLeaseUntil=gate.lease_until)
        return Redeliver(f"the gate of {gate.dataset} is held by request {gate.holder}")

    def resolve_holder(self, holder: Versioned, gate: Gate, t: datetime) -> Doc:
        """The updates that finish a dead holder's call: its one operation recorded (the poller follows it
        and publishes its EXPORT_STARTED), or no call in flight (RECEIVED: a redelivery makes a new attempt)."""
        version = req.api_version_for(holder.doc["request"], self.s.healthcare_version)
        try:
            op = self.operation_under(gate, version)
        except G.InvariantBroken as e:
            logs.error(str(e), holderRequestId=holder.request_id)
            failed = self.failed_updates(holder.doc, {"code": 13, "message": str(e)}, t)
            return L.lease_dropped(t, {**failed, "nextPollAt": t})  # the poller publishes its event
        if op is None:
            return G.no_call(t)
        return L.lease_dropped(t, self.operation_recorded(holder.doc, op, version, t)[1])

    def release_gate(self, item: Versioned, updates: Doc, held: Held) -> Versioned | None:
        """Write `updates` (which end STARTING) and delete the gate in one commit, while both are still
        this delivery's; None when they are not (the lease was lost)."""
        for _ in range(LOST_RACES):
            versions = self.ledger.commit([self.ledger.update_write(item, updates),
                                           self.ledger.gate_delete(held.gate.dataset, held.version)])
            if versions is not None:
                self.gate = None
                return Versioned(L.apply_updates(item.doc, updates), versions[0])
            current, gate = self.ledger.read_with_gate(item.request_id, held.gate.dataset)
            if (current is None or current.doc.get("leaseOwner") != self.owner or gate is None
                    or gate.gate.owner != self.owner):
                return None
            item, held = current, gate
        return None

    # -- 2-4. start the export ---------------------------------------------------------------------------
    def start(self, item: Versioned, *, fresh: bool = False) -> Versioned:
        from handlers.adapters.healthcare import ApiError, TransientError

        request = item.doc["request"]
        store = request["dicomStore"]
        version = req.api_version_for(request, self.s.healthcare_version)
        try:
            if not fresh:
                recovering = item.doc["state"] == L.STARTING
                try:
                    item = self.take_gate(_Own(item, item.doc))
                except _Busy as e:
                    raise self.busy(e.gate) from None
                found = self.find_operation(version) if recovering else None
                if found is not None:
                    return self.started(item, found, version, recovered=True)
            while True:
                try:
                    op = self.hc.export(store, req.export_body(request), version=version, deadline=self.deadline)
                    return self.started(item, op, version)
                except TransientError as e:
                    if not e.ambiguous:
                        raise
                    # It may have started: look before exporting again.
                    found = self.find_operation(version)
                    if found is not None:
                        return self.started(item, found, version, recovered=True)
                    if time.monotonic() >= self.deadline:
                        raise
                    logs.warning("the export call failed ambiguously and no operation was started; retrying",
                                 problem=str(e))
        except ApiError as e:
            error = _with_remedy(item.doc, e.rpc())
            logs.error(f"the Healthcare API refused the export: {e.status}: {e.message}",
                       httpStatus=e.http_status, status=e.status,
                       **({"remedy": error["remedy"]} if "remedy" in error else {}))
            return self.failed(item, error)
        except TransientError as e:
            return self.transient(item, e)
        except G.InvariantBroken as e:
            logs.error(str(e))
            return self.failed(item, {"code": 13, "message": str(e)})

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

    def operation_recorded(self, doc: Doc, op: Doc, version: str, t: datetime) -> tuple[Doc, Doc]:
        """(EXPORT_STARTED as built, the updates that record the operation and the event, unpublished)."""
        meta = op.get("metadata") or {}
        updates = {"state": L.STARTED, "operation": op["name"], "apiVersion": version,
                   "createTime": meta.get("createTime"), "logsUrl": meta.get("logsUrl"),
                   "nextPollAt": t + timedelta(seconds=1), "pollInterval": self.s.poll_initial_interval_s}
        return outbox.record(ev.STARTED, {**doc, **updates}, updates)

    def started(self, item: Versioned, op: Doc, version: str, *, recovered: bool = False) -> Versioned:
        """Record the operation (with EXPORT_STARTED, unpublished, the lease's release and the gate's
        deletion) while the event is being published, then record the publication.

        The first commit closes the window in which a crash leaves an export that operations.list must
        find again (find_operation), so it is made at once, not after the publish; running the publish
        beside it costs no time. If the process dies after it, the poller (or a redelivery) publishes
        the recorded event; if it dies after the publish but before the second write, the event is
        published again with the same eventId. If the publish fails, Pub/Sub redelivers the request,
        and the redelivery publishes the recorded event."""
        meta = op.get("metadata") or {}
        built, updates = self.operation_recorded(item.doc, op, version, now())
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

    @staticmethod
    def failed_updates(doc: Doc, error: Doc, t: datetime) -> Doc:
        updates: Doc = {"state": L.FAILED, "error": error, "endTime": rfc3339(t)}
        return outbox.record(ev.FAILED, {**doc, **updates}, updates)[1]

    def failed(self, item: Versioned, error: Doc) -> Versioned:
        return self.update(item, self.failed_updates(item.doc, error, now()))

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
    def find_operation(self, version: str) -> Doc | None:
        """The export this request started under the gate it holds before its call was interrupted, if any."""
        assert self.gate is not None
        found = self.operation_under(self.gate.gate, version)
        if found is None:
            logs.info("no operation of this request found: the export had not started")
        return found

    def operation_under(self, gate: Gate, version: str) -> Doc | None:
        """The one export operation started under `gate` that no ledger document claims (its holder's), or
        None. Operations carry no request id, but while the gate is held nobody else of this service
        calls export on the dataset: more than one is G.InvariantBroken."""
        ops = G.candidates(self.hc.iter_operations(gate.dataset, version=version, deadline=self.deadline),
                           gate.acquired_at)
        claimed = self.ledger.claimed([str(op["name"]) for op in ops])
        return G.sole([op for op in ops if op["name"] not in claimed], gate)

def _with_remedy(doc: Doc, error: Doc) -> Doc:
    """error.remedy for a refused export call that is about BigQuery (docs/contract.md, "Events"); built only on
    that failure. Never fails the request: without it, the error as the API gave it."""
    from handlers.core import remedy
    try:
        return remedy.with_remedy(error, doc, lambda p: wiring.resource_manager().project_number(p),
                                  operation=False)
    except Exception as e:  # noqa: BLE001 - a remedy is help, not the outcome
        logs.warning(f"could not build the remedy of a refused export: {type(e).__name__}")
        return error



def new_document(parsed: req.Parsed, raw: bytes | None, message_id: str, *, published_at: datetime,
                 owner: str | None, lease_s: float, at: datetime | None = None) -> Doc:
    """The ledger document of a request as first recorded: RECEIVED for a valid one (its first attempt,
    which takes the dataset's gate, is written on top of it in the same commit: handlers/core/gate.py
    attempt()), or REJECTED with its event, under `owner`'s lease."""
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
        "counter": None, "error": None, "events": {}, "attempts": 0, "leaseOwner": None, "leaseUntil": None,
    }
    if parsed.rejection is not None:
        doc.update(state=L.REJECTED, error=parsed.rejection.error(), endTime=rfc3339(t), attempts=None,
                   leaseOwner=owner, leaseUntil=t + timedelta(seconds=lease_s) if owner else None)
        doc["events"] = {ev.REJECTED: {**ev.build(ev.REJECTED, doc), "published": False}}
    return doc
