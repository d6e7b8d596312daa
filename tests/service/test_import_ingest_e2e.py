"""dicomStores.import of pydicom's whole test-file corpus, with the legacy notificationConfig's
sendForBulkImport, feeding the ingest function end to end: every imported instance lands in the
routed BigQuery table exactly once. Real emulators (Healthcare, Pub/Sub, Firestore, fake-gcs-server) and the
real functions; every wait is a condition with a deadline."""
from __future__ import annotations

import pytest
import requests

from tests.support import dicom_files
from tests.support.hcapi import unique
from tests.support.ingest import IngestStack

pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def stack(pubsub, firestore, gcs, logs_dir, tmp_path, pubsub_clients):
    st = IngestStack(pubsub=pubsub, firestore=firestore, gcs=gcs, logs_dir=logs_dir, data_dir=tmp_path / "hc",
                     pubsub_clients=pubsub_clients, store_ids=["corpus"], max_n=100, max_age_s=2)
    st.start()
    yield st
    st.stop()


def instances_in(hc, store: str) -> set[str]:
    r = hc.get(f"{store}/dicomWeb/instances", params={"includefield": "00080018", "limit": "50000"})
    if r.status_code == 204:
        return set()
    assert r.status_code == 200, r.text
    return {i["00080018"]["Value"][0] for i in r.json()}


def test_corpus_import_with_send_for_bulk_import_lands_every_instance_once(stack, gcs_client):
    st = stack
    store = st.stores["corpus"]
    # Only the legacy config, with sendForBulkImport: what the function receives is the data-only message.
    r = st.hc.http.patch(st.hc.url(store), params={"updateMask": "notificationConfig,notificationConfigs"},
                         json={"notificationConfig": {"pubsubTopic": st.topic("notify"), "sendForBulkImport": True}})
    assert r.status_code == 200, r.text

    corpus = dicom_files.bundled()  # every file of the folder: DICOM or not, with or without File Meta
    bucket = gcs_client.create_bucket(unique("corpus"))
    for p in corpus:
        bucket.blob(f"pydicom/{p.relative_to(dicom_files.TEST_FILES).as_posix()}").upload_from_filename(str(p))

    r = st.hc.post(f"{store}:import", json={"gcsSource": {"uri": f"gs://{bucket.name}/pydicom/**"}})
    assert r.status_code == 200, r.text
    op = st.hc.wait(r.json()["name"], timeout=600)
    assert "error" not in op, op
    counter = op["metadata"]["counter"]
    success, failure = int(counter["success"]), int(counter.get("failure", 0))
    assert success + failure == len(corpus)
    imported = instances_in(st.hc, store)
    assert len(imported) == success > 100
    # every failure is logged by its gs:// URI
    entries = requests.get(op["metadata"]["logsUrl"], timeout=30).json()["entries"]
    assert len(entries) == failure
    assert all(e["jsonPayload"]["gcsSource"].startswith(f"gs://{bucket.name}/pydicom/") for e in entries)

    rows = st.wait_rows({"corpus": success}, timeout=600)
    assert rows["corpus"] == {"n": success, "d": success}
    got = st.query(f"SELECT SOPInstanceUID, COUNT(*) AS n FROM `{st.tables['corpus']}` GROUP BY SOPInstanceUID")
    assert {r["SOPInstanceUID"] for r in got} == imported
    assert {r["n"] for r in got} == {1}
