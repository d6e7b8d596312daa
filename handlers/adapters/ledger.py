"""Firestore adapter: the ledger, one document per export request.

Every change is a transaction on that one document (read, decide, write), so concurrent
deliveries of one request serialise on it. Timestamps are timezone-aware UTC datetimes.
google-cloud-firestore is imported and its client created on first use, once per instance;
FIRESTORE_EMULATOR_HOST is honoured by the client itself.

The document's fields are described in README.md ("The ledger document").
"""
from __future__ import annotations

import re
import threading
from datetime import datetime, timedelta, timezone
from typing import Callable, NamedTuple

# States. Terminal ones are written by the poller (and FAILED also by the intake).
RECEIVED, STARTING, STARTED, REJECTED = "RECEIVED", "STARTING", "STARTED", "REJECTED"
SUCCEEDED, FAILED, CANCELLED, TIMED_OUT = "SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, TIMED_OUT, REJECTED})

_RESERVED_ID = re.compile(r"^(\.|\.\.|__.*__)$")


def now() -> datetime:
    return datetime.now(timezone.utc)


def doc_id(request_id: str) -> str:
    """The document id of a requestId. Injective: ids Firestore forbids ('.', '..', '__x__') are
    percent-escaped, and '%' cannot occur in a requestId ([A-Za-z0-9._:-]) or a message id."""
    if _RESERVED_ID.match(request_id):
        return "".join(f"%{ord(c):02X}" if c in "._" else c for c in request_id)
    return request_id


def apply_updates(doc: dict, updates: dict) -> dict:
    """`doc` with Firestore-style updates applied locally (dotted keys are nested paths)."""
    from google.cloud.firestore import DELETE_FIELD

    out = _deepcopy(doc)
    for path, value in updates.items():
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        if value is DELETE_FIELD:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return out


class Versioned(NamedTuple):
    """A ledger document as read, with the version (Firestore update_time) a conditional write needs."""
    doc: dict
    version: datetime

    @property
    def request_id(self) -> str:
        return self.doc["requestId"]


def _deepcopy(v):
    if isinstance(v, dict):
        return {k: _deepcopy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_deepcopy(x) for x in v]
    return v


_clients: dict = {}
_clients_lock = threading.Lock()


def firestore_client(project: str | None):
    """One Firestore client per project and process, made on first use (the import is the cold start's cost)."""
    client = _clients.get(project)
    if client is None:
        with _clients_lock:
            client = _clients.get(project)
            if client is None:
                from google.cloud import firestore
                client = _clients[project] = firestore.Client(project=project)
    return client


class Ledger:
    def __init__(self, collection: str, project: str | None = None, *, client=None):
        self.collection = collection
        self.project = project
        self._client = client

    def client(self):
        if self._client is None:
            self._client = firestore_client(self.project)
        return self._client

    def ref(self, request_id: str):
        return self.client().collection(self.collection).document(doc_id(request_id))

    # -- single documents -----------------------------------------------------------------------
    def get(self, request_id: str) -> dict | None:
        snap = self.ref(request_id).get()
        return snap.to_dict() if snap.exists else None

    def create(self, request_id: str, doc: dict) -> tuple[bool, dict]:
        """Create the document unless it exists. Returns (created, the document as stored)."""
        def decide(current):
            return (None, None) if current is not None else ("create", doc)
        created, stored = self._transact(request_id, decide)
        return created, stored

    def update(self, request_id: str, decide: Callable[[dict | None], dict | None]) -> tuple[bool, dict | None]:
        """Read-decide-write in one transaction. `decide(current)` returns the updates to apply
        (Firestore field paths -> values; DELETE_FIELD deletes) or None to leave the document as it
        is. It may run more than once (the transaction retries on contention), so keep it pure.
        Returns (written, the document after the transaction)."""
        def wrapped(current):
            if current is None:
                return None, None
            updates = decide(current)
            return (None, None) if not updates else ("update", updates)
        return self._transact(request_id, wrapped)

    def claim(self, request_id: str, *, owner: str, lease_s: float, states=(STARTED,),
              at: datetime | None = None, updates: dict | None = None) -> dict | None:
        """Take the document's lease if it is in one of `states` and nobody else holds a live lease.
        Returns the document (with the lease) or None when it was not claimed."""
        t = at or now()

        def decide(doc):
            if doc.get("state") not in states:
                return None
            lease = doc.get("leaseUntil")
            if lease is not None and lease > t and doc.get("leaseOwner") != owner:
                return None
            return {"leaseUntil": t + timedelta(seconds=lease_s), "leaseOwner": owner, "updatedAt": t,
                    **(updates or {})}
        written, doc = self.update(request_id, decide)
        return doc if written else None

    def release(self, request_id: str, *, owner: str, updates: dict | None = None) -> dict | None:
        """Drop the lease if `owner` still holds it, applying `updates` in the same write."""
        from google.cloud.firestore import DELETE_FIELD

        def decide(doc):
            if doc.get("leaseOwner") != owner:
                return None
            return {"leaseUntil": DELETE_FIELD, "leaseOwner": DELETE_FIELD, "updatedAt": now(), **(updates or {})}
        written, doc = self.update(request_id, decide)
        return doc if written else None

    # -- queries ---------------------------------------------------------------------------------
    def due(self, *, limit: int = 50, at: datetime | None = None, state: str = STARTED,
            after: datetime | None = None) -> list[dict]:
        """Documents in `state` whose nextPollAt has come, oldest first; page with `after` (the last
        nextPollAt seen). Needs the composite index (state, nextPollAt) that deploy.sh creates."""
        from google.cloud.firestore_v1.base_query import FieldFilter

        q = (self.client().collection(self.collection)
             .where(filter=FieldFilter("state", "==", state))
             .where(filter=FieldFilter("nextPollAt", "<=", at or now()))
             .order_by("nextPollAt"))
        if after is not None:
            q = q.start_after({"nextPollAt": after})
        return [s.to_dict() for s in q.limit(limit).stream()]

    def in_state(self, state: str, *, limit: int = 50, **equals) -> list[dict]:
        """Documents in `state` whose fields equal `equals` (equality filters need no composite index)."""
        from google.cloud.firestore_v1.base_query import FieldFilter

        q = self.client().collection(self.collection).where(filter=FieldFilter("state", "==", state))
        for name, value in equals.items():
            q = q.where(filter=FieldFilter(name, "==", value))
        return [s.to_dict() for s in q.limit(limit).stream()]

    def find_by_operation(self, operation: str) -> dict | None:
        from google.cloud.firestore_v1.base_query import FieldFilter

        q = self.client().collection(self.collection).where(filter=FieldFilter("operation", "==", operation))
        for s in q.limit(1).stream():
            return s.to_dict()
        return None

    # -- many documents per round trip, optimistic (added for the poller) -----------------------
    # A transaction costs three round trips per document (begin, read, commit). The poller instead
    # reads a page with one query, then writes the page with one BatchWrite in which each write is
    # applied only if its document is still the version that was read (its update_time): a
    # compare-and-set per document. BatchWrite is not atomic: each document succeeds or fails alone.
    def due_page(self, *, limit: int, at: datetime | None = None, state: str = STARTED,
                 fields: tuple[str, ...] | None = None, cursor=None) -> tuple[list["Versioned"], object]:
        """One page of due() with each document's version. Pass the returned cursor (the last snapshot)
        back for the next page: ties on nextPollAt are ordered by document id, so none is skipped.
        `fields` reads only those fields (a projection). The cursor is None after the last page."""
        from google.cloud.firestore_v1.base_query import FieldFilter

        q = (self.client().collection(self.collection)
             .where(filter=FieldFilter("state", "==", state))
             .where(filter=FieldFilter("nextPollAt", "<=", at or now()))
             .order_by("nextPollAt"))
        if fields:
            q = q.select(sorted({*fields, "requestId", "state", "nextPollAt", "leaseOwner", "leaseUntil"}))
        if cursor is not None:
            q = q.start_after(cursor)
        snaps = list(q.limit(limit).stream())
        page = [Versioned(s.to_dict(), s.update_time) for s in snaps]
        return page, (snaps[-1] if len(snaps) == limit else None)

    def write_if_unchanged(self, writes: list[tuple[str, datetime, dict]]) -> dict[str, datetime | None]:
        """Apply each (request_id, version, updates) only if the document is still at `version`, in
        BatchWrite calls of up to 500. Returns {request_id: its new version, or None if not written}."""
        from google.cloud.firestore_v1.bulk_batch import BulkWriteBatch

        client, out = self.client(), {}
        for i in range(0, len(writes), 500):
            chunk = writes[i:i + 500]
            batch = BulkWriteBatch(client)
            for request_id, version, updates in chunk:
                batch.update(self.ref(request_id), updates, option=client.write_option(last_update_time=version))
            response = batch.commit()
            for (request_id, _, _), status, result in zip(chunk, response.status, response.write_results):
                out[request_id] = result.update_time if status.code == 0 else None
        return out

    def claim_many(self, items: list["Versioned"], *, owner: str, lease_s: float, states=(STARTED,),
                   at: datetime | None = None, updates: dict | None = None) -> list["Versioned"]:
        """claim() for a page read by due_page(): take the lease of each document that is in `states`
        with no live lease of another owner and still at the version read. Returns those claimed, with
        the lease applied and their new versions."""
        t = at or now()

        def free(doc):
            lease = doc.get("leaseUntil")
            return doc.get("state") in states and (lease is None or lease <= t or doc.get("leaseOwner") == owner)

        lease = {"leaseUntil": t + timedelta(seconds=lease_s), "leaseOwner": owner, "updatedAt": t, **(updates or {})}
        candidates = [v for v in items if free(v.doc)]
        written = self.write_if_unchanged([(v.request_id, v.version, lease) for v in candidates])
        return [Versioned(apply_updates(v.doc, lease), written[v.request_id])
                for v in candidates if written.get(v.request_id)]

    def release_many(self, items: list[tuple[str, datetime, dict]]) -> dict[str, datetime | None]:
        """release() for documents claimed by claim_many(): drop the lease and apply the updates, each only
        if the document is still at the version our claim wrote (so still ours)."""
        from google.cloud.firestore import DELETE_FIELD

        t = now()
        return self.write_if_unchanged([
            (rid, version, {"leaseUntil": DELETE_FIELD, "leaseOwner": DELETE_FIELD, "updatedAt": t, **updates})
            for rid, version, updates in items])

    # -- transaction plumbing ----------------------------------------------------------------------
    def _transact(self, request_id: str, decide) -> tuple[bool, dict | None]:
        from google.cloud import firestore

        ref = self.ref(request_id)

        @firestore.transactional
        def run(tx):
            snap = ref.get(transaction=tx)
            current = snap.to_dict() if snap.exists else None
            action, payload = decide(current)
            if action == "create":
                tx.create(ref, payload)
                return True, payload
            if action == "update":
                tx.update(ref, payload)
                return True, apply_updates(current, payload)
            return False, current

        return run(self.client().transaction(max_attempts=10))
