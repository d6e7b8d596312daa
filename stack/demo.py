"""`make demo`: the main job, offline, start to finish, then everything stopped."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import requests

from stack import local

BQ_DATASET = "imaging"
TABLE = f"{local.PROJECT}.{BQ_DATASET}.dicom"


class StepFailed(Exception):
    pass


@contextmanager
def step(name: str):
    print(f"\n== {name}", flush=True)
    try:
        yield
    except StepFailed:
        raise
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        raise StepFailed(f"step '{name}' failed: {type(e).__name__}: {e}") from e


def bigquery_client(hc_url: str):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery
    return bigquery.Client(project=local.PROJECT, credentials=AnonymousCredentials(),
                           client_options={"api_endpoint": hc_url})


def stow_corpus(hc_url: str, store: str) -> tuple[int, int]:
    """Store pydicom's bundled test corpus through STOW-RS, 40 files a request."""
    from stack.dicom_files import storable
    files = list(storable())
    stored = failed = 0
    for i in range(0, len(files), 40):
        boundary = "demo-boundary-7d3f"
        body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.read_bytes() + b"\r\n"
                        for f in files[i:i + 40]) + f"--{boundary}--\r\n".encode()
        r = requests.post(f"{hc_url}/v1/{store}/dicomWeb/studies", data=body, timeout=120, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json"})
        if r.status_code not in (200, 202, 409):
            raise StepFailed(f"STOW answered {r.status_code}: {r.text[:300]}")
        reply = r.json() if r.content else {}
        stored += len(reply.get("00081199", {}).get("Value", []))
        failed += len(reply.get("00081198", {}).get("Value", []))
    return stored, failed


class Events:
    """Reads the events topic through the stack's watch subscription."""

    def __init__(self, stack: local.Stack):
        self.stack = stack
        self.seen: list[dict] = []

    def wait_for(self, request_id: str, types: set[str], timeout: float = 600, on_idle=None) -> dict:
        from google.api_core import exceptions
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.seen:
                if e["requestId"] == request_id and e["eventType"] in types:
                    return e
            try:
                resp = self.stack.subscriber.pull(subscription=self.stack.subscription(local.WATCH_SUB),
                                                  max_messages=20, timeout=2)
            except (exceptions.DeadlineExceeded, exceptions.RetryError):
                resp = None
            if resp and resp.received_messages:
                self.stack.subscriber.acknowledge(subscription=self.stack.subscription(local.WATCH_SUB),
                                                  ack_ids=[m.ack_id for m in resp.received_messages])
                self.seen += [json.loads(m.message.data) for m in resp.received_messages]
            elif on_idle:
                on_idle()
        raise StepFailed(f"no {'/'.join(sorted(types))} event for {request_id} within {timeout:.0f}s")


def follow(stack, events: Events, request: dict) -> dict:
    """Publish a request, show the operation's counters while it runs, return the terminal event."""
    rid = request["requestId"]
    stack.publisher.publish(stack.topic(local.REQUESTS_TOPIC), json.dumps(request).encode()).result(timeout=30)
    print(f"published request {rid} to {local.REQUESTS_TOPIC}")
    started = events.wait_for(rid, {"EXPORT_STARTED", "EXPORT_REJECTED", "EXPORT_FAILED"}, timeout=120)
    if started["eventType"] != "EXPORT_STARTED":
        raise StepFailed(f"request {rid} ended early: {json.dumps(started)}")
    op = started["operation"]
    print(f"EXPORT_STARTED: operation {op}")
    last = [None]

    def progress():
        meta = requests.get(f"{stack.hc.url}/v1/{op}", timeout=10).json().get("metadata", {})
        c = meta.get("counter", {})
        line = f"  progress: success={c.get('success', '0')} failure={c.get('failure', '0')} " \
               f"pending={c.get('pending', '0')}"
        if line != last[0]:
            print(line, flush=True)
            last[0] = line

    return events.wait_for(rid, {"EXPORT_SUCCEEDED", "EXPORT_FAILED", "EXPORT_CANCELLED", "EXPORT_TIMED_OUT"},
                           on_idle=progress)


def run(root: Path) -> int:
    from stack import demo_ingest

    dataset = f"projects/{local.PROJECT}/locations/{local.LOCATION}/datasets/imaging"
    stack = local.Stack(root, ingest_routes=demo_ingest.routes(dataset))
    try:
        with step("start the local stack"):
            stack.start()
            for k, v in stack.describe().items():
                if k not in ("env", "pgids"):
                    print(f"  {k}: {v}")
        hc = stack.hc.url
        store = f"{dataset}/dicomStores/demo"
        with step("create the Healthcare dataset, the DICOM store and the BigQuery dataset"):
            requests.post(f"{hc}/v1/projects/{local.PROJECT}/locations/{local.LOCATION}/datasets",
                          params={"datasetId": "imaging"}, json={}, timeout=30).raise_for_status()
            requests.post(f"{hc}/v1/{dataset}/dicomStores", params={"dicomStoreId": "demo"}, json={},
                          timeout=30).raise_for_status()
            bq = bigquery_client(hc)
            bq.create_dataset(f"{local.PROJECT}.{BQ_DATASET}", exists_ok=True)
            print(f"  {store}\n  BigQuery dataset {local.PROJECT}.{BQ_DATASET}")
        with step("store pydicom's bundled DICOM test corpus through STOW-RS"):
            stored, failed = stow_corpus(hc, store)
            print(f"  {stored} parts stored, {failed} refused (a SOP Instance UID "
                  "already stored, or not storable)")
        events = Events(stack)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        with step("export the whole store: request -> intake -> Healthcare export -> poller -> event"):
            event = follow(stack, events, {
                "requestId": f"demo-full-{stamp}", "dicomStore": store,
                "bigqueryDestination": {"tableUri": f"bq://{TABLE}", "writeDisposition": "WRITE_TRUNCATE"},
                "labels": {"demo": "full"}})
            print(json.dumps(event, indent=2))
            if event["eventType"] != "EXPORT_SUCCEEDED":
                raise StepFailed(f"the export ended with {event['eventType']}")
        with step("the seed's two queries on the exported table (google-cloud-bigquery)"):
            top = list(bq.query_and_wait(f"SELECT PatientID, COUNT(*) AS n FROM `{TABLE}` WHERE PatientID IS NOT "
                                         "NULL AND PatientID != '' GROUP BY PatientID ORDER BY n DESC, PatientID "
                                         "LIMIT 1"))
            patient = top[0]["PatientID"] if top else "19045"
            sql1 = f"""SELECT CONCAT('/dicomWeb/studies/', StudyInstanceUID, '/series/', SeriesInstanceUID,
              '/instances/', SOPInstanceUID) as DICOMwebPath
FROM `{TABLE}`
WHERE PatientID = '{patient}';"""
            print(sql1)
            paths = [row["DICOMwebPath"] for row in bq.query_and_wait(sql1)]
            for path in paths[:5]:
                print(f"  {path}")
            if len(paths) > 5:
                print(f"  ... {len(paths)} rows in all")
            sql2 = f"""SELECT MIN(CONCAT(StudyDate, ' ', StudyTime)) as StudyDateTime, MIN(PatientID) as PatientID,
       StudyInstanceUID, COUNT(*) as InstanceCount
FROM `{TABLE}` AS dicom
GROUP BY StudyInstanceUID
ORDER BY StudyDateTime DESC
LIMIT 10;"""
            print(sql2)
            for row in bq.query_and_wait(sql2):
                print(f"  {row['StudyDateTime']!s:<28} {row['PatientID']!s:<14} {row['StudyInstanceUID']:<66} "
                      f"{row['InstanceCount']}")
        with step("a second request: one study through a filter file in GCS, WRITE_APPEND"):
            before = list(bq.query_and_wait(f"SELECT COUNT(*) AS n FROM `{TABLE}`"))[0]["n"]
            study = list(bq.query_and_wait(f"SELECT StudyInstanceUID, COUNT(*) AS n FROM `{TABLE}` GROUP BY 1 "
                                           "ORDER BY n DESC, 1 LIMIT 1"))[0]
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage
            gcs = storage.Client(project=local.PROJECT, credentials=AnonymousCredentials())
            bucket = gcs.bucket("demo-filters")
            if not bucket.exists():
                bucket = gcs.create_bucket("demo-filters")
            bucket.blob("one-study.txt").upload_from_string(f"/studies/{study['StudyInstanceUID']}\n")
            print(f"  gs://demo-filters/one-study.txt -> /studies/{study['StudyInstanceUID']} "
                  f"({study['n']} instances)")
            event = follow(stack, events, {
                "requestId": f"demo-append-{stamp}", "dicomStore": store,
                "bigqueryDestination": {"tableUri": f"bq://{TABLE}", "writeDisposition": "WRITE_APPEND"},
                "filterConfig": {"resourcePathsGcsUri": "gs://demo-filters/one-study.txt"},
                "labels": {"demo": "append"}})
            print(json.dumps(event, indent=2))
            after = list(bq.query_and_wait(f"SELECT COUNT(*) AS n FROM `{TABLE}`"))[0]["n"]
            if event["eventType"] != "EXPORT_SUCCEEDED" or after != before + study["n"]:
                raise StepFailed(f"append: {event['eventType']}, rows {before} -> {after} "
                                 f"(expected +{study['n']})")
            print(f"  rows: {before} -> {after}")
        with step("ingest: a routed store's deletion and replacement reflected in its table"):
            demo_ingest.run(hc, dataset, bq)
        print(f"\nweb console: {hc}/console (Datasets, Export, Operations, BigQuery, Service); the demo stops it now:"
              "\n  `make up` keeps the stack running, its console at <healthcare URL>/console (`make down` stops it)")
        print("\ndemo finished: every step passed")
        return 0
    except StepFailed as e:
        print(f"\nDEMO FAILED: {e}\n(logs of every service: {stack.logs})", flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", flush=True)
        return 130
    finally:
        stack.stop()
