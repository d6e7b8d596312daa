"""DICOM stores: create, get, list, patch, delete; and the two routes below a store (:export, dicomWeb)."""
from __future__ import annotations

import json
import logging
import re

from werkzeug.wrappers import Response

from . import datasets, messages
from .errors import ApiError, invalid, not_found
from .http_util import json_response, list_page, read_json
from .ids import ID_RE, LABEL_KEY_RE, LABEL_VALUE_RE, parent_of
from .routing import Call
from .streaming import check_configs as check_stream_configs

log = logging.getLogger("healthcare_emulator")

PATCHABLE = {"labels", "notificationConfig", "notificationConfigs", "streamConfigs"}


def require(state, name: str) -> dict:
    store = state.get_json("stores", name)
    if store is None:
        raise not_found(f"DICOM store not found: {name}")
    return store


def _check_labels(labels: dict) -> None:
    if len(labels) > 64:
        raise invalid("A DICOM store can have at most 64 labels.", "labels")
    for k, v in labels.items():
        if not LABEL_KEY_RE.match(k) or not k[0].islower():
            raise invalid(f"Invalid label key {k!r}: keys are 1-63 characters, start with a lowercase letter, "
                          "and contain only lowercase letters, digits, '_' and '-'.", "labels")
        if not LABEL_VALUE_RE.match(v):
            raise invalid(f"Invalid label value for {k!r}: values are 0-63 characters of lowercase letters, "
                          "digits, '_' and '-'.", "labels")


def check_body(app, body: dict) -> None:
    """What messages.check cannot see: labels, topic names, stream destinations."""
    _check_labels(body.get("labels", {}))
    topics = [body.get("notificationConfig", {}).get("pubsubTopic")] + \
             [c.get("pubsubTopic") for c in body.get("notificationConfigs", [])]
    for t in topics:
        if t and not re.match(r"^projects/[^/]+/topics/[^/]+$", t):
            raise invalid(f"Invalid Pub/Sub topic {t!r}: it must be projects/PROJECT/topics/TOPIC.",
                          "notification_config.pubsub_topic")
    if any(topics) and app.notifier is None:
        log.warning("notifications to %s will not be sent: set PUBSUB_EMULATOR_HOST to publish them "
                    "through Google's Pub/Sub emulator", ", ".join(t for t in topics if t))
    check_stream_configs(body.get("streamConfigs", []))


def list_stores(app, call: Call) -> Response:
    dataset = parent_of(call.name)
    datasets.require(app.state, dataset)
    return list_page(app.state.db(), call.request, "stores", "dataset", dataset, "dicomStores")


def create(app, call: Call) -> Response:
    request, dataset = call.request, parent_of(call.name)
    datasets.require(app.state, dataset)
    store_id = request.args.get("dicomStoreId", "")
    if not store_id:
        raise invalid("dicomStoreId is required", "dicom_store_id")
    if not ID_RE.match(store_id) or store_id in (".", ".."):
        raise invalid(f"invalid DICOM store ID {store_id!r}: it must match [A-Za-z0-9_.-]{{1,256}}",
                      "dicom_store_id")
    body = messages.check(read_json(request), messages.DICOM_STORE)
    check_body(app, body)
    name = f"{dataset}/dicomStores/{store_id}"
    resource = {"name": name, **{k: v for k, v in body.items() if k != "name"}}
    with app.state.tx() as db:
        if db.execute("SELECT 1 FROM stores WHERE name = ?", (name,)).fetchone():
            raise ApiError("ALREADY_EXISTS", f"already exists: {name}")
        db.execute("INSERT INTO stores VALUES (?, ?, ?)", (name, dataset, json.dumps(resource)))
    return json_response(resource)


def get(app, call: Call) -> Response:
    return json_response(require(app.state, call.name))


def _mask_fields(mask: list[str]) -> list[str]:
    fields = []
    for f in mask:
        camel = re.sub(r"_([a-z])", lambda x: x.group(1).upper(), f.strip())
        if camel not in PATCHABLE:
            raise invalid(f"Invalid update_mask path {f!r}.", "update_mask")
        fields.append(camel)
    return fields


def patch(app, call: Call) -> Response:
    request, name = call.request, call.name
    mask = [f for f in request.args.get("updateMask", "").split(",") if f]
    if not mask:
        raise invalid("updateMask is required", "update_mask")
    body = messages.check(read_json(request), messages.DICOM_STORE)
    fields = _mask_fields(mask)
    check_body(app, body)
    with app.state.tx() as db:
        row = db.execute("SELECT body FROM stores WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise not_found(f"DICOM store not found: {name}")
        resource = json.loads(row["body"])
        for f in fields:
            if f in body:
                resource[f] = body[f]
            else:
                resource.pop(f, None)
        db.execute("UPDATE stores SET body = ? WHERE name = ?", (json.dumps(resource), name))
    return json_response(resource)


def delete(app, call: Call) -> Response:
    name, state = call.name, app.state
    with state.write_lock:  # held until the files are gone: no STOW may reuse a blob meanwhile
        with state.tx() as db:
            if not db.execute("SELECT 1 FROM stores WHERE name = ?", (name,)).fetchone():
                raise not_found(f"DICOM store not found: {name}")
            shas = {r["blob"] for r in db.execute("SELECT DISTINCT blob FROM instances WHERE store = ?", (name,))}
            db.execute("DELETE FROM instances WHERE store = ?", (name,))
            db.execute("DELETE FROM stores WHERE name = ?", (name,))
        state.drop_unreferenced_blobs(shas)
    return json_response({})


def export(app, call: Call) -> Response:
    return app.operations.start_export(call.request, call.version, call.name, read_json(call.request))


def dicomweb(app, call: Call) -> Response:
    """Everything under .../dicomStores/S/dicomWeb: dicomweb.py answers 404/405 itself."""
    from . import dicomweb as web  # pydicom and the DICOMweb surface load on the first DICOMweb call

    store = parent_of(call.name)
    require(app.state, store)
    return web.handle(app, store, call.request.method, call.tail, call.request)
