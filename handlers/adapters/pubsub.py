"""Pub/Sub adapter: publish one event (JSON data + string attributes) and wait for the server's ack.

Over Pub/Sub's REST API (topics.publish) through the shared transport (transport.py); with `emulator_host`
(PUBSUB_EMULATOR_HOST, passed by handlers/wiring.py) it goes to the emulator instead. A publish is retried on 429/5xx and connection failures until
`timeout_s`: a retry may publish the event twice, and every event carries its eventId for that.
"""
from __future__ import annotations

import base64
import json
import time
from typing import Any

from handlers.core.errors import PublishError

from . import transport as gh

__all__ = ["Events", "PublishError"]


class Events:
    def __init__(self, project: str, topic: str, *, timeout_s: float = 30.0, emulator_host: str | None = None,
                 tokens: gh.Tokens | None = None):
        self.project = project
        self.topic = topic
        self.timeout_s = timeout_s
        host = emulator_host
        self.url = f"{f'http://{host}' if host else 'https://pubsub.googleapis.com'}/v1/{self.topic_path}:publish"
        self.tokens = gh.Tokens() if host else (tokens or gh.Tokens())

    @property
    def topic_path(self) -> str:
        return f"projects/{self.project}/topics/{self.topic}"

    def publish(self, data: dict[str, Any], attributes: dict[str, str]) -> str:
        """Publish and block until Pub/Sub has stored the message; return its message id."""
        payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode("utf-8")
        body = {"messages": [{"data": base64.b64encode(payload).decode("ascii"), "attributes": attributes}]}
        try:
            r = gh.call("POST", self.url, tokens=self.tokens, json=body, deadline=time.monotonic() + self.timeout_s,
                        timeout_s=self.timeout_s, what=f"publishing to {self.topic_path}")
            return str(r.json()["messageIds"][0])
        except (gh.HttpError, gh.Unavailable, ValueError, KeyError, IndexError) as e:
            raise PublishError(f"publishing to {self.topic_path} failed: {type(e).__name__}: {e}") from e
