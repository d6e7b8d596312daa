"""DICOM metadata -> BigQuery rows and schemas (Cloud Healthcare API export emulation).

Pure package: no I/O besides reading the DICOM header in :func:`read_header`,
imports only the standard library and pydicom.

Modules
-------
reading      read_header, InvalidDicom (pydicom, header only, large values deferred)
vr           per-VR decode kinds and column kinds; TagInfo, the per-tag decision record
values       DA/TM/DT/PN and number parsing; typing values to a column kind
sequences    a fast parser of sequence items (pydicom is the fallback)
elements     element decoding: character sets, raw bytes, pydicom values
flat         the flattened layout: flattened_row
json_layout  the schemaJson layout: json_row
schema       field dicts shared by rows, JSON_SCHEMA, column order, item-schema merging
union        union_schemas
conform      conform_row

Public interface
----------------
read_header(path_or_file) -> pydicom.Dataset        (raises InvalidDicom)
flattened_row(ds, *, source_store=None) -> (row, schema, issues)
json_row(ds, *, source_store=None, blob_size=0, last_updated=None) -> (row, schema, issues)
JSON_SCHEMA(include_source_store) -> schema
union_schemas(a, b, *, prefer="left") -> schema
conform_row(row, schema, issues=None) -> row

A schema is a list of BigQuery TableFieldSchema dicts (name, type, mode,
fields).  Rows are dicts of python values (str, int, float, datetime.date,
datetime.time, tz-aware UTC datetime.datetime, dict for RECORD, list for
REPEATED, JSON columns as JSON text); a missing key is NULL.  Schemas are
immutable values: no function here mutates its arguments, and results may
share unchanged sub-structures with arguments and with each other (the PN
sub-records, OtherElements/DroppedTags fields, union results); deep-copy a
schema before mutating it.

Mapping, and the decisions taken where Google's documentation is silent
-----------------------------------------------------------------------
* Column = keyword; dictionary VM "1" -> NULLABLE, any other VM -> REPEATED
  (dictionary VM, never the value count, so schemas are stable across files).
* DA->DATE, TM->TIME, DT->TIMESTAMP (UTC), DS/IS and text VRs->STRING,
  FL/FD->FLOAT, AT/SL/SS/UL/US/SV/UV->INTEGER (AT as 0xGGGGEEEE), PN->RECORD
  {Alphabetic, Ideographic, Phonetic}x{FamilyName, GivenName, MiddleName,
  NamePrefix, NameSuffix} (always the full structure), SQ->REPEATED RECORD.
  "US or SS" -> INTEGER; "OB or OW", "US or SS or OW" (LUT Data) -> excluded.
* Excluded VRs: OB OD OF OL OV OW UN (including private elements of unknown
  VR, which pydicom reports as UN, unless their bytes are a complete sequence
  of items: then they are a private sequence).  They get no column; their name is
  listed in the top-level column ``DroppedTags`` REPEATED RECORD {TagName
  STRING} (the doc's "DroppedTags.TagName").  TagName = keyword, or
  ``Tag_GGGGEEEE`` when the tag has none; a name is listed once even when it
  occurs in several sequence items.  Pixel data that read_header skipped
  (stop_before_pixels) is listed too.  Binary numbers whose length is not a
  multiple of the item size, elements pydicom cannot read, and content beyond
  BigQuery's 15 nesting levels are also dropped and listed (with an issue).
* Empty values and empty sequences are omitted (NULL).  Within a REPEATED
  STRING empty components are kept as "" (positions matter, e.g. "1\\\\2");
  in typed REPEATED columns (DATE, INTEGER, ...) empty components are skipped.
  Empty sequence items are kept as {} unless every item is empty (then the
  sequence is omitted: a RECORD needs at least one field).
* Private elements (odd group, incl. private creators) and public tags without
  a keyword (e.g. retired group lengths gggg,0000) go to ``OtherElements`` REPEATED RECORD {Tag STRING "Tag_GGGGEEEE",
  Data STRING REPEATED}, at every level; their sequences become columns named
  ``Tag_GGGGEEEE``.
* Repeating groups (curves 50xx, overlays 60xx, 7Fxx), as the real export
  writes them: one column per keyword, RECORD REPEATED {Id STRING, Value
  <the VR's type>} (Value REPEATED when the dictionary VM allows several
  values), one item per group present, in group order, at every nesting level.
  ``Id`` is the group as four upper-case hex digits ("6000", "6002"): the
  real service does not document it.  Groups 6000 and 6002 in one file give
  ``OverlayRows`` two items; the schema is the same whatever groups a file
  has, so exports of several files union to one column.  Binary elements
  (OverlayData) are dropped and listed in DroppedTags by keyword.
* A value that cannot be typed for its column (malformed DA/TM/DT, a number
  column holding text, VM>1 values for a VM 1 tag, a PN with more than 3
  groups or 5 components, a UV above the INTEGER range, a value whose explicit
  VR disagrees with the dictionary and cannot be coerced) never raises: the
  element goes to OtherElements under its ``Tag_GGGGEEEE`` with its raw
  strings, and an issue is appended.  A VR that differs from the dictionary
  but whose value coerces (e.g. IS "512" for a US tag) is stored in its column
  and reported as an issue.  Issues name tag/keyword and rule, never values.
* TM accepts HH, HHMM, HHMMSS, HHMMSS.F{1-6} and the ACR-NEMA "HH:MM:SS";
  second 60 (leap second) becomes 59.999999.  DA accepts YYYYMMDD and the
  ACR-NEMA YYYY.MM.DD.  DT: YYYY[MM[DD[HH[MM[SS[.F{1-6}]]]]]][+/-HHMM]; missing
  parts default to the earliest value; without an offset the dataset's
  TimezoneOffsetFromUTC (0008,0201) applies, else UTC; the result is UTC.
* Character sets are decoded with pydicom's SpecificCharacterSet handling,
  per sequence item when an item has its own (0008,0005); undecodable bytes
  are replaced (U+FFFD) with an issue, unknown character sets fall back to
  the default repertoire with an issue.
* File Meta (group 0002) elements are columns like any other.  Column order:
  tag order (file meta first), then OtherElements, DroppedTags,
  SourceDicomStore (only when ``source_store`` is given).
* Nesting: a RECORD at depth d needs d <= 15 (top-level columns are depth 1;
  a PN needs two levels).  Anything deeper is dropped with an issue.
* read_header: pydicom with stop_before_pixels and defer_size=1 MiB (large
  values stay in the file and are read again only if needed, so a file object
  passed in must stay open until the mapping is done; excluded VRs are never
  loaded).  Files without the
  Part-10 preamble are accepted only if a forced read yields a SOPInstanceUID;
  anything else raises InvalidDicom.
* json_row (schemaJson layout): Metadata is the DICOM JSON model
  (PS3.18 F) of all elements (file meta included) in tag order without bulk
  data: excluded-VR elements are omitted and listed in DroppedTags (STRING
  REPEATED, same names as above).  DS/IS are JSON numbers when they parse
  (else strings, with an issue), SV/UV beyond +/-2**53 and non-finite floats
  are strings, AT is "GGGGEEEE".  StructuredStorageSize = UTF-8 byte length of
  Metadata; BlobStorageSize = ``blob_size``; StorageClass "STANDARD";
  Type "INSERT"; LastUpdated = ``last_updated`` (naive means UTC) or now (UTC).
* union_schemas: fields matched by exact name; result order is a's fields,
  then b's new ones; RECORDs merge recursively.  prefer="left" (default):
  a's type and mode win every conflict (values are later coerced by
  conform_row).  prefer="right": b's type and mode win.  prefer="widen":
  INTEGER+FLOAT -> FLOAT, DATE+TIMESTAMP -> TIMESTAMP, any other conflict
  (including RECORD vs scalar) -> STRING; NULLABLE+REPEATED -> REPEATED.
  When b adds and changes nothing, ``a`` itself is returned (cheap per-row
  use); otherwise a new list sharing the unchanged fields.
* conform_row: returns ``row`` itself when it already fits; otherwise a new
  row.  Coercions: scalar -> [scalar] for REPEATED; [x] -> x for NULLABLE;
  several values into NULLABLE STRING are joined with "\\"; numbers, dates,
  times and timestamps -> STRING (ISO format); INTEGER -> FLOAT; integral
  FLOAT or numeric text -> INTEGER; numeric text -> FLOAT; DICOM or ISO text
  -> DATE/TIME/TIMESTAMP; DATE -> TIMESTAMP (midnight UTC); TIMESTAMP -> DATE;
  RECORD values -> STRING/JSON as JSON text; JSON text -> RECORD.  None values
  and keys not in the schema are dropped (the latter with an issue); values
  that cannot be coerced are dropped with an issue.
"""

from __future__ import annotations

from . import elements, reading
from .conform import conform_row
from .flat import flattened_row
from .json_layout import json_row
from .reading import InvalidDicom, read_header
from .schema import JSON_SCHEMA, MAX_NESTING
from .union import union_schemas

__all__ = [
    "InvalidDicom",
    "read_header",
    "flattened_row",
    "json_row",
    "JSON_SCHEMA",
    "union_schemas",
    "conform_row",
    "MAX_NESTING",
]

# Tunables that live in the module that reads them (patch them there); read here, live.
_LIVE = {"_DEFER": reading, "_FAST_SQ": elements}


def __getattr__(name: str):
    module = _LIVE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)
