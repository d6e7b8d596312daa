"""Who may write where: the emulator's IAM rules for the export. Pure (no I/O, no server imports).

The preflight command (stack/preflight.py) evaluates the same rules on what it reads from the APIs,
so what the emulator enforces and what preflight reports cannot drift apart.

An export from a DICOM store runs as the Cloud Healthcare Service Agent of the *store's* project,
`service-PROJECT_NUMBER@gcp-sa-healthcare.iam.gserviceaccount.com`. Into BigQuery it needs:

- on the destination dataset: `bigquery.tables.create` (a new table) or `bigquery.tables.updateData`
  (an existing one). Granted by a dataset access entry for the agent with role WRITER or OWNER (or the
  IAM role names roles/bigquery.dataEditor, dataOwner, admin), or by one of WRITE_ROLES bound to the
  agent on the dataset's project;
- on the destination project: `bigquery.jobs.create`, granted by one of JOB_ROLES bound to the agent there.

Only direct grants count: groups, domains, folders, organisations and custom roles are not modelled,
and a binding with a `condition` is not evaluated, so it does not grant.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

WRITE_ROLES = frozenset({"roles/bigquery.dataEditor", "roles/bigquery.dataOwner", "roles/bigquery.admin",
                         "roles/owner", "roles/editor"})
JOB_ROLES = frozenset({"roles/bigquery.jobUser", "roles/bigquery.user", "roles/bigquery.admin",
                       "roles/owner", "roles/editor"})
# Dataset access entry roles that let the member write tables (legacy names and their IAM equivalents).
ACCESS_WRITE_ROLES = frozenset({"WRITER", "OWNER", "roles/bigquery.dataEditor", "roles/bigquery.dataOwner",
                                "roles/bigquery.admin"})
ACCESS_ROLES = frozenset({"READER", "WRITER", "OWNER"})
# The entity keys of a dataset access entry (BigQuery's Dataset.access[]); exactly one per entry.
ACCESS_ENTITIES = ("userByEmail", "groupByEmail", "domain", "specialGroup", "iamMember", "view", "routine",
                   "dataset")
SPECIAL_GROUPS = frozenset({"projectOwners", "projectReaders", "projectWriters", "allAuthenticatedUsers"})
MEMBER_RE = re.compile(r"^(?:allUsers|allAuthenticatedUsers|(?:user|serviceAccount|group|domain|deleted:user|"
                       r"deleted:serviceAccount|deleted:group|principal|principalSet):\S+|"
                       r"projectOwner:\S+|projectEditor:\S+|projectViewer:\S+)$")
ROLE_RE = re.compile(r"^(?:roles/[A-Za-z0-9_.]+|(?:projects|organizations)/[^/]+/roles/[A-Za-z0-9_.]+)$")
JOBS_CREATE = "bigquery.jobs.create"
TABLES_CREATE = "bigquery.tables.create"
TABLES_UPDATE_DATA = "bigquery.tables.updateData"


class PolicyError(ValueError):
    """A malformed policy or access entry; `field` names where (for a 400 naming the field)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def project_number(project_id: str) -> str:
    """A deterministic 12-digit project number for an emulated project (same id, same number)."""
    digest = int(hashlib.sha256(project_id.encode("utf-8")).hexdigest()[:15], 16)
    return str(100_000_000_000 + digest % 900_000_000_000)


def service_agent(number: str) -> str:
    return f"service-{number}@gcp-sa-healthcare.iam.gserviceaccount.com"


# -- validation -------------------------------------------------------------------------------------
def check_policy(policy: object, field: str = "policy") -> dict:
    """A v1 Policy {version, etag, bindings: [{role, members, condition?}]}, validated and normalised."""
    if not isinstance(policy, dict):
        raise PolicyError(field, f"{field} must be an object")
    unknown = sorted(set(policy) - {"version", "etag", "bindings", "auditConfigs"})
    if unknown:
        raise PolicyError(f"{field}.{unknown[0]}", f'Invalid JSON payload received. Unknown name "{unknown[0]}" '
                                                   f"at '{field}': Cannot find field.")
    version = policy.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version not in (0, 1, 3):
        raise PolicyError(f"{field}.version", f"{field}.version must be 1 or 3 (got {version!r})")
    bindings = policy.get("bindings", [])
    if not isinstance(bindings, list):
        raise PolicyError(f"{field}.bindings", f"{field}.bindings must be a list")
    out = []
    for i, b in enumerate(bindings):
        out.append(_check_binding(b, f"{field}.bindings[{i}]"))
    if any("condition" in b for b in out) and version != 3:
        raise PolicyError(f"{field}.version", "a policy with conditional bindings must have version 3")
    etag = policy.get("etag")
    if etag is not None and not isinstance(etag, str):
        raise PolicyError(f"{field}.etag", f"{field}.etag must be a string")
    return {"version": version or 1, "bindings": out, **({"etag": etag} if etag else {})}


def _check_binding(b: object, field: str) -> dict:
    if not isinstance(b, dict):
        raise PolicyError(field, f"{field} must be an object")
    unknown = sorted(set(b) - {"role", "members", "condition"})
    if unknown:
        raise PolicyError(f"{field}.{unknown[0]}", f'Invalid JSON payload received. Unknown name "{unknown[0]}" '
                                                   f"at '{field}': Cannot find field.")
    role = b.get("role")
    if not isinstance(role, str) or not ROLE_RE.match(role):
        raise PolicyError(f"{field}.role", f"{field}.role {role!r} is not a role name (roles/NAME)")
    members = b.get("members")
    if not isinstance(members, list) or not members:
        raise PolicyError(f"{field}.members", f"{field}.members must be a non-empty list")
    for j, m in enumerate(members):
        if not isinstance(m, str) or not MEMBER_RE.match(m):
            raise PolicyError(f"{field}.members[{j}]", f"{field}.members[{j}] {m!r} is not a principal "
                                                       "(user:EMAIL, serviceAccount:EMAIL, group:EMAIL, ...)")
    out: dict = {"role": role, "members": list(dict.fromkeys(members))}
    if "condition" in b:
        cond = b["condition"]
        if not isinstance(cond, dict) or not isinstance(cond.get("expression"), str):
            raise PolicyError(f"{field}.condition", f"{field}.condition must be an object with an expression")
        out["condition"] = cond
    return out


def check_access(entries: object, field: str = "access") -> list[dict]:
    """BigQuery Dataset.access: each entry one entity and (except view/routine/dataset) a role."""
    if not isinstance(entries, list):
        raise PolicyError(field, f"{field} must be a list")
    out = []
    for i, e in enumerate(entries):
        f = f"{field}[{i}]"
        if not isinstance(e, dict):
            raise PolicyError(f, f"{f} must be an object")
        unknown = sorted(set(e) - {"role", *ACCESS_ENTITIES, "condition"})
        if unknown:
            raise PolicyError(f"{f}.{unknown[0]}", f"{f}: unknown field {unknown[0]!r}")
        entities = [k for k in ACCESS_ENTITIES if k in e]
        if len(entities) != 1:
            raise PolicyError(f, f"{f} must name exactly one of {', '.join(ACCESS_ENTITIES)} "
                                 f"(got {', '.join(entities) or 'none'})")
        kind = entities[0]
        value = e[kind]
        if kind in ("view", "routine", "dataset"):
            if not isinstance(value, dict):
                raise PolicyError(f"{f}.{kind}", f"{f}.{kind} must be an object")
        elif not isinstance(value, str) or not value:
            raise PolicyError(f"{f}.{kind}", f"{f}.{kind} must be a non-empty string")
        elif kind == "specialGroup" and value not in SPECIAL_GROUPS:
            raise PolicyError(f"{f}.specialGroup", f"{f}.specialGroup {value!r} is not one of "
                                                   f"{', '.join(sorted(SPECIAL_GROUPS))}")
        elif kind in ("userByEmail", "groupByEmail") and "@" not in value:
            raise PolicyError(f"{f}.{kind}", f"{f}.{kind} {value!r} is not an email address")
        elif kind == "iamMember" and not MEMBER_RE.match(value):
            raise PolicyError(f"{f}.iamMember", f"{f}.iamMember {value!r} is not a principal")
        role = e.get("role")
        if kind in ("view", "routine", "dataset"):
            if role is not None:
                raise PolicyError(f"{f}.role", f"{f}.role must not be set for a {kind} entry")
        elif not isinstance(role, str) or not (role in ACCESS_ROLES or ROLE_RE.match(role)):
            raise PolicyError(f"{f}.role", f"{f}.role {role!r} must be READER, WRITER, OWNER or an IAM role name")
        out.append({k: v for k, v in e.items() if v is not None})
    return out


def default_access() -> list[dict]:
    """What BigQuery gives a dataset created without `access` (less the creator, whom the emulator lacks)."""
    return [{"role": "WRITER", "specialGroup": "projectWriters"},
            {"role": "OWNER", "specialGroup": "projectOwners"},
            {"role": "READER", "specialGroup": "projectReaders"}]


def dataset_access(meta: dict) -> list[dict]:
    """A stored dataset's access entries (BigQuery's defaults when it never had any)."""
    return meta["access"] if isinstance(meta.get("access"), list) else default_access()


# -- evaluation -------------------------------------------------------------------------------------
def _member_of(member_email: str) -> str:
    """The principal of a service account, lower-cased for comparison (emails are case-insensitive)."""
    return f"serviceaccount:{member_email.lower()}"


def project_roles(policy: dict | None, email: str) -> set[str]:
    """The roles bound to service account `email` in `policy` without a condition."""
    who = _member_of(email)
    roles = set()
    for b in (policy or {}).get("bindings") or []:
        if "condition" in b:
            continue
        if who in (m.lower() for m in b.get("members") or []):
            roles.add(b.get("role"))
    return roles


def _access_matches(entry: dict, email: str, roles_on_project: set[str]) -> bool:
    if str(entry.get("userByEmail", "")).lower() == email.lower():
        return True
    if str(entry.get("iamMember", "")).lower() == _member_of(email):
        return True
    group = entry.get("specialGroup")
    if group == "allAuthenticatedUsers":
        return True
    if group == "projectOwners":
        return "roles/owner" in roles_on_project
    if group == "projectWriters":
        return bool({"roles/owner", "roles/editor"} & roles_on_project)
    return False


def can_write_dataset(email: str, dataset_access: list[dict] | None, dataset_project_policy: dict | None) -> bool:
    roles = project_roles(dataset_project_policy, email)
    if roles & WRITE_ROLES:
        return True
    return any(e.get("role") in ACCESS_WRITE_ROLES and _access_matches(e, email, roles)
               for e in dataset_access or [])


def can_run_jobs(email: str, project_policy: dict | None) -> bool:
    return bool(project_roles(project_policy, email) & JOB_ROLES)


@dataclass(frozen=True)
class Denial:
    """What the agent lacks: the permission, and the resource it is checked on."""
    member: str
    permission: str
    resource: str  # "projects/P/datasets/D" or "projects/P"

    def message(self) -> str:
        kind = "dataset" if "/datasets/" in self.resource else "project"
        return (f"Permission denied: the Cloud Healthcare Service Agent {self.member} does not have "
                f"{self.permission} permission on BigQuery {kind} {self.resource}; grant it "
                + ("roles/bigquery.dataEditor on the dataset." if kind == "dataset"
                   else "roles/bigquery.jobUser on the project."))


def export_denial(store_project_number: str, dest_project: str, dest_dataset: str, *, table_exists: bool,
                  dataset_access: list[dict] | None, dest_project_policy: dict | None) -> Denial | None:
    """Why an export from a store whose project has number `store_project_number` may not write
    bq://dest_project.dest_dataset.*, or None when it may."""
    agent = service_agent(store_project_number)
    if not can_write_dataset(agent, dataset_access, dest_project_policy):
        return Denial(agent, TABLES_UPDATE_DATA if table_exists else TABLES_CREATE,
                      f"projects/{dest_project}/datasets/{dest_dataset}")
    if not can_run_jobs(agent, dest_project_policy):
        return Denial(agent, JOBS_CREATE, f"projects/{dest_project}")
    return None
