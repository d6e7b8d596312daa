"""The Service page's data: the export service's ledger (Firestore) and its events (Pub/Sub), when the local
stack runs (`make up`). Read over the emulators' REST APIs; nothing here writes to the ledger.

Settings (environment of the emulator process; stack/local.py sets them):

| variable | meaning |
|---|---|
| `HC_CONSOLE_FIRESTORE_EMULATOR_HOST` (else `FIRESTORE_EMULATOR_HOST`) | host:port of Google's Firestore emulator |
| `HC_CONSOLE_LEDGER_COLLECTION` | the service's `LEDGER_COLLECTION` (e.g. `dicomExports`); the page is on when set |
| `HC_CONSOLE_SERVICE_PROJECT` (else `GOOGLE_CLOUD_PROJECT`) | the project of the ledger |
| `HC_CONSOLE_EVENTS_SUBSCRIPTION` | `projects/P/subscriptions/S`: the console's own subscription to the events topic |
| `HC_CONSOLE_EVENTS_TOPIC` | `projects/P/topics/T`: the topic, to create that subscription when it is missing |
| `PUBSUB_EMULATOR_HOST` | host:port of Google's Pub/Sub emulator |

Events are pulled by one background thread into memory (the most recent 500), so they appear as they
arrive; the console's subscription must be its own (a subscription shared with another reader splits the
messages between them).
"""
from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections import deque
from datetime import datetime, timezone

import requests

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT", "REJECTED"}

REMEDIES = {  # google.rpc code -> what the person can do about a failed request
    1: "The export was cancelled. Publish the request again with a new requestId to export.",
    3: "The request or its filter file is invalid: fix what the message names, then publish it again with a "
       "new requestId.",
    4: "The export ran longer than MAX_OPERATION_AGE_S and was cancelled: export less at a time (a filter "
       "file) or raise the limit, then publish a new request.",
    5: "Something the export needs does not exist (the BigQuery dataset, the DICOM store, the filter file) or "
       "the operation is no longer known: create or correct it, then publish a new request.",
    6: "The destination table exists and force is false: choose a writeDisposition (WRITE_APPEND or "
       "WRITE_TRUNCATE) or a new table.",
    7: "The Cloud Healthcare Service Agent lacks a role on the destination: grant roles/bigquery.dataEditor "
       "and roles/bigquery.jobUser.",
    8: "A quota or the concurrent-operation limit was reached: publish the request again later.",
    9: "The destination table is not empty and the write disposition was WRITE_EMPTY: use WRITE_APPEND or "
       "WRITE_TRUNCATE, or a new table.",
    10: "After a crash the service could not tell which operation was this request's: look at the dataset's "
        "Operations and the table, then publish again with a new requestId only if nothing was exported.",
    14: "The Cloud Healthcare API was unavailable: publish the request again.",
}


def remedy(doc: dict) -> str | None:
    state = doc.get("state")
    err = doc.get("error") if isinstance(doc.get("error"), dict) else None
    if state == "REJECTED":
        return "Fix the field and rule the error names, then publish the request again with a new requestId."
    if err:
        code = err.get("code")
        return REMEDIES.get(code if isinstance(code, int) else -1,
                            "See the error message and the operation's log (View details), then publish a new "
                            "request.")
    counter = doc.get("counter") or {}
    if state == "SUCCEEDED" and _int(counter.get("failure")):
        return "Some instances could not be exported: the operation's log (View details) names them."
    return None


def _int(v) -> int:
    try:
        return int(v or 0)
    except (TypeError, ValueError):
        return 0


class Settings:
    def __init__(self, env=None):
        env = os.environ if env is None else env
        self.firestore = env.get("HC_CONSOLE_FIRESTORE_EMULATOR_HOST") or env.get("FIRESTORE_EMULATOR_HOST")
        self.collection = env.get("HC_CONSOLE_LEDGER_COLLECTION")
        self.project = env.get("HC_CONSOLE_SERVICE_PROJECT") or env.get("GOOGLE_CLOUD_PROJECT")
        self.subscription = env.get("HC_CONSOLE_EVENTS_SUBSCRIPTION")
        self.topic = env.get("HC_CONSOLE_EVENTS_TOPIC")
        self.pubsub = env.get("PUBSUB_EMULATOR_HOST")

    @property
    def enabled(self) -> bool:
        return bool(self.firestore and self.collection and self.project)

    @property
    def events_enabled(self) -> bool:
        return bool(self.pubsub and self.subscription)


# -- Firestore REST values -> Python ------------------------------------------------------------------------
def decode_value(v: dict):
    if "nullValue" in v:
        return None
    for k in ("stringValue", "booleanValue", "doubleValue", "referenceValue"):
        if k in v:
            return v[k]
    if "integerValue" in v:
        return int(v["integerValue"])
    if "timestampValue" in v:
        return v["timestampValue"]
    if "bytesValue" in v:
        return base64.b64decode(v["bytesValue"])
    if "mapValue" in v:
        return {k: decode_value(x) for k, x in (v["mapValue"].get("fields") or {}).items()}
    if "arrayValue" in v:
        return [decode_value(x) for x in v["arrayValue"].get("values") or []]
    if "geoPointValue" in v:
        return v["geoPointValue"]
    return None


class Service:
    """The ledger (read on each page view) and the events (pulled in the background)."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.http = requests.Session()
        self.http.headers["Authorization"] = "Bearer owner"  # the emulators' admin token: no security rules
        self.events: deque = deque(maxlen=500)
        self.events_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- ledger ----------------------------------------------------------------------------------------------
    def ledger(self, limit: int = 200) -> list[dict]:
        url = (f"http://{self.s.firestore}/v1/projects/{self.s.project}/databases/(default)/documents"
               ":runQuery")
        body = {"structuredQuery": {"from": [{"collectionId": self.s.collection}],
                                    "orderBy": [{"field": {"fieldPath": "receivedAt"}, "direction": "DESCENDING"}],
                                    "limit": limit}}
        r = self.http.post(url, json=body, timeout=10)
        r.raise_for_status()
        out = []
        for item in r.json():
            doc = item.get("document")
            if doc:
                out.append({k: decode_value(v) for k, v in (doc.get("fields") or {}).items()})
        return out

    # -- events ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.s.events_enabled:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="console-events", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        base = f"http://{self.s.pubsub}/v1/{self.s.subscription}"
        ready = False
        while not self._stop.is_set():
            try:
                if not ready:
                    ready = self._ensure_subscription(base)
                    if not ready:
                        self._stop.wait(2)  # the stack creates the topic after the emulator starts
                        continue
                r = self.http.post(f"{base}:pull", json={"maxMessages": 100}, timeout=60)
                if r.status_code == 404:
                    ready = False
                    continue
                r.raise_for_status()
                received = r.json().get("receivedMessages") or []
                if received:
                    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
                    for m in received:
                        self.events.appendleft(self._event(m.get("message") or {}, now))
                    self.http.post(f"{base}:acknowledge", json={"ackIds": [m["ackId"] for m in received]},
                                   timeout=10).raise_for_status()
                else:
                    self._stop.wait(0.5)  # an emulator may answer an empty pull at once: do not spin on it
                self.events_error = None
            except Exception as e:  # noqa: BLE001 - shown on the page; the loop goes on
                self.events_error = f"{type(e).__name__}: {e}"
                self._stop.wait(2)

    def _ensure_subscription(self, base: str) -> bool:
        r = self.http.get(base, timeout=10)
        if r.status_code == 200:
            return True
        if not self.s.topic:
            self.events_error = f"waiting for the subscription {self.s.subscription} to exist"
            return False
        r = self.http.put(base, json={"topic": self.s.topic, "ackDeadlineSeconds": 60}, timeout=10)
        if r.status_code in (200, 409):
            return True
        self.events_error = f"waiting for topic {self.s.topic} ({r.status_code})"
        return False

    @staticmethod
    def _event(message: dict, received_at: str) -> dict:
        try:
            data = json.loads(base64.b64decode(message.get("data") or b""))
        except ValueError:
            data = {"raw": base64.b64decode(message.get("data") or b"").decode("utf-8", "replace")}
        if not isinstance(data, dict):
            data = {"raw": data}
        return {"receivedAt": received_at, "publishTime": message.get("publishTime"),
                "attributes": message.get("attributes") or {}, "data": data, "t": time.time()}
