"""`python -m stack preflight` when it cannot read: every check it cannot make is a ✗ with the reason, it exits 1,
and a server that never answers costs each call its time limit, no more (the run is bounded by the subprocess
timeout: a hang fails the test). The passing and failing grants are in tests/service/test_iam_e2e.py."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.support import procs


def preflight(env: dict, *args: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in __import__("os").environ.items()
            if not k.endswith(("_EMULATOR_HOST", "_API_ENDPOINT")) and k not in ("INGEST_ROUTES",)}
    return subprocess.run([sys.executable, "-m", "stack", "preflight", *args], cwd=procs.ROOT, capture_output=True,
                          text=True, timeout=120, env={**base, "GOOGLE_APPLICATION_CREDENTIALS": "", **env})


@pytest.fixture
def silent():
    """A port that accepts connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield f"127.0.0.1:{s.getsockname()[1]}"
    s.close()


def local_env(hc: str, pubsub: str, firestore: str) -> dict:
    return {"GOOGLE_CLOUD_PROJECT": "pf-project", "HEALTHCARE_API_ENDPOINT": hc, "BIGQUERY_API_ENDPOINT": hc,
            "RESOURCE_MANAGER_API_ENDPOINT": hc, "PUBSUB_EMULATOR_HOST": pubsub, "FIRESTORE_EMULATOR_HOST": firestore,
            "ALLOWED_BQ_DATASETS": "pf-project.imaging"}


def test_a_server_that_never_answers_is_a_cross_per_check_within_the_time_limit(silent):
    r = preflight(local_env(f"http://{silent}", silent, silent), "--timeout", "0.5")
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    crosses = [x for x in lines if x.startswith("✗")]
    assert crosses and all("read timeout (time limit 0.5 s)" in x and "; fix: " in x for x in crosses), r.stdout
    assert any("project pf-project (its number)" in x for x in crosses)
    assert any("Pub/Sub topic dicom-export-requests (requests) exists" in x for x in crosses)
    assert any("Firestore database (default) exists" in x for x in crosses)
    assert lines[-1] == f"{len(crosses)} checks, {len(crosses)} failed"


def test_a_project_it_may_not_read_says_so(logs_dir, tmp_path):
    hc = procs.healthcare_emulator(logs_dir, tmp_path / "hc", "--require-token", "not-ours",
                                   name="healthcare-emulator-preflight").start()
    closed = procs.free_port()
    try:
        r = preflight(local_env(hc.url, f"127.0.0.1:{closed}", f"127.0.0.1:{closed}"))
    finally:
        hc.stop()
    assert r.returncode == 1
    [number] = [x for x in r.stdout.splitlines() if "(its number)" in x]
    assert number.startswith("✗ project pf-project (its number): cannot read it: 401 UNAUTHENTICATED"), number
    assert number.endswith("; fix: gcloud projects describe pf-project")
    [dataset] = [x for x in r.stdout.splitlines() if "BigQuery dataset pf-project:imaging exists" in x]
    assert dataset.startswith("✗") and "401" in dataset and "fix: bq --project_id=pf-project mk --dataset" in dataset
    [topic] = [x for x in r.stdout.splitlines() if "topic dicom-export-events (events)" in x]
    assert "connection error" in topic and "fix: gcloud pubsub topics create dicom-export-events" in topic


# -- Google Cloud mode: every ✗'s fix is a command gcloud's (or bq's) own parser accepts -----------------------
class GoogleStandIn:
    """Answers as Google's APIs would for a project where everything exists but nothing is granted or wired:
    a stand-in, because Google Cloud cannot run here. Returns None (404) for what is absent."""

    def get(self, url: str, what: str):
        if url.endswith("/v1/projects/pf-proj"):
            return {"projectId": "pf-proj", "projectNumber": "123456789012"}
        if "/bigquery/v2/projects/" in url:
            return {"access": [{"role": "OWNER", "specialGroup": "projectOwners"}]}
        if url.endswith("/subscriptions?pageSize=1000"):
            topic = url.split("/topics/")[1].split("/")[0]
            subs = [] if topic == "dicom-export-dead-letter" else [f"projects/pf-proj/subscriptions/{topic}-sub"]
            return {"subscriptions": subs}
        if "/subscriptions/" in url:
            return {"name": url.split("/v1/")[1], "pushConfig": {"pushEndpoint": "https://run.app/x"}}
        if ":getIamPolicy" in url or "/topics/" in url:
            return {}
        if "/dicomStores/" in url:
            return {"name": url.split("/v1/")[1], "notificationConfigs": [{"pubsubTopic": "projects/x/topics/y"}]}
        if "cloudfunctions" in url:
            return {"eventTrigger": {"retryPolicy": "RETRY_POLICY_DO_NOT_RETRY"}}
        return None

    def post(self, url: str, what: str, body: dict):
        return {"version": 1, "etag": "ACAB"}


STORE = "projects/pf-proj/locations/us-central1/datasets/hc/dicomStores/ct"


def google_preflight():
    from stack import preflight as pf
    t = pf.Target(project="pf-proj", local=False, region="europe-west4", service_account="dicom-export@pf-proj."
                  "iam.gserviceaccount.com", healthcare="https://healthcare.googleapis.com", healthcare_version="v1",
                  bigquery="https://bigquery.googleapis.com", resource_manager="https://cloudresourcemanager.googleapis"
                  ".com", pubsub="https://pubsub.googleapis.com", firestore="https://firestore.googleapis.com",
                  firestore_database="(default)", topics={"requests": "dicom-export-requests", "events":
                  "dicom-export-events", "poll": "dicom-export-poll", "deadLetter": "dicom-export-dead-letter",
                  "ingest": "dicom-stored"}, dataset_patterns=("pf-proj.imaging",),
                  routes={STORE: "bq://pf-proj.imaging.dicom"}, store_projects=("pf-proj",),
                  healthcare_datasets=("projects/pf-proj/locations/us-central1/datasets/hc",))
    return pf.Preflight(t, GoogleStandIn()).run()


def test_google_cloud_mode_checks_and_their_fixes():
    results = google_preflight()
    failed = {r.what: r for r in results if not r.ok}
    agent = "service-123456789012@gcp-sa-healthcare.iam.gserviceaccount.com"
    assert failed[f"{agent} can write BigQuery dataset pf-proj:imaging"].fix == (
        f"bq --project_id=pf-proj add-iam-policy-binding --dataset --member=serviceAccount:{agent} "
        "--role=roles/bigquery.dataEditor pf-proj:imaging")
    assert failed[f"{agent} can run BigQuery jobs in project pf-proj"].fix.startswith(
        "gcloud projects add-iam-policy-binding pf-proj")
    assert failed[f"DICOM store {STORE} notifies projects/pf-proj/topics/dicom-stored"].reason == \
        "its notification config names projects/x/topics/y"
    assert failed["Cloud Scheduler job dicom-export-poll (europe-west4) publishes to dicom-export-poll"].reason == \
        "not found"
    assert failed["function export_request is deployed with retry on failure"].reason == \
        "its retry policy is RETRY_POLICY_DO_NOT_RETRY"
    assert "topic dicom-export-dead-letter has a subscription that keeps dead letters" in failed
    sa = "dicom-export@pf-proj.iam.gserviceaccount.com"
    for role in ("roles/datastore.user", "roles/logging.logWriter"):
        assert f"runtime account {sa} has {role} on project pf-proj" in failed
    assert f"runtime account {sa} may publish to dicom-export-events" in failed
    assert ("subscription projects/pf-proj/subscriptions/dicom-export-requests-sub (export_request) has a "
            "dead-letter policy to dicom-export-dead-letter") in failed
    ok = {r.what for r in results if r.ok}
    assert failed["Firestore database (default) exists"].fix == (
        "gcloud firestore databases create '--database=(default)' --location=europe-west4 --type=firestore-native "
        "--project=pf-proj")
    assert ok == {"BigQuery dataset pf-proj:imaging exists", f"DICOM store {STORE} exists"} | {
        f"Pub/Sub topic {t} ({role}) exists" for role, t in (
            ("requests", "dicom-export-requests"), ("events", "dicom-export-events"), ("poll", "dicom-export-poll"),
            ("deadLetter", "dicom-export-dead-letter"), ("ingest", "dicom-stored"))} | {
        f"topic {t} has the push subscription that triggers {fn}" for t, fn in (
            ("dicom-export-requests", "export_request"), ("dicom-export-poll", "poll_exports"),
            ("dicom-stored", "ingest_notification"))}


@pytest.fixture
def refusing():
    """An HTTP server that refuses every call with 403 at once (gcloud's commands reach it and stop)."""
    import http.server
    import json
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"error": {"code": 403, "message": "preflight-test: refused",
                                         "status": "PERMISSION_DENIED"}}).encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = answer

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_every_fix_command_passes_gcloud_and_bq_argument_parsing(refusing, tmp_path):
    """Each printed fix runs through the real CLI with every API pointed at a server that refuses: an argument
    error (exit 2, "Usage:") fails the test; reaching the API (its 403) is what a well-formed command does."""
    import shlex
    from concurrent.futures import ThreadPoolExecutor

    fixes = sorted({r.fix for r in google_preflight() if not r.ok})
    assert len(fixes) >= 12
    one_each = {}  # one command of each kind (gcloud is slow to start): the first words and the flag names
    for fix in fixes:
        argv = shlex.split(fix)
        one_each.setdefault((tuple(a for a in argv if not a.startswith("-"))[:4],
                             tuple(sorted(a.split("=")[0] for a in argv if a.startswith("-")))), fix)
    token = tmp_path / "token"
    token.write_text("dummy")
    apis = ("CLOUDRESOURCEMANAGER", "PUBSUB", "HEALTHCARE", "CLOUDFUNCTIONS", "CLOUDSCHEDULER", "FIRESTORE", "RUN",
            "EVENTARC", "CLOUDBUILD", "ARTIFACTREGISTRY", "STORAGE", "IAM", "BIGQUERY", "SERVICEUSAGE")
    env = {**__import__("os").environ, "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
           "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE": str(token), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
           **{f"CLOUDSDK_API_ENDPOINT_OVERRIDES_{a}": refusing for a in apis}}

    def run(fix: str):
        argv = shlex.split(fix)
        if argv[0] == "bq":
            argv = ["bq", f"--api={refusing.rstrip('/')}", *argv[1:]]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        return fix, r

    with ThreadPoolExecutor(4) as pool:
        for fix, r in pool.map(run, [f for f in one_each.values() if f.startswith(("gcloud ", "bq "))]):
            out = r.stdout + r.stderr
            assert r.returncode != 2 and "Usage:" not in out and "unrecognized arguments" not in out, (fix, out)
            assert "preflight-test: refused" in out or "403" in out, (fix, out)
