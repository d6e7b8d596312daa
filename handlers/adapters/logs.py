"""Structured logs: one JSON object per line on stdout, in the shape Cloud Logging parses.

Cloud Run / Cloud Functions turn each line into an entry: `severity`, `message`,
`logging.googleapis.com/labels`, `logging.googleapis.com/trace` and `.../spanId` are special
fields; everything else lands in jsonPayload. Context (requestId, operation, logsUrl) is bound
per delivery with `context(...)` and is carried as labels, so it can be filtered on.

Nothing here ever logs a header, a token or a payload; a last-resort scrubber also replaces
anything that looks like a bearer or OAuth access token.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import re
import sys
import threading
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any, Iterator, Mapping

Obj = dict[str, Any]

_labels: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar("log_labels",
                                                                          default=MappingProxyType({}))
_trace: contextvars.ContextVar[tuple[str | None, str | None]] = contextvars.ContextVar("log_trace",
                                                                                      default=(None, None))
_open: contextvars.ContextVar[bool] = contextvars.ContextVar("log_context_open", default=False)
_lock = threading.Lock()
_TOKEN = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+|ya29\.[A-Za-z0-9._-]+")
SEVERITIES = ("DEBUG", "INFO", "NOTICE", "WARNING", "ERROR", "CRITICAL")


def scrub(text: str) -> str:
    return _TOKEN.sub(lambda m: (m.group(1) or "") + "[REDACTED]", text)


@contextlib.contextmanager
def context(trace: str | None = None, span: str | None = None, **labels: Any) -> Iterator[None]:
    """Bind labels (and a trace) to every entry logged inside the block, in this thread/context."""
    tok = _labels.set({**_labels.get(), **{k: str(v) for k, v in labels.items() if v is not None}})
    otok = _open.set(True)
    ttok = _trace.set((trace, span)) if trace else None
    try:
        yield
    finally:
        _open.reset(otok)
        _labels.reset(tok)
        if ttok is not None:
            _trace.reset(ttok)


def bind(**labels: Any) -> None:
    """Add labels to the current `context(...)` block (e.g. the operation once it is known).

    Outside a block it does nothing: a label bound there would outlive the delivery and be stamped on
    every later entry of this thread (a worker thread serves many deliveries)."""
    if not _open.get():
        return
    _labels.set({**_labels.get(), **{k: str(v) for k, v in labels.items() if v is not None}})


def trace_from(cloud_event: Any, project: str | None) -> tuple[str | None, str | None]:
    """The W3C traceparent carried by the event (or its HTTP request), as Cloud Logging's trace/spanId."""
    header = None
    try:
        header = cloud_event.get("traceparent")
    except Exception:  # noqa: BLE001 - an event without extensions
        header = None
    if not header:
        try:
            import flask  # already loaded by functions-framework
            if flask.has_request_context():
                header = flask.request.headers.get("traceparent")
                if not header:
                    legacy = flask.request.headers.get("X-Cloud-Trace-Context", "")
                    m = re.match(r"^([0-9a-f]{32})(?:/(\d+))?", legacy)
                    if m and project:
                        span = format(int(m.group(2)), "016x") if m.group(2) else None
                        return f"projects/{project}/traces/{m.group(1)}", span
        except Exception:  # noqa: BLE001
            header = None
    m = re.match(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$", str(header or ""))
    if not m or not project:
        return None, None
    return f"projects/{project}/traces/{m.group(1)}", m.group(2)


def entry(severity: str, message: str, **fields: Any) -> Obj:
    if severity not in SEVERITIES:
        severity = "DEFAULT"
    out: Obj = {"severity": severity, "message": scrub(str(message)),
           "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")}
    labels = {**_labels.get(), **{k: str(v) for k, v in fields.pop("labels", {}).items() if v is not None}}
    if labels:
        out["logging.googleapis.com/labels"] = {k: scrub(v) for k, v in labels.items()}
    trace, span = _trace.get()
    if trace:
        out["logging.googleapis.com/trace"] = trace
        if span:
            out["logging.googleapis.com/spanId"] = span
    for k, v in fields.items():
        if v is not None:
            out[k] = v
    return out


def log(severity: str, message: str, **fields: Any) -> None:
    # ASCII only: a raw U+0085, U+2028 or U+2029 (from a hostile request's field name, say) would end the
    # line for readers that split on Unicode line boundaries; Cloud Logging decodes the escapes.
    line = json.dumps(entry(severity, message, **fields), default=str, ensure_ascii=True)
    line = scrub(line)
    with _lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def debug(message: str, **fields: Any) -> None:
    log("DEBUG", message, **fields)


def info(message: str, **fields: Any) -> None:
    log("INFO", message, **fields)


def warning(message: str, **fields: Any) -> None:
    log("WARNING", message, **fields)


def error(message: str, **fields: Any) -> None:
    log("ERROR", message, **fields)


def critical(message: str, **fields: Any) -> None:
    log("CRITICAL", message, **fields)
