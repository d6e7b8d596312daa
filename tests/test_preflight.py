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
    assert crosses and all("no answer within 0.5 s" in x and "; fix: " in x for x in crosses), r.stdout
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
    assert "ConnectionError" in topic and "fix: gcloud pubsub topics create dicom-export-events" in topic
