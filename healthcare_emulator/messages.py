"""Request bodies checked the way Google's proto3 JSON parser checks them.

Unknown fields are a 400 that names the field and where it sits, as the real API answers:
    Invalid JSON payload received. Unknown name "output_config" at 'bigquery_destination': Cannot find field.
Both JSON (camelCase) and proto (snake_case) field names are accepted, as proto3 JSON parsing does;
the checked message comes back with camelCase names.
"""
from __future__ import annotations

import json
import re

from .errors import ApiError

WRITE_DISPOSITIONS = ("WRITE_DISPOSITION_UNSPECIFIED", "WRITE_EMPTY", "WRITE_TRUNCATE", "WRITE_APPEND")

# A message is a dict of camelCase field -> kind. Kinds: "string", "bool", ("enum", name, values),
# ("map", "string"), [message] for repeated messages, or a nested message dict. "empty" is an empty message.
EMPTY: dict = {}
BQ_DESTINATION = {
    "tableUri": "string",
    "force": "bool",
    "writeDisposition": ("enum", "WriteDisposition", WRITE_DISPOSITIONS),
    "includeSourceStore": "bool",
    "schemaFlattened": EMPTY,
    "schemaJson": EMPTY,
}
BQ_DESTINATION_BETA = {**BQ_DESTINATION, "changeDataCaptureConfig": EMPTY}
EXPORT_REQUEST = {
    "bigqueryDestination": BQ_DESTINATION,
    "gcsDestination": {"uriPrefix": "string", "mimeType": "string"},
    "filterConfig": {"resourcePathsGcsUri": "string"},
}
EXPORT_REQUEST_BETA = {**EXPORT_REQUEST, "bigqueryDestination": BQ_DESTINATION_BETA}
DATASET = {"name": "string", "timeZone": "string", "encryptionSpec": {"kmsKeyName": "string"}}
DICOM_STORE = {
    "name": "string",
    "labels": ("map", "string"),
    "notificationConfig": {"pubsubTopic": "string", "sendForBulkImport": "bool"},
    "notificationConfigs": [{"pubsubTopic": "string"}],
    "streamConfigs": [{"bigqueryDestination": BQ_DESTINATION}],
}
CANCEL = EMPTY

_CAMEL = re.compile(r"_([a-z0-9])")
_SNAKE = re.compile(r"(?<!^)(?=[A-Z])")


def snake(name: str) -> str:
    return _SNAKE.sub("_", name).lower()


def check(body: object, message: dict, path: str = "") -> dict:
    """Return `body` with camelCase keys, or raise ApiError INVALID_ARGUMENT like the real API."""
    if body is None:
        return {}
    if not isinstance(body, dict):
        where = f" at '{path}'" if path else ""
        raise ApiError("INVALID_ARGUMENT", f"Invalid JSON payload received. Expected an object{where}.")
    out = {}
    for key, value in body.items():
        camel = _CAMEL.sub(lambda m: m.group(1).upper(), key)
        if camel not in message:
            where = f" at '{path}'" if path else ""
            raise ApiError("INVALID_ARGUMENT",
                           f'Invalid JSON payload received. Unknown name "{key}"{where}: Cannot find field.',
                           details=[{"@type": "type.googleapis.com/google.rpc.BadRequest",
                                     "fieldViolations": [{"field": f"{path}.{key}" if path else key,
                                                          "description": f'Invalid JSON payload received. '
                                                                         f'Unknown name "{key}"{where}: '
                                                                         f'Cannot find field.'}]}])
        sub = f"{path}.{snake(camel)}" if path else snake(camel)
        if value is None:  # proto3 JSON: null means default
            continue
        out[camel] = _value(value, message[camel], sub)
    return out


def _value(value, kind, path):
    def bad(type_name):
        shown = json.dumps(value)[:100]
        raise ApiError("INVALID_ARGUMENT", f"Invalid value at '{path}' ({type_name}), {shown}",
                       details=[{"@type": "type.googleapis.com/google.rpc.BadRequest",
                                 "fieldViolations": [{"field": path,
                                                      "description": f"Invalid value at '{path}' ({type_name})"}]}])

    if kind == "string":
        if not isinstance(value, str):
            bad("TYPE_STRING")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            bad("TYPE_BOOL")
        return value
    if isinstance(kind, tuple) and kind[0] == "enum":
        if not isinstance(value, str) or value not in kind[2]:
            bad(f"type.googleapis.com/google.cloud.healthcare.v1.dicom.{kind[1]}")
        return value
    if isinstance(kind, tuple) and kind[0] == "map":
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            bad("map<string, string>")
        return dict(value)
    if isinstance(kind, list):
        if not isinstance(value, list):
            bad("TYPE_MESSAGE (repeated)")
        return [check(item, kind[0], f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(kind, dict):
        return check(value, kind, path)
    raise AssertionError(kind)
