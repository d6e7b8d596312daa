"""Read and map a chunk of stored instances to rows, spilled to a file: the export's first pass.

Runs in worker processes (the export's CPU-bound part spreads over the cores) or in the export
thread itself. The rows leave the worker as Arrow data (an Arrow IPC file in the chunk's own schema,
built with the warehouse's RowEncoder), so the server's second pass only re-shapes columns
(`warehouse.conform_batch`) and encodes Parquet: no Python row is rebuilt there unless a chunk's
types conflict with the export's final schema.
"""
from __future__ import annotations

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
    """items: (blob path, size, stored_at RFC 3339, resource name). Writes the rows to `spill` (an Arrow
    IPC file in the chunk's schema; none when no row) and returns {"schema", "conflict" (always False:
    rows are conformed to the chunk's schema here), "success", "failed": [(resource, text)],
    "issues": [(resource, text)]}."""
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
    if conflict:
        rows = [dicom_bq.conform_row(r, schema) for r in rows]
    if rows:
        write_spill(spill, schema, rows)
    return {"schema": schema, "conflict": False, "success": len(rows), "failed": failed, "issues": issues}


def write_spill(spill: str, schema: list, rows: list[dict]) -> None:
    import pyarrow as pa

    from .warehouse import RowEncoder, normalize_schema
    batch = RowEncoder(normalize_schema(schema), "export").batch(rows)
    with pa.OSFile(spill, "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)


def load_batches(spill: str):
    """The spilled record batches, memory-mapped (nothing is copied into the heap)."""
    import pyarrow as pa
    with pa.memory_map(spill, "r") as source:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


def load_chunk(spill: str) -> list[dict]:
    """The spilled rows as Python values (for a chunk whose types conflict with the final schema)."""
    return [r for b in load_batches(spill) for r in _strip_nulls(b.to_pylist())]


def _strip_nulls(rows: list[dict]) -> list[dict]:
    """Arrow gives every column for every row; a row of dicom_bq has only the keys it set (NULL = absent)."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None and x != []}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v
    return [clean(r) for r in rows]
