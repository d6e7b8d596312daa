"""poll_exports as deployed: a functions-framework process fed by a Pub/Sub push subscription on its poll
topic (Cloud Scheduler publishes there), behind the intake function, end to end; its cold start; its settings."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from handlers.core import ledger as L
from tests.support import dicom_files, procs
from tests.support.function import PROJECT, valid_request, wait_for
from tests.support.hcapi import unique
from tests.support.poller import EVENT_FIELDS, PollerProcess, bq_mk, pull


def test_request_to_completion_through_pubsub(make_function, pubsub_clients, logs_dir, hc, hcapi, tmp_path):
    f = make_function("e2e")  # export_request, pushed from its requests topic
    bq_mk(hc.data_dir)
    poller = PollerProcess(f, logs_dir, name="poller-e2e").start()
    publisher, subscriber = pubsub_clients
    poll_topic = f"projects/{PROJECT}/topics/poll-{f.name}"
    publisher.create_topic(name=poll_topic)
    push = f"projects/{PROJECT}/subscriptions/poll-push-{f.name}"
    subscriber.create_subscription(request={
        "name": push, "topic": poll_topic, "ack_deadline_seconds": 60,
        "push_config": {"push_endpoint": f"{poller.url}projects/{PROJECT}/topics/poll-{f.name}"}})
    try:
        store = hcapi.store()
        files = [dicom_files.with_uids(dicom_files.path("CT_small.dcm"), tmp_path / f"{i}.dcm") for i in range(2)]
        assert hcapi.stow(store, files).status_code == 200
        rid = unique("e2e")
        body = valid_request(store, rid)
        f.publish(body)
        [started] = pull(f, 1, {rid})
        assert started["attributes"]["eventType"] == "EXPORT_STARTED"
        hcapi.wait(started["data"]["operation"])
        # the intake has recorded its publication and dropped its lease, and the first poll is due (~1 s)
        wait_for(lambda: "leaseOwner" not in (d := f.ledger.get(rid)) and d["nextPollAt"] <= L.now(),
                 what="the first poll to be due")

        publisher.publish(poll_topic, b'{"tick":true}').result(timeout=30)  # what Cloud Scheduler sends
        [done] = pull(f, 1, {rid})
        assert done["attributes"] == {"eventType": "EXPORT_SUCCEEDED", "eventId": f"{rid}:EXPORT_SUCCEEDED",
                                      "requestId": rid, "dicomStore": store,
                                      "tableUri": body["bigqueryDestination"]["tableUri"], "failureCount": "0"}
        data = done["data"]
        assert set(data) == EVENT_FIELDS and data["counter"] == {"success": 2, "failure": 0, "pending": 0}
        assert data["operation"] == started["data"]["operation"] and data["createTime"] == started["data"]["createTime"]
        assert data["bigqueryDestination"] == started["data"]["bigqueryDestination"]
        assert data["labels"] == {"team": "radiology"} and data["endTime"] and data["logsUrl"]
        assert f.ledger.get(rid)["state"] == L.SUCCEEDED

        # the run ends (its summary is logged) just after the event went out
        wait_for(lambda: any(e["message"] == "poll run finished" for e in poller.entries()), what="the run's end")
        entries = poller.entries()  # every line the function printed is a JSON log entry
        assert any(e["message"] == "export succeeded" and e["logging.googleapis.com/labels"]["requestId"] == rid
                   for e in entries)
        assert any(e["message"] == "poll run finished" for e in entries)
    finally:
        subscriber.delete_subscription(subscription=push)
        poller.stop()


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("POLL_", "FUNCTION_TARGET"))}
    return subprocess.run([sys.executable, "-c", code], cwd=procs.ROOT, capture_output=True, text=True, timeout=60,
                          env={**base, "GOOGLE_CLOUD_PROJECT": PROJECT, **env})


def test_cold_start_imports_only_what_the_poller_uses():
    code = ("import sys, main\n"
            "from handlers import poller\n"
            "print(sorted(m for m in sys.modules if m.startswith(('google.cloud.firestore', 'google.cloud.pubsub', "
            "'grpc', 'requests', 'google.auth', 'google.api_core', 'handlers.intake', 'handlers.core.request'))))")
    r = _python(code, {"FUNCTION_TARGET": "poll_exports"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"  # no Google client until the first tick; no intake code


@pytest.mark.parametrize("name, value", [
    ("POLL_CONCURRENCY", "0"), ("POLL_CONCURRENCY", "many"), ("POLL_PAGE_SIZE", "501"), ("POLL_BUDGET_S", "-1"),
    ("POLL_LEASE_S", "5"), ("POLL_CALL_TIMEOUT_S", "40"), ("POLL_MAX_INTERVAL_S", "0"),
])
def test_a_bad_poll_setting_stops_the_function_naming_the_variable(name, value):
    r = _python("import main", {"FUNCTION_TARGET": "poll_exports", name: value})
    assert r.returncode != 0
    [line] = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert line["severity"] == "CRITICAL" and name in line["message"]
