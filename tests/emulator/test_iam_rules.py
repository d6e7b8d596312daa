"""The permission rules (healthcare_emulator/iam.py): which roles and access entries let the Cloud Healthcare
Service Agent write a destination dataset and run jobs. Pure: no server."""
from __future__ import annotations

import pytest

from healthcare_emulator import iam

STORE_NUMBER = iam.project_number("store-proj")
AGENT = iam.service_agent(STORE_NUMBER)


def policy(*bindings: tuple[str, str]) -> dict:
    return {"version": 1, "bindings": [{"role": r, "members": [m]} for r, m in bindings]}


def denial(dest_project="dest-proj", *, access=None, proj_policy=None, exists=False):
    return iam.export_denial(STORE_NUMBER, dest_project, "imaging", table_exists=exists,
                             dataset_access=access, dest_project_policy=proj_policy)


def test_project_numbers_are_deterministic_and_distinct():
    assert iam.project_number("store-proj") == iam.project_number("store-proj")
    assert iam.project_number("store-proj") != iam.project_number("dest-proj")
    assert len(iam.project_number("x-proj")) == 12 and iam.project_number("x-proj").isdigit()
    assert AGENT == f"service-{STORE_NUMBER}@gcp-sa-healthcare.iam.gserviceaccount.com"


def test_no_grant_at_all_denies_tables_create_on_the_dataset():
    d = denial(access=iam.default_access(), proj_policy=policy())
    assert d == iam.Denial(AGENT, "bigquery.tables.create", "projects/dest-proj/datasets/imaging")
    assert AGENT in d.message() and "bigquery.tables.create" in d.message() and "dest-proj" in d.message()


def test_an_existing_table_needs_update_data():
    assert denial(proj_policy=policy(), exists=True).permission == "bigquery.tables.updateData"


@pytest.mark.parametrize("role", sorted(iam.WRITE_ROLES & iam.JOB_ROLES))
def test_project_roles_that_grant_both(role):
    assert denial(proj_policy=policy((role, f"serviceAccount:{AGENT}"))) is None


@pytest.mark.parametrize("role", ["roles/bigquery.dataEditor", "roles/bigquery.dataOwner"])
def test_data_roles_alone_lack_jobs_create(role):
    d = denial(proj_policy=policy((role, f"serviceAccount:{AGENT}")))
    assert d == iam.Denial(AGENT, "bigquery.jobs.create", "projects/dest-proj")


@pytest.mark.parametrize("role", ["roles/bigquery.jobUser", "roles/bigquery.user"])
def test_job_roles_alone_do_not_write(role):
    assert denial(proj_policy=policy((role, f"serviceAccount:{AGENT}"))).permission == "bigquery.tables.create"


@pytest.mark.parametrize("role", ["roles/viewer", "roles/bigquery.dataViewer", "roles/bigquery.metadataViewer"])
def test_read_roles_do_not_write(role):
    assert denial(proj_policy=policy((role, f"serviceAccount:{AGENT}"),
                                     ("roles/bigquery.jobUser", f"serviceAccount:{AGENT}"))) is not None


@pytest.mark.parametrize("entry", [
    {"role": "WRITER", "userByEmail": AGENT},
    {"role": "OWNER", "userByEmail": AGENT.upper()},
    {"role": "roles/bigquery.dataEditor", "iamMember": f"serviceAccount:{AGENT}"},
    {"role": "WRITER", "specialGroup": "allAuthenticatedUsers"},
])
def test_dataset_access_entries_that_write(entry):
    job_user = policy(("roles/bigquery.jobUser", f"serviceAccount:{AGENT}"))
    assert denial(access=[entry], proj_policy=job_user) is None


@pytest.mark.parametrize("entry", [
    {"role": "READER", "userByEmail": AGENT},
    {"role": "WRITER", "userByEmail": "someone-else@example.com"},
    {"role": "WRITER", "groupByEmail": "all-agents@example.com"},  # groups are not resolved
    {"role": "WRITER", "specialGroup": "projectWriters"},          # the agent is no editor of the project
    {"role": "WRITER", "domain": "gcp-sa-healthcare.iam.gserviceaccount.com"},
])
def test_dataset_access_entries_that_do_not(entry):
    job_user = policy(("roles/bigquery.jobUser", f"serviceAccount:{AGENT}"))
    assert denial(access=[entry], proj_policy=job_user).permission == "bigquery.tables.create"


def test_special_group_project_writers_follows_the_project_editor_role():
    editor = policy(("roles/editor", f"serviceAccount:{AGENT}"))
    assert iam.can_write_dataset(AGENT, [{"role": "WRITER", "specialGroup": "projectWriters"}], editor)


def test_other_members_and_conditional_bindings_do_not_grant():
    other = iam.service_agent(iam.project_number("dest-proj"))
    assert denial(proj_policy=policy(("roles/owner", f"serviceAccount:{other}"),
                                     ("roles/owner", f"user:{AGENT}"))) is not None
    conditional = {"version": 3, "bindings": [{"role": "roles/owner", "members": [f"serviceAccount:{AGENT}"],
                                               "condition": {"expression": "request.time < timestamp('2999-01-01')"}}]}
    assert denial(proj_policy=conditional) is not None


def test_cross_project_destination_checks_the_destination_project_for_the_store_projects_agent():
    """The agent is the store project's; grants on the store's own project do not reach another project's
    dataset, and the destination project's agent does not stand in for it."""
    store_grants = {"store-proj": policy(("roles/owner", f"serviceAccount:{AGENT}"))}
    assert denial("dest-proj", proj_policy=store_grants.get("dest-proj")) is not None
    assert denial("store-proj", proj_policy=store_grants["store-proj"]) is None
    dest_agent = iam.service_agent(iam.project_number("dest-proj"))
    dest = policy(("roles/bigquery.dataEditor", f"serviceAccount:{dest_agent}"),
                  ("roles/bigquery.jobUser", f"serviceAccount:{dest_agent}"))
    assert denial("dest-proj", proj_policy=dest) is not None
    # dataset-level write in the destination + jobUser on the destination project: allowed
    granted = policy(("roles/bigquery.jobUser", f"serviceAccount:{AGENT}"))
    assert denial("dest-proj", access=[{"role": "WRITER", "userByEmail": AGENT}], proj_policy=granted) is None
    # ... but jobUser on the store's project does not count for jobs in the destination project
    d = denial("dest-proj", access=[{"role": "WRITER", "userByEmail": AGENT}], proj_policy=None)
    assert d == iam.Denial(AGENT, "bigquery.jobs.create", "projects/dest-proj")


# -- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, field", [
    ([], "policy"),
    ({"bindings": {}}, "policy.bindings"),
    ({"bindings": [{"role": "owner", "members": ["user:a@b.c"]}]}, "policy.bindings[0].role"),
    ({"bindings": [{"role": "roles/owner", "members": []}]}, "policy.bindings[0].members"),
    ({"bindings": [{"role": "roles/owner", "members": ["a@b.c"]}]}, "policy.bindings[0].members[0]"),
    ({"bindings": [{"role": "roles/owner", "members": ["user:a@b.c"], "extra": 1}]}, "policy.bindings[0].extra"),
    ({"version": 2}, "policy.version"),
    ({"version": "1"}, "policy.version"),
    ({"etag": 5}, "policy.etag"),
    ({"bindings": [{"role": "roles/owner", "members": ["user:a@b.c"], "condition": {"expression": "true"}}]},
     "policy.version"),
    ({"rules": []}, "policy.rules"),
])
def test_malformed_policies_name_the_field(bad, field):
    with pytest.raises(iam.PolicyError) as e:
        iam.check_policy(bad)
    assert e.value.field == field


def test_a_valid_policy_is_normalised():
    p = iam.check_policy({"etag": "BwX=", "bindings": [{"role": "roles/bigquery.jobUser",
                                                        "members": [f"serviceAccount:{AGENT}"] * 2}]})
    assert p == {"version": 1, "etag": "BwX=", "bindings": [{"role": "roles/bigquery.jobUser",
                                                             "members": [f"serviceAccount:{AGENT}"]}]}


@pytest.mark.parametrize("bad, field", [
    ({}, "access"),
    ([{"role": "WRITER"}], "access[0]"),
    ([{"role": "WRITER", "userByEmail": "a@b.c", "groupByEmail": "g@b.c"}], "access[0]"),
    ([{"role": "WRITER", "userByEmail": "not-an-email"}], "access[0].userByEmail"),
    ([{"role": "SUPERUSER", "userByEmail": "a@b.c"}], "access[0].role"),
    ([{"userByEmail": "a@b.c"}], "access[0].role"),
    ([{"role": "READER", "specialGroup": "everyone"}], "access[0].specialGroup"),
    ([{"role": "READER", "iamMember": "nobody"}], "access[0].iamMember"),
    ([{"role": "READER", "view": {"projectId": "p", "datasetId": "d", "tableId": "v"}}], "access[0].role"),
    ([{"role": "READER", "userByEmail": "a@b.c", "colour": "red"}], "access[0].colour"),
    ([{"role": "READER", "userByEmail": "a@b.c"}, "x"], "access[1]"),
])
def test_malformed_access_entries_name_the_field(bad, field):
    with pytest.raises(iam.PolicyError) as e:
        iam.check_access(bad)
    assert e.value.field == field
