"""Pub/Sub adapter: publish one event (JSON data + string attributes) and wait for the server's ack.

Over Pub/Sub's REST API (topics.publish) through the shared transport (google_http); PUBSUB_EMULATOR_HOST
(config) sends it to the emulator instead. A publish is retried on 429/5xx and connection failures until
`timeout_s`: a retry may publish the event twice, and every event carries its eventId for that.
"""
from __future__ import annotations

import base64
import json
import time

import config

from . import google_http as gh


class PublishError(Exception):
    """The event could not be published (the caller lets Pub/Sub redeliver the request)."""


class Events:
    def __init__(self, project: str, topic: str, *, timeout_s: float = 30.0, emulator_host: str | None = None):
        self.project = project
        self.topic = topic
        self.timeout_s = timeout_s
        host = emulator_host if emulator_host is not None else config.get().pubsub_emulator_host
        self.url = f"{f'http://{host}' if host else 'https://pubsub.googleapis.com'}/v1/{self.topic_path}:publish"
        self.tokens = gh.Tokens() if host else gh.cloud_tokens()

    @property
    def topic_path(self) -> str:
        return f"projects/{self.project}/topics/{self.topic}"

    def publish(self, data: dict, attributes: dict[str, str]) -> str:
        """Publish and block until Pub/Sub has stored the message; return its message id."""
        payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode("utf-8")
        body = {"messages": [{"data": base64.b64encode(payload).decode("ascii"), "attributes": attributes}]}
        try:
            r = gh.call("POST", self.url, tokens=self.tokens, json=body, deadline=time.monotonic() + self.timeout_s,
                        timeout_s=self.timeout_s, what=f"publishing to {self.topic_path}")
            return r.json()["messageIds"][0]
        except (gh.HttpError, gh.Unavailable, ValueError, KeyError, IndexError) as e:
            raise PublishError(f"publishing to {self.topic_path} failed: {type(e).__name__}: {e}") from e
