"""Benchmark: ingest_notification against the local emulators.

    python bench/ingest.py [--notifications 3000] [--burst 1000] [--trickle 20] [--tick-s 60]

Starts its own Pub/Sub, Firestore and GCS emulators, then, in the same run:

  1. throughput. `--notifications` store notifications (distinct instances, with notificationConfigs
     attributes) wait on a subscription; the subscription is then pointed at a functions-framework
     process (push, as Eventarc delivers) and the time until the last one is handled is taken:
       - baseline: a no-op function (`noop` below) fed the same way: the push transport's ceiling;
       - ingest: `ingest_notification` with the default batch settings (each INGEST_BATCH_MAX_INSTANCES
         arrivals close a batch: filter file written, request published, on the same path).
     Printed: notifications/s of each and the ratio ingest/baseline.
  2. delay from STOW to row in the table, default settings (INGEST_BATCH_MAX_INSTANCES=1000,
     INGEST_BATCH_MAX_AGE_S=60), the whole path (Healthcare emulator notifications -> ingest -> intake
     -> export -> poller), a scheduler tick every `--tick-s` (deploy.sh's default schedule is every minute):
       - burst: `--burst` instances STOWed at once (the batch closes on size);
       - trickle: `--trickle` instances, then nothing (the batch closes on age, at a tick).
     Printed: seconds from the first STOW to the first row and to the last row.

Prints one JSON object and a short summary. `--skip-delay` runs only part 1.
"""
from __future__ import annotations

import functions_framework


@functions_framework.cloud_event
def noop(cloud_event):  # the baseline's function: acknowledge, and say so on stdout (counted)
    print("handled", flush=True)


def main() -> None:  # noqa: C901 - a linear script
    import argparse
    import json
    import os
    import sys
    import tempfile
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from stack.services import Service, firestore_emulator, free_port, gcs_emulator, pubsub_emulator

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--notifications", type=int, default=3000)
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--trickle", type=int, default=20)
    ap.add_argument("--tick-s", type=float, default=60.0)
    ap.add_argument("--skip-delay", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    logs = work / "logs"
    logs.mkdir()
    services = []
    ff = str(Path(sys.executable).parent / "functions-framework")
    project = "test-project"
    result: dict = {"notifications": args.notifications}
    try:
        pubsub = pubsub_emulator(logs).start(timeout=120)
        services.append(pubsub)
        firestore = firestore_emulator(logs).start(timeout=120)
        services.append(firestore)
        gcs = gcs_emulator(logs, work / "gcs").start(timeout=60)
        services.append(gcs)
        os.environ.update({"PUBSUB_EMULATOR_HOST": pubsub.host_port, "FIRESTORE_EMULATOR_HOST": firestore.host_port,
                           "STORAGE_EMULATOR_HOST": gcs.url, "GOOGLE_CLOUD_PROJECT": project})
        from google.cloud import pubsub_v1
        publisher, subscriber = pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(max_messages=500)), pubsub_v1.SubscriberClient()

        store = f"projects/{project}/locations/us-central1/datasets/bench/dicomStores/throughput"
        env = {"PUBSUB_EMULATOR_HOST": pubsub.host_port, "FIRESTORE_EMULATOR_HOST": firestore.host_port,
               "STORAGE_EMULATOR_HOST": gcs.url, "GOOGLE_CLOUD_PROJECT": project, "GOOGLE_APPLICATION_CREDENTIALS": "",
               "HEALTHCARE_API_ENDPOINT": "http://127.0.0.1:9", "EXPORT_REQUESTS_TOPIC": "bench-requests",
               "LEDGER_COLLECTION": "bench", "INGEST_ROUTES": json.dumps({store: f"bq://{project}.bench.t"}),
               "INGEST_FILTER_BUCKET": "bench-filters", "PYTHONUNBUFFERED": "1"}
        publisher.create_topic(name=f"projects/{project}/topics/bench-requests")

        def run(name: str, source: list[str], target: str, line: str) -> float:
            """Notifications/s of one function fed by a push subscription holding the whole backlog."""
            topic = f"projects/{project}/topics/notify-{name}"
            sub = f"projects/{project}/subscriptions/notify-{name}"
            publisher.create_topic(name=topic)
            subscriber.create_subscription(name=sub, topic=topic, ack_deadline_seconds=60)
            futures = []
            for i in range(args.notifications):
                study, series, sop = f"1.2.{i // 500}", f"1.2.{i // 500}.1", f"1.2.{i // 500}.1.{i}"
                data = f"{store}/dicomWeb/studies/{study}/series/{series}/instances/{sop}".encode()
                futures.append(publisher.publish(topic, data, action="StoreInstances", storeName=store,
                                                 studyInstanceUID=study, seriesInstanceUID=series,
                                                 sopInstanceUID=sop, versionId="1", storageClass="STANDARD"))
            for f in futures:
                f.result(timeout=60)
            port = free_port()
            svc = Service(f"bench-{name}", [ff, *source, f"--target={target}", "--signature-type=cloudevent",
                                            "--host", "127.0.0.1", "--port", str(port)],
                          port=port, log_dir=logs, env=env, cwd=root)
            svc.start(timeout=60)
            services.append(svc)
            t0 = time.monotonic()
            subscriber.modify_push_config(request={"subscription": sub, "push_config": {
                "push_endpoint": f"{svc.url}/projects/{project}/topics/notify-{name}"}})
            deadline = t0 + 900
            while True:
                handled = svc.log_path.read_text(errors="replace").count(line)
                if handled >= args.notifications:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name}: only {handled} of {args.notifications} handled")
                time.sleep(0.1)
            elapsed = time.monotonic() - t0
            subscriber.delete_subscription(subscription=sub)
            svc.stop()
            return args.notifications / elapsed

        base = run("noop", ["--source", str(Path(__file__).resolve())], "noop", "handled")
        ing = run("ingest", [], "ingest_notification", '"ingestOutcome": "recorded"')
        result["throughput"] = {"baseline_noop_per_s": round(base, 1), "ingest_per_s": round(ing, 1),
                                "ratio": round(ing / base, 3)}
        print(f"throughput: ingest_notification {ing:.0f} notifications/s; no-op function {base:.0f}/s "
              f"(ratio {ing / base:.2f})", flush=True)

        if not args.skip_delay:
            result["delay"] = delays(args, work, logs, pubsub, firestore, gcs, subscriber, publisher)
    finally:
        for svc in reversed(services):
            svc.stop()
    print(json.dumps(result, indent=2))


def delays(args, work, logs, pubsub, firestore, gcs, subscriber, publisher) -> dict:
    """STOW -> row, default batch settings, the whole local path."""
    import threading
    import time

    from tests.support.ingest import IngestStack, make_instances, stow_bursts

    out = {"tick_s": args.tick_s, "max_instances": 1000, "max_age_s": 60}
    st = IngestStack(pubsub=pubsub, firestore=firestore, gcs=gcs, logs_dir=logs, data_dir=work / "hc",
                     pubsub_clients=(publisher, subscriber), store_ids=["burst", "trickle"], max_n=1000,
                     max_age_s=60).start()
    stop = threading.Event()

    def ticker():  # Cloud Scheduler's part
        while not stop.wait(args.tick_s):
            st.tick()
    threading.Thread(target=ticker, daemon=True).start()
    try:
        for sid, n in (("burst", args.burst), ("trickle", args.trickle)):
            files = make_instances(work / f"dcm-{sid}", n)
            t0 = time.monotonic()
            stow_bursts(st.hc, st.stores[sid], files, burst=50, parallel=4)
            stowed = time.monotonic() - t0
            first = None
            deadline = t0 + 900
            while True:
                rows = st.rows(sid)["n"]
                if rows and first is None:
                    first = time.monotonic() - t0
                if rows >= n:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"{sid}: {rows} of {n} rows after 900 s")
                time.sleep(0.25)
            last = time.monotonic() - t0
            out[sid] = {"instances": n, "stow_s": round(stowed, 2), "first_row_s": round(first, 2),
                        "last_row_s": round(last, 2)}
            print(f"delay ({sid}, {n} instances): STOW took {stowed:.1f} s; first row after {first:.1f} s, "
                  f"all rows after {last:.1f} s", flush=True)
    finally:
        stop.set()
        st.stop()
    return out


if __name__ == "__main__":
    main()
