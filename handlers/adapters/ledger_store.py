"""The request ledger in Firestore: one document per export request (docs/contract.md, "The ledger document").

Every change is a compare-and-set on that one document: read it (or keep the version the last write
returned), decide, then write conditioned on that version (Firestore.cas). A write that loses to a
concurrent one changes nothing, and the caller reads again and decides again. So concurrent
deliveries of one request serialise on it without transactions, and a process killed at any point
leaves no lock behind. The document's fields, states and lease rules are handlers/core/ledger.py.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Callable, Collection

from handlers.core.errors import ContentionError
from handlers.core.gate import Gate, Held, gate_id
from handlers.core.gate import collection as gate_collection
from handlers.core.ledger import (
    STARTED,
    Doc,
    Versioned,
    apply_updates,
    doc_id,
    lease_dropped,
    lease_free,
    lease_taken,
    now,
)

from .firestore import AGAIN, Conflict, Firestore
from .firestore import Doc as Stored
from .firestore import Obj as Write


class Ledger:
    def __init__(self, collection: str, client: Firestore):
        self.collection = collection
        self._client = client

    def client(self) -> Firestore:
        return self._client

    # -- single documents -----------------------------------------------------------------------
    def read(self, request_id: str) -> Versioned | None:
        d = self.client().get(self.collection, doc_id(request_id))
        return Versioned(d.data, d.version) if d is not None else None

    def get(self, request_id: str) -> Doc | None:
        v = self.read(request_id)
        return v.doc if v is not None else None

    def create(self, request_id: str, doc: Doc) -> tuple[bool, Versioned]:
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

    def write(self, item: Versioned, updates: Doc) -> Versioned | None:
        """Apply `updates` if the document is still at item.version (one write); None if it changed."""
        fs = self.client()
        try:
            version, = fs.commit([fs.update(self.collection, doc_id(item.request_id), updates, version=item.version)])
        except Conflict:
            return None
        return Versioned(apply_updates(item.doc, updates), version)

    def update(self, request_id: str, decide: Callable[[Doc], Doc | None], *,
               current: Versioned | None = None, attempts: int = 30) -> tuple[bool, Versioned | None]:
        """Read, decide, write if unchanged; again on a lost race. `decide(doc)` returns the updates to
        apply (field paths -> values; DELETE deletes) or None to leave the document as it is; it may run
        more than once, so keep it pure. `current` (a version already held) saves the first read.
        Returns (written, the document after). A missing document is never written."""
        def step(attempt: int) -> Any:
            item = current if current is not None and attempt == 0 else self.read(request_id)
            if item is None:
                return False, None
            updates = decide(item.doc)
            if not updates:
                return False, item
            new = self.write(item, updates)
            return (True, new) if new is not None else AGAIN
        result: tuple[bool, Versioned | None] = self.client().cas(step, attempts=attempts, pause_s=0.005,
                                                                  max_pause_s=0.2, what=request_id)
        return result

    def claim(self, request_id: str, *, owner: str, lease_s: float, states: Collection[str] = (STARTED,),
              at: datetime | None = None, updates: Doc | None = None,
              current: Versioned | None = None) -> Versioned | None:
        """Take the document's lease if it is in one of `states` and nobody else holds a live lease.
        Returns the document (with the lease) or None when it was not claimed."""
        t = at or now()

        def decide(doc: Doc) -> Doc | None:
            return lease_taken(owner, lease_s, t, updates) if lease_free(doc, owner, states, t) else None
        written, item = self.update(request_id, decide, current=current)
        return item if written else None

    def release(self, request_id: str, *, owner: str, updates: Doc | None = None,
                current: Versioned | None = None) -> Versioned | None:
        """Drop the lease if `owner` still holds it, applying `updates` in the same write."""
        def decide(doc: Doc) -> Doc | None:
            return lease_dropped(now(), updates) if doc.get("leaseOwner") == owner else None
        written, item = self.update(request_id, decide, current=current)
        return item if written else None

    def put_many(self, docs: list[Doc]) -> None:
        """Write whole documents unconditionally, 500 per call (tools, benchmarks and tests seed with it)."""
        fs = self.client()
        for i in range(0, len(docs), 500):
            fs.commit([fs.put(self.collection, doc_id(d["requestId"]), d) for d in docs[i:i + 500]])

    # -- the gates of the datasets (handlers/core/gate.py), written in the same commits as requests ----------
    @property
    def gates(self) -> str:
        return gate_collection(self.collection)

    def create_write(self, request_id: str, doc: Doc) -> Write:
        """A write for commit(): create the request's document (only if it does not exist)."""
        return self.client().create(self.collection, doc_id(request_id), doc)

    def update_write(self, item: Versioned, updates: Doc) -> Write:
        """A write for commit(): apply `updates` only if the document is still at item.version."""
        return self.client().update(self.collection, doc_id(item.request_id), updates, version=item.version)

    def gate_create(self, gate: Gate) -> Write:
        return self.client().create(self.gates, gate_id(gate.dataset), gate.fields())

    def gate_replace(self, gate: Gate, version: str | None) -> Write:
        """Take a gate over: every field replaced, only if it is still at `version`."""
        return self.client().update(self.gates, gate_id(gate.dataset), gate.fields(), version=version)

    def gate_delete(self, dataset: str, version: str | None) -> Write:
        return self.client().delete(self.gates, gate_id(dataset), version=version)

    def commit(self, writes: list[Write]) -> list[str] | None:
        """All `writes` atomically (one round trip): their new versions, or None (nothing written) when a
        precondition failed."""
        try:
            return self.client().commit(writes)
        except Conflict:
            return None

    def read_gate(self, dataset: str) -> Held | None:
        d = self.client().get(self.gates, gate_id(dataset))
        return Held(Gate.of(d.data), d.version) if d is not None else None

    def read_with_gate(self, request_id: str, dataset: str) -> tuple[Versioned | None, Held | None]:
        """A request's document and its dataset's gate, in one round trip."""
        d, g = self.client().get_all([(self.collection, doc_id(request_id)), (self.gates, gate_id(dataset))])
        return (Versioned(d.data, d.version) if d is not None else None,
                Held(Gate.of(g.data), g.version) if g is not None else None)

    def claimed(self, operations: list[str]) -> set[str]:
        """Those of `operations` that a ledger document records (a query per 30: Firestore's `in` limit)."""
        out: set[str] = set()
        for i in range(0, len(operations), 30):
            docs = self.client().query(self.collection, where=[("operation", "in", operations[i:i + 30])],
                                       select=["operation"])
            out |= {str(d.data.get("operation")) for d in docs}
        return out

    # -- queries ---------------------------------------------------------------------------------
    def due(self, *, limit: int = 50, at: datetime | None = None, state: str = STARTED) -> list[Doc]:
        """Documents in `state` whose nextPollAt has come, oldest first. Needs the composite index
        (state, nextPollAt) that deploy.sh creates."""
        return [v.doc for v in self.due_page(limit=limit, at=at, state=state)[0]]

    def in_state(self, state: str, *, limit: int = 50, **equals: Any) -> list[Doc]:
        """Documents in `state` whose fields equal `equals` (equality filters need no composite index)."""
        where = [("state", "==", state), *((k, "==", v) for k, v in equals.items())]
        return [d.data for d in self.client().query(self.collection, where=where, limit=limit)]

    def find_by_operation(self, operation: str) -> Doc | None:
        for d in self.client().query(self.collection, where=[("operation", "==", operation)], limit=1):
            return d.data
        return None

    # -- many documents per round trip (the poller) --------------------------------------------------
    # The poller reads a page with one query, then writes the page with one batchWrite in which each
    # write is applied only if its document is still the version that was read: a compare-and-set
    # per document. batchWrite is not atomic: each document succeeds or fails alone.
    def due_page(self, *, limit: int, at: datetime | None = None, state: str = STARTED,
                 fields: tuple[str, ...] | None = None, cursor: Stored | None = None) -> tuple[list[Versioned], Stored | None]:
        """One page of due() with each document's version. Pass the returned cursor back for the next
        page: ties on nextPollAt are ordered by document id, so none is skipped. `fields` reads only
        those fields (a projection). The cursor is None after the last page."""
        select = sorted({*fields, "requestId", "state", "nextPollAt", "leaseOwner", "leaseUntil"}) if fields else None
        docs = self.client().query(self.collection, where=[("state", "==", state), ("nextPollAt", "<=", at or now())],
                                   order_by=["nextPollAt"], select=select, limit=limit, start_after=cursor)
        return [Versioned(d.data, d.version) for d in docs], (docs[-1] if len(docs) == limit else None)

    def write_if_unchanged(self, writes: list[tuple[str, str | None, Doc]]) -> dict[str, str | None]:
        """Apply each (request_id, version, updates) only if the document is still at `version`, in
        batchWrite calls of up to 500. Returns {request_id: its new version, or None if not written}."""
        fs, out = self.client(), dict[str, str | None]()
        for i in range(0, len(writes), 500):
            chunk = writes[i:i + 500]
            results = fs.batch_write([fs.update(self.collection, doc_id(rid), updates, version=version)
                                      for rid, version, updates in chunk])
            for (rid, _, _), version in zip(chunk, results):
                out[rid] = version
        return out

    def claim_many(self, items: list[Versioned], *, owner: str, lease_s: float, states: Collection[str] = (STARTED,),
                   at: datetime | None = None, updates: Doc | None = None) -> list[Versioned]:
        """claim() for a page read by due_page(): take the lease of each document that is in `states`
        with no live lease of another owner and still at the version read. Returns those claimed, with
        the lease applied and their new versions."""
        t = at or now()

        lease = lease_taken(owner, lease_s, t, updates)
        candidates = [v for v in items if lease_free(v.doc, owner, states, t)]
        written = self.write_if_unchanged([(v.request_id, v.version, lease) for v in candidates])
        return [Versioned(apply_updates(v.doc, lease), written[v.request_id])
                for v in candidates if written.get(v.request_id)]

    def release_many(self, items: list[tuple[str, str | None, Doc]]) -> dict[str, str | None]:
        """release() for documents claimed by claim_many(): drop the lease and apply the updates, each only
        if the document is still at the version our claim wrote (so still ours)."""
        t = now()
        return self.write_if_unchanged([
            (rid, version, lease_dropped(t, updates))
            for rid, version, updates in items])
