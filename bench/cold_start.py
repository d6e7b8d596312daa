"""Benchmark: cold start of each deployed function against a hello-world function run the same way.

    python bench/cold_start.py [--runs 5]

For each function: a fresh `functions-framework` process (bytecode compiled, PYTHONDONTWRITEBYTECODE
unset, as the cloud's build does), timed from process start until its first Pub/Sub push (or HTTP
request) is answered, against Google's Pub/Sub and Firestore emulators. Median of --runs. The ratio to
the hello-world baseline measured in the same run is the figure (goal <= 2.0x, stretch 1.5x).
"""
from __future__ import annotations

import argparse
import base64
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stack.services import firestore_emulator, free_port, pubsub_emulator  # noqa: E402

FF = str(Path(sys.executable).parent / "functions-framework")
STORE = "projects/bench-project/locations/us-central1/datasets/d/dicomStores/s"


def push_body(data: dict | bytes, attributes: dict | None = None) -> dict:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return {"message": {"data": base64.b64encode(raw).decode(), "attributes": attributes or {},
                        "messageId": str(time.time_ns()),
                        # now: an arrival published long ago would close an ingest batch by age at once
                        "publishTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "subscription": "projects/bench-project/subscriptions/bench"}


def cases() -> list[tuple[str, str, str, dict | None, dict]]:
    """(label, source dir, target, push body or None for HTTP GET, extra env)."""
    routes = json.dumps({STORE: "bq://bench-project.d.t"})
    return [
        ("hello world (baseline)", str(ROOT / "bench" / "hello"), "hello", push_body({"x": 1}), {}),
        # a request that is rejected still goes through the ledger and publishes an event
        ("export_request", str(ROOT), "export_request",
         push_body({"requestId": "cold", "bigqueryDestination": {"tableUri": "nope"}}), {}),
        ("poll_exports", str(ROOT), "poll_exports", push_body({"tick": True}), {}),
        ("export_status", str(ROOT), "export_status", None, {}),
        ("ingest_notification", str(ROOT), "ingest_notification",
         push_body(f"{STORE}/dicomWeb/studies/1.2/series/1.2.3/instances/1.2.3.4".encode()),
         # no batch closes (the arrivals of earlier runs never age out): no Cloud Storage write
         {"INGEST_ROUTES": routes, "INGEST_FILTER_BUCKET": "bench-filters", "INGEST_BATCH_MAX_AGE_S": "86400"}),
    ]


def one_start(source: str, target: str, body: dict | None, env: dict) -> float:
    port = free_port()
    sig = "http" if body is None else "cloudevent"
    t0 = time.perf_counter()
    proc = subprocess.Popen([FF, f"--target={target}", f"--source={source}/main.py", f"--signature-type={sig}",
                             "--host", "127.0.0.1", "--port", str(port)], cwd=source, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{target} exited with {proc.returncode}")
            try:
                if body is None:
                    r = requests.get(f"http://127.0.0.1:{port}/", params={"requestId": "cold"}, timeout=30)
                else:
                    r = requests.post(f"http://127.0.0.1:{port}/projects/bench-project/topics/t", json=body,
                                      timeout=30)
                if r.status_code >= 500:
                    raise SystemExit(f"{target} answered {r.status_code}: {r.text[:300]}")
                return time.perf_counter() - t0
            except requests.ConnectionError:
                time.sleep(0.005)  # not listening yet: this is the cold start being measured
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def warm_up(publisher, firestore_host: str) -> None:
    """One publish and one Firestore query before the first timed start: a fresh Java emulator answers
    its first calls slowly (seconds on a loaded machine), which is not the function's cold start."""
    publisher.publish("projects/bench-project/topics/dicom-export-events", b"{}").result(timeout=120)
    requests.post(f"http://{firestore_host}/v1/projects/bench-project/databases/(default)/documents:runQuery",
                  json={"structuredQuery": {"from": [{"collectionId": "warm-up"}], "limit": 1}},
                  headers={"Authorization": "Bearer owner"}, timeout=120).raise_for_status()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    compileall.compile_dir(str(ROOT / "handlers"), quiet=1)
    compileall.compile_dir(str(ROOT / "config"), quiet=1)
    compileall.compile_file(str(ROOT / "main.py"), quiet=1)
    with tempfile.TemporaryDirectory() as tmp:
        ps, fs = pubsub_emulator(Path(tmp)).start(120), firestore_emulator(Path(tmp)).start(120)
        try:
            from google.cloud import pubsub_v1
            os.environ["PUBSUB_EMULATOR_HOST"] = ps.host_port
            pub = pubsub_v1.PublisherClient()
            for t in ("dicom-export-events", "dicom-export-requests"):
                pub.create_topic(name=f"projects/bench-project/topics/{t}")
            warm_up(pub, fs.host_port)
            base_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
            base_env.update({"PUBSUB_EMULATOR_HOST": ps.host_port, "FIRESTORE_EMULATOR_HOST": fs.host_port,
                             "GOOGLE_CLOUD_PROJECT": "bench-project", "HEALTHCARE_API_ENDPOINT": "http://127.0.0.1:9",
                             "GOOGLE_APPLICATION_CREDENTIALS": "", "ALLOWED_DICOM_STORES": "projects/*",
                             "ALLOWED_BQ_DATASETS": "*"})
            times: dict[str, list[float]] = {label: [] for label, *_ in cases()}
            for _ in range(args.runs):  # the cases interleaved, so that a change of the machine's load hits all
                for label, source, target, body, extra in cases():
                    times[label].append(one_start(source, target, body, {**base_env, **extra}))
            results = {label: statistics.median(t) for label, t in times.items()}
            base = results["hello world (baseline)"]
            print(f"cold start, median of {args.runs} (process start -> first event answered):")
            for label, t in results.items():
                print(f"  {label:<24} {t * 1000:7.0f} ms  {t / base:5.2f}x baseline")
            print(json.dumps({k: {"ms": round(v * 1000), "ratio": round(v / base, 2)} for k, v in results.items()}))
        finally:
            ps.stop()
            fs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
