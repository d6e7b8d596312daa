"""Firestore adapter of reconcile_tables: one document per route (`C-reconcile`, id = the route key) holding
the cursor where the next run goes on and the last run's TABLE_RECONCILED event (recorded, then published).
Writes go through the ingest ledger's compare-and-set engine."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from handlers.core.clock import now

from .batch_store import IngestLedger


class ReconcileState(IngestLedger):
    @property
    def RECONCILE(self) -> str:
        return f"{self.prefix}-reconcile"

    @staticmethod
    def now() -> datetime:
        return now()

    def get(self, key: str) -> dict[str, Any] | None:
        return self._get(self.RECONCILE, key)

    def save(self, key: str, updates: dict[str, Any], *, if_event: str | None = None) -> bool:
        """Set `updates` (field paths) on the route's document, creating it if need be; with `if_event`, only
        while the recorded TABLE_RECONCILED event is that one (a later run may have recorded its own)."""
        ref = (self.RECONCILE, key)

        def decide(doc: dict[str, Any] | None) -> list[tuple[tuple[str, str], str, dict[str, Any]]] | None:
            if if_event is not None and ((doc or {}).get("events") or {}).get(
                    "TABLE_RECONCILED", {}).get("eventId") != if_event:
                return None
            return [(ref, "update", updates)] if doc is not None else [(ref, "create", _nested(updates))]
        return self.client().cas_many([ref], decide)


def _nested(updates: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in updates.items():
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out
