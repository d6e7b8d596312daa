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


def _one_event_each(pubsub_clients, gcs, prefixes, unless=()):
    """Each function handles one event in a fresh process (functions-framework's test client, the emulators):
    {target: {"status": its answer, "loaded": the modules then loaded that start with `prefixes`}}."""
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
loaded = sorted(m for m in sys.modules if m.startswith({tuple(prefixes)!r}) and not m.startswith({tuple(unless)!r}))
print(json.dumps({{"status": r.status_code, "loaded": loaded}}))
"""
    env = {"GOOGLE_CLOUD_PROJECT": PROJECT, "EXPORT_EVENTS_TOPIC": topic, "EXPORT_REQUESTS_TOPIC": topic,
           "LEDGER_COLLECTION": unique("grpc-free"), "HEALTHCARE_API_ENDPOINT": "http://127.0.0.1:9",
           "BIGQUERY_API_ENDPOINT": "http://127.0.0.1:9", "RESOURCE_MANAGER_API_ENDPOINT": "http://127.0.0.1:9",
           "INGEST_ROUTES": json.dumps({store: f"bq://{PROJECT}.d.t"}), "INGEST_FILTER_BUCKET": unique("b"),
           "INGEST_BATCH_MAX_INSTANCES": "1", "STORAGE_EMULATOR_HOST": gcs.url, "GOOGLE_APPLICATION_CREDENTIALS": ""}
    outs = {}
    for target in ("export_request", "ingest_notification", "poll_exports", "export_status"):
        r = subprocess.run([sys.executable, "-c", code, target], cwd=procs.ROOT, capture_output=True, text=True,
                           timeout=120, env={**os.environ, **env, "FUNCTION_TARGET": target})
        assert r.returncode == 0, r.stderr[-3000:]
        outs[target] = json.loads(r.stdout.strip().splitlines()[-1])
    return outs


def test_a_function_handles_events_without_loading_grpc_or_googles_clients(emulator_env, pubsub_clients, gcs):
    """The deployed functions call Firestore, Pub/Sub and Cloud Storage over REST: after each function has
    handled an event in-process, no gRPC, protobuf or google-cloud-* module has been imported."""
    # (functions-framework itself brings google.cloud.functions: its context types)
    outs = _one_event_each(pubsub_clients, gcs, ("grpc", "google.cloud.", "google.api_core", "google.protobuf",
                                                 "proto"), unless=("google.cloud.functions",))
    for target, ok in (("export_request", 200), ("ingest_notification", 200), ("poll_exports", 200),
                       ("export_status", 200)):
        out = outs[target]
        assert out == {"status": ok, "loaded": []}, (target, out)


def test_a_function_handles_events_without_requests_or_google_auth_against_emulators(emulator_env, pubsub_clients,
                                                                                    gcs):
    """The transport is urllib3 alone: after each function has handled an event against the emulators (plain
    http, no token), neither requests nor its own dependencies, nor google-auth, nor the CA bundle (https only)
    has been imported; and nothing parsed a date with strptime (its first call builds locale tables)."""
    outs = _one_event_each(pubsub_clients, gcs, ("requests", "charset_normalizer", "idna", "certifi", "google.auth",
                                                 "google.oauth2", "http.cookiejar", "_strptime"))
    assert outs == {t: {"status": 200, "loaded": []} for t in outs}, outs


# -- the transport's own behaviour, against a local HTTP server over a real socket -----------------------------
class Api:
    """A local HTTP/1.1 server that answers each request with the next scripted answer (status, headers, body),
    or with `hold` (accept the request, answer only once released) or `drop` (close without answering),
    and records what it got."""

    def __init__(self, *answers):
        self.got, self.answers, self.release, self.conns = [], list(answers), threading.Event(), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Google's front ends

            def setup(self):
                super().setup()
                outer.conns.append(self.connection)

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                outer.got.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                  "body": self.rfile.read(n)})
                answer = outer.answers.pop(0) if outer.answers else (200, {}, b"{}")
                if answer == "drop":
                    self.close_connection = True
                    return
                if answer == "hold":
                    outer.release.wait(30)
                    answer = (200, {}, b"{}")
                status, headers, body = answer
                if "gzip" in self.headers.get("Accept-Encoding", "") and headers.get("gzip"):
                    import gzip
                    body, headers = gzip.compress(body), {"Content-Encoding": "gzip"}
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_DELETE = _any

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        import socket
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        for c in self.conns:  # kept-alive connections too: no later test can reach this server's handlers
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def api():
    made = []

    def make(*answers):
        made.append(Api(*answers))
        return made[-1]
    yield make
    for a in made:
        a.close()


def _deadline(s=30.0):
    import time
    return time.monotonic() + s


def test_a_call_sends_json_and_params_and_no_token_to_an_emulator(api):
    a = api((200, {"Content-Type": "application/json"}, b'{"ok": true}'))
    r = gh.call("POST", f"{a.url}/v1/projects/p/databases/(default)/documents:commit", tokens=gh.Tokens(),
                deadline=_deadline(), what="test", json={"writes": [{"x": "é"}]},
                params={"a": "1 2", "b": ["x", "y"], "skip": None})
    assert r.status_code == 200 and r.json() == {"ok": True}
    [got] = a.got
    assert got["method"] == "POST"
    assert got["path"] == "/v1/projects/p/databases/(default)/documents:commit?a=1+2&b=x&b=y"
    assert json.loads(got["body"]) == {"writes": [{"x": "é"}]}
    assert got["headers"]["Content-Type"] == "application/json"
    assert "Authorization" not in got["headers"]


def test_a_call_sends_bytes_as_given_and_reads_a_compressed_answer(api):
    a = api((200, {"gzip": "yes"}, b"some text " * 50))
    r = gh.call("POST", f"{a.url}/upload?x=1", tokens=gh.Static("tok"), deadline=_deadline(), what="test",
                data=b"\x00raw", params={"y": "2"}, headers={"Content-Type": "multipart/related; boundary=b"})
    assert r.content == b"some text " * 50
    [got] = a.got
    assert got["path"] == "/upload?x=1&y=2" and got["body"] == b"\x00raw"
    assert got["headers"]["Content-Type"] == "multipart/related; boundary=b"
    assert got["headers"]["Authorization"] == "Bearer tok" and "gzip" in got["headers"]["Accept-Encoding"]


def test_a_401_refreshes_a_refreshable_token_once(api, metadata):
    a = api((401, {}, b'{"error": {"code": 401, "status": "UNAUTHENTICATED", "message": "expired"}}'),
            (200, {}, b'{"n": 2}'))
    r = gh.call("GET", f"{a.url}/x", tokens=gh.Metadata(metadata.host), deadline=_deadline(), what="test")
    assert r.json() == {"n": 2}
    assert [g["headers"]["Authorization"] for g in a.got] == [f"Bearer {TOKEN}1", f"Bearer {TOKEN}2"]
    assert len(metadata.hits) == 2


def test_a_401_with_a_static_token_is_final(api):
    a = api((401, {}, b'{"error": {"code": 401, "status": "UNAUTHENTICATED", "message": "no"}}'))
    with pytest.raises(gh.HttpError) as e:
        gh.call("GET", f"{a.url}/x", tokens=gh.Static("t"), deadline=_deadline(), what="test")
    assert (e.value.http_status, e.value.status, e.value.code, e.value.message) == (401, "UNAUTHENTICATED", 16, "no")
    assert len(a.got) == 1


def test_final_answers_raise_the_callers_error_type_with_googles_envelope(api):
    class Mine(gh.HttpError):
        pass
    a = api((404, {}, b'[{"error": {"code": 404, "status": "NOT_FOUND", "message": "gone", "details": [{"a": 1}]}}]'),
            (400, {}, b"not json"))
    with pytest.raises(Mine) as e:
        gh.call("GET", f"{a.url}/x", tokens=gh.Tokens(), deadline=_deadline(), what="t", retry=gh.Retry(final=Mine))
    assert (e.value.code, e.value.status, e.value.message, e.value.details) == (5, "NOT_FOUND", "gone", [{"a": 1}])
    with pytest.raises(gh.HttpError) as e:
        gh.call("GET", f"{a.url}/x", tokens=gh.Tokens(), deadline=_deadline(), what="t")
    assert (e.value.code, e.value.status, e.value.message) == (3, "INVALID_ARGUMENT", "Bad Request")


def test_retryable_answers_are_retried_honouring_retry_after(api):
    a = api((503, {"Retry-After": "0.2"}, b""), (429, {}, b'{"error": {"status": "RESOURCE_EXHAUSTED"}}'),
            (409, {}, b'{"error": {"status": "ABORTED", "message": "contention"}}'), (200, {}, b'{"ok": 1}'))
    told = []
    retry = gh.Retry(rpc_statuses=frozenset({"ABORTED"}), honour_retry_after=True,
                     on_retry=lambda **kw: told.append(kw))
    r = gh.call("POST", f"{a.url}/x", tokens=gh.Tokens(), deadline=_deadline(), what="t", retry=retry, json={})
    assert r.json() == {"ok": 1} and len(a.got) == 4
    assert [t["attempt"] for t in told] == [1, 2, 3] and told[0]["retryInS"] == 0.2
    assert told[0]["problem"] == "503 UNAVAILABLE: Service Unavailable"
    assert told[2]["problem"] == "409 ABORTED: contention"


def test_max_attempts_ends_the_retries(api):
    a = api((500, {}, b""), (500, {}, b""))
    with pytest.raises(gh.Unavailable) as e:
        gh.call("GET", f"{a.url}/x", tokens=gh.Tokens(), deadline=_deadline(), what="get x", max_attempts=2)
    assert e.value.attempts == 2 and e.value.ambiguous and len(a.got) == 2  # a 500 may have done the work
    assert str(e.value) == "get x: 500 INTERNAL: Internal Server Error"


def test_a_refused_connection_is_retried_and_never_ambiguous():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    told = []
    with pytest.raises(gh.Unavailable) as e:
        gh.call("POST", f"http://127.0.0.1:{port}/x", tokens=gh.Tokens(), deadline=_deadline(), what="export",
                retry=gh.Retry(idempotent=False, on_retry=lambda **kw: told.append(kw)), max_attempts=3, json={})
    assert e.value.attempts == 3 and not e.value.ambiguous
    assert str(e.value) == "export: connection error (NewConnectionError)"
    assert [t["problem"] for t in told] == ["connection error (NewConnectionError)"] * 2


def test_a_call_that_is_not_idempotent_stops_after_an_ambiguous_failure(api):
    a = api("drop", (200, {}, b"{}"))
    with pytest.raises(gh.Unavailable) as e:
        gh.call("POST", f"{a.url}/x", tokens=gh.Tokens(), deadline=_deadline(), what="export",
                retry=gh.Retry(idempotent=False), json={})
    assert e.value.ambiguous and e.value.attempts == 1 and len(a.got) == 1
    assert str(e.value) == "export: connection error (ProtocolError)"
    r = gh.call("POST", f"{a.url}/x", tokens=gh.Tokens(), deadline=_deadline(), what="export", json={})
    assert r.status_code == 200  # the same connection pool still works


def test_a_read_timeout_is_ambiguous_and_an_idempotent_call_tries_again(api):
    a = api("hold", (200, {}, b'{"second": 1}'))
    with pytest.raises(gh.Unavailable) as e:
        gh.call("POST", f"{a.url}/x", tokens=gh.Tokens(), deadline=_deadline(), what="export", timeout_s=0.3,
                retry=gh.Retry(idempotent=False), json={})
    assert e.value.ambiguous and str(e.value) == "export: read timeout"
    a.release.set()
    b = api("hold", (200, {}, b'{"second": 1}'))
    told = []
    r = gh.call("GET", f"{b.url}/x", tokens=gh.Tokens(), deadline=_deadline(), what="get", timeout_s=0.3,
                retry=gh.Retry(on_retry=lambda **kw: told.append(kw)))
    b.release.set()
    assert r.json() == {"second": 1} and [t["problem"] for t in told] == ["read timeout"]


def _service_account_file(tmp_path, token_uri):
    """A service-account key file (a fresh RSA key) whose token endpoint is `token_uri`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    f = tmp_path / "key.json"
    f.write_text(json.dumps({"type": "service_account", "project_id": PROJECT, "private_key_id": "k1",
                             "private_key": key, "client_email": f"fn@{PROJECT}.iam.gserviceaccount.com",
                             "client_id": "1", "token_uri": token_uri}))
    return f


def test_adc_tokens_are_refreshed_through_the_transport(api, monkeypatch, tmp_path):
    """ADC from a service-account key file: google-auth's token exchange goes through the transport to the
    token endpoint (a local stand-in); the token is cached, and a 401 refreshes it."""
    oauth = api((200, {"Content-Type": "application/json"},
                 json.dumps({"access_token": "ya29.first", "expires_in": 3599, "token_type": "Bearer"}).encode()),
                (200, {"Content-Type": "application/json"},
                 json.dumps({"access_token": "ya29.second", "expires_in": 3599, "token_type": "Bearer"}).encode()))
    key = _service_account_file(tmp_path, f"{oauth.url}/token")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    tokens = gh.cloud_tokens(metadata_host="unused", on_google_cloud=True, credentials_file=str(key))
    assert tokens.header() == {"Authorization": "Bearer ya29.first"} == tokens.header()  # cached
    assert tokens.header(refresh=True) == {"Authorization": "Bearer ya29.second"}
    assert [(g["method"], g["path"]) for g in oauth.got] == [("POST", "/token"), ("POST", "/token")]
    form = oauth.got[0]["body"].decode()
    assert "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer" in form and "assertion=" in form


def test_an_adc_refresh_that_fails_is_a_token_error(api, monkeypatch, tmp_path):
    oauth = api((400, {"Content-Type": "application/json"}, b'{"error": "invalid_grant"}'))
    key = _service_account_file(tmp_path, f"{oauth.url}/token")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    with pytest.raises(gh.TokenError, match="Application Default Credentials gave no access token"):
        gh.Adc().header()
    assert len(oauth.got) == 1
