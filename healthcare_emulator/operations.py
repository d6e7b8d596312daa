"""Long-running operations, and the export that runs inside one.

An export reads the selected instances' headers (never pixel data) and maps each to a row
(dicom_bq, pure), in chunks spread over worker processes (mapper.py) that spill the rows to temp
files while the schema's union grows; then the chunks stream, conformed to the final schema where
it differs from theirs, into the warehouse, which commits atomically.
A failed or cancelled export therefore leaves the destination table exactly as it was.
"""
from __future__ import annotations

import json
import os
import random
import re
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from werkzeug.wrappers import Request, Response

from . import messages
from .errors import ApiError, invalid, not_found

PROJECT_RE = re.compile(r"^(?:[a-z][a-z0-9.\-]*[a-z0-9]:)?[a-z][a-z0-9\-]{4,28}[a-z0-9]$")
DATASET_RE = re.compile(r"^[A-Za-z0-9_]{1,1024}$")
TABLE_RE = re.compile(r"^[\w\- ]{1,1024}$")  # letters, marks, numbers, connectors, dashes, spaces
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._\-]{1,220}[a-z0-9]$")
FILTER_LINE = re.compile(r"^/studies/([0-9.]{1,64})(?:/series/([0-9.]{1,64})(?:/instances/([0-9.]{1,64}))?)?$")
CHUNK = 250  # instances a worker maps at a time
PAGE = 1000


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


class Cancelled(Exception):
    pass


def now() -> str:
    from .server import now_rfc3339
    return now_rfc3339()


class Operations:
    def __init__(self, app):
        self.app = app
        self.state = app.state
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="export")
        self._cancel_events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._warehouse = None
        self._workers = None
        for f in self.state.tmp_dir.glob("*.spill*"):
            f.unlink()
        # Exports that were running when the server stopped start again: nothing was committed.
        for row in self.state.db().execute("SELECT name FROM operations WHERE done = 0 ORDER BY seq"):
            self._submit(row["name"])

    @property
    def warehouse(self):
        if self._warehouse is None:
            from .warehouse import Warehouse
            self._warehouse = Warehouse(self.state.root / "bigquery")
        return self._warehouse

    # -- bookkeeping ---------------------------------------------------------------------------
    def _new_name(self, dataset: str) -> str:
        return f"{dataset}/operations/{secrets.randbits(62) | (1 << 62)}"

    def _insert(self, name: str, dataset: str, body: dict, request: dict) -> None:
        with self.state.tx() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM operations").fetchone()[0]
            db.execute("INSERT INTO operations (name, dataset, seq, done, body, request) VALUES (?, ?, ?, ?, ?, ?)",
                       (name, dataset, seq, int(body.get("done", False)), json.dumps(body), json.dumps(request)))

    def get(self, name: str) -> dict:
        row = self.state.db().execute("SELECT body FROM operations WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise not_found(f"operation not found: {name}")
        return json.loads(row["body"])

    def _update(self, name: str, fn) -> dict:
        with self.state.tx() as db:
            row = db.execute("SELECT body FROM operations WHERE name = ?", (name,)).fetchone()
            body = json.loads(row["body"])
            fn(body)
            db.execute("UPDATE operations SET body = ?, done = ? WHERE name = ?",
                       (json.dumps(body), int(body.get("done", False)), name))
        with self._changed:
            self._changed.notify_all()
        return body

    def wait(self, name: str, timeout: float) -> dict:
        """Block until the operation is done or `timeout` passes (emulator-only, for tests and tools)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                op = self.get(name)
                left = deadline - time.monotonic()
                if op.get("done") or left <= 0:
                    return op
                self._changed.wait(left)

    def finished(self, resource: str, version: str, method: str, response: dict) -> dict:
        """An operation that is done at once (datasets.create)."""
        dataset = resource if "/dicomStores/" not in resource else resource.split("/dicomStores/")[0]
        name = self._new_name(dataset)
        t = now()
        body = {"name": name,
                "metadata": {"@type": f"type.googleapis.com/google.cloud.healthcare.{version}.OperationMetadata",
                             "apiMethodName": method.format(v=version), "createTime": t, "endTime": t,
                             "counter": {}},
                "done": True, "response": response}
        self._insert(name, dataset, body, {"kind": "done"})
        return body

    def log(self, op: str, severity: str, resource: str, code: int, message: str) -> None:
        self.log_many(op, [(severity, resource, code, message)])

    def log_many(self, op: str, entries: list[tuple[str, str, int, str]]) -> None:
        """Append (severity, resource, code, message) entries to the operation's logs, in one transaction."""
        if not entries:
            return
        t = now()
        with self.state.tx() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) FROM operation_logs WHERE operation = ?",
                             (op,)).fetchone()[0]
            db.executemany("INSERT INTO operation_logs VALUES (?, ?, ?)", [
                (op, seq + i, json.dumps({
                    "timestamp": t, "severity": severity, "resource": {"type": "healthcare_dicom_store"},
                    "jsonPayload": {"@type": "type.googleapis.com/google.cloud.healthcare.logging."
                                             "ExportDicomDataLogEntry",
                                    "resourceName": resource, "error": {"code": code, "message": message}}}))
                for i, (severity, resource, code, message) in enumerate(entries, 1)])

    # -- HTTP ------------------------------------------------------------------------------------
    def maybe_fault(self, method: str) -> None:
        opts = self.app.options
        if opts.latency_s:
            time.sleep(opts.latency_s)
        rate = opts.fault_rates.get(method, 0.0)
        if rate and random.random() < rate:
            if random.random() < 0.5:
                raise ApiError("RESOURCE_EXHAUSTED", "Quota exceeded (injected by the emulator).")
            raise ApiError("UNAVAILABLE", "The service is currently unavailable (injected by the emulator).")

    def get_response(self, name: str) -> Response:
        from .server import json_response
        self.maybe_fault("operations.get")
        return json_response(self.get(name))

    def list_response(self, request: Request, dataset: str) -> Response:
        from .server import encode_token, json_response, page_args
        self.maybe_fault("operations.list")
        size, offset = page_args(request, default=100, maximum=100)
        flt = request.args.get("filter", "").strip()
        where, params = "dataset = ?", [dataset]
        if flt:
            m = re.match(r"^done\s*[=:]\s*(true|false)$", flt, re.I)
            if not m:
                raise invalid(f"Invalid filter {flt!r}: only 'done = true' or 'done = false' is supported.", "filter")
            where += " AND done = ?"
            params.append(1 if m.group(1).lower() == "true" else 0)
        rows = self.state.db().execute(
            f"SELECT body FROM operations WHERE {where} ORDER BY seq DESC LIMIT ? OFFSET ?",
            (*params, size + 1, offset)).fetchall()
        out: dict = {"operations": [json.loads(r["body"]) for r in rows[:size]]}
        if len(rows) > size:
            out["nextPageToken"] = encode_token(offset + size)
        return json_response(out)

    def cancel_response(self, name: str) -> Response:
        from .server import json_response
        self.maybe_fault("operations.cancel")
        op = self.get(name)
        if not op.get("done"):
            self._update(name, lambda b: b["metadata"].__setitem__("cancelRequested", True))
            ev = self._cancel_events.get(name)
            if ev:
                ev.set()
        return json_response({})

    def logs_response(self, name: str) -> Response:
        from .server import json_response
        self.get(name)
        rows = self.state.db().execute("SELECT entry FROM operation_logs WHERE operation = ? ORDER BY seq",
                                       (name,)).fetchall()
        return json_response({"operation": name, "entries": [json.loads(r["entry"]) for r in rows]})

    def start_export(self, request: Request, version: str, store: str, raw: object) -> Response:
        from .server import json_response
        self.state.count(store, "export.calls")
        self.maybe_fault("export")
        body = messages.check(raw, messages.EXPORT_REQUEST_BETA if version == "v1beta1" else messages.EXPORT_REQUEST)
        self.app.require_store(store)
        dest = body.get("bigqueryDestination")
        if body.get("gcsDestination"):
            if dest:
                raise invalid("Only one of gcsDestination and bigqueryDestination may be set.", "destination")
            raise ApiError("UNIMPLEMENTED", "gcsDestination is not supported by the emulator.")
        if not dest:
            raise invalid("A destination is required: set bigqueryDestination.", "bigquery_destination")
        parse_table_uri(dest.get("tableUri", ""))
        if "schemaFlattened" in dest and "schemaJson" in dest:
            raise invalid("Only one of schemaFlattened and schemaJson may be set.", "bigquery_destination")
        if "filterConfig" in body:
            parse_gcs_uri(body["filterConfig"].get("resourcePathsGcsUri", ""))
        project = store.split("/")[1]
        dataset = store.split("/dicomStores/")[0]
        with self._lock:
            limit = self.app.options.max_running_operations
            if limit:
                running = self.state.db().execute(
                    "SELECT COUNT(*) FROM operations WHERE done = 0 AND name LIKE ?", (f"projects/{project}/%",)
                ).fetchone()[0]
                if running >= limit:
                    raise ApiError("RESOURCE_EXHAUSTED",
                                   f"The maximum number of concurrent long-running operations ({limit}) "
                                   f"in project {project} has been reached.")
            name = self._new_name(dataset)
            op = {"name": name,
                  "metadata": {"@type": f"type.googleapis.com/google.cloud.healthcare.{version}.OperationMetadata",
                               "apiMethodName": f"google.cloud.healthcare.{version}.dicom.DicomService."
                                                f"ExportDicomData_bq",
                               "createTime": now(), "logsUrl": f"{request.host_url}logs/{name}",
                               "counter": {}}}
            self._insert(name, dataset, op, {"kind": "export", "store": store, "body": body})
        self.state.count(store, "export")
        self._submit(name)
        rate = self.app.options.fault_rates.get("export.started", 0.0)
        if rate and random.random() < rate:  # the export runs, but the caller cannot know it
            raise ApiError("INTERNAL", "Internal error encountered (injected by the emulator after the export "
                                       "started).")
        return json_response(op)

    # -- the export itself ------------------------------------------------------------------------
    def _submit(self, name: str) -> None:
        self._cancel_events[name] = threading.Event()
        self.pool.submit(self._run, name)

    def _run(self, name: str) -> None:
        row = self.state.db().execute("SELECT request FROM operations WHERE name = ?", (name,)).fetchone()
        if row is None:
            return
        req = json.loads(row["request"])
        if req.get("kind") == "import":
            from . import imports
            return imports.run(self, name, req)
        spill = self.state.tmp_dir / f"{name.rsplit('/', 1)[1]}.spill"
        try:
            success, failure = self._export(name, req["store"], req["body"], spill)
        except Cancelled:
            self._finish(name, error={"code": 1, "message": "Operation was cancelled."})
        except ApiError as e:
            self._finish(name, error=e.rpc_status())
        except Exception as e:  # the warehouse's errors carry a code name
            code = getattr(e, "code", "INTERNAL")
            from .errors import CODES
            num = CODES.get(code, CODES["INTERNAL"])[0] if isinstance(code, str) else 13
            msg = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
            if num == 1:
                self._finish(name, error={"code": 1, "message": "Operation was cancelled."})
            else:
                self._finish(name, error={"code": num, "message": msg})
        else:
            def ok(b):
                b["metadata"]["counter"] = _counter(success, failure, 0)
            self._update(name, ok)
            self._finish(name, response={"@type": "type.googleapis.com/google.protobuf.Empty"})
        finally:
            self._cancel_events.pop(name, None)
            for f in spill.parent.glob(spill.name + ".*"):
                f.unlink(missing_ok=True)

    def _finish(self, name: str, *, error: dict | None = None, response: dict | None = None) -> None:
        def done(b):
            b["done"] = True
            b["metadata"]["endTime"] = now()
            c = b["metadata"].get("counter", {})
            c.pop("pending", None)
            if error is not None:
                b["error"] = error
            else:
                b["response"] = response
        self._update(name, done)

    def _cancelled(self, name: str) -> bool:
        ev = self._cancel_events.get(name)
        return bool(ev and ev.is_set())

    def _selected(self, store: str, body: dict, name: str):
        """Yield (blob, size, stored_at) of the instances the request selects, each once."""
        db = self.state.db()
        cols = "blob, size, stored_at, study, series, sop"
        flt = body.get("filterConfig", {}).get("resourcePathsGcsUri")
        if not flt:
            last = ""
            while True:
                rows = db.execute(f"SELECT {cols} FROM instances WHERE store = ? AND sop > ? ORDER BY sop LIMIT ?",
                                  (store, last, PAGE)).fetchall()
                yield from rows
                if len(rows) < PAGE:
                    return
                last = rows[-1]["sop"]
        seen: set[str] = set()
        for lineno, path in self._filter_lines(flt):
            study, series, sop = FILTER_LINE.match(path).groups()
            q, params = f"SELECT {cols} FROM instances WHERE store = ? AND study = ?", [store, study]
            if series:
                q += " AND series = ?"
                params.append(series)
            if sop:
                q += " AND sop = ?"
                params.append(sop)
            found = False
            last = ""
            while True:
                rows = db.execute(q + " AND sop > ? ORDER BY sop LIMIT ?", (*params, last, PAGE)).fetchall()
                for r in rows:
                    found = True
                    if r["sop"] not in seen:
                        seen.add(r["sop"])
                        yield r
                if len(rows) < PAGE:
                    break
                last = rows[-1]["sop"]
            if not found:
                self.log(name, "ERROR", f"{store}/dicomWeb{path}", 5,
                         f"filter line {lineno}: resource path {path} matches no instance in the store")
                yield None  # counted as a failure

    def _filter_lines(self, uri: str):
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

    def _pool(self):
        """Worker processes for the export's CPU-bound first pass (None: map in the export thread)."""
        workers = self.app.options.export_workers
        if workers is None:
            workers = os.cpu_count() or 1
        if workers <= 1:
            return None
        with self._lock:
            if self._workers is None:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor
                self._workers = ProcessPoolExecutor(max_workers=workers,
                                                    mp_context=multiprocessing.get_context("spawn"))
            return self._workers

    def _export(self, name: str, store: str, body: dict, spill) -> tuple[int, int]:
        from . import dicom_bq, mapper
        from .warehouse import WarehouseError

        dest = body["bigqueryDestination"]
        project, dataset, table = parse_table_uri(dest["tableUri"])
        if_exists = if_exists_for(dest)
        as_json = "schemaJson" in dest
        source = store if dest.get("includeSourceStore") else None
        wh = self.warehouse
        wh.get_dataset(project, dataset)  # a missing dataset fails here, before any work
        existing = wh.get_table(project, dataset, table)
        if existing is not None:
            if if_exists == "error":
                raise ApiError("ALREADY_EXISTS", f"Destination table {dest['tableUri']} already exists and force "
                                                 "is false; set force or a writeDisposition.")
            if if_exists == "error_if_nonempty" and existing.get("numRows", 0) > 0:
                raise ApiError("FAILED_PRECONDITION", f"Destination table {dest['tableUri']} is not empty; "
                                                      "WRITE_EMPTY only exports into an empty table.")
        rate = self.app.options.export_instances_per_s
        ev = self._cancel_events.get(name) or threading.Event()
        pool = None if rate else self._pool()
        chunk_size = 1 if rate else CHUNK
        counts = {"success": 0, "failure": 0}

        if body.get("filterConfig"):
            selected = list(self._selected(store, body, name))
            total = len(selected)
        else:
            total = self.state.db().execute("SELECT COUNT(*) FROM instances WHERE store = ?", (store,)).fetchone()[0]
            selected = self._selected(store, body, name)

        def progress():
            pending = max(total - counts["success"] - counts["failure"], 0)
            self._update(name, lambda b: b["metadata"].__setitem__(
                "counter", _counter(counts["success"], counts["failure"], pending)))

        def chunks():
            """Chunks of (blob path, size, stored_at, resource); a filter path naming nothing is a failure."""
            chunk = []
            for r in selected:
                if r is None:
                    counts["failure"] += 1
                    continue
                chunk.append((str(self.state.blob_path(r["blob"])), r["size"], r["stored_at"],
                              f"{store}/dicomWeb/studies/{r['study']}/series/{r['series']}/instances/{r['sop']}"))
                if len(chunk) >= chunk_size:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk

        schema: list = dicom_bq.JSON_SCHEMA(bool(source)) if as_json else []
        parts: list[tuple[str, list, bool]] = []  # (spill file, chunk schema, conflict within the chunk)

        def collect(spill_path: str, result: dict) -> None:
            nonlocal schema
            counts["success"] += result["success"]
            counts["failure"] += len(result["failed"])
            self.log_many(name, [("ERROR", res, 3, msg) for res, msg in result["failed"]] +
                          [("WARNING", res, 3, msg) for res, msg in result["issues"]])
            if not as_json:
                schema = dicom_bq.union_schemas(schema, result["schema"])
            parts.append((spill_path, result["schema"], result["conflict"]))
            progress()

        progress()
        in_flight: list = []
        try:
            for i, chunk in enumerate(chunks()):
                if ev.is_set():
                    raise Cancelled()
                if rate and ev.wait(1.0 / rate):
                    raise Cancelled()
                path = f"{spill}.{i}"
                if pool is None:
                    collect(path, mapper.map_chunk(chunk, path, as_json, source))
                    continue
                in_flight.append((path, pool.submit(mapper.map_chunk, chunk, path, as_json, source)))
                while len(in_flight) >= 2 * (os.cpu_count() or 2):  # bounded: memory does not grow with the store
                    p, fut = in_flight.pop(0)
                    collect(p, fut.result())
            while in_flight:
                if ev.is_set():
                    raise Cancelled()
                p, fut = in_flight.pop(0)
                collect(p, fut.result())
        finally:
            for _, fut in in_flight:
                fut.cancel()

        if not schema:  # nothing exported: keep the table's columns, or create it with the key columns
            schema = existing["schema"] if existing is not None else [
                {"name": k, "type": "STRING", "mode": "NULLABLE"}
                for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        if existing is not None and if_exists == "append" and not as_json:
            schema = dicom_bq.union_schemas(existing["schema"], schema, prefer="left")

        def batches():
            from .warehouse import conform_batch, normalize_schema
            final = normalize_schema(schema)
            for path, chunk_schema, conflict in parts:
                if not os.path.exists(path):  # a chunk with no row
                    continue
                if as_json or not (conflict or not mapper.fits(schema, chunk_schema)):
                    chunk = normalize_schema(chunk_schema)
                    for b in mapper.load_batches(path):
                        yield conform_batch(b, chunk, final)
                else:
                    yield [dicom_bq.conform_row(r, schema) for r in mapper.load_chunk(path)]
                os.unlink(path)

        try:
            wh.write_table(project, dataset, table, schema, batches(), if_exists=if_exists, cancelled=ev.is_set)
        except WarehouseError as e:
            if e.code == "CANCELLED":
                raise Cancelled() from None
            raise ApiError(e.code if e.code in ("NOT_FOUND", "ALREADY_EXISTS", "INVALID_ARGUMENT",
                                                "FAILED_PRECONDITION") else "INTERNAL", e.message) from None
        return counts["success"], counts["failure"]


def _counter(success: int, failure: int, pending: int) -> dict:
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
