"""What the console accepts from a form or a URL, checked before any REST call is made."""
from __future__ import annotations

import re
import unicodedata

PROJECT = r"[A-Za-z0-9][A-Za-z0-9.\-]{0,127}"
LOCATION = r"[a-z0-9][a-z0-9\-]{0,62}"
ID = r"[A-Za-z0-9_.\-]{1,256}"
PARENT_RE = re.compile(rf"^projects/({PROJECT})/locations/({LOCATION})$")
DATASET_RE = re.compile(rf"^projects/({PROJECT})/locations/({LOCATION})/datasets/({ID})$")
STORE_RE = re.compile(rf"^projects/({PROJECT})/locations/({LOCATION})/datasets/({ID})/dicomStores/({ID})$")
OPERATION_RE = re.compile(rf"^projects/({PROJECT})/locations/({LOCATION})/datasets/({ID})/operations/({ID})$")
# BigQuery: project ids (optionally domain-scoped), dataset ids.
BQ_PROJECT_RE = re.compile(r"^(?:[a-z][a-z0-9.\-]*[a-z0-9]:)?[a-z][a-z0-9\-]{4,28}[a-z0-9]$")
BQ_DATASET_RE = re.compile(r"^[A-Za-z0-9_]{1,1024}$")
GCS_URI_RE = re.compile(r"^gs://([a-z0-9][a-z0-9._\-]{1,220}[a-z0-9])/(.+)$")

WRITE_DISPOSITIONS = {  # the console's wording (Exporting DICOM metadata to BigQuery, Console steps)
    "WRITE_EMPTY": "Only export data if the destination table is empty",
    "WRITE_APPEND": "Append data to the destination table",
    "WRITE_TRUNCATE": "Erase all existing data in the destination table before writing the instances",
}


def _ok(rx: re.Pattern, value: str | None) -> bool:
    return bool(value) and bool(rx.match(value)) and "/../" not in f"/{value}/" and "/./" not in f"/{value}/"


def dataset_name(v: str | None) -> bool:
    return _ok(DATASET_RE, v)


def store_name(v: str | None) -> bool:
    return _ok(STORE_RE, v)


def parent_name(v: str | None) -> bool:
    return _ok(PARENT_RE, v)


def operation_name(v: str | None) -> bool:
    return _ok(OPERATION_RE, v)


def bq_project(v: str | None) -> bool:
    return bool(v) and bool(BQ_PROJECT_RE.match(v))


def bq_dataset(v: str | None) -> bool:
    return bool(v) and bool(BQ_DATASET_RE.match(v))


def table_name_problem(name: str) -> str | None:
    """None when `name` follows BigQuery's table naming rules, else what is wrong, in words.

    The rules: 1 to 1,024 UTF-8 bytes of Unicode letters (L), marks (M), numbers (N), connectors (Pc, such
    as _), dashes (Pd) and spaces (Zs); the emulator also refuses leading or trailing spaces. The same rules
    run in the browser as the person types (static/console.js).
    """
    if not name:
        return "Enter a table name."
    if len(name.encode("utf-8")) > 1024:
        return "A table name can be at most 1,024 UTF-8 bytes."
    for ch in name:
        cat = unicodedata.category(ch)
        if not (cat[0] in "LMN" or cat in ("Pc", "Pd", "Zs")):
            shown = ch if ch.isprintable() else f"U+{ord(ch):04X}"
            return (f"'{shown}' is not allowed: a table name can contain letters, marks, numbers, connectors "
                    "such as _, dashes and spaces.")
    if name != name.strip():
        return "A table name cannot start or end with a space."
    return None


def gcs_uri_problem(uri: str) -> str | None:
    if not GCS_URI_RE.match(uri):
        return "The filter file must be a Cloud Storage URI: gs://BUCKET/OBJECT."
    return None


def split_table_ref(ref: str | None) -> tuple[str, str, str] | None:
    """PROJECT.DATASET.TABLE (project may be domain-scoped) -> its parts, or None."""
    if not ref:
        return None
    parts = ref.rsplit(".", 2)
    if len(parts) != 3:
        return None
    p, d, t = parts
    if not bq_project(p) or not bq_dataset(d) or table_name_problem(t):
        return None
    return p, d, t
