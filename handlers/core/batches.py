"""The ingest ledger's documents: arrivals, routes, batches and table locks (docs/design.md, "Ingest").
Their names, states and rules; pure (the Firestore store is handlers/adapters/batch_store.py).

Four collections next to the request ledger (LEDGER_COLLECTION = C):

- `C-ingestArrivals`: one document per notification, id = hash of what identifies it (an instance
  version), created with a create-only write: a redelivered notification finds it and adds nothing.
- `C-ingestRoutes`: one per (store, table) route: the batch sequence number and the batch being closed.
- `C-ingestBatches`: one per closed batch (<= INGEST_BATCH_MAX_INSTANCES paths, < 1 MiB).
- `C-ingestTables`: one per destination table: the batch whose export is running (the lock).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta

# arrival states
PENDING, BATCHED, DELETION, OTHER = "PENDING", "BATCHED", "DELETION", "OTHER"
# batch states, in order; EXPORTED and FAILED are final
CLOSING, READY, PUBLISHING, PUBLISHED, EXPORTED, FAILED = (
    "CLOSING", "READY", "PUBLISHING", "PUBLISHED", "EXPORTED", "FAILED")
BATCH_FINAL = frozenset({EXPORTED, FAILED})
RETRYING = "RETRYING"  # an attempt failed: the batch keeps its table until its next attempt (nextAttemptAt)

DEDUP_RETENTION = timedelta(days=10)   # arrivals are kept (for de-duplication) beyond Pub/Sub's 7 days
BATCH_RETENTION = timedelta(days=30)   # finished batch documents, for operators
REPUBLISH_AFTER = timedelta(seconds=120)  # published, but the intake has not recorded it: publish again
MAX_CLOSES_PER_CALL = 20               # bound on the work one notification or tick does per route


def collections(ledger_collection: str) -> tuple[str, str, str, str]:
    """(arrivals, routes, batches, tables): the collection names beside the request ledger."""
    p = ledger_collection
    return f"{p}-ingestArrivals", f"{p}-ingestRoutes", f"{p}-ingestBatches", f"{p}-ingestTables"


@dataclass(frozen=True)
class Route:
    store: str
    table_uri: str

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.store}\n{self.table_uri}".encode()).hexdigest()[:16]

    @property
    def table_key(self) -> str:
        return table_key(self.table_uri)

    def fields(self) -> dict[str, str]:
        return {"route": self.key, "store": self.store, "tableUri": self.table_uri, "tableKey": self.table_key}


def table_key(table_uri: str) -> str:
    return hashlib.sha256(table_uri.encode()).hexdigest()[:16]


def request_id_of(batch_id: str) -> str:
    return f"ingest-{batch_id}"


def arrival_id(resource: str, kind: str, version: str) -> str:
    """The document id of a notification: the same instance version notified twice has one id."""
    return hashlib.sha256(f"{kind}\n{resource}\n{version}".encode()).hexdigest()[:40]


def filter_text(paths: list[str]) -> str:
    """A batch's filter file: one instance path a line."""
    return "".join(p + "\n" for p in paths)


