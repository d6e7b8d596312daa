"""Read and map a chunk of stored instances to rows, spilled to a file: the export's first pass.

Runs in worker processes (the export's CPU-bound part spreads over the cores) or in the export
thread itself. Imports only the pure mapping module, so a worker starts fast.
"""
from __future__ import annotations

import pickle
from datetime import datetime

from . import dicom_bq


def fits(schema: list, sub: list) -> bool:
    """True when every field of `sub` is in `schema` with the same type and mode (recursively):
    a row made against `sub` is then already a row of `schema` (missing keys are NULL)."""
    if sub is schema:
        return True
    by_name = {f["name"]: f for f in schema}
    for f in sub:
        g = by_name.get(f["name"])
        if g is None or g["type"] != f["type"] or g.get("mode", "NULLABLE") != f.get("mode", "NULLABLE"):
            return False
        if f["type"] == "RECORD" and not fits(g.get("fields", []), f.get("fields", [])):
            return False
    return True


def map_chunk(items: list[tuple], spill: str, as_json: bool, source: str | None) -> dict:
    """items: (blob path, size, stored_at RFC 3339, resource name). Writes the rows to `spill` (one pickle);
    returns {"schema", "conflict", "success", "failed": [resource], "issues": [(resource, text)]}."""
    schema: list = dicom_bq.JSON_SCHEMA(bool(source)) if as_json else []
    conflict = False
    seen: dict[int, list] = {}
    rows, failed, issues = [], [], []
    for path, size, stored_at, resource in items:
        try:
            ds = dicom_bq.read_header(path)
            if as_json:
                row, _, row_issues = dicom_bq.json_row(
                    ds, source_store=source, blob_size=size,
                    last_updated=datetime.fromisoformat(stored_at.replace("Z", "+00:00")))
            else:
                row, row_schema, row_issues = dicom_bq.flattened_row(ds, source_store=source)
                key = id(row_schema)
                if key not in seen:
                    schema = dicom_bq.union_schemas(schema, row_schema)
                    seen[key] = row_schema  # keeps the object alive, so its id is not reused
                    conflict = conflict or not fits(schema, row_schema)
        except Exception as e:  # an unreadable instance is counted and logged, never fatal
            failed.append((resource, f"instance could not be read: {type(e).__name__}"))
            continue
        rows.append(row)
        issues.extend((resource, text) for text in row_issues)
    with open(spill, "wb") as f:
        pickle.dump(rows, f, protocol=pickle.HIGHEST_PROTOCOL)
    return {"schema": schema, "conflict": conflict, "success": len(rows), "failed": failed, "issues": issues}


def load_chunk(spill: str) -> list[dict]:
    with open(spill, "rb") as f:
        return pickle.load(f)
