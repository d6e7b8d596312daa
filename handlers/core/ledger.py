"""The request ledger's document: one per export request (docs/contract.md, "The ledger document").

Its field names and states are defined here once: `LedgerDoc` lists every field, `EVENT_FIELDS` the
fields an event body is built from (handlers/core/events.py reads only those), and the poller's
`POLL_FIELDS` (the projection its page query reads) is derived from them. The lease rules (who may
work on a document, and the fields that take or drop a lease) live here too. Pure: the Firestore
store of these documents is handlers/adapters/ledger_store.py. Timestamps are aware UTC datetimes.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any, Collection, NamedTuple, TypedDict

from .clock import now

# a request's id, its ledger document's name (docs/contract.md, "Export request")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

__all__ = ["DELETE", "Doc", "LedgerDoc", "Versioned", "apply_updates", "doc_id", "lease_free", "lease_taken",
           "lease_dropped", "now", "dataset_of"]

Doc = dict[str, Any]  # a document as read or written: field name -> value


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


DELETE: Any = _Delete()  # as an update's value: remove the field

# States. Terminal ones are written by the poller (and FAILED also by the intake).
RECEIVED, STARTING, STARTED, REJECTED = "RECEIVED", "STARTING", "STARTED", "REJECTED"
SUCCEEDED, FAILED, CANCELLED, TIMED_OUT = "SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, TIMED_OUT, REJECTED})


class LedgerDoc(TypedDict, total=False):
    """Every field of a ledger document (docs/contract.md, "The ledger document" and "Ledger fields
    the poller adds")."""
    requestId: str
    state: str
    messageId: str
    payloadSha256: str | None
    publishTime: datetime
    receivedAt: datetime
    updatedAt: datetime
    request: Doc | None
    labels: dict[str, str]
    dicomStore: str | None
    hcDataset: str | None
    tableUri: str | None
    filterConfig: Doc | None
    operation: str | None
    apiVersion: str | None
    createTime: str | None
    endTime: str | None
    logsUrl: str | None
    counter: Doc | None
    error: Doc | None
    events: Doc  # {EVENT_TYPE: {"eventId", "data", "attributes", "published", "publishedAt", "messageId"}}
    leaseOwner: str | None
    leaseUntil: datetime | None
    recoveringBy: str  # written before gates (2026-12-02); removed at the next attempt
    gateAcquiredAt: datetime  # in STARTING: the acquiredAt of the dataset's gate it holds (handlers/core/gate.py)
    attempts: int
    firstAttemptAt: datetime
    lastAttemptAt: datetime
    nextPollAt: datetime
    pollInterval: float
    polls: int
    pollErrors: int
    lastPolledAt: datetime
    cancelRequested: bool
    cancelRequestedAt: datetime
    cancelError: Doc


# The fields an event body is built from (handlers/core/events.py build()).
EVENT_FIELDS = ("requestId", "request", "dicomStore", "tableUri", "filterConfig", "labels", "operation", "counter",
                "createTime", "endTime", "logsUrl", "error")
# The fields a poll reads besides those: the poller's page query reads only POLL_FIELDS, not the recorded
# events' bodies, and builds the terminal event from them.
POLL_OWN_FIELDS = ("apiVersion", "firstAttemptAt", "receivedAt", "pollInterval", "polls", "pollErrors")
LEASE_FIELDS = ("leaseOwner", "leaseUntil")

_RESERVED_ID = re.compile(r"^(\.|\.\.|__.*__)$")


def published_field(event_type: str) -> str:
    return f"events.{event_type}.published"


def doc_id(request_id: str) -> str:
    """The document id of a requestId. Injective: ids Firestore forbids ('.', '..', '__x__') are
    percent-escaped, and '%' cannot occur in a requestId ([A-Za-z0-9._:-]) or a message id."""
    if _RESERVED_ID.match(request_id):
        return "".join(f"%{ord(c):02X}" if c in "._" else c for c in request_id)
    return request_id


def apply_updates(doc: Doc, updates: Doc) -> Doc:
    """`doc` with Firestore-style updates applied locally (dotted keys are nested paths)."""
    out: Doc = _deepcopy(doc)
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


def _deepcopy(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _deepcopy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_deepcopy(x) for x in v]
    return v


class Versioned(NamedTuple):
    """A ledger document with its version (Firestore's updateTime), which a conditional write needs."""
    doc: Doc
    version: str | None

    @property
    def request_id(self) -> str:
        return str(self.doc["requestId"])


# -- leases (docs/reliability.md, "Leases: overlapping runs and crashes") ------------------------------------
def lease_free(doc: Doc, owner: str, states: Collection[str], t: datetime) -> bool:
    """Whether `owner` may take the document's lease at `t`: it is in one of `states` and nobody else
    holds a live lease."""
    lease = doc.get("leaseUntil")
    return doc.get("state") in states and (lease is None or lease <= t or doc.get("leaseOwner") == owner)


def lease_taken(owner: str, lease_s: float, t: datetime, updates: Doc | None = None) -> Doc:
    """The updates that give `owner` the lease until `t` + `lease_s` (with `updates` in the same write)."""
    return {"leaseUntil": t + timedelta(seconds=lease_s), "leaseOwner": owner, "updatedAt": t, **(updates or {})}


def lease_dropped(t: datetime, updates: Doc | None = None) -> Doc:
    """The updates that drop the lease (with `updates` in the same write)."""
    return {"leaseUntil": DELETE, "leaseOwner": DELETE, "updatedAt": t, **(updates or {})}


def dataset_of(store: str | None) -> str | None:
    """The Healthcare dataset of a DICOM store's resource name."""
    return store.split("/dicomStores/")[0] if isinstance(store, str) and "/dicomStores/" in store else None
