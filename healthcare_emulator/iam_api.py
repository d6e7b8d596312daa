"""IAM in the emulator: a minimal Cloud Resource Manager v1, BigQuery dataset access entries, and the
export's permission check (`--enforce-iam`). The rules themselves are in iam.py (pure).

- `GET /v1/projects/{projectId}`: every emulated project exists, ACTIVE, with the deterministic
  `projectNumber` of iam.project_number.
- `POST /v1/projects/{projectId}:getIamPolicy` / `:setIamPolicy`: the v1 shapes (`options.requestedPolicyVersion`;
  `policy` + `updateMask`; a Policy {version, etag, bindings}). A project's policy starts empty (etag "ACAB", as
  Google's empty policy). setIamPolicy with a stale etag is 409 ABORTED, as Resource Manager answers.
  Policies are kept in the emulator's state.sqlite (table iam_policies).
- The export's check (`--enforce-iam`), with the dataset's access entries (served and changed by
  bigquery_api.py: `access` on insert/get, datasets.patch/update) and the destination project's policy.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading

from werkzeug.wrappers import Request, Response

from . import iam
from .errors import ApiError, invalid

PROJECT_RE = re.compile(r"^(?:[a-z][a-z0-9.\-]*[a-z0-9]:)?[a-z][a-z0-9\-]{4,28}[a-z0-9]$")
PATH_RE = re.compile(r"^/v1/projects/([^/:]+)(:getIamPolicy|:setIamPolicy)?/?$")
EMPTY_ETAG = "ACAB"
SCHEMA = """CREATE TABLE IF NOT EXISTS iam_policies (
    project TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL          -- the Policy as served, etag included
)"""
_schema_lock = threading.Lock()
_schema_done: set[str] = set()


def is_resource_manager_path(path: str) -> bool:
    return bool(PATH_RE.match(path))


# -- storage ------------------------------------------------------------------------------------------
def _db(app):
    db = app.state.db()
    key = str(app.state.db_path)
    with _schema_lock:
        if key not in _schema_done:
            with app.state.write_lock:
                db.execute(SCHEMA)
            _schema_done.add(key)
    return db


def get_policy(app, project: str) -> dict:
    row = _db(app).execute("SELECT body FROM iam_policies WHERE project = ?", (project,)).fetchone()
    return json.loads(row["body"]) if row else {"version": 1, "etag": EMPTY_ETAG, "bindings": []}


def _etag(project: str, seq: int, body: dict) -> str:
    raw = hashlib.sha256(f"{project}\0{seq}\0{json.dumps(body, sort_keys=True)}".encode()).digest()[:8]
    return base64.b64encode(b"\x07" + raw[1:]).decode()  # Google's policy etags start with "Bw"


def set_policy(app, project: str, policy: dict) -> dict:
    _db(app)
    with app.state.tx() as db:
        row = db.execute("SELECT seq, body FROM iam_policies WHERE project = ?", (project,)).fetchone()
        current = json.loads(row["body"]) if row else {"etag": EMPTY_ETAG}
        if policy.get("etag") and policy["etag"] != current["etag"]:
            raise ApiError("ABORTED", "There were concurrent policy changes. Please retry the whole "
                                      "read-modify-write with exponential backoff.")
        seq = (row["seq"] if row else 0) + 1
        body = {"version": policy["version"], "bindings": policy["bindings"]}
        body["etag"] = _etag(project, seq, body)
        db.execute("INSERT INTO iam_policies VALUES (?, ?, ?) ON CONFLICT(project) DO UPDATE SET seq = ?, body = ?",
                   (project, seq, json.dumps(body), seq, json.dumps(body)))
    return body


def _served(policy: dict) -> dict:
    """Policy JSON as Resource Manager serves it: empty bindings omitted (proto3 JSON)."""
    out: dict = {"version": policy.get("version", 1), "etag": policy["etag"]}
    if policy.get("bindings"):
        out["bindings"] = policy["bindings"]
    return out


# -- Resource Manager HTTP -------------------------------------------------------------------------------
def handle(app, request: Request) -> Response:
    from .http_util import json_response, read_json

    project, verb = PATH_RE.match(request.path).groups()
    if not PROJECT_RE.match(project):
        raise invalid(f"Invalid project ID {project!r}.", "project_id")
    if verb is None:
        if request.method != "GET":
            raise ApiError("NOT_FOUND", f"Method {request.method} is not supported on {request.path}.", http=405)
        return json_response({"projectNumber": iam.project_number(project), "projectId": project,
                              "lifecycleState": "ACTIVE", "name": project,
                              "createTime": "2020-01-01T00:00:00.000Z", "parent": {"type": "organization",
                                                                                   "id": "0"}})
    if request.method != "POST":
        raise ApiError("NOT_FOUND", f"Method {request.method} is not supported on {request.path}.", http=405)
    body = read_json(request)
    if not isinstance(body, dict):
        raise invalid("Invalid JSON payload received. Expected an object.")
    if verb == ":getIamPolicy":
        _requested_version(body)
        return json_response(_served(get_policy(app, project)))
    return json_response(_served(_set_iam_policy(app, project, body)))


def _requested_version(body: dict) -> int:
    unknown = sorted(set(body) - {"options"})
    if unknown:
        raise invalid(f'Invalid JSON payload received. Unknown name "{unknown[0]}": Cannot find field.', unknown[0])
    options = body.get("options") or {}
    if not isinstance(options, dict) or set(options) - {"requestedPolicyVersion"}:
        raise invalid("options may only hold requestedPolicyVersion", "options")
    version = options.get("requestedPolicyVersion", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version not in (0, 1, 3):
        raise invalid(f"options.requestedPolicyVersion must be 0, 1 or 3 (got {version!r})",
                      "options.requested_policy_version")
    return version


def _set_iam_policy(app, project: str, body: dict) -> dict:
    unknown = sorted(set(body) - {"policy", "updateMask"})
    if unknown:
        raise invalid(f'Invalid JSON payload received. Unknown name "{unknown[0]}": Cannot find field.', unknown[0])
    if "policy" not in body:
        raise invalid("policy is required", "policy")
    try:
        policy = iam.check_policy(body["policy"])
    except iam.PolicyError as e:
        raise invalid(e.message, e.field) from None
    mask = body.get("updateMask")
    if mask is not None:
        fields = {f.strip() for f in str(mask).split(",") if f.strip()}
        if fields - {"bindings", "etag", "auditConfigs", "version"}:
            raise invalid(f"updateMask {mask!r} names fields a policy does not have", "update_mask")
    return set_policy(app, project, policy)


# -- the export's check ---------------------------------------------------------------------------------
def check_export(app, operation: str, store: str, project: str, dataset: str, table_exists: bool) -> None:
    """With --enforce-iam: raise PERMISSION_DENIED (and log it on the operation) when the store project's
    Cloud Healthcare Service Agent may not write bq://project.dataset or run jobs in `project`."""
    if not app.options.enforce_iam:
        return
    meta = app.operations.warehouse.get_dataset(project, dataset)
    store_project = store.split("/")[1]
    denial = iam.export_denial(iam.project_number(store_project), project, dataset, table_exists=table_exists,
                               dataset_access=iam.dataset_access(meta), dest_project_policy=get_policy(app, project))
    if denial is None:
        return
    message = denial.message()
    app.operations.log(operation, "ERROR", store, 7, message)
    raise ApiError("PERMISSION_DENIED", message)
