"""Embedded, file-based stand-in for the BigQuery tables that DICOM exports write.

Layout under the warehouse root (``<data-dir>/bigquery``)::

    projects/<project>/datasets/<dataset>/dataset.json
    projects/<project>/datasets/<dataset>/tables/<table>/manifest.json
    projects/<project>/datasets/<dataset>/tables/<table>/part-<uuid>.parquet
    locks/<sha256>.lock        one lock file per dataset and per table; never deleted
    staging/<uuid>/            Parquet files of writes that have not committed yet
    trash/<uuid>/              deleted datasets and tables, removed right after the rename

Every id is validated with BigQuery's naming rules and then encoded for the file system
(any character outside ``[A-Za-z0-9_-]`` is percent-encoded as UTF-8; names longer than 200
characters become ``~<sha256>``), so no id can name a path outside the root. Listings read the
ids back from ``dataset.json`` / ``manifest.json``, never from folder names.

Commit protocol. A write streams its rows into Parquet files under ``staging/`` without any
lock. It then takes the dataset lock (shared) and the table lock (exclusive: a threading lock
plus ``flock`` on the lock file, so neither threads nor processes commit at once), re-checks the
write disposition against the current manifest, moves the staged files into the table folder and
atomically replaces ``manifest.json`` (write temp, fsync, ``os.replace``). That replace is the
commit point: before it the table is exactly as it was. Files no longer listed are deleted after
it. Readers take no lock: they read one manifest (a consistent snapshot; data files are never
modified) and, should a concurrent commit delete a file under them, retry with a fresh one.

Schema widening on append. Additive changes only: new columns and new nested fields in RECORDs
(recursively, also inside REPEATED RECORDs); REQUIRED may be relaxed to NULLABLE. A type change or
a REPEATED/non-REPEATED change is INVALID_ARGUMENT naming the field. Invariant: every data file
listed in a manifest has exactly the manifest's schema. So when an append widens the schema, the
commit rewrites the existing files (streaming, one row group at a time) into the new schema, with
NULL for new NULLABLE fields and ``[]`` for new REPEATED ones. Appends that do not change the
schema never touch existing files.

REPEATED values are never NULL (as in BigQuery): a missing or ``None`` array is stored as ``[]``,
and a NULL element inside an array is rejected.

Queries: BigQuery Standard SQL is transpiled with sqlglot (bigquery -> duckdb); each table
reference becomes a view over ``read_parquet`` of the snapshot's files, in an in-memory DuckDB
connection that may read only those files (``allowed_paths`` + ``enable_external_access=false``,
configuration locked). No DuckDB database file exists, so the CLI and a running server can use
the same data dir at the same time.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime as _dt
import decimal
import hashlib
import json
import math
import os
import re
import shutil
import sys
import threading
import time
import unicodedata
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

try:  # POSIX: inter-process locks. Elsewhere only threads are serialised.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["Warehouse", "WarehouseError", "to_jsonable", "cli_bq_mk", "cli_query"]

# Row groups are flushed at whichever limit comes first; files roll over at FILE_MAX_ROWS.
ROW_GROUP_ROWS = 16_384
ROW_GROUP_BYTES = 8 * 1024 * 1024  # bounds the memory a write holds, whatever the table's size
FILE_MAX_ROWS = 1_000_000
REWRITE_BATCH_ROWS = 65_536
MAX_NESTING = 15
MAX_COLUMNS = 10_000
STALE_STAGING_S = 24 * 3600
_MAX_FS_NAME = 200
_READ_RETRIES = 5

IF_EXISTS = {
    "error": "error",
    "error_if_nonempty": "error_if_nonempty",
    "truncate": "truncate",
    "append": "append",
    # the API's own spellings, for convenience
    "WRITE_EMPTY": "error_if_nonempty",
    "WRITE_DISPOSITION_UNSPECIFIED": "error_if_nonempty",
    "WRITE_TRUNCATE": "truncate",
    "WRITE_APPEND": "append",
}


class WarehouseError(Exception):
    """An error with a google.rpc code name: NOT_FOUND, ALREADY_EXISTS, INVALID_ARGUMENT,
    FAILED_PRECONDITION, CANCELLED (or INTERNAL)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"WarehouseError({self.code!r}, {self.message!r})"


def _invalid(message: str) -> WarehouseError:
    return WarehouseError("INVALID_ARGUMENT", message)


# --------------------------------------------------------------------------- ids and paths

_PROJECT = r"[a-z][a-z0-9-]{4,28}[a-z0-9]"
_DOMAIN_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_PROJECT_RE = re.compile(rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})+:)?{_PROJECT}")
_DATASET_RE = re.compile(r"[A-Za-z0-9_]{1,1024}")
_FIELD_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,299}")
_TABLE_CATEGORIES = frozenset(
    {"Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "No", "Pc", "Pd", "Zs"}
)
_FS_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _check_project(project: Any) -> str:
    if not isinstance(project, str) or not _PROJECT_RE.fullmatch(project):
        raise _invalid(
            f"Invalid project ID {project!r}: 6-30 characters, lowercase letters, digits and "
            "hyphens, starting with a letter and not ending with a hyphen (optionally "
            "domain-scoped, like example.com:my-project)"
        )
    return project


def _check_dataset(dataset: Any) -> str:
    if not isinstance(dataset, str) or not _DATASET_RE.fullmatch(dataset):
        raise _invalid(
            f"Invalid dataset ID {dataset!r}: dataset IDs must be alphanumeric (plus "
            "underscores) and must be at most 1024 characters long"
        )
    return dataset


def _check_table(table: Any) -> str:
    ok = (
        isinstance(table, str)
        and 0 < len(table.encode("utf-8", "surrogatepass")) <= 1024
        and all(unicodedata.category(ch) in _TABLE_CATEGORIES for ch in table)
    )
    if not ok:
        raise _invalid(
            f"Invalid table ID {table!r}: table IDs may contain letters, marks, numbers, "
            "connectors (_), dashes (-) and spaces, at most 1024 UTF-8 bytes"
        )
    return table


def _fs_name(ident: str) -> str:
    """File-system name for a validated id; never '.', '..', empty, or containing a separator."""
    out = []
    for ch in ident:
        if ch in _FS_SAFE:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    name = "".join(out)
    if len(name) > _MAX_FS_NAME:  # '~' never appears in an encoded name: no collisions
        name = "~" + hashlib.sha256(ident.encode("utf-8", "surrogatepass")).hexdigest()
    return name


def _now_ms() -> int:
    return int(time.time() * 1000)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # pragma: no cover
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict | None:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=1, sort_keys=True, ensure_ascii=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------- locks

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(key: str) -> threading.Lock:
    with _THREAD_LOCKS_GUARD:
        lock = _THREAD_LOCKS.get(key)
        if lock is None:
            lock = _THREAD_LOCKS[key] = threading.Lock()
        return lock


# --------------------------------------------------------------------------- schemas

_TYPE_ALIASES = {
    "STRING": "STRING",
    "BYTES": "BYTES",
    "INTEGER": "INTEGER",
    "INT64": "INTEGER",
    "FLOAT": "FLOAT",
    "FLOAT64": "FLOAT",
    "NUMERIC": "NUMERIC",
    "BOOLEAN": "BOOLEAN",
    "BOOL": "BOOLEAN",
    "DATE": "DATE",
    "TIME": "TIME",
    "DATETIME": "DATETIME",
    "TIMESTAMP": "TIMESTAMP",
    "RECORD": "RECORD",
    "STRUCT": "RECORD",
    "JSON": "JSON",
}
_MODES = ("NULLABLE", "REQUIRED", "REPEATED")


def normalize_schema(schema: Any) -> list[dict]:
    """Validate a BigQuery schema (list of TableFieldSchema dicts, or ``{"fields": [...]}``) and
    return it with canonical type names (INTEGER, FLOAT, BOOLEAN, RECORD...) and explicit modes."""
    if isinstance(schema, dict) and "fields" in schema:
        schema = schema["fields"]
    if not isinstance(schema, (list, tuple)):
        raise _invalid("Schema must be a list of fields")
    counter = [0]
    fields = _normalize_fields(schema, "", 1, counter)
    if not fields:
        raise _invalid("Schema must have at least one field")
    return fields


def _normalize_fields(fields: Any, prefix: str, depth: int, counter: list[int]) -> list[dict]:
    if depth > MAX_NESTING:
        raise _invalid(f"Field {prefix.rstrip('.')} nests RECORDs more than {MAX_NESTING} levels deep")
    out: list[dict] = []
    seen: dict[str, str] = {}
    for f in fields:
        if not isinstance(f, dict):
            raise _invalid(f"Schema field under {prefix or 'the table'} is not an object")
        name = f.get("name")
        if not isinstance(name, str) or not _FIELD_NAME_RE.fullmatch(name):
            raise _invalid(
                f"Invalid field name {prefix}{name!r}: fields must contain only letters, numbers "
                "and underscores, start with a letter or underscore, and be at most 300 characters long"
            )
        path = prefix + name
        if name.lower() in seen:
            raise _invalid(f"Duplicate field name {path} (field names are case-insensitive)")
        seen[name.lower()] = name
        raw_type = f.get("type")
        typ = _TYPE_ALIASES.get(raw_type.upper()) if isinstance(raw_type, str) else None
        if typ is None:
            raise _invalid(f"Field {path} has unsupported type {raw_type!r}")
        mode = f.get("mode") or "NULLABLE"
        mode = mode.upper() if isinstance(mode, str) else mode
        if mode not in _MODES:
            raise _invalid(f"Field {path} has invalid mode {f.get('mode')!r}")
        counter[0] += 1
        if counter[0] > MAX_COLUMNS:
            raise _invalid(f"Too many columns (more than {MAX_COLUMNS}, nested fields included)")
        nf: dict = {"name": name, "type": typ, "mode": mode}
        sub = f.get("fields")
        if typ == "RECORD":
            if not sub:
                raise _invalid(f"Field {path} is type RECORD but has no schema")
            nf["fields"] = _normalize_fields(sub, path + ".", depth + 1, counter)
        elif sub:
            raise _invalid(f"Field {path} is type {typ} and cannot have sub-fields")
        if isinstance(f.get("description"), str):
            nf["description"] = f["description"]
        out.append(nf)
    return out


def _strip(fields: list[dict]) -> list[dict]:
    """Schema without descriptions, for comparisons."""
    out = []
    for f in fields:
        g = {"name": f["name"], "type": f["type"], "mode": f["mode"]}
        if "fields" in f:
            g["fields"] = _strip(f["fields"])
        out.append(g)
    return out


def _base_arrow_type(field: dict) -> pa.DataType:
    t = field["type"]
    if t == "RECORD":
        return pa.struct([_arrow_field(f) for f in field["fields"]])
    return {
        "STRING": pa.string(),
        "JSON": pa.string(),
        "BYTES": pa.binary(),
        "INTEGER": pa.int64(),
        "FLOAT": pa.float64(),
        "NUMERIC": pa.decimal128(38, 9),
        "BOOLEAN": pa.bool_(),
        "DATE": pa.date32(),
        "TIME": pa.time64("us"),
        "DATETIME": pa.timestamp("us"),
        "TIMESTAMP": pa.timestamp("us", tz="UTC"),
    }[t]


def _arrow_type(field: dict) -> pa.DataType:
    base = _base_arrow_type(field)
    if field["mode"] == "REPEATED":
        # "element" is what Parquet's compliant list layout reads back as: types round-trip equal.
        return pa.list_(pa.field("element", base))
    return base


def _arrow_field(field: dict) -> pa.Field:
    # Everything is nullable in storage; REQUIRED is enforced when rows are written.
    return pa.field(field["name"], _arrow_type(field))


def arrow_schema(schema: list[dict]) -> pa.Schema:
    """Arrow schema for a normalised BigQuery schema."""
    return pa.schema([_arrow_field(f) for f in schema])


def _merge_schema(old: list[dict], new: list[dict], prefix: str = "") -> list[dict]:
    """Additive union of two schemas (old order first). Raises INVALID_ARGUMENT on conflicts."""
    out = [copy.deepcopy(f) for f in old]
    by_exact = {f["name"]: i for i, f in enumerate(out)}
    by_lower = {f["name"].lower(): f["name"] for f in out}
    for nf in new:
        path = prefix + nf["name"]
        i = by_exact.get(nf["name"])
        if i is None:
            if nf["name"].lower() in by_lower:
                raise _invalid(
                    f"Field {path} conflicts with existing field {prefix}{by_lower[nf['name'].lower()]} "
                    "(field names are case-insensitive)"
                )
            if nf["mode"] == "REQUIRED":
                raise _invalid(f"Cannot add required field {path} to an existing schema")
            out.append(copy.deepcopy(nf))
            continue
        of = out[i]
        if of["type"] != nf["type"]:
            raise _invalid(f"Field {path} has changed type from {of['type']} to {nf['type']}")
        if (of["mode"] == "REPEATED") != (nf["mode"] == "REPEATED"):
            raise _invalid(f"Field {path} has changed mode from {of['mode']} to {nf['mode']}")
        if of["mode"] == "REQUIRED" and nf["mode"] == "NULLABLE":
            of["mode"] = "NULLABLE"  # relaxation
        if of["type"] == "RECORD":
            of["fields"] = _merge_schema(of["fields"], nf["fields"], path + ".")
    return out


def _needs_normalize(field: dict) -> bool:
    if field["mode"] in ("REPEATED", "REQUIRED"):
        return True
    return field["type"] == "RECORD" and any(_needs_normalize(f) for f in field["fields"])


def _has_json(fields: list[dict]) -> bool:
    return any(f["type"] == "JSON" or (f["type"] == "RECORD" and _has_json(f["fields"])) for f in fields)


# --------------------------------------------------------------------------- arrow helpers


def _any_true(mask: pa.Array) -> bool:
    return bool(pc.any(mask).as_py())


def _normalize_array(arr: pa.Array, field: dict, path: str) -> pa.Array:
    """Enforce BigQuery's array rules on freshly converted data: NULL arrays become [], NULL
    elements are rejected, REQUIRED nested fields must be set where their parent is."""
    if field["mode"] == "REPEATED":
        if arr.flatten().null_count:
            raise _invalid(f"Field {path}: an array cannot contain a NULL element")
        values = arr.values
        if field["type"] == "RECORD":
            values = _normalize_array(values, {**field, "mode": "NULLABLE"}, path)
        if arr.null_count == 0 and values is arr.values:
            return arr
        # ``offsets`` has no validity bitmap: NULL lists (zero-length slots) become empty lists.
        return pa.ListArray.from_arrays(arr.offsets, values, type=arr.type)
    if field["type"] != "RECORD":
        return arr
    valid = arr.is_valid() if arr.null_count else None
    children = []
    changed = False
    for i, sub in enumerate(field["fields"]):
        child = arr.field(i)
        if sub["mode"] == "REQUIRED" and child.null_count:
            nulls = child.is_null() if valid is None else pc.and_(child.is_null(), valid)
            if _any_true(nulls):
                raise _invalid(f"Missing required field: {path}.{sub['name']}")
        if _needs_normalize(sub):
            new = _normalize_array(child, sub, f"{path}.{sub['name']}")
            changed = changed or new is not child
            child = new
        children.append(child)
    if not changed:
        return arr
    return pa.StructArray.from_arrays(
        children, fields=list(arr.type), mask=arr.is_null() if arr.null_count else None
    )


def _empty_array(n: int, field: dict) -> pa.Array:
    """Values for a column added by widening: NULL, or [] for REPEATED."""
    typ = _arrow_type(field)
    if field["mode"] == "REPEATED":
        offsets = pa.nulls(n + 1, pa.int32()).fill_null(0)
        return pa.ListArray.from_arrays(offsets, pa.array([], type=typ.value_type), type=typ)
    return pa.nulls(n, type=typ)


def _conform_array(arr: pa.Array, old: dict, new: dict) -> pa.Array:
    """Re-shape ``arr`` (stored under field ``old``) to field ``new`` (a widening of it)."""
    if _strip([old]) == _strip([new]):
        return arr
    if new["type"] != "RECORD":  # only the mode was relaxed: same storage
        return arr
    if new["mode"] == "REPEATED":
        values = _conform_array(arr.values, {**old, "mode": "NULLABLE"}, {**new, "mode": "NULLABLE"})
        return pa.ListArray.from_arrays(
            arr.offsets, values, type=_arrow_type(new), mask=arr.is_null() if arr.null_count else None
        )
    old_children = {f["name"]: (i, f) for i, f in enumerate(old["fields"])}
    children = []
    for sub in new["fields"]:
        hit = old_children.get(sub["name"])
        if hit is None:
            children.append(_empty_array(len(arr), sub))
        else:
            children.append(_conform_array(arr.field(hit[0]), hit[1], sub))
    return pa.StructArray.from_arrays(
        children,
        fields=[_arrow_field(f) for f in new["fields"]],
        mask=arr.is_null() if arr.null_count else None,
    )


def _conform_batch(batch: pa.RecordBatch, old: list[dict], new: list[dict], schema: pa.Schema) -> pa.RecordBatch:
    old_by_name = {f["name"]: f for f in old}
    cols = []
    for f in new:
        of = old_by_name.get(f["name"])
        if of is None:
            cols.append(_empty_array(batch.num_rows, f))
        else:
            cols.append(_conform_array(batch.column(f["name"]), of, f))
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def _json_prep(fields: list[dict]) -> Callable[[dict], dict]:
    """Row transformer turning non-string JSON values into JSON text (only built if needed)."""

    def conv_value(v: Any, f: dict) -> Any:
        if v is None:
            return None
        if f["type"] == "JSON":
            return v if isinstance(v, str) else json.dumps(v, default=str, separators=(",", ":"))
        if f["type"] == "RECORD" and isinstance(v, dict):
            return conv_row(v, f["fields"])
        return v

    def conv_row(row: dict, flds: list[dict]) -> dict:
        out = dict(row)
        for f in flds:
            if f["type"] != "JSON" and not (f["type"] == "RECORD" and _has_json(f["fields"])):
                continue
            v = out.get(f["name"])
            if v is None:
                continue
            if f["mode"] == "REPEATED" and isinstance(v, (list, tuple)):
                out[f["name"]] = [conv_value(x, f) for x in v]
            else:
                out[f["name"]] = conv_value(v, f)
        return out

    return lambda row: conv_row(row, fields)


# --------------------------------------------------------------------------- staged writer


class RowEncoder:
    """Rows (dicts) -> Arrow record batches of a normalised schema, with BigQuery's rules enforced
    (unknown fields, REQUIRED, no NULL in arrays, JSON as text). Used by the staged writer, and by
    export workers that hand the server Arrow data instead of Python rows."""

    def __init__(self, fields: list[dict], label: str):
        self.fields = fields
        self.label = label
        self.schema = arrow_schema(fields)
        self.names = frozenset(f["name"] for f in fields)
        self.norm = [(i, f) for i, f in enumerate(fields) if _needs_normalize(f)]
        self.prep = _json_prep(fields) if _has_json(fields) else None

    def batch(self, rows: list[dict]) -> pa.RecordBatch:
        for row in rows:
            if not isinstance(row, dict):
                raise _invalid(f"Rows for {self.label} must be objects, got {type(row).__name__}")
            if not self.names.issuperset(row):
                extra = sorted(map(str, set(row) - self.names))
                raise _invalid(f"Row for {self.label} has no such field: {extra[0]}")
        if self.prep is not None:
            rows = [self.prep(r) for r in rows]
        try:
            batch = pa.RecordBatch.from_pylist(rows, schema=self.schema)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            raise _invalid(f"Invalid row data for {self.label}: {exc}") from None
        if self.norm:
            cols = batch.columns
            changed = False
            for i, f in self.norm:
                col = cols[i]
                if f["mode"] == "REQUIRED" and col.null_count:
                    raise _invalid(f"Missing required field: {f['name']}")
                new = _normalize_array(col, f, f["name"])
                if new is not col:
                    cols[i] = new
                    changed = True
            if changed:
                batch = pa.RecordBatch.from_arrays(cols, schema=self.schema)
        return batch


def conform_batch(batch: pa.RecordBatch, old: list[dict], new: list[dict]) -> pa.RecordBatch:
    """A batch written under normalised schema ``old`` re-shaped to ``new``, an additive widening of it
    (new columns and nested fields NULL or [], relaxed modes): column by column, no row is touched."""
    if _strip(old) == _strip(new):
        return batch
    return _conform_batch(batch, old, new, arrow_schema(new))


class _StagedWriter:
    """Streams row batches into Parquet files in a private staging folder."""

    def __init__(self, staging: Path, fields: list[dict], label: str):
        self.staging = staging
        self.fields = fields
        self.label = label
        self.encoder = RowEncoder(fields, label)
        self.schema = self.encoder.schema
        self.files: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._path: Path | None = None
        self._file_rows = 0
        self._buf: list[pa.RecordBatch] = []
        self._buf_rows = 0
        self._buf_bytes = 0

    def add_rows(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.add_batch(self.encoder.batch(rows))

    def add_batch(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        self._buf.append(batch)
        self._buf_rows += batch.num_rows
        self._buf_bytes += batch.nbytes
        if self._buf_rows >= ROW_GROUP_ROWS or self._buf_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        if self._writer is None:
            self._open()
        table = pa.Table.from_batches(self._buf, schema=self.schema)
        self._buf, self._buf_rows, self._buf_bytes = [], 0, 0
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self._file_rows += table.num_rows
        if self._file_rows >= FILE_MAX_ROWS:
            self._close_file()

    def _open(self) -> None:
        self._path = self.staging / f"part-{uuid.uuid4().hex}.parquet"
        self._writer = pq.ParquetWriter(self._path, self.schema)
        self._file_rows = 0
        with contextlib.suppress(OSError):
            os.utime(self.staging)  # keeps a long-running write from looking stale

    def _close_file(self) -> None:
        assert self._writer is not None and self._path is not None
        self._writer.close()
        self._writer = None
        with open(self._path, "rb+") as fh:
            os.fsync(fh.fileno())
        self.files.append(
            {"name": self._path.name, "numRows": self._file_rows, "numBytes": self._path.stat().st_size}
        )
        self._path = None

    def finish(self) -> list[dict]:
        """Close everything; at least one (possibly empty) file is produced."""
        self._flush()
        if self._writer is None and not self.files:
            self._open()  # an empty file carries the schema for readers
        if self._writer is not None:
            self._close_file()
        return self.files

    def abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None


def _rewrite_file(src: Path, dst_dir: Path, old: list[dict], new: list[dict]) -> list[dict]:
    """Copy one data file into ``dst_dir`` conformed to schema ``new``, one batch at a time."""
    writer = _StagedWriter(dst_dir, new, "rewrite")
    schema = writer.schema
    try:
        pf = pq.ParquetFile(src)
        for batch in pf.iter_batches(batch_size=REWRITE_BATCH_ROWS):
            writer.add_batch(_conform_batch(batch, old, new, schema))
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


# --------------------------------------------------------------------------- warehouse


class Warehouse:
    """A folder of BigQuery-like datasets and tables; safe across threads and processes."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    # ----------------------------------------------------------------- paths and locks

    def _project_dir(self, project: str) -> Path:
        return self.root / "projects" / _fs_name(project)

    def _dataset_dir(self, project: str, dataset: str) -> Path:
        return self._project_dir(project) / "datasets" / _fs_name(dataset)

    def _table_dir(self, project: str, dataset: str, table: str) -> Path:
        return self._dataset_dir(project, dataset) / "tables" / _fs_name(table)

    def _private_dir(self, kind: str) -> Path:
        d = self.root / kind
        d.mkdir(parents=True, exist_ok=True)
        return d

    @contextlib.contextmanager
    def _lock(self, key: str, *, shared: bool = False, thread: bool = False) -> Iterator[None]:
        """Lock named ``key``: flock on a lock file (per open file, so it also excludes other
        threads), plus a process-wide threading lock when ``thread`` is set."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:40]
        path = self._private_dir("locks") / f"{digest}.lock"
        tlock = _thread_lock(str(path)) if (thread or fcntl is None) else None
        if tlock is not None:
            tlock.acquire()
        try:
            if fcntl is None:  # pragma: no cover
                yield
                return
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock
        finally:
            if tlock is not None:
                tlock.release()

    def _dataset_lock(self, project: str, dataset: str, *, shared: bool) -> contextlib.AbstractContextManager:
        return self._lock(f"dataset\0{project}\0{dataset}", shared=shared)

    def _table_lock(self, project: str, dataset: str, table: str) -> contextlib.AbstractContextManager:
        return self._lock(f"table\0{project}\0{dataset}\0{table}", thread=True)

    def _trash(self, path: Path) -> None:
        """Atomically take ``path`` out of the tree, then delete it."""
        dest = self._private_dir("trash") / uuid.uuid4().hex
        os.rename(path, dest)
        shutil.rmtree(dest, ignore_errors=True)

    def _clean_stale_staging(self) -> None:
        staging = self.root / "staging"
        try:
            entries = list(staging.iterdir())
        except OSError:
            return
        cutoff = time.time() - STALE_STAGING_S
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)

    # ----------------------------------------------------------------- datasets

    @staticmethod
    def _not_found_dataset(project: str, dataset: str) -> WarehouseError:
        return WarehouseError("NOT_FOUND", f"Not found: Dataset {project}:{dataset}")

    @staticmethod
    def _not_found_table(project: str, dataset: str, table: str) -> WarehouseError:
        return WarehouseError("NOT_FOUND", f"Not found: Table {project}:{dataset}.{table}")

    def _dataset_meta(self, project: str, dataset: str) -> dict | None:
        return _read_json(self._dataset_dir(project, dataset) / "dataset.json")

    def create_dataset(
        self,
        project: str,
        dataset: str,
        *,
        exists_ok: bool = False,
        location: str = "US",
        labels: dict | None = None,
        description: str | None = None,
    ) -> dict:
        _check_project(project)
        _check_dataset(dataset)
        if labels is not None and not (
            isinstance(labels, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
        ):
            raise _invalid("labels must be a map of strings to strings")
        if not isinstance(location, str) or not location:
            raise _invalid("location must be a non-empty string")
        with self._dataset_lock(project, dataset, shared=False):
            existing = self._dataset_meta(project, dataset)
            if existing is not None:
                if exists_ok:
                    return existing
                raise WarehouseError("ALREADY_EXISTS", f"Already Exists: Dataset {project}:{dataset}")
            ddir = self._dataset_dir(project, dataset)
            (ddir / "tables").mkdir(parents=True, exist_ok=True)
            now = _now_ms()
            meta = {
                "kind": "bigquery#dataset",
                "id": f"{project}:{dataset}",
                "datasetReference": {"projectId": project, "datasetId": dataset},
                "location": location,
                "labels": dict(labels or {}),
                "creationTime": now,
                "lastModifiedTime": now,
            }
            if description is not None:
                meta["description"] = str(description)
            _write_json_atomic(ddir / "dataset.json", meta)
            return copy.deepcopy(meta)

    def get_dataset(self, project: str, dataset: str) -> dict:
        _check_project(project)
        _check_dataset(dataset)
        meta = self._dataset_meta(project, dataset)
        if meta is None:
            raise self._not_found_dataset(project, dataset)
        return meta

    def update_dataset(self, project: str, dataset: str, change: Callable[[dict], None]) -> dict:
        """Apply `change` to the dataset's metadata (e.g. its access entries) under the dataset's lock."""
        with self._dataset_lock(project, dataset, shared=False):
            meta = self.get_dataset(project, dataset)
            change(meta)
            meta["lastModifiedTime"] = max(_now_ms(), int(meta.get("lastModifiedTime", 0)) + 1)
            _write_json_atomic(self._dataset_dir(project, dataset) / "dataset.json", meta)
            return copy.deepcopy(meta)

    def list_datasets(self, project: str) -> list[dict]:
        _check_project(project)
        out = []
        try:
            entries = list((self._project_dir(project) / "datasets").iterdir())
        except OSError:
            return []
        for entry in entries:
            meta = _read_json(entry / "dataset.json")
            if meta is not None:
                out.append(meta)
        out.sort(key=lambda m: m["datasetReference"]["datasetId"])
        return out

    def delete_dataset(self, project: str, dataset: str, *, delete_contents: bool = False) -> None:
        _check_project(project)
        _check_dataset(dataset)
        with self._dataset_lock(project, dataset, shared=False):
            if self._dataset_meta(project, dataset) is None:
                raise self._not_found_dataset(project, dataset)
            if not delete_contents and self._table_manifests(project, dataset):
                raise WarehouseError(
                    "FAILED_PRECONDITION", f"Dataset {project}:{dataset} is still in use"
                )
            self._trash(self._dataset_dir(project, dataset))

    # ----------------------------------------------------------------- tables

    def _manifest(self, project: str, dataset: str, table: str) -> dict | None:
        return _read_json(self._table_dir(project, dataset, table) / "manifest.json")

    def _table_manifests(self, project: str, dataset: str) -> list[dict]:
        try:
            entries = list((self._dataset_dir(project, dataset) / "tables").iterdir())
        except OSError:
            return []
        out = []
        for entry in entries:
            m = _read_json(entry / "manifest.json")
            if m is not None:
                out.append(m)
        return out

    @staticmethod
    def _resource(m: dict) -> dict:
        ref = m["tableReference"]
        return {
            "kind": "bigquery#table",
            "id": f"{ref['projectId']}:{ref['datasetId']}.{ref['tableId']}",
            "tableReference": dict(ref),
            "type": "TABLE",
            "location": m.get("location", "US"),
            "schema": copy.deepcopy(m["schema"]),
            "numRows": m["numRows"],
            "numBytes": sum(f["numBytes"] for f in m["files"]),
            "creationTime": m["creationTime"],
            "lastModifiedTime": m["lastModifiedTime"],
        }

    def get_table(self, project: str, dataset: str, table: str) -> dict | None:
        _check_project(project)
        _check_dataset(dataset)
        _check_table(table)
        m = self._manifest(project, dataset, table)
        return None if m is None else self._resource(m)

    def list_tables(self, project: str, dataset: str) -> list[dict]:
        self.get_dataset(project, dataset)
        out = [self._resource(m) for m in self._table_manifests(project, dataset)]
        out.sort(key=lambda r: r["tableReference"]["tableId"])
        return out

    def delete_table(self, project: str, dataset: str, table: str) -> None:
        _check_project(project)
        _check_dataset(dataset)
        _check_table(table)
        with self._dataset_lock(project, dataset, shared=True), self._table_lock(project, dataset, table):
            if self._manifest(project, dataset, table) is None:
                raise self._not_found_table(project, dataset, table)
            self._trash(self._table_dir(project, dataset, table))

    # ----------------------------------------------------------------- writes

    def write_table(
        self,
        project: str,
        dataset: str,
        table: str,
        schema: list[dict],
        batches: Iterable[list[dict]],
        *,
        if_exists: str,
        cancelled: Callable[[], bool] | None = None,
    ) -> dict:
        """Stream ``batches`` of rows into the table and commit them atomically.

        if_exists: "error" (force=false), "error_if_nonempty" (WRITE_EMPTY), "truncate"
        (WRITE_TRUNCATE / force=true), "append" (WRITE_APPEND, additive schema widening); the
        API's WRITE_* names are accepted too. A missing table is created in every case.
        """
        _check_project(project)
        _check_dataset(dataset)
        _check_table(table)
        mode = IF_EXISTS.get(if_exists) if isinstance(if_exists, str) else None
        if mode is None:
            raise _invalid(f"Invalid if_exists {if_exists!r}")
        fields = normalize_schema(schema)
        label = f"{project}:{dataset}.{table}"

        # Fail fast (the same checks run again, authoritatively, at commit time).
        if self._dataset_meta(project, dataset) is None:
            raise self._not_found_dataset(project, dataset)
        current = self._manifest(project, dataset, table)
        self._check_disposition(current, mode, label)
        target = _merge_schema(current["schema"], fields) if (current and mode == "append") else fields

        self._clean_stale_staging()
        staging = self._private_dir("staging") / uuid.uuid4().hex
        staging.mkdir()
        writer = _StagedWriter(staging, target, label)
        try:
            if cancelled is not None and cancelled():
                raise WarehouseError("CANCELLED", f"Write to {label} was cancelled")
            for batch in batches:
                if isinstance(batch, pa.RecordBatch):  # Arrow data in the schema given (``fields``)
                    if not batch.schema.equals(writer.schema):
                        try:
                            batch = _conform_batch(batch, fields, target, writer.schema)
                        except (KeyError, pa.ArrowException) as exc:
                            raise _invalid(f"Arrow batch for {label} does not have the schema given: "
                                           f"{exc}") from None
                    writer.add_batch(batch)
                else:
                    writer.add_rows(list(batch))
                if cancelled is not None and cancelled():
                    raise WarehouseError("CANCELLED", f"Write to {label} was cancelled")
            staged = writer.finish()
            if cancelled is not None and cancelled():
                raise WarehouseError("CANCELLED", f"Write to {label} was cancelled")
            return self._commit(project, dataset, table, mode, fields, target, staging, staged)
        except BaseException:
            writer.abort()
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _check_disposition(current: dict | None, mode: str, label: str) -> None:
        if current is None:
            return
        if mode == "error" or (mode == "error_if_nonempty" and current["numRows"] > 0):
            raise WarehouseError("FAILED_PRECONDITION", f"Already Exists: Table {label}")

    def _commit(
        self,
        project: str,
        dataset: str,
        table: str,
        mode: str,
        fields: list[dict],
        staged_schema: list[dict],
        staging: Path,
        staged: list[dict],
    ) -> dict:
        label = f"{project}:{dataset}.{table}"
        with self._dataset_lock(project, dataset, shared=True), self._table_lock(project, dataset, table):
            if self._dataset_meta(project, dataset) is None:
                raise self._not_found_dataset(project, dataset)
            tdir = self._table_dir(project, dataset, table)
            current = _read_json(tdir / "manifest.json")
            self._check_disposition(current, mode, label)
            now = _now_ms()
            if current is not None and mode == "append":
                final = _merge_schema(current["schema"], fields)
                parts = [(tdir / f["name"], f, current["schema"]) for f in current["files"]]
            else:
                # New table, or the rows are replaced (truncate; WRITE_EMPTY on an empty table):
                # the schema is the one given.
                final = staged_schema
                parts = []
            parts += [(staging / f["name"], f, staged_schema) for f in staged]
            # Keep a single empty file only when the table has no rows at all.
            if any(f["numRows"] for _, f, _ in parts):
                parts = [p for p in parts if p[1]["numRows"]]
            else:
                parts = parts[-1:]

            created_dir = not tdir.exists()
            tdir.mkdir(parents=True, exist_ok=True)
            moved: list[Path] = []
            try:
                files: list[dict] = []
                final_stripped = _strip(final)
                for path, entry, schema in parts:
                    if _strip(schema) == final_stripped:
                        todo = [(path, entry)]
                    else:  # widened: rewrite under the final schema
                        todo = [(staging / e["name"], e) for e in _rewrite_file(path, staging, schema, final)]
                    for src, e in todo:
                        if src.parent != tdir:
                            os.rename(src, tdir / e["name"])
                            moved.append(tdir / e["name"])
                        files.append(dict(e))
                manifest = {
                    "formatVersion": 1,
                    "tableReference": {"projectId": project, "datasetId": dataset, "tableId": table},
                    "location": "US",
                    "schema": final,
                    "files": files,
                    "numRows": sum(f["numRows"] for f in files),
                    "creationTime": current["creationTime"] if current else now,
                    "lastModifiedTime": max(now, current["lastModifiedTime"]) if current else now,
                    "generation": (current.get("generation", 0) + 1) if current else 1,
                }
                for f in moved:
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                _fsync_dir(tdir)
                _write_json_atomic(tdir / "manifest.json", manifest)  # the commit point
            except BaseException:
                for f in moved:
                    with contextlib.suppress(OSError):
                        os.unlink(f)
                if created_dir:
                    shutil.rmtree(tdir, ignore_errors=True)
                raise
            # Garbage: everything in the folder that the new manifest does not list.
            keep = {f["name"] for f in files} | {"manifest.json"}
            for entry in tdir.iterdir():
                if entry.name not in keep and not entry.name.startswith(".manifest.json.tmp-"):
                    with contextlib.suppress(OSError):
                        entry.unlink()
            return self._resource(manifest)

    # ----------------------------------------------------------------- DML (see bq_script.py)

    @contextlib.contextmanager
    def write_locks(self, tables: Iterable[tuple[str, str, str]]) -> Iterator[None]:
        """Hold the locks a commit takes (dataset shared, then table) on several tables at once,
        each kind in sorted order, so DML jobs and exports never wait on each other in a cycle.
        Exports stage without a lock and commit under the table lock: while a DML job holds it,
        an export's commit of that table waits and then applies on top of the DML's result."""
        keys = sorted(set(tables))
        for project, dataset, table in keys:
            _check_project(project)
            _check_dataset(dataset)
            _check_table(table)
        with contextlib.ExitStack() as stack:
            for project, dataset in sorted({(p, d) for p, d, _ in keys}):
                stack.enter_context(self._dataset_lock(project, dataset, shared=True))
            for project, dataset, table in keys:
                stack.enter_context(self._table_lock(project, dataset, table))
            yield

    def new_staging_dir(self) -> Path:
        self._clean_stale_staging()
        staging = self._private_dir("staging") / uuid.uuid4().hex
        staging.mkdir()
        return staging

    def table_snapshot(self, project: str, dataset: str, table: str) -> tuple[dict, Path]:
        """(manifest, table folder) of an existing table; NOT_FOUND naming the dataset or table."""
        _check_project(project)
        _check_dataset(dataset)
        _check_table(table)
        m = self._manifest(project, dataset, table)
        if m is None:
            if self._dataset_meta(project, dataset) is None:
                raise self._not_found_dataset(project, dataset)
            raise self._not_found_table(project, dataset, table)
        return m, self._table_dir(project, dataset, table)

    def commit_files_locked(self, project: str, dataset: str, table: str, base: dict,
                            files: list[tuple[Path, dict]]) -> dict:
        """Replace the manifest of a table whose locks the caller holds (``write_locks``) with
        one listing ``files`` ((path, entry) pairs: files already in the table folder, or staged
        files, moved in here), under ``base``'s schema. The manifest replace is the commit point,
        as in ``_commit``: before it the table is exactly as it was."""
        label = f"{project}:{dataset}.{table}"
        tdir = self._table_dir(project, dataset, table)
        current = _read_json(tdir / "manifest.json")
        if current is None or current.get("generation") != base.get("generation"):
            raise WarehouseError("ABORTED", f"Table {label} changed while a DML job held its lock")
        moved: list[Path] = []
        try:
            entries = []
            for path, entry in files:
                if path.parent != tdir:
                    os.rename(path, tdir / entry["name"])
                    moved.append(tdir / entry["name"])
                entries.append(dict(entry))
            for f in moved:
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tdir)
            now = _now_ms()
            manifest = dict(current)
            manifest.update({"files": entries, "numRows": sum(e["numRows"] for e in entries),
                             "lastModifiedTime": max(now, current["lastModifiedTime"]),
                             "generation": current.get("generation", 0) + 1})
            _write_json_atomic(tdir / "manifest.json", manifest)  # the commit point
        except BaseException:
            for f in moved:
                with contextlib.suppress(OSError):
                    os.unlink(f)
            raise
        keep = {e["name"] for e in entries} | {"manifest.json"}
        for entry in tdir.iterdir():
            if entry.name not in keep and not entry.name.startswith(".manifest.json.tmp-"):
                with contextlib.suppress(OSError):
                    entry.unlink()
        return self._resource(manifest)

    # ----------------------------------------------------------------- reads

    def list_rows(
        self, project: str, dataset: str, table: str, *, start_index: int = 0, max_results: int | None = None
    ) -> tuple[list[dict], list[dict], int]:
        """(schema, rows, total rows) for one page, read straight from the table's files."""
        _check_project(project)
        _check_dataset(dataset)
        _check_table(table)
        if not isinstance(start_index, int) or start_index < 0:
            raise _invalid("start_index must be a non-negative integer")
        if max_results is not None and (not isinstance(max_results, int) or max_results < 0):
            raise _invalid("max_results must be a non-negative integer")
        tdir = self._table_dir(project, dataset, table)
        for attempt in range(_READ_RETRIES):
            m = self._manifest(project, dataset, table)
            if m is None:
                if self._dataset_meta(project, dataset) is None:
                    raise self._not_found_dataset(project, dataset)
                raise self._not_found_table(project, dataset, table)
            try:
                rows = self._read_rows(tdir, m, start_index, max_results)
            except (FileNotFoundError, OSError):
                if attempt + 1 == _READ_RETRIES:
                    raise
                continue  # a concurrent commit replaced the files: take a fresh snapshot
            return copy.deepcopy(m["schema"]), rows, m["numRows"]
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _read_rows(tdir: Path, m: dict, start: int, limit: int | None) -> list[dict]:
        rows: list[dict] = []
        skip = start
        for f in m["files"]:
            if limit is not None and len(rows) >= limit:
                break
            if skip >= f["numRows"]:
                skip -= f["numRows"]
                continue
            pf = pq.ParquetFile(tdir / f["name"])
            for batch in pf.iter_batches(batch_size=8192):
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                want = batch.num_rows - skip if limit is None else min(batch.num_rows - skip, limit - len(rows))
                rows.extend(batch.slice(skip, want).to_pylist())
                skip = 0
                if limit is not None and len(rows) >= limit:
                    break
        return rows

    def _resolve_project(self, dataset: str, default_project: str | None) -> str:
        if default_project:
            return _check_project(default_project)
        hits = []
        try:
            for pdir in (self.root / "projects").iterdir():
                meta = _read_json(pdir / "datasets" / _fs_name(dataset) / "dataset.json")
                if meta is not None:
                    hits.append(meta["datasetReference"]["projectId"])
        except OSError:
            pass
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise WarehouseError("NOT_FOUND", f"Not found: Dataset {dataset} (no project has it)")
        raise _invalid(
            f"Dataset {dataset} exists in several projects ({', '.join(sorted(hits))}): "
            "qualify the table as `project.dataset.table`"
        )

    def query(
        self, sql: str, *, default_project: str | None = None, params: dict | list | tuple | None = None
    ) -> tuple[list[dict], list[dict]]:
        """Run one BigQuery Standard SQL SELECT; returns (schema fields, rows).

        ``dataset.table`` without a project uses ``default_project`` or, if not given, the only
        project that has that dataset. ``params``: a dict for ``@name`` parameters or a list for
        ``?`` ones.
        """
        import duckdb
        import sqlglot
        from sqlglot import exp

        if not isinstance(sql, str) or not sql.strip():
            raise _invalid("Query text is empty")
        try:
            statements = [s for s in sqlglot.parse(sql, read="bigquery") if s is not None]
        except sqlglot.errors.SqlglotError as exc:
            raise _invalid(f"Syntax error: {exc}") from None
        if len(statements) != 1:
            raise _invalid("Exactly one statement per query is supported")
        tree = statements[0]
        if not isinstance(tree, exp.Query):
            raise _invalid("Only SELECT queries are supported by the local warehouse")

        ctes = {c.alias_or_name.lower() for c in tree.find_all(exp.CTE)}
        refs: dict[tuple[str, str, str], str] = {}
        for node in list(tree.find_all(exp.Table)):
            if not isinstance(node.this, exp.Identifier):
                continue
            name, db, catalog = node.name, node.db, node.catalog
            if not db:
                if name.lower() in ctes:
                    continue
                raise _invalid(f'Table "{name}" must be qualified with a dataset (e.g. dataset.table).')
            _check_dataset(db)
            _check_table(name)
            project = _check_project(catalog) if catalog else self._resolve_project(db, default_project)
            key = (project, db, name)
            view = refs.setdefault(key, f"__bq_table_{len(refs)}")
            alias = node.args.get("alias")
            node.set("catalog", None)
            node.set("db", None)
            node.set("this", exp.to_identifier(view, quoted=True))
            if alias is None:
                node.set("alias", exp.TableAlias(this=exp.to_identifier(name, quoted=True)))
        self._name_anonymous_columns(tree)
        in_unnest_as_subquery(tree)
        try:
            duck_sql = tree.sql(dialect="duckdb")
        except sqlglot.errors.SqlglotError as exc:
            raise _invalid(str(exc)) from None

        if isinstance(params, (list, tuple)):
            qparams: Any = list(params)
        elif isinstance(params, dict):
            qparams = dict(params)
        elif params is None:
            qparams = None
        else:
            raise _invalid("params must be a dict (named) or a list (positional)")

        for attempt in range(_READ_RETRIES):
            snapshot = []
            for (project, dataset, table), view in refs.items():
                m = self._manifest(project, dataset, table)
                if m is None:
                    if self._dataset_meta(project, dataset) is None:
                        raise self._not_found_dataset(project, dataset)
                    raise self._not_found_table(project, dataset, table)
                tdir = self._table_dir(project, dataset, table)
                snapshot.append((view, m, [str(tdir / f["name"]) for f in m["files"]]))
            try:
                return self._run_duckdb(duckdb, duck_sql, qparams, snapshot)
            except duckdb.Error as exc:
                missing = any(not os.path.exists(p) for _, _, paths in snapshot for p in paths)
                if missing and attempt + 1 < _READ_RETRIES:
                    continue  # a concurrent commit replaced the files: take a fresh snapshot
                raise _invalid(str(exc)) from None
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _name_anonymous_columns(tree: Any) -> None:
        """BigQuery names unnamed result columns f0_, f1_, ...; DuckDB would use the SQL text."""
        from sqlglot import exp

        select = tree
        while isinstance(select, exp.SetOperation):
            select = select.this
        if isinstance(select, exp.Subquery):
            return
        if not isinstance(select, exp.Select):
            return
        k = 0
        new = []
        for e in select.expressions:
            if isinstance(e, (exp.Alias, exp.Column, exp.Star, exp.Dot)):
                new.append(e)
            else:
                new.append(exp.alias_(e, f"f{k}_", quoted=True))
                k += 1
        select.set("expressions", new)

    @staticmethod
    def _run_duckdb(duckdb: Any, duck_sql: str, params: Any, snapshot: list) -> tuple[list[dict], list[dict]]:
        def lit(s: str) -> str:
            return "'" + s.replace("'", "''") + "'"

        con = duckdb.connect(
            ":memory:", config={"autoinstall_known_extensions": False, "autoload_known_extensions": False}
        )
        try:
            con.execute("SET TimeZone='UTC'")
            paths = [p for _, _, ps in snapshot for p in ps]
            if paths:
                con.execute(f"SET allowed_paths=[{', '.join(lit(p) for p in paths)}]")
            con.execute("SET enable_external_access=false")
            con.execute("SET lock_configuration=true")
            for view, m, ps in snapshot:
                cols = []
                for f in m["schema"]:
                    q = '"' + f["name"].replace('"', '""') + '"'
                    if f["type"] == "JSON":
                        cast = "JSON[]" if f["mode"] == "REPEATED" else "JSON"
                        cols.append(f"CAST({q} AS {cast}) AS {q}")
                    else:
                        cols.append(q)
                con.execute(
                    f'CREATE VIEW "{view}" AS SELECT {", ".join(cols)} '
                    f"FROM read_parquet([{', '.join(lit(p) for p in ps)}])"
                )
            cur = con.execute(duck_sql, params) if params is not None else con.execute(duck_sql)
            desc = cur.description or []
            raw = cur.fetchall()
        finally:
            con.close()
        fields = [_bq_field_from_duck(name, typ) for name, typ, *_ in desc]
        names = [f["name"] for f in fields]
        rows = [{n: _convert_value(v, f) for n, v, f in zip(names, r, fields)} for r in raw]
        return fields, rows


def in_unnest_as_subquery(tree: Any) -> None:
    """Rewrite BigQuery's `x IN UNNEST(array)` as `x IN (SELECT UNNEST(array))`: the same three-valued
    result (NULL when x is NULL, or when the array holds a NULL and nothing matched; FALSE for an empty
    array), but DuckDB runs it as a hash semi-join instead of a per-row list search (20x faster with a
    1,000-element parameter over 100,000 rows)."""
    from sqlglot import exp

    for node in list(tree.find_all(exp.In)):
        unnest = node.args.get("unnest")
        if unnest is None or len(unnest.expressions) != 1 or unnest.args.get("offset"):
            continue
        node.set("unnest", None)
        node.set("query", exp.select(exp.Unnest(expressions=[unnest.expressions[0]])).subquery())


# --------------------------------------------------------------------------- query results

_DUCK_SCALARS = {
    "boolean": "BOOLEAN",
    "tinyint": "INTEGER",
    "smallint": "INTEGER",
    "integer": "INTEGER",
    "bigint": "INTEGER",
    "hugeint": "INTEGER",
    "utinyint": "INTEGER",
    "usmallint": "INTEGER",
    "uinteger": "INTEGER",
    "ubigint": "INTEGER",
    "uhugeint": "INTEGER",
    "float": "FLOAT",
    "double": "FLOAT",
    "varchar": "STRING",
    "uuid": "STRING",
    "enum": "STRING",
    "bit": "STRING",
    "blob": "BYTES",
    "date": "DATE",
    "time": "TIME",
    "time with time zone": "TIME",
    "timestamp": "DATETIME",
    "timestamp_s": "DATETIME",
    "timestamp_ms": "DATETIME",
    "timestamp_ns": "DATETIME",
    "timestamp with time zone": "TIMESTAMP",
    "interval": "INTERVAL",
    "null": "INTEGER",  # BigQuery types a bare NULL as INT64
    "map": "JSON",
    "union": "JSON",
}


def _bq_field_from_duck(name: str, typ: Any) -> dict:
    """BigQuery TableFieldSchema for a DuckDB result column type."""
    tid = getattr(typ, "id", None)
    text = str(typ)
    if tid in ("list", "array"):
        child = dict(typ.children)["child"]
        inner = _bq_field_from_duck(name, child)
        inner["mode"] = "REPEATED"
        return inner
    if tid == "struct":
        return {
            "name": name,
            "type": "RECORD",
            "mode": "NULLABLE",
            "fields": [_bq_field_from_duck(n, t) for n, t in typ.children],
        }
    if tid == "decimal":
        typ_name = "NUMERIC" if text == "DECIMAL(38,9)" else "FLOAT"
    elif text == "JSON":
        typ_name = "JSON"
    else:
        typ_name = _DUCK_SCALARS.get(tid or text.lower(), "STRING")
    return {"name": name, "type": typ_name, "mode": "NULLABLE"}


def _convert_value(v: Any, f: dict) -> Any:
    if v is None:
        return [] if f["mode"] == "REPEATED" else None
    if f["mode"] == "REPEATED":
        g = {**f, "mode": "NULLABLE"}
        return [_convert_value(x, g) for x in v]
    t = f["type"]
    if t == "RECORD":
        return {sf["name"]: _convert_value(v.get(sf["name"]), sf) for sf in f["fields"]}
    if t == "FLOAT" and isinstance(v, decimal.Decimal):
        return float(v)
    if t == "INTEGER" and not isinstance(v, int):
        return int(v)
    if t == "TIMESTAMP" and isinstance(v, _dt.datetime):
        return v.astimezone(_dt.timezone.utc) if v.tzinfo else v.replace(tzinfo=_dt.timezone.utc)
    if t == "STRING" and not isinstance(v, str):
        return str(v)
    if t == "JSON" and not isinstance(v, str):
        return json.dumps(to_jsonable(v))
    return v


def to_jsonable(value: Any) -> Any:
    """Python value -> JSON-friendly value, recursively: DATE 'YYYY-MM-DD', TIME
    'HH:MM:SS[.ffffff]', TIMESTAMP ISO 8601 in UTC ('...+00:00'), DATETIME ISO without zone,
    BYTES base64, NUMERIC as a string, non-finite floats as 'NaN'/'Infinity'/'-Infinity'."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, _dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(_dt.timezone.utc)
        return value.isoformat()
    if isinstance(value, (_dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return str(value)
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return str(value)


# --------------------------------------------------------------------------- CLI helpers


def _warehouse_for(data_dir: str | os.PathLike) -> Warehouse:
    return Warehouse(Path(data_dir) / "bigquery")


def _parse_dataset_ref(ref: str) -> tuple[str, str]:
    """'PROJECT.DATASET' (also bq's 'PROJECT:DATASET'; domain-scoped projects work in both)."""
    for sep in (".", ":"):
        if isinstance(ref, str) and sep in ref:
            project, dataset = ref.rsplit(sep, 1)
            if _PROJECT_RE.fullmatch(project) and _DATASET_RE.fullmatch(dataset):
                return project, dataset
    raise _invalid(f"Invalid dataset reference {ref!r}: expected PROJECT.DATASET")


def cli_bq_mk(data_dir: str | os.PathLike, ref: str, *, exists_ok: bool = False) -> int:
    """``bq mk PROJECT.DATASET``. Like bq: an existing dataset is an error (exit 1) unless
    ``exists_ok`` (bq's ``-f``), which reports it and exits 0."""
    try:
        project, dataset = _parse_dataset_ref(ref)
        wh = _warehouse_for(data_dir)
        try:
            wh.create_dataset(project, dataset)
        except WarehouseError as exc:
            if exc.code != "ALREADY_EXISTS":
                raise
            if not exists_ok:
                print(f"BigQuery error in mk operation: Dataset '{project}:{dataset}' already exists.",
                      file=sys.stderr)
                return 1
            print(f"Dataset '{project}:{dataset}' already exists.")
            return 0
    except WarehouseError as exc:
        print(f"BigQuery error in mk operation: {exc.message}", file=sys.stderr)
        return 1
    print(f"Dataset '{project}:{dataset}' successfully created.")
    return 0


def cli_query(data_dir: str | os.PathLike, sql: str, *, default_project: str | None = None) -> int:
    """``query 'SQL'``: prints the rows as a JSON array of objects; errors go to stderr, exit 1."""
    try:
        _, rows = _warehouse_for(data_dir).query(sql, default_project=default_project)
    except WarehouseError as exc:
        print(f"BigQuery error in query operation: {exc.message}", file=sys.stderr)
        return 1
    json.dump(to_jsonable(rows), sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0
