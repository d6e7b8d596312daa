"""Missing BigQuery grants (docs/operations.md, "Deploying") end to end, against the Healthcare emulator with --enforce-iam, through the functions (export_request
and poll_exports under functions-framework, fed by Pub/Sub emulator push subscriptions with dead-letter policies):

1. a request to a dataset the Cloud Healthcare Service Agent may not write ends EXPORT_FAILED, code 7, with the
   remedy (and the ERROR log entry carries it);
2. `python -m stack preflight` exits 1 listing exactly the missing grants, each with its fix;
3. the grants applied through the emulator's own APIs (google-cloud-bigquery's access entries, the discovery
   client for Resource Manager): preflight exits 0, and the same export succeeds.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from handlers.core import ledger as L
from healthcare_emulator import iam
from tests.support import dicom_files, procs
from tests.support.function import PROJECT, wait_for
from tests.support.hcapi import HC, unique
from tests.support.poller import PollerProcess, pull

AGENT = iam.service_agent(iam.project_number(PROJECT))


@pytest.fixture(scope="module")
def hc_iam(logs_dir, tmp_path_factory):
    svc = procs.healthcare_emulator(logs_dir, tmp_path_factory.mktemp("hc-iam-e2e"), "--enforce-iam",
                                    name="healthcare-emulator-iam-e2e")
    svc.start()
    yield svc
    svc.stop()


def bq(url: str):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery
    return bigquery.Client(project=PROJECT, credentials=AnonymousCredentials(), client_options={"api_endpoint": url})


def resource_manager(url: str):
    from google.oauth2.credentials import Credentials
    from googleapiclient import discovery
    return discovery.build("cloudresourcemanager", "v1", client_options={"api_endpoint": url + "/"},
                           credentials=Credentials("dummy-token"), cache_discovery=False, static_discovery=True)


class Deployment:
    """The intake and the poller, each behind a push subscription with a dead-letter policy, as deploy.sh wires
    them; the dead-letter topic with its holding subscription."""

    def __init__(self, make_function, pubsub_clients, logs_dir, hc_url: str, dataset: str):
        self.publisher, self.subscriber = pubsub_clients
        env = {"ALLOWED_BQ_DATASETS": f"{PROJECT}.{dataset}", "BIGQUERY_API_ENDPOINT": hc_url,
               "RESOURCE_MANAGER_API_ENDPOINT": hc_url}
        self.fn = make_function("iam", hc_url=hc_url, env=env, push_subscriptions=0, start=False)
        name = self.fn.name
        self.poll_topic, self.dlq = f"poll-{name}", f"dlq-{name}"
        self.subs = []
        for t in (self.poll_topic, self.dlq):
            self.publisher.create_topic(name=self.fn.topic_path(t))
        self._subscribe(f"hold-{name}", self.dlq)
        self.fn.env.update(POLL_TOPIC=self.poll_topic, DEAD_LETTER_TOPIC=self.dlq)
        self.fn.start()
        self._subscribe(f"push-{name}", self.fn.requests_topic,
                        f"http://127.0.0.1:{self.fn.port}/projects/{PROJECT}/topics/{self.fn.requests_topic}")
        self.poller = PollerProcess(self.fn, logs_dir, name="poller-iam").start()
        self._subscribe(f"poll-push-{name}", self.poll_topic, f"{self.poller.url}projects/{PROJECT}/topics/x")

    def _subscribe(self, sub: str, topic: str, push: str | None = None) -> None:
        request = {"name": f"projects/{PROJECT}/subscriptions/{sub}", "topic": self.fn.topic_path(topic),
                   "ack_deadline_seconds": 60}
        if push:
            request["push_config"] = {"push_endpoint": push}
            request["dead_letter_policy"] = {"dead_letter_topic": self.fn.topic_path(self.dlq),
                                             "max_delivery_attempts": 10}
        self.subscriber.create_subscription(request=request)
        self.subs.append(request["name"])

    def export(self, store: str, table_uri: str) -> tuple[dict, dict]:
        """(EXPORT_STARTED, the terminal event) of one request, the poller ticked through its topic."""
        rid = unique("iam")
        self.fn.publish({"requestId": rid, "dicomStore": store,
                         "bigqueryDestination": {"tableUri": table_uri, "writeDisposition": "WRITE_APPEND"}})
        [started] = pull(self.fn, 1, {rid})
        assert started["attributes"]["eventType"] == "EXPORT_STARTED", started
        HC(self.fn.hc_url).wait(started["data"]["operation"])
        wait_for(lambda: "leaseOwner" not in (doc := self.fn.ledger.get(rid)) and doc["nextPollAt"] <= L.now(),
                 what="the first poll to be due")
        self.publisher.publish(self.fn.topic_path(self.poll_topic), b'{"tick":true}').result(timeout=30)
        [terminal] = pull(self.fn, 1, {rid})
        return started, terminal

    def preflight(self) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "stack", "preflight", "--timeout", "10"], cwd=procs.ROOT,
                              env={**self.fn.svc.env, **self.fn.env}, capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        self.poller.stop()
        for sub in self.subs:
            self.subscriber.delete_subscription(subscription=sub)


@pytest.fixture
def deployment(make_function, pubsub_clients, logs_dir, hc_iam):
    dataset = unique("granted").replace("-", "_")
    bq(hc_iam.url).create_dataset(f"{PROJECT}.{dataset}")
    d = Deployment(make_function, pubsub_clients, logs_dir, hc_iam.url, dataset)
    d.dataset = dataset
    yield d
    d.stop()


def test_missing_grants_fail_with_the_remedy_preflight_names_them_and_granting_fixes_both(deployment, hc_iam,
                                                                                          tmp_path):
    d, dataset = deployment, deployment.dataset
    api = HC(hc_iam.url, project=PROJECT)
    store = api.store()
    f = dicom_files.with_uids(dicom_files.path("CT_small.dcm"), tmp_path / "a.dcm")
    assert api.stow(store, [f]).status_code == 200
    table_uri = f"bq://{PROJECT}.{dataset}.dicom"
    write_fix = (f"bq --project_id={PROJECT} add-iam-policy-binding --dataset --member=serviceAccount:{AGENT} "
                 "--role=roles/bigquery.dataEditor "
                 f"{PROJECT}:{dataset}")
    jobs_fix = (f"gcloud projects add-iam-policy-binding {PROJECT} --member=serviceAccount:{AGENT} "
                "--role=roles/bigquery.jobUser --condition=None")

    # 1. the export fails, code 7, with the remedy
    _, failed = d.export(store, table_uri)
    assert failed["attributes"]["eventType"] == "EXPORT_FAILED"
    error = failed["data"]["error"]
    assert error["code"] == 7 and AGENT in error["message"] and "bigquery.tables.create" in error["message"]
    assert write_fix in error["remedy"] and jobs_fix in error["remedy"]
    [logged] = [e for e in d.poller.entries() if e["message"].startswith("export failed")
                and e["logging.googleapis.com/labels"]["requestId"] == failed["data"]["requestId"]]
    assert logged["severity"] == "ERROR" and logged["remedy"] == error["remedy"]

    # 2. preflight: exactly the two missing grants, each with its fix
    r = d.preflight()
    assert r.returncode == 1, r.stdout + r.stderr
    crosses = [line for line in r.stdout.splitlines() if line.startswith("✗")]
    assert crosses == [
        f"✗ {AGENT} can write BigQuery dataset {PROJECT}:{dataset}: no WRITER access entry on the dataset and no "
        f"roles/bigquery.dataEditor (or above) on project {PROJECT} (missing bigquery.tables.create); fix: {write_fix}",
        f"✗ {AGENT} can run BigQuery jobs in project {PROJECT}: no roles/bigquery.jobUser (or above) on project "
        f"{PROJECT} (missing bigquery.jobs.create); fix: {jobs_fix}"], r.stdout
    assert f"✓ BigQuery dataset {PROJECT}:{dataset} exists" in r.stdout
    assert "✓ Firestore database (default) exists" in r.stdout

    # 3. grant through the emulator's own APIs, as one would against Google's
    from google.cloud.bigquery import AccessEntry
    client = bq(hc_iam.url)
    ds = client.get_dataset(f"{PROJECT}.{dataset}")
    ds.access_entries = [*ds.access_entries, AccessEntry("WRITER", "userByEmail", AGENT)]
    client.update_dataset(ds, ["access_entries"])
    crm = resource_manager(hc_iam.url)
    policy = crm.projects().getIamPolicy(resource=PROJECT, body={}).execute()
    policy.setdefault("bindings", []).append({"role": "roles/bigquery.jobUser", "members": [f"serviceAccount:{AGENT}"]})
    crm.projects().setIamPolicy(resource=PROJECT, body={"policy": policy}).execute()

    r = d.preflight()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "✗" not in r.stdout and r.stdout.strip().splitlines()[-1].endswith(", 0 failed")
    _, done = d.export(store, table_uri)
    assert done["attributes"]["eventType"] == "EXPORT_SUCCEEDED", done
    assert client.get_table(f"{PROJECT}.{dataset}.dicom").num_rows == 1
