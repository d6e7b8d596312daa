"""Structured logs (JSON lines Cloud Logging parses), credentials (ADC, never logged), settings
checked at start, and a light import of main.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from handlers.adapters import logs
from tests.service.conftest import request_counts, valid_request
from tests.support import procs
from tests.support.hcapi import HC, unique

TOKEN = "ya29.a0-local-test-token-" + "x" * 24


def test_logs_are_json_with_request_context_and_never_the_bearer_token(make_function, logs_dir, tmp_path):
    """The function authenticates with Application Default Credentials (an ADC file holding an
    access token); the emulator only accepts that token. The token never reaches the logs."""
    hc = procs.healthcare_emulator(logs_dir, tmp_path / "auth", "--require-token", TOKEN,
                                   name=f"healthcare-emulator-{unique('auth')}").start()
    try:
        api = HC(hc.url)
        api.http.headers["Authorization"] = f"Bearer {TOKEN}"
        store = api.store()
        adc = tmp_path / "adc.json"
        adc.write_text(json.dumps({"type": "authorized_user", "client_id": "local", "client_secret": "local",
                                   "refresh_token": "local", "token": TOKEN, "expiry": "2099-01-01T00:00:00Z"}))
        f = make_function("logs", hc_url=hc.url, env={"GOOGLE_APPLICATION_CREDENTIALS": str(adc)})
        rid, bad_rid = unique("logged"), unique("bad")
        f.publish(valid_request(store, rid))
        f.publish({"requestId": bad_rid, "dicomStore": store, "bigqueryDestination": {"tableUri": "bq://x.y.z"}})
        got = {e["attributes"]["requestId"]: e for e in f.events(2)}
        assert got[rid]["attributes"]["eventType"] == "EXPORT_STARTED"  # so the token was sent and accepted
        assert request_counts(hc.url)[store]["export"] == 1

        text = f.log_text()
        assert TOKEN not in text and TOKEN[:20] not in text
        entries = f.log_entries()
        for e in entries:
            assert e["severity"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") and e["message"]
        mine = [e for e in entries if e.get("logging.googleapis.com/labels", {}).get("requestId") == rid]
        assert [e["message"] for e in mine] == ["export request received", "export started",
                                                "published EXPORT_STARTED"]
        operation = got[rid]["data"]["operation"]
        for e in mine[1:]:
            labels = e["logging.googleapis.com/labels"]
            assert labels["operation"] == operation and labels["logsUrl"] == got[rid]["data"]["logsUrl"]
        [rejected] = [e for e in entries if e.get("logging.googleapis.com/labels", {}).get("requestId") == bad_rid
                      and e["severity"] == "ERROR"]
        assert rejected["field"] == "bigqueryDestination.tableUri" and rejected["rule"] == "project-id"
    finally:
        hc.stop()


def test_log_entry_shape_trace_and_scrubbing(capsys):
    from cloudevents.http import CloudEvent

    event = CloudEvent({"type": "google.cloud.pubsub.topic.v1.messagePublished", "source": "//pubsub",
                        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}, {})
    trace, span = logs.trace_from(event, "my-proj")
    with logs.context(trace=trace, span=span, requestId="r1"):
        logs.bind(operation="projects/p/operations/1")
        logs.error("failed with Authorization: Bearer abc.def-123 and ya29.secret", field="f")
    line = json.loads(capsys.readouterr().out.strip())
    assert line["severity"] == "ERROR" and line["field"] == "f"
    assert line["logging.googleapis.com/trace"] == "projects/my-proj/traces/0af7651916cd43dd8448eb211c80319c"
    assert line["logging.googleapis.com/spanId"] == "b7ad6b7169203331"
    assert line["logging.googleapis.com/labels"] == {"requestId": "r1", "operation": "projects/p/operations/1"}
    assert "abc.def-123" not in line["message"] and "ya29.secret" not in line["message"]
    logs.info("outside")
    assert "logging.googleapis.com/labels" not in json.loads(capsys.readouterr().out)


def test_where_google_is_comes_from_the_environment():
    import config
    s = config.load({"FIRESTORE_EMULATOR_HOST": "127.0.0.1:8081", "STORAGE_EMULATOR_HOST": "http://localhost:4443/",
                     "K_SERVICE": "export-request", "GCE_METADATA_HOST": "169.254.169.254", "FIRESTORE_DATABASE": "ledger"})
    assert (s.firestore_emulator_host, s.storage_emulator_host, s.pubsub_emulator_host) == (
        "127.0.0.1:8081", "localhost:4443", None)
    assert s.on_google_cloud and s.metadata_host == "169.254.169.254" and s.firestore_database == "ledger"
    assert not config.load({}).on_google_cloud and config.load({}).firestore_database == "(default)"


def _import_main(env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ALLOWED_", "HEALTHCARE_", "MAX_"))}
    return subprocess.run([sys.executable, "-c", "import sys, main; print(sorted(m for m in sys.modules "
                           "if m.startswith(('google.cloud.pubsub', 'google.cloud.firestore', 'grpc', 'requests', 'google.auth', "
                           "'google.api_core'))))"],
                          cwd=procs.ROOT, env={**base, "GOOGLE_CLOUD_PROJECT": "test-project", **env},
                          capture_output=True, text=True, timeout=60)


def test_a_hostile_field_name_never_splits_the_log_line(capsys):
    """A field name from a request can hold any character; U+0085 (NEL), U+2028 and U+2029 end a line for
    readers that split on Unicode line boundaries (Python's str.splitlines among them). Each entry stays one
    ASCII line, and decodes back to the same text."""
    name = "bigqueryDestination.x\x85y\u2028z\u2029é\x1c"
    logs.error(f"export request rejected: unknown field {name!s}", field=name)
    out = capsys.readouterr().out
    assert out.isascii() and len(out.splitlines()) == 1
    line = json.loads(out)
    assert line["field"] == name and line["message"].endswith(name)


def test_main_imports_no_google_client():
    r = _import_main({})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"  # Pub/Sub, Firestore, auth: loaded on first use only


@pytest.mark.parametrize("name, value", [
    ("HEALTHCARE_API_VERSION", "v2"), ("HEALTHCARE_API_ENDPOINT", "http://healthcare.example.com"),
    ("MAX_OPERATION_AGE_S", "soon"), ("DEFAULT_DICOM_STORE", "my-store"), ("EXPORT_EVENTS_TOPIC", "goog-x"),
    ("INTAKE_LEASE_S", "1"), ("FIRESTORE_DATABASE", "My_DB"), ("FIRESTORE_EMULATOR_HOST", "localhost"),
    ("PUBSUB_EMULATOR_HOST", "127.0.0.1:80/x"), ("GCE_METADATA_HOST", "http://metadata/"),
])
def test_a_bad_setting_stops_the_function_naming_the_variable(name, value):
    r = _import_main({name: value})
    assert r.returncode != 0
    [line] = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert line["severity"] == "CRITICAL" and name in line["message"]
