"""Datasets: create (an operation that is done at once), get, list, delete (with all they hold)."""
from __future__ import annotations

import json

from werkzeug.wrappers import Response

from . import messages
from .errors import ApiError, invalid, not_found
from .http_util import json_response, like_prefix, list_page, read_json
from .ids import ID_RE, parent_of
from .routing import Call


def require(state, name: str) -> dict:
    ds = state.get_json("datasets", name)
    if ds is None:
        raise not_found(f"dataset not found: {name}")
    return ds


def list_datasets(app, call: Call) -> Response:
    return list_page(app.state.db(), call.request, "datasets", "parent", parent_of(call.name), "datasets")


def create(app, call: Call) -> Response:
    request, version, parent = call.request, call.version, parent_of(call.name)
    dataset_id = request.args.get("datasetId", "")
    if not dataset_id:
        raise invalid("datasetId is required", "dataset_id")
    if not ID_RE.match(dataset_id) or dataset_id in (".", ".."):
        raise invalid(f"invalid dataset ID {dataset_id!r}: it must match [A-Za-z0-9_.-]{{1,256}}", "dataset_id")
    body = messages.check(read_json(request), messages.DATASET)
    name = f"{parent}/datasets/{dataset_id}"
    resource = {"name": name, "timeZone": body.get("timeZone", "UTC")}
    if "encryptionSpec" in body:
        resource["encryptionSpec"] = body["encryptionSpec"]
    with app.state.tx() as db:
        if db.execute("SELECT 1 FROM datasets WHERE name = ?", (name,)).fetchone():
            raise ApiError("ALREADY_EXISTS", f"already exists: {name}")
        db.execute("INSERT INTO datasets VALUES (?, ?, ?)", (name, parent, json.dumps(resource)))
    # datasets.create is a long-running operation that is done at once.
    op = app.operations.finished(name, version, "google.cloud.healthcare.{v}.dataset.DatasetService.CreateDataset",
                                 {"@type": f"type.googleapis.com/google.cloud.healthcare.{version}.Dataset",
                                  **resource})
    return json_response(op)


def get(app, call: Call) -> Response:
    return json_response(require(app.state, call.name))


def delete(app, call: Call) -> Response:
    name, state = call.name, app.state
    require(state, name)
    with state.write_lock:  # held until the files are gone: no STOW may reuse a blob meanwhile
        with state.tx() as db:
            shas = {r["blob"] for r in db.execute(
                "SELECT DISTINCT blob FROM instances WHERE store LIKE ? ESCAPE '\\'", (like_prefix(name + "/"),))}
            db.execute("DELETE FROM instances WHERE store LIKE ? ESCAPE '\\'", (like_prefix(name + "/"),))
            db.execute("DELETE FROM stores WHERE dataset = ?", (name,))
            db.execute("DELETE FROM operation_logs WHERE operation LIKE ? ESCAPE '\\'",
                       (like_prefix(name + "/"),))
            db.execute("DELETE FROM operations WHERE dataset = ?", (name,))
            db.execute("DELETE FROM datasets WHERE name = ?", (name,))
        state.drop_unreferenced_blobs(shas)
    return json_response({})
