"""Firestore adapter: the ledger, one document per export request (README.md, "The ledger document").

Every change is a compare-and-set on that one document: read it (or keep the version the last write
returned), decide, then write conditioned on that version (handlers/adapters/firestore.py). A write that
loses to a concurrent one changes nothing, and the caller reads again and decides again. So concurrent
deliveries of one request serialise on it without transactions, and a process killed at any point
leaves no lock behind. Timestamps are timezone-aware UTC datetimes.
"""
from __future__ import annotations

import random
import re
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Callable, NamedTuple

from .firestore import DELETE, Conflict, Doc, Firestore

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
    out = _deepcopy(doc)
    for path, value in updates.items():
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return out


class Versioned(NamedTuple):
    """A ledger document with its version (Firestore's updateTime), which a conditional write needs."""
    doc: dict
    version: str | None

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


def firestore_client(project: str | None) -> Firestore:
    """One Firestore client per project and process (shared by the request and ingest ledgers)."""
    client = _clients.get(project)
    if client is None:
        with _clients_lock:
            client = _clients.get(project)
            if client is None:
                import config
                resolved = project or config.project_id(config.get())
                client = _clients.get(resolved) or Firestore(resolved)
                _clients[project] = _clients[resolved] = client
    return client


class Ledger:
    def __init__(self, collection: str, project: str | None = None, *, client: Firestore | None = None):
        self.collection = collection
        self.project = project
        self._client = client

    def client(self) -> Firestore:
        if self._client is None:
            self._client = firestore_client(self.project)
        return self._client

    # -- single documents -----------------------------------------------------------------------
    def read(self, request_id: str) -> Versioned | None:
        d = self.client().get(self.collection, doc_id(request_id))
        return Versioned(d.data, d.version) if d is not None else None

    def get(self, request_id: str) -> dict | None:
        v = self.read(request_id)
        return v.doc if v is not None else None

    def create(self, request_id: str, doc: dict) -> tuple[bool, Versioned]:
        """Create the document unless it exists (one write). Returns (created, the document as stored)."""
        fs = self.client()
        for _ in range(20):
            try:
                version, = fs.commit([fs.create(self.collection, doc_id(request_id), doc)])
                return True, Versioned(doc, version)
            except Conflict:
                current = self.read(request_id)
                if current is not None:
                    return False, current
        raise ContentionError(f"{request_id}: created and deleted concurrently, repeatedly")

    def write(self, item: Versioned, updates: dict) -> Versioned | None:
        """Apply `updates` if the document is still at item.version (one write); None if it changed."""
        fs = self.client()
        try:
            version, = fs.commit([fs.update(self.collection, doc_id(item.request_id), updates, version=item.version)])
        except Conflict:
            return None
        return Versioned(apply_updates(item.doc, updates), version)

    def update(self, request_id: str, decide: Callable[[dict], dict | None], *,
               current: Versioned | None = None, attempts: int = 30) -> tuple[bool, Versioned | None]:
        """Read, decide, write if unchanged; again on a lost race. `decide(doc)` returns the updates to
        apply (field paths -> values; DELETE deletes) or None to leave the document as it is; it may run
        more than once, so keep it pure. `current` (a version already held) saves the first read.
        Returns (written, the document after). A missing document is never written."""
        for attempt in range(attempts):
            item = current if current is not None else self.read(request_id)
            current = None
            if item is None:
                return False, None
            updates = decide(item.doc)
            if not updates:
                return False, item
            new = self.write(item, updates)
            if new is not None:
                return True, new
            time.sleep(random.uniform(0, min(0.2, 0.005 * 2 ** attempt)))
        raise ContentionError(f"{request_id}: still changing after {attempts} attempts")

    def claim(self, request_id: str, *, owner: str, lease_s: float, states=(STARTED,),
              at: datetime | None = None, updates: dict | None = None,
              current: Versioned | None = None) -> Versioned | None:
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
        written, item = self.update(request_id, decide, current=current)
        return item if written else None

    def release(self, request_id: str, *, owner: str, updates: dict | None = None,
                current: Versioned | None = None) -> Versioned | None:
        """Drop the lease if `owner` still holds it, applying `updates` in the same write."""
        def decide(doc):
            if doc.get("leaseOwner") != owner:
                return None
            return {"leaseUntil": DELETE, "leaseOwner": DELETE, "updatedAt": now(), **(updates or {})}
        written, item = self.update(request_id, decide, current=current)
        return item if written else None

    def put_many(self, docs: list[dict]) -> None:
        """Write whole documents unconditionally, 500 per call (tools, benchmarks and tests seed with it)."""
        fs = self.client()
        for i in range(0, len(docs), 500):
            fs.commit([fs.put(self.collection, doc_id(d["requestId"]), d) for d in docs[i:i + 500]])

    # -- queries ---------------------------------------------------------------------------------
    def due(self, *, limit: int = 50, at: datetime | None = None, state: str = STARTED) -> list[dict]:
        """Documents in `state` whose nextPollAt has come, oldest first. Needs the composite index
        (state, nextPollAt) that deploy.sh creates."""
        return [v.doc for v in self.due_page(limit=limit, at=at, state=state)[0]]

    def in_state(self, state: str, *, limit: int = 50, **equals) -> list[dict]:
        """Documents in `state` whose fields equal `equals` (equality filters need no composite index)."""
        where = [("state", "==", state), *((k, "==", v) for k, v in equals.items())]
        return [d.data for d in self.client().query(self.collection, where=where, limit=limit)]

    def find_by_operation(self, operation: str) -> dict | None:
        for d in self.client().query(self.collection, where=[("operation", "==", operation)], limit=1):
            return d.data
        return None

    # -- many documents per round trip (the poller) --------------------------------------------------
    # The poller reads a page with one query, then writes the page with one batchWrite in which each
    # write is applied only if its document is still the version that was read: a compare-and-set
    # per document. batchWrite is not atomic: each document succeeds or fails alone.
    def due_page(self, *, limit: int, at: datetime | None = None, state: str = STARTED,
                 fields: tuple[str, ...] | None = None, cursor: Doc | None = None) -> tuple[list[Versioned], Doc | None]:
        """One page of due() with each document's version. Pass the returned cursor back for the next
        page: ties on nextPollAt are ordered by document id, so none is skipped. `fields` reads only
        those fields (a projection). The cursor is None after the last page."""
        select = sorted({*fields, "requestId", "state", "nextPollAt", "leaseOwner", "leaseUntil"}) if fields else None
        docs = self.client().query(self.collection, where=[("state", "==", state), ("nextPollAt", "<=", at or now())],
                                   order_by=["nextPollAt"], select=select, limit=limit, start_after=cursor)
        return [Versioned(d.data, d.version) for d in docs], (docs[-1] if len(docs) == limit else None)

    def write_if_unchanged(self, writes: list[tuple[str, str, dict]]) -> dict[str, str | None]:
        """Apply each (request_id, version, updates) only if the document is still at `version`, in
        batchWrite calls of up to 500. Returns {request_id: its new version, or None if not written}."""
        fs, out = self.client(), {}
        for i in range(0, len(writes), 500):
            chunk = writes[i:i + 500]
            results = fs.batch_write([fs.update(self.collection, doc_id(rid), updates, version=version)
                                      for rid, version, updates in chunk])
            for (rid, _, _), version in zip(chunk, results):
                out[rid] = version
        return out

    def claim_many(self, items: list[Versioned], *, owner: str, lease_s: float, states=(STARTED,),
                   at: datetime | None = None, updates: dict | None = None) -> list[Versioned]:
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

    def release_many(self, items: list[tuple[str, str, dict]]) -> dict[str, str | None]:
        """release() for documents claimed by claim_many(): drop the lease and apply the updates, each only
        if the document is still at the version our claim wrote (so still ours)."""
        t = now()
        return self.write_if_unchanged([
            (rid, version, {"leaseUntil": DELETE, "leaseOwner": DELETE, "updatedAt": t, **updates})
            for rid, version, updates in items])


class ContentionError(Exception):
    """A conditional write kept losing to concurrent writers (the caller lets Pub/Sub retry)."""
