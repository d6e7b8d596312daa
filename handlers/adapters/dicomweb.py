"""DICOMweb searches (QIDO-RS) of a DICOM store, over REST through the one transport and its retry policy:
the studies of a store with their instance counts, and the instances of a study. Reconcile reads the store
through these (roles/healthcare.dicomViewer on the store)."""
from __future__ import annotations

import time
from typing import Any

from . import transport

STUDY, SERIES, SOP = "0020000D", "0020000E", "00080018"
N_STUDY_INSTANCES, N_SERIES_INSTANCES = "00201208", "00201209"
MAX_INSTANCES_PAGE = 5000


class DicomWeb:
    def __init__(self, endpoint: str, version: str = "v1", *, tokens: transport.Tokens | None = None,
                 timeout_s: float = 30.0, budget_s: float = 60.0):
        self.root = f"{endpoint.rstrip('/')}/{version}"
        self.tokens = tokens or transport.Tokens()
        self.timeout_s, self.budget_s = timeout_s, budget_s
        self.calls = 0

    def studies(self, store: str, *, offset: int, limit: int, uids: list[str] | None = None) -> list[tuple[str, int]]:
        """One page of the store's studies: (StudyInstanceUID, NumberOfStudyRelatedInstances), in the store's
        order; `uids`: only those studies (UID list matching)."""
        params: dict[str, Any] = {"includefield": "NumberOfStudyRelatedInstances", "limit": limit, "offset": offset}
        if uids:
            params["StudyInstanceUID"] = ",".join(uids)
        found = self._search(f"{store}/dicomWeb/studies", params)
        return [(_value(d, STUDY), int(_value(d, N_STUDY_INSTANCES) or 0)) for d in found]

    def series(self, store: str, study: str) -> list[tuple[str, int]]:
        """Every series of a study: (SeriesInstanceUID, NumberOfSeriesRelatedInstances)."""
        found = self._search(f"{store}/dicomWeb/studies/{study}/series",
                             {"includefield": "NumberOfSeriesRelatedInstances"})
        return [(_value(d, SERIES), int(_value(d, N_SERIES_INSTANCES) or 0)) for d in found]

    def instances(self, store: str, study: str, series: str | None = None) -> list[tuple[str, str]]:
        """Every instance of a study (or of one of its series): (SeriesInstanceUID, SOPInstanceUID)."""
        scope = f"{store}/dicomWeb/studies/{study}" + (f"/series/{series}" if series else "")
        out: list[tuple[str, str]] = []
        while True:
            page = self._search(f"{scope}/instances",
                                {"includefield": "SeriesInstanceUID", "limit": MAX_INSTANCES_PAGE,
                                 "offset": len(out)})
            out.extend((_value(d, SERIES), _value(d, SOP)) for d in page)
            if len(page) < MAX_INSTANCES_PAGE:
                return out

    def _search(self, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        self.calls += 1
        r = transport.call("GET", f"{self.root}/{path}", tokens=self.tokens, what="QIDO-RS search",
                           deadline=time.monotonic() + self.budget_s, timeout_s=self.timeout_s, params=params,
                           headers={"Accept": "application/dicom+json"})
        if r.status_code == 204 or not r.content:
            return []
        body = r.json()
        return body if isinstance(body, list) else []


def _value(d: dict[str, Any], tag: str) -> str:
    v = (d.get(tag) or {}).get("Value") or [""]
    return str(v[0])
