"""The export engine: a DICOM store's instances -> rows in a warehouse table, apart from HTTP.

An export reads the selected instances' headers (never pixel data) and maps each to a row
(dicom_bq, pure), in chunks spread over worker processes (mapper.py) that spill the rows to temp
files while the schema's union grows; then the chunks stream, conformed to the final schema where
it differs from theirs, into the warehouse, which commits atomically.
A failed or cancelled export therefore leaves the destination table exactly as it was.

operations.py owns the operation (its record, counter, logs and cancel flag) and calls `run`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from .errors import ApiError, invalid

PROJECT_RE = re.compile(r"^(?:[a-z][a-z0-9.\-]*[a-z0-9]:)?[a-z][a-z0-9\-]{4,28}[a-z0-9]$")
DATASET_RE = re.compile(r"^[A-Za-z0-9_]{1,1024}$")
TABLE_RE = re.compile(r"^[\w\- ]{1,1024}$")  # letters, marks, numbers, connectors, dashes, spaces
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._\-]{1,220}[a-z0-9]$")
FILTER_LINE = re.compile(r"^/studies/([0-9.]{1,64})(?:/series/([0-9.]{1,64})(?:/instances/([0-9.]{1,64}))?)?$")
CHUNK = 250  # instances a worker maps at a time
PAGE = 1000
KEY_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


class Cancelled(Exception):
    pass


# -- the request's destination and filter -------------------------------------------------------
def parse_table_uri(uri: str, field: str = "bigquery_destination.table_uri") -> tuple[str, str, str]:
    """bq://PROJECT.DATASET.TABLE, split with rsplit('.', 2) so domain-scoped projects work."""
    if not isinstance(uri, str) or not uri:
        raise invalid(f"{field} is required and must be of the form bq://PROJECT.DATASET.TABLE", field)
    if len(uri) > 2000:
        raise invalid(f"{field} is longer than 2000 characters", field)
    if not uri.startswith("bq://"):
        raise invalid(f"{field} {uri!r} must start with bq:// (bq://PROJECT.DATASET.TABLE)", field)
    parts = uri[5:].rsplit(".", 2)
    if len(parts) != 3 or not all(parts):
        raise invalid(f"{field} {uri!r} must be of the form bq://PROJECT.DATASET.TABLE", field)
    project, dataset, table = parts
    if not PROJECT_RE.match(project):
        raise invalid(f"{field}: invalid project ID {project!r}", field)
    if not DATASET_RE.match(dataset):
        raise invalid(f"{field}: invalid dataset ID {dataset!r}: only letters, digits and underscores", field)
    if not TABLE_RE.match(table) or table.strip() != table:
        raise invalid(f"{field}: invalid table ID {table!r}", field)
    return project, dataset, table


def parse_gcs_uri(uri: str, field: str = "filter_config.resource_paths_gcs_uri") -> tuple[str, str]:
    m = re.match(r"^gs://([^/]+)/(.+)$", uri or "")
    if not m or not BUCKET_RE.match(m.group(1)) or ".." in m.group(1):
        raise invalid(f"{field} {uri!r} must be of the form gs://BUCKET/OBJECT", field)
    return m.group(1), m.group(2)


def if_exists_for(dest: dict) -> str:
    wd = dest.get("writeDisposition", "WRITE_DISPOSITION_UNSPECIFIED")
    if wd == "WRITE_TRUNCATE":
        return "truncate"
    if wd == "WRITE_APPEND":
        return "append"
    if wd == "WRITE_EMPTY":
        return "error_if_nonempty"
    if "force" in dest:  # writeDisposition unspecified: force decides (deprecated field)
        return "truncate" if dest["force"] else "error"
    return "error_if_nonempty"  # neither: WRITE_DISPOSITION_UNSPECIFIED behaves as WRITE_EMPTY


def counter(success: int, failure: int, pending: int) -> dict:
    """metadata.counter: int64 as strings; failure only when non-zero, pending only while running."""
    c = {"success": str(success)}
    if failure:
        c["failure"] = str(failure)
    if pending:
        c["pending"] = str(pending)
    return c


def read_gcs_object(bucket: str, obj: str) -> bytes:
    """Read a filter file through google-cloud-storage (STORAGE_EMULATOR_HOST locally)."""
    if not os.environ.get("STORAGE_EMULATOR_HOST"):
        raise ApiError("FAILED_PRECONDITION", f"Cannot read gs://{bucket}/{obj}: the emulator has no Cloud Storage "
                                              "endpoint; set STORAGE_EMULATOR_HOST.")
    from google.api_core import exceptions as gexc
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="emulator", credentials=AnonymousCredentials())
    try:
        return client.bucket(bucket).blob(obj).download_as_bytes()
    except gexc.NotFound:
        raise ApiError("NOT_FOUND", f"Failed to read filter file gs://{bucket}/{obj}: the bucket or object does "
                                    "not exist, or the Cloud Healthcare Service Agent lacks "
                                    "roles/storage.objectViewer on it.") from None
    except gexc.GoogleAPIError as e:
        raise ApiError("FAILED_PRECONDITION", f"Failed to read filter file gs://{bucket}/{obj}: {e}") from None


def filter_lines(uri: str) -> list[tuple[int, str]]:
    """(line number, resource path) of the filter file's non-blank lines; a malformed line is a 400."""
    bucket, obj = parse_gcs_uri(uri)
    data = read_gcs_object(bucket, obj)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(f"filter file {uri} is not UTF-8 text", "filter_config.resource_paths_gcs_uri") from None
    lines = []
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if not FILTER_LINE.match(line):
            raise invalid(f"filter file {uri}, line {i}: {line[:200]!r} is not a resource path of the form "
                          "/studies/UID[/series/UID[/instances/UID]]", "filter_config.resource_paths_gcs_uri")
        lines.append((i, line))
    return lines


# -- worker processes ---------------------------------------------------------------------------
class Workers:
    """The process pool for the export's CPU-bound first pass, made on first use and shared by exports."""

    def __init__(self, count: int | None):
        self.count = count
        self._pool = None
        self._lock = threading.Lock()

    def get(self):
        """The pool, or None: map in the export thread."""
        workers = self.count
        if workers is None:
            workers = os.cpu_count() or 1
        if workers <= 1:
            return None
        with self._lock:
            if self._pool is None:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor
                self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
            return self._pool


# -- one export ---------------------------------------------------------------------------------
class Destination(NamedTuple):
    uri: str
    project: str
    dataset: str
    table: str
    if_exists: str       # truncate | append | error | error_if_nonempty
    as_json: bool        # the schemaJson layout (else flattened)
    source: str | None   # SourceDicomStore's value, when includeSourceStore


class Part(NamedTuple):
    """One mapped chunk: its spill file, the schema its rows were made against, a conflict inside it."""
    path: str
    schema: list
    conflict: bool


@dataclass(slots=True)
class Job:
    """What one export needs from its operation, and its counts so far."""
    name: str
    store: str
    body: dict
    spill: Path
    state: object                        # state.State
    warehouse: object                    # warehouse.Warehouse
    cancel: threading.Event
    rate: float                          # instances per second; 0 = full speed
    pool: object                         # a ProcessPoolExecutor, or None
    log_many: Callable[[str, list], None]
    set_counter: Callable[[dict], None]
    # (project, dataset, table exists) -> None, or raises PERMISSION_DENIED (iam_api.check_export, --enforce-iam)
    authorize: Callable[[str, str, bool], None] | None = None
    success: int = 0
    failure: int = 0
    total: int = 0
    schema: list = field(default_factory=list)
    parts: list = field(default_factory=list)
    schemas: dict = field(default_factory=dict)  # chunk schemas, one object per distinct schema

    def progress(self) -> None:
        pending = max(self.total - self.success - self.failure, 0)
        self.set_counter(counter(self.success, self.failure, pending))

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled()


def destination(job: Job) -> Destination:
    dest = job.body["bigqueryDestination"]
    project, dataset, table = parse_table_uri(dest["tableUri"])
    source = job.store if dest.get("includeSourceStore") else None
    return Destination(dest["tableUri"], project, dataset, table, if_exists_for(dest), "schemaJson" in dest, source)


def check_destination(wh, d: Destination):
    """The destination table as it is (None: missing); fails fast on a missing dataset or a disposition error."""
    wh.get_dataset(d.project, d.dataset)  # a missing dataset fails here, before any work
    existing = wh.get_table(d.project, d.dataset, d.table)
    if existing is not None:
        if d.if_exists == "error":
            raise ApiError("ALREADY_EXISTS", f"Destination table {d.uri} already exists and force "
                                             "is false; set force or a writeDisposition.")
        if d.if_exists == "error_if_nonempty" and existing.get("numRows", 0) > 0:
            raise ApiError("FAILED_PRECONDITION", f"Destination table {d.uri} is not empty; "
                                                  "WRITE_EMPTY only exports into an empty table.")
    return existing


def _store_rows(db, store: str) -> Iterator:
    cols = "blob, size, stored_at, study, series, sop"
    last = ""
    while True:
        rows = db.execute(f"SELECT {cols} FROM instances WHERE store = ? AND sop > ? ORDER BY sop LIMIT ?",
                          (store, last, PAGE)).fetchall()
        yield from rows
        if len(rows) < PAGE:
            return
        last = rows[-1]["sop"]


def _path_rows(db, store: str, path: str) -> Iterator:
    study, series, sop = FILTER_LINE.match(path).groups()
    q, params = "SELECT blob, size, stored_at, study, series, sop FROM instances WHERE store = ? AND study = ?", \
        [store, study]
    if series:
        q += " AND series = ?"
        params.append(series)
    if sop:
        q += " AND sop = ?"
        params.append(sop)
    last = ""
    while True:
        rows = db.execute(q + " AND sop > ? ORDER BY sop LIMIT ?", (*params, last, PAGE)).fetchall()
        yield from rows
        if len(rows) < PAGE:
            return
        last = rows[-1]["sop"]


def _filtered_rows(job: Job, uri: str) -> Iterator:
    """The filter file's instances, each once; None for a line that names nothing (logged, a failure)."""
    db = job.state.db()
    seen: set[str] = set()
    for lineno, path in filter_lines(uri):
        found = False
        for r in _path_rows(db, job.store, path):
            found = True
            if r["sop"] not in seen:
                seen.add(r["sop"])
                yield r
        if not found:
            job.log_many(job.name, [("ERROR", f"{job.store}/dicomWeb{path}", 5,
                                     f"filter line {lineno}: resource path {path} matches no instance in the store")])
            yield None  # counted as a failure


def select(job: Job):
    """Rows (blob, size, stored_at, study, series, sop) of the instances the request selects; sets job.total."""
    flt = job.body.get("filterConfig", {}).get("resourcePathsGcsUri")
    if job.body.get("filterConfig"):
        selected = list(_filtered_rows(job, flt) if flt else _store_rows(job.state.db(), job.store))
        job.total = len(selected)
        return selected
    job.total = job.state.db().execute("SELECT COUNT(*) FROM instances WHERE store = ?",
                                       (job.store,)).fetchone()[0]
    return _store_rows(job.state.db(), job.store)


def chunks(job: Job, selected, size: int) -> Iterator[list[tuple]]:
    """Chunks of (blob path, size, stored_at, resource); a filter path naming nothing is a failure."""
    chunk = []
    for r in selected:
        if r is None:
            job.failure += 1
            continue
        chunk.append((str(job.state.blob_path(r["blob"])), r["size"], r["stored_at"],
                      f"{job.store}/dicomWeb/studies/{r['study']}/series/{r['series']}/instances/{r['sop']}"))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def collect(job: Job, d: Destination, spill_path: str, result: dict) -> None:
    """Count, log and keep one mapped chunk; the schema's union grows with it."""
    from . import dicom_bq

    job.success += result["success"]
    job.failure += len(result["failed"])
    job.log_many(job.name, [("ERROR", res, 3, msg) for res, msg in result["failed"]] +
                 [("WARNING", res, 3, msg) for res, msg in result["issues"]])
    if not d.as_json:
        job.schema = dicom_bq.union_schemas(job.schema, result["schema"])
    # Chunks of a store mostly share a few schemas: keep one object per distinct schema, so what is kept
    # per chunk is a path and a reference (memory does not grow with the store's size).
    key = json.dumps(result["schema"], sort_keys=True)
    chunk_schema = job.schemas.setdefault(hashlib.sha256(key.encode()).digest(), result["schema"])
    if result["success"]:  # a chunk with no row spilled nothing
        job.parts.append(Part(spill_path, chunk_schema, result["conflict"]))
    job.progress()


def map_all(job: Job, d: Destination, selected) -> None:
    """The first pass: every chunk mapped (in worker processes when there is a pool) and collected."""
    from . import mapper

    in_flight: list = []
    try:
        for i, chunk in enumerate(chunks(job, selected, 1 if job.rate else CHUNK)):
            job.check_cancel()
            if job.rate and job.cancel.wait(1.0 / job.rate):
                raise Cancelled()
            path = f"{job.spill}.{i}"
            if job.pool is None:
                collect(job, d, path, mapper.map_chunk(chunk, path, d.as_json, d.source))
                continue
            in_flight.append((path, job.pool.submit(mapper.map_chunk, chunk, path, d.as_json, d.source)))
            while len(in_flight) >= 2 * (os.cpu_count() or 2):  # bounded: memory does not grow with the store
                p, fut = in_flight.pop(0)
                collect(job, d, p, fut.result())
        while in_flight:
            job.check_cancel()
            p, fut = in_flight.pop(0)
            collect(job, d, p, fut.result())
    finally:
        for _, fut in in_flight:
            fut.cancel()


def final_schema(job: Job, d: Destination, existing) -> list:
    """Nothing exported: keep the table's columns, or create it with the key columns; WRITE_APPEND widens."""
    from . import dicom_bq

    schema = job.schema
    if not schema:
        schema = existing["schema"] if existing is not None else [
            {"name": k, "type": "STRING", "mode": "NULLABLE"} for k in KEY_COLUMNS]
    if existing is not None and d.if_exists == "append" and not d.as_json:
        schema = dicom_bq.union_schemas(existing["schema"], schema, prefer="left")
    return schema


def batches(parts: list[Part], schema: list, as_json: bool) -> Iterator:
    """The spilled chunks in the final schema: Arrow batches re-shaped column by column (new columns NULL)
    when their chunk's schema fits the final one, else (a type conflict) Python rows conformed to it."""
    from . import dicom_bq, mapper
    from .warehouse import conform_batch, normalize_schema

    final = normalize_schema(schema)
    normalized: dict[int, list] = {}
    for part in parts:
        if as_json or not (part.conflict or not mapper.fits(schema, part.schema)):
            chunk = normalized.get(id(part.schema))
            if chunk is None:
                chunk = normalized[id(part.schema)] = normalize_schema(part.schema)
            for b in mapper.load_batches(part.path):
                yield conform_batch(b, chunk, final)
        else:
            yield [dicom_bq.conform_row(r, schema) for r in mapper.load_chunk(part.path)]
        os.unlink(part.path)


def commit(job: Job, d: Destination, schema: list) -> None:
    from .warehouse import WarehouseError

    try:
        job.warehouse.write_table(d.project, d.dataset, d.table, schema, batches(job.parts, schema, d.as_json),
                                  if_exists=d.if_exists, cancelled=job.cancel.is_set)
    except WarehouseError as e:
        if e.code == "CANCELLED":
            raise Cancelled() from None
        raise ApiError(e.code if e.code in ("NOT_FOUND", "ALREADY_EXISTS", "INVALID_ARGUMENT",
                                            "FAILED_PRECONDITION") else "INTERNAL", e.message) from None


def run(job: Job) -> tuple[int, int]:
    """Export, commit, and return (success, failure); raises Cancelled, ApiError or the warehouse's errors."""
    from . import dicom_bq

    d = destination(job)
    existing = check_destination(job.warehouse, d)
    if job.authorize is not None:
        job.authorize(d.project, d.dataset, existing is not None)
    selected = select(job)
    job.schema = dicom_bq.JSON_SCHEMA(bool(d.source)) if d.as_json else []
    job.progress()
    map_all(job, d, selected)
    commit(job, d, final_schema(job, d, existing))
    return job.success, job.failure
