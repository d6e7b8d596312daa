"""Cloud Storage adapter: write batch filter files (healthcare-api.md §E) for the ingest function.

google-cloud-storage is imported and its client created on first use, once per instance. The client
honours STORAGE_EMULATOR_HOST by itself (anonymous credentials, the emulator's URL).

Writes are create-only (`ifGenerationMatch=0`): the runtime account needs only
roles/storage.objectCreator on the bucket, and an object is never replaced. The caller names each
object after its content (a hash in the name), so "already exists" means "already written, with this
very content" by an earlier attempt, and counts as success. GCS uploads are atomic: an object is
either absent or complete.
"""
from __future__ import annotations

import os
import threading


class StorageError(Exception):
    """The object could not be written (the caller retries later)."""


class FilterFiles:
    def __init__(self, bucket: str, project: str | None = None, *, timeout_s: float = 30.0, client=None):
        self.bucket = bucket
        self.project = project
        self.timeout_s = timeout_s
        self._client = client
        self._lock = threading.Lock()
        self._bucket_checked = False

    @property
    def local(self) -> bool:
        return bool(os.environ.get("STORAGE_EMULATOR_HOST"))

    def client(self):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    from google.cloud import storage
                    self._client = storage.Client(project=self.project)
        return self._client

    def uri(self, name: str) -> str:
        return f"gs://{self.bucket}/{name}"

    def write_once(self, name: str, text: str) -> tuple[str, bool]:
        """Create gs://BUCKET/name holding `text` unless it exists. Returns (uri, created)."""
        from google.api_core import exceptions as gexc

        blob = self.client().bucket(self.bucket).blob(name)
        try:
            blob.upload_from_string(text.encode("utf-8"), content_type="text/plain; charset=utf-8",
                                    if_generation_match=0, timeout=self.timeout_s)
            return self.uri(name), True
        except gexc.PreconditionFailed:
            return self.uri(name), False
        except gexc.NotFound as e:
            if self.local and not self._bucket_checked:
                # A local emulator starts empty; in the cloud deploy.sh creates the bucket.
                self._create_local_bucket()
                return self.write_once(name, text)
            raise StorageError(f"writing {self.uri(name)} failed: bucket {self.bucket} not found ({e})") from e
        except Exception as e:  # noqa: BLE001 - any other failure: not written, retry later
            raise StorageError(f"writing {self.uri(name)} failed: {type(e).__name__}: {e}") from e

    def read(self, name: str) -> str:
        """The object's text (tests and operators; the function itself never reads)."""
        return self.client().bucket(self.bucket).blob(name).download_as_bytes(timeout=self.timeout_s).decode("utf-8")

    def _create_local_bucket(self) -> None:
        from google.api_core import exceptions as gexc

        self._bucket_checked = True
        try:
            self.client().create_bucket(self.bucket)
        except gexc.Conflict:
            pass
