"""Benchmark: one poll run (poll_exports) against sequential polling of the same running exports.

    python bench/poller.py [--requests 1000] [--scale 10000] [--latency 0.02]

Starts its own Firestore and Pub/Sub emulators (gcloud) and a Healthcare emulator that adds `--latency`
seconds to every operations call and keeps exports running (slow-export mode), then, in the same run:

  1. `--requests` running exports, one ledger document each, all due;
  2. baseline A, "sequential": one request after the other, the straightforward way: claim it
     (Ledger.claim: a read and a conditional write), operations.get, record its next poll (Ledger.release:
     a read and a conditional write);
  3. baseline B: the poller's own code with POLL_CONCURRENCY=1 (pages, batched ledger writes, one GET
     at a time);
  4. one poll run with the default settings (POLL_CONCURRENCY=16) over the same set, made due again;
  5. scale: `--scale` requests (spread over the same operations), one run with the default 45 s budget:
     how many it handles, and in how long (goal: all of them within one 60 s scheduler period).

Prints one JSON object (figures and ratios) and a short text summary. Goal: run >= 10x faster than A.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stack import dicom_files  # noqa: E402
from stack import services as procs
from stack.hcapi import HC  # noqa: E402

PROJECT = "bench-project"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--scale", type=int, default=10000, help="requests of the one-period check (0: skip)")
    ap.add_argument("--latency", type=float, default=0.02, help="seconds the emulator adds to each API call")
    ap.add_argument("--skip-sequential", action="store_true", help="skip baseline A (slow)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-poller-"))
    services = []
    try:
        fs = procs.firestore_emulator(tmp).start(timeout=90)
        services.append(fs)
        ps = procs.pubsub_emulator(tmp).start(timeout=90)
        services.append(ps)
        hc = procs.healthcare_emulator(tmp, tmp / "hc", "--latency", str(args.latency), "--export-rate", "0.001",
                                       name="bench-healthcare-emulator").start()
        services.append(hc)
        subprocess.run([sys.executable, "-m", "healthcare_emulator", "bq", "mk", f"{PROJECT}.bench", "-f",
                        "--data-dir", str(tmp / "hc")], check=True, capture_output=True, cwd=ROOT)
        os.environ.update(FIRESTORE_EMULATOR_HOST=fs.host_port, PUBSUB_EMULATOR_HOST=ps.host_port,
                          GOOGLE_CLOUD_PROJECT=PROJECT, GOOGLE_APPLICATION_CREDENTIALS="")
        log_file = tmp / "poller.log"
        with open(log_file, "w") as log, contextlib.redirect_stdout(log):  # the poller's JSON log lines
            result = run(args, hc.url)
        result["logLines"] = sum(1 for _ in open(log_file))
    finally:
        for s in reversed(services):
            s.stop()
    print(json.dumps(result, indent=2))
    r = result
    print(f"\n{r['requests']} running exports, {args.latency * 1000:g} ms API latency:")
    if "sequentialS" in r:
        print(f"  sequential (claim, get, record; one at a time): {r['sequentialS']:.2f} s")
    print(f"  poller code, POLL_CONCURRENCY=1:               {r['concurrency1S']:.2f} s")
    print(f"  one poll run (POLL_CONCURRENCY=16):            {r['runS']:.2f} s"
          + (f"  -> {r['speedupVsSequential']:.1f}x faster than sequential" if "speedupVsSequential" in r else "")
          + f", {r['speedupVsConcurrency1']:.1f}x faster than concurrency 1")
    if r.get("scale"):
        s = r["scale"]
        print(f"  scale: {s['polled']}/{s['requests']} requests handled in one run of {s['runS']:.1f} s "
              f"({s['perSecond']:.0f}/s; budget {s['budgetS']:g} s)")
    return 0


def run(args, hc_url: str) -> dict:
    import config
    from handlers import poller, wiring
    from handlers.adapters.healthcare import Healthcare
    from handlers.core import ledger as L

    api = HC(hc_url, project=PROJECT)
    store = api.store()
    assert api.stow(store, [dicom_files.path("CT_small.dcm")]).status_code == 200  # 1 instance: ~1000 s per export
    n_ops = max(args.requests, min(args.scale, 2000))
    t = time.monotonic()
    with ThreadPoolExecutor(32) as ex:
        ops = list(ex.map(lambda i: api.export(store, {"bigqueryDestination": {
            "tableUri": f"bq://{PROJECT}.bench.t{i}"}}).json()["name"], range(n_ops)))
    created_s = time.monotonic() - t
    pubsub_topic(PROJECT, "bench-events")

    def settings(collection, **env):
        return config.load({"GOOGLE_CLOUD_PROJECT": PROJECT, "HEALTHCARE_API_ENDPOINT": hc_url,
                            "LEDGER_COLLECTION": collection, "EXPORT_EVENTS_TOPIC": "bench-events", **env})

    def seed(ledger, n):
        now, docs = L.now(), []
        for i in range(n):
            docs.append({"requestId": f"r{i:05d}", "state": L.STARTED, "operation": ops[i % len(ops)],
                         "apiVersion": "v1", "createTime": None, "receivedAt": now, "nextPollAt": now,
                         "pollInterval": 1.0, "tableUri": f"bq://{PROJECT}.bench.t{i}", "dicomStore": store,
                         "request": None, "labels": {}, "events": {}})
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(ledger.put_many, [docs[i:i + 500] for i in range(0, n, 500)]))

    def make_due(ledger, n):
        fs, now = ledger.client(), L.now()
        for i in range(0, n, 500):
            fs.commit([fs.update(ledger.collection, f"r{j:05d}", {"nextPollAt": now}) for j in range(i, min(n, i + 500))])

    out = {"requests": args.requests, "latencyS": args.latency, "operationsCreated": n_ops,
           "operationsCreateS": round(created_s, 2)}
    s = settings("bench-ledger")
    ledger, hc, events = wiring.poller_for(s)
    seed(ledger, args.requests)

    if not args.skip_sequential:  # baseline A
        naive_hc = Healthcare(hc_url, local=True, timeout_s=10, budget_s=10)
        t = time.monotonic()
        for i in range(args.requests):
            rid = f"r{i:05d}"
            claimed = ledger.claim(rid, owner="sequential", lease_s=60)
            naive_hc.get_operation(claimed.doc["operation"], max_attempts=1)
            ledger.release(rid, owner="sequential", updates={"nextPollAt": L.now() + timedelta(seconds=1.4),
                                                             "pollInterval": 1.4, "lastPolledAt": L.now()})
        out["sequentialS"] = round(time.monotonic() - t, 3)
        make_due(ledger, args.requests)

    s1 = settings("bench-ledger", POLL_CONCURRENCY="1", POLL_BUDGET_S="600", POLL_CALL_TIMEOUT_S="10")
    summary = poller.Tick(s1, *wiring.poller_for(s1)).run()
    assert summary.get("running") == args.requests, summary
    out["concurrency1S"] = summary["elapsedS"]
    make_due(ledger, args.requests)

    summary = poller.Tick(s, ledger, hc, events).run()
    assert summary.get("running") == args.requests, summary
    out["runS"] = summary["elapsedS"]
    out["run"] = summary
    if "sequentialS" in out:
        out["speedupVsSequential"] = round(out["sequentialS"] / out["runS"], 1)
    out["speedupVsConcurrency1"] = round(out["concurrency1S"] / out["runS"], 1)

    if args.scale:
        s = settings("bench-scale")
        ledger, hc, events = wiring.poller_for(s)
        seed(ledger, args.scale)
        summary = poller.Tick(s, ledger, hc, events).run()
        out["scale"] = {"requests": args.scale, "polled": summary.get("running", 0), "runS": summary["elapsedS"],
                        "perSecond": round(summary.get("running", 0) / summary["elapsedS"], 1),
                        "budgetS": s.poll_budget_s, "run": summary}
    return out



def pubsub_topic(project: str, topic: str) -> None:
    from google.cloud import pubsub_v1
    pubsub_v1.PublisherClient().create_topic(name=f"projects/{project}/topics/{topic}")


if __name__ == "__main__":
    sys.exit(main())
