"""getDICOMStoreMetrics / getStudyMetrics / getSeriesMetrics: what QIDO-RS counts, through REST and the
discovery client (v1 and v1beta1)."""
from __future__ import annotations

from collections import defaultdict

import pydicom
import pytest

from tests.support import dicom_files
from tests.support.hcapi import HC, unique

PROJECT = "metrics-proj"


@pytest.fixture(scope="module")
def api(hc):
    return HC(hc.url, project=PROJECT)


@pytest.fixture(scope="module")
def loaded(api, tmp_path_factory):
    """A store with two studies: study A has two series (2 + 1 instances), study B one series (1 instance)."""
    d = tmp_path_factory.mktemp("metrics-files")
    a, b = "1.2.826.0.1.3680043.8.498.81", "1.2.826.0.1.3680043.8.498.82"
    layout = [(a, f"{a}.1", "CT_small.dcm"), (a, f"{a}.1", "CT_small.dcm"), (a, f"{a}.2", "MR_small.dcm"),
              (b, f"{b}.1", "rtplan.dcm")]
    files = [dicom_files.with_uids(dicom_files.path(src), d / f"{i}.dcm", study=st, series=se)
             for i, (st, se, src) in enumerate(layout)]
    store = api.store()
    assert api.stow(store, files).status_code == 200
    return store, files


def qido(api: HC, path: str, **params) -> list:
    r = api.get(path, params=params)
    if r.status_code == 204:
        return []
    assert r.status_code == 200, r.text
    return r.json()


def test_metrics_equal_what_qido_counts(api, loaded):
    store, files = loaded
    sizes = defaultdict(int)
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        sizes[(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))] += f.stat().st_size

    studies = qido(api, f"{store}/dicomWeb/studies", includefield="NumberOfStudyRelatedSeries,"
                                                                   "NumberOfStudyRelatedInstances")
    series = qido(api, f"{store}/dicomWeb/series")
    instances = qido(api, f"{store}/dicomWeb/instances")
    m = api.get(f"{store}:getDICOMStoreMetrics").json()
    assert set(m) == {"name", "studyCount", "seriesCount", "instanceCount", "structuredStorageSizeBytes",
                      "blobStorageSizeBytes"}
    assert m["name"] == store
    assert m["studyCount"] == str(len(studies)) == "2"
    assert m["seriesCount"] == str(len(series)) == "3"
    assert m["instanceCount"] == str(len(instances)) == "4"
    assert m["blobStorageSizeBytes"] == str(sum(sizes.values()))
    assert 0 < int(m["structuredStorageSizeBytes"]) < int(m["blobStorageSizeBytes"])

    total_structured = 0
    for st in studies:
        uid = st["0020000D"]["Value"][0]
        sm = api.get(f"{store}/dicomWeb/studies/{uid}:getStudyMetrics").json()
        assert sm["study"] == f"{store}/dicomWeb/studies/{uid}"
        assert sm["seriesCount"] == str(st["00201206"]["Value"][0])
        assert sm["instanceCount"] == str(st["00201208"]["Value"][0])
        assert sm["blobStorageSizeBytes"] == str(sum(v for (s, _), v in sizes.items() if s == uid))
        total_structured += int(sm["structuredStorageSizeBytes"])
        for se in qido(api, f"{store}/dicomWeb/studies/{uid}/series",
                       includefield="NumberOfSeriesRelatedInstances"):
            suid = se["0020000E"]["Value"][0]
            xm = api.get(f"{store}/dicomWeb/studies/{uid}/series/{suid}:getSeriesMetrics").json()
            assert set(xm) == {"series", "instanceCount", "structuredStorageSizeBytes", "blobStorageSizeBytes"}
            assert xm["series"] == f"{store}/dicomWeb/studies/{uid}/series/{suid}"
            assert xm["instanceCount"] == str(se["00201209"]["Value"][0])
            assert xm["blobStorageSizeBytes"] == str(sizes[(uid, suid)])
    assert total_structured == int(m["structuredStorageSizeBytes"])


def test_empty_store_deletes_unknown_study_and_series(api, loaded, tmp_path):
    store = api.store()
    assert api.get(f"{store}:getDICOMStoreMetrics").json() == {"name": store}  # proto3 JSON omits zeros
    f = dicom_files.with_uids(dicom_files.path("CT_small.dcm"), tmp_path / "one.dcm")
    assert api.stow(store, [f]).status_code == 200
    m = api.get(f"{store}:getDICOMStoreMetrics").json()
    assert (m["instanceCount"], m["blobStorageSizeBytes"]) == ("1", str(f.stat().st_size))
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    assert api.http.delete(api.url(f"{store}/dicomWeb/studies/{ds.StudyInstanceUID}")).ok
    assert api.get(f"{store}:getDICOMStoreMetrics").json() == {"name": store}  # a delete shows at once
    r = api.get(f"{store}/dicomWeb/studies/1.2.3:getStudyMetrics")
    assert r.status_code == 404 and "1.2.3" in r.json()["error"]["message"]
    r = api.get(f"{loaded[0]}/dicomWeb/studies/1.2.3/series/4.5:getSeriesMetrics")
    assert r.status_code == 404
    r = api.get(f"{store.rsplit('/', 1)[0]}/{unique('nostore')}:getDICOMStoreMetrics")
    assert r.status_code == 404
    assert api.post(f"{store}:getDICOMStoreMetrics", json={}).status_code == 405


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
def test_discovery_client_reads_the_metrics(hc, api, loaded, version):
    from google.oauth2.credentials import Credentials
    from googleapiclient import discovery

    store, _ = loaded
    svc = discovery.build("healthcare", version, client_options={"api_endpoint": hc.url + "/"},
                          credentials=Credentials("dummy-token"), cache_discovery=False, static_discovery=True)
    stores = svc.projects().locations().datasets().dicomStores()
    m = stores.getDICOMStoreMetrics(name=store).execute()
    assert m["name"] == store and m["studyCount"] == "2"
    study = qido(api, f"{store}/dicomWeb/studies", StudyInstanceUID="1.2.826.0.1.3680043.8.498.81")
    assert len(study) == 1
    path = f"{store}/dicomWeb/studies/1.2.826.0.1.3680043.8.498.81"
    sm = stores.dicomWeb().studies().getStudyMetrics(study=path).execute()
    assert sm["study"] == path and sm["seriesCount"] == "2"
    xm = stores.dicomWeb().studies().series().getSeriesMetrics(series=f"{path}/series/1.2.826.0.1.3680043.8.498.81.2"
                                                               ).execute()
    assert xm["instanceCount"] == "1"
