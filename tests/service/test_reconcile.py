"""reconcile_tables in-process against the emulators: a table changed behind the service's back is found
with exactly those counts, reported once per route, healed through ingest changes; bounded runs go on
from their cursor; unusable tables are refused."""
from __future__ import annotations

import json
import os

import pydicom
import pytest

from handlers.core import changes as C
from tests.support.dicom_files import path, with_uids
from tests.support.function import PROJECT
from tests.support.hcapi import HC, unique
from tests.support.ingest import bq_mk

STUDIES = {"1.2.826.0.1.88.1": 3, "1.2.826.0.1.88.2": 2, "1.2.826.0.1.88.3": 1}


class World:
    """A store of 3 studies (3, 2, 1 instances) exported to its table, then changed behind the service's back:
    one row deleted (A's first instance: missing), one row duplicated (B's first: duplicated), B's second
    instance and the only instance of C deleted from the store (extra rows). (A study with one instance
    missing and another extra has the same counts: the per-study comparison cannot see it.)"""

    def __init__(self, hc, pubsub_clients, tmp):
        from handlers.adapters.bigquery import BigQuery

        self.hc_url = hc.url
        self.api = HC(hc.url)
        self.store = self.api.store()
        self.uids: dict[str, list[tuple[str, str]]] = {}
        n = 0
        for study, count in STUDIES.items():
            for _ in range(count):
                f = with_uids(path("CT_small.dcm"), tmp / f"{n}.dcm", study=study)
                n += 1
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                self.uids.setdefault(study, []).append((ds.SeriesInstanceUID, ds.SOPInstanceUID))
                assert self.api.stow(self.store, [f]).status_code == 200
        dataset = f"{PROJECT}.rec_{unique('t').replace('-', '_')}"
        bq_mk(hc.data_dir, dataset)
        self.table = f"bq://{dataset}.instances"
        assert "error" not in self.api.export_and_wait(self.store, {"bigqueryDestination": {"tableUri": self.table}})
        self.bq = BigQuery(hc.url, PROJECT)
        self.publisher, self.subscriber = pubsub_clients
        self.name = unique("rec")
        self.topic = f"events-{self.name}"
        self.publisher.create_topic(name=f"projects/{PROJECT}/topics/{self.topic}")
        self.sub = f"projects/{PROJECT}/subscriptions/{self.name}"
        self.subscriber.create_subscription(name=self.sub, topic=f"projects/{PROJECT}/topics/{self.topic}")

    def sop(self, i: int, j: int) -> str:
        return self.uids[list(STUDIES)[i]][j][1]

    def path(self, i: int, j: int) -> str:
        study = list(STUDIES)[i]
        series, sop = self.uids[study][j]
        return f"/studies/{study}/series/{series}/instances/{sop}"

    def diverge(self) -> None:
        t = C.table_sql_name(self.table)
        self.bq.query(f"DELETE FROM {t} WHERE SOPInstanceUID = @s", [_string("s", self.sop(0, 0))])
        self.bq.query(f"INSERT INTO {t} SELECT * FROM {t} WHERE SOPInstanceUID = @s", [_string("s", self.sop(1, 0))])
        for i, j in ((1, 1), (2, 0)):
            study = list(STUDIES)[i]
            series, sop = self.uids[study][j]
            r = self.api.http.delete(self.api.url(f"{self.store}/dicomWeb/studies/{study}/series/{series}"
                                                  f"/instances/{sop}"))
            assert r.status_code == 200, r.text

    def reconciler(self, **env):
        import config
        from handlers import reconcile, wiring

        s = config.load({**os.environ, "GOOGLE_CLOUD_PROJECT": PROJECT, "LEDGER_COLLECTION": f"ledger-{self.name}",
                         "INGEST_ROUTES": json.dumps({self.store: self.table}), "INGEST_FILTER_BUCKET": "b-rec",
                         "HEALTHCARE_API_ENDPOINT": self.hc_url, "BIGQUERY_API_ENDPOINT": self.hc_url,
                         "EXPORT_EVENTS_TOPIC": self.topic, **env})
        deps = wiring.reconcile_for(s)
        return reconcile.Reconcile(s, *deps), deps[0]

    def events(self) -> list[dict]:
        resp = self.subscriber.pull(subscription=self.sub, max_messages=50, timeout=10)
        if resp.received_messages:
            self.subscriber.acknowledge(subscription=self.sub, ack_ids=[m.ack_id for m in resp.received_messages])
        return [{"data": json.loads(m.message.data), "attributes": dict(m.message.attributes)}
                for m in resp.received_messages]


def _string(name: str, value: str) -> dict:
    return {"name": name, "parameterType": {"type": "STRING"}, "parameterValue": {"value": value}}


@pytest.fixture
def world(hc, pubsub_clients, tmp_path):
    w = World(hc, pubsub_clients, tmp_path)
    w.diverge()
    return w


COUNTS = ("studiesCompared", "studiesDiffering", "instancesMissing", "instancesExtra", "instancesDuplicated")


def test_dry_run_reports_exactly_the_divergence_and_changes_nothing(world):
    rec, state = world.reconciler(RECONCILE_DRY_RUN="true")
    report = rec.route(world.store, world.table).counts()
    assert {k: report[k] for k in COUNTS} == {"studiesCompared": 2, "studiesDiffering": 3, "instancesMissing": 1,
                                             "instancesExtra": 2, "instancesDuplicated": 1}
    assert report["healed"] == 0 and report["dryRun"] and report["passComplete"] and report["apiCalls"] >= 5
    assert [d.data for d in state.client().query(state.ARRIVALS)] == []
    (event,) = world.events()
    assert event["attributes"]["eventType"] == "TABLE_RECONCILED" and event["data"]["tableUri"] == world.table
    assert {k: event["data"][k] for k in COUNTS} == {k: report[k] for k in COUNTS}
    assert state.get(rec_key(world))["events"]["TABLE_RECONCILED"]["published"] is True


def rec_key(world) -> str:
    from handlers.core.batches import Route
    return Route(world.store, world.table).key


def test_a_run_records_one_change_per_divergent_instance_for_the_next_batch(world):
    rec, state = world.reconciler()
    report = rec.route(world.store, world.table).counts()
    assert report["healed"] == 4
    arrivals = sorted((d.data["path"], d.data["kind"], d.data["state"]) for d in state.client().query(state.ARRIVALS))
    assert arrivals == sorted([(world.path(0, 0), "arrival", "PENDING"), (world.path(1, 0), "arrival", "PENDING"),
                               (world.path(1, 1), "deletion", "PENDING"), (world.path(2, 0), "deletion", "PENDING")])


def test_bounded_runs_go_on_from_the_cursor_and_find_the_same_divergence(world):
    rec, state = world.reconciler(RECONCILE_DRY_RUN="true", RECONCILE_MAX_STUDIES="1")
    reports = []
    for _ in range(3):
        reports.append(rec.route(world.store, world.table).counts())
        if reports[-1]["passComplete"]:
            break
    assert [r["studiesCompared"] for r in reports] == [1, 1, 0] and reports[-1]["passComplete"]
    assert [sum(r[k] for r in reports) for k in COUNTS[2:]] == [1, 2, 1]
    assert state.get(rec_key(world))["cursor"] == {"offset": 0, "tableAfter": "", "passes": 1}
    assert len(world.events()) == 3


def test_a_table_without_sop_uids_or_missing_is_refused_with_an_error_naming_it(world, capsys):
    import requests

    project, dataset, _ = world.table.removeprefix("bq://").split(".")
    r = requests.post(f"{world.hc_url}/bigquery/v2/projects/{project}/datasets/{dataset}/tables", json={
        "tableReference": {"projectId": project, "datasetId": dataset, "tableId": "studies_only"},
        "schema": {"fields": [{"name": "StudyInstanceUID", "type": "STRING"}]}})
    assert r.status_code == 200, r.text
    rec, state = world.reconciler()
    capsys.readouterr()
    for table, reason in ((world.table + "_missing", "404"), (f"bq://{project}.{dataset}.studies_only",
                                                              "no SeriesInstanceUID, SOPInstanceUID column")):
        assert rec.route(world.store, table) is None
        entries = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        (refused,) = [e for e in entries if e.get("reconcileOutcome") == "refused"]
        assert refused["severity"] == "ERROR" and table in refused["message"] and reason in refused["reason"]
    assert world.events() == [] and [d for d in state.client().query(state.ARRIVALS)] == []
