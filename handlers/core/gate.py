"""The gate: at most one export call of this service in flight per Healthcare dataset (docs/design.md,
"The intake"; the document: docs/contract.md, "The gate document"). Pure.

A gate document exists only while a request holds it. It is created (or taken over) in the same
Firestore commit that puts the request in STARTING, and deleted in the same commit that records the
request's operation or its failure. While it exists no other export call of this service is made on
the dataset, so every export operation created since the gate's `acquiredAt` (minus the clock skew)
that no ledger document claims belongs to the holder: a recovery has at most one candidate.

A holder that dies keeps the gate until its lease ends. Then the holder's own redelivery (`MINE`) or
the next request of the dataset (`ABANDONED`) resolves the holder's call: its one operation is
recorded on its document, or the document says no call is in flight (RECEIVED); in the same commit
the gate passes to the one who resolved it. Taking a gate never waits for a holder that may be alive.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from typing import Iterable, NamedTuple
from urllib.parse import quote

from .events import parse_time
from .ledger import DELETE, RECEIVED, STARTING, Doc, lease_dropped

GATES_SUFFIX = "-gates"
CLOCK_SKEW = timedelta(seconds=60)  # tolerance between our clock and the API's createTime
EXPORT_METHOD = "ExportDicomData"

# What a delivery finds at the gate of its request's dataset (judge()).
FREE = "FREE"            # no gate: create it
MINE = "MINE"            # held for this very request (an earlier delivery of it stopped): keep it, recover
HELD = "HELD"            # another request's holder may be in its export call: wait, never export
ABANDONED = "ABANDONED"  # another request's holder lost its lease: resolve its call, then take the gate

# What the document of an abandoned gate's holder says (holder_verdict()).
RECOVER = "RECOVER"  # STARTING under this gate, nobody working on it: list its operation, record it
BUSY = "BUSY"        # a delivery of the holder has a live lease on it (it recovers itself): wait
STALE = "STALE"      # the document does not hold this gate (gone, or moved on): take the gate as it is


class Gate(NamedTuple):
    dataset: str
    holder: str             # the holder's requestId
    owner: str              # the delivery holding it (the holder document's leaseOwner)
    lease_until: datetime   # the holder document's leaseUntil, written in the same commit
    acquired_at: datetime   # since when no other export call of ours can have started on the dataset

    def fields(self) -> Doc:
        return {"dataset": self.dataset, "holder": self.holder, "owner": self.owner,
                "leaseUntil": self.lease_until, "acquiredAt": self.acquired_at}

    @classmethod
    def of(cls, d: Doc) -> Gate:
        return cls(d["dataset"], d["holder"], d["owner"], d["leaseUntil"], d["acquiredAt"])


class Held(NamedTuple):
    """A gate as read or written, with its version (Firestore's updateTime)."""
    gate: Gate
    version: str | None


class InvariantBroken(Exception):
    """More than one unclaimed export operation under one gate: something outside this service (or a
    call of ours the API finished after we gave up on it) exported from the dataset."""


def collection(ledger_collection: str) -> str:
    return ledger_collection + GATES_SUFFIX


def gate_id(dataset: str) -> str:
    """The document id of a dataset's gate: the resource name percent-escaped (injective, no '/')."""
    return quote(dataset, safe="")


def judge(gate: Gate | None, request_id: str, t: datetime) -> str:
    if gate is None:
        return FREE
    if gate.holder == request_id:
        return MINE
    return HELD if gate.lease_until > t else ABANDONED


def holder_verdict(holder: Doc | None, gate: Gate, t: datetime) -> str:
    if holder is None or holder.get("state") != STARTING or holder.get("gateAcquiredAt") != gate.acquired_at:
        return STALE
    lease = holder.get("leaseUntil")
    return BUSY if lease is not None and lease > t else RECOVER


def window_start(doc: Doc, t: datetime) -> datetime:
    """Since when a request's export call may have been made: the gate it holds since (for a STARTING
    document written before gates, its first attempt); `t` for a request with no call in flight."""
    if doc.get("state") != STARTING:
        return t
    since = doc.get("gateAcquiredAt") or doc.get("firstAttemptAt") or doc.get("lastAttemptAt")
    return since if isinstance(since, datetime) else t


def candidates(ops: Iterable[Doc], acquired_at: datetime) -> list[Doc]:
    """The export operations among `ops` that may have been started under a gate acquired at `acquired_at`."""
    since = acquired_at - CLOCK_SKEW
    out = []
    for op in ops:
        meta = op.get("metadata") or {}
        created = parse_time(meta.get("createTime"))
        if EXPORT_METHOD in str(meta.get("apiMethodName", "")) and created is not None and created >= since:
            out.append(op)
    return out


def sole(unclaimed: list[Doc], gate: Gate) -> Doc | None:
    """The holder's operation: the one unclaimed candidate, or None when its call had not started."""
    if len(unclaimed) > 1:
        names = ", ".join(str(op.get("name")) for op in unclaimed[:5])
        raise InvariantBroken(
            f"invariant broken: one export call per dataset at a time, yet {len(unclaimed)} unclaimed export "
            f"operations on {gate.dataset} since the gate was acquired for {gate.holder} ({names}); something "
            "else exported from this dataset meanwhile. Not exporting again: check the operations")
    return unclaimed[0] if unclaimed else None


def no_call(t: datetime) -> Doc:
    """The updates for a holder whose call never started: no call in flight, its lease and gate gone
    (a redelivery makes a new attempt)."""
    return lease_dropped(t, {"state": RECEIVED, "gateAcquiredAt": DELETE})


def attempt(doc: Doc, *, owner: str, lease_until: datetime, acquired_at: datetime, t: datetime) -> Doc:
    """The updates of a request's document that take its dataset's gate for an export call: STARTING,
    one more attempt, under `owner`'s lease (the gate's own)."""
    out: Doc = {"state": STARTING, "lastAttemptAt": t, "attempts": int(doc.get("attempts") or 0) + 1,
                "gateAcquiredAt": acquired_at, "leaseOwner": owner, "leaseUntil": lease_until, "updatedAt": t}
    if not doc.get("firstAttemptAt"):
        out["firstAttemptAt"] = t
    if "recoveringBy" in doc:
        out["recoveringBy"] = DELETE  # written before gates
    return out
