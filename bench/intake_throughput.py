"""Benchmark: export_request throughput against a no-op Pub/Sub function run the same way.

    python bench/intake_throughput.py [--requests 200]

Both functions run under functions-framework, fed by a push subscription of Google's Pub/Sub emulator.
The figure for export_request: requests published at once / seconds until every export is started (its
EXPORT_STARTED events counted on a pull subscription), with the Firestore emulator as its ledger and the
Healthcare API emulator as the API. The baseline: the same number of messages pushed to bench/hello's
`hello` (done when it has printed every message id). The ratio export_request/hello is the result
(goal >= 0.5x). Runs in well under 3 minutes.

What bounds it: the Pub/Sub emulator keeps about two pushes in flight per subscription (measured below
from the no-op's own log), so a subscription's rate is in-flight / (function latency + push overhead).
A request needs four calls (ledger create, export, ledger write with the publish beside it, ledger
write); a second baseline makes those four calls alone, with no function, at the same concurrency: what
the emulators allow on this machine. A second figure takes the emulator's pacing out: push envelopes
POSTed straight to each function, --concurrency at a time (real Pub/Sub raises its outstanding pushes
while deliveries succeed), against hello and the four calls alone at that concurrency.
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


def _envelope(data: bytes, i: int) -> dict:
    import base64
    return {"message": {"data": base64.b64encode(data).decode(), "messageId": f"direct-{i}-{time.time_ns()}",
                        "publishTime": "2026-11-25T00:00:00Z", "attributes": {}},
            "subscription": f"projects/{PROJECT}/subscriptions/direct"}


def _direct(port: int, bodies: list[bytes], concurrency: int) -> float:
    """Push envelopes POSTed straight to the function, `concurrency` at a time; requests per second."""
    from concurrent.futures import ThreadPoolExecutor

    import requests
    http = requests.Session()
    http.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=concurrency))
    url = f"http://127.0.0.1:{port}/projects/{PROJECT}/topics/x"

    def post(i):
        r = http.post(url, json=_envelope(bodies[i], i), timeout=60)
        if r.status_code >= 300:
            raise SystemExit(f"direct push {i}: HTTP {r.status_code}: {r.text[:300]}")
    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(post, range(len(bodies))))
    return len(bodies) / (time.monotonic() - t0)


def _calls_only(firestore_host: str, pubsub_host: str, hc_url: str, store: str, n: int, concurrency: int) -> float:
    """The four calls a request needs, made through the functions' own adapters with no function around them
    (ledger create, export, publish, conditional ledger write), `concurrency` requests at a time: requests
    per second. What the emulators allow; no code in the function can beat it."""
    from concurrent.futures import ThreadPoolExecutor

    from handlers.adapters import transport as gh
    from handlers.adapters.firestore import Firestore
    from handlers.adapters.pubsub import Events
    fs = Firestore(PROJECT, emulator_host=firestore_host)
    events = Events(PROJECT, "events", emulator_host=pubsub_host)

    def one(i):
        name = f"c{concurrency}-{i}-{time.time_ns()}"
        version, = fs.commit([fs.create("calls-only", name, {"i": i})])
        r = gh.request("POST", f"{hc_url}/v1/{store}:export", tokens=gh.Tokens(), timeout=60, json={
            "bigqueryDestination": {"tableUri": f"bq://{PROJECT}.calls.c{concurrency}_{i}",
                                    "writeDisposition": "WRITE_APPEND"}})
        if r.status_code >= 300:
            raise SystemExit(f"export {i}: HTTP {r.status_code}: {r.content[:300]!r}")
        events.publish({"calls-only": i}, {"k": "v"})
        fs.commit([fs.update("calls-only", name, {"done": True}, version=version)])
    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(one, range(n)))
    return n / (time.monotonic() - t0)


def _latency(log_path: Path, wall: float) -> tuple[float, float]:
    """From export_request's own log: each request's first to last line (median, ms), and the deliveries in
    flight on average (the sum of those spans over the wall time)."""
    import statistics
    from datetime import datetime

    spans: dict[str, list[float]] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        e = json.loads(line)
        rid = (e.get("logging.googleapis.com/labels") or {}).get("requestId")
        if not rid or "time" not in e:
            continue
        t = datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp()
        lo, hi = spans.get(rid, (t, t))
        spans[rid] = [min(lo, t), max(hi, t)]
    durations = [hi - lo for lo, hi in spans.values()]
    return statistics.median(durations) * 1000, sum(durations) / wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--concurrency", type=int, default=16, help="deliveries in flight for the direct figure")
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
        port = hello_port = free_port()
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
        fn = start(Service("fn-export_request", [FF, "--target=export_request", "--signature-type=cloudevent",
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
        wall = time.monotonic() - t0
        rate = n / wall
        latency_ms, in_flight = _latency(fn.log_path, wall)

        # -- without the emulator's pacing: push envelopes POSTed straight to each function ---------------
        c = args.concurrency
        hello_direct = _direct(hello_port, [json.dumps({"i": i}).encode() for i in range(n)], c)
        direct_bodies = [json.dumps({"requestId": f"direct-{i}", "dicomStore": store, "bigqueryDestination": {
            "tableUri": f"bq://{PROJECT}.exports.d{i}", "writeDisposition": "WRITE_APPEND"}}).encode()
            for i in range(n)]
        intake_direct = _direct(port, direct_bodies, c)
        exports = sum(v.get("export", 0) for v in api.get(f"{hc.url}/emulator/requestCounts").json().values())
        window = max(1, round(in_flight))
        calls_window = _calls_only(firestore.host_port, pubsub.host_port, hc.url, store, n, window)
        calls_direct = _calls_only(firestore.host_port, pubsub.host_port, hc.url, store, n, c)
        print(f"intake throughput, {n} requests:")
        print(f"  pushed by the Pub/Sub emulator: export_request {rate:6.1f}/s; hello {hello_rate:6.1f}/s -> "
              f"{rate / hello_rate:.2f}x (goal >= 0.5x)")
        print(f"    {in_flight:.1f} deliveries in flight on average (the emulator's push window), {latency_ms:.0f} ms "
              f"per request (median, first to last log line)")
        print(f"    the request's four calls alone, {window} at a time (no function): {calls_window:6.1f}/s -> "
              f"export_request reaches {rate / calls_window:.2f}x of what the emulators allow")
        print(f"  POSTed directly, {c} in flight: export_request {intake_direct:6.1f}/s; hello {hello_direct:6.1f}/s -> "
              f"{intake_direct / hello_direct:.2f}x; the four calls alone: {calls_direct:6.1f}/s -> "
              f"{intake_direct / calls_direct:.2f}x")
        print(json.dumps({"requests": n, "hello_per_s": round(hello_rate, 1), "export_request_per_s": round(rate, 1),
                          "ratio": round(rate / hello_rate, 2), "latency_ms": round(latency_ms),
                          "in_flight": round(in_flight, 2), "calls_only_per_s": round(calls_window, 1),
                          "ratio_to_calls_only": round(rate / calls_window, 2), "direct_concurrency": c,
                          "hello_direct_per_s": round(hello_direct, 1),
                          "export_request_direct_per_s": round(intake_direct, 1),
                          "calls_only_direct_per_s": round(calls_direct, 1),
                          "direct_ratio": round(intake_direct / hello_direct, 2),
                          "direct_ratio_to_calls_only": round(intake_direct / calls_direct, 2),
                          "exports_started": exports, "goal": ">= 0.5"}))
    finally:
        for svc in reversed(services):
            svc.stop()


if __name__ == "__main__":
    main()
