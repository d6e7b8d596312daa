"""Long-running operations: their records, counters, logs and cancellation, and their HTTP answers.

The export that runs inside an export operation is export.py's engine; this module runs it in a
background thread and records how it ended.
"""
from __future__ import annotations

import json
import random
import re
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from werkzeug.wrappers import Request, Response

from . import datasets, export, iam_api, messages
from .errors import CODES, ApiError, invalid, not_found
from .export import (  # noqa: F401 - re-exported: importers of operations keep working
    BUCKET_RE,
    CHUNK,
    DATASET_RE,
    FILTER_LINE,
    PAGE,
    PROJECT_RE,
    TABLE_RE,
    Cancelled,
    if_exists_for,
    parse_gcs_uri,
    parse_table_uri,
    read_gcs_object,
)
from .http_util import encode_token, json_response, now_rfc3339, page_args, read_json
from .routing import Call


def now() -> str:
    return now_rfc3339()


class Operations:
    def __init__(self, app):
        self.app = app
        self.state = app.state
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="export")
        self._cancel_events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._calls: dict[str, int] = {}  # export calls being answered, per dataset
        self._changed = threading.Condition()
        self._warehouse = None
        self._workers = export.Workers(app.options.export_workers)
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
        self.maybe_fault("operations.get")
        return json_response(self.get(name))

    def list_response(self, request: Request, dataset: str) -> Response:
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
        self.maybe_fault("operations.cancel")
        op = self.get(name)
        if not op.get("done"):
            self._update(name, lambda b: b["metadata"].__setitem__("cancelRequested", True))
            ev = self._cancel_events.get(name)
            if ev:
                ev.set()
        return json_response({})

    def logs_response(self, name: str) -> Response:
        self.get(name)
        rows = self.state.db().execute("SELECT entry FROM operation_logs WHERE operation = ? ORDER BY seq",
                                       (name,)).fetchall()
        return json_response({"operation": name, "entries": [json.loads(r["entry"]) for r in rows]})

    def start_export(self, request: Request, version: str, store: str, raw: object) -> Response:
        """dicomStores.export. An emulator-only figure beside the request counts: a call that arrives while
        another export call on the same dataset is still being answered counts `export.overlapping` on the
        dataset (/emulator/requestCounts), so tests can check that a caller makes one at a time."""
        dataset = store.split("/dicomStores/")[0]
        with self._lock:
            if self._calls.get(dataset):
                self.state.count(dataset, "export.overlapping")
            self._calls[dataset] = self._calls.get(dataset, 0) + 1
        try:
            return self._start_export(request, version, store, raw)
        finally:
            with self._lock:
                self._calls[dataset] -= 1

    def _start_export(self, request: Request, version: str, store: str, raw: object) -> Response:
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
            num = CODES.get(code, CODES["INTERNAL"])[0] if isinstance(code, str) else 13
            msg = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
            if num == 1:
                self._finish(name, error={"code": 1, "message": "Operation was cancelled."})
            else:
                self._finish(name, error={"code": num, "message": msg})
        else:
            def ok(b):
                b["metadata"]["counter"] = export.counter(success, failure, 0)
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

    def _export(self, name: str, store: str, body: dict, spill) -> tuple[int, int]:
        rate = self.app.options.export_instances_per_s
        job = export.Job(name=name, store=store, body=body, spill=spill, state=self.state,
                         warehouse=self.warehouse, cancel=self._cancel_events.get(name) or threading.Event(),
                         rate=rate, pool=None if rate else self._workers.get(), log_many=self.log_many,
                         set_counter=lambda c: self._update(name, lambda b: b["metadata"].__setitem__("counter", c)),
                         authorize=lambda p, ds, exists: iam_api.check_export(self.app, name, store, p, ds, exists))
        return export.run(job)


# -- route handlers (server.py's table) --------------------------------------------------------------
def get_operation(app, call: Call) -> Response:
    return app.operations.get_response(call.name)


def list_operations(app, call: Call) -> Response:
    dataset = call.name.rsplit("/", 1)[0]
    datasets.require(app.state, dataset)
    return app.operations.list_response(call.request, dataset)


def cancel_operation(app, call: Call) -> Response:
    messages.check(read_json(call.request), messages.CANCEL)
    return app.operations.cancel_response(call.name)
