"""The outbox: record the event, publish it, mark it published (docs/reliability.md, "Crash safety").

An event is first recorded in the ledger document (`events.{TYPE}`: its body and published=False) in the
same write as the state change it announces; then it is published; then its publication is recorded.
A process that dies between two steps leaves the event recorded and unpublished, and whoever finds the
document next publishes the recorded body again: the same eventId and the same bytes, so a consumer can
drop the copy. The intake and the poller both follow it through this module; the ledger writes and the
publisher are passed in (this module does no I/O).
"""
from __future__ import annotations

from datetime import datetime
from typing import Callable, Iterable, Optional, TypeVar

from . import events as ev
from .errors import PublishError
from .ledger import Doc

T = TypeVar("T")
Publish = Callable[[Doc, dict[str, str]], str]


def record(event_type: str, doc_after: Doc, updates: Doc) -> tuple[Doc, Doc]:
    """(the event built from the document as it will be after `updates`, `updates` with the event recorded
    as unpublished): one write records the change and its event together."""
    built = ev.build(event_type, doc_after)
    return built, {**updates, f"events.{event_type}": {**built, "published": False}}


def publication(event_type: str, message_id: str | None, at: datetime) -> Doc:
    """The updates that record the event's publication."""
    return {f"events.{event_type}.published": True, f"events.{event_type}.publishedAt": at,
            f"events.{event_type}.messageId": message_id}


def unpublished(doc: Doc, event_types: Iterable[str | None]) -> list[str]:
    """Of `event_types`, in order, those recorded in `doc` and not known to be published."""
    recorded = doc.get("events") or {}
    return [t for t in event_types if t and t in recorded and not (recorded[t] or {}).get("published")]


def drain(item: T, pending: list[str], recorded: Doc, *, publish: Publish,
          published: Callable[[T, str, Doc, str, bool], Optional[T]],
          failed: Callable[[T, str, PublishError], None]) -> Optional[T]:
    """Publish each pending event (`recorded[type]` holds its body) in order. After each publication
    `published(item, type, event, message_id, last)` records it and returns the item to go on with (None:
    stop, the lease was lost); a failed publish calls `failed(item, type, error)` and stops."""
    for i, event_type in enumerate(pending):
        event = recorded[event_type]
        try:
            message_id = publish(event["data"], event["attributes"])
        except PublishError as e:
            failed(item, event_type, e)
            return None
        new = published(item, event_type, event, message_id, i == len(pending) - 1)
        if new is None:
            return None
        item = new
    return item
