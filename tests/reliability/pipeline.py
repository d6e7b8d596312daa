"""A whole export pipeline for the reliability tests: a Healthcare emulator of its own (flags per test),
an export_request process fed by a Pub/Sub push subscription, and a poll_exports process ticked with the
CloudEvent Pub/Sub would deliver. Terminal events are read from the harness's events subscription."""
from __future__ import annotations

import time
from collections import defaultdict

from handlers.core import events as ev
from tests.support import dicom_files, procs
from tests.support.function import Function, valid_request
from tests.support.hcapi import HC, unique
from tests.support.poller import PollerProcess, bq_mk


class Pipeline:
    def __init__(self, pubsub_clients, pubsub, firestore, logs_dir, tmp_path, *hc_flags, env=None, poll_env=None,
                 token=None):
        self.data_dir = tmp_path / "hc"
        self.hc = procs.healthcare_emulator(logs_dir, self.data_dir, *hc_flags,
                                            name=f"healthcare-emulator-{unique('rel')}").start()
        self.api = HC(self.hc.url)
        if token:
            self.api.http.headers["Authorization"] = f"Bearer {token}"
        bq_mk(self.data_dir)
        self.fn = Function("rel", pubsub_clients, pubsub, firestore, logs_dir, self.hc.url, env=env)
        self.fn.start()
        self.poller = PollerProcess(self.fn, logs_dir, env=poll_env).start()
        self.events: dict[str, list[dict]] = defaultdict(list)  # requestId -> every event received

    def store(self, files=None, tmp_path=None) -> str:
        """A store holding one real DICOM instance (fresh UIDs)."""
        store = self.api.store()
        src = dicom_files.storable()[0]
        path = dicom_files.with_uids(src, (tmp_path or self.data_dir.parent) / f"{unique('i')}.dcm")
        r = self.api.stow(store, files or [path])
        assert r.status_code == 200, r.text
        return store

    def request(self, store: str, rid: str | None = None) -> dict:
        return valid_request(store, rid or unique("rel"))

    def pull(self, seconds: float = 1.0) -> None:
        for e in self.fn._pull(seconds):
            self.events[e["attributes"]["requestId"]].append(e)

    def terminal(self, rid: str) -> list[dict]:
        return [e for e in self.events.get(rid, []) if e["attributes"]["eventType"] in ev.TERMINAL]

    def drive(self, rids, timeout: float = 120, tick=True) -> float:
        """Tick the poller and pull events until every request has its terminal event (or the deadline)."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline and not all(self.terminal(r) for r in rids):
            if tick and self.poller.svc.proc.poll() is None:
                try:
                    self.poller.tick(timeout=60)
                except Exception:  # noqa: BLE001 - a killed poller; the next tick goes to its successor
                    pass
            self.pull(1.0)
        return time.monotonic() - t0

    def counts(self, store: str) -> dict:
        from tests.support.reliability import counts
        return counts(self.hc.url).get(store, {})

    def stop(self) -> None:
        for x in (self.poller, self.fn, self.hc):
            try:
                x.stop()
            except Exception:  # noqa: BLE001
                pass
