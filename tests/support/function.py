"""The export intake's test harness: the function under test, run as in production, and its fixtures
(imported by tests/service/conftest.py and tests/reliability/conftest.py).

`functions-framework --target=export_request --signature-type=cloudevent` runs as a process, fed
by a Pub/Sub emulator push subscription on its own requests topic; its events are read from a
pull subscription on its own events topic; its ledger is its own Firestore collection.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.support import fnlogs, procs
from tests.support.hcapi import HC, unique

PROJECT = "test-project"
FF = str(Path(sys.executable).parent / "functions-framework")


@pytest.fixture(scope="session")
def emulator_env(pubsub, firestore):
    """In-process clients (publisher, subscriber, Firestore) talk to the emulators."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PUBSUB_EMULATOR_HOST", pubsub.host_port)
    mp.setenv("FIRESTORE_EMULATOR_HOST", firestore.host_port)
    mp.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
    from handlers import wiring
    wiring.reset()  # the in-process adapters get the emulator hosts from the settings, through the wiring
    yield
    mp.undo()


@pytest.fixture(scope="session")
def pubsub_clients(emulator_env):
    from google.cloud import pubsub_v1
    return pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()


class Function:
    """One export_request process with its own topics, subscriptions and ledger collection."""

    def __init__(self, name, pubsub_clients, pubsub, firestore, logs_dir, hc_url, env=None, push_subscriptions=1):
        self.publisher, self.subscriber = pubsub_clients
        self.name = unique(name)
        self.requests_topic = f"req-{self.name}"
        self.events_topic = f"ev-{self.name}"
        self.collection = f"ledger-{self.name}"
        self.port = procs.free_port()
        self.hc_url = hc_url
        self.publisher.create_topic(name=self.topic_path(self.requests_topic))
        self.publisher.create_topic(name=self.topic_path(self.events_topic))
        self.events_sub = f"projects/{PROJECT}/subscriptions/pull-{self.name}"
        self.subscriber.create_subscription(name=self.events_sub, topic=self.topic_path(self.events_topic),
                                            ack_deadline_seconds=60)
        self.push_subs = []
        endpoint = f"http://127.0.0.1:{self.port}/projects/{PROJECT}/topics/{self.requests_topic}"
        for i in range(push_subscriptions):
            sub = f"projects/{PROJECT}/subscriptions/push-{self.name}-{i}"
            self.subscriber.create_subscription(request={
                "name": sub, "topic": self.topic_path(self.requests_topic), "ack_deadline_seconds": 30,
                "push_config": {"push_endpoint": endpoint}})
            self.push_subs.append(sub)
        self.env = {
            "PUBSUB_EMULATOR_HOST": pubsub.host_port, "FIRESTORE_EMULATOR_HOST": firestore.host_port,
            "GOOGLE_CLOUD_PROJECT": PROJECT, "HEALTHCARE_API_ENDPOINT": hc_url,
            "EXPORT_REQUESTS_TOPIC": self.requests_topic, "EXPORT_EVENTS_TOPIC": self.events_topic,
            "LEDGER_COLLECTION": self.collection, "HEALTHCARE_RETRY_BUDGET_S": "5", "INTAKE_LEASE_S": "8",
            "GOOGLE_APPLICATION_CREDENTIALS": "", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
            **(env or {})}
        self.logs_dir = logs_dir
        self.svc = None
        self.runs = 0
        self._ledger = None

    @staticmethod
    def topic_path(topic):
        return f"projects/{PROJECT}/topics/{topic}"

    # -- process ---------------------------------------------------------------------------------
    def start(self):
        self.runs += 1
        self.svc = procs.Service(f"fn-{self.name}-{self.runs}",
                                 [FF, "--target=export_request", "--signature-type=cloudevent",
                                  "--host", "127.0.0.1", "--port", str(self.port)],
                                 port=self.port, log_dir=self.logs_dir, env=self.env, cwd=procs.ROOT)
        self.svc.start(timeout=60)
        return self

    def kill(self):
        self.svc.kill()

    def stop(self):
        if self.svc:
            self.svc.stop()
        for sub in self.push_subs:  # stop the emulator pushing to a dead port
            try:
                self.subscriber.delete_subscription(subscription=sub)
            except Exception:
                pass

    # -- Pub/Sub -----------------------------------------------------------------------------------
    def publish(self, body, **attributes) -> str:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.publisher.publish(self.topic_path(self.requests_topic), data, **attributes).result(timeout=30)

    def _pull(self, timeout: float) -> list[dict]:
        from google.api_core import exceptions

        try:
            resp = self.subscriber.pull(subscription=self.events_sub, max_messages=50, timeout=timeout)
        except (exceptions.DeadlineExceeded, exceptions.RetryError):
            return []
        if resp.received_messages:
            self.subscriber.acknowledge(subscription=self.events_sub,
                                        ack_ids=[m.ack_id for m in resp.received_messages])
        return [{"data": json.loads(m.message.data), "attributes": dict(m.message.attributes)}
                for m in resp.received_messages]

    def events(self, n: int, timeout: float = 30, where=None) -> list[dict]:
        """Pull until `n` events (matching `where`) arrived; each as {"data", "attributes"}."""
        got, deadline = [], time.monotonic() + timeout
        while len(got) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"expected {n} events, got {len(got)}: {got}\n--- function log:\n"
                                     f"{self.log_text()[-6000:]}")
            got += [e for e in self._pull(min(left, 5)) if where is None or where(e)]
        return got

    def drain(self, seconds: float = 2.0) -> list[dict]:
        """Every event that arrives within `seconds` (to assert that no more do)."""
        got, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            got += self._pull(min(left, 1))
        return got

    # -- the ledger, and the logs ---------------------------------------------------------------
    @property
    def ledger(self):
        if self._ledger is None:
            from handlers import wiring
            self._ledger = wiring.ledger_for(wiring.settings(), self.collection)
        return self._ledger

    def log_text(self) -> str:
        return fnlogs.text(self.logs_dir, self.name, self.runs)

    def log_entries(self) -> list[dict]:
        return fnlogs.entries(self.log_text())


@pytest.fixture
def make_function(pubsub_clients, pubsub, firestore, logs_dir, hc):
    made = []

    def make(name="fn", *, hc_url=None, env=None, push_subscriptions=1, start=True):
        f = Function(name, pubsub_clients, pubsub, firestore, logs_dir, hc_url or hc.url, env, push_subscriptions)
        made.append(f)
        return f.start() if start else f

    yield make
    for f in made:
        f.stop()


@pytest.fixture(scope="module")
def module_function(request, pubsub_clients, pubsub, firestore, logs_dir, hc):
    """One function process shared by a module's tests (each test uses its own requestIds and stores)."""
    f = Function(request.module.__name__.rsplit(".", 1)[-1], pubsub_clients, pubsub, firestore, logs_dir, hc.url)
    f.start()
    yield f
    f.stop()


@pytest.fixture(scope="session")
def hcapi(hc):
    return HC(hc.url)


def request_counts(hc_url: str) -> dict:
    return requests.get(f"{hc_url}/emulator/requestCounts", timeout=10).json()


def wait_for(predicate, timeout: float = 30, interval: float = 0.05, what: str = "condition"):
    """Poll an observable condition (not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def valid_request(store: str, request_id: str | None = None, **dest) -> dict:
    body = {"dicomStore": store,
            "bigqueryDestination": {"tableUri": f"bq://{PROJECT}.exports.{unique('t').replace('-', '_')}",
                                    "writeDisposition": "WRITE_APPEND", **dest},
            "labels": {"team": "radiology"}}
    if request_id:
        body["requestId"] = request_id
    return body

