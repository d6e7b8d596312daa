"""DICOM metadata -> BigQuery rows and schemas (Cloud Healthcare API export emulation).

Pure module: no I/O besides reading the DICOM header in :func:`read_header`,
imports only the standard library and pydicom.

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

Mapping (healthcare-api.md section D1) and the decisions taken for the points
the spec marks [U]
-------------------------------------------------------------------------------
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
  ``Tag_GGGGEEEE``.  Repeating-group tags (50xx, 60xx, 7Fxx, ...) use their
  keyword only for the first group (e.g. 6000); other groups (6002, ...) would
  collide on one column and are treated like unknown tags.
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
* json_row (schemaJson layout, section D2): Metadata is the DICOM JSON model
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

import json
import math
import os
import re
import struct
import threading
import warnings
from datetime import date, datetime, time, timedelta, timezone
from operator import itemgetter

import pydicom
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import (DicomDictionary, RepeatersDictionary, get_entry, keyword_dict,
                              mask_match, private_dictionary_VR)
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_deferred_data_element
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

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

MAX_NESTING = 15
_UTC = timezone.utc
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_PIXEL_TAGS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData",
               0x7FE00009: "DoubleFloatPixelData"}
_CHARSET_TAG = 0x00080005
_TZ_TAG = 0x00080201
_DEFAULT_ENC = ("iso8859",)
_PN_DELIMS = {0x5E, 0x3D, 0x5C}  # ^ = \  (ISO 2022 resets at these)
_TEXT_DELIMS = {0x0D, 0x0A, 0x09, 0x0C, 0x5C}
_HDR_ATTR = "_bq_skipped_tail"

_first = itemgetter(0)
# warnings.catch_warnings is not thread-safe: serialise this module's uses
_WARN_LOCK = threading.Lock()


class InvalidDicom(Exception):
    """The input is not a readable DICOM file."""


# --------------------------------------------------------------------------
# schema building blocks
# --------------------------------------------------------------------------

def _sf(name: str, typ: str, mode: str = "NULLABLE") -> dict:
    return {"name": name, "type": typ, "mode": mode}


_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_PN_COMPS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
_PN_SUBFIELDS = [
    {"name": g, "type": "RECORD", "mode": "NULLABLE",
     "fields": [_sf(c, "STRING") for c in _PN_COMPS]}
    for g in _PN_GROUPS
]
_OTHER_SUBFIELDS = [_sf("Tag", "STRING"), _sf("Data", "STRING", "REPEATED")]
_DROPPED_SUBFIELDS = [_sf("TagName", "STRING")]
_BQ_TYPE = {"S": "STRING", "I": "INTEGER", "F": "FLOAT", "D": "DATE", "T": "TIME",
            "Z": "TIMESTAMP"}


_OTHER_FIELD = {"name": "OtherElements", "type": "RECORD", "mode": "REPEATED",
                "fields": _OTHER_SUBFIELDS}
_DROPPED_FIELD = {"name": "DroppedTags", "type": "RECORD", "mode": "REPEATED",
                  "fields": _DROPPED_SUBFIELDS}
_SOURCE_FIELD = {"name": "SourceDicomStore", "type": "STRING", "mode": "NULLABLE"}
_FIELDS: dict = {}


def _fld(name: str, typ: str, repeated: bool) -> dict:
    """Shared (immutable) field dict of a non-sequence column."""
    key = (name, typ, repeated)
    f = _FIELDS.get(key)
    if f is None:
        mode = "REPEATED" if repeated else "NULLABLE"
        f = ({"name": name, "type": "RECORD", "mode": mode, "fields": _PN_SUBFIELDS}
             if typ == "PN" else {"name": name, "type": typ, "mode": mode})
        _FIELDS[key] = f
    return f


def JSON_SCHEMA(include_source_store: bool) -> list[dict]:
    """Fixed schema of the schemaJson layout (spec section D2)."""
    s = [_sf("StudyInstanceUID", "STRING"), _sf("SeriesInstanceUID", "STRING"),
         _sf("SOPInstanceUID", "STRING")]
    if include_source_store:
        s.append(_sf("SourceDicomStore", "STRING"))
    s += [_sf("Metadata", "JSON"), _sf("StructuredStorageSize", "INTEGER"),
          _sf("BlobStorageSize", "INTEGER"), _sf("DroppedTags", "STRING", "REPEATED"),
          _sf("StorageClass", "STRING"), _sf("LastUpdated", "TIMESTAMP"),
          _sf("Type", "STRING")]
    return s


# --------------------------------------------------------------------------
# per-VR and per-tag decision caches
# --------------------------------------------------------------------------

# decode kind of the VR an element is encoded with
#  a: ASCII text, split on "\"   u: ASCII text, single value (UR)
#  c: charset text, split        t: charset text, single value (ST LT UT)
#  p: person name   n: binary number   @: attribute tag   q: sequence   b: excluded
_VRK: dict = {}
for _v in ("AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"):
    _VRK[_v] = "a"
_VRK["UR"] = "u"
for _v in ("SH", "LO", "UC"):
    _VRK[_v] = "c"
for _v in ("ST", "LT", "UT"):
    _VRK[_v] = "t"
_VRK["PN"] = "p"
_NUMFMT = {"US": ("H", 2), "SS": ("h", 2), "UL": ("I", 4), "SL": ("i", 4),
           "FL": ("f", 4), "FD": ("d", 8), "SV": ("q", 8), "UV": ("Q", 8)}
for _v in _NUMFMT:
    _VRK[_v] = "n"
_VRK["AT"] = "@"
_VRK["SQ"] = "q"
for _v in ("OB", "OD", "OF", "OL", "OV", "OW", "UN"):
    _VRK[_v] = "b"

# column kind of a dictionary VR:
#  S STRING, I INTEGER, F FLOAT, D DATE, T TIME, Z TIMESTAMP, P PN, Q SQ, B excluded
_COLK = {"DA": "D", "TM": "T", "DT": "Z", "PN": "P", "SQ": "Q", "US or SS": "I",
         "FL": "F", "FD": "F"}
for _v in ("AE", "AS", "CS", "DS", "IS", "UI", "UR", "SH", "LO", "UC", "ST", "LT", "UT"):
    _COLK[_v] = "S"
for _v in ("US", "SS", "UL", "SL", "SV", "UV", "AT"):
    _COLK[_v] = "I"

# per tag: (name, colkind|None, repeated, implicit-decode VR|None, Tag_ name, "GGGGEEEE",
#          field dict of the column or None)
_TAGINFO: dict = {}


def _tag_info(tag: int) -> tuple:
    info = _TAGINFO.get(tag)
    if info is not None:
        return info
    hexname = "Tag_%08X" % tag
    info = (hexname, None, False, None, hexname, hexname[4:], None)
    if not (tag >> 16) & 1:
        try:
            vr, vm, _n, _r, kw = get_entry(tag)
        except KeyError:
            kw = None
        if kw and (tag in DicomDictionary or keyword_dict.get(kw) == tag or
                   _first_repeater(tag, kw)):
            ck = _COLK.get(vr, "B")
            dvr = vr if vr in _VRK else None
            bq = "PN" if ck == "P" else _BQ_TYPE.get(ck)
            info = (kw, ck, vm != "1", dvr, hexname, hexname[4:],
                    _fld(kw, bq, vm != "1") if bq else None)
    _TAGINFO[tag] = info
    return info


def _first_repeater(tag: int, kw: str) -> bool:
    """True if `tag` is the first group/element of a repeating-group entry."""
    mask = mask_match(tag)
    if not mask:
        return False
    return int(mask.replace("x", "0"), 16) == tag and RepeatersDictionary[mask][4] == kw


_NAME_ORDER: dict = {"OtherElements": 1 << 40, "DroppedTags": (1 << 40) + 1,
                     "SourceDicomStore": (1 << 40) + 2}


def _name_order(name: str) -> int:
    o = _NAME_ORDER.get(name)
    if o is None:
        if name.startswith("Tag_"):
            try:
                o = int(name[4:], 16)
            except ValueError:
                o = 1 << 36
        else:
            o = keyword_dict.get(name)
            if o is None:
                o = 1 << 36
        _NAME_ORDER[name] = o
    return o


_ENC_CACHE: dict = {}


def _encodings(terms: tuple, ctx, path: str) -> tuple:
    hit = _ENC_CACHE.get(terms)
    if hit is None:
        bad = False
        with _WARN_LOCK, warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            try:
                enc = convert_encodings(list(terms) if terms else None)
            except Exception:
                enc, bad = list(_DEFAULT_ENC), True
            if w:
                bad = True
        hit = (tuple(enc) or _DEFAULT_ENC, bad)
        _ENC_CACHE[terms] = hit
    if hit[1] and ctx is not None:
        ctx.issue(f"{path}SpecificCharacterSet (0008,0005): unknown or invalid character "
                  "set term; decoded with the closest/default repertoire")
    return hit[0]


# --------------------------------------------------------------------------
# value parsing
# --------------------------------------------------------------------------

class _Bad(Exception):
    pass


def _digits(s: str) -> bool:
    return s.isascii() and s.isdigit()


def _parse_da(s: str) -> date:
    n = len(s)
    if n == 8 and _digits(s):
        return date(int(s[:4]), int(s[4:6]), int(s[6:]))
    if n == 10 and s[4] == "." and s[7] == "." and _digits(s[:4] + s[5:7] + s[8:]):
        return date(int(s[:4]), int(s[5:7]), int(s[8:]))
    raise ValueError("DA")


def _frac(f: str) -> int:
    if not f:
        return 0
    if len(f) > 6 or not _digits(f):
        raise ValueError("fraction")
    return int(f.ljust(6, "0"))


def _parse_tm(s: str) -> time:
    if ":" in s:
        if len(s) < 5 or s[2] != ":" or (len(s) > 5 and s[5] != ":"):
            raise ValueError("TM")
        s = s.replace(":", "", 2)
    us = 0
    if "." in s:
        s, f = s.split(".", 1)
        if len(s) != 6:
            raise ValueError("TM")
        us = _frac(f)
    n = len(s)
    if n not in (2, 4, 6) or not _digits(s):
        raise ValueError("TM")
    h = int(s[:2])
    m = int(s[2:4]) if n > 2 else 0
    sec = int(s[4:6]) if n > 4 else 0
    if sec == 60:
        sec, us = 59, 999999
    return time(h, m, sec, us)


def _parse_offset(z: str) -> timezone:
    if len(z) != 5 or z[0] not in "+-" or not _digits(z[1:]):
        raise ValueError("offset")
    hh, mm = int(z[1:3]), int(z[3:])
    if hh > 14 or mm > 59:
        raise ValueError("offset")
    d = timedelta(hours=hh, minutes=mm)
    return timezone(-d if z[0] == "-" else d)


def _parse_dt(s: str, tz) -> datetime:
    i = max(s.rfind("+"), s.rfind("-"))
    if i > 0:
        tz = _parse_offset(s[i:])
        s = s[:i]
    elif i == 0:
        raise ValueError("DT")
    us = 0
    if "." in s:
        s, f = s.split(".", 1)
        if len(s) != 14:
            raise ValueError("DT")
        us = _frac(f)
    n = len(s)
    if n not in (4, 6, 8, 10, 12, 14) or not _digits(s):
        raise ValueError("DT")
    sec = int(s[12:14]) if n > 12 else 0
    if sec == 60:
        sec, us = 59, 999999
    dt = datetime(int(s[:4]), int(s[4:6]) if n > 4 else 1, int(s[6:8]) if n > 6 else 1,
                  int(s[8:10]) if n > 8 else 0, int(s[10:12]) if n > 10 else 0,
                  sec, us, tzinfo=tz or _UTC)
    return dt.astimezone(_UTC)  # OverflowError near year 1/9999 -> caller


def _parse_pn(s: str) -> dict:
    groups = s.split("=")
    if len(groups) > 3:
        raise ValueError("PN groups")
    rec = {}
    for gname, g in zip(_PN_GROUPS, groups):
        comps = g.split("^")
        if len(comps) > 5:
            raise ValueError("PN components")
        sub = {}
        for cname, c in zip(_PN_COMPS, comps):
            c = c.strip()
            if c:
                sub[cname] = c
        if sub:
            rec[gname] = sub
    return rec


_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")


def _float_str(x: float) -> str:
    """Shortest text that round-trips through float32 when x is a float32."""
    if x != x or x in (math.inf, -math.inf):
        return repr(x)
    try:
        f32 = struct.pack("<f", x)
        if struct.unpack("<f", f32)[0] == x:
            for p in range(6, 10):
                t = "%.*g" % (p, x)
                if struct.pack("<f", float(t)) == f32:
                    return t
    except (OverflowError, struct.error):
        pass
    return repr(x)


def _num_str(x) -> str:
    if type(x) is float:
        return _float_str(x)
    return str(x)


def _to_int(x):
    t = type(x)
    if t is int:
        v = x
    elif t is float:
        if not x.is_integer():
            raise ValueError("int")
        v = int(x)
    elif t is str:
        s = x.strip()
        if not _INT_RE.match(s):
            raise ValueError("int")
        v = int(s)
    elif isinstance(x, int) and not isinstance(x, bool):
        v = int(x)
    else:
        raise ValueError("int")
    if v < _INT64_MIN or v > _INT64_MAX:
        raise ValueError("range")
    return v


def _to_float(x):
    t = type(x)
    if t is float:
        return x
    if t is int:
        return float(x)
    if t is str:
        s = x.strip()
        if not _FLOAT_RE.match(s):
            raise ValueError("float")
        return float(s)
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    raise ValueError("float")


# --------------------------------------------------------------------------
# element decoding
# --------------------------------------------------------------------------

class _Ctx:
    __slots__ = ("issues", "dropped", "seen", "tz")

    def __init__(self):
        self.issues: list = []
        self.dropped: list = []
        self.seen: set = set()
        self.tz = None

    def issue(self, msg: str) -> None:
        self.issues.append(msg)

    def drop(self, name: str) -> None:
        if name not in self.seen:
            self.seen.add(name)
            self.dropped.append(name)


def _label(path: str, tag: int, info: tuple) -> str:
    name = info[4] if info[1] is None else info[0]
    return "%s%s (%04X,%04X)" % (path, name, tag >> 16, tag & 0xFFFF)


def _decode_text(b: bytes, enc: tuple, delims, ctx, where) -> str:
    """Decode charset-dependent text; `where` is a callable giving the label."""
    if len(enc) == 1 and 0x1B not in b:
        try:
            return b.decode(enc[0])
        except UnicodeDecodeError:
            ctx.issue(f"{where()}: bytes not valid in the character set; replaced")
            return b.decode(enc[0], errors="replace")
        except LookupError:
            pass
    with _WARN_LOCK, warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            s = decode_bytes(b, list(enc), delims)
        except Exception:  # noqa: BLE001
            s = b.decode("latin-1")
            w.append(None)
    if w:
        ctx.issue(f"{where()}: character set decoding problem; replaced characters")
    return s


def _split_strip(s: str) -> list:
    if "\\" in s:
        return [p.strip(" \x00") for p in s.split("\\")]
    s = s.strip(" \x00")
    return [s] if s else []


def _decode_bytes(b: bytes, little: bool, vr: str, kind: str, enc: tuple, ctx, where):
    """Decode an element's bytes into a list of str / numbers."""
    if not b:
        return []
    if kind == "a":
        return _split_strip(b.decode("latin-1"))
    if kind == "c":
        return _split_strip(_decode_text(b, enc, _TEXT_DELIMS, ctx, where))
    if kind == "p":
        return _split_strip(_decode_text(b, enc, _PN_DELIMS, ctx, where))
    if kind == "t":
        s = _decode_text(b, enc, _TEXT_DELIMS, ctx, where).rstrip(" \x00")
        return [s] if s else []
    if kind == "u":
        s = b.decode("latin-1").strip(" \x00")
        return [s] if s else []
    if kind == "n":
        fmt, size = _NUMFMT[vr]
        n, rem = divmod(len(b), size)
        if rem:
            raise _Bad("length is not a multiple of the value size")
        return list(struct.unpack(("<" if little else ">") + str(n) + fmt, b))
    if kind == "@":
        n, rem = divmod(len(b), 4)
        if rem:
            raise _Bad("length is not a multiple of the value size")
        h = struct.unpack(("<" if little else ">") + str(2 * n) + "H", b)
        return [(h[i] << 16) | h[i + 1] for i in range(0, 2 * n, 2)]
    raise _Bad("unsupported VR")


def _decode_value(value, vr: str, kind: str, enc: tuple, ctx, where):
    """Decode the converted value of a DataElement into a list of primitives."""
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        return _decode_bytes(bytes(value), True, vr, kind, enc, ctx, where)
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    if kind in "acptu":
        out = []
        for x in items:
            if x is None:
                out.append("")
                continue
            if isinstance(x, (bytes, bytearray)):
                x = _decode_text(bytes(x), enc, _TEXT_DELIMS, ctx, where)
            elif isinstance(x, (date, time)) and kind == "a":
                out.append(x)
                continue
            elif not isinstance(x, str):
                x = _num_str(x) if isinstance(x, float) else str(x)
            if kind in "acp" and len(items) == 1:
                return _split_strip(x)
            out.append(x.rstrip(" \x00") if kind == "t" else x.strip(" \x00"))
        return [] if all(v == "" for v in out) else out
    if kind == "@":
        return [int(x) for x in items if x is not None]
    out = []
    for x in items:
        if x is None or x == "":
            continue
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            out.append(x)
        elif isinstance(x, str):
            out.append(_to_float(x) if vr in ("FL", "FD") else _to_int(x))
        else:
            raise _Bad("unexpected value type")
    return out


# --- lightweight sequence parser --------------------------------------------
# pydicom parses a defined-length sequence only when it is accessed, building a
# full Dataset per item, which costs more than reading the whole file.  Items
# are parsed here into _Item objects holding RawDataElements; anything unusual
# raises and the caller falls back to pydicom's own conversion.

_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"))
_VR_OF_BYTES = {v.encode(): v for v in _VRK}
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_HH_I = {True: struct.Struct("<HHI"), False: struct.Struct(">HHI")}
_HH_2sH = {True: struct.Struct("<HH2sH"), False: struct.Struct(">HH2sH")}
_I = {True: struct.Struct("<I"), False: struct.Struct(">I")}


class _Seq:
    """A sequence element parsed here (undefined length)."""
    __slots__ = ("tag", "VR", "value")

    def __init__(self, tag: int, value: list):
        self.tag = tag
        self.VR = "SQ"
        self.value = value


class _Item:
    """A sequence item: `_dict` maps int tags to RawDataElement / _Seq."""
    __slots__ = ("_dict", "_pds")

    def __init__(self, d: dict):
        self._dict = d
        self._pds = None

    def convert(self, tag: int, enc: tuple):
        """pydicom conversion of one element (VR lookup with private creators,
        ambiguous VRs, UN re-interpretation)."""
        pds = self._pds
        if pds is None:
            pds = pydicom.Dataset({BaseTag(k): v._replace(tag=BaseTag(k))
                                   for k, v in self._dict.items()
                                   if v.__class__ is RawDataElement},
                                  parent_encoding=list(enc))
            self._pds = pds
        return pds[tag]


def _parse_items(b: bytes, pos: int, end: int, implicit: bool, little: bool,
                 undefined: bool) -> tuple:
    """Parse sequence items from b[pos:end]; returns (items, position after)."""
    hdr = _HH_I[little]
    items = []
    while pos + 8 <= end:
        g, e, ln = hdr.unpack_from(b, pos)
        pos += 8
        tag = (g << 16) | e
        if tag == _SEQ_END:
            return items, pos
        if tag != _ITEM:
            raise _Bad("item tag expected")
        if ln == 0xFFFFFFFF:
            d, pos = _parse_elements(b, pos, end, implicit, little, True)
        else:
            iend = pos + ln
            if iend > end:
                raise _Bad("item beyond the sequence")
            d, _ = _parse_elements(b, pos, iend, implicit, little, False)
            pos = iend
        items.append(_Item(d))
    if undefined:
        raise _Bad("missing sequence delimiter")
    return items, pos


def _skip_fragments(b: bytes, pos: int, end: int, little: bool) -> int:
    hdr = _HH_I[little]
    while pos + 8 <= end:
        g, e, ln = hdr.unpack_from(b, pos)
        pos += 8
        tag = (g << 16) | e
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM or ln == 0xFFFFFFFF:
            raise _Bad("fragment expected")
        pos += ln
    raise _Bad("missing sequence delimiter")


def _parse_elements(b: bytes, pos: int, end: int, implicit: bool, little: bool,
                    undefined: bool) -> tuple:
    d: dict = {}
    hdr_i = _HH_I[little]
    hdr_e = _HH_2sH[little]
    long_len = _I[little]
    Raw = RawDataElement
    while pos + 8 <= end:
        if implicit:
            g, e, ln = hdr_i.unpack_from(b, pos)
            vr = None
            vpos = pos + 8
        else:
            g, e, vrb, ln = hdr_e.unpack_from(b, pos)
            if g == 0xFFFE:
                vr = None
                ln = long_len.unpack_from(b, pos + 4)[0]
                vpos = pos + 8
            else:
                vr = _VR_OF_BYTES.get(vrb)
                if vr is None:
                    raise _Bad("unknown VR")
                if vrb in _LONG_VRS:
                    if pos + 12 > end:
                        raise _Bad("truncated")
                    ln = long_len.unpack_from(b, pos + 8)[0]
                    vpos = pos + 12
                else:
                    vpos = pos + 8
        tag = (g << 16) | e
        if tag == _ITEM_END:
            return d, vpos
        if g == 0xFFFE:
            raise _Bad("unexpected delimiter")
        if ln == 0xFFFFFFFF:
            if vr == "SQ" or (vr is None and (_tag_info(tag)[3] == "SQ" or (
                    b[vpos:vpos + 4] == (b"\xfe\xff\x00\xe0" if little else b"\xff\xfe\xe0\x00")))):
                items, pos = _parse_items(b, vpos, end, implicit, little, True)
                d[tag] = _Seq(tag, items)
            elif vr == "UN":
                # undefined-length UN: a sequence in implicit VR little endian
                items, pos = _parse_items(b, vpos, end, True, True, True)
                d[tag] = _Seq(tag, items)
            else:
                pos = _skip_fragments(b, vpos, end, little)
                d[tag] = Raw(tag, vr or "OB", ln, None, vpos, implicit, little)
            continue
        pos = vpos + ln
        if pos > end:
            raise _Bad("value beyond its container")
        d[tag] = Raw(tag, vr, ln, b[vpos:pos], vpos, implicit, little)
    if undefined:
        raise _Bad("missing item delimiter")
    return d, pos


_FAST_SQ = True  # parse defined-length sequences here (False: always pydicom)


def _un_items(b, info: tuple):
    """Items of a private/unknown element whose VR is unknown (implicit VR or
    UN) but whose bytes are a complete sequence of items, else None."""
    if b and b[:4] == b"\xfe\xff\x00\xe0" and (info[1] is None or info[1] == "Q"):
        try:
            items, end = _parse_items(b, 0, len(b), True, True, False)
        except (_Bad, struct.error):
            return None
        if items and end == len(b):
            return items
    return None


_PRIV_VR: dict = {}


def _implicit_vr(ds, tag: int) -> str:
    """VR of an implicit-VR element that is not in the public dictionary, as
    pydicom determines it: private creators are LO, other private tags come
    from pydicom's private dictionary via their creator, else UN; unknown
    public group lengths are UL."""
    g, e = tag >> 16, tag & 0xFFFF
    if not g & 1:
        return "UL" if e == 0 else "UN"
    if 0x10 <= e <= 0xFF:
        return "LO"
    if not e & 0xFF00:
        return "UN"
    ce = ds._dict.get((g << 16) | (e >> 8))
    if ce is None:
        return "UN"
    v = ce.value
    if isinstance(v, (bytes, bytearray)):
        creator = bytes(v).decode("latin-1").rstrip(" \x00")
    elif isinstance(v, str):
        creator = v.rstrip(" \x00")
    else:
        return "UN"
    if not creator:
        return "UN"
    key = (creator, g, e & 0xFF)
    vr = _PRIV_VR.get(key)
    if vr is None:
        try:
            vr = private_dictionary_VR(tag, creator)
        except KeyError:
            vr = "UN"
        _PRIV_VR[key] = vr
    return vr


def _undefer(ds, raw):
    """Read the value of a deferred raw element from its file (as pydicom does)."""
    src = ds.filename or ds.buffer
    if ds.filename and ds.buffer and not getattr(ds.buffer, "closed", False):
        src = ds.buffer
    return read_deferred_data_element(ds.fileobj_type, src, ds.timestamp, raw)


def _element(ds, tag: int, elem, info: tuple, enc: tuple, ctx, where):
    """Return (vr, values): values is None for excluded elements, a list of
    items for SQ, else a list of primitives.  Raises on unreadable elements."""
    if elem.__class__ is RawDataElement:
        vr = elem.VR
        b = elem.value
        if vr is None:
            vr = info[3]
            if vr is None and info[1] is None:
                vr = _implicit_vr(ds, tag)
                if vr == "UN":
                    items = _un_items(b, info) if b else None
                    return ("SQ", items) if items is not None else ("UN", None)
        kind = _VRK.get(vr) if vr is not None else None
        if kind == "q":
            if _FAST_SQ:
                try:
                    if b is None and elem.length:
                        b = _undefer(ds, elem).value  # a sequence above the defer size
                    if b is not None:
                        items, _ = _parse_items(b, 0, len(b), elem.is_implicit_VR,
                                                elem.is_little_endian, False)
                        return "SQ", items
                except Exception:  # noqa: BLE001 - pydicom gets its chance below
                    pass
        elif kind == "b":
            if vr != "UN":
                return vr, None
        elif kind is not None and (b is not None or not elem.length):
            return vr, _decode_bytes(b, elem.is_little_endian, vr, kind, enc, ctx, where)
        # slow path: pydicom resolves the VR (implicit VR private tags via the
        # private dictionary, ambiguous VRs, UN), reads deferred values and
        # parses unusual sequences
        with _WARN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            elem = ds.convert(tag, enc) if ds.__class__ is _Item else ds[tag]
    vr = elem.VR
    kind = _VRK.get(vr, "b")
    if kind == "b":
        if vr == "UN":
            v = elem.value
            items = _un_items(v, info) if isinstance(v, bytes) else None
            if items is not None:
                return "SQ", items
        return vr, None
    if kind == "q":
        return vr, (elem.value or [])
    return vr, _decode_value(elem.value, vr, kind, enc, ctx, where)


def _charset_terms(elem) -> tuple:
    v = elem.value
    if isinstance(v, (bytes, bytearray)):
        return tuple(p.strip(" \x00") for p in bytes(v).decode("latin-1").split("\\"))
    if isinstance(v, str):
        return tuple(p.strip() for p in v.split("\\"))
    if v:
        return tuple(str(p).strip() for p in v)
    return ()


def _item_encodings(ds, enc: tuple, ctx, path: str) -> tuple:
    elem = ds._dict.get(_CHARSET_TAG)
    if elem is None:
        return enc
    terms = _charset_terms(elem)
    if not any(terms):
        return _DEFAULT_ENC
    return _encodings(terms, ctx, path)


def _sorted_items(ds) -> list:
    d = ds._dict
    return sorted(zip(map(int, d), d.values()), key=_first)


# --------------------------------------------------------------------------
# flattened layout
# --------------------------------------------------------------------------

def _typed(vals: list, ck: str, tz):
    """Convert primitives to the column kind's python type (raises on failure)."""
    if ck == "S":
        return [v if type(v) is str else (_num_str(v) if isinstance(v, float) else str(v))
                for v in vals]
    out = []
    if ck == "I":
        for v in vals:
            if v != "":
                out.append(_to_int(v))
    elif ck == "F":
        for v in vals:
            if v != "":
                out.append(_to_float(v))
    elif ck == "D":
        for v in vals:
            if v != "":
                if isinstance(v, date):
                    v = (v.astimezone(_UTC) if isinstance(v, datetime) and v.tzinfo else v)
                    out.append(date(v.year, v.month, v.day))
                else:
                    out.append(_parse_da(v))
    elif ck == "T":
        for v in vals:
            if v != "":
                if isinstance(v, time):
                    out.append(time(v.hour, v.minute, v.second, v.microsecond))
                else:
                    out.append(_parse_tm(v))
    elif ck == "Z":
        for v in vals:
            if v != "":
                if isinstance(v, datetime):
                    out.append(_plain_utc(v if v.tzinfo else v.replace(tzinfo=tz or _UTC)))
                else:
                    out.append(_parse_dt(v, tz))
    elif ck == "P":
        for v in vals:
            if v != "":
                r = _parse_pn(str(v))
                if r:
                    out.append(r)
    else:
        raise ValueError("kind")
    return out


_S1 = {True: {"H": struct.Struct("<H"), "h": struct.Struct("<h"), "I": struct.Struct("<I"),
              "i": struct.Struct("<i"), "f": struct.Struct("<f"), "d": struct.Struct("<d"),
              "q": struct.Struct("<q"), "Q": struct.Struct("<Q")},
       False: {"H": struct.Struct(">H"), "h": struct.Struct(">h"), "I": struct.Struct(">I"),
               "i": struct.Struct(">i"), "f": struct.Struct(">f"), "d": struct.Struct(">d"),
               "q": struct.Struct(">q"), "Q": struct.Struct(">Q")}}


def _flat_ds(ds, level: int, enc: tuple, ctx: _Ctx, path: str, row: dict, fields: list,
             others: list, skip=None) -> None:
    """Map the elements of `ds` into `row`/`fields`/`others` (OtherElements
    entries, added to row/fields by the caller); `level` is the nesting depth of
    the record holding these fields (0 = top level)."""
    tz = ctx.tz
    Raw = RawDataElement
    single = len(enc) == 1
    enc0 = enc[0]
    for tag, elem in _sorted_items(ds):
        if skip is not None and tag in skip:
            continue
        info = _TAGINFO.get(tag) or _tag_info(tag)
        ck = info[1]
        try:
            # fast paths: public element, raw, VR known and consistent
            if ck is not None and elem.__class__ is Raw:
                vr = elem.VR or info[3]
                b = elem.value
                if b is not None and vr is not None:
                    k = _VRK.get(vr)
                    if k == "c" and ck == "S" and single and 0x1B not in b:
                        if not b:
                            continue
                        try:
                            vals = _split_strip(b.decode(enc0))
                        except UnicodeDecodeError:
                            vals = None
                        if vals is not None:
                            if not vals:
                                continue
                            if info[2]:
                                row[info[0]] = vals
                                fields.append(info[6])
                                continue
                            if len(vals) == 1:
                                row[info[0]] = vals[0]
                                fields.append(info[6])
                                continue
                    elif k == "a":
                        if ck == "S":
                            if not b:
                                continue
                            vals = _split_strip(b.decode("latin-1"))
                            if not vals:
                                continue
                            if info[2]:
                                row[info[0]] = vals
                                fields.append(info[6])
                                continue
                            if len(vals) == 1:
                                row[info[0]] = vals[0]
                                fields.append(info[6])
                                continue
                        elif (ck == "D" or ck == "T") and not info[2] and b:
                            s = b.decode("latin-1").strip(" \x00")
                            if not s:
                                continue
                            if "\\" not in s:
                                try:
                                    v = _parse_da(s) if ck == "D" else _parse_tm(s)
                                except ValueError:
                                    pass
                                else:
                                    row[info[0]] = v
                                    fields.append(info[6])
                                    continue
                    elif k == "n" and (ck == "I" or ck == "F"):
                        if not b:
                            continue
                        fmt, size = _NUMFMT[vr]
                        if len(b) == size and not info[2] and fmt != "Q":
                            v = _S1[elem.is_little_endian][fmt].unpack(b)[0]
                            if ck == "F" and fmt in "fd":
                                row[info[0]] = v
                                fields.append(info[6])
                                continue
                            if ck == "I" and fmt not in "fd":
                                row[info[0]] = v
                                fields.append(info[6])
                                continue
            elif ck is None and elem.__class__ is Raw and level < MAX_NESTING:
                # fast path: private/unknown element with an explicit VR
                vr = elem.VR
                b = elem.value
                if vr is not None and b is not None:
                    k = _VRK.get(vr)
                    if k == "a" or (k == "c" and single and 0x1B not in b):
                        try:
                            vals = _split_strip(b.decode("latin-1" if k == "a" else enc0))
                        except UnicodeDecodeError:
                            vals = None
                        if vals is not None:
                            if vals:
                                others.append({"Tag": info[4], "Data": vals})
                            continue
                    elif k == "n" and b:
                        fmt, size = _NUMFMT[vr]
                        n, rem = divmod(len(b), size)
                        if not rem:
                            nums = struct.unpack(("<" if elem.is_little_endian else ">")
                                                 + str(n) + fmt, b)
                            others.append({"Tag": info[4], "Data": [
                                _float_str(x) if fmt in "fd" else str(x) for x in nums]})
                            continue
            vr, vals = _element(ds, tag, elem, info, enc, ctx,
                                lambda: _label(path, tag, info))
        except Exception as exc:  # noqa: BLE001 - never let one element fail a row
            ctx.issue(f"{_label(path, tag, info)}: value could not be read "
                      f"({type(exc).__name__}); dropped")
            ctx.drop(info[0])
            continue
        if vals is None:
            ctx.drop(info[0])
            continue
        if not vals:
            continue
        if vr == "SQ":
            name = info[0]
            where = _label(path, tag, info)
            if level + 1 > MAX_NESTING:
                ctx.issue(f"{where}: sequence deeper than {MAX_NESTING} nesting levels; dropped")
                ctx.drop(name)
                continue
            if ck is not None and ck != "Q":
                ctx.issue(f"{where}: sequence found for a non-sequence tag; stored as "
                          f"column {info[4]}")
                name = info[4]
            sub_path = where + " > "
            recs = []
            merged = None
            for item in vals:
                rec: dict = {}
                flds: list = []
                oth: list = []
                try:
                    ienc = _item_encodings(item, enc, ctx, sub_path)
                    _flat_ds(item, level + 1, ienc, ctx, sub_path, rec, flds, oth)
                    if oth:
                        rec["OtherElements"] = oth
                        flds.append(_OTHER_FIELD)
                except Exception as exc:  # noqa: BLE001
                    ctx.issue(f"{where}: sequence item could not be read "
                              f"({type(exc).__name__}); item dropped")
                    continue
                recs.append(rec)
                merged = flds if merged is None else _merge_fields(merged, flds)
            if not merged:
                continue
            row[name] = recs
            fields.append({"name": name, "type": "RECORD", "mode": "REPEATED",
                           "fields": merged})
            continue
        if ck is None or ck == "B" or ck == "Q":
            if ck is not None:
                ctx.issue(f"{_label(path, tag, info)}: VR {vr} does not match the dictionary; "
                          f"stored in OtherElements as {info[4]}")
            if level + 1 > MAX_NESTING:
                ctx.issue(f"{_label(path, tag, info)}: OtherElements deeper than "
                          f"{MAX_NESTING} nesting levels; dropped")
                ctx.drop(info[4])
                continue
            others.append({"Tag": info[4], "Data": _typed(vals, "S", None)})
            continue
        # public column
        if vr is not None and _COLK.get(vr, ck) != ck and not (ck == "S" and vr == "PN"):
            ctx.issue(f"{_label(path, tag, info)}: VR {vr} does not match the dictionary VR; "
                      "value coerced to the column type")
        try:
            typed = _typed(vals, ck, tz)
            if not info[2]:
                if ck == "S":
                    typed = [v for v in typed if v != ""]
                if len(typed) > 1:
                    raise _Bad("multiplicity")
        except Exception as exc:  # noqa: BLE001
            rule = ("more values than the dictionary VM 1 allows"
                    if isinstance(exc, _Bad) else f"malformed value for VR {vr}")
            where = _label(path, tag, info)
            if level + 1 > MAX_NESTING:
                ctx.issue(f"{where}: {rule}; dropped")
                ctx.drop(info[0])
                continue
            ctx.issue(f"{where}: {rule}; raw strings kept in OtherElements as {info[4]}")
            others.append({"Tag": info[4], "Data": _typed(vals, "S", None)})
            continue
        if not typed:
            continue
        name = info[0]
        if ck == "P":
            if level + 2 > MAX_NESTING:
                ctx.issue(f"{_label(path, tag, info)}: person name deeper than {MAX_NESTING} "
                          "nesting levels; dropped")
                ctx.drop(name)
                continue
            row[name] = typed if info[2] else typed[0]
            fields.append(info[6])
            continue
        row[name] = typed if info[2] else typed[0]
        fields.append(info[6])


def _merge_fields(acc: list, new: list) -> list:
    """Additive merge of generated item schemas (mutates/returns `acc`)."""
    if len(acc) == len(new):
        same = True
        for fa, fb in zip(acc, new):
            if fa["name"] != fb["name"]:
                same = False
                break
        if same:
            for i, (fa, fb) in enumerate(zip(acc, new)):
                if fa["type"] == "RECORD" and fa["fields"] is not fb["fields"]:
                    acc[i] = dict(fa, fields=_merge_fields(list(fa["fields"]), fb["fields"]))
            return acc
    idx = {f["name"]: i for i, f in enumerate(acc)}
    added = False
    for fb in new:
        i = idx.get(fb["name"])
        if i is None:
            acc.append(fb)
            idx[fb["name"]] = len(acc) - 1
            added = True
        else:
            fa = acc[i]
            if fa["type"] == "RECORD" and fb["type"] == "RECORD" and fa["fields"] is not fb["fields"]:
                acc[i] = dict(fa, fields=_merge_fields(list(fa["fields"]), fb["fields"]))
    if added:
        acc.sort(key=lambda f: _name_order(f["name"]))
    return acc


def _ds_tz(ds, ctx: _Ctx):
    elem = ds._dict.get(_TZ_TAG)
    if elem is None:
        return None
    v = elem.value
    if isinstance(v, (bytes, bytearray)):
        v = bytes(v).decode("latin-1")
    v = str(v or "").strip(" \x00")
    if not v:
        return None
    try:
        return _parse_offset(v)
    except ValueError:
        ctx.issue("TimezoneOffsetFromUTC (0008,0201): malformed; DT values without an "
                  "offset are taken as UTC")
        return None


def _top_encodings(ds, ctx: _Ctx) -> tuple:
    try:
        return _item_encodings(ds, _DEFAULT_ENC, ctx, "")
    except Exception:  # noqa: BLE001
        ctx.issue("SpecificCharacterSet (0008,0005): unreadable; default repertoire used")
        return _DEFAULT_ENC


def flattened_row(ds, *, source_store: str | None = None):
    """Map a dataset to one row of the flattened ("schemaFlattened") layout.

    Returns (row, schema_of_this_row, issues).  Never raises for bad element
    values; see the module docstring for the rules."""
    ctx = _Ctx()
    row: dict = {}
    fields: list = []
    try:
        ctx.tz = _ds_tz(ds, ctx)
    except Exception:  # noqa: BLE001
        ctx.tz = None
    others: list = []
    meta = getattr(ds, "file_meta", None)
    skip = None
    if meta is not None and len(meta):
        try:
            _flat_ds(meta, 0, _DEFAULT_ENC, ctx, "", row, fields, others)
            skip = set(map(int, meta._dict))
        except Exception as exc:  # noqa: BLE001
            ctx.issue(f"file meta information could not be read ({type(exc).__name__})")
    _flat_ds(ds, 0, _top_encodings(ds, ctx), ctx, "", row, fields, others, skip)
    if others:
        row["OtherElements"] = others
        fields.append(_OTHER_FIELD)
    for t in getattr(ds, _HDR_ATTR, ()):
        ctx.drop(_tag_info(t)[0])
    if ctx.dropped:
        row["DroppedTags"] = [{"TagName": n} for n in ctx.dropped]
        fields.append(_DROPPED_FIELD)
    if source_store is not None:
        row["SourceDicomStore"] = source_store
        fields.append(_SOURCE_FIELD)
    return row, fields, ctx.issues


# --------------------------------------------------------------------------
# JSON layout
# --------------------------------------------------------------------------

_JSON_SAFE = 1 << 53


def _json_num(x, vr: str):
    if type(x) is float:
        if x != x or x in (math.inf, -math.inf):
            return repr(x)
        return x
    if vr in ("SV", "UV") and not -_JSON_SAFE <= x <= _JSON_SAFE:
        return str(x)
    return x


def _json_numbers(vals: list, vr: str) -> tuple:
    """DS/IS values as JSON numbers (DS integers as int when exact); values
    that do not parse stay strings (second item True)."""
    value = []
    bad = False
    for s in vals:
        if s == "" or s is None:
            value.append(None)
            continue
        try:
            if vr == "IS":
                value.append(_to_int(s))
            else:
                f = _to_float(s)
                value.append(int(f) if abs(f) < _JSON_SAFE and _INT_RE.match(str(s).strip())
                             else f)
        except ValueError:
            bad = True
            value.append(_num_str(s) if isinstance(s, float) else str(s))
    return value, bad


def _json_ds(ds, enc: tuple, ctx: _Ctx, path: str, skip=None) -> dict:
    out: dict = {}
    Raw = RawDataElement
    single = len(enc) == 1
    enc0 = enc[0]
    for tag, elem in _sorted_items(ds):
        if skip is not None and tag in skip:
            continue
        info = _TAGINFO.get(tag) or _tag_info(tag)
        key = info[5]
        try:
            if elem.__class__ is Raw:
                vr = elem.VR or info[3]
                b = elem.value
                if b is not None and vr is not None:
                    k = _VRK.get(vr)
                    if k == "a":
                        vals = _split_strip(b.decode("latin-1")) if b else None
                        if not vals:
                            out[key] = {"vr": vr}
                            continue
                        if vr == "IS" or vr == "DS":
                            value, bad = _json_numbers(vals, vr)
                            if not bad:
                                out[key] = {"vr": vr, "Value": value}
                                continue
                        else:
                            out[key] = {"vr": vr, "Value": [v or None for v in vals]}
                            continue
                    elif k == "c" and single and 0x1B not in b:
                        try:
                            vals = _split_strip(b.decode(enc0)) if b else None
                        except UnicodeDecodeError:
                            vals = False
                        if vals is not False:
                            out[key] = ({"vr": vr, "Value": [v or None for v in vals]} if vals
                                        else {"vr": vr})
                            continue
                    if k == "n":
                        fmt, size = _NUMFMT[vr]
                        if len(b) == size and fmt in "HhIi":
                            out[key] = {"vr": vr, "Value": [
                                _S1[elem.is_little_endian][fmt].unpack(b)[0]]}
                            continue
            vr, vals = _element(ds, tag, elem, info, enc, ctx,
                                lambda: _label(path, tag, info))
        except Exception as exc:  # noqa: BLE001
            ctx.issue(f"{_label(path, tag, info)}: value could not be read "
                      f"({type(exc).__name__}); dropped")
            ctx.drop(info[0])
            continue
        if vals is None:
            ctx.drop(info[0])
            continue
        if not vals:
            out[key] = {"vr": vr}
            continue
        kind = _VRK.get(vr)
        if vr == "SQ":
            items = []
            where = _label(path, tag, info)
            sub = f"{where} > "
            for item in vals:
                try:
                    items.append(_json_ds(item, _item_encodings(item, enc, ctx, sub), ctx, sub))
                except Exception as exc:  # noqa: BLE001
                    ctx.issue(f"{where}: sequence item could not be read "
                              f"({type(exc).__name__}); item dropped")
            value = items
        elif kind == "p":
            value = []
            for s in vals:
                s = str(s)
                if not s:
                    value.append(None)
                    continue
                pn = {}
                for g, part in zip(_PN_GROUPS, s.split("=")):
                    part = part.rstrip(" ^")
                    if part:
                        pn[g] = part
                value.append(pn or None)
        elif vr == "AT":
            value = ["%08X" % x for x in vals]
        elif vr in ("DS", "IS"):
            value, bad = _json_numbers(vals, vr)
            if bad:
                ctx.issue(f"{_label(path, tag, info)}: malformed {vr} value; kept as a JSON "
                          "string")
        elif kind == "n":
            value = [_json_num(x, vr) for x in vals]
        else:
            value = [None if v == "" else (v if type(v) is str else str(v)) for v in vals]
        out[key] = {"vr": vr, "Value": value}
    return out


def _as_text(ds, tag: int, enc: tuple, ctx) -> str | None:
    elem = ds._dict.get(tag)
    if elem is None:
        return None
    info = _tag_info(tag)
    try:
        _vr, vals = _element(ds, tag, elem, info, enc, ctx, lambda: "")
    except Exception:  # noqa: BLE001
        return None
    if not vals or not isinstance(vals, list):
        return None
    v = vals[0]
    return v if isinstance(v, str) and v else None


def json_row(ds, *, source_store: str | None = None, blob_size: int = 0,
             last_updated: datetime | None = None):
    """Map a dataset to one row of the schemaJson layout (spec section D2).

    Returns (row, JSON_SCHEMA(source_store is not None), issues)."""
    ctx = _Ctx()
    meta = getattr(ds, "file_meta", None)
    metadata: dict = {}
    skip = None
    if meta is not None and len(meta):
        try:
            metadata.update(_json_ds(meta, _DEFAULT_ENC, ctx, ""))
            skip = set(map(int, meta._dict))
        except Exception as exc:  # noqa: BLE001
            ctx.issue(f"file meta information could not be read ({type(exc).__name__})")
    enc = _top_encodings(ds, ctx)
    metadata.update(_json_ds(ds, enc, ctx, "", skip))
    for t in getattr(ds, _HDR_ATTR, ()):
        ctx.drop(_tag_info(t)[0])
    text = json.dumps(metadata, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    row: dict = {}
    for name, tag in (("StudyInstanceUID", 0x0020000D), ("SeriesInstanceUID", 0x0020000E),
                      ("SOPInstanceUID", 0x00080018)):
        v = _as_text(ds, tag, enc, _Ctx())
        if v is not None:
            row[name] = v
    if source_store is not None:
        row["SourceDicomStore"] = source_store
    row["Metadata"] = text
    row["StructuredStorageSize"] = len(text.encode("utf-8"))
    row["BlobStorageSize"] = int(blob_size)
    if ctx.dropped:
        row["DroppedTags"] = list(ctx.dropped)
    row["StorageClass"] = "STANDARD"
    if last_updated is None:
        last_updated = datetime.now(_UTC)
    else:
        last_updated = _plain_utc(last_updated)
    row["LastUpdated"] = last_updated
    row["Type"] = "INSERT"
    return row, JSON_SCHEMA(source_store is not None), ctx.issues


# --------------------------------------------------------------------------
# schema union
# --------------------------------------------------------------------------

_PREFER = ("left", "right", "widen")
_MODE_RANK = {"REQUIRED": 0, "NULLABLE": 1, "REPEATED": 2}


def _mode(f: dict) -> str:
    return f.get("mode") or "NULLABLE"


def _widen_type(ta: str, tb: str) -> str:
    if ta == tb:
        return ta
    pair = {ta, tb}
    if pair == {"INTEGER", "FLOAT"}:
        return "FLOAT"
    if pair == {"DATE", "TIMESTAMP"}:
        return "TIMESTAMP"
    return "STRING"


def _widen_mode(ma: str, mb: str) -> str:
    return ma if _MODE_RANK.get(ma, 1) >= _MODE_RANK.get(mb, 1) else mb


def _resolve(fa: dict, fb: dict, prefer: str) -> tuple:
    ta, tb = fa["type"], fb["type"]
    ma, mb = _mode(fa), _mode(fb)
    if prefer == "left":
        return ta, ma
    if prefer == "right":
        return tb, mb
    t = _widen_type(ta, tb)
    m = _widen_mode(ma, mb)
    if m == "REQUIRED" and not (ma == mb == "REQUIRED"):
        m = "NULLABLE"
    return t, m


_IDX_CACHE: dict = {}


def _index(fields: list) -> dict:
    """name -> (field, type, repeated) for a schema/fields list, cached per list
    object (schemas are treated as immutable values)."""
    hit = _IDX_CACHE.get(id(fields))
    if hit is not None and hit[0] is fields and hit[1] == len(fields):
        return hit[2]
    idx = {f["name"]: (f, f["type"], f.get("mode") == "REPEATED") for f in fields}
    if len(_IDX_CACHE) > 4096:
        _IDX_CACHE.clear()
    _IDX_CACHE[id(fields)] = (fields, len(fields), idx)  # holds a reference: id stays unique
    return idx


def _contained(b: list, a: list, prefer: str) -> bool:
    """True if union(a, b) == a."""
    if b is a:
        return True
    ia = _index(a)
    for fb in b:
        e = ia.get(fb["name"])
        if e is None:
            return False
        fa = e[0]
        if fa is fb:
            continue
        ta = e[1]
        if ta != fb["type"] or fa.get("mode") != fb.get("mode"):
            if (ta, _mode(fa)) != _resolve(fa, fb, prefer):
                return False
        if ta == "RECORD" and fb["type"] == "RECORD":
            sa, sb = fa.get("fields") or [], fb.get("fields") or []
            if sa is not sb and not _contained(sb, sa, prefer):
                return False
    return True


def _union(a: list, b: list, prefer: str) -> list:
    """New list; unchanged fields of a and new fields of b are shared, not copied."""
    ib = {f["name"]: f for f in b}
    names_a = set()
    out = []
    for fa in a:
        names_a.add(fa["name"])
        fb = ib.get(fa["name"])
        if fb is None or fb is fa:
            out.append(fa)
            continue
        t, mo = _resolve(fa, fb, prefer)
        sa = (fa.get("fields") or []) if fa["type"] == "RECORD" else []
        sb = (fb.get("fields") or []) if fb["type"] == "RECORD" else []
        if t == fa["type"] and mo == _mode(fa) and (t != "RECORD" or _contained(sb, sa, prefer)):
            out.append(fa)
            continue
        base = fb if prefer == "right" else fa
        g = {k: v for k, v in base.items() if k != "fields"}
        g["type"], g["mode"] = t, mo
        if t == "RECORD":
            g["fields"] = _union(sa, sb, prefer)
        out.append(g)
    for fb in b:
        if fb["name"] not in names_a:
            out.append(fb)
    return out


def union_schemas(a: list, b: list, *, prefer: str = "left") -> list:
    """Additive union of two schemas (see the module docstring for the rules).

    Returns `a` itself when `b` adds or changes nothing, else a new schema that
    shares unchanged fields with `a` and `b` (neither is modified)."""
    if prefer not in _PREFER:
        raise ValueError(f"prefer must be one of {_PREFER}")
    if _contained(b, a, prefer):
        return a
    return _union(a, b, prefer)


# --------------------------------------------------------------------------
# conform_row
# --------------------------------------------------------------------------

class _NoFit(Exception):
    pass


def _no_constant(name: str):
    raise ValueError(name)


def _is_json(v: str) -> bool:
    try:
        json.loads(v, parse_constant=_no_constant)  # NaN/Infinity are not JSON
    except ValueError:
        return False
    return True


def _fits_scalar(v, t: str) -> bool:
    tv = type(v)
    if t == "STRING":
        return tv is str
    if t == "JSON":
        return tv is str and _is_json(v)
    if t == "INTEGER":
        return tv is int and _INT64_MIN <= v <= _INT64_MAX
    if t == "FLOAT":
        return tv is float
    if t == "DATE":
        return tv is date
    if t == "TIME":
        return tv is time
    if t == "TIMESTAMP":
        return tv is datetime and v.tzinfo is _UTC
    if t == "BOOLEAN" or t == "BOOL":
        return tv is bool
    return False


def _plain_utc(v: datetime) -> datetime:
    """A plain datetime in UTC (naive means UTC)."""
    v = (v if v.tzinfo else v.replace(tzinfo=_UTC)).astimezone(_UTC)
    return datetime(v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond,
                    tzinfo=_UTC)


def _iso_dt(s: str) -> datetime:
    s = s.strip()
    try:
        d = datetime.fromisoformat(s.replace("Z", "+00:00").replace(" UTC", "+00:00"))
    except ValueError:
        return _parse_dt(s, None)
    return _plain_utc(d)


def _coerce_scalar(v, t: str):
    tv = type(v)
    try:
        if t == "STRING":
            if tv is str:
                return v
            if tv is bool:
                return "true" if v else "false"
            if tv is float:
                return repr(v)
            if tv is int:
                return str(v)
            if isinstance(v, datetime):
                return (v if v.tzinfo else v.replace(tzinfo=_UTC)).astimezone(_UTC).isoformat()
            if isinstance(v, (date, time)):
                return v.isoformat()
            if isinstance(v, (dict, list)):
                return json.dumps(v, ensure_ascii=False, default=str, sort_keys=False)
            return str(v)
        if t == "JSON":
            if tv is str and _is_json(v):
                return v
            return json.dumps(v, ensure_ascii=False, default=str, allow_nan=False)
        if t == "INTEGER":
            if tv is bool:
                return int(v)
            return _to_int(v)
        if t == "FLOAT":
            if tv is bool:
                return float(v)
            return _to_float(v)
        if t == "DATE":
            if isinstance(v, datetime):
                return (v if v.tzinfo else v.replace(tzinfo=_UTC)).astimezone(_UTC).date()
            if isinstance(v, date):
                return date(v.year, v.month, v.day)
            if tv is str:
                s = v.strip()
                return date.fromisoformat(s) if "-" in s else _parse_da(s)
        elif t == "TIME":
            if isinstance(v, datetime):
                v = v.time()
            if isinstance(v, time):
                return time(v.hour, v.minute, v.second, v.microsecond)
            if tv is str:
                s = v.strip()
                return time.fromisoformat(s) if ":" in s and len(s) >= 8 else _parse_tm(s)
        elif t == "TIMESTAMP":
            if isinstance(v, datetime):
                return _plain_utc(v)
            if isinstance(v, date):
                return datetime(v.year, v.month, v.day, tzinfo=_UTC)
            if tv is str:
                return _iso_dt(v)
        elif t == "BOOLEAN" or t == "BOOL":
            if tv is bool:
                return v
            if tv is str and v.strip().lower() in ("true", "false"):
                return v.strip().lower() == "true"
    except (ValueError, OverflowError, TypeError):
        pass
    raise _NoFit


_EXACT = {"STRING": str, "FLOAT": float, "DATE": date, "TIME": time}


def _conform_value(v, f: dict, t: str, rep: bool, issues, path: str):
    """Return the coerced value, or _MISSING to drop it."""
    if t == "RECORD" or t == "STRUCT":
        sub = _index(f.get("fields") or [])
        if rep:
            if type(v) is not list:
                v = [v]
            out = None
            for i, x in enumerate(v):
                y = _conform_record_value(x, sub, issues, f"{path}[{i}]")
                if out is None:
                    if y is x:
                        continue
                    out = v[:i]
                if y is not _MISSING:
                    out.append(y)
            if out is None:
                return v
            return out if out else _MISSING
        if type(v) is list:
            if len(v) == 1:
                v = v[0]
            elif not v:
                return _MISSING
            else:
                _issue(issues, path, "several records for a NULLABLE RECORD column; dropped")
                return _MISSING
        return _conform_record_value(v, sub, issues, path)
    if rep:
        if type(v) is list:
            exact = _EXACT.get(t)
            if exact is not None:
                for x in v:
                    if type(x) is not exact:
                        break
                else:
                    return v
            else:
                for x in v:
                    if not _fits_scalar(x, t):
                        break
                else:
                    return v
            out = []
            for x in v:
                if x is None:
                    continue
                try:
                    out.append(x if _fits_scalar(x, t) else _coerce_scalar(x, t))
                except _NoFit:
                    _issue(issues, path, f"element of type {type(x).__name__} cannot be "
                                         f"stored in a {t} column; element dropped")
            return out if out else _MISSING
        try:
            return [_coerce_scalar(v, t)]
        except _NoFit:
            _issue(issues, path, f"value of type {type(v).__name__} cannot be stored in a "
                                 f"{t} column; dropped")
            return _MISSING
    if _fits_scalar(v, t):
        return v
    if type(v) is list:
        vals = [x for x in v if x is not None]
        if not vals:
            return _MISSING
        if len(vals) == 1:
            v = vals[0]
        elif t == "STRING":
            try:
                return "\\".join(_coerce_scalar(x, t) for x in vals)
            except _NoFit:
                pass
        else:
            _issue(issues, path, f"several values for a NULLABLE {t} column; dropped")
            return _MISSING
    try:
        return _coerce_scalar(v, t)
    except _NoFit:
        _issue(issues, path, f"value of type {type(v).__name__} cannot be stored in a {t} "
                             "column; dropped")
        return _MISSING


_MISSING = object()


def _issue(issues, path: str, msg: str) -> None:
    if issues is not None:
        issues.append(f"{path}: {msg}")


def _conform_record_value(v, idx: dict, issues, path: str):
    if type(v) is dict:
        return _conform_record(v, idx, issues, path)
    if type(v) is str:
        try:
            d = json.loads(v)
        except ValueError:
            d = None
        if type(d) is dict:
            r = _conform_record(d, idx, issues, path)
            return d if r is d else r
    if v is None:
        return _MISSING
    _issue(issues, path, f"value of type {type(v).__name__} cannot be stored in a RECORD "
                         "column; dropped")
    return _MISSING


def _head(row: dict, stop) -> dict:
    """Copy of the items of `row` before key `stop`."""
    out = {}
    for k, v in row.items():
        if k == stop:
            break
        out[k] = v
    return out


def _conform_record(row: dict, idx: dict, issues, prefix: str):
    out = None
    for k, v in row.items():
        e = idx.get(k)
        if e is None or v is None:
            if e is None:
                _issue(issues, prefix + k, "column not in the schema; dropped")
            if out is None:
                out = _head(row, k)
            continue
        t = e[1]
        if not e[2] and type(v) is _EXACT.get(t):
            y = v
        else:
            y = _conform_value(v, e[0], t, e[2], issues, prefix + k)
        if out is None:
            if y is v:
                continue
            out = _head(row, k)
        if y is not _MISSING:
            out[k] = y
    return row if out is None else out


def conform_row(row: dict, schema: list, issues: list | None = None) -> dict:
    """Coerce `row` into `schema` (see the module docstring).  Returns `row`
    itself when it already fits; values that cannot be coerced are dropped and
    an issue is appended to `issues` (when given)."""
    return _conform_record(row, _index(schema), issues, "")


# --------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------

_DEFER = 1 << 20


def _tail_tags(fp, ds) -> tuple:
    """Peek at the element where stop_before_pixels stopped."""
    try:
        b = fp.read(4)
    except Exception:  # noqa: BLE001
        return ()
    if len(b) != 4:
        return ()
    little = True
    try:
        little = ds.original_encoding[1] is not False
    except Exception:  # noqa: BLE001
        pass
    g, e = struct.unpack("<HH" if little else ">HH", b)
    t = (g << 16) | e
    return (t,) if t in _PIXEL_TAGS else ()


def _read(fp) -> "pydicom.Dataset":
    try:
        start = fp.tell()
        ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=_DEFER)
    except InvalidDicomError:
        fp.seek(start)
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=_DEFER, force=True)
        except Exception as exc:  # noqa: BLE001
            raise InvalidDicom(f"not a DICOM file ({type(exc).__name__})") from None
        if 0x00080018 not in ds._dict:
            raise InvalidDicom("not a DICOM file (no Part-10 header and no SOP Instance UID)")
    except Exception as exc:  # noqa: BLE001
        raise InvalidDicom(f"unreadable DICOM file ({type(exc).__name__})") from None
    tail = _tail_tags(fp, ds)
    if tail:
        object.__setattr__(ds, _HDR_ATTR, tail)
    return ds


def read_header(path_or_file) -> "pydicom.Dataset":
    """Read a DICOM file's header (everything but the pixel data).

    `path_or_file` is a path or a binary file object positioned at the start of
    the file (left open).  Values larger than 1 MiB stay deferred in the file.
    Raises InvalidDicom when the input is not DICOM."""
    if isinstance(path_or_file, (str, bytes, os.PathLike)):
        try:
            fp = open(path_or_file, "rb")
        except OSError as exc:
            raise InvalidDicom(f"cannot open file ({type(exc).__name__})") from None
        with fp:
            return _read(fp)
    return _read(path_or_file)
