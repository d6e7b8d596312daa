"""DICOM store notifications, received from a real subscription on Google's Pub/Sub emulator.

An emulator of its own is started with PUBSUB_EMULATOR_HOST; instances are stored and deleted through
DICOMweb, and the messages are pulled (with timeouts, no sleeps) from subscriptions on the topics the
store's notificationConfig / notificationConfigs name.
"""
from __future__ import annotations

import time
import uuid
from email.utils import parsedate_to_datetime

import pytest

from tests.support import dicom_files, procs
from tests.support.hcapi import HC, unique

PROJECT = "notify-proj"


@pytest.fixture(scope="module")
def pubsub_env(pubsub):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PUBSUB_EMULATOR_HOST", pubsub.host_port)
        yield pubsub


@pytest.fixture(scope="module")
def hcn(pubsub_env, logs_dir, tmp_path_factory):
    """An emulator that publishes notifications to the Pub/Sub emulator."""
    data_dir = tmp_path_factory.mktemp("hc-notify")
    svc = procs.healthcare_emulator(logs_dir, data_dir, env={"PUBSUB_EMULATOR_HOST": pubsub_env.host_port},
                                    name="healthcare-emulator-notify")
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def ps(pubsub_env):
    from google.cloud import pubsub_v1
    return pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()


def topic_with_subscription(ps) -> tuple[str, str]:
    publisher, subscriber = ps
    tid = unique("topic")
    topic = publisher.create_topic(name=f"projects/{PROJECT}/topics/{tid}").name
    sub = subscriber.create_subscription(name=f"projects/{PROJECT}/subscriptions/{tid}-sub", topic=topic).name
    return topic, sub


def pull(ps, subscription: str, n: int, timeout: float = 30.0) -> list:
    """Pull until `n` messages arrived (acking them) or `timeout` passed; the pull itself waits."""
    _, subscriber = ps
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        resp = subscriber.pull(subscription=subscription, max_messages=n - len(got),
                               timeout=max(1.0, deadline - time.monotonic()))
        if resp.received_messages:
            subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in resp.received_messages])
            got.extend(m.message for m in resp.received_messages)
    return got


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("notify-files")
    study = "1.2.826.0.1.3680043.8.498.7001"
    ct = dicom_files.with_uids(dicom_files.path("CT_small.dcm"), d / "ct.dcm", study=study,
                               series="1.2.826.0.1.3680043.8.498.7001.1", sop="1.2.826.0.1.3680043.8.498.7001.1.1")
    mr = dicom_files.with_uids(dicom_files.path("MR_small.dcm"), d / "mr.dcm", study=study,
                               series="1.2.826.0.1.3680043.8.498.7001.2", sop="1.2.826.0.1.3680043.8.498.7001.2.1")
    return {"study": study, "ct": ct, "mr": mr}


def resource_name(store: str, study: str, series: str, sop: str) -> str:
    return f"{store}/dicomWeb/studies/{study}/series/{series}/instances/{sop}"


def test_legacy_notification_config_sends_the_resource_name_without_attributes(hcn, ps, files):
    api = HC(hcn.url, project=PROJECT)
    topic, sub = topic_with_subscription(ps)
    store = api.store(body={"notificationConfig": {"pubsubTopic": topic}})
    r = api.stow(store, [files["ct"], files["mr"]])
    assert r.status_code == 200, r.text

    msgs = pull(ps, sub, 2)
    assert sorted(m.data.decode() for m in msgs) == sorted([
        resource_name(store, files["study"], "1.2.826.0.1.3680043.8.498.7001.1", "1.2.826.0.1.3680043.8.498.7001.1.1"),
        resource_name(store, files["study"], "1.2.826.0.1.3680043.8.498.7001.2", "1.2.826.0.1.3680043.8.498.7001.2.1"),
    ])
    assert all(dict(m.attributes) == {} for m in msgs)
    assert all(m.message_id for m in msgs)


def test_notification_configs_carry_the_documented_attributes_on_store_and_delete(hcn, ps, files):
    api = HC(hcn.url, project=PROJECT)
    topic1, sub1 = topic_with_subscription(ps)
    topic2, sub2 = topic_with_subscription(ps)
    store = api.store(body={"notificationConfigs": [{"pubsubTopic": topic1}, {"pubsubTopic": topic2}]})
    assert api.stow(store, [files["ct"]]).status_code == 200

    ct_series, ct_sop = "1.2.826.0.1.3680043.8.498.7001.1", "1.2.826.0.1.3680043.8.498.7001.1.1"
    for sub in (sub1, sub2):  # every configured topic gets the message
        (m,) = pull(ps, sub, 1)
        assert m.data.decode() == resource_name(store, files["study"], ct_series, ct_sop)
        a = dict(m.attributes)
        assert a["action"] == "StoreInstances"
        assert a["storeName"] == store
        assert (a["studyInstanceUID"], a["seriesInstanceUID"], a["sopInstanceUID"]) == \
               (files["study"], ct_series, ct_sop)
        assert a["modality"] == "CT"
        assert a["versionId"].isdigit()
        assert parsedate_to_datetime(a["lastUpdatedTime"]).tzinfo is not None  # RFC 1123
        assert a["storageClass"] == "STANDARD"
        version = a["versionId"]

    r = api.http.delete(api.url(f"{store}/dicomWeb/studies/{files['study']}/series/{ct_series}/instances/{ct_sop}"))
    assert r.status_code == 200, r.text
    (d,) = pull(ps, sub1, 1)
    a = dict(d.attributes)
    assert d.data.decode() == resource_name(store, files["study"], ct_series, ct_sop)
    assert a["action"] == "DeleteInstance"
    assert a["sopInstanceUID"] == ct_sop and a["versionId"] == version
    assert "storageClass" not in a


def test_a_missing_topic_is_logged_and_storing_still_succeeds(hcn, ps, files, tmp_path):
    api = HC(hcn.url, project=PROJECT)
    topic, sub = topic_with_subscription(ps)
    missing = f"projects/{PROJECT}/topics/does-not-exist-{uuid.uuid4().hex[:8]}"
    store = api.store(body={"notificationConfigs": [{"pubsubTopic": missing}, {"pubsubTopic": topic}]})

    first = dicom_files.with_uids(files["mr"], tmp_path / "a.dcm")
    r = api.stow(store, [first])
    assert r.status_code == 200, r.text  # the store succeeds whatever Pub/Sub says
    assert len(pull(ps, sub, 1)) == 1    # the existing topic still gets its message

    # The notifier publishes batch by batch and logs a batch's failures before taking the next one:
    # once a later store's message has arrived, the first one's failure is in the log.
    second = dicom_files.with_uids(files["mr"], tmp_path / "b.dcm")
    assert api.stow(store, [second]).status_code == 200
    assert len(pull(ps, sub, 1)) == 1
    log = hcn.log_tail(200_000)
    assert f"Pub/Sub topic {missing} does not exist" in log
    assert store in log

    # Both instances are stored.
    r = api.get(f"{store}/dicomWeb/instances", headers={"Accept": "application/dicom+json"})
    assert r.status_code == 200 and len(r.json()) == 2


def test_a_store_without_notification_config_publishes_nothing_and_an_empty_topic_is_ignored(hcn, ps, files,
                                                                                             tmp_path):
    api = HC(hcn.url, project=PROJECT)
    topic, sub = topic_with_subscription(ps)
    quiet = api.store(body={"notificationConfig": {"pubsubTopic": ""}})
    assert api.stow(quiet, [dicom_files.with_uids(files["ct"], tmp_path / "q.dcm")]).status_code == 200
    loud = api.store(body={"notificationConfig": {"pubsubTopic": topic}})
    marker = dicom_files.with_uids(files["ct"], tmp_path / "m.dcm")
    assert api.stow(loud, [marker]).status_code == 200
    (m,) = pull(ps, sub, 1)
    assert m.data.decode().startswith(loud + "/dicomWeb/")
