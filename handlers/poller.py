"""poll_exports: follow every STARTED export to its end (docs/design.md, "The poller").

Cloud Scheduler publishes a tick on the poll topic; each tick is one run of TICK_TASKS:

  finish_unpublished  requests whose terminal event is recorded but not known to be published (a run
                      died between recording and publishing, or between publishing and recording the
                      publication): publish the recorded event again (same eventId, same bytes).
  poll_started        page through the STARTED requests that are due (nextPollAt <= the run's start),
                      claim each page with one conditional BatchWrite (a lease per document), GET each
                      operation on a bounded thread pool, then:
                        still running  -> the next poll later (backoff x1.4 up to POLL_MAX_INTERVAL_S),
                                          written back with the lease dropped, in batches;
                        done / gone (404) / running past MAX_OPERATION_AGE_S
                                       -> the terminal state and its event recorded in one transaction on
                                          the document (only while the lease is ours), then the event
                                          published, then its publication recorded.

A run stops taking new work POLL_CALL_TIMEOUT_S before its POLL_BUDGET_S ends and leaves the rest to the
next run. 429/5xx answers are not retried inside a run: the request stays due for the next one.
Overlapping runs (two ticks, a redelivered tick) are safe: a request is handled only under its lease.
"""
from __future__ import annotations

import random
import threading
import time
import traceback
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Callable, ContextManager

import config
from handlers import wiring
from handlers.adapters import logs
from handlers.core import events as ev
from handlers.core import ledger as L
from handlers.core import outbox
from handlers.core.clock import INSTANCE, now
from handlers.core.errors import PublishError
from handlers.core.ledger import DELETE, Doc, Versioned

if TYPE_CHECKING:
    from handlers.adapters.firestore import Doc as Cursor
    from handlers.adapters.healthcare import Healthcare
    from handlers.adapters.ledger_store import Ledger
    from handlers.adapters.pubsub import Events

BACKOFF = 1.4  # gcloud's waiter: x1.4 per poll, capped (POLL_MAX_INTERVAL_S, default 180 s)
STATE_EVENT = {L.SUCCEEDED: ev.SUCCEEDED, L.FAILED: ev.FAILED, L.CANCELLED: ev.CANCELLED,
               L.TIMED_OUT: ev.TIMED_OUT}
# The fields a poll reads: those a terminal event is built from, the poll's own, and whether EXPORT_STARTED
# is published (the page query reads only these, not the recorded events' bodies).
POLL_FIELDS = (*L.EVENT_FIELDS, *L.POLL_OWN_FIELDS, L.published_field(ev.STARTED))
# Failures that may be for want of the service agent's BigQuery grants: they get error.remedy (core/remedy.py)
REMEDY_CODES = frozenset({5, 7})
GONE_HINT = ("The API keeps an operation's record for about 30 days after it ends, so its outcome is unknown: "
             "check the destination table, or export again with a new requestId.")


# -- entry --------------------------------------------------------------------------------------------------
def handle(cloud_event: Any) -> dict[str, Any]:
    """One tick. Never raises: a failed run is logged (ERROR) and the next tick tries again, so a
    redelivered or piled-up tick never multiplies the work."""
    s = wiring.settings()
    trace, span = logs.trace_from(cloud_event, s.project)
    try:
        deps = wiring.poller()
    except Exception as e:  # noqa: BLE001 - e.g. no project: logged, and the tick is acknowledged
        logs.error(f"the poller cannot start: {type(e).__name__}: {e}")
        return {}
    return Tick(s, *deps, trace=trace, span=span).run()


class Tick:
    """One run: settings, clients, a lease owner id, a time budget and counters."""

    def __init__(self, settings: config.Settings, ledger: Ledger, healthcare: Healthcare, events: Events, *,
                 trace: str | None = None, span: str | None = None, tasks: list[Callable[["Tick"], None]] | None = None):
        self.s = settings
        self.ledger, self.hc, self.events = ledger, healthcare, events
        self.run_id = uuid.uuid4().hex[:12]
        self.owner = f"{INSTANCE}:poll:{self.run_id}"
        self.trace, self.span = trace, span
        self.tasks = TICK_TASKS if tasks is None else tasks
        self.t0 = time.monotonic()
        self.deadline = self.t0 + settings.poll_budget_s          # no call runs past it
        self.stop_at = self.deadline - settings.poll_call_timeout_s  # no new work starts after it
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.transient_sample: str | None = None

    # helpers shared by the tasks
    def time_up(self) -> bool:
        return time.monotonic() >= self.stop_at

    def call_deadline(self) -> float:
        return min(time.monotonic() + self.s.poll_call_timeout_s, self.deadline)

    def count(self, key: str, n: int = 1) -> None:
        if not n:
            return
        with self._lock:
            self.stats[key] += n

    def context(self, **labels: Any) -> ContextManager[None]:
        return logs.context(trace=self.trace, span=self.span, pollRun=self.run_id, **labels)

    def run(self) -> dict[str, Any]:
        with self.context():
            for task in self.tasks:
                try:
                    task(self)
                except Exception as e:  # noqa: BLE001 - one task failing must not stop the others
                    self.count("taskErrors")
                    logs.error(f"poll task {task.__name__} failed: {type(e).__name__}: {e}", task=task.__name__,
                               traceback=traceback.format_exc(limit=8))
            summary: dict[str, Any] = {k: v for k, v in sorted(self.stats.items())}
            summary["elapsedS"] = round(time.monotonic() - self.t0, 3)
            if self.stats["transient"]:
                logs.warning(f"operations.get failed transiently (429/5xx/connection) for {self.stats['transient']} "
                             "requests; they stay due for the next run", problem=self.transient_sample)
            if self.stats["budgetExhausted"]:
                logs.warning(f"the poll run used its {self.s.poll_budget_s:g} s budget; the remaining due requests "
                             "are left for the next run", **summary)
            else:
                logs.info("poll run finished", **summary)
        return summary


# -- the two tasks: both page through due documents, claim each page, work on a bounded pool -----------------
def finish_unpublished(tick: Tick) -> None:
    """Requests a dead run left with a terminal event recorded but not known to be published (and a
    TIMED_OUT one whose cancel is not yet requested): finish them (same eventId, same bytes)."""
    for state in STATE_EVENT:
        _each_due(tick, state=state, fields=None, work=_resume)


def poll_started(tick: Tick) -> None:
    _each_due(tick, state=L.STARTED, fields=POLL_FIELDS, work=poll_one)


Work = Callable[["Tick", Versioned, "_WriteBack"], None]


def _each_due(tick: Tick, *, state: str, fields: tuple[str, ...] | None, work: Work) -> None:
    s = tick.s
    at = now()
    writer = _WriteBack(tick)
    slots = threading.Semaphore(s.poll_page_size + s.poll_concurrency)  # at most ~one page queued ahead
    cursor: Cursor | None = None
    with ThreadPoolExecutor(max_workers=s.poll_concurrency, thread_name_prefix="poll") as pool:
        while True:
            if tick.time_up():
                tick.count("budgetExhausted")
                break
            page, cursor = tick.ledger.due_page(limit=s.poll_page_size, at=at, state=state, fields=fields,
                                                cursor=cursor)
            tick.count("pages")
            claimed = tick.ledger.claim_many(page, owner=tick.owner, lease_s=s.poll_lease_s, states=(state,))
            tick.count("busy", len(page) - len(claimed))  # leased by another run or the intake, or just changed
            for i, item in enumerate(claimed):
                slots.acquire()
                if tick.time_up():  # hand the rest of the page back untouched: due for the next run
                    slots.release()
                    for rest in claimed[i:]:
                        writer.add(rest, {})
                    tick.count("leftForNextRun", len(claimed) - i)
                    break
                pool.submit(_guarded, work, tick, item, writer).add_done_callback(lambda _: slots.release())
            if cursor is None:
                break
    writer.flush()


def _guarded(work: Work, tick: Tick, item: Versioned, writer: "_WriteBack") -> None:
    doc = item.doc
    with tick.context(requestId=item.request_id, operation=doc.get("operation"), logsUrl=doc.get("logsUrl")):
        try:
            if tick.time_up() or doc["leaseUntil"] - now() < timedelta(seconds=2 * tick.s.poll_call_timeout_s):
                # Out of time, or it waited in the queue so long (a slow API) that its lease could run out
                # mid-way: hand it back untouched, due for the next run.
                writer.add(item, {})
                tick.count("leftForNextRun")
                return
            work(tick, item, writer)
        except Exception as e:  # noqa: BLE001 - one request's surprise must not end the run
            tick.count("errors")
            logs.error(f"handling the request failed: {type(e).__name__}: {e}",
                       traceback=traceback.format_exc(limit=8))
            writer.add(item, _next_poll(tick, doc, now(), backoff=True) if doc.get("state") == L.STARTED else {})


def _resume(tick: Tick, item: Versioned, writer: "_WriteBack") -> None:
    tick.count("resumed")
    logs.info("finishing a request whose terminal event was not known to be published", state=item.doc["state"])
    _publish_pending(tick, item)


def poll_one(tick: Tick, item: Versioned, writer: "_WriteBack") -> None:
    from handlers.adapters.healthcare import ApiError, TransientError

    doc, s = item.doc, tick.s
    name = doc.get("operation")
    if not name:
        logs.error("a STARTED request without an operation in the ledger; skipped")
        writer.add(item, _next_poll(tick, doc, now(), backoff=True))
        return
    try:
        op = tick.hc.get_operation(name, version=doc.get("apiVersion"), deadline=tick.call_deadline(), max_attempts=1)
    except ApiError as e:
        if e.http_status == 404:
            message = (f"operation {name} is no longer known to the Cloud Healthcare API ({e.http_status} {e.status}). "
                       f"{GONE_HINT}")
            return finish(tick, item, L.FAILED, None, {"code": 5, "message": message})
        t = now()
        tick.count("apiErrors")
        logs.error(f"operations.get was refused: {e}; polling again later", httpStatus=e.http_status,
                   status=e.status)
        if _age_s(doc, None, t) > s.max_operation_age_s:
            return _time_out(tick, item, None, t)
        writer.add(item, _next_poll(tick, doc, t, backoff=True))
        return
    except TransientError as e:
        tick.count("transient")
        tick.transient_sample = tick.transient_sample or str(e)
        writer.add(item, {"lastPolledAt": now(), "pollErrors": int(doc.get("pollErrors") or 0) + 1})  # still due
        return
    tick.count("polled")
    t = now()
    if op.get("done"):
        error = op.get("error")
        if not error:
            return finish(tick, item, L.SUCCEEDED, op, None)
        error = {"code": error.get("code", 2), "message": error.get("message", "")}
        if error["code"] in REMEDY_CODES:
            error = _with_remedy(doc, error)
        return finish(tick, item, L.CANCELLED if error["code"] == 1 else L.FAILED, op, error)
    if _age_s(doc, op, t) > s.max_operation_age_s:
        return _time_out(tick, item, op, t)
    tick.count("running")
    updates = _next_poll(tick, doc, t, backoff=True)
    meta = op.get("metadata") or {}
    for key in ("counter", "logsUrl", "createTime"):
        if meta.get(key) is not None and meta.get(key) != doc.get(key):
            updates[key] = meta[key]
    writer.add(item, updates)


def _with_remedy(doc: Doc, error: Doc) -> Doc:
    """error.remedy (docs/contract.md, "Events"): built only here, on a failure, with the store project's number
    from Resource Manager (once per instance). Never fails the poll: without it, the error as the API gave it."""
    from handlers.core import remedy
    try:
        return remedy.with_remedy(error, doc, lambda p: wiring.resource_manager().project_number(p))
    except Exception as e:  # noqa: BLE001 - a remedy is help, not the outcome
        logs.warning(f"could not build the remedy of a failed export: {type(e).__name__}")
        return error


def _next_poll(tick: Tick, doc: Doc, t: datetime, *, backoff: bool) -> Doc:
    """When to look again: the interval grows x1.4 per poll up to POLL_MAX_INTERVAL_S, plus a little jitter
    (at most 10 %, at most 1 s, as gcloud's waiter) so that requests started together spread out."""
    s = tick.s
    interval = float(doc.get("pollInterval") or s.poll_initial_interval_s)
    if backoff:
        interval = min(s.poll_max_interval_s, interval * BACKOFF)
    jitter = random.uniform(0, min(1.0, interval * 0.1))
    return {"pollInterval": round(interval, 3), "nextPollAt": t + timedelta(seconds=interval + jitter),
            "lastPolledAt": t, "polls": int(doc.get("polls") or 0) + 1}


def _age_s(doc: Doc, op: Doc | None, t: datetime) -> float:
    """How long the export has been running: from the operation's createTime (the API's clock), else from
    what the ledger knows."""
    created = ev.parse_time(((op or {}).get("metadata") or {}).get("createTime")) or ev.parse_time(doc.get("createTime"))
    created = created or doc.get("firstAttemptAt") or doc.get("receivedAt")
    return (t - created).total_seconds() if isinstance(created, datetime) else 0.0


def _time_out(tick: Tick, item: Versioned, op: Doc | None, t: datetime) -> None:
    age = _age_s(item.doc, op, t)
    message = (f"the export ran longer than MAX_OPERATION_AGE_S={tick.s.max_operation_age_s:g} s (running for "
               f"{age:.0f} s); the service asked the Cloud Healthcare API to cancel it")
    finish(tick, item, L.TIMED_OUT, op, {"code": 4, "message": message})


# -- the end of a request: record, (cancel,) publish, record the publication --------------------------------
# Each write is conditional on the version our claim (or our previous write) produced, so it lands only
# while the lease is ours: a run whose lease expired (it was too slow) cannot overwrite the one that took over.
def finish(tick: Tick, item: Versioned, state: str, op: Doc | None, error: Doc | None) -> None:
    s = tick.s
    event_type = STATE_EVENT[state]
    meta = (op or {}).get("metadata") or {}
    t = now()
    updates: Doc = {"state": state, "error": error, "lastPolledAt": t, "polls": int(item.doc.get("polls") or 0) + 1,
               # nextPollAt now: if this run dies before publishing, the next run's finish_unpublished
               # takes the request once the lease (renewed here) expires.
               "nextPollAt": t, "leaseUntil": t + timedelta(seconds=s.poll_lease_s)}
    if op is not None:
        updates["endTime"] = meta.get("endTime")
        for key in ("counter", "createTime", "logsUrl"):
            if meta.get(key) is not None:
                updates[key] = meta[key]
    if state == L.TIMED_OUT:
        updates["cancelRequested"] = False
    # The page read every field the event is built from (POLL_FIELDS).
    _, updates = outbox.record(event_type, L.apply_updates(item.doc, updates), updates)
    version = _write(tick, item, updates, "recording its end")
    if version is None:
        return
    tick.count(state.lower())
    done = Versioned(L.apply_updates(item.doc, updates), version)
    _log_end(done.doc, event_type)
    _publish_pending(tick, done)


def _log_end(doc: Doc, event_type: str) -> None:
    data = doc["events"][event_type]["data"]
    fields = {"requestId": doc["requestId"], "operation": doc.get("operation"), "logsUrl": doc.get("logsUrl"),
              "eventType": event_type, "counter": data.get("counter")}
    failures = (data.get("counter") or {}).get("failure", 0)
    if event_type == ev.SUCCEEDED and failures:
        logs.warning(f"export succeeded with {failures} failed instances; see logsUrl", **fields)
    elif event_type == ev.SUCCEEDED:
        logs.info("export succeeded", **fields)
    else:
        what = {ev.FAILED: "export failed", ev.CANCELLED: "export cancelled",
                ev.TIMED_OUT: "export timed out"}[event_type]
        error = data.get("error") or {}
        if error.get("remedy"):
            fields["remedy"] = error["remedy"]
        logs.error(f"{what}: {error.get('code')}: {error.get('message')}", error=error, **fields)


def _publish_pending(tick: Tick, item: Versioned) -> None:
    """Publish, in order, the recorded events not known to be published: an EXPORT_STARTED the intake left
    (so a consumer never sees the end before the start), then the terminal one. The last publication is
    recorded together with dropping the lease and nextPollAt (the request is then off every query)."""
    if item.doc.get("state") == L.TIMED_OUT and not item.doc.get("cancelRequested"):
        cancelled = _cancel(tick, item)
        if cancelled is None:
            return
        item = cancelled
    doc = item.doc
    recorded = doc.get("events") or {}
    pending = outbox.unpublished(doc, (ev.STARTED, STATE_EVENT.get(doc.get("state") or "")))
    if not pending:
        _write(tick, item, {**RELEASE, "nextPollAt": DELETE}, "releasing it")
        return
    if any("data" not in recorded[t] for t in pending):  # the page read only events.EXPORT_STARTED.published
        recorded = {**recorded, **((tick.ledger.get(item.request_id) or {}).get("events") or {})}

    def failed(item: Versioned, event_type: str, e: PublishError) -> None:
        tick.count("publishErrors")
        logs.warning(f"could not publish {event_type}; the next run publishes it again", problem=str(e),
                     eventType=event_type)
        _write(tick, item, RELEASE, "releasing it")  # nextPollAt stays: due for the next run

    def published(item: Versioned, event_type: str, event: Doc, message_id: str, last: bool) -> Versioned | None:
        tick.count("published")
        logs.info(f"published {event_type}", eventType=event_type, eventId=event["eventId"], messageId=message_id)
        updates = outbox.publication(event_type, message_id, now())
        if last:
            updates.update(RELEASE, nextPollAt=DELETE)
        version = _write(tick, item, updates, "recording the publication (the next run may publish the event "
                                              "again, with the same eventId)")
        return None if version is None else Versioned(item.doc, version)

    outbox.drain(item, pending, recorded, publish=tick.events.publish, published=published, failed=failed)


RELEASE: Doc = {"leaseUntil": DELETE, "leaseOwner": DELETE}


def _cancel(tick: Tick, item: Versioned) -> Versioned | None:
    """Ask the API to cancel a TIMED_OUT export, and record that it was asked (None: not recorded)."""
    from handlers.adapters.healthcare import ApiError, TransientError

    doc = item.doc
    try:
        tick.hc.cancel_operation(doc["operation"], version=doc.get("apiVersion"), deadline=tick.call_deadline(),
                                 max_attempts=1)
        updates: Doc = {"cancelRequested": True, "cancelRequestedAt": now()}
    except ApiError as e:  # final (e.g. 404: gone; already done): nothing more to cancel
        logs.warning(f"operations.cancel was refused: {e}", httpStatus=e.http_status)
        updates = {"cancelRequested": True, "cancelError": e.rpc()}
    except TransientError as e:
        logs.warning(f"operations.cancel failed transiently ({e}); the next run tries again")
        _write(tick, item, RELEASE, "releasing it")  # nextPollAt stays: due for the next run
        return None
    new = Versioned(L.apply_updates(doc, updates), _write(tick, item, updates, "recording the cancel"))
    return new if new.version is not None else None


def _write(tick: Tick, item: Versioned, updates: Doc, doing: str) -> str | None:
    """Write `updates` if the document is still at item.version (our lease); the new version, or None."""
    version = tick.ledger.write_if_unchanged([(item.request_id, item.version,
                                               {**updates, "updatedAt": now()})])[item.request_id]
    if version is None:
        tick.count("lostLease")
        logs.warning(f"lost the request's lease before {doing}; another run handles it")
    return version


class _WriteBack:
    """The next poll of still-running requests, written with their leases dropped, many per BatchWrite
    (each only if the document is still the version our claim wrote)."""

    def __init__(self, tick: Tick, size: int = 100):
        self.tick = tick
        self.size = size
        self.items: list[tuple[str, str | None, Doc]] = []
        self.lock = threading.Lock()

    def add(self, item: Versioned, updates: Doc) -> None:
        with self.lock:
            self.items.append((item.request_id, item.version, updates))
            batch = self._take() if len(self.items) >= self.size else None
        if batch:
            self._write(batch)

    def flush(self) -> None:
        with self.lock:
            batch = self._take()
        if batch:
            self._write(batch)

    def _take(self) -> list[tuple[str, str | None, Doc]]:
        batch, self.items = self.items, []
        return batch

    def _write(self, batch: list[tuple[str, str | None, Doc]]) -> None:
        try:
            result = self.tick.ledger.release_many(batch)
        except Exception as e:  # noqa: BLE001 - their leases expire and the next run polls them
            self.tick.count("writeBackErrors", len(batch))
            logs.warning(f"could not record the next poll of {len(batch)} requests ({type(e).__name__}: {e}); "
                         "their leases expire and a later run polls them")
            return
        lost = sum(1 for v in result.values() if v is None)
        if lost:
            self.tick.count("writeBackLost", lost)


def close_aged_ingest_batches(tick: Tick) -> None:
    """Close ingest batches that aged out with no new arrivals, release tables whose export ended (after
    poll_started recorded it) and start the next batch (handlers/ingest.py). No-op without INGEST_ROUTES."""
    if not tick.s.ingest_routes:
        return  # nothing to import or ask for
    from handlers import ingest

    for key, n in ingest.close_aged_batches(tick.s, time_up=tick.time_up).items():
        if n:
            tick.count(f"ingest.{key}", n)


# What every tick runs, in order; each task is f(tick) and must stop starting work once tick.time_up().
TICK_TASKS: list[Callable[[Tick], None]] = [finish_unpublished, poll_started, close_aged_ingest_batches]
