"""Pub/Sub adapter: publish one event (JSON data + string attributes) and wait for the server's ack.

google-cloud-pubsub's PublisherClient is imported and created on first use, once per instance
(it is thread-safe); PUBSUB_EMULATOR_HOST is honoured by the client itself.
"""
from __future__ import annotations

import json
import threading


class PublishError(Exception):
    """The event could not be published (the caller lets Pub/Sub redeliver the request)."""


class Events:
    def __init__(self, project: str, topic: str, *, timeout_s: float = 30.0, client=None):
        self.project = project
        self.topic = topic
        self.timeout_s = timeout_s
        self._client = client
        self._lock = threading.Lock()

    @property
    def topic_path(self) -> str:
        return f"projects/{self.project}/topics/{self.topic}"

    def client(self):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    from google.cloud import pubsub_v1
                    self._client = pubsub_v1.PublisherClient()
        return self._client

    def publish(self, data: dict, attributes: dict[str, str]) -> str:
        """Publish and block until Pub/Sub has stored the message; return its message id."""
        payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode("utf-8")
        try:
            future = self.client().publish(self.topic_path, payload, **attributes)
            return future.result(timeout=self.timeout_s)
        except Exception as e:  # noqa: BLE001 - any failure means "not known to be published"
            raise PublishError(f"publishing to {self.topic_path} failed: {type(e).__name__}: {e}") from e
