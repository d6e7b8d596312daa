"""The ingest ledger in Firestore: arrivals, routes, batches and table locks (their names, states and
rules: handlers/core/batches.py; the fields of each: docs/design.md, "Ingest").

Concurrent notifications write different arrival documents: there is no hot document on the hot path.
Multi-document changes are optimistic: read, decide, then one atomic batched write conditioned on each
document's update time (Firestore.cas_many). No Firestore transaction is used: an abandoned transaction
(a process killed inside one) keeps its locks until they expire, which would stall every other instance.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from handlers.core.batches import BATCH_FINAL, BATCHED, CLOSING, PENDING, PUBLISHING, READY, collections
from handlers.core.clock import now
from handlers.core.ledger import Doc

from .firestore import Conflict, Firestore
from .firestore import Doc as Stored

WRITE_CHUNK = 400  # documents per batched write (Firestore's historical limit is 500)


class IngestLedger:
    def __init__(self, ledger_collection: str, client: Firestore):
        self.prefix = ledger_collection
        self._client = client
        self.ARRIVALS, self.ROUTES, self.BATCHES, self.TABLES = collections(ledger_collection)

    def client(self) -> Firestore:
        return self._client

    def _get(self, collection: str, doc_id: str) -> Doc | None:
        d = self.client().get(collection, doc_id)
        return d.data if d is not None else None

    def _create(self, collection: str, doc_id: str, doc: Doc) -> bool:
        fs = self.client()
        try:
            fs.commit([fs.create(collection, doc_id, doc)])
            return True
        except Conflict:
            return False

    # -- arrivals ----------------------------------------------------------------------------------
    def record(self, arrival_id: str, doc: Doc) -> bool:
        """Create the arrival unless it exists (one write, no transaction). True when created."""
        return self._create(self.ARRIVALS, arrival_id, doc)

    def arrival(self, arrival_id: str) -> Doc | None:
        return self._get(self.ARRIVALS, arrival_id)

    def _pending(self, route: str, fields: list[str], limit: int) -> list[Stored]:
        return self.client().query(self.ARRIVALS, where=[("route", "==", route), ("state", "==", PENDING)],
                                   select=fields, order_by=["arrivedAt"], limit=limit)

    def pending(self, route: str, limit: int) -> list[Doc]:
        """The route's oldest pending arrivals (composite index route, state, arrivedAt)."""
        return [{**d.data, "id": d.id} for d in self._pending(route, ["path", "arrivedAt", "kind"], limit)]

    def oldest_pending(self, route: str) -> datetime | None:
        for d in self._pending(route, ["arrivedAt"], 1):
            return d.data.get("arrivedAt")
        return None

    def count(self, route: str, state: str = PENDING, up_to: int | None = None) -> int:
        """How many arrivals of the route are in `state` (at most `up_to`: a bounded aggregation)."""
        return self.client().count(self.ARRIVALS, where=[("route", "==", route), ("state", "==", state)], up_to=up_to)

    def mark_batched(self, arrival_ids: list[str], batch_id: str, *, expire_at: datetime) -> None:
        """Idempotent: every listed arrival becomes BATCHED in `batch_id`."""
        fs = self.client()
        for i in range(0, len(arrival_ids), WRITE_CHUNK):
            fs.commit([fs.update(self.ARRIVALS, aid, {"state": BATCHED, "batchId": batch_id, "expireAt": expire_at})
                       for aid in arrival_ids[i:i + WRITE_CHUNK]])

    # -- routes ------------------------------------------------------------------------------------
    def ensure_route(self, key: str, fields: dict[str, str]) -> None:
        t = now()
        self._create(self.ROUTES, key, {**fields, "seq": 0, "closing": None, "createdAt": t, "updatedAt": t})

    def route(self, key: str) -> Doc | None:
        return self._get(self.ROUTES, key)

    def routes(self, table_key: str | None = None) -> list[Doc]:
        where: list[tuple[str, str, object]] = [("tableKey", "==", table_key)] if table_key is not None else []
        return [d.data for d in self.client().query(self.ROUTES, where=where)]

    def open_batch(self, route_key: str, expected_seq: int, batch_id: str, batch: Doc) -> bool:
        """Create the batch (CLOSING) and mark it as the route's batch being closed, if the route is
        still at `expected_seq` with nothing being closed (else another closer got there first)."""
        route_ref, batch_ref = (self.ROUTES, route_key), (self.BATCHES, batch_id)

        def decide(route: Doc | None, _batch: Doc | None) -> Any:
            if route is None or int(route.get("seq") or 0) != expected_seq or route.get("closing"):
                return None
            t = now()
            return [(route_ref, "update", {"seq": expected_seq + 1, "closing": batch_id, "closingSince": t,
                                           "updatedAt": t}),
                    (batch_ref, "create", batch)]
        return self.client().cas_many([route_ref, batch_ref], decide)

    def finish_close(self, route_key: str, batch_id: str, updates: Doc) -> bool:
        """CLOSING -> `updates` (READY) and clear the route's `closing`, in one atomic write."""
        route_ref, batch_ref = (self.ROUTES, route_key), (self.BATCHES, batch_id)
        moved: list[bool] = []

        def decide(route: Doc | None, batch: Doc | None) -> Any:
            t = now()
            ops: list[Any] = []
            moved.clear()
            if batch is not None and batch.get("state") == CLOSING:
                ops.append((batch_ref, "update", {**updates, "updatedAt": t}))
                moved.append(True)
            if route is not None and route.get("closing") == batch_id:
                ops.append((route_ref, "update", {"closing": None, "closingSince": None, "updatedAt": t}))
            return ops or None
        self.client().cas_many([route_ref, batch_ref], decide)
        return bool(moved)

    # -- batches -----------------------------------------------------------------------------------
    def batch(self, batch_id: str) -> Doc | None:
        return self._get(self.BATCHES, batch_id)

    def update_batch_if(self, batch_id: str, states: tuple[str, ...], updates: Doc) -> bool:
        ref = (self.BATCHES, batch_id)

        def decide(batch: Doc | None) -> Any:
            if batch is None or batch.get("state") not in states:
                return None
            return [(ref, "update", {**updates, "updatedAt": now()})]
        return self.client().cas_many([ref], decide)

    def failed_unpublished(self, limit: int = 50) -> list[Doc]:
        """FAILED batches whose INGEST_BATCH_FAILED event is recorded but not known to be published."""
        return [d.data for d in self.client().query(self.BATCHES, where=[("eventPending", "==", True)],
                                                    limit=limit)]

    def ready(self, table_key: str, limit: int = 1) -> list[Doc]:
        """READY batches of a table, first closed first (composite index tableKey, state, readyAt)."""
        return [d.data for d in self.client().query(self.BATCHES, where=[("tableKey", "==", table_key),
                                                                         ("state", "==", READY)],
                                                    order_by=["readyAt"], limit=limit)]

    def batches(self, *, route: str | None = None, table_key: str | None = None, state: str | None = None,
                limit: int = 1000) -> list[Doc]:
        """Batches by equality filters (operators and tests)."""
        where: list[tuple[str, str, object]] = [(name, "==", value) for name, value in (("route", route), ("tableKey", table_key), ("state", state))
                 if value is not None]
        return [d.data for d in self.client().query(self.BATCHES, where=where, limit=limit)]

    # -- tables ------------------------------------------------------------------------------------
    def table(self, table_key: str) -> Doc | None:
        return self._get(self.TABLES, table_key)

    def claim_table(self, table_key: str, table_uri: str, batch_id: str, request_id: str) -> bool:
        """Take the table for `batch_id` (READY -> PUBLISHING) if no export of the table is running."""
        table_ref, batch_ref = (self.TABLES, table_key), (self.BATCHES, batch_id)

        def decide(table: Doc | None, batch: Doc | None) -> Any:
            if batch is None or batch.get("state") != READY or (table or {}).get("running"):
                return None
            t = now()
            running = {"tableUri": table_uri, "running": {"batchId": batch_id, "requestId": request_id, "since": t},
                       "updatedAt": t}
            return [(table_ref, "update" if table is not None else "create", running),
                    (batch_ref, "update", {"state": PUBLISHING, "claimedAt": t, "updatedAt": t})]
        return self.client().cas_many([table_ref, batch_ref], decide)

    def release_table(self, table_key: str, batch_id: str, batch_updates: Doc) -> bool:
        """The running export of `batch_id` ended: free the table and record the outcome, together."""
        table_ref, batch_ref = (self.TABLES, table_key), (self.BATCHES, batch_id)

        def decide(table: Doc | None, batch: Doc | None) -> Any:
            running = (table or {}).get("running")
            if not running or running.get("batchId") != batch_id:
                return None
            t = now()
            ops = [(table_ref, "update", {"running": None, "lastBatchId": batch_id, "releasedAt": t, "updatedAt": t})]
            if batch is not None and batch.get("state") not in BATCH_FINAL and batch_updates:
                ops.append((batch_ref, "update", {**batch_updates, "updatedAt": t}))
            return ops
        return self.client().cas_many([table_ref, batch_ref], decide)
