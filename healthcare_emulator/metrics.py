"""DICOM store, study and series metrics (`getDICOMStoreMetrics`, `getStudyMetrics`, `getSeriesMetrics`).

Answered from the instance index alone (one aggregate SQL query; no stored file is opened), in the
real response shapes (DicomStoreMetrics, StudyMetrics, SeriesMetrics) with int64 values as JSON strings:

- `blobStorageSizeBytes`: the bytes of the stored DICOM files (what a STOW or import received).
- `structuredStorageSizeBytes`: the bytes of the searchable metadata the store keeps per instance (the
  UTF-8 DICOM JSON of the indexed attributes QIDO matches and returns). The real service does not document
  how it counts this; it is always much smaller than the blob bytes, as here.
- Fields whose value is 0 are omitted, as proto3 JSON (and so the real API) omits int64 fields at their
  default: an empty store answers `{"name": ...}` only. Read them as `int(m.get("instanceCount", 0))`.
- A study or series with no instance is 404 NOT_FOUND, like its DICOMweb resource.
"""
from __future__ import annotations

import re

from .errors import invalid, not_found

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
STUDY_METRICS = re.compile(r"^studies/([^/:]+):getStudyMetrics$")
SERIES_METRICS = re.compile(r"^studies/([^/:]+)/series/([^/:]+):getSeriesMetrics$")


def _int64(out: dict, key: str, value) -> None:
    if value:
        out[key] = str(int(value))


def _aggregate(state, where: str, params: tuple):
    return state.db().execute(
        "SELECT COUNT(DISTINCT study) AS studies, COUNT(DISTINCT series) AS series, COUNT(*) AS instances, "
        "COALESCE(SUM(size), 0) AS blob, COALESCE(SUM(LENGTH(CAST(attrs AS BLOB))), 0) AS structured "
        f"FROM instances WHERE {where}", params).fetchone()


def store_metrics(app, store: str) -> dict:
    app.require_store(store)
    r = _aggregate(app.state, "store = ?", (store,))
    out = {"name": store}
    _int64(out, "studyCount", r["studies"])
    _int64(out, "seriesCount", r["series"])
    _int64(out, "instanceCount", r["instances"])
    _int64(out, "structuredStorageSizeBytes", r["structured"])
    _int64(out, "blobStorageSizeBytes", r["blob"])
    return out


def _uid(value: str, what: str) -> str:
    if len(value) > 64 or not UID_RE.match(value):
        raise invalid(f"Invalid {what} UID {value[:80]!r}: a UID is digits and dots, at most 64 characters.",
                      what)
    return value


def study_metrics(app, store: str, study: str) -> dict:
    _uid(study, "study")
    r = _aggregate(app.state, "store = ? AND study = ?", (store, study))
    if not r["instances"]:
        raise not_found(f"Study {study} not found in {store}.")
    out = {"study": f"{store}/dicomWeb/studies/{study}"}
    _int64(out, "structuredStorageSizeBytes", r["structured"])
    _int64(out, "blobStorageSizeBytes", r["blob"])
    _int64(out, "instanceCount", r["instances"])
    _int64(out, "seriesCount", r["series"])
    return out


def series_metrics(app, store: str, study: str, series: str) -> dict:
    _uid(study, "study")
    _uid(series, "series")
    r = _aggregate(app.state, "store = ? AND study = ? AND series = ?", (store, study, series))
    if not r["instances"]:
        raise not_found(f"Series {series} of study {study} not found in {store}.")
    out = {"series": f"{store}/dicomWeb/studies/{study}/series/{series}"}
    _int64(out, "blobStorageSizeBytes", r["blob"])
    _int64(out, "instanceCount", r["instances"])
    _int64(out, "structuredStorageSizeBytes", r["structured"])
    return out


def dicomweb_metrics(app, store: str, sub: str) -> dict | None:
    """The metrics a `dicomWeb/...:getStudyMetrics|getSeriesMetrics` path asks for; None if it asks for none."""
    if m := STUDY_METRICS.match(sub):
        return study_metrics(app, store, m.group(1))
    if m := SERIES_METRICS.match(sub):
        return series_metrics(app, store, *m.groups())
    return None


# -- routes (server.ROUTES): handler(app, call) ---------------------------------------------------------
def _store_of(call) -> str:
    p, loc, d, s = call.ids[:4]
    return f"projects/{p}/locations/{loc}/datasets/{d}/dicomStores/{s}"


def store_route(app, call):
    from .http_util import json_response
    return json_response(store_metrics(app, _store_of(call)))


def study_route(app, call):
    from .http_util import json_response
    store = _store_of(call)
    app.require_store(store)
    return json_response(study_metrics(app, store, call.ids[4]))


def series_route(app, call):
    from .http_util import json_response
    store = _store_of(call)
    app.require_store(store)
    return json_response(series_metrics(app, store, call.ids[4], call.ids[5]))
