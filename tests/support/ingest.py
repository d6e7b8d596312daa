"""Helpers of the ingest tests (tests/service/test_ingest*.py): the ingest function's pieces wired to the
real emulators in-process, and functions-framework processes for the end-to-end tests.

Its fixture `pieces` is imported by tests/service/conftest.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import fnlogs, procs
from tests.support.function import FF, PROJECT
from tests.support.hcapi import unique


def store_name(dataset: str = "ds", store: str | None = None) -> str:
    return f"projects/{PROJECT}/locations/us-central1/datasets/{dataset}/dicomStores/{store or unique('s')}"


def instance_path(i: int, study: str = "1.2.3", series: str = "1.2.3.4") -> str:
    return f"/studies/{study}/series/{series}/instances/1.2.3.4.{i}"


class Pieces:
    """Ingest wired to the emulators, in this process: own collections, requests topic and bucket."""

    def __init__(self, pubsub_clients, routes: dict, *, hc_url: str, max_n: int = 10, max_age_s: float = 60,
                 env=None):
        import config
        from handlers import ingest, wiring

        self.publisher, self.subscriber = pubsub_clients
        self.name = unique("ing")
        self.collection = f"ledger-{self.name}"
        self.requests_topic = f"req-{self.name}"
        self.bucket = f"filters-{self.name}"
        self.events_topic = f"events-{self.name}"
        for t in (self.requests_topic, self.events_topic):
            self.publisher.create_topic(name=f"projects/{PROJECT}/topics/{t}")
        self.requests_sub = f"projects/{PROJECT}/subscriptions/pull-{self.name}"
        self.subscriber.create_subscription(name=self.requests_sub,
                                            topic=f"projects/{PROJECT}/topics/{self.requests_topic}",
                                            ack_deadline_seconds=60)
        self.settings = config.load({
            "GOOGLE_CLOUD_PROJECT": PROJECT, "LEDGER_COLLECTION": self.collection,
            "EXPORT_REQUESTS_TOPIC": self.requests_topic, "INGEST_ROUTES": json.dumps(routes),
            "INGEST_FILTER_BUCKET": self.bucket, "INGEST_BATCH_MAX_INSTANCES": str(max_n),
            "INGEST_BATCH_MAX_AGE_S": str(max_age_s), "BIGQUERY_API_ENDPOINT": hc_url,
            "EXPORT_EVENTS_TOPIC": self.events_topic, **(env or {})})
        s = wiring.settings()
        self.requests_ledger = wiring.ledger_for(s, self.collection)
        self.ledger = wiring.batch_store_for(s, self.collection)
        self.files = wiring.filter_files_for(config.load(os.environ), self.bucket)  # STORAGE_EMULATOR_HOST
        self.requests = wiring.publisher_for(s, self.requests_topic)
        self.bigquery = wiring.bigquery_for(self.settings)
        self.events = wiring.publisher_for(s, self.events_topic)
        self.ingest_mod = ingest
        self.published: list[dict] = []

    def ingest(self, *, ledger=None, files=None, requests=None, bigquery=None):
        return self.ingest_mod.Ingest(self.settings, ledger or self.ledger, self.requests_ledger,
                                      files or self.files, requests or self.requests, bigquery or self.bigquery,
                                      self.events)

    def notify(self, store: str, path: str, *, action: str | None = "StoreInstances", version: str | None = "1",
               message_id: str | None = None, ingest=None):
        attrs = {}
        if action is not None:
            attrs = {"action": action, "storeName": store}
            if version is not None:
                attrs["versionId"] = version
        return (ingest or self.ingest()).notification(f"{store}/dicomWeb{path}", attrs,
                                                      message_id or unique("m"), None)

    def pull_requests(self, timeout: float = 2.0) -> list[dict]:
        """Requests published so far (accumulated in self.published)."""
        from google.api_core import exceptions

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                resp = self.subscriber.pull(subscription=self.requests_sub, max_messages=100, timeout=1)
            except (exceptions.DeadlineExceeded, exceptions.RetryError):
                continue
            if not resp.received_messages:
                break
            self.subscriber.acknowledge(subscription=self.requests_sub,
                                        ack_ids=[m.ack_id for m in resp.received_messages])
            self.published += [{"data": json.loads(m.message.data), "raw": m.message.data,
                                "attributes": dict(m.message.attributes)} for m in resp.received_messages]
        return self.published

    def finish_request(self, request_id: str, state: str = "SUCCEEDED", counter=None) -> None:
        """Stand in for intake + poller: the request's ledger document, terminal."""
        from handlers.core.clock import now
        self.requests_ledger.put_many([{"requestId": request_id, "state": state,
                                        "counter": counter or {"success": "1"}, "updatedAt": now(),
                                        "operation": f"projects/{PROJECT}/locations/l/datasets/d/"
                                                     f"operations/{abs(hash(request_id))}"}])

    def arrivals(self) -> list[dict]:
        return [{**d.data, "id": d.id} for d in self.ledger.client().query(self.ledger.ARRIVALS)]

    def batches(self) -> list[dict]:
        return sorted(self.ledger.batches(), key=lambda b: b["batchId"])


# -- processes for the end-to-end tests -------------------------------------------------------------------
class Fn:
    """One functions-framework process (target, env), optionally fed by a push subscription on a topic."""

    def __init__(self, target: str, env: dict, logs_dir, *, subscriber=None, topic: str | None = None,
                 kind: str = "cloudevent"):
        self.target, self.env, self.logs_dir, self.kind = target, env, logs_dir, kind
        self.name = unique(target.replace("_", "-"))
        self.port = procs.free_port()
        self.subscriber = subscriber
        self.runs = 0
        self.svc = None
        self.push_sub = None
        if topic:
            self.push_sub = f"projects/{PROJECT}/subscriptions/push-{self.name}"
            subscriber.create_subscription(request={
                "name": self.push_sub, "topic": f"projects/{PROJECT}/topics/{topic}", "ack_deadline_seconds": 30,
                "push_config": {"push_endpoint": f"{self.url}/projects/{PROJECT}/topics/{topic}"}})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Fn":
        self.runs += 1
        self.svc = procs.Service(f"fn-{self.name}-{self.runs}",
                                 [FF, f"--target={self.target}", f"--signature-type={self.kind}",
                                  "--host", "127.0.0.1", "--port", str(self.port)],
                                 port=self.port, log_dir=self.logs_dir, env=self.env, cwd=procs.ROOT)
        self.svc.start(timeout=60)
        return self

    def kill(self) -> None:
        self.svc.kill()

    def stop(self) -> None:
        if self.push_sub:
            try:
                self.subscriber.delete_subscription(subscription=self.push_sub)
            except Exception:
                pass
        if self.svc:
            self.svc.stop()

    def log_text(self) -> str:
        return fnlogs.text(self.logs_dir, self.name, self.runs)

    def log_entries(self) -> list[dict]:
        return fnlogs.entries(self.log_text())


def bq_mk(data_dir, dataset: str) -> None:
    subprocess.run([sys.executable, "-m", "healthcare_emulator", "bq", "mk", dataset, "-f", "--data-dir",
                    str(data_dir)], check=True, cwd=procs.ROOT, capture_output=True)


def bq_count(data_dir, table: str) -> dict:
    """{"n": rows, "d": distinct SOPInstanceUID}; zeros while the table does not exist."""
    r = subprocess.run([sys.executable, "-m", "healthcare_emulator", "query", "--data-dir", str(data_dir),
                        f"SELECT COUNT(*) AS n, COUNT(DISTINCT SOPInstanceUID) AS d FROM `{table}`"],
                       cwd=procs.ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        if "not found" in (r.stderr + r.stdout).lower():
            return {"n": 0, "d": 0}
        raise AssertionError(f"query failed: {r.stderr or r.stdout}")
    return json.loads(r.stdout)[0]


@pytest.fixture
def pieces(pubsub_clients, gcs, hc, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
    made = []

    def make(routes: dict, **kw) -> Pieces:
        p = Pieces(pubsub_clients, routes, hc_url=hc.url, **kw)
        made.append(p)
        return p
    yield make
    for p in made:
        try:
            p.subscriber.delete_subscription(subscription=p.requests_sub)
        except Exception:
            pass


class IngestStack:
    """The whole path on local emulators: a Healthcare emulator publishing its store notifications to
    Pub/Sub and reading filter files from the GCS emulator; the intake, the poller and the ingest
    function as functions-framework processes on push subscriptions; its own topics, ledger and bucket.
    `routes` maps store ids (created here) to table ids in the BigQuery dataset `test-project.<dataset>`."""

    def __init__(self, *, pubsub, firestore, gcs, logs_dir, data_dir, pubsub_clients, store_ids, hc_flags=(),
                 max_n: int = 100, max_age_s: float = 2, extra_env=None, route_options=None):
        from tests.support.hcapi import HC

        self.publisher, self.subscriber = pubsub_clients
        self.name = unique("e2e")
        self.data_dir = data_dir
        self.logs_dir = logs_dir
        self.fns: list[Fn] = []
        self.hc_svc = procs.healthcare_emulator(
            logs_dir, data_dir, *hc_flags, name=f"hc-{self.name}",
            env={"PUBSUB_EMULATOR_HOST": pubsub.host_port, "STORAGE_EMULATOR_HOST": gcs.url}).start()
        self.hc = HC(self.hc_svc.url)
        self.topics = {k: f"{k}-{self.name}" for k in ("notify", "requests", "events", "poll", "reconcile")}
        for t in self.topics.values():
            self.publisher.create_topic(name=f"projects/{PROJECT}/topics/{t}")
        self.events_sub = f"projects/{PROJECT}/subscriptions/events-{self.name}"
        self.subscriber.create_subscription(name=self.events_sub, topic=self.topic("events"),
                                            ack_deadline_seconds=60)
        # a copy of every notification, to re-publish some as duplicates
        self.notify_copy_sub = f"projects/{PROJECT}/subscriptions/notify-copy-{self.name}"
        self.subscriber.create_subscription(name=self.notify_copy_sub, topic=self.topic("notify"),
                                            ack_deadline_seconds=60)
        dataset = self.hc.dataset(unique("ds"))
        self.stores = {}
        for sid in store_ids:
            self.stores[sid] = self.hc.store(dataset, sid, body={
                "notificationConfigs": [{"pubsubTopic": self.topic("notify")}]})
        self.bq_dataset = f"{PROJECT}.ingest_{self.name.replace('-', '_')}"
        bq_mk(data_dir, self.bq_dataset)
        self.tables = {sid: f"{self.bq_dataset}.t_{sid.replace('-', '_')}" for sid in store_ids}
        self.collection = f"ledger-{self.name}"
        self.bucket = f"filters-{self.name}"
        self.env = {
            "PUBSUB_EMULATOR_HOST": pubsub.host_port, "FIRESTORE_EMULATOR_HOST": firestore.host_port,
            "STORAGE_EMULATOR_HOST": gcs.url, "GOOGLE_CLOUD_PROJECT": PROJECT,
            "HEALTHCARE_API_ENDPOINT": self.hc_svc.url, "BIGQUERY_API_ENDPOINT": self.hc_svc.url,
            "EXPORT_REQUESTS_TOPIC": self.topics["requests"],
            "EXPORT_EVENTS_TOPIC": self.topics["events"], "LEDGER_COLLECTION": self.collection,
            "INGEST_ROUTES": json.dumps({self.stores[s]: {"tableUri": f"bq://{self.tables[s]}",
                                                          **(route_options or {}).get(s, {})} for s in store_ids}),
            "INGEST_FILTER_BUCKET": self.bucket, "INGEST_BATCH_MAX_INSTANCES": str(max_n),
            "INGEST_BATCH_MAX_AGE_S": str(max_age_s), "HEALTHCARE_RETRY_BUDGET_S": "5", "INTAKE_LEASE_S": "8",
            "POLL_MAX_INTERVAL_S": "1", "POLL_INITIAL_INTERVAL_S": "0.2", "GOOGLE_APPLICATION_CREDENTIALS": "",
            "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", **(extra_env or {})}

    def topic(self, kind: str) -> str:
        return f"projects/{PROJECT}/topics/{self.topics[kind]}"

    def start(self) -> "IngestStack":
        for target, kind in (("export_request", "requests"), ("poll_exports", "poll"),
                             ("ingest_notification", "notify"), ("reconcile_tables", "reconcile")):
            fn = Fn(target, self.env, self.logs_dir, subscriber=self.subscriber, topic=self.topics[kind])
            setattr(self, target, fn)
            self.fns.append(fn)
            fn.start()
        return self

    def stop(self) -> None:
        for fn in self.fns:
            fn.stop()
        self.hc_svc.stop()

    # -- driving -------------------------------------------------------------------------------------------
    def tick(self) -> None:
        self.publisher.publish(self.topic("poll"), b'{"tick": true}').result(timeout=30)

    def rows(self, sid: str) -> dict:
        return bq_count(self.data_dir, self.tables[sid])

    def query(self, sql: str) -> list[dict]:
        r = subprocess.run([sys.executable, "-m", "healthcare_emulator", "query", "--data-dir", str(self.data_dir),
                            sql], cwd=procs.ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr or r.stdout
        return json.loads(r.stdout)

    def wait_rows(self, expected: dict, timeout: float = 240, tick_every: float = 1.0) -> dict:
        """Tick the poller (as Cloud Scheduler would) until every table holds its expected row count."""
        deadline = time.monotonic() + timeout
        next_tick = 0.0
        while True:
            got = {sid: self.rows(sid) for sid in expected}
            if all(got[s]["n"] >= n for s, n in expected.items()):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"rows {got}, expected {expected}\n--- ingest log:\n"
                                     f"{self.ingest_notification.log_text()[-4000:]}\n--- poller log:\n"
                                     f"{self.poll_exports.log_text()[-3000:]}\n--- intake log:\n"
                                     f"{self.export_request.log_text()[-3000:]}")
            if time.monotonic() >= next_tick:
                self.tick()
                next_tick = time.monotonic() + tick_every
            time.sleep(0.3)

    def ledgers(self):
        from handlers import wiring
        s = wiring.settings()
        return wiring.batch_store_for(s, self.collection), wiring.ledger_for(s, self.collection)

    def pull_notifications(self, n: int, timeout: float = 30) -> list:
        got, deadline = [], time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            resp = self.subscriber.pull(subscription=self.notify_copy_sub, max_messages=min(100, n - len(got)),
                                        timeout=5)
            if resp.received_messages:
                self.subscriber.acknowledge(subscription=self.notify_copy_sub,
                                            ack_ids=[m.ack_id for m in resp.received_messages])
            got += [m.message for m in resp.received_messages]
        return got

    def republish(self, messages) -> None:
        """Publish copies of notifications (same data and attributes): duplicates the function must ignore."""
        futures = [self.publisher.publish(self.topic("notify"), m.data, **dict(m.attributes)) for m in messages]
        for f in futures:
            f.result(timeout=30)

    def events(self, timeout: float = 5) -> list[dict]:
        from google.api_core import exceptions
        out, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                resp = self.subscriber.pull(subscription=self.events_sub, max_messages=100, timeout=2)
            except (exceptions.DeadlineExceeded, exceptions.RetryError):
                break
            if not resp.received_messages:
                break
            self.subscriber.acknowledge(subscription=self.events_sub,
                                        ack_ids=[m.ack_id for m in resp.received_messages])
            out += [{"data": json.loads(m.message.data), "attributes": dict(m.message.attributes)}
                    for m in resp.received_messages]
        return out


def make_instances(dest_dir: Path, n: int, per_study: int = 50, source: str = "CT_small.dcm") -> list[Path]:
    """`n` distinct real instances (fresh UIDs), `per_study` per study, one series per study."""
    from pydicom.uid import generate_uid

    from tests.support.dicom_files import path, with_uids

    dest_dir.mkdir(parents=True, exist_ok=True)
    src, out, study, series = path(source), [], None, None
    for i in range(n):
        if i % per_study == 0:
            study, series = generate_uid(), generate_uid()
        out.append(with_uids(src, dest_dir / f"{i:05d}.dcm", study=study, series=series))
    return out


def stow_bursts(hc, store: str, files: list[Path], burst: int = 25, parallel: int = 4) -> None:
    """STOW `files` in bursts of `burst` instances, `parallel` requests at a time."""
    from concurrent.futures import ThreadPoolExecutor

    def one(chunk):
        r = hc.stow(store, chunk)
        assert r.status_code == 200, r.text[:500]
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, [files[i:i + burst] for i in range(0, len(files), burst)]))
