"""Small helpers every HTTP surface shares: JSON bodies in and out, page tokens, RFC 3339 times.

Imports nothing else of the emulator but errors.py, so the resource handlers, the operations and
the export engine can all use it without an import cycle.
"""
from __future__ import annotations

import base64
import json
from datetime import datetime, timezone

from werkzeug.wrappers import Request, Response

from .errors import ApiError, invalid

MAX_JSON_BODY = 10 * 1024 * 1024


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def json_response(body, status: int = 200) -> Response:
    return Response(json.dumps(body, indent=2) + "\n", status=status,
                    content_type="application/json; charset=UTF-8")


def read_json(request: Request):
    if request.content_length and request.content_length > MAX_JSON_BODY:
        raise ApiError("INVALID_ARGUMENT", "Request payload size exceeds the limit.", http=413)
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError("INVALID_ARGUMENT", f"Invalid JSON payload received. {e}") from None


def like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"o": offset}).encode()).decode().rstrip("=")


def page_args(request: Request, *, default: int, maximum: int) -> tuple[int, int]:
    try:
        size = int(request.args.get("pageSize") or default)
    except ValueError:
        raise invalid("pageSize must be an integer", "page_size") from None
    if size < 0:
        raise invalid("pageSize must not be negative", "page_size")
    size = min(size or default, maximum)
    token = request.args.get("pageToken", "")
    offset = 0
    if token:
        try:
            offset = int(json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))["o"])
        except Exception:
            raise invalid("Invalid page token.", "page_token") from None
    return size, max(offset, 0)


def list_page(db, request: Request, table: str, key: str, value: str, field_name: str) -> Response:
    """One page of a resource list (datasets, DICOM stores), ordered by name."""
    size, offset = page_args(request, default=100, maximum=1000)
    rows = db.execute(
        f"SELECT body FROM {table} WHERE {key} = ? ORDER BY name LIMIT ? OFFSET ?",
        (value, size + 1, offset)).fetchall()
    out = {field_name: [json.loads(r["body"]) for r in rows[:size]]}
    if len(rows) > size:
        out["nextPageToken"] = encode_token(offset + size)
    return json_response(out)
