"""Structured logs (JSON lines Cloud Logging parses), credentials (ADC, never logged), settings
checked at start, and a light import of main.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import procs
from tests.support.function import request_counts, valid_request, wait_for
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

        # the event can arrive before the function has logged its publication (it records the operation first)
        wait_for(lambda: any(e["message"] == "published EXPORT_STARTED" for e in f.log_entries()), what="the log")
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


def _import_main(env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ALLOWED_", "HEALTHCARE_", "MAX_"))}
    return subprocess.run([sys.executable, "-c", "import sys, main; print(sorted(m for m in sys.modules "
                           "if m.startswith(('google.cloud.pubsub', 'google.cloud.firestore', 'grpc', 'requests', 'google.auth', "
                           "'google.api_core'))))"],
                          cwd=procs.ROOT, env={**base, "GOOGLE_CLOUD_PROJECT": "test-project", **env},
                          capture_output=True, text=True, timeout=60)


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
