"""ingest_notification: DICOM store notifications -> batches applied to the route's table.

One notification = one instance stored or deleted in a DICOM store. For a store named in
INGEST_ROUTES the function records the change as an *arrival* (one Firestore document, created
once: a redelivery adds nothing) and acknowledges. Arrivals of a route (store -> table) are closed into
a *batch* when INGEST_BATCH_MAX_INSTANCES of them are pending, or when the oldest has waited
INGEST_BATCH_MAX_AGE_S and the table is idle. A batch is exported by publishing an ordinary export
request (docs/contract.md, "Export request") that the intake and the poller carry out; at most one batch per destination
table is being exported at any time (the table document is the lock), the next one waits.

Closing a batch, each step recorded before the next (docs/design.md, "Ingest"; docs/reliability.md,
"Crash safety"):
  1. open: the batch document (CLOSING: its arrivals, paths, requestId, filter object name, all
     fixed here) and the route's `closing` marker, in one atomic write conditioned on the route as read;
  2. the arrivals are marked BATCHED (idempotent);
  3. the filter file is written, create-only, named after its content (idempotent);
  4. the batch becomes READY and the route's marker is cleared (one atomic write).
Applying a batch (handlers/batch_apply.py: docs/design.md, "Deletions and replacements", "Failed batches"):
  5. claim the table (batch READY -> PUBLISHING, table.running = batch) in one atomic write;
  6. the DML job deleting the rows of every instance the batch touches, recorded on the batch;
  7. publish the request of the instances it stores (deterministic bytes; requestId = "ingest-" + batch id,
     then "-a<N>" for a later attempt), then PUBLISHED; a batch of deletions only is done at step 6;
  8. when the request's ledger document is terminal: release the table and record the outcome; a failed
     attempt keeps the table and is tried again after a backoff (RETRYING), then is surfaced.
Whoever finds a batch part-way (the next notification of the route, or the poller's tick through
`close_aged_batches`) finishes it; every step can be redone, and the intake de-duplicates requests
on requestId, so a crash anywhere loses no arrival and exports no batch twice.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Callable

import config
from handlers import wiring
from handlers.adapters import logs
from handlers.core import batches as B
from handlers.core import changes as C
from handlers.core.batches import (
    BATCH_RETENTION,
    DEDUP_RETENTION,
    MAX_CLOSES_PER_CALL,
    REPUBLISH_AFTER,
    Route,
    arrival_id,
    filter_text,
    request_id_of,
)
from handlers.core.clock import now
from handlers.core.events import received
from handlers.core.ledger import TERMINAL, Doc

if TYPE_CHECKING:
    from handlers.adapters.batch_store import IngestLedger
    from handlers.adapters.bigquery import BigQuery
    from handlers.adapters.gcs import FilterFiles
    from handlers.adapters.ledger_store import Ledger
    from handlers.adapters.pubsub import Events

__all__ = ["Ingest", "Route", "arrival_id", "close_aged_batches", "handle", "request_id_of"]



# -- entry points --------------------------------------------------------------------------------------------
def handle(cloud_event: Any) -> None:
    """One store notification. Returns (ack) once the arrival is recorded; raises (redelivery) if not."""
    s = wiring.settings()
    message, message_id, published = received(cloud_event)
    attributes = message.get("attributes")
    attributes = attributes if isinstance(attributes, dict) else {}
    with logs.context(messageId=message_id):
        Ingest(s, *wiring.ingest()).notification(_text(message.get("data")), attributes, message_id, published)


def close_aged_batches(settings: config.Settings | None = None, *,
                       time_up: Callable[[], bool] | None = None) -> dict[str, int]:
    """The poller's tick: finish interrupted closes, close full and aged batches, release tables whose
    export ended and start the next batch. Does nothing (no Firestore call) when INGEST_ROUTES is empty.
    `time_up()` true: start no more work (the rest waits for the next tick)."""
    s = settings or wiring.settings()
    if not s.ingest_routes:
        return {}
    return Ingest(s, *wiring.ingest()).tick(time_up=time_up)


def _text(data: Any) -> str | None:
    if not isinstance(data, str):
        return None
    try:
        return base64.b64decode(data, validate=True).decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None


def _outcome(created: bool, kind: str, fields: Doc) -> str:
    """Log what a notification was; return its `ingestOutcome`."""
    if not created:
        logs.info("duplicate notification: already recorded", ingestOutcome="duplicate", **fields)
        return "duplicate"
    if kind == C.ARRIVAL:
        logs.info("instance recorded for the next batch", ingestOutcome="recorded", **fields)
        return "recorded"
    if kind == C.DELETION:
        logs.info("deletion recorded for the next batch (its rows are deleted)", ingestOutcome="deletion", **fields)
        return "deletion"
    logs.info("notification ignored: not an instance stored or deleted", ingestOutcome="ignored", **fields)
    return "ignored"


# in-process throttles of the notification path (the tick always checks everything)
_table_checked: dict[str, float] = {}
_table_lock = threading.Lock()
_fill: dict[str, list[float]] = {}
_fill_lock = threading.Lock()
_closing: dict[str, threading.Lock] = {}  # one closer per route per instance; the others go on


class Ingest:
    def __init__(self, settings: config.Settings, ledger: IngestLedger, requests_ledger: Ledger, files: FilterFiles,
                 requests: Events, bigquery: BigQuery, events: Events):
        from handlers.batch_apply import Apply

        self.s = settings
        self.apply = Apply(settings, ledger, bigquery, events, self.publish)
        self.ledger = ledger
        self.requests_ledger = requests_ledger
        self.files = files
        self.requests = requests
        self.routes = dict(settings.ingest_routes)
        self.options = {k: json.loads(v) for k, v in settings.ingest_route_options}
        self.max_n = settings.ingest_batch_max_instances
        self.max_age = timedelta(seconds=settings.ingest_batch_max_age_s)

    # -- one notification ------------------------------------------------------------------------------
    def notification(self, text: str | None, attributes: Doc, message_id: str,
                     published: datetime | None) -> str:
        """Record it; return the outcome (also logged as `ingestOutcome`)."""
        res = C.parse_resource(text)
        if res is None:
            logs.error("notification ignored: its data is not a DICOM resource name "
                       "(projects/.../dicomStores/S/dicomWeb/studies/X[/series/Y[/instances/Z]])",
                       ingestOutcome="malformed", dataPrefix=(text or "")[:200] if text is not None else None)
            return "malformed"
        action = str(attributes.get("action") or "")
        table = self.routes.get(res.store)
        if table is None:
            logs.warning("notification ignored: INGEST_ROUTES names no destination for this store",
                         ingestOutcome="unrouted", dicomStore=res.store, action=action or None)
            return "unrouted"
        route = Route(res.store, table)
        kind = C.kind_of(action, res)
        version = str(attributes.get("versionId") or "")
        if kind != C.ARRIVAL and not version:
            version = f"message:{message_id}"
        t = now()
        doc = C.arrival_doc(route.fields(), res.path, kind, action=action or None,
                            version_id=attributes.get("versionId"), message_id=message_id,
                            arrived=published if published is not None and published <= t else t, recorded=t)
        if kind == C.OTHER:
            doc["expireAt"] = t + DEDUP_RETENTION
        self._ensure_route(route)
        created = self.ledger.record(arrival_id(text or "", kind, version), doc)
        outcome = _outcome(created, kind, dict(dicomStore=res.store, path=res.path, action=action or None,
                                                tableUri=table))
        if outcome not in ("recorded", "deletion"):
            return outcome
        # The arrival is safe: from here on, problems are retried by the next notification or the tick.
        try:
            self.advance_route(route, check_table=self._table_due(route.table_key), route_doc={},
                               count=self._count_due(route.key))
        except Exception as e:  # noqa: BLE001 - acknowledged anyway; nothing is lost
            logs.warning("could not advance the route's batches now; the next notification or the poller's "
                         "tick will", problem=f"{type(e).__name__}: {e}", route=route.key)
        return outcome

    _known_routes: set[str] = set()

    def _ensure_route(self, route: Route) -> None:
        if route.key not in Ingest._known_routes:
            self.ledger.ensure_route(route.key, route.fields())
            Ingest._known_routes.add(route.key)

    def _count_due(self, rk: str) -> bool:
        """Whether to count the route's pending arrivals now. Counting after every notification costs an
        aggregation query each; instead each instance counts when its own arrivals since its last count
        reach a tenth of the room left in the batch (every arrival once it is nearly full), and at least
        once a second. Several instances may overshoot the limit a little: the batch still holds at
        most INGEST_BATCH_MAX_INSTANCES and the rest closes right after it."""
        now = time.monotonic()
        with _fill_lock:
            st = _fill.setdefault(rk, [0, 0, 0.0])  # last count, own arrivals since, when
            st[1] += 1
            return st[1] >= max(1, (self.max_n - st[0]) // 10) or now - st[2] >= 1.0

    def _counted(self, rk: str, n: int) -> None:
        with _fill_lock:
            _fill[rk] = [n, 0, time.monotonic()]

    def _table_due(self, tk: str) -> bool:
        """At most a few table checks per second per instance on the notification path."""
        interval = min(1.0, self.s.ingest_batch_max_age_s / 4)
        now = time.monotonic()
        with _table_lock:
            if _table_checked.get(tk, 0.0) > now:
                return False
            _table_checked[tk] = now + interval
            return True

    # -- the scheduled tick ----------------------------------------------------------------------------
    def tick(self, time_up: Callable[[], bool] | None = None) -> dict[str, int]:
        time_up = time_up or (lambda: False)
        summary = {"closed": 0, "started": 0, "released": 0, "busy": 0, "errors": 0}
        routes = self.ledger.routes()
        for r in routes:
            if time_up():
                return summary
            try:
                summary["closed"] += self.advance_route(Route(r["store"], r["tableUri"]), check_table=False,
                                                        route_doc=r)
            except Exception as e:  # noqa: BLE001 - one route's problem must not stop the others
                summary["errors"] += 1
                logs.warning("ingest: could not close the route's batches; next tick retries",
                             problem=f"{type(e).__name__}: {e}", route=r.get("route"))
        for tk in sorted({r["tableKey"] for r in routes}):
            if time_up():
                return summary
            try:
                result = self.advance_table(tk)
            except Exception as e:  # noqa: BLE001 - one table's problem must not stop the others
                summary["errors"] += 1
                logs.warning("ingest: could not advance the table's batches; next tick retries",
                             problem=f"{type(e).__name__}: {e}", tableKey=tk)
                continue
            for k in ("started", "released", "busy"):
                summary[k] += result.get(k, 0)
        try:
            published = self.apply.sweep()
            if published:
                summary["failureEvents"] = published
        except Exception as e:  # noqa: BLE001 - published by a later tick
            logs.warning("ingest: could not publish recorded INGEST_BATCH_FAILED events; next tick retries",
                         problem=f"{type(e).__name__}: {e}")
        if any(summary.values()):
            logs.info("ingest tick", **summary)
        return summary

    # -- routes: close batches ----------------------------------------------------------------------------
    def advance_route(self, route: Route, *, check_table: bool = True, route_doc: Doc | None = None,
                      count: bool = True) -> int:
        """Finish an interrupted close, close every full batch, then (optionally) look at the table.
        `route_doc` as read by the caller ({}: not read, an interrupted close is found by close())."""
        closed = 0
        r = route_doc if route_doc is not None else self.ledger.route(route.key)
        if r and r.get("closing"):
            self.finish_close(r["closing"])
        lock = _closing.setdefault(route.key, threading.Lock())
        if count and lock.acquire(blocking=False):  # another thread of this instance is closing: it will
            try:
                for _ in range(MAX_CLOSES_PER_CALL):
                    n = self.ledger.count(route.key, B.PENDING, up_to=self.max_n)
                    self._counted(route.key, n)
                    if n < self.max_n or self.close(route, "size") is None:
                        break
                    closed += 1
            finally:
                lock.release()
        if check_table or closed:
            self.advance_table(route.table_key)
        return closed

    def close(self, route: Route, reason: str) -> str | None:
        """Close one batch of the route's oldest pending arrivals ('size': only a full one; 'age': only
        if the oldest has waited long enough). Returns its id, or None if there was nothing to close."""
        for _ in range(5):
            r = self.ledger.route(route.key)
            if r is None:
                self.ledger.ensure_route(route.key, route.fields())
                continue
            if r.get("closing"):
                self.finish_close(r["closing"])
                continue
            items = self.ledger.pending(route.key, self.max_n)
            if not items or (reason == "size" and len(items) < self.max_n):
                return None
            if reason == "age" and now() - items[0]["arrivedAt"] < self.max_age:
                return None
            seq = int(r.get("seq") or 0)
            batch_id = f"{route.key}-{seq + 1:06d}"
            plan = C.plan(C.Change(i["path"], i.get("kind") == C.DELETION, i["arrivedAt"]) for i in items)
            text = filter_text(list(plan.export_paths))
            name = f"ingest/{route.table_key}/{batch_id}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.txt"
            t = now()
            destination = {"tableUri": route.table_uri, **self.options.get(route.store, {}),
                           "writeDisposition": "WRITE_APPEND"}
            batch = {**route.fields(), "batchId": batch_id, "requestId": request_id_of(batch_id), "seq": seq + 1,
                     "destination": destination,
                     "state": B.CLOSING, "reason": reason, "arrivalIds": [i["id"] for i in items],
                     **plan.fields(), "instances": plan.instances, "attempt": 1, "filterObject": name,
                     "filterUri": self.files.uri(name), "oldestArrivalAt": items[0]["arrivedAt"],
                     "newestArrivalAt": items[-1]["arrivedAt"], "closedAt": t, "updatedAt": t}
            if self.ledger.open_batch(route.key, seq, batch_id, batch):
                logs.info("ingest batch closed", ingestBatch=batch_id, reason=reason, instances=plan.instances,
                          exports=len(plan.export_paths), deletions=sum(i.get("kind") == C.DELETION for i in items),
                          arrivals=len(items), dicomStore=route.store, tableUri=route.table_uri,
                          waitedS=round((t - items[0]["arrivedAt"]).total_seconds(), 3))
                self.finish_close(batch_id)
                return batch_id
        return None

    def finish_close(self, batch_id: str) -> None:
        """Steps 2-4 of closing; idempotent, so whoever finds a batch CLOSING may run it."""
        b = self.ledger.batch(batch_id)
        if b is None:
            return
        if b["state"] == B.CLOSING:
            self.ledger.mark_batched(b["arrivalIds"], batch_id, expire_at=now() + DEDUP_RETENTION)
            text = filter_text(b["paths"])
            self.files.write_once(b["filterObject"], text)
        if self.ledger.finish_close(b["route"], batch_id, {"state": B.READY, "readyAt": now()}):
            logs.info("ingest batch ready", ingestBatch=batch_id, filterUri=b["filterUri"])

    # -- tables: one running export each ---------------------------------------------------------------------
    def advance_table(self, tk: str) -> dict[str, int]:
        """Release the table if its export ended, then start the next batch: a READY one, or (the table
        idle) the route whose oldest pending arrival has waited INGEST_BATCH_MAX_AGE_S."""
        out = {"started": 0, "released": 0, "busy": 0}
        t = self.ledger.table(tk) or {}
        running = t.get("running")
        if running:
            b = self.ledger.batch(running["batchId"])
            if b is None or not self.settle(b):
                out["busy"] = 1
                return out
            out["released"] = 1
        for _ in range(2):
            ready = self.ledger.ready(tk, 1)
            if ready:
                if self.start(ready[0]):
                    out["started"] = 1
                    return out
                continue  # someone else claimed it, or the table was taken meanwhile
            break
        if (self.ledger.table(tk) or {}).get("running"):
            return out
        due = []
        for r in self.ledger.routes(tk):
            oldest = self.ledger.oldest_pending(r["route"])
            if oldest is not None and now() - oldest >= self.max_age:
                due.append((oldest, r))
        for _, r in sorted(due, key=lambda x: x[0]):
            batch_id = self.close(Route(r["store"], r["tableUri"]), "age")
            if batch_id is not None:
                b = self.ledger.batch(batch_id)
                if b and b["state"] == B.READY and self.start(b):
                    out["started"] = 1
                return out
        return out

    def start(self, b: Doc) -> bool:
        if not self.ledger.claim_table(b["tableKey"], b["tableUri"], b["batchId"], b["requestId"]):
            return False
        self.apply.begin({**b, "state": B.PUBLISHING})
        return True

    def request_of(self, b: Doc) -> Doc:
        return {"requestId": b["requestId"], "dicomStore": b["store"],
                "bigqueryDestination": b.get("destination") or {"tableUri": b["tableUri"],
                                                                "writeDisposition": "WRITE_APPEND"},
                "filterConfig": {"resourcePathsGcsUri": b["filterUri"]},
                "labels": {"ingest-batch": b["batchId"]}}

    def publish(self, b: Doc) -> None:
        """Publish the batch's export request (same bytes every time), then record PUBLISHED."""
        message_id = self.requests.publish(self.request_of(b), {"source": "ingest", "ingestBatch": b["batchId"]})
        self.ledger.update_batch_if(b["batchId"], (B.PUBLISHING, B.PUBLISHED),
                                    {"state": B.PUBLISHED, "publishedAt": now(), "messageId": message_id})
        logs.info("ingest batch export requested", ingestBatch=b["batchId"], requestId=b["requestId"],
                  instances=b.get("instances"), tableUri=b["tableUri"], republished=b["state"] == B.PUBLISHED)

    def settle(self, b: Doc) -> bool:
        """For the table's running batch: finish publishing it, and release the table once the request's
        ledger document is terminal. True when the table was released."""
        if b["state"] == B.PUBLISHING:
            return self.apply.begin(b)
        if b["state"] == B.RETRYING:
            return self.apply.retry(b)
        if b["state"] in B.BATCH_FINAL:  # recorded, but the table was not released: release it now
            return self.ledger.release_table(b["tableKey"], b["batchId"], {})
        req = self.requests_ledger.get(b["requestId"])
        if req is None:
            if b.get("publishedAt") and now() - b["publishedAt"] > REPUBLISH_AFTER:
                logs.warning("the batch's export request was published but the intake has not recorded it; "
                             "publishing it again (same requestId)", ingestBatch=b["batchId"])
                self.publish(b)
            return False
        if req.get("state") not in TERMINAL:
            return False
        if req["state"] != "SUCCEEDED":
            return self.apply.failed(b, {"requestId": b["requestId"], "requestState": req["state"],
                                         "error": req.get("error")})
        counter = req.get("counter") or {}
        updates = {"state": B.EXPORTED, "requestState": req["state"],
                   "operation": req.get("operation"), "counter": counter, "error": req.get("error"),
                   "doneAt": now(), "expireAt": now() + BATCH_RETENTION}
        if not self.ledger.release_table(b["tableKey"], b["batchId"], updates):
            return False
        failures = int(counter.get("failure") or 0) if isinstance(counter, dict) else 0
        fields = dict(ingestBatch=b["batchId"], requestId=b["requestId"], instances=b.get("instances"),
                      requestState=req["state"], counter=counter, tableUri=b["tableUri"], filterUri=b["filterUri"])
        if failures:
            logs.warning("ingest batch exported with failures (e.g. instances deleted before the export)",
                         **fields)
        else:
            logs.info("ingest batch exported", **fields)
        return True
