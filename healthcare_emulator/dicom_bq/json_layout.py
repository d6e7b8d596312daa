"""The schemaJson layout: the DICOM JSON model of all elements in one JSON column."""
from __future__ import annotations

import json
import math
from datetime import datetime
from functools import partial

from pydicom.dataelem import RawDataElement

from .elements import (
    _DEFAULT_ENC,
    _Ctx,
    _element,
    _item_encodings,
    _label,
    _sorted_items,
    _split_strip,
    _top_encodings,
)
from .reading import _HDR_ATTR
from .schema import _PN_GROUPS, JSON_SCHEMA
from .values import _INT_RE, _UTC, _num_str, _plain_utc, _to_float, _to_int
from .vr import _NUMFMT, _S1, _TAGINFO, _VRK, TagInfo, _tag_info

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


def _json_fast(elem, info: TagInfo, enc: tuple):
    """Fast path for a raw element whose VR is known: its DICOM JSON value, or None (general path)."""
    if elem.__class__ is not RawDataElement:
        return None
    vr = elem.VR or info.dict_vr
    b = elem.value
    if b is None or vr is None:
        return None
    k = _VRK.get(vr)
    if k == "a":
        vals = _split_strip(b.decode("latin-1")) if b else None
        if not vals:
            return {"vr": vr}
        if vr == "IS" or vr == "DS":
            value, bad = _json_numbers(vals, vr)
            return None if bad else {"vr": vr, "Value": value}
        return {"vr": vr, "Value": [v or None for v in vals]}
    if k == "c" and len(enc) == 1 and 0x1B not in b:
        try:
            vals = _split_strip(b.decode(enc[0])) if b else None
        except UnicodeDecodeError:
            return None
        return {"vr": vr, "Value": [v or None for v in vals]} if vals else {"vr": vr}
    if k == "n":
        fmt, size = _NUMFMT[vr]
        if len(b) == size and fmt in "HhIi":
            return {"vr": vr, "Value": [_S1[elem.is_little_endian][fmt].unpack(b)[0]]}
    return None


def _json_ds(ds, enc: tuple, ctx: _Ctx, path: str, skip=None) -> dict:
    out: dict = {}
    for tag, elem in _sorted_items(ds):
        if skip is not None and tag in skip:
            continue
        info = _TAGINFO.get(tag) or _tag_info(tag)
        try:
            fast = _json_fast(elem, info, enc)
            if fast is not None:
                out[info.json_key] = fast
                continue
            vr, vals = _element(ds, tag, elem, info, enc, ctx, partial(_label, path, tag, info))
        except Exception as exc:  # noqa: BLE001
            ctx.issue(f"{_label(path, tag, info)}: value could not be read "
                      f"({type(exc).__name__}); dropped")
            ctx.drop(info.name)
            continue
        if vals is None:
            ctx.drop(info.name)
        elif not vals:
            out[info.json_key] = {"vr": vr}
        else:
            out[info.json_key] = {"vr": vr, "Value": _json_value(ds, tag, info, vr, vals, enc, ctx, path)}
    return out


def _json_items(tag: int, info: TagInfo, items: list, enc: tuple, ctx: _Ctx, path: str) -> list:
    out = []
    where = _label(path, tag, info)
    sub = f"{where} > "
    for item in items:
        try:
            out.append(_json_ds(item, _item_encodings(item, enc, ctx, sub), ctx, sub))
        except Exception as exc:  # noqa: BLE001
            ctx.issue(f"{where}: sequence item could not be read "
                      f"({type(exc).__name__}); item dropped")
    return out


def _json_person_names(vals: list) -> list:
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
    return value


def _json_value(ds, tag: int, info: TagInfo, vr: str, vals: list, enc: tuple, ctx: _Ctx, path: str) -> list:
    """The "Value" of a decoded element in the DICOM JSON model."""
    kind = _VRK.get(vr)
    if vr == "SQ":
        return _json_items(tag, info, vals, enc, ctx, path)
    if kind == "p":
        return _json_person_names(vals)
    if vr == "AT":
        return ["%08X" % x for x in vals]
    if vr in ("DS", "IS"):
        value, bad = _json_numbers(vals, vr)
        if bad:
            ctx.issue(f"{_label(path, tag, info)}: malformed {vr} value; kept as a JSON "
                      "string")
        return value
    if kind == "n":
        return [_json_num(x, vr) for x in vals]
    return [None if v == "" else (v if type(v) is str else str(v)) for v in vals]


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
    """Map a dataset to one row of the schemaJson layout (see the package docstring).

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
        ctx.drop(_tag_info(t).name)
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
