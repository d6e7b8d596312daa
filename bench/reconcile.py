"""Benchmark: reconcile of a routed store with 1% divergence, against a full WRITE_TRUNCATE export of the same
store in the same run.

    python bench/reconcile.py [--instances 20000] [--per-study 25]

A store of N instances (N / per-study studies, 5 series each) is stored through STOW-RS and exported to its
table. Then 1% of the instances diverge behind the service's back, a third each: rows deleted from the
table (missing), rows duplicated (INSERT ... SELECT), instances deleted from the store (extra rows). Printed,
from the same run:
  - reconcile_tables' run over the route (RECONCILE_MAX_STUDIES = every study, so one run): seconds,
    instances read (store instances listed + table instance rows read; the per-study lists and counts are
    counted as studies), API calls, and the counts it reports (which must equal the divergence made);
  - the baseline: a full WRITE_TRUNCATE export of the store into a second table: seconds, instances read (all),
    API calls (the export, and the emulator's wait for the operation: a real client polls operations.get).
Both against the local emulators (Healthcare + BigQuery, Firestore, Pub/Sub) on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROJECT = "test-project"


def make_corpus(n: int, per_study: int, out: Path) -> list[Path]:
    import pydicom
    from pydicom.uid import generate_uid

    from tests.support import dicom_files

    ds = pydicom.dcmread(dicom_files.path("CT_small.dcm"))
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        if i % per_study == 0:
            study = generate_uid()
        if i % max(1, per_study // 5) == 0:
            series = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = out / f"{i:06d}.dcm"
        ds.save_as(path, enforce_file_format=False)
        files.append(path)
    return files


def export(api, store: str, body: dict) -> dict:
    r = api.export(store, body)
    assert r.status_code == 200, r.text
    return api.wait(r.json()["name"], timeout=3600)


def counting(web, bq):
    """Wrap the adapters' reads to count the instances (rows) they return."""
    read = {"store_instances": 0, "table_rows": 0, "studies_listed": 0}
    studies, instances, query = web.studies, web.instances, bq.query

    def s(*a, **k):
        out = studies(*a, **k)
        read["studies_listed"] += len(out)
        return out

    def i(*a, **k):
        out = instances(*a, **k)
        read["store_instances"] += len(out)
        return out

    def q(sql, *a, **k):
        out = query(sql, *a, **k)
        if "SOPInstanceUID, COUNT(*)" in sql:
            read["table_rows"] += sum(int(r[3]) for r in out.rows)
        return out
    web.studies, web.instances, bq.query = s, i, q
    return read


def diverge(api, bq, store: str, table: str, uids: list[tuple[str, str, str]], n: int, rng) -> dict:
    from handlers.core import changes as C

    # one divergent instance per series at most: a missing and an extra instance of one series leave its counts
    # equal, which the per-series comparison cannot see (docs/design.md, "Reconcile": what it cannot see)
    by_series = {}
    for u in rng.sample(uids, len(uids)):
        by_series.setdefault(u[1], u)
    picked = list(by_series.values())[:n]
    third = n // 3
    missing, duplicated, extra = picked[:third], picked[third:2 * third], picked[2 * third:]
    t = C.table_sql_name(table)
    bq.query(f"DELETE FROM {t} WHERE SOPInstanceUID IN UNNEST(@s)", [C.string_array("s", [u[2] for u in missing])])
    bq.query(f"INSERT INTO {t} SELECT * FROM {t} WHERE SOPInstanceUID IN UNNEST(@s)",
             [C.string_array("s", [u[2] for u in duplicated])])
    for study, series, sop in extra:
        r = api.http.delete(api.url(f"{store}/dicomWeb/studies/{study}/series/{series}/instances/{sop}"))
        assert r.status_code == 200, r.text
    return {"missing": len(missing), "duplicated": len(duplicated), "extra": len(extra)}


def main() -> int:  # noqa: C901 - a linear script
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=20000)
    ap.add_argument("--per-study", type=int, default=25)
    ap.add_argument("--divergence", type=float, default=0.01)
    args = ap.parse_args()

    import pydicom

    from bench.emulator_export import stow_all
    from stack.services import firestore_emulator, healthcare_emulator, pubsub_emulator
    from tests.support.hcapi import HC

    work = Path(tempfile.mkdtemp(prefix="bench-reconcile-"))
    logs = work / "logs"
    logs.mkdir()
    services = []
    try:
        for make in (lambda: pubsub_emulator(logs), lambda: firestore_emulator(logs)):
            services.append(make().start(timeout=120))
        pubsub, firestore = services
        hc = healthcare_emulator(logs, work / "hc").start(timeout=60)
        services.append(hc)
        os.environ.update({"PUBSUB_EMULATOR_HOST": pubsub.host_port, "FIRESTORE_EMULATOR_HOST": firestore.host_port,
                           "GOOGLE_CLOUD_PROJECT": PROJECT})
        api = HC(hc.url)
        store = api.store()
        t = time.monotonic()
        files = make_corpus(args.instances, args.per_study, work / "dcm")
        stow_all(api, store, files)
        uids = []
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            uids.append((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
        print(f"stored {len(files)} instances in {len(files) // args.per_study} studies "
              f"({time.monotonic() - t:.1f} s)", flush=True)
        import subprocess
        subprocess.run([sys.executable, "-m", "healthcare_emulator", "bq", "mk", f"{PROJECT}.bench", "-f",
                        "--data-dir", str(work / "hc")], check=True, cwd=ROOT, capture_output=True)
        table = f"bq://{PROJECT}.bench.routed"
        op = export(api, store, {"bigqueryDestination": {"tableUri": table}})
        assert "error" not in op, op

        import config
        from handlers import reconcile, wiring
        from handlers.adapters.bigquery import BigQuery

        bq = BigQuery(hc.url, PROJECT)
        made = diverge(api, bq, store, table, uids, int(args.instances * args.divergence), random.Random(7))
        print(f"divergence made: {made}", flush=True)

        from google.cloud import pubsub_v1
        pubsub_v1.PublisherClient().create_topic(name=f"projects/{PROJECT}/topics/bench-events")
        s = config.load({**os.environ, "GOOGLE_CLOUD_PROJECT": PROJECT, "LEDGER_COLLECTION": "bench",
                         "INGEST_ROUTES": json.dumps({store: table}), "INGEST_FILTER_BUCKET": "bench-filters",
                         "HEALTHCARE_API_ENDPOINT": hc.url, "BIGQUERY_API_ENDPOINT": hc.url,
                         "EXPORT_EVENTS_TOPIC": "bench-events", "RECONCILE_MAX_STUDIES": str(args.instances),
                         "RECONCILE_MAX_INSTANCES": str(args.instances)})
        state, ingest, web, rbq, events = wiring.reconcile_for(s)
        read = counting(web, rbq)
        rec = reconcile.Reconcile(s, state, ingest, web, rbq, events)
        t = time.monotonic()
        report = rec.route(store, table).counts()
        rec_s = time.monotonic() - t
        assert (report["instancesMissing"], report["instancesDuplicated"], report["instancesExtra"]) == (
            made["missing"], made["duplicated"], made["extra"]), report

        t = time.monotonic()
        op = export(api, store, {"bigqueryDestination": {"tableUri": f"bq://{PROJECT}.bench.full",
                                                          "writeDisposition": "WRITE_TRUNCATE"}})
        full_s = time.monotonic() - t
        exported = int((op.get("metadata") or {}).get("counter", {}).get("success") or 0)
        rec_read = read["store_instances"] + read["table_rows"]
        print(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "instances": args.instances, "studies": args.instances // args.per_study,
            "reconcile": {"seconds": round(rec_s, 2), "instancesRead": rec_read, "apiCalls": report["apiCalls"],
                          "studiesListed": read["studies_listed"], **{k: report[k] for k in (
                              "studiesCompared", "studiesDiffering", "instancesMissing", "instancesExtra",
                              "instancesDuplicated", "healed")}},
            "fullExport": {"seconds": round(full_s, 2), "instancesRead": exported,
                           "apiCalls": 2},  # the export, and one wait for its operation (operations.get polls)
            "ratio": {"seconds": round(rec_s / full_s, 3), "instancesRead": round(rec_read / max(exported, 1), 4)},
        }, indent=1))
        return 0
    finally:
        for svc in reversed(services):
            svc.stop()


if __name__ == "__main__":
    sys.exit(main())
