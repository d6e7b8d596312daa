"""QIDO-RS NumberOfStudyRelatedSeries/Instances and NumberOfSeriesRelatedInstances, over HTTP.

Counts are returned only when asked for (`includefield` keyword, tag, or `all`), equal what the store
holds after stores and deletes, and page with limit/offset. One emulator process for the module.
"""
from __future__ import annotations

import io

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import dicom_files, procs
from tests.support.hcapi import HC

PROJECT = "qido-proj"
N_STUDY_SERIES, N_STUDY_INST, N_SERIES_INST = "00201206", "00201208", "00201209"
ROOT = "1.2.826.0.1.3680043.8.498.77"


@pytest.fixture(scope="module")
def emu(logs_dir, tmp_path_factory):
    svc = procs.healthcare_emulator(logs_dir, tmp_path_factory.mktemp("hc-qido"), name="healthcare-emulator-qido")
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def api(emu):
    return HC(emu.url, project=PROJECT)


_CT = pydicom.dcmread(dicom_files.path("CT_small.dcm"))


def instance(study: int, series: int, sop: int) -> bytes:
    ds = _CT.copy()
    ds.StudyInstanceUID = f"{ROOT}.{study}"
    ds.SeriesInstanceUID = f"{ROOT}.{study}.{series}"
    ds.SOPInstanceUID = f"{ROOT}.{study}.{series}.{sop}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def search(api, store: str, path: str, **params) -> list[dict]:
    r = api.get(f"{store}/dicomWeb/{path}", params=params)
    if r.status_code == 204:
        return []
    assert r.status_code == 200, r.text
    return r.json()


def uid(item: dict, tag: str) -> str:
    return item[tag]["Value"][0]


def count(item: dict, tag: str) -> int | None:
    return item[tag]["Value"][0] if tag in item else None


def delete(api, store: str, path: str) -> None:
    r = api.http.delete(api.url(f"{store}/dicomWeb/{path}"))
    assert r.status_code == 200, r.text


def test_counts_are_returned_when_asked_for_and_follow_stores_and_deletes(api):
    store = api.store()
    # study 1: series 1 (3 instances), series 2 (1); study 2: series 1 (2)
    files = [instance(1, 1, i) for i in range(3)] + [instance(1, 2, 0)] + [instance(2, 1, i) for i in range(2)]
    assert api.stow(store, files).status_code == 200
    s1, s2 = f"{ROOT}.1", f"{ROOT}.2"

    plain = search(api, store, "studies")
    assert [uid(s, "0020000D") for s in plain] == [s1, s2]
    assert all(N_STUDY_INST not in s and N_STUDY_SERIES not in s for s in plain)  # not by default

    found = search(api, store, "studies", includefield="NumberOfStudyRelatedInstances")
    assert [(count(s, N_STUDY_INST), count(s, N_STUDY_SERIES)) for s in found] == [(4, None), (2, None)]
    assert found[0][N_STUDY_INST]["vr"] == "IS"
    found = search(api, store, "studies", includefield="00201206")
    assert [(count(s, N_STUDY_SERIES), count(s, N_STUDY_INST)) for s in found] == [(2, None), (1, None)]
    found = search(api, store, "studies", includefield="all")
    assert [(count(s, N_STUDY_SERIES), count(s, N_STUDY_INST)) for s in found] == [(2, 4), (1, 2)]
    # a series-level count is not a study attribute
    assert all(N_SERIES_INST not in s for s in search(api, store, "studies",
                                                         includefield="NumberOfSeriesRelatedInstances"))
    # counts are the study's, whatever the match keys select
    [only] = search(api, store, "studies", StudyInstanceUID=s1, includefield="NumberOfStudyRelatedInstances")
    assert count(only, N_STUDY_INST) == 4

    series = search(api, store, "series", includefield="NumberOfSeriesRelatedInstances")
    assert [count(s, N_SERIES_INST) for s in series] == [3, 1, 2]
    assert all(N_SERIES_INST not in s for s in search(api, store, "series"))
    assert [count(s, N_SERIES_INST) for s in search(api, store, f"studies/{s1}/series", includefield="all")] == [3, 1]

    # paged: limit/offset as without counts
    page = search(api, store, "studies", includefield="NumberOfStudyRelatedInstances", limit="1", offset="1")
    assert [(uid(s, "0020000D"), count(s, N_STUDY_INST)) for s in page] == [(s2, 2)]

    # after deletes
    delete(api, store, f"studies/{s1}/series/{s1}.1/instances/{s1}.1.0")
    delete(api, store, f"studies/{s2}/series/{s2}.1")
    found = search(api, store, "studies", includefield="all")
    assert [(uid(s, "0020000D"), count(s, N_STUDY_SERIES), count(s, N_STUDY_INST)) for s in found] == [(s1, 2, 3)]
    assert [count(s, N_SERIES_INST) for s in search(api, store, "series", includefield="all")] == [2, 1]
    # stored again after the delete: counted again
    assert api.stow(store, [instance(1, 1, 0)]).status_code == 200
    [again] = search(api, store, "studies", includefield="NumberOfStudyRelatedInstances")
    assert count(again, N_STUDY_INST) == 4


OPS = st.lists(st.tuples(st.sampled_from(["store", "delete_instance", "delete_series", "delete_study"]),
                         st.integers(0, 2), st.integers(0, 1), st.integers(0, 2)), min_size=1, max_size=12)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_counts_equal_a_model_of_the_store_after_any_stores_and_deletes(api, ops):
    store = api.store()
    held: set[tuple[int, int, int]] = set()
    for op, study, series, sop in ops:
        s = f"{ROOT}.{study}"
        if op == "store":
            r = api.stow(store, [instance(study, series, sop)])
            assert r.status_code == (409 if (study, series, sop) in held else 200)
            held.add((study, series, sop))
            continue
        path = {"delete_instance": f"studies/{s}/series/{s}.{series}/instances/{s}.{series}.{sop}",
                "delete_series": f"studies/{s}/series/{s}.{series}", "delete_study": f"studies/{s}"}[op]
        gone = {k for k in held if k[0] == study and (op == "delete_study" or k[1] == series)
                and (op != "delete_instance" or k[2] == sop)}
        r = api.http.delete(api.url(f"{store}/dicomWeb/{path}"))
        assert r.status_code == (200 if gone else 404), r.text
        held -= gone

    want_studies = {}
    for st_, se, _ in held:
        n_series, n_inst = want_studies.get(st_, (set(), 0))
        want_studies[st_] = (n_series | {se}, n_inst + 1)
    got = {}
    for offset in range(0, 4, 2):  # pages of two studies
        for s in search(api, store, "studies", includefield="all", limit="2", offset=str(offset)):
            got[int(uid(s, "0020000D").rsplit(".", 1)[1])] = (count(s, N_STUDY_SERIES), count(s, N_STUDY_INST))
    assert got == {k: (len(v[0]), v[1]) for k, v in want_studies.items()}

    want_series: dict[tuple[int, int], int] = {}
    for st_, se, _ in held:
        want_series[(st_, se)] = want_series.get((st_, se), 0) + 1
    got_series = {}
    for s in search(api, store, "series", includefield="NumberOfSeriesRelatedInstances"):
        parts = uid(s, "0020000E").rsplit(".", 2)
        got_series[(int(parts[1]), int(parts[2]))] = count(s, N_SERIES_INST)
    assert got_series == want_series
