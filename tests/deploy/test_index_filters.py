"""The "is the index there already?" lookups select exactly the index deploy.sh would create.

gcloud applies --filter on the client, after the API call, so the parse check can't judge it: here each
filter deploy.sh prints is compiled and evaluated by the installed Cloud SDK's own filter engine
(googlecloudsdk.core.resource.resource_filter, run by the SDK's bundled Python) against index resources
shaped as the Firestore Admin API returns them. The old filters did not name the collection group, so an
index of any other collection with the same field passed for the ledger's.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.plan import dry_run

EVALUATE = r'''
import json, sys
from googlecloudsdk.core.resource import resource_filter
job = json.load(sys.stdin)
print(json.dumps([[resource_filter.Compile(f).Evaluate(r) for r in job["resources"]] for f in job["filters"]]))
'''


def index(group: str, fields: list[str], scope: str = "COLLECTION") -> dict:
    return {"name": f"projects/my-proj-1/databases/(default)/collectionGroups/{group}/indexes/CICAgOjXh4EK",
            "queryScope": scope, "state": "READY", "density": "SPARSE_ALL",
            "fields": [{"fieldPath": f, "order": "ASCENDING"} for f in fields] + [
                {"fieldPath": "__name__", "order": "ASCENDING"}]}


def evaluate(filters: list[str], resources: list[dict]) -> list[list[bool]]:
    gcloud = shutil.which("gcloud")
    if not gcloud:
        pytest.fail("gcloud (Cloud SDK) must be installed: this test runs its filter engine")
    sdk = Path(gcloud).resolve().parents[1]
    python = sdk / "platform" / "bundledpythonunix" / "bin" / "python3"
    r = subprocess.run([str(python) if python.exists() else "python3", "-c", EVALUATE],
                       input=json.dumps({"filters": filters, "resources": resources}), capture_output=True,
                       text=True, timeout=60, env={"PYTHONPATH": f"{sdk / 'lib'}:{sdk / 'lib' / 'third_party'}"})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("ledger", ["dicomExports", "exports.v2"])
def test_each_index_lookup_matches_only_its_own_index(ledger):
    plan = dry_run("--project", "my-proj-1", "--ingest-topic", "dicom-stored", "--ledger-collection", ledger)
    lookups = [s.argv for s in plan.steps if s.kind == "?" and "indexes" in s.argv]
    creates = [s.argv for s in plan.steps if s.cond == "absent" and "indexes" in s.argv]
    assert len(lookups) == len(creates) == 3
    filters = [next(a[len("--filter="):] for a in argv if a.startswith("--filter=")) for argv in lookups]
    wanted = []
    for argv in creates:
        group = next(a.split("=", 1)[1] for a in argv if a.startswith("--collection-group="))
        fields = [a.split("field-path=")[1].split(",")[0] for a in argv if a.startswith("--field-config=")]
        wanted.append((group, fields))
    resources = [index(g, f) for g, f in wanted]                         # the three deploy.sh creates
    resources += [index(g, f, "COLLECTION_GROUP") for g, f in wanted]    # same fields, another scope
    resources += [index("other", f) for _, f in wanted]                  # same fields, another collection
    resources += [index(g, f[:-1]) for g, f in wanted]                   # a field short
    if "." in ledger:
        resources.append(index(ledger.replace(".", "X"), wanted[0][1]))  # '.' is not a regex wildcard
    results = evaluate(filters, resources)
    for i, row in enumerate(results):
        assert [j for j, hit in enumerate(row) if hit] == [i], (filters[i], row)
