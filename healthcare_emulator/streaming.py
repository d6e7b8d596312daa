"""Streaming to BigQuery: `streamConfigs[].bigqueryDestination` of a DICOM store.

Every instance stored in a store (STOW-RS, or `dicomStores.import`) is appended as one row to the table of
each of the store's stream configs, in the same schema and with the same mapping as an export
(`dicom_bq`: the flattened layout, or the JSON layout when the config sets `schemaJson`;
`SourceDicomStore` when `includeSourceStore` is true). As documented for the real service:

- the table is created in the given BigQuery dataset if it does not exist; the dataset must exist;
- the table's schema is widened when an instance brings new columns (additive, like an export's
  WRITE_APPEND: a value that does not fit an existing column is coerced into it, as in an export);
- instance deletions are not applied: a deleted instance's row stays;
- a config added later streams the instances stored after it; a config removed stops streaming.

How, and the choices where the documentation is silent:

- `__call__` runs on the request's thread after the instance is committed: it reads the store's
  configuration (one indexed SQLite read) and queues (store, SOP Instance UID, destinations). Nothing else
  happens there, so streaming never slows down, blocks or fails a STOW.
- One background thread takes everything queued (up to 500 instances), reads each header from the stored
  file, maps it, and appends one batch per destination table in one warehouse commit. So a row is in its
  table as soon as its batch commits (milliseconds to a few hundred after the STOW on this machine; see
  `bench/emulator_import.py`).
- Errors never reach the caller: a missing BigQuery dataset, an instance deleted before its turn, a
  file that cannot be read, a table whose schema cannot take the row. Each is logged by the emulator
  (logger `healthcare_emulator.streaming`, WARNING, naming the table and the instance) and the batch's
  other rows are still written when they can be; the rest of the queue goes on.
- `writeDisposition` and `force` of a stream config are accepted and ignored (rows are always appended).
- Each config must name a distinct table (the API's "Each config must contain a unique destination"):
  two configs with the same `tableUri` are a 400 naming `stream_configs[i].bigquery_destination.table_uri`.
- Instances queued but not yet written when the emulator stops are not streamed after a restart (the
  queue lives in memory); everything committed to a table stays.
"""
from __future__ import annotations

import logging
import queue
import threading
from datetime import datetime

from .errors import invalid

log = logging.getLogger("healthcare_emulator.streaming")

MAX_BATCH = 500
MAX_QUEUED = 100_000  # beyond this, instances are not streamed (and that is logged) rather than let memory grow
STREAMED_ACTIONS = ("StoreInstances", "ImportDicomData")


def check_configs(configs: list) -> None:
    """400 for a stream config whose table URI breaks BigQuery's naming rules, or names a table twice."""
    from .export import parse_table_uri
    seen: dict[tuple, int] = {}
    for i, sc in enumerate(configs or []):
        field = f"stream_configs[{i}].bigquery_destination.table_uri"
        dest = sc.get("bigqueryDestination")
        if not dest:
            raise invalid(f"stream_configs[{i}].bigquery_destination is required", field)
        key = parse_table_uri(dest.get("tableUri", ""), field)
        if key in seen:
            raise invalid(f"{field}: {dest['tableUri']} is already the destination of stream_configs[{seen[key]}]; "
                          "each config must contain a unique destination", field)
        seen[key] = i
        if "schemaFlattened" in dest and "schemaJson" in dest:
            raise invalid(f"stream_configs[{i}].bigquery_destination: only one of schemaFlattened and schemaJson "
                          "may be set", f"stream_configs[{i}].bigquery_destination")


class Streamer:
    def __init__(self, app):
        self.app = app
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def __call__(self, store: str, action: str, instance: dict) -> None:
        if action not in STREAMED_ACTIONS:
            return
        resource = self.app.state.get_json("stores", store)
        dests = [sc["bigqueryDestination"] for sc in (resource or {}).get("streamConfigs") or []
                 if (sc.get("bigqueryDestination") or {}).get("tableUri")]
        if not dests:
            return
        if self._queue.qsize() >= MAX_QUEUED:
            log.warning("streaming queue full: instance %s of %s not streamed", instance.get("sop"), store)
            return
        self._ensure_thread()
        self._queue.put((store, instance["sop"], dests))

    def _ensure_thread(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="streaming", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(batch)
            except Exception:  # never let the thread die
                log.exception("streaming %d instance(s) failed", len(batch))

    def _write(self, batch: list[tuple[str, str, list]]) -> None:
        # (table URI, layout, source store or None) -> [(store, sop)] in arrival order
        groups: dict[tuple, list[tuple[str, str]]] = {}
        for store, sop, dests in batch:
            for d in dests:
                key = (d["tableUri"], "schemaJson" in d, store if d.get("includeSourceStore") else None)
                groups.setdefault(key, []).append((store, sop))
        for (uri, as_json, source), items in groups.items():
            try:
                self._append(uri, as_json, source, items)
            except Exception as e:
                log.warning("streaming to %s failed for %d instance(s) (first %s): %s", uri, len(items),
                            items[0][1], getattr(e, "message", None) or f"{type(e).__name__}: {e}")

    def _append(self, uri: str, as_json: bool, source: str | None, items: list[tuple[str, str]]) -> None:
        from . import dicom_bq
        from .export import parse_table_uri

        project, dataset, table = parse_table_uri(uri)
        db = self.app.state.db()
        rows, schema = [], (dicom_bq.JSON_SCHEMA(bool(source)) if as_json else [])
        for store, sop in items:
            r = db.execute("SELECT blob, size, stored_at FROM instances WHERE store = ? AND sop = ?",
                           (store, sop)).fetchone()
            if r is None:
                log.warning("streaming to %s: instance %s of %s was deleted before it could be streamed; not "
                            "streamed", uri, sop, store)
                continue
            try:
                ds = dicom_bq.read_header(str(self.app.state.blob_path(r["blob"])))
                if as_json:
                    row, _, _ = dicom_bq.json_row(ds, source_store=source, blob_size=r["size"],
                                                  last_updated=datetime.fromisoformat(
                                                      r["stored_at"].replace("Z", "+00:00")))
                else:
                    row, row_schema, _ = dicom_bq.flattened_row(ds, source_store=source)
                    schema = dicom_bq.union_schemas(schema, row_schema)
            except Exception as e:
                log.warning("streaming to %s: instance %s of %s could not be read (%s); not streamed", uri, sop,
                            store, type(e).__name__)
                continue
            rows.append(row)
        if not rows:
            return
        wh = self.app.operations.warehouse
        existing = wh.get_table(project, dataset, table)
        if existing is not None and not as_json:
            schema = dicom_bq.union_schemas(existing["schema"], schema, prefer="left")
        elif existing is not None:
            schema = existing["schema"]
        rows = [dicom_bq.conform_row(r, schema) for r in rows]
        wh.write_table(project, dataset, table, schema, [rows], if_exists="append")
