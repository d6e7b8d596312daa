"""`dicomStores.import`: DICOM files from Cloud Storage into a store, as a long-running operation.

`POST .../dicomStores/S:import` with `{"gcsSource": {"uri": "gs://BUCKET/OBJECT"}}` is checked at once
(400 naming `gcs_source.uri`: not `gs://BUCKET/OBJECT`, a bucket name that breaks Cloud Storage's rules, a
wildcard the API does not accept; 404 for a missing store) and answered with an Operation whose
`metadata.apiMethodName` is `google.cloud.healthcare.{version}.dicom.DicomService.ImportDicomData`. The import
then runs in the operations' background pool:

- The objects are listed through google-cloud-storage from `STORAGE_EMULATOR_HOST` (fake-gcs-server in the
  tests), page by page, with the literal prefix of the URI as the listing prefix, then matched against the
  documented wildcards: `*` (0 or more characters other than `/`), `?` (one character other than `/`), `**`
  (0 or more characters including `/`, only at the end of the URI, optionally followed by an extension such as
  `**.dcm`). A URI without wildcards names one object.
- Each object is downloaded and stored exactly as a STOW-RS part is (dicomweb's `_store_part`: the same
  checks, index and blob store), by a few threads, with a bounded number of files in flight: memory does not
  grow with the number of files.
- Per-file failures are counted in `metadata.counter.failure` and logged at the operation's `logsUrl` (one
  `ImportDicomLogEntry` per file, naming its `gs://` URI): not a DICOM Part 10 file, a missing or invalid UID,
  an instance already in the store (the API "accepts duplicate DICOM instances by ignoring the newly-pushed
  instance": the stored one is kept, the file is counted as a failure with ALREADY_EXISTS).
  `counter.success` counts imported instances, `counter.pending` the files listed and not yet done.
- The operation fails only when nothing could be read: a bucket that does not exist, or a URI matching no
  object (`NOT_FOUND` naming the URI), or no Cloud Storage endpoint configured (`FAILED_PRECONDITION`).
  Otherwise it ends with `response: {"@type": "...ImportDicomDataResponse"}`, whatever the failures.
- Notifications: each imported instance is notified with the action `ImportDicomData` on every
  `notificationConfigs[]` topic, and on the legacy `notificationConfig` topic only when its
  `sendForBulkImport` is true (see notifications.py). Streaming (`streamConfigs`) gets every imported
  instance, as it gets every stored one.
- Cancel: `operations.cancel` stops the import between files (code 1); instances imported before it stay.
- Slow mode (`--export-rate R`, for tests and demos) imports R files per second, one at a time, so the
  counters can be watched and the import cancelled while it runs.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from werkzeug.wrappers import Request, Response

from . import messages
from .errors import ApiError, invalid

log = logging.getLogger("healthcare_emulator.imports")

FIELD = "gcs_source.uri"
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._\-]{1,220}[a-z0-9]$")
BLOB_STORAGE_CLASSES = ("BLOB_STORAGE_CLASS_UNSPECIFIED", "STANDARD", "NEARLINE", "COLDLINE", "ARCHIVE")
IMPORT_REQUEST = {
    "gcsSource": {"uri": "string"},
    "blobStorageSettings": {"blobStorageClass": ("enum", "BlobStorageClass", BLOB_STORAGE_CLASSES)},
}
THREADS = 4          # download + store in parallel (I/O bound: GCS reads, blob writes, SQLite commits)
IN_FLIGHT = 16       # files downloaded or being stored at once: memory does not grow with the listing
PROGRESS_EVERY_S = 0.25
LOG_TYPE = "type.googleapis.com/google.cloud.healthcare.logging.ImportDicomLogEntry"


def parse_source_uri(uri: object) -> tuple[str, str, re.Pattern | None, str]:
    """gs://BUCKET/OBJECT[wildcards] -> (bucket, object pattern, regex or None, literal listing prefix)."""
    if not isinstance(uri, str) or not uri:
        raise invalid(f"{FIELD} is required: gs://BUCKET/OBJECT, with optional wildcards * ? **", FIELD)
    m = re.match(r"^gs://([^/]+)/(.+)$", uri)
    if not m:
        raise invalid(f"{FIELD} {uri!r} must be of the form gs://BUCKET/OBJECT (optionally with the wildcards "
                      "*, ? or a final **)", FIELD)
    bucket, obj = m.groups()
    if not BUCKET_RE.match(bucket) or ".." in bucket:
        raise invalid(f"{FIELD} {uri!r}: invalid bucket name {bucket!r} (3-222 characters: lowercase letters, "
                      "digits, '-', '_' and '.', starting and ending with a letter or digit)", FIELD)
    if not any(c in obj for c in "*?"):
        return bucket, obj, None, obj
    if "**" in obj:
        head, _, tail = obj.partition("**")
        if any(c in head + tail for c in "*?") or "/" in tail:
            raise invalid(f"{FIELD} {uri!r}: '**' must be at the end of the path (optionally followed by a file "
                          "extension such as .dcm) and with no other wildcard in the path", FIELD)
        return bucket, obj, re.compile(re.escape(head) + ".*" + re.escape(tail) + r"\Z", re.S), head
    pattern = "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in obj)
    prefix = re.split(r"[*?]", obj, maxsplit=1)[0]
    return bucket, obj, re.compile(pattern + r"\Z", re.S), prefix


def start_import(app, request: Request, version: str, store: str, raw: object) -> Response:
    from .http_util import json_response
    from .http_util import now_rfc3339 as now

    ops = app.operations
    state = app.state
    state.count(store, "import.calls")
    body = messages.check(raw, IMPORT_REQUEST)
    app.require_store(store)
    if "gcsSource" not in body:
        raise invalid("gcsSource is required: set gcsSource.uri to gs://BUCKET/OBJECT", "gcs_source")
    parse_source_uri(body["gcsSource"].get("uri"))
    dataset = store.split("/dicomStores/")[0]
    project = store.split("/")[1]
    with ops._lock:
        limit = app.options.max_running_operations
        if limit:
            running = state.db().execute("SELECT COUNT(*) FROM operations WHERE done = 0 AND name LIKE ?",
                                         (f"projects/{project}/%",)).fetchone()[0]
            if running >= limit:
                raise ApiError("RESOURCE_EXHAUSTED", f"The maximum number of concurrent long-running operations "
                                                     f"({limit}) in project {project} has been reached.")
        name = ops._new_name(dataset)
        op = {"name": name,
              "metadata": {"@type": f"type.googleapis.com/google.cloud.healthcare.{version}.OperationMetadata",
                           "apiMethodName": f"google.cloud.healthcare.{version}.dicom.DicomService.ImportDicomData",
                           "createTime": now(), "logsUrl": f"{request.host_url}logs/{name}", "counter": {}}}
        ops._insert(name, dataset, op, {"kind": "import", "store": store, "body": body, "version": version})
    state.count(store, "import")
    ops._submit(name)
    return json_response(op)


def start_route(app, call):
    """POST .../dicomStores/S:import (server.ROUTES)."""
    from .http_util import read_json
    p, loc, d, s = call.ids[:4]
    store = f"projects/{p}/locations/{loc}/datasets/{d}/dicomStores/{s}"
    return start_import(app, call.request, call.version, store, read_json(call.request))


class _Run:
    """One import's state while it runs (counters, log entries, cancel)."""

    def __init__(self, ops, name: str, store: str, body: dict, version: str):
        self.ops = ops
        self.app = ops.app
        self.name = name
        self.store = store
        self.uri = body["gcsSource"]["uri"]
        self.version = version
        self.cancel = ops._cancel_events.get(name) or threading.Event()
        self.lock = threading.Lock()
        self.listed = self.success = self.failure = 0
        self.logs: list[tuple[str, str, int, str]] = []
        self.last_progress = 0.0

    # -- bookkeeping ----------------------------------------------------------------------------
    def counter(self, final: bool = False) -> dict:
        c = {"success": str(self.success)}
        if self.failure:
            c["failure"] = str(self.failure)
        pending = self.listed - self.success - self.failure
        if pending > 0 and not final:
            c["pending"] = str(pending)
        return c

    def progress(self, force: bool = False) -> None:
        t = time.monotonic()
        if not force and t - self.last_progress < PROGRESS_EVERY_S:
            return
        self.last_progress = t
        with self.lock:
            counter, entries, self.logs = self.counter(), self.logs, []
        write_logs(self.app.state, self.name, entries)
        self.ops._update(self.name, lambda b: b["metadata"].__setitem__("counter", counter))

    def failed(self, obj: str, code: int, message: str) -> None:
        with self.lock:
            self.failure += 1
            self.logs.append(("ERROR", f"gs://{self.bucket}/{obj}", code, message))

    # -- the work ---------------------------------------------------------------------------------
    def run(self) -> None:
        from google.api_core import exceptions as gexc

        self.bucket, _, regex, prefix = parse_source_uri(self.uri)
        client = storage_client(self.uri)
        try:
            bucket = client.bucket(self.bucket)
            if regex is None:
                names = self._one(bucket, prefix)
            else:
                names = (b.name for b in client.list_blobs(self.bucket, prefix=prefix or None)
                         if regex.match(b.name))
            self._import(bucket, names)
        except gexc.NotFound:
            raise ApiError("NOT_FOUND", f"Cannot read {self.uri}: the bucket does not exist, or the Cloud "
                                        "Healthcare Service Agent lacks roles/storage.objectViewer on it.") from None
        except gexc.GoogleAPIError as e:
            raise ApiError("FAILED_PRECONDITION", f"Cannot read {self.uri}: {e}") from None
        if self.listed == 0:
            raise ApiError("NOT_FOUND", f"No object matches {self.uri} (gcs_source.uri).")

    def _one(self, bucket, obj: str):
        if bucket.get_blob(obj) is None:
            client = bucket.client
            client.get_bucket(self.bucket)  # NotFound for a missing bucket, naming the URI above
            return iter(())
        return iter((obj,))

    def _import(self, bucket, names) -> None:
        rate = self.app.options.export_instances_per_s  # slow mode (--export-rate): files per second
        sem = threading.BoundedSemaphore(1 if rate else IN_FLIGHT)
        with ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="import-file") as pool:
            futures = set()
            for obj in names:
                if self.cancel.is_set() or (rate and self.cancel.wait(1.0 / rate)):
                    break
                sem.acquire()
                with self.lock:
                    self.listed += 1
                fut = pool.submit(self._file, bucket, obj)
                fut.add_done_callback(lambda _f: sem.release())
                futures.add(fut)
                futures = {f for f in futures if not f.done()}
                self.progress()
            for f in futures:
                f.result()
        if self.cancel.is_set():
            from .export import Cancelled
            self.progress(force=True)
            raise Cancelled()

    def _file(self, bucket, obj: str) -> None:
        from . import dicomweb
        try:
            if self.cancel.is_set():
                with self.lock:
                    self.listed -= 1
                return
            try:
                data = bucket.blob(obj).download_as_bytes()
            except Exception as e:
                self.failed(obj, 5, f"cannot read the object: {type(e).__name__}: {str(e)[:200]}")
                return
            ctx = _ImportContext(self.app)
            view = memoryview(data)
            outcome = dicomweb._store_part(ctx, self.store, "", None, 1, None, view)
            view.release()
            if not outcome["ok"]:
                detail = outcome["item"].get(dicomweb.FAILURE_DETAIL_TAG, {}).get("Value", [""])[0]
                detail = detail.replace("Part 1 is", "the file is").replace("Part 1: ", "")
                sop = (outcome["item"].get("00081155", {}).get("Value") or [None])[0]
                if sop and "already exists" in detail:
                    self.failed(obj, 6, f"an instance with SOP Instance UID {sop} already exists in the store; "
                                        "the stored instance is kept (imports never overwrite)")
                else:
                    self.failed(obj, 3, detail)
            else:
                with self.lock:
                    self.success += 1
        except Exception as e:  # one file never fails the import
            log.exception("import of gs://%s/%s failed", self.bucket, obj)
            self.failed(obj, 13, f"internal error: {type(e).__name__}")
        finally:
            self.progress()


class _ImportContext:
    """The app as `_store_part` sees it, with notifications under the ImportDicomData action."""

    def __init__(self, app):
        self._app = app
        self.state = app.state

    def notify(self, store: str, action: str, instance: dict) -> None:
        self._app.notify(store, "ImportDicomData" if action == "StoreInstances" else action, instance)

    def __getattr__(self, name):
        return getattr(self._app, name)


def run(ops, name: str, req: dict) -> None:
    """The operation's body (called from the operations' pool; ends the operation)."""
    from .export import Cancelled

    job = _Run(ops, name, req["store"], req["body"], req.get("version", "v1"))
    try:
        job.run()
    except Cancelled:
        job.progress(force=True)
        ops._finish(name, error={"code": 1, "message": "Operation was cancelled."})
    except ApiError as e:
        job.progress(force=True)
        ops._finish(name, error=e.rpc_status())
    except Exception as e:
        log.exception("import %s failed", name)
        job.progress(force=True)
        ops._finish(name, error={"code": 13, "message": f"Internal error: {type(e).__name__}"})
    else:
        job.progress(force=True)
        counter = job.counter(final=True)
        ops._update(name, lambda b: b["metadata"].__setitem__("counter", counter))
        ops._finish(name, response={"@type": f"type.googleapis.com/google.cloud.healthcare.{job.version}.dicom."
                                             "ImportDicomDataResponse"})
    finally:
        ops._cancel_events.pop(name, None)


def write_logs(state, op: str, entries: list[tuple[str, str, int, str]]) -> None:
    """Append import log entries (severity, gs:// URI, code, message) to the operation's logs."""
    if not entries:
        return
    from .http_util import now_rfc3339
    t = now_rfc3339()
    with state.tx() as db:
        seq = db.execute("SELECT COALESCE(MAX(seq), 0) FROM operation_logs WHERE operation = ?", (op,)).fetchone()[0]
        db.executemany("INSERT INTO operation_logs VALUES (?, ?, ?)", [
            (op, seq + i, json.dumps({
                "timestamp": t, "severity": severity, "resource": {"type": "healthcare_dicom_store"},
                "jsonPayload": {"@type": LOG_TYPE, "gcsSource": uri, "error": {"code": code, "message": message}}}))
            for i, (severity, uri, code, message) in enumerate(entries, 1)])


def storage_client(uri: str):
    import os
    if not os.environ.get("STORAGE_EMULATOR_HOST"):
        raise ApiError("FAILED_PRECONDITION", f"Cannot read {uri}: the emulator has no Cloud Storage endpoint; "
                                              "set STORAGE_EMULATOR_HOST.")
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    return storage.Client(project="emulator", credentials=AnonymousCredentials())
