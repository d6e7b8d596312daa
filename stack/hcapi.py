"""A thin test-side client of the Healthcare emulator's REST surface, over real HTTP."""
from __future__ import annotations

import itertools
import uuid
from pathlib import Path

import requests

_ids = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}-{uuid.uuid4().hex[:6]}"


class HC:
    def __init__(self, base: str, version: str = "v1", project: str = "test-project", location: str = "us-central1"):
        self.base = base.rstrip("/")
        self.version = version
        self.project = project
        self.location = location
        self.http = requests.Session()
        self.http.headers["Authorization"] = "Bearer test-token"

    def url(self, path: str) -> str:
        return f"{self.base}/{self.version}/{path.lstrip('/')}"

    def get(self, path, **kw):
        return self.http.get(self.url(path), **kw)

    def post(self, path, **kw):
        return self.http.post(self.url(path), **kw)

    def dataset(self, dataset_id: str | None = None) -> str:
        dataset_id = dataset_id or unique("ds")
        parent = f"projects/{self.project}/locations/{self.location}"
        r = self.post(f"{parent}/datasets", params={"datasetId": dataset_id}, json={})
        r.raise_for_status()
        return f"{parent}/datasets/{dataset_id}"

    def store(self, dataset: str | None = None, store_id: str | None = None, body: dict | None = None) -> str:
        dataset = dataset or self.dataset()
        store_id = store_id or unique("store")
        r = self.post(f"{dataset}/dicomStores", params={"dicomStoreId": store_id}, json=body or {})
        r.raise_for_status()
        return f"{dataset}/dicomStores/{store_id}"

    def stow(self, store: str, files: list[Path | bytes], study: str | None = None) -> requests.Response:
        boundary = uuid.uuid4().hex
        chunks = []
        for f in files:
            data = f if isinstance(f, bytes) else Path(f).read_bytes()
            chunks.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n")
        body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
        path = f"{store}/dicomWeb/studies" + (f"/{study}" if study else "")
        return self.post(path, data=body, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json"})

    def export(self, store: str, body: dict) -> requests.Response:
        return self.post(f"{store}:export", json=body)

    def wait(self, operation: str, timeout: float = 120) -> dict:
        r = self.http.get(f"{self.base}/emulator/wait/{operation}", params={"timeout": timeout})
        r.raise_for_status()
        op = r.json()
        assert op.get("done"), f"operation not done after {timeout}s: {op}"
        return op

    def export_and_wait(self, store: str, body: dict) -> dict:
        r = self.export(store, body)
        assert r.status_code == 200, r.text
        return self.wait(r.json()["name"])
