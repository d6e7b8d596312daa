"""Everything the emulator keeps, under one data dir, surviving a restart.

- `state.sqlite`: datasets, DICOM stores, the instance index, operations and their logs,
  request counters. One connection per thread, WAL mode.
- `blobs/`: the stored DICOM files, content-addressed by SHA-256 (no client-chosen
  name ever reaches the filesystem).
- `bigquery/`: the warehouse (see warehouse.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    name TEXT PRIMARY KEY,            -- projects/P/locations/L/datasets/D
    parent TEXT NOT NULL,             -- projects/P/locations/L
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS stores (
    name TEXT PRIMARY KEY,            -- .../datasets/D/dicomStores/S
    dataset TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    store TEXT NOT NULL,
    study TEXT NOT NULL,
    series TEXT NOT NULL,
    sop TEXT NOT NULL,
    sop_class TEXT,
    blob TEXT NOT NULL,               -- sha256 hex of the stored file
    size INTEGER NOT NULL,
    stored_at TEXT NOT NULL,          -- RFC 3339
    attrs TEXT NOT NULL,              -- DICOM JSON of the attributes QIDO matches and returns
    PRIMARY KEY (store, sop)
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances (store, study, series);
CREATE TABLE IF NOT EXISTS operations (
    name TEXT PRIMARY KEY,            -- .../datasets/D/operations/ID
    dataset TEXT NOT NULL,
    seq INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    body TEXT NOT NULL,               -- the Operation resource as served (without logs)
    request TEXT NOT NULL             -- what started it, to resume after a restart
);
CREATE INDEX IF NOT EXISTS operations_by_dataset ON operations (dataset, seq);
CREATE TABLE IF NOT EXISTS operation_logs (
    operation TEXT NOT NULL,
    seq INTEGER NOT NULL,
    entry TEXT NOT NULL,
    PRIMARY KEY (operation, seq)
);
CREATE TABLE IF NOT EXISTS request_counts (
    resource TEXT NOT NULL,
    method TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (resource, method)
);
"""


class State:
    def __init__(self, data_dir: str | os.PathLike):
        self.root = Path(data_dir).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.blob_dir = self.root / "blobs"
        self.blob_dir.mkdir(exist_ok=True)
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(exist_ok=True)
        self.db_path = self.root / "state.sqlite"
        self._local = threading.local()
        self.write_lock = threading.RLock()
        with self.write_lock:
            self.db().executescript(SCHEMA)

    # -- database -------------------------------------------------------------------------------
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (serialised in-process; SQLite serialises across processes)."""
        with self.write_lock:
            db = self.db()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- resources (datasets and stores) ----------------------------------------------------------
    def get_json(self, table: str, name: str) -> dict | None:
        row = self.db().execute(f"SELECT body FROM {table} WHERE name = ?", (name,)).fetchone()
        return json.loads(row["body"]) if row else None

    def count(self, resource: str, method: str) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO request_counts VALUES (?, ?, 1) ON CONFLICT(resource, method)"
                       " DO UPDATE SET n = n + 1", (resource, method))

    def counts(self) -> dict:
        out: dict = {}
        for r in self.db().execute("SELECT resource, method, n FROM request_counts"):
            out.setdefault(r["resource"], {})[r["method"]] = r["n"]
        return out

    # -- blobs ------------------------------------------------------------------------------------
    def blob_path(self, sha: str) -> Path:
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError("bad blob id")
        return self.blob_dir / sha[:2] / f"{sha}.dcm"

    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha)
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return sha

    def drop_unreferenced_blobs(self, shas: set[str]) -> None:
        """Remove blobs no instance row refers to any more (after deletes)."""
        db = self.db()
        for sha in shas:
            if not db.execute("SELECT 1 FROM instances WHERE blob = ? LIMIT 1", (sha,)).fetchone():
                try:
                    self.blob_path(sha).unlink()
                except FileNotFoundError:
                    pass
