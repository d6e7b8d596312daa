"""export_status as deployed: `functions-framework --target=export_status` over HTTP, reading the ledger in
Google's Firestore emulator. The records come from the real intake document builder and a real poll run."""
from __future__ import annotations

import json
import re
import sys

import pytest
import requests

from handlers import intake, wiring
from handlers.core import ledger as L
from handlers.core import request as req
from tests.support import procs
from tests.support.function import FF, Function
from tests.support.hcapi import unique
from tests.support.poller import Poller, table

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@pytest.fixture(scope="module")
def status(pubsub_clients, pubsub, firestore, logs_dir, hc):
    f = Function("status", pubsub_clients, pubsub, firestore, logs_dir, hc.url, push_subscriptions=0)
    port = procs.free_port()
    svc = procs.Service(unique("status-fn"), [FF, "--target=export_status", "--signature-type=http",
                                              "--host", "127.0.0.1", "--port", str(port)],
                        port=port, log_dir=logs_dir, env=f.env, cwd=procs.ROOT).start(timeout=60)
    svc.fn = f
    yield svc
    svc.stop()
    f.stop()


def _get(svc, **params):
    return requests.get(svc.url + "/", params=params, timeout=30)


def test_a_running_then_finished_request(status, hcapi):
    p = Poller(status.fn)
    store = hcapi.store()
    op = p.export(store, table("missing_ds"))
    rid, body = p.seed(store, op)

    r = _get(status, requestId=rid)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    assert r.headers["Cache-Control"] == "no-store"
    got = r.json()
    assert got["requestId"] == rid and got["state"] == "STARTED" and got["operation"] == op["name"]
    assert got["dicomStore"] == store and got["bigqueryDestination"] == body["bigqueryDestination"]
    assert got["labels"] == {"team": "radiology"} and got["counter"] is None and got["error"] is None
    assert got["createTime"] == op["metadata"]["createTime"] and got["logsUrl"] == op["metadata"]["logsUrl"]
    assert RFC3339.match(got["nextPollAt"]) and RFC3339.match(got["receivedAt"]) and got["endTime"] is None
    assert got["events"] == {"EXPORT_STARTED": {"eventId": f"{rid}:EXPORT_STARTED", "published": True,
                                                "publishedAt": got["events"]["EXPORT_STARTED"]["publishedAt"]}}
    assert not {"leaseOwner", "leaseUntil", "payloadSha256", "request"} & set(got)  # nothing internal

    done = p.api.wait(op["name"])
    p.tick()
    got = _get(status, requestId=rid).json()
    assert got["state"] == "FAILED" and got["error"] == {"code": 5, "message": done["error"]["message"]}
    assert got["endTime"] == done["metadata"]["endTime"] and got["nextPollAt"] is None
    assert got["counter"] == {"success": 0, "failure": 0, "pending": 0}  # integers, as in events
    assert got["polls"] == 1 and RFC3339.match(got["lastPolledAt"])
    assert got["events"]["EXPORT_FAILED"]["published"] is True and RFC3339.match(
        got["events"]["EXPORT_FAILED"]["publishedAt"])


def test_a_rejected_request_and_an_id_firestore_reserves(status):
    raw = json.dumps({"requestId": "..", "dicomStore": "nope", "bigqueryDestination": {"tableUri": "bq://x"}})
    parsed = req.parse(raw.encode(), "m-status")
    doc = intake.new_document(parsed, raw.encode(), "m-status", published_at=L.now(), owner=None, lease_s=0)
    ledger = wiring.ledger_for(wiring.settings(), status.fn.collection)
    ledger.create("..", doc)  # stored under an escaped document id
    got = _get(status, requestId="..").json()
    assert got["requestId"] == ".." and got["state"] == "REJECTED" and got["error"]["code"] == 3
    assert got["events"]["EXPORT_REJECTED"]["published"] is False and got["operation"] is None


@pytest.mark.parametrize("params, code, words", [
    ({"requestId": "never-seen-" + "x" * 8}, 404, "no export request has requestId"),
    ({"requestId": "bad id!"}, 400, "malformed requestId"),
    ({"requestId": "x" * 129}, 400, "malformed requestId"),
    ({"requestId": ""}, 400, "exactly one requestId"),
    ({}, 400, "exactly one requestId"),
    ({"requestId": ["a", "b"]}, 400, "exactly one requestId"),
])
def test_unknown_and_malformed_ids(status, params, code, words):
    r = _get(status, **params)
    assert r.status_code == code
    err = r.json()["error"]
    assert err["code"] == code and err["status"] == {404: "NOT_FOUND", 400: "INVALID_ARGUMENT"}[code]
    assert words in err["message"]


def test_only_get(status):
    r = requests.post(status.url + "/?requestId=abc", timeout=30)
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD"


def test_status_imports_no_client_before_the_first_request():
    import subprocess
    code = ("import sys, main\nfrom handlers import status\n"
            "print(sorted(m for m in sys.modules if m.startswith(('google.cloud.firestore', 'google.cloud.pubsub', "
            "'grpc', 'requests', 'google.auth', 'google.api_core', 'handlers.intake'))))")
    r = subprocess.run([sys.executable, "-c", code], cwd=procs.ROOT, capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "GOOGLE_CLOUD_PROJECT": "test-project",
                            "FUNCTION_TARGET": "export_status"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
