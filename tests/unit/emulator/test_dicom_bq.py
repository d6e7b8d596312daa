"""Tests of healthcare_emulator.dicom_bq (DICOM -> BigQuery rows and schemas)."""

from __future__ import annotations

import copy
import functools
import io
import json
import math
import os
import pathlib
import re
import struct
import warnings
from datetime import date, datetime, time, timedelta, timezone

import pydicom
import pydicom.data
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import DicomDictionary
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from healthcare_emulator import dicom_bq as m

DATA = pathlib.Path(os.path.dirname(pydicom.data.__file__))
TEST_FILES = DATA / "test_files"
CHARSET_FILES = DATA / "charset_files"
CORPUS = sorted(p for d in (TEST_FILES, CHARSET_FILES) for p in d.rglob("*") if p.is_file())
UTC = timezone.utc
# pydicom's own read-time message for one corpus file (SC_rgb_jpeg.dcm)
pytestmark = pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning")

NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
TAG_RE = re.compile(r"Tag_[0-9A-F]{8}\Z")
TYPES = {"STRING", "INTEGER", "FLOAT", "DATE", "TIME", "TIMESTAMP", "RECORD", "JSON"}
MODES = {"NULLABLE", "REPEATED"}


# --------------------------------------------------------------------------
# validator: schema structure and row-vs-schema conformance
# --------------------------------------------------------------------------

def check_schema(schema: list, depth: int = 0) -> int:
    """Assert the schema is a valid BigQuery schema; return its RECORD nesting depth."""
    assert isinstance(schema, list) and schema, "a schema/RECORD needs at least one field"
    names = [f["name"] for f in schema]
    assert len({n.lower() for n in names}) == len(names), f"duplicate names {names}"
    deepest = depth
    for f in schema:
        assert set(f) <= {"name", "type", "mode", "fields", "description"}, f
        assert NAME_RE.match(f["name"]) and len(f["name"]) <= 300, f["name"]
        assert f["type"] in TYPES, f
        assert f["mode"] in MODES, f
        if f["type"] == "RECORD":
            deepest = max(deepest, check_schema(f["fields"], depth + 1))
        else:
            assert "fields" not in f, f
    assert deepest <= m.MAX_NESTING, f"nesting {deepest} > {m.MAX_NESTING}"
    return deepest


def check_scalar(v, f: dict, path: str) -> None:
    t = f["type"]
    if t == "STRING":
        assert type(v) is str, (path, v)
        v.encode("utf-8")  # no lone surrogates
    elif t == "JSON":
        assert type(v) is str, (path, v)
        json.loads(v)
    elif t == "INTEGER":
        assert type(v) is int and -(1 << 63) <= v < (1 << 63), (path, v)
    elif t == "FLOAT":
        assert type(v) is float, (path, v)
    elif t == "DATE":
        assert type(v) is date, (path, v)
    elif t == "TIME":
        assert type(v) is time and v.tzinfo is None, (path, v)
    elif t == "TIMESTAMP":
        assert type(v) is datetime and v.utcoffset() == timedelta(0), (path, v)
        assert 1 <= v.year <= 9999
    elif t == "RECORD":
        assert type(v) is dict, (path, v)
        check_row(v, f["fields"], path + ".")
    else:  # pragma: no cover
        raise AssertionError(t)


def check_row(row: dict, schema: list, path: str = "") -> None:
    """Assert `row` conforms to `schema`: known keys, types, modes."""
    idx = {f["name"]: f for f in schema}
    for k, v in row.items():
        assert k in idx, f"{path}{k} not in schema"
        assert v is not None, f"{path}{k} is None"
        f = idx[k]
        if f["mode"] == "REPEATED":
            assert type(v) is list, (path + k, v)
            for i, x in enumerate(v):
                assert x is not None
                check_scalar(x, f, f"{path}{k}[{i}]")
        else:
            check_scalar(v, f, path + k)


def row_depth(v, d: int = 0) -> int:
    if isinstance(v, dict):
        return max([d] + [row_depth(x, d + 1) for x in v.values()])
    if isinstance(v, list):
        return max([d] + [row_depth(x, d) for x in v])
    return d


def dropped(row: dict) -> list:
    return [d["TagName"] for d in row.get("DroppedTags", [])]


def field(schema: list, name: str) -> dict:
    return next(f for f in schema if f["name"] == name)


# --------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def mapped(path: pathlib.Path):
    """(flattened (row, schema, issues), json (row, schema, issues)) or None."""
    try:
        ds = m.read_header(path)
    except m.InvalidDicom:
        return None
    return m.flattened_row(ds), m.json_row(ds, source_store="projects/p/dicomStores/s")


def corpus_id(p: pathlib.Path) -> str:
    return str(p.relative_to(DATA))


@pytest.mark.parametrize("path", CORPUS, ids=corpus_id)
def test_corpus_file_maps_and_conforms(path):
    res = mapped(path)
    if res is None:
        return  # not DICOM: read_header raised InvalidDicom (checked separately)
    (row, schema, issues), (jrow, jschema, jissues) = res
    if row:
        check_schema(schema)
    check_row(row, schema)
    assert [f["name"] for f in schema] == list(row), "schema lists exactly the row's columns"
    assert row_depth(row) <= 2 * m.MAX_NESTING  # lists do not count as levels
    assert all(isinstance(i, str) for i in issues + jissues)
    for d in row.get("OtherElements", []):
        assert TAG_RE.match(d["Tag"])
    # json layout
    check_schema(jschema)
    assert jschema == m.JSON_SCHEMA(True)
    check_row(jrow, jschema)
    meta = json.loads(jrow["Metadata"])
    assert "7FE00010" not in meta
    assert all(re.fullmatch(r"[0-9A-F]{8}", k) for k in meta)
    # deterministic, also when pydicom has converted some elements meanwhile
    ds = m.read_header(path)
    assert m.flattened_row(ds)[:2] == (row, schema)
    assert m.flattened_row(ds)[:2] == (row, schema)


def test_corpus_readable_and_invalid_files():
    readable = [p for p in CORPUS if mapped(p) is not None]
    assert len(readable) >= 170
    for name in ("README.txt", "zipMR.gz", "test1.json", "crayons.icc", "rtplan.dump"):
        with pytest.raises(m.InvalidDicom):
            m.read_header(TEST_FILES / name)
    for name in ("CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                 "ExplVR_BigEndNoMeta.dcm", "dicomdirtests/DICOMDIR"):
        assert mapped(TEST_FILES / name) is not None, name


def test_corpus_union_is_consistent_and_every_row_conforms():
    rows, schemas = [], []
    for p in CORPUS:
        res = mapped(p)
        if res is not None:
            rows.append(res[0][0])
            schemas.append(res[0][1])
    for prefer in ("left", "widen"):
        union: list = []
        for s in schemas:
            union = m.union_schemas(union, s, prefer=prefer)
        check_schema(union)
        for row in rows:
            issues: list = []
            out = m.conform_row(row, union, issues)
            assert out is row and issues == []  # generated types never conflict
            check_row(out, union)
    # conform also works into a schema where every column became STRING-ish
    widened = m.union_schemas(union, [{"name": "Rows", "type": "STRING", "mode": "NULLABLE"}],
                              prefer="widen")
    assert field(widened, "Rows")["type"] == "STRING"
    for row in rows:
        issues = []
        out = m.conform_row(row, widened, issues)
        check_row(out, widened)
        assert issues == []
        if "Rows" in row:
            assert out["Rows"] == str(row["Rows"])


def test_own_sequence_parser_matches_pydicom(monkeypatch):
    """Sequences parsed by dicom_bq give the same rows as pydicom's parser."""
    files = [p for p in CORPUS if mapped(p) is not None]
    monkeypatch.setattr(m.elements, "_FAST_SQ", False)
    for p in files:
        ds = m.read_header(p)
        assert m.flattened_row(ds)[:2] == mapped(p)[0][:2], p
        assert m.json_row(ds, source_store="projects/p/dicomStores/s")[0]["Metadata"] == \
            mapped(p)[1][0]["Metadata"], p


def _convert_all(ds):
    for elem in ds:  # iterating converts every raw element with pydicom
        if elem.VR == "SQ":
            for item in elem.value:
                _convert_all(item)


def test_raw_fast_paths_match_pydicom_converted_values():
    for p in CORPUS:
        if mapped(p) is None:
            continue
        ds = m.read_header(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                _convert_all(ds)
            except Exception:  # noqa: BLE001 - pydicom itself cannot convert this file
                continue
        assert m.flattened_row(ds)[:2] == mapped(p)[0][:2], p
        assert m.json_row(ds, source_store="projects/p/dicomStores/s")[0]["Metadata"] == \
            mapped(p)[1][0]["Metadata"], p


# --------------------------------------------------------------------------
# specific real files
# --------------------------------------------------------------------------

def test_ct_small():
    (row, schema, issues), _ = mapped(TEST_FILES / "CT_small.dcm")
    assert issues == []
    assert row["PatientName"] == {"Alphabetic": {"FamilyName": "CompressedSamples",
                                                 "GivenName": "CT1"}}
    pn = field(schema, "PatientName")
    assert pn["type"] == "RECORD" and pn["mode"] == "NULLABLE"
    assert [g["name"] for g in pn["fields"]] == ["Alphabetic", "Ideographic", "Phonetic"]
    for g in pn["fields"]:
        assert g["type"] == "RECORD" and g["mode"] == "NULLABLE"
        assert [(c["name"], c["type"], c["mode"]) for c in g["fields"]] == [
            (c, "STRING", "NULLABLE") for c in
            ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")]
    assert row["StudyDate"] == date(2004, 1, 19)
    assert field(schema, "StudyDate")["type"] == "DATE"
    assert row["StudyTime"] == time(7, 27, 30)
    assert field(schema, "StudyTime")["type"] == "TIME"
    assert row["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert field(schema, "ImageType") == {"name": "ImageType", "type": "STRING",
                                          "mode": "REPEATED"}
    assert row["PixelSpacing"] == ["0.661468", "0.661468"]
    assert field(schema, "PixelSpacing") == {"name": "PixelSpacing", "type": "STRING",
                                             "mode": "REPEATED"}
    assert row["SliceThickness"] == "5.000000"  # DS -> STRING
    assert row["Rows"] == 128
    assert field(schema, "Rows") == {"name": "Rows", "type": "INTEGER", "mode": "NULLABLE"}
    assert "PixelData" not in row and all(f["name"] != "PixelData" for f in schema)
    assert "PixelData" in dropped(row)
    assert "FileMetaInformationVersion" in dropped(row)  # OB
    # file meta columns come first
    assert list(row)[:2] == ["FileMetaInformationGroupLength", "MediaStorageSOPClassUID"]
    assert row["TransferSyntaxUID"] == "1.2.840.10008.1.2.1"
    # private tags
    other = {d["Tag"]: d["Data"] for d in row["OtherElements"]}
    assert other["Tag_00090010"] == ["GEMS_IDEN_01"]  # private creator
    assert other["Tag_00091001"] == ["GE_GENESIS_FF"]
    assert other["Tag_00431012"] == ["14", "2", "3"]
    assert field(schema, "OtherElements") == {
        "name": "OtherElements", "type": "RECORD", "mode": "REPEATED",
        "fields": [{"name": "Tag", "type": "STRING", "mode": "NULLABLE"},
                   {"name": "Data", "type": "STRING", "mode": "REPEATED"}]}
    assert [f["name"] for f in schema][-2:] == ["OtherElements", "DroppedTags"]
    assert field(schema, "DroppedTags")["fields"] == [
        {"name": "TagName", "type": "STRING", "mode": "NULLABLE"}]


def test_source_dicom_store_column():
    ds = m.read_header(TEST_FILES / "CT_small.dcm")
    row, schema, _ = m.flattened_row(ds, source_store="projects/p/locations/l/datasets/d/"
                                                       "dicomStores/s")
    assert row["SourceDicomStore"].endswith("dicomStores/s")
    assert schema[-1] == {"name": "SourceDicomStore", "type": "STRING", "mode": "NULLABLE"}
    assert "SourceDicomStore" not in m.flattened_row(ds)[0]


def test_deep_structured_report():
    (row, schema, issues), _ = mapped(TEST_FILES / "test-SR.dcm")
    assert issues == []
    check_row(row, schema)
    content = row["ContentSequence"]
    assert isinstance(content, list) and len(content) > 1
    nested = [it for it in content if "ContentSequence" in it]
    assert nested, "SR content items nest further ContentSequences"
    assert row_depth(row) >= 4
    assert check_schema(schema) >= 3
    cs = field(schema, "ContentSequence")
    assert cs["type"] == "RECORD" and cs["mode"] == "REPEATED"
    assert any(f["name"] == "ConceptNameCodeSequence" for f in cs["fields"])
    first = content[0]["ConceptNameCodeSequence"][0]
    assert set(first) >= {"CodeValue", "CodingSchemeDesignator", "CodeMeaning"}


def test_private_sequence_becomes_tag_column():
    (row, schema, issues), _ = mapped(TEST_FILES / "priv_SQ.dcm")
    f = field(schema, "Tag_3F031001")
    assert f["type"] == "RECORD" and f["mode"] == "REPEATED"
    item = row["Tag_3F031001"][0]
    assert item["ReferringPhysicianName"]["Alphabetic"]["FamilyName"] == "111111111111111"
    assert {"Tag": "Tag_3F030010", "Data": ["123456789 1234567 1234567"]} in item["OtherElements"]
    assert {"Tag": "Tag_3F030010", "Data": ["aaabbbccc MEDICAL SYSTEMS"]} in row["OtherElements"]
    # UN sequence of undefined length (explicit VR file)
    (row, schema, _), _ = mapped(TEST_FILES / "UN_sequence.dcm")
    seq = row["Tag_4453100C"]
    assert seq[0]["ReferencedSeriesSequence"][0]["SeriesInstanceUID"].startswith("1.2.840")


def test_bad_vr_file_and_dicomdirs_never_raise():
    for name in ("badVR.dcm", "dicomdirtests/DICOMDIR-nooffset", "rtplan_truncated.dcm",
                 "MR_truncated.dcm", "reportsi_with_empty_number_tags.dcm"):
        res = mapped(TEST_FILES / name)
        assert res is not None, name
        (row, schema, _), (jrow, jschema, _) = res
        check_row(row, schema)
        check_row(jrow, jschema)
    (row, _, _), _ = mapped(TEST_FILES / "badVR.dcm")
    assert row["Modality"] == "RTDOSE"


CHARSET_NAMES = {
    "chrArab.dcm": {"Alphabetic": {"FamilyName": "قباني", "GivenName": "لنزار"}},
    "chrFren.dcm": {"Alphabetic": {"FamilyName": "Buc", "GivenName": "Jérôme"}},
    "chrGerm.dcm": {"Alphabetic": {"FamilyName": "Äneas", "GivenName": "Rüdiger"}},
    "chrGreek.dcm": {"Alphabetic": {"FamilyName": "Διονυσιος"}},
    "chrH31.dcm": {"Alphabetic": {"FamilyName": "Yamada", "GivenName": "Tarou"},
                   "Ideographic": {"FamilyName": "山田", "GivenName": "太郎"},
                   "Phonetic": {"FamilyName": "やまだ", "GivenName": "たろう"}},
    "chrH32.dcm": {"Alphabetic": {"FamilyName": "ﾔﾏﾀﾞ", "GivenName": "ﾀﾛｳ"},
                   "Ideographic": {"FamilyName": "山田", "GivenName": "太郎"},
                   "Phonetic": {"FamilyName": "やまだ", "GivenName": "たろう"}},
    "chrHbrw.dcm": {"Alphabetic": {"FamilyName": "שרון", "GivenName": "דבורה"}},
    "chrI2.dcm": {"Alphabetic": {"FamilyName": "Hong", "GivenName": "Gildong"},
                  "Ideographic": {"FamilyName": "洪", "GivenName": "吉洞"},
                  "Phonetic": {"FamilyName": "홍", "GivenName": "길동"}},
    "chrKoreanMulti.dcm": {"Alphabetic": {"FamilyName": "김희중"}},
    "chrRuss.dcm": {"Alphabetic": {"FamilyName": "Люкceмбypг"}},
    "chrX1.dcm": {"Alphabetic": {"FamilyName": "Wang", "GivenName": "XiaoDong"},
                  "Ideographic": {"FamilyName": "王", "GivenName": "小東"}},
    "chrX2.dcm": {"Alphabetic": {"FamilyName": "Wang", "GivenName": "XiaoDong"},
                  "Ideographic": {"FamilyName": "王", "GivenName": "小东"}},
}


@pytest.mark.parametrize("name", sorted(CHARSET_NAMES))
def test_character_sets_decode(name):
    (row, _, issues), (jrow, _, _) = mapped(CHARSET_FILES / name)
    assert row["PatientName"] == CHARSET_NAMES[name]
    assert issues == []
    meta = json.loads(jrow["Metadata"])
    alpha = meta["00100010"]["Value"][0]["Alphabetic"]
    assert CHARSET_NAMES[name]["Alphabetic"]["FamilyName"] in alpha


def test_character_set_per_sequence_item():
    for name in ("chrSQEncoding.dcm", "chrSQEncoding1.dcm"):
        (row, _, issues), _ = mapped(CHARSET_FILES / name)
        item = row["RequestedProcedureCodeSequence"][0]
        assert item["PatientName"] == CHARSET_NAMES["chrH32.dcm"], name
        assert issues == []


# --------------------------------------------------------------------------
# synthetic datasets (raw elements, as read from a file)
# --------------------------------------------------------------------------

def raw(tag: int, vr: str | None, value: bytes, *, little=True, implicit=False):
    return RawDataElement(BaseTag(tag), vr, len(value), value, 0, implicit, little)


def make_ds(*elems) -> Dataset:
    ds = Dataset()
    for e in elems:
        if isinstance(e, RawDataElement):
            ds._dict[e.tag] = e
        else:
            ds.add(e)
    return ds


def test_dt_converted_to_utc():
    ds = make_ds(raw(0x0008002A, "DT", b"20210711003822.5+0200"),   # AcquisitionDateTime
                 raw(0x00400002, "DA", b"20210711"),                 # ScheduledProcedureStepStartDate
                 raw(0x0018A002, "DT", b"20210711003822"))           # ContributionDateTime
    row, schema, issues = m.flattened_row(ds)
    assert row["AcquisitionDateTime"] == datetime(2021, 7, 10, 22, 38, 22, 500000, tzinfo=UTC)
    assert field(schema, "AcquisitionDateTime")["type"] == "TIMESTAMP"
    assert row["ContributionDateTime"] == datetime(2021, 7, 11, 0, 38, 22, tzinfo=UTC)
    assert issues == []
    # without an offset, TimezoneOffsetFromUTC applies
    ds = make_ds(raw(0x00080201, "SH", b"-0500 "), raw(0x0008002A, "DT", b"202107110038"))
    row, _, issues = m.flattened_row(ds)
    assert row["AcquisitionDateTime"] == datetime(2021, 7, 11, 5, 38, tzinfo=UTC)
    assert issues == []
    # partial DT
    ds = make_ds(raw(0x0008002A, "DT", b"2021"))
    assert m.flattened_row(ds)[0]["AcquisitionDateTime"] == datetime(2021, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("text,expected", [
    (b"003822", time(0, 38, 22)), (b"003822.123", time(0, 38, 22, 123000)),
    (b"0038", time(0, 38)), (b"00", time(0)), (b"235959.999999", time(23, 59, 59, 999999)),
    (b"00:38:22", time(0, 38, 22)), (b"003822 ", time(0, 38, 22)),
    (b"235960", time(23, 59, 59, 999999)),
])
def test_tm_values(text, expected):
    row, _, issues = m.flattened_row(make_ds(raw(0x00080030, "TM", text)))
    assert row["StudyTime"] == expected and issues == []


def test_malformed_da_goes_to_other_elements_with_issue():
    ds = make_ds(raw(0x00080020, "DA", b"2021-07-11"),                 # StudyDate
                 raw(0x00100010, "PN", b"Secret^Person"),
                 raw(0x00100030, "DA", b"19xx0101"),                   # PatientBirthDate
                 raw(0x00080030, "TM", b"25:61"))                       # StudyTime
    row, schema, issues = m.flattened_row(ds)
    check_row(row, schema)
    assert "StudyDate" not in row and "PatientBirthDate" not in row and "StudyTime" not in row
    other = {d["Tag"]: d["Data"] for d in row["OtherElements"]}
    assert other == {"Tag_00080020": ["2021-07-11"], "Tag_00100030": ["19xx0101"],
                     "Tag_00080030": ["25:61"]}
    assert any("StudyDate (0008,0020)" in i and "malformed" in i for i in issues)
    assert any("PatientBirthDate" in i for i in issues)
    for i in issues:  # issues never carry values
        assert "2021-07-11" not in i and "19xx" not in i and "Secret" not in i
    assert row["PatientName"] == {"Alphabetic": {"FamilyName": "Secret", "GivenName": "Person"}}


def test_vr_mismatch_multiplicity_and_binary_problems():
    uv_tag = next(t for t, e in DicomDictionary.items() if e[0] == "UV" and e[1] == "1")
    ds = make_ds(
        raw(0x00280010, "IS", b"512 "),              # Rows (US) written as IS: coerced
        raw(0x00280011, "LO", b"wide"),              # Columns (US) as text: not a number
        raw(0x00280100, "US", b"\x10\x00\x00"),      # BitsAllocated: odd length
        raw(0x00080060, "CS", b"CT\\MR"),            # Modality VM 1 with two values
        raw(uv_tag, "UV", struct.pack("<Q", 1 << 64 - 1)),  # beyond INTEGER
        raw(0x00091010, "FL", struct.pack("<f", 0.1)),      # private FL
        raw(0x00091011, "XX", b"??"),                # unknown VR
    )
    row, schema, issues = m.flattened_row(ds)
    check_row(row, schema)
    assert row["Rows"] == 512
    assert any("Rows (0028,0010)" in i and "VR IS" in i for i in issues)
    other = {d["Tag"]: d["Data"] for d in row["OtherElements"]}
    assert other["Tag_00280011"] == ["wide"]
    assert other["Tag_00080060"] == ["CT", "MR"]
    assert other["Tag_%08X" % uv_tag] == [str(1 << 63)]
    assert other["Tag_00091010"] == ["0.1"]
    assert "BitsAllocated" in dropped(row) and "BitsAllocated" not in row
    assert any("BitsAllocated" in i for i in issues)
    assert "Tag_00091011" in dropped(row)
    assert any("more values than the dictionary VM 1" in i for i in issues)


def test_ambiguous_us_or_ss_uses_pixel_representation():
    ds = make_ds(raw(0x00280103, None, b"\x01\x00", implicit=True),   # PixelRepresentation 1
                 raw(0x00280106, None, b"\xff\xff", implicit=True))   # SmallestImagePixelValue
    row, schema, issues = m.flattened_row(ds)
    assert row["SmallestImagePixelValue"] == -1
    assert field(schema, "SmallestImagePixelValue")["type"] == "INTEGER"


def test_big_endian_and_implicit_numbers():
    ds = make_ds(raw(0x00280010, "US", b"\x02\x00", little=False),
                 raw(0x00280011, None, b"\x00\x02", implicit=True),
                 raw(0x00181164, "DS", b"0.5\\0.25"),
                 raw(0x00209153, "FD", struct.pack(">d", 2.5), little=False),  # NominalCardiacTriggerDelayTime
                 raw(0x00280009, "AT", b"\x18\x00\x63\x10"))                   # FrameIncrementPointer
    row, schema, _ = m.flattened_row(ds)
    assert row["Rows"] == 512 and row["Columns"] == 512
    assert row["ImagerPixelSpacing"] == ["0.5", "0.25"]
    assert row["NominalCardiacTriggerDelayTime"] == 2.5
    assert row["FrameIncrementPointer"] == [0x00181063]
    assert field(schema, "FrameIncrementPointer") == {
        "name": "FrameIncrementPointer", "type": "INTEGER", "mode": "REPEATED"}


def test_empty_values_sequences_and_items():
    item = Dataset()
    item.CodeValue = "121"
    ds = make_ds(raw(0x00100020, "LO", b""), raw(0x00100030, "DA", b"  "),
                 DataElement(0x00081140, "SQ", []),                 # empty sequence
                 DataElement(0x00081110, "SQ", [Dataset(), item]),  # an empty item
                 DataElement(0x00081115, "SQ", [Dataset()]),        # only empty items
                 raw(0x00181164, "DS", b"\\1"))
    row, schema, issues = m.flattened_row(ds)
    check_row(row, schema)
    assert "PatientID" not in row and "PatientBirthDate" not in row
    assert "ReferencedImageSequence" not in row
    assert "ReferencedSeriesSequence" not in row
    assert row["ReferencedStudySequence"] == [{}, {"CodeValue": "121"}]
    assert row["ImagerPixelSpacing"] == ["", "1"]  # positions kept in REPEATED STRING
    assert issues == []


def test_repeating_groups_are_one_record_column_per_keyword_with_an_item_per_group():
    ds = make_ds(raw(0x60000010, "US", b"\x02\x00"), raw(0x60020010, "US", b"\x03\x00"),
                 raw(0x60003000, "OW", b"\x00\x00"))
    row, schema, _ = m.flattened_row(ds)
    assert row["OverlayRows"] == [{"Id": "6000", "Value": 2}, {"Id": "6002", "Value": 3}]
    assert "OtherElements" not in row
    assert [f for f in schema if f["name"] == "OverlayRows"] == [
        {"name": "OverlayRows", "type": "RECORD", "mode": "REPEATED",
         "fields": [{"name": "Id", "type": "STRING", "mode": "NULLABLE"},
                    {"name": "Value", "type": "INTEGER", "mode": "NULLABLE"}]}]
    assert "OverlayData" in dropped(row)


def test_nesting_limit():
    leaf = Dataset()
    leaf.CodeValue = "leaf"
    leaf.PatientName = "A^B"
    ds = leaf
    for i in range(20):
        outer = Dataset()
        outer.CodeMeaning = f"level {i}"
        outer.ContentSequence = [ds]
        outer.add_new(0x00091010, "LO", "private")
        ds = outer
    row, schema, issues = m.flattened_row(ds)
    assert check_schema(schema) <= m.MAX_NESTING
    check_row(row, schema)
    assert "ContentSequence" in dropped(row)
    assert any("nesting levels" in i for i in issues)
    depth, node = 0, row
    while "ContentSequence" in node:
        node = node["ContentSequence"][0]
        depth += 1
    assert depth == m.MAX_NESTING
    # the json layout keeps everything
    jrow, _, _ = m.json_row(ds)
    meta = json.loads(jrow["Metadata"])
    for _ in range(20):
        meta = meta["0040A730"]["Value"][0]
    assert meta["00080100"]["Value"] == ["leaf"]


@pytest.mark.parametrize("transfer_syntax", [pydicom.uid.ImplicitVRLittleEndian,
                                             pydicom.uid.ExplicitVRLittleEndian,
                                             pydicom.uid.ExplicitVRBigEndian])
def test_large_deferred_sequence_with_known_private_tags(tmp_path, monkeypatch,
                                                        transfer_syntax):
    """A sequence above read_header's defer size, items with private tags whose VR
    comes from pydicom's private dictionary (implicit VR): same result as pydicom."""
    monkeypatch.setattr(m.reading, "_DEFER", 16 * 1024)  # same path as 1 MiB, smaller file
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4"
    blk = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
    blk.add_new(0x02, "SL", -7)
    items = []
    for i in range(300):
        it = Dataset()
        it.CodeValue = str(i)
        it.TextValue = "m" * 100
        b = it.private_block(0x0019, "GEMS_ACQU_01", create=True)
        b.add_new(0x02, "SL", 7)
        b.add_new(0x03, "DS", "1.5")
        items.append(it)
    ds.ContentSequence = items
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "big.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size > 2 * m._DEFER
    hdr = m.read_header(path)
    assert hdr._dict[BaseTag(0x0040A730)].value is None  # deferred by read_header
    row, schema, issues = m.flattened_row(hdr)
    check_row(row, schema)
    assert issues == []
    assert len(row["ContentSequence"]) == 300
    assert row["ContentSequence"][5]["OtherElements"] == [
        {"Tag": "Tag_00190010", "Data": ["GEMS_ACQU_01"]},
        {"Tag": "Tag_00191002", "Data": ["7"]}, {"Tag": "Tag_00191003", "Data": ["1.5"]}]
    assert {"Tag": "Tag_00191002", "Data": ["-7"]} in row["OtherElements"]
    full = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _convert_all(full)
    assert m.flattened_row(full)[:2] == (row, schema)
    assert m.json_row(full)[0]["Metadata"] == m.json_row(m.read_header(path))[0]["Metadata"]


def test_data_elements_built_in_memory():
    ds = Dataset()
    ds.PatientName = ["Doe^John", "Roe^Jane=R^J"]
    ds.OperatorsName = "Op^One"
    ds.StudyDate = "20210711"
    ds.StudyTime = "003822"
    ds.Rows = 64
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelSpacing = [0.5, 0.5]
    ds.add_new(0x00091010, "DS", "1.5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row, schema, issues = m.flattened_row(ds)
    check_row(row, schema)
    # VM of PatientName is 1: two values are malformed
    assert {"Tag": "Tag_00100010", "Data": ["Doe^John", "Roe^Jane=R^J"]} in row["OtherElements"]
    assert row["OperatorsName"] == [{"Alphabetic": {"FamilyName": "Op", "GivenName": "One"}}]
    assert field(schema, "OperatorsName")["mode"] == "REPEATED"
    assert row["StudyDate"] == date(2021, 7, 11) and row["StudyTime"] == time(0, 38, 22)
    assert row["Rows"] == 64 and row["PixelSpacing"] == ["0.5", "0.5"]
    assert {"Tag": "Tag_00091010", "Data": ["1.5"]} in row["OtherElements"]


DICOM_TEXT = st.text(alphabet="0123456789.:+-&\\ ^=", max_size=32)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["DA", "TM", "DT", "PN", "DS", "IS", "US", "SS",
                                            "UL", "FL", "FD", "AT", "LO", "SQ", "UN", "SV"]),
                          st.one_of(DICOM_TEXT.map(lambda s: s.encode()), st.binary(max_size=24))),
                max_size=6),
       st.booleans())
def test_random_values_never_raise(values, little):
    # (tag, vr) slots with each dictionary VR, so both matching and mismatching VRs occur
    tags = {"DA": 0x00080020, "TM": 0x00080030, "DT": 0x0008002A, "PN": 0x00100010,
            "DS": 0x00180050, "IS": 0x00200013, "US": 0x00280010, "SS": 0x00189219,
            "UL": 0x00081160, "FL": 0x00189087, "FD": 0x00209153, "AT": 0x00209165,
            "LO": 0x00100020, "SQ": 0x00081140, "UN": 0x00091010, "SV": 0x00720082}
    ds = Dataset()
    for i, (vr, b) in enumerate(values):
        tag = list(tags.values())[i * 3 % len(tags)]
        ds._dict[BaseTag(tag)] = raw(tag, vr, b, little=little)
    for fn in (m.flattened_row, m.json_row):
        row, schema, issues = fn(ds)
        if row:
            check_schema(schema)
        check_row(row, schema)


@settings(max_examples=200, deadline=None)
@given(st.times(), st.datetimes(min_value=datetime(1900, 1, 2), max_value=datetime(9998, 12, 30)),
       st.integers(min_value=-12 * 60, max_value=14 * 60))
def test_tm_dt_round_trip(t, dt, offset_min):
    sign = "-" if offset_min < 0 else "+"
    off = "%s%02d%02d" % (sign, abs(offset_min) // 60, abs(offset_min) % 60)
    tm = t.strftime("%H%M%S.%f").encode()
    dts = (dt.strftime("%Y%m%d%H%M%S.%f") + off).encode()
    row, _, issues = m.flattened_row(make_ds(raw(0x00080030, "TM", tm),
                                             raw(0x0008002A, "DT", dts),
                                             raw(0x00080020, "DA", dt.strftime("%Y%m%d").encode())))
    assert issues == []
    assert row["StudyTime"] == t.replace(tzinfo=None)
    tz = timezone(timedelta(minutes=offset_min))
    assert row["AcquisitionDateTime"] == dt.replace(tzinfo=tz).astimezone(UTC)
    assert row["StudyDate"] == dt.date()


# --------------------------------------------------------------------------
# json_row
# --------------------------------------------------------------------------

def test_json_row_ct_small():
    ds = m.read_header(TEST_FILES / "CT_small.dcm")
    when = datetime(2024, 5, 6, 7, 8, 9)
    row, schema, issues = m.json_row(ds, source_store="projects/p/dicomStores/s",
                                     blob_size=39206, last_updated=when)
    assert schema == m.JSON_SCHEMA(True)
    assert [f["name"] for f in schema] == [
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SourceDicomStore",
        "Metadata", "StructuredStorageSize", "BlobStorageSize", "DroppedTags", "StorageClass",
        "LastUpdated", "Type"]
    assert field(schema, "Metadata")["type"] == "JSON"
    assert field(schema, "DroppedTags") == {"name": "DroppedTags", "type": "STRING",
                                            "mode": "REPEATED"}
    check_row(row, schema)
    assert row["StudyInstanceUID"] == ds.StudyInstanceUID
    assert row["SOPInstanceUID"] == ds.SOPInstanceUID
    assert row["SourceDicomStore"] == "projects/p/dicomStores/s"
    assert row["StorageClass"] == "STANDARD" and row["Type"] == "INSERT"
    assert row["LastUpdated"] == when.replace(tzinfo=UTC)
    assert row["BlobStorageSize"] == 39206
    assert row["StructuredStorageSize"] == len(row["Metadata"].encode("utf-8"))
    assert "PixelData" in row["DroppedTags"]
    meta = json.loads(row["Metadata"])
    assert "7FE00010" not in meta and "00020001" not in meta
    assert meta["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "CompressedSamples^CT1"}]}
    assert meta["00280010"] == {"vr": "US", "Value": [128]}
    assert meta["00280030"] == {"vr": "DS", "Value": [0.661468, 0.661468]}
    assert meta["00200013"] == {"vr": "IS", "Value": [1]}
    assert meta["00080020"] == {"vr": "DA", "Value": ["20040119"]}
    assert meta["00091001"] == {"vr": "LO", "Value": ["GE_GENESIS_FF"]}
    assert meta["00020010"]["Value"] == ["1.2.840.10008.1.2.1"]
    assert issues == []
    row2, schema2, _ = m.json_row(ds)
    assert "SourceDicomStore" not in row2 and schema2 == m.JSON_SCHEMA(False)
    assert row2["LastUpdated"].tzinfo is not None


def test_json_row_sequences_and_special_values():
    item = Dataset()
    item.CodeValue = "1"
    ds = make_ds(DataElement(0x00081110, "SQ", [item]),
                 raw(0x00209165, "AT", b"\x18\x00\x63\x10"),
                 raw(0x00189087, "FD", struct.pack("<d", math.inf)),
                 raw(0x00180050, "DS", b"abc"),
                 raw(0x00100020, "LO", b""))
    row, schema, issues = m.json_row(ds)
    check_row(row, schema)
    meta = json.loads(row["Metadata"])
    assert meta["00081110"] == {"vr": "SQ", "Value": [{"00080100": {"vr": "SH", "Value": ["1"]}}]}
    assert meta["00209165"] == {"vr": "AT", "Value": ["00181063"]}
    assert meta["00189087"] == {"vr": "FD", "Value": ["inf"]}
    assert meta["00180050"] == {"vr": "DS", "Value": ["abc"]}
    assert meta["00100020"] == {"vr": "LO"}
    assert any("SliceThickness" in i for i in issues)
    assert "StudyInstanceUID" not in row


# --------------------------------------------------------------------------
# read_header
# --------------------------------------------------------------------------

def test_read_header_inputs():
    path = TEST_FILES / "CT_small.dcm"
    want = mapped(path)[0][:2]
    assert m.flattened_row(m.read_header(str(path)))[:2] == want
    with open(path, "rb") as f:
        assert m.flattened_row(m.read_header(f))[:2] == want
    assert m.flattened_row(m.read_header(io.BytesIO(path.read_bytes())))[:2] == want
    ds = m.read_header(path)
    assert "PixelData" not in ds
    with pytest.raises(m.InvalidDicom):
        m.read_header(io.BytesIO(b"not a dicom file" * 20))
    with pytest.raises(m.InvalidDicom):
        m.read_header(io.BytesIO(b""))
    with pytest.raises(m.InvalidDicom):
        m.read_header(TEST_FILES / "does-not-exist.dcm")
    # no preamble, big endian, but a real instance
    row, _, _ = mapped(TEST_FILES / "ExplVR_BigEndNoMeta.dcm")[0]
    assert row["SOPInstanceUID"]


# --------------------------------------------------------------------------
# union_schemas
# --------------------------------------------------------------------------

def S(name, typ, mode="NULLABLE", fields=None):
    f = {"name": name, "type": typ, "mode": mode}
    if fields is not None:
        f["fields"] = fields
    return f


def test_union_schemas_conflict_rules():
    a = [S("x", "INTEGER"), S("y", "STRING"), S("d", "DATE"), S("t", "DATE"),
         S("r", "RECORD", fields=[S("p", "STRING")]), S("m", "STRING")]
    b = [S("z", "DATE"), S("x", "FLOAT"), S("d", "STRING"), S("t", "TIMESTAMP"),
         S("r", "RECORD", fields=[S("q", "INTEGER"), S("p", "STRING", "REPEATED")]),
         S("m", "STRING", "REPEATED"), S("y", "RECORD", fields=[S("k", "STRING")])]
    a0, b0 = copy.deepcopy(a), copy.deepcopy(b)

    left = m.union_schemas(a, b)
    assert [f["name"] for f in left] == ["x", "y", "d", "t", "r", "m", "z"]
    assert field(left, "x")["type"] == "INTEGER" and field(left, "d")["type"] == "DATE"
    assert field(left, "t")["type"] == "DATE" and field(left, "y") == S("y", "STRING")
    assert field(left, "m")["mode"] == "NULLABLE"
    assert field(left, "r")["fields"] == [S("p", "STRING"), S("q", "INTEGER")]

    widen = m.union_schemas(a, b, prefer="widen")
    assert field(widen, "x")["type"] == "FLOAT"
    assert field(widen, "d")["type"] == "STRING"
    assert field(widen, "t")["type"] == "TIMESTAMP"
    assert field(widen, "y") == S("y", "STRING")  # RECORD vs STRING -> STRING, no fields
    assert field(widen, "m")["mode"] == "REPEATED"
    assert field(widen, "r")["fields"] == [S("p", "STRING", "REPEATED"), S("q", "INTEGER")]

    right = m.union_schemas(a, b, prefer="right")
    assert field(right, "x")["type"] == "FLOAT" and field(right, "m")["mode"] == "REPEATED"
    assert field(right, "y")["type"] == "RECORD"

    assert (a, b) == (a0, b0), "inputs are not modified"
    for s in (left, widen, right):
        check_schema(s)
        assert s is not a
    with pytest.raises(ValueError):
        m.union_schemas(a, b, prefer="newest")


def test_union_schemas_returns_a_when_nothing_changes():
    (_, schema, _), _ = mapped(TEST_FILES / "CT_small.dcm")
    assert m.union_schemas(schema, schema) is schema
    sub = [f for f in schema if f["name"] in ("Rows", "PatientName")]
    assert m.union_schemas(schema, sub) is schema
    assert m.union_schemas([], schema) == schema
    bigger = m.union_schemas(sub, schema)
    assert [f["name"] for f in bigger][:2] == ["PatientName", "Rows"]


# --------------------------------------------------------------------------
# conform_row
# --------------------------------------------------------------------------

def test_conform_row_fast_path_returns_same_object():
    (row, schema, _), _ = mapped(TEST_FILES / "test-SR.dcm")
    issues: list = []
    assert m.conform_row(row, schema, issues) is row and issues == []


def test_conform_row_coercions():
    schema = [S("s", "STRING"), S("rs", "STRING", "REPEATED"), S("n", "STRING"),
              S("i", "INTEGER"), S("f", "FLOAT"), S("d", "DATE"), S("t", "TIME"),
              S("ts", "TIMESTAMP"), S("ts2", "TIMESTAMP"), S("j", "JSON"), S("bad", "INTEGER"),
              S("ri", "INTEGER", "REPEATED"),
              S("rec", "RECORD", "REPEATED", [S("p", "STRING", "REPEATED"), S("q", "FLOAT")]),
              S("pn", "STRING")]
    row = {"s": 5, "rs": "a", "n": ["a", "b"], "i": "12", "f": 3, "d": "20210711",
           "t": "003822", "ts": date(2021, 7, 11), "ts2": datetime(2021, 7, 11, 0, 38),
           "j": {"a": 1}, "bad": "twelve", "ri": [1, "2", 3.0], "extra": 1, "none": None,
           "rec": {"p": 1, "q": "2.5"}, "pn": {"Alphabetic": {"FamilyName": "X"}}}
    schema_with_none = schema + [S("none", "STRING")]
    issues: list = []
    out = m.conform_row(row, schema_with_none, issues)
    check_row(out, schema_with_none)
    assert out["s"] == "5" and out["rs"] == ["a"] and out["n"] == "a\\b"
    assert out["i"] == 12 and out["f"] == 3.0 and type(out["f"]) is float
    assert out["d"] == date(2021, 7, 11) and out["t"] == time(0, 38, 22)
    assert out["ts"] == datetime(2021, 7, 11, tzinfo=UTC)
    assert out["ts2"] == datetime(2021, 7, 11, 0, 38, tzinfo=UTC)
    assert json.loads(out["j"]) == {"a": 1}
    assert out["ri"] == [1, 2, 3]
    assert out["rec"] == [{"p": ["1"], "q": 2.5}]
    assert json.loads(out["pn"]) == {"Alphabetic": {"FamilyName": "X"}}
    assert "bad" not in out and "extra" not in out and "none" not in out
    assert any(i.startswith("bad:") and "INTEGER" in i for i in issues)
    assert any(i.startswith("extra:") for i in issues)
    assert all("twelve" not in i for i in issues)
    assert row["s"] == 5, "input row is not modified"
    # scalar <-> list
    sch = [S("x", "INTEGER")]
    assert m.conform_row({"x": [7]}, sch) == {"x": 7}
    issues = []
    assert m.conform_row({"x": [7, 8]}, sch, issues) == {} and issues
    assert m.conform_row({"x": []}, sch) == {}
    # a widened column: INTEGER values into FLOAT
    (row, schema, _), _ = mapped(TEST_FILES / "CT_small.dcm")
    wide = m.union_schemas(schema, [S("Rows", "FLOAT"), S("ImageType", "STRING")],
                           prefer="widen")
    out = m.conform_row(row, wide)
    assert out["Rows"] == 128.0 and out["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    check_row(out, wide)
    # left-preferred existing table keeps its type; values are coerced into it
    existing = [S("StudyDate", "STRING"), S("Rows", "STRING", "REPEATED")]
    kept = m.union_schemas(existing, schema, prefer="left")
    out = m.conform_row(row, kept)
    assert out["StudyDate"] == "2004-01-19" and out["Rows"] == ["128"]
    check_row(out, kept)


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=True), st.text(max_size=12), st.dates(), st.times(),
    st.datetimes(timezones=st.sampled_from([None, UTC, timezone(timedelta(hours=5))])),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.one_of(SCALARS, st.lists(SCALARS, max_size=3)),
       st.sampled_from(["STRING", "INTEGER", "FLOAT", "DATE", "TIME", "TIMESTAMP", "JSON"]),
       st.sampled_from(["NULLABLE", "REPEATED"]))
def test_conform_row_output_always_fits(value, typ, mode):
    schema = [S("c", typ, mode), S("r", "RECORD", "NULLABLE", [S("c", typ, mode)])]
    issues: list = []
    out = m.conform_row({"c": value, "r": {"c": value}}, schema, issues)
    check_row(out, schema)
