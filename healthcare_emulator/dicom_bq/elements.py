"""Element decoding: character sets, raw bytes and pydicom values -> lists of primitives."""
from __future__ import annotations

import struct
import threading
import warnings
from datetime import date, time
from operator import itemgetter
from typing import NamedTuple

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import private_dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.filereader import read_deferred_data_element
from pydicom.multival import MultiValue

from .sequences import _Item, _parse_items
from .values import _Bad, _num_str, _parse_offset, _to_float, _to_int
from .vr import _NUMFMT, _VRK, TagInfo

_CHARSET_TAG = 0x00080005
_TZ_TAG = 0x00080201
_DEFAULT_ENC = ("iso8859",)
_PN_DELIMS = {0x5E, 0x3D, 0x5C}  # ^ = \  (ISO 2022 resets at these)
_TEXT_DELIMS = {0x0D, 0x0A, 0x09, 0x0C, 0x5C}

_first = itemgetter(0)
# warnings.catch_warnings is not thread-safe: serialise this package's uses
_WARN_LOCK = threading.Lock()


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


def _label(path: str, tag: int, info: TagInfo) -> str:
    name = info.hexname if info.col is None else info.name
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



_FAST_SQ = True  # parse defined-length sequences here (False: always pydicom)


def _un_items(b, info: TagInfo):
    """Items of a private/unknown element whose VR is unknown (implicit VR or
    UN) but whose bytes are a complete sequence of items, else None."""
    if b and b[:4] == b"\xfe\xff\x00\xe0" and (info.col is None or info.col == "Q"):
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


def _element(ds, tag: int, elem, info: TagInfo, enc: tuple, ctx, where):
    """Return (vr, values): values is None for excluded elements, a list of
    items for SQ, else a list of primitives.  Raises on unreadable elements."""
    if elem.__class__ is RawDataElement:
        vr = elem.VR
        b = elem.value
        if vr is None:
            vr = info.dict_vr
            if vr is None and info.col is None:
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


class _Encodings(NamedTuple):
    encodings: tuple   # Python codec names for the character set terms
    bad: bool          # a term was unknown or invalid


_ENC_CACHE: dict[tuple, _Encodings] = {}


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
        hit = _Encodings(tuple(enc) or _DEFAULT_ENC, bad)
        _ENC_CACHE[terms] = hit
    if hit.bad and ctx is not None:
        ctx.issue(f"{path}SpecificCharacterSet (0008,0005): unknown or invalid character "
                  "set term; decoded with the closest/default repertoire")
    return hit.encodings


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
