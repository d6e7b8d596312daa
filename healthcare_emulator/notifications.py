"""DICOM store notifications, published through Google's Pub/Sub emulator (`PUBSUB_EMULATOR_HOST`).

For every instance stored or deleted, one message per configured topic, in the real API's format
(Google's Pub/Sub notification documentation for DICOM stores, and the discovery document's
`DicomNotificationConfig.pubsubTopic` text):

- `notificationConfig.pubsubTopic` (legacy): data = the instance's resource name
  `projects/P/locations/L/datasets/D/dicomStores/S/dicomWeb/studies/X/series/Y/instances/Z`,
  no attributes ("DICOM Pub/Sub notifications don't contain an attributes field"), and only for
  stored instances: the DicomStore field is documented as "Notification destination for new DICOM
  instances", so a delete sends nothing there (deletes are notified through `notificationConfigs`).
- each `notificationConfigs[].pubsubTopic`: the same data, with the documented attributes `action`
  (`StoreInstances`, `DeleteInstance`, `DeleteSeries`, `DeleteStudy`: the endpoint's name),
  `storeName`, `studyInstanceUID`, `seriesInstanceUID`, `sopInstanceUID`, `versionId`,
  `lastUpdatedTime` (RFC 1123), `modality` (when the instance has one) and, for stores,
  `storageClass` (`STANDARD`). A delete of a series or a study sends one message per instance it
  removed, each naming that instance, with `action` `DeleteSeries` / `DeleteStudy`; `versionId` is
  the deleted version's, `lastUpdatedTime` the time of the delete.

Imported instances (`dicomStores.import`) are sent with the action `ImportDicomData` to every
`notificationConfigs[]` topic, and to the legacy topic only when `notificationConfig.sendForBulkImport`
is true ("Indicates whether or not to send Pub/Sub notifications on bulk import").

An empty topic sends nothing ("notifications are only sent if the topic is non-empty"). A topic that
does not exist, or a Pub/Sub emulator that cannot be reached, is logged (WARNING, naming the topic and
the instance) and nothing else happens: the store or delete has already succeeded, as in the real
service, which logs such failures to Cloud Logging.

Publishing never runs on the request's thread: `__call__` reads the store's configuration (one
indexed SQLite read) and queues the messages; one background thread publishes them with
google-cloud-pubsub's PublisherClient, batch by batch, and logs each failure before it takes the next
batch. So a message on one topic received after a later store means the earlier store's failures on
other topics are already in the log.
"""
from __future__ import annotations

import email.utils
import logging
import queue
import threading
from datetime import datetime, timezone

log = logging.getLogger("healthcare_emulator.notifications")

PUBLISH_TIMEOUT_S = 30.0
MAX_QUEUED = 100_000  # beyond this, messages are dropped (and logged) rather than let memory grow


def rfc1123(rfc3339: str | None) -> str:
    """'2026-11-25T04:30:00.123456Z' -> 'Wed, 25 Nov 2026 04:30:00 GMT' (RFC 1123, as in HTTP dates)."""
    try:
        t = datetime.fromisoformat((rfc3339 or "").replace("Z", "+00:00"))
    except ValueError:
        t = datetime.now(timezone.utc)
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return email.utils.format_datetime(t.astimezone(timezone.utc), usegmt=True)


def version_id(rfc3339: str | None) -> str:
    """The instance's version: microseconds since the epoch of the time it was stored (stable per version)."""
    try:
        t = datetime.fromisoformat((rfc3339 or "").replace("Z", "+00:00"))
    except ValueError:
        return "0"
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    delta = t - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return str((delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds)


def messages_for(store_resource: dict, store: str, action: str, instance: dict) -> list[tuple[str, bytes, dict]]:
    """(topic, data, attributes) for every configured topic of the store."""
    name = (f"{store}/dicomWeb/studies/{instance['study']}/series/{instance['series']}"
            f"/instances/{instance['sop']}")
    data = name.encode("utf-8")
    out = []
    legacy_config = store_resource.get("notificationConfig") or {}
    legacy = legacy_config.get("pubsubTopic")
    # the legacy config is for new instances only: stored, or imported when sendForBulkImport is set
    if legacy and (action == "StoreInstances" or (action == "ImportDicomData"
                                                  and legacy_config.get("sendForBulkImport"))):
        out.append((legacy, data, {}))
    configs = store_resource.get("notificationConfigs") or []
    if configs:
        changed = instance.get("deleted_at") or instance.get("stored_at")
        attrs = {"action": action, "storeName": store, "studyInstanceUID": instance["study"],
                 "seriesInstanceUID": instance["series"], "sopInstanceUID": instance["sop"],
                 "versionId": version_id(instance.get("stored_at")), "lastUpdatedTime": rfc1123(changed)}
        if instance.get("modality"):
            attrs["modality"] = str(instance["modality"])
        if action in ("StoreInstances", "ImportDicomData"):
            attrs["storageClass"] = "STANDARD"
        for c in configs:
            if c.get("pubsubTopic"):
                out.append((c["pubsubTopic"], data, dict(attrs)))
    return out


class Notifier:
    def __init__(self, app):
        self.app = app
        self._queue: queue.Queue = queue.Queue()
        self._client = None
        self._thread = threading.Thread(target=self._run, name="notifications", daemon=True)
        self._thread.start()

    def __call__(self, store: str, action: str, instance: dict) -> None:
        resource = self.app.state.get_json("stores", store)
        if resource is None:
            return
        msgs = messages_for(resource, store, action, instance)
        if not msgs:
            return
        if self._queue.qsize() >= MAX_QUEUED:
            log.warning("notification queue full: %d message(s) for %s dropped", len(msgs), msgs[0][1].decode())
            return
        for m in msgs:
            self._queue.put(m)

    # -- background publishing ----------------------------------------------------------------------
    def _publisher(self):
        if self._client is None:
            from google.cloud import pubsub_v1  # honours PUBSUB_EMULATOR_HOST
            self._client = pubsub_v1.PublisherClient()
        return self._client

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._publish(batch)
            except Exception:  # never let the thread die
                log.exception("publishing %d notification(s) failed", len(batch))

    def _publish(self, batch: list[tuple[str, bytes, dict]]) -> None:
        try:
            client = self._publisher()
        except Exception as e:
            log.warning("cannot create a Pub/Sub publisher (PUBSUB_EMULATOR_HOST): %s; %d notification(s) "
                        "not sent", e, len(batch))
            return
        futures = []
        for topic, data, attrs in batch:
            try:
                futures.append((topic, data, client.publish(topic, data, **attrs)))
            except Exception as e:
                self._failed(topic, data, e)
        for topic, data, fut in futures:
            try:
                fut.result(timeout=PUBLISH_TIMEOUT_S)
            except Exception as e:
                self._failed(topic, data, e)

    @staticmethod
    def _failed(topic: str, data: bytes, e: Exception) -> None:
        from google.api_core import exceptions as gexc
        if isinstance(e, gexc.NotFound):
            why = f"Pub/Sub topic {topic} does not exist"
        else:
            why = f"publishing to Pub/Sub topic {topic} failed: {type(e).__name__}: {e}"
        log.warning("notification not sent: %s (resource %s)", why, data.decode("utf-8", "replace"))
