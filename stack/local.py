"""The whole system on one machine, wired as in the cloud.

Google's Pub/Sub and Firestore emulators, a GCS emulator, the Healthcare API emulator, and each
Cloud Function under functions-framework, fed by Pub/Sub emulator push subscriptions exactly as
Eventarc feeds them; a ticker publishes to the poll topic every few seconds in place of Cloud
Scheduler. Ports are chosen free; every process runs in its own group and is stopped as a group.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from stack import console
from stack.services import (
    ROOT,
    Service,
    firestore_emulator,
    free_port,
    gcs_emulator,
    healthcare_emulator,
    pubsub_emulator,
)

PROJECT = "demo-project"
LOCATION = "us-central1"
REQUESTS_TOPIC = "dicom-export-requests"
EVENTS_TOPIC = "dicom-export-events"
POLL_TOPIC = "dicom-export-poll"
NOTIFY_TOPIC = "dicom-store-notifications"
DEAD_LETTER_TOPIC = "dicom-export-dead-letter"
RECONCILE_TOPIC = "dicom-reconcile"
WATCH_SUB = "dicom-export-events-watch"
FF = str(Path(sys.executable).parent / "functions-framework")


@dataclass
class Stack:
    root: Path
    poll_every_s: float = 2.0
    ingest_routes: dict = field(default_factory=dict)
    say: callable = print
    services: list[Service] = field(default_factory=list)
    urls: dict = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root)
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._stop_ticker = threading.Event()
        self._ticker = None

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> "Stack":
        self.say("starting Google's Pub/Sub and Firestore emulators, the GCS and Healthcare API emulators ...")
        self.pubsub = self._start(pubsub_emulator(self.logs), 120)
        self.firestore = self._start(firestore_emulator(self.logs), 120)
        self.gcs = self._start(gcs_emulator(self.logs, self.root / "gcs"), 30)
        self.hc = self._start(healthcare_emulator(self.logs, self.root / "healthcare", env={
            "PUBSUB_EMULATOR_HOST": self.pubsub.host_port, "STORAGE_EMULATOR_HOST": self.gcs.url,
            **console.emulator_env(self.firestore.host_port, PROJECT)}), 30)
        os.environ.update(self.client_env())
        self._topics()
        self.say("starting the functions under functions-framework ...")
        for target, kind, topic in self.functions():
            port = free_port()
            svc = Service(f"fn-{target}", [FF, f"--target={target}", f"--signature-type={kind}",
                                           "--host", "127.0.0.1", "--port", str(port)],
                          port=port, log_dir=self.logs, env=self.function_env(), cwd=ROOT)
            self._start(svc, 60)
            self.urls[target] = svc.url
            if topic:
                self._push(topic, f"{svc.url}/projects/{PROJECT}/topics/{topic}", f"{target}-push")
        self._ticker = threading.Thread(target=self._tick, daemon=True, name="scheduler")
        self._ticker.start()
        return self

    def _start(self, svc: Service, timeout: float) -> Service:
        self.services.append(svc)
        return svc.start(timeout=timeout)

    def stop(self) -> None:
        self._stop_ticker.set()
        for svc in reversed(self.services):
            svc.stop()
        self.services.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- wiring --------------------------------------------------------------------------------------------
    def functions(self) -> list[tuple[str, str, str | None]]:
        """(entry point, signature type, trigger topic); ingest only when routes are configured."""
        fns = [("export_request", "cloudevent", REQUESTS_TOPIC), ("poll_exports", "cloudevent", POLL_TOPIC),
               ("export_status", "http", None)]
        if self.ingest_routes:
            fns += [("ingest_notification", "cloudevent", NOTIFY_TOPIC),
                    ("reconcile_tables", "cloudevent", RECONCILE_TOPIC)]
        return fns

    def client_env(self) -> dict:
        """What a client needs to talk to this stack (printed by `make up`)."""
        return {"PUBSUB_EMULATOR_HOST": self.pubsub.host_port, "FIRESTORE_EMULATOR_HOST": self.firestore.host_port,
                "STORAGE_EMULATOR_HOST": self.gcs.url, "GOOGLE_CLOUD_PROJECT": PROJECT,
                "HEALTHCARE_API_ENDPOINT": self.hc.url, "BIGQUERY_API_ENDPOINT": self.hc.url,
                "RESOURCE_MANAGER_API_ENDPOINT": self.hc.url,
                # deploy.sh's names, for `python -m stack preflight`
                "POLL_TOPIC": POLL_TOPIC, "DEAD_LETTER_TOPIC": DEAD_LETTER_TOPIC,
                **({"INGEST_TOPIC": NOTIFY_TOPIC} if self.ingest_routes else {})}

    def function_env(self) -> dict:
        return {**self.client_env(), "EXPORT_REQUESTS_TOPIC": REQUESTS_TOPIC, "EXPORT_EVENTS_TOPIC": EVENTS_TOPIC,
                "LEDGER_COLLECTION": "dicomExports", "INGEST_ROUTES": json.dumps(self.ingest_routes),
                "INGEST_FILTER_BUCKET": "dicom-ingest-filters", "GOOGLE_APPLICATION_CREDENTIALS": "",
                "BIGQUERY_API_ENDPOINT": self.hc.url, "INGEST_BATCH_MAX_AGE_S": "2",
                "PYTHONUNBUFFERED": "1"}

    def _topics(self) -> None:
        from google.cloud import pubsub_v1

        self.publisher = pubsub_v1.PublisherClient()
        self.subscriber = pubsub_v1.SubscriberClient()
        for t in (REQUESTS_TOPIC, EVENTS_TOPIC, POLL_TOPIC, NOTIFY_TOPIC, DEAD_LETTER_TOPIC, RECONCILE_TOPIC):
            self.publisher.create_topic(name=self.topic(t))
        self.subscriber.create_subscription(name=self.subscription(WATCH_SUB), topic=self.topic(EVENTS_TOPIC),
                                            ack_deadline_seconds=60)
        self.subscriber.create_subscription(name=self.subscription(console.EVENTS_SUBSCRIPTION),  # the web console's
                                            topic=self.topic(EVENTS_TOPIC), ack_deadline_seconds=60)
        # as deploy.sh: what the functions cannot take after 10 deliveries is kept on the dead-letter topic
        self.subscriber.create_subscription(name=self.subscription(f"{DEAD_LETTER_TOPIC}-hold"),
                                            topic=self.topic(DEAD_LETTER_TOPIC))

    def _push(self, topic: str, endpoint: str, name: str) -> None:
        self.subscriber.create_subscription(request={
            "name": self.subscription(name), "topic": self.topic(topic), "ack_deadline_seconds": 60,
            "push_config": {"push_endpoint": endpoint},
            "dead_letter_policy": {"dead_letter_topic": self.topic(DEAD_LETTER_TOPIC), "max_delivery_attempts": 10}})

    @staticmethod
    def topic(t: str) -> str:
        return f"projects/{PROJECT}/topics/{t}"

    @staticmethod
    def subscription(s: str) -> str:
        return f"projects/{PROJECT}/subscriptions/{s}"

    def _tick(self) -> None:
        """Cloud Scheduler's part: a message on the poll topic every few seconds, and (with routes) one on the
        reconcile topic every 30 ticks."""
        n = 0
        while not self._stop_ticker.wait(self.poll_every_s):
            n += 1
            try:
                self.publisher.publish(self.topic(POLL_TOPIC), b'{"tick": true}').result(timeout=10)
                if self.ingest_routes and n % 30 == 0:
                    self.publisher.publish(self.topic(RECONCILE_TOPIC), b'{"tick": true}').result(timeout=10)
            except Exception as e:  # the stack may be stopping
                if not self._stop_ticker.is_set():
                    self.say(f"scheduler tick failed: {e}")

    def describe(self) -> dict:
        return {"project": PROJECT, "location": LOCATION, "healthcare": self.hc.url, "gcs": self.gcs.url,
                "pubsub": self.pubsub.host_port, "firestore": self.firestore.host_port,
                "functions": dict(self.urls), "topics": {"requests": REQUESTS_TOPIC, "events": EVENTS_TOPIC,
                                                         "poll": POLL_TOPIC, "notifications": NOTIFY_TOPIC,
                                                         "reconcile": RECONCILE_TOPIC},
                "events_subscription": WATCH_SUB, "data_dir": str(self.root / "healthcare"),
                "env": self.client_env(),
                "pgids": [s.proc.pid for s in self.services if s.proc]}
