"""Deletion notifications, received from real subscriptions on Google's Pub/Sub emulator.

DICOMweb DELETE of an instance, a series and a study: each `notificationConfigs` topic gets one message
per instance removed, `action` DeleteInstance / DeleteSeries / DeleteStudy, data = that instance's
resource name; the legacy `notificationConfig` topic ("notification destination for new DICOM
instances") gets nothing. Messages are pulled with timeouts, never after sleeps.
"""
from __future__ import annotations

from email.utils import parsedate_to_datetime

import pytest

from tests.emulator.test_notifications import pull, resource_name, topic_with_subscription
from tests.support import dicom_files, procs
from tests.support.hcapi import HC

PROJECT = "notify-proj"
STUDY_A, STUDY_B = "1.2.826.0.1.3680043.8.498.7101", "1.2.826.0.1.3680043.8.498.7102"


@pytest.fixture(scope="module")
def hcd(pubsub, logs_dir, tmp_path_factory):
    svc = procs.healthcare_emulator(logs_dir, tmp_path_factory.mktemp("hc-delete-notify"),
                                    env={"PUBSUB_EMULATOR_HOST": pubsub.host_port},
                                    name="healthcare-emulator-delete-notify")
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def clients(pubsub):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PUBSUB_EMULATOR_HOST", pubsub.host_port)
        from google.cloud import pubsub_v1
        yield pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()


def test_deletes_notify_each_removed_instance_on_notification_configs_only(hcd, clients, tmp_path):
    api = HC(hcd.url, project=PROJECT)
    topic, sub = topic_with_subscription(clients)
    legacy_topic, legacy_sub = topic_with_subscription(clients)
    store = api.store(body={"notificationConfig": {"pubsubTopic": legacy_topic},
                            "notificationConfigs": [{"pubsubTopic": topic}]})
    a1, a2, b1 = f"{STUDY_A}.1", f"{STUDY_A}.2", f"{STUDY_B}.1"
    layout = [(STUDY_A, a1, f"{a1}.1", "CT_small.dcm"), (STUDY_A, a1, f"{a1}.2", "CT_small.dcm"),
              (STUDY_A, a2, f"{a2}.1", "MR_small.dcm"), (STUDY_B, b1, f"{b1}.1", "MR_small.dcm")]
    files = [dicom_files.with_uids(dicom_files.path(src), tmp_path / f"{i}.dcm", study=st, series=se, sop=sop)
             for i, (st, se, sop, src) in enumerate(layout)]
    assert api.stow(store, files).status_code == 200
    stored = {m.attributes["sopInstanceUID"]: dict(m.attributes) for m in pull(clients, sub, 4)}
    assert len(stored) == 4 and {a["action"] for a in stored.values()} == {"StoreInstances"}
    assert len(pull(clients, legacy_sub, 4)) == 4

    def delete(path: str) -> None:
        r = api.http.delete(api.url(f"{store}/dicomWeb/{path}"))
        assert r.status_code == 200, r.text

    delete(f"studies/{STUDY_A}/series/{a1}")
    got = pull(clients, sub, 2)
    assert sorted(m.data.decode() for m in got) == sorted(
        resource_name(store, STUDY_A, a1, sop) for sop in (f"{a1}.1", f"{a1}.2"))
    for m in got:
        a = dict(m.attributes)
        assert a["action"] == "DeleteSeries"
        assert a["storeName"] == store
        assert (a["studyInstanceUID"], a["seriesInstanceUID"]) == (STUDY_A, a1)
        assert a["versionId"] == stored[a["sopInstanceUID"]]["versionId"]  # the version deleted
        assert a["modality"] == "CT"
        assert parsedate_to_datetime(a["lastUpdatedTime"]).tzinfo is not None
        assert "storageClass" not in a

    delete(f"studies/{STUDY_A}")  # what is left of the study: the MR series
    (m,) = pull(clients, sub, 1)
    assert m.data.decode() == resource_name(store, STUDY_A, a2, f"{a2}.1")
    assert (m.attributes["action"], m.attributes["sopInstanceUID"], m.attributes["modality"]) == \
           ("DeleteStudy", f"{a2}.1", "MR")

    delete(f"studies/{STUDY_B}/series/{b1}/instances/{b1}.1")
    (m,) = pull(clients, sub, 1)
    assert (m.attributes["action"], m.data.decode()) == ("DeleteInstance", resource_name(store, STUDY_B, b1, f"{b1}.1"))

    # The legacy topic got nothing for the deletes: store one more instance and pull until its message
    # arrives (the notifier publishes in order, one batch after the other); it is the only one there.
    marker = dicom_files.with_uids(dicom_files.path("CT_small.dcm"), tmp_path / "marker.dcm")
    assert api.stow(store, [marker]).status_code == 200
    legacy = pull(clients, legacy_sub, 1)
    assert len(legacy) == 1 and dict(legacy[0].attributes) == {}
    assert "/studies/1.2.826.0.1.3680043.8.498.71" not in legacy[0].data.decode()
    (m,) = pull(clients, sub, 1)
    assert m.attributes["action"] == "StoreInstances"


def test_a_delete_that_matches_nothing_notifies_nothing(hcd, clients, tmp_path):
    api = HC(hcd.url, project=PROJECT)
    topic, sub = topic_with_subscription(clients)
    store = api.store(body={"notificationConfigs": [{"pubsubTopic": topic}]})
    r = api.http.delete(api.url(f"{store}/dicomWeb/studies/{STUDY_A}.999"))
    assert r.status_code == 404
    marker = dicom_files.with_uids(dicom_files.path("CT_small.dcm"), tmp_path / "marker.dcm")
    assert api.stow(store, [marker]).status_code == 200
    (m,) = pull(clients, sub, 1)
    assert m.attributes["action"] == "StoreInstances"
