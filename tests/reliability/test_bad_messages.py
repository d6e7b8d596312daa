"""Item 4: generated bad messages through the real requests topic into a running export_request process.

Every message is built to be invalid (wrong types, missing or unknown fields, huge strings, invalid URIs,
non-UTF-8 bytes, nested garbage). Expected: the process never crashes or answers 5xx (no redelivery, no
traceback, still alive), the Healthcare API is never called, and each message gets exactly one
EXPORT_REJECTED event with a reason and one ERROR log line.
"""
from __future__ import annotations

import json
import time
import uuid
from collections import Counter

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from handlers.core import request as req
from tests.support.function import PROJECT
from tests.support.reliability import SIZES, report, total

STORE = f"projects/{PROJECT}/locations/us-central1/datasets/ds/dicomStores/st"
TABLE = f"bq://{PROJECT}.exports.t1"


def _valid() -> dict:
    return {"dicomStore": STORE, "bigqueryDestination": {"tableUri": TABLE, "writeDisposition": "WRITE_APPEND"},
            "labels": {"team": "radiology"}}


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                      st.text(max_size=40))
garbage = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                         st.dictionaries(st.text(max_size=10), kids, max_size=4)),
                       max_leaves=25)
not_string = st.one_of(st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                       st.lists(json_leaf, max_size=3), st.dictionaries(st.text(max_size=5), json_leaf, max_size=3))
not_object = st.one_of(st.booleans(), st.integers(), st.text(max_size=30), st.lists(json_leaf, max_size=3))


@st.composite
def wrong_type(draw):
    body = _valid()
    where = draw(st.sampled_from(["requestId", "dicomStore", "bigqueryDestination", "labels", "tableUri",
                                  "writeDisposition", "force", "filterConfig", "gcsUri", "labelValue"]))
    if where in ("requestId", "dicomStore"):
        body[where] = draw(not_string)
    elif where in ("bigqueryDestination", "labels", "filterConfig"):
        body[where] = draw(not_object)
    elif where == "tableUri":
        body["bigqueryDestination"]["tableUri"] = draw(not_string)
    elif where == "writeDisposition":
        body["bigqueryDestination"]["writeDisposition"] = draw(st.one_of(not_string, st.text(max_size=20).filter(
            lambda s: s not in req.WRITE_DISPOSITIONS)))
    elif where == "force":
        body["bigqueryDestination"]["force"] = draw(st.one_of(st.integers(), st.text(max_size=5), st.lists(
            st.booleans(), max_size=2)))
    elif where == "gcsUri":
        body["filterConfig"] = {"resourcePathsGcsUri": draw(not_string)}
    else:
        body["labels"] = {"team": draw(not_string)}
    return body


@st.composite
def missing_fields(draw):
    body = _valid()
    drop = draw(st.sampled_from([("dicomStore",), ("bigqueryDestination",), ("tableUri",),
                                 ("dicomStore", "bigqueryDestination")]))
    for k in drop:
        if k == "tableUri":
            del body["bigqueryDestination"]["tableUri"]
        else:
            del body[k]
    return body


@st.composite
def unknown_fields(draw):
    body = _valid()
    key = draw(st.text(min_size=1, max_size=30).filter(lambda k: k not in req.TOP_FIELDS + req.DEST_FIELDS))
    target = body if draw(st.booleans()) else body["bigqueryDestination"]
    target[key] = draw(garbage)
    return body


@st.composite
def huge_strings(draw):
    body = _valid()
    n = draw(st.sampled_from([300, 5_000, 70_000, 200_000]))
    s = draw(st.sampled_from(["a", "é", "\u4e2d", "/", "0"])) * n
    where = draw(st.sampled_from(["requestId", "dicomStore", "tableUri", "labelValue", "unknown"]))
    if where == "tableUri":  # BigQuery table ids may be up to 1,024 bytes of letters: go past that
        body["bigqueryDestination"]["tableUri"] = TABLE + s * (1 if n > 1024 else 4)
    elif where == "labelValue":
        body["labels"] = {"team": s}
    elif where == "unknown":
        body["x"] = s
    elif where == "dicomStore":
        body["dicomStore"] = STORE + s
    else:
        body[where] = s
    return body


@st.composite
def invalid_uris(draw):
    body = _valid()
    junk = draw(st.text(max_size=60))
    if draw(st.booleans()):
        body["bigqueryDestination"]["tableUri"] = draw(st.sampled_from([
            junk, f"bq://{junk}", f"bq://{PROJECT}..t", f"bq://{PROJECT}.exports", f"gs://{PROJECT}.exports.t",
            f"bq://{PROJECT}.exports.t/../x", "bq://UPPER_PROJECT!.exports.t", "bq://" + "p" * 40 + ".d.t",
            f"bq://{PROJECT}.ex-ports.t", f"BQ://{PROJECT}.exports.t"]).filter(lambda u: not _valid_table(u)))
    else:
        body["filterConfig"] = {"resourcePathsGcsUri": draw(st.sampled_from([
            junk, f"gs://{junk}", "gs://", "gs://b", "gs://b/", "http://b/o", "gs://UPPER/o", "gs://b/../../etc",
            "gs://goog-bucket/o", "gs://" + "b" * 300 + "/o", "gs://192.168.1.1/o"]).filter(lambda u: not _valid_gcs(u)))}
    return body


def _valid_table(u) -> bool:
    try:
        req.table_uri_parts(u)
        return True
    except Exception:
        return False


def _valid_gcs(u) -> bool:
    try:
        req.gcs_uri_parts(u)
        return True
    except Exception:
        return False


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


non_utf8 = st.one_of(
    st.binary(min_size=1, max_size=200).filter(lambda b: not _is_utf8(b)),
    st.builds(lambda b: json.dumps(_valid()).encode()[:-1] + b + b"}", st.sampled_from(
        [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80", b"\xf8\x88\x80\x80\x80"])))

nested = st.one_of(
    garbage.filter(lambda v: not isinstance(v, dict)),
    st.builds(lambda d, v: {**_valid(), "bigqueryDestination": {"tableUri": TABLE, "nested": v}}, st.just(0), garbage),
    st.integers(min_value=50, max_value=3000).map(lambda n: "[" * n + "]" * n),
    st.integers(min_value=50, max_value=3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.sampled_from(['{"dicomStore": NaN}', '{"a": Infinity}', "1" * 5000, '{"dicomStore": "x", "dicomStore": "y"}',
                     "{", '{"requestId": "r"', "null", "\ufeff[]", "  ", '"just a string"']),
)


def _encode(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value).encode()


bad_message = st.one_of(wrong_type(), missing_fields(), unknown_fields(), huge_strings(), invalid_uris(),
                        non_utf8, nested).map(_encode)


def generate(n: int, seed_value: int = 8) -> list[bytes]:
    out: list[bytes] = []

    @seed(seed_value)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(bad_message)
    def collect(m):
        out.append(m)

    collect()
    return out[:n]


def _fresh_ids(raw: bytes) -> tuple[bytes, str | None]:
    """Give each message whose requestId would be accepted a unique one (so that no two bad messages are
    duplicates of each other); others get the Pub/Sub messageId as their requestId."""
    def no_constants(name):
        raise ValueError(name)
    try:
        obj = json.loads(raw, parse_constant=no_constants)
    except Exception:
        return raw, None
    if isinstance(obj, dict) and isinstance(obj.get("requestId"), str) and req.REQUEST_ID_RE.match(obj["requestId"]):
        obj["requestId"] = f"bad-{uuid.uuid4().hex}"
        return json.dumps(obj).encode(), obj["requestId"]
    if isinstance(obj, dict) and "requestId" not in obj and len(raw) < 60000 and not raw.startswith(b"\xef"):
        obj["requestId"] = f"bad-{uuid.uuid4().hex}"
        return json.dumps(obj).encode(), obj["requestId"]
    return raw, None


def test_bad_messages_are_rejected_never_crash_never_export(make_function, hc):
    n = SIZES["bad_messages"]
    messages = generate(n)
    assert len(messages) >= n * 0.9, len(messages)
    # Sanity: the validator itself rejects every one (so the end-to-end figures below are about the process).
    assert all(not req.parse(m, "m").ok for m in messages)
    f = make_function("bad", env={"MAX_REQUEST_AGE_S": "3600"})
    calls_before = total(hc.url, "export.calls")
    rids: dict[str, bytes] = {}
    t0 = time.monotonic()
    futures = []
    for raw in messages:
        raw, rid = _fresh_ids(raw)
        futures.append((f.publisher.publish(f.topic_path(f.requests_topic), raw, kind="fuzz"), rid, raw))
    for fut, rid, raw in futures:
        rids[rid or fut.result(timeout=60)] = raw
    events, deadline = [], time.monotonic() + 30 + len(rids) * 0.1
    while len({e["attributes"]["requestId"] for e in events}) < len(rids) and time.monotonic() < deadline:
        events += [e for e in f._pull(2) if e["attributes"].get("requestId") in rids]
    elapsed = time.monotonic() - t0
    extra = f.drain(2.0)
    lost = [r for r in rids if r not in {e["attributes"]["requestId"] for e in events + extra}]
    for r in lost[:5]:
        print("no event for", r, rids[r][:200], len(rids[r]))
    by_type = Counter(e["attributes"]["eventType"] for e in events + extra)
    per_rid = Counter(e["attributes"]["requestId"] for e in events + extra)
    no_reason = [e for e in events if not (e["data"].get("error") or {}).get("message")]
    entries = f.log_entries()
    errors = Counter(e.get("logging.googleapis.com/labels", {}).get("requestId") for e in entries
                     if e["severity"] == "ERROR" and e["message"].startswith("export request rejected"))
    missing_error_log = [r for r in rids if errors.get(r) != 1]
    text = f.log_text()
    duplicates = sum(1 for e in entries if e["message"].startswith("duplicate delivery"))
    crashes = text.count("Traceback") + (0 if f.svc.proc.poll() is None else 1)
    calls = total(hc.url, "export.calls") - calls_before
    report("bad_messages", messages=len(rids), rejected_events=by_type.get("EXPORT_REJECTED", 0),
           other_events=sum(v for k, v in by_type.items() if k != "EXPORT_REJECTED"),
           events_without_reason=len(no_reason), missing_error_log=len(missing_error_log), redeliveries=duplicates,
           crashes=crashes, export_calls=calls, lost=len(lost), seconds=round(elapsed, 1),
           per_second=round(len(rids) / elapsed, 1))
    assert crashes == 0 and f.svc.proc.poll() is None, text[-3000:]
    assert calls == 0
    assert by_type == {"EXPORT_REJECTED": len(rids)}, by_type
    assert max(per_rid.values()) == 1 and set(per_rid) == set(rids)
    assert no_reason == []
    assert missing_error_log == [], missing_error_log[:5]
    assert duplicates == 0  # no 5xx / nack: Pub/Sub never had to redeliver
