"""The functions' one HTTP transport (handlers/adapters/transport.py): tokens from the metadata server on
Google Cloud, and Firestore, Pub/Sub and Cloud Storage reached over REST without Google's gRPC clients.

There is no metadata-server emulator, so a small local HTTP server stands in for it (over a real socket),
answering as the documented endpoint does; everything else is the real emulators."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from handlers.adapters import transport as gh
from tests.support import procs
from tests.support.function import PROJECT, valid_request
from tests.support.hcapi import HC, unique

TOKEN = "ya29.metadata-token-" + "m" * 24


class MetadataServer:
    """GET /computeMetadata/v1/instance/service-accounts/default/token, as Cloud Run's metadata server answers."""

    def __init__(self, answers=None):
        self.hits, self.answers = [], list(answers or [])
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits.append({"path": self.path, "flavor": self.headers.get("Metadata-Flavor")})
                status = outer.answers.pop(0) if outer.answers else 200
                if self.headers.get("Metadata-Flavor") != "Google":
                    status = 403
                body = json.dumps({"access_token": f"{TOKEN}{len(outer.hits)}", "expires_in": 3599,
                                   "token_type": "Bearer"}).encode() if status == 200 else b"no"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def metadata():
    m = MetadataServer()
    yield m
    m.close()


def test_metadata_tokens_are_fetched_once_cached_and_refreshed(metadata):
    tokens = gh.Metadata(metadata.host)
    first = tokens.header()
    assert first == {"Authorization": f"Bearer {TOKEN}1"} and tokens.header() == first  # cached
    assert len(metadata.hits) == 1 and metadata.hits[0]["flavor"] == "Google"
    assert metadata.hits[0]["path"].startswith("/computeMetadata/v1/instance/service-accounts/default/token?scopes=")
    assert tokens.header(refresh=True) == {"Authorization": f"Bearer {TOKEN}2"}  # after a 401


def test_metadata_server_errors_are_retried_then_named():
    flaky = MetadataServer(answers=[503, 500])
    try:
        assert gh.Metadata(flaky.host).header() == {"Authorization": f"Bearer {TOKEN}3"}
    finally:
        flaky.close()
    refusing = MetadataServer(answers=[404])
    try:
        with pytest.raises(gh.TokenError, match="HTTP 404"):
            gh.Metadata(refusing.host).header()
        assert len(refusing.hits) == 1  # a 404 is final
    finally:
        refusing.close()


@pytest.fixture
def token_hc(logs_dir, tmp_path):
    svc = procs.healthcare_emulator(logs_dir, tmp_path / "hc", "--require-token", f"{TOKEN}1",
                                    name=unique("hc-token")).start()
    yield svc
    svc.stop()


def test_on_google_cloud_the_function_authenticates_with_the_metadata_token(make_function, metadata, token_hc):
    """K_SERVICE set and no key file (Cloud Functions gen2): the Healthcare API gets the metadata server's token,
    fetched once for several requests; the emulator refuses any call without it."""
    api = HC(token_hc.url)
    api.http.headers["Authorization"] = f"Bearer {TOKEN}1"
    store = api.store()
    fn = make_function("metadata", hc_url=token_hc.url,
                       env={"K_SERVICE": "export-request", "GCE_METADATA_HOST": metadata.host})
    rids = [unique("md") for _ in range(3)]
    for rid in rids:
        fn.publish(valid_request(store, rid))
    events = fn.events(3, timeout=60)
    assert sorted(e["data"]["requestId"] for e in events) == sorted(rids)
    assert {e["data"]["eventType"] for e in events} == {"EXPORT_STARTED"}
    assert len(metadata.hits) == 1
    assert TOKEN not in fn.log_text()


def test_a_function_handles_events_without_loading_grpc_or_googles_clients(emulator_env, pubsub_clients, gcs):
    """The deployed functions call Firestore, Pub/Sub and Cloud Storage over REST: after each function has
    handled an event in-process, no gRPC, protobuf or google-cloud-* module has been imported."""
    publisher, _ = pubsub_clients
    topic = unique("ev")
    publisher.create_topic(name=f"projects/{PROJECT}/topics/{topic}")
    store = f"projects/{PROJECT}/locations/l/datasets/d/dicomStores/s"
    code = f"""
import base64, json, sys
from functions_framework import create_app
def push(data):
    return {{"message": {{"data": base64.b64encode(data).decode(), "messageId": "m-{topic}", "attributes": {{}},
                         "publishTime": "2026-11-25T00:00:00Z"}}, "subscription": "projects/{PROJECT}/subscriptions/s"}}
target = sys.argv[1]
client = create_app(target, "main.py", "http" if target == "export_status" else "cloudevent").test_client()
if target == "export_request":
    r = client.post("/", json=push(json.dumps({{"requestId": "{topic}", "bigqueryDestination": {{"tableUri": "x"}}}}).encode()))
elif target == "ingest_notification":
    r = client.post("/", json=push(b"{store}/dicomWeb/studies/1/series/2/instances/3"))
elif target == "poll_exports":
    r = client.post("/", json=push(b"tick"))
else:
    r = client.get("/?requestId={topic}")
# (functions-framework itself brings google.cloud.functions: its context types)
loaded = sorted(m for m in sys.modules if m.startswith(("grpc", "google.cloud.", "google.api_core", "google.protobuf",
                                                        "proto")) and not m.startswith("google.cloud.functions"))
print(json.dumps({{"status": r.status_code, "loaded": loaded}}))
"""
    env = {"GOOGLE_CLOUD_PROJECT": PROJECT, "EXPORT_EVENTS_TOPIC": topic, "EXPORT_REQUESTS_TOPIC": topic,
           "LEDGER_COLLECTION": unique("grpc-free"), "HEALTHCARE_API_ENDPOINT": "http://127.0.0.1:9",
           "INGEST_ROUTES": json.dumps({store: f"bq://{PROJECT}.d.t"}), "INGEST_FILTER_BUCKET": unique("b"),
           "INGEST_BATCH_MAX_INSTANCES": "1", "STORAGE_EMULATOR_HOST": gcs.url, "GOOGLE_APPLICATION_CREDENTIALS": ""}
    for target, ok in (("export_request", 200), ("ingest_notification", 200), ("poll_exports", 200),
                       ("export_status", 200)):
        r = subprocess.run([sys.executable, "-c", code, target], cwd=procs.ROOT, capture_output=True, text=True,
                           timeout=120, env={**os.environ, **env, "FUNCTION_TARGET": target})
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out == {"status": ok, "loaded": []}, (target, out, r.stdout[-3000:])
