"""Schema union (additive; prefer left, right or widen), and the cached field index conform uses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

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


@dataclass(slots=True)
class FieldEntry:
    """One field of an indexed schema (treated as immutable, like the schema)."""
    field: dict
    type: str
    repeated: bool


class _Indexed(NamedTuple):
    fields: list         # holds a reference: the list's id stays unique while cached
    size: int
    index: dict[str, FieldEntry]


_IDX_CACHE: dict[int, _Indexed] = {}


def _index(fields: list) -> dict[str, FieldEntry]:
    """name -> FieldEntry for a schema/fields list, cached per list
    object (schemas are treated as immutable values)."""
    hit = _IDX_CACHE.get(id(fields))
    if hit is not None and hit.fields is fields and hit.size == len(fields):
        return hit.index
    idx = {f["name"]: FieldEntry(f, f["type"], f.get("mode") == "REPEATED") for f in fields}
    if len(_IDX_CACHE) > 4096:
        _IDX_CACHE.clear()
    _IDX_CACHE[id(fields)] = _Indexed(fields, len(fields), idx)
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
        fa = e.field
        if fa is fb:
            continue
        ta = e.type
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
