"""handlers/core/request.py (and config/shapes.py): every rule of the contract's request table, with its message. Pure logic,
so these call the validator directly; the end-to-end path of a rejection is in test_intake_flow."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handlers.core import request as r

STORE = "projects/my-proj/locations/us-central1/datasets/D/dicomStores/S"
POLICY = r.Policy(max_bytes=4096)


def body(**over):
    b = {"requestId": "nightly-2026-11-25", "dicomStore": STORE,
         "bigqueryDestination": {"tableUri": "bq://other-proj.D2.T2"}}
    for k, v in over.items():
        if k.startswith("dest_"):
            b["bigqueryDestination"][k[5:]] = v
        else:
            b[k] = v
    return b


def parse(obj, policy=POLICY, message_id="4242"):
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return r.parse(data, message_id, policy)


# -- accepted ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("over, expect_dest", [
    ({}, {"tableUri": "bq://other-proj.D2.T2"}),
    ({"dest_writeDisposition": "write-append"}, {"tableUri": "bq://other-proj.D2.T2", "writeDisposition": "WRITE_APPEND"}),
    ({"dest_writeDisposition": "write-empty"}, {"tableUri": "bq://other-proj.D2.T2", "writeDisposition": "WRITE_EMPTY"}),
    ({"dest_writeDisposition": "write-truncate"}, {"tableUri": "bq://other-proj.D2.T2", "writeDisposition": "WRITE_TRUNCATE"}),
    ({"dest_writeDisposition": "WRITE_TRUNCATE"}, {"tableUri": "bq://other-proj.D2.T2", "writeDisposition": "WRITE_TRUNCATE"}),
    ({"dest_force": True}, {"tableUri": "bq://other-proj.D2.T2", "force": True}),
    ({"dest_includeSourceStore": True, "dest_schemaJson": {}},
     {"tableUri": "bq://other-proj.D2.T2", "includeSourceStore": True, "schemaJson": {}}),
    ({"dest_schemaFlattened": {}}, {"tableUri": "bq://other-proj.D2.T2", "schemaFlattened": {}}),
    ({"dest_tableUri": "bq://example.com:my-proj.ds_1.Table name-ü"},
     {"tableUri": "bq://example.com:my-proj.ds_1.Table name-ü"}),
    ({"dest_force": None, "dest_writeDisposition": "WRITE_APPEND"},  # null is absent, as in proto3 JSON
     {"tableUri": "bq://other-proj.D2.T2", "writeDisposition": "WRITE_APPEND"}),
])
def test_accepts_and_normalises(over, expect_dest):
    p = parse(body(**over))
    assert p.ok, p.rejection
    assert p.request["bigqueryDestination"] == expect_dest
    assert r.export_body(p.request) == {"bigqueryDestination": expect_dest}


def test_full_request_and_defaults():
    p = parse(body(filterConfig={"resourcePathsGcsUri": "gs://my-bucket/a/b.txt"}, labels={"team": "radiology"}))
    assert p.ok and p.request == {
        "requestId": "nightly-2026-11-25", "dicomStore": STORE,
        "bigqueryDestination": {"tableUri": "bq://other-proj.D2.T2"},
        "filterConfig": {"resourcePathsGcsUri": "gs://my-bucket/a/b.txt"}, "labels": {"team": "radiology"}}
    assert r.export_body(p.request)["filterConfig"] == {"resourcePathsGcsUri": "gs://my-bucket/a/b.txt"}
    # requestId absent: the Pub/Sub message id; dicomStore absent: the deployment's default
    b = body()
    del b["requestId"], b["dicomStore"]
    p = parse(b, r.Policy(default_store=STORE), message_id="987654")
    assert p.ok and p.request_id == "987654" and p.request["dicomStore"] == STORE


# -- rejected: (request, field, rule, words the message must contain) --------------------------------------
CASES = [
    (b"\xff\xfe{}", "(message)", "utf-8", "not UTF-8"),
    (b"", "(message)", "json", "empty"),
    (b"{not json", "(message)", "json", "not JSON"),
    (b"[1, 2]", "(message)", "object", "JSON object, not an array"),
    (b'"text"', "(message)", "object", "not a string"),
    (b"null", "(message)", "object", "not null"),
    (b'{"requestId": NaN}', "(message)", "json", "NaN"),
    (b'{"requestId": "a", "requestId": "b"}', "requestId", "duplicate-key", "more than once"),
    (b'{"x": "\\ud800"}', "(message)", "utf-8", "surrogate"),
    (b"[" * 3000 + b"]" * 3000, "(message)", "max-size", "at most 4096"),
    (body(requestId=7), "requestId", "type", "must be a string"),
    (body(requestId="has space"), "requestId", "pattern", "A-Z a-z 0-9 . _ : -"),
    (body(requestId="x" * 129), "requestId", "pattern", "1-128"),
    (body(requestId=""), "requestId", "pattern", "1-128"),
    (body(requestID="typo"), "requestID", "unknown-field", "unknown field 'requestID'"),
    (body(dest_table_uri="bq://a.b.c"), "bigqueryDestination.table_uri", "unknown-field", "unknown field"),
    (body(filterConfig={"resourcePathsGcsUri": "gs://bkt/o", "extra": 1}), "filterConfig.extra",
     "unknown-field", "unknown field"),
    ({"bigqueryDestination": {"tableUri": "bq://other-proj.D2.T2"}}, "dicomStore", "required", "no default store"),
    (body(dicomStore=5), "dicomStore", "type", "must be a string"),
    (body(dicomStore="projects/p/locations/l/datasets/d/dicomStores/s"), "dicomStore", "resource-name",
     "full resource name"),
    (body(dicomStore="my-store"), "dicomStore", "resource-name", "full resource name"),
    (body(dicomStore=STORE + "/dicomWeb"), "dicomStore", "resource-name", "full resource name"),
    (body(dicomStore=STORE.replace("/S", "/..")), "dicomStore", "resource-name", "full resource name"),
    (body(dicomStore=STORE.replace("datasets/D", "datasets/a b")), "dicomStore", "resource-name", "1-256"),
    ({"requestId": "r", "dicomStore": STORE}, "bigqueryDestination", "required", "required"),
    (body(bigqueryDestination="bq://a.b.c"), "bigqueryDestination", "type", "must be an object"),
    (body(bigqueryDestination={}), "bigqueryDestination.tableUri", "required", "required"),
    (body(dest_tableUri=3), "bigqueryDestination.tableUri", "type", "must be a string"),
    (body(dest_tableUri="my-proj.D.T"), "bigqueryDestination.tableUri", "scheme", "bq://"),
    (body(dest_tableUri="bq://my-proj.D"), "bigqueryDestination.tableUri", "format", "bq://PROJECT.DATASET.TABLE"),
    (body(dest_tableUri="bq://my-proj..T"), "bigqueryDestination.tableUri", "format", "bq://PROJECT.DATASET.TABLE"),
    (body(dest_tableUri="bq://" + "a" * 2000), "bigqueryDestination.tableUri", "max-length", "2000"),
    (body(dest_tableUri="bq://proj.D.T"), "bigqueryDestination.tableUri", "project-id", "6-30 characters"),
    (body(dest_tableUri="bq://My-Project.D.T"), "bigqueryDestination.tableUri", "project-id", "project ID"),
    (body(dest_tableUri="bq://my-project-.D.T"), "bigqueryDestination.tableUri", "project-id", "not ending with '-'"),
    (body(dest_tableUri="bq://1project.D.T"), "bigqueryDestination.tableUri", "project-id", "starting with a letter"),
    (body(dest_tableUri="bq://" + "a" * 31 + ".D.T"), "bigqueryDestination.tableUri", "project-id", "6-30"),
    (body(dest_tableUri="bq://example:my-proj.D.T"), "bigqueryDestination.tableUri", "project-id", "domain-scoped"),
    (body(dest_tableUri="bq://Example.com:my-proj.D.T"), "bigqueryDestination.tableUri", "project-id", "project ID"),
    (body(dest_tableUri="bq://my-proj.da-ta.T"), "bigqueryDestination.tableUri", "dataset-id", "letters, digits and underscores"),
    (body(dest_tableUri="bq://my-proj." + "d" * 1025 + ".T"), "bigqueryDestination.tableUri", "dataset-id", "1-1024"),
    (body(dest_tableUri="bq://my-proj.D.T$20240101"), "bigqueryDestination.tableUri", "table-id", "partition decorators"),
    (body(dest_tableUri="bq://my-proj.D.T/x"), "bigqueryDestination.tableUri", "table-id", "'/'"),
    (body(dest_tableUri="bq://my-proj.D.T\u00a0*"), "bigqueryDestination.tableUri", "table-id", "not a letter"),
    (body(dest_tableUri="bq://my-proj.D." + "ü" * 513), "bigqueryDestination.tableUri", "table-id", "1024 UTF-8 bytes"),
    (body(dest_writeDisposition="APPEND"), "bigqueryDestination.writeDisposition", "enum", "WRITE_APPEND"),
    (body(dest_writeDisposition="WRITE_DISPOSITION_UNSPECIFIED"), "bigqueryDestination.writeDisposition", "enum",
     "one of"),
    (body(dest_writeDisposition="Write-Append"), "bigqueryDestination.writeDisposition", "enum", "write-append"),
    (body(dest_force="yes"), "bigqueryDestination.force", "type", "boolean"),
    (body(dest_force=False, dest_writeDisposition="WRITE_EMPTY"), "bigqueryDestination.force", "exclusive",
     "cannot be combined with writeDisposition"),
    (body(dest_includeSourceStore="true"), "bigqueryDestination.includeSourceStore", "type", "boolean"),
    (body(dest_schemaJson=True), "bigqueryDestination.schemaJson", "type", "empty object"),
    (body(dest_schemaFlattened={"a": 1}), "bigqueryDestination.schemaFlattened", "type", "empty object"),
    (body(dest_schemaJson={}, dest_schemaFlattened={}), "bigqueryDestination.schemaJson", "exclusive", "both"),
    (body(filterConfig="gs://b/o"), "filterConfig", "type", "must be an object"),
    (body(filterConfig={}), "filterConfig.resourcePathsGcsUri", "required", "required"),
    (body(filterConfig={"resourcePathsGcsUri": 1}), "filterConfig.resourcePathsGcsUri", "type", "string"),
    (body(filterConfig={"resourcePathsGcsUri": "s3://bkt/o"}), "filterConfig.resourcePathsGcsUri", "gcs-uri",
     "gs://BUCKET/OBJECT"),
    (body(filterConfig={"resourcePathsGcsUri": "gs://bkt"}), "filterConfig.resourcePathsGcsUri", "object-name",
     "must name an object"),
    (body(filterConfig={"resourcePathsGcsUri": "gs://bkt/"}), "filterConfig.resourcePathsGcsUri", "object-name",
     "must name an object"),
    (body(filterConfig={"resourcePathsGcsUri": "gs://Bucket/o"}), "filterConfig.resourcePathsGcsUri",
     "bucket-name", "only a-z"),
    (body(filterConfig={"resourcePathsGcsUri": "gs://ab/o"}), "filterConfig.resourcePathsGcsUri", "bucket-name",
     "3-63"),
    (body(filterConfig={"resourcePathsGcsUri": "gs://" + "b" * 64 + "/o"}), "filterConfig.resourcePathsGcsUri",
     "bucket-name", "3-63"),
    (body(filterConfig={"resourcePathsGcsUri": "gs://-bkt/o"}), "filterConfig.resourcePathsGcsUri", "bucket-name",
     "starting and ending"),
    (body(filterConfig={"resourcePathsGcsUri": "gs://a..b/o"}), "filterConfig.resourcePathsGcsUri", "bucket-name",
     "dot-separated"),
    (body(filterConfig={"resourcePathsGcsUri": "gs://192.168.5.4/o"}), "filterConfig.resourcePathsGcsUri",
     "bucket-name", "IP address"),
    (body(filterConfig={"resourcePathsGcsUri": "gs://goog-bkt/o"}), "filterConfig.resourcePathsGcsUri",
     "bucket-name", "goog"),
    (body(filterConfig={"resourcePathsGcsUri": "gs://my-google-bkt/o"}), "filterConfig.resourcePathsGcsUri",
     "bucket-name", "google"),
    (body(filterConfig={"resourcePathsGcsUri": "gs://bkt/a\nb"}), "filterConfig.resourcePathsGcsUri",
     "object-name", "no line breaks"),
    (body(filterConfig={"resourcePathsGcsUri": "gs://bkt/" + "o" * 1025}), "filterConfig.resourcePathsGcsUri",
     "object-name", "1-1024"),
    (body(labels=["a"]), "labels", "type", "object of string pairs"),
    (body(labels={f"k{i}": "v" for i in range(65)}), "labels", "max-count", "at most 64"),
    (body(labels={"team": 1}), "labels.team", "type", "string value"),
    (body(labels={"": "v"}), "labels", "key", "1-63"),
    (body(labels={"__name__": "v"}), "labels", "key", "__name__"),
    (body(labels={"k": "v" * 64}), "labels.k", "max-length", "63"),
]


@pytest.mark.parametrize("payload, field, rule, words", CASES, ids=[f"{c[1]}:{c[2]}:{i}" for i, c in enumerate(CASES)])
def test_rejects_naming_field_and_rule(payload, field, rule, words):
    p = parse(payload)
    assert not p.ok and p.request is None
    assert (p.rejection.field, p.rejection.rule) == (field, rule), p.rejection
    assert words in p.rejection.message, p.rejection.message
    assert p.rejection.error() == {"code": 3, "message": p.rejection.message}


def test_rejection_keeps_a_valid_request_id_and_labels_for_the_event():
    p = parse(body(labels={"team": "x"}, dest_writeDisposition="nope"))
    assert p.request_id == "nightly-2026-11-25" and p.known["labels"] == {"team": "x"}
    p = parse(body(requestId="bad id"))
    assert p.request_id == "4242"  # an unusable requestId: the message id identifies the rejection


def test_oversized_message_is_rejected_before_parsing():
    p = r.parse(b"{" + b" " * 70000 + b"}", "1", r.Policy())
    assert (p.rejection.field, p.rejection.rule) == ("(message)", "max-size")
    assert "70002 bytes; at most 65536" in p.rejection.message


@pytest.mark.parametrize("stores, datasets, over, field", [
    (("projects/my-proj/locations/*/datasets/D/dicomStores/*",), (), {"dicomStore": STORE.replace("/D/", "/E/")},
     "dicomStore"),
    ((), ("other-proj.D2",), {"dest_tableUri": "bq://other-proj.D3.T"}, "bigqueryDestination.tableUri"),
    ((), ("other-proj.*",), {"dest_tableUri": "bq://third-proj.D2.T"}, "bigqueryDestination.tableUri"),
    ((), ("example.com:my-proj.ds",), {"dest_tableUri": "bq://example.com:my-proj.ds2.T"},
     "bigqueryDestination.tableUri"),
])
def test_allowlists_reject_without_leaking_them(stores, datasets, over, field):
    policy = r.Policy(allowed_stores=stores, allowed_datasets=datasets)
    p = parse(body(**over), policy)
    assert (p.rejection.field, p.rejection.rule) == (field, "allowlist")
    for pattern in stores + datasets:
        assert pattern not in p.rejection.message
    assert "D2" not in p.rejection.message and "my-proj" not in p.rejection.message


def test_allowlists_accept_matching_requests():
    policy = r.Policy(allowed_stores=("projects/my-proj/locations/*/datasets/D/dicomStores/*",),
                      allowed_datasets=("other-proj.D2", "example.com:my-proj.*"))
    assert parse(body(), policy).ok
    assert parse(body(dest_tableUri="bq://example.com:my-proj.any.T"), policy).ok


# -- property: never an exception, always a reason --------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25)
field_names = st.sampled_from(list(r.TOP_FIELDS) + ["x", "force"])
dest_names = st.sampled_from(list(r.DEST_FIELDS) + ["x"])
near_valid = st.fixed_dictionaries({}, optional={
    "requestId": st.one_of(st.from_regex(r"\A[A-Za-z0-9._:-]{1,130}\Z"), json_values),
    "dicomStore": st.one_of(st.just(STORE), st.text(), json_values),
    "bigqueryDestination": st.one_of(
        st.dictionaries(dest_names, st.one_of(st.sampled_from(
            ["bq://my-proj.D.T", "bq://example.com:my-proj.D.T", "WRITE_APPEND", "write-empty"]),
            st.booleans(), st.just({}), st.text(), json_values), max_size=4),
        json_values),
    "filterConfig": st.one_of(st.fixed_dictionaries({"resourcePathsGcsUri": st.one_of(
        st.just("gs://bkt/o"), st.text().map(lambda t: "gs://" + t), json_values)}), json_values),
    "labels": st.one_of(st.dictionaries(st.text(max_size=70), st.one_of(st.text(max_size=70), json_values),
                                        max_size=70), json_values),
})


def _check(p: r.Parsed):
    assert isinstance(p, r.Parsed) and isinstance(p.request_id, str) and p.request_id
    if p.ok:
        assert p.request and p.request["bigqueryDestination"]["tableUri"].startswith("bq://")
        json.dumps(p.request)
    else:
        assert p.request is None and p.rejection.rule != "internal", p.rejection
        assert p.rejection.field and p.rejection.rule and p.rejection.message


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data):
    _check(r.parse(data, "1", POLICY))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_random_json_never_raises(value):
    _check(r.parse(json.dumps(value).encode(), "1", POLICY))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_valid, st.dictionaries(field_names, json_values, max_size=2))
def test_near_valid_requests_never_raise(obj, extra):
    _check(r.parse(json.dumps({**extra, **obj}).encode(), "1", r.Policy(default_store=STORE)))
