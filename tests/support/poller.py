"""Helpers of the poller tests (this module holds no tests).

A poller is wired to one `Function` harness of tests/service/conftest.py (its own ledger collection and
events topic, read through a pull subscription), and runs either in-process (`Poller.tick()`: the
handler's own code against the emulators, over sockets) or as a functions-framework process
(`PollerProcess`, ticked by POSTing the CloudEvent Pub/Sub would deliver).
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import requests

import config
from handlers import intake, poller, wiring
from handlers.core import events as ev
from handlers.core import ledger as L
from handlers.core import request as req
from tests.support import procs
from tests.support.function import FF, PROJECT
from tests.support.hcapi import HC, unique

# Small, fast settings for tests (each still valid by config's own rules).
POLL_ENV = {"POLL_CALL_TIMEOUT_S": "2", "POLL_BUDGET_S": "20", "POLL_LEASE_S": "30", "POLL_CONCURRENCY": "8"}
EVENT_FIELDS = {"eventId", "eventType", "requestId", "dicomStore", "bigqueryDestination", "filterConfig",
                "operation", "counter", "createTime", "endTime", "logsUrl", "error", "labels"}


def bq_mk(data_dir, dataset: str = "exports") -> None:
    subprocess.run([sys.executable, "-m", "healthcare_emulator", "bq", "mk", f"{PROJECT}.{dataset}", "-f",
                    "--data-dir", str(data_dir)], check=True, capture_output=True, cwd=procs.ROOT, timeout=60)


def table(dataset: str = "exports") -> str:
    return f"bq://{PROJECT}.{dataset}.{unique('t').replace('-', '_')}"


def started_doc(store: str, rid: str, op: dict, *, table_uri: str | None = None, started_published: bool = True,
                at: datetime | None = None) -> tuple[dict, dict]:
    """(request body, ledger document) of a request the intake has started, as Intake.started() and its
    publication leave it: STARTED, the operation, nextPollAt due, no lease."""
    body = {"requestId": rid, "dicomStore": store,
            "bigqueryDestination": {"tableUri": table_uri or table(), "writeDisposition": "WRITE_APPEND"},
            "labels": {"team": "radiology"}}
    raw = json.dumps(body).encode()
    parsed = req.parse(raw, f"msg-{rid}")
    assert parsed.ok, parsed.rejection
    t = at or L.now()
    doc = intake.new_document(parsed, raw, f"msg-{rid}", published_at=t, owner=None, lease_s=0, at=t)
    meta = op.get("metadata") or {}
    doc.update(state=L.STARTED, operation=op["name"], apiVersion="v1", createTime=meta.get("createTime"),
               logsUrl=meta.get("logsUrl"), firstAttemptAt=t, lastAttemptAt=t, attempts=1, nextPollAt=t,
               pollInterval=1.0)
    del doc["leaseOwner"], doc["leaseUntil"]
    started = {**ev.build(ev.STARTED, doc), "published": started_published}
    if started_published:
        started.update(publishedAt=t, messageId="seeded")
    doc["events"] = {ev.STARTED: started}
    return body, doc


class Poller:
    """The poller of a Function harness, run in-process against the emulators."""

    def __init__(self, fn, env: dict | None = None, hc_url: str | None = None):
        self.fn = fn
        self.env = {**fn.env, **POLL_ENV, **(env or {})}
        if hc_url:
            self.env["HEALTHCARE_API_ENDPOINT"] = hc_url
        self.settings = config.load(self.env)
        self.ledger, self.hc, self.events = wiring.poller_for(self.settings)
        self.api = HC(self.env["HEALTHCARE_API_ENDPOINT"])

    def tick(self) -> dict:
        return poller.Tick(self.settings, self.ledger, self.hc, self.events).run()

    def export(self, store: str, table_uri: str) -> dict:
        r = self.api.export(store, {"bigqueryDestination": {"tableUri": table_uri, "writeDisposition": "WRITE_APPEND"}})
        assert r.status_code == 200, r.text
        return r.json()

    def seed(self, store: str, op: dict, rid: str | None = None, **kw) -> tuple[str, dict]:
        rid = rid or unique("req")
        body, doc = started_doc(store, rid, op, **kw)
        assert self.ledger.create(rid, doc)[0]
        return rid, body

    def seed_many(self, docs: list[dict]) -> None:
        """Write many seeded documents with batched writes (500 per commit)."""
        self.ledger.put_many(docs)

    def exports(self, store: str, table_uris: list[str], threads: int = 16) -> list[dict]:
        with ThreadPoolExecutor(threads) as ex:
            return list(ex.map(lambda uri: self.export(store, uri), table_uris))


def pull(fn, n: int, rids, timeout: float = 60) -> list[dict]:
    """Pull from the harness's events subscription until `n` events of the requests `rids` arrived (a short
    message on failure, not the events)."""
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"expected {n} events, got {len(got)}")
        got += [e for e in fn._pull(min(left, 5)) if e["attributes"].get("requestId") in rids]
    return got


def log_lines(text: str) -> list[dict]:
    """Every non-empty line must be one JSON object (what Cloud Logging parses)."""
    out = []
    for line in text.splitlines():
        if line.strip():
            entry = json.loads(line)
            assert isinstance(entry, dict) and {"severity", "message", "time"} <= set(entry), line
            out.append(entry)
    return out


def for_request(entries: list[dict], rid: str) -> list[dict]:
    return [e for e in entries if e.get("logging.googleapis.com/labels", {}).get("requestId") == rid]


def tick_event(data: dict | None = None, message_id: str | None = None) -> tuple[dict, dict]:
    """(headers, body) of the CloudEvent Pub/Sub delivers to a function for one Cloud Scheduler tick."""
    mid = message_id or uuid.uuid4().hex[:16]
    now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    body = {"message": {"data": base64.b64encode(json.dumps(data or {"tick": True}).encode()).decode(),
                        "messageId": mid, "publishTime": now},
            "subscription": f"projects/{PROJECT}/subscriptions/poll"}
    headers = {"ce-id": mid, "ce-specversion": "1.0", "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
               "ce-source": f"//pubsub.googleapis.com/projects/{PROJECT}/topics/poll", "ce-time": now,
               "Content-Type": "application/json"}
    return headers, body


class PollerProcess:
    """`functions-framework --target=poll_exports` as a process, with a Function harness's settings."""

    def __init__(self, fn, logs_dir, env: dict | None = None, name: str = "poller"):
        self.fn = fn
        self.name = unique(name)
        self.port = procs.free_port()
        self.env = {**fn.env, **POLL_ENV, **(env or {})}
        self.svc = procs.Service(self.name, [FF, "--target=poll_exports", "--signature-type=cloudevent",
                                             "--host", "127.0.0.1", "--port", str(self.port)],
                                 port=self.port, log_dir=logs_dir, env=self.env, cwd=procs.ROOT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> "PollerProcess":
        self.svc.start(timeout=60)
        return self

    def tick(self, timeout: float = 60) -> requests.Response:
        headers, body = tick_event()
        return requests.post(self.url, json=body, headers=headers, timeout=timeout)

    def entries(self) -> list[dict]:
        """Every line the process printed, each checked to be one JSON log entry."""
        text = Path(self.svc.log_path).read_text(errors="replace")
        complete = text[:text.rfind("\n") + 1]  # a line still being written is not judged yet
        return log_lines(complete)

    def summaries(self) -> list[dict]:
        return [e for e in self.entries() if e["message"] in ("poll run finished",)
                or e["message"].startswith("the poll run used its")]

    def stop(self) -> None:
        self.svc.stop()
