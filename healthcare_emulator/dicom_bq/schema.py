"""The BigQuery schemas of both layouts: shared field dicts, column order, JSON_SCHEMA, item-schema merging."""
from __future__ import annotations

from pydicom.datadict import keyword_dict

MAX_NESTING = 15


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


def _group_fld(name: str, typ: str, repeated: bool) -> dict:
    """Shared field dict of a repeating-group column: RECORD REPEATED {Id STRING, Value typ}, Value
    REPEATED when the dictionary VM allows several values."""
    key = ("group", name, typ, repeated)
    f = _FIELDS.get(key)
    if f is None:
        f = _FIELDS[key] = {"name": name, "type": "RECORD", "mode": "REPEATED", "fields": [
            _sf("Id", "STRING"), _sf("Value", typ, "REPEATED" if repeated else "NULLABLE")]}
    return f


def JSON_SCHEMA(include_source_store: bool) -> list[dict]:
    """Fixed schema of the schemaJson layout (see the package docstring)."""
    s = [_sf("StudyInstanceUID", "STRING"), _sf("SeriesInstanceUID", "STRING"),
         _sf("SOPInstanceUID", "STRING")]
    if include_source_store:
        s.append(_sf("SourceDicomStore", "STRING"))
    s += [_sf("Metadata", "JSON"), _sf("StructuredStorageSize", "INTEGER"),
          _sf("BlobStorageSize", "INTEGER"), _sf("DroppedTags", "STRING", "REPEATED"),
          _sf("StorageClass", "STRING"), _sf("LastUpdated", "TIMESTAMP"),
          _sf("Type", "STRING")]
    return s


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
