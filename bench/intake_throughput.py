"""Benchmark: export_request throughput against a no-op Pub/Sub function run the same way.

    python bench/intake_throughput.py [--requests 200]

Both functions run under functions-framework, fed by a push subscription of Google's Pub/Sub emulator.
The figure for export_request: requests published at once / seconds until every export is started (its
EXPORT_STARTED events counted on a pull subscription), with the Firestore emulator as its ledger and the
Healthcare API emulator as the API. The baseline: the same number of messages pushed to bench/hello's
`hello` (done when it has printed every message id). The ratio export_request/hello is the result
(goal >= 0.5x). Runs in well under 3 minutes.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stack.services import Service, firestore_emulator, free_port, healthcare_emulator, pubsub_emulator  # noqa: E402

FF = str(Path(sys.executable).parent / "functions-framework")
PROJECT = "bench-project"


def _push(subscriber, topic: str, name: str, port: int) -> None:
    subscriber.create_subscription(request={
        "name": f"projects/{PROJECT}/subscriptions/{name}", "topic": topic, "ack_deadline_seconds": 60,
        "push_config": {"push_endpoint": f"http://127.0.0.1:{port}/projects/{PROJECT}/topics/x"}})


def _publish_all(publisher, topic: str, bodies: list[bytes]) -> float:
    t0 = time.monotonic()
    for f in [publisher.publish(topic, b) for b in bodies]:
        f.result(timeout=60)
    return t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=60)
    args = ap.parse_args()
    n = args.requests
    tmp = Path(tempfile.mkdtemp(prefix="bench-intake-"))
    services = []

    def start(svc, timeout=60):
        services.append(svc)
        return svc.start(timeout=timeout)
    try:
        pubsub = start(pubsub_emulator(tmp), 120)
        firestore = start(firestore_emulator(tmp), 120)
        hc = start(healthcare_emulator(tmp, tmp / "hc"))
        import os
        os.environ.update({"PUBSUB_EMULATOR_HOST": pubsub.host_port, "GOOGLE_CLOUD_PROJECT": PROJECT})
        import requests
        from google.cloud import pubsub_v1
        publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        topic = lambda t: f"projects/{PROJECT}/topics/{t}"  # noqa: E731
        for t in ("hello-in", "req", "events"):
            publisher.create_topic(name=topic(t))
        events_sub = f"projects/{PROJECT}/subscriptions/events-pull"
        subscriber.create_subscription(name=events_sub, topic=topic("events"), ack_deadline_seconds=60)
        base_env = {"PUBSUB_EMULATOR_HOST": pubsub.host_port, "FIRESTORE_EMULATOR_HOST": firestore.host_port,
                    "GOOGLE_CLOUD_PROJECT": PROJECT, "PYTHONUNBUFFERED": "1", "GOOGLE_APPLICATION_CREDENTIALS": ""}

        # -- baseline: the no-op function -----------------------------------------------------------------
        port = free_port()
        hello = start(Service("fn-hello", [FF, "--target=hello", "--signature-type=cloudevent", "--source",
                                           str(ROOT / "bench" / "hello" / "main.py"), "--host", "127.0.0.1",
                                           "--port", str(port)], port=port, log_dir=tmp, env=base_env))
        _push(subscriber, topic("hello-in"), "hello-push", port)
        t0 = _publish_all(publisher, topic("hello-in"), [json.dumps({"i": i}).encode() for i in range(n)])
        deadline = t0 + args.timeout
        while hello.log_path.read_text(errors="replace").count("hello ") < n:
            if time.monotonic() > deadline:
                got = hello.log_path.read_text(errors="replace").count("hello ")
                raise SystemExit(f"hello received {got} of {n} messages in {args.timeout:.0f} s; log tail:\n{hello.log_tail(1500)}")
            time.sleep(0.02)  # polling a log file for a condition, with a deadline
        hello_rate = n / (time.monotonic() - t0)

        # -- export_request ----------------------------------------------------------------------------------
        api = requests.Session()
        base = f"{hc.url}/v1/projects/{PROJECT}/locations/us-central1"
        api.post(f"{base}/datasets", params={"datasetId": "d"}, json={}).raise_for_status()
        api.post(f"{base}/datasets/d/dicomStores", params={"dicomStoreId": "s"}, json={}).raise_for_status()
        store = f"projects/{PROJECT}/locations/us-central1/datasets/d/dicomStores/s"
        port = free_port()
        start(Service("fn-export_request", [FF, "--target=export_request", "--signature-type=cloudevent",
                                            "--host", "127.0.0.1", "--port", str(port)], port=port, log_dir=tmp,
                      env={**base_env, "HEALTHCARE_API_ENDPOINT": hc.url, "EXPORT_REQUESTS_TOPIC": "req",
                           "EXPORT_EVENTS_TOPIC": "events", "LEDGER_COLLECTION": "bench"}, cwd=ROOT))
        _push(subscriber, topic("req"), "req-push", port)
        bodies = [json.dumps({"requestId": f"bench-{i}", "dicomStore": store, "bigqueryDestination": {
            "tableUri": f"bq://{PROJECT}.exports.t{i}", "writeDisposition": "WRITE_APPEND"}}).encode() for i in range(n)]
        t0 = _publish_all(publisher, topic("req"), bodies)
        started, deadline = set(), t0 + args.timeout
        from google.api_core import exceptions
        while len(started) < n and time.monotonic() < deadline:
            try:
                resp = subscriber.pull(subscription=events_sub, max_messages=100, timeout=5)
            except (exceptions.DeadlineExceeded, exceptions.RetryError):
                continue
            if resp.received_messages:
                subscriber.acknowledge(subscription=events_sub, ack_ids=[m.ack_id for m in resp.received_messages])
            started |= {m.message.attributes["requestId"] for m in resp.received_messages
                        if m.message.attributes.get("eventType") == "EXPORT_STARTED"}
        if len(started) < n:
            raise SystemExit(f"only {len(started)} of {n} exports started within {args.timeout}s")
        rate = n / (time.monotonic() - t0)
        exports = sum(v.get("export", 0) for v in api.get(f"{hc.url}/emulator/requestCounts").json().values())
        print(json.dumps({"requests": n, "hello_per_s": round(hello_rate, 1), "export_request_per_s": round(rate, 1),
                          "ratio": round(rate / hello_rate, 2), "exports_started": exports, "goal": ">= 0.5"}))
    finally:
        for svc in reversed(services):
            svc.stop()


if __name__ == "__main__":
    main()
