"""Per-VR and per-tag decisions, cached: how a VR decodes, which column a tag gets (TagInfo)."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.datadict import DicomDictionary, RepeatersDictionary, get_entry, keyword_dict, mask_match

from .schema import _BQ_TYPE, _fld, _group_fld

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

@dataclass(slots=True, frozen=True)
class TagInfo:
    """What the mapping decides once per tag."""
    name: str            # column name: the keyword, or Tag_GGGGEEEE for private/unknown tags
    col: str | None      # column kind (see _COLK); None: private/unknown (OtherElements)
    repeated: bool       # dictionary VM other than "1"
    dict_vr: str | None  # the dictionary VR when it decodes (implicit VR elements), else None
    hexname: str         # Tag_GGGGEEEE
    json_key: str        # GGGGEEEE (the DICOM JSON model's key)
    field: dict | None   # the column's shared field dict, or None
    group_id: str | None = None  # element of a repeating group (curves 50xx, overlays 60xx, 7Fxx): the
                                 # group as four upper-case hex digits, the `Id` of its item in the column


_TAGINFO: dict[int, TagInfo] = {}


def _tag_info(tag: int) -> TagInfo:
    info = _TAGINFO.get(tag)
    if info is not None:
        return info
    hexname = "Tag_%08X" % tag
    info = TagInfo(hexname, None, False, None, hexname, hexname[4:], None)
    if not (tag >> 16) & 1:
        mask = mask_match(tag) if tag not in DicomDictionary else None
        if mask and mask[2:4] == "xx":  # a repeating group: one RECORD REPEATED {Id, Value} column per keyword
            vr, vm, _n, _r, kw = RepeatersDictionary[mask]
            ck = _COLK.get(vr, "B")
            bq = _BQ_TYPE.get(ck)
            info = TagInfo(kw, ck, vm != "1", vr if vr in _VRK else None, hexname, hexname[4:],
                           _group_fld(kw, bq, vm != "1") if bq else None, "%04X" % (tag >> 16))
            _TAGINFO[tag] = info
            return info
        try:
            vr, vm, _n, _r, kw = get_entry(tag)
        except KeyError:
            kw = None
        if kw and (tag in DicomDictionary or keyword_dict.get(kw) == tag or
                   _first_repeater(tag, kw)):
            ck = _COLK.get(vr, "B")
            dvr = vr if vr in _VRK else None
            bq = "PN" if ck == "P" else _BQ_TYPE.get(ck)
            info = TagInfo(kw, ck, vm != "1", dvr, hexname, hexname[4:],
                           _fld(kw, bq, vm != "1") if bq else None)
    _TAGINFO[tag] = info
    return info


def _first_repeater(tag: int, kw: str) -> bool:
    """True if `tag` is the first group/element of a repeating-group entry."""
    mask = mask_match(tag)
    if not mask:
        return False
    return int(mask.replace("x", "0"), 16) == tag and RepeatersDictionary[mask][4] == kw


_S1 = {True: {"H": struct.Struct("<H"), "h": struct.Struct("<h"), "I": struct.Struct("<I"),
              "i": struct.Struct("<i"), "f": struct.Struct("<f"), "d": struct.Struct("<d"),
              "q": struct.Struct("<q"), "Q": struct.Struct("<Q")},
       False: {"H": struct.Struct(">H"), "h": struct.Struct(">h"), "I": struct.Struct(">I"),
               "i": struct.Struct(">i"), "f": struct.Struct(">f"), "d": struct.Struct(">d"),
               "q": struct.Struct(">q"), "Q": struct.Struct(">Q")}}
