"""Cloud Storage adapter: write batch filter files (one instance path a line) for the ingest function.

Over the JSON API (a multipart upload) through the shared transport (transport.py); with `emulator_host`
(STORAGE_EMULATOR_HOST, passed by handlers/wiring.py) it goes to a local emulator instead.

Writes are create-only (`ifGenerationMatch=0`): the runtime account needs only
roles/storage.objectCreator on the bucket, and an object is never replaced. The caller names each
object after its content (a hash in the name), so "already exists" means "already written, with this
very content" by an earlier attempt, and counts as success. GCS uploads are atomic: an object is
either absent or complete.
"""
from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import quote

from . import transport as gh

BOUNDARY = "dicom-export-filter-file"


class StorageError(Exception):
    """The object could not be written (the caller retries later)."""


class FilterFiles:
    def __init__(self, bucket: str, project: str | None = None, *, timeout_s: float = 30.0,
                 emulator_host: str | None = None, tokens: gh.Tokens | None = None):
        self.bucket = bucket
        self.project = project
        self.timeout_s = timeout_s
        host = emulator_host
        self.local = bool(host)
        self.base = f"http://{host}" if host else "https://storage.googleapis.com"
        self.tokens = gh.Tokens() if host else (tokens or gh.Tokens())
        self._bucket_checked = False

    def uri(self, name: str) -> str:
        return f"gs://{self.bucket}/{name}"

    def write_once(self, name: str, text: str) -> tuple[str, bool]:
        """Create gs://BUCKET/name holding `text` unless it exists. Returns (uri, created)."""
        meta = json.dumps({"name": name, "contentType": "text/plain; charset=utf-8"})
        body = (f"--{BOUNDARY}\r\ncontent-type: application/json; charset=utf-8\r\n\r\n{meta}\r\n"
                f"--{BOUNDARY}\r\ncontent-type: text/plain; charset=utf-8\r\n\r\n").encode() + text.encode("utf-8") \
            + f"\r\n--{BOUNDARY}--\r\n".encode()
        try:
            self._call("POST", f"{self.base}/upload/storage/v1/b/{quote(self.bucket, safe='')}/o", data=body,
                       params={"uploadType": "multipart", "ifGenerationMatch": "0"},
                       headers={"Content-Type": f"multipart/related; boundary={BOUNDARY}"})
            return self.uri(name), True
        except gh.HttpError as e:
            if e.http_status == 412:
                return self.uri(name), False
            if e.http_status == 404 and self.local and not self._bucket_checked:
                # A local emulator starts empty; in the cloud deploy.sh creates the bucket.
                self._create_local_bucket()
                return self.write_once(name, text)
            raise StorageError(f"writing {self.uri(name)} failed: {e}") from e
        except gh.Unavailable as e:
            raise StorageError(f"writing {self.uri(name)} failed: {e}") from e

    def read(self, name: str) -> str:
        """The object's text (tests and operators; the function itself never reads)."""
        r = self._call("GET", f"{self.base}/storage/v1/b/{quote(self.bucket, safe='')}/o/{quote(name, safe='')}",
                       params={"alt": "media"})
        return str(r.content.decode("utf-8"))

    def _call(self, method: str, url: str, **kw: Any) -> Any:
        return gh.call(method, url, tokens=self.tokens, deadline=time.monotonic() + self.timeout_s,
                       timeout_s=self.timeout_s, what=f"Cloud Storage {method}", **kw)

    def _create_local_bucket(self) -> None:
        self._bucket_checked = True
        try:
            self._call("POST", f"{self.base}/storage/v1/b", params={"project": self.project or "local"},
                       json={"name": self.bucket})
        except gh.HttpError as e:
            if e.http_status != 409:
                raise
