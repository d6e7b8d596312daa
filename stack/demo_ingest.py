"""`make demo`, ingest part: a routed store whose table follows it, a deletion and a replacement included.

The store `routed` sends its notifications (notificationConfigs, with `action` and `versionId`) to the stack's
notification topic; `ingest_notification` batches them; each batch deletes its instances' rows (a BigQuery DML
job) and exports what the store has. Three instances are stored, one is deleted, another is replaced (deleted
and stored again with a changed PatientName): the table ends with two rows, the replaced one holding the new
name.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import requests

from stack import local

STORE_ID = "routed"
TABLE = f"{local.PROJECT}.imaging.routed"


def store_name(dataset: str) -> str:
    return f"{dataset}/dicomStores/{STORE_ID}"


def routes(dataset: str) -> dict:
    """The stack's INGEST_ROUTES for the demo (given to local.Stack before it starts)."""
    return {store_name(dataset): {"tableUri": f"bq://{TABLE}", "schemaJson": {}}}


def make_store(hc: str, dataset: str) -> str:
    store = store_name(dataset)
    requests.post(f"{hc}/v1/{dataset}/dicomStores", params={"dicomStoreId": STORE_ID}, timeout=30, json={
        "notificationConfigs": [{"pubsubTopic": local.Stack.topic(local.NOTIFY_TOPIC)}]}).raise_for_status()
    return store


def stow(hc: str, store: str, files: list[Path]) -> None:
    boundary = "demo-ingest-boundary"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f.read_bytes() + b"\r\n"
                    for f in files) + f"--{boundary}--\r\n".encode()
    r = requests.post(f"{hc}/v1/{store}/dicomWeb/studies", data=body, timeout=60, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json"})
    r.raise_for_status()


def rows(bq) -> list[dict]:
    try:
        return [dict(r) for r in bq.query_and_wait(
            f"SELECT SOPInstanceUID, JSON_VALUE(Metadata, '$.\"00100010\".Value[0].Alphabetic') AS name "
            f"FROM `{TABLE}` ORDER BY SOPInstanceUID")]
    except Exception as e:  # the table does not exist before the first batch
        if "not found" in str(e).lower():
            return []
        raise


def wait_rows(bq, done, what: str, timeout: float = 300) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        got = rows(bq)
        if done(got):
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: the table holds {got}")
        time.sleep(1)


def show(got: list[dict]) -> None:
    for r in got:
        print(f"  {r['SOPInstanceUID']:<66} {r['name']}")


def run(hc: str, dataset: str, bq) -> None:
    """Store 3, delete 1, replace 1; print the table after each change is reflected."""
    from tests.support.dicom_files import path, with_uids

    store = make_store(hc, dataset)
    tmp = Path(tempfile.mkdtemp(prefix="demo-ingest-"))
    files = [with_uids(path("CT_small.dcm"), tmp / f"{i}.dcm", PatientName=f"DEMO^ORIGINAL{i}") for i in range(3)]
    uids = []
    import pydicom
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        uids.append((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    stow(hc, store, files)
    print(f"  stored 3 instances in {store}; waiting for ingest's batch ...")
    show(wait_rows(bq, lambda got: len(got) == 3, "three rows"))

    study, series, sop = uids[0]
    requests.delete(f"{hc}/v1/{store}/dicomWeb/studies/{study}/series/{series}/instances/{sop}",
                    timeout=30).raise_for_status()
    print(f"  deleted {sop}; waiting for its row to go ...")
    show(wait_rows(bq, lambda got: sop not in {r["SOPInstanceUID"] for r in got}, "the deletion"))

    study, series, sop = uids[1]
    requests.delete(f"{hc}/v1/{store}/dicomWeb/studies/{study}/series/{series}/instances/{sop}",
                    timeout=30).raise_for_status()
    replaced = with_uids(path("CT_small.dcm"), tmp / "replaced.dcm", study=study, series=series, sop=sop,
                         PatientName="DEMO^REPLACED")
    stow(hc, store, [replaced])
    print(f"  replaced {sop} (deleted, stored again with PatientName DEMO^REPLACED); waiting ...")
    got = wait_rows(bq, lambda got: [r["name"] for r in got if r["SOPInstanceUID"] == sop] == ["DEMO^REPLACED"],
                    "the replacement")
    show(got)
    if len(got) != 2:
        raise AssertionError(f"expected two rows, one per instance: {got}")
    print("  the table follows the store: one row per instance, the deleted one gone, the replaced one new")
