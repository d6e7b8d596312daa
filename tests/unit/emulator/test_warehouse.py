"""The local BigQuery warehouse: datasets, atomic table writes, schema widening, queries."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from healthcare_emulator import warehouse as wmod
from healthcare_emulator.warehouse import Warehouse, WarehouseError, cli_bq_mk, cli_query, to_jsonable

P = "test-project"
D = "dicom_ds"
T = "instances"
REPO = Path(__file__).resolve().parents[3]

NAME_PARTS = ["FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix"]
PN = {
    "name": "PatientName",
    "type": "RECORD",
    "mode": "NULLABLE",
    "fields": [
        {"name": g, "type": "RECORD", "mode": "NULLABLE",
         "fields": [{"name": n, "type": "STRING", "mode": "NULLABLE"} for n in NAME_PARTS]}
        for g in ("Alphabetic", "Ideographic", "Phonetic")
    ],
}
OTHER = {
    "name": "OtherElements",
    "type": "RECORD",
    "mode": "REPEATED",
    "fields": [
        {"name": "Tag", "type": "STRING", "mode": "NULLABLE"},
        {"name": "Data", "type": "STRING", "mode": "REPEATED"},
    ],
}
SCHEMA = [
    {"name": "StudyInstanceUID", "type": "STRING", "mode": "NULLABLE"},
    {"name": "SeriesInstanceUID", "type": "STRING", "mode": "NULLABLE"},
    {"name": "SOPInstanceUID", "type": "STRING", "mode": "NULLABLE"},
    {"name": "PatientID", "type": "STRING", "mode": "NULLABLE"},
    {"name": "StudyDate", "type": "DATE", "mode": "NULLABLE"},
    {"name": "StudyTime", "type": "TIME", "mode": "NULLABLE"},
    {"name": "AcquisitionDateTime", "type": "TIMESTAMP", "mode": "NULLABLE"},
    {"name": "Rows", "type": "INTEGER", "mode": "NULLABLE"},
    {"name": "DiffusionBValue", "type": "FLOAT", "mode": "NULLABLE"},
    {"name": "ImageType", "type": "STRING", "mode": "REPEATED"},
    PN,
    OTHER,
]

SEED_Q1 = """SELECT CONCAT('/dicomWeb/studies/', StudyInstanceUID, '/series/', SeriesInstanceUID,
              '/instances/', SOPInstanceUID) as DICOMwebPath
FROM `{table}`
WHERE PatientID = '19045';"""

SEED_Q2 = """SELECT MIN(CONCAT(StudyDate, ' ', StudyTime)) as StudyDateTime, MIN(PatientID) as PatientID,
       StudyInstanceUID, COUNT(*) as InstanceCount
FROM `{table}` AS dicom
GROUP BY StudyInstanceUID
ORDER BY StudyDateTime DESC
LIMIT 10;"""


def row(i: int, *, patient: str = "19045", study: str = "1.2.840.1", series: str = "1.2.840.1.1",
        date: dt.date = dt.date(2021, 7, 11), time: dt.time = dt.time(0, 38, 22)) -> dict:
    return {
        "StudyInstanceUID": study,
        "SeriesInstanceUID": series,
        "SOPInstanceUID": f"{series}.{i}",
        "PatientID": patient,
        "StudyDate": date,
        "StudyTime": time,
        "AcquisitionDateTime": dt.datetime(2021, 7, 11, 0, 38, 22, 250000, tzinfo=dt.timezone.utc),
        "Rows": 512,
        "DiffusionBValue": 1000.5,
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "PatientName": {"Alphabetic": {"FamilyName": "Doe", "GivenName": "Jane"}},
        "OtherElements": [{"Tag": "Tag_00431039", "Data": ["1", "2"]}, {"Tag": "Tag_00431040", "Data": []}],
    }


def rows(n: int, start: int = 0, **kw) -> list[dict]:
    return [row(start + i, **kw) for i in range(n)]


@pytest.fixture()
def wh(tmp_path: Path) -> Warehouse:
    w = Warehouse(tmp_path / "bigquery")
    w.create_dataset(P, D)
    return w


def table_dir(w: Warehouse, table: str = T) -> Path:
    return w._table_dir(P, D, table)


def snapshot(w: Warehouse, table: str = T) -> dict:
    """Everything a reader could observe of a table, plus its folder listing."""
    d = table_dir(w, table)
    files = sorted(p.name for p in d.iterdir()) if d.exists() else None
    manifest = (d / "manifest.json").read_bytes() if (d / "manifest.json").exists() else None
    return {"files": files, "manifest": manifest, "table": w.get_table(P, D, table)}


def staging_is_empty(w: Warehouse) -> bool:
    s = w.root / "staging"
    return not s.exists() or not any(s.iterdir())


def err(excinfo) -> tuple[str, str]:
    return excinfo.value.code, excinfo.value.message


# ------------------------------------------------------------------------ datasets


def test_dataset_lifecycle(tmp_path):
    w = Warehouse(tmp_path / "bq")
    ds = w.create_dataset(P, "b_ds", labels={"team": "radiology"}, description="exports")
    assert ds["datasetReference"] == {"projectId": P, "datasetId": "b_ds"}
    assert ds["id"] == f"{P}:b_ds" and ds["location"] == "US" and ds["labels"] == {"team": "radiology"}
    assert isinstance(ds["creationTime"], int)
    assert w.get_dataset(P, "b_ds") == ds
    w.create_dataset(P, "a_ds", location="EU")

    with pytest.raises(WarehouseError) as e:
        w.create_dataset(P, "b_ds")
    assert err(e) == ("ALREADY_EXISTS", f"Already Exists: Dataset {P}:b_ds")
    assert w.create_dataset(P, "b_ds", exists_ok=True) == ds

    assert [d["datasetReference"]["datasetId"] for d in w.list_datasets(P)] == ["a_ds", "b_ds"]
    assert w.list_datasets("other-project") == []

    w.write_table(P, "b_ds", "t", SCHEMA, [rows(1)], if_exists="error")
    with pytest.raises(WarehouseError) as e:
        w.delete_dataset(P, "b_ds")
    assert e.value.code == "FAILED_PRECONDITION"
    assert w.get_table(P, "b_ds", "t")["numRows"] == 1

    w.delete_dataset(P, "b_ds", delete_contents=True)
    w.delete_dataset(P, "a_ds")
    assert w.list_datasets(P) == []
    for call in (lambda: w.get_dataset(P, "b_ds"), lambda: w.delete_dataset(P, "b_ds"),
                 lambda: w.list_tables(P, "b_ds")):
        with pytest.raises(WarehouseError) as e:
            call()
        assert err(e) == ("NOT_FOUND", f"Not found: Dataset {P}:b_ds")
    assert w.get_table(P, "b_ds", "t") is None
    # a dataset of the same name starts empty
    w.create_dataset(P, "b_ds")
    assert w.list_tables(P, "b_ds") == []


def test_write_needs_existing_dataset(wh):
    with pytest.raises(WarehouseError) as e:
        wh.write_table(P, "missing_ds", T, SCHEMA, [rows(2)], if_exists="append")
    assert err(e) == ("NOT_FOUND", f"Not found: Dataset {P}:missing_ds")
    assert not wh._dataset_dir(P, "missing_ds").exists()
    assert staging_is_empty(wh)


def test_table_resource_list_and_delete(wh):
    res = wh.write_table(P, D, T, SCHEMA, [rows(3)], if_exists="error")
    assert res["tableReference"] == {"projectId": P, "datasetId": D, "tableId": T}
    assert res["id"] == f"{P}:{D}.{T}" and res["numRows"] == 3 and res["numBytes"] > 0
    assert res["schema"] == SCHEMA
    assert res == wh.get_table(P, D, T)
    wh.write_table(P, D, "another", SCHEMA, [], if_exists="error")
    assert [t["tableReference"]["tableId"] for t in wh.list_tables(P, D)] == ["another", T]
    wh.delete_table(P, D, T)
    assert wh.get_table(P, D, T) is None and not table_dir(wh).exists()
    with pytest.raises(WarehouseError) as e:
        wh.delete_table(P, D, T)
    assert err(e) == ("NOT_FOUND", f"Not found: Table {P}:{D}.{T}")


# ------------------------------------------------------------------------ write dispositions

MATRIX = {
    # (table state, if_exists): numRows afterwards, or "fail" (FAILED_PRECONDITION, unchanged)
    ("missing", "error"): 2, ("missing", "error_if_nonempty"): 2,
    ("missing", "truncate"): 2, ("missing", "append"): 2,
    ("empty", "error"): "fail", ("empty", "error_if_nonempty"): 2,
    ("empty", "truncate"): 2, ("empty", "append"): 2,
    ("nonempty", "error"): "fail", ("nonempty", "error_if_nonempty"): "fail",
    ("nonempty", "truncate"): 2, ("nonempty", "append"): 5,
}


@pytest.mark.parametrize("state,if_exists", sorted(MATRIX))
def test_if_exists_matrix(wh, state, if_exists):
    if state == "empty":
        wh.write_table(P, D, T, SCHEMA, [], if_exists="error")
    elif state == "nonempty":
        wh.write_table(P, D, T, SCHEMA, [rows(3, study="1.9")], if_exists="error")
    before = snapshot(wh)
    expected = MATRIX[(state, if_exists)]
    new_rows = rows(2, start=100)
    if expected == "fail":
        with pytest.raises(WarehouseError) as e:
            wh.write_table(P, D, T, SCHEMA, [new_rows], if_exists=if_exists)
        assert err(e) == ("FAILED_PRECONDITION", f"Already Exists: Table {P}:{D}.{T}")
        assert snapshot(wh) == before
    else:
        res = wh.write_table(P, D, T, SCHEMA, [new_rows[:1], [], new_rows[1:]], if_exists=if_exists)
        assert res["numRows"] == expected == wh.get_table(P, D, T)["numRows"]
        _, got, total = wh.list_rows(P, D, T)
        assert total == expected == len(got)
        sops = {r["SOPInstanceUID"] for r in got}
        assert {r["SOPInstanceUID"] for r in new_rows} <= sops
        if before["table"] is not None:
            assert res["creationTime"] == before["table"]["creationTime"]
            assert res["lastModifiedTime"] >= before["table"]["lastModifiedTime"]
        (count,) = wh.query(f"SELECT COUNT(*) AS n FROM `{P}.{D}.{T}`")[1]
        assert count == {"n": expected}
    assert staging_is_empty(wh)


def test_truncate_replaces_schema_and_api_spellings(wh):
    wh.write_table(P, D, T, SCHEMA, [rows(3)], if_exists="WRITE_EMPTY")
    small = [{"name": "PatientID", "type": "STRING"}]
    res = wh.write_table(P, D, T, small, [[{"PatientID": "a"}]], if_exists="WRITE_TRUNCATE")
    assert res["schema"] == [{"name": "PatientID", "type": "STRING", "mode": "NULLABLE"}]
    assert wh.list_rows(P, D, T)[1:] == ([{"PatientID": "a"}], 1)
    assert len([p for p in table_dir(wh).iterdir() if p.suffix == ".parquet"]) == 1  # old files gone
    with pytest.raises(WarehouseError) as e:
        wh.write_table(P, D, T, small, [], if_exists="sometimes")
    assert e.value.code == "INVALID_ARGUMENT"


def test_append_with_unchanged_schema_keeps_existing_files(wh):
    wh.write_table(P, D, T, SCHEMA, [rows(5)], if_exists="error")
    old = {p.name: p.stat().st_ino for p in table_dir(wh).glob("*.parquet")}
    wh.write_table(P, D, T, SCHEMA, [rows(5, start=5)], if_exists="append")
    now = {p.name: p.stat().st_ino for p in table_dir(wh).glob("*.parquet")}
    assert len(now) == 2 and all(now[name] == ino for name, ino in old.items())
    assert wh.get_table(P, D, T)["numRows"] == 10


# ------------------------------------------------------------------------ schema widening


def test_append_widens_schema_old_rows_read_null(wh):
    wh.write_table(P, D, T, SCHEMA, [rows(2)], if_exists="error")
    other2 = {**OTHER, "fields": OTHER["fields"] + [{"name": "VR", "type": "STRING", "mode": "NULLABLE"}]}
    schema2 = [f for f in SCHEMA if f["name"] != "OtherElements"] + [
        other2,
        {"name": "Modality", "type": "STRING", "mode": "NULLABLE"},
        {"name": "PixelSpacing", "type": "STRING", "mode": "REPEATED"},
    ]
    new = row(9, study="1.3")
    new.update(Modality="MR", PixelSpacing=["0.5", "0.5"],
               OtherElements=[{"Tag": "Tag_00291010", "Data": ["x"], "VR": "OB"}])
    res = wh.write_table(P, D, T, schema2, [[new]], if_exists="append")

    names = [f["name"] for f in res["schema"]]
    assert names == [f["name"] for f in SCHEMA] + ["Modality", "PixelSpacing"]  # old order kept
    other = next(f for f in res["schema"] if f["name"] == "OtherElements")
    assert [f["name"] for f in other["fields"]] == ["Tag", "Data", "VR"]

    _, got, total = wh.list_rows(P, D, T)
    assert total == 3
    old_rows = [r for r in got if r["StudyInstanceUID"] == "1.2.840.1"]
    assert len(old_rows) == 2
    for r in old_rows:
        assert r["Modality"] is None and r["PixelSpacing"] == []
        assert r["OtherElements"] == [{"Tag": "Tag_00431039", "Data": ["1", "2"], "VR": None},
                                      {"Tag": "Tag_00431040", "Data": [], "VR": None}]
    (new_row,) = [r for r in got if r["StudyInstanceUID"] == "1.3"]
    assert new_row["Modality"] == "MR" and new_row["OtherElements"][0]["VR"] == "OB"

    _, q = wh.query(f"SELECT SOPInstanceUID, o.VR FROM `{P}.{D}.{T}`, UNNEST(OtherElements) o ORDER BY 1, 2")
    assert [r["VR"] for r in q] == [None, None, None, None, "OB"]

    # the old schema appends again without narrowing anything
    res = wh.write_table(P, D, T, SCHEMA, [rows(1, start=50)], if_exists="append")
    assert [f["name"] for f in res["schema"]] == names and res["numRows"] == 4


@pytest.mark.parametrize("field,change,needle", [
    ("StudyDate", {"type": "STRING"}, "StudyDate"),
    ("ImageType", {"mode": "NULLABLE"}, "ImageType"),
    ("OtherElements", {"fields": [{"name": "Tag", "type": "INTEGER"}]}, "OtherElements.Tag"),
])
def test_conflicting_append_is_rejected_and_changes_nothing(wh, field, change, needle):
    wh.write_table(P, D, T, SCHEMA, [rows(2)], if_exists="error")
    before = snapshot(wh)
    bad = [dict(f, **change) if f["name"] == field else f for f in SCHEMA]
    with pytest.raises(WarehouseError) as e:
        wh.write_table(P, D, T, bad, [[{"PatientID": "1"}]], if_exists="append")
    assert e.value.code == "INVALID_ARGUMENT" and needle in e.value.message
    assert snapshot(wh) == before and staging_is_empty(wh)


def test_conflict_detected_at_commit_time(wh, monkeypatch):
    """A concurrent writer changes the table between the fail-fast check and the commit."""
    wh.write_table(P, D, T, SCHEMA, [rows(1)], if_exists="error")
    bad = [dict(f, type="STRING") if f["name"] == "Rows" else f for f in SCHEMA]

    def batches():
        yield [{"PatientID": "x"}]
        # meanwhile someone truncates the table with a schema where Rows is a STRING
        wh.write_table(P, D, T, bad, [[{"Rows": "12"}]], if_exists="truncate")

    with pytest.raises(WarehouseError) as e:
        wh.write_table(P, D, T, SCHEMA, batches(), if_exists="append")
    assert e.value.code == "INVALID_ARGUMENT" and "Rows" in e.value.message
    assert wh.list_rows(P, D, T)[1] == [{"Rows": "12"} | {f["name"]: ([] if f["mode"] == "REPEATED" else None)
                                          for f in bad if f["name"] != "Rows"}]
    assert staging_is_empty(wh)


# ------------------------------------------------------------------------ aborted writes


def test_cancelled_write_leaves_table_unchanged(wh):
    wh.write_table(P, D, T, SCHEMA, [rows(3)], if_exists="error")
    before = snapshot(wh)
    seen = []

    def batches():
        for i in range(5):
            seen.append(i)
            yield rows(2, start=10 * i)

    with pytest.raises(WarehouseError) as e:
        wh.write_table(P, D, T, SCHEMA, batches(), if_exists="truncate", cancelled=lambda: len(seen) >= 2)
    assert e.value.code == "CANCELLED"
    assert seen == [0, 1]  # stopped between batches
    assert snapshot(wh) == before and staging_is_empty(wh)

    with pytest.raises(WarehouseError) as e:  # cancelled before anything: a new table is not created
        wh.write_table(P, D, "new_t", SCHEMA, [rows(1)], if_exists="error", cancelled=lambda: True)
    assert e.value.code == "CANCELLED" and wh.get_table(P, D, "new_t") is None


@pytest.mark.parametrize("table", [T, "fresh_table"])
def test_failure_mid_stream_leaves_table_unchanged(wh, table, monkeypatch):
    monkeypatch.setattr(wmod, "ROW_GROUP_ROWS", 100)
    wh.write_table(P, D, T, SCHEMA, [rows(3)], if_exists="error")
    before = snapshot(wh, table)

    def batches():
        yield rows(2, start=100)
        yield rows(500, start=200)
        assert list((wh.root / "staging").rglob("*.parquet"))  # rows already reached disk
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        wh.write_table(P, D, table, SCHEMA, batches(), if_exists="append")
    assert snapshot(wh, table) == before and staging_is_empty(wh)
    if table != T:
        assert not table_dir(wh, table).exists()


def test_invalid_rows_are_rejected(wh):
    wh.write_table(P, D, T, SCHEMA, [rows(2)], if_exists="error")
    before = snapshot(wh)
    required = SCHEMA + [{"name": "Must", "type": "STRING", "mode": "REQUIRED"}]
    cases = [
        (SCHEMA, {"NoSuchColumn": 1}, "NoSuchColumn"),
        (SCHEMA, {"Rows": "not a number"}, "Invalid row data"),
        (SCHEMA, {"ImageType": ["A", None]}, "ImageType"),
        (SCHEMA, {"OtherElements": [{"Tag": "x", "Data": [None]}]}, "OtherElements.Data"),
        (required, {"PatientID": "p"}, "Must"),
        ([{"name": "bad name", "type": "STRING"}], {}, "bad name"),
        ([{"name": "x", "type": "GEOGRAPHY"}], {}, "GEOGRAPHY"),
        ([{"name": "r", "type": "RECORD"}], {}, "r"),
        ([{"name": "a", "type": "STRING"}, {"name": "A", "type": "STRING"}], {}, "A"),
    ]
    for schema, bad_row, needle in cases:
        with pytest.raises(WarehouseError) as e:
            wh.write_table(P, D, T, schema, [rows(1, start=7), [bad_row]], if_exists="truncate")
        assert e.value.code == "INVALID_ARGUMENT" and needle in e.value.message, (bad_row, e.value.message)
        assert snapshot(wh) == before
    assert staging_is_empty(wh)


def test_null_arrays_read_as_empty_and_json(wh):
    schema = [
        {"name": "id", "type": "INT64"},
        {"name": "tags", "type": "STRING", "mode": "REPEATED"},
        {"name": "meta", "type": "JSON"},
        {"name": "metas", "type": "JSON", "mode": "REPEATED"},
        {"name": "seq", "type": "STRUCT", "mode": "REPEATED",
         "fields": [{"name": "v", "type": "BOOL"}, {"name": "w", "type": "FLOAT64", "mode": "REPEATED"}]},
    ]
    res = wh.write_table(P, D, "j", schema, [[
        {"id": 1, "tags": None, "meta": {"a": [1, 2]}, "metas": [1, "[2]"], "seq": [{"v": True, "w": None}]},
        {"id": 2, "meta": '{"b": null}'},
    ]], if_exists="error")
    assert [f["type"] for f in res["schema"]] == ["INTEGER", "STRING", "JSON", "JSON", "RECORD"]
    _, got, _ = wh.list_rows(P, D, "j")
    assert got == [
        {"id": 1, "tags": [], "meta": '{"a":[1,2]}', "metas": ["1", "[2]"], "seq": [{"v": True, "w": []}]},
        {"id": 2, "tags": [], "meta": '{"b": null}', "metas": [], "seq": []},
    ]
    schema_q, q = wh.query(f"SELECT id, meta, JSON_VALUE(meta, '$.a[1]') AS a1, ARRAY_LENGTH(tags) AS n, metas "
                           f"FROM `{P}.{D}.j` ORDER BY id")
    assert [f["type"] for f in schema_q] == ["INTEGER", "JSON", "STRING", "INTEGER", "JSON"]
    assert schema_q[4]["mode"] == "REPEATED" and q[0]["metas"] == ["1", "[2]"]
    assert q[0]["a1"] == "2" and q[0]["n"] == 0 and json.loads(q[1]["meta"]) == {"b": None}


# ------------------------------------------------------------------------ queries


@pytest.fixture()
def seeded(wh):
    batches = [
        rows(3, patient="19045", study="1.1", series="1.1.1", date=dt.date(2021, 7, 11), time=dt.time(0, 38, 22)),
        rows(2, patient="19045", study="1.1", series="1.1.2", date=dt.date(2021, 7, 11), time=dt.time(0, 38, 22)),
        rows(1, patient="777", study="1.2", series="1.2.1", date=dt.date(2020, 1, 2),
             time=dt.time(9, 5, 1, 500000)),
    ]
    for k in range(10):  # older studies, to exercise LIMIT 10
        batches.append(rows(1, patient=f"p{k}", study=f"2.{k}", series=f"2.{k}.1",
                            date=dt.date(2019, 1, 1 + k), time=dt.time(12, 0, 0)))
    wh.write_table(P, D, T, SCHEMA, batches, if_exists="error")
    return wh


def test_seed_query_dicomweb_paths(seeded):
    schema, got = seeded.query(SEED_Q1.format(table=f"{P}.{D}.{T}"))
    assert schema == [{"name": "DICOMwebPath", "type": "STRING", "mode": "NULLABLE"}]
    assert sorted(r["DICOMwebPath"] for r in got) == sorted(
        [f"/dicomWeb/studies/1.1/series/1.1.1/instances/1.1.1.{i}" for i in range(3)]
        + [f"/dicomWeb/studies/1.1/series/1.1.2/instances/1.1.2.{i}" for i in range(2)]
    )


def test_seed_query_worklist(seeded):
    schema, got = seeded.query(SEED_Q2.format(table=f"{P}.{D}.{T}"))
    assert [(f["name"], f["type"]) for f in schema] == [
        ("StudyDateTime", "STRING"), ("PatientID", "STRING"), ("StudyInstanceUID", "STRING"),
        ("InstanceCount", "INTEGER")]
    assert len(got) == 10
    assert got[0] == {"StudyDateTime": "2021-07-11 00:38:22", "PatientID": "19045",
                      "StudyInstanceUID": "1.1", "InstanceCount": 5}
    assert got[1] == {"StudyDateTime": "2020-01-02 09:05:01.5", "PatientID": "777",
                      "StudyInstanceUID": "1.2", "InstanceCount": 1}
    assert got[2]["StudyDateTime"] == "2019-01-10 12:00:00"
    assert [r["StudyDateTime"] for r in got] == sorted((r["StudyDateTime"] for r in got), reverse=True)


def test_query_nested_fields_unnest_and_repeated_records(seeded):
    tbl = f"`{P}.{D}.{T}`"
    schema, got = seeded.query(f"SELECT PatientName.Alphabetic.FamilyName, PatientName.Alphabetic.GivenName "
                               f"FROM {tbl} WHERE PatientID = '777'")
    assert [f["name"] for f in schema] == ["FamilyName", "GivenName"]
    assert got == [{"FamilyName": "Doe", "GivenName": "Jane"}]

    _, got = seeded.query(f"SELECT it, COUNT(*) AS n FROM {tbl}, UNNEST(ImageType) AS it GROUP BY it ORDER BY it")
    assert got == [{"it": "AXIAL", "n": 16}, {"it": "ORIGINAL", "n": 16}, {"it": "PRIMARY", "n": 16}]

    _, got = seeded.query(f"SELECT o.Tag, d FROM {tbl} AS x, x.OtherElements AS o, UNNEST(o.Data) AS d "
                          f"WHERE x.PatientID = '777' ORDER BY d")
    assert got == [{"Tag": "Tag_00431039", "d": "1"}, {"Tag": "Tag_00431039", "d": "2"}]

    schema, got = seeded.query(f"SELECT ARRAY_LENGTH(OtherElements), OtherElements, PatientName, "
                               f"AcquisitionDateTime, StudyDate, StudyTime, Rows, DiffusionBValue "
                               f"FROM {tbl} WHERE PatientID = '777'")
    by = {f["name"]: f for f in schema}
    assert by["f0_"]["type"] == "INTEGER"
    assert by["OtherElements"]["mode"] == "REPEATED" and by["OtherElements"]["type"] == "RECORD"
    assert by["OtherElements"]["fields"] == OTHER["fields"]
    assert by["PatientName"]["fields"][0]["fields"][0] == {"name": "FamilyName", "type": "STRING", "mode": "NULLABLE"}
    assert [by[n]["type"] for n in ("AcquisitionDateTime", "StudyDate", "StudyTime", "Rows", "DiffusionBValue")] \
        == ["TIMESTAMP", "DATE", "TIME", "INTEGER", "FLOAT"]
    (r,) = got
    assert r["f0_"] == 2 and r["OtherElements"][1] == {"Tag": "Tag_00431040", "Data": []}
    assert r["AcquisitionDateTime"] == dt.datetime(2021, 7, 11, 0, 38, 22, 250000, tzinfo=dt.timezone.utc)
    assert r["AcquisitionDateTime"].utcoffset() == dt.timedelta(0)
    assert (r["StudyDate"], r["StudyTime"], r["Rows"], r["DiffusionBValue"]) == (
        dt.date(2020, 1, 2), dt.time(9, 5, 1, 500000), 512, 1000.5)
    assert r["PatientName"]["Alphabetic"]["GivenName"] == "Jane" and r["PatientName"]["Phonetic"] is None


def test_query_table_reference_forms(wh):
    wh.write_table(P, D, "my table", SCHEMA, [rows(2)], if_exists="error")
    wh.create_dataset("example.com:imaging", "ds2")
    wh.write_table("example.com:imaging", "ds2", "t", SCHEMA, [rows(3)], if_exists="error")
    count = "SELECT COUNT(*) AS n FROM {}"
    for ref, kw, n in [
        (f"`{P}.{D}.my table`", {}, 2),
        (f"`{P}`.{D}.`my table`", {}, 2),
        (f"`{P}.{D}`.`my table`", {}, 2),
        (f"{D}.`my table`", {"default_project": P}, 2),
        (f"{D}.`my table`", {}, 2),  # the only project that has the dataset
        ("`example.com:imaging.ds2.t`", {}, 3),
        ("`example.com:imaging`.ds2.t", {}, 3),
    ]:
        assert wh.query(count.format(ref), **kw)[1] == [{"n": n}], ref
    # self-join, CTE and subquery all resolve; table name usable as qualifier
    _, got = wh.query(f"WITH a AS (SELECT SOPInstanceUID FROM `{P}.{D}.my table`) "
                      f"SELECT COUNT(*) AS n FROM a JOIN `{P}.{D}.my table` b USING (SOPInstanceUID) "
                      f"WHERE b.PatientID IN (SELECT PatientID FROM {D}.`my table`)")
    assert got == [{"n": 2}]
    assert wh.query(f"SELECT `my table`.Rows FROM `{P}.{D}.my table` LIMIT 1")[1] == [{"Rows": 512}]


def test_query_errors(seeded):
    def code(sql, **kw):
        with pytest.raises(WarehouseError) as e:
            seeded.query(sql, **kw)
        return e.value.code, e.value.message

    assert code(f"SELECT * FROM `{P}.{D}.nope`") == ("NOT_FOUND", f"Not found: Table {P}:{D}.nope")
    assert code(f"SELECT * FROM `{P}.nods.t`") == ("NOT_FOUND", f"Not found: Dataset {P}:nods")
    assert code("SELECT * FROM nods.t")[0] == "NOT_FOUND"
    assert code("SELECT * FROM t")[0] == "INVALID_ARGUMENT"
    assert code("SELEC 1")[0] == "INVALID_ARGUMENT"
    c, msg = code(f"SELECT NoSuchColumn FROM `{P}.{D}.{T}`")
    assert c == "INVALID_ARGUMENT" and "NoSuchColumn" in msg
    for stmt in (f"DELETE FROM `{P}.{D}.{T}` WHERE TRUE", f"INSERT INTO `{P}.{D}.{T}` (PatientID) VALUES ('x')",
                 f"DROP TABLE `{P}.{D}.{T}`", "SELECT 1; SELECT 2",
                 "SELECT * FROM read_csv('/etc/passwd')", "SELECT * FROM read_text('/etc/hostname')",
                 f"SELECT * FROM `{P}.{D}.../x`"):
        assert code(stmt)[0] == "INVALID_ARGUMENT", stmt
    assert seeded.get_table(P, D, T)["numRows"] == 16


def test_query_parameters_and_constants(seeded):
    _, got = seeded.query(f"SELECT COUNT(*) AS n FROM `{P}.{D}.{T}` WHERE PatientID = @pid", params={"pid": "19045"})
    assert got == [{"n": 5}]
    schema, got = seeded.query("SELECT 1 AS one, 1.5 AS x, 'a' AS s, NULL AS z, TRUE AS b, CURRENT_DATE() AS d")
    assert [f["type"] for f in schema] == ["INTEGER", "FLOAT", "STRING", "INTEGER", "BOOLEAN", "DATE"]
    assert got[0]["x"] == 1.5 and isinstance(got[0]["x"], float)


def test_reader_retries_when_a_commit_replaces_files(seeded, monkeypatch):
    stale = seeded._manifest(P, D, T)
    seeded.write_table(P, D, T, SCHEMA, [rows(4)], if_exists="truncate")  # deletes the stale files
    real = Warehouse._manifest
    calls = []

    def first_stale(self, *ref):
        calls.append(ref)
        return stale if len(calls) == 1 else real(self, *ref)

    monkeypatch.setattr(Warehouse, "_manifest", first_stale)
    assert seeded.query(f"SELECT COUNT(*) AS n FROM `{P}.{D}.{T}`")[1] == [{"n": 4}]
    calls.clear()
    assert seeded.list_rows(P, D, T)[2] == 4 and len(calls) == 2


# ------------------------------------------------------------------------ list_rows


def test_list_rows_paging(wh):
    wh.write_table(P, D, T, SCHEMA, [rows(10)], if_exists="error")
    wh.write_table(P, D, T, SCHEMA, [rows(10, start=10)], if_exists="append")
    wh.write_table(P, D, T, SCHEMA, [rows(5, start=20)], if_exists="append")
    schema, everything, total = wh.list_rows(P, D, T)
    assert total == 25 and schema == SCHEMA
    assert [r["SOPInstanceUID"] for r in everything] == [f"1.2.840.1.1.{i}" for i in range(25)]
    pages, start = [], 0
    while True:
        _, page, total = wh.list_rows(P, D, T, start_index=start, max_results=7)
        if not page:
            break
        pages.append(page)
        start += len(page)
    assert [len(p) for p in pages] == [7, 7, 7, 4] and sum(pages, []) == everything
    assert wh.list_rows(P, D, T, start_index=9, max_results=3)[1] == everything[9:12]
    assert wh.list_rows(P, D, T, start_index=99)[1:] == ([], 25)
    assert wh.list_rows(P, D, T, max_results=0)[1] == []
    with pytest.raises(WarehouseError) as e:
        wh.list_rows(P, D, "nope")
    assert e.value.code == "NOT_FOUND"


def test_empty_table_is_queryable(wh):
    res = wh.write_table(P, D, T, SCHEMA, iter(()), if_exists="error")
    assert res["numRows"] == 0
    schema, got = wh.query(f"SELECT PatientID, PatientName FROM `{P}.{D}.{T}`")
    assert got == [] and schema[1]["type"] == "RECORD"
    assert wh.list_rows(P, D, T) == (SCHEMA, [], 0)


# ------------------------------------------------------------------------ concurrency and processes


def test_concurrent_appends_are_serialised(wh):
    wh.write_table(P, D, T, SCHEMA, [], if_exists="error")
    errors = []

    def worker(k):
        try:
            for j in range(3):
                wh.write_table(P, D, T, SCHEMA, [rows(10, start=1000 * k + 10 * j)], if_exists="append")
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert wh.get_table(P, D, T)["numRows"] == 120
    assert len({r["SOPInstanceUID"] for r in wh.list_rows(P, D, T)[1]}) == 120


def test_cli_query_from_second_process(seeded, tmp_path):
    data_dir = tmp_path  # the warehouse lives in <data_dir>/bigquery
    code = ("import sys; from healthcare_emulator.warehouse import cli_query; "
            "sys.exit(cli_query(sys.argv[1], sys.argv[2]))")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code, str(data_dir), SEED_Q2.format(table=f"{P}.{D}.{T}")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got[0] == {"StudyDateTime": "2021-07-11 00:38:22", "PatientID": "19045",
                      "StudyInstanceUID": "1.1", "InstanceCount": 5}
    # the first process keeps working on the same data while/after the other one read it
    seeded.write_table(P, D, T, SCHEMA, [rows(1, study="9.9")], if_exists="append")
    proc = subprocess.run([sys.executable, "-c", code, str(data_dir), f"SELECT * FROM `{P}.{D}.nope`"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert proc.returncode == 1 and f"Not found: Table {P}:{D}.nope" in proc.stderr and proc.stdout == ""


def test_cli_helpers_in_process(tmp_path, capsys):
    assert cli_bq_mk(tmp_path, f"{P}.cli_ds") == 0
    assert capsys.readouterr().out.strip() == f"Dataset '{P}:cli_ds' successfully created."
    assert cli_bq_mk(tmp_path, f"{P}.cli_ds") == 1
    assert "already exists" in capsys.readouterr().err
    assert cli_bq_mk(tmp_path, f"{P}.cli_ds", exists_ok=True) == 0
    assert cli_bq_mk(tmp_path, "example.com:imaging:cli_ds") == 0
    assert cli_bq_mk(tmp_path, "not a ref") == 1
    capsys.readouterr()
    w = Warehouse(tmp_path / "bigquery")
    assert [d["id"] for d in w.list_datasets(P)] == [f"{P}:cli_ds"]
    w.write_table(P, "cli_ds", "t", SCHEMA, [rows(1)], if_exists="error")
    assert cli_query(tmp_path, f"SELECT StudyDate, StudyTime, AcquisitionDateTime, ImageType, PatientName "
                               f"FROM `{P}.cli_ds.t`") == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert r["StudyDate"] == "2021-07-11" and r["StudyTime"] == "00:38:22"
    assert r["AcquisitionDateTime"] == "2021-07-11T00:38:22.250000+00:00"
    assert r["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert r["PatientName"]["Alphabetic"]["FamilyName"] == "Doe"
    assert cli_query(tmp_path, "SELECT FROM WHERE") == 1
    assert "BigQuery error in query operation" in capsys.readouterr().err


def test_to_jsonable():
    value = {
        "d": dt.date(2021, 7, 11), "t": dt.time(0, 38, 22), "tf": dt.time(1, 2, 3, 4500),
        "ts": dt.datetime(2021, 7, 11, 2, 38, 22, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        "dt": dt.datetime(2021, 7, 11, 0, 0), "b": b"\x00\xff", "n": float("nan"),
        "nested": [{"x": dt.date(2020, 1, 1)}], "none": None, "ok": True,
    }
    assert to_jsonable(value) == {
        "d": "2021-07-11", "t": "00:38:22", "tf": "01:02:03.004500", "ts": "2021-07-11T00:38:22+00:00",
        "dt": "2021-07-11T00:00:00", "b": "AP8=", "n": "NaN", "nested": [{"x": "2020-01-01"}],
        "none": None, "ok": True,
    }
    json.dumps(to_jsonable(value))


# ------------------------------------------------------------------------ hostile ids


HOSTILE = ["../x", "..", ".", "a/b", "x\x00y", "", "a\\b", "/abs", "a.b", "tab\tle", "x" * 2000]


def test_hostile_ids_are_rejected_and_nothing_escapes(tmp_path):
    root = tmp_path / "inner" / "bigquery"
    w = Warehouse(root)
    w.create_dataset(P, D)
    calls = []
    for bad in HOSTILE:
        calls += [
            lambda b=bad: w.create_dataset(b, D),
            lambda b=bad: w.create_dataset(P, b),
            lambda b=bad: w.get_dataset(P, b),
            lambda b=bad: w.delete_dataset(b, D, delete_contents=True),
            lambda b=bad: w.list_datasets(b),
            lambda b=bad: w.get_table(P, D, b),
            lambda b=bad: w.delete_table(P, b, "t"),
            lambda b=bad: w.write_table(P, D, b, SCHEMA, [rows(1)], if_exists="truncate"),
            lambda b=bad: w.write_table(b, D, "t", SCHEMA, [rows(1)], if_exists="truncate"),
            lambda b=bad: w.write_table(P, b, "t", SCHEMA, [rows(1)], if_exists="truncate"),
            lambda b=bad: w.list_rows(P, D, b),
        ]
    for call in calls:
        with pytest.raises(WarehouseError) as e:
            call()
        assert e.value.code == "INVALID_ARGUMENT"
    for sql in ["SELECT * FROM `test-project.dicom_ds.../x`", "SELECT * FROM `../x.dicom_ds.t`",
                "SELECT * FROM `test-project.a/b.t`", "SELECT * FROM `test-project`.dicom_ds.`a/b`"]:
        with pytest.raises(WarehouseError) as e:
            w.query(sql)
        assert e.value.code == "INVALID_ARGUMENT", sql
    # only the root was ever written, and inside it only the expected tree
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inner"]
    assert sorted(p.name for p in (tmp_path / "inner").iterdir()) == ["bigquery"]
    assert [p.name for p in (root / "projects").iterdir()] == [P]
    assert [p.name for p in (root / "projects" / P / "datasets").iterdir()] == [D]
    assert list((root / "projects" / P / "datasets" / D / "tables").iterdir()) == []


def test_unusual_but_valid_ids_are_encoded_inside_root(wh):
    table = "résumé table-1 ①"
    long_ds = "d" * 1024
    wh.create_dataset("example.com:imaging", long_ds)
    wh.write_table(P, D, table, SCHEMA, [rows(1)], if_exists="error")
    wh.write_table("example.com:imaging", long_ds, "t", SCHEMA, [rows(2)], if_exists="error")
    assert [t["tableReference"]["tableId"] for t in wh.list_tables(P, D)] == [table]
    assert wh.query(f"SELECT COUNT(*) AS n FROM `{P}.{D}.{table}`")[1] == [{"n": 1}]
    assert wh.query(f"SELECT COUNT(*) AS n FROM `example.com:imaging.{long_ds}.t`")[1] == [{"n": 2}]
    assert [d["datasetReference"]["datasetId"] for d in wh.list_datasets("example.com:imaging")] == [long_ds]
    for path in wh.root.rglob("*"):
        rel = path.relative_to(wh.root)
        for part in rel.parts:
            assert len(part) <= 200 and set(part) <= set(
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-%~.")
            assert part not in (".", "..")
    assert wmod._fs_name("a.b/c") == "a%2Eb%2Fc"
