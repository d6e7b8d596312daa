"""Firestore adapter of the ingest function: arrivals, routes, batches and table locks.

Four collections next to the request ledger (LEDGER_COLLECTION = C):

- `C-ingestArrivals`: one document per notification, id = hash of what identifies it (an instance
  version), created with a create-only write: a redelivered notification finds it and adds nothing.
  Concurrent notifications write different documents: there is no hot document on the hot path.
- `C-ingestRoutes`: one per (store, table) route: the batch sequence number and the batch being
  closed. Written only when a batch is closed, never per notification.
- `C-ingestBatches`: one per closed batch (<= INGEST_BATCH_MAX_INSTANCES paths, < 1 MiB).
- `C-ingestTables`: one per destination table: the batch whose export is running (the lock).

Multi-document changes are optimistic: read, decide, then one atomic batched write conditioned on each
document's update time (`_cas`). No Firestore transaction is used: an abandoned transaction (a process
killed inside one) keeps its locks until they expire, which would stall every other instance.

The fields of each are described in README.md, "Ingest". google-cloud-firestore is imported
on first use; FIRESTORE_EMULATOR_HOST is honoured by the client itself. Timestamps are aware UTC.
"""
from __future__ import annotations

from datetime import datetime, timezone

# arrival states
PENDING, BATCHED, DELETION, OTHER = "PENDING", "BATCHED", "DELETION", "OTHER"
# batch states, in order; EXPORTED and FAILED are final
CLOSING, READY, PUBLISHING, PUBLISHED, EXPORTED, FAILED = (
    "CLOSING", "READY", "PUBLISHING", "PUBLISHED", "EXPORTED", "FAILED")
BATCH_FINAL = frozenset({EXPORTED, FAILED})
WRITE_CHUNK = 400  # documents per batched write (Firestore's historical limit is 500)


def now() -> datetime:
    return datetime.now(timezone.utc)


class IngestLedger:
    def __init__(self, ledger_collection: str, project: str | None = None, *, client=None):
        self.prefix = ledger_collection
        self.project = project
        self._client = client

    def client(self):
        if self._client is None:
            from .ledger import firestore_client
            self._client = firestore_client(self.project)
        return self._client

    def _col(self, kind: str):
        return self.client().collection(f"{self.prefix}-ingest{kind}")

    def arrivals(self):
        return self._col("Arrivals")

    def routes_col(self):
        return self._col("Routes")

    def batches_col(self):
        return self._col("Batches")

    def tables_col(self):
        return self._col("Tables")

    # -- arrivals ----------------------------------------------------------------------------------
    def record(self, arrival_id: str, doc: dict) -> bool:
        """Create the arrival unless it exists (one write, no transaction). True when created."""
        from google.api_core import exceptions as gexc

        try:
            self.arrivals().document(arrival_id).create(doc)
            return True
        except gexc.AlreadyExists:
            return False

    def arrival(self, arrival_id: str) -> dict | None:
        snap = self.arrivals().document(arrival_id).get()
        return snap.to_dict() if snap.exists else None

    def _pending_query(self, route: str):
        from google.cloud.firestore_v1.base_query import FieldFilter

        return (self.arrivals().where(filter=FieldFilter("route", "==", route))
                .where(filter=FieldFilter("state", "==", PENDING)))

    def pending(self, route: str, limit: int) -> list[dict]:
        """The route's oldest pending arrivals (composite index route, state, arrivedAt)."""
        q = self._pending_query(route).select(["path", "arrivedAt"]).order_by("arrivedAt").limit(limit)
        return [{**s.to_dict(), "id": s.id} for s in q.stream()]

    def oldest_pending(self, route: str) -> datetime | None:
        for s in self._pending_query(route).select(["arrivedAt"]).order_by("arrivedAt").limit(1).stream():
            return s.to_dict().get("arrivedAt")
        return None

    def count(self, route: str, state: str = PENDING, up_to: int | None = None) -> int:
        """How many arrivals of the route are in `state` (at most `up_to`: a bounded aggregation)."""
        from google.cloud.firestore_v1.base_query import FieldFilter

        q = (self.arrivals().where(filter=FieldFilter("route", "==", route))
             .where(filter=FieldFilter("state", "==", state)))
        if up_to:
            q = q.limit(up_to)
        return int(q.count().get()[0][0].value)

    def mark_batched(self, arrival_ids: list[str], batch_id: str, *, expire_at: datetime) -> None:
        """Idempotent: every listed arrival becomes BATCHED in `batch_id`."""
        col = self.arrivals()
        for i in range(0, len(arrival_ids), WRITE_CHUNK):
            wb = self.client().batch()
            for aid in arrival_ids[i:i + WRITE_CHUNK]:
                wb.update(col.document(aid), {"state": BATCHED, "batchId": batch_id, "expireAt": expire_at})
            wb.commit()

    # -- routes ------------------------------------------------------------------------------------
    def ensure_route(self, key: str, fields: dict) -> None:
        from google.api_core import exceptions as gexc

        t = now()
        try:
            self.routes_col().document(key).create({**fields, "seq": 0, "closing": None, "createdAt": t,
                                                    "updatedAt": t})
        except gexc.AlreadyExists:
            pass

    def route(self, key: str) -> dict | None:
        snap = self.routes_col().document(key).get()
        return snap.to_dict() if snap.exists else None

    def routes(self, table_key: str | None = None) -> list[dict]:
        from google.cloud.firestore_v1.base_query import FieldFilter

        q = self.routes_col()
        if table_key is not None:
            q = q.where(filter=FieldFilter("tableKey", "==", table_key))
        return [s.to_dict() for s in q.stream()]

    def open_batch(self, route_key: str, expected_seq: int, batch_id: str, batch: dict) -> bool:
        """Create the batch (CLOSING) and mark it as the route's batch being closed, if the route is
        still at `expected_seq` with nothing being closed (else another closer got there first)."""
        route_ref = self.routes_col().document(route_key)
        batch_ref = self.batches_col().document(batch_id)

        def decide(route, _batch):
            if route is None or int(route.get("seq") or 0) != expected_seq or route.get("closing"):
                return None
            t = now()
            return [(route_ref, "update", {"seq": expected_seq + 1, "closing": batch_id, "closingSince": t,
                                           "updatedAt": t}),
                    (batch_ref, "create", batch)]
        return self._cas([route_ref, batch_ref], decide)

    def finish_close(self, route_key: str, batch_id: str, updates: dict) -> bool:
        """CLOSING -> `updates` (READY) and clear the route's `closing`, in one atomic write."""
        route_ref = self.routes_col().document(route_key)
        batch_ref = self.batches_col().document(batch_id)
        moved = []

        def decide(route, batch):
            t = now()
            ops = []
            moved.clear()
            if batch is not None and batch.get("state") == CLOSING:
                ops.append((batch_ref, "update", {**updates, "updatedAt": t}))
                moved.append(True)
            if route is not None and route.get("closing") == batch_id:
                ops.append((route_ref, "update", {"closing": None, "closingSince": None, "updatedAt": t}))
            return ops or None
        self._cas([route_ref, batch_ref], decide)
        return bool(moved)

    # -- batches -----------------------------------------------------------------------------------
    def batch(self, batch_id: str) -> dict | None:
        snap = self.batches_col().document(batch_id).get()
        return snap.to_dict() if snap.exists else None

    def update_batch_if(self, batch_id: str, states: tuple[str, ...], updates: dict) -> bool:
        ref = self.batches_col().document(batch_id)

        def decide(batch):
            if batch is None or batch.get("state") not in states:
                return None
            return [(ref, "update", {**updates, "updatedAt": now()})]
        return self._cas([ref], decide)

    def ready(self, table_key: str, limit: int = 1) -> list[dict]:
        """READY batches of a table, first closed first (composite index tableKey, state, readyAt)."""
        from google.cloud.firestore_v1.base_query import FieldFilter

        q = (self.batches_col().where(filter=FieldFilter("tableKey", "==", table_key))
             .where(filter=FieldFilter("state", "==", READY)).order_by("readyAt").limit(limit))
        return [s.to_dict() for s in q.stream()]

    def batches(self, *, route: str | None = None, table_key: str | None = None, state: str | None = None,
                limit: int = 1000) -> list[dict]:
        """Batches by equality filters (operators and tests)."""
        from google.cloud.firestore_v1.base_query import FieldFilter

        q = self.batches_col()
        for name, value in (("route", route), ("tableKey", table_key), ("state", state)):
            if value is not None:
                q = q.where(filter=FieldFilter(name, "==", value))
        return [s.to_dict() for s in q.limit(limit).stream()]

    # -- tables ------------------------------------------------------------------------------------
    def table(self, table_key: str) -> dict | None:
        snap = self.tables_col().document(table_key).get()
        return snap.to_dict() if snap.exists else None

    def claim_table(self, table_key: str, table_uri: str, batch_id: str, request_id: str) -> bool:
        """Take the table for `batch_id` (READY -> PUBLISHING) if no export of the table is running."""
        table_ref = self.tables_col().document(table_key)
        batch_ref = self.batches_col().document(batch_id)

        def decide(table, batch):
            if batch is None or batch.get("state") != READY or (table or {}).get("running"):
                return None
            t = now()
            running = {"tableUri": table_uri, "running": {"batchId": batch_id, "requestId": request_id, "since": t},
                       "updatedAt": t}
            return [(table_ref, "update" if table is not None else "create", running),
                    (batch_ref, "update", {"state": PUBLISHING, "claimedAt": t, "updatedAt": t})]
        return self._cas([table_ref, batch_ref], decide)

    def release_table(self, table_key: str, batch_id: str, batch_updates: dict) -> bool:
        """The running export of `batch_id` ended: free the table and record the outcome, together."""
        table_ref = self.tables_col().document(table_key)
        batch_ref = self.batches_col().document(batch_id)

        def decide(table, batch):
            running = (table or {}).get("running")
            if not running or running.get("batchId") != batch_id:
                return None
            t = now()
            ops = [(table_ref, "update", {"running": None, "lastBatchId": batch_id, "releasedAt": t, "updatedAt": t})]
            if batch is not None and batch.get("state") not in BATCH_FINAL and batch_updates:
                ops.append((batch_ref, "update", {**batch_updates, "updatedAt": t}))
            return ops
        return self._cas([table_ref, batch_ref], decide)

    # -- plumbing ----------------------------------------------------------------------------------
    def _cas(self, refs: list, decide, *, attempts: int = 30) -> bool:
        """Optimistic read-decide-write over a few documents, without a transaction: read them, let
        `decide(*docs)` return [(ref, "create" | "update", data), ...] (or None: nothing to do, False),
        and commit those writes as one atomic batch, each update conditioned on the document's
        update time as read and each create on its absence. If any changed meanwhile, nothing is
        written and it starts over. No lock is ever held, so a process that dies mid-way blocks nobody
        (an abandoned Firestore transaction keeps its locks until they expire)."""
        import random
        import time

        from google.api_core import exceptions as gexc

        client = self.client()
        for attempt in range(attempts):
            snaps = {s.reference.path: s for s in client.get_all(refs)}
            docs = [snaps[r.path].to_dict() if r.path in snaps and snaps[r.path].exists else None for r in refs]
            ops = decide(*docs)
            if not ops:
                return False
            wb = client.batch()
            for ref, kind, data in ops:
                if kind == "create":
                    wb.create(ref, data)
                else:
                    wb.update(ref, data, option=client.write_option(last_update_time=snaps[ref.path].update_time))
            try:
                wb.commit()
                return True
            except (gexc.FailedPrecondition, gexc.AlreadyExists, gexc.NotFound, gexc.Aborted):
                time.sleep(random.uniform(0, min(0.5, 0.01 * 2 ** attempt)))
        raise ContentionError(f"{[r.path for r in refs]}: still changing after {attempts} attempts")


class ContentionError(Exception):
    """A conditional write kept losing to concurrent writers (the caller retries later)."""
