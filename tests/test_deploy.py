"""deploy.sh: shellcheck-clean, and --dry-run prints the commands a real deploy would run."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dry_run(*args: str, env: dict | None = None) -> list[str]:
    """Run deploy.sh --dry-run with a `gcloud` first on PATH that records any call: none may happen."""
    with tempfile.TemporaryDirectory() as tmp:
        called = Path(tmp) / "called"
        for name in ("gcloud", "bq"):
            fake = Path(tmp) / name
            fake.write_text(f'#!/bin/sh\necho "$@" >> {called}\nexit 1\n')
            fake.chmod(0o755)
        r = subprocess.run(["bash", str(ROOT / "deploy.sh"), "--dry-run", *args], capture_output=True, text=True,
                           env={"PATH": f"{tmp}:/usr/bin:/bin", **(env or {})}, timeout=60)
        assert r.returncode == 0, r.stderr
        assert not called.exists(), f"--dry-run ran gcloud: {called.read_text()}"
    return r.stdout.splitlines()


def test_shellcheck_clean():
    sc = shutil.which("shellcheck") or str(Path(__import__("sys").executable).parent / "shellcheck")
    r = subprocess.run([sc, str(ROOT / "deploy.sh"), str(ROOT / ".ci" / "run")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dry_run_plans_everything_and_runs_nothing():
    out = dry_run("--project", "my-proj-1", "--region", "europe-west4", "--filter-bucket", "my-filters",
                  "--ingest-topic", "dicom-stored", "--dest-projects", "my-proj-1,analytics-proj")
    text = "\n".join(out)
    cmds = [line for line in out if line.startswith("+ ")]
    assert any("services enable healthcare.googleapis.com" in c for c in cmds)
    for topic in ("dicom-export-requests", "dicom-export-events", "dicom-export-poll", "dicom-export-dead-letter"):
        assert f"pubsub topics create {topic}" in text
    assert "pubsub subscriptions create dicom-export-dead-letter-hold --topic=dicom-export-dead-letter" in text
    assert "firestore databases create --location=europe-west4" in text
    assert "iam roles create dicomExportRunner" in text
    assert "healthcare.dicomStores.export" in text
    # the Cloud Healthcare Service Agent runs jobs in every destination project (the datasets: see below)
    for project in ("my-proj-1", "analytics-proj"):
        assert any(f"projects add-iam-policy-binding {project}" in c and "gcp-sa-healthcare" in c
                   and "roles/bigquery.jobUser" in c for c in cmds), project
    assert not any("projects add-iam-policy-binding" in c and "bigquery.dataEditor" in c for c in cmds)
    assert any("gs://my-filters" in c and "roles/storage.objectViewer" in c and "gcp-sa-healthcare" in c
               for c in cmds)
    deploys = [c for c in cmds if " functions deploy " in c]
    names = [c.split(" functions deploy ")[1].split()[0] for c in deploys]
    assert names == ["export_request", "poll_exports", "reconcile_tables", "export_status", "ingest_notification"]
    for c in deploys:
        assert "--gen2" in c and "--runtime=python312" in c and "--region=europe-west4" in c
        assert "--service-account=dicom-export@my-proj-1.iam.gserviceaccount.com" in c
    for name in ("export_request", "poll_exports", "reconcile_tables", "ingest_notification"):
        c = next(c for c in deploys if f"deploy {name} " in c)
        assert "--retry" in c and "--trigger-topic=" in c
        assert any("--dead-letter-topic=dicom-export-dead-letter" in d and name.replace("_", "-") in d for d in cmds)
    status = next(c for c in deploys if "deploy export_status " in c)
    assert "--trigger-http" in status and "--no-allow-unauthenticated" in status
    assert "scheduler jobs create pubsub dicom-export-poll" in text
    assert "scheduler jobs create pubsub dicom-export-reconcile" in text and "--topic=dicom-export-reconcile" in text
    # ingest: its indexes, TTLs and the filter files' lifecycle
    assert "--collection-group=dicomExports-ingestArrivals" in text and "field-path=arrivedAt" in text
    assert "--collection-group=dicomExports-ingestBatches" in text and "field-path=readyAt" in text
    assert "ttls update expireAt --collection-group=dicomExports-ingestArrivals --enable-ttl" in text
    assert any("buckets update gs://my-filters --lifecycle-file=" in c for c in cmds)
    assert "pubsub topics publish dicom-export-requests" in text  # how to send a first request


def test_settings_come_from_env_and_flags_win():
    out = "\n".join(dry_run("--project", "flag-proj-1", env={"GOOGLE_CLOUD_PROJECT": "env-proj-1",
                                                              "EXPORT_EVENTS_TOPIC": "my-events",
                                                              "ALLOWED_DICOM_STORES": "projects/x/*,projects/y/*"}))
    assert "--project=flag-proj-1" in out and "env-proj-1" not in out
    assert "pubsub topics create my-events" in out
    assert 'ALLOWED_DICOM_STORES: "projects/x/*,projects/y/*"' in out


@pytest.mark.parametrize("args, needle", [
    ([], "--project"),
    (["--project", "p-1234", "--max-operation-age", "soon"], "--max-operation-age"),
    (["--project", "p-1234", "--bogus"], "unknown option --bogus"),
])
def test_bad_settings_are_refused(args, needle):
    r = subprocess.run(["bash", str(ROOT / "deploy.sh"), "--dry-run", *args], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and needle in r.stderr


def test_help_documents_every_setting():
    r = subprocess.run(["bash", str(ROOT / "deploy.sh"), "--help"], capture_output=True, text=True)
    for var in ("GOOGLE_CLOUD_PROJECT", "EXPORT_REQUESTS_TOPIC", "EXPORT_EVENTS_TOPIC", "LEDGER_COLLECTION",
                "ALLOWED_DICOM_STORES", "ALLOWED_BQ_DATASETS", "DEFAULT_DICOM_STORE", "MAX_OPERATION_AGE_S",
                "INGEST_FILTER_BUCKET", "INGEST_ROUTES"):
        assert var in r.stdout


def test_least_privilege_bigquery_grants():
    """Least privilege (docs/operations.md, "Deploying"): the Healthcare service agent of each source project gets dataEditor on each allowed
    (or routed) dataset, never on a project, and jobUser on each destination project; the runtime account
    dataEditor on the routed datasets only, and jobUser on their projects."""
    from tests.deploy.plan import dry_run as plan_of

    plan = plan_of("--project", "my-proj-1",
                   "--allowed-datasets", "my-proj-1.imaging,analytics-proj.dicom_*,example.com:legacy-proj.exports",
                   "--healthcare-datasets", "projects/hc-proj-2/locations/us/datasets/a,"
                                            "projects/my-proj-1/locations/us/datasets/b",
                   "--filter-bucket", "my-filters", "--dest-projects", "billing-proj",
                   "--ingest-routes", '{"projects/my-proj-1/locations/us/datasets/b/dicomStores/s": '
                                      '"bq://route-proj.routed.instances"}')
    cmds = [s.argv for s in plan.commands]
    sa = "serviceAccount:dicom-export@my-proj-1.iam.gserviceaccount.com"
    agents = {f"serviceAccount:service-NUMBER-OF-{p}@gcp-sa-healthcare.iam.gserviceaccount.com"
              for p in ("hc-proj-2", "my-proj-1")}

    def grants(member: str, role: str) -> set[str]:
        """The resources MEMBER gets ROLE on: PROJECT:DATASET for a dataset, PROJECT for a project."""
        out = set()
        for c in cmds:
            if f"--member={member}" in c and f"--role={role}" in c:
                if c[0] == "bq":
                    assert c[1:4] == ("--headless", f"--project_id={c[-1].rsplit(':', 1)[0]}",
                                      "add-iam-policy-binding") and "--dataset" in c, c
                    out.add(c[-1])
                else:
                    assert c[3:5] == ("projects", "add-iam-policy-binding"), c
                    out.add(c[5])
        return out

    for agent in agents:
        assert grants(agent, "roles/bigquery.dataEditor") == {
            "my-proj-1:imaging", "example.com:legacy-proj:exports", "route-proj:routed"}
        assert grants(agent, "roles/bigquery.jobUser") == {
            "my-proj-1", "analytics-proj", "example.com:legacy-proj", "route-proj", "billing-proj"}
    assert grants(sa, "roles/bigquery.dataEditor") == {"route-proj:routed"}
    assert grants(sa, "roles/bigquery.jobUser") == {"route-proj"}
    # nobody gets dataEditor on a project; the wildcard pattern is left to the operator, with the command
    assert not [c for c in cmds if c[0] == "gcloud" and "--role=roles/bigquery.dataEditor" in c]
    assert "analytics-proj.dicom_*" in plan.stderr and "bq add-iam-policy-binding --dataset" in plan.stderr
    # both agents may read the filter files; the custom role is bound with each dataset's own project's role
    assert {a[len("--member="):] for c in cmds if "--role=roles/storage.objectViewer" in c
            for a in c if a.startswith("--member=")} == agents
    assert {(c[1], c[-1]) for c in cmds if "healthcare" in c} == {
        ("--project=hc-proj-2", "--role=projects/hc-proj-2/roles/dicomExportRunner"),
        ("--project=my-proj-1", "--role=projects/my-proj-1/roles/dicomExportRunner")}


def test_without_allowed_datasets_the_agent_gets_no_dataset_and_is_told_how():
    out = subprocess.run(["bash", str(ROOT / "deploy.sh"), "--dry-run", "--project", "my-proj-1"],
                         capture_output=True, text=True, env={"PATH": "/nonexistent:/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0
    assert "bigquery.dataEditor" not in out.stdout
    assert "--allowed-datasets is not set" in out.stderr
    assert ("bq add-iam-policy-binding --dataset --member=serviceAccount:service-NUMBER-OF-my-proj-1@"
            "gcp-sa-healthcare.iam.gserviceaccount.com --role=roles/bigquery.dataEditor PROJECT:DATASET") in out.stderr
    # jobUser still goes to --project, where exports land unless told otherwise
    assert "projects add-iam-policy-binding my-proj-1 --member=serviceAccount:service-NUMBER-OF-my-proj-1@" \
           "gcp-sa-healthcare.iam.gserviceaccount.com --role=roles/bigquery.jobUser" in out.stdout
