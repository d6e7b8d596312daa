"""A lightweight sequence parser.

pydicom parses a defined-length sequence only when it is accessed, building a
full Dataset per item, which costs more than reading the whole file.  Items
are parsed here into _Item objects holding RawDataElements; anything unusual
raises and the caller falls back to pydicom's own conversion.
"""
from __future__ import annotations

import struct

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag

from .values import _Bad
from .vr import _VRK, _tag_info

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
            if vr == "SQ" or (vr is None and (_tag_info(tag).dict_vr == "SQ" or (
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

