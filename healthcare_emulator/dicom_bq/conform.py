"""conform_row: coerce a row into a schema (the widened or existing one of the destination table)."""
from __future__ import annotations

import json
from datetime import date, datetime, time

from .union import _index
from .values import _INT64_MAX, _INT64_MIN, _UTC, _iso_dt, _parse_da, _parse_tm, _plain_utc, _to_float, _to_int


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


def _to_string(v):
    tv = type(v)
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


def _to_json(v):
    if type(v) is str and _is_json(v):
        return v
    return json.dumps(v, ensure_ascii=False, default=str, allow_nan=False)


def _to_integer(v):
    return int(v) if type(v) is bool else _to_int(v)


def _to_floating(v):
    return float(v) if type(v) is bool else _to_float(v)


def _to_date(v):
    if isinstance(v, datetime):
        return (v if v.tzinfo else v.replace(tzinfo=_UTC)).astimezone(_UTC).date()
    if isinstance(v, date):
        return date(v.year, v.month, v.day)
    if type(v) is str:
        s = v.strip()
        return date.fromisoformat(s) if "-" in s else _parse_da(s)
    raise _NoFit


def _to_time(v):
    if isinstance(v, datetime):
        v = v.time()
    if isinstance(v, time):
        return time(v.hour, v.minute, v.second, v.microsecond)
    if type(v) is str:
        s = v.strip()
        return time.fromisoformat(s) if ":" in s and len(s) >= 8 else _parse_tm(s)
    raise _NoFit


def _to_timestamp(v):
    if isinstance(v, datetime):
        return _plain_utc(v)
    if isinstance(v, date):
        return datetime(v.year, v.month, v.day, tzinfo=_UTC)
    if type(v) is str:
        return _iso_dt(v)
    raise _NoFit


def _to_bool(v):
    if type(v) is bool:
        return v
    if type(v) is str and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise _NoFit


_COERCE = {"STRING": _to_string, "JSON": _to_json, "INTEGER": _to_integer, "FLOAT": _to_floating,
           "DATE": _to_date, "TIME": _to_time, "TIMESTAMP": _to_timestamp, "BOOLEAN": _to_bool, "BOOL": _to_bool}


def _coerce_scalar(v, t: str):
    """`v` as a value of BigQuery type `t`; raises _NoFit when it cannot be."""
    coerce = _COERCE.get(t)
    if coerce is not None:
        try:
            return coerce(v)
        except (ValueError, OverflowError, TypeError):
            pass
    raise _NoFit


_EXACT = {"STRING": str, "FLOAT": float, "DATE": date, "TIME": time}


def _conform_value(v, f: dict, t: str, rep: bool, issues, path: str):
    """Return the coerced value, or _MISSING to drop it."""
    if t == "RECORD" or t == "STRUCT":
        return _conform_records(v, _index(f.get("fields") or []), rep, issues, path)
    if rep:
        return _conform_repeated(v, t, issues, path)
    return _conform_nullable(v, t, issues, path)


def _conform_records(v, sub: dict, rep: bool, issues, path: str):
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


def _all_fit(v: list, t: str) -> bool:
    exact = _EXACT.get(t)
    if exact is not None:
        return all(type(x) is exact for x in v)
    return all(_fits_scalar(x, t) for x in v)


def _conform_repeated(v, t: str, issues, path: str):
    if type(v) is not list:
        try:
            return [_coerce_scalar(v, t)]
        except _NoFit:
            _issue(issues, path, f"value of type {type(v).__name__} cannot be stored in a "
                                 f"{t} column; dropped")
            return _MISSING
    if _all_fit(v, t):
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


def _conform_nullable(v, t: str, issues, path: str):
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
        t = e.type
        if not e.repeated and type(v) is _EXACT.get(t):
            y = v
        else:
            y = _conform_value(v, e.field, t, e.repeated, issues, prefix + k)
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
