"""Notifications of imported instances: the legacy config only with sendForBulkImport, notificationConfigs
with the ImportDicomData action. Real Pub/Sub emulator, real fake-gcs-server; pulls wait with deadlines."""
from __future__ import annotations

import pydicom
import pytest

from tests.emulator.test_notifications import PROJECT, pull, topic_with_subscription
from tests.support import dicom_files, procs
from tests.support.hcapi import HC, unique


@pytest.fixture(scope="module")
def pubsub_env(pubsub):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PUBSUB_EMULATOR_HOST", pubsub.host_port)
        yield pubsub


@pytest.fixture(scope="module")
def ps(pubsub_env):
    from google.cloud import pubsub_v1
    return pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()


@pytest.fixture(scope="module")
def hci(pubsub_env, gcs, logs_dir, tmp_path_factory):
    svc = procs.healthcare_emulator(logs_dir, tmp_path_factory.mktemp("hc-import-notify"),
                                    env={"PUBSUB_EMULATOR_HOST": pubsub_env.host_port, "STORAGE_EMULATOR_HOST": gcs.url},
                                    name="healthcare-emulator-import-notify")
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def source(gcs, tmp_path_factory):
    """A bucket with two DICOM files (and their resource paths)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    d = tmp_path_factory.mktemp("import-notify-files")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", gcs.url)
        client = storage.Client(project="test-project", credentials=AnonymousCredentials())
        bucket = client.create_bucket(unique("imp-notify"))
        paths = []
        for i, name in enumerate(("CT_small.dcm", "MR_small.dcm")):
            f = dicom_files.with_uids(dicom_files.path(name), d / f"{i}.dcm")
            bucket.blob(f"in/{i}.dcm").upload_from_filename(str(f))
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            paths.append(f"studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
                         f"{ds.SOPInstanceUID}")
    return f"gs://{bucket.name}/in/*.dcm", sorted(paths)


def run_import(api: HC, store: str, uri: str) -> dict:
    r = api.post(f"{store}:import", json={"gcsSource": {"uri": uri}})
    assert r.status_code == 200, r.text
    op = api.wait(r.json()["name"])
    assert op["metadata"]["counter"] == {"success": "2"}, op
    return op


def test_send_for_bulk_import_and_the_import_action(hci, ps, source, tmp_path):
    uri, paths = source
    api = HC(hci.url, project=PROJECT)
    legacy_topic, legacy_sub = topic_with_subscription(ps)
    configs_topic, configs_sub = topic_with_subscription(ps)
    store = api.store(body={"notificationConfig": {"pubsubTopic": legacy_topic, "sendForBulkImport": True},
                            "notificationConfigs": [{"pubsubTopic": configs_topic}]})
    run_import(api, store, uri)

    legacy = pull(ps, legacy_sub, 2)
    assert sorted(m.data.decode() for m in legacy) == [f"{store}/dicomWeb/{p}" for p in paths]
    assert all(dict(m.attributes) == {} for m in legacy)
    configs = pull(ps, configs_sub, 2)
    assert sorted(m.data.decode() for m in configs) == [f"{store}/dicomWeb/{p}" for p in paths]
    assert {m.attributes["action"] for m in configs} == {"ImportDicomData"}
    assert {m.attributes["storeName"] for m in configs} == {store}
    assert sorted(m.attributes["sopInstanceUID"] for m in configs) == sorted(p.rsplit("/", 1)[1] for p in paths)


def test_without_send_for_bulk_import_the_legacy_topic_hears_only_stores(hci, ps, source, tmp_path):
    uri, paths = source
    api = HC(hci.url, project=PROJECT)
    topic, sub = topic_with_subscription(ps)
    store = api.store(body={"notificationConfig": {"pubsubTopic": topic}})
    run_import(api, store, uri)
    # A STOW after the import: its message is published after the import's would have been (one publisher
    # thread, batch after batch), so once it has arrived nothing from the import can still come.
    marker = dicom_files.with_uids(dicom_files.path("rtplan.dcm"), tmp_path / "marker.dcm")
    assert api.stow(store, [marker]).status_code == 200
    got = pull(ps, sub, 1)
    got += pull(ps, sub, 1, timeout=2.0)
    sop = str(pydicom.dcmread(marker, stop_before_pixels=True).SOPInstanceUID)
    assert [m.data.decode().rsplit("/", 1)[1] for m in got] == [sop]
