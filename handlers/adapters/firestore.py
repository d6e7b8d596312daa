"""Firestore over its REST API (v1): the few calls the ledgers need, and nothing else.

    fs = Firestore(project, tokens=...)          # handlers/wiring.py builds it from the settings
    doc = fs.get("dicomExports", "r-1")          # Doc(id, data, version) or None
    fs.commit([fs.create("c", "id", data), fs.update("c", "id2", {"a.b": 1, "x": DELETE}, version=doc.version)])

Documents are plain dicts of str, int, float, bool, None, aware datetimes, bytes, lists and dicts.
A `version` is the document's updateTime exactly as Firestore returned it (an opaque string): an
update conditioned on it is a compare-and-set, the building block of every ledger change (no
transactions: an abandoned transaction holds its locks until they expire, a failed precondition
holds nothing). Update keys are field paths ("events.EXPORT_STARTED.published"); DELETE removes one.

Errors: Conflict when a precondition fails (the document exists, is missing, or changed since it was
read); transport.HttpError for other refusals; transport.Unavailable when Firestore stayed
unavailable for `timeout_s`. Every call here is safe to retry: writes carry preconditions, so a write
whose answer was lost surfaces as a Conflict, never as a second write.

`cas` is the one compare-and-set engine of the ledgers (read, decide, write conditioned on what was
read; on a lost race start over), used for one document (ledger_store.py) and a few at once (batch_store.py).
"""
from __future__ import annotations

import base64
import random
import re
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, NamedTuple, TypeVar

from handlers.core.errors import ContentionError
from handlers.core.ledger import DELETE

from . import transport as gh

Obj = dict[str, Any]

T = TypeVar("T")
AGAIN: Any = object()  # returned by a cas step: the race was lost, start over
RETRY = gh.Retry(rpc_statuses=frozenset({"ABORTED", "UNAVAILABLE"}))
_SIMPLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONFLICT = frozenset({"ALREADY_EXISTS", "FAILED_PRECONDITION", "NOT_FOUND"})
_CONFLICT_CODES = frozenset({5, 6, 9})  # google.rpc codes of the same, in batchWrite's per-write status
OPS = {"==": "EQUAL", "<": "LESS_THAN", "<=": "LESS_THAN_OR_EQUAL", ">": "GREATER_THAN",
       ">=": "GREATER_THAN_OR_EQUAL", "!=": "NOT_EQUAL", "in": "IN"}


class Conflict(Exception):
    """A write's precondition failed: the document exists, is missing, or changed since it was read."""


class Doc(NamedTuple):
    id: str
    data: Obj
    version: str | None  # updateTime


class Firestore:
    def __init__(self, project: str, *, database: str = "(default)", emulator_host: str | None = None,
                 tokens: gh.Tokens | None = None, timeout_s: float = 30.0):
        self.project = project
        self.root = f"projects/{project}/databases/{database}/documents"
        self.base = f"http://{emulator_host}/v1/" if emulator_host else "https://firestore.googleapis.com/v1/"
        # The emulator's documented admin token: it admits batchWrite and bypasses security rules.
        self.tokens = gh.Static("owner") if emulator_host else (tokens or gh.Tokens())
        self.timeout_s = timeout_s

    # -- names -------------------------------------------------------------------------------------------
    def name(self, collection: str, doc_id: str) -> str:
        return f"{self.root}/{collection}/{doc_id}"

    # -- writes (built here, sent by commit / batch_write) -----------------------------------------------
    def create(self, collection: str, doc_id: str, data: Obj) -> Obj:
        """Create the document; Conflict if it exists."""
        return {"update": {"name": self.name(collection, doc_id), "fields": _fields(data)},
                "currentDocument": {"exists": False}}

    def put(self, collection: str, doc_id: str, data: Obj) -> Obj:
        """Create or replace the whole document, unconditionally (seeding and tools)."""
        return {"update": {"name": self.name(collection, doc_id), "fields": _fields(data)}}

    def update(self, collection: str, doc_id: str, updates: Obj, *, version: str | None = None) -> Obj:
        """Set (or DELETE) the given field paths; only if the document is at `version`, or, without one,
        only if it exists (Conflict otherwise)."""
        root: Obj = {}
        for path, value in updates.items():
            *parents, leaf = path.split(".")
            node = root
            for p in parents:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise ValueError(f"update paths overlap at {path!r}")
            if value is not DELETE:
                node[leaf] = value
        return {"update": {"name": self.name(collection, doc_id), "fields": _fields(root)},
                "updateMask": {"fieldPaths": [_field_path(p) for p in updates]},
                "currentDocument": {"updateTime": version} if version else {"exists": True}}

    def delete(self, collection: str, doc_id: str, *, version: str | None = None) -> Obj:
        """Delete the document; only if it is at `version` (Conflict otherwise), or, without one, whether or
        not it exists."""
        write: Obj = {"delete": self.name(collection, doc_id)}
        if version:
            write["currentDocument"] = {"updateTime": version}
        return write

    # -- calls -------------------------------------------------------------------------------------------
    def commit(self, writes: list[Obj]) -> list[str]:
        """All writes atomically; their new versions. Conflict if any precondition fails (then none is applied)."""
        try:
            body = self._post(":commit", {"writes": writes}).json()
        except gh.HttpError as e:
            if e.status in _CONFLICT or e.http_status == 409:
                raise Conflict(e.message) from None
            raise
        return [w.get("updateTime") or body.get("commitTime") for w in body.get("writeResults", [])]

    def batch_write(self, writes: list[Obj]) -> list[str | None]:
        """Each write alone (not atomic, up to 500): per write its new version, or None when its precondition
        failed. Other per-write failures raise HttpError."""
        body = self._post(":batchWrite", {"writes": writes}).json()
        out = []
        statuses = body.get("status") or [{}] * len(writes)
        for result, status in zip(body.get("writeResults", []), statuses):
            code = int(status.get("code") or 0)
            if code == 0:
                out.append(result.get("updateTime"))
            elif code in _CONFLICT_CODES:
                out.append(None)
            else:
                raise gh.HttpError(500, str(code), status.get("message", "")[:500])
        return out

    def get(self, collection: str, doc_id: str) -> Doc | None:
        return self.get_all([(collection, doc_id)])[0]

    def get_all(self, refs: list[tuple[str, str]]) -> list[Doc | None]:
        """Several documents in one round trip, in the order asked."""
        if not refs:
            return []
        names = [self.name(c, i) for c, i in refs]
        found = {}
        for item in self._post(":batchGet", {"documents": names}).json():
            if "found" in item:
                found[item["found"]["name"]] = _doc(item["found"])
        return [found.get(n) for n in names]

    def query(self, collection: str, *, where: Iterable[tuple[str, str, object]] = (), order_by: Iterable[str] = (),
              select: list[str] | None = None, limit: int | None = None, start_after: Doc | None = None) -> list[Doc]:
        """Documents of `collection` matching every (field, op, value), ascending by `order_by` then by
        document id. `start_after` (a Doc of the previous page) continues after it; `select` projects."""
        q = self._structured(collection, where)
        if order_by or start_after is not None:
            q["orderBy"] = [{"field": {"fieldPath": _field_path(f)}, "direction": "ASCENDING"}
                            for f in [*order_by, "__name__"]]
        if start_after is not None:
            values = [_value(_get_path(start_after.data, f)) for f in order_by]
            q["startAt"] = {"values": [*values, {"referenceValue": self.name(collection, start_after.id)}],
                            "before": False}
        if select is not None:
            q["select"] = {"fields": [{"fieldPath": _field_path(f)} for f in select]}
        if limit:
            q["limit"] = int(limit)
        return [_doc(item["document"]) for item in self._post(":runQuery", {"structuredQuery": q}).json()
                if "document" in item]

    def count(self, collection: str, *, where: Iterable[tuple[str, str, object]] = (), up_to: int | None = None) -> int:
        q = self._structured(collection, where)
        if up_to:
            q["limit"] = int(up_to)
        body = {"structuredAggregationQuery": {"structuredQuery": q,
                                               "aggregations": [{"alias": "n", "count": {}}]}}
        for item in self._post(":runAggregationQuery", body).json():
            fields = (item.get("result") or {}).get("aggregateFields")
            if fields:
                return int(_decode(fields["n"]))
        return 0

    # -- compare-and-set ---------------------------------------------------------------------------------
    def cas(self, step: Callable[[int], T], *, attempts: int, pause_s: float, max_pause_s: float, what: str) -> T:
        """Run `step(attempt)` until it returns something other than AGAIN (a lost race), pausing a jittered,
        growing time in between; ContentionError after `attempts` lost races. No lock is ever held, so a
        process that dies mid-way blocks nobody (an abandoned Firestore transaction keeps its locks until
        they expire)."""
        for attempt in range(attempts):
            result = step(attempt)
            if result is not AGAIN:
                return result
            time.sleep(random.uniform(0, min(max_pause_s, pause_s * 2 ** attempt)))
        raise ContentionError(f"{what}: still changing after {attempts} attempts")

    def cas_many(self, refs: list[tuple[str, str]], decide: Callable[..., Any], *, attempts: int = 30) -> bool:
        """Optimistic read-decide-write over a few documents, without a transaction: read them, let
        `decide(*docs)` return [(ref, "create" | "update", data), ...] (or None: nothing to do, False),
        and commit those writes as one atomic batch, each update conditioned on the document's
        version as read and each create on its absence. If any changed meanwhile, nothing is
        written and it starts over."""
        def step(_attempt: int) -> Any:
            read = dict(zip(refs, self.get_all(refs)))
            ops = decide(*[d.data if d is not None else None for d in read.values()])
            if not ops:
                return False
            writes = [self.create(ref[0], ref[1], data) if kind == "create" else
                      self.update(ref[0], ref[1], data, version=_version(read[ref]))
                      for ref, kind, data in ops]
            try:
                self.commit(writes)
                return True
            except Conflict:
                return AGAIN
        return bool(self.cas(step, attempts=attempts, pause_s=0.01, max_pause_s=0.5, what=str(refs)))

    # -- plumbing ----------------------------------------------------------------------------------------
    def _structured(self, collection: str, where: Iterable[tuple[str, str, object]]) -> Obj:
        q: Obj = {"from": [{"collectionId": collection}]}
        filters = [{"fieldFilter": {"field": {"fieldPath": _field_path(f)}, "op": OPS[op], "value": _value(v)}}
                   for f, op, v in where]
        if len(filters) == 1:
            q["where"] = filters[0]
        elif filters:
            q["where"] = {"compositeFilter": {"op": "AND", "filters": filters}}
        return q

    def _post(self, method: str, body: Obj) -> Any:
        return gh.call("POST", f"{self.base}{self.root}{method}", tokens=self.tokens, json=body,
                       deadline=time.monotonic() + self.timeout_s, timeout_s=self.timeout_s,
                       what=f"Firestore {method.lstrip(':')}", retry=RETRY)


# -- values ----------------------------------------------------------------------------------------------
def _field_path(path: str) -> str:
    if path == "__name__":
        return path
    return ".".join(p if _SIMPLE.match(p) else "`" + p.replace("\\", "\\\\").replace("`", "\\`") + "`"
                    for p in path.split("."))


def _version(doc: Doc | None) -> str | None:
    return doc.version if doc is not None else None


def _get_path(data: Any, path: str) -> Any:
    for p in path.split("."):
        data = (data or {}).get(p)
    return data


def _fields(data: Obj) -> Obj:
    return {k: _value(v) for k, v in data.items()}


def _value(v: Any) -> Obj:
    if v is None:
        return {"nullValue": None}
    if isinstance(v, bool):
        return {"booleanValue": v}
    if isinstance(v, int):
        return {"integerValue": str(v)}
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return {"doubleValue": "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")}
        return {"doubleValue": v}
    if isinstance(v, str):
        return {"stringValue": v}
    if isinstance(v, datetime):
        t = v.astimezone(timezone.utc) if v.tzinfo else v.replace(tzinfo=timezone.utc)
        return {"timestampValue": t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
    if isinstance(v, dict):
        return {"mapValue": {"fields": _fields(v)}}
    if isinstance(v, (list, tuple)):
        return {"arrayValue": {"values": [_value(x) for x in v]}}
    if isinstance(v, (bytes, bytearray)):
        return {"bytesValue": base64.b64encode(bytes(v)).decode("ascii")}
    raise TypeError(f"cannot store a {type(v).__name__} in Firestore")


def _decode(v: Obj) -> Any:
    (kind, x), = v.items()
    if kind == "stringValue":
        return x
    if kind == "integerValue":
        return int(x)
    if kind == "timestampValue":
        return _timestamp(x)
    if kind == "mapValue":
        return {k: _decode(y) for k, y in (x.get("fields") or {}).items()}
    if kind == "arrayValue":
        return [_decode(y) for y in (x.get("values") or [])]
    if kind == "booleanValue":
        return bool(x)
    if kind == "doubleValue":
        return float(x)
    if kind == "nullValue":
        return None
    if kind == "bytesValue":
        return base64.b64decode(x)
    return x  # referenceValue (a name), geoPointValue (a dict)


def _timestamp(text: str) -> datetime:
    """RFC 3339 with up to nanoseconds -> aware UTC datetime (microseconds: Firestore stores no finer)."""
    head, _, frac = text.rstrip("Z").partition(".")
    if len(head) != 19 or head[4] + head[7] + head[10] + head[13] + head[16] != "--T::":
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    t = datetime.fromisoformat(head)  # not strptime: its first call builds locale tables (a cold start's time)
    return t.replace(microsecond=int((frac + "000000")[:6]) if frac else 0, tzinfo=timezone.utc)


def _doc(raw: Obj) -> Doc:
    return Doc(raw["name"].rsplit("/", 1)[1], {k: _decode(v) for k, v in (raw.get("fields") or {}).items()},
               raw.get("updateTime"))
