"""Repeating groups (overlay 60xx, curve 50xx) in the export: one `RECORD REPEATED {Id, Value}` column per
keyword, one item per group, as the real export writes them; schema union across files; at every nesting
level. Files are built with pydicom; the export runs in the emulator and is read back through BigQuery."""
from __future__ import annotations

import subprocess
import sys

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from healthcare_emulator import dicom_bq
from tests.support import dicom_files
from tests.support.hcapi import HC, unique

PROJECT = "repeat-proj"


def with_overlays(src, dest, groups: dict[int, dict], *, in_item: dict[int, dict] | None = None):
    """A copy of `src` with fresh UIDs and the given overlay groups (group -> {Rows, Description, Origin})."""
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID

    def add(target: Dataset, group: int, o: dict) -> None:
        target.add_new((group << 16) | 0x0010, "US", o["Rows"])
        target.add_new((group << 16) | 0x0011, "US", o.get("Columns", o["Rows"]))
        target.add_new((group << 16) | 0x0015, "IS", str(o.get("Frames", 1)))
        target.add_new((group << 16) | 0x0022, "LO", o["Description"])
        target.add_new((group << 16) | 0x0040, "CS", "G")
        target.add_new((group << 16) | 0x0050, "SS", o["Origin"])
        target.add_new((group << 16) | 0x0100, "US", 1)
        target.add_new((group << 16) | 0x0102, "US", 0)
        target.add_new((group << 16) | 0x3000, "OW", b"\x00" * ((o["Rows"] * o.get("Columns", o["Rows"]) + 7) // 8))
    for g, o in groups.items():
        add(ds, g, o)
    if in_item:
        item = Dataset()
        item.ReferencedSOPInstanceUID = generate_uid()
        for g, o in in_item.items():
            add(item, g, o)
        ds.ReferencedImageSequence = Sequence([item])
    ds.save_as(dest, enforce_file_format=False)
    return dest


def field(schema: list, name: str) -> dict:
    return next(f for f in schema if f["name"] == name)


def test_two_overlay_groups_map_to_one_column_with_two_items(tmp_path):
    f = with_overlays(dicom_files.path("CT_small.dcm"), tmp_path / "o.dcm", {
        0x6000: {"Rows": 16, "Description": "first", "Origin": [1, 1]},
        0x6002: {"Rows": 8, "Description": "second", "Origin": [-3, 5]}})
    row, schema, issues = dicom_bq.flattened_row(dicom_bq.read_header(str(f)))
    assert row["OverlayRows"] == [{"Id": "6000", "Value": 16}, {"Id": "6002", "Value": 8}]
    assert row["OverlayDescription"] == [{"Id": "6000", "Value": "first"}, {"Id": "6002", "Value": "second"}]
    assert row["OverlayOrigin"] == [{"Id": "6000", "Value": [1, 1]}, {"Id": "6002", "Value": [-3, 5]}]
    assert row["NumberOfFramesInOverlay"] == [{"Id": "6000", "Value": "1"}, {"Id": "6002", "Value": "1"}]
    assert field(schema, "OverlayRows") == {"name": "OverlayRows", "type": "RECORD", "mode": "REPEATED", "fields": [
        {"name": "Id", "type": "STRING", "mode": "NULLABLE"}, {"name": "Value", "type": "INTEGER", "mode": "NULLABLE"}]}
    assert field(schema, "OverlayOrigin")["fields"][1] == {"name": "Value", "type": "INTEGER", "mode": "REPEATED"}
    for kw in ("OverlayType", "OverlayDescription", "NumberOfFramesInOverlay"):
        assert field(schema, kw)["fields"][1] == {"name": "Value", "type": "STRING", "mode": "NULLABLE"}, kw
    assert field(schema, "OverlayBitsAllocated")["fields"][1]["type"] == "INTEGER"
    names = [f["name"] for f in schema]
    assert len(names) == len(set(names)), "one column per keyword"
    assert not any(n.startswith("Tag_6002") for n in names)
    assert {"TagName": "OverlayData"} in row["DroppedTags"]
    assert not [i for i in issues if "Overlay" in i], issues


def test_curves_and_nested_items_use_the_same_shape(tmp_path):
    ds = pydicom.dcmread(dicom_files.path("CT_small.dcm"))
    ds.add_new(0x50000005, "US", 2)       # CurveDimensions
    ds.add_new(0x50020005, "US", 3)
    ds.add_new(0x50020022, "LO", "curve")  # CurveDescription
    item = Dataset()
    item.add_new(0x60040010, "US", 4)
    ds.ReferencedImageSequence = Sequence([item])
    ds.save_as(tmp_path / "c.dcm", enforce_file_format=False)
    row, schema, _ = dicom_bq.flattened_row(dicom_bq.read_header(str(tmp_path / "c.dcm")))
    assert row["CurveDimensions"] == [{"Id": "5000", "Value": 2}, {"Id": "5002", "Value": 3}]
    assert row["CurveDescription"] == [{"Id": "5002", "Value": "curve"}]
    assert row["ReferencedImageSequence"][0]["OverlayRows"] == [{"Id": "6004", "Value": 4}]
    nested = field(field(schema, "ReferencedImageSequence")["fields"], "OverlayRows")
    assert nested["type"] == "RECORD" and nested["mode"] == "REPEATED"


@pytest.fixture(scope="module")
def bq(hc):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery
    return bigquery.Client(project=PROJECT, credentials=AnonymousCredentials(),
                           client_options={"api_endpoint": hc.url})


def test_export_of_files_with_groups_6000_and_6002_has_both_items(hc, bq, tmp_path):
    api = HC(hc.url, project=PROJECT)
    both = with_overlays(dicom_files.path("CT_small.dcm"), tmp_path / "both.dcm", {
        0x6000: {"Rows": 16, "Description": "first", "Origin": [1, 1]},
        0x6002: {"Rows": 8, "Description": "second", "Origin": [-3, 5]}},
        in_item={0x6000: {"Rows": 2, "Description": "nested", "Origin": [0, 0]}})
    one = with_overlays(dicom_files.path("MR_small.dcm"), tmp_path / "one.dcm", {
        0x6002: {"Rows": 4, "Description": "only", "Origin": [2, 2]}})
    plain = dicom_files.with_uids(dicom_files.path("rtplan.dcm"), tmp_path / "plain.dcm")
    store = api.store()
    assert api.stow(store, [both, one, plain]).status_code == 200
    ds_id = unique("rg").replace("-", "_")
    subprocess.run([sys.executable, "-m", "healthcare_emulator", "bq", "mk", f"{PROJECT}.{ds_id}", "--data-dir",
                    str(hc.data_dir)], check=True, capture_output=True)
    table = f"{PROJECT}.{ds_id}.t"
    op = api.export_and_wait(store, {"bigqueryDestination": {"tableUri": f"bq://{table}"}})
    assert op["metadata"]["counter"] == {"success": "3"}, op

    schema = {f.name: f for f in bq.get_table(table).schema}
    rows_field = schema["OverlayRows"]
    assert (rows_field.field_type, rows_field.mode) == ("RECORD", "REPEATED")
    assert [(f.name, f.field_type, f.mode) for f in rows_field.fields] == [("Id", "STRING", "NULLABLE"),
                                                                           ("Value", "INTEGER", "NULLABLE")]
    assert schema["OverlayOrigin"].fields[1].mode == "REPEATED"
    assert not [n for n in schema if n.startswith("Tag_60")]

    got = {r.SOPInstanceUID: r for r in bq.query_and_wait(
        f"SELECT SOPInstanceUID, ARRAY(SELECT AS STRUCT o.Id, o.Value FROM UNNEST(OverlayRows) o) AS rows_, "
        f"ARRAY(SELECT d.Value FROM UNNEST(OverlayDescription) d) AS descr FROM `{table}`")}
    sop = {k: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
           for k, p in (("both", both), ("one", one), ("plain", plain))}
    assert [(x["Id"], x["Value"]) for x in got[sop["both"]].rows_] == [("6000", 16), ("6002", 8)]
    assert list(got[sop["both"]].descr) == ["first", "second"]
    assert [(x["Id"], x["Value"]) for x in got[sop["one"]].rows_] == [("6002", 4)]
    assert list(got[sop["plain"]].rows_) == []
    (n,) = bq.query_and_wait(f"SELECT COUNT(*) AS n FROM `{table}`, UNNEST(OverlayRows) o WHERE o.Id = '6002'")
    assert n.n == 2
    (nested,) = bq.query_and_wait(
        f"SELECT o.Value FROM `{table}`, UNNEST(ReferencedImageSequence) i, UNNEST(i.OverlayRows) o")
    assert nested.Value == 2
