"""The table equals the store (docs/design.md, "Deletions and replacements"), end to end on the local stack: random sequences over a few studies of
stores, deletions of an instance / a series / a study, replacements (deleted and stored again with changed
metadata) and killed function processes, with exports failing at random (the emulator answers 503 to export
calls; a request still failing after MAX_REQUEST_AGE_S ends EXPORT_FAILED, and its batch is re-driven); then
one reconcile run. Afterwards the table's SOPInstanceUID set equals the store's (QIDO-RS), one row each, each
row the latest version's metadata. Hypothesis, bounded: a few examples of at most a dozen steps each."""
from __future__ import annotations

import itertools
import json
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.support.ingest import IngestStack

pytestmark = pytest.mark.timeout(1800)

EXAMPLES = 3
STUDIES, SERIES, INSTANCES = 2, 2, 2
_examples = itertools.count()


@pytest.fixture(scope="module")
def world(pubsub, firestore, gcs, logs_dir, tmp_path_factory, pubsub_clients):
    ids = [f"p{i}" for i in range(EXAMPLES)]
    stack = IngestStack(pubsub=pubsub, firestore=firestore, gcs=gcs, logs_dir=logs_dir,
                        data_dir=tmp_path_factory.mktemp("hc-follow"), pubsub_clients=pubsub_clients, store_ids=ids,
                        hc_flags=("--fault", "export=0.5"), max_n=50, max_age_s=1,
                        route_options={i: {"schemaJson": {}} for i in ids},
                        extra_env={"HEALTHCARE_RETRY_BUDGET_S": "0.5", "INTAKE_LEASE_S": "5", "MAX_REQUEST_AGE_S": "1",
                                   "INGEST_BATCH_MAX_ATTEMPTS": "20", "INGEST_RETRY_BACKOFF_S": "0.2"})
    stack.start()
    stack.tmp = tmp_path_factory.mktemp("dcm-follow")
    yield stack
    stack.stop()


def uid(*parts: int) -> str:
    return "1.2.826.0.1.3680043.99." + ".".join(str(p) for p in parts)


steps = st.lists(st.one_of(
    st.tuples(st.sampled_from(["store", "replace", "delete", "delete_series", "delete_study"]),
              st.integers(0, STUDIES - 1), st.integers(0, SERIES - 1), st.integers(0, INSTANCES - 1)),
    st.tuples(st.just("kill"), st.sampled_from(["ingest_notification", "export_request", "poll_exports"]),
              st.just(0), st.just(0))), min_size=1, max_size=12)


class Driver:
    def __init__(self, stack, n: int):
        self.st, self.n = stack, n
        self.sid = f"p{n}"
        self.store = stack.stores[self.sid]
        self.model: dict[tuple[str, str, str], str] = {}  # (study, series, sop) -> PatientName of its last version
        self.version = 0

    def uids(self, a: int, b: int, c: int) -> tuple[str, str, str]:
        return uid(self.n, a), uid(self.n, a, b), uid(self.n, a, b, c)

    def stow(self, key: tuple[str, str, str]) -> None:
        from tests.support.dicom_files import path, with_uids

        self.version += 1
        name = f"V{self.version}^EXAMPLE{self.n}"
        f = with_uids(path("CT_small.dcm"), self.st.tmp / f"{self.n}-{self.version}.dcm", study=key[0], series=key[1],
                      sop=key[2], PatientName=name)
        r = self.st.hc.stow(self.store, [f])
        assert r.status_code == 200, r.text[:300]
        self.model[key] = name

    def delete(self, scope: tuple[str, ...]) -> None:
        r = self.st.hc.http.delete(self.st.hc.url(f"{self.store}/dicomWeb/" + "/".join(
            f"{level}/{u}" for level, u in zip(("studies", "series", "instances"), scope))))
        assert r.status_code == 200, r.text[:300]
        for k in [k for k in self.model if k[:len(scope)] == scope]:
            del self.model[k]

    def step(self, op: str, a, b, c) -> None:
        if op == "kill":
            fn = getattr(self.st, a)
            fn.kill()
            fn.start()
            return
        key = self.uids(a, b, c)
        if op == "store" and key not in self.model:
            self.stow(key)
        elif op == "replace" and key in self.model:
            self.delete(key)
            self.stow(key)
        elif op == "delete" and key in self.model:
            self.delete(key)
        elif op == "delete_series" and any(k[:2] == key[:2] for k in self.model):
            self.delete(key[:2])
        elif op == "delete_study" and any(k[0] == key[0] for k in self.model):
            self.delete(key[:1])

    def table(self) -> list[dict]:
        if not self.st.rows(self.sid)["n"]:  # no row, or no table yet
            return []
        rows = self.st.query(
            f"SELECT SOPInstanceUID, JSON_VALUE(Metadata, '$.\"00100010\".Value[0].Alphabetic') AS name "
            f"FROM `{self.st.tables[self.sid]}`")
        return sorted((r["SOPInstanceUID"], r["name"]) for r in rows)

    def expected(self) -> list[tuple[str, str]]:
        return sorted((k[2], name) for k, name in self.model.items())

    def store_sops(self) -> set[str]:
        r = self.st.hc.get(f"{self.store}/dicomWeb/instances", params={"limit": 1000})
        return set() if r.status_code == 204 else {d["00080018"]["Value"][0] for d in r.json()}

    def reconcile(self) -> None:
        self.st.publisher.publish(self.st.topic("reconcile"), json.dumps({"tick": True}).encode()).result(timeout=30)

    def converge(self, timeout: float = 400) -> list[tuple[str, str]]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.table()
            if got == self.expected():
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"table {got}\nstore {self.expected()}\n--- ingest log:\n"
                                     f"{self.st.ingest_notification.log_text()[-3000:]}")
            self.st.tick()
            time.sleep(0.5)


@settings(max_examples=EXAMPLES, deadline=None, database=None, phases=(Phase.generate,),
          suppress_health_check=list(HealthCheck))
@given(steps)
def test_after_any_sequence_and_one_reconcile_the_table_is_the_store(world, seq):
    d = Driver(world, next(_examples))
    for op in seq:
        d.step(*op)
    d.reconcile()
    got = d.converge()
    assert {sop for sop, _ in got} == d.store_sops() == {k[2] for k in d.model}
    assert len(got) == len({sop for sop, _ in got})  # one row each, the latest version's name
