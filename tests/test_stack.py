"""The local stack: `make demo` end to end, and `make up` / the client / `make down`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


def stack(*args, timeout=600, check=True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_EMULATOR_HOST")}
    r = subprocess.run([sys.executable, "-m", "stack", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env)
    if check:
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r


def alive(pgid: int) -> bool:
    """A process of the group still runs (zombies left to a container's PID 1 do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_demo_runs_the_whole_job_and_stops_everything():
    out = stack("demo").stdout
    assert '"eventType": "EXPORT_SUCCEEDED"' in out
    assert "DICOMwebPath" in out and "StudyDateTime" in out
    assert "WRITE_APPEND" in out and "rows:" in out
    assert out.rstrip().endswith("demo finished: every step passed")


def test_up_submit_watch_status_down():
    state = ROOT / ".local" / "stack.json"
    if state.exists():
        stack("down")
    stack("up", timeout=300)
    try:
        st = json.loads(state.read_text())
        hc = st["healthcare"]
        base = f"{hc}/v1/projects/{st['project']}/locations/{st['location']}/datasets"
        ds = f"cli_{uuid.uuid4().hex[:8]}"  # the stack's data dir survives `make down`: fresh names
        requests.post(base, params={"datasetId": ds}, json={}, timeout=30).raise_for_status()
        requests.post(f"{base}/{ds}/dicomStores", params={"dicomStoreId": "s"}, json={}, timeout=30).raise_for_status()
        subprocess.run([sys.executable, "-m", "healthcare_emulator", "bq", "mk", f"{st['project']}.{ds}", "-f",
                        "--data-dir", st["data_dir"]], check=True, capture_output=True, timeout=60)
        rid = f"cli-test-{ds}"
        r = stack("submit", "--store", f"projects/{st['project']}/locations/{st['location']}/datasets/{ds}/dicomStores/s",
                  "--table", f"bq://{st['project']}.{ds}.t", "--write-disposition", "WRITE_TRUNCATE",
                  "--request-id", rid)
        assert json.loads(r.stdout)["requestId"] == rid
        events = [json.loads(line) for line in stack("watch", "--request-id", rid, "--until-terminal",
                                                     timeout=120).stdout.splitlines()]
        assert [e["eventType"] for e in events][-1] == "EXPORT_SUCCEEDED"
        status = json.loads(stack("status", rid).stdout)
        assert status["state"] == "SUCCEEDED" and status["requestId"] == rid
        pre = stack("preflight")  # topics, push subscriptions with dead-letter policies, Firestore: all there
        assert "✗" not in pre.stdout and pre.stdout.rstrip().endswith(" checks, 0 failed"), pre.stdout
    finally:
        pgids = json.loads(state.read_text())["pgids"] if state.exists() else []
        stack("down")
    assert not state.exists()
    assert not [p for p in pgids if alive(p)]  # every process group it started is gone
