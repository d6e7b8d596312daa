"""DICOM value parsing (DA, TM, DT, PN, numbers) and typing to a column kind; never I/O."""
from __future__ import annotations

import math
import re
import struct
from datetime import date, datetime, time, timedelta, timezone

from .schema import _PN_COMPS, _PN_GROUPS

_UTC = timezone.utc
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


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
