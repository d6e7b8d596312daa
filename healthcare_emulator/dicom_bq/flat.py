"""The flattened ("schemaFlattened") layout: one row per instance, one column per keyword."""
from __future__ import annotations

import struct
from functools import partial
from typing import NamedTuple

from pydicom.dataelem import RawDataElement

from .elements import (
    _DEFAULT_ENC,
    _Ctx,
    _ds_tz,
    _element,
    _item_encodings,
    _label,
    _sorted_items,
    _split_strip,
    _top_encodings,
)
from .reading import _HDR_ATTR
from .schema import _DROPPED_FIELD, _OTHER_FIELD, _SOURCE_FIELD, MAX_NESTING, _merge_fields
from .values import _Bad, _float_str, _parse_da, _parse_tm, _typed
from .vr import _COLK, _NUMFMT, _S1, _TAGINFO, _VRK, TagInfo, _tag_info


class _Record(NamedTuple):
    """Where one data set's elements go: its row (or sequence item), that row's fields, and the
    OtherElements entries (added to row and fields by the caller)."""
    row: dict
    fields: list
    others: list


class _Scope(NamedTuple):
    """The data set being mapped: its nesting level (0 = top level), encodings and label prefix."""
    level: int
    enc: tuple
    path: str


def _fast_public(row: dict, fields: list, info: TagInfo, elem, enc: tuple) -> bool:
    """Fast path for a raw public element whose VR is known and consistent.
    True: mapped (or empty); False: left to the general path."""
    vr = elem.VR or info.dict_vr
    b = elem.value
    if b is None or vr is None:
        return False
    ck = info.col
    k = _VRK.get(vr)
    if ck == "S" and (k == "a" or (k == "c" and len(enc) == 1 and 0x1B not in b)):
        if not b:
            return True
        try:
            vals = _split_strip(b.decode("latin-1" if k == "a" else enc[0]))
        except UnicodeDecodeError:
            return False
        if not vals:
            return True
        if info.repeated:
            row[info.name] = vals
        elif len(vals) == 1:
            row[info.name] = vals[0]
        else:
            return False
    elif k == "a" and (ck == "D" or ck == "T") and not info.repeated and b:
        s = b.decode("latin-1").strip(" \x00")
        if not s:
            return True
        if "\\" in s:
            return False
        try:
            row[info.name] = _parse_da(s) if ck == "D" else _parse_tm(s)
        except ValueError:
            return False
    elif k == "n" and (ck == "I" or ck == "F"):
        if not b:
            return True
        fmt, size = _NUMFMT[vr]
        if len(b) != size or info.repeated or fmt == "Q" or (ck == "F") != (fmt in "fd"):
            return False
        row[info.name] = _S1[elem.is_little_endian][fmt].unpack(b)[0]
    else:
        return False
    fields.append(info.field)
    return True


def _fast_private(others: list, info: TagInfo, elem, enc: tuple) -> bool:
    """Fast path for a raw private/unknown element with an explicit VR (into OtherElements)."""
    vr = elem.VR
    b = elem.value
    if vr is None or b is None:
        return False
    k = _VRK.get(vr)
    if k == "a" or (k == "c" and len(enc) == 1 and 0x1B not in b):
        try:
            vals = _split_strip(b.decode("latin-1" if k == "a" else enc[0]))
        except UnicodeDecodeError:
            return False
        if vals:
            others.append({"Tag": info.hexname, "Data": vals})
        return True
    if k == "n" and b:
        fmt, size = _NUMFMT[vr]
        n, rem = divmod(len(b), size)
        if not rem:
            nums = struct.unpack(("<" if elem.is_little_endian else ">") + str(n) + fmt, b)
            others.append({"Tag": info.hexname, "Data": [
                _float_str(x) if fmt in "fd" else str(x) for x in nums]})
            return True
    return False


def _flat_ds(ds, rec: _Record, scope: _Scope, ctx: _Ctx, skip=None) -> None:
    """Map the elements of `ds` into `rec` (its OtherElements entries are added to the
    row and fields by the caller); `scope.level` is the nesting depth of the record
    holding these fields (0 = top level)."""
    row, fields, others = rec
    level, enc, path = scope
    Raw = RawDataElement
    for tag, elem in _sorted_items(ds):
        if skip is not None and tag in skip:
            continue
        info = _TAGINFO.get(tag) or _tag_info(tag)
        try:
            if elem.__class__ is Raw and info.group_id is None and (
                    _fast_public(row, fields, info, elem, enc) if info.col is not None
                    else level < MAX_NESTING and _fast_private(others, info, elem, enc)):
                continue
            vr, vals = _element(ds, tag, elem, info, enc, ctx, partial(_label, path, tag, info))
        except Exception as exc:  # noqa: BLE001 - never let one element fail a row
            ctx.issue(f"{_label(path, tag, info)}: value could not be read "
                      f"({type(exc).__name__}); dropped")
            ctx.drop(info.name)
            continue
        if vals is None:
            ctx.drop(info.name)
        elif not vals:
            continue
        elif vr == "SQ":
            _flat_sequence(rec, tag, info, vals, scope, ctx)
        elif info.col is None or info.col == "B" or info.col == "Q":
            _flat_other(rec, tag, info, vr, vals, scope, ctx)
        else:
            _flat_column(rec, tag, info, vr, vals, scope, ctx)


def _flat_item(item, scope: _Scope, ctx: _Ctx) -> tuple[dict, list]:
    rec = _Record({}, [], [])
    ienc = _item_encodings(item, scope.enc, ctx, scope.path)
    _flat_ds(item, rec, scope if ienc is scope.enc else scope._replace(enc=ienc), ctx)
    if rec.others:
        rec.row["OtherElements"] = rec.others
        rec.fields.append(_OTHER_FIELD)
    return rec.row, rec.fields


def _flat_sequence(rec: _Record, tag: int, info: TagInfo, items: list, scope: _Scope, ctx: _Ctx) -> None:
    """A sequence: a REPEATED RECORD column whose fields are the union of its items' fields."""
    name = info.name
    where = _label(scope.path, tag, info)
    if scope.level + 1 > MAX_NESTING:
        ctx.issue(f"{where}: sequence deeper than {MAX_NESTING} nesting levels; dropped")
        ctx.drop(name)
        return
    if info.col is not None and info.col != "Q":
        ctx.issue(f"{where}: sequence found for a non-sequence tag; stored as "
                  f"column {info.hexname}")
        name = info.hexname
    item_scope = _Scope(scope.level + 1, scope.enc, where + " > ")
    recs = []
    merged = None
    for item in items:
        try:
            item_row, item_fields = _flat_item(item, item_scope, ctx)
        except Exception as exc:  # noqa: BLE001
            ctx.issue(f"{where}: sequence item could not be read "
                      f"({type(exc).__name__}); item dropped")
            continue
        recs.append(item_row)
        merged = item_fields if merged is None else _merge_fields(merged, item_fields)
    if not merged:
        return
    rec.row[name] = recs
    rec.fields.append({"name": name, "type": "RECORD", "mode": "REPEATED", "fields": merged})


def _flat_other(rec: _Record, tag: int, info: TagInfo, vr: str, vals: list, scope: _Scope, ctx: _Ctx) -> None:
    """A private/unknown element, or one whose VR does not fit its column: into OtherElements."""
    if info.col is not None:
        ctx.issue(f"{_label(scope.path, tag, info)}: VR {vr} does not match the dictionary; "
                  f"stored in OtherElements as {info.hexname}")
    if scope.level + 1 > MAX_NESTING:
        ctx.issue(f"{_label(scope.path, tag, info)}: OtherElements deeper than "
                  f"{MAX_NESTING} nesting levels; dropped")
        ctx.drop(info.hexname)
        return
    rec.others.append({"Tag": info.hexname, "Data": _typed(vals, "S", None)})


def _flat_column(rec: _Record, tag: int, info: TagInfo, vr: str, vals: list, scope: _Scope, ctx: _Ctx) -> None:
    """A public element into its typed column; an untypable value goes to OtherElements with an issue."""
    ck = info.col
    if vr is not None and _COLK.get(vr, ck) != ck and not (ck == "S" and vr == "PN"):
        ctx.issue(f"{_label(scope.path, tag, info)}: VR {vr} does not match the dictionary VR; "
                  "value coerced to the column type")
    try:
        typed = _typed(vals, ck, ctx.tz)
        if not info.repeated:
            if ck == "S":
                typed = [v for v in typed if v != ""]
            if len(typed) > 1:
                raise _Bad("multiplicity")
    except Exception as exc:  # noqa: BLE001
        rule = ("more values than the dictionary VM 1 allows"
                if isinstance(exc, _Bad) else f"malformed value for VR {vr}")
        where = _label(scope.path, tag, info)
        if scope.level + 1 > MAX_NESTING:
            ctx.issue(f"{where}: {rule}; dropped")
            ctx.drop(info.name)
            return
        ctx.issue(f"{where}: {rule}; raw strings kept in OtherElements as {info.hexname}")
        rec.others.append({"Tag": info.hexname, "Data": _typed(vals, "S", None)})
        return
    if not typed:
        return
    if ck == "P" and scope.level + 2 > MAX_NESTING:
        ctx.issue(f"{_label(scope.path, tag, info)}: person name deeper than {MAX_NESTING} "
                  "nesting levels; dropped")
        ctx.drop(info.name)
        return
    value = typed if info.repeated else typed[0]
    if info.group_id is not None:  # one item {Id: group, Value} per group, in one column per keyword
        if scope.level + 1 > MAX_NESTING:
            ctx.issue(f"{_label(scope.path, tag, info)}: repeating-group column deeper than {MAX_NESTING} "
                      "nesting levels; dropped")
            ctx.drop(info.name)
            return
        items = rec.row.get(info.name)
        if items is None:
            rec.row[info.name] = [{"Id": info.group_id, "Value": value}]
            rec.fields.append(info.field)
        else:
            items.append({"Id": info.group_id, "Value": value})
        return
    rec.row[info.name] = value
    rec.fields.append(info.field)


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
    rec = _Record(row, fields, others)
    meta = getattr(ds, "file_meta", None)
    skip = None
    if meta is not None and len(meta):
        try:
            _flat_ds(meta, rec, _Scope(0, _DEFAULT_ENC, ""), ctx)
            skip = set(map(int, meta._dict))
        except Exception as exc:  # noqa: BLE001
            ctx.issue(f"file meta information could not be read ({type(exc).__name__})")
    _flat_ds(ds, rec, _Scope(0, _top_encodings(ds, ctx), ""), ctx, skip)
    if others:
        row["OtherElements"] = others
        fields.append(_OTHER_FIELD)
    for t in getattr(ds, _HDR_ATTR, ()):
        ctx.drop(_tag_info(t).name)
    if ctx.dropped:
        row["DroppedTags"] = [{"TagName": n} for n in ctx.dropped]
        fields.append(_DROPPED_FIELD)
    if source_store is not None:
        row["SourceDicomStore"] = source_store
        fields.append(_SOURCE_FIELD)
    return row, fields, ctx.issues
