"""deploy.sh for real (not --dry-run), first and second time, against a recording stand-in for gcloud and bq.

Real Google Cloud can't be reached from the test machine, so `gcloud` and `bq` here are a stand-in script first
on PATH: it records each argv and answers the read-only lookups as Google would for a project where everything
is absent (a first deploy) or already there (a second deploy). Everything else it accepts. What this shows is
deploy.sh's own logic under `set -euo pipefail`: which commands a first and a second run issue, that nothing is
created twice, that the second run exits 0, and that a lookup finding nothing stops the script instead of
feeding '' to the next command. That the commands are well-formed is test_gcloud_parses.py's business.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from tests.deploy.plan import DEPLOY, dry_run

STAND_IN = r'''#!/bin/bash
# Records its argv (fields ended by \037, one call a line), then answers like Google Cloud would.
{ printf '%s\037' "${0##*/}" "$@"; printf '\n'; } >>"$STAND_IN_LOG"
words=()
for a in "$@"; do case $a in -*) ;; *) words+=("$a") ;; esac; done
joined=" ${words[*]} "
last=${words[${#words[@]}-1]}
answer() { printf '%s\n' "$1"; exit 0; }
case $joined in *" describe "*|*" list "*) ;; *) exit 0 ;; esac   # a change: accepted
# lookups whose answer doesn't depend on a previous deploy
case $joined in
  *" projects describe "*)
    h=0; for ((i = 0; i < ${#last}; i++)); do printf -v c '%d' "'${last:i:1}"; h=$(( (h * 31 + c) % 1000000007 )); done
    answer "$h" ;;
  *" functions describe "*) [ -z "${STAND_IN_NO_TRIGGER:-}" ] || answer ""; answer "trigger-${last//_/-}" ;;
  *" eventarc triggers describe "*) answer "projects/p/subscriptions/eventarc-sub-of-$last" ;;
  *" iam roles describe "*) [ -z "${STAND_IN_ROLE_DELETED:-}" ] || answer $'projects/p/roles/dicomExportRunner\tTrue' ;;
esac
[ "$STAND_IN_MODE" = absent ] || answer "projects/p/thing/$last"
case $joined in *" list "*) exit 0 ;; esac   # an empty list
echo "ERROR: NOT_FOUND" >&2
exit 1
'''

ARGS = ["--project", "my-proj-1", "--region", "europe-west4", "--filter-bucket", "my-filters",
        "--ingest-topic", "dicom-stored", "--allowed-datasets", "my-proj-1.imaging,analytics-proj.dicom_*",
        "--healthcare-datasets", "projects/hc-proj-2/locations/us/datasets/a,projects/my-proj-1/locations/eu/datasets/b",
        "--ingest-routes", '{"projects/my-proj-1/locations/eu/datasets/b/dicomStores/s": "bq://my-proj-1.imaging.t"}']


def deploy(mode: str, *args: str, **extra_env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("gcloud", "bq"):
            script = Path(tmp) / name
            script.write_text(STAND_IN)
            script.chmod(0o755)
        log = Path(tmp) / "log"
        log.touch()
        r = subprocess.run(["bash", str(DEPLOY), *args], capture_output=True, text=True, timeout=120,
                           env={"PATH": f"{tmp}:/usr/bin:/bin", "TMPDIR": tmp, "STAND_IN_LOG": str(log),
                                "STAND_IN_MODE": mode, **extra_env})
        calls = [line.split("\037")[:-1] for line in log.read_text().split("\n")[:-1]]
    return r, calls


def changes(calls: list[list[str]]) -> list[list[str]]:
    return [c for c in calls if not ({"describe", "list"} & set(c))]


def creations(calls):
    return [c for c in changes(calls) if "create" in c]


def test_first_run_creates_each_thing_once():
    r, calls = deploy("absent", *ARGS)
    assert r.returncode == 0, r.stderr
    made = creations(calls)
    assert len({tuple(c) for c in made}) == len(made), "something created twice"
    kinds = Counter(" ".join(a for a in c[1:] if not a.startswith("-")).split(" create")[0] for c in made)
    assert kinds == {"pubsub topics": 5, "pubsub subscriptions": 1, "firestore databases": 1,
                     "firestore indexes composite": 3, "iam service-accounts": 1, "iam roles": 2,
                     "storage buckets": 1, "scheduler jobs": 2}, kinds
    # the custom role: created in each source project, never "updated" on a first run
    assert sorted(c[1] for c in made if "roles" in c) == ["--project=hc-proj-2", "--project=my-proj-1"]
    assert not [c for c in calls if "roles" in c and "update" in c]
    # no change is issued twice (a binding, an update): a re-run is the only repetition
    assert not [c for c, n in Counter(map(tuple, changes(calls))).items() if n > 1]
    # the fifth function is deployed and ticked
    assert any(c[3:6] == ["functions", "deploy", "reconcile_tables"] for c in calls)
    assert [c for c in made if "dicom-export-reconcile" in c and "scheduler" in c]


def test_second_run_creates_nothing_and_exits_0():
    first, first_calls = deploy("absent", *ARGS)
    r, calls = deploy("exists", *ARGS)
    assert first.returncode == 0 and r.returncode == 0, r.stderr
    assert creations(calls) == []
    # what exists is brought up to date instead: each project's custom role (a changed permission list is
    # applied) and both scheduler jobs
    role_updates = [c for c in calls if c[3:6] == ["iam", "roles", "update"]]
    assert sorted(c[1] for c in role_updates) == ["--project=hc-proj-2", "--project=my-proj-1"]
    assert all(any(a.startswith("--permissions=healthcare.dicomStores.export,") for a in c) for c in role_updates)
    assert sorted(c[7] for c in calls if c[3:6] == ["scheduler", "jobs", "update"]) == \
        ["dicom-export-poll", "dicom-export-reconcile"]
    # everything else the second run changes, the first run changed too (bindings, deploys, updates)
    norm = {tuple(a for a in c if "/tmp" not in a) for c in changes(first_calls)}
    assert {tuple(a for a in c if "/tmp" not in a) for c in changes(calls)
            if c[3:6] not in (["iam", "roles", "update"], ["scheduler", "jobs", "update"])} <= norm


def test_every_lookup_is_one_well_formed_command():
    """The defects of eval'd checks: '--database=(default)' and a --filter with spaces stay single arguments."""
    _, calls = deploy("exists", *ARGS)
    lookups = [c for c in calls if {"describe", "list"} & set(c)]
    assert all(a for c in lookups for a in c), "an empty argument"
    db = [c for c in lookups if "databases" in c]
    assert len(db) == 1 and db[0][3:7] == ["firestore", "databases", "describe", "--database=(default)"], db
    filters = [a for c in lookups if "indexes" in c for a in c if a.startswith("--filter=")]
    assert len(filters) == 3 and all("/collectionGroups/dicomExports" in f and " AND " in f for f in filters)


def test_a_deleted_custom_role_is_undeleted_then_updated():
    r, calls = deploy("exists", *ARGS, STAND_IN_ROLE_DELETED="1")
    assert r.returncode == 0, r.stderr
    role = [c[4:6] for c in changes(calls) if "roles" in c and c[1] == "--project=my-proj-1"]
    assert role == [["roles", "undelete"], ["roles", "update"]]


@pytest.mark.parametrize("mode", ["absent", "exists"])
def test_no_eventarc_trigger_stops_with_a_reason_instead_of_updating_subscription_blank(mode):
    r, calls = deploy(mode, *ARGS, STAND_IN_NO_TRIGGER="1")
    assert r.returncode == 1
    assert "function export_request has no Eventarc trigger" in r.stderr
    assert not [c for c in calls if "subscriptions" in c and "update" in c]
    assert not [c for c in calls if "" in c]


def test_cross_project_healthcare_dataset_gets_its_own_projects_role_and_agent():
    r, calls = deploy("exists", "--project", "my-proj-1", "--allowed-datasets", "bq-proj.imaging",
                      "--healthcare-datasets", "projects/hc-proj-2/locations/us/datasets/a")
    assert r.returncode == 0, r.stderr
    hc = [c for c in calls if c[3:6] == ["healthcare", "datasets", "add-iam-policy-binding"]]
    assert len(hc) == 1 and hc[0][1] == "--project=hc-proj-2"
    assert "--role=projects/hc-proj-2/roles/dicomExportRunner" in hc[0]
    # no binding of the custom role on --project, since no dataset of it was named
    assert not [c for c in calls if any(a.startswith("--role=projects/my-proj-1/roles/") for a in c)]
    # the agent is hc-proj-2's (its number, as `gcloud projects describe hc-proj-2` answered), not my-proj-1's
    agent = f"serviceAccount:service-{number('hc-proj-2')}@gcp-sa-healthcare.iam.gserviceaccount.com"
    grants = [c for c in calls if f"--member={agent}" in c]
    assert [c for c in grants if c[0] == "bq" and c[-1] == "bq-proj:imaging"
            and "--role=roles/bigquery.dataEditor" in c and "--dataset" in c]
    assert [c for c in grants if c[3:5] == ["projects", "add-iam-policy-binding"] and c[5] == "bq-proj"
            and "--role=roles/bigquery.jobUser" in c]
    assert not [c for c in calls if any(f"service-{number('my-proj-1')}@gcp-sa-healthcare" in a for a in c)]
    # the Pub/Sub agent is --project's: the subscriptions are there
    assert [c for c in calls if any(f"service-{number('my-proj-1')}@gcp-sa-pubsub" in a for a in c)]


def number(project: str) -> int:
    """The project number the stand-in answers for PROJECT."""
    h = 0
    for ch in project:
        h = (h * 31 + ord(ch)) % 1000000007
    return h


def _same_form(argv) -> tuple[str, ...]:
    """An argv with what only a real project can answer (numbers, trigger and subscription names, temp files)
    reduced to one placeholder each, so a dry run's line and a real run's call compare equal."""
    out = []
    for a in argv:
        a = re.sub(r"service-(NUMBER-OF-[a-z0-9-]+|\d+)@", "service-N@", a)
        a = re.sub(r"projects/[^/]+/subscriptions/(EVENTARC-SUBSCRIPTION-OF-|eventarc-sub-of-trigger-)", "SUB-", a)
        a = re.sub(r"^(TRIGGER-OF-|trigger-)", "TRIGGER-", a)
        a = re.sub(r"=/\S*/tmp\.\w+$", "=FILE", a)
        out.append(a)
    return tuple(out)


@pytest.mark.parametrize("mode, shown", [("absent", {None, "absent"}), ("exists", {None, "present"})])
def test_a_real_run_issues_exactly_what_the_dry_run_printed(mode, shown):
    """--dry-run is what the parse check and the reader rely on: a real run (lookups answered "absent" or
    "exists") issues the same calls, lookups included, in the same order."""
    plan = dry_run(*ARGS)
    expected = [_same_form(s.argv) for s in plan.steps if s.cond in shown]
    assert len(expected) > 50
    r, calls = deploy(mode, *ARGS)
    assert r.returncode == 0, r.stderr
    assert [_same_form(c) for c in calls] == expected
